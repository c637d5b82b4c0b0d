"""Cross-provider migration against real servers: SeaweedFS and rclone on loopback.

The reference is always the volume as site A had it: its file tree at
recorded points (compared through a read-only `mount --from B --at`), and
its bucket listing (every object B received must equal A's, byte for byte).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.mounting import Mount, PointMount, cli, tree_of
from tests.support.targets import credentials_file, target_block
from vaultsync.commands.local_servers import LocalProvider

VOLUME = 'segment_size = "1MiB"\nsegment_max_age = 0.3\n'
REPL = "[replication]\ncheckpoint_every = 5\ncheckpoint_check = 0.2\n"


def fresh_bucket(p: LocalProvider) -> str:
    b = f"mg-{uuid.uuid4().hex[:12]}"
    p.create_bucket(b)
    return b


def listing(p: LocalProvider, bucket: str) -> dict[str, tuple[int, str]]:
    """key -> (size, md5 ETag) of the moving kinds (tails and probes are transient)."""
    c = p.client()
    out: dict[str, tuple[int, str]] = {}
    try:
        token = None
        while True:
            kw: dict[str, Any] = {"Bucket": bucket, "Prefix": "v/"}
            if token:
                kw["ContinuationToken"] = token
            page = c.list_objects_v2(**kw)
            for o in page.get("Contents", []):
                key = o["Key"][2:]
                if not key.startswith(("tails/", ".probe/")):
                    out[key] = (int(o["Size"]), o["ETag"].strip('"'))
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return out
    finally:
        c.close()


def get(p: LocalProvider, bucket: str, key: str) -> bytes:
    c = p.client()
    try:
        body: bytes = c.get_object(Bucket=bucket, Key=f"v/{key}")["Body"].read()
        return body
    finally:
        c.close()


def put(p: LocalProvider, bucket: str, key: str, data: bytes) -> None:
    c = p.client()
    try:
        c.put_object(Bucket=bucket, Key=f"v/{key}", Body=data)
    finally:
        c.close()


def write_some(mnt: Path, rng: random.Random, n: int, tag: str) -> None:
    for i in range(n):
        d = mnt / f"d{rng.randrange(4)}"
        d.mkdir(exist_ok=True)
        (d / f"{tag}-{i}").write_bytes(rng.randbytes(rng.randrange(1000, 120_000)))
    fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(fd)
    os.close(fd)


@dataclass
class Populated:
    """A finished volume at two targets (sw on SeaweedFS, rc on rclone), writer gone."""

    root: Path
    sw_bucket: str
    rc_bucket: str
    trees: list[tuple[str, dict[str, object]]]  # (snapshot name, tree) oldest first
    final: dict[str, object]

    def config(
        self, sw: LocalProvider, rc: LocalProvider, extra: str = "", *, only: str = ""
    ) -> Path:
        """A site config (no local volume) naming the targets; `extra` adds more."""
        body = '[volume]\nname = "t"\nstate_dir = "state"\n'
        if only != "rc":
            body += target_block("sw", sw, self.sw_bucket)
        if only != "sw":
            body += target_block("rc", rc, self.rc_bucket)
        path = self.root / f"site-{uuid.uuid4().hex[:6]}.toml"
        path.write_text(body + extra)
        return path


@pytest.fixture(scope="module")
def populated(
    tmp_path_factory: pytest.TempPathFactory, seaweedfs: LocalProvider, rclone: LocalProvider
) -> Iterator[Populated]:
    root = tmp_path_factory.mktemp("migrate")
    sw_b, rc_b = fresh_bucket(seaweedfs), fresh_bucket(rclone)
    toml = VOLUME + REPL + target_block("sw", seaweedfs, sw_b) + target_block("rc", rclone, rc_b)
    a = Mount.create(root / "siteA", toml)
    rng = random.Random(7)
    trees = []
    a.start()
    try:
        for r in range(4):
            for k in range(3):
                write_some(a.mountpoint, rng, 6, f"r{r}k{k}")
                time.sleep(0.35)  # a segment per batch
            if r == 1:
                os.rename(a.mountpoint / "d0", a.mountpoint / "renamed")
            res = cli("snapshot", "create", str(a.config), f"round{r}")
            assert res.returncode == 0, res.stderr
            trees.append((f"round{r}", tree_of(a.mountpoint)))
        time.sleep(1.0)  # checkpoints reach both targets
        final = tree_of(a.mountpoint)
        a.umount()
    finally:
        a.cleanup()
    # A key kind this version does not know (as garbage collection may add): it must move.
    for p, b in ((seaweedfs, sw_b), (rclone, rc_b)):
        put(p, b, "relocations/0000000000000001.json", b'{"from": 1, "to": 2}')
    yield Populated(root, sw_b, rc_b, trees, final)


def migrate_json(cfg: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    res = cli("migrate", str(cfg), *args, "--json")
    try:
        return res, json.loads(res.stdout)
    except ValueError:
        raise AssertionError(res.stdout + res.stderr) from None


def test_dry_run_moves_nothing(
    populated: Populated, seaweedfs: LocalProvider, rclone: LocalProvider
) -> None:
    new = fresh_bucket(rclone)
    cfg = populated.config(seaweedfs, rclone, target_block("new", rclone, new))
    res, rep = migrate_json(cfg, "--from", "sw", "--to", "new", "--dry-run")
    assert res.returncode == 0, res.stderr
    src = listing(seaweedfs, populated.sw_bucket)
    assert {i["key"] for i in rep["would_copy"]} == set(src)
    assert rep["plan"]["segment"]["copy"] == sum(k.startswith("segments/") for k in src)
    assert listing(rclone, new) == {}
    human = cli("migrate", str(cfg), "--from", "sw", "--to", "new", "--dry-run")
    assert "would copy  segments/0000000000000001.seg" in human.stdout, human.stdout
    assert listing(rclone, new) == {}


def test_offline_migration_is_identical_and_mounts_at_every_point(
    populated: Populated, seaweedfs: LocalProvider, rclone: LocalProvider
) -> None:
    new = fresh_bucket(rclone)
    cfg = populated.config(seaweedfs, rclone, target_block("new", rclone, new), only="sw")
    res, rep = migrate_json(cfg, "--from", "sw", "--to", "new", "--jobs", "3")
    assert res.returncode == 0, res.stderr
    src = listing(seaweedfs, populated.sw_bucket)
    assert any(k.startswith("checkpoints/") for k in src)
    assert listing(rclone, new) == src  # every key, same size, same MD5
    assert rep["copied"] == len(src) and rep["failed"] == [] and rep["skipped"] == 0
    assert rep["verified"] == len(src)
    # Resuming a finished migration copies nothing.
    res, again = migrate_json(cfg, "--from", "sw", "--to", "new")
    assert res.returncode == 0 and again["copied"] == 0 and again["skipped"] == len(src)
    # B alone, at the newest point and at an older one, is what site A had.
    for at, want in ((None, populated.final), *populated.trees[1:2]):
        mp = populated.root / f"mp-{uuid.uuid4().hex[:6]}"
        mp.mkdir()
        pm = PointMount(cfg, mp, "new", at)
        try:
            assert tree_of(mp) == want, at
        finally:
            pm.close()


def test_kill9_then_resume_copies_little_twice(
    populated: Populated, seaweedfs: LocalProvider, rclone: LocalProvider, tmp_path: Path
) -> None:
    new = fresh_bucket(rclone)
    cfg = populated.config(seaweedfs, rclone, target_block("new", rclone, new), only="sw")
    src = listing(seaweedfs, populated.sw_bucket)
    total = sum(s for s, _ in src.values())
    jobs = 2
    log = tmp_path / "first.log"
    journals = cfg.parent / "state" / "migrate"
    before = set(journals.glob("*.jsonl"))  # other tests' runs share the state dir
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vaultsync", "migrate", str(cfg), "--from", "sw", "--to",
             "new", "--jobs", str(jobs), "--bwlimit", str(total // 5), "--json"],
            stdout=out, stderr=out, start_new_session=True,
        )  # fmt: skip
    try:
        # Once copying has begun (the header is in the journal), kill it at a random moment
        # of the about 5 s that the rate limit makes the copy last.
        deadline = time.monotonic() + 60
        while not (found := set(journals.glob("sw-to-new-*.jsonl")) - before) or not any(
            f.read_text() for f in found
        ):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        time.sleep(random.uniform(0.2, 2.5))
        assert proc.poll() is None, log.read_text()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
    partial = listing(rclone, new)
    assert 0 < len(partial) < len(src), "the kill should land mid-copy"
    # B is a consistent prefix even now: segments 1..N with no gap.
    segs = sorted(int(k[9:25], 16) for k in partial if k.startswith("segments/"))
    assert segs == list(range(1, len(segs) + 1))
    res, rep = migrate_json(cfg, "--from", "sw", "--to", "new", "--jobs", str(jobs))
    assert res.returncode == 0, res.stderr
    assert listing(rclone, new) == src
    journal = Path(rep["journal"])
    assert journal not in before
    keys = [json.loads(line)["key"] for line in journal.read_text().splitlines() if line.strip()]
    twice = {k for k in keys if keys.count(k) > 1}
    assert set(keys) == set(src)
    # Only what was in flight at the kill (downloads ahead + one upload) can go twice.
    assert len(twice) <= jobs + 1, twice
    assert rep["skipped"] >= len(partial) - (jobs + 1)


def test_objects_found_at_b_unrecorded_join_the_resume_journal(
    populated: Populated, seaweedfs: LocalProvider, rclone: LocalProvider
) -> None:
    """A run killed between an upload and its journal line leaves B holding an object
    the journal never saw; the next run finds it by MD5, skips it, and records it, so
    the journal lists every object verified at B."""
    new = fresh_bucket(rclone)
    cfg = populated.config(seaweedfs, rclone, target_block("new", rclone, new), only="sw")
    behind = ["volume.json", "segments/0000000000000001.seg", "segments/0000000000000002.seg"]
    for key in behind:
        put(rclone, new, key, get(seaweedfs, populated.sw_bucket, key))
    res, rep = migrate_json(cfg, "--from", "sw", "--to", "new")
    assert res.returncode == 0, res.stderr
    src = listing(seaweedfs, populated.sw_bucket)
    assert listing(rclone, new) == src
    assert rep["skipped"] == len(behind) and rep["copied"] == len(src) - len(behind)
    lines = [json.loads(x) for x in Path(rep["journal"]).read_text().splitlines() if x.strip()]
    assert {e["key"] for e in lines} == set(src)
    assert sorted(e["key"] for e in lines if e["action"] == "present") == sorted(behind)
    assert all(e["size"] == src[e["key"]][0] for e in lines)


def test_damaged_object_at_source_is_taken_from_another_target_or_reported(
    populated: Populated, seaweedfs: LocalProvider, rclone: LocalProvider
) -> None:
    key = "segments/0000000000000003.seg"
    good = get(rclone, populated.rc_bucket, key)
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0x40  # a flipped bit in the middle of a record
    put(rclone, populated.rc_bucket, key, bytes(bad))
    try:
        # sw holds a good copy: the migration uses it, and says so.
        new = fresh_bucket(seaweedfs)
        cfg = populated.config(seaweedfs, rclone, target_block("new", seaweedfs, new))
        res, rep = migrate_json(cfg, "--from", "rc", "--to", "new")
        assert res.returncode == 0, res.stderr
        assert rep["repaired_from"] == {key: "sw"}
        assert get(seaweedfs, new, key) == good
        # No other copy: reported as failed, nothing damaged copied, B stays a prefix.
        new2 = fresh_bucket(seaweedfs)
        cfg2 = populated.config(seaweedfs, rclone, target_block("new2", seaweedfs, new2), only="rc")
        res, rep = migrate_json(cfg2, "--from", "rc", "--to", "new2")
        assert res.returncode == 2, res.stderr
        assert [f["key"] for f in rep["failed"]] == [key]
        assert "checksum" in rep["failed"][0]["reason"] or "damaged" in rep["failed"][0]["reason"]
        held = listing(seaweedfs, new2)
        assert key not in held
        assert not any(k.startswith(("segments/000000000000000", "checkpoints/")) and k > key
                       for k in held)  # fmt: skip
        human = cli("migrate", str(cfg2), "--from", "rc", "--to", "new2")
        assert human.returncode == 2 and "failed:" in human.stderr
        assert "Traceback" not in human.stderr
    finally:
        put(rclone, populated.rc_bucket, key, good)


def test_foreign_volume_and_bad_input_are_clear_errors(
    populated: Populated, seaweedfs: LocalProvider, rclone: LocalProvider
) -> None:
    other = fresh_bucket(rclone)
    header = json.loads(get(seaweedfs, populated.sw_bucket, "volume.json"))
    header["volume_id"] = str(uuid.uuid4())
    put(rclone, other, "volume.json", json.dumps(header).encode())
    cfg = populated.config(seaweedfs, rclone, target_block("other", rclone, other))
    res = cli("migrate", str(cfg), "--from", "sw", "--to", "other")
    assert res.returncode == 1 and "already holds volume" in res.stderr, res.stderr
    assert listing(rclone, other) == {"volume.json": listing(rclone, other)["volume.json"]}
    for args, needle in (
        (("--from", "sw", "--to", "nope"), "no target named 'nope'"),
        (("--from", "sw", "--to", "sw"), "name two different targets"),
        (("--from", "sw", "--to", "rc", "--bwlimit", "fast"), "--bwlimit 'fast'"),
    ):
        res = cli("migrate", str(cfg), *args)
        assert res.returncode == 1 and needle in res.stderr, res.stderr
        assert "Traceback" not in res.stderr


def test_targets_list_add_remove_offline(
    populated: Populated, seaweedfs: LocalProvider, rclone: LocalProvider
) -> None:
    cfg = populated.config(seaweedfs, rclone, only="sw")
    cfg.write_text("# site B, keep this comment\n" + cfg.read_text())
    new = fresh_bucket(rclone)
    cred = credentials_file(rclone.access_key, rclone.secret_key)
    res = cli("targets", "add", str(cfg), "new", "--endpoint", rclone.endpoint, "--bucket", new,
              "--prefix", "v", "--credentials-file", str(cred))  # fmt: skip
    assert res.returncode == 0 and "no mount is running" in res.stdout, res.stderr
    assert cfg.read_text().startswith("# site B, keep this comment\n")
    rows = {r["name"]: r for r in json.loads(cli("targets", "list", str(cfg), "--json").stdout)}
    assert rows["sw"]["seeded"] and not rows["new"]["seeded"] and rows["new"]["mode"] == "async"
    refused = cli("targets", "remove", str(cfg), "sw")
    assert refused.returncode == 1 and "no remaining target holds everything" in refused.stderr
    assert "--force" in refused.stderr
    dup = cli("targets", "add", str(cfg), "new", "--endpoint", rclone.endpoint, "--bucket", new,
              "--credentials-file", str(cred))  # fmt: skip
    assert dup.returncode == 1 and "already has a target named 'new'" in dup.stderr
    assert cli("migrate", str(cfg), "--from", "sw", "--to", "new").returncode == 0
    done = cli("targets", "remove", str(cfg), "sw")
    assert done.returncode == 0, done.stderr
    text = cfg.read_text()
    assert text.startswith("# site B, keep this comment\n") and '"sw"' not in text
    last = cli("targets", "remove", str(cfg), "new")
    assert last.returncode == 1 and "only target" in last.stderr


def test_live_migration_there_and_back_while_writing(
    tmp_path: Path, seaweedfs: LocalProvider, rclone: LocalProvider
) -> None:
    sw_b = fresh_bucket(seaweedfs)
    a = Mount.create(tmp_path / "siteA", VOLUME + REPL + target_block("sw", seaweedfs, sw_b))
    stop = threading.Event()
    recorded: list[tuple[str, dict[str, object]]] = []
    errors: list[BaseException] = []
    pause = threading.Lock()

    def workload() -> None:
        rng = random.Random(11)
        n = 0
        try:
            while not stop.is_set():
                with pause:
                    write_some(a.mountpoint, rng, 3, f"w{n}")
                    if n % 10 == 5:
                        now = time.time_ns()
                        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now // 10**9))
                        recorded.append((f"{stamp}.{now % 10**9:09d}Z", tree_of(a.mountpoint)))
                        time.sleep(0.01)
                n += 1
                time.sleep(0.05)
        except BaseException as e:
            errors.append(e)

    a.start()
    writer = threading.Thread(target=workload)
    try:
        writer.start()
        time.sleep(3)
        rc_b = fresh_bucket(rclone)
        sw2_b = fresh_bucket(seaweedfs)
        for name, p, b in (("rc", rclone, rc_b), ("sw2", seaweedfs, sw2_b)):
            cred = credentials_file(p.access_key, p.secret_key)
            res = cli("targets", "add", str(a.config), name, "--endpoint", p.endpoint,
                      "--bucket", b, "--prefix", "v", "--credentials-file", str(cred),
                      "--no-reload")  # fmt: skip
            assert res.returncode == 0, res.stderr
        # There: SeaweedFS -> rclone, while the writer writes; the daemon adopts rc.
        res, rep = migrate_json(a.config, "--from", "sw", "--to", "rc")
        assert res.returncode == 0 and rep["failed"] == [], res.stderr
        assert "reloaded its targets" in rep["adopted"]
        assert rep["copied"] > 0
        # And back: rclone -> a new SeaweedFS bucket.
        res, rep = migrate_json(a.config, "--from", "rc", "--to", "sw2")
        assert res.returncode == 0 and rep["failed"] == [], res.stderr
        status = json.loads((a.state_dir / "replication.json").read_text())
        assert {"sw", "rc", "sw2"} <= set(status["targets"])
        # Retire the original provider once the others hold everything it does.
        deadline = time.monotonic() + 30
        while True:
            rm = cli("targets", "remove", str(a.config), "sw")
            if rm.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert rm.returncode == 0, rm.stderr
        assert "reloaded its targets" in rm.stdout
        time.sleep(1)
        stop.set()
        writer.join(60)
        assert not errors, errors
        final = tree_of(a.mountpoint)
        a.umount()
    finally:
        stop.set()
        writer.join(60)
        a.cleanup()
    assert len(recorded) >= 2
    # B alone (sw2: seeded by migration, finished by the daemon's shipper) = site A.
    for at, want in ((None, final), recorded[0], recorded[len(recorded) // 2]):
        mp = tmp_path / f"mp-{uuid.uuid4().hex[:6]}"
        mp.mkdir()
        pm = PointMount(a.config, mp, "sw2", at)
        try:
            assert tree_of(mp) == want, at
        finally:
            pm.close()


def test_a_snapshot_deleted_at_the_source_after_its_copy_is_withdrawn_from_the_destination(
    populated: Populated, seaweedfs: LocalProvider, rclone: LocalProvider
) -> None:
    """A snapshot copied to B, then deleted at A (a `snapshot delete` racing the copy),
    must not live on at B; a snapshot the writer made at B itself is B's own."""
    a, b = fresh_bucket(seaweedfs), fresh_bucket(rclone)
    cfg = populated.config(
        seaweedfs,
        rclone,
        target_block("a", seaweedfs, a) + target_block("b", rclone, b),
        only="sw",
    )
    res, _ = migrate_json(cfg, "--from", "sw", "--to", "a")  # A: a copy of its own
    assert res.returncode == 0, res.stderr
    res, _ = migrate_json(cfg, "--from", "a", "--to", "b")
    assert res.returncode == 0, res.stderr
    assert "snapshots/round0.json" in listing(rclone, b)
    c = seaweedfs.client()
    try:
        c.delete_object(Bucket=a, Key="v/snapshots/round0.json")
    finally:
        c.close()
    own = json.dumps({"name": "only-at-b", "lsn": 3}).encode()
    put(rclone, b, "snapshots/only-at-b.json", own)
    res, rep = migrate_json(cfg, "--from", "a", "--to", "b")
    assert res.returncode == 0, res.stderr
    assert rep["withdrawn"] == ["snapshots/round0.json"]
    at_b = listing(rclone, b)
    assert "snapshots/round0.json" not in at_b
    assert "snapshots/round1.json" in at_b and "snapshots/only-at-b.json" in at_b


