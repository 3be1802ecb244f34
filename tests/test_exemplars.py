"""Exemplars end to end (issue 9 part 3): a real worker's tasks, scraped by a real
Prometheus with exemplar storage, name the task behind a peak through
/api/v1/query_exemplars."""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from typing import Any

import pytest

from workerkit import http_get, wait_for

pytestmark = pytest.mark.slow

MIB = 2**20
BIG_MIB = 300  # alone in the 256 MiB-1 GiB bucket: worker baseline + 300 MiB
SMALL_MIB = 1


def query_exemplars(prom_url: str, promql: str, start: float, end: float) -> list[dict[str, Any]]:
    q = urllib.parse.urlencode({"query": promql, "start": f"{start:.3f}", "end": f"{end:.3f}"})
    body = json.loads(http_get(f"{prom_url}/api/v1/query_exemplars?{q}"))
    assert body["status"] == "success", body
    return list(body["data"] or [])


def flat(result: list[dict[str, Any]]) -> list[tuple[dict[str, str], str, float]]:
    """(series labels, task_id, value) of every exemplar of a query_exemplars answer."""
    return [
        (series["seriesLabels"], ex["labels"]["task_id"], float(ex["value"]))
        for series in result
        for ex in series["exemplars"]
    ]


def test_prometheus_finds_the_task_behind_the_peak(start_worker, prometheus) -> None:
    t_begin = time.time()
    w = start_worker("redis", "prefork", 1)  # one task at a time: a fixed order
    prom = prometheus([f"127.0.0.1:{w.port}"], exemplars=True)
    small = [w.send("hog", SMALL_MIB, 0.05) for _ in range(2)]
    big = w.send("hog", BIG_MIB, 1.5)
    small.append(w.send("hog", SMALL_MIB, 0.05))
    reports = {r.task_id: r for r in w.wait_reports(4)}
    assert set(reports) == {big.id, *(s.id for s in small)}
    big_report = reports[big.id]
    assert big_report.overhead.rss_peak_bytes > 256 * MIB, "the big task must fill its bucket"
    assert all(reports[s.id].overhead.rss_peak_bytes < 256 * MIB for s in small)
    prom.wait_scrape_after(time.time())

    # The plain text format carries no exemplar; the scrape Prometheus negotiated did.
    assert " # {" not in w.metrics()
    body = json.loads(http_get(f"{prom.url}/api/v1/targets"))
    (target,) = body["data"]["activeTargets"]
    assert target["health"] == "up" and not target["lastError"], target

    end = time.time() + 1
    for family, value_of in (
        ("celery_task_memory_peak_bytes", lambda r: r.overhead.rss_peak_bytes),
        ("celery_task_footprint_peak_bytes", lambda r: r.footprint_peak_bytes),
        ("celery_task_wall_seconds", lambda r: r.wall_s),
    ):
        selector = f'{family}_bucket{{task="hog"}}'
        if family == "celery_task_memory_peak_bytes":
            selector = f'{family}_bucket{{task="hog",component="overhead"}}'
        exemplars = wait_for(
            lambda sel=selector: flat(query_exemplars(prom.url, sel, t_begin - 5, end)),
            20,
            f"exemplars of {selector}",
        )
        # Every exemplar is a real task of this run, with its exact observed value.
        for labels, task_id, value in exemplars:
            assert task_id in reports, (labels, task_id)
            assert value == pytest.approx(value_of(reports[task_id]), rel=1e-9), family
            assert "task_id" not in labels  # an exemplar, never a label
        # The largest exemplar is the task that produced the peak.
        _, task_id, value = max(exemplars, key=lambda e: e[2])
        assert task_id == big.id, (family, exemplars)
        # ...and it sits in the highest occupied bucket, which PromQL also sees.
        top = prom.query(f"max(histogram_quantile(1, sum by (le) ({family}_bucket)))")
        assert top and float(top[0]["value"][1]) >= value

    # What Grafana's "exemplars" toggle sends: the same answer through query_range's
    # companion (a range query on the bucket rate) naming the big task.
    assert any(
        t == big.id
        for _, t, _ in flat(
            query_exemplars(
                prom.url,
                "histogram_quantile(0.99, sum by (le) "
                '(rate(celery_task_footprint_peak_bytes_bucket{task="hog"}[1m])))',
                t_begin - 5,
                end,
            )
        )
    )
    req = urllib.request.Request(
        w.url + "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        om = resp.read().decode()
    assert f'# {{task_id="{big.id}"}}' in om
