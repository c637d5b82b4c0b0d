"""Hostile and careless input to the API (issue 21): what got through, and the rest of its kind.

One small volume, written through a real mount with names a URL cannot
simply spell (a newline, bytes that are not UTF-8), served by three real
`vaultsync serve` processes from the SeaweedFS bucket: one with tokens, one
open on loopback (no token: the one a web page could abuse), and one that
schemathesis drives with every check on, with its own restore root so that
the restores it starts land nowhere the other tests look. Requests a client
library would tidy up are sent as raw bytes.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
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
    write_volume,
)
from vaultsync.api.server import REQUEST_SECONDS
from vaultsync.commands.local_servers import LocalProvider, free_port
from vaultsync.config import ApiToken
from vaultsync.points.recovery import PointError, parse_point

H = auth(ADMIN_TOKEN)
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def env(
    tmp_path_factory: pytest.TempPathFactory, seaweedfs: LocalProvider, rclone: LocalProvider
) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("apihostile")
    roots = {name: tmp / f"restores-{name}" for name in ("tokens", "open", "fuzz")}
    for root in roots.values():
        root.mkdir()
    vol = write_volume(
        tmp / "vol",
        seaweedfs,
        rclone,
        api_toml(free_port(), [roots["tokens"]], enabled=False),
        big_mib=1,
        odd_names=True,
    )
    vol.mount.umount()
    base = vol.mount.config.read_text().split("\n[api]")[0]
    servers: dict[str, ApiServer] = {}
    try:
        for name, open_loopback in (("tokens", False), ("open", True), ("fuzz", False)):
            cfg = tmp / f"{name}.toml"
            port = free_port()
            cfg.write_text(
                base + api_toml(port, [roots[name]], enabled=False, open_loopback=open_loopback)
            )
            servers[name] = ApiServer(cfg, "sw", tmp / f"{name}.log", port=port)
        yield {"vol": vol, "servers": servers, "roots": roots, "tmp": tmp}
    finally:
        for server in servers.values():
            server.stop()
        vol.mount.cleanup()


def _raw(port: int, data: bytes, timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    """Bytes sent as they are; the status, headers and body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def _error(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, (r.status_code, r.text[:300])
    doc = r.json()
    assert set(doc) == {"error", "message"} and doc["error"] == code, doc
    return str(doc["message"])


# -- 1. DNS rebinding and cross-origin requests ------------------------------------------


def test_open_server_answers_only_its_own_names_and_pages(env: dict[str, Any]) -> None:
    """A page whose name resolves to 127.0.0.1 gets nothing from a server that needs no token."""
    srv: ApiServer = env["servers"]["open"]
    port, url = srv.port, srv.url
    evil = {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}
    r = httpx.get(url + "/v1/content/docs/a.txt", headers=evil)
    assert "needs no token" in _error(r, 400, "bad_host")
    body = {"path": "/docs", "destination": "rebound"}
    r = httpx.post(url + "/v1/restores", json=body, headers=evil)
    _error(r, 400, "bad_host")
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", f"[::1]:{port}"):
        r = httpx.get(url + "/v1/meta/docs/a.txt", headers={"Host": host})
        assert r.status_code == 200, (host, r.text)
    for host in ("127.0.0.1.evil.example", "localhost.evil", "[::1", "localhost:80:80", ""):
        r = httpx.get(url + "/v1/health", headers={"Host": host})
        assert r.status_code == 400, host
    # The right Host, but a page of another origin (or an opaque one) behind the request.
    own = f"127.0.0.1:{port}"
    for origin in (f"http://evil.example:{port}", "null", f"http://{own}.evil", f"ftp://{own}"):
        r = httpx.post(url + "/v1/restores", json=body, headers={"Host": own, "Origin": origin})
        assert "another origin" in _error(r, 403, "foreign_origin"), origin
        r = httpx.post(
            url + "/v1/restores/r1/cancel", headers={**JSON, "Host": own, "Origin": origin}
        )
        _error(r, 403, "foreign_origin")
    assert httpx.get(url + "/v1/restores").json() == []  # nothing was started
    assert list(env["roots"]["open"].iterdir()) == []
    # Its own page may (a browser sends the page's origin with every POST).
    r = httpx.post(
        url + "/v1/restores",
        json={**body, "destination": "own-page"},
        headers={"Host": own, "Origin": f"http://{own}"},
    )
    assert r.status_code == 202, r.text


def test_a_token_server_serves_any_host_name(env: dict[str, Any]) -> None:
    """With tokens, a foreign page has nothing to use: a reverse proxy may use any name."""
    url = env["servers"]["tokens"].url
    r = httpx.get(url + "/v1/meta/docs/a.txt", headers={**H, "Host": "vault.example.org"})
    assert r.status_code == 200, r.text
    r = httpx.get(url + "/v1/meta/docs/a.txt", headers={"Host": "vault.example.org"})
    assert r.status_code == 401


@pytest.mark.parametrize("server", ["tokens", "open"])
def test_every_post_declares_json(env: dict[str, Any], server: str) -> None:
    """A POST a page of another origin could send without a preflight is refused (415)."""
    url = env["servers"][server].url
    cancel = url + "/v1/restores/r999/cancel"
    refused: list[dict[str, Any]] = [
        {},  # no body, no type: what a cross-origin fetch() or form can send
        {"content": b"", "headers": {"Content-Type": "text/plain"}},
        {"data": {"a": "b"}},  # a form
        {"content": b"{}", "headers": {"Content-Type": "text/plain;charset=UTF-8"}},
        {"content": b"{}", "headers": {"Content-Type": "multipart/form-data; boundary=x"}},
    ]
    for kw in refused:
        headers = {**H, **kw.pop("headers", {})}
        for target in (cancel, url + "/v1/restores", url + "/v1/snapshots"):
            r = httpx.post(target, headers=headers, **kw)
            assert "Content-Type: application/json" in _error(r, 415, "unsupported_media_type")
    # With the type, with or without a body, the request goes on to what it asks.
    accepted: list[dict[str, Any]] = [
        {"headers": JSON},
        {"json": {}},
        {"content": b"{}", "headers": {"Content-Type": "application/json; charset=utf-8"}},
    ]
    for kw in accepted:
        headers = {**H, **kw.pop("headers", {})}
        r = httpx.post(cancel, headers=headers, **kw)
        _error(r, 404, "no_such_job")
    r = httpx.post(cancel, json={"x": 1}, headers=H)
    _error(r, 422, "invalid_request")
    # DELETE needs a preflight in every browser, which this server never grants.
    r = httpx.request("OPTIONS", url + "/v1/snapshots/x", headers=H)
    assert r.status_code == 405 and "access-control-allow-origin" not in r.headers


# -- 3. Metrics labels ---------------------------------------------------------------------


def test_made_up_methods_add_no_series(env: dict[str, Any]) -> None:
    srv: ApiServer = env["servers"]["tokens"]
    for i in range(5):
        status, _, body = _raw(
            srv.port,
            f"M{1234 + i} /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(),
        )
        assert status == 405 and b"M123" not in body
    text = httpx.get(srv.url + "/metrics", headers=H).text
    series = [line for line in text.splitlines() if line.startswith("vaultsync_api_requests_total")]
    assert not any("M12" in line for line in series), series
    assert 'vaultsync_api_requests_total{method="other",route="/v1/health",status="405"} 5' in (
        text
    )
    methods = {line.split('method="')[1].split('"')[0] for line in series}
    assert methods <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"}
    routes = {line.split('route="')[1].split('"')[0] for line in series}
    assert len(routes) < 20 and not any("M12" in r for r in routes), routes


# -- 4. Numbers and dates out of range ------------------------------------------------------


def test_ranges_with_absurd_numbers(env: dict[str, Any]) -> None:
    url = env["servers"]["tokens"].url + "/v1/content/docs/a.txt"
    data = env["vol"].rounds[-1].files["/docs/a.txt"]
    huge = "9" * 4301  # past Python's int() digit limit
    r = httpx.get(url, headers={**H, "Range": f"bytes=0-{huge}"})
    assert r.status_code == 206 and r.content == data  # to the end, as the RFC reads it
    r = httpx.get(url, headers={**H, "Range": f"bytes=-{huge}"})
    assert r.status_code == 206 and r.content == data
    r = httpx.get(url, headers={**H, "Range": f"bytes={huge}-"})
    msg = _error(r, 416, "range_not_satisfiable")
    assert len(msg) < 300 and r.headers["content-range"] == f"bytes */{len(data)}"
    r = httpx.get(url, headers={**H, "Range": "bytes=" + "0" * 5000 + "3-" + "0" * 5000 + "9"})
    assert r.status_code == 206 and r.content == data[3:10]
    # Digits other than ASCII are no range (int() would read "\u0663" as 3).
    status, _, body = _raw(
        env["servers"]["tokens"].port,
        b"GET /v1/content/docs/a.txt HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + ADMIN_TOKEN.encode()
        + b"\r\nRange: bytes="
        + "\u0663-\u0669".encode()
        + b"\r\nConnection: close\r\n\r\n",
    )
    assert status == 200 and body == data


@pytest.mark.parametrize(
    "date",
    [
        "Sun, 06 Nov 99999 08:49:37 GMT",
        "Sat, 01 Jan 0001 00:00:00 +2359",
        "Fri, 31 Dec 9999 23:59:59 -2359",
        "Sun, 06 Nov 1994 08:49:37 +99999999999999999999",
        "Mon, 01 Jan 0000 00:00:00 GMT",
        "Sun, 06 Nov " + "9" * 5000 + " 08:49:37 GMT",
        "Thu, 31 Feb 2024 00:00:00 GMT",
    ],
)
def test_conditional_dates_out_of_range_are_ignored(env: dict[str, Any], date: str) -> None:
    """RFC 9110 §13.1.3/4/5: a field that is not a valid HTTP-date is ignored."""
    url = env["servers"]["tokens"].url + "/v1/content/docs/a.txt"
    data = env["vol"].rounds[-1].files["/docs/a.txt"]
    for field in ("If-Modified-Since", "If-Unmodified-Since"):
        r = httpx.get(url, headers={**H, field: date})
        assert r.status_code == 200 and r.content == data, (field, r.status_code)
    r = httpx.get(url, headers={**H, "Range": "bytes=0-4", "If-Range": date})
    assert r.status_code == 200 and r.content == data  # not the date of this version


@pytest.mark.parametrize(
    ("at", "needle"),
    [
        ("0001-01-01T00:00:00+23:59", "out of range"),
        ("9999-12-31T23:59:59-23:59", "out of range"),
        ("0001-01-01T00:00:00", "out of range"),
        ("lsn:" + "9" * 150, "out of range"),
        ("9" * 150, "out of range"),
        ("lsn:9223372036854775808", "out of range"),
        ("lsn:abc", "not an LSN"),
        ("lsn:-5", "not an LSN"),
        ("0", "not a point"),
    ],
)
def test_points_out_of_range_are_400(env: dict[str, Any], at: str, needle: str) -> None:
    url = env["servers"]["tokens"].url
    for path in ("/v1/tree/", "/v1/meta/docs", "/v1/content/docs/a.txt"):
        r = httpx.get(url + path, params={"at": at}, headers=H)
        msg = _error(r, 400, "bad_point")
        assert needle in msg and len(msg) < 300, msg


def test_parse_point_refuses_in_one_line() -> None:
    """The CLI's `--at` reads points with the same function: PointError, one line, no internals."""
    for text in (
        "0001-01-01T00:00:00+23:59",
        "lsn:" + "9" * 5000,
        "9" * 5000,
        "lsn:x",
        "0001-01-01",
        "9999-12-31T12:00:00-12:00",
    ):
        with pytest.raises(PointError) as e:
            parse_point(text)
        msg = str(e.value)
        assert "\n" not in msg and len(msg) < 200 and ("out of range" in msg or "LSN" in msg)
    # What was valid still is, to the nanosecond the text gives.
    assert parse_point("2026-11-25T06:00:00.123456Z").time_ns == 1795586400123456000
    assert parse_point("lsn:00042").lsn == 42 and parse_point("42").lsn == 42
    assert parse_point("snap-1").snapshot == "snap-1" and parse_point("").lsn is None


# -- 5. Headers of the page and of everything else ----------------------------------------


def test_security_headers(env: dict[str, Any]) -> None:
    url = env["servers"]["tokens"].url
    for path in ("/ui/", "/ui/app.js", "/ui/index.html"):
        r = httpx.get(url + path)
        assert r.status_code == 200, path
        csp = r.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp
        assert "unsafe-inline" not in csp and "default-src 'none'" in csp
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["x-frame-options"] == "DENY"
    # JSON, errors and downloads: data that no browser may run, frame or sniff.
    for path, status in (
        ("/v1/health", 200),
        ("/v1/tree/", 200),
        ("/v1/content/docs/a.txt", 200),
        ("/v1/nothing", 404),
        ("/openapi.json", 200),
    ):
        r = httpx.get(url + path, headers=H)
        assert r.status_code == status, path
        assert r.headers["content-security-policy"].startswith("default-src 'none'"), path
        assert r.headers.get_list("x-content-type-options") == ["nosniff"], path
        assert r.headers["x-frame-options"] == "DENY", path


# -- 6. Names that are not simple text -------------------------------------------------------


def test_every_listed_name_can_be_fetched(env: dict[str, Any]) -> None:
    """A newline, a tab, bytes that are not UTF-8, '%', '?', '#': each entry's path_url works."""
    url, vol = env["servers"]["tokens"].url, env["vol"]
    assert isinstance(vol, Volume) and len(vol.odd) == 5
    listing = httpx.get(url + "/v1/tree/odd", headers=H)
    assert listing.status_code == 200, listing.text
    entries = listing.json()["entries"]
    assert len(entries) == len(vol.odd)
    fetched: dict[bytes, bytes] = {}
    for e in entries:
        want_path = b"/odd/" + (
            bytes.fromhex(e["name_bytes_hex"]) if "name_bytes_hex" in e else e["name"].encode()
        )
        assert e["path_url"].isascii() and " " not in e["path_url"]
        # Sent byte for byte, as any HTTP client can send a URL it was given.
        status, headers, body = _raw(
            env["servers"]["tokens"].port,
            f"GET /v1/content{e['path_url']} HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {ADMIN_TOKEN}\r\nConnection: close\r\n\r\n".encode(),
        )
        assert status == 200, (e, body[:300])
        assert headers["content-disposition"].isascii()
        fetched[want_path] = body
        meta = httpx.get(url + "/v1/meta" + e["path_url"], headers=H)
        assert meta.status_code == 200, (e, meta.text)
        assert meta.json()["path_url"] == e["path_url"] and meta.json()["size"] == len(body)
    assert fetched == vol.odd
    # A name that is not UTF-8 is that name only: its UTF-8-replaced look-alike is not it.
    r = httpx.get(url + "/v1/content/odd/caf%EF%BF%BD.txt", headers=H)
    _error(r, 404, "not_found")
    r = httpx.get(url + "/v1/tree/odd/caf%E9.txt", headers=H)
    assert "not a directory" in _error(r, 400, "not_a_directory")


def test_restores_take_the_path_byte_for_byte(env: dict[str, Any]) -> None:
    """A restore body names its path as `path`, or as a listing's `path_url`; `at` is checked."""
    srv: ApiServer = env["servers"]["tokens"]
    root: Path = env["roots"]["tokens"]
    vol: Volume = env["vol"]
    body = {"path_url": "/odd/caf%E9.txt", "destination": "odd-one"}
    r = httpx.post(srv.url + "/v1/restores", json=body, headers=H)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["path"] == "/odd/caf\ufffd.txt" and job["path_url"] == "/odd/caf%E9.txt"
    deadline = time.monotonic() + 60
    while job["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.1)
        job = httpx.get(f"{srv.url}/v1/restores/{job['id']}", headers=H).json()
    assert job["state"] == "done", job
    assert (root / "odd-one").read_bytes() == vol.odd[b"/odd/caf\xe9.txt"]
    for bad in (
        {"destination": "x"},
        {"path": "/docs", "path_url": "/docs", "destination": "x"},
        {"path": None, "path_url": "/docs", "destination": "x"},
    ):
        r = httpx.post(srv.url + "/v1/restores", json=bad, headers=H)
        assert "path or as path_url" in _error(r, 422, "invalid_request"), bad
    # A point that cannot be is refused at once, not left to a job that fails.
    for at in ("lsn:abc", "0001-01-01T00:00:00+23:59", "0"):
        r = httpx.post(
            srv.url + "/v1/restores",
            json={"path": "/docs", "at": at, "destination": "y"},
            headers=H,
        )
        _error(r, 400, "bad_point")
    assert not (root / "y").exists()


# -- 8. Tokens, the CLI's token lines, slow clients, the OpenAPI document -----------------------


def test_tokens_in_the_url_are_refused_and_never_logged(env: dict[str, Any]) -> None:
    srv: ApiServer = env["servers"]["tokens"]
    for query in (
        {"token": ADMIN_TOKEN},
        {"access_token": READ_TOKEN},
        {"at": "", "TOKEN": ADMIN_TOKEN},
    ):
        for path in ("/v1/status", "/v1/health", "/ui/"):
            r = httpx.get(srv.url + path, params=query)
            assert "Authorization: Bearer" in _error(r, 400, "token_in_url"), path
    # The name as the server decodes it: %74 is "t".
    r = httpx.get(srv.url + "/v1/points?%74oken=" + READ_TOKEN[::-1])
    _error(r, 400, "token_in_url")
    # Even with a valid header as well: the URL has been seen by whatever logs URLs.
    r = httpx.get(srv.url + "/v1/status", params={"token": READ_TOKEN}, headers=H)
    _error(r, 400, "token_in_url")
    time.sleep(0.2)  # the access log line is written after the response
    log = srv.log.read_text()
    assert ADMIN_TOKEN not in log and READ_TOKEN not in log and READ_TOKEN[::-1] not in log
    assert "?token=[redacted]" in log and "%74oken=[redacted]" in log


@pytest.mark.parametrize(
    "header",
    [
        b"Bearer " + ADMIN_TOKEN.encode() + b"\xa0",  # U+00A0 as Latin-1
        b"Bearer " + ADMIN_TOKEN.encode() + b"\xc2\xa0",  # U+00A0 as UTF-8
        b"Bearer \xc2\xa0" + ADMIN_TOKEN.encode(),
        b"Bearer " + ADMIN_TOKEN.encode()[:-1],
        b"Bearer " + ADMIN_TOKEN.encode() + b"x",
        b"Bearer\t" + ADMIN_TOKEN.encode(),
        b"Basic " + ADMIN_TOKEN.encode(),
    ],
)
def test_tokens_are_compared_exactly(env: dict[str, Any], header: bytes) -> None:
    port = env["servers"]["tokens"].port
    status, headers, body = _raw(
        port,
        b"GET /v1/status HTTP/1.1\r\nHost: x\r\nAuthorization: " + header + b"\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert status == 401 and json.loads(body)["error"] == "unauthorized", (header, body)
    assert headers["www-authenticate"].startswith("Bearer")


def test_exact_tokens_still_work(env: dict[str, Any]) -> None:
    port = env["servers"]["tokens"].port
    tok = ADMIN_TOKEN.encode()
    # Spaces around a field value are HTTP's (RFC 9110 §5.5), and RFC 6750 allows several
    # spaces after "Bearer"; neither is part of the token.
    for header in (
        b"Bearer " + tok,
        b"bearer " + tok,
        b"Bearer   " + tok,
        b" Bearer " + tok + b" ",
    ):
        status, _, body = _raw(
            port,
            b"GET /v1/points HTTP/1.1\r\nHost: x\r\nAuthorization: " + header + b"\r\n"
            b"Connection: close\r\n\r\n",
        )
        assert status == 200, (header, body[:200])
    two = b"Authorization: Bearer " + tok + b"\r\n"
    status, _, _ = _raw(
        port, b"GET /v1/points HTTP/1.1\r\nHost: x\r\n" + two + two + b"Connection: close\r\n\r\n"
    )
    assert status == 401


def _cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vaultsync", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _text(stderr: str) -> str:
    """An error as one line of words, whatever box the CLI draws around it."""
    return " ".join(stderr.replace("\u2502", " ").split())


def test_token_new_prints_toml_the_config_accepts() -> None:
    res = _cli("token", "new", "--scope", "admin", "--name", "help-desk.2")
    assert res.returncode == 0, res.stderr
    doc = tomllib.loads(res.stdout)
    entry = ApiToken(**doc["api"]["tokens"][0])
    assert entry.name == "help-desk.2" and entry.scope == "admin"
    for name in ('desk"\nname = "evil', "a\\b", "new\nline", "", "_x", "x" * 64, "caf\u00e9"):
        res = _cli("token", "new", "--name", name)
        assert res.returncode != 0, name
        assert "vst_" not in res.stdout + res.stderr  # no token made for a refused line
        assert "Traceback" not in res.stderr and "a token's name is" in _text(res.stderr)


def test_token_hash_takes_the_token_exactly() -> None:
    token = "vst_" + "a" * 40
    res = _cli("token", "hash", stdin=token + "\n")
    assert res.returncode == 0
    assert tomllib.loads(res.stdout)["hash"].startswith("sha256:")
    for bad in (token + " ", token + "\u00a0", "\u00a0" + token, token[:10] + " " + token[10:]):
        res = _cli("token", "hash", stdin=bad + "\n")
        assert res.returncode != 0 and "only letters, digits" in _text(res.stderr), repr(bad)
        assert "Traceback" not in res.stderr


def test_slow_clients_are_cut_off(env: dict[str, Any]) -> None:
    """Silence, or a request a byte at a time, holds a connection REQUEST_SECONDS at most."""
    port = env["servers"]["tokens"].port
    request = (
        b"POST /v1/restores/r1/cancel HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + ADMIN_TOKEN.encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: 40\r\n\r\n{}"
    )
    results: dict[str, tuple[float, bytes]] = {}

    def client(name: str, data: bytes, pause: float) -> None:
        start = time.monotonic()
        got = b""
        with socket.create_connection(("127.0.0.1", port), timeout=REQUEST_SECONDS * 3) as s:
            try:
                for i in range(len(data)):
                    s.sendall(data[i : i + 1])
                    time.sleep(pause)
                while chunk := s.recv(65536):
                    got += chunk
            except OSError:
                pass  # reset while still sending: cut off, as it should be
        results[name] = (time.monotonic() - start, got)

    slow_head = b"GET /v1/health HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 200 + b"\r\n\r\n"
    threads = [
        threading.Thread(target=client, args=("silent", b"", 0)),
        threading.Thread(target=client, args=("head", slow_head, 0.1)),
        threading.Thread(target=client, args=("body", request, 0.0)),  # 38 bytes never come
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(REQUEST_SECONDS * 4)
    assert set(results) == {"silent", "head", "body"}, results
    for name, (took, got) in results.items():
        assert took < REQUEST_SECONDS + 5, (name, took)
        if got:
            status = int(got.split()[1])
            assert status == 408 and b'"request_timeout"' in got, (name, got[:300])
    # A prompt client on a fresh connection is served as ever.
    assert httpx.get(f"http://127.0.0.1:{port}/v1/health").status_code == 200


def test_openapi_lists_every_answer(env: dict[str, Any]) -> None:
    doc = httpx.get(env["servers"]["tokens"].url + "/openapi.json").json()
    ops = {
        (method.upper(), path): op
        for path, item in doc["paths"].items()
        for method, op in item.items()
    }
    error = doc["components"]["schemas"]["ErrorOut"]
    assert set(error["required"]) == {"error", "message"}
    want = {
        ("GET", "/v1/tree/{path}"): {400, 401, 403, 404, 413, 414, 422},
        ("GET", "/v1/content/{path}"): {206, 304, 400, 401, 404, 412, 416, 422},
        ("POST", "/v1/restores"): {202, 400, 401, 403, 409, 413, 415, 422, 429},
        ("POST", "/v1/restores/{job_id}/cancel"): {200, 400, 401, 403, 404, 415, 422},
        ("POST", "/v1/snapshots"): {201, 400, 401, 403, 409, 413, 415, 422},
        ("DELETE", "/v1/snapshots/{name}"): {200, 401, 403, 404, 409, 422},
        ("GET", "/v1/health"): {200, 400, 403},
    }
    for key, codes in want.items():
        have = {int(c) for c in ops[key]["responses"]}
        assert codes <= have, (key, sorted(have))
        for code in have - {200, 201, 202, 206, 304}:
            body = ops[key]["responses"][str(code)]["content"]["application/json"]["schema"]
            assert body == {"$ref": "#/components/schemas/ErrorOut"}, (key, code)
    limit = next(p for p in ops[("GET", "/v1/tree/{path}")]["parameters"] if p["name"] == "limit")
    assert limit["schema"]["anyOf"][0]["maximum"] == 50  # this server's api.max_page


# -- The rest of their kind: every operation under schemathesis ------------------------------


SCHEMATHESIS_CONFIG = """
# The API answers 400 to requests the schema cannot rule out (a path that names a
# file where a directory is needed, a point that is none): expected for valid data too.
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "3xx", "400", "401", "403", "404", "409", "429"]

# Invalid data may also meet a bound the schema cannot state before it is looked at:
# the whole URL (8 KiB: 414) or body (64 KiB: 413).
[checks.negative_data_rejection]
expected-statuses = [
    "400", "401", "403", "404", "405", "406", "409", "413", "414", "415", "422", "428", "429",
]
"""


def test_schemathesis_all_checks(env: dict[str, Any]) -> None:
    """Every operation, every check (undocumented statuses included), a fixed seed, 40 s."""
    srv: ApiServer = env["servers"]["fuzz"]
    work = env["tmp"] / "schemathesis"
    work.mkdir()
    (work / "schemathesis.toml").write_text(SCHEMATHESIS_CONFIG)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "--config-file",
            str(work / "schemathesis.toml"),
            "run",
            srv.url + "/openapi.json",
            "--checks",
            "all",
            "--seed",
            "21",
            "--max-time",
            "40",
            "--workers",
            "1",
            "--request-timeout",
            "30",
            "--generation-database",
            "none",
            "--no-color",
            "--header",
            f"Authorization: Bearer {ADMIN_TOKEN}",
        ],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=180,
    )
    out = res.stdout + res.stderr
    (work / "output.txt").write_text(out)  # the whole report, for a failure the tail cuts off
    assert res.returncode == 0, out[-12000:]
    assert "Tested: 15" in out or "15/15" in out, out[-3000:]
    log = srv.log.read_text()
    assert "Traceback" not in log and ADMIN_TOKEN not in log
