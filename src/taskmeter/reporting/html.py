"""Render :class:`~taskmeter.reporting.ReportData` as one self-contained HTML page.

Plots are plotly figures; plotly.js itself is inlined once in the page's head (what
``include_plotlyjs=True`` does), so the file opens with no network. The only other
script is a few lines that sort the tables when a header is clicked.

Text from the data (task names, ids, executables) is escaped for HTML, and plotly's
JSON escapes ``<`` and ``/``, so a task called ``</script>`` stays text. Tool command
lines are never copied into the page: they may hold secrets (presigned URLs) and the
page is meant to be shared; the ledger keeps them.
"""

from __future__ import annotations

import html
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from plotly import graph_objects as go  # type: ignore[import-untyped]
from plotly import io as pio
from plotly import offline, subplots

from taskmeter.format import bytes_h, seconds_h
from taskmeter.measure.report import STATES, TaskReport, ToolRun
from taskmeter.reporting import (
    BOX_ALL_POINTS_MAX,
    LedgerDigest,
    ReportData,
    Sizing,
    TableRow,
    TypeDigest,
    tool_name,
)
from taskmeter.sizing.recommend import Recommendation
from taskmeter.sizing.stats import StreamQuantiles, TaskStats

__all__ = ["render_page"]

MiB = 2**20
MAX_WARNINGS_SHOWN = 50

OVERHEAD_COLOR = "#4c78a8"
TOOL_COLOR = "#f58518"
OTHER_COLOR = "#9d9d9d"
REQUEST_COLOR = "#2ca02c"
LIMIT_COLOR = "#d62728"
TOOL_PALETTE = ("#f58518", "#54a24b", "#b279a2", "#e45756", "#72b7b2", "#eeca3b",
                "#ff9da6", "#9d755d", "#bab0ac", "#4c78a8")  # fmt: skip
STATE_COLORS = {
    "success": "#2e7d32",
    "failure": "#c62828",
    "retry": "#ef6c00",
    "revoked": "#616161",
    "killed": "#6a1b9a",
}
_PLOTLY_CONFIG = {"displaylogo": False, "responsive": True}


def render_page(data: ReportData) -> str:
    types = sorted(data.stats)
    anchors = {task: f"type-{i}" for i, task in enumerate(types, start=1)}
    digest = data.per_task()
    per_task = digest is not None
    tool_colors = _tool_colors(
        r for d in (digest.types.values() if digest else ()) for r in d.heaviest()
    )

    body: list[str] = [_header(data, types, digest), _nav(types, anchors, per_task)]
    if data.warnings or any(data.skipped):
        body.append(_warnings(data.warnings, data.skipped))
    body.append(_sizing_section(data.sizing, per_task))
    body.append(_summary_section(data, types, anchors))
    for task in types:
        anchor = anchors[task]
        if digest is not None:
            body.append(
                _type_section_ledger(
                    task, anchor, digest.types[task], data.sizing, tool_colors, data.heaviest
                )
            )
        else:
            body.append(_type_section_stats(task, anchor, data.stats[task], data.sizing))
    if digest is not None:
        body.append(_queue_wait_section(digest, types))
        body.append(_tasks_section(digest))
    body.append(_footer())
    title = f"taskmeter report: {data.source}"
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_esc(title)}</title>\n"
        f"<style>{_CSS}</style>\n"
        f"<script>{offline.get_plotlyjs()}</script>\n"
        "</head>\n<body>\n<main>\n" + "\n".join(body) + "\n</main>\n"
        f"<script>{_SORT_JS}</script>\n</body>\n</html>\n"
    )


# -- page parts ------------------------------------------------------------------------------
def _header(data: ReportData, types: Sequence[str], digest: LedgerDigest | None) -> str:
    if digest is not None:
        states: Counter[str] = Counter(digest.states)
        total = digest.total
    else:
        states = Counter()
        for s in data.stats.values():
            states.update(s.runs_by_state)
        total = sum(s.runs for s in data.stats.values())
    badges = " ".join(
        f'<span class="badge" style="background:{STATE_COLORS.get(state, OTHER_COLOR)}">'
        f"{_esc(state)} {states[state]}</span>"
        for state in (*STATES, *sorted(set(states) - set(STATES)))
        if states[state]
    )
    generated = data.generated_at.isoformat(timespec="seconds")
    kind = "per-task records" if digest is not None else "aggregated metrics only"
    return (
        "<header>\n<h1>taskmeter report</h1>\n"
        f'<p class="meta">Generated {_esc(generated)} · source: <code>{_esc(data.source)}'
        f"</code> ({kind})</p>\n"
        f'<p class="counts">{total} task{"s" if total != 1 else ""} of {len(types)} '
        f"type{'s' if len(types) != 1 else ''}: {badges}</p>\n</header>"
    )


