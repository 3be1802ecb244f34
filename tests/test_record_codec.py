"""The record's fast codec on the per-task path (issue 10) writes and reads what the
plain one does: ``to_json`` (orjson) reads back as exactly ``to_dict()``, in its order,
all ASCII, and falls back to ``json.dumps`` where orjson would write non-ASCII or
cannot write at all; ``compact_json`` is ``json.dumps(obj, separators=(",", ":"))``
byte for byte; ``from_trusted`` (the main process reading a pool process's record)
rebuilds the equal object that ``from_dict`` builds, field order included."""

from __future__ import annotations

import dataclasses
import json
import math
import sys

import taskmeter
from taskmeter.measure.report import TaskReport, compact_json


def _reports() -> list[TaskReport]:
    out = []
    with taskmeter.measure("plain") as m:
        pass
    out.append(m.report)
    # Tools (one failing, one killed by a signal), phases, a non-ASCII name and id,
    # a failure: every nested record and every kind of value.
    try:
        with taskmeter.measure("vcf.säule → 検査", task_id='ïd-"quoted"\n') as m:
            with m.phase("download"):
                taskmeter.run([sys.executable, "-c", "x = bytearray(8 << 20)"])
            with m.phase("query"):
                taskmeter.run(["sh", "-c", "exit 3"])
                taskmeter.run(["sh", "-c", "kill -TERM $$"])
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    out.append(m.report)
    out.append(dataclasses.replace(m.report, state="killed", cause="oom", queue_wait_s=0.25))
    return out


def test_to_json_reads_back_as_to_dict_in_order_and_ascii() -> None:
    reports = _reports()
    assert len(reports[1].tools) == 3 and len(reports[1].phases) == 2
    assert {t.exit_code for t in reports[1].tools} == {0, 3, None}
    for r in reports:
        text = r.to_json()
        back = json.loads(text)
        assert back == r.to_dict()  # every float the same double, every field there
        assert list(back) == list(r.to_dict()) and next(iter(back)) == "schema"
        assert text.isascii() and "\n" not in text  # one line, as the ledger promises
        assert r.to_json_bytes() == text.encode()
    # the ASCII task writes with orjson; the non-ASCII one exactly as json.dumps does
    plain, exotic = reports[0], reports[1]
    assert exotic.to_json() == json.dumps(exotic.to_dict(), separators=(",", ":"))
    assert TaskReport.from_json(plain.to_json()) == plain
    # an argv that is not valid UTF-8 (os.fsdecode's surrogates): json's escapes
    tool = dataclasses.replace(exotic.tools[0], argv=("cat", "bad-\udcff.vcf"))
    odd = dataclasses.replace(plain, tools=(tool,))
    assert odd.to_json() == json.dumps(odd.to_dict(), separators=(",", ":"))


def test_compact_json_is_json_dumps_byte_for_byte() -> None:
    for r in _reports():
        assert compact_json(r.to_dict()) == json.dumps(r.to_dict(), separators=(",", ":"))
    # Values json.dumps writes in its own way: non-finite floats, nested lists, None.
    odd = {"a": [math.inf, -math.inf, None, True, False, 1e300, -0.0, 2**70], "b": {"c": "é"}}
    assert compact_json(odd) == json.dumps(odd, separators=(",", ":"))
    assert math.isnan(json.loads(compact_json(math.nan)))


def test_from_trusted_equals_from_dict_and_writes_the_same_line() -> None:
    for r in _reports():
        d = json.loads(r.to_json())
        fast, checked = TaskReport.from_trusted(d), TaskReport.from_dict(d)
        assert fast == checked == r
        assert fast.to_json() == r.to_json()  # field order kept
        assert [f.name for f in dataclasses.fields(fast)] == list(vars(fast))
        assert fast.tools == r.tools and all(isinstance(t.argv, tuple) for t in fast.tools)
        # still frozen
        try:
            fast.wall_s = 1.0  # type: ignore[misc]
        except dataclasses.FrozenInstanceError:
            pass
        else:
            raise AssertionError("from_trusted made a mutable record")
