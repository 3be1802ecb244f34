"""The scrape's size per task type: at most 80 series per task type per worker, tools,
phases, kills and queue wait included (issue 9 part 2), counted on a real worker's
/metrics and on the contract's worst case."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import time
import urllib.request
from collections import Counter

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_parse
from prometheus_client.parser import text_string_to_metric_families

import taskmeter
from taskmeter.celery.queuewait import HEADER
from taskmeter.export.metrics import TaskMetrics
from taskmeter.export.server import Renderer
from taskmeter.measure.report import TaskReport

from workerkit import wait_for

BUDGET = 80
OPENMETRICS = "application/openmetrics-text;version=1.0.0"


def series_by_task(text: str, openmetrics: bool = False) -> dict[str, Counter[str]]:
    """task label -> family -> number of series (one per sample line)."""
    out: dict[str, Counter[str]] = {}
    parse = om_parse if openmetrics else text_string_to_metric_families
    for family in parse(text):
        for sample in family.samples:
            task = sample.labels.get("task")
            if task is not None:
                out.setdefault(task, Counter())[family.name] += 1
    return out


def expected_series(reports: list[TaskReport]) -> Counter[str]:
    """The series a task type's reports must create, by family (ground truth from the
    reports themselves, per the family list of the contract)."""
    with_tools = any(r.tools for r in reports)
    components = 2 if with_tools else 1
    states = {"success", "failure"} | {r.state for r in reports}
    causes = {r.cause or "unknown" for r in reports if r.cause or r.state in ("killed", "lost")}
    tools = {(os.path.basename(t.exe), t.outcome) for r in reports for t in r.tools}
    phases = {p.name for r in reports for p in r.phases}
    hist = lambda bounds: bounds + 1 + 2  # noqa: E731 - buckets, +Inf, _sum, _count
    expected = Counter(
        {
            "celery_task_runs": len(states),
            "celery_task_kills": len(causes),
            "celery_task_wall_seconds": hist(9),
            "celery_task_memory_peak_bytes": hist(7) * components,
            "celery_task_footprint_peak_bytes": hist(7),
            "celery_task_memory_avg_bytes": 2 * components,
            "celery_task_memory_peak_bytes_max": components,
            "celery_task_footprint_peak_bytes_max": 1,
            "celery_task_cpu_seconds": 2,
            "celery_task_component_wall_seconds": 2,
            "celery_task_tool_runs": len(tools),
            "celery_task_phase_wall_seconds": len(phases),
            "celery_task_inflight": 1,
            "celery_task_inflight_rss_bytes": 2,
        }
    )
    if any(r.queue_wait_s is not None for r in reports):
        expected["celery_task_queue_wait_seconds"] = hist(9)
    return +expected


def test_the_contracts_worst_case_is_exactly_80_series() -> None:
    """One tool, three phases, two kill causes, every state, queue wait: 80."""
    with taskmeter.measure("t.full", "id-0") as m:
        for phase in ("fetch", "compute", "store"):
            with m.phase(phase):
                if phase == "compute":
                    taskmeter.run(["true"], check=True)
    base = dataclasses.replace(m.report, queue_wait_s=0.5)
    metrics = TaskMetrics(inflight=lambda: [], pool="prefork", concurrency=4)
    metrics.observe(base)
    for state, cause in (("failure", None), ("retry", None), ("revoked", None),
                         ("killed", "oom"), ("lost", "unknown")):  # fmt: skip
        metrics.observe(dataclasses.replace(base, state=state, cause=cause))
    registry = CollectorRegistry()
    registry.register(metrics)
    renderer = Renderer(registry)
    counts = series_by_task(renderer.render().decode())["t.full"]
    assert sum(counts.values()) == BUDGET, counts
    om_counts = series_by_task(renderer.render(openmetrics=True).decode(), openmetrics=True)
    assert om_counts["t.full"] == counts  # exemplars add no series
    assert counts["celery_task_runs"] == 6 and counts["celery_task_kills"] == 2
    # A task type that was only declared costs 9 series (zeros where rate() needs them).
    metrics.declare(["t.idle"])
    idle = series_by_task(renderer.render().decode())["t.idle"]
    assert sum(idle.values()) == 9, idle


@pytest.mark.slow
def test_a_real_workers_scrape_stays_within_80_series_per_task_type(start_worker) -> None:
    w = start_worker("redis", "prefork", 2)
    t0 = time.monotonic()

    def send(*args: object, **options: object) -> None:
        # Stamped at publish as taskmeter's senders do: queue wait is in the budget.
        w.send(*args, headers={HEADER: time.time()}, **options)

    send("phased")
    send("phased", "fail")
    send("phased", "retry")  # a retry, then a success
    send("phased", "ok", 30, time_limit=1)  # killed by the hard time limit
    send("noop")
    w.wait_reports(6)
    # A second kill cause: SIGKILL of the pool process running the task.
    send("phased", "ok", 60)
    victim = wait_for(
        lambda: [r["pid"] for r in w.inflight() if r["task"] == "phased"],
        30,
        "the phased task in flight",
    )[0]
    with contextlib.suppress(ProcessLookupError):
        os.kill(victim, signal.SIGKILL)
    reports = w.wait_reports(7)
    phased = [r for r in reports if r.task == "phased"]
    states = Counter(r.state for r in phased)
    assert states["success"] >= 2 and states["failure"] == 1 and states["retry"] == 1, states
    assert states["killed"] == 2, states
    assert all(len(r.phases) >= 2 and r.tools for r in phased if r.state != "killed")

    text = w.metrics()
    assert 'taskmeter_worker_info{concurrency="2",pool="prefork"} 1.0' in text
    by_task = series_by_task(text)
    counts = by_task["phased"]
    assert sum(counts.values()) <= BUDGET, counts
    assert counts == expected_series(phased), (counts, expected_series(phased))
    assert counts["celery_task_phase_wall_seconds"] == 3
    assert counts["celery_task_queue_wait_seconds"] == 12
    assert counts["celery_task_tool_runs"] == 1
    assert counts["celery_task_kills"] >= 1
    # A task type without tools or phases: no tool memory series (13), no tool or phase.
    assert sum(by_task["noop"].values()) == sum(expected_series(
        [r for r in reports if r.task == "noop"]).values()) <= BUDGET - 13  # fmt: skip

    # The same series in the OpenMetrics a Prometheus negotiates (exemplars are no
    # series), and the whole scrape of this worker.
    req = urllib.request.Request(w.url + "/metrics", headers={"Accept": OPENMETRICS})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
        om = resp.read().decode()
    assert series_by_task(om, openmetrics=True)["phased"] == counts
    assert time.monotonic() - t0 < 50


@pytest.mark.slow
@pytest.mark.parametrize(("pool", "concurrency", "shown"), [("solo", 4, 1), ("threads", 3, 3)])
def test_worker_info_names_the_pool_and_its_real_concurrency(
    start_worker, pool: str, concurrency: int, shown: int
) -> None:
    """For pool-aware sizing from Prometheus: solo runs one task at a time whatever -c."""
    w = start_worker("redis", pool, concurrency)
    info = [ln for ln in w.metrics().splitlines() if ln.startswith("taskmeter_worker_info")]
    assert info == [f'taskmeter_worker_info{{concurrency="{shown}",pool="{pool}"}} 1.0']
