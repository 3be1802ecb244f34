"""A task's figures as attributes of its OpenTelemetry span, when there is one.

With the OpenTelemetry API installed (``taskmeter[otel]``) and a recording span
current when the task ends (e.g. the one ``opentelemetry-instrumentation-celery``
opens per task), :func:`annotate` sets the TaskReport's figures on it as
``taskmeter.*`` attributes and adds one ``taskmeter.tool`` event per tool run.
Without the API, or without a recording span, it does nothing, at the cost of one
function call.
"""

from __future__ import annotations

from typing import Any

from taskmeter.measure.report import TaskReport

try:  # optional dependency
    from opentelemetry import trace as _trace
except ImportError:  # pragma: no cover - exercised by the base-install test
    _trace = None  # type: ignore[assignment]

AVAILABLE = _trace is not None


def attributes(report: TaskReport) -> dict[str, Any]:
    """The span attributes of ``report`` (OTel semantic-convention style names)."""
    o = report.overhead
    attrs: dict[str, Any] = {
        "taskmeter.state": report.state,
        "taskmeter.wall_s": report.wall_s,
        "taskmeter.wall.overhead_s": o.wall_s,
        "taskmeter.wall.tool_s": report.tool_totals.wall_s,
        "taskmeter.cpu_s": report.cpu_s,
        "taskmeter.cpu.overhead_s": o.cpu_s,
        "taskmeter.cpu.tool_s": report.tool_totals.cpu_s,
        "taskmeter.memory.overhead_avg_bytes": o.rss_avg_bytes,
        "taskmeter.memory.overhead_peak_bytes": o.rss_peak_bytes,
        "taskmeter.memory.tool_peak_bytes": report.tool_totals.rss_peak_bytes,
        "taskmeter.memory.footprint_peak_bytes": report.footprint_peak_bytes,
        "taskmeter.memory.peak_method": o.peak_method,
        "taskmeter.tool.count": report.tool_totals.runs,
    }
    if report.queue_wait_s is not None:
        attrs["taskmeter.queue_wait_s"] = report.queue_wait_s
    if report.cause is not None:
        attrs["taskmeter.cause"] = report.cause
    return attrs


def recording() -> bool:
    """Whether a recording span is current (one :func:`annotate` would annotate)."""
    return _trace is not None and bool(_trace.get_current_span().is_recording())


def annotate(report: TaskReport) -> bool:
    """Set ``report``'s figures on the current span; True when there was one."""
    if _trace is None:
        return False
    span = _trace.get_current_span()
    if not span.is_recording():
        return False
    span.set_attributes(attributes(report))
    for t in report.tools:
        span.add_event(
            "taskmeter.tool",
            {
                "taskmeter.tool.exe": t.exe,
                "taskmeter.tool.outcome": t.outcome,
                "taskmeter.tool.exit_code": -1 if t.exit_code is None else t.exit_code,
                "taskmeter.tool.wall_s": t.wall_s,
                "taskmeter.tool.cpu_s": t.cpu_s,
                "taskmeter.tool.rss_avg_bytes": t.rss_avg_bytes,
                "taskmeter.tool.rss_peak_bytes": t.rss_peak_bytes,
                "taskmeter.tool.peak_method": t.peak_method,
            },
        )
    return True
