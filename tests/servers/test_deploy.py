"""Deployment: systemd units and their installer, the compose file, the operator guide, the demo.

Nothing here is mocked: the installer writes real files (under a prefix),
`systemd-analyze verify` checks them where it exists, the compose file goes
through `docker compose config` (or `docker-compose config`) where a CLI is
installed, and the demo is started for real and its printed hints are run.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from vaultsync.commands.systemd import UNITS
from vaultsync.config import (
    ApiConfig,
    Config,
    FailoverConfig,
    MountConfig,
    ReplicationConfig,
    RetentionConfig,
    SiteConfig,
    TargetConfig,
    VolumeConfig,
)
from vaultsync.fuse.mount import lazy_unmount, mounted_at

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "operator-guide.md"
COMPOSE = ROOT / "docker" / "compose.yaml"


def vaultsync(*args: str, timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vaultsync", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "250"},
        **kw,
    )


# -- systemd --------------------------------------------------------------------------


def _unit(path: Path) -> configparser.RawConfigParser:
    # systemd allows repeated keys (ExecStartPre=...); keep the last, as a check is enough.
    p = configparser.RawConfigParser(strict=False, interpolation=None)
    p.optionxform = str  # type: ignore[assignment,method-assign]
    p.read_string(path.read_text())
    return p


def test_systemd_install_writes_the_units_where_it_says(tmp_path: Path) -> None:
    fake_bin = tmp_path / "opt" / "vaultsync" / "bin" / "vaultsync"
    res = vaultsync("systemd", "install", "--prefix", str(tmp_path), "--bin", str(fake_bin))
    assert res.returncode == 0, res.stderr
    unit_dir = tmp_path / "etc" / "systemd" / "system"
    for name in UNITS:
        path = unit_dir / name
        assert f"wrote {path}" in res.stdout
        text = path.read_text()
        assert "@VAULTSYNC@" not in text and str(fake_bin) in text
        assert path.stat().st_mode & 0o777 == 0o644
    assert "daemon-reload not run" in res.stdout  # never under a prefix
    # Re-running replaces, never duplicates or fails.
    again = vaultsync("systemd", "install", "--prefix", str(tmp_path), "--bin", str(fake_bin))
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in unit_dir.iterdir()) == sorted(UNITS)


def test_systemd_install_refuses_a_relative_executable(tmp_path: Path) -> None:
    res = vaultsync("systemd", "install", "--prefix", str(tmp_path), "--bin", "bin/vaultsync")
    assert res.returncode == 1
    assert "absolute path" in res.stderr and "Traceback" not in res.stderr


def test_mount_unit_orders_with_network_and_flushes_on_stop(tmp_path: Path) -> None:
    res = vaultsync("systemd", "install", "--prefix", str(tmp_path))
    assert res.returncode == 0, res.stderr
    unit_dir = tmp_path / "etc" / "systemd" / "system"
    exe = str(Path(sys.executable).parent / "vaultsync")
    m = _unit(unit_dir / "vaultsync-mount@.service")
    assert "network-online.target" in m["Unit"]["After"]
    assert "network-online.target" in m["Unit"]["Wants"]
    s = m["Service"]
    # `vaultsync mount` (no --daemon) stays in the foreground and does not sd_notify.
    assert s["Type"] == "exec"
    assert s["ExecStart"].split()[:3] == [exe, "mount", "/etc/vaultsync/%i.toml"]
    assert "--daemon" not in s["ExecStart"]
    assert s["ExecStop"].lstrip("-").split()[:2] == [exe, "umount"]
    assert s["Restart"] == "on-failure"
    assert s["KillMode"] == "mixed"
    assert s["TimeoutStopSec"].endswith("min") and int(s["TimeoutStopSec"][:-3]) >= 2
    a = _unit(unit_dir / "vaultsync-serve@.service")
    assert a["Service"]["ExecStart"].split() == [
        exe,
        "serve",
        "/etc/vaultsync/%i.toml",
        "--from",
        "${VAULTSYNC_SERVE_FROM}",
    ]
    assert "vaultsync-mount@%i.service" in a["Unit"]["After"]
    for u in (m, a):
        assert u["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not found")
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    res = vaultsync("systemd", "install", "--prefix", str(tmp_path))
    assert res.returncode == 0, res.stderr
    unit_dir = tmp_path / "etc" / "systemd" / "system"
    for name in UNITS:
        # A template is verified through an instance of it.
        instance = unit_dir / name.replace("@.", "@projects.")
        instance.symlink_to(name)
        r = subprocess.run(
            ["systemd-analyze", "verify", str(instance)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        # verify exits 0 on unknown keys or bad values but says so: any word about our
        # files is a defect.
        ours = [ln for ln in (r.stdout + r.stderr).splitlines() if "vaultsync-" in ln]
        assert r.returncode == 0 and not ours, r.stdout + r.stderr


def test_docs_name_the_install_command_as_it_is() -> None:
    res = vaultsync("systemd", "install", "--help")
    assert res.returncode == 0
    assert "--prefix" in res.stdout and "--bin" in res.stdout
    assert "vaultsync systemd install" in GUIDE.read_text()
    assert "vaultsync systemd install" in (ROOT / "docs" / "runbook.md").read_text()


# -- the operator guide ---------------------------------------------------------------


def _fields(model: type[Any]) -> dict[str, Any]:
    return dict(model.model_fields)


def test_every_config_key_is_documented_with_its_default() -> None:
    text = GUIDE.read_text()
    sections = {
        "volume": VolumeConfig,
        "replication": ReplicationConfig,
        "targets": TargetConfig,
        "retention": RetentionConfig,
        "mount": MountConfig,
        "api": ApiConfig,
        "site": SiteConfig,
        "failover": FailoverConfig,
    }
    assert set(_fields(Config)) == set(sections)
    for section, model in sections.items():
        for key, info in _fields(model).items():
            rows = re.findall(rf"^\| `{section}\.{key}` \|([^\n]*)$", text, re.M)
            assert len(rows) == 1, f"{section}.{key} has {len(rows)} rows in the guide's reference"
            if info.is_required():
                assert "required" in rows[0], f"{section}.{key} is required"
            elif (section, key) == ("site", "name"):
                assert "host name" in rows[0], "site.name defaults to the host name"
            elif key != "credentials":
                default = info.get_default(call_default_factory=True)
                names = {"None": "none", "True": "true", "False": "false"}
                shown = names.get(str(default), str(default))
                cells = [c.strip() for c in rows[0].split("|")]
                assert f"`{shown}`" in cells[0] or shown in cells[0], (
                    f"{section}.{key}: default {shown!r} not in {cells[0]!r}"
                )
    for key in ("access_key_id_env", "secret_access_key_env", "file"):
        assert f"`targets.credentials.{key}`" in text
    # And nothing documented that does not exist.
    row_key = rf"^\| `((?:{'|'.join(sections)})\.[a-z_.]+)` \|"
    documented = set(re.findall(row_key, text, re.M))
    known = {f"{s}.{k}" for s, m in sections.items() for k in _fields(m)} | {
        f"targets.credentials.{k}" for k in ("access_key_id_env", "secret_access_key_env", "file")
    }
    assert documented == known, sorted(documented ^ known)


def _code(text: str) -> list[str]:
    """The lines of fenced blocks and the inline code spans of a markdown text."""
    fenced = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.M | re.S)
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.M | re.S))
    return [ln for block in fenced for ln in block.splitlines()] + spans


def test_docs_commands_and_flags_exist() -> None:
    """Every `vaultsync CMD --flag` in the guide's and runbook's code is in CMD --help."""
    pattern = re.compile(r"vaultsync ((?:snapshot|systemd) [a-z]+|[a-z]+)([^|;&#]*)")
    helps: dict[str, str] = {}
    seen = 0
    for doc in ("operator-guide.md", "runbook.md"):
        for line in _code((ROOT / "docs" / doc).read_text()):
            for cmd, rest in pattern.findall(line.split(" #")[0]):
                if cmd not in helps:
                    r = vaultsync(*cmd.split(), "--help")
                    assert r.returncode == 0, f"{doc}: vaultsync {cmd}: {r.stderr}"
                    helps[cmd] = r.stdout
                for flag in re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", rest):
                    assert flag in helps[cmd], f"{doc}: vaultsync {cmd} has no {flag}"
                    seen += 1
    assert seen > 5 and {"status", "promote", "mount", "salvage", "restore"} <= set(helps)


# -- the demo -------------------------------------------------------------------------


def test_demo_prints_what_to_try_next_and_the_hints_work(tmp_path: Path) -> None:
    d = tmp_path / "demo"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vaultsync", "demo", "--dir", str(d)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "250"},
        start_new_session=True,
    )
    lines: list[str] = []
    pit: subprocess.Popen[bytes] | None = None
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "press Ctrl-C" in line:
                break
        out = "".join(lines)
        assert "press Ctrl-C" in out, out
        assert "what to try next" in out and "docs/runbook.md" in out
        assert "docs/operator-guide.md" in out
        # The mount daemon serves the REST API and restore page at the printed address.
        url = next(ln.split(": ", 1)[1].strip() for ln in lines if "REST API and restore" in ln)
        with urllib.request.urlopen(url.replace("/ui/", "/v1/health"), timeout=10) as r:
            assert r.status == 200
        with urllib.request.urlopen(url, timeout=10) as r:
            assert b"<html" in r.read().lower()
        commands = [ln.strip()[2:] for ln in lines if ln.strip().startswith("$ ")]
        assert len(commands) == 6, out
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        for cmd in commands[:-1]:
            if " snapshot create " in cmd:  # the user has read the status first: wait for it
                _wait_caught_up(d / "vaultsync.toml")
            r = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", cmd],
                capture_output=True,
                text=True,
                timeout=120,
                env=env,
            )
            assert r.returncode == 0, f"{cmd}\n{r.stdout}{r.stderr}"
        assert (d / "hello-restored.txt").read_text() == "hello\n"
        # The last hint mounts read-only in the foreground, as of the snapshot.
        pit = subprocess.Popen(
            ["bash", "-c", commands[-1].split("#")[0]], env=env, start_new_session=True
        )
        deadline = time.monotonic() + 60
        while mounted_at(d / "pit") is None and time.monotonic() < deadline:
            assert pit.poll() is None
            time.sleep(0.1)
        assert (d / "pit" / "hello.txt").read_text() == "hello\n"
    finally:
        if pit is not None:
            if mounted_at(d / "pit") is not None:
                subprocess.run(["fusermount3", "-u", str(d / "pit")], check=False)
            try:
                pit.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(pit.pid, signal.SIGKILL)
                pit.wait(10)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # Ctrl-C: unmounts and stops the providers
        try:
            rest, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rest, _ = proc.communicate(timeout=30)
        for mp in (d / "mnt", d / "pit"):
            if mounted_at(mp) is not None:
                lazy_unmount(mp)
    assert proc.returncode == 0, rest
    assert "unmounting" in rest and "stopping rclone" in rest


def _wait_caught_up(config: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = vaultsync("status", "--json", str(config))
        if r.returncode == 0 and all(t["lag_lsn"] == 0 for t in json.loads(r.stdout)["targets"]):
            return
        time.sleep(0.5)
    raise AssertionError("the demo's targets did not catch up")


# -- docker ---------------------------------------------------------------------------


def _compose_cli() -> list[str] | None:
    """`docker compose` (the v2 plugin) if it works here, else `docker-compose`, else None."""
    if shutil.which("docker"):
        r = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if r.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.mark.skipif(
    _compose_cli() is None,
    reason="neither `docker compose` nor `docker-compose` is installed (apt: docker-compose)",
)
def test_compose_config_validates() -> None:
    cli = _compose_cli()
    assert cli is not None
    r = subprocess.run(
        [*cli, "-f", str(COMPOSE), "config"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert "site-a" in r.stdout and "site-b" in r.stdout


def _load_compose() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml")
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return doc


def test_compose_structure_follows_the_spec_rules_we_rely_on() -> None:
    doc = _load_compose()
    services: dict[str, Any] = doc["services"]
    assert set(services) == {"seaweedfs", "rclone", "buckets", "site-a", "site-b"}
    named_volumes = set(doc.get("volumes") or {})
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
        build = svc.get("build")
        if build:
            assert (COMPOSE.parent / build["context"] / build["dockerfile"]).is_file(), name
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            assert cond["condition"] in (
                "service_started",
                "service_healthy",
                "service_completed_successfully",
            )
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{dep} has no healthcheck"
        for v in svc.get("volumes") or []:
            if isinstance(v, str):
                src = v.split(":")[0]
                if src.startswith("."):
                    assert (COMPOSE.parent / src).exists(), f"{name}: {src} missing"
                else:
                    assert src in named_volumes, f"{name}: undeclared volume {src}"
            else:
                assert v["type"] == "bind" and (COMPOSE.parent / v["source"]).is_dir()
        hc = svc.get("healthcheck")
        if hc:
            assert hc["test"][0] in ("CMD", "CMD-SHELL")
    # The sites mount FUSE: device, capability, AppArmor, and A's mount shown on the host.
    for site in ("site-a", "site-b"):
        s = services[site]
        assert "/dev/fuse:/dev/fuse" in s["devices"]
        assert "SYS_ADMIN" in s["cap_add"]
        assert "apparmor:unconfined" in s["security_opt"]
    shared = [v for v in services["site-a"]["volumes"] if isinstance(v, dict)]
    assert shared and shared[0]["bind"]["propagation"] == "rshared"
    assert services["site-a"]["depends_on"]["buckets"]["condition"] == (
        "service_completed_successfully"
    )
    assert services["site-b"]["depends_on"]["site-a"]["condition"] == "service_healthy"


def test_both_sites_use_one_config_that_vaultsync_accepts(tmp_path: Path) -> None:
    doc = _load_compose()
    env = doc["services"]["site-a"]["environment"]
    keys = {k: re.sub(r"^\$\{\w+:-(.*)\}$", r"\1", v) for k, v in env.items()}
    from vaultsync.config import load_config

    cfg = load_config(COMPOSE.parent / "site.toml")
    assert {t.name: t.mode for t in cfg.targets} == {"seaweedfs": "sync", "rclone": "async"}
    for t in cfg.targets:
        assert t.credentials.access_key_id_env in keys
        assert t.credentials.secret_access_key_env in keys
        assert len(keys[t.credentials.access_key_id_env]) >= 10  # rclone refuses shorter keys


def test_dockerfile_builds_what_the_docs_say() -> None:
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert "FROM python:3.11-slim-bookworm AS build" in text
    for pkg in ("fuse3", "libfuse3-dev", "pkg-config", "gcc"):
        assert pkg in text
    # Everything the image copies exists, so a build does not fail on a missing path.
    for src in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for part in src.split():
            assert (ROOT / part).exists(), part
    readme = (ROOT / "docker" / "README.md").read_text()
    for flag in ("--device /dev/fuse", "--cap-add SYS_ADMIN", "apparmor:unconfined", "rshared"):
        assert flag in readme
    assert "no Docker engine" in readme
