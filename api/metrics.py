"""Prometheus text exposition (format 0.0.4) at /metrics, written by hand.

A handful of series does not justify a client library: request counts by
route template, bytes sent, point-view cache figures, restore jobs by state,
and the volume and per-target replication numbers from `gather_status`
(without probing: a scrape must be cheap and must not touch the providers).

Every label value a request decides comes from a fixed set, so no client can
add series: the route is the matched template (never the raw path), the
method one of the standard ones or "other" (any token is a valid method to
HTTP, and `-X M1234` each made a series that lived as long as the server),
the status a three-digit code the server itself sent. The other labels come
from the config (volume and target names), escaped.
"""

from __future__ import annotations

from collections import Counter
from typing import Any


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**kw: str) -> str:
    if not kw:
        return ""
    return "{" + ",".join(f'{k}="{_esc(v)}"' for k, v in kw.items()) + "}"


METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class Metrics:
    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str, str]] = Counter()
        self.bytes_sent = 0

    def count(self, method: str, route: str, status: int) -> None:
        """One request; `route` must be a route template or a fixed word, never the path."""
        label = method if method in METHODS else "other"
        code = str(status) if 100 <= status <= 599 else "other"
        self.requests[(label, route, code)] += 1

    def render(
        self,
        status: dict[str, Any],
        views: tuple[int, int, int],
        jobs: dict[str, int],
    ) -> str:
        lines: list[str] = []

        def metric(
            name: str, kind: str, help_: str, rows: list[tuple[dict[str, str], float]]
        ) -> None:
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in rows:
                lines.append(f"{name}{_labels(**labels)} {value:g}")

        metric(
            "vaultsync_api_requests_total",
            "counter",
            "API requests by method, route and status.",
            [
                ({"method": m, "route": r, "status": s}, n)
                for (m, r, s), n in sorted(self.requests.items())
            ],
        )
        metric(
            "vaultsync_api_download_bytes_total",
            "counter",
            "File bytes sent.",
            [({}, self.bytes_sent)],
        )
        size, hits, misses = views
        metric("vaultsync_api_point_views", "gauge", "Point views held in the cache.", [({}, size)])
        metric(
            "vaultsync_api_point_view_hits_total",
            "counter",
            "Requests served by a cached view.",
            [({}, hits)],
        )
        metric(
            "vaultsync_api_point_view_rebuilds_total",
            "counter",
            "Point views rebuilt.",
            [({}, misses)],
        )
        metric(
            "vaultsync_api_restore_jobs",
            "gauge",
            "Remembered restore jobs by state.",
            [({"state": k}, v) for k, v in sorted(jobs.items())],
        )
        vol = status.get("volume", {})
        metric(
            "vaultsync_volume_last_lsn",
            "gauge",
            "Newest committed LSN (local catalog).",
            [({"volume": str(vol.get("name", ""))}, float(vol.get("last_lsn") or 0))],
        )
        targets = status.get("targets", [])
        for key, help_ in (
            ("watermark_lsn", "Newest LSN the target holds."),
            ("lag_lsn", "Transactions the target is behind."),
            ("lag_bytes", "Bytes the target is behind."),
            ("lag_seconds", "Seconds the target is behind."),
        ):
            rows = [
                ({"target": t["name"]}, float(t[key])) for t in targets if t.get(key) is not None
            ]
            metric(f"vaultsync_target_{key}", "gauge", help_, rows)
        metric(
            "vaultsync_target_healthy",
            "gauge",
            "1 when the target is healthy.",
            [
                ({"target": t["name"]}, 1.0 if t.get("health") == "healthy" else 0.0)
                for t in targets
            ],
        )
        return "\n".join(lines) + "\n"
