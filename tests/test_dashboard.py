"""The Grafana dashboard (dashboards/taskmeter.json) against a real worker and a real
Prometheus: every query of every panel returns data, every metric it names is served."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from taskmeter.demo.vcfgen import generate_vcf

from helpers import require
from workerkit import http_get, wait_for

pytestmark = pytest.mark.slow

DASHBOARD = Path(__file__).resolve().parent.parent / "dashboards" / "taskmeter.json"

# What Grafana would put in place of its variables, for an instant query "now".
SUBSTITUTIONS = {
    "$__rate_interval": "30s",
    "$__interval": "5s",
    "$__range": "1m",
    "$task": ".*",
    "$instance": ".*",
}
DATASOURCE_REFS = {"${datasource}", "$datasource", "${DS_PROMETHEUS}"}
QUEUE_WAIT = "celery_task_queue_wait_seconds"
QUEUE_WAIT_HEADER = "taskmeter_published"  # taskmeter.celery.queuewait.HEADER
METRIC_NAME = re.compile(r"\b(?:celery_task|taskmeter)_[a-zA-Z0-9_]*")


@pytest.fixture(scope="module")
def vcf(tmp_path_factory: pytest.TempPathFactory) -> str:
    require("bcftools")
    path = tmp_path_factory.mktemp("vcf") / "small.vcf.gz"
    return str(generate_vcf(path, samples=40, variants=4_000, seed=3))


def load_dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text(encoding="utf-8")))


def all_panels(dash: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dash["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows keep their panels inside


def targets(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title + refId, expr) of every query of every panel."""
    return [
        (f"{p['title']!r} {t['refId']}", t["expr"])
        for p in all_panels(dash)
        for t in p.get("targets", [])
    ]


def substitute(expr: str) -> str:
    # Longest names first: $__interval must not eat the start of $__rate_interval.
    for var in sorted(SUBSTITUTIONS, key=len, reverse=True):
        expr = expr.replace(var, SUBSTITUTIONS[var])
    assert "$" not in expr, f"a variable is left unsubstituted in {expr!r}"
    return expr


def ds_uid(ref: Any) -> str:
    return str(ref.get("uid")) if isinstance(ref, dict) else str(ref)


def test_dashboard_json_is_importable() -> None:
    dash = load_dashboard()
    assert dash["uid"] == "taskmeter"
    assert dash["title"] == "taskmeter — Celery task costs"
    assert 36 <= dash["schemaVersion"] <= 41
    inputs = {i["name"]: i for i in dash["__inputs"]}
    assert inputs["DS_PROMETHEUS"]["type"] == "datasource"
    assert inputs["DS_PROMETHEUS"]["pluginId"] == "prometheus"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    task = variables["task"]
    assert task["type"] == "query" and task["multi"] and task["includeAll"]
    assert "label_values(celery_task_runs_total" in task["definition"]
    assert ", task)" in task["definition"]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            assert ds_uid(var["datasource"]) in DATASOURCE_REFS, var["name"]

    panels = list(all_panels(dash))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(ids)}"
    for p in panels:
        if p["type"] == "row":
            continue
        assert p.get("targets"), f"panel {p['title']!r} has no query"
        assert ds_uid(p.get("datasource")) in DATASOURCE_REFS, p["title"]
        for t in p["targets"]:
            assert ds_uid(t.get("datasource", p["datasource"])) in DATASOURCE_REFS, p["title"]
            assert t["expr"].strip(), p["title"]
            if "rate(" in t["expr"] or "increase(" in t["expr"]:
                assert re.search(r"\[\$__(rate_interval|range)\]", t["expr"]), t["expr"]
            if "task" in t["expr"] and "{" in t["expr"]:
                assert 'task=~"$task"' in t["expr"], t["expr"]
        assert p["fieldConfig"]["defaults"].get("unit"), f"panel {p['title']!r} has no unit"


