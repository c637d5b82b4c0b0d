"""The FastAPI application: routes under /v1, /metrics, the web page at /ui/.

Built around a `Backend` (what is served) and an `Auth` (who may ask), so
the same app runs standalone against one target and inside the mount daemon.
Reads need the read scope, snapshots and restore jobs the admin scope;
/v1/health, /openapi.json and the page's static files need nothing (the page
asks for a token and sends it with every API call).

/openapi.json states what each operation accepts and every status it can
answer (errors as `ErrorOut`), and the bodies are strict (no field the
schema lacks, no "1" for a number, no 0 for false), so the document and the
server agree; tests/servers/test_api_hostile.py holds them to it with
schemathesis.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import Body, Depends, FastAPI, Query
from fastapi import Path as PathParam
from fastapi.responses import PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.json_schema import SkipJsonSchema

from vaultsync import __version__

from . import files
from .auth import Auth, CallerChecks, require_json
from .errors import SafeJSONResponse, documented, install_error_handlers
from .limits import LimitRequests, Message, Receive, Scope, Send
from .metrics import Metrics
from .paths import from_url_path, restore_destination, volume_path
from .point_views import parse_at
from .source import Backend

WEB = Path(__file__).parent / "web"
SNAPSHOT_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
JobId = Annotated[str, PathParam(max_length=64)]
MAX_JSON_INT = 2**53 - 1  # what every JSON client reads exactly
# The page loads only its own script and style and talks only to this server; nothing
# may frame it (clickjacking) and no form or <base> may send it elsewhere.
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
)
# Everything else is data: if a browser ever renders it, it runs nothing and loads nothing.
DATA_CSP = "default-src 'none'; frame-ancestors 'none'; sandbox"


class StrictBody(BaseModel):
    """A request body as the schema reads it: no field it lacks, no "5" for 5, no 0 for false.

    One leniency the schema itself has: a JSON number with no fraction is an
    integer to JSON Schema (2.0 is 2), so it is one here too.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _integral_numbers(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        return {
            k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in data.items()
        }


class SnapshotIn(StrictBody):
    name: str = Field(pattern=SNAPSHOT_NAME, description="1-128 letters, digits, '.', '_', '-'.")
    lsn: int | None = Field(default=None, ge=1, le=MAX_JSON_INT, description="Default: now.")


class CancelIn(StrictBody):
    """Nothing to say: the body, `{}` or none, exists so the POST carries a JSON type."""


class RestoreIn(StrictBody):
    # Exactly one of path and path_url (a name that is not UTF-8 has only the second).
    model_config = ConfigDict(
        json_schema_extra={"oneOf": [{"required": ["path"]}, {"required": ["path_url"]}]}
    )
    # Absent, not null: the schema shows strings only (SkipJsonSchema), and the bounds
    # sit on the string, as a null put to a length check on the whole field was a 500.
    path: Annotated[str, Field(min_length=1, max_length=4096)] | SkipJsonSchema[None] = Field(
        default=None, description="File or directory in the volume (or path_url)."
    )
    path_url: Annotated[str, Field(min_length=1, max_length=3 * 4096)] | SkipJsonSchema[None] = (
        Field(
            default=None,
            description="The same, as a listing's `path_url` gives it: each %XX one byte.",
        )
    )
    at: str = Field(default="", max_length=200, description="As `--at`; empty: newest.")
    destination: str = Field(
        min_length=1,
        max_length=4096,
        description="Under one of api.restore_roots (relative: under the first one).",
    )
    force: bool = Field(default=False, description="Overwrite files that differ.")

    @model_validator(mode="after")
    def _one_path(self) -> RestoreIn:
        given = {"path", "path_url"} & self.model_fields_set  # a null counts, as in the schema
        if len(given) != 1 or (self.path if given == {"path"} else self.path_url) is None:
            raise ValueError("give the path to restore as path or as path_url, one of them")
        return self

    bwlimit: int | None = Field(
        default=None,
        ge=1024,
        le=MAX_JSON_INT,
        description="At most this many bytes per second, so a restore leaves the server's "
        "disk and network to its applications; none: no cap.",
    )


def _link(operation: str, parameter: str, field: str) -> dict[str, Any]:
    """An OpenAPI link: `operation` takes `parameter` from this response's `field`.

    They let a client, and schemathesis's stateful phase, follow a created
    job or snapshot to the operations on it.
    """
    return {
        operation: {"operationId": operation, "parameters": {parameter: f"$response.body#/{field}"}}
    }


class CountRequests:
    """Counts each request by its route template once the response has started."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 0

        async def watch(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = int(msg["status"])
            await send(msg)

        try:
            await self.app(scope, receive, watch)
        finally:
            route = scope.get("route")
            name = getattr(route, "path", None) or "unmatched"
            self.metrics.count(scope.get("method", "?"), name, status or 500)


class SecurityHeaders:
    """Headers every answer carries, so no browser sniffs, frames or runs what it is not meant to.

    The page under /ui/ gets a Content-Security-Policy that admits only its
    own files and calls to this server; every other answer (JSON, downloads)
    one that admits nothing at all.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        page = str(scope.get("path", "")).startswith("/ui/")
        extra = [
            (b"x-content-type-options", b"nosniff"),
            (b"x-frame-options", b"DENY"),
            (b"referrer-policy", b"no-referrer"),
            (b"content-security-policy", (PAGE_CSP if page else DATA_CSP).encode()),
        ]

        async def add(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                have = {k.lower() for k, _ in msg.get("headers", [])}
                msg["headers"] = [*msg.get("headers", []), *(h for h in extra if h[0] not in have)]
            await send(msg)

        await self.app(scope, receive, add)


class HeadAsGet:
    """HEAD answered wherever GET is (RFC 9110 §9.1: every server supports both).

    FastAPI routes a HEAD only to routes that list it, so HEAD /v1/health was a
    405. Routes without their own HEAD handling run as GET; uvicorn knows the
    request was HEAD and sends the headers (Content-Length included) without
    the body. Downloads handle HEAD themselves, without reading the file.
    """

    OWN_HEAD = ("/v1/content/", "/ui/")

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope.get("method") == "HEAD"
            and not str(scope.get("path", "")).startswith(self.OWN_HEAD)
        ):
            # A copy: uvicorn reads the method from its own scope to leave the body out.
            inner = {**scope, "method": "GET", "vaultsync.head": True}
            try:
                await self.app(inner, receive, send)
            finally:
                if "route" in inner:  # for CountRequests, outside: HEAD counted by route
                    scope["route"] = inner["route"]
            return
        await self.app(scope, receive, send)


def create_app(backend: Backend, auth: Auth) -> FastAPI:
    app = FastAPI(
        title="vaultsync restore API",
        version=__version__,
        description="Points in time, browsing, downloads and restore jobs of one vaultsync volume.",
        docs_url=None,
        redoc_url=None,
        default_response_class=SafeJSONResponse,
        dependencies=[Depends(require_json)],
    )
    metrics = Metrics()
    install_error_handlers(app)
    read, admin = Depends(auth.need("read")), Depends(auth.need("admin"))

    @app.get("/v1/health", summary="Liveness (no token needed)", responses=documented())
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "mode": "live" if backend.writer else "standalone",
            "target": backend.target,
            "version": __version__,
        }

    @app.get(
        "/v1/status",
        dependencies=[read],
        summary="As `vaultsync status --json`",
        responses=documented(401, 422),
    )
    async def status(probe: bool = True) -> dict[str, Any]:
        return await backend.status(probe)

    @app.get(
        "/v1/points",
        dependencies=[read],
        summary="Recoverable points per target",
        responses=documented(401),
    )
    async def points() -> dict[str, Any]:
        return await backend.points()

    @app.get(
        "/v1/snapshots",
        dependencies=[read],
        summary="Named snapshots",
        responses=documented(401, 502),
    )
    async def snapshots() -> list[dict[str, Any]]:
        return await backend.snapshots()

    @app.post(
        "/v1/snapshots",
        dependencies=[admin],
        status_code=201,
        summary="Create (writer only)",
        responses={
            201: {"description": "Created.", "links": _link("snapshot_delete", "name", "name")},
            **documented(401, 409, 415, 422, 502),
        },
    )
    async def snapshot_create(body: Annotated[SnapshotIn, Body()]) -> dict[str, Any]:
        return await backend.create_snapshot(body.name, body.lsn)

    @app.delete(
        "/v1/snapshots/{name}",
        dependencies=[admin],
        summary="Delete (writer only)",
        operation_id="snapshot_delete",
        responses=documented(401, 404, 409, 422, 502),
    )
    async def snapshot_delete(
        name: Annotated[str, PathParam(pattern=SNAPSHOT_NAME)],
    ) -> dict[str, Any]:
        return {"name": name, "deleted_at": await backend.delete_snapshot(name)}

    app.include_router(files.router(backend, auth, metrics))

    @app.post(
        "/v1/restores",
        dependencies=[admin],
        status_code=202,
        summary="Start a restore",
        responses={
            202: {
                "description": "Started; follow it with the job's id.",
                "links": {
                    **_link("restore_get", "job_id", "id"),
                    **_link("restore_cancel", "job_id", "id"),
                },
            },
            **documented(401, 409, 415, 422, 429),
        },
    )
    async def restore_start(body: Annotated[RestoreIn, Body()]) -> dict[str, Any]:
        path = volume_path(
            body.path if body.path is not None else from_url_path(body.path_url or "")
        )
        if body.at:
            parse_at(body.at)  # a point that cannot be is a 400 now, not a job that fails later
        dest = restore_destination(body.destination, list(backend.cfg.api.restore_roots))
        return backend.jobs.start(path, body.at, dest, body.force, body.bwlimit).public()

    @app.get(
        "/v1/restores",
        dependencies=[read],
        summary="Restore jobs, newest last",
        responses=documented(401),
    )
    async def restore_list() -> list[dict[str, Any]]:
        return [j.public() for j in backend.jobs.list()]

    @app.get(
        "/v1/restores/{job_id}",
        dependencies=[read],
        summary="One job's progress",
        operation_id="restore_get",
        responses=documented(401, 404, 422),
    )
    async def restore_get(job_id: JobId) -> dict[str, Any]:
        return backend.jobs.get(job_id).public()

    @app.post(
        "/v1/restores/{job_id}/cancel",
        dependencies=[admin],
        summary="Cancel a job",
        operation_id="restore_cancel",
        description="Send `Content-Type: application/json`, with `{}` or no body.",
        responses=documented(401, 404, 415, 422),
        # The schema asks for `{}`, what a client following it sends; without a body the
        # JSON type still has to come (require_json), which the schema cannot express.
        openapi_extra={"requestBody": {"required": True}},
    )
    async def restore_cancel(
        job_id: JobId, _body: Annotated[CancelIn | None, Body()] = None
    ) -> dict[str, Any]:
        return (await backend.jobs.cancel(job_id)).public()

    @app.get(
        "/metrics",
        dependencies=[read],
        # No media type of its own, so the errors are documented as the JSON they are.
        response_class=Response,
        summary="Prometheus metrics",
        responses={
            200: {
                "description": "Prometheus text exposition format 0.0.4.",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            },
            **documented(401, 422),
        },
    )
    async def prometheus(
        probe: Annotated[bool, Query(description="Probe the targets too.")] = False,
    ) -> PlainTextResponse:
        st = await backend.status(probe)
        v = backend.views
        text = metrics.render(st, (v.size, v.hits, v.misses), backend.jobs.counts())
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/ui/")

    app.mount("/ui", StaticFiles(directory=WEB, html=True), name="ui")
    # The last added runs first: headers on every answer, bounds, counting (refusals too).
    app.add_middleware(HeadAsGet)
    app.add_middleware(CallerChecks, auth=auth)
    app.add_middleware(CountRequests, metrics=metrics)
    app.add_middleware(LimitRequests)
    app.add_middleware(SecurityHeaders)
    return app
