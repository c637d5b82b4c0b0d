"""ObjectStore against both real servers; an independent client (minio) checks what landed."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable

import pytest
from minio import Minio

from vaultsync.commands.local_servers import LocalProvider
from vaultsync.config import TargetConfig
from vaultsync.store.objectstore import (
    SMALL_PUT,
    AuthError,
    BucketMissingError,
    NetworkError,
    ObjectMissingError,
    ObjectStore,
)

MakeTarget = Callable[..., TargetConfig]


def minio_for(p: LocalProvider) -> Minio:
    return Minio(
        p.endpoint.removeprefix("http://"),
        access_key=p.access_key,
        secret_key=p.secret_key,
        secure=False,
    )


def landed(p: LocalProvider, bucket: str, key: str) -> bytes:
    """An object's bytes as a client that shares no code with ours reads them."""
    obj = minio_for(p).get_object(bucket, key)
    try:
        return obj.read()
    finally:
        obj.close()
        obj.release_conn()


async def test_put_get_head_list_delete(provider: LocalProvider, make_target: MakeTarget) -> None:
    t = make_target(provider, prefix="some/prefix")
    data = os.urandom(300_000)
    async with ObjectStore(t) as s:
        await s.check_bucket()
        assert await s.head("segments/0000000000000001.seg") is None
        await s.put("segments/0000000000000001.seg", data)
        await s.put("segments/0000000000000002.seg", b"two")
        await s.put("volume.json", b"{}")
        info = await s.head("segments/0000000000000001.seg")
        assert info is not None and info.size == len(data)
        assert await s.get("segments/0000000000000001.seg") == data
        assert await s.get("segments/0000000000000001.seg", (1000, 5000)) == data[1000:5000]
        listed = [o.key async for o in s.list("segments/")]
        assert listed == ["segments/0000000000000001.seg", "segments/0000000000000002.seg"]
        await s.delete("segments/0000000000000002.seg")
        assert [o.key async for o in s.list("segments/")] == ["segments/0000000000000001.seg"]
        with pytest.raises(ObjectMissingError):
            await s.get("segments/0000000000000002.seg")
    # What landed, read by a client that shares no code with ours, under the prefix.
    assert landed(provider, t.bucket, "some/prefix/segments/0000000000000001.seg") == data


async def test_large_bodies_land_whole_both_ways_of_putting(
    provider: LocalProvider, make_target: MakeTarget
) -> None:
    """Bodies of a segment's size are sent without a copy (objectstore._Body): every byte
    must still arrive, by a plain and by a conditional put, and a retry must resend all."""
    t = make_target(provider, prefix="big")
    data = os.urandom(5 << 20)
    async with ObjectStore(t) as s:
        await s.put("segments/0000000000000001.seg", data)
        assert await s.put_new("segments/0000000000000002.seg", data[::-1])
        assert not await s.put_new("segments/0000000000000002.seg", data)
    for key, want in (("1", data), ("2", data[::-1])):
        assert landed(provider, t.bucket, f"big/segments/000000000000000{key}.seg") == want


async def test_list_pages_through_many_objects(
    provider: LocalProvider, make_target: MakeTarget
) -> None:
    t = make_target(provider)
    m = minio_for(provider)
    import io

    for i in range(1005):  # more than one 1000-key page
        m.put_object(t.bucket, f"vol/many/{i:05d}", io.BytesIO(b"x"), 1)
    async with ObjectStore(t) as s:
        keys = [o.key async for o in s.list("many/")]
        after = [o.key async for o in s.list("many/", start_after="many/00996")]
    assert keys == [f"many/{i:05d}" for i in range(1005)]
    assert after == [f"many/{i:05d}" for i in range(997, 1005)]


async def test_create_if_absent_never_overwrites(
    provider: LocalProvider, make_target: MakeTarget
) -> None:
    t = make_target(provider)
    async with ObjectStore(t) as s:
        assert await s.create_if_absent("volume.json", b"first") is True
        assert await s.create_if_absent("volume.json", b"second") is False
        assert await s.get("volume.json") == b"first"
        # The probe leaves nothing behind but what it may leave: .probe/ only.
        keys = [o.key async for o in s.list("")]
        assert [k for k in keys if not k.startswith(".probe/")] == ["volume.json"]


async def test_conditional_create_support_is_detected(
    seaweedfs: LocalProvider, rclone: LocalProvider, make_target: MakeTarget
) -> None:
    async with ObjectStore(make_target(seaweedfs)) as s:
        assert await s.supports_conditional_create() is True
    async with ObjectStore(make_target(rclone)) as s:
        # rclone serve s3 ignores If-None-Match; the fallback path must be chosen.
        assert await s.supports_conditional_create() is False


