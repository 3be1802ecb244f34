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
import threading
from typing import Any

import taskmeter
from taskmeter.measure.core import _PACKED, Measurement, unpack_report
from taskmeter.measure.report import State, TaskReport, compact_json


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


def _packed_and_built(m: Measurement, state: State) -> tuple[bytes | None, TaskReport]:
    """finish_packed()'s result, and the report finish() would have built from the same
    figures (Measurement._build on what finish_packed ended with)."""
    figures: list[tuple[Any, ...]] = []
    end = Measurement._end

    def spy(self: Measurement, *args: Any) -> Any:
        figures.append(end(self, *args))
        return figures[-1]

    Measurement._end = spy  # type: ignore[method-assign]
    try:
        packed = m.finish_packed(state)
    finally:
        Measurement._end = end  # type: ignore[method-assign]
    return packed, m._build(*figures[0])


def test_a_packed_end_unpacks_to_the_report_finish_would_build() -> None:
    """What a Celery pool process sends for a short task (figures packed) is rebuilt by
    the main process as the equal report, its record byte for byte, for every kind of
    value a short task's record holds: no task id or pool, a non-ASCII name, a lone
    surrogate, a queue wait, a failure, thread CPU (spans overlapping in threads)."""
    results: list[tuple[Measurement, bytes | None, TaskReport]] = []
    plain = Measurement("plain")
    plain.start()
    exotic = Measurement("vcf.säule → 検査", 'ïd-"q"\n\udcff', pool="prefork")
    exotic.start()
    exotic.queue_wait_s = 0.125

    def in_a_thread() -> None:  # spans of two threads at once: "thread" CPU
        m = Measurement("threaded", "id-2", pool="threads")
        m.start()
        x = bytearray(16 << 20)
        x[::4096] = b"x" * len(x[::4096])  # a peak above the start, freed before the end
        del x
        results.append((m, *_packed_and_built(m, "retry")))

    t = threading.Thread(target=in_a_thread)
    t.start()
    t.join()
    results.append((exotic, *_packed_and_built(exotic, "failure")))
    results.append((plain, *_packed_and_built(plain, "success")))
    assert len(results) == 3
    for m, packed, built in results:
        assert packed is not None
        got = unpack_report(packed)
        assert got == built and got.to_json_bytes() == built.to_json_bytes()
        assert list(vars(got)) == list(vars(built))
        assert m.report == built  # read on the pool side: built from the same figures
    threaded, failed, _ = (m.report for m, _, _ in results)
    assert threaded.overhead.cpu_method == "thread" and threaded.task_id == "id-2"
    assert threaded.overhead.rss_peak_bytes >= threaded.overhead.rss_avg_bytes + (8 << 20)
    assert failed.queue_wait_s == 0.125 and failed.state == "failure"
    assert failed.worker.pool == "prefork" and results[2][0].report.task_id is None


def test_a_report_with_tools_or_phases_is_built_where_it_ends_not_packed() -> None:
    with_tool = Measurement("tool")
    with_tool.start()
    taskmeter.run(["true"])
    assert with_tool.finish_packed("success") is None
    assert [t.exe for t in with_tool.report.tools] == ["true"]
    with_phase = Measurement("phase")
    with_phase.start()
    with with_phase.phase("load"):
        pass
    assert with_phase.finish_packed("success") is None
    assert [p.name for p in with_phase.report.phases] == ["load"]
    version = _PACKED.pack(2, 0, 1, 0, 0, *[0.0] * 8, 0, 0, 0, 1, 0, 0, 0, 0)
    short = _PACKED.pack(1, 0, 1, 0, 0, *[0.0] * 8, 0, 0, 0, 1, 2, 5, 0, 0) + b"h"
    for bad in (b"", b"\x00" * 10, version, short):
        try:
            unpack_report(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} unpacked")


def test_what_the_packed_figures_cannot_hold_as_it_is_is_built_where_it_ends(
    monkeypatch: Any,
) -> None:
    """An int interval or queue wait (the record writes it as an int), a task id that
    is not a str (kombu gives a UUID back as one), a name longer than the packed
    length holds: the report is built as finish() builds it, never lost."""
    import uuid

    from taskmeter.measure.sampler import SAMPLER

    monkeypatch.setattr(SAMPLER, "_interval_s", 1)
    m = Measurement("int-interval")
    m.start()
    assert m.finish_packed("success") is None
    assert b'"interval_s":1}' in m.report.to_json_bytes()
    monkeypatch.undo()
    cases = [
        Measurement("uuid", uuid.UUID(int=7)),  # type: ignore[arg-type]
        Measurement("n" * 70_000),
        Measurement("wait"),
    ]
    cases[2].queue_wait_s = 0  # type: ignore[assignment]
    for m in cases:
        m.start()
        assert m.finish_packed("failure") is None
        assert m.report.state == "failure" and m.report.task == m.name
    assert b'"queue_wait_s":0}' in cases[2].report.to_json_bytes()
