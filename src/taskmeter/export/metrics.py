"""Exact aggregation of :class:`TaskReport` records into Prometheus metrics.

:class:`TaskMetrics` is a *custom collector*: it keeps its own counts, sums and bucket
counts and renders its own exposition text. It deliberately uses no
``prometheus_client`` ``Counter``/``Histogram`` objects: those choose their value
class at import time and break (or silently write mmap files) when the user has set
``PROMETHEUS_MULTIPROC_DIR``. One instance lives in one process (the Celery main
worker process) and is fed the finished reports of every pool child.

Metrics (the names are a contract, see DESIGN.md and the helper contract; base units:
seconds, bytes)::

    celery_task_runs_total{task,state}                       counter
    celery_task_kills_total{task,cause}                      counter
    celery_task_wall_seconds{task}                           histogram (exemplars)
    celery_task_queue_wait_seconds{task}                     histogram
    celery_task_memory_peak_bytes{task,component}            histogram (exemplars)
    celery_task_footprint_peak_bytes{task}                   histogram (exemplars)
    celery_task_memory_avg_bytes{task,component}             summary (_sum, _count)
    celery_task_memory_peak_bytes_max{task,component}        gauge
    celery_task_footprint_peak_bytes_max{task}               gauge
    celery_task_cpu_seconds_total{task,component}            counter
    celery_task_component_wall_seconds_total{task,component} counter
    celery_task_tool_runs_total{task,tool,outcome}           counter
    celery_task_phase_wall_seconds_total{task,phase}         counter
    celery_task_inflight{task}                               gauge
    celery_task_inflight_rss_bytes{task,component}           gauge
    taskmeter_worker_info{pool,concurrency}                  gauge (= 1)
    taskmeter_labels_folded_total{label}                     counter (cardinality guard)
    taskmeter_ledger_errors_total                            counter
    taskmeter_ledger_rotation_dropped_records_total          counter
    taskmeter_journal_recovered_tasks_total                  counter

``component`` is ``overhead`` (the worker process's own share) or ``tool`` (the
external tool subprocesses). Every report, whatever its state, is observed: a killed
task's peak matters most for sizing. Means are exact (``_sum / _count``, or a counter
divided by the runs); the ``*_max`` gauges hold the exact maximum since the worker
started, because a limit must cover the largest peak actually seen, not a bucket's
upper bound. The histograms serve quantiles (within one bucket) and, in the OpenMetrics
format only, an exemplar per bucket naming the task id of its latest observation.

The scrape stays small: at most 80 series per task type that runs tools (one tool, three
phases, two kill causes; see docs/celery.md). Cardinality is bounded: no task id,
argument or argv ever becomes a label; at most ``max_task_names`` task names are kept
(later ones are folded into ``task="other"``) and at most ``max_values_per_label`` tool
and phase values per task (later ones are folded into ``"other"``). Every fold is
counted in ``taskmeter_labels_folded_total``.

Rendering is cached: every series keeps its rendered lines until it changes, every
family its joined text, so a scrape of an unchanged registry joins cached strings and
a scrape after one task re-renders only that task's series. ``collect()`` yields
:class:`CachedFamily` objects; the worker's endpoint (export/server.py) asks them for
their text, anything else (``generate_latest``) reads their ``samples`` as usual.
"""

from __future__ import annotations

import bisect
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Exemplar, Sample
from prometheus_client.utils import floatToGoString

from taskmeter.measure.report import CAUSES, STATES, TaskReport

__all__ = [
    "JOURNAL_RECOVERED",
    "LEDGER_DROPPED",
    "LEDGER_ERRORS",
    "MEMORY_BUCKETS",
    "OTHER",
    "QUEUE_WAIT_BUCKETS",
    "TIME_BUCKETS",
    "WALL_BUCKETS",
    "CachedFamily",
    "InflightTask",
    "ProcessCounter",
    "TaskMetrics",
]

log = logging.getLogger(__name__)


class ProcessCounter:
    """A process-wide, thread-safe counter with no labels (``.inc(n)``).

    Exported by every :class:`TaskMetrics` of the process under ``name`` + ``_total``."""

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

    @property
    def value(self) -> float:
        with self._lock:
            return self._value


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
# ToolRun.outcome values; anything else (a malformed record) is counted as "other".
TOOL_OUTCOMES = frozenset(
    {"ok", "error", "killed", "signal", "running", "untracked", "oom", "orphan-killed", "lost"}
)

