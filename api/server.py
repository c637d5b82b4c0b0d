"""Running the API: standalone (`vaultsync serve`) or as a task in the mount daemon.

The listening socket is bound here, before uvicorn starts, so "address in
use" becomes a one-line error instead of uvicorn exiting the whole process
(which, inside the mount daemon, would take the mount down with it). The
embedded server leaves signals to the mount: uvicorn's own handlers are
switched off and it is stopped by `should_exit`.

uvicorn times out only an idle keep-alive connection: a client that
connected and said nothing, or sent its request a byte at a time, held a
connection (and, with a body, a task) for as long as it liked. Here every
request must arrive whole within REQUEST_SECONDS of its first byte (of the
connection, for the first one). And the access log, which records each
request line, never shows a credential a client put in the URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
from collections.abc import Iterator
from urllib.parse import unquote_plus

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from vaultsync.config import Config, is_loopback, parse_host_port
from vaultsync.engine.filesystem import FileSystem
from vaultsync.errors import ConfigError

from .app import create_app
from .auth import Auth
from .source import Backend

log = logging.getLogger("vaultsync.api")

REQUEST_SECONDS = 10.0  # to send a whole request: head and (at most 64 KiB of) body
KEEP_ALIVE_SECONDS = 5  # an idle connection between requests


def check_serving(cfg: Config, listen: str) -> tuple[str, int]:
    """Refuse a server nobody could use safely: no way in, or an open one off loopback."""
    try:
        host, port = parse_host_port(listen)
    except ValueError as e:
        raise ConfigError(f"--listen: {e}") from None
    api = cfg.api
    if api.open_on_loopback and not is_loopback(host):
        raise ConfigError(
            f"api.open_on_loopback is only allowed on a loopback address, not {listen}; "
            "configure api.tokens to listen there"
        )
    if not api.tokens and not api.open_on_loopback:
        raise ConfigError(
            "api.tokens: no token is configured, so nobody could use the API; add one "
            "(`vaultsync token new` prints the line), or set api.open_on_loopback = true "
            "for a server on 127.0.0.1"
        )
    for root in api.restore_roots:
        if not root.is_dir():
            raise ConfigError(f"api.restore_roots: {root} is not an existing directory; create it")
    return host, port


def listening_socket(host: str, port: int) -> socket.socket:
    """The listening socket, made so that every accepted connection gets TCP_NODELAY.

    asyncio turns Nagle's algorithm off only on sockets whose `proto` is
    IPPROTO_TCP, and an accepted socket inherits the listener's: a socket made
    with proto 0 kept Nagle on, so each small response (headers and body are
    two writes) waited for the client's delayed ACK, about 40 ms, which capped
    one keep-alive client at ~21 requests/s. TCP_NODELAY is also set on the
    listener (Linux passes it on to accepted sockets) in case asyncio changes.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(
            f"api: cannot listen on {host}:{port}: {e.strerror}; choose another --listen / "
            "api.listen"
        ) from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _json_error(status: int, reason: str, code: str, message: str) -> bytes:
    """A whole HTTP/1.1 error response in the API's shape, closing the connection."""
    body = json.dumps({"error": code, "message": message}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


BAD_HTTP = json.dumps(
    {
        "error": "bad_request",
        "message": "the request is not valid HTTP/1.1 (request line, header or body framing); "
        "check the client",
    }
).encode()
TOO_SLOW = _json_error(
    408,
    "Request Timeout",
    "request_timeout",
    f"the request did not arrive whole within {REQUEST_SECONDS:g} seconds; send it at once",
)


class JsonErrorProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, with the API's JSON errors and a deadline per request.

    A request uvicorn cannot parse never reaches the app (so no exception
    handler sees it); uvicorn's own answer is a plain-text 400, the one error
    that was not JSON. The deadline: see the module docstring.
    """

    _deadline: asyncio.TimerHandle | None = None

    def send_400_response(self, msg: str) -> None:
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(BAD_HTTP)).encode()),
            (b"connection", b"close"),
        ]
        for event in (
            h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
            h11.Data(data=BAD_HTTP),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event) or b"")
        self.transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self._start_deadline()

    def data_received(self, data: bytes) -> None:
        if self._deadline is None and self.conn.their_state is h11.IDLE:
            self._start_deadline()  # the first bytes of the next request on this connection
        super().data_received(data)
        self._stop_deadline_if_received()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # A pipelined request already buffered is being read now: it is on the clock too.
        pending = self.conn.their_state is h11.SEND_BODY or (
            self.conn.their_state is h11.IDLE and bool(self.conn.trailing_data[0])
        )
        if pending and self._deadline is None:
            self._start_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_deadline()
        super().connection_lost(exc)

    def _start_deadline(self) -> None:
        self._deadline = self.loop.call_later(REQUEST_SECONDS, self._too_slow)

    def _stop_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _stop_deadline_if_received(self) -> None:
        if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
            self._stop_deadline()  # the whole request is in (or the connection is over)

    def _too_slow(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self.cycle is None or not self.cycle.response_started:
            self.transport.write(TOO_SLOW)
        self.transport.close()


class _QuietServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to its host process."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class RedactCredentials(logging.Filter):
    """Keeps credentials a client put in a URL out of the access log's request lines.

    The API refuses `?token=` (auth.py), but uvicorn logs the request line
    whatever the answer was: values of query parameters named like a secret,
    and anything shaped like a vaultsync token, are replaced.
    """

    SECRET_NAME = re.compile(r"(?i)token|secret|passw|auth|key")
    TOKEN = re.compile(r"vst_[A-Za-z0-9_\-]+")

    @classmethod
    def redact(cls, text: str) -> str:
        path, sep, query = text.partition("?")
        if sep:
            items = []
            for item in query.split("&"):
                name, eq, _ = item.partition("=")
                # The name as the app reads it (`%74oken` is `token`).
                secret = eq and cls.SECRET_NAME.search(unquote_plus(name))
                items.append(f"{name}=[redacted]" if secret else item)
            text = f"{path}?{'&'.join(items)}"
        return cls.TOKEN.sub("vst_[redacted]", text)

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(self.redact(a) if isinstance(a, str) else a for a in record.args)
        return True


def _uvicorn_config(app: object, host: str, port: int) -> uvicorn.Config:
    config = uvicorn.Config(
        app,  # type: ignore[arg-type]
        host=host,
        port=port,
        log_level="info",
        access_log=True,
        server_header=False,
        proxy_headers=False,
        timeout_graceful_shutdown=5,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        http=JsonErrorProtocol,
    )
    # After Config, which (re)configures uvicorn's loggers.
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactCredentials) for f in access.filters):
        access.addFilter(RedactCredentials())
    return config


async def serve_standalone(
    cfg: Config, target: str, passphrase: str | None, listen: str | None
) -> None:
    host, port = check_serving(cfg, listen or cfg.api.listen)
    sock = listening_socket(host, port)
    backend = Backend(cfg, target, passphrase)
    await backend.start()
    try:
        app = create_app(backend, Auth(cfg.api, host))
        server = uvicorn.Server(_uvicorn_config(app, host, port))
        log.info("serving %s from target %s on http://%s:%d/", cfg.volume.name, target, host, port)
        await server.serve(sockets=[sock])
    finally:
        await backend.close()
        sock.close()


class EmbeddedApi:
    """The API as a task on the mount daemon's event loop; `stop()` before unmounting."""

    def __init__(self, server: uvicorn.Server, task: asyncio.Task[None], backend: Backend) -> None:
        self.server = server
        self.task = task
        self.backend = backend

    async def stop(self) -> None:
        self.server.should_exit = True
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(self.task, 15)
        await self.backend.close()


async def start_embedded(cfg: Config, fs: FileSystem, passphrase: str | None) -> EmbeddedApi:
    host, port = check_serving(cfg, cfg.api.listen)
    sock = listening_socket(host, port)
    backend = Backend(cfg, None, passphrase, live=fs)
    await backend.start()
    app = create_app(backend, Auth(cfg.api, host))
    server = _QuietServer(_uvicorn_config(app, host, port))

    async def run() -> None:
        try:
            await server.serve(sockets=[sock])
        finally:
            sock.close()

    task = asyncio.create_task(run(), name="api")
    log.info("API of %s on http://%s:%d/", cfg.volume.name, host, port)
    return EmbeddedApi(server, task, backend)