def test_every_panel_query_returns_data_from_a_real_worker(start_worker, prometheus, vcf):
    t_begin = time.monotonic()
    dash = load_dashboard()
    queries = targets(dash)
    assert queries

    w = start_worker("redis", "prefork", 2)
    prom = prometheus([f"127.0.0.1:{w.port}"])

    def send(name: str, *args: object) -> None:
        # Stamped with the publish time as taskmeter's senders do (queue wait).
        w.send(name, *args, headers={QUEUE_WAIT_HEADER: time.time()})

    def mix() -> None:
        for _ in range(2):
            send("vcf.query", vcf)  # two tool runs, phase "check"
        send("vcf.view_fail", vcf)  # a tool exits 255: failure
        send("cpu.burn", 0.05)
        send("noop")
        send("retrier")  # retry, then success

    sleeper_pid: int | None = None
    try:
        # A long task still running when the dashboard is queried: the in-flight panels.
        w.send("sleep", 120)
        sleeper_pid = wait_for(
            lambda: [r["pid"] for r in w.inflight() if r["task"] == "sleep"],
            30,
            "the sleep task in flight",
        )[0]

        # Round 1 creates every series; Prometheus sees no increase in a series' first
        # sample, so rate() only has data once round 2 moves them.
        mix()
        w.wait_reports(7)
        prom.wait_scrape_after(time.time())

        # Round 2, with a task killed by SIGKILL (scraped while in flight first).
        w.send("hog", 150, 60)
        hog = wait_for(
            lambda: [
                r for r in w.inflight() if r["task"] == "hog" and r["worker_rss_bytes"] > 150e6
            ],
            30,
            "the hog task in flight with its memory",
        )[0]
        prom.wait_scrape_after(time.time())
        os.kill(hog["pid"], signal.SIGKILL)
        mix()
        reports = w.wait_reports(15)
        states = {(r.task, r.state) for r in reports}
        assert ("hog", "killed") in states and ("vcf.view_fail", "failure") in states, states
        assert all(r.phases for r in reports if r.task == "vcf.query" and r.state == "success")
        done = time.time()
        prom.wait_scrape_after(done + 5)  # >= 5 scrapes after the last task ended

        body = json.loads(http_get(f"{prom.url}/api/v1/targets"))
        (target,) = body["data"]["activeTargets"]
        assert target["health"] == "up" and not target["lastError"], target

        # Every metric the dashboard names is served by the worker.
        served = {
            line.split("{")[0].split(" ")[0]
            for line in w.metrics().splitlines()
            if line and not line.startswith("#")
        }
        used = {m for _, expr in queries for m in METRIC_NAME.findall(expr)}
        used |= {
            m
            for v in dash["templating"]["list"]
            for m in METRIC_NAME.findall(str(v.get("definition", "")))
        }
        assert used, "the dashboard names no taskmeter metric"
        # Queue wait exists only where the worker reads the senders' stamp.
        optional = {m for m in used if m.startswith(QUEUE_WAIT)} - served
        assert not used - served - optional, f"not served by the worker: {sorted(used - served)}"

        # Every query of every panel, as Grafana would send it, has data.
        failures = []
        for where, expr in queries:
            if any(m in expr for m in optional):
                continue
            promql = substitute(expr)
            result = prom.query(promql)
            values = [float(r["value"][1]) for r in result]
            if not result:
                failures.append(f"{where}: empty result for {promql}")
            elif not any(math.isfinite(v) for v in values):
                failures.append(f"{where}: only NaN/Inf ({values}) for {promql}")
        assert not failures, "\n".join(failures)

        # A few values the panels must show for this run.
        inflight = prom.by(
            substitute('sum by (task) (celery_task_inflight{task=~"$task"})'), "task"
        )
        assert inflight[("sleep",)] == 1
        broken = prom.by(
            substitute(
                'sum by (task, state) (increase(celery_task_runs_total{task=~"$task", '
                'state=~"failure|killed"}[$__range]))'
            ),
            "task",
            "state",
        )
        assert broken[("vcf.view_fail", "failure")] > 0
        # States other than success and failure, and kill causes, are created by their
        # first run (the series budget): the first kill is in the counter, not in increase().
        assert ("hog", "killed") in broken
        killed = prom.by('celery_task_runs_total{task="hog", state="killed"}', "task")
        assert killed == {("hog",): 1}
        tools = prom.by(
            "sum by (task, tool, outcome) (celery_task_tool_runs_total)", "task", "tool", "outcome"
        )
        assert tools[("vcf.query", "bcftools", "ok")] == 8
        peaks = prom.by(
            substitute(
                "max by (task, component) (max_over_time("
                'celery_task_memory_peak_bytes_max{task=~"$task"}[$__range]))'
            ),
            "task",
            "component",
        )
        assert peaks[("hog", "overhead")] >= 150 << 20, "the killed task's peak is on show"
        assert tools[("vcf.view_fail", "bcftools", "error")] == 2
        kills = prom.by("sum by (task) (celery_task_kills_total)", "task")
        assert kills == {("hog",): 1}, kills
    finally:
        if sleeper_pid is not None:  # lets the worker stop at once (warm shutdown)
            with contextlib.suppress(ProcessLookupError):
                os.kill(sleeper_pid, signal.SIGKILL)
    assert time.monotonic() - t_begin < 90
