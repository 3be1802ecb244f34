"""Readers that skip, never crash: ledgers poisoned with every bad value (Infinity, NaN,
negative, 1e400, a string or a boolean where a number belongs, bad dates, an unknown
state or cause, a truncated line, Celery log lines, other JSON) mixed with valid
records. `recommend` and `report` exit 0, warn once per bad record naming file:line,
stay silent about lines that are not records (a summary counts them), and give exactly
what the valid records alone give; `--format json` is strict JSON. A `kubectl logs`-like
stream on standard input gives the same as the file."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import taskmeter
from recordgen import fleet
from taskmeter.export.ledger import Ledger
from taskmeter.export.records import RecordReader

CLI = [sys.executable, "-c", "from taskmeter.cli import main; main()"]
CELERY_LINES = [
    "[2026-05-28 20:26:40,029: INFO/MainProcess] Connected to redis://127.0.0.1:6379/0",
    "[2026-05-28 20:26:41,290: INFO/MainProcess] Task vcf.subset[3f1c] received",
    "[2026-05-28 20:26:42,001: INFO/ForkPoolWorker-1] Task vcf.subset[3f1c] succeeded in "
    "1.2s: {'rows': 40}",
    " -------------- celery@worker-a v5.4.0 (opalescent)",
    "[2026-05-28 20:26:43,500: WARNING/MainProcess] {'schema': 'not ours'}",
    '{"level": "info", "msg": "structured log of another library", "ts": 1780000000}',
    "[1, 2, 3]",
    "Traceback (most recent call last):",
    '  File "/app/tasks.py", line 12, in run',
    "",
    '{"deep": ' + "[" * 100_000,  # deeper than the parser's recursion limit
]


def run(*args: str | Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *map(str, args)], input=stdin, capture_output=True, text=True, timeout=120
    )


def strict(text: str) -> Any:
    def refuse(name: str) -> Any:
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Valid records only: a few real measured tasks written by the real Ledger, then
    synthetic ones of six task types (40 each)."""
    path = tmp_path_factory.mktemp("poison") / "clean.jsonl"
    with Ledger(path) as ledger:
        for i in range(3):
            with taskmeter.measure("real.sh", task_id=f"real-{i}", on_report=ledger.write):
                taskmeter.run(["sh", "-c", "seq 1 3000 | sort -r > /dev/null"], check=True)
    with open(path, "a") as f:
        for d in fleet(240, seed=21):
            f.write(json.dumps(d, separators=(",", ":")) + "\n")
    return path


# A phase whose name cannot be printed as UTF-8 (an unpaired surrogate).
BAD_PHASE = {"name": "\ud800", "wall_s": 0.1, "cpu_s": 0.1, "rss_avg_bytes": 1, "rss_peak_bytes": 1}


