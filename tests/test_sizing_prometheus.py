"""Sizing figures read from Prometheus equal those computed from the ledger: exactly for
counts, sums, means and maxima, within bucket resolution for quantiles."""

from __future__ import annotations

import bisect
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import fields
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from taskmeter.demo.vcfgen import generate_vcf
from taskmeter.export.metrics import MEMORY_BUCKETS
from taskmeter.sizing.prometheus import (
    SERVER_QUERIES,
    SourceError,
    bucket_quantile,
    counter_increase,
    parent_rss_from_prometheus,
    stats_from_prometheus,
    worker_pools_from_prometheus,
)
from taskmeter.sizing.stats import TaskStats, stats_from_reports

from helpers import require
from workerkit import free_port, wait_for

# -- the increase of one counter series ----------------------------------------------------
T0 = 1_000_000.0  # window start


def test_series_older_than_the_window_counts_from_its_first_sample():
    samples = [(T0 + 0.5 + i, v) for i, v in enumerate([7, 7, 9, 12, 12])]
    assert counter_increase(samples, T0) == 5


def test_a_reset_adds_the_value_after_it_whole():
    # 7 -> 12 (+5), a restart: 2 counted from 0 (+2), -> 3 -> 4 (+2)
    samples = [(T0 + 1 + i, v) for i, v in enumerate([7, 12, 2, 3, 4])]
    assert counter_increase(samples, T0) == 5 + 2 + 2
    # Several resets, the last sample itself after one.
    samples = [(T0 + 1 + i, v) for i, v in enumerate([5, 6, 1, 4, 0, 2, 1])]
    assert counter_increase(samples, T0) == 1 + (1 + 3) + (0 + 2) + 1


def test_a_series_born_inside_the_window_counts_from_zero():
    samples = [(T0 + 100 + i, v) for i, v in enumerate([3, 3, 4])]
    assert counter_increase(samples, T0) == 4
    # Within two scrape intervals of the window start: it was there before the window.
    samples = [(T0 + 1.9 + i, v) for i, v in enumerate([3, 3, 4])]
    assert counter_increase(samples, T0) == 1
    # Born, then reset.
    samples = [(T0 + 50 + i, v) for i, v in enumerate([2, 5, 1, 2])]
    assert counter_increase(samples, T0) == 5 + 2


def test_the_scrape_interval_is_the_median_spacing_unless_given():
    # Spacing 10 s (one missed scrape does not change the median): born only after T0+20.
    samples = [(T0 + 15, 4.0), (T0 + 25, 5.0), (T0 + 45, 6.0), (T0 + 55, 6.0)]
    assert counter_increase(samples, T0) == 2
    assert counter_increase(samples, T0, interval=5) == 6
    # One sample: the interval given (the other series' spacing) decides.
    assert counter_increase([(T0 + 30, 3.0)], T0, interval=10) == 3
    assert counter_increase([(T0 + 15, 3.0)], T0, interval=10) == 0
    assert counter_increase([], T0) == 0


def test_fractional_sums_keep_full_precision():
    values = [0.1 * i for i in range(1, 200)]
    samples = [(T0 + 1 + i, v) for i, v in enumerate(values)]
    assert counter_increase(samples, T0) == values[-1] - values[0]


# -- histogram quantiles ---------------------------------------------------------------------
def test_bucket_quantile_interpolates_as_histogram_quantile():
    buckets = {1.0: 2.0, 2.0: 6.0, 4.0: 8.0, math.inf: 8.0}
    assert bucket_quantile(0.5, buckets) == pytest.approx(1.5)  # rank 4: 2 of 4 into (1, 2]
    assert bucket_quantile(0.25, buckets) == pytest.approx(1.0)  # rank 2: top of the first
    assert bucket_quantile(0.125, buckets) == pytest.approx(0.5)  # first bucket from 0
    assert bucket_quantile(1.0, buckets) == pytest.approx(4.0)
    # The rank in the +Inf bucket: the largest finite bound.
    assert bucket_quantile(0.99, {1.0: 1.0, 2.0: 1.0, math.inf: 3.0}) == 2.0
    # Non-monotonic counts (a reset between scrapes) are repaired, not trusted.
    assert bucket_quantile(0.5, {1.0: 2.0, 2.0: 1.0, math.inf: 4.0}) == pytest.approx(1.0)
    assert bucket_quantile(0.5, {1.0: 0.0, math.inf: 0.0}) is None
    assert bucket_quantile(0.5, {1.0: 3.0}) is None
    assert bucket_quantile(0.5, {}) is None


