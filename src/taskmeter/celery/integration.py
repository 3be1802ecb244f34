"""Wiring Celery to taskmeter: a worker bootstep and task signals, nothing else.

- ``instrument(app)`` adds the bootstep (and ``celery worker --metrics-port``); it is
  cheap and safe to call in every process that imports the app (web servers too).
- In the worker, the bootstep reads the settings. Disabled: it connects nothing and
  starts nothing. Enabled: in the main process it starts the hub, the metrics
  endpoint and (prefork) the channel from pool processes, and connects the task
  signals. ``task_prerun``/``task_postrun`` run in the thread that runs the task body
  (every pool), so the measurement, its contextvar and its thread CPU are the task's.
- The main process turns Celery's own verdicts (a lost child, a hard time limit, a
  terminate-revoke) into the states of the runs it could not see end.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import os
import re
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery import bootsteps, signals

from taskmeter.celery import otel, outbox, queuewait
from taskmeter.celery.hub import Hub
from taskmeter.celery.journal import Journal
from taskmeter.celery.transport import Listener, Message, Sender
from taskmeter.config import ConfigError, Settings, load_settings
from taskmeter.export.ledger import AnyLedger, Ledger, open_ledger
from taskmeter.export.metrics import JOURNAL_RECOVERED, Observation, TaskMetrics, observation
from taskmeter.export.server import MetricsServer, ServerConfig, start_server
from taskmeter.measure import cgroup
from taskmeter.measure.core import Measurement, unpack_report
from taskmeter.measure.proc import PID as _PID
from taskmeter.measure.report import (
    Cause,
    State,
    TaskReport,
    json_bytes,
    loads,
)
from taskmeter.measure.sampler import configure
from taskmeter.measure.tools import TOOL_STARTED, ToolWatch

log = logging.getLogger("taskmeter.celery")

# Celery's task_postrun states -> TaskReport states. None: ended from outside (a
# terminate-revoke or a hard time limit); the main process's verdict decides.
_STATES: dict[str, State] = {
    "SUCCESS": "success",
    "FAILURE": "failure",
    "RETRY": "retry",
    "REVOKED": "revoked",
    "IGNORED": "success",
    "REJECTED": "failure",
}
# The states in which a pool process ends a run itself, its report final as it is: the
# main process takes its figures and record as they come (Hub.ended_final).
_OWN_END = frozenset(("success", "failure", "retry"))


class _Run:
    """A task running in this process. A pool process tells the main process of its
    start only once the task outlives its first sample (the measurement's first sample
    calls ``on_first_sample`` then); a shorter task sends its start with its end: one
    message per task. ``announced`` is read and set under the worker's lock."""

    __slots__ = ("announced", "m", "run_id", "start", "worker")

    def __init__(self, worker: _Worker, run_id: str, m: Measurement, start: list[Any]) -> None:
        self.worker, self.run_id, self.m, self.start = worker, run_id, m, start
        self.announced = False

    def announce(self) -> None:
        self.worker._announce(self)


