"""The REST API on a live mounted volume and on a standalone recovery server.

One volume is written in two rounds through a real mount whose daemon also
serves the API ([api] enabled = true); a second, standalone `vaultsync serve
--from rc` reads the same volume from the rclone bucket alone. Both are real
uvicorn servers on loopback, spoken to with httpx. Downloads and restores are
compared byte for byte with what each round wrote.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.api_helpers import (
    ADMIN_TOKEN,
    READ_TOKEN,
    ApiServer,
    Volume,
    api_toml,
    auth,
    wait_healthy,
    write_volume,
)
from tests.support.mounting import fsync_path
from vaultsync.api.server import listening_socket
from vaultsync.commands.local_servers import LocalProvider, free_port

H = auth(ADMIN_TOKEN)


@pytest.fixture(scope="module")
def env(
    tmp_path_factory: pytest.TempPathFactory, seaweedfs: LocalProvider, rclone: LocalProvider
) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("api")
    root = tmp / "restores"
    root.mkdir()
    port = free_port()
    vol = write_volume(tmp / "vol", seaweedfs, rclone, api_toml(port, [root], enabled=True))
    live = f"http://127.0.0.1:{port}"
    server = None
    try:
        wait_healthy(live, lambda: vol.mount.proc is not None, vol.mount.log)
        # The async target must hold everything before the standalone server reads it.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            st = httpx.get(f"{live}/v1/status", params={"probe": False}, headers=H).json()
            if all(t["lag_lsn"] == 0 for t in st["targets"]):
                break
            time.sleep(0.2)
        server = ApiServer(vol.mount.config, "rc", tmp / "serve.log")
        yield {"vol": vol, "live": live, "standalone": server.url, "root": root}
    finally:
        if server is not None:
            server.stop()
        vol.mount.cleanup()


@pytest.fixture(params=["live", "standalone"])
def url(request: pytest.FixtureRequest, env: dict[str, Any]) -> str:
    return str(env[request.param])


def _get(url: str, path: str, **params: Any) -> httpx.Response:
    return httpx.get(url + path, params=params, headers=H, timeout=60)


def test_health_status_points_openapi_metrics(url: str, env: dict[str, Any]) -> None:
    vol: Volume = env["vol"]
    h = httpx.get(url + "/v1/health").json()
    assert h["status"] == "ok" and h["mode"] in ("live", "standalone")
    st = _get(url, "/v1/status", probe=False).json()
    names = [t["name"] for t in st["targets"]]
    if h["mode"] == "live":
        # The same numbers as `vaultsync status --json`, from the same function.
        assert names == ["sw", "rc"] and st["volume"]["mounted"] is True
        assert st["volume"]["last_lsn"] >= 30
        assert {"watermark_lsn", "lag_lsn", "mode", "health"} <= set(st["targets"][0])
    else:
        assert names == ["rc"] and st["server"]["target"] == "rc"
    pts = _get(url, "/v1/points").json()
    mine = next(t for t in pts["targets"] if t["target"] == pts["serving_target"])
    assert mine["first_lsn"] == 1 and mine["last_lsn"] >= 30 and mine["by_segment"]
    schema = httpx.get(url + "/openapi.json").json()
    for p in ("/v1/tree/{path}", "/v1/content/{path}", "/v1/restores", "/v1/snapshots"):
        assert p in schema["paths"], p
    text = _get(url, "/metrics").text
    assert "# TYPE vaultsync_api_requests_total counter" in text
    assert 'vaultsync_api_requests_total{method="GET",route="/v1/points",status="200"}' in text
    assert vol.rounds


def test_listing_paged_as_of_each_round(url: str, env: dict[str, Any]) -> None:
    vol: Volume = env["vol"]
    for rnd in vol.rounds:
        want = sorted(p.rsplit("/", 1)[1] for p in rnd.files if p.startswith("/many/"))
        got: list[str] = []
        cursor = 0
        pages = 0
        while True:
            r = _get(url, "/v1/tree/many", at=rnd.at, limit=7, cursor=cursor).json()
            assert len(r["entries"]) <= 7
            got += [e["name"] for e in r["entries"]]
            pages += 1
            if r["next_cursor"] is None:
                break
            cursor = r["next_cursor"]
        assert sorted(got) == want and pages == (len(want) + 6) // 7
        root = {e["name"]: e for e in _get(url, "/v1/tree/", at=rnd.at).json()["entries"]}
        assert root["link"]["type"] == "symlink" and root["link"]["target"] == "docs"
        assert root["big.bin"]["size"] == len(rnd.files["/big.bin"])
        docs = {e["name"] for e in _get(url, "/v1/tree/docs", at=rnd.at).json()["entries"]}
        assert docs == {"a.txt", "space name \u00e9.txt"}
    # Page size is bounded by api.max_page (50 here).
    r = _get(url, "/v1/tree/many", limit=51)
    assert r.status_code == 422 and "less than or equal to 50" in r.json()["message"]


def test_small_responses_are_not_held_back(url: str) -> None:
    """A keep-alive client gets each small response at once, not after a delayed ACK.

    With Nagle's algorithm on the server's sockets, a response written in two
    pieces (headers, body) waits for the client's delayed ACK, ~40 ms on Linux:
    one client could list ~21 directories a second. The median here is a few
    milliseconds; 25 ms leaves room for a busy machine and still fails at 40.
    """
    times = []
    with httpx.Client(base_url=url, headers=H, timeout=60) as c:
        c.get("/v1/tree/many", params={"limit": 10}).raise_for_status()
        for i in range(30):
            t0 = time.perf_counter()
            c.get("/v1/tree/many", params={"limit": 10, "cursor": i % 20}).raise_for_status()
            times.append(time.perf_counter() - t0)
    assert sorted(times)[len(times) // 2] < 0.025, sorted(times)
    sock = listening_socket("127.0.0.1", 0)
    try:  # accepted connections inherit TCP_NODELAY, and asyncio sets it (proto is TCP)
        assert sock.proto == socket.IPPROTO_TCP
        with socket.create_connection(sock.getsockname()[:2]):
            conn, _ = sock.accept()
            with conn:
                assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        sock.close()


def test_meta_and_downloads_byte_for_byte(url: str, env: dict[str, Any]) -> None:
    vol: Volume = env["vol"]
    for rnd in vol.rounds:
        for path, data in rnd.files.items():
            if path.startswith("/many/") and path not in ("/many/f001", "/many/f029"):
                continue
            m = _get(url, "/v1/meta" + path, at=rnd.at).json()
            assert m["type"] == "file" and m["size"] == len(data), path
            r = _get(url, "/v1/content" + path, at=rnd.at)
            assert r.status_code == 200 and r.content == data, path
            assert r.headers["content-length"] == str(len(data))
            assert r.headers["etag"] == m["etag"] and r.headers["last-modified"]
    old, new = vol.rounds[0].files["/big.bin"], vol.rounds[1].files["/big.bin"]
    at0 = vol.rounds[0].at
    size = len(old)
    for rng, lo, hi in (
        ("bytes=0-0", 0, 1),
        ("bytes=5242000-5343000", 5242000, 5343001),  # across the changed region
        (f"bytes={size - 10}-", size - 10, size),
        ("bytes=-4096", size - 4096, size),
        (f"bytes=100-{size + 50}", 100, size),
    ):
        r = httpx.get(url + "/v1/content/big.bin", params={"at": at0}, headers={**H, "Range": rng})
        assert r.status_code == 206, rng
        assert r.content == old[lo:hi], rng
        assert r.headers["content-range"] == f"bytes {lo}-{hi - 1}/{size}"
        assert r.headers["content-length"] == str(hi - lo)
    assert old[5242000:5343001] != new[5242000:5343001]
    r = httpx.get(
        url + "/v1/content/big.bin", params={"at": at0}, headers={**H, "Range": f"bytes={size}-"}
    )
    assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{size}"
    # Conditional requests: the ETag of the old version is not the new one's.
    e0 = _get(url, "/v1/meta/big.bin", at=at0).json()["etag"]
    e1 = _get(url, "/v1/meta/big.bin", at=vol.rounds[1].at).json()["etag"]
    assert e0 != e1
    r = httpx.get(
        url + "/v1/content/big.bin", params={"at": at0}, headers={**H, "If-None-Match": e0}
    )
    assert r.status_code == 304
    r = httpx.get(
        url + "/v1/content/big.bin",
        params={"at": vol.rounds[1].at},
        headers={**H, "Range": "bytes=0-9", "If-Range": e0},
    )
    assert r.status_code == 200 and r.content == new  # stale If-Range: the whole new file
    h = httpx.head(url + "/v1/content/docs/a.txt", params={"at": at0}, headers=H)
    assert h.status_code == 200 and h.headers["content-length"] == "1400"


def test_conditional_requests_rfc9110(url: str, env: dict[str, Any]) -> None:
    """Downloads answer conditional requests as RFC 9110 §13 says.

    304 (no content) when If-None-Match matches (weak comparison, `*`, lists)
    or, without If-None-Match, when If-Modified-Since is not older than
    Last-Modified (any of the three HTTP-date forms; an invalid date is
    ignored); 412 when If-Match fails (strong comparison) or the file changed
    after If-Unmodified-Since; If-Range lets a Range through only for the same
    strong ETag or the exact Last-Modified date. HEAD says what GET would send.
    """
    vol: Volume = env["vol"]
    data = vol.rounds[0].files["/docs/a.txt"]
    path = url + "/v1/content/docs/a.txt"
    # A fixed LSN (a time may still be settling when the test runs).
    at0 = str(_get(url, "/v1/meta/docs/a.txt", at=vol.rounds[0].at).json()["point"]["lsn"])

    def get(method: str = "GET", **headers: str) -> httpx.Response:
        hdrs = {**H, **{k.replace("_", "-"): v for k, v in headers.items()}}
        return httpx.request(method, path, params={"at": at0}, headers=hdrs, timeout=60)

    full = get()
    assert full.status_code == 200 and full.content == data
    tag, lm = full.headers["etag"], full.headers["last-modified"]
    assert tag.startswith('"') and tag.endswith('"')
    assert full.headers["cache-control"] == "private, max-age=3600"  # a past LSN: fixed
    lm_s = int(parsedate_to_datetime(lm).timestamp())

    def date(s: int, form: str = "imf") -> str:
        d = datetime.fromtimestamp(s, UTC)
        if form == "rfc850":
            return d.strftime("%A, %d-%b-%y %H:%M:%S GMT")
        if form == "asctime":
            return d.strftime("%a %b ") + f"{d.day:>2}" + d.strftime(" %H:%M:%S %Y")
        return format_datetime(d, usegmt=True)

    def not_modified(r: httpx.Response) -> None:
        assert r.status_code == 304, (r.status_code, r.request.headers)
        assert r.content == b""
        assert r.headers["etag"] == tag and r.headers["last-modified"] == lm
        assert r.headers.get("content-length", str(len(data))) == str(len(data))

    # If-None-Match: weak comparison, any member of a list, or "*".
    for inm in (tag, "W/" + tag, f'"nope", {tag}', "*"):
        not_modified(get(if_none_match=inm))
    assert get(if_none_match='"nope", W/"other"').status_code == 200
    not_modified(get(if_none_match=tag, range="bytes=0-9"))  # 304 before Range
    # If-Modified-Since, only without If-None-Match.
    for form in ("imf", "rfc850", "asctime"):
        not_modified(get(if_modified_since=date(lm_s, form)))
    not_modified(get(if_modified_since=date(lm_s + 3600)))
    r = get(if_modified_since=date(lm_s - 1))
    assert r.status_code == 200 and r.content == data
    assert get(if_modified_since="not a date").status_code == 200
    r = get(if_none_match='"nope"', if_modified_since=date(lm_s + 3600))
    assert r.status_code == 200 and r.content == data  # If-None-Match wins
    # If-Match: strong comparison; If-Unmodified-Since only without If-Match.
    for im in (tag, f'"nope", {tag}', "*"):
        assert get(if_match=im).status_code == 200
    for im in ('"nope"', "W/" + tag):
        r = get(if_match=im)
        assert r.status_code == 412 and r.json()["error"] == "precondition_failed"
        assert "traceback" not in r.text.lower()
    r = get(if_unmodified_since=date(lm_s - 86400))
    assert r.status_code == 412 and "If-Unmodified-Since" in r.json()["message"]
    assert get(if_unmodified_since=date(lm_s)).status_code == 200
    assert get(if_match=tag, if_unmodified_since=date(lm_s - 86400)).status_code == 200
    # If-Range: the range for the same version, the whole file otherwise.
    for ok in (tag, lm):
        r = get(range="bytes=3-9", if_range=ok)
        assert r.status_code == 206 and r.content == data[3:10], ok
        assert r.headers["content-range"] == f"bytes 3-9/{len(data)}"
    for stale in ("W/" + tag, '"nope"', date(lm_s - 1)):
        r = get(range="bytes=3-9", if_range=stale)
        assert r.status_code == 200 and r.content == data, stale
    # HEAD: the headers GET would send, no content.
    h = get("HEAD")
    assert h.status_code == 200 and h.content == b""
    assert h.headers["content-length"] == str(len(data)) and h.headers["etag"] == tag
    h = get("HEAD", range="bytes=-100")
    assert h.status_code == 206 and h.headers["content-length"] == "100"
    assert h.headers["content-range"] == f"bytes {len(data) - 100}-{len(data) - 1}/{len(data)}"
    assert get("HEAD", if_none_match=tag).status_code == 304
    assert get("HEAD", if_match='"nope"').status_code == 412
    # "latest" can change: caches must ask again every time.
    r = _get(url, "/v1/content/docs/a.txt")
    assert r.status_code == 200 and r.headers["cache-control"] == "private, no-cache"


def test_unknown_points_and_paths_are_clear(url: str) -> None:
    r = _get(url, "/v1/tree/", at="1999-01-01T00:00:00Z")
    assert r.status_code == 404 and "before the first point" in r.json()["message"]
    r = _get(url, "/v1/tree/", at="no-such-snapshot")
    assert r.status_code == 404 and "no snapshot named" in r.json()["message"]
    r = _get(url, "/v1/meta/nothing/here")
    assert r.status_code == 404 and "does not exist" in r.json()["message"]
    r = _get(url, "/v1/content/docs")
    assert r.status_code == 400 and "only files" in r.json()["message"]
    r = _get(url, "/v1/tree/docs/a.txt")
    assert r.status_code == 400 and "not a directory" in r.json()["message"]


def test_live_head_and_snapshots_only_at_the_writer(env: dict[str, Any]) -> None:
    live, standalone = env["live"], env["standalone"]
    vol: Volume = env["vol"]
    mnt = vol.mount.mountpoint
    (mnt / "fresh.txt").write_bytes(b"written just now")  # not fsynced: the live head has it
    r = _get(live, "/v1/content/fresh.txt")
    assert r.status_code == 200 and r.content == b"written just now"
    assert r.headers["cache-control"].startswith("private, no-cache")
    name = f"snap-{os.getpid()}"
    r = httpx.post(live + "/v1/snapshots", json={"name": name}, headers=H)
    assert r.status_code == 201, r.text
    lsn = r.json()["lsn"]
    again = httpx.post(live + "/v1/snapshots", json={"name": name}, headers=H)
    assert again.status_code == 409 and "already exists" in again.json()["message"]
    snaps = {s["name"]: s for s in _get(live, "/v1/snapshots").json()}
    assert snaps[name]["lsn"] == lsn and set(snaps[name]["targets"]) == {"sw", "rc"}
    # The snapshot names the point that holds fresh.txt, read back from the target.
    deadline = time.monotonic() + 20
    while True:
        r = _get(live, "/v1/content/fresh.txt", at=name)
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert r.status_code == 200 and r.content == b"written just now"
    assert r.headers["x-vaultsync-lsn"] == str(lsn)
    r = httpx.post(standalone + "/v1/snapshots", json={"name": "nope"}, headers=H)
    assert r.status_code == 409 and "not the writer" in r.json()["message"]
    r = httpx.delete(standalone + f"/v1/snapshots/{name}", headers=H)
    assert r.status_code == 409
    r = httpx.delete(live + f"/v1/snapshots/{name}", headers=H)
    assert r.status_code == 200 and set(r.json()["deleted_at"]) == {"sw", "rc"}
    assert name not in {s["name"] for s in _get(live, "/v1/snapshots").json()}


def _listing(url: str, path: str, **params: Any) -> tuple[set[str], int] | None:
    """Names in a directory and the LSN listed, or None while the point or path is missing."""
    r = _get(url, "/v1/tree" + path, **params)
    if r.status_code == 404:
        return None
    assert r.status_code == 200, r.text
    return {e["name"] for e in r.json()["entries"]}, int(r.json()["point"]["lsn"])


def _names(url: str, path: str, **params: Any) -> set[str] | None:
    got = _listing(url, path, **params)
    return None if got is None else got[0]


def _rebuilds(url: str) -> int:
    for line in _get(url, "/metrics").text.splitlines():
        if line.startswith("vaultsync_api_point_view_rebuilds_total"):
            return int(float(line.split()[-1]))
    raise AssertionError("no rebuild counter in /metrics")


def _until(check: Any, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


def test_listing_cache_follows_the_volume(env: dict[str, Any]) -> None:
    """Cached listings: 'latest' follows writes, a fixed LSN or snapshot never drifts.

    The live server's 'latest' is the mount itself, so a write shows at once.
    The standalone server caches its 'latest' view and revalidates it against
    the target's head: new segments show within a few seconds, and an
    unchanged target costs no rebuild. A fixed LSN is served from the cache
    as it was; a snapshot deleted and made again under the same name at this
    server shows its new point at once.
    """
    live, standalone = env["live"], env["standalone"]
    mnt = env["vol"].mount.mountpoint
    d = mnt / "cache-check"
    d.mkdir()
    (d / "a").write_bytes(b"a")
    assert _names(live, "/cache-check") == {"a"}  # not even flushed: the live head has it
    (d / "b").write_bytes(b"b")
    assert _names(live, "/cache-check") == {"a", "b"}
    fsync_path(d / "b")
    name = f"cache-{os.getpid()}"
    r = httpx.post(live + "/v1/snapshots", json={"name": name}, headers=H)
    assert r.status_code == 201, r.text
    lsn_ab = r.json()["lsn"]
    # The standalone server reads the async rclone target: wait for it to catch up.
    assert _until(lambda: _names(standalone, "/cache-check") == {"a", "b"}, 30)
    (d / "c").write_bytes(b"c")
    fsync_path(d / "c")
    # At most FRESH_SECONDS (5) plus shipping later, the standalone 'latest' has c.
    assert _until(lambda: _names(standalone, "/cache-check") == {"a", "b", "c"}, 30)
    for url in (live, standalone):
        for _ in range(2):  # built, then cached: the same either way
            assert _listing(url, "/cache-check", at=str(lsn_ab)) == ({"a", "b"}, lsn_ab)
        assert _until(lambda u=url: _names(u, "/cache-check", at=name) == {"a", "b"})
    # The same snapshot name, made again later: this server forgets its old view.
    assert httpx.delete(live + f"/v1/snapshots/{name}", headers=H).status_code == 200
    r = httpx.post(live + "/v1/snapshots", json={"name": name}, headers=H)
    assert r.status_code == 201, r.text
    got = _until(lambda: _listing(live, "/cache-check", at=name))
    assert got == ({"a", "b", "c"}, r.json()["lsn"]) and r.json()["lsn"] > lsn_ab
    assert httpx.delete(live + f"/v1/snapshots/{name}", headers=H).status_code == 200
    # Nothing new at the target: the cached 'latest' outlives FRESH_SECONDS without a rebuild.
    time.sleep(1.5)  # the last segment sealed by age, its tail pieces cleaned up
    _names(standalone, "/cache-check")
    before = _rebuilds(standalone)
    time.sleep(5.5)
    assert _names(standalone, "/cache-check") == {"a", "b", "c"}
    assert _rebuilds(standalone) == before


def _wait_job(url: str, job_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        j = httpx.get(f"{url}/v1/restores/{job_id}", headers=auth(READ_TOKEN)).json()
        if j["state"] != "running":
            return dict(j)
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} still running")


def test_restore_job_to_completion(url: str, env: dict[str, Any]) -> None:
    vol: Volume = env["vol"]
    root: Path = env["root"]
    rnd = vol.rounds[0]
    dest = f"done-{url.rsplit(':', 1)[1]}"
    r = httpx.post(
        url + "/v1/restores",
        json={"path": "/docs", "at": rnd.at, "destination": dest},
        headers=H,
    )
    assert r.status_code == 202, r.text
    job = _wait_job(url, r.json()["id"])
    assert job["state"] == "done", job
    assert job["bytes_done"] == job["bytes_total"] == 1400 + 12
    out = root / dest
    assert (out / "a.txt").read_bytes() == rnd.files["/docs/a.txt"]  # round 0, not round 1
    assert (out / "space name \u00e9.txt").read_bytes() == b"unicode name"
    listed = [j["id"] for j in httpx.get(url + "/v1/restores", headers=H).json()]
    assert job["id"] in listed


def test_restore_job_cancelled_midway(url: str, env: dict[str, Any]) -> None:
    vol: Volume = env["vol"]
    root: Path = env["root"]
    dest = f"cancel-{url.rsplit(':', 1)[1]}"
    r = httpx.post(
        url + "/v1/restores",
        # Capped at 2 MiB/s, the 24 MiB copy takes seconds: cancelled midway by any clock.
        json={
            "path": "/big.bin",
            "at": vol.rounds[0].at,
            "destination": dest + "/big.bin",
            "bwlimit": 2 << 20,
        },
        headers=H,
    )
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # wait until data is flowing, then cancel
        j = httpx.get(f"{url}/v1/restores/{job_id}", headers=H).json()
        if j["bytes_done"] > 0 or j["state"] != "running":
            break
        time.sleep(0.005)
    assert j["state"] == "running", "the restore finished before it could be cancelled"
    c = httpx.post(f"{url}/v1/restores/{job_id}/cancel", json={}, headers=H).json()
    assert c["state"] == "cancelled"
    assert 0 < c["bytes_done"] < c["bytes_total"] == len(vol.rounds[0].files["/big.bin"])
    # Nothing half-written is left: no file, no temporary.
    left = [p.name for p in (root / dest).iterdir()] if (root / dest).exists() else []
    assert left == []
