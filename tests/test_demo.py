"""`taskmeter demo`: the README's main-job command, as a user runs it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from taskmeter.measure.report import TaskReport

from helpers import require


def test_quick_demo_keeps_every_output_it_prints_and_fits_100_columns(tmp_path: Path):
    """Run as a new user would: no --workdir, in a fresh directory, on a 100-column
    terminal. The outputs stay in ./taskmeter-demo/, every path the demo prints exists
    after it exits, its temporary inputs are gone, and its tables fit the width."""
    require("bcftools")
    tmp = tmp_path / "tmp"  # the demo's temporary inputs go here (TMPDIR)
    tmp.mkdir()
    env = {**os.environ, "COLUMNS": "100", "TMPDIR": str(tmp)}
    out = subprocess.run(
        [sys.executable, "-m", "taskmeter.cli", "demo", "--quick"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "bcftools alone" in out.stdout
    outdir = tmp_path / "taskmeter-demo"
    printed = {Path(p) for p in re.findall(r"(/\S+)", out.stdout) if str(outdir) in p}
    printed = {Path(str(p).rstrip("):;,.")) for p in printed}
    names = {p.name for p in printed}
    assert {"reports.jsonl", "metrics.txt", "resources.yaml", "report.html"} <= names, printed
    missing = [p for p in printed if not p.exists()]
    assert not missing, f"printed but gone after exit: {missing}"
    assert list(tmp.iterdir()) == [], "temporary inputs left behind"
    assert not (outdir / "inputs").exists()
    tables = [line for line in out.stdout.splitlines() if set(line) & set("┃│┏└━")]
    assert tables, out.stdout
    assert max(len(line) for line in tables) <= 100, max(tables, key=len)

    lines = (outdir / "reports.jsonl").read_text().splitlines()
    reports = [TaskReport.from_json(line) for line in lines]
    assert len(reports) == 4 and {r.state for r in reports} == {"success"}
    assert all([p.name for p in r.phases] == ["download", "upload"] for r in reports)
    assert all(t.exe == "bcftools" and t.exit_code == 0 for r in reports for t in r.tools)
    assert all(r.tool_totals.cpu_s > 0 for r in reports)
    assert all(r.footprint_peak_bytes >= r.overhead.rss_peak_bytes for r in reports)

    # A second run reuses and overwrites the folder: this run's tasks only.
    again = subprocess.run(
        [sys.executable, "-m", "taskmeter.cli", "demo", "--quick", "--tasks", "2"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert len((outdir / "reports.jsonl").read_text().splitlines()) == 2
