"""`vaultsync migrate`: copy a volume from target A to target B, verified and resumable.

Why it is not `rclone sync`: every object is checked by what it means before
it reaches B (replication/migrate_check.py), an object damaged at A is taken
from another target that holds a good copy (or reported, never copied), and B
is a consistent prefix of the volume at every moment (docs/format.md §2.1):
segments are uploaded strictly in ascending order, checkpoints only once B
holds their LSN. Downloads and checks run `jobs` at a time ahead of the
ordered uploads, so the wire stays busy.

Resuming is cheap: the plan skips every object B already holds with A's size
and MD5 ETag (or with the size and ETag a previous run recorded in the resume
journal, `STATE_DIR/migrate/<A>-to-<B>-<digest>.jsonl`). After a kill -9 only the
objects in flight at that instant are copied again.

While the volume is mounted and written, A keeps receiving segments: the copy
runs in rounds, each planned from a fresh listing, until a round has no more
than `max_lag` new segments to copy. The daemon's shipper for B (after
`vaultsync targets add`, or adoption at the end of `migrate`) does the rest:
its resume logic starts from what B already holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from vaultsync.config import Config, TargetConfig
from vaultsync.errors import FormatError, VolumeError
from vaultsync.format.chunks import Codec
from vaultsync.format.header import HEADER_KEY, VolumeHeader
from vaultsync.format.state_layout import StateDir
from vaultsync.replication.migrate_check import CheckFailed, check_object
from vaultsync.replication.migrate_plan import SNAPSHOTS, Item, Plan, is_plain_md5, make_plan
from vaultsync.store.objectstore import (
    ObjectInfo,
    ObjectMissingError,
    ObjectStore,
    StoreError,
    md5_hex,
)
from vaultsync.store.ratelimit import RateLimiter
from vaultsync.store.targets import foreign_volume_error, read_remote_header

log = logging.getLogger("vaultsync.migrate")


class MigrateError(VolumeError):
    pass


@dataclass
class MigrateReport:
    source: str
    dest: str
    dry_run: bool = False
    rounds: int = 0
    copied: int = 0
    copied_bytes: int = 0
    skipped: int = 0
    skipped_bytes: int = 0
    verified: int = 0
    verified_bytes: int = 0
    failed: list[dict[str, str]] = field(default_factory=list)
    # key -> the target a good copy came from, when A's copy was damaged
    repaired_from: dict[str, str] = field(default_factory=dict)
    deferred: list[str] = field(default_factory=list)
    vanished: list[str] = field(default_factory=list)
    # snapshots deleted at A after a migration had copied them: removed from B too
    withdrawn: list[str] = field(default_factory=list)
    plan: dict[str, dict[str, int]] = field(default_factory=dict)
    would_copy: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    journal: str | None = None

    @property
    def ok(self) -> bool:
        return not self.failed


class Progress:
    """What the engine tells its caller; the CLI draws a rich bar from it."""

    def planned(self, objects: int, nbytes: int) -> None:
        """More work is known (each round adds its plan)."""

    def advanced(self, objects: int, nbytes: int) -> None:
        """Objects finished (copied, or checked and found present)."""

    def note(self, text: str) -> None:
        """A short phase description."""


class ResumeJournal:
    """Append-only record of objects verified at B: (key, size, ETag) per line.

    It makes resumption cheap where ETags are not plain MD5s, and it is the log
    that shows what a run copied (a key appearing twice was copied twice).
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.done: dict[str, tuple[int, str]] = {}
        self._f: TextIO | None = None
        if path is None:
            return
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                try:
                    e = json.loads(line)
                    self.done[str(e["key"])] = (int(e["size"]), str(e["etag"]))
                except (ValueError, KeyError, TypeError):
                    continue  # a line torn by a kill -9: the object is simply checked again

    @classmethod
    def for_run(cls, state_dir: Path, source: TargetConfig, dest: TargetConfig) -> ResumeJournal:
        # The names, for the operator; a digest of both locations, so that a name reused
        # for another bucket starts a journal of its own.
        where = ">".join(f"{t.endpoint}/{t.bucket}/{t.prefix}" for t in (source, dest))
        digest = hashlib.sha256(where.encode()).hexdigest()[:8]
        path = StateDir(state_dir).migrations / f"{source.name}-to-{dest.name}-{digest}.jsonl"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            log.warning("no resume journal (%s); resuming relies on ETags alone", e)
            return cls(None)
        return cls(path)

    def record(self, key: str, size: int, etag: str, action: str) -> None:
        self.done[key] = (size, etag)
        if self.path is None:
            return
        if self._f is None:
            self._f = open(self.path, "a")  # noqa: SIM115 - kept open for the run
        line = {"key": key, "size": size, "etag": etag, "action": action, "t": time.time()}
        self._f.write(json.dumps(line) + "\n")
        self._f.flush()  # survives a kill -9 of this process (the page cache keeps it)

    def note_present(self, items: list[Item], at_b: dict[str, ObjectInfo]) -> None:
        """Objects the plan found at B by size and MD5 but this journal never saw (a run
        killed between its upload and its record): recorded, so the journal lists every
        object verified at B and a later run can trust B's ETag for them too."""
        for item in items:
            b = at_b[item.key]
            if self.done.get(item.key) != (b.size, b.etag):
                self.record(item.key, b.size, b.etag, "present")

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class _Unavailable(Exception):
    """No good copy of an object anywhere; `str()` has every reason."""


