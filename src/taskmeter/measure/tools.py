"""Tool subprocesses: drop-in ``Popen`` and ``run`` that attach each run to the task.

CPU comes from the kernel at reap time (``wait4``), exact and including descendants
the tool reaped. Peak memory comes from each process's own ``VmHWM`` read while it
lives, and from ``ru_maxrss`` only when it provably is the tool's own (see
:meth:`Book.spawn`). Outside a measurement both behave exactly like ``subprocess``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from taskmeter.measure import cgroup
from taskmeter.measure.orphans import start_ticks
from taskmeter.measure.proc import READER, OpenTree, tree_totals
from taskmeter.measure.report import PeakMethod, ToolRun
from taskmeter.measure.sampler import SAMPLER, RssSeries
from taskmeter.measure.span import BOOK

if TYPE_CHECKING:
    from taskmeter.measure.core import Measurement

_log = logging.getLogger("taskmeter.tools")

# ru_maxrss is in KiB on Linux and in bytes on macOS.
_MAXRSS_UNIT = 1 if os.uname().sysname == "Darwin" else 1024
# Since Linux 6.2 RSS counters are per-CPU and read approximately: a live reading may
# lag the exact figure by up to one batch (>= 32 pages) per CPU. An ru_maxrss must beat
# the floor read after the spawn by more than that to be taken as the tool's own.
_COUNTER_SLACK = max(1 << 20, (os.cpu_count() or 1) * 64 * 4096)
_FIRST_SAMPLE_S = 0.001
_INF = float("inf")
_UNREAD: Any = object()  # a start time not read yet
# Tools are sampled at least this often, whatever the interval: their peak is read
# from VmHWM, which vanishes at exit, so it is caught when reached at least this long
# before the tool exits (bcftools sort, say, peaks while writing its output in its
# last ~30 ms). Cost, measured (docs/benchmarks.md): 0.3-0.9 % of a core per tool,
# most of it the 50 wake-ups a second of the thread that samples it. Not needed, and
# not done, once a one-process tool's own mark stands above the floor it inherited
# (see ToolWatch.sample): wait4's ru_maxrss then gives its exact peak whenever it
# comes, and it is sampled at the measurement's interval (at most TOOL_RELAXED_MAX_S:
# a child it forks and reaps between two samples is not seen, nor in ru_maxrss's sum).
TOOL_INTERVAL_MAX_S = 0.02
TOOL_RELAXED_MAX_S = 0.1


class ReapedCpu:
    """CPU of every tool this process reaped through taskmeter, so a task can tell the
    RUSAGE_CHILDREN CPU that did *not* come through taskmeter (unattributed)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.total_s = 0.0

    def add(self, cpu_s: float) -> None:
        with self._lock:
            self.total_s += cpu_s


REAPED = ReapedCpu()

# The waiting thread samples the tool it waits for through a pidfd (Linux >= 5.3).
_HAVE_PIDFD = hasattr(os, "pidfd_open") and hasattr(select, "poll")
# False once pidfd_open said it cannot work here (ENOSYS, EPERM): no more attempts.
_PIDFD_OK = [_HAVE_PIDFD]
_SAMPLE_FAILED: list[bool] = []  # a waiter's sample raised once (logged once)
# The pidfds of the waits in progress: a forked child closes its copies (it waits for
# none of them; no waiter state survives a fork).
_WAIT_FDS: set[int] = set()


def _ready_within(fd: int) -> Callable[[float | None], bool]:
    """A function telling whether ``fd`` becomes readable within a timeout (seconds).
    select() keeps the timeout to the microsecond (the 1 ms first sample of a short
    tool is not late); poll(), to the millisecond rounded up, serves fds above
    select's limit."""
    if fd < 1024:
        fds, sel = [fd], select.select
        return lambda timeout: bool(sel(fds, (), (), timeout)[0])
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return lambda timeout: bool(poller.poll(None if timeout is None else timeout * 1000))


