"""The ledger: one JSON line per report, shared by processes, rotated by size."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import taskmeter
from taskmeter.config import ConfigError, load_settings
from taskmeter.export import metrics
from taskmeter.export.ledger import (
    Ledger,
    LedgerProblem,
    StreamLedger,
    ledger_paths,
    open_ledger,
    read_ledgers,
)
from taskmeter.measure.report import TaskReport

from helpers import child


@pytest.fixture(scope="module")
def report() -> TaskReport:
    """A real measured report with a tool run and a phase."""
    with taskmeter.measure("tm.ledger", "id-0") as m:
        with m.phase("prepare"):
            sum(range(50_000))
        taskmeter.run(child("b = b'x' * (8 << 20)"), check=True)
        taskmeter.run(["sh", "-c", "exit 3"])
    return m.report


def numbered(report: TaskReport, i: int, prefix: str = "") -> TaskReport:
    """The same report under a fixed-width task id, so every line has the same size."""
    return dataclasses.replace(report, task_id=f"{prefix}{i:05d}")


def lines_of(path: Path) -> list[str]:
    text = path.read_text()
    assert text.endswith("\n")
    return text.splitlines()


def test_one_line_per_report_and_round_trip(tmp_path: Path, report: TaskReport) -> None:
    path = tmp_path / "tasks.jsonl"
    written = [numbered(report, i) for i in range(5)]
    failed = dataclasses.replace(report, state="failure", task_id=None)
    with Ledger(path) as ledger:
        for r in written:
            ledger.write(r)
        ledger.write(failed)
    lines = lines_of(path)
    assert len(lines) == 6
    assert lines[0] == written[0].to_json()
    assert json.loads(lines[0])["schema"] == "taskmeter.task/1"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    got, problems = read_ledgers([path])
    assert problems == []
    assert got == [*written, failed]
    assert got[0].tools == report.tools and got[0].phases == report.phases


def test_four_processes_rotating_lose_and_mangle_nothing(
    tmp_path: Path, report: TaskReport
) -> None:
    path = tmp_path / "tasks.jsonl"
    report_file = tmp_path / "report.json"
    report_file.write_text(report.to_json())
    go = tmp_path / "go"
    writers, per_writer = 4, 200
    line_len = len(numbered(report, 0, "w0-").to_json()) + 1
    max_bytes = 24 * line_len + line_len // 2  # 24 lines per file: 33+ rotations
    script = """
import dataclasses, os, sys, time
from taskmeter.export.ledger import Ledger
from taskmeter.measure.report import TaskReport
path, k, n, max_bytes, report_file, go = sys.argv[1:]
report = TaskReport.from_json(open(report_file).read())
ledger = Ledger(path, max_bytes=int(max_bytes), backups=1000)
open(f"{go}.ready{k}", "w").close()
while not os.path.exists(go):
    time.sleep(0.001)
for i in range(int(n)):
    ledger.write(dataclasses.replace(report, task_id=f"w{k}-{i:05d}"))