def _nav(types: Sequence[str], anchors: dict[str, str], per_task: bool) -> str:
    links = ['<a href="#sizing">Sizing</a>', '<a href="#summary">Task types</a>']
    links += [f'<a href="#{anchors[t]}">{_esc(t)}</a>' for t in types]
    if per_task:
        links.append('<a href="#all-tasks">All tasks</a>')
    return f"<nav>{' · '.join(links)}</nav>"


def _warnings(warnings: Sequence[str], skipped: tuple[int, int] = (0, 0)) -> str:
    bad, other = skipped
    bad = max(bad, len(warnings))
    shown = "".join(f"<li><code>{_esc(w)}</code></li>" for w in warnings[:MAX_WARNINGS_SHOWN])
    more = bad - min(len(warnings), MAX_WARNINGS_SHOWN)
    tail = f"<li>… and {more} more</li>" if more > 0 else ""
    lines = (
        f"<p>{other} line{'s' if other != 1 else ''} that {'are' if other != 1 else 'is'} "
        "not taskmeter records (log lines, other JSON, blank lines) were skipped too.</p>"
        if other
        else ""
    )
    listed = (
        f"<p>These bad records were skipped; everything else was used.</p><ul>{shown}{tail}</ul>"
        if bad
        else "<p>Every taskmeter record was valid.</p>"
    )
    return (
        f'<section class="warnings"><h2>Skipped lines ({bad + other})</h2>{listed}{lines}</section>'
    )


def _sizing_section(sizing: Sizing, per_task: bool) -> str:
    rec = sizing.recommendation
    n = sizing.concurrency
    if n is None:
        conc = "unknown"
    elif sizing.concurrency_source == "solo":
        conc = f"{n} (a solo worker runs one task at a time)"
    elif sizing.concurrency_source == "observed":
        conc = f"{n} (observed: the most tasks seen running at once on one host)"
    else:
        conc = f"{n} (--concurrency)"
    pool = f"{sizing.pool} ({sizing.pool_why})" if sizing.pool_why else sizing.pool
    opts = (
        f"<p>Pool {_esc(pool)}. Concurrency N = {_esc(conc)}; parent process "
        f"{_esc(bytes_h(sizing.parent_bytes))}; margin {sizing.margin:.0%}; at least "
        f"{sizing.min_tasks} task(s) per type.</p>"
    )
    if rec is None or n is None:
        why = sizing.reason or "no recommendation"
        return (
            '<section id="sizing"><h2>Sizing</h2>' + opts
            + '<p class="refused"><strong>No memory request or limit is drawn:</strong> '
            f"{_esc(why)}</p></section>"
        )  # fmt: skip
    rows = [
        ("memory request", rec.memory_request,
         f"{bytes_h(sizing.per_task(rec.memory_request_bytes))} per task (÷ {n})"),
        ("memory limit", rec.memory_limit,
         f"{bytes_h(sizing.per_task(rec.memory_limit_bytes))} per task (÷ {n})"),
        ("CPU request", rec.cpu_request, ""),
        ("CPU limit", rec.cpu_limit or "none", ""),
        ("Celery flags", " ".join(rec.celery_flags()), ""),
    ]  # fmt: skip
    table = "".join(
        f"<tr><th>{_esc(a)}</th><td><code>{_esc(b)}</code></td><td>{_esc(c)}</td></tr>"
        for a, b, c in rows
    )
    reasoning = "".join(f"<li>{_esc(line)}</li>" for line in rec.reasoning)
    notes = "".join(f"<li>{_esc(line)}</li>" for line in rec.notes)
    where = (
        "The memory plots draw them as lines per task slot: the pod's figure divided by N."
        if per_task
        else "The memory plots draw them per task slot: the pod's figure divided by N."
    )
    return (
        '<section id="sizing"><h2>Sizing</h2>' + opts
        + "<p>Kubernetes resources for one worker pod running N tasks at once "
        "(<code>taskmeter recommend</code> with the same options). " + where + "</p>"
        + f'<table class="kv">{table}</table>'
        + f"<details open><summary>Reasoning</summary><ul>{reasoning}</ul></details>"
        + (f"<details><summary>Notes</summary><ul>{notes}</ul></details>" if notes else "")
        + "</section>"
    )  # fmt: skip