class _Worker:
    """The taskmeter state of one worker (main process and, after fork, its children)."""

    def __init__(self, settings: Settings, pool: str, task_names: list[str]) -> None:
        from prometheus_client import CollectorRegistry, ProcessCollector

        self.settings, self.pool = settings, pool
        self.main_pid = os.getpid()
        self.hostname = socket.gethostname()
        self.node = f"celery@{self.hostname}"  # the Celery node name (the step sets it)
        self.journal: Journal | None = None
        self.hub: Hub | None = None
        self.server: MetricsServer | None = None
        self.listener: Listener | None = None
        self.sender: Sender | None = None
        self.ledger: AnyLedger | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.metrics = TaskMetrics(inflight=lambda: self.hub.inflight() if self.hub else [])
        self.registry.register(self.metrics)
        self.metrics.declare(task_names)
        # process_resident_memory_bytes & co. of the main process: the "parent" that
        # sizing adds to N concurrent tasks.
        ProcessCollector(registry=self.registry)
        self.runs: dict[tuple[str | None, int], _Run] = {}
        # the end-line being handled by the listener thread: (report, its encoded record)
        self._pending: tuple[TaskReport, bytes] | None = None
        self._own_sinks: list[Callable[[TaskReport], None]] = []
        # records from end-lines, written to the ledger in one write per round of
        # messages (listener thread only)
        self._ledger_buf: list[bytes] = []
        # Taken for each append and for the swap at a flush: a scrape collects the
        # outboxes in its own thread while the loop's thread flushes.
        self._buf_lock = threading.Lock()
        self.seq = itertools.count(1)
        self.lock = threading.Lock()
        self.patched = False  # subprocess.Popen routed through taskmeter (patch.py)

    # -- main process ---------------------------------------------------------------
    def open(self) -> None:
        s = self.settings
        configure(interval_s=s.sample_interval_s)
        if s.patch_subprocess:  # before the pool forks: every child inherits it
            from taskmeter.measure.patch import patch

            self.patched = patch()
        sinks: list[Callable[[TaskReport], None]] = [self.metrics.observe]
        if s.ledger:
            self.ledger = open_ledger(
                s.ledger, max_bytes=s.ledger_max_bytes, backups=s.ledger_backups
            )
            sinks.append(self._write_ledger)
        if s.journal and self.pool in ("gevent", "eventlet"):
            # one record per OS thread: green threads would each need their own
            log.info("taskmeter: no in-flight journal with the %s pool", self.pool)
        elif s.journal:
            self.journal = Journal.open(s.journal, self.node)
        if self.journal is not None:
            # Tasks a previous incarnation left in flight: reported lost, before any
            # child starts (and may reuse a recorded pid).
            try:
                lost = self.journal.recover(
                    list(sinks), hostname=self.hostname, pool=self.pool,
                    interval_s=s.sample_interval_s,
                )  # fmt: skip
            except Exception:
                log.exception("taskmeter: the in-flight journal failed; running without it")
                self.journal = None
            else:
                if lost:
                    JOURNAL_RECOVERED.inc(len(lost))
                sinks.append(self.journal.report_done)  # last: after metrics and ledger
                try:
                    self._recover_outboxes(self.journal.folder)
                except Exception:  # the worker starts all the same
                    log.exception("taskmeter: recovering the outboxes' records failed")
        # A report its pool process ended goes to these sinks' work without a report
        # rebuilt (_sink_figures) while they are the hub's sinks, all of them.
        self._own_sinks = list(sinks)  # a copy: the hub's list may grow
        self.hub = Hub(
            sinks,
            hostname=self.hostname,
            pool=self.pool,
            interval_s=s.sample_interval_s,
            count_run=self.metrics.count_run,
            is_revoked=_is_revoked,
            observer=self.journal.observe if self.journal is not None else None,
            recall=self._recall if self.journal is not None else None,
        )
        if self.pool == "prefork":
            # Pool processes leave their tasks' ends in outboxes kept beside the
            # journal's records, so they survive a whole-worker kill with them.
            self.listener = Listener(
                self._on_message, self._process_gone, self._flush_ledger,
                outbox_dir=self.journal.folder if self.journal is not None else None,
            )  # fmt: skip
            self.metrics.before_scrape = self.listener.collect
        self.server = start_server(
            self.registry,
            ServerConfig(
                port=s.port,
                addr=s.addr,
                certfile=s.tls_cert,
                keyfile=s.tls_key,
                basic_auth=s.basic_auth,
            ),
            extra_routes={"/inflight": self._inflight_json},
        )
        log.info("taskmeter: serving worker metrics on %s/metrics", self.server.url)

    def start_threads(self, loop: Any = None) -> None:
        """``loop``: the worker's event loop (kombu hub), if it runs one: the channels
        from pool processes are then served in its thread, not in one of ours."""
        if self.hub is not None:
            self.hub.start()
        if self.listener is not None:
            if loop is not None and hasattr(loop, "add_reader") and hasattr(loop, "call_later"):
                self.listener.attach(loop)
            else:
                self.listener.start()

    def close(self) -> None:
        if self.patched:
            from taskmeter.measure.patch import unpatch

            unpatch()
            self.patched = False
        if self.listener is not None:
            self.listener.close()
        if self.hub is not None:
            self.hub.stop()
        if self.server is not None:
            self.server.close()
        if self.ledger is not None:
            self.ledger.close()
        if self.journal is not None:
            self.journal.close()

    def _recover_outboxes(self, folder: Path) -> None:
        """Records of tasks that ended before the previous incarnation died, which its
        main process had not written yet (outbox.py): to the metrics and the ledger, as
        they would have gone. Entries it had taken to write when it died may be in
        the ledger already: each is written unless the ledger's end holds it (with
        no ledger file to look in, skipped: missing rather than twice)."""
        left = outbox.leftovers(folder)
        got: list[tuple[TaskReport, bytes, bool]] = []
        for box in left:
            for line, unsure in [(m, True) for m in box.maybe] + [(f, False) for f in box.fresh]:
                try:
                    if line[:1] == _PACKED_END:
                        report, body = _unpack_end(line)[1:]
                    else:
                        body = line[line.index(b"\t") + 1 :]
                        report = TaskReport.from_dict(loads(body))
                except Exception as exc:  # one bad entry never stops the recovery
                    log.warning("taskmeter: ignored an outbox entry of %s: %s", box.path, exc)
                    continue
                got.append((report, body, unsure))
        tail: set[bytes] = set()
        unsure_size = sum(len(body) + 1 for _, body, unsure in got if unsure)
        if unsure_size and isinstance(self.ledger, Ledger):
            # Taken to be written by the main process when it died: one round's write
            # (of every outbox), at most a little before the file's end.
            tail = set(self.ledger.tail(unsure_size + (1 << 20)).splitlines())
        bodies: list[bytes] = []
        skipped = 0
        for report, body, unsure in got:
            if unsure and (body in tail or not isinstance(self.ledger, Ledger)):
                skipped += 1
                continue
            self.metrics.observe(report)
            bodies.append(body)
        # Every outbox's records in one write, noted as taken right before it and the
        # files removed after: a death midway leaves each of them either untouched or
        # noted (then looked up), never written and forgotten.
        for box in left:
            outbox.note_taken(box)
        if bodies and self.ledger is not None:
            self.ledger.write_many(bodies)
        written = len(bodies)
        for box in left:
            with contextlib.suppress(OSError):
                box.path.unlink()
        for stale in folder.glob("*" + outbox.SUFFIX + ".new"):  # died while making one
            with contextlib.suppress(OSError):
                stale.unlink()
        if written or skipped:
            log.warning(
                "taskmeter: %d record(s) of tasks that ended just before this worker's "
                "previous incarnation died were recovered from its outboxes (%d already "
                "in the ledger, or not known to be missing from it)", written, skipped,
            )  # fmt: skip

    def _write_ledger(self, report: TaskReport) -> None:
        """The ledger sink: the record as the pool process encoded it, when the hub
        passes its report on unchanged (the usual case), else encoded here."""
        assert self.ledger is not None
        pending = self._pending
        if pending is not None and pending[0] is report:
            with self._buf_lock:
                self._ledger_buf.append(pending[1])  # written at the end of the round
        else:
            self.ledger.write(report)

    def _sink_figures(self, obs: Observation, body: bytes) -> None:
        """What the hub's sinks do with a report (see ``open``), from its figures and
        its record: metrics, then the ledger (the journal's sink has nothing to do for
        a run its pool process ended: its record was cleared there)."""
        self.metrics.defer_figures(obs)  # accounted at the next scrape, in a batch
        if self.ledger is not None:
            with self._buf_lock:
                self._ledger_buf.append(body)  # written at the end of the round

    def _flush_ledger(self) -> None:
        """The listener handled a round of messages: their records in one write."""
        if self.ledger is None:
            return
        # The lock held through the write: a flush that finds nothing to write returns
        # only once another thread's write of what it took is done (the listener frees
        # outbox entries after its flush: their records must be written by then).
        with self._buf_lock:
            records, self._ledger_buf = self._ledger_buf, []
            if records:
                self.ledger.write_many(records)

    def _recall(self, task_id: str | None, pid: int | None) -> list[Any]:
        """Runs the journal holds that their pool process has not announced (hub)."""
        if self.journal is None:
            return []
        return [
            (f"{t.pid}:{t.seq}", t.task, task_id or t.task_id, t.pid, t.started, t.cpu0_s)
            for t in self.journal.in_flight(pid=pid, task_id=task_id)
        ]

    def _process_gone(self, pid: int) -> None:
        if self.hub is not None:
            try:
                self.hub.process_gone(pid)
            except Exception:  # the journal's record is still to be handled
                log.exception("taskmeter: handling the exit of pool process %d failed", pid)
        if self.journal is not None:
            try:
                self.journal.child_gone(pid)
            except Exception:  # e.g. EACCES, EROFS, EIO removing its record
                log.exception("taskmeter: the journal could not forget pool process %d", pid)

    def collect(self) -> None:
        """Main process: take in the task ends pool processes left in their outboxes."""
        if self.listener is not None:
            self.listener.collect()

    def _inflight_json(self) -> list[dict[str, Any]]:
        self.collect()  # tasks that ended are not in flight any more
        rows = self.hub.inflight() if self.hub else []
        now = time.time()
        return [
            {
                "task": r.task,
                "task_id": r.task_id,
                "pid": r.pid,
                "running_s": round(now - r.started_at, 3),
                "worker_rss_bytes": r.worker_rss_bytes,
                "tools_rss_bytes": r.tools_rss_bytes,
            }
            for r in rows
        ]

    def _on_message(self, msg: Message, pid: int | None) -> None:
        assert self.hub is not None
        kind = msg.get("type")
        if kind == "end-packed":  # R<run's seq><figures>: a final end, built here
            try:
                run_id, report, body = _unpack_end(msg["entry"])
            except ValueError as exc:
                log.warning("taskmeter: dropped a malformed task end from pid %s: %s", pid, exc)
                return
            obs = observation(report) if report.state in _OWN_END else None
            self._ended(run_id, True, None, obs, body, report)
        elif kind == "end-line":
            # E[run id, final, start fields or null, figures or null, record's length]
            # \t<record>: one message per task
            run_id, final, start, obs, size = msg["head"]
            if len(msg["body"]) != size:  # cut short (the sender stalled): not whole
                log.warning("taskmeter: dropped a report message cut short (pid %s)", pid)
                return
            self._ended(run_id, bool(final), start, obs, msg["body"], None)
        elif kind == "start":
            self.hub.started(
                msg["run"], msg["task"], msg.get("task_id"), int(msg["pid"]),
                float(msg["epoch"]), msg.get("cpu0_s"), oom0=msg.get("oom0"),
            )  # fmt: skip
        elif kind == "end":
            self.hub.ended(msg["run"], TaskReport.from_dict(msg["report"]), bool(msg["final"]))
        elif kind == "tool":
            ticks = msg.get("ticks")
            self.hub.tool_started(
                msg["run"], int(msg["pid"]), None if ticks is None else int(ticks),
                tuple(msg["argv"]), str(msg["exe"]), float(msg["mono"]),
            )  # fmt: skip

    # -- pool process (after fork) ---------------------------------------------------
    def _ended(
        self,
        run_id: str,
        final: bool,
        start: list[Any] | None,
        obs: Observation | None,
        body: bytes,
        report: TaskReport | None,
    ) -> None:
        """A task's end from a pool process: its record as the ledger writes it, the
        metrics' figures when its pool process ended it itself, and its report when
        already built (a packed end's)."""
        assert self.hub is not None
        if obs is not None and self.hub.sinks == self._own_sinks:
            # Ended by its pool process: what the metrics take is known (observation())
            # and the record goes to the ledger as it is; no report rebuilt here.
            if self.hub.ended_final(run_id, obs[1], obs[2]):
                self._sink_figures(obs, body)
            return
        if report is None:
            report = TaskReport.from_trusted(loads(body))
        if start is not None and not final:  # the main process's verdict decides
            task, task_id, pid_, epoch, cpu0, oom0 = start
            self.hub.started(run_id, task, task_id, pid_, epoch, cpu0, oom0=oom0)
        self._pending = (report, body)
        try:
            self.hub.ended(run_id, report, final)
        finally:
            self._pending = None

    def after_fork_in_child(self) -> None:
        """A prefork child: drop the main process's sockets, talk through a channel."""
        if self.server is not None:
            self.server.close()  # in a forked child this only drops its copy of the socket
        if self.listener is not None:
            self.listener.drop_in_child()
            self.sender = Sender(
                self.listener.address, self.listener.token, self.listener.dirty,
                outbox_dir=self.listener.outbox_dir,
            )  # fmt: skip
        self.hub = self.server = self.listener = self.ledger = None
        if self.journal is not None:
            self.journal.after_fork_in_child()
        self.runs = {}
        self.lock = threading.Lock()
        self._pending = None
        if self.sender is not None and self._tool_started not in TOOL_STARTED:
            TOOL_STARTED.append(self._tool_started)

    def _tool_started(self, watch: ToolWatch) -> None:
        """Tell the main process which tools a run started (pid and start time), so it
        can kill them if this process dies before they end."""
        with self.lock:
            run = next((r for r in self.runs.values() if r.m in watch.owners), None)
        run_id = None
        if run is not None:
            self._announce(run)  # the main process must know the run to kill its tools
            run_id = run.run_id
        if run_id is not None:
            self._deliver(
                {
                    "type": "tool",
                    "run": run_id,
                    "pid": watch.pid,
                    "ticks": watch.start_ticks,
                    "argv": list(watch.argv),
                    "exe": watch.exe,
                    "mono": watch.t_start,
                }
            )

    # -- every process: task signals -------------------------------------------------
    def task_started(self, task_name: str, task_id: str | None, request: Any = None) -> None:
        pid = _PID[0]
        seq = next(self.seq)
        run_id = f"{pid}:{seq}"
        m = Measurement(task_name, task_id, pool=self.pool)
        m.start()
        # The process CPU and the time the measurement itself took at its start.
        cpu0, epoch = sum(m._cpu0), m._epoch0
        key = (task_id, threading.get_ident())
        if request is not None:  # in the record as it is built: no copy of it at the end
            m.queue_wait_s = queuewait.wait_s(request, epoch)
        if self.journal is not None:
            self.journal.begin(seq, task_name, task_id, epoch, cpu0)  # memory writes only
        # [5]: the cgroup's OOM-kill counter, read when the run is announced (see
        # _announce); a run that ends first never needs it
        start = [task_name, task_id, pid, epoch, cpu0, None]
        run = _Run(self, run_id, m, start)
        with self.lock:
            self.runs[key] = run
        if self.sender is not None and self.journal is not None:
            # A pool process: the main process hears of the run at its first sample if
            # it still runs then (for /inflight and its tools), else with its end. A
            # death or a verdict in between: the hub recalls it from the journal.
            m.on_first_sample = run.announce
        else:
            self._announce(run)

    def _announce(self, run: _Run) -> None:
        """Tell the main process a run started (once; never after its end was sent)."""
        with self.lock:  # held while sending: the start always goes before the end
            if run.announced:
                return
            run.announced = True
            # The OOM-kill counter, for telling an OOM kill from another SIGKILL should
            # this process die during the run: an OOM kill from now on raises it. Read
            # here (the first sample, ~100 ms in; a tool's start; at once where there is
            # no journal) rather than at every task's start: a kill before the
            # announcement is judged against the main process's reading from before the
            # run's start (Hub.started), and a run that ends first seldom needs it (see
            # task_ended).
            run.start[5] = cgroup.oom_kills()
            task, task_id, pid, epoch, cpu0, oom0 = run.start
            self._deliver(
                {
                    "type": "start",
                    "run": run.run_id,
                    "task": task,
                    "task_id": task_id,
                    "pid": pid,
                    "epoch": epoch,
                    "cpu0_s": cpu0,
                    "oom0": oom0,
                }
            )

    def task_ended(self, task_id: str | None, celery_state: str | None) -> None:
        key = (task_id, threading.get_ident())
        with self.lock:
            run = self.runs.pop(key, None)
            if run is None:
                return
            announced, run.announced = run.announced, True  # no announcement from now
        if not announced:
            run.m.on_first_sample = None
        state = _STATES.get(celery_state or "")
        final = state is not None
        packed: bytes | None = None
        try:
            if (
                final
                and self.sender is not None
                and self.hub is None
                and self.sender.outbox_ready()
                and not _otel_recording()
            ):
                # Most short tasks: the figures packed, the record built by the main
                # process in its next batch (R entries, _Worker._on_message). With a
                # span to annotate, the report is needed here.
                packed = run.m.finish_packed(state)  # type: ignore[arg-type]
            report = None if packed is not None else run.m.finish(state=state or "killed")
        finally:
            if self.journal is not None:
                # Cleared before the report is sent: if the whole worker dies in
                # between, the task is missing rather than recorded twice. Cleared even
                # when finish() raised: the task ended, it must not be recovered as lost.
                self.journal.end()
        if packed is not None:
            assert self.sender is not None
            line = _PACKED_END + _SEQ.pack(int(run.run_id.rpartition(":")[2])) + packed
            if self.sender.put_end(line):
                return
            report = run.m.report  # no room in the outbox: built here, sent as a line
        assert report is not None
        if otel.AVAILABLE:
            try:
                otel.annotate(report)  # the task's span, when one is current (otel.py)
            except Exception:  # the user's tracer: never lose the report for it
                if not _ANNOTATE_FAILED:
                    _ANNOTATE_FAILED.append(True)
                    log.exception("taskmeter: annotating the task's span failed (logged once)")
        if self.hub is not None:  # solo and threads pools: no channel needed
            self.hub.ended(run.run_id, report, final)
        elif self.sender is not None:
            # One line: the run, the start when not announced yet, and the record as
            # the ledger writes it (encoded here, once; the main process only parses it).
            start = None
            if not announced:
                start = run.start
                if not final:  # the main process's verdict decides: it may need the
                    start[5] = cgroup.oom_kills()  # counter (read now, this process alive)
            # A run its pool process ended itself: the metrics' figures too, so that
            # the main process need not rebuild the report (_Worker._sink_figures).
            obs = observation(report) if state in _OWN_END else None
            body = report.to_json_bytes()
            head = json_bytes([run.run_id, final, start, obs, len(body)])
            line = _END + head + b"\t" + body
            if final:  # collected in a batch (outbox.py); a verdict is needed sooner
                self.sender.send_end(line)
            else:
                self.sender.send_line(line + b"\n")

    def _deliver(self, msg: Message) -> None:
        if self.hub is not None:
            self._on_message(msg, None)  # solo and threads pools: no channel needed
        elif self.sender is not None:
            self.sender.send(msg)


