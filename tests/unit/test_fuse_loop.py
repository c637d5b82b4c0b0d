"""The wait for the next FUSE request (fuse/loop.py): busy polling, and what it must not starve.

A pipe stands in for /dev/fuse: the wrapped wait only polls a descriptor for
input, so a pipe with a byte in it is a request waiting to be read.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pyfuse3.asyncio as shim
import pytest

from vaultsync.fuse import loop as fuse_loop


@pytest.fixture
def slept(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Installs a fresh wrapper around a stand-in for pyfuse3's epoll wait, which records
    every descriptor it is asked to sleep on."""
    calls: list[int] = []

    async def sleep_in_epoll(fd: Any) -> None:
        calls.append(fd)
        await asyncio.sleep(0.5)  # "slept until woken": slow, as a halted CPU is

    monkeypatch.setattr(shim, "enable", lambda: None)
    monkeypatch.setattr(shim, "wait_readable", sleep_in_epoll)
    yield calls


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    yield r, w
    os.close(r)
    os.close(w)


def _write_later(fd: int, delay: float) -> threading.Thread:
    def write() -> None:
        time.sleep(delay)
        os.write(fd, b"x")

    t = threading.Thread(target=write)
    t.start()
    return t


async def test_a_request_within_the_window_is_taken_without_sleeping(
    slept: list[int], pipe: tuple[int, int]
) -> None:
    fuse_loop.enable(busy_poll=0.2)
    r, w = pipe
    t = _write_later(w, 0.02)
    t0 = time.monotonic()
    await shim.wait_readable(r)
    assert slept == [], "it slept although the request came within the polling window"
    assert time.monotonic() - t0 < 0.2
    t.join()


async def test_it_sleeps_once_the_window_has_passed(
    slept: list[int], pipe: tuple[int, int]
) -> None:
    fuse_loop.enable(busy_poll=0.01)
    r, _w = pipe
    t0 = time.monotonic()
    await shim.wait_readable(r)
    assert slept == [r]
    assert time.monotonic() - t0 >= 0.01


async def test_zero_never_polls(slept: list[int], pipe: tuple[int, int]) -> None:
    fuse_loop.enable(busy_poll=0)
    r, w = pipe
    t = _write_later(w, 0.005)
    await shim.wait_readable(r)
    assert slept == [r]
    t.join()


async def test_a_waiting_request_needs_no_poll_window(
    slept: list[int], pipe: tuple[int, int]
) -> None:
    fuse_loop.enable(busy_poll=0)
    r, w = pipe
    os.write(w, b"x")
    await shim.wait_readable(r)
    assert slept == []


async def test_other_tasks_run_while_it_polls(slept: list[int], pipe: tuple[int, int]) -> None:
    """An fsync whose fdatasync finished in a thread is answered at once, not after the window."""
    fuse_loop.enable(busy_poll=0.3)
    r, w = pipe
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    seen: list[float] = []
    t0 = time.monotonic()

    def finish_soon() -> None:
        time.sleep(0.02)
        loop.call_soon_threadsafe(done.set_result, None)

    threading.Thread(target=finish_soon).start()

    async def other() -> None:
        await done
        seen.append(time.monotonic() - t0)

    task = asyncio.ensure_future(other())
    writer = _write_later(w, 0.1)
    await shim.wait_readable(r)
    await task
    writer.join()
    assert seen and seen[0] < 0.08, f"the other task waited {seen} for the polling to end"
    assert slept == []


async def test_a_reader_busy_polling_when_the_session_closes_stops(
    slept: list[int], pipe: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """pyfuse3.terminate() (SIGTERM) wakes the readers sleeping in epoll; one that is busy
    polling at that moment must stop too, not go on to sleep for a request that never
    comes (the daemon then never unmounted on SIGTERM)."""
    monkeypatch.setattr(shim, "notify_closing", lambda fd: None)
    fuse_loop.enable(busy_poll=0.5)
    r, w = pipe
    waiting = asyncio.ensure_future(shim.wait_readable(r))
    await asyncio.sleep(0.01)  # inside its polling window
    shim.notify_closing(r)
    with pytest.raises(shim.ClosedResourceError):
        await asyncio.wait_for(waiting, 0.3)
    assert slept == []
    # The next session may get the same descriptor number: it is waited on as usual.
    fuse_loop.enable(busy_poll=0.0)
    os.write(w, b"x")
    await shim.wait_readable(r)
