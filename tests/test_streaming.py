"""Readers stream: `recommend --ledger` and `report --ledger` hold memory bounded by the
number of task types, not of records. 200 000 records: each command a real subprocess
with its peak RSS from the kernel (its own VmHWM at exit) under 200 MB, the page under 10 MB
and opened in a real headless Chromium without errors; the figures equal the truth the
generator kept while writing. The bounded structures (streaming quantiles, the
concurrency window) against exact computations."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from recordgen import HOSTS, T0, fleet, record, write_fleet_ledger
from taskmeter.export.records import RecordReader, parse_record
from taskmeter.measure.report import TaskReport
from taskmeter.sizing.stats import (
    ConcurrencyTracker,
    StatsAccumulator,
    StreamQuantiles,
    quantile,
    stats_from_reports,
)
from test_report import CHROMIUM, CHROMIUM_ARGS, Opened

from helpers import require_module, require_path

# The command's own peak: its VmHWM, written at exit to the file $TM_TEST_HWM. Not
# wait4's ru_maxrss, which also holds the high-water mark of this test process at the
# exec (the floor every child inherits: docs/measurement.md), whatever the suite ran
# in it before.
CLI = [
    sys.executable,
    "-c",
    "import atexit, os\n"
    "def _own_hwm():\n"
    "    with open('/proc/self/status') as f:\n"
    "        kib = next(line for line in f if line.startswith('VmHWM:')).split()[1]\n"
    "    with open(os.environ['TM_TEST_HWM'], 'w') as out:\n"
    "        out.write(kib)\n"
    "atexit.register(_own_hwm)\n"
    "from taskmeter.cli import main\n"
    "main()\n",
]
RECORDS = 200_000
MB = 10**6
RSS_BOUND = 200 * MB
PAGE_BOUND = 10 * MB


def measured(
    args: list[str], tmp: Path, name: str, timeout: float = 180
) -> tuple[int, str, str, int]:
    """Run ``args`` (a CLI command); (exit code, stdout, stderr, peak RSS in bytes of
    that process: its own VmHWM at exit)."""
    out_path, err_path = tmp / f"{name}.out", tmp / f"{name}.err"
    hwm_path = tmp / f"{name}.hwm"
    env = {**os.environ, "TM_TEST_HWM": str(hwm_path)}
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(args, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            proc.wait()
        finally:
            timer.cancel()
    hwm = int(hwm_path.read_text()) * 1024 if hwm_path.exists() else 0
    assert hwm > 0, f"{name}: no peak written (exit {proc.returncode})"
    return proc.returncode, out_path.read_text(), err_path.read_text(), hwm


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    require_path(CHROMIUM, "Debian package 'chromium'; scripts/setup.sh")
    sync_api = require_module("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


# -- 200 000 records through the real commands ---------------------------------------------------
def test_200k_records_recommend_and_report_in_bounded_memory(tmp_path, browser):
    ledger = tmp_path / "ledger.jsonl"
    truth = write_fleet_ledger(ledger, RECORDS)
    assert ledger.stat().st_size > 150 * MB  # far more than the memory bound allows to hold

    page = tmp_path / "report.html"
    commands = {
        "recommend": [*CLI, "recommend", "--ledger", str(ledger), "--format", "json"],
        "report": [*CLI, "report", "--ledger", str(ledger), "-o", str(page)],
    }
    results: dict[str, tuple[int, str, str, int]] = {}
    threads = [  # side by side: each has its own process and its own peak RSS
        threading.Thread(target=lambda n=n, a=a: results.__setitem__(n, measured(a, tmp_path, n)))
        for n, a in commands.items()
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    code, out, err, rss = results["recommend"]
    assert code == 0, err
    print(f"\nrecommend: peak RSS {rss / MB:.1f} MB for {RECORDS} records")
    assert rss < RSS_BOUND, rss
    assert f"read {RECORDS} records from {ledger}\n" in err
    assert f"concurrency {truth.concurrency()}: the most tasks seen running at once\n" in err
    rec = json.loads(out, parse_constant=_no_constant)
    assert rec["options"]["concurrency"] == truth.concurrency() == 4
    by_task = {t["task"]: t for t in rec["tasks"]}
    assert set(by_task) == set(truth.runs)
    for task, t in by_task.items():
        assert t["runs"] == truth.runs[task]
        assert t["footprint_max_bytes"] == truth.footprint_max[task]
        assert t["overhead_peak_max_bytes"] == truth.worker_peak_max[task]
        assert t["wall_mean_s"] == pytest.approx(truth.wall_sum[task] / truth.runs[task], rel=1e-9)

    code, _, err, rss = results["report"]
    assert code == 0, err
    size = page.stat().st_size
    print(f"report: peak RSS {rss / MB:.1f} MB, page {size / MB:.2f} MB")
    assert rss < RSS_BOUND, rss
    assert size < PAGE_BOUND, size
    text = page.read_text()
    assert f"{RECORDS} tasks of {len(truth.runs)} types" in text
    assert "<h2>Tasks: a sample of " in text and f" of {RECORDS}</h2>" in text
    assert "reservoir sampling with a fixed seed" in text
    assert "no point is drawn: each box spans the quartiles" in text

    opened = Opened(browser, page)
    try:
        opened.assert_clean()
        p = opened.page
        # Per type: time split, memory boxes, heaviest tasks over time; each drew traces.
        assert p.evaluate("document.querySelectorAll('.js-plotly-plot').length") == 3 * len(
            truth.runs
        )
        assert p.evaluate(
            "Array.from(document.querySelectorAll('.js-plotly-plot'))"
            ".every(d => d.querySelectorAll('.main-svg .trace').length > 0)"
        )
        rows = len(opened.column("tasks", 0, "title"))
        assert 2000 <= rows <= 2000 + 5 * len(truth.runs)
        p.click("#tasks th:nth-child(9) button")  # footprint: sorts the sample
        footprints = [int(float(v)) for v in opened.column("tasks", 8)]
        assert footprints == sorted(footprints)
        assert max(footprints) == max(truth.footprint_max.values())  # the heaviest are in
        opened.assert_clean()
    finally:
        opened.page.close()


def _no_constant(name: str) -> Any:
    raise ValueError(f"not strict JSON: {name}")


# -- the bounded structures against exact computations -----------------------------------------
def test_generated_records_are_what_to_json_writes(tmp_path):
    for d in fleet(300):
        assert parse_record(d).to_dict() == d == TaskReport.from_dict(d).to_dict()
    path = tmp_path / "l.jsonl"
    write_fleet_ledger(path, 50)
    reader = RecordReader([path])
    reports = list(reader)
    assert len(reports) == 50 and reader.summary.bad == reader.summary.skipped == 0
    for line, r in zip(path.read_text().splitlines(), reports, strict=True):
        assert json.loads(r.to_json()) == json.loads(line)


def test_stream_quantiles_exact_then_within_half_a_percent():
    rng = random.Random(5)
    q = StreamQuantiles()
    values = [rng.lognormvariate(18, 1.2) for _ in range(StreamQuantiles.EXACT_MAX)]
    for v in values:
        q.add(v)
    assert q.exact
    for p in (0.0, 0.1, 0.5, 0.9, 0.99, 1.0):
        assert q.quantile(p) == quantile(values, p)
    more = [rng.lognormvariate(18, 1.2) for _ in range(60_000)] + [0.0] * 100
    for v in more:
        q.add(v)
    values += more
    assert not q.exact and q.count == len(values)
    ordered = sorted(values)
    for p in (0.001, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999):
        rank = math.floor(p * (len(ordered) - 1))
        got = q.quantile(p)
        # the bin's middle against the value at that rank: half a bin (1 %) at most
        assert abs(got - ordered[rank]) <= 0.005 * ordered[rank] + 1e-9, (p, got, ordered[rank])
    assert q.quantile(0.0) == 0.0 and q.quantile(1.0) == max(values)
    assert len(q._bins) < 2000  # bounded, whatever the count


def test_stats_accumulator_equals_the_list_computation():
    reports = [parse_record(d) for d in fleet(3000)]
    got = stats_from_reports(iter(reports), 0.9)
    for task, s in got.items():
        rs = [r for r in reports if r.task == task]
        assert s.runs == len(rs)
        assert s.footprint_median_bytes == quantile(
            [float(r.footprint_peak_bytes) for r in rs], 0.5
        )
        assert s.mem_overhead_avg_quantile_bytes == quantile(
            [float(r.overhead.rss_avg_bytes) for r in rs], 0.9
        )
        assert s.footprint_max_bytes == max(r.footprint_peak_bytes for r in rs)
        assert s.wall_sum_s == pytest.approx(sum(r.wall_s for r in rs), rel=1e-12)
    acc = StatsAccumulator()
    for r in reports:
        acc.add(r)
    assert acc.runs == len(reports) and acc.exact


def _sweep(spans: dict[str, list[tuple[float, float]]]) -> int:
    best = 0
    for items in spans.values():
        running = 0
        for _, delta in sorted([(s, 1) for s, _ in items] + [(e, -1) for _, e in items]):
            running += delta
            best = max(best, running)
    return best


def _task(i: int, start: float, wall: float, host: str) -> TaskReport:
    return parse_record(record(i, start=start, wall=wall, host=host))


def test_concurrency_tracker_equals_a_full_sweep():
    rng = random.Random(9)
    for trial in range(30):
        tasks = []
        spans: dict[str, list[tuple[float, float]]] = {}
        for i in range(400):
            host = rng.choice(HOSTS[:2])
            start = T0 + rng.uniform(0, 600)
            wall = rng.choice([0.0, rng.uniform(0, 5), rng.uniform(0, 120)])
            r = _task(i, start, wall, host)
            tasks.append(r)
            spans.setdefault(host, []).append(_span(r))
        truth = _sweep(spans)
        tasks.sort(key=lambda r: r.ended_at)  # the order a ledger has them
        tracker = ConcurrencyTracker()
        for r in tasks:
            tracker.add(r)
        assert (tracker.value, tracker.exact) == (truth, True), trial
        # Far out of order (newest first): flagged, and never more than the truth.
        tracker = ConcurrencyTracker()
        tracker.SLACK_S = 0.0
        for r in reversed(tasks):
            tracker.add(r)
        assert tracker.value <= truth
        assert tracker.value == truth or not tracker.exact  # exact means equal


def test_concurrency_tracker_lets_go_of_old_tasks():
    tracker = ConcurrencyTracker()
    for i in range(20_000):  # 2 slots, 1 s tasks, back to back for 2.8 hours
        tracker.add(_task(i, T0 + (i // 2), 1.0, "worker-a"))
    host = tracker._hosts["worker-a"]
    assert len(host.items) - host.lo < 2 * (1 + tracker.SLACK_S + 2)
    assert (tracker.value, tracker.exact) == (2, True)

    # A task that outlasts the window (or more tasks than MAX_KEPT in it): the value may
    # be a lower bound, and says so.
    capped = ConcurrencyTracker()
    capped.MAX_KEPT = 100
    for i in range(1000):
        capped.add(_task(i, T0 + i, 1.0, "worker-a"))
    capped.add(_task(1000, T0 - 1, 1002.0, "worker-a"))  # ran beside all of them
    assert capped.value == 2 and not capped.exact
    assert len(capped._hosts["worker-a"].items) - capped._hosts["worker-a"].lo <= 101


def _span(r: TaskReport) -> tuple[float, float]:
    from datetime import datetime

    return datetime.fromisoformat(r.started_at).timestamp(), datetime.fromisoformat(
        r.ended_at
    ).timestamp()