# A task's end in an outbox or channel: E<head JSON>\t<record>, or (outboxes only)
# R<the run's sequence number><Measurement.finish_packed's figures>
_END, _PACKED_END = b"E", b"R"
_SEQ = struct.Struct("=q")


def _unpack_end(entry: bytes) -> tuple[str, TaskReport, bytes]:
    """(run id, report, record as the ledger writes it) of an R entry; ValueError if it
    is not one."""
    if entry[:1] != _PACKED_END or len(entry) < 1 + _SEQ.size:
        raise ValueError("not a packed task end")
    (seq,) = _SEQ.unpack_from(entry, 1)
    report = unpack_report(memoryview(entry)[1 + _SEQ.size :])
    try:
        body = report.to_json_bytes()
    except Exception as exc:  # never stop a collection or a recovery for one entry
        raise ValueError(f"its record cannot be written: {exc!r}") from None
    return f"{report.worker.pid}:{seq}", report, body


def _otel_recording() -> bool:
    """Whether an OpenTelemetry span records (its annotation needs the report built
    here); True when asking fails (the safe side: the report is built)."""
    try:
        return otel.recording()
    except Exception:
        return True


_ANNOTATE_FAILED: list[bool] = []  # otel.annotate raised once (logged once)


def _is_revoked(task_id: str) -> bool:
    from celery.worker import state as worker_state

    return task_id in worker_state.revoked


