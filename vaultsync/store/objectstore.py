"""One target's bucket, spoken to over S3: the only module that imports aiobotocore.

Every failure leaves here as a `StoreError` subclass that names the target and
says what to do; transient ones (network, throttling, 5xx) are retried with
exponential backoff and full jitter before they do. Keys given to and returned
by this class are relative to the target's prefix. Secrets are resolved once,
kept in memory only, and never part of a message.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import random
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import aiohttp
import yarl
from aiobotocore.session import get_session
from botocore.config import Config as BotoConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    ReadTimeoutError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

from vaultsync.config import TargetConfig
from vaultsync.engine.lowprio import in_background
from vaultsync.errors import VaultsyncError
from vaultsync.store import s3put

T = TypeVar("T")

PROBE_PREFIX = ".probe/"
# Bodies up to this size are PUT by `s3put` (signed here, sent with aiohttp); larger
# ones through botocore, whose streaming and copy-avoiding body handling they need.
SMALL_PUT = 1 << 20
_ERROR_CODE = re.compile(rb"<Code>([^<]{1,64})</Code>")


class StoreError(VaultsyncError):
    """A request to a target failed; `reason` is the short cause, `str()` the full advice."""

    retriable = False

    def __init__(self, target: str, where: str, reason: str, advice: str = "") -> None:
        self.target = target
        self.reason = reason
        msg = f"target {target!r} ({where}): {reason}"
        super().__init__(f"{msg}; {advice}" if advice else msg)


class AuthError(StoreError):
    pass


class BucketMissingError(StoreError):
    pass


class ObjectMissingError(StoreError):
    pass


class PreconditionFailed(StoreError):
    pass


class NetworkError(StoreError):
    retriable = True


class ThrottledError(StoreError):
    retriable = True


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # relative to the target prefix
    size: int
    etag: str


_AUTH_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "AllAccessDisabled",
}
_THROTTLE_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "TooManyRequests",
}


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _content_md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()


class _Body(io.BytesIO):
    """A request body aiohttp sends from `data` itself, never from a copy.

    botocore wraps a bytes body in a BytesIO, which shares the bytes until its
    buffer is exported; aiohttp exports it (getbuffer) only to learn the size,
    and that copy of a whole segment doubled the daemon's memory at every upload.
    """

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self._data = data

    def getbuffer(self) -> memoryview:
        return memoryview(self._data)


def _body(data: bytes) -> bytes | _Body:
    return _Body(data) if len(data) >= 1 << 20 else data


async def _content_md5_async(data: bytes) -> str:
    """Content-MD5 without stalling the event loop on a whole segment (every fsync waits
    on that loop); hashlib releases the GIL, so a worker thread runs it beside the loop."""
    if len(data) < 1 << 20:
        return _content_md5(data)
    return await in_background(_content_md5, data)


class ObjectStore:
    """Async S3 client for one target; use as `async with ObjectStore(target) as store`."""

    def __init__(
        self,
        target: TargetConfig,
        *,
        connect_timeout: float = 5,
        read_timeout: float = 60,
        max_attempts: int = 5,
        backoff_base: float = 0.2,
        backoff_max: float = 10,
        pool_size: int = 16,
    ) -> None:
        self.target = target
        self.name = target.name
        self.where = f"{target.endpoint}/{target.bucket}/{target.prefix}".rstrip("/")
        self.max_attempts = max(1, max_attempts)
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._pool_size = pool_size
        self._client: Any = None
        self._client_cm: Any = None
        self._http: aiohttp.ClientSession | None = None
        self._keys: tuple[str, str] | None = None  # for s3put; never printed
        self._conditional: bool | None = None

    async def __aenter__(self) -> ObjectStore:
        access_key, secret = self.target.credentials.resolve(f"targets.{self.name}")
        cfg = BotoConfig(
            s3={
                "addressing_style": "path" if self.target.path_style else "virtual",
                # No SHA-256 of every body for the signature (on the event loop, at
                # half the speed of the upload itself): Content-MD5, sent with every
                # PUT, already makes the server refuse a body that is not what we sent.
                "payload_signing_enabled": False,
            },
            connect_timeout=self._connect_timeout,
            read_timeout=self._read_timeout,
            retries={"total_max_attempts": 1, "mode": "standard"},  # we retry, our own way
            max_pool_connections=self._pool_size,
            # rclone returns the whole object's checksum on ranged GETs; only validate
            # what the request asked for. Integrity is the segment CRCs' job.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._client_cm = get_session().create_client(
            "s3",
            endpoint_url=self.target.endpoint,
            region_name=self.target.region,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret.get_secret_value(),
            config=cfg,
        )
        self._client = await self._client_cm.__aenter__()
        self._keys = (access_key, secret.get_secret_value())
        self._http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self._pool_size),
            timeout=aiohttp.ClientTimeout(
                sock_connect=self._connect_timeout, sock_read=self._read_timeout
            ),
            auto_decompress=False,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None
        if self._client_cm is not None:
            await self._client_cm.__aexit__(None, None, None)
            self._client_cm = self._client = None

    def __repr__(self) -> str:
        return f"ObjectStore({self.name!r}, {self.where!r})"

    # -- error mapping and retries --------------------------------------------------

    def _key(self, key: str) -> str:
        return self.target.prefix + key

    def _error(self, e: BaseException, op: str, key: str | None) -> StoreError:
        what = f"{op} {key}" if key else op
        w, n = self.where, self.name
        if isinstance(e, ClientError):
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if code == "NoSuchBucket" or (status == 404 and key is None):
                return BucketMissingError(
                    n,
                    w,
                    f"bucket {self.target.bucket!r} does not exist",
                    "create it at the provider or fix `bucket` in the config",
                )
            if code in ("NoSuchKey", "404", "NotFound") or status == 404:
                return ObjectMissingError(n, w, f"{what}: no such object")
            if code in _AUTH_CODES or status in (401, 403):
                return AuthError(
                    n,
                    w,
                    f"{what}: access denied ({code or status})",
                    "check the target's credentials and that they may read and write the bucket",
                )
            if code in ("PreconditionFailed", "412") or status == 412:
                return PreconditionFailed(n, w, f"{what}: object already exists")
            if code in _THROTTLE_CODES or status in (429, 503):
                return ThrottledError(n, w, f"{what}: throttled by the provider ({code or status})")
            if status >= 500 or status == 409:
                return NetworkError(n, w, f"{what}: server error {status} {code}".rstrip())
            return StoreError(n, w, f"{what}: request refused ({code or status})")
        if isinstance(e, NoCredentialsError):
            return AuthError(n, w, "no credentials", "set the target's credentials in the config")
        if isinstance(e, BotoConnectionError | HTTPClientError | ReadTimeoutError):
            return NetworkError(
                n,
                w,
                f"{what}: cannot reach the endpoint ({type(e).__name__})",
                "check that the provider is up and the endpoint URL is right",
            )
        if isinstance(e, aiohttp.ClientError | asyncio.TimeoutError | OSError):
            return NetworkError(
                n,
                w,
                f"{what}: connection failed ({type(e).__name__})",
                "check that the provider is up and the endpoint URL is right",
            )
        if isinstance(e, BotoCoreError):
            return StoreError(n, w, f"{what}: {type(e).__name__}")
        raise e

    async def _call(self, op: str, key: str | None, fn: Callable[[], Awaitable[T]]) -> T:
        if self._client is None:
            raise RuntimeError("ObjectStore used outside `async with`")
        attempt = 0
        while True:
            attempt += 1
            try:
                return await fn()
            except (TimeoutError, ClientError, BotoCoreError, aiohttp.ClientError, OSError) as e:
                err = self._error(e, op, key)
            if not err.retriable or attempt >= self.max_attempts:
                if err.retriable:
                    err = type(err)(
                        self.name,
                        self.where,
                        f"{err.reason} (after {attempt} attempts)",
                        "check that the provider is up and the endpoint URL is right",
                    )
                raise err
            cap = min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1))
            await asyncio.sleep(random.uniform(0, cap))

    # -- operations -------------------------------------------------------------------

    async def check_bucket(self) -> None:
        """Raise a clear error unless the bucket exists and these credentials may use it."""
        c = self._client
        await self._call("check bucket", None, lambda: c.head_bucket(Bucket=self.target.bucket))
        # HEAD bucket passes for read-only keys on some servers; a listing proves List too.
        await self._call(
            "list",
            None,
            lambda: c.list_objects_v2(
                Bucket=self.target.bucket, Prefix=self.target.prefix, MaxKeys=1
            ),
        )

    async def put(self, key: str, data: bytes) -> None:
        if len(data) <= SMALL_PUT:
            await self._call("put", key, lambda: self._put_small(key, data))
            return
        c = self._client
        md5 = await _content_md5_async(data)

        async def go() -> None:
            # Content-MD5 makes the server refuse a body cut short by a dropped
            # connection instead of keeping a truncated (even empty) object.
            await c.put_object(
                Bucket=self.target.bucket, Key=self._key(key), Body=_body(data), ContentMD5=md5
            )

        await self._call("put", key, go)

    async def _put_small(self, key: str, data: bytes) -> None:
        """One PUT signed by `s3put`; a refusal becomes the ClientError botocore would
        raise, so `_error` maps both paths' failures the same way."""
        assert self._http is not None and self._keys is not None
        t = self.target
        url, host, path = s3put.object_url(t.endpoint, t.bucket, self._key(key), t.path_style)
        headers = s3put.sign(
            "PUT",
            host,
            path,
            {"Content-MD5": _content_md5(data)},
            *self._keys,
            t.region,
            datetime.now(UTC),
        )
        async with self._http.put(yarl.URL(url, encoded=True), data=data, headers=headers) as r:
            body = await r.read()
            if r.status == 200:
                return
        code = _ERROR_CODE.search(body)
        raise ClientError(
            {
                "Error": {"Code": code.group(1).decode(errors="replace") if code else ""},
                "ResponseMetadata": {"HTTPStatusCode": r.status},
            },
            "PutObject",
        )

    async def get(self, key: str, byte_range: tuple[int, int] | None = None) -> bytes:
        """The object's bytes, or `[start, end)` of them."""
        c = self._client
        extra: dict[str, str] = {}
        if byte_range is not None:
            start, end = byte_range
            if end <= start:
                return b""
            extra["Range"] = f"bytes={start}-{end - 1}"

        async def go() -> bytes:
            resp = await c.get_object(Bucket=self.target.bucket, Key=self._key(key), **extra)
            async with resp["Body"] as body:
                data: bytes = await body.read()
            return data

        return await self._call("get", key, go)

    async def head(self, key: str) -> ObjectInfo | None:
        c = self._client

        async def go() -> ObjectInfo | None:
            try:
                r = await c.head_object(Bucket=self.target.bucket, Key=self._key(key))
            except ClientError as e:
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                code = e.response.get("Error", {}).get("Code")
                if status == 404 and code != "NoSuchBucket":
                    return None
                raise
            return ObjectInfo(key, int(r["ContentLength"]), str(r.get("ETag", "")).strip('"'))

        return await self._call("head", key, go)

    async def list(self, prefix: str = "", start_after: str = "") -> AsyncIterator[ObjectInfo]:
        """Every object under `prefix` (relative), in key order, a page at a time; with
        `start_after` (a relative key), only those after it: a follower asking for what
        is new pays for the new keys, not for the whole history."""
        c = self._client
        full = self._key(prefix)
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.target.bucket, "Prefix": full}
            if start_after:
                kwargs["StartAfter"] = self._key(start_after)
            if token:
                kwargs["ContinuationToken"] = token

            async def go(kw: dict[str, Any] = kwargs) -> Any:
                return await c.list_objects_v2(**kw)

            page = await self._call("list", prefix or None, go)
            for o in page.get("Contents", []):
                rel = str(o["Key"])[len(self.target.prefix) :]
                yield ObjectInfo(rel, int(o["Size"]), str(o.get("ETag", "")).strip('"'))
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")
            if not token:
                return

    async def delete(self, key: str) -> None:
        c = self._client
        await self._call(
            "delete", key, lambda: c.delete_object(Bucket=self.target.bucket, Key=self._key(key))
        )

    async def delete_many(self, keys: Sequence[str]) -> None:
        """Delete keys in batches of 1000 (one request each, where the server allows)."""
        c = self._client
        for i in range(0, len(keys), 1000):
            part = keys[i : i + 1000]
            body = {"Objects": [{"Key": self._key(k)} for k in part], "Quiet": True}

            async def go(b: dict[str, Any] = body) -> Any:
                return await c.delete_objects(Bucket=self.target.bucket, Delete=b)

            try:
                await self._call("delete", part[0], go)
            except StoreError as e:
                if e.retriable or isinstance(e, AuthError | BucketMissingError):
                    raise
                for k in part:  # a server without multi-object delete
                    await self.delete(k)

    async def _put_if_none_match(self, key: str, data: bytes) -> bool:
        c = self._client
        md5 = await _content_md5_async(data)

        async def go() -> None:
            await c.put_object(
                Bucket=self.target.bucket,
                Key=self._key(key),
                Body=_body(data),
                IfNoneMatch="*",
                ContentMD5=md5,
            )

        try:
            await self._call("create", key, go)
        except PreconditionFailed:
            return False
        return True

    async def supports_conditional_create(self) -> bool:
        """Does this server honour `If-None-Match: *` on PUT? Probed once, under `.probe/`."""
        if self._conditional is None:
            key = f"{PROBE_PREFIX}{uuid.uuid4().hex}"
            try:
                first = await self._put_if_none_match(key, b"1")
                second = await self._put_if_none_match(key, b"2")
                self._conditional = first and not second
            except StoreError as e:
                if isinstance(e, AuthError | BucketMissingError | NetworkError):
                    raise
                self._conditional = False  # e.g. 501 NotImplemented for the header
            finally:
                with contextlib.suppress(StoreError):  # .probe/ may be cleaned by anyone
                    await self.delete(key)
        return self._conditional

    async def put_new(self, key: str, data: bytes) -> bool:
        """PUT that never replaces an existing object where the server can promise it.

        False: the key already exists (the caller decides whether its bytes are
        the same). Where If-None-Match is ignored (rclone) this is a plain PUT
        after a HEAD: a narrow race between two writers remains there.
        """
        if await self.supports_conditional_create():
            return await self._put_if_none_match(key, data)
        if await self.head(key) is not None:
            return False
        await self.put(key, data)
        return True

    async def create_if_absent(self, key: str, data: bytes) -> bool:
        """Write `key` only if it does not exist; True when this call created it.

        Servers that ignore `If-None-Match` (rclone) get HEAD, PUT, read back: a
        race with another writer in the gap is not excluded there, which is why
        the result is read back and compared instead of trusted.
        """
        if await self.supports_conditional_create():
            return await self._put_if_none_match(key, data)
        if await self.head(key) is not None:
            return False
        await self.put(key, data)
        return await self.get(key) == data
