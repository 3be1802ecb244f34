"""Exact aggregation of :class:`TaskReport` records into Prometheus metrics.

:class:`TaskMetrics` is a *custom collector*: it keeps its own counts, sums and bucket
counts and builds metric families when scraped. It deliberately uses no
``prometheus_client`` ``Counter``/``Histogram`` objects: those choose their value
class at import time and break (or silently write mmap files) when the user has set
``PROMETHEUS_MULTIPROC_DIR``. One instance lives in one process (the Celery main
worker process) and is fed the finished reports of every pool child.

Metrics (the names are a contract, see DESIGN.md; base units: seconds, bytes)::

    celery_task_runs_total{task,state}                    counter
    celery_task_wall_seconds{task}                        histogram
    celery_task_cpu_seconds{task,component}               histogram
    celery_task_cpu_seconds_total{task,component}         counter
    celery_task_memory_avg_bytes{task,component}          histogram
    celery_task_memory_peak_bytes{task,component}         histogram
    celery_task_memory_peak_bytes_max{task,component}     gauge
    celery_task_footprint_peak_bytes{task}                histogram
    celery_task_footprint_peak_bytes_max{task}            gauge   (addition to DESIGN)
    celery_task_tool_runs_total{task,tool,outcome}        counter
    celery_task_phase_wall_seconds{task,phase}            histogram
    celery_task_inflight{task}                            gauge
    celery_task_inflight_rss_bytes{task,component}        gauge   (addition to DESIGN)
    taskmeter_labels_folded_total{label}                  counter (cardinality guard)

``component`` is ``overhead`` (the worker process's own share) or ``tool`` (the
external tool subprocesses). Every report, whatever its state, is observed in every
histogram: a killed task's peak matters most for sizing. The ``*_max`` gauges hold
the exact maximum since the worker started, because a limit must cover the largest
peak actually seen, not a bucket's upper bound.

Cardinality is bounded: no task id, argument or argv ever becomes a label; at most
``max_task_names`` task names are kept (later ones are folded into ``task="other"``)
and at most ``max_values_per_label`` tool and phase values per task (later ones are
folded into ``"other"``). Every fold is counted in ``taskmeter_labels_folded_total``.
"""

from __future__ import annotations

import bisect
import functools
import logging
import math
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from taskmeter.measure.report import STATES, TaskReport

__all__ = [
    "JOURNAL_RECOVERED",
    "LEDGER_DROPPED",
    "LEDGER_ERRORS",
    "MEMORY_BUCKETS",
    "OTHER",
    "TIME_BUCKETS",
    "InflightTask",
    "ProcessCounter",
    "TaskMetrics",
]

log = logging.getLogger(__name__)


class ProcessCounter:
    """A process-wide, thread-safe counter with no labels (``.inc(n)``).

    Exported by every :class:`TaskMetrics` of the process under ``name``."""

    def __init__(self, name: str, documentation: str) -> None:
        self.name = name
        self.documentation = documentation
        self._lock = threading.Lock()
        self._value = 0.0

    def inc(self, n: float = 1.0) -> None:
        if n < 0:
            raise ValueError(f"{self.name}: counters only go up (inc({n!r}))")
        with self._lock:
            self._value += n
        _bump_generation()

    @property
    def value(self) -> float:
        with self._lock:
            return self._value


# Bumped by every change any metrics object of this process sees (a rendered scrape
# can be reused while it has not moved).
_GENERATION = [0]
_GENERATION_LOCK = threading.Lock()


def _bump_generation() -> None:
    with _GENERATION_LOCK:
        _GENERATION[0] += 1


LEDGER_ERRORS = ProcessCounter(
    "taskmeter_ledger_errors",
    "Ledger writes that failed (the record was not written).",
)
LEDGER_DROPPED = ProcessCounter(
    "taskmeter_ledger_rotation_dropped_records",
    "Ledger records dropped because of rotation.",
)
JOURNAL_RECOVERED = ProcessCounter(
    "taskmeter_journal_recovered_tasks",
    "Tasks found unfinished in the journal at worker start and recorded as lost.",
)
PROCESS_COUNTERS: tuple[ProcessCounter, ...] = (LEDGER_ERRORS, LEDGER_DROPPED, JOURNAL_RECOVERED)