def _summary_section(data: ReportData, types: Sequence[str], anchors: dict[str, str]) -> str:
    heads = [("task type", "str"), ("runs", "num"), ("states", "str"), ("kills", "num"),
             ("mean wall", "num"), ("mean CPU overhead", "num"), ("mean CPU tools", "num"),
             ("cores busy", "num"), ("typical memory", "num"), ("footprint median", "num"),
             ("footprint max", "num")]  # fmt: skip
    rows = []
    for task in types:
        s = data.stats[task]
        states = ", ".join(f"{k} {v}" for k, v in s.runs_by_state.items())
        typical = s.typical_bytes(None)
        rows.append(
            "<tr>"
            + f'<td data-v="{_esc(task)}"><a href="#{anchors[task]}">{_esc(task)}</a></td>'
            + _num(s.runs, str(s.runs))
            + f"<td>{_esc(states)}</td>"
            + _num(s.kills, str(s.kills))
            + _num(s.wall_mean_s, seconds_h(s.wall_mean_s))
            + _num(_per_run(s.cpu_overhead_sum_s, s), seconds_h(_per_run(s.cpu_overhead_sum_s, s)))
            + _num(_per_run(s.cpu_tool_sum_s, s), seconds_h(_per_run(s.cpu_tool_sum_s, s)))
            + _num(s.cores_busy, f"{s.cores_busy:.2f}")
            + _num(typical, bytes_h(typical))
            + _num(s.footprint_median_bytes, bytes_h(s.footprint_median_bytes))
            + _num(s.footprint_max_bytes, bytes_h(s.footprint_max_bytes))
            + "</tr>"
        )
    caption = (
        "Typical memory: mean worker RSS average plus mean tool RSS average (what the "
        "request is sized from). Footprint: worker + tools alive at the same moment (what "
        "the limit must hold)."
    )
    if data.reports is None:
        caption += " From Prometheus the footprint median is a histogram estimate."
    return (
        '<section id="summary"><h2>Task types</h2>'
        + _table("summary", heads, rows)
        + f'<p class="caption">{_esc(caption)}</p></section>'
    )


def _type_section_ledger(
    task: str,
    anchor: str,
    d: TypeDigest,
    sizing: Sizing,
    tool_colors: dict[str, str],
    heaviest: int,
) -> str:
    heavy = d.heaviest()[:heaviest]
    if d.points is not None:
        points = "each point is one task."
    else:
        points = (
            f"with {d.runs} tasks (more than {BOX_ALL_POINTS_MAX}) no point is drawn: each box "
            "spans the quartiles around the median, its whiskers the smallest and largest "
            "task, computed while the records streamed (exact up to 4096 tasks of a type, "
            "within 0.5 % beyond)."
        )
    parts = [
        *_section_head(task, anchor, d.runs, _time_figure(d), _memory_figure(d, sizing)),
        '<p class="caption">Left: mean time per task. Overhead wall is the task\'s wall time '
        "minus the time covered by tool runs; overhead CPU is the worker process's own CPU; "
        "tools' CPU is the sum over their processes. Right: per-task memory of the worker "
        "process (time-weighted RSS average and its peak) and the footprint (worker + tools "
        f"alive at the same moment); {_esc(points)}</p>",
    ]
    if heavy:
        height = 110 + 200 * len(heavy)
        parts += [
            f"<h3>The {len(heavy)} task{'s' if len(heavy) != 1 else ''} with the largest "
            "footprint, over time</h3>",
            _figure(_timeline_figure(heavy, tool_colors), f"{anchor}-timeline", height),
            '<p class="caption">taskmeter keeps averages and peaks per process, not time '
            "series: this is a Gantt-style view of which tools ran when and how big they "
            "got. The shaded band is the worker's RSS average over the whole task; each bar "
            "spans one tool run from its start to its end at the height of its peak RSS, "
            "stacked on the band (and on tools still running); the real curve lies at or "
            "below the bars. Very short runs are widened to stay visible (hover for the exact "
            "times). Drag to zoom, double-click to reset.</p>",
        ]
    parts.append("</section>")
    return "\n".join(parts)


def _section_head(task: str, anchor: str, runs: int, time_fig: Any, memory_fig: Any) -> list[str]:
    """A task type's heading, its task count, and its time and memory plots side by side."""
    return [
        f'<section class="type" id="{anchor}"><h2>{_esc(task)}</h2>',
        f'<p class="meta">{runs} task{"s" if runs != 1 else ""}</p>',
        '<div class="grid2">',
        _figure(time_fig, f"{anchor}-time", 380),
        _figure(memory_fig, f"{anchor}-memory", 380),
        "</div>",
    ]