async def test_wrong_secret_is_auth_error_without_the_secret(
    provider: LocalProvider, make_target: MakeTarget
) -> None:
    bad = "WRONG-" + uuid.uuid4().hex
    t = make_target(provider, secret=bad)
    async with ObjectStore(t, max_attempts=2) as s:
        with pytest.raises(AuthError) as info:
            await s.check_bucket()
    msg = str(info.value)
    assert "'t1'" in msg and "credentials" in msg
    assert bad not in msg and provider.secret_key not in msg


async def test_missing_bucket(provider: LocalProvider, make_target: MakeTarget) -> None:
    t = make_target(provider, bucket=f"missing-{uuid.uuid4().hex[:10]}")
    async with ObjectStore(t) as s:
        with pytest.raises(BucketMissingError, match="does not exist"):
            await s.check_bucket()


async def test_unreachable_endpoint_retries_then_fails(
    rclone: LocalProvider, make_target: MakeTarget
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    good = make_target(rclone, bucket="unused-bucket")
    t = good.model_copy(update={"endpoint": f"http://127.0.0.1:{port}"})
    async with ObjectStore(t, max_attempts=3, backoff_base=0.01, connect_timeout=1) as s:
        with pytest.raises(NetworkError, match="after 3 attempts"):
            await s.put("x", b"y")


# -- small PUTs: signed by s3put, sent without botocore ----------------------------------


@pytest.mark.parametrize("path_style", [True, False])
@pytest.mark.parametrize(
    "key", ["vol/tails/0000000000000001/0000000000000040-0000000000001040.part", "a b/ü~+=&.x"]
)
def test_s3put_signs_as_botocore_does(path_style: bool, key: str) -> None:
    import datetime

    import botocore.auth
    from botocore.awsrequest import AWSRequest
    from botocore.config import Config as BotoConfig
    from botocore.credentials import Credentials

    from vaultsync.store import s3put

    now = datetime.datetime(2026, 12, 4, 14, 0, 0, tzinfo=datetime.UTC)
    url, host, path = s3put.object_url("https://s3.example.net:9000", "bucket1", key, path_style)
    ours = s3put.sign("PUT", host, path, {"Content-MD5": "abc=="}, "AK", "SK", "eu-west-3", now)
    req = AWSRequest(method="PUT", url=url, headers={"Content-MD5": "abc=="}, data=b"x")
    req.context["client_config"] = BotoConfig(s3={"payload_signing_enabled": False})
    auth = botocore.auth.S3SigV4Auth(Credentials("AK", "SK"), "s3", "eu-west-3")
    real = botocore.auth.get_current_datetime
    botocore.auth.get_current_datetime = lambda *a, **k: now.replace(tzinfo=None)  # type: ignore[assignment]
    try:
        auth.add_auth(req)
    finally:
        botocore.auth.get_current_datetime = real
    assert ours["Authorization"] == req.headers["Authorization"]
    assert ours["x-amz-date"] == req.headers["X-Amz-Date"]


async def test_small_puts_land_byte_for_byte_with_any_key(
    provider: LocalProvider, make_target: MakeTarget
) -> None:
    t = make_target(provider, prefix="odd prefix")
    bodies = {"tails/0000000000000001/a-b.part": os.urandom(5000), "x y/ü~+=&.json": b"{}"}
    bodies["empty"] = b""
    async with ObjectStore(t) as s:
        for key, data in bodies.items():
            await s.put(key, data)
        for key, data in bodies.items():
            assert await s.get(key) == data
    for key, data in bodies.items():
        assert landed(provider, t.bucket, f"odd prefix/{key}") == data


async def test_small_put_refusals_map_as_botocore_ones_do(
    provider: LocalProvider, make_target: MakeTarget
) -> None:
    bad = "WRONG-" + uuid.uuid4().hex
    async with ObjectStore(make_target(provider, secret=bad), max_attempts=2) as s:
        with pytest.raises(AuthError) as info:
            await s.put("k", b"v")
    assert bad not in str(info.value)
    # A missing bucket: whatever botocore's PUT makes of it (SeaweedFS creates the bucket,
    # rclone refuses), the small PUT makes the same.
    outcomes = []
    for small in (True, False):
        gone = make_target(provider, bucket=f"missing-{uuid.uuid4().hex[:10]}")
        async with ObjectStore(gone, max_attempts=2) as s:
            try:
                await s.put("k", b"v" if small else b"v" * (SMALL_PUT + 1))
                outcomes.append("stored")
            except (BucketMissingError, ObjectMissingError) as e:
                outcomes.append(type(e).__name__)
    assert outcomes[0] == outcomes[1], outcomes
