"""Unit tests for vaultsync/config.py: validation, one-line errors, credentials, secrets."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr, ValidationError

from vaultsync.config import Config, Credentials, load_config, parse_config, parse_size
from vaultsync.errors import ConfigError

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
ACCESS = "AKIAIOSFODNN7EXAMPLE"


def _minimal() -> dict[str, Any]:
    return {"volume": {"name": "demo", "state_dir": "/var/lib/vaultsync/demo"}}


def _with_target(**target: Any) -> dict[str, Any]:
    d = _minimal()
    t = {
        "name": "primary",
        "endpoint": "https://s3.example.com",
        "bucket": "vault-bucket",
        "credentials": {"access_key_id_env": "VS_AK", "secret_access_key_env": "VS_SK"},
    }
    t.update(target)
    d["targets"] = [t]
    return d


def _error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as ei:
        parse_config(data, "vaultsync.toml")
    msg = str(ei.value)
    assert "\n" not in msg, msg
    assert msg.startswith("vaultsync.toml: "), msg
    return msg


# -- valid configs ------------------------------------------------------------------------


def test_minimal_config() -> None:
    cfg = parse_config(_minimal())
    assert cfg.volume.name == "demo"
    assert cfg.volume.state_dir == Path("/var/lib/vaultsync/demo")
    assert cfg.targets == []
    assert cfg.volume.encryption is False
    assert cfg.volume.passphrase_env == "VAULTSYNC_PASSPHRASE"
    assert cfg.replication.quorum is None
    # Defaults obey the volume's own rules.
    cs = cfg.volume.chunk_size
    assert 4096 <= cs <= 64 * 1024**2 and cs & (cs - 1) == 0
    assert 1024**2 <= cfg.volume.segment_size <= 4 * 1024**3
    assert 0 <= cfg.volume.compression_level <= 22


def test_full_config() -> None:
    d = _with_target(
        endpoint="http://127.0.0.1:9000/",
        prefix="/volumes/demo/",
        mode="sync",
        on_failure="block",
        region="eu-west-1",
        path_style=False,
    )
    d["targets"].append(
        {
            "name": "backup.2",
            "endpoint": "https://other.example.net/s3",
            "bucket": "abc",
            "credentials": {"file": "/etc/vaultsync/creds"},
        }
    )
    d["volume"].update(
        chunk_size="1MiB",
        segment_size="64 MiB",
        compression_level=0,
        encryption=True,
        passphrase_file="/etc/vaultsync/pass",
        segment_max_age=0.5,
    )
    d["replication"] = {"quorum": 1, "block_timeout": 5, "sync_on_close": True}
    cfg = parse_config(d)
    t = cfg.targets[0]
    assert t.endpoint == "http://127.0.0.1:9000"  # trailing slash dropped
    assert t.prefix == "volumes/demo/"  # normalised to "x/" form
    assert (t.mode, t.on_failure, t.region, t.path_style) == ("sync", "block", "eu-west-1", False)
    assert cfg.targets[1].prefix == ""
    assert cfg.targets[1].mode == "async"
    assert cfg.targets[1].credentials.file == Path("/etc/vaultsync/creds")
    assert cfg.volume.chunk_size == 1024**2
    assert cfg.volume.segment_size == 64 * 1024**2
    assert cfg.volume.passphrase_file == Path("/etc/vaultsync/pass")
    assert cfg.replication.quorum == 1
    assert cfg.target("backup.2") is cfg.targets[1]


def test_config_is_frozen() -> None:
    cfg = parse_config(_minimal())
    with pytest.raises(ValidationError, match="frozen"):
        cfg.volume.name = "other"


# -- sizes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (1048576, 1048576),
        ("1048576", 1048576),
        ("1MiB", 1024**2),
        ("1M", 1024**2),
        ("1 MB", 1024**2),
        ("1mib", 1024**2),
        (" 64 KiB ", 64 * 1024),
        ("4K", 4096),
        ("2GiB", 2 * 1024**3),
        ("1T", 1024**4),
        ("512B", 512),
        ("0", 0),
    ],
)
def test_parse_size(text: int | str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "bad", ["", "MiB", "1.5MiB", "-1MiB", "1 PiB", "1MiBs", "ten", "1e6", True, 1.0, None, [1]]
)
def test_parse_size_rejects(bad: Any) -> None:
    with pytest.raises(ValueError, match="must be a size"):
        parse_size(bad)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 10**6), st.sampled_from(["", "B", "K", "KiB", "M", "MiB", "G", "T"]))
def test_parse_size_units_are_binary(n: int, unit: str) -> None:
    factor = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}[unit[:1]]
    assert parse_size(f"{n}{unit}") == n * factor
    assert parse_size(f"{n} {unit.lower()}") == n * factor


@pytest.mark.parametrize(("text", "value"), [("4KiB", 4096), ("64MiB", 64 * 1024**2)])
def test_chunk_size_bounds_accepted(text: str, value: int) -> None:
    d = _minimal()
    d["volume"]["chunk_size"] = text
    assert parse_config(d).volume.chunk_size == value


# -- mistakes: each names its field and says what to do ----------------------------------------

Mutation = Callable[[dict[str, Any]], None]


def _set(path: str, value: Any) -> Mutation:
    def apply(d: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = d
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        if value is KeyError:
            del node[last]
        else:
            node[last] = value

    return apply


MISTAKES: list[tuple[str, Mutation, str, str]] = [
    ("no volume", _set("volume", KeyError), "volume:", "required"),
    ("volume not a table", _set("volume", "demo"), "volume:", "valid dictionary"),
    ("no state_dir", _set("volume.state_dir", KeyError), "volume.state_dir:", "required"),
    ("no name", _set("volume.name", KeyError), "volume.name:", "required"),
    ("bad name", _set("volume.name", "-demo"), "volume.name:", "letters, digits"),
    ("long name", _set("volume.name", "a" * 64), "volume.name:", "1-63"),
    ("typo", _set("volume.chunksize", "1MiB"), "volume.chunksize:", "check the spelling"),
    ("top typo", _set("target", []), "target:", "not a known setting"),
    ("size text", _set("volume.chunk_size", "1.5MiB"), "volume.chunk_size:", '"1MiB"'),
    ("size bool", _set("volume.chunk_size", True), "volume.chunk_size:", "must be a size"),
    ("chunk 3000", _set("volume.chunk_size", 3000), "volume.chunk_size:", "power of two"),
    ("chunk 2KiB", _set("volume.chunk_size", "2KiB"), "volume.chunk_size:", "4KiB and 64MiB"),
    ("chunk 128M", _set("volume.chunk_size", "128MiB"), "volume.chunk_size:", "64MiB"),
    ("segment tiny", _set("volume.segment_size", "1KiB"), "volume.segment_size:", "1MiB"),
    ("segment huge", _set("volume.segment_size", "5GiB"), "volume.segment_size:", "4GiB"),
    ("level", _set("volume.compression_level", 23), "volume.compression_level:", "22"),
    ("level neg", _set("volume.compression_level", -1), "volume.compression_level:", "0"),
    ("age", _set("volume.segment_max_age", 0), "volume.segment_max_age:", "greater than 0"),
    ("age text", _set("volume.segment_max_age", "x"), "volume.segment_max_age:", "number"),
    ("encryption", _set("volume.encryption", "maybe"), "volume.encryption:", "boolean"),
    ("quorum 0", _set("replication", {"quorum": 0}), "replication.quorum:", "1"),
    ("quorum>sync", _set("replication", {"quorum": 1}), "replication.quorum:", 'mode = "sync"'),
    ("timeout", _set("replication", {"block_timeout": -1}), "replication.block_timeout:", "0"),
    ("repl typo", _set("replication", {"qorum": 1}), "replication.qorum:", "spelling"),
]

TARGET_MISTAKES: list[tuple[str, Mutation, str, str]] = [
    ("mode", _set("targets.0.mode", "synchronous"), "targets[0].mode:", "'sync' or 'async'"),
    ("on_failure", _set("targets.0.on_failure", "panic"), "targets[0].on_failure:", "'block'"),
    ("endpoint", _set("targets.0.endpoint", "s3.example.com"), "targets[0].endpoint:", "http"),
    ("ftp", _set("targets.0.endpoint", "ftp://x"), "targets[0].endpoint:", "https://"),
    ("no endpoint", _set("targets.0.endpoint", KeyError), "targets[0].endpoint:", "required"),
    ("bucket", _set("targets.0.bucket", "ab"), "targets[0].bucket:", "3"),
    ("bucket long", _set("targets.0.bucket", "b" * 64), "targets[0].bucket:", "63"),
    ("prefix", _set("targets.0.prefix", "a/../b"), "targets[0].prefix:", "'..'"),
    ("name", _set("targets.0.name", "has space"), "targets[0].name:", "letters, digits"),
    ("typo", _set("targets.0.bukket", "x"), "targets[0].bukket:", "spelling"),
    ("no creds", _set("targets.0.credentials", KeyError), "targets[0].credentials:", "required"),
    (
        "empty creds",
        _set("targets.0.credentials", {}),
        "targets[0].credentials:",
        'file = "path"',
    ),
    (
        "half env",
        _set("targets.0.credentials", {"access_key_id_env": "A"}),
        "targets[0].credentials:",
        "must both be set",
    ),
    (
        "env and file",
        _set(
            "targets.0.credentials",
            {"access_key_id_env": "A", "secret_access_key_env": "B", "file": "/f"},
        ),
        "targets[0].credentials:",
        "not both",
    ),
    (
        "secret inline",
        _set("targets.0.credentials", {"secret_access_key": SECRET}),
        "targets[0].credentials.secret_access_key:",
        "not a known setting",
    ),
    ("duplicate", lambda d: d["targets"].append(copy.deepcopy(d["targets"][0])), "targets:", "dup"),
]


@pytest.mark.parametrize(
    ("mutate", "field", "hint"),
    [m[1:] for m in MISTAKES],
    ids=[m[0] for m in MISTAKES],
)
def test_volume_mistakes(mutate: Mutation, field: str, hint: str) -> None:
    d = _with_target()
    mutate(d)
    msg = _error(d)
    assert msg.startswith(f"vaultsync.toml: {field} "), msg
    assert hint in msg, msg


@pytest.mark.parametrize(
    ("mutate", "field", "hint"),
    [m[1:] for m in TARGET_MISTAKES],
    ids=[m[0] for m in TARGET_MISTAKES],
)
def test_target_mistakes(mutate: Mutation, field: str, hint: str) -> None:
    d = _with_target()
    mutate(d)
    msg = _error(d)
    assert msg.startswith(f"vaultsync.toml: {field} "), msg
    assert hint in msg, msg
    assert SECRET not in msg


def test_mistake_in_second_target_names_its_index() -> None:
    d = _with_target()
    second = copy.deepcopy(d["targets"][0])
    second.update(name="second", mode="fast")
    d["targets"].append(second)
    assert _error(d).startswith("vaultsync.toml: targets[1].mode: ")


def test_mistake_message_shows_the_bad_value() -> None:
    msg = _error(_with_target(mode="synchronous"))
    assert "'synchronous'" in msg


def test_unknown_target_name() -> None:
    cfg = parse_config(_with_target())
    with pytest.raises(ConfigError, match=r"no target named 'nope'.*targets: primary"):
        cfg.target("nope")
    with pytest.raises(ConfigError, match="targets: none"):
        parse_config(_minimal()).target("x")


def test_top_level_not_a_table() -> None:
    with pytest.raises(ConfigError, match=r"^cfg: \(top level\): "):
        parse_config([], "cfg")  # type: ignore[arg-type]


# -- credentials ------------------------------------------------------------------------------


def test_credentials_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VS_AK", ACCESS)
    monkeypatch.setenv("VS_SK", SECRET)
    cfg = parse_config(_with_target())
    ak, sk = cfg.targets[0].credentials.resolve("targets[0]")
    assert ak == ACCESS
    assert isinstance(sk, SecretStr)
    assert sk.get_secret_value() == SECRET
    assert SECRET not in repr(sk) and SECRET not in str(sk)


@pytest.mark.parametrize("unset", ["VS_AK", "VS_SK"])
def test_missing_credential_variable_is_named(monkeypatch: pytest.MonkeyPatch, unset: str) -> None:
    monkeypatch.setenv("VS_AK", ACCESS)
    monkeypatch.setenv("VS_SK", SECRET)
    monkeypatch.setenv(unset, "")
    cfg = parse_config(_with_target())
    with pytest.raises(ConfigError) as ei:
        cfg.targets[0].credentials.resolve("targets[0]")
    msg = str(ei.value)
    assert msg.startswith("targets[0].credentials: ")
    assert unset in msg and "export" in msg
    assert SECRET not in msg


def _creds_file(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    p = tmp_path / "creds"
    p.write_text(text)
    p.chmod(mode)
    return p


def test_credentials_from_0600_file(tmp_path: Path) -> None:
    p = _creds_file(
        tmp_path,
        f'# vaultsync keys\n\naccess_key_id = {ACCESS}\nSECRET_ACCESS_KEY = "{SECRET}"\n',
    )
    assert p.stat().st_mode & 0o777 == 0o600
    cfg = parse_config(_with_target(credentials={"file": str(p)}))
    ak, sk = cfg.targets[0].credentials.resolve("targets[0]")
    assert ak == ACCESS
    assert sk.get_secret_value() == SECRET


def test_credentials_file_with_equals_in_secret(tmp_path: Path) -> None:
    p = _creds_file(tmp_path, "access_key_id=a\nsecret_access_key=b=c==\n")
    _, sk = Credentials(file=p).resolve("t")
    assert sk.get_secret_value() == "b=c=="


def test_credentials_file_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as ei:
        Credentials(file=tmp_path / "nope").resolve("targets[2]")
    msg = str(ei.value)
    assert msg.startswith("targets[2].credentials.file: cannot read ")
    assert "nope" in msg and "No such file" in msg


def test_credentials_file_incomplete(tmp_path: Path) -> None:
    p = _creds_file(tmp_path, f"access_key_id = {ACCESS}\n")
    with pytest.raises(
        ConfigError, match=r"must hold access_key_id = \.\.\. and secret_access_key"
    ):
        Credentials(file=p).resolve("targets[0]")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_credentials_file_unreadable(tmp_path: Path) -> None:
    p = _creds_file(tmp_path, f"access_key_id = a\nsecret_access_key = {SECRET}\n", 0o000)
    with pytest.raises(ConfigError, match="Permission denied") as ei:
        Credentials(file=p).resolve("targets[0]")
    assert SECRET not in str(ei.value)


# -- secrets never show ----------------------------------------------------------------------


def test_secrets_never_appear_in_str_or_repr(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("VS_SK", SECRET)
    monkeypatch.setenv("VS_AK", ACCESS)
    monkeypatch.setenv("VAULTSYNC_PASSPHRASE", "hunter2-passphrase")
    p = _creds_file(tmp_path, f"access_key_id = x\nsecret_access_key = {SECRET}\n")
    d = _with_target()
    d["targets"].append(
        {
            "name": "second",
            "endpoint": "http://h",
            "bucket": "bbb",
            "credentials": {"file": str(p)},
        }
    )
    d["volume"]["encryption"] = True
    cfg = parse_config(d)
    resolved = [t.credentials.resolve(f"targets[{i}]") for i, t in enumerate(cfg.targets)]
    assert cfg.passphrase() == "hunter2-passphrase"
    dumps = [
        str(cfg),
        repr(cfg),
        cfg.model_dump_json(),
        str(cfg.model_dump()),
        repr(resolved),
        str(resolved),
    ]
    for text in dumps:
        assert SECRET not in text
        assert "hunter2-passphrase" not in text


# -- passphrase ----------------------------------------------------------------------------------


def test_passphrase_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    d = _minimal()
    d["volume"].update(encryption=True, passphrase_env="MY_PASS")
    monkeypatch.setenv("MY_PASS", "s3cret")
    assert parse_config(d).passphrase() == "s3cret"
    monkeypatch.delenv("MY_PASS")
    with pytest.raises(ConfigError, match=r"MY_PASS is empty.*passphrase_file"):
        parse_config(d).passphrase()


def test_passphrase_from_file(tmp_path: Path) -> None:
    p = tmp_path / "pass"
    p.write_text("line one pass\n")
    d = _minimal()
    d["volume"].update(encryption=True, passphrase_file=str(p))
    assert parse_config(d).passphrase() == "line one pass"
    p.unlink()
    with pytest.raises(ConfigError, match=r"^volume\.passphrase_file: cannot read"):
        parse_config(d).passphrase()


def test_empty_passphrase_file_is_refused(tmp_path: Path) -> None:
    """An empty passphrase file must not silently become the empty passphrase."""
    p = tmp_path / "pass"
    p.write_text("\n")
    d = _minimal()
    d["volume"].update(encryption=True, passphrase_file=str(p))
    with pytest.raises(ConfigError, match="passphrase_file"):
        parse_config(d).passphrase()


# -- load_config ---------------------------------------------------------------------------------


def test_load_config_anchors_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    f = tmp_path / "etc" / "vs.toml"
    f.write_text(
        '[volume]\nname = "demo"\nstate_dir = "state"\nchunk_size = "128KiB"\n'
        'passphrase_file = "pass"\n'
        '[[targets]]\nname = "a"\nendpoint = "http://localhost:9000"\nbucket = "bkt"\n'
        'credentials = { file = "keys" }\n'
    )
    cfg = load_config(f)
    assert isinstance(cfg, Config)
    assert cfg.volume.state_dir == tmp_path / "etc" / "state"
    assert cfg.volume.passphrase_file == tmp_path / "etc" / "pass"
    assert cfg.targets[0].credentials.file == tmp_path / "etc" / "keys"
    assert cfg.volume.chunk_size == 128 * 1024


def test_load_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[volume\nname=1")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(bad)
    bad.write_text('[volume]\nname = "demo"\n')
    with pytest.raises(ConfigError) as ei:
        load_config(bad)
    assert str(ei.value) == f"{bad}: volume.state_dir: is required but missing"


def test_credentials_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "open.cred"
    f.write_text("access_key_id = AK\nsecret_access_key = SK\n")
    f.chmod(0o644)
    cfg = parse_config(
        {
            "volume": {"name": "v", "state_dir": str(tmp_path / "s")},
            "targets": [
                {
                    "name": "t",
                    "endpoint": "http://127.0.0.1:9",
                    "bucket": "bkt",
                    "credentials": {"file": str(f)},
                }
            ],
        }
    )
    with pytest.raises(ConfigError, match="chmod 600"):
        cfg.targets[0].credentials.resolve("targets.t")


# -- sites and automatic failover -----------------------------------------------------------


def _auto(**failover: Any) -> dict[str, Any]:
    d = _with_target(mode="sync")
    d["failover"] = {"mode": "auto", **failover}
    return d


def test_failover_defaults_are_manual_with_the_host_as_site() -> None:
    cfg = parse_config(_with_target())
    assert cfg.failover.mode == "manual" and cfg.failover.failover_after == 15.0
    assert cfg.site.name and cfg.failover.on_promote is None
    assert cfg.data_targets == cfg.targets


def test_failover_after_below_the_minimum_names_it() -> None:
    msg = _error(_auto(failover_after="3s"))
    assert "failover.failover_after: must be at least 6 seconds (got 3)" in msg


def test_hooks_are_commands_not_strings() -> None:
    cfg = parse_config(_auto(on_promote=["/usr/local/bin/start-apps", "--now"]))
    assert cfg.failover.on_promote == ["/usr/local/bin/start-apps", "--now"]
    assert "failover.on_promote" in _error(_auto(on_promote="start-apps --now"))
    assert "failover.on_demote" in _error(_auto(on_demote=[]))


def _with_witness(failover: str = "auto", **witness: Any) -> dict[str, Any]:
    d = _with_target()
    d["targets"].append({**d["targets"][0], "name": "vote", "role": "witness", **witness})
    d["failover"] = {"mode": failover}
    return d


def test_a_witness_holds_no_data() -> None:
    cfg = parse_config(_with_witness())
    assert [t.name for t in cfg.data_targets] == ["primary"]
    assert "is a witness" in _error(_with_witness(mode="sync"))
    assert "only votes in automatic failover" in _error(_with_witness(failover="manual"))
    d = _with_witness()
    d["targets"][0]["role"] = "witness"
    assert "every target is a witness" in _error(d)
    assert "a witness that does not vote" in _error(_with_witness(vote=False))
    d = _with_witness()
    d["targets"][0]["vote"] = False
    assert [t.name for t in parse_config(d).voters] == ["vote"]
    d["targets"][1]["role"] = "data"
    d["targets"][1]["vote"] = False
    assert "at least one target must vote" in _error(d)
    d = _with_witness()
    d["api"] = {"from_target": "vote"}
    assert "api.from_target: 'vote' is a witness" in _error(d)


def test_a_site_name_must_be_a_name() -> None:
    d = _with_target()
    d["site"] = {"name": "a b"}
    assert "site.name" in _error(d)
