"""TaskMetrics: real reports in, Prometheus text out, parsed back and checked exactly."""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import subprocess
import sys
import threading
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import taskmeter
from taskmeter.export.metrics import (
    MEMORY_BUCKETS,
    TIME_BUCKETS,
    InflightTask,
    TaskMetrics,
)
from taskmeter.measure.report import STATES, TaskReport

from helpers import child

SECRET_ID = "secret-task-id-8d1c"
SECRET_ARG = "secret-arg-77f0"
MIB = 2**20

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def alloc_child(mib: int) -> list[str]:
    """A Python child that allocates and touches ``mib`` MiB, then exits 0."""
    return child(f"b = b'x' * ({mib} << 20)\nimport time; time.sleep(0.1)  # peak seen alive")


@pytest.fixture(scope="module")
def reports() -> list[TaskReport]:
    """One real measured report of every state; tm.alloc runs real tools."""
    out: list[TaskReport] = []
    for i in range(2):
        with taskmeter.measure("tm.exit3", f"{SECRET_ID}-{i}") as m:
            taskmeter.run(["sh", "-c", "exit 3", SECRET_ARG])
        out.append(m.report)

    with taskmeter.measure("tm.alloc", f"{SECRET_ID}-2") as m:
        with m.phase("prepare"):
            sum(range(100_000))
        taskmeter.run(alloc_child(40), check=True)
        with m.phase("upload"):
            taskmeter.run(["true"], check=True)
    out.append(m.report)

    with pytest.raises(RuntimeError), taskmeter.measure("tm.alloc", f"{SECRET_ID}-3") as m:
        taskmeter.run(alloc_child(20), check=True)
        raise RuntimeError("task failed")
    out.append(m.report)

    killed = taskmeter.measure("tm.alloc", f"{SECRET_ID}-4").start()
    taskmeter.run(["sleep", "0.01"])
    out.append(killed.finish(state="killed"))

    out.append(taskmeter.measure("tm.quiet", f"{SECRET_ID}-5").start().finish(state="revoked"))
    with taskmeter.measure("tm.quiet", f"{SECRET_ID}-6") as m:
        m.set_state("retry")
    out.append(m.report)

    assert {r.state for r in out} == set(STATES)
    return out