def poisons(valid: dict[str, Any]) -> list[tuple[str, str | None]]:
    """(line, expected reason) pairs; reason None: not a record, skipped silently."""

    def bad(change: Any, reason: str, *, raw: tuple[str, str] | None = None) -> tuple[str, str]:
        d = json.loads(json.dumps(valid))
        d["task_id"] = "poisoned"
        change(d)
        text = json.dumps(d, separators=(",", ":"))  # writes NaN/Infinity as JS does
        if raw is not None:
            assert raw[0] in text
            text = text.replace(raw[0], raw[1], 1)
        return text, reason

    def setter(path: str, value: Any) -> Any:
        *parents, key = path.split(".")

        def change(d: dict[str, Any]) -> None:
            for p in parents:
                d = d[int(p)] if isinstance(d, list) else d[p]
            d[key] = value  # type: ignore[index]

        return change

    whole = json.dumps(valid, separators=(",", ":"))
    return [
        bad(setter("overhead.rss_peak_bytes", float("inf")), "overhead.rss_peak_bytes is Infinity"),
        bad(setter("wall_s", float("-inf")), "wall_s is -Infinity"),
        bad(setter("footprint_peak_bytes", float("nan")), "footprint_peak_bytes is NaN"),
        bad(setter("cpu_s", -1.5), "cpu_s is negative"),
        bad(
            setter("wall_s", 123.0),
            "wall_s is out of range",
            raw=('"wall_s":123.0', '"wall_s":1e400'),
        ),
        bad(setter("overhead.rss_avg_bytes", 10**30), "overhead.rss_avg_bytes is out of range"),
        bad(setter("wall_s", "1.5"), 'wall_s is "1.5", not a number'),
        bad(setter("overhead.rss_avg_bytes", True), "overhead.rss_avg_bytes is true, not a number"),
        bad(setter("overhead.rss_peak_bytes", 1.5), "not a whole number"),
        bad(setter("started_at", "yesterday"), 'started_at "yesterday" is not an ISO 8601'),
        bad(setter("ended_at", "2026-13-45T00:00:00+00:00"), "ended_at"),
        bad(setter("started_at", "2026-05-28T20:26:40"), "has no time zone"),
        bad(setter("state", "exploded"), 'state "exploded" is unknown'),
        bad(setter("cause", "gremlins"), 'cause "gremlins" is unknown'),
        bad(setter("tools", ["oops"]), 'tools[0] is "oops", not an object'),
        bad(lambda d: d.pop("overhead"), "overhead is missing"),
        bad(setter("schema", "taskmeter.task/2"), "schema 'taskmeter.task/2' is not"),
        bad(setter("queue_wait_s", "soon"), "queue_wait_s"),
        bad(setter("task", "\ud800"), "task holds an unpaired UTF-16 surrogate"),
        bad(setter("tools.0.exe", "\ud800"), "exe holds an unpaired UTF-16 surrogate"),
        bad(setter("tools.0.argv", ["bcftools", "\udc80"]), "argv holds an unpaired"),
        bad(setter("phases", [BAD_PHASE]), "name holds an unpaired UTF-16 surrogate"),
        bad(setter("worker.pool", "\ud800"), "pool holds an unpaired UTF-16 surrogate"),
        (whole[: len(whole) * 3 // 5], "not JSON"),  # truncated: a crash mid-write
        ("2026-05-28T20:26:40.029632Z " + whole, "text before the JSON object"),
        *((line, None) for line in CELERY_LINES),
    ]


def poisoned_copy(clean: Path, out: Path) -> dict[int, str]:
    """``clean`` with poison lines between its records; {line number: reason}."""
    valid = json.loads(clean.read_text().splitlines()[-1])
    bad_lines = poisons(valid)
    expected: dict[int, str] = {}
    lines: list[str] = []
    records = clean.read_text().splitlines()
    for i, record in enumerate(records):
        if i % 5 == 0 and bad_lines:
            line, reason = bad_lines.pop(0)
            lines.append(line)
            if reason is not None:
                expected[len(lines)] = reason
        lines.append(record)
    for line, reason in bad_lines:
        lines.append(line)
        if reason is not None:
            expected[len(lines)] = reason
    out.write_text("\n".join(lines) + "\n")
    return expected


def warnings_of(stderr: str) -> dict[int, str]:
    return {
        int(m.group(2)): m.group(3)
        for m in re.finditer(r"^warning: (.+?):(\d+): (.*)$", stderr, re.MULTILINE)
    }


def test_recommend_and_report_skip_bad_records_and_give_the_clean_result(clean, tmp_path):
    poisoned = tmp_path / "poisoned.jsonl"
    expected = poisoned_copy(clean, poisoned)
    n_valid = len(clean.read_text().splitlines())
    n_silent = len(CELERY_LINES)

    base = ["recommend", "--format", "json", "--min-tasks", "1"]
    want = run(*base, "--ledger", clean)
    assert want.returncode == 0, want.stderr
    assert warnings_of(want.stderr) == {}
    got = run(*base, "--ledger", poisoned)
    assert got.returncode == 0, got.stderr
    assert "Traceback" not in got.stderr
    assert got.stdout == want.stdout  # exactly what the valid records alone give
    strict(got.stdout)
    warned = warnings_of(got.stderr)
    assert sorted(warned) == sorted(expected), (warned, expected)  # one per bad record
    for number, reason in expected.items():
        assert reason in warned[number], (number, reason, warned[number])
    assert f"warning: {poisoned}:{min(expected)}: " in got.stderr  # file:line as given
    assert (
        f"read {n_valid} records from {poisoned}; skipped {len(expected)} bad records "
        f"(warnings above) and {n_silent} lines that are not taskmeter records"
    ) in got.stderr

    # The other formats too, and the report.
    for fmt in ("table", "kustomize"):
        a = run("recommend", "--format", fmt, "--min-tasks", "1", "--ledger", clean)
        b = run("recommend", "--format", fmt, "--min-tasks", "1", "--ledger", poisoned)
        assert a.returncode == b.returncode == 0, b.stderr
        assert a.stdout == b.stdout, fmt

    pages = {}
    for name, ledger in (("clean", clean), ("poisoned", poisoned)):
        page = tmp_path / f"{name}.html"
        res = run("report", "--ledger", ledger, "-o", page)
        assert res.returncode == 0, res.stderr
        pages[name] = page.read_text()
        if name == "poisoned":
            assert sorted(warnings_of(res.stderr)) == sorted(expected)
    for name, text in pages.items():  # all but the header and the list of skipped lines
        pages[name] = text[text.index('<section id="sizing">') :]
    assert pages["poisoned"] == pages["clean"]
    text = (tmp_path / "poisoned.html").read_text()
    assert f"Skipped lines ({len(expected) + n_silent})" in text
    assert f"{n_silent} lines that are not taskmeter records" in text


def test_a_kubectl_logs_stream_on_stdin_gives_the_same_as_the_file(clean, tmp_path):
    """Records as a worker with TASKMETER_LEDGER=stdout prints them (an "event" key
    first), between Celery's own log lines, piped to `--ledger -`."""
    stream = []
    for i, line in enumerate(clean.read_text().splitlines()):
        stream.append(CELERY_LINES[i % len(CELERY_LINES)])
        stream.append(json.dumps({"event": "taskmeter.task", **json.loads(line)}))
    text = "\n".join(stream) + "\n"
    base = ["recommend", "--format", "json", "--min-tasks", "1"]
    want = run(*base, "--ledger", clean)
    got = run(*base, "--ledger", "-", stdin=text)
    assert got.returncode == 0, got.stderr
    assert got.stdout == want.stdout
    assert warnings_of(got.stderr) == {}  # log lines are skipped silently
    records = len(clean.read_text().splitlines())
    assert (
        f"read {records} records from standard input; skipped {len(stream) - records} lines "
        "that are not taskmeter records"
    ) in got.stderr

    # Repeated --ledger: a file split in two (as rotation leaves it) plus stdin.
    lines = clean.read_text().splitlines(keepends=True)
    older, newer = tmp_path / "l.jsonl.1", tmp_path / "l.jsonl"
    older.write_text("".join(lines[:100]))
    newer.write_text("".join(lines[100:200]))
    rest = "".join(CELERY_LINES[0] + "\n" + line for line in lines[200:])
    split = run(*base, "--ledger", older, "--ledger", newer, "--ledger", "-", stdin=rest)
    assert split.returncode == 0, split.stderr
    assert split.stdout == want.stdout

    page = tmp_path / "stdin.html"
    res = run("report", "--ledger", "-", "-o", page, stdin=text)
    assert res.returncode == 0, res.stderr
    assert "source: <code>standard input</code>" in page.read_text()


def test_nothing_valid_is_an_error_not_a_traceback(clean, tmp_path):
    only_bad = tmp_path / "bad.jsonl"
    valid = json.loads(clean.read_text().splitlines()[0])
    only_bad.write_text("\n".join(line for line, _ in poisons(valid)) + "\n")
    for args in (["recommend"], ["report", "-o", tmp_path / "r.html"]):
        res = run(*args, "--ledger", only_bad)
        assert res.returncode == 1, res.stderr
        assert "Traceback" not in res.stderr
        warned = [reason for _, reason in poisons(valid) if reason is not None]
        assert len(warnings_of(res.stderr)) == len(warned) >= 25
    assert not (tmp_path / "r.html").exists()
    res = run("recommend", "--ledger", "-", "--ledger", "-", stdin="")
    assert res.returncode == 1 and "standard input given twice" in res.stderr
    res = run("recommend", "--ledger", tmp_path / "missing.jsonl")
    assert res.returncode == 1 and "missing.jsonl: no such file" in res.stderr


def test_the_reader_api_counts_each_kind(clean, tmp_path):
    poisoned = tmp_path / "p.jsonl"
    expected = poisoned_copy(clean, poisoned)
    bad, skipped = [], []
    reader = RecordReader([poisoned], on_bad=bad.append, on_skipped=skipped.append)
    ids = [r.task_id for r in reader]
    assert "poisoned" not in ids
    assert ids == [json.loads(x)["task_id"] for x in clean.read_text().splitlines()]
    assert [p.line for p in bad] == sorted(expected)
    assert reader.summary.bad == len(expected)
    assert reader.summary.skipped == len(skipped) == len(CELERY_LINES)
    assert reader.summary.records == len(ids)


def test_a_byte_order_mark_and_crlf_line_ends_are_read(clean):
    import io

    lines = clean.read_bytes().splitlines()
    data = b"\xef\xbb\xbf" + b"\r\n".join(lines) + b"\r\n"
    reader = RecordReader(["-"], stdin=io.BytesIO(data))
    assert len(list(reader)) == len(lines)
    assert reader.summary.bad == reader.summary.skipped == 0
