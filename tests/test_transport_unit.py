"""The report channel (celery/transport.py) at unit level: what a handler raises stays
out of the listener, and a sender whose reader stalls gives up instead of blocking."""

from __future__ import annotations

import os
import struct
import threading
import time
from typing import Any

from taskmeter.celery import transport
from taskmeter.celery.transport import Listener, Sender

from workerkit import wait_for


def test_an_exit_handler_that_raises_does_not_stop_the_listener():
    got: list[tuple[object, int | None]] = []
    gone: list[int] = []

    def on_gone(pid: int) -> None:
        gone.append(pid)
        raise PermissionError(13, "Permission denied")  # e.g. the journal's unlink

    listener = Listener(lambda msg, pid: got.append((msg, pid)), on_gone)
    listener.start()
    try:
        first = Sender(listener.address, listener.token)
        first.send({"n": 1})
        wait_for(lambda: len(got) == 1, 5, "the first message", 0.01)
        first.close()
        wait_for(lambda: len(gone) == 1, 5, "the exit", 0.01)
        second = Sender(listener.address, listener.token)
        second.send({"n": 2})
        wait_for(lambda: len(got) == 2, 5, "the second message", 0.01)  # the listener still serves
        second.close()
        assert [m for m, _ in got] == [{"n": 1}, {"n": 2}]
    finally:
        listener.close()


def test_a_sender_whose_channel_is_not_read_drops_instead_of_blocking(monkeypatch):
    # A warm shutdown: the main process reads no channel until the worker's end, and a
    # task sending many messages must finish meanwhile.
    monkeypatch.setattr(transport, "SEND_TIMEOUT_S", 0.2)
    got: list[object] = []
    listener = Listener(lambda msg, pid: got.append(msg), lambda pid: None)
    try:
        sender = Sender(listener.address, listener.token)
        pad = "x" * 60_000

        def send_all() -> None:
            for n in range(200):  # 12 MB: far more than the socket's buffer
                sender.send({"n": n, "pad": pad})

        t0 = time.monotonic()
        sending = threading.Thread(target=send_all, daemon=True)  # a hang fails, not hangs
        sending.start()
        sending.join(10)
        elapsed = time.monotonic() - t0
        assert not sending.is_alive(), "the sender blocked"
        assert sender._stalled and sender._dropped > 0
        assert elapsed < 3.0  # one wait of 0.2 s, then no more waiting
        # The reader comes back: the messages sent from then on arrive whole.
        listener.start()
        wait_for(lambda: any(m.get("n") == 0 for m in got), 5, "the first message", 0.01)
        sender.send({"n": "after"})
        wait_for(lambda: {"n": "after"} in got, 5, "the message sent after", 0.01)
        sender.close()
    finally:
        listener.close()


def test_on_a_kombu_hub_a_record_costs_no_wake_up_and_is_read_at_the_next_tick():
    """With Celery's event loop (a kombu Hub), the channels are not in the loop's poll
    set: a message wakes nobody, and is read at the loop's next iteration (which, in a
    worker, Celery's own result for the task starts) when the shared byte says so, or
    by the POLL_S timer. A closed channel is still seen."""
    from kombu.asynchronous import Hub

    got: list[object] = []
    gone: list[int] = []
    batches: list[int] = []
    hub = Hub()
    listener = Listener(
        lambda msg, pid: got.append(msg), gone.append, lambda: batches.append(len(got))
    )
    iterations = [0]
    hub.on_tick.add(lambda: iterations.__setitem__(0, iterations[0] + 1))
    listener.attach(hub)
    loop = hub.create_loop()

    def turn(n: int = 1) -> None:  # what Celery's worker does: run the loop
        for _ in range(n):
            next(loop)

    try:
        sender = Sender(listener.address, listener.token, listener.dirty)
        sender.send({"n": 1})
        turn(2)  # accept (the listening socket is a reader), then the tick reads it
        wait_for(lambda: (turn(), got)[1] == [{"n": 1}], 5, "the first message", 0)
        readers = set(hub.readers)
        assert readers == {listener._sock.fileno()}, "a channel is in the poll set"
        # A message on its own wakes nobody: nothing in the poll set became readable.
        sender.send({"n": 2})
        time.sleep(0.05)
        assert not hub.poller.poll(0), "the message made the loop's poll return"
        wait_for(lambda: (turn(), got)[1][-1] == {"n": 2}, 5, "the second message", 0)
        # With the byte set, the next iteration reads it, whatever woke the loop, long
        # before the timer would; a record alone (none read in the last COALESCE_S) is
        # flushed at once, with no timer of its own.
        time.sleep(transport.COALESCE_S)
        sender.send({"n": 3})
        assert listener.dirty[0] == 1
        hub.call_later(0.01, lambda: None)  # something else wakes the loop soon
        t0 = time.monotonic()
        turn(1)  # its tick (before its poll) reads the message
        assert got[-1] == {"n": 3} and listener.dirty[0] == 0
        assert batches[-1:] == [3], "a record alone waited for a flush timer"
        assert time.monotonic() - t0 < transport.POLL_S / 2
        # Records closer together are flushed at most every COALESCE_S from the ticks,
        # the rest by a one-shot timer (or the POLL_S one): message 4 is read at once
        # and flushed within that.
        sender.send({"n": 4})
        hub.call_later(0.001, lambda: None)
        turn(1)
        assert got[-1] == {"n": 4}

        def soon() -> None:  # a turn that returns within a millisecond
            hub.call_later(0.001, lambda: None)
            turn()

        wait_for(lambda: (soon(), batches)[1][-1:] == [4], 5, "the flush", 0)
        # Right after that timer's flush, a record COALESCE_S after the last read is
        # alone again: flushed at once, not by a timer of its own (one wake-up of the
        # loop less per task for a worker whose tasks come about that far apart).
        sender.send({"n": 5})
        soon()
        assert got[-1] == {"n": 5} and batches[-1:] == [5]
        # A closed channel (a pool process gone) is seen by the timer.
        sender.close()
        wait_for(lambda: (turn(), gone)[1] != [], 5, "the closed channel", 0)
    finally:
        listener.close()
        hub.close()


