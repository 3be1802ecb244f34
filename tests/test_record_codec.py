"""The record's fast codec on the per-task path (issue 10) writes and reads exactly what
the plain one does: ``to_json`` is ``json.dumps(to_dict(), separators=(",", ":"))`` byte
for byte, and ``from_trusted`` (the main process reading a pool process's record)
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


def test_to_json_is_json_dumps_byte_for_byte() -> None:
    reports = _reports()
    assert len(reports[1].tools) == 3 and len(reports[1].phases) == 2
    assert {t.exit_code for t in reports[1].tools} == {0, 3, None}
    for r in reports:
        assert r.to_json() == json.dumps(r.to_dict(), separators=(",", ":"))
        assert r.to_json().isascii()  # as json.dumps: non-ASCII escaped
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
