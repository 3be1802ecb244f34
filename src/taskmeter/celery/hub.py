"""The worker's one collection point (main worker process).

Every pool process reports task starts and finished TaskReports here; the hub decides
each run's final state, keeps the live view, and hands every finished report to the
sinks (the Prometheus collector, the ledger). It knows nothing of sockets or Celery
signals: the transport and the integration call it.

Final states. A run's report from the process that ran it is final unless Celery
ended the task from outside (state unknown to the child). Then the main process's
verdict decides: a hard time limit or a lost child is "killed", a terminate-revoke is
"revoked". A child that died mid-task (SIGKILL, OOM killer) sends nothing; the hub
finalises that run from what it observed of the child while it lived (its RSS, its
own high-water mark since the task started, its CPU), so killed tasks, the ones that
decide memory limits, are never lost.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil

from taskmeter.export.metrics import InflightTask
from taskmeter.measure import cgroup, orphans
from taskmeter.measure.proc import READER
from taskmeter.measure.report import (
    Cause,
    ProcessStats,
    SamplerInfo,
    State,
    TaskReport,
    ToolRun,
    ToolTotals,
    WorkerInfo,
    iso_utc,
)
from taskmeter.measure.sampler import RssSeries

log = logging.getLogger("taskmeter.hub")

# What the main process can recall of a run its pool process has not announced yet
# (from the in-flight journal): (run id, task, task id, pid, start epoch, CPU at start).
RunStart = tuple[str, str, "str | None", int, float, "float | None"]

# WorkerLostError reaches the main process about a second after the child died.
VERDICT_GRACE_S = 3.0
_REMEMBER = 10_000  # finished run and task ids kept to drop late or duplicate events


@dataclass
class Run:
    run_id: str
    task: str
    task_id: str | None
    pid: int
    started_epoch: float
    started_mono: float
    cpu0_s: float | None = None
    rss: RssSeries = field(default_factory=RssSeries)
    hwm: int = 0
    tools_rss: int = 0
    worker_rss: int = 0
    footprint: int = 0
    cpu_s: float | None = None
    verdict: tuple[State, float] | None = None
    partial: tuple[TaskReport, float] | None = None
    child_gone_at: float | None = None
    # OOM named: the cgroup's OOM-kill counter when the run started and when its death
    # was first seen; the main process's word on the cause (time_limit, signal).
    oom0: int | None = None
    oom_end: int | None = None
    cause_hint: Cause | None = None
    # No orphaned tools: the tools the pool process started (by pid), and those the
    # main process killed after the pool process died.
    tools: dict[int, SeenTool] = field(default_factory=dict)
    killed_tools: list[ToolRun] = field(default_factory=list)


@dataclass
class SeenTool:
    """A tool as the main process knows it: identity (pid and start time, from the pool
    process that started it) and what the hub sampled of it while it lived."""

    pid: int
    ticks: int | None
    argv: tuple[str, ...]
    exe: str
    started_mono: float
    rss: RssSeries = field(default_factory=RssSeries)
    hwm: int = 0
    handled: bool = False
    # its descendants seen alive (pid -> start ticks): what it started may outlive it
    members: dict[int, int] = field(default_factory=dict)


# How long the main process keeps watching a killed or revoked run's tools after its
# report: its pool process may die (and orphan them) after Celery's verdict.
LINGER_S = 30.0


class Hub:
    def __init__(
        self,
        sinks: list[Callable[[TaskReport], None]],
        *,
        hostname: str,
        pool: str,
        interval_s: float,
        count_run: Callable[[str, str], None] | None = None,
        is_revoked: Callable[[str], bool] | None = None,
        observer: Callable[[list[Run]], None] | None = None,
        recall: Callable[[str | None, int | None], list[RunStart]] | None = None,
    ) -> None:
        self.sinks = sinks  # its owner may add one later
        # Pool processes announce a run only once it outlives its first sample (a short
        # task sends its start with its end): on a death or a verdict about a run not
        # announced, the hub recalls it (by task id or pid) from the journal.
        self._recall = recall
        # The cgroup's OOM-kill counter as read at each tick (monotonic time, value), for
        # a recalled run: the last reading from before its start.
        self._oom_readings: deque[tuple[float, int | None]] = deque(maxlen=256)
        # called at each tick with the runs in flight, after they were observed (the
        # in-flight journal records what the main process knows of each)
        self._observer = observer
        self._count_run = count_run
        self._is_revoked = is_revoked or (lambda _task_id: False)
        self.hostname, self.pool, self.interval_s = hostname, pool, interval_s
        self._lock = threading.Lock()
        self._runs: dict[str, Run] = {}
        self._done_runs: OrderedDict[str, None] = OrderedDict()
        self._done_tasks: OrderedDict[str, State] = OrderedDict()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._main_pid = os.getpid()
        self._death_lock = threading.Lock()
        self._lingering: dict[str, tuple[Run, float]] = {}

    # -- events -----------------------------------------------------------------
    def started(
        self,
        run_id: str,
        task: str,
        task_id: str | None,
        pid: int,
        started_epoch: float,
        cpu0_s: float | None = None,
        oom0: int | None = None,
    ) -> None:
        now = time.monotonic()
        # The start as the pool process stamped it, on this clock (announced late).
        started_mono = now - min(max(time.time() - started_epoch, 0.0), 3600.0)
        if oom0 is None:  # the pool process's reading as it announced the run, else
            oom0 = self._oom_before(started_mono)  # the hub's last before its start
        with self._lock:
            if run_id in self._done_runs or run_id in self._runs:
                return
            self._runs[run_id] = Run(
                run_id, task, task_id, pid, started_epoch, started_mono, cpu0_s, oom0=oom0
            )

    def _oom_before(self, t: float) -> int | None:
        """The OOM-kill counter as last read at or before ``t``, else read now."""
        for at, value in reversed(self._oom_readings):
            if at <= t:
                return value
        return cgroup.oom_kills()

    def _recall_run(self, task_id: str | None = None, pid: int | None = None) -> None:
        """Make the run(s) a verdict or a death is about known, if their pool process
        had not announced them yet."""
        if self._recall is None:
            return
        with self._lock:
            if any(
                (task_id is not None and r.task_id == task_id) or (pid is not None and r.pid == pid)
                for r in self._runs.values()
            ):
                return
        try:
            starts = self._recall(task_id, pid)
        except Exception:
            log.exception("taskmeter: recalling a run from the journal failed")
            return
        for start in starts:
            self.started(*start)

    def tool_started(
        self,
        run_id: str,
        pid: int,
        ticks: int | None,
        argv: tuple[str, ...],
        exe: str,
        started_mono: float,
    ) -> None:
        """A pool process started a tool for a run (its pid and start time: identity)."""
        with self._lock:
            run = self._runs.get(run_id)
            if run is not None:
                run.tools[pid] = SeenTool(pid, ticks, argv, exe, started_mono)

    def ended(self, run_id: str, report: TaskReport, final: bool) -> None:
        """A run's report from the process that ran it. ``final`` is False when Celery
        ended the task from outside and the main process's verdict decides its state."""
        with self._lock:
            if run_id in self._done_runs:
                return
            run = self._runs.get(run_id)
            if final or run is None:
                self._runs.pop(run_id, None)
                finished = [self._finish_locked(run_id, report)]
            elif run.verdict is not None:
                del self._runs[run_id]
                state = run.verdict[0]
                finished = [self._finish_locked(run_id, self._final(run, report, state))]
            else:
                run.partial = (report, time.monotonic())
                finished = []
        self._emit(finished)

    def ended_final(self, run_id: str, task_id: str | None, state: State) -> bool:
        """A run its pool process ended itself (``final``), whose report the caller
        hands to the sinks itself (the record as the pool process encoded it, no report
        rebuilt here): :meth:`ended`'s bookkeeping only. False for a run already
        finished (a late or duplicate message): then nothing is to be reported."""
        with self._lock:
            if run_id in self._done_runs:
                return False
            self._runs.pop(run_id, None)
            self._done(run_id, task_id, state)
        return True

    def verdict(self, task_id: str, task: str, state: State, cause: Cause | None = None) -> None:
        """The main process's word on how a task ended (killed, revoked), and why when
        it knows (``time_limit``; ``signal`` for a child that died of another signal
        than SIGKILL, which cannot be the OOM killer)."""
        self._recall_run(task_id=task_id)
        with self._lock:
            if task_id in self._done_tasks:
                return  # e.g. Celery 5.7 sends task_failure twice on a hard time limit
            runs = [r for r in self._runs.values() if r.task_id == task_id]
            if not runs:
                # Never started here (revoked while queued): a run with no measurement.
                self._remember_task(task_id, state)
                count = self._count_run
            else:
                count = None
                for run in runs:
                    run.verdict = (state, time.monotonic())
                    run.cause_hint = run.cause_hint or cause
        if count is not None:
            count(task, state)
        self.tick()

    def process_gone(self, pid: int) -> None:
        """A pool process exited or closed its channel."""
        self._recall_run(pid=pid)
        now = time.monotonic()
        with self._lock:
            gone = [r for r in self._runs.values() if r.pid == pid and r.child_gone_at is None]
            for run in gone:
                run.child_gone_at = now
        for run in gone:
            try:
                self._after_death(run)
            except Exception:  # never take the listener thread down with it
                log.exception("taskmeter: handling the death of pool process %d failed", pid)

    # -- periodic work ----------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="taskmeter-hub", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.tick(final=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.tick()
            except Exception:
                log.exception("taskmeter hub tick failed")

    def tick(self, final: bool = False) -> None:
        """Observe in-flight pool processes, and finalise runs whose end is known."""
        now = time.monotonic()
        orphans.reap_pending()  # killed tools not dead yet at their kill (as PID 1)
        if self._recall is not None:
            self._oom_readings.append((now, cgroup.oom_kills()))
        with self._lock:
            runs = list(self._runs.values())
        for run in runs:
            if run.pid != self._main_pid and run.child_gone_at is None:
                self._observe(run, now)
        if self._observer is not None:
            try:
                self._observer(runs)
            except Exception:
                log.exception("taskmeter: updating the in-flight journal failed")
        for run in runs:
            if run.pid != self._main_pid and (run.child_gone_at or run.verdict or run.partial):
                self._after_death_safe(run)
        with self._lock:
            lingering = list(self._lingering.items())
        for run_id, (run, until) in lingering:
            self._after_death_safe(run)
            if now > until or all(t.handled for t in run.tools.values()):
                with self._lock:
                    self._lingering.pop(run_id, None)
        finished = []
        with self._lock:
            for run in list(self._runs.values()):
                report = self._decide_locked(run, now, final)
                if report is not None:
                    del self._runs[run.run_id]
                    finished.append(self._finish_locked(run.run_id, report))
        self._emit(finished)

    def _observe(self, run: Run, now: float) -> None:
        procs = READER.tree(run.pid)
        if not procs:
            run.child_gone_at = run.child_gone_at or now
            return
        worker = next((p for p in procs if p.pid == run.pid), None)
        if worker is None:
            return
        tools = sum(p.rss_bytes for p in procs if p.pid != run.pid)
        run.worker_rss, run.tools_rss = worker.rss_bytes, tools
        run.rss.add(now, worker.rss_bytes)
        # The child reset its high-water mark when the task started: this is the
        # task's exact peak up to now.
        run.hwm = max(run.hwm, worker.hwm_bytes or 0, worker.rss_bytes)
        run.footprint = max(run.footprint, worker.rss_bytes + tools)
        if run.tools:
            self._observe_tools(run, now)
        try:
            t = psutil.Process(run.pid).cpu_times()
            run.cpu_s = t.user + t.system
        except psutil.Error:
            pass

    def _decide_locked(self, run: Run, now: float, final: bool) -> TaskReport | None:
        if run.verdict is not None:
            state, at = run.verdict
            if run.partial is not None:
                return self._final(run, run.partial[0], state)
            waited = now - at
            if final or waited > VERDICT_GRACE_S or (run.child_gone_at and waited > 0.2):
                return self._observed_report(run, state)
            return None
        if run.partial is not None and (final or now - run.partial[1] > VERDICT_GRACE_S):
            revoked = run.task_id is not None and self._is_revoked(run.task_id)
            return self._final(run, run.partial[0], "revoked" if revoked else "killed")
        if run.child_gone_at is not None and (final or now - run.child_gone_at > VERDICT_GRACE_S):
            return self._observed_report(run, "killed")
        return None

    def _observed_report(self, run: Run, state: State) -> TaskReport:
        """A report for a run whose process died before it could send one."""
        # It ended when it was seen gone or judged, whichever came first, not now.
        ends = [t for t in (run.child_gone_at, run.verdict and run.verdict[1]) if t]
        end = min(ends, default=time.monotonic())
        wall = max(end - run.started_mono, 0.0)
        cpu = 0.0
        if run.cpu_s is not None and run.cpu0_s is not None:
            cpu = max(run.cpu_s - run.cpu0_s, 0.0)
        peak = max(run.hwm, run.rss.peak)
        overhead = ProcessStats(
            wall_s=wall,
            cpu_s=cpu,
            user_s=cpu,  # /proc CPU of a dead process: no user/sys split was kept
            sys_s=0.0,
            rss_avg_bytes=run.rss.avg,
            rss_peak_bytes=peak,
            # the high-water mark as last read, not at death; "none": never observed
            # (it died before its first sample, e.g. in one allocation holding the GIL)
            peak_method="sampled" if peak else "none",
        )
        report = TaskReport(
            task=run.task,
            task_id=run.task_id,
            state=state,
            started_at=iso_utc(run.started_epoch),
            ended_at=iso_utc(run.started_epoch + wall),
            wall_s=wall,
            cpu_s=cpu,
            overhead=overhead,
            tools=(),
            tool_totals=ToolTotals(runs=0, wall_s=0.0, cpu_s=0.0, rss_peak_bytes=0),
            footprint_peak_bytes=max(run.footprint, peak),
            phases=(),
            unattributed_child_cpu_s=0.0,
            worker=WorkerInfo(hostname=self.hostname, pid=run.pid, pool=self.pool),
            sampler=SamplerInfo(interval_s=self.interval_s),
        )
        return self._final(run, report, state)

    # -- deaths: OOM named, no orphaned tools ------------------------------------------
    def _observe_tools(self, run: Run, now: float) -> None:
        """Sample each live tool of a run (its tree), dropping the tools that ended."""
        for tool in list(run.tools.values()):
            if tool.handled:
                continue
            if orphans.still_running(tool.pid, tool.ticks, run.pid) is False:
                # Ended; what it started in the background may live on.
                tool.members = {p: t for p, t in tool.members.items() if orphans.same_process(p, t)}
                if not tool.members:
                    with self._lock:
                        run.tools.pop(tool.pid, None)  # ended (and reaped): forget it
                continue
            sub = READER.tree(tool.pid)
            if sub:
                tool.rss.add(now, sum(p.rss_bytes for p in sub))
                tool.hwm = max(tool.hwm, max(p.hwm_bytes or p.rss_bytes for p in sub))
                pids = {p.pid for p in sub}
                for pid in pids - tool.members.keys() - {tool.pid}:
                    st = orphans.read_stat(pid)
                    if st is not None and st.ppid in pids:  # (not a pid reused since)
                        tool.members[pid] = st.start_tick

    def _after_death_safe(self, run: Run) -> None:
        """:meth:`_after_death` for one run of a tick: a run whose handling raises must
        not stop the others' (nor the tick that reports killed runs)."""
        try:
            self._after_death(run)
        except Exception:
            log.exception(
                "taskmeter: handling the death of pool process %d (task %s) failed",
                run.pid, run.task,
            )  # fmt: skip

    def _after_death(self, run: Run) -> None:
        """The run's pool process died or was judged: note the OOM-kill counter, and
        kill the tools it left running (verified by pid and start time). Runs again at
        each tick until the run is final: a dying process's children are re-parented a
        moment after its channel closes."""
        with self._death_lock:
            if run.oom_end is None:
                run.oom_end = cgroup.oom_kills()
            with self._lock:
                tools = [t for t in run.tools.values() if not t.handled]
            for tool in tools:
                orphaned = orphans.still_running(tool.pid, tool.ticks, run.pid)
                if orphaned is None:
                    continue  # still its pool process's child: that process lives
                tool.handled = True
                killed = orphans.kill_tool(tool.pid, tool.ticks, run.pid) if orphaned else None
                if killed is not None:
                    log.warning(
                        "taskmeter: killed tool %s (pid %d, %d process(es), %d MiB) left "
                        "running by the dead pool process %d of task %s[%s]",
                        tool.exe, tool.pid, killed.processes, killed.rss_bytes >> 20, run.pid,
                        run.task, run.task_id,
                    )  # fmt: skip
                    tool_run = self._killed_tool_run(run, tool, killed, time.monotonic())
                    with self._lock:
                        run.killed_tools.append(tool_run)
                # Its descendants that outlived it (the tool itself was killed on the
                # way out, or ended leaving them in the background).
                members = list(tool.members.items())
                strays = [k for p, t in members if (k := orphans.kill_tool(p, t, run.pid))]
                if strays:
                    log.warning(
                        "taskmeter: killed %d process(es) (%d MiB) that tool %s (pid %d) of "
                        "task %s[%s] left running",
                        sum(k.processes for k in strays), sum(k.rss_bytes for k in strays) >> 20,
                        tool.exe, tool.pid, run.task, run.task_id,
                    )  # fmt: skip

    @staticmethod
    def _killed_tool_run(run: Run, tool: SeenTool, k: orphans.Killed, end: float) -> ToolRun:
        """A tool run from the main process's view: its last figures before the kill."""
        tool.rss.add(end, k.rss_bytes)
        tool.rss.close()
        peak = max(k.hwm_bytes, tool.hwm, tool.rss.peak)
        return ToolRun(
            argv=tool.argv,
            exe=tool.exe,
            pid=tool.pid,
            exit_code=None,
            signal=9,
            start_s=max(tool.started_mono - run.started_mono, 0.0),
            end_s=max(end - run.started_mono, 0.0),
            wall_s=max(end - tool.started_mono, 0.0),
            cpu_s=k.cpu_s,
            user_s=k.cpu_s,  # /proc CPU of the tree: no user/sys split kept
            sys_s=0.0,
            rss_avg_bytes=tool.rss.avg,
            rss_peak_bytes=peak,
            # one process: its VmHWM read while stopped is its exact peak
            peak_method="hwm" if k.processes == 1 and k.hwm_bytes >= peak else "sampled",
            samples=tool.rss.n,
            read_bytes=k.read_bytes,
            write_bytes=k.write_bytes,
            cause="orphan-killed",
        )

    def _cause(self, run: Run, state: State) -> Cause | None:
        """Why a killed run's process died: what the main process was told (Celery's
        hard time limit; a signal other than SIGKILL or an exit, which the OOM killer
        never causes), else the OOM killer when the cgroup's OOM-kill counter rose while
        the run lived, else a plain signal; ``unknown`` where there is no counter to ask
        (no memory cgroup: macOS, ...)."""
        if state != "killed":
            return None
        if run.cause_hint is not None:
            return run.cause_hint
        end = run.oom_end if run.oom_end is not None else cgroup.oom_kills()
        if run.oom0 is None or end is None:
            return "unknown"
        return "oom" if end > run.oom0 else "signal"

    def _final(self, run: Run, report: TaskReport, state: State) -> TaskReport:
        """``report`` in its final state, with its cause and the tools killed as orphans
        (replacing what the pool process last knew of them)."""
        cause = self._cause(run, state)
        if run.pid != self._main_pid and any(not t.handled for t in run.tools.values()):
            # Its pool process may die after this verdict: keep watching its tools.
            self._lingering[run.run_id] = (run, time.monotonic() + LINGER_S)
        if not run.killed_tools:
            return dataclasses.replace(report, state=state, cause=cause)
        killed = {t.pid for t in run.killed_tools}
        tools = tuple(t for t in report.tools if t.pid not in killed) + tuple(run.killed_tools)
        totals = ToolTotals.of(tools)
        return dataclasses.replace(
            report,
            state=state,
            cause=cause,
            tools=tools,
            tool_totals=totals,
            cpu_s=report.overhead.cpu_s + totals.cpu_s,
            overhead=dataclasses.replace(
                report.overhead, wall_s=max(report.wall_s - totals.wall_s, 0.0)
            ),
            footprint_peak_bytes=max(report.footprint_peak_bytes, totals.rss_peak_bytes),
        )

    # -- bookkeeping ------------------------------------------------------------------
    def _finish_locked(self, run_id: str, report: TaskReport) -> TaskReport:
        self._done(run_id, report.task_id, report.state)
        return report

    def _done(self, run_id: str, task_id: str | None, state: State) -> None:
        self._done_runs[run_id] = None
        while len(self._done_runs) > _REMEMBER:
            self._done_runs.popitem(last=False)
        if task_id is not None and state != "retry":
            self._remember_task(task_id, state)

    def _remember_task(self, task_id: str, state: State) -> None:
        self._done_tasks[task_id] = state
        while len(self._done_tasks) > _REMEMBER:
            self._done_tasks.popitem(last=False)

    def _emit(self, reports: list[TaskReport]) -> None:
        for report in reports:
            for sink in self.sinks:
                try:
                    sink(report)
                except Exception:
                    log.exception("taskmeter sink %r failed for %s", sink, report.task)

    def inflight(self) -> list[InflightTask]:
        with self._lock:
            runs = list(self._runs.values())
        if any(r.pid == self._main_pid for r in runs):
            # solo/threads: tasks share this process, observe it now.
            procs = READER.tree(self._main_pid)
            me = sum(p.rss_bytes for p in procs if p.pid == self._main_pid)
            tools = sum(p.rss_bytes for p in procs if p.pid != self._main_pid)
            for r in runs:
                if r.pid == self._main_pid:
                    r.worker_rss, r.tools_rss = me, tools
        return [
            InflightTask(
                task=r.task,
                task_id=r.task_id,
                pid=r.pid,
                started_at=r.started_epoch,
                worker_rss_bytes=r.worker_rss,
                tools_rss_bytes=r.tools_rss,
            )
            for r in runs
            if r.partial is None
        ]