_WORKER: _Worker | None = None


# -- signal handlers (connected only while a worker has taskmeter enabled) ---------------
def _on_prerun(sender: Any = None, task_id: str | None = None, task: Any = None, **_: Any) -> None:
    if _WORKER is not None:
        _WORKER.task_started(
            getattr(task, "name", None) or str(sender), task_id, getattr(task, "request", None)
        )


def _on_postrun(
    sender: Any = None, task_id: str | None = None, state: str | None = None, **_: Any
) -> None:
    if _WORKER is not None:
        _WORKER.task_ended(task_id, state)


def _on_process_init(**_: Any) -> None:
    if _WORKER is not None and os.getpid() != _WORKER.main_pid:
        _WORKER.after_fork_in_child()


def _on_task_failure(
    sender: Any = None, task_id: str | None = None, exception: BaseException | None = None,
    **_: Any,
) -> None:  # fmt: skip
    # In the main process only: a child lost mid-task or killed by a hard time limit.
    if _WORKER is None or os.getpid() != _WORKER.main_pid or _WORKER.hub is None:
        return
    from billiard.exceptions import (  # type: ignore[import-untyped]
        TimeLimitExceeded,
        WorkerLostError,
    )

    if isinstance(exception, (WorkerLostError, TimeLimitExceeded)) and task_id:
        cause = "time_limit" if isinstance(exception, TimeLimitExceeded) else _lost_cause(exception)
        _WORKER.collect()  # an end its pool process left in its outbox comes first
        _WORKER.hub.verdict(task_id, getattr(sender, "name", str(sender)), "killed", cause)


