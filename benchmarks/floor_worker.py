"""A Celery worker whose pool processes do only what measuring a task must ask of the
kernel, for ``bench_worker.py --floor``: an experiment, not taskmeter.

    python benchmarks/floor_worker.py -A tmapp worker ...   # same arguments as celery

Run with taskmeter enabled (``ENABLE_WORKER_METRICS=1``): the main process is
taskmeter's own, unchanged (channel, hub, metrics, ledger). Each pool process replaces
taskmeter's per-task work with its system calls alone, the ones a measurement makes
(``docs/measurement.md``): at the start ``getrusage`` of the children, the
``clear_refs`` write, a ``/proc/self/statm`` read, ``getrusage`` of the thread and of
the process; at the end ``getrusage`` of the process, a ``statm`` read, ``getrusage``
of the children; then one message over the real channel carrying a record made once
per task name by a real measurement at that name's first task in each pool process
(so the main process handles a real record; that measurement's sampler thread then
stays parked). Otherwise no measurement object, no record built, no journal slot. What
this worker adds over taskmeter-off is the cost of measuring a task with next to no
Python in the pool: every record it sends is the same copy (its task id null).

With ``TM_FLOOR_SEND=0`` (``bench_worker.py --floor``'s second floor worker) the pool
processes make the system calls and send nothing: the least a design costs whose main
process does no work per task (the pool processes aggregating their own metrics and
writing their own ledger lines), which no message per task can beat.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from typing import Any

from taskmeter.celery import integration as tm
from taskmeter.measure.core import Measurement
from taskmeter.measure.report import json_bytes

try:
    from taskmeter.export.metrics import observation
except ImportError:  # a baseline tree from before it
    observation = None  # type: ignore[assignment]

_BODIES: dict[str, tuple[bytes, Any]] = {}  # task name -> its record, made once
_FDS: list[int] = []  # /proc/self/statm and clear_refs, opened in the pool process
_STARTS: dict[int, tuple[str, Any, float, float]] = {}  # worker object -> its task's start
_SEND = os.environ.get("TM_FLOOR_SEND", "1") != "0"


def _fds() -> list[int]:
    if not _FDS:
        _FDS.append(os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC))
        _FDS.append(os.open("/proc/self/clear_refs", os.O_WRONLY | os.O_CLOEXEC))
    return _FDS


def task_started(self: Any, task_name: str, task_id: Any, request: Any = None) -> None:
    statm, clear = _fds()
    resource.getrusage(resource.RUSAGE_CHILDREN)
    os.write(clear, b"5")
    os.pread(statm, 256, 0)
    resource.getrusage(resource.RUSAGE_THREAD)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    _STARTS[id(self)] = (task_name, task_id, time.time(), ru.ru_utime + ru.ru_stime)


def task_ended(self: Any, task_id: Any, celery_state: Any) -> None:
    statm, _ = _fds()
    resource.getrusage(resource.RUSAGE_SELF)
    os.pread(statm, 256, 0)
    resource.getrusage(resource.RUSAGE_CHILDREN)
    started = _STARTS.pop(id(self), None)
    if started is None or not _SEND:  # no start seen (as taskmeter: nothing to send)
        return
    name, tid, epoch, cpu0 = started
    made = _BODIES.get(name)
    if made is None:
        m = Measurement(name, None, pool="prefork")
        m.start()
        report = m.finish()
        # The metrics' figures and the record's length too, where the tree's main
        # process takes them (_Worker._sink_figures; older trees: a head of three).
        obs = observation(report) if observation is not None else None
        made = _BODIES[name] = (report.to_json_bytes(), obs)
    body, obs = made
    pid = tm._PID[0]
    fields: list[Any] = [f"{pid}:{next(self.seq)}", True, [name, tid, pid, epoch, cpu0, None]]
    if obs is not None:
        fields += [[name, tid, *obs[2:]], len(body)]
    head = json_bytes(fields)
    if self.sender is not None:
        line = b"E" + head + b"\t" + body
        if hasattr(self.sender, "send_end"):  # a tree with outboxes (outbox.py)
            self.sender.send_end(line)
        else:
            self.sender.send_line(line + b"\n")


tm._Worker.task_started = task_started  # type: ignore[method-assign]
tm._Worker.task_ended = task_ended  # type: ignore[method-assign]

if __name__ == "__main__":
    from celery.__main__ import main

    sys.argv[0] = "celery"
    sys.exit(main())