def test_a_record_json_had_to_write_is_read_back_whole():
    """A tool whose argv is not valid UTF-8 (os.fsdecode's lone surrogates): orjson
    cannot write it, json escapes it, and the main process must still read it (orjson
    alone refuses the escape) rather than drop the task's record."""
    import dataclasses

    import taskmeter
    from taskmeter.measure.report import TaskReport, json_bytes, loads

    with taskmeter.measure("vcf") as m:
        taskmeter.run([b"true", b"bad-\xff.vcf"])
    report = m.report
    assert report.tools[0].argv == ("true", "bad-\udcff.vcf")
    body = report.to_json_bytes()
    assert b"\\udcff" in body  # json's escape
    assert TaskReport.from_trusted(loads(body)) == report == TaskReport.from_json(body)
    head = json_bytes(["1:1", True, ["vcf", "id-\udcff", 1, 0.5, 0.1, None]])
    got: list[object] = []
    listener = Listener(lambda msg, pid: got.append(msg), lambda pid: None)
    listener.start()
    try:
        sender = Sender(listener.address, listener.token)
        sender.send_line(b"E" + head + b"\t" + body + b"\n")
        sender.send({"type": "tool", "argv": list(report.tools[0].argv)})
        wait_for(lambda: len(got) == 2, 5, "both messages", 0.01)
        end, tool = got
        assert isinstance(end, dict) and isinstance(tool, dict)
        assert end["head"][2][1] == "id-\udcff"
        assert TaskReport.from_trusted(loads(end["body"])) == report
        assert tool["argv"] == ["true", "bad-\udcff.vcf"]
        sender.close()
    finally:
        listener.close()
    assert dataclasses.replace(report).to_json_bytes() == body


def test_a_tick_reads_only_the_channels_that_hold_something(monkeypatch):
    """With many pool processes, the read at a tick asks the kernel which channels
    hold something and reads those alone: one read per sending channel, not one per
    pool process (each an exception when empty), and a closed channel still seen."""
    got: list[object] = []
    gone: list[int] = []
    listener = Listener(lambda msg, pid: got.append(msg), gone.append)
    reads: list[object] = []
    real_read = Listener._read
    monkeypatch.setattr(
        Listener, "_read", lambda self, conn: (reads.append(conn), real_read(self, conn))[1]
    )
    senders = [Sender(listener.address, listener.token) for _ in range(8)]
    try:
        for i, sender in enumerate(senders):
            sender.send({"hello-from": i})
        # accepted and read (on Celery's loop, the listening socket is a reader)
        wait_for(lambda: (listener._drain(), len(got))[1] == 8, 5, "the 8 channels", 0.01)
        assert len(listener._buffers) == 8
        reads.clear()
        senders[3].send({"n": 1})
        listener._poll(flush=False)  # what the loop's tick does when the byte is set
        assert got[-1] == {"n": 1}
        assert len(reads) == 1, f"{len(reads)} channels read for one message"
        senders[5].close()  # a pool process gone: its channel is readable (EOF)
        wait_for(lambda: (listener._poll(), gone)[1] != [], 5, "the closed channel", 0.01)
        assert gone == [os.getpid()] and len(listener._buffers) == 7
    finally:
        for sender in senders:
            sender.close()
        listener.close()