@dataclass
class _Run:
    """One migration's shared state: the stores, the volume's codec, the report."""

    src: ObjectStore
    dst: ObjectStore
    others: list[ObjectStore]
    header: VolumeHeader
    codec: Codec
    jobs: int
    limiter: RateLimiter
    journal: ResumeJournal
    report: MigrateReport
    progress: Progress

    # -- reading a good copy ---------------------------------------------------------
    async def _check(self, item: Item, data: bytes) -> int | None:
        if len(data) > 1 << 20:
            lsn: int | None = await asyncio.to_thread(
                check_object, item, data, self.header, self.codec
            )
            return lsn
        small: int | None = check_object(item, data, self.header, self.codec)
        return small

    async def fetch_good(self, item: Item) -> tuple[bytes, int | None]:
        """A verified copy of `item`: from A, else from any other target that has one."""
        reasons = []
        await self.limiter.take(item.size)
        try:
            data = await self.src.get(item.key)
            return data, await self._check(item, data)
        except CheckFailed as e:
            reasons.append(f"{self.src.name}: {e}")
            log.warning("target %s: %s is damaged: %s", self.src.name, item.key, e)
        except ObjectMissingError:
            raise
        except StoreError as e:
            reasons.append(f"{self.src.name}: {e.reason}")
        for other in self.others:
            try:
                info = await other.head(item.key)
                if info is None:
                    reasons.append(f"{other.name}: absent")
                    continue
                alt = replace(item, size=info.size, etag=info.etag)
                await self.limiter.take(alt.size)
                data = await other.get(item.key)
                lsn = await self._check(alt, data)
            except CheckFailed as e:
                reasons.append(f"{other.name}: {e}")
                continue
            except StoreError as e:
                reasons.append(f"{other.name}: {e.reason}")
                continue
            self.report.repaired_from[item.key] = other.name
            log.warning("%s: taken from target %s instead", item.key, other.name)
            return data, lsn
        raise _Unavailable("; ".join(reasons))

    # -- writing it to B ---------------------------------------------------------------
    async def _dst_matches(self, key: str, data: bytes) -> ObjectInfo | None:
        """B's object if it holds exactly `data` (HEAD first, GET only when ETags cannot tell)."""
        info = await self.dst.head(key)
        if info is None or info.size != len(data):
            return None
        if is_plain_md5(info.etag):
            return info if info.etag.lower() == md5_hex(data) else None
        return info if await self.dst.get(key) == data else None

    async def store(self, item: Item, data: bytes, differs: bool) -> str:
        """Put a verified object at B; 'copied' or 'present'. Raises _Unavailable on conflict."""
        key = item.key
        if differs:
            # B holds something under this key: identical (ETags of another kind), a
            # damaged copy (repaired), or a valid different object (never overwritten).
            if await self._dst_matches(key, data) is not None:
                return "present"
            theirs = await self.dst.get(key)
            try:
                await self._check(replace(item, size=len(theirs), etag=md5_hex(theirs)), theirs)
            except CheckFailed:
                log.warning("target %s: %s is damaged; replacing it", self.dst.name, key)
                await self.dst.put(key, data)
            else:
                raise _Unavailable(
                    f"{self.dst.name} already holds a different valid {item.kind} under {key}; "
                    "it is another history or another writer's: not overwritten"
                )
        elif item.kind in ("segment", "lease", "snapshot", "header"):
            # Never replace what a writer (or another migration) put there meanwhile.
            created = (
                await self.dst.put_new(key, data)
                if item.kind == "segment"
                else await self.dst.create_if_absent(key, data)
            )
            if not created and await self._dst_matches(key, data) is None:
                raise _Unavailable(
                    f"{self.dst.name}: {key} appeared there with other bytes while copying"
                )
        else:
            await self.dst.put(key, data)
        info = await self._dst_matches(key, data)
        if info is None:
            raise _Unavailable(f"{self.dst.name}: {key} reads back different from what was sent")
        self.journal.record(key, info.size, info.etag, "copied")
        return "copied"

    async def copy_one(self, item: Item, differs: bool) -> bool:
        """Fetch, verify, store one object and account for it; False if it failed."""
        try:
            data, _lsn = await self.fetch_good(item)
            outcome = await self.store(item, data, differs)
        except ObjectMissingError:
            # Deleted at A since the listing (snapshot delete, garbage collection).
            self.report.vanished.append(item.key)
            self.progress.advanced(1, item.size)
            return True
        except (_Unavailable, StoreError) as e:
            self._failed(item, item.kind, e)
            self.progress.advanced(1, item.size)
            return False
        self._done(item, data, outcome)
        return True

    def _failed(self, item: Item, kind: str, e: Exception) -> None:
        reason = e.reason if isinstance(e, StoreError) else str(e)
        self.report.failed.append({"key": item.key, "kind": kind, "reason": reason})
        log.error("%s: not copied: %s", item.key, reason)

    def _done(self, item: Item, data: bytes, outcome: str) -> None:
        r = self.report
        r.verified += 1
        r.verified_bytes += len(data)
        if outcome == "copied":
            r.copied += 1
            r.copied_bytes += len(data)
        self.progress.advanced(1, item.size)

    # -- phases ---------------------------------------------------------------------
    async def parallel(self, items: list[Item], plan: Plan) -> None:
        sem = asyncio.Semaphore(self.jobs)

        async def one(it: Item) -> None:
            async with sem:
                await self.copy_one(it, it.key in plan.differs)

        await asyncio.gather(*(one(i) for i in items))

    async def segments(self, items: list[Item], plan: Plan) -> bool:
        """Ascending, one upload at a time, with `jobs` downloads+checks running ahead.

        Stops at the first segment that cannot be copied: B must hold no segment
        above a gap (§2.1). Returns False if it stopped.
        """
        fetches: dict[int, asyncio.Task[tuple[bytes, int | None]]] = {}

        def ahead(i: int) -> None:
            if i < len(items):
                fetches[i] = asyncio.ensure_future(self.fetch_good(items[i]))

        for i in range(min(self.jobs, len(items))):
            ahead(i)
        try:
            for i, item in enumerate(items):
                task = fetches.pop(i)
                try:
                    data, _lsn = await task
                    ahead(i + self.jobs)
                    outcome = await self.store(item, data, item.key in plan.differs)
                except ObjectMissingError:
                    self.report.vanished.append(item.key)  # removed by garbage collection
                    ahead(i + self.jobs)
                    self.progress.advanced(1, item.size)
                    continue
                except (_Unavailable, StoreError) as e:
                    self._failed(item, "segment", e)
                    self.report.deferred += [it.key for it in items[i + 1 :]]
                    return False
                self._done(item, data, outcome)
            return True
        finally:
            for t in fetches.values():
                t.cancel()
            for t in fetches.values():
                with contextlib.suppress(BaseException):
                    await t

    async def header_phase(self, plan: Plan) -> None:
        for item in plan.copy["header"]:
            data = await self.src.get(HEADER_KEY)
            if await self.dst.create_if_absent(HEADER_KEY, data):
                self.journal.record(HEADER_KEY, len(data), md5_hex(data), "copied")
                self.report.copied += 1
                self.report.copied_bytes += len(data)
                self.report.verified += 1
            elif await self._dst_matches(HEADER_KEY, data) is None:
                self.report.failed.append(
                    {
                        "key": HEADER_KEY,
                        "kind": "header",
                        "reason": f"{self.dst.name} holds this volume's header with other "
                        "bytes (passphrase changed at one of them?); compare them and copy "
                        "the current one by hand",
                    }
                )
            self.progress.advanced(1, item.size)

    async def withdraw_deleted_snapshots(self) -> None:
        """A snapshot deleted at A while it was being copied must not live on at B.

        `vaultsync snapshot delete` deletes at every target of the config, B
        included, but a copy already in flight lands after that. Only snapshots
        a migration put at B (the resume journal says so, with B's very size and
        ETag) are removed: one the writer made at B itself is left alone.
        """
        at_a = {o.key async for o in self.src.list(SNAPSHOTS)}
        for o in [o async for o in self.dst.list(SNAPSHOTS)]:
            if o.key in at_a or self.journal.done.get(o.key) != (o.size, o.etag):
                continue
            await self.dst.delete(o.key)
            self.report.withdrawn.append(o.key)
            log.info(
                "%s: deleted at %s during the migration; removed from %s too",
                o.key,
                self.src.name,
                self.dst.name,
            )

    async def round(self, plan: Plan) -> int:
        """Copy one plan in phase order; the number of segments it copied."""
        self.progress.planned(len(plan.to_copy), plan.copy_bytes)
        await self.header_phase(plan)
        self.progress.note("leases")
        await self.parallel(plan.copy["lease"], plan)
        self.progress.note("segments")
        before = self.report.copied
        complete = await self.segments(plan.copy["segment"], plan)
        copied_segments = self.report.copied - before
        if complete:
            # Every checkpoint listed was written after A held its LSN in whole segments,
            # and those segments are now all at B: none can refer past B's prefix.
            self.progress.note("checkpoints")
            await self.parallel(plan.copy["checkpoint"], plan)
        else:
            self.report.deferred += [i.key for i in plan.copy["checkpoint"]]
        self.progress.note("snapshots and other objects")
        await self.parallel(plan.copy["snapshot"] + plan.copy["other"], plan)
        return copied_segments


