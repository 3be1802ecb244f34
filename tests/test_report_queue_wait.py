"""The report's queue-wait plot: per task type, from the stamped records only."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import recordgen


def _report(ledger: Path, out: Path) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "taskmeter.cli", "report", "--ledger", str(ledger), "-o", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return out.read_text()


def test_queue_wait_box_uses_the_stamped_tasks_and_counts_the_rest(tmp_path: Path):
    waits = [0.5, 1.0, 2.0, 4.0, 8.0]
    lines = []
    for i, w in enumerate(waits):
        rec = recordgen.record(i, task="vcf.query", start=recordgen.T0 + i)
        rec["queue_wait_s"] = w
        lines.append(recordgen.line(rec))
    for i in range(5, 8):  # sent without the stamp: no wait
        lines.append(recordgen.line(recordgen.record(i, task="vcf.query",
                                                     start=recordgen.T0 + i)))  # fmt: skip
    ledger = tmp_path / "l.jsonl"
    ledger.write_text("\n".join(lines) + "\n")
    page = _report(ledger, tmp_path / "r.html")
    assert 'id="queue-wait-plot"' in page
    assert "vcf.query: 5 of 8" in page
    # The box's median and fences are the stamped waits' own (exact below 4096 tasks).
    fig = re.search(r'Plotly.newPlot\(\s*"queue-wait-plot",\s*(\[.*?\]),\s*\{', page, re.S)
    assert fig is not None
    (box,) = json.loads(fig.group(1))
    assert box["median"] == [2.0]
    assert box["lowerfence"] == [0.5] and box["upperfence"] == [8.0]


def test_without_stamped_tasks_the_page_says_why(tmp_path: Path):
    ledger = tmp_path / "l.jsonl"
    ledger.write_text(recordgen.line(recordgen.record(0)) + "\n")
    page = _report(ledger, tmp_path / "r.html")
    assert "No task carries a queue wait" in page


def test_recommend_says_when_waits_ask_for_more_workers(tmp_path: Path):
    lines = []
    for i, w in enumerate([0.5, 1.0, 2.0, 4.0, 8.0]):  # mean 3.1 s > wall 1 s
        rec = recordgen.record(i, task="vcf.query", start=recordgen.T0 + i, wall=1.0)
        rec["queue_wait_s"] = w
        lines.append(recordgen.line(rec))
    for i in range(5, 10):  # a type that waits less than it runs
        rec = recordgen.record(i, task="vcf.subset", start=recordgen.T0 + i, wall=5.0)
        rec["queue_wait_s"] = 0.2
        lines.append(recordgen.line(rec))
    lines.append(recordgen.line(recordgen.record(10, task="vcf.subset")))  # unstamped
    ledger = tmp_path / "l.jsonl"
    ledger.write_text("\n".join(lines) + "\n")
    proc = subprocess.run(
        [sys.executable, "-m", "taskmeter.cli", "recommend", "--ledger", str(ledger),
         "--min-tasks", "1", "--format", "json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    notes = "\n".join(json.loads(proc.stdout)["notes"])
    assert "vcf.query waits 3.10 s in the queue on average, longer than it runs" in notes
    assert "add workers (replicas) or concurrency, not memory" in notes
    assert "vcf.subset waits 200.0 ms in the queue on average (5 stamped tasks)" in notes