def test_task_ends_wait_in_the_outbox_for_the_timer_a_scrape_or_the_exit():
    """On a kombu Hub, a task's end goes to the pool process's outbox: no byte set, not
    read at the loop's ticks; collected by the POLL_S timer (all waiting, one flush), at
    once by collect() from another thread (a scrape), and, when the channel closes,
    before the exit is handled. Its file goes with the channel; the folder at close."""
    from kombu.asynchronous import Hub

    got: list[object] = []
    events: list[str] = []
    hub = Hub()

    def on_message(msg: dict[str, object], pid: int | None) -> None:
        got.append(msg)
        events.append(f"msg {msg['head'][0][:-2]}")  # type: ignore[index]

    listener = Listener(
        on_message, lambda pid: events.append("gone"), lambda: events.append("flush")
    )
    listener.attach(hub)
    loop = hub.create_loop()
    folder = listener.outbox_dir
    assert folder is not None and listener.dirty[1] == 1
    end = b'E["%d:1",true,null,null,2]\t{}'
    try:
        sender = Sender(listener.address, listener.token, listener.dirty, folder)
        sender.send_end(end % 1)  # the first one connects: through the channel
        wait_for(lambda: (next(loop), got)[1] != [], 5, "the first end", 0)
        assert [p.name for p in folder.iterdir()] == [f"{os.getpid()}-1.outbox"]
        listener.dirty[0] = 0
        events.clear()
        for n in (2, 3, 4):
            sender.send_end(end % n)
        assert listener.dirty[0] == 0, "an outbox entry set the byte"
        for _ in range(3):  # the loop's ticks: nothing read
            listener._on_tick()
        assert len(got) == 1
        wait_for(lambda: (next(loop), got)[1][-1:] != [got[0]], 5, "the timer", 0)
        assert events == ["msg 2", "msg 3", "msg 4", "flush"]
        # A scrape, from its own thread: at once.
        sender.send_end(end % 5)
        t = threading.Thread(target=listener.collect)
        t.start()
        t.join(5)
        assert events[-2:] == ["msg 5", "flush"]
        # The pool process leaves one more end and exits: handled, then its exit.
        sender.send_end(end % 6)
        sender.close()
        wait_for(lambda: "gone" in (next(loop), events)[1], 5, "the exit", 0)
        assert events[events.index("gone") - 2 :][:3] == ["msg 6", "flush", "gone"]
        assert list(folder.iterdir()) == []
    finally:
        listener.close()
        hub.close()
    assert not folder.exists()


def test_without_a_folder_for_outboxes_task_ends_go_through_the_channel(monkeypatch):
    def refuse(*args: object, **kwargs: object) -> str:
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(transport.tempfile, "mkdtemp", refuse)
    got: list[object] = []
    listener = Listener(lambda msg, pid: got.append(msg), lambda pid: None)
    listener.start()
    try:
        assert listener.outbox_dir is None and listener.dirty[1] == 1
        sender = Sender(listener.address, listener.token, listener.dirty, listener.outbox_dir)
        for n in range(3):
            sender.send_end(b'E["%d:1",true,null,null,2]\t{}' % n)
        wait_for(lambda: len(got) == 3, 5, "three ends through the channel", 0.01)
        sender.close()
    finally:
        listener.close()


def _outbox_listener() -> tuple[Any, list[str], Any]:
    """A listener on a kombu Hub (outboxes in use), the run ids it handled, its loop."""
    from kombu.asynchronous import Hub

    handled: list[str] = []
    hub = Hub()
    listener = Listener(lambda msg, pid: handled.append(msg["head"][0]), lambda pid: None)
    listener.attach(hub)
    return listener, handled, hub


