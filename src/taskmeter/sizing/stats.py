"""Per task type figures that sizing needs, from ledgers or from Prometheus.

Both sources produce the same :class:`TaskStats`, defined so that every figure is
computable exactly from the worker's metrics (sums, counts and max gauges) as well as
from TaskReports; only quantiles differ (Prometheus: within histogram bucket
resolution).

From TaskReports everything streams (:class:`StatsAccumulator`,
:class:`ConcurrencyTracker`): one pass over any number of records, memory bounded by
the number of task types and hosts. Quantiles are exact up to
:attr:`StreamQuantiles.EXACT_MAX` tasks of a type and within 0.5 % beyond.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

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
    # Queue wait of the tasks whose sender stamped it (queue_wait_runs of them).
    queue_wait_sum_s: float = 0.0
    queue_wait_runs: int = 0

    @property
    def queue_wait_mean_s(self) -> float | None:
        """Mean time from publish (or ETA) to start; None when no task was stamped."""
        return self.queue_wait_sum_s / self.queue_wait_runs if self.queue_wait_runs else None

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


class StreamQuantiles:
    """Quantiles of a stream of non-negative numbers in bounded memory.

    Exact (:func:`quantile`, linear interpolation) while it holds at most
    :attr:`EXACT_MAX` values. Beyond, the values move to a histogram of log-spaced bins
    :attr:`RATIO` wide (bin k holds ``RATIO**k <= v < RATIO**(k+1)``, zeros apart) and a
    quantile is the geometric middle of the bin that holds the value of that rank,
    clamped to the exact minimum and maximum: within 0.5 % of a value of the data at the
    quantile's rank (the interpolation between two neighbouring ranks aside). At most
    about 4 400 bins exist for values up to 2**63, whatever the number of values; in
    practice a few hundred. Deterministic: the same values in the same order give the
    same answer.
    """

    EXACT_MAX = 4096
    RATIO = 1.01
    _LOG_RATIO = math.log(RATIO)

    def __init__(self) -> None:
        self.count = 0
        self.min = math.inf
        self.max = -math.inf
        self._values: list[float] | None = []
        self._bins: dict[int, int] = {}
        self._zeros = 0

    def add(self, value: float) -> None:
        self.count += 1
        self.min = min(self.min, value)
        self.max = max(self.max, value)
        if self._values is not None:
            self._values.append(value)
            if len(self._values) > self.EXACT_MAX:
                values, self._values = self._values, None
                for v in values:
                    self._bin(v)
            return
        self._bin(value)

    def _bin(self, value: float) -> None:
        if value <= 0:
            self._zeros += 1
            return
        k = math.floor(math.log(value) / self._LOG_RATIO)
        self._bins[k] = self._bins.get(k, 0) + 1

    @property
    def exact(self) -> bool:
        return self._values is not None

    def quantile(self, q: float) -> float:
        if self._values is not None:
            return quantile(self._values, q)
        rank = math.floor(q * (self.count - 1))  # 0-based rank of the value sought
        if rank <= 0:
            return self.min
        if rank >= self.count - 1:
            return self.max
        seen = self._zeros
        if rank < seen:
            return 0.0
        for k in sorted(self._bins):
            seen += self._bins[k]
            if rank < seen:
                middle: float = self.RATIO ** (k + 0.5)
                return min(max(middle, self.min), self.max)
        return self.max


@dataclass
class _Running:
    """The running figures of one task type (no record is kept)."""

    runs: int = 0
    states: dict[str, int] = field(default_factory=dict)
    tool_kills: int = 0
    tool_oom_kills: int = 0
    causes: dict[str, int] = field(default_factory=dict)
    wall: float = 0.0
    wall_overhead: float = 0.0
    wall_tool: float = 0.0
    cpu_overhead: float = 0.0
    cpu_tool: float = 0.0
    overhead_avg_sum: float = 0.0
    tool_avg_sum: float = 0.0
    tool_avg_count: int = 0
    overhead_peak_max: int = 0
    footprint_max: int = 0
    tool_peak_max: int = 0
    queue_wait: float = 0.0
    queue_wait_runs: int = 0
    footprint: StreamQuantiles = field(default_factory=StreamQuantiles)
    overhead_avgs: StreamQuantiles | None = None
    tool_avgs: StreamQuantiles | None = None


class StatsAccumulator:
    """:class:`TaskStats` per task type from a stream of TaskReports, one at a time.

    Memory grows with the number of task types, not of tasks: sums, counts and maxima
    are running figures, and the quantiles (``percentile`` of the average memory, the
    footprint median) come from a :class:`StreamQuantiles` per figure, exact up to its
    :attr:`~StreamQuantiles.EXACT_MAX` tasks per type and within 0.5 % beyond.
    """

    def __init__(self, percentile: float | None = None) -> None:
        self.percentile = percentile
        self._by_task: dict[str, _Running] = {}

    def add(self, r: TaskReport) -> None:
        a = self._by_task.get(r.task)
        if a is None:
            a = self._by_task[r.task] = _Running()
            if self.percentile is not None:
                a.overhead_avgs, a.tool_avgs = StreamQuantiles(), StreamQuantiles()
        a.runs += 1
        a.states[r.state] = a.states.get(r.state, 0) + 1
        for t in r.tools:
            outcome = t.outcome
            if outcome in ("killed", "oom"):
                a.tool_kills += 1
                if outcome == "oom":
                    a.tool_oom_kills += 1
        # As the worker counts celery_task_kills_total: a killed or lost task without a
        # cause is "unknown".
        cause = r.cause or ("unknown" if r.state in ("killed", "lost") else None)
        if cause is not None:
            a.causes[cause] = a.causes.get(cause, 0) + 1
        a.wall += r.wall_s
        a.wall_overhead += r.overhead.wall_s
        a.wall_tool += r.tool_totals.wall_s
        a.cpu_overhead += r.overhead.cpu_s
        a.cpu_tool += r.tool_totals.cpu_s
        overhead_avg = float(r.overhead.rss_avg_bytes)
        a.overhead_avg_sum += overhead_avg
        tool_avg = r.tool_avg_rss_bytes
        if tool_avg is not None:
            a.tool_avg_sum += tool_avg
            a.tool_avg_count += 1
        if a.overhead_avgs is not None and a.tool_avgs is not None:
            a.overhead_avgs.add(overhead_avg)
            if tool_avg is not None:
                a.tool_avgs.add(tool_avg)
        a.overhead_peak_max = max(a.overhead_peak_max, r.overhead.rss_peak_bytes)
        a.footprint_max = max(a.footprint_max, r.footprint_peak_bytes)
        a.tool_peak_max = max(a.tool_peak_max, r.tool_totals.rss_peak_bytes)
        a.footprint.add(float(r.footprint_peak_bytes))
        if r.queue_wait_s is not None:
            a.queue_wait += r.queue_wait_s
            a.queue_wait_runs += 1

    @property
    def runs(self) -> int:
        return sum(a.runs for a in self._by_task.values())

    @property
    def exact(self) -> bool:
        """True while every quantile is exact (no task type beyond EXACT_MAX tasks)."""
        return all(a.footprint.exact for a in self._by_task.values())

    def result(self) -> dict[str, TaskStats]:
        pct = self.percentile
        out = {}
        for task, a in sorted(self._by_task.items()):
            states: dict[str, int] = {s: a.states[s] for s in STATES if a.states.get(s)}
            states.update((s, n) for s, n in sorted(a.states.items()) if s not in states)
            out[task] = TaskStats(
                task=task,
                runs=a.runs,
                runs_by_state=states,
                kills=a.states.get("killed", 0) + a.tool_kills,
                wall_sum_s=a.wall,
                wall_overhead_sum_s=a.wall_overhead,
                wall_tool_sum_s=a.wall_tool,
                cpu_overhead_sum_s=a.cpu_overhead,
                cpu_tool_sum_s=a.cpu_tool,
                mem_overhead_avg_mean_bytes=a.overhead_avg_sum / a.runs,
                mem_tool_avg_mean_bytes=(
                    a.tool_avg_sum / a.tool_avg_count if a.tool_avg_count else 0.0
                ),
                mem_overhead_avg_quantile_bytes=(
                    None if pct is None or a.overhead_avgs is None
                    else a.overhead_avgs.quantile(pct)
                ),
                mem_tool_avg_quantile_bytes=(
                    None if pct is None or a.tool_avgs is None or not a.tool_avgs.count
                    else a.tool_avgs.quantile(pct)
                ),
                overhead_peak_max_bytes=a.overhead_peak_max,
                footprint_max_bytes=a.footprint_max,
                footprint_median_bytes=a.footprint.quantile(0.5),
                kills_by_cause=dict(sorted(a.causes.items())),
                tool_oom_kills=a.tool_oom_kills,
                tool_peak_max_bytes=a.tool_peak_max,
                queue_wait_sum_s=a.queue_wait,
                queue_wait_runs=a.queue_wait_runs,
            )  # fmt: skip
        return out


def stats_from_reports(
    reports: Iterable[TaskReport], percentile: float | None = None
) -> dict[str, TaskStats]:
    """:class:`TaskStats` per task type; consumes ``reports`` once, keeping none of them
    (see :class:`StatsAccumulator`)."""
    acc = StatsAccumulator(percentile)
    for r in reports:
        acc.add(r)
    return acc.result()


class ConcurrencyTracker:
    """The most tasks seen running at once on one host (pod), from a stream of records.

    A task runs over ``[started_at, ended_at)`` (a task ending at the instant another
    starts does not overlap it). Exact when each host's records come roughly in the
    order they ended, as a ledger or a log stream has them: per host it keeps only the
    tasks that ended within the longest task wall seen so far (plus
    :attr:`SLACK_S`) of the latest end, and at most :attr:`MAX_KEPT` of them, so memory
    is bounded by the hosts and their concurrency, not by the number of tasks. When a
    record starts before what was already let go on its host (records far out of order,
    e.g. an older rotated file read after a newer one, or a task longer than any before
    it), :attr:`exact` turns False and :attr:`value` is a lower bound.
    """

    SLACK_S = 300.0
    MAX_KEPT = 10_000

    def __init__(self) -> None:
        self.value = 0
        self.exact = True
        self._hosts: dict[str, _HostIntervals] = {}

    def add(self, r: TaskReport) -> None:
        start = _epoch(r.started_at)
        end = max(start, _epoch(r.ended_at))
        host = self._hosts.get(r.worker.hostname)
        if host is None:
            host = self._hosts[r.worker.hostname] = _HostIntervals()
        depth, exact = host.add(start, end, self.SLACK_S, self.MAX_KEPT)
        self.value = max(self.value, depth)
        self.exact = self.exact and exact


class _HostIntervals:
    def __init__(self) -> None:
        self.items: list[tuple[float, float]] = []  # (end, start), sorted
        self.lo = 0  # items before lo were let go
        self.horizon = -math.inf  # every interval let go ended at or before this
        self.latest_end = -math.inf
        self.longest = 0.0

    def add(self, start: float, end: float, slack: float, max_kept: int) -> tuple[int, bool]:
        exact = start >= self.horizon
        items = self.items
        i = bisect.bisect_right(items, (start, math.inf), lo=self.lo)
        events = [(start, 1), (end, -1)]
        for e, s in items[i:]:
            if s < end:
                events.append((max(s, start), 1))
                events.append((e, -1))
        events.sort()  # at equal times ends (-1) come before starts
        depth = running = 0
        for _, delta in events:
            running += delta
            depth = max(depth, running)
        bisect.insort(items, (end, start), lo=self.lo)
        self.latest_end = max(self.latest_end, end)
        self.longest = max(self.longest, end - start)
        cutoff = self.latest_end - self.longest - slack
        lo = self.lo
        while lo < len(items) and (items[lo][0] <= cutoff or len(items) - lo > max_kept):
            self.horizon = max(self.horizon, items[lo][0])
            lo += 1
        if lo > 1024 and lo * 2 > len(items):
            del items[:lo]
            lo = 0
        self.lo = lo
        return depth, exact


def observed_concurrency(reports: Iterable[TaskReport]) -> int:
    """The most tasks seen running at once on one host (pod): the worker's concurrency
    as far as the data shows it (a lower bound when the worker was never saturated).
    Streams (see :class:`ConcurrencyTracker`)."""
    tracker = ConcurrencyTracker()
    for r in reports:
        tracker.add(r)
    return tracker.value


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()
