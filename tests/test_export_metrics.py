"""TaskMetrics: real reports in, Prometheus text out, parsed back and checked exactly."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import threading
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_parse
from prometheus_client.parser import text_string_to_metric_families

import taskmeter
from taskmeter.export.metrics import (
    JOURNAL_RECOVERED,
    LEDGER_DROPPED,
    LEDGER_ERRORS,
    MEMORY_BUCKETS,
    QUEUE_WAIT_BUCKETS,
    WALL_BUCKETS,
    InflightTask,
    TaskMetrics,
)
from taskmeter.export.server import Renderer
from taskmeter.measure.report import STATES, TaskReport

from helpers import child, require

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

    assert {r.state for r in out} == set(STATES) - {"lost"}  # lost: only from the journal
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


def openmetrics(metrics: TaskMetrics) -> str:
    """The OpenMetrics text the worker's endpoint serves for ``metrics``."""
    registry = CollectorRegistry()
    registry.register(metrics)
    return Renderer(registry).render(openmetrics=True).decode()


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


def check_summary(samples: Samples, name: str, observed: list[float], **labels: str) -> None:
    assert value(samples, f"{name}_count", **labels) == len(observed)
    assert value(samples, f"{name}_sum", **labels) == pytest.approx(sum(observed), rel=1e-12)
    assert not [k for k in samples if k[0] == f"{name}_bucket"], "a summary has no buckets"


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

    # Runs by state: success and failure start at zero, other states on first use;
    # count_run adds a run with no report.
    expected_runs = {
        "tm.exit3": {"success": 2, "revoked": 1},
        "tm.alloc": {"success": 1, "failure": 1, "killed": 1},
        "tm.quiet": {"revoked": 1, "retry": 1},
    }
    for task, runs in expected_runs.items():
        got = {dict(lbl)["state"]: v for lbl, v in series(s, "celery_task_runs_total").items()
               if dict(lbl)["task"] == task}  # fmt: skip
        assert got == {"success": 0, "failure": 0, **runs}, task
    # A killed task without a known cause is counted as cause="unknown".
    assert series(s, "celery_task_kills_total") == {
        (("cause", "unknown"), ("task", "tm.alloc")): 1.0
    }

    for task, rs in by_task.items():
        check_histogram(
            s, "celery_task_wall_seconds", WALL_BUCKETS, [r.wall_s for r in rs], task=task
        )
        for component, values in {
            "overhead": [r.overhead.cpu_s for r in rs],
            "tool": [r.tool_totals.cpu_s for r in rs],
        }.items():
            counter = value(s, "celery_task_cpu_seconds_total", task=task, component=component)
            assert counter == pytest.approx(sum(values), rel=1e-12)
        check_summary(
            s,
            "celery_task_memory_avg_bytes",
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
            check_summary(
                s,
                "celery_task_memory_avg_bytes",
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
            assert ("celery_task_memory_peak_bytes_count", labels) not in s
            assert ("celery_task_memory_peak_bytes_max", labels) not in s
        got = value(s, "celery_task_memory_peak_bytes_max", task=task, component="overhead")
        assert got == max(r.overhead.rss_peak_bytes for r in rs)
        footprints = [float(r.footprint_peak_bytes) for r in rs]
        check_histogram(
            s, "celery_task_footprint_peak_bytes", MEMORY_BUCKETS, footprints, task=task
        )
        assert value(s, "celery_task_footprint_peak_bytes_max", task=task) == max(footprints)
        # No queue wait stamped on any of these: no queue wait series.
        assert ("celery_task_queue_wait_seconds_count", (("task", task),)) not in s

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

    # Phases: exact wall totals (mean = total / runs), no histogram.
    for phase in ("prepare", "upload"):
        walls = [p.wall_s for r in reports for p in r.phases if p.name == phase]
        assert len(walls) == 1
        got = value(s, "celery_task_phase_wall_seconds_total", task="tm.alloc", phase=phase)
        assert got == walls[0]


def test_kill_causes_queue_wait_and_tool_outcomes(reports: list[TaskReport]) -> None:
    base = reports[2]  # tm.alloc, success, tools and phases
    metrics = TaskMetrics()
    oom_tool = dataclasses.replace(base.tools[0], cause="oom", signal=9)
    untracked = dataclasses.replace(base.tools[0], tracked=False)
    fed = [
        dataclasses.replace(base, state="killed", cause="oom", queue_wait_s=0.3),
        dataclasses.replace(base, state="killed", cause="oom", queue_wait_s=40.0),
        dataclasses.replace(base, state="lost", cause="unknown", queue_wait_s=None),
        dataclasses.replace(base, state="killed", cause="time_limit", tools=(oom_tool, untracked)),
        dataclasses.replace(base, queue_wait_s=0.0),
    ]
    for r in fed:
        metrics.observe(r)
    _, s = scrape(metrics)
    assert series(s, "celery_task_kills_total") == {
        (("cause", "oom"), ("task", "tm.alloc")): 2,
        (("cause", "unknown"), ("task", "tm.alloc")): 1,
        (("cause", "time_limit"), ("task", "tm.alloc")): 1,
    }
    assert value(s, "celery_task_runs_total", task="tm.alloc", state="lost") == 1
    assert value(s, "celery_task_runs_total", task="tm.alloc", state="killed") == 3
    # Observed only when stamped (None is unknown, 0.0 a real zero wait).
    check_histogram(
        s, "celery_task_queue_wait_seconds", QUEUE_WAIT_BUCKETS, [0.3, 40.0, 0.0], task="tm.alloc"
    )
    py = os.path.basename(base.tools[0].exe)
    runs = series(s, "celery_task_tool_runs_total")
    outcomes = {dict(lbl)["outcome"]: v for lbl, v in runs.items() if dict(lbl)["tool"] == py}
    assert outcomes["oom"] == 1 and outcomes["untracked"] == 1


def test_no_task_id_or_argument_reaches_the_text_output(reports: list[TaskReport]) -> None:
    metrics = TaskMetrics()
    for r in reports:
        metrics.observe(r)
    text, s = scrape(metrics)
    assert SECRET_ID not in text and SECRET_ARG not in text
    label_names = {k for _, labels in s for k, _ in labels}
    assert label_names <= {"task", "state", "component", "tool", "outcome", "phase", "le", "label",
                           "cause"}  # fmt: skip
    # OpenMetrics carries the task ids as exemplars only, never as labels; no argv ever.
    om = openmetrics(metrics)
    assert SECRET_ARG not in om
    for family in om_parse(om):
        for sample in family.samples:
            assert not any(SECRET_ID in v for v in sample.labels.values())


EXPECTED_TYPES = {
    "celery_task_runs_total": "counter",
    "celery_task_kills_total": "counter",
    "celery_task_wall_seconds": "histogram",
    "celery_task_queue_wait_seconds": "histogram",
    "celery_task_memory_peak_bytes": "histogram",
    "celery_task_footprint_peak_bytes": "histogram",
    "celery_task_memory_avg_bytes": "summary",
    "celery_task_memory_peak_bytes_max": "gauge",
    "celery_task_footprint_peak_bytes_max": "gauge",
    "celery_task_cpu_seconds_total": "counter",
    "celery_task_component_wall_seconds_total": "counter",
    "celery_task_tool_runs_total": "counter",
    "celery_task_phase_wall_seconds_total": "counter",
    "celery_task_inflight": "gauge",
    "celery_task_inflight_rss_bytes": "gauge",
    "taskmeter_worker_info": "gauge",
    "taskmeter_labels_folded_total": "counter",
    "taskmeter_ledger_errors_total": "counter",
    "taskmeter_ledger_rotation_dropped_records_total": "counter",
    "taskmeter_journal_recovered_tasks_total": "counter",
}


def test_every_metric_has_its_contract_type_and_help(reports: list[TaskReport]) -> None:
    metrics = TaskMetrics(pool="prefork", concurrency=4)
    metrics.observe(reports[2])
    text, s = scrape(metrics)
    types = {}
    helps = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, typ = line.split(" ", 3)
            types[name] = typ
        elif line.startswith("# HELP "):
            _, _, name, doc = line.split(" ", 3)
            helps[name] = doc
    assert types == EXPECTED_TYPES
    assert all(len(doc) > 20 for doc in helps.values())
    assert series(s, "taskmeter_worker_info") == {(("concurrency", "4"), ("pool", "prefork")): 1}
    # The removed and renamed families are gone.
    for old in (
        "celery_task_cpu_seconds_bucket",
        "celery_task_phase_wall_seconds_bucket",
        "celery_task_wall_seconds_total",
        "celery_task_memory_avg_bytes_bucket",
    ):
        assert old + "{" not in text


def test_process_counters_are_exported_and_count() -> None:
    metrics = TaskMetrics()
    before = {n: scrape(metrics)[1][(n, ())] for n in (
        "taskmeter_ledger_errors_total", "taskmeter_ledger_rotation_dropped_records_total",
        "taskmeter_journal_recovered_tasks_total")}  # fmt: skip
    LEDGER_ERRORS.inc()
    LEDGER_DROPPED.inc(3)
    JOURNAL_RECOVERED.inc(2.0)
    _, s = scrape(metrics)
    assert s[("taskmeter_ledger_errors_total", ())] == before["taskmeter_ledger_errors_total"] + 1
    assert s[("taskmeter_ledger_rotation_dropped_records_total", ())] == (
        before["taskmeter_ledger_rotation_dropped_records_total"] + 3
    )
    assert s[("taskmeter_journal_recovered_tasks_total", ())] == (
        before["taskmeter_journal_recovered_tasks_total"] + 2
    )
    with pytest.raises(ValueError, match="only go up"):
        LEDGER_ERRORS.inc(-1)


def test_buckets_are_the_contracts() -> None:
    assert [b / MIB for b in MEMORY_BUCKETS] == [16, 64, 256, 1024, 4096, 16384, 65536]
    assert WALL_BUCKETS == (0.05, 0.25, 1, 5, 15, 60, 300, 900, 3600)
    assert QUEUE_WAIT_BUCKETS == (0.1, 0.5, 2, 10, 30, 120, 600, 1800, 7200)


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
    prepare, upload = (p.wall_s for p in two_tools_two_phases.phases)
    phases = series(s, "celery_task_phase_wall_seconds_total")
    assert phases == {
        (("phase", "prepare"), ("task", "tm.alloc")): prepare + prepare,
        (("phase", "other"), ("task", "tm.alloc")): upload + upload,
    }
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
    assert snap["counters"]["celery_task_runs_total"][("tm.alloc", "success")] == n


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
    # Zero series only where rate() needs them: the counters every run increments.
    assert 'celery_task_runs_total{state="success",task="tm.declared"} 0.0' in before
    assert 'celery_task_runs_total{state="failure",task="tm.declared"} 0.0' in before
    assert 'state="killed",task="tm.declared"' not in before
    assert 'celery_task_cpu_seconds_total{component="tool",task="tm.declared"} 0.0' in before
    assert (
        'celery_task_component_wall_seconds_total{component="overhead",task="tm.declared"} 0.0'
        in (before)
    )
    # Histograms and summaries appear with the first observation.
    assert 'celery_task_wall_seconds_count{task="tm.declared"}' not in before
    assert 'celery_task_memory_avg_bytes_count{component="overhead",task="tm.declared"}' not in (
        before
    )
    with taskmeter.measure("tm.declared") as m:
        taskmeter.run(["sleep", "0.1"])
        time.sleep(0.05)
    metrics.observe(m.report)
    after = generate_latest(registry).decode()
    r = m.report
    line = 'celery_task_component_wall_seconds_total{component="%s",task="tm.declared"} %r'
    assert line % ("tool", r.tool_totals.wall_s) in after
    assert line % ("overhead", r.overhead.wall_s) in after
    assert r.overhead.wall_s + r.tool_totals.wall_s == pytest.approx(r.wall_s)
    assert 'celery_task_wall_seconds_count{task="tm.declared"} 1.0' in after


def test_openmetrics_is_valid_and_carries_exemplars_only_on_the_three_histograms(
    reports: list[TaskReport],
) -> None:
    metrics = TaskMetrics(pool="threads", concurrency=8)
    for r in reports:
        metrics.observe(dataclasses.replace(r, queue_wait_s=1.5))
    text = openmetrics(metrics)
    assert text.endswith("# EOF\n")
    families = {f.name: f for f in om_parse(text)}  # raises on any invalid line
    assert families["celery_task_runs"].type == "counter"
    assert families["celery_task_memory_avg_bytes"].type == "summary"
    exemplified = set()
    for family in families.values():
        for sample in family.samples:
            if sample.exemplar is not None:
                exemplified.add(family.name)
                assert sample.name.endswith("_bucket")
                assert set(sample.exemplar.labels) == {"task_id"}
                # The exemplar is an observation of that very bucket.
                assert sample.exemplar.value <= float(sample.labels["le"])
    assert exemplified == {
        "celery_task_wall_seconds",
        "celery_task_memory_peak_bytes",
        "celery_task_footprint_peak_bytes",
    }
    # The highest occupied footprint bucket names the task with the largest footprint
    # in it (the latest observation of that bucket).
    alloc = [r for r in reports if r.task == "tm.alloc"]
    top = max(alloc, key=lambda r: r.footprint_peak_bytes)
    bucket = next(b for b in (*MEMORY_BUCKETS, math.inf) if top.footprint_peak_bytes <= b)
    same_bucket = [r for r in alloc if bisect_bucket(r.footprint_peak_bytes) == bisect_bucket(
        top.footprint_peak_bytes)]  # fmt: skip
    want = same_bucket[-1]
    for sample in families["celery_task_footprint_peak_bytes"].samples:
        if sample.labels.get("task") == "tm.alloc" and float(sample.labels.get("le", 0)) == bucket:
            assert sample.exemplar is not None
            assert sample.exemplar.labels["task_id"] == want.task_id
            assert sample.exemplar.value == want.footprint_peak_bytes
            break
    else:
        raise AssertionError("no footprint bucket for tm.alloc")
    # The text format never carries them.
    plain, _ = scrape(metrics)
    assert " # {" not in plain


def bisect_bucket(x: float) -> int:
    return sum(1 for b in MEMORY_BUCKETS if b < x)


def test_an_unchanged_family_is_served_from_its_cache(reports: list[TaskReport]) -> None:
    metrics = TaskMetrics(inflight=lambda: [])
    for r in reports:
        metrics.observe(r)

    def texts() -> dict[str, str]:
        return {f.name: f.exposition(False) for f in metrics.collect()}  # type: ignore[attr-defined]

    first = texts()
    second = texts()
    assert all(second[n] is first[n] for n in first), "re-rendered without a change"
    generation = metrics.generation
    metrics.observe(reports[0])  # tm.exit3
    assert metrics.generation > generation
    third = texts()
    changed = {n for n in first if third[n] is not first[n]}
    assert "celery_task_runs" in changed and "celery_task_wall_seconds" in changed
    assert "celery_task_kills" not in changed and "taskmeter_worker_info" not in changed
    # Within a changed family only tm.exit3's series were formatted again: the others'
    # lines are the very same strings (checked through the text being identical).
    other = [ln for ln in first["celery_task_wall_seconds"].splitlines() if "tm.alloc" in ln]
    assert other == [
        ln for ln in third["celery_task_wall_seconds"].splitlines() if "tm.alloc" in ln
    ]


def test_promtool_lints_the_text_output_clean(reports: list[TaskReport]) -> None:
    """Prometheus's own linter (naming, units, types, histogram shape) has no complaint."""
    promtool = require("promtool")
    metrics = TaskMetrics(inflight=lambda: [], pool="solo", concurrency=1)
    for r in reports:
        metrics.observe(dataclasses.replace(r, queue_wait_s=0.2))
    registry = CollectorRegistry()
    registry.register(metrics)
    text = Renderer(registry).render().decode()
    out = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr


def test_deferred_figures_are_all_in_the_next_scrape_and_a_bad_one_loses_nothing_else(
    reports: list[TaskReport], caplog: pytest.LogCaptureFixture
) -> None:
    """A worker's main process defers each task's figures (as its pool process sent
    them, through JSON) to the next scrape: that scrape equals one of a collector that
    observed the same reports directly, past the bound that applies them unscraped
    too; a malformed message is logged and the rest still counted."""
    from taskmeter.export.metrics import DEFER_MAX, observation
    from taskmeter.measure.report import json_bytes, loads

    n = DEFER_MAX + 3
    runs = [reports[i % len(reports)] for i in range(n)]
    direct, deferred = TaskMetrics(inflight=lambda: []), TaskMetrics(inflight=lambda: [])
    for r in runs:
        direct.observe(r)
        deferred.defer_figures(loads(json_bytes(observation(r))))
    deferred.defer_figures(["tm.bad", None, "no-such-state", *[0.0] * 12, [], []])
    assert len(deferred._deferred) == n - DEFER_MAX + 1  # the bound applied the first ones
    assert scrape(deferred)[1] == scrape(direct)[1]
    assert not deferred._deferred
    assert "the metrics failed for tm.bad" in caplog.text
    _, samples = scrape(deferred)
    runs_total = sum(v for (name, _), v in samples.items() if name == "celery_task_runs_total")
    assert runs_total == n


def test_a_scrape_waits_for_figures_another_thread_is_accounting(
    reports: list[TaskReport], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The event loop's thread accounts a full queue while a scrape comes: the scrape
    counts the figures that thread took off the queue but had not accounted yet."""
    from taskmeter.export.metrics import observation

    metrics = TaskMetrics(inflight=lambda: [])
    metrics.defer_figures(observation(reports[0]))  # one: the queue is empty once taken
    taken = threading.Event()
    really = metrics.observe_figures

    def slow(obs: object, ts: float | None = None) -> None:
        taken.set()  # off the queue, not accounted yet
        time.sleep(0.2)
        really(obs, ts)

    monkeypatch.setattr(metrics, "observe_figures", slow)
    other = threading.Thread(target=metrics.apply_deferred)
    other.start()
    assert taken.wait(5)
    _, samples = scrape(metrics)
    other.join()
    runs_total = sum(v for (name, _), v in samples.items() if name == "celery_task_runs_total")
    assert runs_total == 1
