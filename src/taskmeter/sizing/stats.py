"""Per task type figures that sizing needs, from ledgers or from Prometheus.

Both sources produce the same :class:`TaskStats`, defined so that every figure is
computable exactly from the worker's metrics (sums, counts and max gauges) as well as
from TaskReports; only quantiles differ (Prometheus: within histogram bucket
resolution).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from taskmeter.measure.report import STATES, TaskReport


@dataclass(frozen=True)
class TaskStats:
    task: str
    runs: int
    runs_by_state: dict[str, int]
    # Tasks that ended killed (pool child SIGKILLed or OOM-killed, hard time limit) plus
    # tool runs ended by SIGKILL: each may have been an out-of-memory kill.
    kills: int
    wall_sum_s: float
    # Wall split like CPU: tool = while tool subprocesses ran (union), overhead = the rest.
    wall_overhead_sum_s: float
    wall_tool_sum_s: float
    cpu_overhead_sum_s: float
    cpu_tool_sum_s: float
    # Typical memory in use while a task runs: the worker process's time-weighted
    # average RSS, plus, for tasks that run tools, the tools' average (per task means).
    mem_overhead_avg_mean_bytes: float
    mem_tool_avg_mean_bytes: float
    mem_overhead_avg_quantile_bytes: float | None
    mem_tool_avg_quantile_bytes: float | None
    # Exact maxima since the data began.
    overhead_peak_max_bytes: int
    footprint_max_bytes: int
    footprint_median_bytes: float
    # Tasks that died, by TaskReport.cause (killed or lost; "oom" = the kernel's OOM
    # killer), tool runs the OOM killer ended, and the largest single tool peak.
    kills_by_cause: dict[str, int] = field(default_factory=dict)
    tool_oom_kills: int = 0
    tool_peak_max_bytes: int = 0

    @property
    def cpu_sum_s(self) -> float:
        return self.cpu_overhead_sum_s + self.cpu_tool_sum_s

    @property
    def wall_mean_s(self) -> float:
        return self.wall_sum_s / self.runs if self.runs else 0.0

    @property
    def cpu_mean_s(self) -> float:
        return self.cpu_sum_s / self.runs if self.runs else 0.0

    @property
    def cores_busy(self) -> float:
        """Cores a task of this type keeps busy while it runs (CPU / wall)."""
        return self.cpu_sum_s / self.wall_sum_s if self.wall_sum_s > 0 else 0.0

    def typical_bytes(self, percentile: float | None) -> float:
        if percentile is None:
            return self.mem_overhead_avg_mean_bytes + self.mem_tool_avg_mean_bytes
        return (self.mem_overhead_avg_quantile_bytes or 0.0) + (
            self.mem_tool_avg_quantile_bytes or 0.0
        )


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of ``values`` (q in 0..1)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def stats_from_reports(
    reports: Iterable[TaskReport], percentile: float | None = None
) -> dict[str, TaskStats]:
    by_task: dict[str, list[TaskReport]] = {}
    for r in reports:
        by_task.setdefault(r.task, []).append(r)
    out = {}
    for task, rs in sorted(by_task.items()):
        overhead_avgs = [float(r.overhead.rss_avg_bytes) for r in rs]
        tool_avgs = [v for r in rs if (v := r.tool_avg_rss_bytes) is not None]
        states = {s: sum(1 for r in rs if r.state == s) for s in STATES}
        kills = states["killed"] + sum(
            1 for r in rs for t in r.tools if t.outcome in ("killed", "oom")
        )
        causes: dict[str, int] = {}
        for r in rs:
            if r.cause is not None:
                causes[r.cause] = causes.get(r.cause, 0) + 1
        out[task] = TaskStats(
            task=task,
            runs=len(rs),
            runs_by_state={s: n for s, n in states.items() if n},
            kills=kills,
            wall_sum_s=sum(r.wall_s for r in rs),
            wall_overhead_sum_s=sum(r.overhead.wall_s for r in rs),
            wall_tool_sum_s=sum(r.tool_totals.wall_s for r in rs),
            cpu_overhead_sum_s=sum(r.overhead.cpu_s for r in rs),
            cpu_tool_sum_s=sum(r.tool_totals.cpu_s for r in rs),
            mem_overhead_avg_mean_bytes=sum(overhead_avgs) / len(rs),
            mem_tool_avg_mean_bytes=sum(tool_avgs) / len(tool_avgs) if tool_avgs else 0.0,
            mem_overhead_avg_quantile_bytes=(
                None if percentile is None else quantile(overhead_avgs, percentile)
            ),
            mem_tool_avg_quantile_bytes=(
                None if percentile is None or not tool_avgs else quantile(tool_avgs, percentile)
            ),
            overhead_peak_max_bytes=max(r.overhead.rss_peak_bytes for r in rs),
            footprint_max_bytes=max(r.footprint_peak_bytes for r in rs),
            footprint_median_bytes=quantile([float(r.footprint_peak_bytes) for r in rs], 0.5),
            kills_by_cause=dict(sorted(causes.items())),
            tool_oom_kills=sum(1 for r in rs for t in r.tools if t.outcome == "oom"),
            tool_peak_max_bytes=max(r.tool_totals.rss_peak_bytes for r in rs),
        )
    return out


def observed_concurrency(reports: Iterable[TaskReport]) -> int:
    """The most tasks seen running at once on one host (pod): the worker's concurrency
    as far as the data shows it (a lower bound when the worker was never saturated)."""
    from datetime import datetime

    events: dict[str, list[tuple[float, int]]] = {}
    for r in reports:
        start = datetime.fromisoformat(r.started_at).timestamp()
        end = datetime.fromisoformat(r.ended_at).timestamp()
        events.setdefault(r.worker.hostname, []).extend([(start, 1), (end, -1)])
    best = 0
    for evs in events.values():
        running = 0
        for _, delta in sorted(evs, key=lambda e: (e[0], e[1])):  # ends before starts
            running += delta
            best = max(best, running)
    return best