# -- the HTTP API: errors and the queries sent -----------------------------------------------
class FakePrometheus:
    """Answers /api/v1/query with ``answer(query) -> (status, body bytes)``."""

    def __init__(self, answer: Callable[[str], tuple[int, bytes]]) -> None:
        self.queries: list[dict[str, str]] = []
        self.headers: list[dict[str, str]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
                fake.queries.append(form)
                fake.headers.append(dict(self.headers))
                status, body = (
                    answer(form.get("query", "")) if self.path == "/api/v1/query" else (404, b"")
                )
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_prometheus() -> Iterator[Callable[..., FakePrometheus]]:
    fakes: list[FakePrometheus] = []

    def start(answer: Callable[[str], tuple[int, bytes]]) -> FakePrometheus:
        fakes.append(FakePrometheus(answer))
        return fakes[-1]

    yield start
    for f in fakes:
        f.close()


def matrix(*series: tuple[dict[str, str], list[tuple[float, float]]]) -> bytes:
    result = [{"metric": m, "values": [[t, str(v)] for t, v in s]} for m, s in series]
    return json.dumps(
        {"status": "success", "data": {"resultType": "matrix", "result": result}}
    ).encode()


def vector(*series: tuple[dict[str, str], float | str]) -> bytes:
    result = [{"metric": m, "value": [1.0, str(v)]} for m, v in series]
    return json.dumps(
        {"status": "success", "data": {"resultType": "vector", "result": result}}
    ).encode()


def test_exact_queries_carry_the_selector_the_task_filter_and_the_exact_window(fake_prometheus):
    now = 1_700_000_000.0
    runs = ({"__name__": "celery_task_runs_total", "task": "a.b", "state": "success"},
            [(now - 5, 1.0), (now - 4, 3.0)])  # fmt: skip
    fake = fake_prometheus(lambda q: (200, matrix(runs) if "runs_total{" in q else matrix()))
    seen: list[str] = []
    stats = stats_from_prometheus(
        fake.url, since_s=90.5, tasks=["a.b", 'we"ird|name'], selector=' {job="celery",} ',
        progress=seen.append, now=now, method="exact",
    )  # fmt: skip
    assert list(stats) == ["a.b"]
    assert stats["a.b"].runs == 3 and stats["a.b"].runs_by_state == {"success": 3}
    assert stats["a.b"].mem_tool_avg_quantile_bytes is None
    queries = [q["query"] for q in fake.queries]
    assert len(queries) == len(seen) == 14
    assert seen[0] == "querying celery_task_runs_total (1/14)"
    assert seen[-1] == "querying celery_task_queue_wait_seconds_count (14/14)"
    assert queries[0] == (
        r'celery_task_runs_total{task=~"a\\.b|we\"ird\\|name",job="celery"}[90500ms]'
    )
    # Restarts of the workers (any task), then only the tasks that ran.
    assert queries[1] == 'process_start_time_seconds{job="celery"}[90500ms]'
    assert queries[2] == r'celery_task_kills_total{task=~"a\\.b",job="celery"}[90500ms]'
    assert queries[3] == (
        r'celery_task_tool_runs_total{task=~"a\\.b",job="celery",outcome=~"killed|oom"}[90500ms]'
    )
    assert all(q["time"] == f"{now:.3f}" for q in fake.queries)


def test_server_queries_aggregate_inside_prometheus(fake_prometheus):
    """Method server: every query is an aggregation returning one value per task type
    (and label), never raw samples."""
    now = 1_700_000_000.0

    def answer(q: str) -> tuple[int, bytes]:
        if q.startswith("count("):
            return 200, vector(({}, 10_000))  # many series: auto picks "server"
        if "increase(celery_task_runs_total" in q:
            return 200, vector(({"task": "a", "state": "success"}, 40.2),
                               ({"task": "a", "state": "failure"}, "NaN"))  # fmt: skip
        if "min_over_time(celery_task_runs_total" in q:
            return 200, vector(({"task": "a", "state": "killed"}, 1.0))  # born in the window
        if "increase(celery_task_kills_total" in q:
            return 200, vector(({"task": "a", "cause": "oom"}, 0.0))
        if "min_over_time(celery_task_kills_total" in q:
            return 200, vector(({"task": "a", "cause": "oom"}, 1.0))
        if "increase(celery_task_memory_avg_bytes_sum" in q:
            return 200, vector(({"task": "a", "component": "overhead"}, 4e9))
        if "increase(celery_task_memory_avg_bytes_count" in q:
            return 200, vector(({"task": "a", "component": "overhead"}, 40.0))
        if "celery_task_footprint_peak_bytes_max" in q:
            return 200, vector(({"task": "a"}, 3e8), ({"task": "a"}, "+Inf"))
        if "increase(celery_task_footprint_peak_bytes_bucket" in q:
            return 200, vector(({"task": "a", "le": "1e+08"}, 30.0),
                               ({"task": "a", "le": "+Inf"}, 41.0))  # fmt: skip
        return 200, vector()

    fake = fake_prometheus(answer)
    seen: list[str] = []
    notes: list[str] = []
    got = stats_from_prometheus(fake.url, since_s=7 * 86400, now=now, selector='ns="p"',
                                progress=seen.append, notes=notes)  # fmt: skip
    queries = [q["query"] for q in fake.queries]
    # A week: no raw samples considered. Sent a few at once: in any order.
    assert set(queries[0:2]) == {
        'sum by (task, state) (increase(celery_task_runs_total{ns="p"}[604800000ms]))',
        'sum by (task, state) (min_over_time(celery_task_runs_total{ns="p"}[604800000ms]) '
        'unless last_over_time(celery_task_runs_total{ns="p"}[15m] offset 604800000ms))',
    }
    peak = 'celery_task_memory_peak_bytes_max{task=~"a",ns="p"}[604800000ms]'
    assert f"max by (task, component) (max_over_time({peak}))" in queries
    assert all("[604800000ms]))" in q or q.startswith("count(") or "unless" in q for q in queries)
    assert len(queries) == SERVER_QUERIES and seen[-1].endswith(
        f"({SERVER_QUERIES}/{SERVER_QUERIES})"
    )
    a = got["a"]
    assert a.runs_by_state == {"success": 40, "killed": 1}
    assert a.kills_by_cause == {"oom": 1} and a.kills == 1
    assert a.mem_overhead_avg_mean_bytes == 1e8
    assert a.footprint_max_bytes == 300_000_000  # +Inf skipped
    assert a.footprint_median_bytes == pytest.approx(1e8 * 20.5 / 30)  # rank 20.5 of 41
    assert "2 NaN or infinite value(s) in Prometheus' answers skipped" in notes

    # Auto on a short window: raw samples only when few series are alive at its end.
    fake.queries.clear()
    short: list[str] = []
    stats_from_prometheus(fake.url, since_s=3600, now=now, notes=short)
    assert fake.queries[0]["query"] == 'count({__name__=~"celery_task_.+"})'
    assert "inside Prometheus" in short[0]  # 10 000 series x 3600 s: too many


def test_a_known_restart_is_a_reset_even_when_the_value_did_not_drop():
    # The new process counted past the old value before its first scrape.
    samples = [(0.0, 1.0), (10.0, 4.0), (20.0, 6.0), (30.0, 7.0)]
    assert counter_increase(samples, window_start=-5.0) == 6.0
    assert counter_increase(samples, window_start=-5.0, restarts=[15.0]) == 3.0 + 6.0 + 1.0


def test_no_data_in_the_window_is_an_empty_result(fake_prometheus):
    fake = fake_prometheus(lambda q: (200, matrix()))
    assert stats_from_prometheus(fake.url, since_s=60, method="exact") == {}
    assert len(fake.queries) == 1, "nothing else is asked once no task ran"
    idle = ({"task": "a", "state": "success"}, [(T0 + i, 5.0) for i in range(30)])
    fake = fake_prometheus(lambda q: (200, matrix(idle)))
    assert stats_from_prometheus(fake.url, since_s=30, now=T0 + 30, method="exact") == {}
    assert len(fake.queries) == 2  # runs, then restarts (a restart could hide runs)
    assert stats_from_prometheus(fake.url, since_s=60, tasks=[]) == {}
    fake = fake_prometheus(lambda q: (200, vector()))
    assert stats_from_prometheus(fake.url, since_s=60, method="server") == {}
    assert len(fake.queries) == 2  # increase and born series of runs_total


def test_percentile_needs_the_ledger(fake_prometheus):
    fake = fake_prometheus(lambda q: (200, vector()))
    with pytest.raises(SourceError, match="only ledgers keep"):
        stats_from_prometheus(fake.url, since_s=60, percentile=0.9)
    assert not fake.queries


@pytest.mark.parametrize(
    ("error", "limit"),
    [
        ("query processing would load too many samples into memory in query execution",
         "--query.max-samples"),
        ("expanding series: the query exceeded the maximum number of chunks fetched (limit: "
         "2000000)", "chunks one query may fetch"),
        ("the query hit the max number of series limit (limit: 100000 series)",
         "a per-query resource limit"),
    ],
)  # fmt: skip
def test_a_query_too_heavy_names_the_server_limit(fake_prometheus, error, limit):
    body = {"status": "error", "errorType": "execution", "error": error}
    fake = fake_prometheus(lambda q: (422, json.dumps(body).encode()))
    for method in ("server", "exact"):
        with pytest.raises(SourceError) as exc:
            stats_from_prometheus(fake.url, since_s=30 * 86400, method=method)  # type: ignore[arg-type]
        message = str(exc.value)
        assert fake.url in message and error in message
        assert "too heavy for this server" in message and limit in message, message
        assert "shorter --since" in message


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (200, b"<html>hello</html>", "did not answer with JSON"),
        (404, b"not found", "HTTP 404"),
        (400, json.dumps({"status": "error", "errorType": "bad_data",
                          "error": "parse error"}).encode(), "bad_data): parse error"),
        (200, json.dumps({"status": "error", "error": "boom"}).encode(), "boom"),
        (200, json.dumps({"status": "success", "data": {"resultType": "matrix",
                                                        "result": []}}).encode(),
         "expected a vector"),
    ],
)  # fmt: skip
def test_bad_answers_are_source_errors_naming_the_url(fake_prometheus, status, body, expected):
    fake = fake_prometheus(lambda q: (status, body))
    with pytest.raises(SourceError) as exc:
        stats_from_prometheus(fake.url, since_s=60)
    assert fake.url in str(exc.value) and expected in str(exc.value)