def test_a_sender_that_reconnects_loses_no_end_left_in_either_outbox():
    """Its old channel closed, a sender connects again with a new outbox: the main
    process handles what the old one held when it sees the old channel close, and
    reads the new one; each end once, none lost."""
    listener, handled, hub = _outbox_listener()
    loop = hub.create_loop()
    folder = listener.outbox_dir
    end = b'E["%d:1",true,null,null,2]\t{}'
    try:
        sender = Sender(listener.address, listener.token, listener.dirty, folder)
        sender.send_end(end % 0)  # connects: hello (outbox 1), then the end
        wait_for(lambda: (next(loop), handled)[1] == ["0:1"], 5, "the first end", 0)
        for n in (1, 2, 3):
            sender.send_end(end % n)  # into outbox 1
        assert sender._sock is not None
        sender._sock.close()  # the channel breaks: the next message reconnects
        sender._sock = None
        sender.send({"type": "tool", "run": "x"})  # hello (outbox 2), then the message
        second = folder / f"{os.getpid()}-2.outbox"  # type: ignore[operator]

        def attached() -> bool:  # the main process mapped outbox 2 (its state byte)
            return second.exists() and second.read_bytes()[40] == 1

        wait_for(lambda: (next(loop), attached())[1], 5, "outbox 2 attached", 0)
        for n in (4, 5, 6):
            sender.send_end(end % n)
        assert struct.unpack_from("<Q", second.read_bytes(), 16)[0] > 0, "not in outbox 2"
        listener.collect()
        wait_for(lambda: (next(loop), sorted(handled))[1] == [f"{n}:1" for n in range(7)], 5,
                 "every end", 0)  # fmt: skip
        assert len(handled) == 7
        names = sorted(p.name for p in folder.iterdir())  # type: ignore[union-attr]
        assert names == [f"{os.getpid()}-2.outbox"], names  # the old one removed
        sender.close()
    finally:
        listener.close()
        hub.close()


def test_ends_go_through_the_channel_when_the_main_process_cannot_map_the_outbox(monkeypatch):
    from taskmeter.celery.outbox import Outbox

    def refuse(*args: object, **kwargs: object) -> Outbox:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(Outbox, "attach", classmethod(lambda cls, *a, **k: refuse()))
    listener, handled, hub = _outbox_listener()
    loop = hub.create_loop()
    end = b'E["%d:1",true,null,null,2]\t{}'
    try:
        sender = Sender(listener.address, listener.token, listener.dirty, listener.outbox_dir)
        sender.send_end(end % 0)  # connects: its hello names the outbox
        wait_for(lambda: (next(loop), handled)[1] == ["0:1"], 5, "the hello and first end", 0)
        assert not listener._boxes  # not mapped
        for n in (1, 2, 3):
            sender.send_end(end % n)
        # The loop's ticks read the channels (never the outboxes): all there.
        wait_for(lambda: (listener._on_tick(), handled)[1] == [f"{n}:1" for n in range(4)],
                 5, "every end, through the channel", 0)  # fmt: skip
        sender.close()
    finally:
        listener.close()
        hub.close()


def test_an_outbox_notes_its_entries_taken_before_their_records_are_written_and_frees_them_after():
    """The order a restart relies on (outbox.leftovers): taken position (T) noted
    before the flush that writes the records, read position (R) moved after it."""
    from kombu.asynchronous import Hub

    hub = Hub()
    seen: list[tuple[int, int, int]] = []  # (W, R, T) of the outbox at each flush
    handled: list[str] = []
    folder: list[Any] = []

    def positions() -> tuple[int, int, int]:
        (path,) = folder[0].glob("*.outbox")
        w, r, t = struct.unpack_from("<QQQ", path.read_bytes(), 16)
        return w, r, t

    def on_batch() -> None:
        if handled and list(folder[0].glob("*.outbox")):
            seen.append(positions())

    listener = Listener(lambda msg, pid: handled.append(msg["head"][0]), lambda pid: None, on_batch)
    folder.append(listener.outbox_dir)
    listener.attach(hub)
    loop = hub.create_loop()
    end = b'E["%d:1",true,null,null,2]\t{}'
    try:
        sender = Sender(listener.address, listener.token, listener.dirty, listener.outbox_dir)
        sender.send_end(end % 0)
        wait_for(lambda: (next(loop), handled)[1] == ["0:1"], 5, "the hello", 0)
        for n in (1, 2, 3):
            sender.send_end(end % n)
        seen.clear()
        listener.collect()
        assert handled[1:] == ["1:1", "2:1", "3:1"]
        (w, r, t), *_ = seen
        assert t == w > r, "the flush came before the entries were noted as taken"
        assert positions() == (w, w, w), "their room was not freed after the flush"
        sender.close()
    finally:
        listener.close()
        hub.close()