_MIB = 2**20
_GIB = 2**30

MEMORY_BUCKETS: tuple[float, ...] = tuple(
    float(b) for b in (16 * _MIB, 64 * _MIB, 256 * _MIB, _GIB, 4 * _GIB, 16 * _GIB, 64 * _GIB)
)
"""Upper bounds (bytes) of the memory histograms, +Inf excluded (x4 steps: the exact
figures sizing needs come from ``_sum``/``_count`` and the ``*_max`` gauges)."""
WALL_BUCKETS: tuple[float, ...] = (0.05, 0.25, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0)
"""Upper bounds (seconds) of ``celery_task_wall_seconds``, +Inf excluded."""
QUEUE_WAIT_BUCKETS: tuple[float, ...] = (0.1, 0.5, 2.0, 10.0, 30.0, 120.0, 600.0, 1800.0, 7200.0)
"""Upper bounds (seconds) of ``celery_task_queue_wait_seconds``, +Inf excluded."""
TIME_BUCKETS = WALL_BUCKETS
"""The wall-time bounds under their former name."""

# OpenMetrics: the label names and values of an exemplar hold at most 128 characters.
_EXEMPLAR_MAX_CHARS = 128

# prometheus_client's own number formatting (Go-style floats), so these series read like
# any other client's; it is untyped upstream.
_go_float: Callable[[float], str] = floatToGoString