OTHER = "other"
COMPONENTS = ("overhead", "tool")

_MIB = 2**20
_GIB = 2**30


def _memory_buckets() -> tuple[float, ...]:
    """Byte bounds from 1 MiB growing by at most x1.25 per step, up to >= 64 GiB.

    Each bound is the previous one times 1.25 rounded *down* to a whole byte, so no
    step is ever wider than x1.25 (the sizing error a bucket can hide is < 25 %).
    """
    bounds = [_MIB]
    while bounds[-1] < 64 * _GIB:
        bounds.append(bounds[-1] * 5 // 4)
    return tuple(float(b) for b in bounds)


def _time_buckets() -> tuple[float, ...]:
    """Seconds in a 1-2-5 sequence from 1 ms, ending with one day (86400 s)."""
    bounds: list[float] = []
    for exponent in range(-3, 5):
        for mantissa in (1, 2, 5):
            bounds.append(round(mantissa * 10.0**exponent, 3))
    bounds.append(86400.0)
    return tuple(bounds)


MEMORY_BUCKETS: tuple[float, ...] = _memory_buckets()
"""Upper bounds (bytes) of the memory histograms, +Inf excluded."""
TIME_BUCKETS: tuple[float, ...] = _time_buckets()
"""Upper bounds (seconds) of the time histograms, +Inf excluded."""


# prometheus_client's own "le" formatting (Go-style floats), so these buckets read like
# any other client's; it is untyped upstream.
_go_float: Callable[[float], str] = floatToGoString


@functools.cache
def _le_labels(bounds: tuple[float, ...]) -> tuple[str, ...]:
    return (*(_go_float(b) for b in bounds), "+Inf")


@dataclass(frozen=True)
class InflightTask:
    """A task running right now, as the integration sees it at scrape time."""

    task: str
    task_id: str | None
    pid: int
    started_at: float  # epoch seconds
    worker_rss_bytes: int
    tools_rss_bytes: int


@dataclass
class _Histogram:
    """Non-cumulative bucket counts (last slot: above the last bound), exact sum."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        # "le" semantics: a value equal to a bound belongs in that bound's bucket.
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.n += 1

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for le, count in zip(_le_labels(self.bounds), self.counts, strict=True):
            running += count
            out.append((le, float(running)))
        return out


# name -> (help, label names, bounds)
_HISTOGRAMS: dict[str, tuple[str, tuple[str, ...], tuple[float, ...]]] = {
    "celery_task_wall_seconds": (
        "Wall-clock time of each task, start to end (seconds).",
        ("task",),
        TIME_BUCKETS,
    ),
    "celery_task_cpu_seconds": (
        "CPU time of each task (seconds): component=overhead is the worker process's "
        "own CPU, component=tool the summed CPU of its tool subprocesses (0 when none).",
        ("task", "component"),
        TIME_BUCKETS,
    ),
    "celery_task_memory_avg_bytes": (
        "Average RSS per task (bytes): component=overhead is the worker process; "
        "component=tool the wall-weighted mean of its tool runs' average RSS (only "
        "tasks that ran tools). Per process, never summed across processes.",
        ("task", "component"),
        MEMORY_BUCKETS,
    ),
    "celery_task_memory_peak_bytes": (
        "Peak RSS per task (bytes): component=overhead is the worker process; "
        "component=tool the largest peak of a single tool process (only tasks that "
        "ran tools).",
        ("task", "component"),
        MEMORY_BUCKETS,
    ),
    "celery_task_footprint_peak_bytes": (
        "Peak per task of worker RSS plus the RSS of the tools alive at that moment "
        "(bytes): what the container must hold at once.",
        ("task",),
        MEMORY_BUCKETS,
    ),
    "celery_task_phase_wall_seconds": (
        "Wall-clock time of each named phase of a task (seconds).",
        ("task", "phase"),
        TIME_BUCKETS,
    ),
}

# name (as exposed, with _total) -> (help, label names)
_COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "celery_task_runs_total": (
        "Task runs by final state (success, failure, retry, revoked, killed).",
        ("task", "state"),
    ),
    "celery_task_cpu_seconds_total": (
        "CPU seconds consumed by tasks, by component (overhead: worker process; tool: "
        "tool subprocesses). rate() of it is the number of cores in use.",
        ("task", "component"),
    ),
    "celery_task_wall_seconds_total": (
        "Wall seconds of tasks, by component: tool = the time tool subprocesses ran "
        "(union of their runs), overhead = the rest (the seed's DivBase overhead wall).",
        ("task", "component"),
    ),
    "celery_task_tool_runs_total": (
        "Tool subprocess runs by executable basename and outcome (ok, error, "
        "killed = SIGKILL, signal = any other signal, running).",
        ("task", "tool", "outcome"),
    ),
    "taskmeter_labels_folded_total": (
        "Observations whose label value was folded into 'other' because the label "
        "(task, tool or phase) reached its cardinality bound.",
        ("label",),
    ),
}

# name -> (help, label names)
_MAX_GAUGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "celery_task_memory_peak_bytes_max": (
        "Largest per-task peak RSS seen since the worker started (bytes), by component; "
        "exact, unlike a histogram bucket.",
        ("task", "component"),
    ),
    "celery_task_footprint_peak_bytes_max": (
        "Largest per-task footprint peak (worker plus tools alive at once) seen since "
        "the worker started (bytes); exact, unlike a histogram bucket.",
        ("task",),
    ),
}

_INFLIGHT_HELP = "Tasks running right now (0 for every task name seen so far)."
_INFLIGHT_RSS_HELP = (
    "Current RSS of the tasks running right now, summed over the tasks of that name "
    "(bytes): component=overhead their worker processes, component=tool their tools."
)


class TaskMetrics:
    """Prometheus collector aggregating finished :class:`TaskReport` records.

    Register it once (``REGISTRY.register(metrics)``) and feed it with
    :meth:`observe`. Thread-safe: :meth:`observe` and :meth:`count_run` may be
    called from any thread while :meth:`collect` serves scrapes.

    ``inflight``, if given, is called at every scrape (outside the lock) and returns
    the tasks running right now, for ``celery_task_inflight`` and
    ``celery_task_inflight_rss_bytes``.
    """

    def __init__(
        self,
        *,
        max_task_names: int = 500,
        max_values_per_label: int = 50,
        inflight: Callable[[], list[InflightTask]] | None = None,
    ) -> None:
        if max_task_names < 1 or max_values_per_label < 1:
            raise ValueError("max_task_names and max_values_per_label must be >= 1")
        self.max_task_names = max_task_names
        self.max_values_per_label = max_values_per_label
        self.inflight = inflight
        self._lock = threading.Lock()
        # Task label values in order of first sight ("other" included once used).
        self._tasks: dict[str, None] = {}
        self._known_names = 0
        # Per task label: the tool and phase values kept so far.
        self._values: dict[tuple[str, str], set[str]] = {}
        self._counters: dict[str, dict[tuple[str, ...], float]] = {n: {} for n in _COUNTERS}
        self._histograms: dict[str, dict[tuple[str, ...], _Histogram]] = {
            n: {} for n in _HISTOGRAMS
        }
        self._max: dict[str, dict[tuple[str, ...], float]] = {n: {} for n in _MAX_GAUGES}

    # -- feeding ----------------------------------------------------------------------
    def observe(self, report: TaskReport) -> None:
        """Account one finished (or killed) task."""
        if report.state not in STATES:
            raise ValueError(f"report state {report.state!r}: expected one of {STATES}")
        with self._lock:
            task = self._task_label(report.task)
            self._inc("celery_task_runs_total", (task, report.state))
            self._hist("celery_task_wall_seconds", (task,), report.wall_s)

            cpu = {"overhead": report.overhead.cpu_s, "tool": report.tool_totals.cpu_s}
            for component, seconds in cpu.items():
                self._hist("celery_task_cpu_seconds", (task, component), seconds)
                self._inc("celery_task_cpu_seconds_total", (task, component), seconds)
            wall = {"overhead": report.overhead.wall_s, "tool": report.tool_totals.wall_s}
            for component, seconds in wall.items():
                self._inc("celery_task_wall_seconds_total", (task, component), seconds)

            avg = {"overhead": float(report.overhead.rss_avg_bytes)}
            peak = {"overhead": float(report.overhead.rss_peak_bytes)}
            tool_avg = report.tool_avg_rss_bytes
            if tool_avg is not None:
                avg["tool"] = tool_avg
                peak["tool"] = float(report.tool_totals.rss_peak_bytes)
            for component, value in avg.items():
                self._hist("celery_task_memory_avg_bytes", (task, component), value)
            for component, value in peak.items():
                self._hist("celery_task_memory_peak_bytes", (task, component), value)
                self._raise_max("celery_task_memory_peak_bytes_max", (task, component), value)

            footprint = float(report.footprint_peak_bytes)
            self._hist("celery_task_footprint_peak_bytes", (task,), footprint)
            self._raise_max("celery_task_footprint_peak_bytes_max", (task,), footprint)

            for run in report.tools:
                tool = self._value_label(task, "tool", os.path.basename(run.exe) or "unknown")
                self._inc("celery_task_tool_runs_total", (task, tool, run.outcome))
            for phase in report.phases:
                name = self._value_label(task, "phase", phase.name)
                self._hist("celery_task_phase_wall_seconds", (task, name), phase.wall_s)

    def declare(self, tasks: Iterable[str]) -> None:
        """Task names known before any of them runs (a worker's registered tasks): their
        series start at zero, so rate() and increase() see even the first run."""
        with self._lock:
            for name in tasks:
                self._task_label(name, count_fold=False)

    def count_run(self, task: str, state: str) -> None:
        """Count a run that produced no report (e.g. revoked while still queued)."""
        if state not in STATES:
            raise ValueError(f"state {state!r}: expected one of {', '.join(STATES)}")
        with self._lock:
            self._inc("celery_task_runs_total", (self._task_label(task), state))

    # -- label bounds (call with the lock held) ---------------------------------------
    def _task_label(self, name: str, *, count_fold: bool = True) -> str:
        if name in self._tasks:
            return name
        if self._known_names < self.max_task_names:
            self._known_names += 1
            self._tasks[name] = None
            return name
        if count_fold:
            self._inc("taskmeter_labels_folded_total", ("task",))
        self._tasks.setdefault(OTHER, None)
        return OTHER

    def _value_label(self, task: str, label: str, value: str) -> str:
        kept = self._values.setdefault((task, label), set())
        if value in kept:
            return value
        if len(kept) < self.max_values_per_label:
            kept.add(value)
            return value
        self._inc("taskmeter_labels_folded_total", (label,))
        return OTHER

    def _inc(self, name: str, labels: tuple[str, ...], amount: float = 1.0) -> None:
        series = self._counters[name]
        series[labels] = series.get(labels, 0.0) + amount

    def _hist(self, name: str, labels: tuple[str, ...], value: float) -> None:
        series = self._histograms[name]
        hist = series.get(labels)
        if hist is None:
            hist = series[labels] = _Histogram(_HISTOGRAMS[name][2])
        hist.observe(value)

    def _raise_max(self, name: str, labels: tuple[str, ...], value: float) -> None:
        series = self._max[name]
        if value > series.get(labels, -math.inf):
            series[labels] = value

    # -- exposition -------------------------------------------------------------------
    def describe(self) -> list[Metric]:
        """Nothing: the registry then skips its name-clash check for this collector
        (``celery_task_cpu_seconds`` and ``celery_task_cpu_seconds_total`` are both
        contract names) and never calls :meth:`collect` at registration."""
        return []

    def collect(self) -> Iterator[Metric]:
        running = self._read_inflight()
        with self._lock:
            labelled = None
            if running is not None:
                # A name first seen in flight takes a place like any other (its folds
                # are not counted: they would recount at every scrape).
                labelled = [(self._task_label(t.task, count_fold=False), t) for t in running]
            families = self._families(labelled)
        yield from families

    def _read_inflight(self) -> list[InflightTask] | None:
        if self.inflight is None:
            return []
        try:
            return list(self.inflight())
        except Exception:  # a scrape must not fail because of the integration
            log.exception("taskmeter: the inflight callable failed; inflight omitted")
            return None

    def _families(self, inflight: Iterable[tuple[str, InflightTask]] | None) -> list[Metric]:
        families: list[Metric] = []
        tasks = list(self._tasks)

        for name, (doc, labels) in _COUNTERS.items():
            counter = CounterMetricFamily(name, doc, labels=labels)
            series = dict(self._counters[name])
            # Explicit zeros, so rate() sees the first increment of every series.
            if name == "celery_task_runs_total":
                for task in tasks:
                    for state in STATES:
                        series.setdefault((task, state), 0.0)
            elif name in ("celery_task_cpu_seconds_total", "celery_task_wall_seconds_total"):
                for task in tasks:
                    for component in COMPONENTS:
                        series.setdefault((task, component), 0.0)
            elif name == "taskmeter_labels_folded_total":
                for label in ("task", "tool", "phase"):
                    series.setdefault((label,), 0.0)
            for key, value in sorted(series.items()):
                counter.add_metric(list(key), value)
            families.append(counter)
        for pc in PROCESS_COUNTERS:
            process_family = CounterMetricFamily(pc.name, pc.documentation)
            process_family.add_metric([], pc.value)
            families.append(process_family)

        for name, (doc, labels, bounds) in _HISTOGRAMS.items():
            histogram = HistogramMetricFamily(name, doc, labels=labels)
            hists = dict(self._histograms[name])
            # Empty histograms for every known task, for the same reason as the zeros.
            if labels == ("task",):
                for task in tasks:
                    hists.setdefault((task,), _Histogram(bounds))
            elif name == "celery_task_cpu_seconds":  # observed for both, every task
                for task in tasks:
                    for component in COMPONENTS:
                        hists.setdefault((task, component), _Histogram(bounds))
            elif labels == ("task", "component"):
                # Memory of tools exists only for tasks that run tools: no empty tool
                # series (54 samples each) for the tasks that never do.
                for task in tasks:
                    hists.setdefault((task, "overhead"), _Histogram(bounds))
            for key, hist in sorted(hists.items()):
                histogram.add_metric(list(key), hist.cumulative(), hist.total)
            families.append(histogram)

        for name, (doc, labels) in _MAX_GAUGES.items():
            gauge = GaugeMetricFamily(name, doc, labels=labels)
            for key, value in sorted(self._max[name].items()):
                gauge.add_metric(list(key), value)
            families.append(gauge)

        if inflight is not None:
            running = dict.fromkeys(tasks, 0)
            rss = {(t, c): 0 for t in tasks for c in COMPONENTS}
            for task, info in inflight:
                running[task] = running.get(task, 0) + 1
                rss[(task, "overhead")] = rss.get((task, "overhead"), 0) + info.worker_rss_bytes
                rss[(task, "tool")] = rss.get((task, "tool"), 0) + info.tools_rss_bytes
            count_family = GaugeMetricFamily(
                "celery_task_inflight", _INFLIGHT_HELP, labels=["task"]
            )
            for task, n in sorted(running.items()):
                count_family.add_metric([task], n)
            rss_family = GaugeMetricFamily(
                "celery_task_inflight_rss_bytes", _INFLIGHT_RSS_HELP, labels=["task", "component"]
            )
            for (task, component), value in sorted(rss.items()):
                rss_family.add_metric([task, component], value)
            families += [count_family, rss_family]
        return families

    # -- debugging --------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """A plain copy of the aggregated state (no in-flight figures)::

            {"tasks": [...], "counters": {name: {labels: value}},
             "histograms": {name: {labels: {"count", "sum", "buckets"}}},
             "max": {name: {labels: value}}}

        where ``labels`` are tuples of label values in the order of the metric's
        label names and ``buckets`` lists non-cumulative counts (the last one above
        the last bound).
        """
        with self._lock:
            return {
                "tasks": list(self._tasks),
                "counters": {n: dict(s) for n, s in self._counters.items()},
                "histograms": {
                    n: {
                        k: {"count": h.n, "sum": h.total, "buckets": list(h.counts)}
                        for k, h in s.items()
                    }
                    for n, s in self._histograms.items()
                },
                "max": {n: dict(s) for n, s in self._max.items()},
            }
