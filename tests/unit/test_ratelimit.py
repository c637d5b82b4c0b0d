"""The bandwidth cap shared by migrate and restore, and the way users write rates."""

from __future__ import annotations

import asyncio
import time

import pytest

from vaultsync.errors import ConfigError
from vaultsync.store.ratelimit import RateLimiter, parse_rate


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("1048576", 1048576.0),
        ("10M", 10 * 1024**2),
        ("512k", 512 * 1024.0),
        ("1.5MiB", 1.5 * 1024**2),
        ("2G/s", 2.0 * 1024**3),
        (" 4 MB ", 4.0 * 1024**2),
        (None, None),
        ("0", None),
        ("", None),
    ],
)
def test_rates_as_users_write_them(text: str | None, rate: float | None) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["fast", "10X", "-5M", "1.2.3M", "M"])
def test_a_bad_rate_names_the_option_and_the_form(text: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_rate(text, "--bwlimit")
    assert f"--bwlimit {text!r} is not a rate" in str(e.value) and "10M" in str(e.value)


async def test_concurrent_takers_share_one_cap() -> None:
    lim = RateLimiter(1_000_000.0)  # 1 MB/s
    t0 = time.monotonic()
    await asyncio.gather(*(lim.take(100_000) for _ in range(6)))  # 0.6 MB in all
    elapsed = time.monotonic() - t0
    # The first take goes at once; the other five wait their turn: 0.5 s in all.
    assert 0.45 <= elapsed < 1.5, elapsed


async def test_no_cap_never_waits() -> None:
    lim = RateLimiter(None)
    t0 = time.monotonic()
    for _ in range(1000):
        await lim.take(1 << 30)
    assert time.monotonic() - t0 < 0.5