def _type_section_stats(task: str, anchor: str, s: TaskStats, sizing: Sizing) -> str:
    return "\n".join(
        [
            *_section_head(
                task, anchor, s.runs, _time_figure_stats(s), _memory_figure_stats(s, sizing)
            ),
            '<p class="caption">From Prometheus only aggregated figures exist: mean wall '
            "and CPU time split into the worker's overhead and its tools, and memory "
            "summaries. Distributions, the "
            "heaviest tasks over time and the table of tasks need a ledger "
            "(<code>--ledger</code>).</p>",
            "</section>",
        ]
    )


def _queue_wait_section(digest: LedgerDigest, types: Sequence[str]) -> str:
    """Queue wait per task type (stamped tasks only): growing waits ask for more
    workers, not bigger ones."""
    stamped = [(t, digest.types[t]) for t in types if digest.types[t].queue_wait_runs]
    parts = ['<section class="card" id="queue-wait"><h2>Queue wait</h2>']
    if not stamped:
        parts.append(
            '<p class="caption">No task carries a queue wait: their senders do not run '
            "<code>taskmeter.celery.instrument(app)</code>, which stamps each message "
            "at publish.</p></section>"
        )
        return "\n".join(parts)
    fig = go.Figure()
    for task, d in stamped:
        q = d.queue_wait
        fig.add_trace(
            go.Box(
                name=task, x=[task], q1=[q.quantile(0.25)], median=[q.quantile(0.5)],
                q3=[q.quantile(0.75)], lowerfence=[q.min], upperfence=[q.max],
                marker_color=OVERHEAD_COLOR, boxpoints=False, hoverinfo="y",
                showlegend=False,
            )
        )  # fmt: skip
    fig.update_layout(title="Time from publish (or ETA) to start, per task type",
                      yaxis_title="seconds")  # fmt: skip
    counts = ", ".join(f"{_esc(t)}: {d.queue_wait_runs} of {d.runs}" for t, d in stamped)
    parts += [
        _figure(fig, "queue-wait-plot", 380),
        '<p class="caption">Each box spans the quartiles around the median, its whiskers '
        "the shortest and longest wait. Only tasks whose sender stamped the message have "
        f"a wait ({counts}). Waits that grow while memory stays put mean the pool is too "
        "small: add workers (or concurrency) rather than memory.</p>",
        "</section>",
    ]
    return "\n".join(parts)


def _tasks_section(digest: LedgerDigest) -> str:
    heads = [("task", "str"), ("state", "str"), ("started at (UTC)", "num"), ("wall", "num"),
             ("CPU overhead", "num"), ("CPU tools", "num"), ("worker RSS avg", "num"),
             ("worker RSS peak", "num"), ("footprint", "num"), ("tools", "str")]  # fmt: skip
    rows = []
    shown: list[TableRow] = digest.table_rows()
    for r in shown:
        started = _epoch(r.started_at)
        rows.append(
            "<tr>"
            + f'<td title="task id {_esc(r.task_id or "none")}">{_esc(r.task)}</td>'
            + f'<td><span class="dot" style="background:{STATE_COLORS.get(r.state, OTHER_COLOR)}">'
            + f"</span>{_esc(r.state)}</td>"
            + _num(started, _short_time(r.started_at))
            + _num(r.wall_s, seconds_h(r.wall_s))
            + _num(r.cpu_overhead_s, seconds_h(r.cpu_overhead_s))
            + _num(r.cpu_tools_s, seconds_h(r.cpu_tools_s))
            + _num(r.rss_avg_bytes, bytes_h(r.rss_avg_bytes))
            + _num(r.rss_peak_bytes, bytes_h(r.rss_peak_bytes))
            + _num(r.footprint_bytes, bytes_h(r.footprint_bytes))
            + f"<td>{_esc(r.tools)}</td>"
            + "</tr>"
        )
    if digest.sampled:
        title = f"Tasks: a sample of {len(shown)} of {digest.total}"
        how = (
            f"<strong>{digest.total} tasks are too many for one page: the table shows "
            f"{len(shown)} of them</strong>, a uniform random sample of {digest.table_max} "
            "(reservoir sampling with a fixed seed: the same ledger gives the same rows) plus "
            "the tasks with the largest footprint of every type, in ledger order. The other "
            "sections count every task. "
        )
    else:
        title, how = "All tasks", ""
    return (
        f'<section id="all-tasks"><h2>{_esc(title)}</h2>'
        f'<p class="caption">{how}Click a column header to sort (again to reverse). Hover a '
        "task name for its id.</p>" + _table("tasks", heads, rows) + "</section>"
    )


