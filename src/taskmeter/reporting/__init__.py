"""The HTML report: one self-contained page of plots and tables from measured tasks.

``taskmeter report`` (:mod:`taskmeter.reporting.command`) reads TaskReports from
ledgers, or aggregated :class:`~taskmeter.sizing.stats.TaskStats` from Prometheus,
sizes the worker with :mod:`taskmeter.sizing`, and renders :class:`ReportData` with
:func:`render` (plotly figures, plotly.js inlined: the page needs no network).

This module stays light (no plotly import) so that the command line starts fast;
plotly is imported when a page is rendered.
"""

from __future__ import annotations

import heapq
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from taskmeter.measure.report import TaskReport, ToolRun
from taskmeter.sizing.recommend import Options, Recommendation, SizingError, recommend
from taskmeter.sizing.stats import StreamQuantiles, TaskStats

__all__ = [
    "BOX_ALL_POINTS_MAX",
    "TABLE_MAX_ROWS",
    "ConcurrencySource",
    "LedgerDigest",
    "ReportData",
    "Sizing",
    "TableRow",
    "TypeDigest",
    "render",
    "size",
]

# A task type with at most this many tasks has every task drawn as a point in its
# memory box plots; beyond, the boxes are drawn from streaming quantiles, no points.
BOX_ALL_POINTS_MAX = 500
# At most this many rows in the table of all tasks: every task up to it; beyond, a
# uniform sample (reservoir sampling with a fixed seed: the same input gives the same
# page) plus the heaviest tasks of every type, in input order.
TABLE_MAX_ROWS = 2000

ConcurrencySource = Literal["given", "observed", "unknown", "solo"]


@dataclass(frozen=True)
class Sizing:
    """The memory request and limit drawn on the plots, or why there are none."""

    concurrency: int | None
    concurrency_source: ConcurrencySource
    parent_bytes: int
    margin: float
    min_tasks: int
    recommendation: Recommendation | None
    reason: str | None = None  # set when recommendation is None
    pool: str = "prefork"  # the sizing rules used (taskmeter.sizing.recommend.pool_model)
    pool_why: str | None = None  # how the pool was chosen

    def per_task(self, pod_bytes: int) -> float:
        """A pod-level quantity shared among the task slots (request or limit / N)."""
        assert self.concurrency
        return pod_bytes / self.concurrency


def size(
    stats: Mapping[str, TaskStats],
    *,
    concurrency: int | None,
    concurrency_source: ConcurrencySource,
    parent_bytes: int,
    margin: float,
    min_tasks: int,
    pool: str = "prefork",
    pool_why: str | None = None,
) -> Sizing:
    """Run :func:`~taskmeter.sizing.recommend.recommend`; a refusal becomes a reason."""

    def refused(reason: str) -> Sizing:
        return Sizing(
            concurrency, concurrency_source, parent_bytes, margin, min_tasks, None, reason,
            pool, pool_why,
        )  # fmt: skip

    if concurrency is None:
        return refused(
            "the concurrency of the worker is not known: Prometheus keeps no record of how "
            "many tasks ran at once (give --concurrency N to draw the request and limit)"
        )
    try:
        options = Options(
            concurrency=concurrency,
            parent_bytes=parent_bytes,
            request_margin=margin,
            limit_margin=margin,
            min_tasks=min_tasks,
            pool=pool,
        )
        rec = recommend(stats, options)
    except SizingError as exc:
        return refused(str(exc))
    return Sizing(
        concurrency, concurrency_source, parent_bytes, margin, min_tasks, rec, None, pool, pool_why
    )


def tool_name(t: ToolRun) -> str:
    """A tool's executable name, as the page shows it."""
    return t.exe.rsplit("/", 1)[-1] or (t.argv[0] if t.argv else "?")


def tools_summary(tools: Sequence[ToolRun]) -> str:
    """``bcftools ×3 (bcftools killed)``: the tools a task ran, and how the bad ones ended."""
    if not tools:
        return "none"
    counts = Counter(tool_name(t) for t in tools)
    bad = Counter(f"{tool_name(t)} {t.outcome}" for t in tools if t.outcome not in ("ok",))
    text = ", ".join(f"{name} ×{n}" if n > 1 else name for name, n in counts.items())
    if bad:
        text += " (" + ", ".join(f"{k} ×{n}" if n > 1 else k for k, n in bad.items()) + ")"
    return text


@dataclass(frozen=True)
class TableRow:
    """One row of the table of all tasks (what it shows, not the whole record)."""

    index: int  # position in the input: rows are shown in input order
    task: str
    task_id: str | None
    state: str
    started_at: str
    wall_s: float
    cpu_overhead_s: float
    cpu_tools_s: float
    rss_avg_bytes: int
    rss_peak_bytes: int
    footprint_bytes: int
    tools: str

    @classmethod
    def of(cls, index: int, r: TaskReport) -> TableRow:
        return cls(
            index, r.task, r.task_id, r.state, r.started_at, r.wall_s, r.overhead.cpu_s,
            r.tool_totals.cpu_s, r.overhead.rss_avg_bytes, r.overhead.rss_peak_bytes,
            r.footprint_peak_bytes, tools_summary(r.tools),
        )  # fmt: skip