def test_credentials_in_the_url_are_sent_but_never_shown(fake_prometheus):
    fake = fake_prometheus(lambda q: (500, b"oops"))
    url = fake.url.replace("http://", "http://user:s3cret@")
    with pytest.raises(SourceError) as exc:
        stats_from_prometheus(url + "/", since_s=60)
    assert "s3cret" not in str(exc.value) and fake.url in str(exc.value)
    assert fake.headers[0]["Authorization"] == "Basic dXNlcjpzM2NyZXQ="  # user:s3cret


def test_unreachable_prometheus_is_a_source_error_naming_the_url():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(SourceError, match="Connection refused") as exc:
        stats_from_prometheus(url, since_s=600)
    assert f"cannot reach Prometheus at {url}" in str(exc.value)
    with pytest.raises(SourceError, match="not an http"):
        stats_from_prometheus("prometheus:9090", since_s=600)


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="since_s"):
        stats_from_prometheus("http://127.0.0.1:1", since_s=0)
    with pytest.raises(ValueError, match="percentile"):
        stats_from_prometheus("http://127.0.0.1:1", since_s=60, percentile=90)
    with pytest.raises(ValueError, match="method"):
        stats_from_prometheus("http://127.0.0.1:1", since_s=60, method="fast")  # type: ignore[arg-type]