def _footer() -> str:
    return (
        "<footer><p>Made by <code>taskmeter report</code>. Wall and CPU come from the "
        "kernel's accounting (getrusage, wait4); peaks marked <code>hwm</code> are the "
        "kernel's high-water marks, averages come from sampling. Memory is per process and "
        "never summed across processes except in the footprint (worker + tools alive at "
        "once).</p></footer>"
    )


# -- figures -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _TimeSplit:
    """Mean seconds per task: wall and CPU, each split into overhead and tools."""

    runs: int
    ov_wall: float
    tool_wall: float
    ov_cpu: float
    tool_cpu: float
    other_cpu: float = 0.0  # children not run through taskmeter (ledger only)


def _time_figure(d: TypeDigest) -> Any:
    runs = max(d.runs, 1)
    return _split_figure(
        _TimeSplit(
            d.runs,
            d.wall_overhead_s / runs,
            d.wall_tools_s / runs,
            d.cpu_overhead_s / runs,
            d.cpu_tools_s / runs,
            d.cpu_other_s / runs,
        )
    )


def _time_figure_stats(s: TaskStats) -> Any:
    runs = max(s.runs, 1)
    return _split_figure(
        _TimeSplit(
            s.runs,
            s.wall_overhead_sum_s / runs,
            s.wall_tool_sum_s / runs,
            s.cpu_overhead_sum_s / runs,
            s.cpu_tool_sum_s / runs,
        )
    )


def _split_figure(t: _TimeSplit) -> Any:
    wall_total, cpu_total = t.ov_wall + t.tool_wall, t.ov_cpu + t.tool_cpu
    x = [f"wall (mean {seconds_h(wall_total)})", f"CPU (mean {seconds_h(cpu_total)})"]
    fig = go.Figure()
    for name, color, (wall, cpu) in (
        ("worker overhead", OVERHEAD_COLOR, (t.ov_wall, t.ov_cpu)),
        ("tools", TOOL_COLOR, (t.tool_wall, t.tool_cpu)),
    ):
        fig.add_trace(
            go.Bar(
                name=name, x=x, y=[wall, cpu], marker_color=color,
                text=[_share(wall, wall_total), _share(cpu, cpu_total)],
                textposition="inside",
                hovertext=[f"{name}: {seconds_h(wall)}", f"{name}: {seconds_h(cpu)}"],
                hoverinfo="text",
            )
        )  # fmt: skip
    if t.other_cpu > max(1e-3, 0.01 * cpu_total):  # not float noise
        fig.add_trace(
            go.Bar(
                name="children not run via taskmeter", x=x[1:], y=[t.other_cpu],
                marker_color=OTHER_COLOR, hoverinfo="text",
                hovertext=[f"unattributed child CPU: {seconds_h(t.other_cpu)}"],
            )
        )  # fmt: skip
    fig.update_layout(
        barmode="stack",
        title=f"Wall and CPU: overhead vs tools (mean of {t.runs})",
        yaxis_title="seconds per task",
    )
    return fig


def _memory_figure(d: TypeDigest, sizing: Sizing) -> Any:
    series: list[tuple[str, int, StreamQuantiles, str]] = [
        ("worker RSS average", 0, d.rss_avg, OVERHEAD_COLOR),
        ("worker RSS peak", 1, d.rss_peak, "#1f3f66"),
        ("footprint (worker + tools)", 2, d.footprint, TOOL_COLOR),
    ]
    fig = go.Figure()
    if d.points is not None:
        labels = [_ptext(label) for _, label in d.points]
        for name, k, _, color in series:
            fig.add_trace(
                go.Box(
                    name=name, y=[v[k] / MiB for v, _ in d.points], marker_color=color,
                    boxpoints="all", jitter=0.4, pointpos=0, text=labels,
                    hoverinfo="y+text", showlegend=False,
                )
            )  # fmt: skip
    else:
        # Precomputed boxes: three numbers and two whiskers per series, however many tasks.
        for name, _, q, color in series:
            fig.add_trace(
                go.Box(
                    name=name, x=[name], q1=[q.quantile(0.25) / MiB],
                    median=[q.quantile(0.5) / MiB], q3=[q.quantile(0.75) / MiB],
                    lowerfence=[q.min / MiB], upperfence=[q.max / MiB], marker_color=color,
                    boxpoints=False, hoverinfo="y", showlegend=False,
                )
            )  # fmt: skip
    _sizing_lines(fig, sizing)
    fig.update_layout(title="Memory per task", yaxis_title="MiB", yaxis_rangemode="tozero")
    return fig