@dataclass
class TypeDigest:
    """What the page draws for one task type, in memory bounded whatever its runs."""

    runs: int = 0
    # Sums for the mean time split.
    wall_overhead_s: float = 0.0
    wall_tools_s: float = 0.0
    cpu_overhead_s: float = 0.0
    cpu_tools_s: float = 0.0
    cpu_other_s: float = 0.0
    # Memory distributions: every task's figures up to BOX_ALL_POINTS_MAX, quantiles
    # always (exact up to StreamQuantiles.EXACT_MAX tasks, within 0.5 % beyond).
    points: list[tuple[tuple[int, int, int], str]] | None = field(default_factory=list)
    rss_avg: StreamQuantiles = field(default_factory=StreamQuantiles)
    rss_peak: StreamQuantiles = field(default_factory=StreamQuantiles)
    footprint: StreamQuantiles = field(default_factory=StreamQuantiles)
    # Queue wait of the tasks whose sender stamped it (None elsewhere: not counted).
    queue_wait: StreamQuantiles = field(default_factory=StreamQuantiles)
    queue_wait_runs: int = 0
    # The heaviest tasks: a min-heap of (footprint, -index, index, report).
    heavy: list[tuple[int, int, int, TaskReport]] = field(default_factory=list)

    def heaviest(self) -> list[TaskReport]:
        """Largest footprint first; ties: the earlier task first."""
        return [h[3] for h in sorted(self.heavy, key=lambda h: (-h[0], h[2]))]


class LedgerDigest:
    """Everything the page shows about per-task records, fed one record at a time.

    Memory is bounded by the number of task types (and ``heaviest``), not of records:
    sums per type, at most :data:`BOX_ALL_POINTS_MAX` points and a few quantile
    summaries per type, the ``heaviest`` whole records per type, and at most
    :data:`TABLE_MAX_ROWS` table rows (a reservoir sample with a fixed seed).
    """

    def __init__(self, heaviest: int = 5, table_max: int = TABLE_MAX_ROWS, seed: int = 0) -> None:
        self.heaviest = heaviest
        self.table_max = table_max
        self.total = 0
        self.states: Counter[str] = Counter()
        self.types: dict[str, TypeDigest] = {}
        self._sample: list[TableRow] = []
        self._rng = random.Random(seed)

    def add(self, r: TaskReport) -> None:
        index = self.total
        self.total += 1
        self.states[r.state] += 1
        d = self.types.get(r.task)
        if d is None:
            d = self.types[r.task] = TypeDigest()
        d.runs += 1
        d.wall_overhead_s += r.overhead.wall_s
        d.wall_tools_s += r.tool_totals.wall_s
        d.cpu_overhead_s += r.overhead.cpu_s
        d.cpu_tools_s += r.tool_totals.cpu_s
        d.cpu_other_s += r.unattributed_child_cpu_s
        o = r.overhead
        if d.points is not None:
            if d.runs <= BOX_ALL_POINTS_MAX:
                label = f"task {r.task_id or '(no id)'} ({r.state})"
                values = (o.rss_avg_bytes, o.rss_peak_bytes, r.footprint_peak_bytes)
                d.points.append((values, label))
            else:
                d.points = None
        d.rss_avg.add(float(o.rss_avg_bytes))
        d.rss_peak.add(float(o.rss_peak_bytes))
        d.footprint.add(float(r.footprint_peak_bytes))
        if r.queue_wait_s is not None:
            d.queue_wait_runs += 1
            d.queue_wait.add(r.queue_wait_s)
        if self.heaviest:
            item = (r.footprint_peak_bytes, -index, index, r)
            if len(d.heavy) < self.heaviest:
                heapq.heappush(d.heavy, item)
            elif item[:2] > d.heavy[0][:2]:
                heapq.heapreplace(d.heavy, item)
        # Reservoir sampling (algorithm R) of the table's rows.
        if len(self._sample) < self.table_max:
            self._sample.append(TableRow.of(index, r))
        else:
            j = self._rng.randrange(index + 1)
            if j < self.table_max:
                self._sample[j] = TableRow.of(index, r)

    def add_all(self, reports: Iterable[TaskReport]) -> LedgerDigest:
        for r in reports:
            self.add(r)
        return self

    @property
    def sampled(self) -> bool:
        """True when the table holds a sample, not every task."""
        return self.total > self.table_max

    def table_rows(self) -> list[TableRow]:
        """Every task when they fit, else the sample plus each type's heaviest, in
        input order."""
        rows = {row.index: row for row in self._sample}
        if self.sampled:
            for d in self.types.values():
                for _, _, index, r in d.heavy:
                    rows.setdefault(index, TableRow.of(index, r))
        return [rows[i] for i in sorted(rows)]


@dataclass(frozen=True)
class ReportData:
    """Everything one page shows.

    Per-task records come as a :class:`LedgerDigest` (``digest``, what ``taskmeter
    report`` builds while streaming) or as a list (``reports``, turned into a digest);
    with neither only aggregated figures exist (Prometheus): the page then shows what
    ``stats`` supports and says that per-task plots need a ledger.
    """

    source: str
    generated_at: datetime
    stats: Mapping[str, TaskStats]
    reports: Sequence[TaskReport] | None
    sizing: Sizing
    warnings: Sequence[str] = field(default=())
    heaviest: int = 5
    digest: LedgerDigest | None = None
    # Lines skipped while reading: (bad records, lines that are not records).
    skipped: tuple[int, int] = (0, 0)

    def per_task(self) -> LedgerDigest | None:
        if self.digest is not None:
            return self.digest
        if self.reports is None:
            return None
        return LedgerDigest(self.heaviest).add_all(self.reports)


def render(data: ReportData) -> str:
    """The whole page as one HTML string (plotly.js inlined)."""
    from taskmeter.reporting.html import render_page

    return render_page(data)