# -- a real worker, a real Prometheus ---------------------------------------------------------
@pytest.fixture(scope="module")
def vcf(tmp_path_factory: pytest.TempPathFactory) -> str:
    require("bcftools")
    path = tmp_path_factory.mktemp("vcf") / "small.vcf.gz"
    return str(generate_vcf(path, samples=40, variants=4_000, seed=3))


MIB = 2**20
QUANTILES = {
    "mem_overhead_avg_quantile_bytes",
    "mem_tool_avg_quantile_bytes",
    "footprint_median_bytes",
}


def bucket_bounds(value: float) -> tuple[float, float]:
    """The memory bucket holding ``value``: (lower bound, upper bound]."""
    i = bisect.bisect_left(MEMORY_BUCKETS, value)
    lower = MEMORY_BUCKETS[i - 1] if i > 0 else 0.0
    return lower, MEMORY_BUCKETS[i] if i < len(MEMORY_BUCKETS) else math.inf


def assert_in_buckets(estimate: float | None, values: list[float], q: float, what: str) -> None:
    """A histogram quantile lies in the bucket of an order statistic next to the exact
    one: between the lower bound of the value below and the upper bound of the value
    above the exact (interpolated) quantile."""
    assert estimate is not None, what
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = bucket_bounds(ordered[math.floor(pos)])[0]
    high = bucket_bounds(ordered[math.ceil(pos)])[1]
    assert low <= estimate <= high, (what, estimate, ordered)