def _memory_figure_stats(s: TaskStats, sizing: Sizing) -> Any:
    bars = [
        ("typical in use", s.typical_bytes(None), OVERHEAD_COLOR,
         "mean worker RSS average + mean tool RSS average"),
        ("footprint median", s.footprint_median_bytes, "#f5b971",
         "within histogram bucket resolution"),
        ("footprint max", s.footprint_max_bytes, TOOL_COLOR, "exact, from the max gauge"),
        ("worker peak max", s.overhead_peak_max_bytes, "#1f3f66", "exact, from the max gauge"),
    ]  # fmt: skip
    fig = go.Figure(
        go.Bar(
            x=[b[0] for b in bars], y=[b[1] / MiB for b in bars],
            marker_color=[b[2] for b in bars], showlegend=False, hoverinfo="text",
            hovertext=[f"{b[0]}: {bytes_h(b[1])} ({b[3]})" for b in bars],
            text=[bytes_h(b[1]) for b in bars], textposition="outside",
        )
    )  # fmt: skip
    _sizing_lines(fig, sizing)
    fig.update_layout(title="Memory per task (aggregated)", yaxis_title="MiB")
    return fig


def _sizing_lines(fig: Any, sizing: Sizing) -> None:
    rec: Recommendation | None = sizing.recommendation
    n = sizing.concurrency
    if rec is None or n is None:
        fig.add_annotation(
            text="no request/limit lines: see Sizing", xref="paper", yref="paper",
            x=1, y=1.06, showarrow=False, font={"size": 11, "color": "#666"}, xanchor="right",
        )  # fmt: skip
        return
    for what, pod_bytes, quantity, color, position in (
        ("request", rec.memory_request_bytes, rec.memory_request, REQUEST_COLOR, "bottom left"),
        ("limit", rec.memory_limit_bytes, rec.memory_limit, LIMIT_COLOR, "top left"),
    ):
        per_task = sizing.per_task(pod_bytes)
        fig.add_hline(
            y=per_task / MiB,
            line={"color": color, "dash": "dash", "width": 2},
            annotation_text=f"{what} per task: {quantity} ÷ {n} = {bytes_h(per_task)}",
            annotation_position=position,
            annotation_font={"color": color, "size": 11},
        )


def _timeline_figure(reports: Sequence[TaskReport], tool_colors: dict[str, str]) -> Any:
    titles = [
        _ptext(
            f"task {r.task_id or '(no id)'} · {r.state} · started {_short_time(r.started_at)} · "
            f"footprint {bytes_h(r.footprint_peak_bytes)}"
        )
        for r in reports
    ]
    rows = len(reports)
    fig = subplots.make_subplots(
        rows=rows, cols=1, subplot_titles=titles, vertical_spacing=min(0.12, 0.45 / rows)
    )
    in_legend: set[str] = set()

    def legend(name: str) -> bool:
        first = name not in in_legend
        in_legend.add(name)
        return first

    for row, r in enumerate(reports, start=1):
        end = max([r.wall_s, *(t.end_s for t in r.tools)])
        avg = r.overhead.rss_avg_bytes / MiB
        for name, y, line, fill in (
            ("worker RSS average", avg, {"color": OVERHEAD_COLOR, "width": 1}, "tozeroy"),
            ("worker RSS peak", r.overhead.rss_peak_bytes / MiB,
             {"color": "#1f3f66", "dash": "dash", "width": 1.5}, None),
            ("footprint peak", r.footprint_peak_bytes / MiB,
             {"color": LIMIT_COLOR, "dash": "dot", "width": 1.5}, None),
        ):  # fmt: skip
            fig.add_trace(
                go.Scatter(
                    x=[0, end], y=[y, y], mode="lines", line=line, fill=fill,
                    fillcolor="rgba(76,120,168,0.25)" if fill else None, name=name,
                    legendgroup=name, showlegend=legend(name), hoverinfo="text",
                    hovertext=[f"{name}: {bytes_h(y * MiB)}"] * 2,
                ),
                row=row, col=1,
            )  # fmt: skip
        for exe, bars in _tool_bars(r, avg, min_width=end * 0.006).items():
            fig.add_trace(
                go.Bar(
                    x=[b[0] for b in bars], y=[b[1] for b in bars], base=[b[2] for b in bars],
                    width=[b[3] for b in bars], name=_ptext(exe), legendgroup=f"tool:{exe}",
                    showlegend=legend(f"tool:{exe}"),
                    marker={"color": tool_colors.get(exe, TOOL_COLOR), "opacity": 0.85,
                            "line": {"color": [b[4] for b in bars], "width": 1.5}},
                    hovertext=[b[5] for b in bars], hoverinfo="text",
                ),
                row=row, col=1,
            )  # fmt: skip
        fig.update_xaxes(range=[0, end * 1.02 or 1], row=row, col=1)
        fig.update_yaxes(title_text="MiB", rangemode="tozero", row=row, col=1)
    fig.update_xaxes(title_text="seconds since task start", row=rows, col=1)
    fig.update_layout(
        barmode="overlay",
        legend={"orientation": "h", "yanchor": "bottom", "y": 1 + 40 / (110 + 200 * rows)},
    )
    fig.update_annotations(font_size=12)
    return fig


