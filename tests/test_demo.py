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
    (line,) = (tmp_path / "reports.jsonl").read_text().splitlines()
    report = TaskReport.from_json(line)
    assert report.state == "success"
    assert [t.exe for t in report.tools] == ["bcftools"] * 4
    assert all(t.exit_code == 0 for t in report.tools)
    assert [p.name for p in report.phases] == ["download", "check"]
    assert report.tool_totals.cpu_s > 0
    assert report.footprint_peak_bytes >= report.overhead.rss_peak_bytes
    assert (tmp_path / "task").is_dir() and any((tmp_path / "task").rglob("genotypes.tsv"))


def test_demo_without_bcftools_says_how_to_install_it(tmp_path: Path):
    env = {"PATH": str(tmp_path), "HOME": str(tmp_path)}  # an empty PATH: no bcftools
    out = subprocess.run(
        [sys.executable, "-m", "taskmeter.cli", "demo", "--quick"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 1
    assert "bcftools" in out.stderr and "make setup" in out.stderr