def assert_same_stats(
    got: TaskStats, truth: TaskStats, *, quantiles: bool = True, rel: float = 1e-9
) -> None:
    for f in fields(TaskStats):
        a, b = getattr(got, f.name), getattr(truth, f.name)
        if f.name in QUANTILES:
            if not quantiles:
                continue
            assert (a is None) == (b is None), (truth.task, f.name, a, b)
            if a is None:
                continue
            # The value: within the bucket resolution, checked by assert_in_buckets
            # against the order statistics (the buckets are x4 wide).
        elif isinstance(b, float):
            assert a == pytest.approx(b, rel=rel, abs=1e-9), (truth.task, f.name, a, b)
        elif f.name == "queue_wait_runs" and rel > 1e-9:
            # The _count of a histogram born at its first observation: increase()
            # extrapolates it like the sums (see above), rounded; ±1 per worker's series.
            assert abs(a - b) <= max(2, rel * b), (truth.task, f.name, a, b)
        else:
            assert a == b, (truth.task, f.name, a, b)


@pytest.mark.slow
def test_prometheus_figures_equal_the_ledger_figures(start_worker, prometheus, vcf):
    w = start_worker("redis", "prefork", 2)
    prom = prometheus([f"127.0.0.1:{w.port}"])
    for _ in range(6):
        w.send("vcf.query", vcf)
    for _ in range(2):
        w.send("vcf.view_fail", vcf)
    for _ in range(4):
        w.send("cpu.burn", 0.05)
    w.send("hog", 64, 30)
    hog = wait_for(
        lambda: [r for r in w.inflight() if r["task"] == "hog" and r["worker_rss_bytes"] > 64e6],
        30,
        "the hog task in flight with its memory",
    )[0]
    os.kill(hog["pid"], signal.SIGKILL)  # an out-of-memory kill, as the worker sees it
    reports = w.wait_reports(13)
    assert len(reports) == 13
    prom.wait_scrape_after(time.time())

    seen: list[str] = []
    t0 = time.monotonic()
    got = stats_from_prometheus(prom.url, since_s=600, progress=seen.append, method="exact")
    elapsed = time.monotonic() - t0
    truth = stats_from_reports(reports)
    assert set(got) == set(truth) == {"vcf.query", "vcf.view_fail", "cpu.burn", "hog"}
    assert got["vcf.query"].runs_by_state == {"success": 6}
    assert got["vcf.view_fail"].runs_by_state == {"failure": 2}
    assert got["hog"].runs_by_state == {"killed": 1} and got["hog"].kills == 1
    assert sum(got["hog"].kills_by_cause.values()) == 1
    # The hog held 64 MiB; RSS pages may round just under (63.7 MiB seen): what the
    # ledger says is the truth, the 64 MiB only a sanity check with room.
    assert got["hog"].overhead_peak_max_bytes == truth["hog"].overhead_peak_max_bytes
    assert got["hog"].overhead_peak_max_bytes >= 60 << 20
    for task in truth:
        assert_same_stats(got[task], truth[task])
    # Honest bound of a histogram quantile, whatever the spread of the values.
    for task, rs in {t: [r for r in reports if r.task == t] for t in truth}.items():
        assert_in_buckets(got[task].footprint_median_bytes,
                          [float(r.footprint_peak_bytes) for r in rs], 0.5, task)  # fmt: skip
    assert len(seen) == 14 and seen[0] == "querying celery_task_runs_total (1/14)"
    assert elapsed < 5, elapsed

    # Method "server" (what a fleet and a long window use): computed inside Prometheus.
    # Queried at the last scrape, increase() has nothing to extrapolate at the end; a
    # series born with a value (a histogram at its first task) is extrapolated back by at
    # most half a scrape interval (1 s here) times its rate: sums and means within
    # 0.5 s / the series' span. Counts and maxima are exact.
    last = max(float(r["value"][1]) for r in prom.query("timestamp(celery_task_runs_total)"))
    first_end = min(datetime.fromisoformat(r.ended_at).timestamp() for r in reports)
    bound = 0.5 / (last - first_end - 1.0)
    server = stats_from_prometheus(prom.url, since_s=600, now=last, method="server")
    assert set(server) == set(truth)
    for task in truth:
        assert_same_stats(server[task], truth[task], quantiles=False, rel=bound)

    # The interpolation is PromQL's own (every series was born in the window, so the
    # buckets' current values are their increases).
    promql = prom.by(
        "histogram_quantile(0.5, sum by (task, le) (celery_task_footprint_peak_bytes_bucket))",
        "task",
    )
    promql = {k: v for k, v in promql.items() if not math.isnan(v)}  # tasks that never ran
    assert {task for (task,) in promql} == set(truth)
    for (task,), value in promql.items():
        assert got[task].footprint_median_bytes == pytest.approx(value, rel=1e-12), task

    # Only some tasks; a name without data is simply absent.
    some = stats_from_prometheus(prom.url, since_s=600, tasks=["cpu.burn", "vcf.query", "nope"])
    assert set(some) == {"cpu.burn", "vcf.query"}
    for task in some:
        assert_same_stats(some[task], stats_from_reports(reports)[task])
    # The selector narrows every query.
    assert set(stats_from_prometheus(prom.url, since_s=600, selector='job="worker"')) == set(truth)
    assert stats_from_prometheus(prom.url, since_s=600, selector='job="elsewhere"') == {}
    # A window that ends before the tasks ran holds none of them.
    first = min(datetime.fromisoformat(r.started_at).timestamp() for r in reports)
    before = first - 0.5
    assert stats_from_prometheus(prom.url, since_s=600, now=before) == {}

    # `taskmeter recommend` end to end: the same recommendation from either source.
    def recommend(*source: str) -> dict[str, Any]:
        out = subprocess.run(
            [sys.executable, "-m", "taskmeter.cli", "recommend", *source, "--concurrency", "2",
             "--min-tasks", "1", "--parent-memory", "100Mi", "--format", "json"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        return dict(json.loads(out.stdout))

    from_prom = recommend("--prometheus", prom.url, "--since", "10m")
    from_ledger = recommend("--ledger", str(w.ledger))
    for key in ("resources", "memory_request_bytes", "memory_limit_bytes",
                "cpu_request_millicores", "max_memory_per_child_kib", "celery_flags"):  # fmt: skip
        assert from_prom[key] == from_ledger[key], key
    # The parent: the worker's main process, as its process_* metrics tell.
    parent = parent_rss_from_prometheus(prom.url, since_s=600)
    assert parent is not None and 20 << 20 < parent < 1 << 30


@pytest.mark.slow
def test_a_worker_restart_inside_the_window_is_counted_across(start_worker, prometheus):
    first = start_worker("redis", "prefork", 2)
    prom = prometheus([f"127.0.0.1:{first.port}"])
    for _ in range(4):
        first.send("cpu.burn", 0.05)
    first.wait_reports(4)
    prom.wait_scrape_after(time.time())
    assert first.stop() == 0
    # The same target (port) again: its counters restart from 0, below their last value.
    second = start_worker("redis", "prefork", 2, TASKMETER_PORT=str(first.port))
    assert second.ledger == first.ledger
    for _ in range(2):
        second.send("cpu.burn", 0.05)
    reports = second.wait_reports(6)
    assert len(reports) == 6
    prom.wait_scrape_after(time.time())

    got = stats_from_prometheus(prom.url, since_s=600)
    truth = stats_from_reports(reports)
    assert set(got) == {"cpu.burn"}
    assert got["cpu.burn"].runs == 6
    # Quantiles: a bucket whose count after the restart is not below its count before
    # cannot show the reset (as for PromQL's increase()); counts and sums always drop.
    assert_same_stats(got["cpu.burn"], truth["cpu.burn"], quantiles=False)
    # What Prometheus itself reports now only covers the second worker.
    now = prom.by('sum(celery_task_runs_total{task="cpu.burn"})')
    assert now == {(): 2.0}


# -- a synthetic fleet backfilled into a real Prometheus -------------------------------------
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_fleet  # noqa: E402

url_tsdb: dict[str, str] = {}  # Prometheus URL -> its data directory


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, str, list[Any]]]:
    """2 workers x 6 task types x 6 hours at a 60 s scrape (with failures, OOM kills, lost
    tasks and time-limit kills), backfilled with promtool and served by Prometheus; and
    the same fleet's ledger."""
    require("prometheus", "promtool")
    tmp = tmp_path_factory.mktemp("fleet")
    fleet = bench_fleet.Fleet(workers=2, types=6, days=0.25)
    ledger: list[Any] = []
    bench_fleet.simulate(fleet, tmp / "om", ledger)
    bench_fleet.backfill(tmp / "om", tmp / "tsdb")
    server = bench_fleet.start_prometheus(tmp / "tsdb", tmp / "prometheus.log")
    url_tsdb[server.url] = str(tmp / "tsdb")
    yield fleet, server.url, ledger
    server.stop()


