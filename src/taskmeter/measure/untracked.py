"""Descendants of a task's process that were not started through taskmeter.

A task that calls plain ``subprocess.run`` (or a library that does) starts processes
taskmeter never sees start or end. Their memory still counts against the container's
limit, so the sampler looks for them: at each of a measurement's samples (the
sampler's interval, never on the per-task start/end path) it asks the kernel whether
the process has any child (one ``waitid``), and only then lists the children of the
task's process and walks their descendants through
``/proc/PID/task/TID/children``, skipping the task's tracked tools (whose trees their
own accounting already covers). What it finds becomes a :class:`ToolRun` with
``tracked=False`` (outcome ``untracked``), one per child of the task's process, its
descendants included; their RSS is added to the task's footprint.

Figures are sampled, so lower bounds: CPU is ``utime+stime+cutime+cstime`` of the
child and its live descendants at the last sample (``/proc/PID/stat``); the peak is
the largest ``VmHWM`` (or summed tree RSS) read while they lived (``peak_method``
``sampled``); the wall runs from the child's kernel start time to the last sample
that saw it alive. A task shorter than one interval is never sampled, so its
untracked children are not seen.

Rules that keep the figures honest:

- Only children started after the task started are the task's (their kernel start
  time, ``/proc/PID/stat`` field 22, against the task's start on the same clock, to
  the kernel's tick of 10 ms): a pool process's earlier children are not.
- A child between ``fork`` and ``exec`` still maps the worker's memory (copy-on-write,
  or the very same pages under ``vfork``): its RSS is the worker's. A process's
  memory counts only once its command line differs from its parent's (it has
  exec'd). A child that never execs (``os.fork``, multiprocessing's ``fork`` start
  method) shares most pages with the worker: its CPU counts, its memory does not.
- The CPU of a direct child the worker reaped during the task is in the worker's
  ``RUSAGE_CHILDREN``: it is subtracted from ``unattributed_child_cpu_s`` once (the
  child's own total at its last sample), and not at all while it is a zombie or still
  running at the end (then it is not in ``RUSAGE_CHILDREN`` yet).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from taskmeter.measure.proc import ProcStat, read_stat
from taskmeter.measure.report import ToolRun
from taskmeter.measure.sampler import RssSeries

_HZ = os.sysconf("SC_CLK_TCK")
_BOOTTIME: int | None = getattr(time, "CLOCK_BOOTTIME", None)


def _read(path: str, to_eof: bool = False) -> bytes | None:
    # os.open/os.read: half the cost of open() and its file object, per read measured
    # (benchmarks/bench_untracked.py). stat and status come whole in one read; a
    # command line or a list of children may need more (to_eof).
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:  # gone (ENOENT, ESRCH), or not ours to read
        return None
    try:
        data = os.read(fd, 8192)
        if data and to_eof:
            while chunk := os.read(fd, 65536):
                data += chunk
        return data
    except OSError:
        return None
    finally:
        os.close(fd)


def children_of(pid: int, tid: int | None = None) -> list[int]:
    """Children forked by thread ``tid`` of ``pid`` (its main thread by default)."""
    data = _read(f"/proc/{pid}/task/{tid or pid}/children", to_eof=True)
    return [int(p) for p in data.split()] if data else []


# __WALL (Linux): wait for every kind of child, whatever signal it sends at exit.
_WALL = 0x40000000
_WAIT_FLAGS = os.WEXITED | os.WNOHANG | os.WNOWAIT | _WALL


def any_children() -> bool:
    """Whether the calling process has any child, live or zombie: one ``waitid``
    (``WNOWAIT``: nothing is reaped; ``WNOHANG``: never blocks), no /proc file opened.
    Any thread's children count (the kernel's rule for a thread group)."""
    try:
        os.waitid(os.P_ALL, 0, _WAIT_FLAGS)
    except ChildProcessError:
        return False
    except OSError:  # a kernel that refuses the flags: assume there are some
        return True
    return True


def process_children(pid: int) -> list[int]:
    """Children of every thread of ``pid`` (a child is listed under the thread that
    forked it, so a task's helper threads count too)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    out: list[int] = []
    for tid in tids:
        out.extend(children_of(pid, int(tid)))
    return out


def _exe_name(pid: int, comm: str) -> str:
    """The name of what ``pid`` executes, never text the process chose: the name it was
    executed by (``comm``, the kernel's: the basename of the path given to exec, as a
    tracked tool is named) when the file it executes (``/proc/<pid>/exe``, symlinks
    resolved: ``python`` -> ``python3.11``) starts with it and it is not truncated to
    15 characters; else that file's name; ``comm`` when it cannot be read (another
    user's process, a zombie). ``comm`` alone can be changed (PR_SET_NAME)."""
    try:
        path = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return comm
    name = os.path.basename(path.removesuffix(" (deleted)"))
    return comm if comm and len(comm) < 15 and name.startswith(comm) else name


def _hwm(pid: int) -> int | None:
    data = _read(f"/proc/{pid}/status")
    if data is None:
        return None
    i = data.find(b"\nVmHWM:")
    j = data.find(b"kB", i)
    return int(data[i + 7 : j]) * 1024 if i >= 0 and j > i else None


def boot_offset() -> float:
    """CLOCK_BOOTTIME minus CLOCK_MONOTONIC, in seconds (the time spent suspended)."""
    if _BOOTTIME is None:
        return 0.0
    return time.clock_gettime(_BOOTTIME) - time.monotonic()


@dataclass
class _Proc:
    """One process of an untracked run, as last seen."""

    start_tick: int
    execd: bool = False


@dataclass
class _Run:
    pid: int
    start_tick: int
    t_start: float  # monotonic, from the kernel's start time
    t_last: float
    argv: tuple[str, ...] = ()
    exe: str = ""
    comm: str = ""
    rss: RssSeries = field(default_factory=RssSeries)
    hwm_max: int = 0
    last_rss: int = 0
    user_s: float = 0.0
    sys_s: float = 0.0
    own_cpu_s: float = 0.0  # the child's own stat total at its last sample (it, when reaped)
    scans: int = 0
    execd: bool = False  # some process of the run was seen after its exec
    alive: bool = True
    procs: dict[int, _Proc] = field(default_factory=dict)


class _Cmdlines(dict[int, bytes | None]):
    """Command lines read during one scan, each at most once, only when needed."""

    def __missing__(self, pid: int) -> bytes | None:
        # Empty for a zombie or a kernel thread: unknown.
        cmd = self[pid] = _read(f"/proc/{pid}/cmdline", to_eof=True) or None
        return cmd


class UntrackedScan:
    """The untracked descendants one measurement has seen (fed by its samples)."""

    def __init__(self, t0: float) -> None:
        self._lock = threading.Lock()
        self._pid = os.getpid()
        # The task's start on the kernel's process clock, in ticks (rounded down, so a
        # child started in the task's first tick is the task's).
        self._start_tick = int((t0 + boot_offset()) * _HZ)
        self._runs: dict[tuple[int, int], _Run] = {}  # by (pid, kernel start tick)
        self._alive = 0  # runs seen alive at the last scan
        self._closed = False

    def scan(
        self, now: float, tracked: Callable[[], set[int]], tid: Callable[[], int | None]
    ) -> tuple[int, int]:
        """Sample the task's untracked processes. ``tracked()`` gives the pids of its
        tools, ``tid()`` the kernel id of the thread to look under (None: every
        thread); both are asked only when the process has children.

        Returns (RSS of the live untracked processes now, largest peak of the runs seen
        gone since the last scan).
        """
        with self._lock:
            if self._closed:
                return 0, 0
            if not any_children():  # the usual case: ~2 µs, no /proc listing
                if self._alive:
                    return 0, self._gone(set())
                return 0, 0
            thread = tid()
            top = children_of(self._pid, thread) if thread else process_children(self._pid)
            skip = tracked()
            offset = boot_offset()
            seen: set[tuple[int, int]] = set()
            live = 0
            cmds = _Cmdlines()
            for pid in top:
                if pid in skip:
                    continue
                st = read_stat(pid)
                if st is None or st.start_tick < self._start_tick:
                    continue  # gone, or a child of the process from before the task
                key = (pid, st.start_tick)
                run = self._runs.get(key)
                if run is None:
                    t = st.start_tick / _HZ - offset
                    run = self._runs[key] = _Run(pid, st.start_tick, t, now)
                seen.add(key)
                live += self._sample(run, now, st, cmds)
            return live, self._gone(seen)

    def _gone(self, seen: set[tuple[int, int]]) -> int:
        """Mark the runs not seen now as gone; the largest peak among them."""
        peak = 0
        for key, run in self._runs.items():
            if run.alive and key not in seen:
                run.alive = False
                peak = max(peak, run.hwm_max)
        self._alive = len(seen)
        return peak

    def _sample(self, run: _Run, now: float, top: ProcStat, cmds: _Cmdlines) -> int:
        """Walk one child's tree; returns its counted RSS now."""
        rss = hwm = 0
        user = sys_ = 0.0
        counted = False
        procs: dict[int, _Proc] = {}  # only the live ones: a long task may run thousands
        todo: list[tuple[int, ProcStat | None, int]] = [(run.pid, top, self._pid)]
        while todo:
            pid, st, parent = todo.pop()
            st = st or read_stat(pid)
            if st is None:
                continue  # gone since its parent listed it
            proc = run.procs.get(pid)
            if proc is None or proc.start_tick != st.start_tick:
                proc = _Proc(st.start_tick)
            procs[pid] = proc
            user += st.user_s
            sys_ += st.sys_s
            if pid == run.pid:
                run.own_cpu_s = st.user_s + st.sys_s
                run.comm = st.comm
            if not proc.execd and st.state != "Z":
                # Compared with its parent's now: equal until it execs (forked, it still
                # shows the parent's memory, and so its command line).
                cmd, pcmd = cmds[pid], cmds[parent]
                proc.execd = cmd is not None and pcmd is not None and cmd != pcmd
                if cmd is not None and pid == run.pid and (proc.execd or not run.argv):
                    run.argv = tuple(a.decode(errors="replace") for a in cmd.split(b"\0")[:-1])
                    # The executable's name, not argv[0]: setproctitle and the like
                    # put any text there (task ids into the ``tool`` label)
                    run.exe = _exe_name(pid, st.comm)
            if proc.execd:
                counted = True
                rss += st.rss_bytes
                hwm = max(hwm, _hwm(pid) or 0)
            todo.extend((k, None, pid) for k in children_of(pid))
        run.procs = procs
        run.scans += 1
        run.t_last = now
        # CPU only grows; a descendant reaped by someone outside the tree takes its
        # CPU away from the sum, so keep the largest total seen.
        if user + sys_ > run.user_s + run.sys_s:
            run.user_s, run.sys_s = user, sys_
        if counted:
            run.execd = True
            run.rss.add(now, rss)
            run.last_rss = rss
            run.hwm_max = max(run.hwm_max, hwm, rss)
        return rss

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for run in self._runs.values():
                run.rss.close()

    def finish(self, origin: float, now: float, tracked: set[int]) -> tuple[list[ToolRun], float]:
        """The runs to report and the CPU of those the task's process reaped meanwhile
        (already in its RUSAGE_CHILDREN, so not unattributed). Call once, at the end."""
        self.close()
        runs: list[ToolRun] = []
        reaped = 0.0
        for run in self._runs.values():
            if run.pid in tracked:
                continue  # seen in the instant between its exec and its tracking
            if not (run.execd or run.scans >= 2 or run.own_cpu_s > 0):
                continue  # seen once between fork and exec: nothing known
            st = read_stat(run.pid)
            running = st is not None and st.start_tick == run.start_tick
            if not running:
                reaped += run.own_cpu_s  # in RUSAGE_CHILDREN once, from its reap
            end = now if running and st is not None and st.state != "Z" else run.t_last
            peak = max(run.hwm_max, run.rss.peak)
            runs.append(
                ToolRun(
                    argv=run.argv,
                    exe=run.exe or run.comm,  # argv unknown when seen only as a zombie
                    pid=run.pid,
                    exit_code=None,
                    signal=None,
                    start_s=max(run.t_start - origin, 0.0),
                    end_s=max(end - origin, 0.0),
                    wall_s=max(end - run.t_start, 0.0),
                    cpu_s=run.user_s + run.sys_s,
                    user_s=run.user_s,
                    sys_s=run.sys_s,
                    rss_avg_bytes=run.rss.avg,
                    rss_peak_bytes=peak,
                    peak_method="sampled" if run.rss.n else "none",
                    samples=run.rss.n,
                    read_bytes=0,
                    write_bytes=0,
                    tracked=False,
                )
            )
        return runs, reaped
