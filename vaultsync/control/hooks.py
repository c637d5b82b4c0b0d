"""`[failover] on_promote` and `on_demote`: the commands that move the applications.

A hook is a command as a list (no shell), run with the site, the epoch, the
mountpoint and the reason in its environment, its output logged line by line,
and killed (its whole process group) when it outlives `hook_timeout`. A hook
that fails or hangs is reported and changes nothing else: the role change it
announces has already happened, and the data is safe either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass

log = logging.getLogger("vaultsync.hooks")

MAX_LOGGED_LINES = 200  # a chatty hook is cut off in the log, not in its run
MAX_LINE = 1000


@dataclass(frozen=True)
class HookResult:
    ok: bool
    returncode: int | None  # None: it did not finish (timed out or could not start)
    detail: str  # one line for the log and the event


async def run_hook(
    name: str,
    command: Sequence[str],
    *,
    site: str,
    epoch: int,
    mountpoint: str,
    reason: str,
    timeout: float,
) -> HookResult:
    """Run one hook to completion or until `timeout`; never raises for the hook's failures."""
    env = {
        **os.environ,
        "VAULTSYNC_HOOK": name,
        "VAULTSYNC_SITE": site,
        "VAULTSYNC_EPOCH": str(epoch),
        "VAULTSYNC_MOUNTPOINT": mountpoint,
        "VAULTSYNC_REASON": reason[:MAX_LINE],
    }
    try:
        proc = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group: a timeout kills all of it
        )
    except OSError as e:
        detail = f"{name} hook {command[0]!r} could not start: {e.strerror or e}"
        log.error("%s", detail)
        return HookResult(False, None, detail)
    logged = 0

    async def relay() -> None:
        nonlocal logged
        assert proc.stdout is not None
        async for raw in proc.stdout:
            if logged < MAX_LOGGED_LINES:
                line = raw.decode(errors="replace").rstrip()[:MAX_LINE]
                log.info("%s hook: %s", name, line)
                logged += 1

    try:
        async with asyncio.timeout(timeout):
            await asyncio.gather(relay(), proc.wait())
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        detail = f"{name} hook {command[0]!r} did not finish within {timeout:g} s; killed"
        log.error("%s", detail)
        return HookResult(False, None, detail)
    if proc.returncode != 0:
        detail = f"{name} hook {command[0]!r} failed with exit code {proc.returncode}"
        log.error("%s", detail)
        return HookResult(False, proc.returncode, detail)
    detail = f"{name} hook {command[0]!r} succeeded"
    log.info("%s", detail)
    return HookResult(True, 0, detail)