def test_fleet_figures_computed_inside_prometheus_equal_the_ledger(fleet, tmp_path):
    spec, url, reports = fleet
    since = spec.end - spec.start + 10 * spec.interval_s  # the window starts before the data
    truth = stats_from_reports(reports)
    assert any(s.kills_by_cause.get("oom") for s in truth.values())
    assert any(s.runs_by_state.get("lost") for s in truth.values())
    assert any(s.kills_by_cause.get("time_limit") for s in truth.values())
    for method in ("server", "exact"):
        notes: list[str] = []
        got = stats_from_prometheus(url, since_s=since, now=spec.end, method=method, notes=notes)
        assert set(got) == set(truth), method
        for task, want in truth.items():
            # Every series starts inside the window, which ends on the last scrape. Exact:
            # to float rounding. Server: increase() of a series born with a value (a
            # histogram at its first observation) also extrapolates back toward the
            # window start by at most half a scrape interval (docs/sizing.md): sums and
            # means within interval / (2 x the series' span); counts still exact.
            bound = 1e-9 if method == "exact" else spec.interval_s / (since - 15 * spec.interval_s)
            assert_same_stats(got[task], want, quantiles=False, rel=bound)
            rs = [r for r in reports if r.task == task]
            assert_in_buckets(got[task].footprint_median_bytes,
                              [float(r.footprint_peak_bytes) for r in rs], 0.5, task)  # fmt: skip
        assert notes and ("inside Prometheus" in notes[0]) == (method == "server")

    # `taskmeter recommend`: the same pod from the ledger and from Prometheus (pool and
    # concurrency from taskmeter_worker_info, parent from process_resident_memory_bytes).
    ledger = tmp_path / "fleet.jsonl"
    ledger.write_text("".join(r.to_json() + "\n" for r in reports))
    common = ["--concurrency", "4", "--parent-memory", "120Mi", "--format", "json"]
    from_ledger = recommend_json("--ledger", str(ledger), *common)
    since_now = time.time() - spec.start + 10 * spec.interval_s
    from_prom = recommend_json("--prometheus", url, "--since", f"{since_now:.0f}s", *common)
    for key in ("memory_limit_bytes", "max_memory_per_child_kib", "celery_flags", "pool"):
        assert from_prom[key] == from_ledger[key], key  # maxima: exact
    # Means: within increase()'s extrapolation bound (see above).
    assert from_prom["memory_request_bytes"] == pytest.approx(
        from_ledger["memory_request_bytes"], rel=spec.interval_s / (spec.end - spec.start)
    )
    # The window now ends after the last scrape: increase() extrapolates up to one scrape
    # interval past it, which ratios (CPU / wall) cancel to well within a 10m step.
    assert abs(from_prom["cpu_request_millicores"] - from_ledger["cpu_request_millicores"]) <= 10
    assert any("VPA" in line for line in from_prom["reasoning"])
    bumped = {t["task"] for t in from_prom["tasks"] if t["oom_bumped"]}
    assert bumped == {t for t, s in truth.items()
                      if s.kills_by_cause.get("oom") or s.runs_by_state.get("lost")}  # fmt: skip
    assert any("time limit" in n for n in from_prom["notes"])
    # No --concurrency: taskmeter_worker_info says 4.
    auto = recommend_json("--prometheus", url, "--since", f"{since_now:.0f}s", "--format", "json",
                          "--parent-memory", "120Mi")  # fmt: skip
    assert auto["options"]["concurrency"] == 4
    assert auto["memory_limit_bytes"] == from_ledger["memory_limit_bytes"]


