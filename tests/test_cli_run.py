"""`taskmeter run`: the /usr/bin/time -v of taskmeter, as a user calls it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import burn_child

TASKMETER = [sys.executable, "-m", "taskmeter.cli"]


def tm(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TASKMETER, *args], capture_output=True, text=True, timeout=60, **kw)


def test_json_report_and_the_commands_exit_code():
    py, flag, code = burn_child(0.1)
    out = tm("run", "--json", "--", py, flag, code + "\nraise SystemExit(7)")
    assert out.returncode == 7
    report = json.loads(out.stderr.strip().splitlines()[-1])
    assert report["schema"] == "taskmeter.task/1"
    (tool,) = report["tools"]
    assert tool["exit_code"] == 7 and tool["cpu_s"] >= 0.1


def test_commands_output_is_untouched_and_summary_goes_to_stderr():
    out = tm("run", "--", "echo", "hello")
    assert out.returncode == 0
    assert out.stdout == "hello\n"
    assert "worker overhead" in out.stderr and "echo" in out.stderr


def test_killed_command_exits_128_plus_signal(tmp_path: Path):
    report_file = tmp_path / "r.json"
    out = tm("run", "--json", "-o", str(report_file), "--", "sh", "-c", "kill -9 $$")
    assert out.returncode == 128 + 9
    assert json.loads(report_file.read_text())["tools"][0]["signal"] == 9


def test_interval_option_is_recorded_and_bad_values_are_refused():
    out = tm("run", "--json", "--interval", "0.02", "--", "true")
    assert json.loads(out.stderr)["sampler"]["interval_s"] == 0.02
    bad = tm("run", "--interval", "0", "--", "true")
    assert bad.returncode == 2 and "--interval" in bad.stderr


def test_missing_command_is_a_clear_error():
    out = tm("run", "--", "/nonexistent/tool")
    assert out.returncode == 127  # as a shell (tests/test_cli_misuse.py has every case)
    assert out.stderr == "taskmeter run: /nonexistent/tool: No such file or directory\n"


def test_a_report_that_cannot_be_written_keeps_the_commands_exit_code():
    # /dev/full passes the checks made before the run, then every write fails (ENOSPC).
    out = tm("run", "--json", "-o", "/dev/full", "--", "sh", "-c", "exit 5")
    assert out.returncode == 5
    first, report = out.stderr.splitlines()[-2:]
    assert first.startswith("taskmeter run: cannot write '/dev/full': No space left on device")
    assert json.loads(report)["tools"][0]["exit_code"] == 5
    assert "Traceback" not in out.stderr


def test_bad_sample_interval_variable_names_the_variable():
    env = {**os.environ, "TASKMETER_SAMPLE_INTERVAL": "fast"}
    out = tm("run", "--", "true", env=env)
    assert out.returncode != 0
    assert "TASKMETER_SAMPLE_INTERVAL='fast'" in out.stderr
