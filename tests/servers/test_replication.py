"""Replication through a real mount to real S3 servers, inspected with an independent client.

Every bucket is read back with the MinIO SDK (not vaultsync's own store) and
checked against docs/format.md §2: segments 1..N without a gap, each a sealed
segment of this volume, LSNs contiguous across segments, every chunk a
transaction refers to stored at or before that transaction (consistent
prefix), and the files rebuilt from the bucket alone equal what was written.
Faults are injected with tests/faultproxy.py between the daemon and a server.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import socket
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from minio import Minio
from minio.error import S3Error

from tests.support.faultproxy import FaultProxy
from tests.support.mounting import Mount
from tests.support.targets import target_block
from vaultsync.commands.local_servers import LocalProvider
from vaultsync.format.bucket_layout import (
    parse_checkpoint_key,
    parse_segment_key,
    parse_tail_key,
    segment_key,
    tail_key,
)
from vaultsync.format.chunks import Codec
from vaultsync.format.header import VolumeHeader, new_header
from vaultsync.format.segment import (
    Record,
    RecordType,
    SegmentHeader,
    encode_record,
    scan_segment,
    seal_payload,
)
from vaultsync.format.txn import (
    DropDirent,
    DropInode,
    SetBlocks,
    SetDirent,
    SetInode,
    Transaction,
    TruncateBlocks,
)

PREFIX = "v/"
VOLUME_TOML = 'segment_size = "1MiB"\nsegment_max_age = 0.5\n'
SMALL = 64 * 1024  # the default chunk size: a file up to this is one chunk


# -- independent bucket reader ---------------------------------------------------------------


def _minio(p: LocalProvider) -> Minio:
    host = p.endpoint.split("://", 1)[1]
    return Minio(host, access_key=p.access_key, secret_key=p.secret_key, secure=False)


def _get(mc: Minio, bucket: str, key: str) -> bytes:
    resp = mc.get_object(bucket, key)
    try:
        return bytes(resp.read())
    finally:
        resp.close()
        resp.release_conn()


@dataclass
class ObjInfo:
    etag: str
    last_modified: Any
    size: int


def list_objects(mc: Minio, bucket: str) -> dict[str, ObjInfo]:
    """Every object under the volume prefix, keyed relative to it."""
    out = {}
    for o in mc.list_objects(bucket, prefix=PREFIX, recursive=True):
        name = o.object_name
        assert name is not None
        if name.endswith("/"):
            continue  # a directory marker (rclone over a filesystem)
        out[name[len(PREFIX) :]] = ObjInfo(str(o.etag), o.last_modified, int(o.size or 0))
    return out


@dataclass
class History:
    """What one target holds, parsed and checked."""

    header: VolumeHeader
    sealed: int  # number of sealed segments
    last_lsn: int
    tail_bytes: int  # bytes of the open segment held as contiguous tail pieces
    chunks: dict[bytes, Any] = field(default_factory=dict)  # id -> CHUNK record
    txns: list[tuple[int, Transaction]] = field(default_factory=list)
    keys: dict[str, ObjInfo] = field(default_factory=dict)

    def codec(self) -> Codec:
        return Codec(self.header.compression_level)

    def holds_content(self, data: bytes) -> bool:
        """Each block of `data` is a CHUNK decoding to exactly it, and a transaction
        that points a block at it is held too."""
        codec, cs = self.codec(), self.header.chunk_size
        referenced = {
            b[1]
            for _, t in self.txns
            for op in t.ops
            if isinstance(op, SetBlocks)
            for b in op.blocks
        }
        for off in range(0, max(len(data), 1), cs):
            block = data[off : off + cs]
            cid = codec.chunk_id(block)
            rec = self.chunks.get(cid)
            if rec is None or codec.decode_chunk(rec, cid) != block or cid.hex() not in referenced:
                return False
        return True

    def files(self) -> dict[str, bytes]:
        """Rebuild every regular file (path -> content) from the transactions alone."""
        inodes: dict[int, SetInode] = {}
        dirents: dict[tuple[int, bytes], int] = {}
        blocks: dict[int, dict[int, tuple[str | None, int]]] = {}
        for _, t in self.txns:
            for op in t.ops:
                if isinstance(op, SetInode):
                    inodes[op.ino] = op
                elif isinstance(op, DropInode):
                    inodes.pop(op.ino, None)
                    blocks.pop(op.ino, None)
                elif isinstance(op, SetDirent):
                    dirents[(op.parent, op.name)] = op.ino
                elif isinstance(op, DropDirent):
                    dirents.pop((op.parent, op.name), None)
                elif isinstance(op, SetBlocks):
                    m = blocks.setdefault(op.ino, {})
                    for bno, cid, length in op.blocks:
                        m[bno] = (cid, length)
                elif isinstance(op, TruncateBlocks):
                    m = blocks.setdefault(op.ino, {})
                    for bno in [b for b in m if b >= op.first]:
                        del m[bno]
        codec, cs = self.codec(), self.header.chunk_size
        out: dict[str, bytes] = {}

        def walk(ino: int, path: str) -> None:
            for (parent, name), child in sorted(dirents.items()):
                if parent != ino:
                    continue
                inode = inodes.get(child)
                assert inode is not None, f"dirent {path}/{name!r} -> missing inode {child}"
                p = f"{path}/{name.decode()}" if path else name.decode()
                if stat.S_ISDIR(inode.mode):
                    walk(child, p)
                elif stat.S_ISREG(inode.mode):
                    buf = bytearray(inode.size)
                    for bno, (cid, length) in blocks.get(child, {}).items():
                        if cid is None or bno * cs >= inode.size:
                            continue
                        rec = self.chunks[bytes.fromhex(cid)]
                        data = codec.decode_chunk(rec, bytes.fromhex(cid))[:length]
                        end = min(inode.size, bno * cs + len(data))
                        buf[bno * cs : end] = data[: end - bno * cs]
                    out[p] = bytes(buf)

        walk(1, "")
        return out


class BucketReader:
    """Reads one target's bucket with MinIO; sealed segments are cached (immutable)."""

    def __init__(self, provider: LocalProvider, bucket: str, volume_id: bytes) -> None:
        self.mc = _minio(provider)
        self.bucket = bucket
        self.volume_id = volume_id
        self._cache: dict[tuple[str, str], bytes] = {}

    def read(self, *, expect_no_tails: bool = False) -> History:
        """A consistent view; retried when the writer moves on under our feet."""
        for _ in range(10):
            try:
                return self._read_once(expect_no_tails)
            except S3Error as e:
                if e.code != "NoSuchKey":
                    raise
                time.sleep(0.05)  # a tail piece deleted after its segment landed: look again
        raise AssertionError(f"bucket {self.bucket} kept changing while being read")

    def segment(self, key: str, info: ObjInfo) -> bytes:
        k = (key, info.etag)
        if k not in self._cache:
            self._cache[k] = _get(self.mc, self.bucket, PREFIX + key)
        return self._cache[k]

    def _read_once(self, expect_no_tails: bool) -> History:
        keys = list_objects(self.mc, self.bucket)
        header = VolumeHeader.from_bytes(_get(self.mc, self.bucket, PREFIX + "volume.json"))
        assert header.volume_id == self.volume_id, "bucket header names another volume"
        segs: dict[int, str] = {}
        tails: dict[int, list[tuple[int, int, str]]] = {}
        checkpoints: list[int] = []
        for k in keys:
            n = parse_segment_key(k)
            t = parse_tail_key(k)
            c = parse_checkpoint_key(k)
            if n is not None:
                segs[n] = k
            elif t is not None:
                tails.setdefault(t[0], []).append((t[1], t[2], k))
            elif c is not None:
                checkpoints.append(c[0])
            else:
                assert k == "volume.json" or k.startswith(".probe/"), f"unexpected key {k!r}"
        n_sealed = len(segs)
        assert sorted(segs) == list(range(1, n_sealed + 1)), f"gap in segments: {sorted(segs)}"
        if expect_no_tails:
            assert not tails, f"tail pieces left behind: {sorted(tails)}"
        for segno in tails:
            assert segno <= n_sealed + 1, f"tail pieces of segment {segno} beyond the next one"
        hist = History(header, n_sealed, 0, 0, keys=keys)
        buffers: list[tuple[int, bytes, bool]] = [
            (n, self.segment(segs[n], keys[segs[n]]), True) for n in range(1, n_sealed + 1)
        ]
        # The open segment: pieces chaining from 0 without a gap (§2.2).
        end, parts = 0, []
        for start, stop, k in sorted(tails.get(n_sealed + 1, [])):
            if start > end:
                break
            if stop > end:
                data = _get(self.mc, self.bucket, PREFIX + k)
                assert len(data) == stop - start, f"{k}: {len(data)} bytes"
                parts.append(data[end - start :])
                end = stop
        if end:
            buffers.append((n_sealed + 1, b"".join(parts), False))
            hist.tail_bytes = end
        pending: dict[bytes, Any] = {}
        sealed_lsn = 0
        for segno, buf, sealed in buffers:
            where = f"{self.bucket}: segment {segno}{'' if sealed else ' (tail)'}"
            scan = scan_segment(buf, where)
            assert scan.header.volume_id == self.volume_id, f"{where}: foreign volume id"
            assert scan.header.segment_no == segno, f"{where}: numbered {scan.header.segment_no}"
            assert scan.stop_reason is None, f"{where}: {scan.stop_reason}"
            assert scan.sealed == sealed, f"{where}: sealed={scan.sealed}"
            if not sealed:
                assert scan.records, f"{where}: tail without records"
                assert scan.records[-1][1].type is RecordType.TXN, f"{where}: ends mid-txn"
            for off, rec in scan.records:
                if rec.type is RecordType.CHUNK:
                    assert rec.lsn == hist.last_lsn + 1, f"{where}@{off}: chunk of LSN {rec.lsn}"
                    cid = rec.payload[:32]
                    assert cid not in hist.chunks and cid not in pending, "chunk stored twice"
                    pending[cid] = rec
                elif rec.type is RecordType.TXN:
                    assert rec.lsn == hist.last_lsn + 1, (
                        f"{where}@{off}: LSN {rec.lsn} after {hist.last_lsn}"
                    )
                    assert all(c.lsn == rec.lsn for c in pending.values())
                    hist.chunks.update(pending)
                    pending = {}
                    txn = Transaction.decode(hist.codec().decode_txn(rec))
                    for op in txn.ops:
                        if isinstance(op, SetBlocks):
                            for _bno, cid_hex, _len in op.blocks:
                                assert cid_hex is None or bytes.fromhex(cid_hex) in hist.chunks, (
                                    f"{where}: LSN {rec.lsn} refers to chunk {cid_hex[:16]} "
                                    "that the target does not hold before it"
                                )
                    hist.txns.append((rec.lsn, txn))
                    hist.last_lsn = rec.lsn
                else:
                    assert rec.lsn == hist.last_lsn, f"{where}: seal says {rec.lsn}"
            assert not pending, f"{where}: chunks without their transaction"
            if sealed:
                sealed_lsn = hist.last_lsn
        # A checkpoint describes the catalog at its LSN: visible only once every
        # transaction up to it is here in whole segments (format.md §2.5).
        for lsn in checkpoints:
            assert lsn <= sealed_lsn, f"checkpoint of LSN {lsn} ahead of segments to {sealed_lsn}"
        if hist.txns:
            assert hist.txns[0][0] == 1, "history does not start at LSN 1"
        return hist


