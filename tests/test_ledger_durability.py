"""The ledger on a real full filesystem: records whole or not at all, errors counted.

A small tmpfs (root here: ``mount -t tmpfs -o size=64k``) is filled by the ledger
itself; the write that does not fit is cut back, counted and logged once; the file
keeps only whole records, and the records written after space returns are intact.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import taskmeter
from taskmeter.export import metrics
from taskmeter.export.ledger import Ledger
from taskmeter.measure.report import TaskReport

from helpers import unavailable
from workerkit import wait_for

PAGE = os.sysconf("SC_PAGE_SIZE")


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 64 KiB tmpfs, unmounted at the end."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        unavailable("mounting a small tmpfs needs root and mount(8)")
    out = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        unavailable(f"cannot mount a tmpfs: {out.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture(scope="module")
def report() -> TaskReport:
    with taskmeter.measure("tm.durable", "id") as m:
        taskmeter.run(["true"], check=True)
    return m.report


def numbered(report: TaskReport, i: int) -> TaskReport:
    return dataclasses.replace(report, task_id=f"task-{i:05d}")


def _no_constants(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def strict_records(path: Path) -> list[dict[str, Any]]:
    """Every line parsed strictly (no NaN/Infinity, an object, a valid TaskReport);
    the file ends with a newline: no partial line anywhere."""
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n"), f"torn tail: {data[-80:]!r}"
    out = []
    for number, line in enumerate(data.split(b"\n")[:-1], start=1):
        record = json.loads(line.decode("utf-8"), parse_constant=_no_constants)
        assert isinstance(record, dict), f"line {number}: {line[:80]!r}"
        TaskReport.from_dict(record)
        out.append(record)
    return out


def errors_counted() -> float:
    counter = getattr(metrics, "LEDGER_ERRORS", None)
    return float(counter.value) if counter is not None else 0.0


def test_full_disk_drops_whole_records_counts_them_and_resumes(
    small_fs: Path, report: TaskReport, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="taskmeter.ledger")
    # Hold half of the filesystem so space can come back later.
    filler = small_fs / "filler"
    filler.write_bytes(b"\0" * (8 * PAGE))
    path = small_fs / "ledger.jsonl"
    line_len = len(numbered(report, 0).to_json()) + 1
    errors0 = errors_counted()

    written: list[str] = []
    failed: list[str] = []
    sizes: list[int] = []
    with Ledger(path) as ledger:
        i = 0
        while len(failed) < 5:
            r = numbered(report, i)
            before = ledger.health.errors
            ledger.write(r)
            assert r.task_id is not None
            if ledger.health.errors > before:
                failed.append(r.task_id)
                sizes.append(path.stat().st_size)
            else:
                written.append(r.task_id)
            i += 1
            assert i < 10_000, "the filesystem never filled up"

        # Full: only whole records, and the first failed write really was a short one
        # (the last page had room for part of the line, which was cut back).
        records = strict_records(path)
        assert [r["task_id"] for r in records] == written
        size = path.stat().st_size
        assert sizes == [size] * len(failed)
        assert size % PAGE != 0 and PAGE - size % PAGE < line_len, (size, line_len)
        assert ledger.health.errors == len(failed)
        if hasattr(metrics, "LEDGER_ERRORS"):
            assert errors_counted() - errors0 == len(failed)

        # Logged once, with the path and the error, not once per record.
        errors = [m for m in caplog.messages if "cannot write the ledger" in m]
        assert len(errors) == 1, caplog.messages
        assert str(path) in errors[0] and "No space left on device" in errors[0]

        # Space returns: writing resumes, the next records are whole.
        filler.unlink()
        after = [numbered(report, 50_000 + k) for k in range(5)]
        for r in after:
            ledger.write(r)
        assert ledger.health.errors == len(failed)

    records = strict_records(path)
    assert [r["task_id"] for r in records] == written + [r.task_id for r in after]
    assert records[-1] == json.loads(after[-1].to_json())
    resumed = [m for m in caplog.messages if "writing the ledger" in m and "again" in m]
    assert len(resumed) == 1 and f"{len(failed)} record(s) dropped so far" in resumed[0]


def test_a_removed_directory_is_counted_and_writing_resumes_when_it_is_back(
    tmp_path: Path, report: TaskReport, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "ledgers"
    folder.mkdir()
    path = folder / "ledger.jsonl"
    with Ledger(path) as ledger:
        ledger.write(numbered(report, 0))
        shutil.rmtree(folder)
        for i in range(1, 4):
            ledger.write(numbered(report, i))  # never raises into the worker
        assert ledger.health.errors == 3
        assert sum("cannot write the ledger" in m for m in caplog.messages) == 1
        folder.mkdir()
        ledger.write(numbered(report, 4))
    assert [r["task_id"] for r in strict_records(path)] == ["task-00004"]


def test_a_flapping_failure_logs_once_not_once_per_record(
    tmp_path: Path, report: TaskReport, caplog: pytest.LogCaptureFixture
) -> None:
    # A nearly full disk takes some records and not others: alternate failing and
    # succeeding writes (the folder removed and made again) log one error, not twenty.
    folder = tmp_path / "ledgers"
    folder.mkdir()
    path = folder / "ledger.jsonl"
    with Ledger(path) as ledger:
        for i in range(20):
            shutil.rmtree(folder)
            ledger.write(numbered(report, 2 * i))  # fails
            folder.mkdir()
            ledger.write(numbered(report, 2 * i + 1))  # succeeds
        assert ledger.health.errors == 20
    assert sum("cannot write the ledger" in m for m in caplog.messages) == 1
    assert sum("writing the ledger" in m for m in caplog.messages) == 1
    assert [r["task_id"] for r in strict_records(path)] == ["task-00039"]


def test_a_torn_tail_left_by_someone_else_never_swallows_the_next_record(
    tmp_path: Path, report: TaskReport
) -> None:
    path = tmp_path / "ledger.jsonl"
    with Ledger(path) as ledger:
        ledger.write(numbered(report, 0))
        with open(path, "ab") as f:
            f.write(b'{"schema":"taskmeter.task/1","task":"half a rec')  # no newline
        ledger.write(numbered(report, 1))
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b""
    assert json.loads(lines[0])["task_id"] == "task-00000"
    assert lines[1].endswith(b"half a rec")
    assert json.loads(lines[2])["task_id"] == "task-00001"


def _sample(metrics_text: str, name: str, **labels: str) -> float:
    """The value of the series ``name`` with these labels (in any order), 0 if absent."""
    for found in re.finditer(rf"^{re.escape(name)}(?:{{(.*)}})? (\S+)$", metrics_text, re.M):
        have = dict(re.findall(r'(\w+)="([^"]*)"', found.group(1) or ""))
        if have == labels:
            return float(found.group(2))
    return 0.0


def test_a_real_worker_on_a_full_disk_counts_in_metrics_and_resumes(
    small_fs: Path, start_worker: Any, tmp_path: Path
) -> None:
    filler = small_fs / "filler"
    filler.write_bytes(b"\0" * (12 * PAGE))  # 4 pages left: about 20 records
    ledger = small_fs / "ledger.jsonl"
    w = start_worker(
        "redis", "prefork", 1,
        TASKMETER_LEDGER=str(ledger),
        TASKMETER_JOURNAL=str(tmp_path / "journal"),  # only the ledger on the small disk
    )  # fmt: skip
    sent = [w.send("noop").id for _ in range(40)]

    def runs() -> float:
        return _sample(w.metrics(), "celery_task_runs_total", state="success", task="noop")

    def errors() -> float:
        return _sample(w.metrics(), "taskmeter_ledger_errors_total")

    wait_for(lambda: runs() >= 40, 90, "40 noop runs counted")
    # The metrics see a report before the ledger's batched write (up to 20 ms later):
    # wait until every record was either written or counted as failed.
    wait_for(lambda: len(strict_records(ledger)) + errors() >= 40, 30,
             "every record written or counted")  # fmt: skip
    kept = strict_records(ledger)
    errors_seen = errors()
    assert 0 < len(kept) < 40, "the disk did not fill up"
    assert errors_seen == 40 - len(kept)
    # In order, every record whole; a shorter record may still fit after a longer one
    # did not, so the kept ones are a subsequence of the sent ones, not always a prefix.
    kept_ids = [r["task_id"] for r in kept]
    it = iter(sent)
    assert all(tid in it for tid in kept_ids), (kept_ids, sent)
    log = w.log_text()
    assert log.count("cannot write the ledger") == 1 and str(ledger) in log

    filler.unlink()
    more = [w.send("noop").id for _ in range(5)]
    wait_for(lambda: len(strict_records(ledger)) >= len(kept) + 5, 60, "records after space")
    after = strict_records(ledger)
    assert [r["task_id"] for r in after] == kept_ids + more
    assert errors() == errors_seen
    assert w.stop() == 0