# One bar: (x centre, height MiB, base MiB, width s, outline colour, hover text).
_Bar = tuple[float, float, float, float, str, str]


def _tool_bars(r: TaskReport, worker_avg_mib: float, min_width: float) -> dict[str, list[_Bar]]:
    """Each tool run as a bar from start to end at its peak, stacked on the worker's
    average and on the runs still alive when it started."""
    out: dict[str, list[_Bar]] = {}
    alive: list[tuple[float, float]] = []  # (end_s, peak MiB)
    for t in sorted(r.tools, key=lambda t: (t.start_s, t.end_s)):
        alive = [(e, h) for e, h in alive if e > t.start_s]
        base = worker_avg_mib + sum(h for _, h in alive)
        height = t.rss_peak_bytes / MiB
        width = max(t.end_s - t.start_s, min_width)
        outline = "#333333" if t.outcome == "ok" else LIMIT_COLOR
        out.setdefault(_exe(t), []).append(
            (t.start_s + width / 2, height, base, width, outline, _tool_hover(t))
        )
        alive.append((t.end_s, height))
    return out


def _tool_hover(t: ToolRun) -> str:
    how = f"exit {t.exit_code}" if t.signal is None else f"signal {t.signal}"
    return _ptext(
        f"{_exe(t)} (pid {t.pid}, {how}, {t.outcome})\n"
        f"{t.start_s:.3f} s to {t.end_s:.3f} s ({seconds_h(t.wall_s)})\n"
        f"RSS peak {bytes_h(t.rss_peak_bytes)} ({t.peak_method}), "
        f"average {bytes_h(t.rss_avg_bytes)}\nCPU {seconds_h(t.cpu_s)}"
    ).replace("\n", "<br>")


# -- helpers -----------------------------------------------------------------------------------
def _figure(fig: Any, div_id: str, height: int) -> str:
    fig.update_layout(
        template="plotly_white",
        height=height,
        margin={"l": 60, "r": 20, "t": 70, "b": 50},
        font={"family": "system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif"},
        uniformtext={"minsize": 10, "mode": "hide"},  # no unreadable labels in thin bars
    )
    # plotly's "auto" JSON engine is orjson when installed (taskmeter depends on it),
    # which writes non-ASCII as is: the json engine keeps the page's figures the same,
    # all ASCII, whatever is installed.
    engine = pio.json.config.default_engine
    pio.json.config.default_engine = "json"
    try:
        inner: str = pio.to_html(
            fig,
            include_plotlyjs=False,  # inlined once in the head
            full_html=False,
            div_id=div_id,
            config=_PLOTLY_CONFIG,
            default_width="100%",
            default_height=f"{height}px",
        )
    finally:
        pio.json.config.default_engine = engine
    return f'<div class="figure">{inner}</div>'


def _table(table_id: str, heads: Sequence[tuple[str, str]], rows: Sequence[str]) -> str:
    th = "".join(
        f'<th data-type="{kind}" scope="col"><button type="button">{_esc(name)}</button></th>'
        for name, kind in heads
    )
    return (
        f'<div class="table-wrap"><table class="sortable" id="{table_id}">'
        f"<thead><tr>{th}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
    )


def _num(value: float, shown: str) -> str:
    return f'<td class="num" data-v="{value!r}">{_esc(shown)}</td>'


def _tool_colors(reports: Iterable[TaskReport]) -> dict[str, str]:
    names = sorted({_exe(t) for r in reports for t in r.tools})
    return {name: TOOL_PALETTE[i % len(TOOL_PALETTE)] for i, name in enumerate(names)}


def _exe(t: ToolRun) -> str:
    return tool_name(t)


def _per_run(total: float, s: TaskStats) -> float:
    return total / s.runs if s.runs else 0.0


def _share(part: float, whole: float) -> str:
    return f"{part / whole:.0%}" if whole > 0 and part / whole >= 0.04 else ""


