"""The Prometheus rules in deploy/prometheus: checked and unit-tested by the real
promtool, the PrometheusRule manifest in step with them, and the recorded figures of a
real Prometheus scraping a real worker equal to the worker's own ledger."""

from __future__ import annotations

import bisect
import importlib.util
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from taskmeter.export.metrics import MEMORY_BUCKETS
from taskmeter.measure.report import TaskReport

from helpers import require
from workerkit import Prometheus, Worker, wait_for

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"
RULES = DEPLOY / "taskmeter-rules.yml"
UNIT_TESTS = DEPLOY / "tests.yml"
MANIFEST = DEPLOY / "prometheusrule.yaml"

# The families of the metrics contract (export/metrics.py) and the sample names each
# exposes; the rules may read nothing else from a worker.
CONTRACT: dict[str, str] = {
    "celery_task_runs": "counter",
    "celery_task_kills": "counter",
    "celery_task_wall_seconds": "histogram",
    "celery_task_queue_wait_seconds": "histogram",
    "celery_task_memory_peak_bytes": "histogram",
    "celery_task_footprint_peak_bytes": "histogram",
    "celery_task_memory_avg_bytes": "summary",
    "celery_task_memory_peak_bytes_max": "gauge",
    "celery_task_footprint_peak_bytes_max": "gauge",
    "celery_task_cpu_seconds": "counter",
    "celery_task_component_wall_seconds": "counter",
    "celery_task_tool_runs": "counter",
    "celery_task_phase_wall_seconds": "counter",
    "celery_task_inflight": "gauge",
    "celery_task_inflight_rss_bytes": "gauge",
    "taskmeter_worker_info": "gauge",
    "taskmeter_labels_folded": "counter",
    "taskmeter_ledger_errors": "counter",
    "taskmeter_ledger_rotation_dropped_records": "counter",
    "taskmeter_journal_recovered_tasks": "counter",
}
SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("_sum", "_count"),
}
# What the rules read from elsewhere: Prometheus itself and kube-state-metrics.
FOREIGN = {"up", "kube_pod_container_resource_limits"}


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    exe = require("promtool")  # Debian package 'prometheus'
    return subprocess.run(
        [exe, *map(str, args)], capture_output=True, text=True, timeout=60, cwd=DEPLOY
    )


def rules_doc(path: Path = RULES) -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict)
    return doc


def all_rules() -> list[dict[str, Any]]:
    return [rule for group in rules_doc()["groups"] for rule in group["rules"]]


def recorded_names() -> list[str]:
    return [r["record"] for r in all_rules() if "record" in r]


