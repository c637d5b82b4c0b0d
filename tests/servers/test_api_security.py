"""Security of the API: tokens and scopes, path confinement, request bounds, JSON errors.

(What issue 21 found, and schemathesis over every operation, are in test_api_hostile.py.)

A standalone `vaultsync serve` with a read and an admin token serves a small
volume from the SeaweedFS bucket. Traversal attempts are sent as raw HTTP
(a client library would normalise `..` away before sending), so the server
sees exactly what an attacker would send.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.api_helpers import (
    ADMIN_TOKEN,
    READ_TOKEN,
    ApiServer,
    api_toml,
    auth,
    write_volume,
)
from vaultsync.commands.local_servers import LocalProvider, free_port


@pytest.fixture(scope="module")
def srv(
    tmp_path_factory: pytest.TempPathFactory, seaweedfs: LocalProvider, rclone: LocalProvider
) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("apisec")
    root = tmp / "restores"
    root.mkdir()
    outside = tmp / "outside"
    outside.mkdir()
    os.symlink(outside, root / "escape")
    vol = write_volume(
        tmp / "vol", seaweedfs, rclone, api_toml(free_port(), [root], enabled=False), big_mib=1
    )
    vol.mount.umount()
    server = ApiServer(vol.mount.config, "sw", tmp / "serve.log")
    try:
        yield {
            "url": server.url,
            "port": server.port,
            "root": root,
            "outside": outside,
            "log": tmp / "serve.log",
            "config": vol.mount.config,
        }
    finally:
        server.stop()
        vol.mount.cleanup()


def _raw_get(port: int, target: str, token: str = ADMIN_TOKEN) -> tuple[int, str]:
    """One HTTP/1.1 GET with the request target sent exactly as given."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(
            f"GET {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode(errors="replace")


def test_tokens_and_scopes(srv: dict[str, Any]) -> None:
    url = srv["url"]
    assert httpx.get(url + "/v1/health").status_code == 200  # no token needed
    for path in ("/v1/status", "/v1/points", "/v1/tree/", "/v1/content/big.bin", "/metrics"):
        r = httpx.get(url + path)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        assert "vaultsync token new" in r.json()["message"]
        r = httpx.get(url + path, headers=auth("vst_wrong-" + "x" * 30))
        assert r.status_code == 401 and "not valid" in r.json()["message"]
        r = httpx.get(url + path, headers={"Authorization": f"Basic {READ_TOKEN}"})
        assert r.status_code == 401
        assert httpx.get(url + path, headers=auth(READ_TOKEN)).status_code == 200, path
    body = {"path": "/docs", "destination": "x"}
    r = httpx.post(url + "/v1/restores", json=body, headers=auth(READ_TOKEN))
    assert r.status_code == 403 and "admin" in r.json()["message"]
    r = httpx.post(url + "/v1/snapshots", json={"name": "s1"}, headers=auth(READ_TOKEN))
    assert r.status_code == 403
    r = httpx.post(url + "/v1/restores/r1/cancel", json={}, headers=auth(READ_TOKEN))
    assert r.status_code == 403
    # Tokens never reach the log.
    log = srv["log"].read_text()
    assert READ_TOKEN not in log and ADMIN_TOKEN not in log


@pytest.mark.parametrize(
    "target",
    [
        "/v1/tree/docs/../..",
        "/v1/tree/../../etc",
        "/v1/content/docs/%2e%2e/%2e%2e/etc/passwd",
        "/v1/content/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/v1/meta/docs/..%2f..%2f..%2fetc%2fpasswd",
        "/v1/tree/docs/%2E%2E",
    ],
)
def test_traversal_is_refused(srv: dict[str, Any], target: str) -> None:
    status, body = _raw_get(srv["port"], target)
    assert status == 400, (target, status, body)
    assert "'..' is not allowed" in body and "root:" not in body


def test_absolute_and_symlinked_volume_paths_stay_inside(srv: dict[str, Any]) -> None:
    # An absolute path is a path from the volume's root, never the server's.
    status, body = _raw_get(srv["port"], "/v1/content//etc/passwd")
    assert status == 404 and "root:" not in body
    status, body = _raw_get(srv["port"], "/v1/content/docs/a.txt%00.png")
    assert status == 400 and "NUL" in body
    # Symlinks in the volume are shown, not followed.
    status, body = _raw_get(srv["port"], "/v1/content/link")
    assert status == 400 and "symlink" in body
    status, body = _raw_get(srv["port"], "/v1/content/link/a.txt")
    assert status == 404