def _lost_cause(exc: BaseException) -> Cause | None:
    """What billiard's WorkerLostError says of the child's death ("Worker exited
    prematurely: signal 9 (SIGKILL) Job: 3."). SIGKILL, or nothing said: None (the hub
    decides from the cgroup's OOM-kill counter); another signal, or an exit code (the
    child exited mid-task), is never the OOM killer: "signal"."""
    text = str(exc)
    found = re.search(r"signal (\d+)", text)
    if found:
        return None if int(found.group(1)) == signal.SIGKILL else "signal"
    return "signal" if "exitcode" in text else None


def _on_task_revoked(sender: Any = None, request: Any = None, **_: Any) -> None:
    if _WORKER is None or os.getpid() != _WORKER.main_pid or _WORKER.hub is None:
        return
    task_id = getattr(request, "id", None)
    name = getattr(sender, "name", None) or getattr(request, "task", None) or "unknown"
    if task_id:
        _WORKER.collect()  # an end its pool process left in its outbox comes first
        _WORKER.hub.verdict(task_id, name, "revoked")


_HANDLERS: list[tuple[Any, Any]] = [
    (signals.task_prerun, _on_prerun),
    (signals.task_postrun, _on_postrun),
    (signals.worker_process_init, _on_process_init),
    (signals.task_failure, _on_task_failure),
    (signals.task_revoked, _on_task_revoked),
]