def test_task_filter_narrows_the_workers_read_for_pool_and_parent(fleet):
    """--task also narrows taskmeter_worker_info and the parent's RSS to the workers that
    ran those tasks: a Deployment's pool is not taken from another's."""
    spec, url, reports = fleet
    since = spec.end - spec.start + 10 * spec.interval_s
    task = sorted({r.task for r in reports})[0]
    every = worker_pools_from_prometheus(url, since_s=since, now=spec.end)
    ran = worker_pools_from_prometheus(url, since_s=since, now=spec.end, tasks=[task])
    nobody = worker_pools_from_prometheus(url, since_s=since, now=spec.end, tasks=["no.such"])
    hosts = {r.worker.hostname for r in reports if r.task == task}
    assert sum(sum(by.values()) for by in ran.pools.values()) == len(hosts)
    assert ran.concurrency_of("prefork") == every.concurrency_of("prefork") == 4
    assert nobody.pools == {} and nobody.concurrency_of("prefork") is None
    parent = parent_rss_from_prometheus(url, since_s=since, now=spec.end)
    assert parent is not None and parent > 0
    assert parent_rss_from_prometheus(url, since_s=since, now=spec.end, tasks=[task]) == parent
    assert parent_rss_from_prometheus(url, since_s=since, now=spec.end, tasks=["no.such"]) is None