def _escape_value(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _escape_help(doc: str, openmetrics: bool) -> str:
    doc = doc.replace("\\", r"\\").replace("\n", r"\n")
    return doc.replace('"', r"\"") if openmetrics else doc


@dataclass(frozen=True)
class InflightTask:
    """A task running right now, as the integration sees it at scrape time."""

    task: str
    task_id: str | None
    pid: int
    started_at: float  # epoch seconds
    worker_rss_bytes: int
    tools_rss_bytes: int


# -- series -----------------------------------------------------------------------------
class _Scalar:
    """One counter or gauge series: its value and its cached line."""

    __slots__ = ("key", "labels", "line", "value")

    def __init__(self, key: tuple[str, ...], labels: str) -> None:
        self.key = key
        self.labels = labels  # '{a="x",b="y"}' or ''
        self.value = 0.0
        self.line: str | None = None


class _Histo:
    """One histogram series: non-cumulative bucket counts (the last one above the last
    bound), exact sum, the latest exemplar of every bucket and the cached lines."""

    __slots__ = (
        "counts", "exemplars", "key", "labels", "le_prefix", "le_suffix", "n", "om", "text",
        "total",
    )  # fmt: skip

    def __init__(self, key: tuple[str, ...], labels: str, nbuckets: int) -> None:
        self.key = key
        self.labels = labels
        self.le_prefix = self.le_suffix = ""
        self.counts = [0] * nbuckets
        self.exemplars: list[tuple[str, str, float, float] | None] = [None] * nbuckets
        self.total = 0.0
        self.n = 0
        self.text: str | None = None
        self.om: str | None = None


class _Family:
    """A metric family: kind, help, label names and its series by label values."""

    def __init__(
        self,
        name: str,
        kind: str,
        doc: str,
        labelnames: tuple[str, ...],
        bounds: tuple[float, ...] = (),
        exemplars: bool = False,
    ) -> None:
        self.name = name  # without "_total" for counters (like prometheus_client)
        self.kind = kind  # counter, gauge, histogram, summary
        self.doc = doc
        self.labelnames = labelnames
        self.bounds = bounds
        self.exemplars = exemplars
        self.series: dict[tuple[str, ...], Any] = {}
        self.cache: dict[bool, str] = {}  # openmetrics? -> the family's text
        exposed = name + "_total" if kind == "counter" else name
        self.sample_name = exposed
        self.headers = {
            om: f"# HELP {n} {_escape_help(doc, om)}\n# TYPE {n} {kind}\n"
            for om, n in ((False, exposed), (True, name))
        }
        self.les = (*(_go_float(b) for b in bounds), "+Inf")

    def _pairs(self, key: tuple[str, ...]) -> list[tuple[str, str]]:
        # Sorted by label name, as prometheus_client writes them.
        return sorted(
            (n, f'{n}="{_escape_value(v)}"') for n, v in zip(self.labelnames, key, strict=True)
        )

    def scalar(self, key: tuple[str, ...]) -> _Scalar:
        s = self.series.get(key)
        if s is None:
            pairs = self._pairs(key)
            labels = "{" + ",".join(p for _, p in pairs) + "}" if pairs else ""
            s = self.series[key] = _Scalar(key, labels)
            self.cache.clear()
        return s

    def histo(self, key: tuple[str, ...]) -> _Histo:
        h = self.series.get(key)
        if h is None:
            pairs = self._pairs(key)
            labels = "{" + ",".join(p for _, p in pairs) + "}" if pairs else ""
            h = self.series[key] = _Histo(key, labels, len(self.bounds) + 1)
            # The bucket lines' labels: "le" in its sorted place.
            before = "".join(p + "," for n, p in pairs if n < "le")
            after = "".join("," + p for n, p in pairs if n > "le")
            h.le_prefix = f"{self.name}_bucket{{{before}le=" + '"'
            h.le_suffix = '"' + after + "} "
            self.cache.clear()
        return h

    # -- rendering (lock held by the caller) ---------------------------------------------
    def render(self, openmetrics: bool) -> str:
        text = self.cache.get(openmetrics)
        if text is None:
            parts = [self.headers[openmetrics]]
            if self.kind == "histogram":
                parts += [self._histo_lines(h, openmetrics) for h in self.series.values()]
            elif self.kind == "summary":
                parts += [self._summary_lines(h) for h in self.series.values()]
            else:
                parts += [self._scalar_line(s) for s in self.series.values()]
            text = self.cache[openmetrics] = "".join(parts)
        return text

    def _scalar_line(self, s: _Scalar) -> str:
        if s.line is None:
            s.line = f"{self.sample_name}{s.labels} {_go_float(s.value)}\n"
        return s.line

    def _summary_lines(self, h: _Histo) -> str:
        if h.text is None:
            h.text = (
                f"{self.name}_sum{h.labels} {_go_float(h.total)}\n"
                f"{self.name}_count{h.labels} {_go_float(h.n)}\n"
            )
        return h.text

    def _histo_lines(self, h: _Histo, openmetrics: bool) -> str:
        with_exemplars = openmetrics and self.exemplars
        cached = h.om if with_exemplars else h.text
        if cached is not None:
            return cached
        prefix, suffix = h.le_prefix, h.le_suffix
        lines = []
        running = 0
        for le, count, ex in zip(self.les, h.counts, h.exemplars, strict=True):
            running += count
            line = prefix + le + suffix + _go_float(running)
            if with_exemplars and ex is not None:
                line += f" # {ex[1]} {_go_float(ex[2])} {ex[3]:.3f}"
            lines.append(line + "\n")
        lines.append(f"{self.name}_sum{h.labels} {_go_float(h.total)}\n")
        lines.append(f"{self.name}_count{h.labels} {_go_float(h.n)}\n")
        text = "".join(lines)
        if with_exemplars:
            h.om = text
        else:
            h.text = text
        return text

    def samples(self) -> list[Sample]:
        """The family as prometheus_client samples (for generate_latest & co)."""
        out: list[Sample] = []
        for key, s in self.series.items():
            labels = dict(zip(self.labelnames, key, strict=True))
            if self.kind == "histogram":
                running = 0
                for le, count, ex in zip(self.les, s.counts, s.exemplars, strict=True):
                    running += count
                    exemplar = None
                    if self.exemplars and ex is not None:
                        exemplar = Exemplar({"task_id": ex[0]}, ex[2], ex[3])
                    out.append(
                        Sample(self.name + "_bucket", {**labels, "le": le}, running, None, exemplar)
                    )
                out.append(Sample(self.name + "_sum", labels, s.total))
                out.append(Sample(self.name + "_count", labels, float(s.n)))
            elif self.kind == "summary":
                out.append(Sample(self.name + "_sum", labels, s.total))
                out.append(Sample(self.name + "_count", labels, float(s.n)))
            else:
                out.append(Sample(self.sample_name, labels, s.value))
        return out


class CachedFamily(Metric):
    """A family of a :class:`TaskMetrics` as yielded by ``collect()``.

    ``exposition(openmetrics)`` returns its text (HELP and TYPE lines included, no
    ``# EOF``) from the cache, rendering only the series that changed; ``samples``
    builds prometheus_client samples for any other consumer. Both read the current
    state under the owner's lock."""

    def __init__(self, owner: TaskMetrics, family: _Family) -> None:
        # Metric.__init__ would validate the name and set samples to []; both moot here.
        self.name = family.name
        self.documentation = family.doc
        self.unit = ""
        self.type = family.kind
        self._owner = owner
        self._family = family

    @property
    def samples(self) -> list[Sample]:
        with self._owner._lock:
            return self._family.samples()

    @samples.setter
    def samples(self, value: list[Sample]) -> None:  # Metric.__init__ compatibility
        pass

    @property
    def sample_names(self) -> tuple[str, ...]:
        f = self._family
        if f.kind == "histogram":
            return (f.name + "_bucket", f.name + "_sum", f.name + "_count")
        if f.kind == "summary":
            return (f.name + "_sum", f.name + "_count")
        return (f.sample_name,)

    def exposition(self, openmetrics: bool) -> str:
        with self._owner._lock:
            return self._family.render(openmetrics)


# -- the collector ----------------------------------------------------------------------
RUNS = "celery_task_runs"
KILLS = "celery_task_kills"
WALL = "celery_task_wall_seconds"
QUEUE_WAIT = "celery_task_queue_wait_seconds"
PEAK = "celery_task_memory_peak_bytes"
FOOTPRINT = "celery_task_footprint_peak_bytes"
AVG = "celery_task_memory_avg_bytes"
PEAK_MAX = "celery_task_memory_peak_bytes_max"
FOOTPRINT_MAX = "celery_task_footprint_peak_bytes_max"
CPU = "celery_task_cpu_seconds"
COMPONENT_WALL = "celery_task_component_wall_seconds"
TOOL_RUNS = "celery_task_tool_runs"
PHASE_WALL = "celery_task_phase_wall_seconds"
INFLIGHT = "celery_task_inflight"
INFLIGHT_RSS = "celery_task_inflight_rss_bytes"
WORKER_INFO = "taskmeter_worker_info"
FOLDED = "taskmeter_labels_folded"


def _families() -> dict[str, _Family]:
    tc = ("task", "component")
    fams = [
        _Family(RUNS, "counter", "Task runs by final state (success, failure, retry, revoked, "
                "killed, lost).", ("task", "state")),
        _Family(KILLS, "counter", "Tasks whose process died (state killed or lost) by cause: "
                "oom, time_limit, signal or unknown.", ("task", "cause")),
        _Family(WALL, "histogram", "Wall-clock time of each task, start to end (seconds). "
                "Exact mean: _sum / _count.", ("task",), WALL_BUCKETS, exemplars=True),
        _Family(QUEUE_WAIT, "histogram", "Seconds from publish (or ETA) to start, for "
                "messages the sender stamped with taskmeter.", ("task",), QUEUE_WAIT_BUCKETS),
        _Family(PEAK, "histogram", "Peak RSS per task (bytes): component=overhead is the "
                "worker process; component=tool the largest peak of a single tool process "
                "(only tasks that ran tools).", tc, MEMORY_BUCKETS, exemplars=True),
        _Family(FOOTPRINT, "histogram", "Peak per task of worker RSS plus the RSS of the tools "
                "alive at that moment (bytes): what the container must hold at once.",
                ("task",), MEMORY_BUCKETS, exemplars=True),
        _Family(AVG, "summary", "Average RSS per task (bytes), mean = _sum / _count: "
                "component=overhead is the worker process; component=tool the wall-weighted "
                "mean of its tool runs' average RSS (only tasks that ran tools).", tc),
        _Family(PEAK_MAX, "gauge", "Largest per-task peak RSS seen since the worker started "
                "(bytes), by component; exact, unlike a histogram bucket.", tc),
        _Family(FOOTPRINT_MAX, "gauge", "Largest per-task footprint peak (worker plus tools "
                "alive at once) seen since the worker started (bytes); exact.", ("task",)),
        _Family(CPU, "counter", "CPU seconds consumed by tasks, by component (overhead: worker "
                "process; tool: tool subprocesses). rate() of it is the number of cores in "
                "use.", tc),
        _Family(COMPONENT_WALL, "counter", "Wall seconds of tasks, by component: tool = the "
                "time tool subprocesses ran (union of their runs), overhead = the rest.", tc),
        _Family(TOOL_RUNS, "counter", "Tool subprocess runs by executable basename and outcome "
                "(ok, error, killed = SIGKILL, signal, running, untracked, oom, orphan-killed, "
                "lost).", ("task", "tool", "outcome")),
        _Family(PHASE_WALL, "counter", "Wall seconds of each named phase of a task; mean per "
                "run = this / the runs.", ("task", "phase")),
        _Family(INFLIGHT, "gauge", "Tasks running right now (0 for every task name seen so "
                "far).", ("task",)),
        _Family(INFLIGHT_RSS, "gauge", "Current RSS of the tasks running right now, summed over "
                "the tasks of that name (bytes): component=overhead their worker processes, "
                "component=tool their tools.", tc),
        _Family(WORKER_INFO, "gauge", "1, labelled with the worker's pool (prefork, threads, "
                "solo, ...) and concurrency (tasks at once; 1 for solo).",
                ("pool", "concurrency")),
        _Family(FOLDED, "counter", "Observations whose label value was folded into 'other' "
                "because the label (task, tool or phase) reached its cardinality bound.",
                ("label",)),
    ]  # fmt: skip
    fams += [_Family(pc.name, "counter", pc.documentation, ()) for pc in PROCESS_COUNTERS]
    return {f.name: f for f in fams}


# Tasks whose figures wait for a scrape (TaskMetrics.defer_figures) before they are
# accounted without one: a bound on the memory they hold (a few hundred bytes each).
DEFER_MAX = 512

# What TaskMetrics accounts of one task (see observation()): plain values, so that a
# pool process can send it to the main process as JSON.
Observation = Any


def observation(report: TaskReport) -> list[Any]:
    """The figures :meth:`TaskMetrics.observe` accounts of ``report``, as a JSON-able
    list: [task, task id, state, cause, wall, queue wait, overhead CPU, tools' CPU,
    overhead wall, tools' wall, overhead RSS average, overhead RSS peak, tools' RSS
    average (None without tools), tools' RSS peak, footprint peak, [[tool basename,
    outcome], ...], [[phase, wall], ...]]."""
    over, totals = report.overhead, report.tool_totals
    return [
        report.task, report.task_id, report.state, report.cause, report.wall_s,
        report.queue_wait_s, over.cpu_s, totals.cpu_s, over.wall_s, totals.wall_s,
        over.rss_avg_bytes, over.rss_peak_bytes, report.tool_avg_rss_bytes,
        totals.rss_peak_bytes, report.footprint_peak_bytes,
        [[os.path.basename(t.exe) or "unknown", t.outcome] for t in report.tools],
        [[p.name, p.wall_s] for p in report.phases],
    ]  # fmt: skip


class _TaskKeys:
    """The label tuples of one task label, built once (observe allocates none)."""

    __slots__ = ("comp", "one", "states")

    def __init__(self, task: str) -> None:
        self.one = (task,)
        self.comp = {c: (task, c) for c in COMPONENTS}
        self.states: dict[str, tuple[str, str]] = {s: (task, s) for s in STATES}


class TaskMetrics:
    """Prometheus collector aggregating finished :class:`TaskReport` records.

    Register it once (``registry.register(metrics)``) and feed it with
    :meth:`observe`. Thread-safe: :meth:`observe` and :meth:`count_run` may be
    called from any thread while :meth:`collect` serves scrapes.

    ``inflight``, if given, is called at every scrape (outside the lock) and returns
    the tasks running right now, for ``celery_task_inflight`` and
    ``celery_task_inflight_rss_bytes``. ``pool`` and ``concurrency`` (or
    :meth:`set_worker_info`) give ``taskmeter_worker_info``.
    """

    def __init__(
        self,
        *,
        max_task_names: int = 500,
        max_values_per_label: int = 50,
        inflight: Callable[[], list[InflightTask]] | None = None,
        pool: str | None = None,
        concurrency: int | None = None,
    ) -> None:
        if max_task_names < 1 or max_values_per_label < 1:
            raise ValueError("max_task_names and max_values_per_label must be >= 1")
        self.max_task_names = max_task_names
        self.max_values_per_label = max_values_per_label
        self.inflight = inflight
        # Called at every scrape before anything else: an integration hands over the
        # tasks that ended and it has not passed on yet (the outboxes of pool processes)
        self.before_scrape: Callable[[], None] | None = None
        self._lock = threading.Lock()
        self._f = _families()
        self._views = [CachedFamily(self, f) for f in self._f.values()]
        # Task label values in order of first sight ("other" included once used).
        self._tasks: dict[str, _TaskKeys] = {}
        self._known_names = 0
        # Per task label: the tool and phase values kept so far.
        self._values: dict[tuple[str, str], set[str]] = {}
        # (figures, epoch) of tasks not accounted yet (defer_figures)
        self._deferred: deque[tuple[Observation, float]] = deque()
        self._applying = threading.Lock()  # one thread accounts them at a time
        # Bumped by every change: a cached rendering is current while it has not moved.
        self.generation = 0
        for label in ("task", "tool", "phase"):
            self._f[FOLDED].scalar((label,))
        if pool is not None:
            self.set_worker_info(pool, concurrency if concurrency is not None else 1)

    # -- feeding ----------------------------------------------------------------------
    def set_worker_info(self, pool: str, concurrency: int) -> None:
        """``taskmeter_worker_info{pool,concurrency} 1`` (replaces an earlier call)."""
        with self._lock:
            family = self._f[WORKER_INFO]
            family.series.clear()
            family.cache.clear()
            self._set(family, (str(pool), str(int(concurrency))), 1.0)
            self.generation += 1

    def observe(self, report: TaskReport) -> None:
        """Account one finished (or killed, or lost) task."""
        self.apply_deferred()  # in order: what was deferred ended before
        self.observe_figures(observation(report))

    def defer_figures(self, obs: Observation) -> None:
        """:meth:`observe_figures` later: at the next scrape (:meth:`collect`), or
        with the others once DEFER_MAX wait. A worker's main process calls this per
        task: each scrape still sees every task, and the figures are accounted in one
        batch, with the caches warm, instead of one task at a time with them cold."""
        deferred = self._deferred
        deferred.append((obs, time.time()))
        if len(deferred) >= DEFER_MAX:
            self.apply_deferred()

    def apply_deferred(self) -> None:
        """Account what :meth:`defer_figures` queued (any thread). One thread at a
        time, in the order queued: a scrape waits for a batch another thread is
        accounting, so it never misses one taken off the queue but not accounted yet."""
        deferred = self._deferred
        if not deferred and not self._applying.locked():  # none queued, none in hand
            return
        with self._applying:
            while deferred:
                obs, ts = deferred.popleft()
                try:
                    self.observe_figures(obs, ts)
                except Exception:  # one bad message: the others and the scrape go on
                    log.exception("taskmeter: the metrics failed for %s", obs[0])

    def observe_figures(self, obs: Observation, ts: float | None = None) -> None:
        """Account one task from its :func:`observation`: what :meth:`observe` does,
        for a main process that got the figures from the pool process that ran the
        task (computed there, in parallel) and never rebuilds its report. ``ts``: when
        the task was observed (its exemplars' timestamp), if not now."""
        (task_name, task_id, state, cause, wall, queue_wait, over_cpu, tool_cpu, over_wall,
         tool_wall, over_avg, over_peak, tool_avg, tool_peak, footprint, tools,
         phases) = obs  # fmt: skip
        if state not in STATES:
            raise ValueError(f"report state {state!r}: expected one of {STATES}")
        f = self._f
        if ts is None:
            ts = time.time()
        # The exemplar's label text, formatted once for the three histograms that keep it.
        exemplar = (
            (task_id, f'{{task_id="{_escape_value(task_id)}"}}')
            if task_id is not None and len(task_id) + 7 <= _EXEMPLAR_MAX_CHARS
            else None
        )
        with self._lock:
            self.generation += 1
            keys = self._keys(task_name)
            self._inc(f[RUNS], keys.states[state])
            if cause is None and state in ("killed", "lost"):
                cause = "unknown"
            if cause is not None:
                if cause not in CAUSES:
                    cause = "unknown"
                self._inc(f[KILLS], (keys.one[0], cause))
            self._observe(f[WALL], keys.one, wall, exemplar, ts)
            if queue_wait is not None:
                self._observe(f[QUEUE_WAIT], keys.one, max(0.0, queue_wait))

            over, tool = keys.comp["overhead"], keys.comp["tool"]
            self._inc(f[CPU], over, over_cpu)
            self._inc(f[CPU], tool, tool_cpu)
            self._inc(f[COMPONENT_WALL], over, over_wall)
            self._inc(f[COMPONENT_WALL], tool, tool_wall)

            self._summary(f[AVG], over, float(over_avg))
            peak = float(over_peak)
            self._observe(f[PEAK], over, peak, exemplar, ts)
            self._raise_max(f[PEAK_MAX], over, peak)
            if tool_avg is not None:
                self._summary(f[AVG], tool, float(tool_avg))
                peak = float(tool_peak)
                self._observe(f[PEAK], tool, peak, exemplar, ts)
                self._raise_max(f[PEAK_MAX], tool, peak)

            footprint = float(footprint)
            self._observe(f[FOOTPRINT], keys.one, footprint, exemplar, ts)
            self._raise_max(f[FOOTPRINT_MAX], keys.one, footprint)

            task = keys.one[0]
            for exe, outcome in tools:
                name = self._value_label(task, "tool", exe)
                if outcome not in TOOL_OUTCOMES:
                    outcome = OTHER
                self._inc(f[TOOL_RUNS], (task, name, outcome))
            for phase, phase_wall in phases:
                name = self._value_label(task, "phase", phase)
                self._inc(f[PHASE_WALL], (task, name), phase_wall)

    def declare(self, tasks: Iterable[str]) -> None:
        """Task names known before any of them runs (a worker's registered tasks): the
        counters every run increments start at zero, so rate() and increase() see even
        the first run."""
        with self._lock:
            self.generation += 1
            for name in tasks:
                self._keys(name, count_fold=False)

    def count_run(self, task: str, state: str) -> None:
        """Count a run that produced no report (e.g. revoked while still queued)."""
        if state not in STATES:
            raise ValueError(f"state {state!r}: expected one of {', '.join(STATES)}")
        self.apply_deferred()  # in order (which task names come first under the bound)
        with self._lock:
            self.generation += 1
            self._inc(self._f[RUNS], self._keys(task).states[state])

    # -- label bounds (call with the lock held) ---------------------------------------
    def _keys(self, name: str, *, count_fold: bool = True) -> _TaskKeys:
        keys = self._tasks.get(name)
        if keys is not None:
            return keys
        if self._known_names < self.max_task_names:
            self._known_names += 1
        else:
            if count_fold:
                self._inc(self._f[FOLDED], ("task",))
            name = OTHER
            keys = self._tasks.get(OTHER)
            if keys is not None:
                return keys
        keys = self._tasks[name] = _TaskKeys(name)
        # The zero series: what every run increments, and the in-flight gauges.
        f = self._f
        for state in ("success", "failure"):
            f[RUNS].scalar(keys.states[state])
        for component in COMPONENTS:
            f[CPU].scalar(keys.comp[component])
            f[COMPONENT_WALL].scalar(keys.comp[component])
            f[INFLIGHT_RSS].scalar(keys.comp[component])
        f[INFLIGHT].scalar(keys.one)
        return keys

    def _value_label(self, task: str, label: str, value: str) -> str:
        kept = self._values.setdefault((task, label), set())
        if value in kept:
            return value
        if len(kept) < self.max_values_per_label:
            kept.add(value)
            return value
        self._inc(self._f[FOLDED], (label,))
        return OTHER

    @staticmethod
    def _inc(family: _Family, key: tuple[str, ...], amount: float = 1.0) -> None:
        s = family.scalar(key)
        s.value += amount
        s.line = None
        family.cache.clear()

    @staticmethod
    def _set(family: _Family, key: tuple[str, ...], value: float) -> None:
        s = family.scalar(key)
        if s.value != value:
            s.value = value
            s.line = None
            family.cache.clear()

    @staticmethod
    def _raise_max(family: _Family, key: tuple[str, ...], value: float) -> None:
        s = family.series.get(key)
        if s is None or value > s.value:
            TaskMetrics._set(family, key, value)

    @staticmethod
    def _summary(family: _Family, key: tuple[str, ...], value: float) -> None:
        h = family.histo(key)
        h.total += value
        h.n += 1
        h.text = None
        family.cache.clear()

    @staticmethod
    def _observe(
        family: _Family,
        key: tuple[str, ...],
        value: float,
        exemplar: tuple[str, str] | None = None,
        ts: float = 0.0,
    ) -> None:
        h = family.histo(key)
        # "le" semantics: a value equal to a bound belongs in that bound's bucket.
        i = bisect.bisect_left(family.bounds, value)
        h.counts[i] += 1
        h.total += value
        h.n += 1
        if exemplar is not None:  # (task id, its label text), see observe()
            h.exemplars[i] = (exemplar[0], exemplar[1], value, ts)
        h.text = h.om = None
        family.cache.clear()

    # -- exposition -------------------------------------------------------------------
    def describe(self) -> list[Metric]:
        """Nothing: the registry then never calls :meth:`collect` at registration."""
        return []

    def collect(self) -> Iterator[Metric]:
        if self.before_scrape is not None:
            try:
                self.before_scrape()
            except Exception:  # a scrape must not fail because of the integration
                log.exception("taskmeter: collecting the tasks ended before a scrape failed")
        self.apply_deferred()
        running = self._read_inflight()
        counters = [(pc.name, pc.value) for pc in PROCESS_COUNTERS]
        with self._lock:
            for name, total in counters:
                self._set(self._f[name], (), total)
            if running is not None:
                self._update_inflight(running)
            views = [
                v for v in self._views if running is not None or v.name not in _INFLIGHT_FAMILIES
            ]
        yield from views

    def _read_inflight(self) -> list[InflightTask] | None:
        if self.inflight is None:
            return []
        try:
            return list(self.inflight())
        except Exception:  # a scrape must not fail because of the integration
            log.exception("taskmeter: the inflight callable failed; inflight omitted")
            return None

    def _update_inflight(self, running: list[InflightTask]) -> None:
        counts: dict[str, float] = {}
        rss: dict[tuple[str, str], float] = {}
        for info in running:
            # A name first seen in flight takes a place like any other (its folds are
            # not counted: they would recount at every scrape).
            keys = self._keys(info.task, count_fold=False)
            task = keys.one[0]
            counts[task] = counts.get(task, 0.0) + 1
            over, tool = keys.comp["overhead"], keys.comp["tool"]
            rss[over] = rss.get(over, 0.0) + info.worker_rss_bytes
            rss[tool] = rss.get(tool, 0.0) + info.tools_rss_bytes
        f_count, f_rss = self._f[INFLIGHT], self._f[INFLIGHT_RSS]
        for key in f_count.series:
            self._set(f_count, key, counts.get(key[0], 0.0))
        for key in f_rss.series:
            self._set(f_rss, key, rss.get(key, 0.0))  # type: ignore[arg-type]

    # -- debugging --------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """A plain copy of the aggregated state (no in-flight figures)::

            {"tasks": [...], "counters": {name: {labels: value}},
             "gauges": {name: {labels: value}},
             "histograms": {name: {labels: {"count", "sum", "buckets"}}},
             "summaries": {name: {labels: {"count", "sum"}}}}

        where counter names end in ``_total``, ``labels`` are tuples of label values in
        the order of the metric's label names and ``buckets`` lists non-cumulative
        counts (the last one above the last bound).
        """
        self.apply_deferred()
        out: dict[str, Any] = {"counters": {}, "gauges": {}, "histograms": {}, "summaries": {}}
        with self._lock:
            out["tasks"] = list(self._tasks)
            for f in self._f.values():
                if f.name in _INFLIGHT_FAMILIES:
                    continue
                if f.kind == "counter":
                    out["counters"][f.sample_name] = {k: s.value for k, s in f.series.items()}
                elif f.kind == "gauge":
                    out["gauges"][f.name] = {k: s.value for k, s in f.series.items()}
                elif f.kind == "histogram":
                    out["histograms"][f.name] = {
                        k: {"count": h.n, "sum": h.total, "buckets": list(h.counts)}
                        for k, h in f.series.items()
                    }
                else:
                    out["summaries"][f.name] = {
                        k: {"count": h.n, "sum": h.total} for k, h in f.series.items()
                    }
        out["max"] = {n: out["gauges"][n] for n in (PEAK_MAX, FOOTPRINT_MAX)}
        return out


_INFLIGHT_FAMILIES = frozenset({INFLIGHT, INFLIGHT_RSS})
