"""on_promote / on_demote hooks (control/hooks.py): environment, output, failure, timeout."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import pytest

from vaultsync.control.hooks import run_hook

ARGS = {"site": "b", "epoch": 3, "mountpoint": "/mnt/v", "reason": "writer gone", "timeout": 10.0}


async def test_a_hook_sees_the_role_change_and_its_output_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    code = "import os; print(*(os.environ['VAULTSYNC_' + k] for k in ('SITE', 'EPOCH', " + (
        "'MOUNTPOINT', 'REASON')))"
    )
    with caplog.at_level(logging.INFO, logger="vaultsync.hooks"):
        r = await run_hook("on_promote", [sys.executable, "-c", code], **ARGS)  # type: ignore[arg-type]
    assert r.ok and r.returncode == 0
    assert "on_promote hook: b 3 /mnt/v writer gone" in caplog.text


async def test_a_failing_hook_is_reported_not_raised() -> None:
    r = await run_hook("on_demote", [sys.executable, "-c", "raise SystemExit(7)"], **ARGS)  # type: ignore[arg-type]
    assert not r.ok and r.returncode == 7 and "exit code 7" in r.detail


async def test_a_missing_command_is_one_line() -> None:
    r = await run_hook("on_promote", ["/nonexistent/start-apps"], **ARGS)  # type: ignore[arg-type]
    assert not r.ok and r.returncode is None and "could not start" in r.detail


async def test_a_hung_hook_and_its_children_are_killed(tmp_path: Path) -> None:
    marker = tmp_path / "child-alive"
    child = tmp_path / "child.py"
    child.write_text(f"import time\ntime.sleep(3)\nopen({str(marker)!r}, 'w')\n")
    script = tmp_path / "hook.py"
    script.write_text(
        f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, {str(child)!r}])\n"
        "time.sleep(60)\n"
    )
    code = str(script)
    t0 = time.monotonic()
    args = {**ARGS, "timeout": 1.0}
    r = await run_hook("on_promote", [sys.executable, code], **args)  # type: ignore[arg-type]
    assert not r.ok and "did not finish within 1 s" in r.detail
    assert time.monotonic() - t0 < 5
    time.sleep(3.5)
    assert not marker.exists(), "the hook's child outlived the timeout"
