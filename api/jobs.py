"""Restore jobs: `vaultsync restore` run in the background, with progress and cancel.

Each job is one asyncio task running `restore.restore()` (the same code as
the CLI, so a job is resumable the same way: files already in place are
skipped). Cancelling cancels the task; restore removes its half-written
temporary file, and what was complete stays. Few jobs run at once (they
share two cores with the server) and only the newest finished jobs are
remembered.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from vaultsync.config import Config
from vaultsync.errors import VaultsyncError
from vaultsync.points.restore import restore

from .errors import ApiError, shown
from .paths import url_path

log = logging.getLogger("vaultsync.api.jobs")

State = Literal["running", "done", "failed", "cancelled"]


@dataclass
class Job:
    id: str
    path: str
    at: str
    destination: str
    force: bool
    bwlimit: int | None = None
    state: State = "running"
    bytes_done: int = 0
    bytes_total: int | None = None
    lsn: int | None = None
    files: int = 0
    dirs: int = 0
    skipped: int = 0
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    started_ns: int = field(default_factory=time.time_ns)
    finished_ns: int | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    def public(self) -> dict[str, Any]:
        """The job as JSON: `path` for people (U+FFFD for bytes that are not UTF-8) and
        `path_url` byte for byte, as listings give it."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "task"}
        return {**out, "path": shown(self.path), "path_url": url_path(self.path)}


class Jobs:
    def __init__(
        self,
        cfg: Config,
        target: str,
        passphrase: str | None,
        max_running: int = 2,
        keep: int = 100,
    ) -> None:
        self.cfg = cfg
        self.target = target
        self.passphrase = passphrase
        self.max_running = max_running
        self.keep = keep
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._ids = itertools.count(1)

    def running(self) -> int:
        return sum(j.state == "running" for j in self._jobs.values())

    def counts(self) -> dict[str, int]:
        out = {"running": 0, "done": 0, "failed": 0, "cancelled": 0}
        for j in self._jobs.values():
            out[j.state] += 1
        return out

    def start(self, path: str, at: str, dest: Path, force: bool, bwlimit: int | None = None) -> Job:
        if self.running() >= self.max_running:
            raise ApiError(
                429,
                "too_many_jobs",
                f"{self.max_running} restore jobs are already running; wait for one to "
                "finish or cancel one",
            )
        job_id = f"r{next(self._ids)}-{time.time_ns() % 10**6:06d}"
        job = Job(job_id, path, at, str(dest), force, bwlimit)
        job.task = asyncio.create_task(self._run(job, dest), name=f"restore-{job.id}")
        self._jobs[job.id] = job
        finished = [k for k, j in self._jobs.items() if j.state != "running"]
        while len(self._jobs) > self.keep and finished:
            self._jobs.pop(finished.pop(0))
        return job

    async def _run(self, job: Job, dest: Path) -> None:
        def progress(n: int) -> None:
            job.bytes_done += n

        def total(n: int) -> None:
            job.bytes_total = n

        try:
            report = await restore(
                self.cfg,
                self.target,
                job.at or None,
                job.path,
                dest,
                self.passphrase,
                force=job.force,
                bwlimit=job.bwlimit,
                confine=self.cfg.api.restore_roots,
                progress=progress,
                total=total,
            )
            job.lsn, job.files, job.dirs = report.lsn, report.files, report.dirs
            job.skipped, job.warnings = report.skipped, report.errors
            job.state = "done"
        except asyncio.CancelledError:
            job.state = "cancelled"
        except VaultsyncError as e:
            job.state, job.error = "failed", str(e)
        except OSError as e:
            job.state, job.error = "failed", f"cannot write the destination: {e}"
        except Exception:
            log.exception("restore job %s failed", job.id)
            job.state, job.error = "failed", "internal error; the server log has the details"
        finally:
            job.finished_ns = time.time_ns()

    def get(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise ApiError(404, "no_such_job", f"no restore job {job_id!r} (it may have expired)")
        return job

    def list(self) -> list[Job]:
        return list(self._jobs.values())

    async def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job.state == "running" and job.task is not None:
            job.task.cancel()
            await asyncio.gather(job.task, return_exceptions=True)
        return job

    async def close(self) -> None:
        for job in self._jobs.values():
            if job.task is not None and not job.task.done():
                job.task.cancel()
        await asyncio.gather(
            *(j.task for j in self._jobs.values() if j.task is not None), return_exceptions=True
        )
