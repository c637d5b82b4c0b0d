"""A TCP fault-injection proxy for tests: 127.0.0.1:<free port> in front of a real server.

The test points a client at `proxy.endpoint` and switches the proxy between
modes while traffic flows:

- ``pass``: bytes are forwarded unchanged.
- ``latency``: every chunk read from either side waits `latency_ms` before it is
  forwarded (a slow link; throughput drops, nothing is lost).
- ``outage``: existing connections are cut and every new one is reset right
  after it is accepted (the provider is unreachable; clients fail fast).
- ``blackhole``: a partition. Connections are accepted but nothing moves in
  either direction until the mode changes; what was sent meanwhile is held
  (as TCP would retransmit it) and delivered after the partition heals.
- ``reset``: forwards like ``pass``, but each of the next `reset_budget`
  connections that sends more than `reset_after` bytes towards the server is
  cut after exactly `reset_after` bytes: both sides get an RST (SO_LINGER 0),
  so the server sees a request torn at that byte (after `reset_delay` seconds
  of silence, if set). `resets_after_headers()` instead cuts each request
  right after its header block. After the budget is spent
  the mode behaves as ``pass``.

`reset_all()` resets every open connection once, whatever the mode. Threads
are daemons, `stop()` is bounded, and the proxy is a context manager.

`hold_requests(method, path_part)` works beside any mode: from then on each
request whose request line has that method and `path_part` in its target is
held, whole, before a byte of it reaches the server, until `release()`; other
requests (on other connections) go on. It makes "this PUT lands only after
that happened" deterministic; `wait_held()` says when one is being held.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Literal

Mode = Literal["pass", "latency", "outage", "blackhole", "reset"]
_MODES = ("pass", "latency", "outage", "blackhole", "reset")
_LINGER_RST = struct.pack("ii", 1, 0)


def _rst_close(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN (SO_LINGER on, timeout 0)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    with contextlib.suppress(OSError):
        sock.close()


@dataclass
class ProxyStats:
    accepted: int = 0
    refused: int = 0  # connections reset at accept (outage)
    cut: int = 0  # established connections reset (outage, reset, reset_all)
    bytes_up: int = 0  # towards the server
    bytes_down: int = 0  # towards the client


@dataclass(eq=False)
class _Conn:
    client: socket.socket
    server: socket.socket | None = None
    up: int = 0
    dead: bool = False
    kill: bool = False  # set by the controller: reset at the next turn of the loop
    recent: bytes = b""  # the last upstream bytes, to find a header block split over reads


class FaultProxy:
    def __init__(self, upstream_host: str, upstream_port: int, *, host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self._lock = threading.Lock()
        self._mode: Mode = "pass"
        self.latency_ms = 0.0
        self.reset_after = 0
        self.reset_budget = 0
        self.reset_delay = 0.0
        self.reset_at_headers = False
        self._hold: tuple[bytes, bytes] | None = None  # (method, part of the target)
        self._holding = 0  # requests held right now
        self.held_total = 0  # requests ever held
        self.stats = ProxyStats()
        self._conns: set[_Conn] = set()
        self._threads: set[threading.Thread] = set()
        self._stopping = threading.Event()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, 0))
        self._listener.listen(128)
        self._listener.settimeout(0.1)
        self.host = host
        self.port = int(self._listener.getsockname()[1])
        self._acceptor = threading.Thread(
            target=self._accept_loop, name=f"faultproxy-{self.port}", daemon=True
        )
        self._acceptor.start()

    @classmethod
    def for_url(cls, url: str) -> FaultProxy:
        """A proxy in front of `http://host:port` (the endpoint of a local provider)."""
        rest = url.split("://", 1)[-1].split("/", 1)[0]
        host, _, port = rest.rpartition(":")
        return cls(host, int(port))

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- control -----------------------------------------------------------------
    @property
    def mode(self) -> Mode:
        return self._mode

    def set_mode(
        self,
        mode: Mode,
        *,
        latency_ms: float | None = None,
        reset_after: int | None = None,
        reset_budget: int | None = None,
        reset_delay: float | None = None,
        reset_at_headers: bool | None = None,
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"unknown proxy mode {mode!r}")
        with self._lock:
            if latency_ms is not None:
                self.latency_ms = float(latency_ms)
            if reset_after is not None:
                self.reset_after = int(reset_after)
            if reset_budget is not None:
                self.reset_budget = int(reset_budget)
            if reset_delay is not None:
                self.reset_delay = float(reset_delay)
            if reset_at_headers is not None:
                self.reset_at_headers = bool(reset_at_headers)
            self._mode = mode
            if mode == "outage":
                for c in self._conns:
                    c.kill = True

    def passthrough(self) -> None:
        self.set_mode("pass")

    def latency(self, ms: float) -> None:
        self.set_mode("latency", latency_ms=ms)

    def outage(self) -> None:
        self.set_mode("outage")

    def blackhole(self) -> None:
        self.set_mode("blackhole")

    def resets(self, after_bytes: int, budget: int, delay: float = 0.0) -> None:
        """Cut each of the next `budget` connections `after_bytes` into what they send."""
        self.set_mode(
            "reset",
            reset_after=after_bytes,
            reset_budget=budget,
            reset_delay=delay,
            reset_at_headers=False,
        )

    def resets_after_headers(self, budget: int, delay: float = 0.0) -> None:
        """Cut each of the next `budget` requests right after its header block (the server
        has the whole request line and headers, not one byte of the body)."""
        self.set_mode("reset", reset_budget=budget, reset_delay=delay, reset_at_headers=True)

    def reset_all(self) -> int:
        """Reset every open connection once; returns how many were marked."""
        with self._lock:
            for c in self._conns:
                c.kill = True
            return len(self._conns)

    def hold_requests(self, method: str, path_part: str) -> None:
        """Hold every request `method` whose target contains `path_part` (see the module
        docstring) until `release()`."""
        with self._lock:
            self._hold = (method.encode() + b" ", path_part.encode())

    def release(self) -> None:
        """Stop holding: the held requests go to the server now, in no set order."""
        with self._lock:
            self._hold = None

    def held(self) -> int:
        with self._lock:
            return self._holding

    def wait_held(self, n: int = 1, timeout: float = 10.0) -> bool:
        """True once at least `n` requests are being held."""
        deadline = time.monotonic() + timeout
        while self.held() < n:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def _holds(self, data: bytes) -> bool:
        """Is `data` (bytes towards the server) the start of a request to hold?"""
        with self._lock:
            if self._hold is None:
                return False
            method, part = self._hold
            line = data.split(b"\r\n", 1)[0]
            if not (line.startswith(method) and part in line):
                return False
            self._holding += 1
            self.held_total += 1
            return True

    def _wait_release(self, conn: _Conn) -> bool:
        """Hold until release(); False if the connection is to be cut meanwhile."""
        try:
            while True:
                with self._lock:
                    if self._hold is None:
                        return True
                if self._should_kill(conn):
                    return False
                time.sleep(0.01)
        finally:
            with self._lock:
                self._holding -= 1

    def open_connections(self) -> int:
        with self._lock:
            return sum(1 for c in self._conns if not c.dead)

    def wait_no_connections(self, timeout: float = 2.0) -> bool:
        """True once every connection is gone (cut ones take a turn of their loop)."""
        deadline = time.monotonic() + timeout
        while self.open_connections():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    # -- lifecycle ---------------------------------------------------------------
    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, reset every connection, join the threads (bounded)."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            for c in self._conns:
                c.kill = True
            threads = [self._acceptor, *self._threads]
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- machinery ---------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self.stats.accepted += 1
                if self._mode == "outage":
                    self.stats.refused += 1
                    _rst_close(client)
                    continue
                conn = _Conn(client)
                self._conns.add(conn)
                t = threading.Thread(
                    target=self._serve, args=(conn,), name=f"faultproxy-conn-{self.port}"
                )
                t.daemon = True
                self._threads.add(t)
            t.start()

    def _serve(self, conn: _Conn) -> None:
        try:
            self._pump(conn)
        except OSError:
            pass
        finally:
            conn.dead = True
            if conn.kill:
                _rst_close(conn.client)
                if conn.server is not None:
                    _rst_close(conn.server)
            else:
                for s in (conn.client, conn.server):
                    if s is not None:
                        with contextlib.suppress(OSError):
                            s.close()
            with self._lock:
                self._conns.discard(conn)
                self._threads.discard(threading.current_thread())

    def _should_kill(self, conn: _Conn) -> bool:
        with self._lock:
            if self._stopping.is_set() or self._mode == "outage":
                conn.kill = True
            if conn.kill:
                self.stats.cut += 1
            return conn.kill

    def _pump(self, conn: _Conn) -> None:
        # A partition holds new connections too: connect upstream only once it heals.
        while self._mode == "blackhole":
            if self._should_kill(conn):
                return
            time.sleep(0.02)
        if self._should_kill(conn):
            return
        conn.server = socket.create_connection(self.upstream, timeout=5)
        conn.server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.server.settimeout(None)
        conn.client.settimeout(None)
        peer = {conn.client.fileno(): conn.server, conn.server.fileno(): conn.client}
        while True:
            if self._should_kill(conn):
                return
            if self.mode == "blackhole":  # set_mode may have changed it meanwhile
                time.sleep(0.02)  # nothing moves; the kernel buffers fill up as in a partition
                continue
            ready, _, _ = select.select([conn.client, conn.server], [], [], 0.05)
            for sock in ready:
                data = sock.recv(65536)
                if not data:
                    return  # one side closed: close both (HTTP needs no half-close here)
                if self._should_kill(conn):
                    return  # an outage that began while we waited: nothing more gets through
                if self._mode == "latency" and self.latency_ms > 0:
                    time.sleep(self.latency_ms / 1000)
                    if self._should_kill(conn):
                        return
                towards_server = sock is conn.client
                if towards_server and self._holds(data) and not self._wait_release(conn):
                    return
                cut = self._cut_at(conn, data) if towards_server else None
                if cut is not None:
                    peer[sock.fileno()].sendall(data[:cut])
                    self._count(conn, cut, towards_server)
                    time.sleep(self.reset_delay)  # let the server start on the request
                    return  # reset exactly `reset_after` bytes into the stream
                peer[sock.fileno()].sendall(data)
                self._count(conn, len(data), towards_server)

    def _count(self, conn: _Conn, n: int, towards_server: bool) -> None:
        with self._lock:
            if towards_server:
                conn.up += n
                self.stats.bytes_up += n
            else:
                self.stats.bytes_down += n

    def _cut_at(self, conn: _Conn, data: bytes) -> int | None:
        """In reset mode: how many of these upstream bytes go through before the RST."""
        with self._lock:
            if self._mode != "reset" or self.reset_budget <= 0:
                return None
            if self.reset_at_headers:
                seen = conn.recent + data
                i = seen.find(b"\r\n\r\n")
                conn.recent = seen[-3:]
                if i < 0:
                    return None
                cut = i + 4 - (len(seen) - len(data))
            elif conn.up + len(data) > self.reset_after:
                cut = max(0, self.reset_after - conn.up)
            else:
                return None
            self.reset_budget -= 1
            self.stats.cut += 1
            conn.kill = True
            return cut