ledger.close()
"""
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                script,
                str(path),
                str(k),
                str(per_writer),
                str(max_bytes),
                str(report_file),
                str(go),
            ]
        )
        for k in range(writers)
    ]
    deadline = time.monotonic() + 30
    while not all(Path(f"{go}.ready{k}").exists() for k in range(writers)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.005)
    go.touch()
    assert [p.wait(timeout=60) for p in procs] == [0] * writers

    files = ledger_paths(path)
    assert files[-1] == path and files[0] == Path(f"{path}.{len(files) - 1}")
    assert len(files) >= 30  # many rotations happened, none dropped
    seen: dict[str, list[int]] = {f"w{k}": [] for k in range(writers)}
    total = 0
    for f in files:
        assert f.stat().st_size <= max_bytes
        for line in lines_of(f):
            record = json.loads(line)  # every line whole and valid
            assert record["schema"] == "taskmeter.task/1"
            writer, seq = record["task_id"].split("-")
            seen[writer].append(int(seq))
            total += 1
    assert total == writers * per_writer
    # Oldest file first: every writer's lines come back complete and in order.
    assert all(seqs == list(range(per_writer)) for seqs in seen.values())

    got, problems = read_ledgers(files)
    assert problems == [] and len(got) == writers * per_writer


def dropped_counted() -> float:
    from taskmeter.export import metrics

    counter = getattr(metrics, "LEDGER_DROPPED", None)
    return float(counter.value) if counter is not None else 0.0


def test_rotation_drops_the_oldest_beyond_backups(
    tmp_path: Path, report: TaskReport, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="taskmeter.ledger")
    path = tmp_path / "tasks.jsonl"
    line_len = len(numbered(report, 0).to_json()) + 1
    dropped0 = dropped_counted()
    with Ledger(path, max_bytes=3 * line_len, backups=2) as ledger:
        for i in range(20):
            ledger.write(numbered(report, i))
    # 20 records, 3 per file, 3 files kept: 0..11 dropped, with the oldest file each time.
    if hasattr(metrics, "LEDGER_DROPPED"):
        assert dropped_counted() - dropped0 == 12
    drops = [m for m in caplog.messages if "rotation dropped" in m]
    assert len(drops) == 4
    assert all(f"{path}.2 (3 records)" in m and "TASKMETER_LEDGER_BACKUPS" in m for m in drops)
    assert ledger_paths(path) == [Path(f"{path}.2"), Path(f"{path}.1"), path]
    assert not Path(f"{path}.3").exists()

    def ids(p: Path) -> list[int]:
        return [int(json.loads(line)["task_id"]) for line in lines_of(p)]

    assert ids(Path(f"{path}.2")) == [12, 13, 14]
    assert ids(Path(f"{path}.1")) == [15, 16, 17]
    assert ids(path) == [18, 19]


def test_without_backups_the_full_file_is_dropped(tmp_path: Path, report: TaskReport) -> None:
    path = tmp_path / "tasks.jsonl"
    line_len = len(numbered(report, 0).to_json()) + 1
    dropped0 = dropped_counted()
    with Ledger(path, max_bytes=2 * line_len, backups=0) as ledger:
        for i in range(5):
            ledger.write(numbered(report, i))
    assert ledger_paths(path) == [path]
    if hasattr(metrics, "LEDGER_DROPPED"):
        assert dropped_counted() - dropped0 == 4
    assert [json.loads(line)["task_id"] for line in lines_of(path)] == ["00004"]


def test_a_writer_follows_a_rotation_done_by_another(tmp_path: Path, report: TaskReport) -> None:
    path = tmp_path / "tasks.jsonl"
    line_len = len(numbered(report, 0, "a").to_json()) + 1
    a = Ledger(path, max_bytes=3 * line_len, backups=5)
    b = Ledger(path, max_bytes=3 * line_len, backups=5)
    for i in range(3):
        a.write(numbered(report, i, "a"))
    b.write(numbered(report, 0, "b"))  # b finds the file full and rotates it
    a.write(numbered(report, 3, "a"))  # a's descriptor now is path.1: it must reopen
    a.close()
    b.close()
    ids = [json.loads(line)["task_id"] for line in lines_of(Path(f"{path}.1"))]
    assert ids == ["a00000", "a00001", "a00002"]
    assert [json.loads(line)["task_id"] for line in lines_of(path)] == ["b00000", "a00003"]


def test_a_ledger_opened_before_fork_works_in_both(tmp_path: Path, report: TaskReport) -> None:
    path = tmp_path / "tasks.jsonl"
    line_len = len(numbered(report, 0, "c").to_json()) + 1
    ledger = Ledger(path, max_bytes=10 * line_len, backups=100)
    pid = os.fork()
    if pid == 0:  # child: write and leave without running pytest's teardown
        code = 0
        try:
            for i in range(100):
                ledger.write(numbered(report, i, "c"))
        except BaseException:
            code = 1
        os._exit(code)
    for i in range(100):
        ledger.write(numbered(report, i, "p"))
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    ledger.close()
    got, problems = read_ledgers(ledger_paths(path))
    assert problems == []
    ids = [r.task_id or "" for r in got]
    assert len(ids) == 200
    for who in "cp":
        assert [i for i in ids if i.startswith(who)] == [f"{who}{i:05d}" for i in range(100)]


def test_malformed_lines_are_reported_and_the_rest_is_used(
    tmp_path: Path, report: TaskReport
) -> None:
    path = tmp_path / "tasks.jsonl"
    with Ledger(path) as ledger:
        ledger.write(numbered(report, 1))
        ledger.write(numbered(report, 2))
    bad_state = json.loads(numbered(report, 99).to_json())
    bad_state["state"] = "exploded"
    with path.open("ab") as f:
        f.write(b"\n")  # line 3: blank, skipped silently
        f.write(b"{not json\n")  # 4
        f.write(b"[1, 2]\n")  # 5
        f.write(b'{"schema": "other/1"}\n')  # 6
        f.write(json.dumps(bad_state).encode() + b"\n")  # 7
        f.write(b"\xff\xfe\n")  # 8
        f.write(b"   \n")  # 9: blank
        f.write(numbered(report, 3).to_json().encode() + b"\n")  # 10
        f.write(numbered(report, 4).to_json().encode()[:100])  # 11: cut short, no newline
    missing = tmp_path / "nope.jsonl"

    got, problems = read_ledgers([path, missing])
    assert [r.task_id for r in got] == ["00001", "00002", "00003"]
    assert [(p.path, p.line) for p in problems] == [
        (path, 4),
        (path, 5),
        (path, 6),
        (path, 7),
        (path, 8),
        (path, 11),
        (missing, 0),
    ]
    messages = {p.line: p.message for p in problems}
    assert "not JSON" in messages[4]
    assert "list" in messages[5]
    assert "taskmeter.task/1" in messages[6]
    assert "exploded" in messages[7]
    assert "UTF-8" in messages[8]
    assert str(problems[0]).startswith(f"{path}:4: ")
    assert isinstance(problems[-1], LedgerProblem) and "no such file" in problems[-1].message


def test_a_missing_directory_is_an_error_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "no-such-dir" / "tasks.jsonl"
    with pytest.raises(OSError, match="no-such-dir") as err:
        Ledger(path)
    assert str(path) in str(err.value)
    assert not path.parent.exists()


def test_writing_to_a_closed_ledger_is_an_error(tmp_path: Path, report: TaskReport) -> None:
    ledger = Ledger(tmp_path / "tasks.jsonl")
    ledger.close()
    ledger.close()
    with pytest.raises(ValueError, match="closed"):
        ledger.write(report)


def test_backups_setting_reaches_the_ledger_and_bad_values_name_the_variable(
    tmp_path: Path,
) -> None:
    env = {"TASKMETER_LEDGER": str(tmp_path / "t.jsonl"), "TASKMETER_LEDGER_BACKUPS": "2"}
    s = load_settings(environ=env)
    assert s.ledger_backups == 2
    assert load_settings(environ={}).ledger_backups == 5
    assert load_settings(environ={"TASKMETER_LEDGER_BACKUPS": "0"}).ledger_backups == 0
    ledger = open_ledger(s.ledger or "", max_bytes=s.ledger_max_bytes, backups=s.ledger_backups)
    assert isinstance(ledger, Ledger) and ledger.backups == 2
    ledger.close()
    for bad in ("-1", "two", "1.5", "1001"):
        with pytest.raises(ConfigError, match=f"TASKMETER_LEDGER_BACKUPS='{bad}'"):
            load_settings(environ={"TASKMETER_LEDGER_BACKUPS": bad})


def test_bad_sample_interval_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="TASKMETER_SAMPLE_INTERVAL='fast'"):
        load_settings(environ={"TASKMETER_SAMPLE_INTERVAL": "fast"})


@pytest.mark.parametrize("spec", ["stdout", "-", " stdout "])
def test_stdout_or_dash_is_a_stream_ledger(spec: str) -> None:
    ledger = open_ledger(spec)
    assert isinstance(ledger, StreamLedger) and ledger.fd == 1


def test_stream_ledger_writes_one_event_line_per_record(report: TaskReport) -> None:
    r, w = os.pipe()
    try:
        with StreamLedger(w, "pipe") as ledger:
            for i in range(3):
                ledger.write(numbered(report, i))
        os.close(w)
        w = -1
        with os.fdopen(r, "rb") as f:
            data = f.read()
        r = -1
    finally:
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)
    lines = data.decode().splitlines()
    assert data.endswith(b"\n") and len(lines) == 3
    for i, line in enumerate(lines):
        assert line.startswith('{"event":"taskmeter.task","schema":"taskmeter.task/1",')
        record = json.loads(line)
        assert list(record)[:2] == ["event", "schema"]
        del record["event"]
        assert record == json.loads(numbered(report, i).to_json())


def test_stream_ledger_on_a_closed_pipe_counts_and_never_raises(report: TaskReport) -> None:
    import signal

    old = signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # Python's default, made explicit
    r, w = os.pipe()
    os.close(r)
    try:
        ledger = StreamLedger(w, "pipe")
        ledger.write(report)
        ledger.write(report)
        assert ledger.health.errors == 2
    finally:
        os.close(w)
        signal.signal(signal.SIGPIPE, old)
