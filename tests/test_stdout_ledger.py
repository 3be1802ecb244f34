"""TASKMETER_LEDGER=stdout: a real worker's standard output, mixed with its own log
lines, carries every task's record as one whole JSON line, the same records a file
ledger of the same run holds, and `taskmeter recommend --ledger -` reading that output
sizes exactly as from the file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from helpers import require
from workerkit import APPS, wait_for

TASKMETER = [sys.executable, "-m", "taskmeter.cli"]
PREFIX = '{"event":"taskmeter.task","schema":"taskmeter.task/1",'

# Imported by the worker (celery --include): in the same run, also hand every report
# to a file ledger, the reference the standard-output records are compared with.
DUAL = '''
import os
from celery.signals import worker_ready
from taskmeter.export.ledger import Ledger


def _also_to_a_file(**_):
    from taskmeter.celery import integration

    hub = integration._WORKER.hub
    hub.sinks.append(Ledger(os.environ["TM_FILE_LEDGER"]).write)


worker_ready.connect(_also_to_a_file, weak=False)
'''


def _no_constants(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def records_in(text: str) -> list[dict[str, Any]]:
    """Every record line of a worker's output, parsed strictly; a line that mentions the
    schema but is not a whole record (glued to a log line, cut) fails the test."""
    out = []
    for line in text.splitlines():
        if "taskmeter.task/1" not in line:
            continue
        assert line.startswith(PREFIX), f"a record not on a line of its own: {line[:200]!r}"
        record = json.loads(line, parse_constant=_no_constants)
        assert list(record)[:2] == ["event", "schema"]
        out.append(record)
    return out


def test_records_on_stdout_match_the_file_ledger_and_size_the_same(
    start_worker: Any, tmp_path: Path
) -> None:
    require("bcftools")
    (tmp_path / "tm_dual.py").write_text(DUAL)
    file_ledger = tmp_path / "file-ledger.jsonl"
    w = start_worker(
        "redis",
        "prefork",
        2,
        ("--include", "tm_dual"),
        TASKMETER_LEDGER="stdout",
        TM_FILE_LEDGER=str(file_ledger),
        PYTHONPATH=os.pathsep.join([str(APPS), str(tmp_path), os.environ.get("PYTHONPATH", "")]),
    )
    sent = []
    for i in range(20):
        sent.append(w.send("hog", 8 + i % 4, 0.02).id)
        sent.append(w.send("cpu.burn", 0.02).id)
    sent += [w.send("vcf.view_fail", str(tmp_path / "none.vcf.gz")).id for _ in range(2)]
    sent += [w.send("retrier").id for _ in range(2)]  # a retry record, then a success
    expected = len(sent) + 2

    def file_records() -> list[dict[str, Any]]:
        if not file_ledger.exists():
            return []
        return [json.loads(line) for line in file_ledger.read_text().splitlines()]

    wait_for(lambda: len(file_records()) >= expected, 90, f"{expected} records in the file")
    # The stdout sink comes first: once the file has them, the output has them too.
    assert w.stop() == 0
    log = w.log_text()

    on_stdout = records_in(log)
    in_file = file_records()
    assert len(in_file) == expected and len(on_stdout) == expected
    assert {r["task_id"] for r in on_stdout} == set(sent)
    # Mixed with Celery's own log lines, none of which was cut by a record.
    other = [line for line in log.splitlines() if not line.startswith(PREFIX)]
    assert any("ready." in line for line in other)
    assert sum("succeeded in" in line for line in other) >= 40
    # Exactly the file ledger's records, key for key, in the same order.
    assert [{k: v for k, v in r.items() if k != "event"} for r in on_stdout] == in_file
    states = sorted(r["state"] for r in on_stdout)
    assert states.count("failure") == 2 and states.count("retry") == 2
    assert any(r["tools"] for r in on_stdout)

    # The captured output piped into recommend --ledger -: the same sizing as the file.
    (tmp_path / "worker.out").write_text(log)
    args = ["recommend", "--format", "json", "--min-tasks", "2", "--concurrency", "2"]
    from_file = subprocess.run(
        [*TASKMETER, *args, "--ledger", str(file_ledger)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert from_file.returncode == 0, from_file.stderr
    with open(tmp_path / "worker.out", "rb") as stdin:
        from_stream = subprocess.run(
            [*TASKMETER, *args, "--ledger", "-"],
            stdin=stdin, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert from_stream.returncode == 0, from_stream.stderr
    assert "Traceback" not in from_stream.stderr
    sizing = json.loads(from_stream.stdout)
    assert sizing == json.loads(from_file.stdout)
    assert sizing  # something was sized