def recommend_json(*args: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "taskmeter.cli", "recommend", "--min-tasks", "1",
                          *args], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout, parse_constant=_no_constant))


def _no_constant(name: str) -> Any:
    raise AssertionError(f"not strict JSON: {name}")


def test_a_server_with_a_tiny_sample_limit_still_answers_the_aggregations(fleet, tmp_path):
    """--query.max-samples bounds the samples one query holds at once. The aggregations
    read one series' window at a time, so they pass a limit far below the window's
    total; the raw-sample method does not, and its refusal names the limit."""
    spec, url, reports = fleet
    tsdb = tmp_path / "tsdb"
    skip = shutil.ignore_patterns("lock", "wal", "chunks_head")
    shutil.copytree(Path(url_tsdb[url]), tsdb, ignore=skip)
    limit = spec.scrapes * 4  # a few series' windows; the fleet holds ~850 series
    server = bench_fleet.start_prometheus(tsdb, tmp_path / "p.log", f"--query.max-samples={limit}")
    try:
        since = spec.end - spec.start + 10 * spec.interval_s
        got = stats_from_prometheus(server.url, since_s=since, now=spec.end, method="server")
        truth = stats_from_reports(reports)
        assert {t: s.runs_by_state for t, s in got.items()} == {
            t: s.runs_by_state for t, s in truth.items()
        }
        with pytest.raises(SourceError) as exc:
            stats_from_prometheus(server.url, since_s=since, now=spec.end, method="exact")
        assert "--query.max-samples" in str(exc.value), exc.value
        assert "too heavy for this server" in str(exc.value)
    finally:
        server.stop()


def test_exact_method_skips_nan_and_infinite_samples(fake_prometheus):
    now = 1_700_000_000.0
    runs = ({"task": "a", "state": "success"}, [(now - 20, 0.0), (now - 10, 2.0)])
    peak = ({"task": "a", "component": "overhead"},
            [(now - 20, 5e7), (now - 10, math.inf), (now - 5, math.nan)])  # fmt: skip

    def answer(q: str) -> tuple[int, bytes]:
        if q.startswith("celery_task_runs_total"):
            return 200, matrix(runs)
        if q.startswith("celery_task_memory_peak_bytes_max"):
            body = matrix(peak).replace(b'"inf"', b'"+Inf"').replace(b'"nan"', b'"NaN"')
            return 200, body
        return 200, matrix()

    fake = fake_prometheus(answer)
    notes: list[str] = []
    got = stats_from_prometheus(fake.url, since_s=60, now=now, method="exact", notes=notes)
    assert got["a"].overhead_peak_max_bytes == 50_000_000 and got["a"].runs == 2
    assert "2 NaN or infinite value(s) in Prometheus' answers skipped" in notes


@pytest.mark.slow
def test_a_solo_worker_is_sized_as_solo_from_prometheus_and_from_its_ledger(
    start_worker, prometheus
):
    """Pool and concurrency come from taskmeter_worker_info: a solo worker runs its task
    in its main process, so no parent is added and no --max-memory-per-child printed."""
    w = start_worker("redis", "solo", 1)
    prom = prometheus([f"127.0.0.1:{w.port}"])
    for _ in range(3):
        w.send("cpu.burn", 0.05)
    reports = w.wait_reports(3)
    assert {r.worker.pool for r in reports} == {"solo"}
    prom.wait_scrape_after(time.time())
    from_prom = recommend_json("--prometheus", prom.url, "--since", "10m", "--format", "json")
    from_ledger = recommend_json("--ledger", str(w.ledger), "--format", "json")
    for rec in (from_prom, from_ledger):
        assert rec["pool"] == "solo" and rec["celery_flags"] == ["--pool", "solo"]
        assert rec["max_memory_per_child_kib"] is None and rec["options"]["concurrency"] == 1
        assert not any("[parent]" in line for line in rec["reasoning"])
    assert from_prom["memory_limit_bytes"] == from_ledger["memory_limit_bytes"]
    assert from_prom["memory_request_bytes"] == from_ledger["memory_request_bytes"]