def _close_wait_fds_in_child() -> None:
    for fd in list(_WAIT_FDS):
        with contextlib.suppress(OSError):
            os.close(fd)
    _WAIT_FDS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_wait_fds_in_child)

# Called with every tool started inside a measurement (after it is spawned): the Celery
# integration tells the main process, which kills a dead pool child's tools.
TOOL_STARTED: list[Callable[[ToolWatch], None]] = []


def _argv_of(args: Any) -> tuple[str, ...]:
    if isinstance(args, (str, bytes, os.PathLike)):
        return (os.fsdecode(args),)
    return tuple(os.fsdecode(a) for a in args)


class ToolWatch:
    """What is known of one tool run, fed by the sampler while it lives."""

    is_tool = True

    def __init__(self, argv: tuple[str, ...], exe: str, owners: list[Measurement]) -> None:
        self.argv, self.exe, self.owners = argv, exe, owners
        self.pid = 0
        self.t_start = time.monotonic()
        self.t_end: float | None = None
        self.rss = RssSeries()
        self.hwm_max = 0
        self.last_rss = 0
        self.next_due = self.t_start + _FIRST_SAMPLE_S
        self._t_sampled = -_INF
        self._period = min(SAMPLER.interval_s, TOOL_INTERVAL_MAX_S)
        # A VmHWM above this makes wait4's ru_maxrss the exact peak (see sample)
        self._exact_above = _INF
        # Who samples it now: the sampler thread, or the thread waiting for it (wait).
        self.in_sampler = False
        self.parent_hwm: int | None = None
        self.status: int | None = None
        self.rusage: Any = None
        self._ticks: int | None = _UNREAD
        # The cgroup's OOM-kill counter at start and, if it died of SIGKILL, at its death.
        self.oom0 = cgroup.oom_kills()  # before the spawn: one small file read
        self.oom_end: int | None = None
        # SIGKILL sent through its Popen (run()'s timeout, the task's kill()): never
        # an OOM kill, whatever the counter did meanwhile (another process's OOM kill)
        self.killed_by_us = False
        self._lock = threading.Lock()
        self._stopped = False
        self._tree: OpenTree | None = None  # the tool's /proc files, open while sampled
        self._totals: Callable[[], tuple[int, int] | None] | None = None

    # -- sampler side -----------------------------------------------------------
    def sample(self, now: float, self_rss: int = 0) -> None:
        """One reading of the tool's tree, by the sampler thread or the thread waiting
        for the tool (never both at once: under the lock; a reading older than the last
        one is dropped)."""
        with self._lock:
            if self._stopped or now <= self._t_sampled:
                return
            self._t_sampled = now
            tree = self._tree
            if tree is None:
                # The first sample as soon as possible after the spawn (a 1 ms tool may
                # be gone after two opens): the status file is read as soon as opened.
                tree = self._tree = READER.open_tree(self.pid)
                self._totals = getattr(tree, "totals", None)
            totals = self._totals
            got = totals() if totals is not None else tree_totals(tree.read())
            # Young processes are sampled densely (1 ms, then half their age) so a short
            # tool is still observed; then every interval, at most TOOL_INTERVAL_MAX_S.
            age = now - self.t_start
            period = self._period
            if got is not None and got[1] > self._exact_above and getattr(tree, "alone", False):
                # One process whose own mark already tops the floor it inherited: its
                # wait4 ru_maxrss will top it too, and is then its exact peak (peak()),
                # whenever the peak comes: no need to catch it alive every 20 ms.
                period = max(min(SAMPLER.interval_s, TOOL_RELAXED_MAX_S), period)
            self.next_due = now + (
                period if age >= 2 * self._period else max(_FIRST_SAMPLE_S, age / 2)
            )
            if got is None:
                return
            total, hwm = got
            self.rss.add_unlocked(now, total)
            self.last_rss = total
            if hwm > self.hwm_max:
                self.hwm_max = hwm

    def stop_sampling(self) -> None:
        """Called once the tool has exited and before it is reaped: after the reap its
        pid may be reused, so no sample may be taken from then on."""
        with self._lock:
            self._stopped = True
            if self._tree is not None:
                self._tree.close()
                self._tree = None
            if self.in_sampler:
                self.in_sampler = False
                SAMPLER.remove(self)

    # (in_sampler changes with the sampler's list, under the lock: a hand-back racing
    # the reap in another thread never leaves a stopped tool in the sampler, whose
    # sample() would return without moving next_due and keep the thread ticking)
    def to_sampler(self) -> None:
        """Have the sampler thread sample it (from now on, until it is held or stopped)."""
        with self._lock:
            if not self.in_sampler and not self._stopped:
                self.in_sampler = True
                SAMPLER.add(self)

    def hold(self) -> None:
        """The calling thread samples it from now on (it waits for the tool): the sampler
        thread neither wakes for it nor samples it (a tick already running may still
        read it once, serialized by the lock)."""
        with self._lock:
            if self.in_sampler:
                self.in_sampler = False
                SAMPLER.remove(self)

    @property
    def start_ticks(self) -> int | None:
        """The tool's start time (clock ticks since boot): with the pid, its identity.
        Read on first use (the Celery integration's TOOL_STARTED hook, for the main
        process's orphan records), which is correct at any time before the reap: an
        unreaped child keeps its pid. None once sampling stopped without it (the reap
        may follow at once), or where /proc is not available."""
        with self._lock:
            if self._ticks is _UNREAD:
                if self._stopped or not self.pid:
                    return None
                self._ticks = start_ticks(self.pid)
            return self._ticks

    @start_ticks.setter
    def start_ticks(self, value: int | None) -> None:
        with self._lock:
            self._ticks = value

    # -- owner side -------------------------------------------------------------
    def started(self, pid: int, parent_hwm: int | None, defer: bool = False) -> None:
        """``defer``: the caller is about to wait for it (run() without pipes), so the
        waiting thread samples it and the sampler thread is not told (a thread's
        wake-up costs more than a sample)."""
        self.pid, self.parent_hwm = pid, parent_hwm
        if parent_hwm is not None:
            # twice the slack: a live VmHWM may lag the exit figure by one slack itself
            self._exact_above = parent_hwm + 2 * _COUNTER_SLACK
        self.sample(time.monotonic())
        if not defer:
            self.to_sampler()

    def finished(self, status: int | None, rusage: Any) -> None:
        self.t_end = time.monotonic()
        self.status, self.rusage = status, rusage
        if (
            status is not None
            and os.WIFSIGNALED(status)
            and os.WTERMSIG(status) == 9
            and not self.killed_by_us
        ):
            self.oom_end = cgroup.oom_kills()  # the OOM killer's signal, or kill -9?
        self.rss.close()
        if rusage is not None:
            REAPED.add(rusage.ru_utime + rusage.ru_stime)
        self_rss = READER.self_rss()
        for m in self.owners:
            m._tool_finished(self, self_rss)

    @property
    def done(self) -> bool:
        return self.t_end is not None

    def peak(self) -> tuple[int, PeakMethod]:
        """The tool's peak RSS and how it is known.

        ``hwm`` only when exact at exit: wait4's ``ru_maxrss`` above the floor the tool
        inherited from this process, or an ``ru_maxrss`` no higher than what was seen
        alive. Otherwise ``sampled``: the largest high-water mark (and tree RSS) read
        while the tool lived, a lower bound that misses only what happened after the
        last sample (at most TOOL_INTERVAL_MAX_S before exit).
        """
        live = max(self.hwm_max, self.rss.peak)
        if self.rusage is not None and self.parent_hwm is not None:
            maxrss = self.rusage.ru_maxrss * _MAXRSS_UNIT
            # (never below what was seen alive: a tree's summed RSS, or a mark the tool
            # reset itself, e.g. a tool that measures itself with taskmeter)
            if maxrss > self.parent_hwm + _COUNTER_SLACK and maxrss >= live:
                return maxrss, "hwm"  # above the inherited floor: the tool's own peak
            if live and maxrss <= live + _COUNTER_SLACK:
                return live, "hwm"  # the upper bound meets what was seen alive
        if self.rss.n:
            return live, "sampled"
        return 0, "none"

    def to_run(self, origin: float, now: float) -> ToolRun:
        end = self.t_end if self.t_end is not None else now
        ru = self.rusage
        user = ru.ru_utime if ru is not None else 0.0
        sys_ = ru.ru_stime if ru is not None else 0.0
        exit_code = sig = None
        if self.status is not None:
            code = os.waitstatus_to_exitcode(self.status)
            if code < 0:
                sig = -code
            else:
                exit_code = code
        peak, method = self.peak()
        return ToolRun(
            argv=self.argv,
            exe=self.exe,
            pid=self.pid,
            exit_code=exit_code,
            signal=sig,
            start_s=max(self.t_start - origin, 0.0),
            end_s=max(end - origin, 0.0),
            wall_s=end - self.t_start,
            cpu_s=user + sys_,
            user_s=user,
            sys_s=sys_,
            rss_avg_bytes=self.rss.avg,
            rss_peak_bytes=peak,
            peak_method=method,
            samples=self.rss.n,
            read_bytes=ru.ru_inblock * 512 if ru is not None else 0,
            write_bytes=ru.ru_oublock * 512 if ru is not None else 0,
            cause="oom"
            if sig == 9 and not self.killed_by_us and cgroup.rose(self.oom0, self.oom_end)
            else None,
        )