def test_encrypted_volume_migrates_with_the_passphrase_and_not_without(
    tmp_path: Path, seaweedfs: LocalProvider, rclone: LocalProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VAULTSYNC_PASSPHRASE", "correct horse battery staple")
    sw_b, new = fresh_bucket(seaweedfs), fresh_bucket(rclone)
    a = Mount.create(
        tmp_path / "siteA",
        "encryption = true\n" + VOLUME + REPL + target_block("sw", seaweedfs, sw_b),
    )
    a.start()
    try:
        write_some(a.mountpoint, random.Random(3), 8, "enc")
        want = tree_of(a.mountpoint)
        a.umount()
    finally:
        a.cleanup()
    site = tmp_path / "site.toml"
    site.write_text(
        '[volume]\nname = "t"\nstate_dir = "state"\nencryption = true\n'
        + target_block("sw", seaweedfs, sw_b)
        + target_block("new", rclone, new)
    )
    monkeypatch.delenv("VAULTSYNC_PASSPHRASE")
    res = cli("migrate", str(site), "--from", "sw", "--to", "new")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "passphrase" in res.stderr and listing(rclone, new) == {}
    monkeypatch.setenv("VAULTSYNC_PASSPHRASE", "wrong")
    res = cli("migrate", str(site), "--from", "sw", "--to", "new")
    assert res.returncode == 1 and "wrong passphrase" in res.stderr, res.stderr
    assert listing(rclone, new) == {}
    monkeypatch.setenv("VAULTSYNC_PASSPHRASE", "correct horse battery staple")
    res, rep = migrate_json(site, "--from", "sw", "--to", "new")
    assert res.returncode == 0, res.stderr
    assert rep["failed"] == [] and rep["verified"] == rep["copied"] > 0
    assert listing(rclone, new) == listing(seaweedfs, sw_b)
    mp = tmp_path / "mp"
    mp.mkdir()
    pm = PointMount(site, mp, "new", None)
    try:
        assert tree_of(mp) == want
    finally:
        pm.close()
    monkeypatch.setenv("VAULTSYNC_PASSPHRASE", "wrong")
    res = cli("mount", str(site), str(mp), "--from", "new")
    assert res.returncode == 1 and "wrong passphrase" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
