"""Bounds on what a request may carry, enforced before any handler runs.

A URL longer than MAX_URL is a 414; a body over MAX_BODY is a 413, whether
it announces its length or streams in chunks (the body is counted as it
arrives and never held beyond the limit). Every API body is a small JSON
object, so the limit is small.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

MAX_URL = 8192
MAX_BODY = 64 * 1024

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def refuse(
    send: Send, status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> None:
    """Answer in the API's error shape from ASGI middleware, before any route runs."""
    body = json.dumps({"error": code, "message": message}).encode()
    extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *extra,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class LimitRequests:
    def __init__(self, app: ASGIApp, max_body: int = MAX_BODY, max_url: int = MAX_URL) -> None:
        self.app = app
        self.max_body = max_body
        self.max_url = max_url

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        url_len = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
        if url_len > self.max_url:
            await refuse(send, 414, "uri_too_long", f"the URL is longer than {self.max_url} bytes")
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        too_big = (
            f"the request body is larger than {self.max_body} bytes; API requests are small "
            "JSON objects"
        )
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                await refuse(send, 400, "bad_request", "Content-Length is not a number")
                return
            if n > self.max_body:
                await refuse(send, 413, "too_large", too_big)
                return
        # Read (bounded) whatever arrives, then replay it to the app.
        chunks: list[bytes] = []
        total = 0
        if scope.get("method") in ("POST", "PUT", "PATCH", "DELETE"):
            while True:
                msg = await receive()
                if msg["type"] != "http.request":
                    return  # the client went away mid-body: nothing to answer, nothing to run
                part = msg.get("body", b"")
                total += len(part)
                if total > self.max_body:
                    await refuse(send, 413, "too_large", too_big)
                    return
                chunks.append(part)
                if not msg.get("more_body", False):
                    break
            body = b"".join(chunks)
            sent = False

            async def replay() -> Message:
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send)
            return
        await self.app(scope, receive, send)
