"""The pool processes' outboxes (taskmeter.celery.outbox): task ends left in a shared
file mapping, collected by the main process in batches, and recovered by the next
incarnation when the whole worker died before collecting them."""

from __future__ import annotations

import os
import struct
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from taskmeter.celery import outbox
from taskmeter.celery.outbox import Outbox
from test_journal import samples

from workerkit import wait_for


def _line(i: int, size: int = 1200) -> bytes:
    body = b'{"i":%d,"pad":"' % i
    return b'E["1:%d",true,null,null,0]\t' % i + body + b"x" * (size - len(body) - 2) + b'"}'


def _pair(folder: Path, pid: int, n: int = 1) -> tuple[Outbox, Outbox]:
    """A pool process's outbox and the main process's map of it (attached)."""
    box = Outbox.create(folder, pid, n)
    return box, Outbox.attach(outbox.path_of(folder, pid, n))


def test_entries_come_out_in_order_once_each_and_their_room_is_freed_at_commit(tmp_path):
    box, main = _pair(tmp_path, 4242)
    sent = [_line(i, size=100 + 37 * i) for i in range(50)]
    for line in sent[:30]:
        assert box.put(line)
    assert main.take() == sent[:30]
    assert main.take() == []  # taken, not committed: not again
    for line in sent[30:]:
        assert box.put(line)
    assert main.take() == sent[30:]
    # Filled to the brim: the producer refuses what does not fit until the consumer
    # commits, then takes it again.
    big = _line(999, size=100_000)
    n = 0
    while box.put(big):
        n += 1
    assert 5 <= n <= outbox.SIZE // 100_000
    assert not box.put(big)
    main.commit()
    got = main.take()
    assert got == [big] * n
    main.commit()
    assert box.put(big)


def test_nothing_is_written_before_the_main_process_attaches_nor_after_it_detaches(tmp_path):
    """The pool process sends through its channel instead: an outbox nobody reads
    (the main process could not map it, or stopped reading it) loses nothing."""
    box = Outbox.create(tmp_path, 5, 1)
    assert not box.put(_line(0))
    main = Outbox.attach(outbox.path_of(tmp_path, 5, 1))
    assert box.put(_line(1))
    main.detach()
    assert not box.put(_line(2))
    assert main.take() == [_line(1)]


def test_the_ring_wraps_many_times_without_losing_or_tearing_an_entry(tmp_path):
    box, main = _pair(tmp_path, 1)
    expected: list[bytes] = []
    got: list[bytes] = []
    total = 0
    i = 0
    while total < 8 * outbox.SIZE:  # the ring wraps about eight times
        line = _line(i, size=500 + (i * 7919) % 3000)
        if not box.put(line):
            got += main.take()
            main.commit()
            assert box.put(line)
        expected.append(line)
        total += len(line)
        i += 1
    got += main.take()
    assert got == expected


def _publish(path: Path, w: int) -> None:
    """Move the write position to ``w`` without writing an entry: what a weakly
    ordered CPU may show the main process before the entry's own bytes."""
    with open(path, "r+b") as f:
        f.seek(16)
        f.write(struct.pack("Q", w))


def _write_pos(path: Path) -> int:
    return int(struct.unpack_from("Q", path.read_bytes(), 16)[0])


