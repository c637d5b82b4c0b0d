"""Migration throughput between two local providers, next to `rclone sync` of the same bucket.

    .venv/bin/python benchmarks/migrate_bench.py [--mib 256] [--file-mib 4] [--segment-mib 8]
        [--jobs 8] [--dir /tmp] [--keep]

Needs /dev/fuse and fusermount3, and the `weed` and `rclone` binaries. One
SeaweedFS and one rclone S3 server are started on loopback. A volume of
--mib MiB of random files (nothing compresses or deduplicates) is written
through a real mount to a SeaweedFS bucket and unmounted. Then, each into a
fresh rclone-served bucket:

1. `vaultsync migrate CONFIG --from sw --to rc --jobs J` (verifies every chunk
   by its hash, segments uploaded in order), timed from spawn to exit;
2. `rclone sync` of the same prefix with --transfers J --checkers J (copies
   bytes, checks MD5s; no format knowledge), configured on the fly with
   environment variables (no rclone.conf is read or written).

Prints MB/s (1 MB = 10^6 bytes) and objects/s for both and the ratio
migrate/rclone. Servers and mounts are stopped by PID on exit.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # for tests.mounting when run as a script

from tests.support.mounting import Mount  # noqa: E402
from vaultsync.commands.local_servers import (  # noqa: E402
    LocalProvider,
    find_binary,
    start_rclone,
    start_seaweedfs,
)

MIB = 1 << 20


def _keys() -> tuple[str, str]:
    return "VS" + secrets.token_hex(8).upper(), secrets.token_urlsafe(24)


def _cred_file(d: Path, p: LocalProvider) -> Path:
    path = d / f"{p.kind}-{secrets.token_hex(4)}.creds"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"access_key_id = {p.access_key}\nsecret_access_key = {p.secret_key}\n")
    return path


def _block(name: str, p: LocalProvider, bucket: str, cred: Path) -> str:
    return (
        f'\n[[targets]]\nname = "{name}"\nendpoint = "{p.endpoint}"\nbucket = "{bucket}"\n'
        f'prefix = "v"\ncredentials = {{ file = "{cred}" }}\n'
    )


def _rclone_env(name: str, p: LocalProvider) -> dict[str, str]:
    pre = f"RCLONE_CONFIG_{name.upper()}_"
    return {
        pre + "TYPE": "s3",
        pre + "PROVIDER": "Other",
        pre + "ENDPOINT": p.endpoint,
        pre + "ACCESS_KEY_ID": p.access_key,
        pre + "SECRET_ACCESS_KEY": p.secret_key,
        pre + "REGION": "us-east-1",
        pre + "FORCE_PATH_STYLE": "true",
    }


def _objects(p: LocalProvider, bucket: str) -> tuple[int, int]:
    c = p.client()
    n = size = 0
    token = None
    try:
        while True:
            kw = {"Bucket": bucket, "Prefix": "v/"}
            if token:
                kw["ContinuationToken"] = token
            page = c.list_objects_v2(**kw)
            for o in page.get("Contents", []):
                if not o["Key"].startswith(("v/tails/", "v/.probe/")):
                    n += 1
                    size += int(o["Size"])
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return n, size
    finally:
        c.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=256, help="volume size in MiB")
    ap.add_argument("--file-mib", type=int, default=4)
    ap.add_argument("--segment-mib", type=int, default=8)
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="vs-migrate-bench-", dir=args.dir))
    ak, sk = _keys()
    sw = start_seaweedfs(tmp / "sw", access_key=ak, secret_key=sk)
    ak, sk = _keys()
    rc = start_rclone(tmp / "rc", access_key=ak, secret_key=sk)
    mount: Mount | None = None
    try:
        sw.create_bucket("src-bucket")
        for b in ("dst-migrate", "dst-rclone"):
            rc.create_bucket(b)
        sw_block = _block("sw", sw, "src-bucket", _cred_file(tmp, sw))
        rc_block = _block("rc", rc, "dst-migrate", _cred_file(tmp, rc))
        # The volume's writer ships to sw only; rc is the migration's destination.
        mount = Mount.create(tmp / "siteA", f'segment_size = "{args.segment_mib}MiB"\n' + sw_block)
        mount.start()
        rng = random.Random(1)
        t0 = time.monotonic()
        for i in range(max(1, args.mib // args.file_mib)):
            (mount.mountpoint / f"f{i:05d}").write_bytes(rng.randbytes(args.file_mib * MIB))
        mount.umount()
        print(f"populated {args.mib} MiB through the mount in {time.monotonic() - t0:.1f}s")
        mount.config.write_text(mount.config.read_text() + rc_block)
        n_obj, n_bytes = _objects(sw, "src-bucket")
        print(f"source: {n_obj} objects, {n_bytes / 1e6:.1f} MB")

        t0 = time.monotonic()
        res = subprocess.run(
            [sys.executable, "-m", "vaultsync", "migrate", str(mount.config), "--from", "sw",
             "--to", "rc", "--jobs", str(args.jobs), "--json", "--no-adopt"],
            capture_output=True, text=True, timeout=3600,
        )  # fmt: skip
        t_mig = time.monotonic() - t0
        if res.returncode != 0:
            print(res.stdout, res.stderr)
            return 1
        rep = json.loads(res.stdout)
        assert _objects(rc, "dst-migrate") == (n_obj, n_bytes), "migration incomplete"

        env = {**os.environ, **_rclone_env("src", sw), **_rclone_env("dst", rc)}
        env["RCLONE_CONFIG"] = "/dev/null"
        t0 = time.monotonic()
        res = subprocess.run(
            [find_binary("rclone"), "sync", "src:src-bucket/v", "dst:dst-rclone/v",
             "--transfers", str(args.jobs), "--checkers", str(args.jobs),
             "--exclude", "tails/**", "--exclude", ".probe/**"],
            capture_output=True, text=True, env=env, timeout=3600,
        )  # fmt: skip
        t_rc = time.monotonic() - t0
        if res.returncode != 0:
            print(res.stdout, res.stderr)
            return 1
        assert _objects(rc, "dst-rclone") == (n_obj, n_bytes), "rclone sync incomplete"

        mb = n_bytes / 1e6
        print(f"{'tool':<22}{'seconds':>9}{'MB/s':>9}{'objects/s':>11}")
        print(f"{'vaultsync migrate':<22}{t_mig:>9.2f}{mb / t_mig:>9.1f}{n_obj / t_mig:>11.1f}")
        print(f"{'rclone sync':<22}{t_rc:>9.2f}{mb / t_rc:>9.1f}{n_obj / t_rc:>11.1f}")
        print(f"ratio migrate/rclone (throughput): {t_rc / t_mig:.2f}")
        print(
            f"migrate verified {rep['verified']} objects, failed {len(rep['failed'])}; "
            f"{rep['seconds']:.2f}s inside the copy engine (the rest is process start-up)"
        )
        return 0
    finally:
        if mount is not None:
            mount.cleanup()
        sw.stop()
        rc.stop()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp}")


if __name__ == "__main__":
    sys.exit(main())