def _epoch(iso: str) -> float:
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return math.nan


def _short_time(iso: str) -> str:
    """'2024-05-01T12:00:00.123456+00:00' -> '2024-05-01 12:00:00.123'."""
    try:
        return datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    except ValueError:
        return iso


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _ptext(text: str) -> str:
    """Text shown by plotly, which reads a little HTML: keep it literal."""
    return html.escape(text, quote=False)


_CSS = """
:root { color-scheme: light; --fg: #1d2430; --muted: #5b6472; --line: #d9dee7; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: var(--fg); background: #f6f7f9; }
main { max-width: 1500px; margin: 0 auto; padding: 16px 24px 40px; }
h1 { margin: 8px 0 4px; font-size: 26px; }
h2 { margin: 0 0 6px; font-size: 20px; }
h3 { margin: 18px 0 4px; font-size: 16px; }
section, header { background: #fff; border: 1px solid var(--line); border-radius: 8px;
                  padding: 14px 18px; margin: 14px 0; }
.meta, .caption { color: var(--muted); font-size: 13px; margin: 4px 0; }
.counts { margin: 6px 0 0; }
.badge { display: inline-block; color: #fff; border-radius: 10px; padding: 1px 9px;
         font-size: 13px; margin-right: 4px; }
.dot { display: inline-block; width: 9px; height: 9px; border-radius: 50%; margin-right: 6px; }
nav { font-size: 14px; margin: 6px 2px; }
nav a { color: #2456a6; text-decoration: none; }
nav a:hover { text-decoration: underline; }
.warnings { border-color: #e0a800; background: #fffbea; }
.refused { color: #8a4b00; }
.grid2 { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; }
@media (max-width: 1000px) { .grid2 { grid-template-columns: 1fr; } }
.figure { min-width: 0; }
table { border-collapse: collapse; font-size: 13px; }
.table-wrap { overflow: auto; max-height: 80vh; border: 1px solid var(--line); }
table.sortable { width: 100%; }
table.sortable th { position: sticky; top: 0; background: #eef1f6; text-align: left;
                    border-bottom: 1px solid var(--line); padding: 0; white-space: nowrap; }
table.sortable th button { all: unset; cursor: pointer; display: block; padding: 6px 8px;
                           font-weight: 600; }
table.sortable th button:focus-visible { outline: 2px solid #2456a6; }
table.sortable th[aria-sort="ascending"] button::after { content: " \\25B2"; }
table.sortable th[aria-sort="descending"] button::after { content: " \\25BC"; }
table.sortable td { padding: 4px 8px; border-bottom: 1px solid #eef0f4; white-space: nowrap; }
table.sortable tbody tr:nth-child(even) { background: #fafbfc; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.kv th { text-align: left; padding: 3px 14px 3px 0; font-weight: 600; }
table.kv td { padding: 3px 14px 3px 0; }
code { font-size: 13px; }
footer { color: var(--muted); font-size: 12px; margin-top: 20px; }
"""

# Click a header to sort its table by that column; click again to reverse. Numeric
# columns sort by the raw value in data-v, text columns by their text.
_SORT_JS = """
(function () {
  function key(row, col, numeric) {
    var cell = row.cells[col];
    var raw = cell.hasAttribute('data-v') ? cell.getAttribute('data-v') : cell.textContent;
    if (!numeric) return raw.toLowerCase();
    var v = parseFloat(raw);
    return isNaN(v) ? -Infinity : v;
  }
  document.querySelectorAll('table.sortable').forEach(function (table) {
    var heads = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(heads, function (th, col) {
      th.querySelector('button').addEventListener('click', function () {
        var ascending = th.getAttribute('aria-sort') !== 'ascending';
        Array.prototype.forEach.call(heads, function (h) { h.removeAttribute('aria-sort'); });
        th.setAttribute('aria-sort', ascending ? 'ascending' : 'descending');
        var numeric = th.getAttribute('data-type') === 'num';
        var body = table.tBodies[0];
        var keyed = Array.prototype.map.call(body.rows, function (row, i) {
          return {k: key(row, col, numeric), i: i, row: row};
        });
        keyed.sort(function (a, b) {
          var c = numeric ? (a.k === b.k ? 0 : (a.k < b.k ? -1 : 1)) : a.k.localeCompare(b.k);
          return (ascending ? c : -c) || a.i - b.i;
        });
        var rows = document.createDocumentFragment();
        keyed.forEach(function (e) { rows.appendChild(e.row); });
        body.appendChild(rows);
      });
    });
  });
})();
"""