async def _listing(store: ObjectStore) -> list[ObjectInfo]:
    return [o async for o in store.list("")]


async def _source_header(src: ObjectStore) -> VolumeHeader:
    header = await read_remote_header(src)
    if header is None:
        raise MigrateError(
            f"target {src.name!r} ({src.where}) holds no vaultsync volume; "
            "check --from, the bucket and the prefix"
        )
    return header


async def migrate(
    cfg: Config,
    source: str,
    dest: str,
    *,
    passphrase: str | None = None,
    jobs: int = 4,
    bwlimit: float | None = None,
    dry_run: bool = False,
    max_lag: int = 2,
    max_rounds: int = 50,
    progress: Progress | None = None,
) -> MigrateReport:
    """Copy every object of the volume at `source` to `dest` (see the module docstring)."""
    if source == dest:
        raise MigrateError(f"--from and --to are both {source!r}; name two different targets")
    src_t: TargetConfig = cfg.target(source)
    dst_t: TargetConfig = cfg.target(dest)
    progress = progress or Progress()
    report = MigrateReport(source, dest, dry_run=dry_run)
    t0 = time.monotonic()
    pool = max(8, jobs * 2 + 2)
    async with AsyncExitStack() as stack:
        src = await stack.enter_async_context(ObjectStore(src_t, pool_size=pool))
        dst = await stack.enter_async_context(ObjectStore(dst_t, pool_size=pool))
        for st in (src, dst):
            await st.check_bucket()
        header = await _source_header(src)
        found = await read_remote_header(dst)
        if found is not None and found.volume_id != header.volume_id:
            raise foreign_volume_error(dst_t, found, header)
        if header.encryption is not None and passphrase is None:
            raise MigrateError(
                "the volume is encrypted: its chunks can only be verified with the passphrase; "
                "set volume.encryption = true and export the passphrase "
                f"(volume.passphrase_env, {cfg.volume.passphrase_env})"
            )
        try:
            keys = header.unlock(passphrase)
        except FormatError as e:
            raise MigrateError(str(e)) from None
        codec = Codec(header.compression_level, keys)
        journal = (
            ResumeJournal(None)
            if dry_run
            else ResumeJournal.for_run(cfg.volume.state_dir, src_t, dst_t)
        )
        report.journal = str(journal.path) if journal.path else None
        others = []
        for t in cfg.targets:
            if t.name not in (source, dest):
                others.append(
                    await stack.enter_async_context(
                        ObjectStore(t, pool_size=4, max_attempts=2, connect_timeout=3)
                    )
                )
        run = _Run(
            src,
            dst,
            others,
            header,
            codec,
            max(1, jobs),
            RateLimiter(bwlimit),
            journal,
            report,
            progress,
        )
        try:
            while True:
                report.rounds += 1
                progress.note(f"listing (round {report.rounds})")
                a_list, b_list = await asyncio.gather(_listing(src), _listing(dst))
                at_b = {o.key: o for o in b_list}
                plan = make_plan(a_list, at_b, journal.done)
                if not dry_run:
                    journal.note_present(plan.present, at_b)
                if report.rounds == 1:
                    report.plan = plan.summary()
                    report.skipped = len(plan.present)
                    report.skipped_bytes = sum(i.size for i in plan.present)
                if dry_run:
                    report.would_copy = [
                        {
                            "key": i.key,
                            "kind": i.kind,
                            "size": i.size,
                            "action": "check" if i.key in plan.differs else "copy",
                        }
                        for i in plan.to_copy
                    ]
                    break
                copied_segments = await run.round(plan)
                if report.failed or copied_segments <= max_lag or report.rounds >= max_rounds:
                    break
            if not dry_run and not report.failed:
                await run.withdraw_deleted_snapshots()
        finally:
            journal.close()
    report.seconds = round(time.monotonic() - t0, 3)
    return report