class Popen(subprocess.Popen):  # type: ignore[type-arg]
    """``subprocess.Popen`` that, inside a measurement, records the run as a tool.

    Same arguments, attributes and exceptions as ``subprocess.Popen``. The process is
    reaped with ``wait4`` (exact CPU) whether it is ended by ``wait``, ``communicate``,
    ``poll`` or ``with``.
    """

    # run() without pipes: the tool goes straight to the waiting thread (see _wait).
    _taskmeter_defer = False

    def __init__(self, args: Any, *posargs: Any, **kwargs: Any) -> None:
        from taskmeter.measure.core import current

        m = current()
        self._taskmeter_watch: ToolWatch | None = None
        if m is None:
            super().__init__(args, *posargs, **kwargs)
            return
        argv = _argv_of(args)
        exe = kwargs.get("executable") or (argv[0] if argv else "")
        if kwargs.get("shell"):
            exe = "sh"
        watch = ToolWatch(argv, os.path.basename(os.fsdecode(exe)), m.lineage())

        def spawn() -> None:
            super(Popen, self).__init__(args, *posargs, **kwargs)

        _, parent_hwm = BOOK.spawn(spawn)
        self._taskmeter_watch = watch
        watch.started(self.pid, parent_hwm, defer=self._taskmeter_defer)
        for m in watch.owners:
            m._tool_started(watch)
        for hook in TOOL_STARTED:
            try:
                hook(watch)
            except Exception:  # never fail the task over its bookkeeping
                _log.exception("taskmeter: a tool-start hook failed")

    def send_signal(self, sig: int) -> None:
        watch = self._taskmeter_watch
        if watch is not None and sig == signal.SIGKILL:
            watch.killed_by_us = True  # before the kill: its death is never an OOM kill
        super().send_signal(sig)

    def _wait(self, timeout: float | None) -> int | None:
        """``subprocess.Popen._wait``; for a tracked tool, with a pidfd (Linux >= 5.3),
        the waiting thread samples the tool itself between polls of the pidfd (timeout:
        the tool's next sample), so the sampler thread neither wakes for it nor reads it.
        A wait that ends with the tool alive (timeout, exception) hands it back."""
        watch = self._taskmeter_watch
        if self.returncode is not None or watch is None or watch.done or not _PIDFD_OK[0]:
            if watch is not None and not watch.done:
                watch.to_sampler()  # a stdlib wait: the sampler thread samples it
            return super()._wait(timeout)  # type: ignore[misc,no-any-return]
        endtime = None if timeout is None else time.monotonic() + timeout
        try:
            fd: int | None = os.pidfd_open(self.pid)
        except OSError as exc:
            if exc.errno != errno.ESRCH:
                # No pidfd here (ENOSYS: kernel < 5.3; EPERM: a seccomp profile) or
                # none left (EMFILE): the standard library's wait, timeout included,
                # and the sampler thread samples the tool meanwhile.
                if exc.errno in (errno.ENOSYS, errno.EPERM):
                    _PIDFD_OK[0] = False
                watch.to_sampler()
                return super()._wait(timeout)  # type: ignore[misc,no-any-return]
            fd = None  # ESRCH: reaped by someone else; the reap below says so
        lock: threading.Lock = self._waitpid_lock  # type: ignore[attr-defined]
        if timeout is None:
            lock.acquire()
        elif not lock.acquire(timeout=max(timeout, 0.0)):
            # Another thread waits for it (and samples it): stdlib semantics.
            if fd is not None:
                os.close(fd)
            raise subprocess.TimeoutExpired(self.args, timeout)
        try:
            if self.returncode is not None:
                if fd is not None:
                    os.close(fd)
                return self.returncode
            if fd is not None and not self._taskmeter_await_exit(watch, endtime, fd):
                raise subprocess.TimeoutExpired(self.args, timeout)  # type: ignore[arg-type]
            pid, status = self._taskmeter_reap(0, exited=fd is not None)
            if pid == self.pid:
                self._handle_exitstatus(status)  # type: ignore[attr-defined]
        finally:
            lock.release()
        return self.returncode

    def _taskmeter_await_exit(self, watch: ToolWatch, endtime: float | None, fd: int) -> bool:
        """Wait for the tool's exit (True) or ``endtime`` (False) on its pidfd ``fd``
        (closed here), sampling it when due. Called with ``_waitpid_lock`` held. On
        False or an exception the tool is handed back to the sampler thread; a sample
        that fails does the same (logged once), and the wait goes on unsampled."""
        _WAIT_FDS.add(fd)
        exited = False
        try:
            watch.hold()
            ready = _ready_within(fd)
            monotonic = time.monotonic
            sampling = True
            while True:
                now = monotonic()
                due = watch.next_due if sampling else _INF
                until = due if endtime is None else min(due, endtime)
                timeout = None if until == _INF else max(until - now, 0.0)
                if ready(timeout):
                    exited = True
                    return True
                now = monotonic()
                if sampling and now >= watch.next_due:
                    try:
                        watch.sample(now)
                    except Exception:  # never into the user's wait(): the sampler's job
                        if not _SAMPLE_FAILED:
                            _SAMPLE_FAILED.append(True)
                            _log.exception("taskmeter: sampling a waited tool failed")
                        sampling = False  # the wait alone from now on
                        watch.to_sampler()
                if endtime is not None and now >= endtime:
                    return False
        finally:
            _WAIT_FDS.discard(fd)
            os.close(fd)
            if not exited:
                watch.to_sampler()

    def _try_wait(self, wait_flags: int) -> tuple[int, int]:
        return self._taskmeter_reap(wait_flags)

    def _taskmeter_reap(self, wait_flags: int, exited: bool = False) -> tuple[int, int]:
        """``_try_wait``: reaped with wait4 (exact CPU), after sampling stopped.
        ``exited``: its pidfd said so (no waitid needed)."""
        watch = self._taskmeter_watch
        if watch is None or watch.done:
            return super()._try_wait(wait_flags)  # type: ignore[misc,no-any-return]
        try:
            if not exited and hasattr(os, "waitid"):
                # Wait for the exit without reaping, so sampling can stop while the pid
                # still cannot be reused.
                flags = os.WEXITED | os.WNOWAIT | (wait_flags & os.WNOHANG)
                if os.waitid(os.P_PID, self.pid, flags) is None:
                    return 0, 0  # WNOHANG and still running
            watch.stop_sampling()
            pid, status, rusage = os.wait4(self.pid, wait_flags)
        except ChildProcessError:
            # Reaped by someone else (SIGCHLD ignored, or a stray waitpid(-1)): no CPU.
            watch.stop_sampling()
            watch.finished(None, None)
            return self.pid, 0
        if pid == self.pid:
            watch.finished(status, rusage)
        return pid, status

    def _internal_poll(self, _deadstate: Any = None, **kwargs: Any) -> int | None:
        # The stdlib's poll() reaps with waitpid, which would lose the rusage.
        watch = self._taskmeter_watch
        if watch is None or watch.done or self.returncode is not None:
            return super()._internal_poll(_deadstate, **kwargs)  # type: ignore[misc,no-any-return]
        if not self._waitpid_lock.acquire(False):  # type: ignore[attr-defined]
            return None  # another thread is waiting for it
        try:
            if self.returncode is None:
                pid, status = self._try_wait(os.WNOHANG)
                if pid == self.pid:
                    self._handle_exitstatus(status)  # type: ignore[attr-defined]
        finally:
            self._waitpid_lock.release()  # type: ignore[attr-defined]
        return self.returncode