# -- volumes, mounts and status ------------------------------------------------------------


def _fresh_bucket(p: LocalProvider) -> str:
    name = f"r-{uuid.uuid4().hex[:16]}"
    p.create_bucket(name)
    return name


def _replication_toml(**kw: float) -> str:
    return "\n[replication]\n" + "".join(f"{k} = {v}\n" for k, v in kw.items())


def _volume_id(m: Mount) -> bytes:
    return uuid.UUID(json.loads((m.state_dir / "volume.json").read_text())["volume_id"]).bytes


def status(m: Mount) -> dict[str, Any]:
    for _ in range(50):
        try:
            st: dict[str, Any] = json.loads((m.state_dir / "replication.json").read_text())
            return st
        except (OSError, ValueError):
            time.sleep(0.05)
    raise AssertionError("no readable replication.json")


def wait_status(
    m: Mount, target: str, pred: Callable[[dict[str, Any]], bool], timeout: float, what: str
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    st: dict[str, Any] = {}
    while time.monotonic() < deadline:
        st = status(m)
        t: dict[str, Any] | None = st.get("targets", {}).get(target)
        # Only the running daemon's own status counts (not one a killed daemon left behind).
        if t is not None and (m.proc is None or st.get("pid") == m.proc.pid) and pred(t):
            return t
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}: {json.dumps(st, indent=1)[:3000]}")