def _connect() -> None:
    for sig, handler in _HANDLERS:
        sig.connect(handler, weak=False)


def _disconnect() -> None:
    for sig, handler in _HANDLERS:
        sig.disconnect(handler)


def _pool_name(worker: Any) -> str:
    """The pool as `celery worker -P` names it (its module is celery.concurrency.<x>)."""
    pool_cls = getattr(worker, "pool_cls", None)
    module = getattr(pool_cls, "__module__", "") or ""
    name = module.rsplit(".", 1)[-1]
    return {"thread": "threads", "": "prefork"}.get(name, name)


class TaskmeterStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Worker bootstep: measures every task of this worker and serves the metrics."""

    label = "taskmeter"
    requires = ("celery.worker.components:Pool",)
    enabled_default = True

    def __init__(self, parent: Any, metrics_port: int | None = None, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        env = dict(os.environ)
        if metrics_port is not None:
            # --metrics-port enables metrics unless ENABLE_WORKER_METRICS says otherwise.
            env["TASKMETER_PORT"] = str(metrics_port)
            if not env.get("ENABLE_WORKER_METRICS", "").strip():
                env["ENABLE_WORKER_METRICS"] = "1"
        try:
            settings = load_settings(parent.app.conf, env, enabled_default=self.enabled_default)
        except ConfigError as exc:
            raise SystemExit(f"taskmeter: {exc}") from exc
        self.settings = settings
        self.worker: _Worker | None = None
        if not settings.enabled:
            log.info("taskmeter: worker metrics disabled (ENABLE_WORKER_METRICS)")
            return
        global _WORKER
        names = sorted(n for n in parent.app.tasks if not n.startswith("celery."))
        self.worker = _Worker(settings, _pool_name(parent), names)
        self.worker.node = str(getattr(parent, "hostname", None) or self.worker.node)
        # taskmeter_worker_info{pool,concurrency}: solo runs one task at a time whatever -c says.
        concurrency = int(getattr(parent, "concurrency", 1) or 1)
        if self.worker.pool == "solo":
            concurrency = 1
        self.worker.metrics.set_worker_info(self.worker.pool, concurrency)
        # Bound before the pool forks, so every child knows where to report.
        try:
            self.worker.open()
        except Exception as exc:
            self.worker.close()
            self.worker = None
            raise SystemExit(f"taskmeter: {exc}") from exc
        _WORKER = self.worker
        _connect()

    def start(self, parent: Any) -> None:
        if self.worker is not None:
            self.worker.start_threads(getattr(parent, "hub", None))

    def register_with_event_loop(self, parent: Any, hub: Any) -> None:
        # Celery calls this at every start of its event loop, including after a lost
        # broker connection, when it has reset the hub and so dropped our readers.
        w = self.worker
        if w is not None and w.listener is not None and w.listener._loop is not None:
            w.listener.attach(hub)

    def stop(self, parent: Any) -> None:
        # Warm shutdown: steps stop in reverse order, so this one stops before the pool
        # has finished the tasks it still runs, whose reports come after. With pool
        # processes, close once the worker has stopped (Celery sends worker_shutdown
        # after the pool joined its processes), or their reports would be refused.
        if self.worker is not None and self.worker.listener is not None:
            signals.worker_shutdown.connect(self._on_worker_shutdown, weak=False)
            atexit.register(self._close)  # should worker_shutdown never come
            return
        self._close()

    def _on_worker_shutdown(self, **_: Any) -> None:
        signals.worker_shutdown.disconnect(self._on_worker_shutdown)
        self._close()

    def terminate(self, parent: Any) -> None:
        # Cold shutdown: this step terminates before the pool kills its processes
        # mid-task. Close at exit instead, after the pool is gone, so the tasks it
        # killed are recorded (killed, their tools killed) rather than dropped.
        if self.worker is not None and self.worker.listener is not None:
            atexit.register(self._close)
            return
        self._close()

    def shutdown(self, parent: Any) -> None:
        self._close()

    def _close(self) -> None:
        global _WORKER
        atexit.unregister(self._close)
        if self.worker is not None:
            _disconnect()
            self.worker.close()
            if _WORKER is self.worker:
                _WORKER = None
            self.worker = None


class AutoTaskmeterStep(TaskmeterStep):
    """The step the plugin adds with no code change: off unless ENABLE_WORKER_METRICS
    is set true (or --metrics-port given)."""

    enabled_default = False


def _add_option(app: Any) -> None:
    import click
    from celery.bin.worker import worker

    options = app.user_options["worker"]
    if not any("--metrics-port" in getattr(o, "opts", ()) for o in [*options, *worker.params]):
        options.add(
            click.Option(
                ["--metrics-port"],
                type=int,
                default=None,
                help="taskmeter: serve worker metrics on this port (enables them).",
            )
        )


_STAMP_UID = "taskmeter.queuewait.stamp"


def instrument(app: Any, *, patch_subprocess: bool | None = None) -> None:
    """Measure every task of ``app``'s workers and serve the metrics from each worker.

    One line in the Celery module; reversible with :func:`uninstrument`. The worker
    decides at start-up from ENABLE_WORKER_METRICS (on unless set false) and the other
    TASKMETER_* settings (environment first, then ``app.conf``).

    ``patch_subprocess=True`` routes every ``subprocess.Popen`` a task starts through
    taskmeter (``app.conf.taskmeter_patch_subprocess``; TASKMETER_PATCH_SUBPROCESS
    in the environment still wins).
    """
    if patch_subprocess is not None:
        app.conf.taskmeter_patch_subprocess = patch_subprocess
    steps = app.steps["worker"]
    if not any(issubclass(s, TaskmeterStep) for s in steps):
        steps.add(TaskmeterStep)
    _add_option(app)
    # Senders stamp each message with its publish time (queue wait; queuewait.py).
    signals.before_task_publish.connect(queuewait.stamp, weak=False, dispatch_uid=_STAMP_UID)


def uninstrument(app: Any) -> None:
    """Undo :func:`instrument`: no step, no option, no signal handlers."""
    steps = app.steps["worker"]
    for step in [s for s in steps if isinstance(s, type) and issubclass(s, TaskmeterStep)]:
        steps.discard(step)
    options = app.user_options["worker"]
    for opt in [o for o in options if "--metrics-port" in getattr(o, "opts", ())]:
        options.discard(opt)
    signals.before_task_publish.disconnect(dispatch_uid=_STAMP_UID)
    if _WORKER is not None:
        _disconnect()