def test_an_entry_seen_before_its_bytes_is_not_taken_until_they_are_there(tmp_path):
    """A torn payload, a zeroed slot (the ring's first lap) and the whole entry an
    earlier lap left at the same place all fail their check: the read stops there and
    takes the entry once it is whole."""
    path = outbox.path_of(tmp_path, 2, 1)
    box, main = _pair(tmp_path, 2)
    assert box.put(_line(0)) and box.put(_line(1))
    # The second entry's payload, one byte not stored yet.
    data = bytearray(path.read_bytes())
    second = 64 + 8 + ((len(_line(0)) + 7) & ~7) + 8
    data[second + 100] ^= 0xFF
    path.write_bytes(bytes(data))
    assert main.take() == [_line(0)]
    assert main.stuck()
    data[second + 100] ^= 0xFF
    path.write_bytes(bytes(data))
    assert main.take() == [_line(1)]
    assert not main.stuck()
    # A zeroed slot: the position moved, nothing written there yet.
    w = _write_pos(path)
    _publish(path, w + 64)
    assert main.take() == [] and main.stuck()
    _publish(path, w)
    # A lap later, the entry of the ring's first lap still at the place of the next.
    main.commit()
    lap_box, lap_main = _pair(tmp_path, 3)
    lap_path = outbox.path_of(tmp_path, 3, 1)

    def page(i: int) -> bytes:  # an entry of 4 KiB exactly
        return _line(i, size=4088 - (len(_line(i, 100)) - 100))

    assert len(page(7)) == 4088
    for i in range(outbox.SIZE // 4096):  # the first lap, and the first of the second
        if not lap_box.put(page(i)):
            assert len(lap_main.take()) > 0
            lap_main.commit()
            assert lap_box.put(page(i))
    lap_main.take()
    lap_main.commit()
    w = _write_pos(lap_path)
    assert w > outbox.SIZE  # in the second lap; the next place holds a first-lap entry
    _publish(lap_path, w + 4096)
    assert lap_main.take() == [] and lap_main.stuck()
    _publish(lap_path, w)
    assert lap_box.put(page(999))
    assert lap_main.take() == [page(999)]


def test_a_new_connection_makes_a_new_file_the_main_process_still_maps_the_old(tmp_path):
    """A pool process that reconnects makes a new outbox under a new name; a stale
    file of a reused pid and connection number is replaced, never shrunk under a map
    of it (a file shrunk under a map kills the mapping process with SIGBUS)."""
    old, main = _pair(tmp_path, 3)
    assert old.put(_line(0))
    new = Outbox.create(tmp_path, 3, 2)
    assert main.take() == [_line(0)]
    assert Outbox.attach(outbox.path_of(tmp_path, 3, 2)) and new.put(_line(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["3-1.outbox", "3-2.outbox"]
    again = Outbox.create(tmp_path, 3, 1)  # a reused pid: the name of a mapped file
    assert main.take() == [] and not main.stuck()  # the old map, whole
    assert Outbox.attach(outbox.path_of(tmp_path, 3, 1)) and again.put(_line(2))
    assert Outbox.attach(outbox.path_of(tmp_path, 3, 1)).take() == [_line(2)]


def test_a_file_that_is_not_an_outbox_is_refused(tmp_path):
    path = outbox.path_of(tmp_path, 5, 1)
    path.write_bytes(b"x" * outbox.SIZE)
    with pytest.raises(ValueError, match="not a taskmeter outbox"):
        Outbox.attach(path)
    path.write_bytes(b"short")
    with pytest.raises(ValueError, match="5 bytes, not 1048576"):
        Outbox.attach(path)
    Outbox.create(tmp_path, 6, 1).close()
    (tmp_path / "7-1.outbox").symlink_to(outbox.path_of(tmp_path, 6, 1))
    with pytest.raises(OSError):
        Outbox.attach(tmp_path / "7-1.outbox")


def test_a_forked_producer_and_this_consumer_run_at_once(tmp_path):
    """A real pool process (forked) writing while the main process reads and commits:
    every entry arrives once, in order, whole."""
    n = 20_000
    box, main = _pair(tmp_path, 8)
    pid = os.fork()
    if pid == 0:
        try:
            for i in range(n):
                line = _line(i, size=200 + i % 1500)
                while not box.put(line):
                    time.sleep(0.0005)
        finally:
            os._exit(0)
    got: list[bytes] = []
    deadline = time.monotonic() + 60
    while len(got) < n and time.monotonic() < deadline:
        got += main.take()
        main.commit()
    os.waitpid(pid, 0)
    assert len(got) == n
    assert got == [_line(i, size=200 + i % 1500) for i in range(n)]


def test_leftovers_tell_entries_taken_to_write_from_those_never_taken(tmp_path):
    box, main = _pair(tmp_path, 11)
    for i in range(5):
        box.put(_line(i))
    assert len(main.take()) == 5
    main.mark_taken()
    main.commit()  # written and freed: not left over
    for i in range(5, 8):
        box.put(_line(i))
    assert main.take() == [_line(i) for i in range(5, 8)]
    main.mark_taken()  # about to be written when the worker died
    for i in range(8, 10):
        box.put(_line(i))  # never taken
    (tmp_path / "junk.outbox").write_bytes(b"")  # not an outbox name: left alone
    left = outbox.leftovers(tmp_path)
    assert [(p.name, maybe, fresh) for p, maybe, fresh, _ in left] == [
        ("11-1.outbox", [_line(i) for i in range(5, 8)], [_line(8), _line(9)])
    ]
    # Nothing noted until the caller is about to write; then all of them are taken.
    assert outbox.leftovers(tmp_path) == left
    outbox.note_taken(left[0])
    again = outbox.leftovers(tmp_path)
    assert [(maybe, fresh) for _, maybe, fresh, _ in again] == [
        ([_line(i) for i in range(5, 10)], [])
    ]


def _restart_settings(tmp_path: Path, ledger: str = "file") -> Any:
    """A worker's settings with its ledger (a file, or "stdout") and journal in tmp_path."""
    from taskmeter.config import load_settings

    env = {
        "TASKMETER_LEDGER": str(tmp_path / "ledger.jsonl") if ledger == "file" else "stdout",
        "TASKMETER_JOURNAL": str(tmp_path / "journal"),
        "TASKMETER_PORT": "0",
    }
    return load_settings({}, env)


def _packed_ends(n: int, start: int) -> tuple[list[bytes], list[bytes]]:
    """Outbox entries of n short tasks (their figures packed), and their records."""
    import taskmeter

    lines, bodies = [], []
    for i in range(start, start + n):
        m = taskmeter.Measurement("t.a", f"id-{i}")
        m.start()
        packed = m.finish_packed("success")
        assert packed is not None
        lines.append(b"R" + struct.pack("=q", i) + packed)
        bodies.append(m.report.to_json_bytes())
    return lines, bodies


@pytest.mark.parametrize("ledger", ["file", "stdout"])
def test_a_restarted_worker_records_what_its_predecessor_left_in_an_outbox_once(
    tmp_path, capfd, ledger
):
    """The whole worker died after pool processes left task ends in their outboxes and
    before its main process collected them (or while it wrote some to the ledger): the
    next incarnation writes each record once and counts it. With records on standard
    output, where it cannot look, it skips those the kill caught in the write."""
    from prometheus_client import CollectorRegistry, generate_latest

    import taskmeter
    from taskmeter.celery import integration
    from taskmeter.celery.journal import node_folder_name
    from taskmeter.measure.report import TaskReport

    settings = _restart_settings(tmp_path, ledger)
    # Ends of tasks with a tool (E lines, their records) and without (R entries, their
    # figures packed), in turns.
    lines, bodies = [], []
    for i in range(4):
        m = taskmeter.Measurement("t.a", f"id-{i}")
        m.start()
        if i % 2 == 0:
            taskmeter.run(["true"])
            m.finish()
            body = m.report.to_json_bytes()
            lines.append(b'E["999999:%d",true,null,null,%d]\t' % (i, len(body)) + body)
        else:
            packed = m.finish_packed("success")
            assert packed is not None
            lines.append(b"R" + struct.pack("=q", i) + packed)
        bodies.append(m.report.to_json_bytes())

    first = integration._Worker(settings, "prefork", ["t.a"])
    first.open()
    assert first.ledger is not None and settings.journal is not None
    folder = Path(settings.journal) / node_folder_name(first.node)
    box, main = _pair(folder, 999_999)
    # The main process took the first two (a record, packed figures) to write, and the
    # kill came once it had written the first (one round's write can end up split, as
    # by a full disk); the third and fourth came after, never taken.
    assert box.put(lines[0]) and box.put(lines[1])
    assert main.take() == lines[:2]
    main.mark_taken()
    first.ledger.write_many(bodies[:1])
    assert box.put(lines[2]) and box.put(lines[3])
    box.close()
    first.close()  # the outbox is no pool process's of this incarnation: left as is
    assert outbox.path_of(folder, 999_999, 1).exists()

    capfd.readouterr()
    second = integration._Worker(settings, "prefork", ["t.a"])
    second.open()
    try:
        if ledger == "file":
            assert (tmp_path / "ledger.jsonl").read_bytes().splitlines() == bodies
            written = 3  # the second, the third and the fourth
        else:
            out = capfd.readouterr().out.encode().splitlines()
            expected = [TaskReport.from_json(b) for b in bodies[2:]]
            assert [TaskReport.from_json(line) for line in out] == expected
            written = 2  # the third and fourth (the second may have been written: skipped)
        assert not outbox.path_of(folder, 999_999, 1).exists()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(second.metrics)
        page = generate_latest(registry)
        assert b'celery_task_runs_total{state="success",task="t.a"} %d.0' % written in page
    finally:
        second.close()


def test_a_restart_finds_a_whole_round_of_packed_ends_in_the_ledger_and_writes_none_twice(
    tmp_path,
):
    """The main process took a large round of packed ends (a fifth of their records'
    size), wrote their records and died before it freed them: the restart looks for
    them in as much of the ledger's end as their records take, finds every one, and
    writes none twice."""
    from taskmeter.celery import integration
    from taskmeter.celery.journal import node_folder_name

    settings = _restart_settings(tmp_path)
    lines, bodies = _packed_ends(3000, 0)
    # A window the size of the entries (plus its MiB) would miss the oldest records.
    assert sum(len(b) + 1 for b in bodies) > sum(map(len, lines)) + (1 << 20)
    first = integration._Worker(settings, "prefork", ["t.a"])
    first.open()
    assert first.ledger is not None and settings.journal is not None
    folder = Path(settings.journal) / node_folder_name(first.node)
    box, main = _pair(folder, 999_999)
    assert all(box.put(line) for line in lines)
    assert main.take() == lines
    main.mark_taken()
    first.ledger.write_many(bodies)
    box.close()
    first.close()
    second = integration._Worker(settings, "prefork", ["t.a"])
    second.open()
    try:
        assert (tmp_path / "ledger.jsonl").read_bytes().splitlines() == bodies
        assert not outbox.path_of(folder, 999_999, 1).exists()
    finally:
        second.close()


class _Death(BaseException):
    """The restarted worker killed in the middle of its recovery."""


@pytest.mark.parametrize("when", ["before its write", "after its write"])
def test_a_restart_killed_during_its_recovery_leaves_the_next_one_each_record_once(
    tmp_path, monkeypatch, when
):
    """Two pool processes' outboxes, each with ends taken (and written) by the first
    incarnation and ends never taken; the second incarnation is killed during its
    recovery, before or after its ledger write; the third writes every record once."""
    import collections

    from taskmeter.celery import integration
    from taskmeter.celery.journal import node_folder_name

    settings = _restart_settings(tmp_path)
    ends = _packed_ends
    first = integration._Worker(settings, "prefork", ["t.a"])
    first.open()
    assert first.ledger is not None and settings.journal is not None
    folder = Path(settings.journal) / node_folder_name(first.node)
    a_box, a_main = _pair(folder, 111_111)
    b_box, b_main = _pair(folder, 222_222)
    a_taken, a_taken_b = ends(500, 0)
    b_taken, b_taken_b = ends(1000, 10_000)
    a_fresh, a_fresh_b = ends(2500, 20_000)  # more records than a MiB after b_taken's
    b_fresh, b_fresh_b = ends(200, 30_000)
    assert all(map(a_box.put, a_taken)) and all(map(b_box.put, b_taken))
    assert a_main.take() == a_taken and b_main.take() == b_taken
    a_main.mark_taken()
    b_main.mark_taken()
    first.ledger.write_many(a_taken_b + b_taken_b)  # the round's write; killed after it
    assert all(map(a_box.put, a_fresh)) and all(map(b_box.put, b_fresh))
    for box in (a_box, b_box, a_main, b_main):
        box.close()
    first.close()

    write_many = integration.Ledger.write_many

    def killed(self: Any, records: list[bytes]) -> None:
        if when == "after its write":
            write_many(self, records)
        raise _Death

    second = integration._Worker(settings, "prefork", ["t.a"])
    monkeypatch.setattr(integration.Ledger, "write_many", killed)
    with pytest.raises(_Death):
        second.open()
    monkeypatch.undo()
    if second.journal is not None:  # (its death would free the journal's lock)
        second.journal.close()
    if second.ledger is not None:
        second.ledger.close()
    third = integration._Worker(settings, "prefork", ["t.a"])
    third.open()
    third.close()
    lines = (tmp_path / "ledger.jsonl").read_bytes().splitlines()
    counts = collections.Counter(lines)
    expected = set(a_taken_b + b_taken_b + a_fresh_b + b_fresh_b)
    assert set(counts) == expected, f"{len(expected - set(counts))} records missing"
    assert max(counts.values()) == 1, f"{sum(counts.values()) - len(counts)} written twice"


def test_a_worker_killed_whole_right_after_a_task_ended_records_that_task_once(start_worker):
    """A real worker, every process SIGKILLed (as by a container OOM kill) as soon as a
    task's end is in its pool process's outbox, before the main process collected it:
    the restarted worker (same node name) writes that task's record, once, as the pool
    process made it, and counts it. The kill may land after a collection (one chance in
    a few hundred): then the record is in the ledger already, once too, and the
    scenario runs again to see the recovery itself."""
    recovered = False
    for _attempt in range(3):
        node = f"ob-{uuid.uuid4().hex[:6]}@%h"
        w1 = start_worker("redis", "prefork", 2, ("-n", node))
        folder = Path(f"{w1.ledger}.inflight")
        base = len(w1.reports())
        sent = 0
        while len(list(folder.glob("*/*.outbox"))) < 2 and sent < 400:  # both have one
            for _ in range(20):
                w1.send("noop")
            sent += 20
            w1.wait_reports(base + sent)
        assert len(list(folder.glob("*/*.outbox"))) == 2
        last = w1.send("end.then.kill.worker")
        wait_for(lambda w=w1: w.proc.poll() is not None, 30, "the whole worker killed")

        w2 = start_worker("redis", "prefork", 2, ("-n", node), TM_QUEUE=w1.queue)
        reports = w2.wait_reports(base + sent + 1)[base:]
        ids = [r.task_id for r in reports]
        assert len(ids) == len(set(ids)) == sent + 1, "a task recorded twice or missing"
        (mine,) = [r for r in reports if r.task_id == last.id]
        assert (mine.task, mine.state) == ("end.then.kill.worker", "success")
        assert mine.wall_s > 0 and mine.overhead.rss_peak_bytes > 0
        recovered = "recovered from its outboxes" in w2.log_text()
        if recovered:
            page = samples(w2.metrics())
            key = (
                "celery_task_runs_total",
                (("state", "success"), ("task", "end.then.kill.worker")),
            )
            assert page[key] == 1
            assert not list(folder.glob("*/*.outbox.new"))
        assert w2.stop() == 0
        assert not list(folder.glob("*/*.outbox")), "a clean stop leaves no outbox"
        if recovered:
            break
    assert recovered, "the main process collected the entry before the kill, 3 times"