def scrape(metrics: TaskMetrics) -> tuple[str, Samples]:
    registry = CollectorRegistry()
    registry.register(metrics)
    text = generate_latest(registry).decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = s.value
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def series(samples: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def check_histogram(
    samples: Samples, name: str, bounds: tuple[float, ...], observed: list[float], **labels: str
) -> None:
    """Count, exact sum and every cumulative bucket against the observed values."""
    assert value(samples, f"{name}_count", **labels) == len(observed)
    total = 0.0
    for x in observed:
        total += x
    assert value(samples, f"{name}_sum", **labels) == total
    buckets = sorted(
        (float(dict(lbl)["le"]), v)
        for lbl, v in series(samples, f"{name}_bucket").items()
        if {k: v for k, v in lbl if k != "le"} == labels
    )
    assert [b for b, _ in buckets] == [*bounds, math.inf]
    counts = [c for _, c in buckets]
    assert counts == sorted(counts), "buckets must be cumulative"
    for le, count in buckets:
        assert count == sum(1 for x in observed if x <= le), (name, labels, le)
    assert counts[-1] == len(observed)


def tool_avg(report: TaskReport) -> float:
    wall = sum(t.wall_s for t in report.tools)
    return sum(t.rss_avg_bytes * t.wall_s for t in report.tools) / wall


def test_counts_sums_and_buckets_are_exact(reports: list[TaskReport]) -> None:
    metrics = TaskMetrics()
    for r in reports:
        metrics.observe(r)
    metrics.count_run("tm.exit3", "revoked")
    _, s = scrape(metrics)

    by_task: dict[str, list[TaskReport]] = {}
    for r in reports:
        by_task.setdefault(r.task, []).append(r)
    assert set(by_task) == {"tm.exit3", "tm.alloc", "tm.quiet"}

    # Runs by state, explicit zeros included; count_run adds a run with no report.
    expected_runs = {
        "tm.exit3": {"success": 2, "revoked": 1},
        "tm.alloc": {"success": 1, "failure": 1, "killed": 1},
        "tm.quiet": {"revoked": 1, "retry": 1},
    }
    for task, runs in expected_runs.items():
        for state in STATES:
            got = value(s, "celery_task_runs_total", task=task, state=state)
            assert got == runs.get(state, 0), (task, state)

    for task, rs in by_task.items():
        check_histogram(
            s, "celery_task_wall_seconds", TIME_BUCKETS, [r.wall_s for r in rs], task=task
        )
        cpu = {
            "overhead": [r.overhead.cpu_s for r in rs],
            "tool": [r.tool_totals.cpu_s for r in rs],
        }
        for component, values in cpu.items():
            check_histogram(
                s, "celery_task_cpu_seconds", TIME_BUCKETS, values, task=task, component=component
            )
            counter = value(s, "celery_task_cpu_seconds_total", task=task, component=component)
            assert counter == pytest.approx(sum(values), rel=1e-12)
        check_histogram(
            s,
            "celery_task_memory_avg_bytes",
            MEMORY_BUCKETS,
            [float(r.overhead.rss_avg_bytes) for r in rs],
            task=task,
            component="overhead",
        )
        check_histogram(
            s,
            "celery_task_memory_peak_bytes",
            MEMORY_BUCKETS,
            [float(r.overhead.rss_peak_bytes) for r in rs],
            task=task,
            component="overhead",
        )
        with_tools = [r for r in rs if r.tools]
        if with_tools:
            check_histogram(
                s,
                "celery_task_memory_avg_bytes",
                MEMORY_BUCKETS,
                [tool_avg(r) for r in with_tools],
                task=task,
                component="tool",
            )
            peaks = [float(r.tool_totals.rss_peak_bytes) for r in with_tools]
            check_histogram(
                s,
                "celery_task_memory_peak_bytes",
                MEMORY_BUCKETS,
                peaks,
                task=task,
                component="tool",
            )
            got = value(s, "celery_task_memory_peak_bytes_max", task=task, component="tool")
            assert got == max(peaks)
        else:  # no tool ran: no tool memory series at all (bounded scrape size)
            labels = (("component", "tool"), ("task", task))
            assert ("celery_task_memory_avg_bytes_count", labels) not in s
            assert ("celery_task_memory_peak_bytes_max", labels) not in s
        got = value(s, "celery_task_memory_peak_bytes_max", task=task, component="overhead")
        assert got == max(r.overhead.rss_peak_bytes for r in rs)
        footprints = [float(r.footprint_peak_bytes) for r in rs]
        check_histogram(
            s, "celery_task_footprint_peak_bytes", MEMORY_BUCKETS, footprints, task=task
        )
        assert value(s, "celery_task_footprint_peak_bytes_max", task=task) == max(footprints)

    # The real figures: the 40 MiB child is the largest tool peak, exactly recorded.
    alloc_peak = value(s, "celery_task_memory_peak_bytes_max", task="tm.alloc", component="tool")
    assert alloc_peak >= 40 * MIB
    assert alloc_peak == max(t.rss_peak_bytes for r in by_task["tm.alloc"] for t in r.tools)

    # Tool runs by basename and outcome.
    assert value(s, "celery_task_tool_runs_total", task="tm.exit3", tool="sh", outcome="error") == 2
    py = os.path.basename(sys.executable)
    assert value(s, "celery_task_tool_runs_total", task="tm.alloc", tool=py, outcome="ok") == 2
    assert value(s, "celery_task_tool_runs_total", task="tm.alloc", tool="true", outcome="ok") == 1
    assert value(s, "celery_task_tool_runs_total", task="tm.alloc", tool="sleep", outcome="ok") == 1
    assert len(series(s, "celery_task_tool_runs_total")) == 4

    for phase in ("prepare", "upload"):
        walls = [p.wall_s for r in reports for p in r.phases if p.name == phase]
        assert len(walls) == 1
        check_histogram(
            s, "celery_task_phase_wall_seconds", TIME_BUCKETS, walls, task="tm.alloc", phase=phase
        )


def test_no_task_id_or_argument_reaches_the_output(reports: list[TaskReport]) -> None:
    metrics = TaskMetrics()
    for r in reports:
        metrics.observe(r)
    text, s = scrape(metrics)
    assert SECRET_ID not in text and SECRET_ARG not in text
    label_names = {k for _, labels in s for k, _ in labels}
    assert label_names <= {"task", "state", "component", "tool", "outcome", "phase", "le", "label"}


def test_every_metric_has_its_contract_type_and_help(reports: list[TaskReport]) -> None:
    metrics = TaskMetrics()
    metrics.observe(reports[2])
    text, _ = scrape(metrics)
    expected = {
        "celery_task_runs_total": "counter",
        "celery_task_wall_seconds": "histogram",
        "celery_task_cpu_seconds": "histogram",
        "celery_task_cpu_seconds_total": "counter",
        "celery_task_wall_seconds_total": "counter",
        "celery_task_memory_avg_bytes": "histogram",
        "celery_task_memory_peak_bytes": "histogram",
        "celery_task_memory_peak_bytes_max": "gauge",
        "celery_task_footprint_peak_bytes": "histogram",
        "celery_task_footprint_peak_bytes_max": "gauge",
        "celery_task_tool_runs_total": "counter",
        "celery_task_phase_wall_seconds": "histogram",
        "celery_task_inflight": "gauge",
        "celery_task_inflight_rss_bytes": "gauge",
        "taskmeter_labels_folded_total": "counter",
    }
    types = {}
    helps = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, typ = line.split(" ", 3)
            types[name] = typ
        elif line.startswith("# HELP "):
            _, _, name, doc = line.split(" ", 3)
            helps[name] = doc
    assert types == expected
    assert all(len(doc) > 20 for doc in helps.values())


def test_buckets_cover_the_sizing_ranges_finely() -> None:
    assert MEMORY_BUCKETS[0] == MIB
    assert MEMORY_BUCKETS[-1] >= 64 * 2**30 > MEMORY_BUCKETS[-2]
    assert all(1 < b / a <= 1.25 for a, b in itertools.pairwise(MEMORY_BUCKETS))
    assert TIME_BUCKETS[0] == 0.001 and TIME_BUCKETS[-1] == 86400
    assert list(TIME_BUCKETS) == sorted(set(TIME_BUCKETS))
    assert all(b / a <= 2.5 for a, b in itertools.pairwise(TIME_BUCKETS))


def test_task_names_beyond_the_bound_are_folded_into_other(reports: list[TaskReport]) -> None:
    metrics = TaskMetrics(max_task_names=2)
    base = reports[0]
    for name in ("t.a", "t.b", "t.c", "t.d", "t.a"):
        metrics.observe(dataclasses.replace(base, task=name))
    metrics.count_run("t.e", "revoked")
    _, s = scrape(metrics)
    tasks = {dict(labels)["task"] for labels in series(s, "celery_task_runs_total")}
    assert tasks == {"t.a", "t.b", "other"}
    assert value(s, "celery_task_runs_total", task="t.a", state="success") == 2
    assert value(s, "celery_task_runs_total", task="other", state="success") == 2
    assert value(s, "celery_task_runs_total", task="other", state="revoked") == 1
    assert value(s, "celery_task_wall_seconds_count", task="other") == 2
    assert value(s, "taskmeter_labels_folded_total", label="task") == 3
    assert value(s, "taskmeter_labels_folded_total", label="tool") == 0


def test_tool_and_phase_values_beyond_the_bound_are_folded(reports: list[TaskReport]) -> None:
    two_tools_two_phases = reports[2]
    assert len(two_tools_two_phases.tools) == 2 and len(two_tools_two_phases.phases) == 2
    metrics = TaskMetrics(max_values_per_label=1)
    metrics.observe(two_tools_two_phases)
    metrics.observe(two_tools_two_phases)
    _, s = scrape(metrics)
    py = os.path.basename(sys.executable)
    tools = series(s, "celery_task_tool_runs_total")
    assert tools == {
        (("outcome", "ok"), ("task", "tm.alloc"), ("tool", py)): 2,
        (("outcome", "ok"), ("task", "tm.alloc"), ("tool", "other")): 2,
    }
    assert value(s, "celery_task_phase_wall_seconds_count", task="tm.alloc", phase="prepare") == 2
    assert value(s, "celery_task_phase_wall_seconds_count", task="tm.alloc", phase="other") == 2
    assert value(s, "taskmeter_labels_folded_total", label="tool") == 2
    assert value(s, "taskmeter_labels_folded_total", label="phase") == 2


def test_inflight_is_zero_for_seen_tasks_and_summed_from_the_callable(
    reports: list[TaskReport],
) -> None:
    metrics = TaskMetrics()
    for r in reports:
        metrics.observe(r)
    _, s = scrape(metrics)
    assert series(s, "celery_task_inflight") == {
        (("task", t),): 0 for t in ("tm.exit3", "tm.alloc", "tm.quiet")
    }
    assert set(series(s, "celery_task_inflight_rss_bytes").values()) == {0}

    running = [
        InflightTask("tm.alloc", SECRET_ID, os.getpid(), 1.0e9, 100 * MIB, 30 * MIB),
        InflightTask("tm.alloc", SECRET_ID, os.getpid() + 1, 1.0e9, 90 * MIB, 0),
        InflightTask("tm.new", None, os.getpid() + 2, 1.0e9, 50 * MIB, 7),
    ]
    metrics.inflight = lambda: running
    text, s = scrape(metrics)
    assert SECRET_ID not in text
    assert series(s, "celery_task_inflight") == {
        (("task", "tm.exit3"),): 0,
        (("task", "tm.alloc"),): 2,
        (("task", "tm.quiet"),): 0,
        (("task", "tm.new"),): 1,
    }
    assert value(s, "celery_task_inflight_rss_bytes", task="tm.alloc", component="overhead") == (
        190 * MIB
    )
    assert value(s, "celery_task_inflight_rss_bytes", task="tm.alloc", component="tool") == 30 * MIB
    assert value(s, "celery_task_inflight_rss_bytes", task="tm.new", component="tool") == 7
    assert value(s, "celery_task_inflight_rss_bytes", task="tm.quiet", component="tool") == 0
    # A task only seen in flight is a known name from then on.
    metrics.inflight = None
    _, s = scrape(metrics)
    assert value(s, "celery_task_inflight", task="tm.new") == 0


def test_a_failing_inflight_callable_does_not_break_the_scrape(reports: list[TaskReport]) -> None:
    def broken() -> list[InflightTask]:
        raise RuntimeError("hub gone")

    metrics = TaskMetrics(inflight=broken)
    metrics.observe(reports[0])
    _, s = scrape(metrics)
    assert value(s, "celery_task_runs_total", task="tm.exit3", state="success") == 1
    assert not series(s, "celery_task_inflight")


def test_unknown_states_are_refused() -> None:
    with pytest.raises(ValueError, match="expected one of"):
        TaskMetrics().count_run("t", "exploded")


def test_concurrent_observe_and_scrape_lose_nothing(reports: list[TaskReport]) -> None:
    metrics = TaskMetrics()
    report = reports[2]
    n_threads, per_thread = 4, 250

    def feed() -> None:
        for _ in range(per_thread):
            metrics.observe(report)

    threads = [threading.Thread(target=feed) for _ in range(n_threads)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        scrape(metrics)
    for t in threads:
        t.join()
    _, s = scrape(metrics)
    n = n_threads * per_thread
    assert value(s, "celery_task_runs_total", task="tm.alloc", state="success") == n
    assert value(s, "celery_task_wall_seconds_count", task="tm.alloc") == n
    assert value(s, "celery_task_tool_runs_total", task="tm.alloc", tool="true", outcome="ok") == n
    snap = metrics.snapshot()
    assert snap["histograms"]["celery_task_wall_seconds"][("tm.alloc",)]["count"] == n


SUBPROCESS_SCRIPT = """
import sys
from prometheus_client import CollectorRegistry, generate_latest
from taskmeter.export.metrics import TaskMetrics
from taskmeter.measure.report import TaskReport
metrics = TaskMetrics()
metrics.observe(TaskReport.from_json(sys.stdin.read()))
registry = CollectorRegistry()
registry.register(metrics)
text = generate_latest(registry).decode()
assert 'celery_task_runs_total{state="success",task="tm.alloc"} 1.0' in text, text
print("OK")
"""


def test_works_with_prometheus_multiproc_dir_set_to_a_missing_dir(
    reports: list[TaskReport], tmp_path: os.PathLike[str]
) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": os.path.join(tmp_path, "does-not-exist")}
    out = subprocess.run(
        [sys.executable, "-c", SUBPROCESS_SCRIPT],
        input=reports[2].to_json(),
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "OK"


def test_declared_tasks_start_at_zero_and_wall_splits_into_overhead_and_tool():
    metrics = TaskMetrics()
    metrics.declare(["tm.declared"])
    registry = CollectorRegistry()
    registry.register(metrics)
    before = generate_latest(registry).decode()
    assert 'celery_task_wall_seconds_count{task="tm.declared"} 0.0' in before
    assert 'celery_task_runs_total{state="success",task="tm.declared"} 0.0' in before
    assert 'celery_task_cpu_seconds_count{component="tool",task="tm.declared"} 0.0' in before
    with taskmeter.measure("tm.declared") as m:
        taskmeter.run(["sleep", "0.1"])
        time.sleep(0.05)
    metrics.observe(m.report)
    after = generate_latest(registry).decode()
    r = m.report
    series = 'celery_task_wall_seconds_total{component="%s",task="tm.declared"} %r'
    assert series % ("tool", r.tool_totals.wall_s) in after
    assert series % ("overhead", r.overhead.wall_s) in after
    assert r.overhead.wall_s + r.tool_totals.wall_s == pytest.approx(r.wall_s)