class _WaitedPopen(Popen):
    """The Popen of run() without pipes: waited for at once, by the thread that samples
    it (an object of this class is never handed to the caller)."""

    _taskmeter_defer = True


def run(
    args: Any,
    *popenargs: Any,
    input: Any = None,
    capture_output: bool = False,
    timeout: float | None = None,
    check: bool = False,
    **kwargs: Any,
) -> subprocess.CompletedProcess[Any]:
    """``subprocess.run`` with the process recorded as a tool of the current task.

    Same arguments, return value and exceptions (``CalledProcessError``,
    ``TimeoutExpired``). Output pipes are drained by ``communicate``, so a tool that
    writes megabytes to stderr never blocks. On timeout the tool is killed, waited for
    and ``TimeoutExpired`` raised, at the timeout even when a grandchild still holds
    the output pipes (as ``subprocess.run``); the run is recorded with signal 9.
    """
    if input is not None:
        if kwargs.get("stdin") is not None:
            raise ValueError("stdin and input arguments may not both be used.")
        kwargs["stdin"] = subprocess.PIPE
    if capture_output:
        if kwargs.get("stdout") is not None or kwargs.get("stderr") is not None:
            raise ValueError("stdout and stderr arguments may not be used with capture_output.")
        kwargs["stdout"] = subprocess.PIPE
        kwargs["stderr"] = subprocess.PIPE
    # Without pipes, communicate() goes straight to wait(): the waiting thread samples
    # the tool and the sampler thread is not woken. With pipes, the sampler thread
    # samples it while communicate() reads them (and the wait takes it over after).
    pipes = (kwargs.get(k) == subprocess.PIPE for k in ("stdin", "stdout", "stderr"))
    cls = _WaitedPopen if not popenargs and not any(pipes) else Popen
    with cls(args, *popenargs, **kwargs) as process:
        try:
            stdout, stderr = process.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            # As subprocess.run on POSIX: communicate already put the output read so far
            # in the exception; kill and wait (reaped by wait4: the tool is recorded as
            # killed), never wait for EOF on pipes a grandchild may still hold.
            process.kill()
            process.wait()
            raise
        except BaseException:  # KeyboardInterrupt too; __exit__ waits for the process
            process.kill()
            raise
        retcode = process.poll()
        if check and retcode:
            raise subprocess.CalledProcessError(retcode, process.args, output=stdout, stderr=stderr)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
