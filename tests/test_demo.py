"""`taskmeter demo`: the README's main-job command, as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from taskmeter.measure.report import TaskReport

from helpers import require


def test_quick_demo_measures_real_bcftools_tasks(tmp_path: Path):
    require("bcftools")
    out = subprocess.run(
        [sys.executable, "-m", "taskmeter.cli", "demo", "--quick", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "bcftools alone" in out.stdout
    lines = (tmp_path / "reports.jsonl").read_text().splitlines()
    reports = [TaskReport.from_json(line) for line in lines]
    assert len(reports) == 4 and {r.state for r in reports} == {"success"}
    assert all([p.name for p in r.phases] == ["download", "upload"] for r in reports)
    assert all(t.exe == "bcftools" and t.exit_code == 0 for r in reports for t in r.tools)
    assert all(r.tool_totals.cpu_s > 0 for r in reports)
    assert all(r.footprint_peak_bytes >= r.overhead.rss_peak_bytes for r in reports)
    assert (tmp_path / "resources.yaml").exists()