def write_file(path: Path, data: bytes, *, fsync: bool = True) -> float:
    """Write `data` to `path`; return how long the fsync took (0 without one)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view[: 1 << 20]) :]
        if not fsync:
            return 0.0
        t0 = time.monotonic()
        os.fsync(fd)
        return time.monotonic() - t0
    finally:
        os.close(fd)


@pytest.fixture
def proxies() -> Iterator[list[FaultProxy]]:
    made: list[FaultProxy] = []
    yield made
    for p in made:
        p.stop()


@pytest.fixture
def mounts(proxies: list[FaultProxy]) -> Iterator[list[Mount]]:
    """Mounts made by a test; unmounted (through healed proxies) before the proxies stop."""
    made: list[Mount] = []
    yield made
    for p in proxies:
        p.passthrough()
    for m in made:
        m.cleanup()


def _mount(mounts: list[Mount], root: Path, toml: str) -> Mount:
    m = Mount.create(root, VOLUME_TOML + toml)
    mounts.append(m)
    m.start()
    return m


# -- the proxy itself --------------------------------------------------------------------------


def _http_ping(port: int, timeout: float = 2.0) -> bytes:
    """One raw HTTP request through the proxy; the first bytes of the answer (b"" = closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        return s.recv(100)


def test_faultproxy_modes(rclone: LocalProvider) -> None:
    """The fault injector does what it says, or the tests below prove nothing."""
    with FaultProxy.for_url(rclone.endpoint) as px:
        mc = Minio(f"127.0.0.1:{px.port}", rclone.access_key, rclone.secret_key, secure=False)
        bucket = _fresh_bucket(rclone)
        mc.put_object(bucket, "k", io.BytesIO(b"x" * 1000), 1000)
        assert _get(mc, bucket, "k") == b"x" * 1000
        assert _http_ping(px.port).startswith(b"HTTP/1.1")

        px.latency(150)
        t0 = time.monotonic()
        _get(mc, bucket, "k")
        assert time.monotonic() - t0 >= 0.3  # a chunk each way at least

        px.outage()
        with pytest.raises(OSError):
            if _http_ping(px.port) == b"":
                raise ConnectionResetError  # closed without an answer: refused all the same
        assert px.stats.refused >= 1
        assert px.wait_no_connections()  # the pooled MinIO connection was cut

        px.blackhole()
        with socket.create_connection(("127.0.0.1", px.port), timeout=2) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            s.settimeout(0.5)
            with pytest.raises(TimeoutError):
                s.recv(100)
            px.passthrough()  # the partition heals: the held request goes through
            s.settimeout(5)
            assert s.recv(100).startswith(b"HTTP/1.1")

        px.resets(after_bytes=10_000, budget=1)
        big = os.urandom(300_000)
        fresh = Minio(f"127.0.0.1:{px.port}", rclone.access_key, rclone.secret_key, secure=False)
        with contextlib.suppress(Exception):
            fresh.put_object(bucket, "big", io.BytesIO(big), len(big))
        assert px.reset_budget == 0 and px.stats.cut >= 1
        px.resets_after_headers(budget=1)
        with pytest.raises(OSError):
            if _http_ping(px.port) == b"":
                raise ConnectionResetError
        assert px.reset_budget == 0
        assert _http_ping(px.port).startswith(b"HTTP/1.1")  # budget spent: passes again
        px.passthrough()
        fresh.put_object(bucket, "big", io.BytesIO(big), len(big))
        assert _get(mc, bucket, "big") == big
    assert px.wait_no_connections()


def _segment(header: VolumeHeader, segno: int, records: list[Record], *, seal: bool) -> bytes:
    out = [SegmentHeader(header.volume_id, segno, 0, 1).pack()]
    out += [encode_record(r) for r in records]
    if seal:
        last = max((r.lsn for r in records if r.type is RecordType.TXN), default=0)
        out.append(
            encode_record(Record(RecordType.SEAL, last, 0, seal_payload(len(records), last)))
        )
    return b"".join(out)


def test_bucket_checker_catches_broken_histories(rclone: LocalProvider) -> None:
    """The checker used below must reject what the consistent-prefix rule forbids."""
    header = new_header("t", 4096, 0)
    codec = Codec(0)
    root = SetInode(ino=1, mode=stat.S_IFDIR | 0o755, nlink=2)

    def txn(lsn: int, *ops: Any) -> Record:
        return codec.txn_record(Transaction(tuple(ops)).encode(), lsn, 0)

    def file_txn(lsn: int, ino: int, name: bytes, cid: bytes, n: int) -> Record:
        return txn(
            lsn,
            SetInode(ino=ino, mode=stat.S_IFREG | 0o644, size=n),
            SetDirent(parent=1, name=name, ino=ino),
            SetBlocks(ino=ino, blocks=((0, cid.hex(), n),)),
        )

    data = [os.urandom(3000), os.urandom(2000)]
    c1, r1 = codec.chunk_record(data[0], 2, 0)
    c2, r2 = codec.chunk_record(data[1], 3, 0)
    good = {
        segment_key(1): _segment(header, 1, [txn(1, root)], seal=True),
        segment_key(2): _segment(header, 2, [r1, file_txn(2, 2, b"a", c1, 3000)], seal=True),
    }
    tail = _segment(header, 3, [r2, file_txn(3, 3, b"b", c2, 2000)], seal=False)
    cut = len(tail) - 10
    half = _segment(header, 3, [r2], seal=False)
    cases: dict[str, tuple[dict[str, bytes], str | None]] = {
        "good": ({**good, tail_key(3, 0, len(tail)): tail}, None),
        # A piece that does not chain from offset 0 is not read.
        "unchained tail": ({**good, tail_key(3, 64, len(tail)): tail[64:]}, None),
        "gap": ({segment_key(1): good[segment_key(1)], segment_key(3): tail}, "gap in segments"),
        "metadata before data": (
            {
                **good,
                segment_key(3): _segment(
                    header, 3, [file_txn(3, 3, b"b", c2, 2000), r2], seal=True
                ),
            },
            "does not hold before it",
        ),
        "lsn skipped": (
            {**good, segment_key(3): _segment(header, 3, [txn(4, root)], seal=True)},
            "LSN 4 after 2",
        ),
        "tail ends mid-transaction": (
            {**good, tail_key(3, 0, len(half)): half},
            "ends mid-txn",
        ),
        "torn tail": ({**good, tail_key(3, 0, cut): tail[:cut]}, "incomplete record"),
        "foreign segment": (
            {**good, segment_key(3): _segment(new_header("x", 4096, 0), 3, [], seal=True)},
            "foreign volume id",
        ),
    }
    mc = _minio(rclone)
    for case, (objects, error) in cases.items():
        bucket = _fresh_bucket(rclone)
        for key, blob in {"volume.json": header.to_bytes(), **objects}.items():
            mc.put_object(bucket, PREFIX + key, io.BytesIO(blob), len(blob))
        reader = BucketReader(rclone, bucket, header.volume_id)
        if error is None:
            hist = reader.read()
            files = hist.files()
            assert files["a"] == data[0], case
            assert files.get("b") == (data[1] if case == "good" else None), case
        else:
            with pytest.raises(AssertionError, match=error):
                reader.read()


# -- a. a sync and an async target, fault-free ------------------------------------------------


def _check_final(
    reader: BucketReader, m: Mount, expected: dict[str, bytes], *, sync: bool
) -> History:
    """After umount: the whole history, byte for byte the local journal, rebuilds the files."""
    hist = reader.read(expect_no_tails=True)
    journal = sorted((m.state_dir / "journal").glob("*.seg"))
    assert hist.sealed >= 1 and hist.sealed in (len(journal), len(journal) - 1)
    for n in range(1, hist.sealed + 1):
        key = f"segments/{n:016x}.seg"
        local = (m.state_dir / "journal" / f"{n:016x}.seg").read_bytes()
        assert reader.segment(key, hist.keys[key]) == local, f"{key} differs from the journal"
    files = hist.files()
    for path, data in expected.items():
        assert path in files, f"{path} missing from bucket {reader.bucket} (sync={sync})"
        assert files[path] == data, f"{path} differs in bucket {reader.bucket}"
    assert set(files) == set(expected), set(files) ^ set(expected)
    return hist


def test_sync_and_async_targets_hold_a_consistent_prefix(
    tmp_path: Path, seaweedfs: LocalProvider, rclone: LocalProvider, mounts: list[Mount]
) -> None:
    sw_bucket, rc_bucket = _fresh_bucket(seaweedfs), _fresh_bucket(rclone)
    toml = (
        _replication_toml(probe_interval=0.5)
        + target_block("sw", seaweedfs, sw_bucket, "sync")
        + target_block("rc", rclone, rc_bucket, "async")
    )
    m = _mount(mounts, tmp_path / "vol", toml)
    vid = _volume_id(m)
    sw, rc = BucketReader(seaweedfs, sw_bucket, vid), BucketReader(rclone, rc_bucket, vid)
    mnt = m.mountpoint
    expected: dict[str, bytes] = {}
    (mnt / "d").mkdir()
    for i in range(40):
        data = os.urandom(1 + (i * 7919) % SMALL)
        name = f"d/small{i:02d}" if i % 2 else f"small{i:02d}"
        write_file(mnt / name, data)
        expected[name] = data
        if i % 6 == 0:
            # The sync target holds every fsynced byte as soon as fsync returns.
            hist = sw.read()
            assert hist.holds_content(data), f"fsynced {name} is not at the sync target"
    big = os.urandom(3 * 1024 * 1024 + 4321)
    write_file(mnt / "big", big)
    expected["big"] = big
    last = os.urandom(SMALL)
    write_file(mnt / "last", last)
    expected["last"] = last
    hist = sw.read()
    assert hist.holds_content(big) and hist.holds_content(last)
    assert hist.sealed >= 2
    # Rewrites, deletes, files that are never fsynced: umount flushes and ships them.
    write_file(mnt / "small00", b"rewritten", fsync=False)
    expected["small00"] = b"rewritten"
    os.unlink(mnt / "d" / "small01")
    del expected["d/small01"]
    os.rename(mnt / "small02", mnt / "d" / "moved")
    expected["d/moved"] = expected.pop("small02")
    for i in range(5):
        write_file(mnt / f"lazy{i}", bytes([i]) * 5000, fsync=False)
        expected[f"lazy{i}"] = bytes([i]) * 5000
    # The async target keeps up with no fsync at all, and never writes tails.
    st = wait_status(m, "rc", lambda t: t["lag_lsn"] == 0, 30, "the async target to catch up")
    assert st["effective_mode"] == "async" and st["health"] == "healthy"
    mid = rc.read()
    assert mid.tail_bytes == 0 and not any(k.startswith("tails/") for k in mid.keys)
    st = status(m)["targets"]["sw"]
    assert st["effective_mode"] == "sync" and st["health"] == "healthy", st
    m.umount()
    h_sw = _check_final(sw, m, expected, sync=True)
    h_rc = _check_final(rc, m, expected, sync=False)
    assert h_sw.sealed == h_rc.sealed and h_sw.last_lsn == h_rc.last_lsn


# -- b. faults between the daemon and a sync target ----------------------------------------------


def _proxied_sync_volume(
    tmp_path: Path,
    provider: LocalProvider,
    mounts: list[Mount],
    proxies: list[FaultProxy],
    *,
    on_failure: str,
    mode: str = "sync",
    volume_toml: str = VOLUME_TOML,
    **replication: float,
) -> tuple[Mount, FaultProxy, BucketReader]:
    px = FaultProxy.for_url(provider.endpoint)
    proxies.append(px)
    bucket = _fresh_bucket(provider)
    toml = _replication_toml(probe_interval=0.5, **replication) + target_block(
        "t", provider, bucket, mode, endpoint=px.endpoint, on_failure=on_failure
    )
    m = Mount.create(tmp_path / "vol", volume_toml + toml)
    mounts.append(m)
    m.start()
    # The reader goes to the server directly, never through the proxy.
    return m, px, BucketReader(provider, bucket, _volume_id(m))


def test_degrade_outage_keeps_writing_then_heals_by_itself(
    tmp_path: Path,
    rclone: LocalProvider,
    mounts: list[Mount],
    proxies: list[FaultProxy],
) -> None:
    m, px, reader = _proxied_sync_volume(tmp_path, rclone, mounts, proxies, on_failure="degrade")
    mnt, expected = m.mountpoint, {}
    for i in range(5):
        expected[f"before{i}"] = os.urandom(20_000)
        write_file(mnt / f"before{i}", expected[f"before{i}"])
    assert reader.read().holds_content(expected["before4"])

    px.outage()
    t_out = time.monotonic()
    latencies = []
    i = 0
    while time.monotonic() - t_out < 4 or i < 10:
        data = os.urandom(30_000 + i)
        latencies.append(write_file(mnt / f"during{i}", data))
        expected[f"during{i}"] = data
        i += 1
    big = os.urandom(2 * 1024 * 1024 + 5)
    latencies.append(write_file(mnt / "big", big))
    expected["big"] = big
    assert max(latencies) < 6.0, f"fsync stalled during the outage: {latencies}"
    st = wait_status(m, "t", lambda t: t["health"] == "down", 10, "the target to be down")
    assert st["reason"] and st["last_error"], st
    assert st["effective_mode"] == "async" and st["lag_lsn"] > 0, st
    # Once it is known down, an fsync costs what a local one does.
    t0 = time.monotonic()
    for j in range(5):
        expected[f"down{j}"] = os.urandom(10_000)
        write_file(mnt / f"down{j}", expected[f"down{j}"])
    assert time.monotonic() - t0 < 5.0
    # What the target holds meanwhile is still a consistent prefix (the reader checks it).
    assert not reader.read().holds_content(expected["down4"])

    px.passthrough()
    st = wait_status(
        m,
        "t",
        lambda t: t["health"] == "healthy" and t["lag_lsn"] == 0 and t["effective_mode"] == "sync",
        45,
        "the target to catch up by itself",
    )
    assert st["queue_segments"] == 0 and st["retries"] > 0, st
    healed = reader.read()
    for name in ("big", "down4", f"during{i - 1}"):
        assert healed.holds_content(expected[name]), name
    # Back in sync: the next fsync waits for the target again.
    expected["after"] = os.urandom(SMALL)
    write_file(mnt / "after", expected["after"])
    assert reader.read().holds_content(expected["after"])
    m.umount()
    _check_final(reader, m, expected, sync=True)


def test_degraded_sync_target_says_so_without_waiting_for_an_fsync(
    tmp_path: Path,
    rclone: LocalProvider,
    mounts: list[Mount],
    proxies: list[FaultProxy],
) -> None:
    """A down sync target under `degrade` no longer counts for fsync: the status says so at
    once, not only after the next fsync happened to notice."""
    m, px, _ = _proxied_sync_volume(tmp_path, rclone, mounts, proxies, on_failure="degrade")
    write_file(m.mountpoint / "a", b"a")
    px.outage()
    wait_status(m, "t", lambda t: t["health"] == "down", 10, "the target to be down")
    time.sleep(1.1)  # one more status period
    st = status(m)["targets"]["t"]
    assert st["health"] == "down" and st["effective_mode"] == "async", st
    px.passthrough()
    wait_status(
        m, "t", lambda t: t["effective_mode"] == "sync" and t["lag_lsn"] == 0, 30, "back in sync"
    )


def test_degrade_partition_bounds_fsync_then_heals(
    tmp_path: Path,
    rclone: LocalProvider,
    mounts: list[Mount],
    proxies: list[FaultProxy],
) -> None:
    """A partition (nothing answers, nothing is refused) is only noticed by timeouts; under
    `degrade` fsync must still come back within a few probe timeouts, not hang."""
    m, px, reader = _proxied_sync_volume(tmp_path, rclone, mounts, proxies, on_failure="degrade")
    mnt, expected = m.mountpoint, {"a": os.urandom(1000)}
    write_file(mnt / "a", expected["a"])
    px.blackhole()
    try:
        latencies = []
        for i in range(3):
            expected[f"p{i}"] = os.urandom(1000 + i)
            latencies.append(write_file(mnt / f"p{i}", expected[f"p{i}"]))
        # Three failed probes of at most 5 s each, plus slack.
        assert max(latencies) < 20, f"fsync stalled {max(latencies):.1f}s in a partition"
        st = wait_status(m, "t", lambda t: t["health"] == "down", 5, "the target to be down")
        assert st["effective_mode"] == "async", st
    finally:
        px.passthrough()
    wait_status(
        m, "t", lambda t: t["effective_mode"] == "sync" and t["lag_lsn"] == 0, 60, "catch-up"
    )
    m.umount()
    _check_final(reader, m, expected, sync=True)


def test_block_outage_fsync_fails_with_eio_then_recovers(
    tmp_path: Path,
    seaweedfs: LocalProvider,
    mounts: list[Mount],
    proxies: list[FaultProxy],
) -> None:
    m, px, reader = _proxied_sync_volume(
        tmp_path, seaweedfs, mounts, proxies, on_failure="block", block_timeout=2
    )
    mnt = m.mountpoint
    first = os.urandom(40_000)
    write_file(mnt / "first", first)
    assert reader.read().holds_content(first)

    px.outage()
    data = os.urandom(50_000)
    fd = os.open(mnt / "blocked", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        t0 = time.monotonic()
        with pytest.raises(OSError) as exc:
            os.fsync(fd)
        took = time.monotonic() - t0
        assert exc.value.errno == errno.EIO, exc.value
        assert 1.5 <= took <= 2 + 3, f"fsync gave up after {took:.2f}s, block_timeout is 2"
        assert not reader.read().holds_content(data)
        st = status(m)["targets"]["t"]
        assert st["health"] in ("degraded", "down") and st["effective_mode"] == "sync", st
        # Reading and writing without fsync carry on.
        assert (mnt / "first").read_bytes() == first

        px.passthrough()
        deadline = time.monotonic() + 30
        while True:
            try:
                os.fsync(fd)
                break
            except OSError as e:
                assert e.errno == errno.EIO
                assert time.monotonic() < deadline, "fsync kept failing after the recovery"
        assert reader.read().holds_content(data), "fsync succeeded but the target lacks the data"
    finally:
        os.close(fd)
    second = os.urandom(40_000)
    write_file(mnt / "second", second)
    assert reader.read().holds_content(second)
    m.umount()
    _check_final(reader, m, {"first": first, "blocked": data, "second": second}, sync=True)


def test_slow_target_is_still_correct(
    tmp_path: Path,
    seaweedfs: LocalProvider,
    mounts: list[Mount],
    proxies: list[FaultProxy],
) -> None:
    m, px, reader = _proxied_sync_volume(tmp_path, seaweedfs, mounts, proxies, on_failure="block")
    px.latency(25)
    mnt, expected = m.mountpoint, {}
    for i in range(6):
        expected[f"f{i}"] = os.urandom(10_000 * (i + 1))
        write_file(mnt / f"f{i}", expected[f"f{i}"])
        if i % 3 == 2:
            assert reader.read().holds_content(expected[f"f{i}"])
    expected["big"] = os.urandom(1024 * 1024 + 3)
    write_file(mnt / "big", expected["big"])
    assert reader.read().holds_content(expected["big"])
    st = status(m)["targets"]["t"]
    assert st["health"] != "down" and st["effective_mode"] == "sync", st
    assert px.stats.bytes_up > 1024 * 1024
    m.umount()
    _check_final(reader, m, expected, sync=True)


def test_resets_mid_upload_lose_nothing(
    tmp_path: Path,
    rclone: LocalProvider,
    mounts: list[Mount],
    proxies: list[FaultProxy],
) -> None:
    m, px, reader = _proxied_sync_volume(tmp_path, rclone, mounts, proxies, on_failure="block")
    mnt, expected = m.mountpoint, {}
    # Every connection that has sent 32 KiB is reset, eight times over: segment uploads
    # and larger tail pieces die mid-body and must be retried.
    px.resets(after_bytes=32 * 1024, budget=8)
    for i in range(6):
        expected[f"f{i}"] = os.urandom(SMALL)
        write_file(mnt / f"f{i}", expected[f"f{i}"])
    expected["big"] = os.urandom(3 * 1024 * 1024 + 77)
    write_file(mnt / "big", expected["big"])
    hist = reader.read()
    for name, data in expected.items():
        assert hist.holds_content(data), name
    assert px.stats.cut >= 1, "no upload was reset: the test tested nothing"
    m.umount()
    _check_final(reader, m, expected, sync=True)


# -- c. kill -9 while an async target is behind ---------------------------------------------------


def test_kill9_resumes_shipping_from_the_watermark(
    tmp_path: Path,
    rclone: LocalProvider,
    mounts: list[Mount],
    proxies: list[FaultProxy],
) -> None:
    m, px, reader = _proxied_sync_volume(
        tmp_path, rclone, mounts, proxies, on_failure="degrade", mode="async"
    )
    mnt, expected = m.mountpoint, {}
    px.latency(60)  # ~1 s per 1 MiB segment: the target falls behind
    for i in range(6):
        expected[f"f{i}"] = os.urandom(1024 * 1024 + i)
        write_file(mnt / f"f{i}", expected[f"f{i}"])
    st = wait_status(
        m,
        "t",
        lambda t: t["watermark_segment"] >= 2 and t["queue_segments"] >= 2,
        30,
        "some segments shipped and more waiting",
    )
    before = {k: v for k, v in list_objects(reader.mc, reader.bucket).items() if "segments/" in k}
    assert before, st
    m.kill9()
    px.passthrough()
    time.sleep(1.1)  # a re-upload would get a later LastModified (1 s resolution)
    m.start()
    # Everything fsynced before the kill is still there ...
    for name, data in expected.items():
        assert (mnt / name).read_bytes() == data, name
    # ... and shipping resumes from the watermark, with no operator action.
    after = wait_status(
        m, "t", lambda t: t["lag_lsn"] == 0 and t["queue_segments"] == 0, 30, "catch-up"
    )
    hist = reader.read()
    for name, data in expected.items():
        assert hist.holds_content(data), name
    now = list_objects(reader.mc, reader.bucket)
    for k, info in before.items():
        assert now[k].etag == info.etag and now[k].last_modified == info.last_modified, (
            f"{k} was uploaded again after the restart"
        )
    remaining = hist.sealed - len(before)
    assert 1 <= after["uploaded_objects"] <= remaining, (after, remaining)
    assert after["uploaded_bytes"] <= sum(
        now[f"segments/{n:016x}.seg"].size for n in range(len(before) + 1, hist.sealed + 1)
    )
    m.umount()
    _check_final(reader, m, expected, sync=False)


# -- known product bugs, pinned (strict xfail: they fail loudly once fixed) -----------------------


class TornObjectAtTarget(AssertionError):
    """The target holds an object whose bytes are not the ones its key names."""


def test_put_torn_after_headers_leaves_no_torn_tail(
    tmp_path: Path,
    seaweedfs: LocalProvider,
    mounts: list[Mount],
    proxies: list[FaultProxy],
) -> None:
    # Segments seal by size only here, so the open segment outlives the restart.
    m, px, reader = _proxied_sync_volume(
        tmp_path,
        seaweedfs,
        mounts,
        proxies,
        on_failure="degrade",
        volume_toml='segment_size = "1MiB"\nsegment_max_age = 600\n',
    )
    mnt = m.mountpoint
    expected = {"x": os.urandom(20_000)}
    write_file(mnt / "x", expected["x"])
    # Every request dies right after its headers, as if the link dropped at that instant.
    px.resets_after_headers(budget=100_000)
    expected["y"] = os.urandom(30_000)
    write_file(mnt / "y", expected["y"])  # degrade: returns once the target is down
    wait_status(m, "t", lambda t: t["health"] == "down", 10, "the target to be down")
    torn = [
        k
        for k, v in list_objects(reader.mc, reader.bucket).items()
        if (t := parse_tail_key(k)) and v.size != t[2] - t[1]
    ]
    # Content-MD5 on every PUT: a body cut short is refused, never kept truncated.
    # (Shipper.resume also drops any piece whose size disagrees with its name.)
    assert not torn, f"torn pieces kept at the target: {torn}"
    m.kill9()
    px.passthrough()
    m.start()
    expected["z"] = os.urandom(30_000)
    write_file(mnt / "z", expected["z"])  # the sync target must hold z (and y) now
    try:
        hist = reader.read()
    except AssertionError as e:
        sizes = {k: v.size for k, v in list_objects(reader.mc, reader.bucket).items()}
        raise TornObjectAtTarget(f"{e}; the target holds {sizes}") from None
    for name in ("y", "z"):
        assert hist.holds_content(expected[name]), name


def test_sync_on_close_makes_close_wait_for_the_sync_target(
    tmp_path: Path, seaweedfs: LocalProvider, mounts: list[Mount]
) -> None:
    bucket = _fresh_bucket(seaweedfs)
    toml = "\n[replication]\nsync_on_close = true\n" + target_block("t", seaweedfs, bucket, "sync")
    m = Mount.create(tmp_path / "vol", "segment_max_age = 600\n" + toml)
    mounts.append(m)
    m.start()
    reader = BucketReader(seaweedfs, bucket, _volume_id(m))
    data = os.urandom(20_000)
    write_file(m.mountpoint / "closed", data, fsync=False)  # no fsync: only close()
    assert reader.read().holds_content(data)
