"""The report channel (celery/transport.py) at unit level: what a handler raises stays
out of the listener, and a sender whose reader stalls gives up instead of blocking."""

from __future__ import annotations

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