def alert_names() -> list[str]:
    return [r["alert"] for r in all_rules() if "alert" in r]


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (identifiers before a selector, range or
    operator; not functions, keywords, labels or label values)."""
    expr = re.sub(r'"[^"]*"', '""', expr)  # label values
    expr = re.sub(r"\{[^}]*\}", "{}", expr)  # label matchers
    expr = re.sub(r"\b(by|on|without|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", expr))
    keywords = {"and", "or", "unless", "offset", "bool", "by", "on", "group_left"}
    return {n for n in names if n not in keywords and not re.fullmatch(r"\d+[smhdwy]", n)}


# -- promtool ------------------------------------------------------------------------------
def test_promtool_checks_the_rules():
    out = promtool("check", "rules", RULES)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(all_rules())} rules found" in out.stdout


def test_promtool_unit_tests_pass():
    out = promtool("test", "rules", UNIT_TESTS)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_every_alert_is_tested_firing_and_not_firing_and_every_recording_rule_is_tested():
    tests = yaml.safe_load(UNIT_TESTS.read_text())["tests"]
    firing: set[str] = set()
    silent: set[str] = set()
    checked: set[str] = set()
    for group in tests:
        for case in group.get("alert_rule_test", []):
            (firing if case["exp_alerts"] else silent).add(case["alertname"])
        for case in group.get("promql_expr_test", []):
            for sample in case["exp_samples"]:
                checked.add(sample["labels"].split("{")[0])
    alerts = set(alert_names())
    assert alerts - firing == set(), "alerts never tested firing"
    assert alerts - silent == set(), "alerts never tested not firing"
    assert set(recorded_names()) - checked == set(), "recording rules never checked"


def test_the_unit_tests_catch_a_broken_rule(tmp_path: Path):
    """Mutants of the rules (a threshold, an aggregation, a window) fail promtool's tests:
    the tests pin the figures, not just the syntax."""
    text = RULES.read_text()
    mutants = {
        "threshold": ("  > 0.8\n", "  > 0.9\n"),
        "max gauge": (
            "max by (task) (max_over_time(celery_task_footprint_peak_bytes_max[1d]))",
            "max by (task) (avg_over_time(celery_task_footprint_peak_bytes_max[1d]))",
        ),
        "quantile": (
            "histogram_quantile(0.95, sum by (le, task) (increase(celery_task_wall",
            "histogram_quantile(0.9, sum by (le, task) (increase(celery_task_wall",
        ),
        "new kill series": (
            'unless last_over_time(celery_task_kills_total{cause="oom"}[10m] offset 15m)',
            'unless last_over_time(celery_task_kills_total{cause="oom"}[10m] offset 1m)',
        ),
        "a stale marker taken for a birth": (
            'unless last_over_time(celery_task_kills_total{cause="oom"}[10m] offset 15m)',
            'unless celery_task_kills_total{cause="oom"} offset 15m',
        ),
    }
    for name, (old, new) in mutants.items():
        assert text.count(old) >= 1, (name, old)
        (tmp_path / "taskmeter-rules.yml").write_text(text.replace(old, new))
        (tmp_path / "tests.yml").write_text(UNIT_TESTS.read_text())
        out = promtool("test", "rules", tmp_path / "tests.yml")
        assert out.returncode != 0, f"mutant {name!r} passed the unit tests"
        assert "FAILED" in out.stdout + out.stderr, name


def test_rules_read_only_the_metric_families_of_the_contract():
    allowed = {f + s for f, kind in CONTRACT.items() for s in SUFFIXES[kind]} | FOREIGN
    used: set[str] = set()
    for rule in all_rules():
        used |= metric_names(rule["expr"])
    assert used - allowed == set()
    # and what they read is what the sizing figures need
    for family in ("celery_task_runs_total", "celery_task_memory_avg_bytes_sum",
                   "celery_task_footprint_peak_bytes_bucket", "celery_task_kills_total",
                   "celery_task_queue_wait_seconds_sum", "taskmeter_worker_info"):  # fmt: skip
        assert family in used


def test_recording_rule_names_follow_level_metric_operations():
    for name in recorded_names():
        level, metric, ops = name.split(":")
        assert level in ("task", "task_state", "task_component"), name
        labels = set(level.split("_"))
        assert labels <= {"task", "state", "component"}
        assert any(metric.startswith(f) for f in CONTRACT), name
        assert not metric.endswith("_total"), name  # stripped after rate/increase
        assert re.fullmatch(r"(increase|mean|max|p95_)1[hd]", ops), name
    for rule in all_rules():
        if "record" in rule:
            level = rule["record"].split(":")[0]
            by = {"task": "(task)", "task_state": "(task, state)",
                  "task_component": "(task, component)"}[level]  # fmt: skip
            assert f"by {by}" in rule["expr"] or "by (le, task" in rule["expr"], rule["record"]


def test_alerts_carry_severity_summary_and_description():
    for rule in all_rules():
        if "alert" in rule:
            assert rule["alert"].startswith("Taskmeter"), rule["alert"]
            assert rule["labels"]["severity"] in ("warning", "critical")
            assert {"summary", "description"} <= set(rule["annotations"])


# -- the PrometheusRule manifest -------------------------------------------------------------
def _generator() -> Any:
    spec = importlib.util.spec_from_file_location("prometheusrule", DEPLOY / "prometheusrule.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_prometheusrule_manifest_holds_the_same_groups():
    manifest = yaml.safe_load(MANIFEST.read_text())
    assert manifest["apiVersion"] == "monitoring.coreos.com/v1"
    assert manifest["kind"] == "PrometheusRule"
    assert manifest["metadata"]["name"] == "taskmeter"
    assert manifest["spec"]["groups"] == rules_doc()["groups"]
    regenerate = (
        "python deploy/prometheus/prometheusrule.py > deploy/prometheus/prometheusrule.yaml"
    )
    assert MANIFEST.read_text() == _generator().render(RULES.read_text()), regenerate


def test_the_generator_takes_namespace_and_labels(capsys: pytest.CaptureFixture[str]):
    gen = _generator()
    assert gen.main(["--namespace", "monitoring", "--label", "release=kps"]) == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    assert doc["metadata"]["namespace"] == "monitoring"
    assert doc["metadata"]["labels"]["release"] == "kps"
    assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == "taskmeter"
    assert doc["spec"]["groups"] == rules_doc()["groups"]
    with pytest.raises(SystemExit):
        gen.main(["--label", "no-equals-sign"])


# -- a real Prometheus evaluating the rules on a real worker ---------------------------------
def fast_rules(tmp_path: Path) -> Path:
    """The rules with every group evaluated each second and alerts firing after 1 s of
    their condition (the test cannot wait minutes)."""
    doc = rules_doc()
    for group in doc["groups"]:
        group["interval"] = "1s"
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "1s"
    path = tmp_path / "taskmeter-rules.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def value(prom: Prometheus, promql: str) -> float:
    result = prom.query(promql)
    assert len(result) == 1, (promql, result)
    return float(result[0]["value"][1])


def exposed_families(worker: Worker) -> dict[str, str]:
    families = {}
    for line in worker.metrics().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            if kind == "counter":  # the text format names a counter family with _total
                name = name.removesuffix("_total")
            families[name] = kind
    return families


@pytest.mark.timeout(120)
def test_recorded_figures_of_a_real_prometheus_equal_the_workers_ledger(
    tmp_path: Path, start_worker: Any, prometheus: Any
):
    worker: Worker = start_worker(concurrency=2)
    # The worker exports what the contract says, under the names the rules read.
    families = exposed_families(worker)
    for family, kind in CONTRACT.items():
        if family in families:
            assert families[family] == kind, family
    assert {"celery_task_runs", "celery_task_cpu_seconds", "taskmeter_worker_info"} <= set(families)

    prom = prometheus([f"127.0.0.1:{worker.port}"], rule_files=[fast_rules(tmp_path)])
    prom.wait_scrape_after(time.time())  # the counters, at zero, are in Prometheus
    # A first run of each task type: the counters count it from zero, but histogram
    # series are born at their first observation and increase() counts from a series'
    # first sample, so the histogram means are over the runs after it (as on a worker
    # running for days). Then a few seconds of samples, so that increase()'s
    # extrapolation is the same for every series (docs/rules.md, error bounds).
    warm = [worker.send("hog", 40, 0.2), worker.send("cpu.burn", 0.2)]
    reports = worker.wait_reports(len(warm))
    warm_ids = {r.task_id for r in reports}
    assert len(warm_ids) == len(warm)
    time.sleep(3)
    jobs = [worker.send("hog", mib, 0.2) for mib in (24, 64, 40)]
    jobs += [worker.send("cpu.burn", s) for s in (0.1, 0.3)]
    reports = worker.wait_reports(len(warm) + len(jobs))
    prom.wait_scrape_after(time.time())

    by_task: dict[str, list[TaskReport]] = {}
    for r in reports:
        by_task.setdefault(r.task, []).append(r)
    hog_all, hog = by_task["hog"], [r for r in by_task["hog"] if r.task_id not in warm_ids]
    burn = by_task["cpu.burn"]
    assert len(hog) == 3 and len(burn) == 3 and all(r.state == "success" for r in reports)

    # the rules run every second: let them evaluate twice after that last scrape
    wait_for(lambda: prom.query('task:celery_task_runs:increase1d{task="hog"}'), 20, "rules")
    time.sleep(2.5)

    def recorded(name: str, task: str, component: str | None = None) -> float:
        sel = f'task="{task}"' + (f',component="{component}"' if component else "")
        return value(prom, f"{name}{{{sel}}}")

    # exact: the largest peaks any run had (the warm-up included)
    assert recorded("task:celery_task_footprint_peak_bytes_max:max1h", "hog") == max(
        r.footprint_peak_bytes for r in hog_all
    )
    peak = recorded("task_component:celery_task_memory_peak_bytes_max:max1h", "hog", "overhead")
    assert peak == max(r.overhead.rss_peak_bytes for r in hog_all)
    # means: ratios of two increases over the same scrapes (the extrapolation cancels)
    mean_avg = statistics.fmean(r.overhead.rss_avg_bytes for r in hog)
    got = recorded("task_component:celery_task_memory_avg_bytes:mean1h", "hog", "overhead")
    assert got == pytest.approx(mean_avg, rel=1e-9)
    assert got > 30 * 2**20  # the 24/64/40 MiB blobs are in it
    mean_cpu = statistics.fmean(r.overhead.cpu_s for r in burn)
    got = recorded("task_component:celery_task_cpu_seconds:mean1h", "cpu.burn", "overhead")
    assert got == pytest.approx(mean_cpu, rel=1e-9)
    assert got >= 0.15
    mean_wall = statistics.fmean(r.wall_s for r in hog)
    assert recorded("task:celery_task_wall_seconds:mean1h", "hog") == pytest.approx(
        mean_wall, rel=1e-9
    )
    # runs: increase() extrapolates to the window's end, within a fraction of a run here
    assert recorded("task:celery_task_runs:increase1h", "hog") == pytest.approx(4, abs=0.9)
    # the 1d group reads the same data
    assert recorded("task:celery_task_footprint_peak_bytes_max:max1d", "hog") == max(
        r.footprint_peak_bytes for r in hog_all
    )
    # footprint p95 (rank 2.85 of 3) lies in the bucket of the largest of the 3 runs
    p95 = recorded("task:celery_task_footprint_peak_bytes:p95_1h", "hog")
    top = max(r.footprint_peak_bytes for r in hog)
    upper = bisect.bisect_left(MEMORY_BUCKETS, top)
    lower = MEMORY_BUCKETS[upper - 1] if upper else 0.0
    assert lower < p95 <= MEMORY_BUCKETS[upper], (lower, p95, top)
    # no alert fires for a healthy worker; one that stops answering is down
    assert prom.query('ALERTS{alertstate="firing"}') == []
    worker.stop()
    down = 'ALERTS{alertname="TaskmeterWorkerDown",alertstate="firing"}'
    alert = wait_for(lambda: prom.query(down), 30, "TaskmeterWorkerDown")
    assert alert[0]["metric"]["instance"] == f"127.0.0.1:{worker.port}"
    assert alert[0]["metric"]["job"] == "worker"
