"""OpenTelemetry: a real prefork worker with the official Celery instrumentor
(opentelemetry-instrumentation-celery) and the SDK's in-memory exporter. taskmeter
sets each task's figures on its span; they must equal the ledger's."""

from __future__ import annotations

import math

import pytest

from taskmeter.celery import otel
from taskmeter.measure.report import TaskReport

from workerkit import REDIS_URL

BACKEND = "redis://127.0.0.1:6379/14"


@pytest.mark.slow
def test_spans_of_a_real_worker_carry_the_ledger_figures(start_worker):
    w = start_worker(concurrency=1, TM_OTEL="1", TM_BACKEND=BACKEND)
    sent = [
        w.send("tool.hold", 20, 0.2),
        w.send("cpu.burn", 0.05),
        w.send("noop"),
    ]
    reports = {r.task_id: r for r in w.wait_reports(len(sent))}

    from celery import Celery

    client = Celery("client", broker=REDIS_URL, backend=BACKEND)
    spans = client.send_task("otel.spans", queue=w.queue).get(timeout=30)
    by_id: dict[str, dict[str, object]] = {}
    for s in spans:
        tid = next((v for v in s["attributes"].values() if v in reports), None)
        if tid is not None and "taskmeter.wall_s" in s["attributes"]:
            by_id[str(tid)] = s
    assert set(by_id) == {r.id for r in sent}, spans

    for tid, span in by_id.items():
        report: TaskReport = reports[tid]
        attrs = span["attributes"]
        assert isinstance(attrs, dict)
        expected = otel.attributes(report)
        assert set(expected) <= set(attrs)
        for key, value in expected.items():
            if isinstance(value, float):
                assert math.isclose(attrs[key], value, rel_tol=1e-12), key
            else:
                assert attrs[key] == value, key
        events = span["events"]
        assert isinstance(events, list)
        tool_events = [e for e in events if e["name"] == "taskmeter.tool"]
        assert len(tool_events) == len(report.tools)
        for event, tool in zip(tool_events, report.tools, strict=True):
            assert event["attributes"]["taskmeter.tool.exe"] == tool.exe
            assert event["attributes"]["taskmeter.tool.rss_peak_bytes"] == tool.rss_peak_bytes
    # The tool task's span says one tool, whose peak holds the 20 MiB it allocated.
    hold = next(r for r in reports.values() if r.task == "tool.hold")
    attrs = by_id[hold.task_id or ""]["attributes"]
    assert isinstance(attrs, dict) and attrs["taskmeter.tool.count"] == 1
    assert attrs["taskmeter.memory.tool_peak_bytes"] >= 20 << 20


def test_annotate_is_a_no_op_without_a_recording_span():
    from taskmeter.measure import measure

    with measure("t") as m:
        pass
    assert m.report is not None
    assert otel.annotate(m.report) is False
