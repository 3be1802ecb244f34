"""Misuse of the command line ends in a message naming what is wrong and the right exit
code, never a traceback; `taskmeter run` starts nothing it cannot report on."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import taskmeter
from taskmeter.export.ledger import Ledger

TASKMETER = [sys.executable, "-m", "taskmeter.cli"]


def tm(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([*TASKMETER, *args], capture_output=True, text=True, timeout=60, **kw)
    assert "Traceback" not in out.stdout + out.stderr, out.stderr
    return out


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real ledger of 25 measured runs of one task type."""
    path = tmp_path_factory.mktemp("ledger") / "tasks.jsonl"
    with taskmeter.measure("tm.misuse", "id") as m:
        taskmeter.run(["true"], check=True)
    with Ledger(path) as led:
        for i in range(25):
            led.write(dataclasses.replace(m.report, task_id=f"id-{i}"))
    return path


# -- recommend: option values ------------------------------------------------------------
@pytest.mark.parametrize(
    ("option", "value", "why"),
    [
        ("--cpu-limit", "inf", "'inf' is not a finite number"),
        ("--cpu-limit", "-inf", "not in the range x>0"),
        ("--cpu-limit", "nan", "'nan' is not a finite number"),
        ("--cpu-limit", "0", "not in the range x>0"),
        ("--cpu-limit", "two", "'two' is not a valid float"),
        ("--percentile", "nan", "'nan' is not a finite number"),
        ("--percentile", "1", "not in the range 0<x<1"),
        ("--margin", "nan", "'nan' is not a finite number"),
        ("--margin", "-0.1", "not in the range 0<=x<=10"),
        ("--margin", "inf", "not in the range 0<=x<=10"),
        ("--margin", "20%", "'20%' is not a valid float"),
        ("--request-margin", "nan", "'nan' is not a finite number"),
        ("--limit-margin", "-1", "not in the range 0<=x<=10"),
    ],
)
def test_recommend_bad_option_values_name_the_option(
    ledger: Path, option: str, value: str, why: str
) -> None:
    out = tm("recommend", "--ledger", str(ledger), option, value)
    assert out.returncode == 2, out.stderr
    assert f"Invalid value for '{option}'" in out.stderr
    assert why in out.stderr
    assert out.stdout == ""
    if option == "--margin":  # never blamed on the margins it sets
        assert "request-margin" not in out.stderr and "limit-margin" not in out.stderr


def test_recommend_output_into_a_missing_directory_is_refused_before_any_work(
    ledger: Path, tmp_path: Path
) -> None:
    target = tmp_path / "missing" / "patch.yaml"
    out = tm("recommend", "--ledger", str(ledger), "--format", "kustomize", "-o", str(target))
    assert out.returncode == 2
    assert "Invalid value for '-o' / '--output'" in out.stderr
    assert f"directory '{target.parent}' does not exist" in out.stderr
    assert "parent process memory" not in out.stderr  # nothing was read or sized
    assert not target.parent.exists()


def test_recommend_output_onto_a_directory_is_refused(ledger: Path, tmp_path: Path) -> None:
    out = tm("recommend", "--ledger", str(ledger), "-o", str(tmp_path))
    assert out.returncode == 2 and "is a directory" in out.stderr


def test_recommend_good_values_still_work_and_write_the_output(
    ledger: Path, tmp_path: Path
) -> None:
    target = tmp_path / "rec.json"
    out = tm(
        "recommend", "--ledger", str(ledger), "--format", "json", "--cpu-limit", "1.5",
        "--margin", "0.25", "--percentile", "0.9", "-o", str(target),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    rec = json.loads(target.read_text())
    assert isinstance(rec, dict) and rec


# -- run ---------------------------------------------------------------------------------
def test_run_a_directory_exits_126_like_a_shell(tmp_path: Path) -> None:
    folder = tmp_path / "a-directory"
    folder.mkdir()
    out = tm("run", "--", f"{folder}/")
    assert out.returncode == 126
    assert out.stderr == f"taskmeter run: {folder}/: Is a directory\n"
    shell = subprocess.run(["sh", "-c", f"'{folder}/'"], capture_output=True)
    assert shell.returncode == out.returncode


def test_run_a_file_that_is_not_executable_exits_126(tmp_path: Path) -> None:
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    out = tm("run", "--", str(script))
    assert out.returncode == 126
    assert out.stderr == f"taskmeter run: {script}: Permission denied\n"


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ("no-such-command-tm", "no-such-command-tm: command not found"),
        ("/nonexistent/tool", "/nonexistent/tool: No such file or directory"),
        ("", ": command not found"),
    ],
)
def test_run_a_command_not_found_exits_127_like_a_shell(command: str, message: str) -> None:
    out = tm("run", "--json", "--", command)
    assert out.returncode == 127
    assert out.stderr == f"taskmeter run: {message}\n"  # no report: nothing ran
    shell = subprocess.run(["sh", "-c", f"'{command}'"], capture_output=True)
    assert shell.returncode == 127


@pytest.mark.parametrize("where", ["missing-dir", "a-directory"])
def test_run_checks_the_output_before_running_the_command(tmp_path: Path, where: str) -> None:
    marker = tmp_path / "ran"
    (tmp_path / "a-directory").mkdir()
    target = tmp_path / "missing" / "r.json" if where == "missing-dir" else tmp_path / where
    out = tm("run", "--json", "-o", str(target), "--", "touch", str(marker))
    assert out.returncode == 2
    assert "Invalid value for '-o' / '--output'" in out.stderr
    assert not marker.exists(), "the command ran although its report could not be written"


def test_bad_sample_interval_is_a_clean_config_error(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    for bad in ("fast", "0", "nan", "-1", "1e9"):
        env = {**os.environ, "TASKMETER_SAMPLE_INTERVAL": bad}
        out = tm("run", "--", "touch", str(marker), env=env)
        assert out.returncode == 2, (bad, out.stderr)
        assert out.stderr == (
            f"Error: TASKMETER_SAMPLE_INTERVAL={bad!r}: expected seconds between 0.001 "
            "and 60 (default 0.1)\n"
        )
        assert not marker.exists()


def test_bad_sample_interval_in_library_use_is_the_config_error() -> None:
    code = (
        "import taskmeter\n"
        "from taskmeter.config import ConfigError\n"
        "try:\n"
        "    with taskmeter.measure('t'):\n"
        "        pass\n"
        "except ConfigError as exc:\n"
        "    print('ConfigError:', exc)\n"
    )
    env = {**os.environ, "TASKMETER_SAMPLE_INTERVAL": "fast"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ConfigError: TASKMETER_SAMPLE_INTERVAL='fast'")


@pytest.mark.parametrize("value", ["nan", "inf", "0", "61", "fast"])
def test_run_bad_interval_names_the_option_and_runs_nothing(tmp_path: Path, value: str) -> None:
    marker = tmp_path / "ran"
    out = tm("run", "--interval", value, "--", "touch", str(marker))
    assert out.returncode == 2
    assert "Invalid value for '--interval'" in out.stderr
    assert not marker.exists()
