"""The HTML report: one self-contained page of plots and tables from measured tasks.

``taskmeter report`` (:mod:`taskmeter.reporting.command`) reads TaskReports from
ledgers, or aggregated :class:`~taskmeter.sizing.stats.TaskStats` from Prometheus,
sizes the worker with :mod:`taskmeter.sizing`, and renders :class:`ReportData` with
:func:`render` (plotly figures, plotly.js inlined: the page needs no network).

This module stays light (no plotly import) so that the command line starts fast;
plotly is imported when a page is rendered.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from taskmeter.measure.report import TaskReport
from taskmeter.sizing.recommend import Options, Recommendation, SizingError, recommend
from taskmeter.sizing.stats import TaskStats

__all__ = ["ConcurrencySource", "ReportData", "Sizing", "render", "size"]

ConcurrencySource = Literal["given", "observed", "unknown"]


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
) -> Sizing:
    """Run :func:`~taskmeter.sizing.recommend.recommend`; a refusal becomes a reason."""

    def refused(reason: str) -> Sizing:
        return Sizing(
            concurrency, concurrency_source, parent_bytes, margin, min_tasks, None, reason
        )

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
        )
        rec = recommend(stats, options)
    except SizingError as exc:
        return refused(str(exc))
    return Sizing(concurrency, concurrency_source, parent_bytes, margin, min_tasks, rec)


@dataclass(frozen=True)
class ReportData:
    """Everything one page shows.

    ``reports`` is None when only aggregated figures exist (Prometheus): the page then
    shows what ``stats`` supports and says that per-task plots need a ledger.
    """

    source: str
    generated_at: datetime
    stats: Mapping[str, TaskStats]
    reports: Sequence[TaskReport] | None
    sizing: Sizing
    warnings: Sequence[str] = field(default=())
    heaviest: int = 5


def render(data: ReportData) -> str:
    """The whole page as one HTML string (plotly.js inlined)."""
    from taskmeter.reporting.html import render_page

    return render_page(data)
