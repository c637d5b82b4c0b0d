"""REST API throughput: a large file downloaded as of an old point, and directory listings.

A volume is written through a real mount replicated to a local SeaweedFS
(the big file first, then overwritten, so the old version lives only in the
past point), then `vaultsync serve --from sw` serves it. Measured:

- download: GET /v1/content/big.bin?at=<old point> streamed to /dev/null,
  next to reading the same bytes from a local file (page cache dropped from
  neither: both warm after one pass), as a ratio;
- listing: GET /v1/tree/many?limit=50 requests per second (one client,
  keep-alive), as of "latest" and as of the old point, next to os.scandir of
  a local directory of the same entries.

    .venv/bin/python benchmarks/api_bench.py --size-mib 1024 --files 1000
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from tests.support.api_helpers import READ_TOKEN, ApiServer, api_toml, auth
from tests.support.mounting import Mount
from tests.support.targets import credentials_file
from vaultsync.commands.local_servers import free_port, start_seaweedfs


def _write(path: Path, size: int, seed: bytes) -> None:
    block = (seed * ((1 << 20) // len(seed) + 1))[: 1 << 20]
    with open(path, "wb") as f:
        for i in range(size >> 20):
            f.write(i.to_bytes(8, "little") + block[8:])  # distinct blocks: no dedup
        os.fsync(f.fileno())


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of process `pid` so far: a figure the machine's other load barely
    moves, unlike wall-clock throughput on two shared cores."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024, help="size of the big file")
    ap.add_argument("--files", type=int, default=1000, help="entries in the listed directory")
    ap.add_argument("--requests", type=int, default=300, help="listing requests to time")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="vs-apibench-"))
    sw = start_seaweedfs(
        base / "sw",
        access_key="VSBENCH" + uuid.uuid4().hex[:8].upper(),
        secret_key=uuid.uuid4().hex,
    )
    mount = server = None
    try:
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        sw.create_bucket(bucket)
        cred = credentials_file(sw.access_key, sw.secret_key)
        targets = (
            f'\n[[targets]]\nname = "sw"\nendpoint = "{sw.endpoint}"\nbucket = "{bucket}"\n'
            f'prefix = "v"\nmode = "async"\ncredentials = {{ file = "{cred}" }}\n'
        )
        mount = Mount.create(
            base / "vol",
            'chunk_size = "1MiB"\n' + targets + api_toml(free_port(), [], enabled=False),
        )
        mount.start(timeout=60)
        mnt = mount.mountpoint
        size = args.size_mib << 20
        t0 = time.monotonic()
        _write(mnt / "big.bin", size, b"old version ")
        (mnt / "many").mkdir()
        local_dir = base / "local-many"
        local_dir.mkdir()
        for i in range(args.files):
            (mnt / "many" / f"f{i:05d}").write_bytes(b"x")
            (local_dir / f"f{i:05d}").write_bytes(b"x")
        time.sleep(3)
        old_point = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 1))
        time.sleep(1.5)
        _write(mnt / "big.bin", size, b"new version ")
        mount.umount()
        print(f"volume written and shipped in {time.monotonic() - t0:.1f}s")
        server = ApiServer(mount.config, "sw", base / "serve.log")
        local = base / "local-big.bin"
        _write(local, size, b"old version ")
        with httpx.Client(base_url=server.url, headers=auth(READ_TOKEN), timeout=600) as c:
            t0 = time.monotonic()
            c.get("/v1/meta/big.bin", params={"at": old_point}).raise_for_status()
            print(f"point view rebuilt (first request) in {time.monotonic() - t0:.1f}s")
            results = {}
            cpu: dict[str, float] = {}
            pid = server.proc.pid
            for label in ("cold", "warm"):
                c0 = _cpu_seconds(pid)
                t0 = time.monotonic()
                n = 0
                with c.stream("GET", "/v1/content/big.bin", params={"at": old_point}) as r:
                    r.raise_for_status()
                    for chunk in r.iter_bytes(1 << 20):
                        n += len(chunk)
                results[label] = n / (time.monotonic() - t0) / 1e6
                cpu[label] = _cpu_seconds(pid) - c0
                assert n == size
            t0 = time.monotonic()
            with open(local, "rb") as f:
                while f.read(1 << 20):
                    pass
            disk = size / (time.monotonic() - t0) / 1e6
            for label, mbs in results.items():
                print(
                    f"download {args.size_mib} MiB as of an old point ({label}): {mbs:8.1f} MB/s"
                    f"   local read: {disk:8.1f} MB/s   ratio {mbs / disk:.3f}"
                    f"   server CPU {cpu[label]:.2f} s ({size / 1e6 / max(cpu[label], 0.01):.0f}"
                    " MB per CPU-second)"
                )
            rates: dict[str, float] = {}
            for label, at in (("latest", {}), ("old point", {"at": old_point})):
                c.get("/v1/tree/many", params={"limit": 50, **at}).raise_for_status()
                c0 = _cpu_seconds(pid)
                t0 = time.monotonic()
                for i in range(args.requests):
                    cursor = (i * 50) % max(1, args.files - 50)
                    params = {"limit": 50, "cursor": cursor, **at}
                    c.get("/v1/tree/many", params=params).raise_for_status()
                rates[label] = args.requests / (time.monotonic() - t0)
                cpu["list " + label] = (_cpu_seconds(pid) - c0) / args.requests
        t0 = time.monotonic()
        for _ in range(args.requests):
            with os.scandir(local_dir) as it:
                for j, e in enumerate(it):
                    e.stat()
                    if j == 49:
                        break
        local_rps = args.requests / (time.monotonic() - t0)
        for label, api_rps in rates.items():
            print(
                f"listing 50 entries ({label}): {api_rps:8.1f} req/s   local os.scandir+stat: "
                f"{local_rps:8.1f} /s   ratio {api_rps / local_rps:.4f}   server CPU "
                f"{cpu['list ' + label] * 1e3:.2f} ms/request"
            )
        return 0
    finally:
        if server is not None:
            server.stop()
        if mount is not None:
            mount.cleanup()
        sw.stop()


if __name__ == "__main__":
    sys.exit(main())