@pytest.mark.parametrize(
    ("destination", "status", "needle"),
    [
        ("../x", 400, "'..' is not allowed"),
        ("a/../../x", 400, "'..' is not allowed"),
        ("/etc/vaultsync-x", 400, "outside the restore roots"),
        ("/", 400, "outside the restore roots"),
        ("escape/x", 400, "symlink"),
        ("escape", 400, "symlink"),
    ],
)
def test_restore_destinations_are_confined(
    srv: dict[str, Any], destination: str, status: int, needle: str
) -> None:
    r = httpx.post(
        srv["url"] + "/v1/restores",
        json={"path": "/docs", "destination": destination},
        headers=auth(ADMIN_TOKEN),
    )
    assert r.status_code == status and needle in r.json()["message"], r.text
    assert list(srv["outside"].iterdir()) == []
    r = httpx.post(
        srv["url"] + "/v1/restores",
        json={"path": "/docs/../..", "destination": "ok"},
        headers=auth(ADMIN_TOKEN),
    )
    assert r.status_code == 400


def test_a_symlink_swapped_into_a_running_restore_stops_it(srv: dict[str, Any]) -> None:
    """The destination is checked before every file, not only when the job starts."""
    root, outside = srv["root"], srv["outside"]
    h = auth(ADMIN_TOKEN)
    r = httpx.post(  # 1 KiB/s: the 30 small files take seconds
        srv["url"] + "/v1/restores",
        json={"path": "/many", "destination": "swap/many", "bwlimit": 1024},
        headers=h,
    )
    assert r.status_code == 202, r.text
    job = r.json()["id"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        j = httpx.get(f"{srv['url']}/v1/restores/{job}", headers=h).json()
        if j["bytes_done"] > 0 or j["state"] != "running":
            break
        time.sleep(0.01)
    assert j["state"] == "running", j
    # A local user replaces the directory being filled with a link to elsewhere.
    (root / "swap" / "many").rename(root / "swap" / "many.before")
    os.symlink(outside, root / "swap" / "many")
    while time.monotonic() < deadline:
        j = httpx.get(f"{srv['url']}/v1/restores/{job}", headers=h).json()
        if j["state"] != "running":
            break
        time.sleep(0.05)
    assert j["state"] == "failed" and "outside the restore roots" in j["error"], j
    assert list(outside.iterdir()) == [], "a restore wrote outside its roots"


def test_request_bounds(srv: dict[str, Any]) -> None:
    url, h = srv["url"], auth(ADMIN_TOKEN)
    big = {"path": "/docs", "destination": "x" * 100_000}
    r = httpx.post(url + "/v1/restores", json=big, headers=h)
    assert r.status_code == 413 and "larger than" in r.json()["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"path": "/docs", "destination": "'
        for _ in range(200):
            yield b"y" * 1024
        yield b'"}'

    r = httpx.post(url + "/v1/restores", content=chunks(), headers=h)
    assert r.status_code == 413
    r = httpx.get(url + "/v1/tree/" + "a" * 9000, headers=h)
    assert r.status_code == 414
    r = httpx.get(url + "/v1/tree/", params={"limit": 51}, headers=h)
    assert r.status_code == 422 and "less than or equal to 50" in r.json()["message"]
    r = httpx.get(url + "/v1/tree/", params={"limit": 0}, headers=h)
    assert r.status_code == 422 and "limit" in r.json()["message"]
    r = httpx.post(url + "/v1/restores", content=b"{not json", headers={**h, **JSON_TYPE})
    assert r.status_code == 422 and "error" in r.json()
    r = httpx.get(url + "/v1/tree/" + "n" * 300, headers=h)
    assert r.status_code == 400 and "longer than 255" in r.json()["message"]
    r = httpx.get(url + "/v1/nothing", headers=h)
    assert r.status_code == 404 and "/openapi.json" in r.json()["message"]
    assert "Traceback" not in srv["log"].read_text()  # no request so far was a server error


def _raw(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Bytes sent as they are (even what no client library would send); the parsed answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def _json_error(status: int, content_type: str, body: bytes, want: int, code: str) -> str:
    assert status == want, (status, body[:300])
    assert content_type.startswith("application/json"), content_type
    doc = json.loads(body)
    assert set(doc) == {"error", "message"} and doc["error"] == code, doc
    assert len(doc["message"]) > 20, doc  # a sentence, not a bare status
    for leak in ("Traceback", 'File "', "/site-packages/", "vaultsync/"):
        assert leak not in doc["message"], doc
    return str(doc["message"])


DEEP = b"[" * 30000 + b"]" * 30000  # valid JSON nested deeper than json.loads goes
JSON_TYPE = {"content-type": "application/json"}


@pytest.mark.parametrize(
    ("method", "path", "kw", "status", "code", "needle"),
    [
        ("GET", "/nope", {}, 404, "not_found", "/openapi.json"),
        ("GET", "/v1/nothing/here", {}, 404, "not_found", "under /v1"),
        ("GET", "/ui/missing.html", {}, 404, "not_found", "no such endpoint"),
        ("POST", "/v1/health", {}, 405, "method_not_allowed", "POST is not allowed"),
        ("DELETE", "/v1/tree/docs", {}, 405, "method_not_allowed", "DELETE is not allowed"),
        ("PATCH", "/v1/restores", {}, 405, "method_not_allowed", "PATCH is not allowed"),
        ("GET", "/v1/tree/?limit=abc", {}, 422, "invalid_request", "query limit"),
        ("GET", "/v1/tree/?cursor=-1", {}, 422, "invalid_request", "query cursor"),
        ("GET", "/metrics?probe=maybe", {}, 422, "invalid_request", "query probe"),
        ("GET", "/v1/restores/" + "x" * 65, {}, 422, "invalid_request", "path job_id"),
        ("POST", "/v1/snapshots", {}, 415, "unsupported_media_type", "application/json"),
        ("POST", "/v1/snapshots", {"headers": JSON_TYPE}, 422, "invalid_request", "body"),
        ("POST", "/v1/snapshots", {"json": [1]}, 422, "invalid_request", "body"),
        (
            "POST",
            "/v1/snapshots",
            {"json": {"name": "a", "lsn": "5"}},
            422,
            "invalid_request",
            "lsn",
        ),
        (
            "POST",
            "/v1/restores",
            {"json": {"path": "/d", "destination": "d", "force": 0}},
            422,
            "invalid_request",
            "force",
        ),
        ("POST", "/v1/snapshots", {"json": {"name": "a", "x": 1}}, 422, "invalid_request", "x"),
        (
            "POST",
            "/v1/restores",
            {"json": {"path": "/d", "destination": "d", "at": 5}},
            422,
            "invalid_request",
            "body at",
        ),
        (
            "POST",
            "/v1/snapshots",
            {"content": DEEP, "headers": {"content-type": "application/json"}},
            400,
            "bad_request",
            "JSON",
        ),
        ("POST", "/v1/restores", {"content": b"x" * 70_000}, 413, "too_large", "larger than"),
        ("POST", "/v1/restores", {"content": b"x"}, 415, "unsupported_media_type", "JSON"),
        ("GET", "/v1/tree/?at=lsn:abc", {}, 400, "bad_point", "not an LSN"),
        ("GET", "/v1/tree/?at=0", {}, 400, "bad_point", "not a point"),
        ("GET", "/v1/tree/?at=no-such-snapshot", {}, 404, "unknown_point", "no snapshot named"),
        ("GET", "/v1/restores/unknown", {}, 404, "no_such_job", "no restore job"),
        (
            "GET",
            "/v1/content/big.bin",
            {"headers": {"range": "bytes=99999999-"}},
            416,
            "range_not_satisfiable",
            "outside the file",
        ),
        (
            "GET",
            "/v1/content/big.bin",
            {"headers": {"if-match": '"other"'}},
            412,
            "precondition_failed",
            "If-Match",
        ),
    ],
)
def test_every_error_is_json(
    srv: dict[str, Any],
    method: str,
    path: str,
    kw: dict[str, Any],
    status: int,
    code: str,
    needle: str,
) -> None:
    """Whatever goes wrong, the answer is `{"error", "message"}` JSON without internals."""
    kw = dict(kw)
    headers = {**auth(ADMIN_TOKEN), **kw.pop("headers", {})}
    r = httpx.request(method, srv["url"] + path, headers=headers, timeout=60, **kw)
    msg = _json_error(r.status_code, r.headers.get("content-type", ""), r.content, status, code)
    assert needle in msg, msg
    if status == 405:
        assert r.headers["allow"]  # RFC 9110 §15.5.6
        assert method not in r.headers["allow"].split(", ")


def test_errors_before_the_app_are_json_too(srv: dict[str, Any]) -> None:
    """Requests uvicorn cannot parse never reach the app; they still get the JSON shape."""
    port = srv["port"]
    tok = ADMIN_TOKEN.encode()
    for data in (
        b"GARBAGE\r\n\r\n",
        b"GET /v1/health HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"GET /v1/tree/\xff HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + tok + b"\r\n\r\n",
        b"POST /v1/snapshots HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + tok + b"\r\n"
        b"Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\nzz\r\n",
    ):
        status, headers, body = _raw(port, data)
        msg = _json_error(status, headers.get("content-type", ""), body, 400, "bad_request")
        assert "not valid HTTP/1.1" in msg
        assert headers["content-length"] == str(len(body))


def test_head_wherever_get(srv: dict[str, Any]) -> None:
    """HEAD is answered on every GET endpoint with GET's headers and no body (RFC 9110 §9.3.2)."""
    h = auth(ADMIN_TOKEN)
    for path in ("/v1/health", "/v1/tree/docs", "/v1/meta/docs/a.txt", "/v1/snapshots", "/ui/"):
        got, head = (
            httpx.get(srv["url"] + path, headers=h),
            httpx.head(srv["url"] + path, headers=h),
        )
        assert got.status_code == head.status_code == 200, path
        assert head.content == b""
        assert head.headers["content-length"] == str(len(got.content)), path
        assert head.headers["content-type"] == got.headers["content-type"]
    r = httpx.head(srv["url"] + "/v1/restores/unknown", headers=h)
    assert r.status_code == 404 and r.content == b""
    r = httpx.head(srv["url"] + "/v1/restores", headers=h)
    assert r.status_code == 200
    r = httpx.head(srv["url"] + "/v1/snapshots/x", headers=h)
    assert r.status_code == 405 and r.headers["allow"] == "DELETE"
    # Every method the path has, though its routes are several (GET and POST here).
    r = httpx.request("PUT", srv["url"] + "/v1/restores", headers=h)
    assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD, POST"
    r = httpx.head(srv["url"] + "/v1/status")  # no token: still a 401, not a 405
    assert r.status_code == 401
    text = httpx.get(srv["url"] + "/metrics", headers=h).text
    assert (
        'vaultsync_api_requests_total{method="HEAD",route="/v1/tree/{path:anypath}",status="200"}'
        in text
    )


def test_serve_refuses_unsafe_configs(srv: dict[str, Any], tmp_path: Path) -> None:
    base = srv["config"].read_text().split("\n[api]")[0]
    for extra, listen, needle in (
        ("[api]\n", "127.0.0.1:1", "no token is configured"),
        ("[api]\nopen_on_loopback = true\n", "0.0.0.0:1", "only allowed on a loopback"),
        (
            '[api]\nopen_on_loopback = true\nrestore_roots = ["/nonexistent/x"]\n',
            "127.0.0.1:1",
            "not an existing directory",
        ),
        (
            '[api]\ntokens = [{name = "a", hash = "plain-token"}]\n',
            "127.0.0.1:1",
            "api.tokens[0].hash",
        ),
    ):
        cfg = tmp_path / f"c{abs(hash(extra))}.toml"
        cfg.write_text(base + "\n" + extra)
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "vaultsync",
                "serve",
                str(cfg),
                "--from",
                "sw",
                "--listen",
                listen,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode == 1 and needle in res.stderr, res.stderr
        assert "Traceback" not in res.stderr


def test_token_commands() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "vaultsync", "token", "new", "--scope", "admin", "--name", "desk"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0
    token = res.stderr.split(": ")[-1].strip()
    assert 'scope = "admin"' in res.stdout and token not in res.stdout
    again = subprocess.run(
        [sys.executable, "-m", "vaultsync", "token", "hash"],
        input=token + "\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.stdout.split("=", 1)[1].strip() in res.stdout
    short = subprocess.run(
        [sys.executable, "-m", "vaultsync", "token", "hash"],
        input="short\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert short.returncode != 0 and "at least 24" in short.stderr
