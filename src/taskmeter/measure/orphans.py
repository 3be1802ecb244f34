"""Killing a dead pool child's tools, and nothing else.

When a pool process dies mid-task (OOM killer, hard time limit, ``kill -9``), the tools
it started keep running, re-parented to PID 1 (or a subreaper), still holding their
memory in the container. The main worker process knows each tool by its pid *and its
start time* (``/proc/<pid>/stat`` field 22, in clock ticks since boot), recorded by the
pool process when it started the tool, while the pid could not be reused (an unreaped
child keeps its pid). A pid names the tool only while its start time is the recorded
one: a pid reused by another process has a later start time, and is never signalled.

The kill, on Linux:
1. the tool is opened as a pidfd (``os.pidfd_open``, Linux >= 5.3) and its start time
   checked *after* opening, so the pidfd is known to be the tool; signals then go
   through the pidfd and can never reach a process that reused the pid. Without
   pidfds the check is made just before ``kill``, a window of microseconds;
2. it is stopped (SIGSTOP) so it forks no more, then its descendants, found through
   ``/proc/<pid>/task/<pid>/children``, each opened, checked (still a child of the
   stopped parent) and stopped in turn;
3. the figures of the stopped tree are read (RSS, the tool's own ``VmHWM``, CPU from
   ``/proc/<pid>/stat`` including the children it reaped), then every process gets
   SIGKILL, and a tool that leads its own process group (``start_new_session``) has
   its whole group killed (what escaped the tree by double-forking may remain there).
The hub (celery/hub.py) also records each tool's descendants it sees alive, the same
way (pid and start time, checked to be children of the tree when read), and kills those
that outlived the tool. Processes that left the tree before being seen (double-forked
daemons in the pool child's process group) cannot be told from the worker's own and are
not killed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

from taskmeter.measure.proc import READER, ProcStat
from taskmeter.measure.proc import read_stat as read_stat  # re-exported: hub, tests

_LINUX = sys.platform.startswith("linux")
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# One parser of /proc/<pid>/stat for the package (proc.py); the names stay here too.
Stat = ProcStat


def start_ticks(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot), the identity a pid alone is not;
    None where /proc is not available or the process is gone."""
    if not _LINUX:
        return None
    st = read_stat(pid)
    return None if st is None else st.start_tick


@dataclass(frozen=True)
class Killed:
    """What was read of a tool's tree right before it was killed."""

    pid: int
    processes: int
    rss_bytes: int  # the tree's RSS when stopped
    hwm_bytes: int  # the largest VmHWM of its processes (the tool's own peak, exact)
    cpu_s: float  # the tree's CPU, children it reaped included
    read_bytes: int
    write_bytes: int


class _Handle:
    """One verified process: signals go through its pidfd when there is one."""

    def __init__(self, pid: int, fd: int | None) -> None:
        self.pid, self.fd = pid, fd

    def send(self, sig: int) -> bool:
        try:
            if self.fd is not None:
                signal.pidfd_send_signal(self.fd, sig)
            else:
                os.kill(self.pid, sig)
        except OSError:  # gone (ESRCH), not ours (EPERM), ...
            return False
        return True

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None


def _open(pid: int, expect_ticks: int | None, parent: int | None) -> _Handle | None:
    """A handle on ``pid`` if it is the expected process: its start time is
    ``expect_ticks`` (when given) and its parent is ``parent`` (when given)."""
    fd: int | None = None
    if hasattr(os, "pidfd_open"):
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return None
        except OSError:
            fd = None  # e.g. ENOSYS on an old kernel: check, then kill by pid
    st = read_stat(pid)
    ok = (
        st is not None
        and st.state != "Z"
        and (expect_ticks is None or st.start_tick == expect_ticks)
        and (parent is None or st.ppid == parent)
    )
    if not ok:
        if fd is not None:
            os.close(fd)
        return None
    return _Handle(pid, fd)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children", "rb") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _io(pid: int) -> tuple[int, int]:
    try:
        with open(f"/proc/{pid}/io", "rb") as f:
            fields = dict(line.split(b":", 1) for line in f.read().splitlines() if b":" in line)
        return int(fields.get(b"read_bytes", 0)), int(fields.get(b"write_bytes", 0))
    except (OSError, ValueError):
        return 0, 0


def same_process(pid: int, ticks: int | None) -> bool:
    """Whether ``pid`` is still the live process that started at ``ticks``."""
    st = read_stat(pid) if ticks is not None else None
    return st is not None and st.state != "Z" and st.start_tick == ticks


def still_running(pid: int, ticks: int | None, parent: int) -> bool | None:
    """Whether the tool ``pid`` (started at ``ticks``) still runs *orphaned*: True when
    it is alive and no longer the child of ``parent`` (the pool process that started
    it), False when it is gone or reused, None when alive and still ``parent``'s."""
    if ticks is None:
        return False
    st = read_stat(pid)
    if st is None or st.state == "Z" or st.start_tick != ticks:
        return False
    return None if st.ppid == parent else True


def kill_tool(pid: int, ticks: int | None, parent: int) -> Killed | None:
    """Kill the orphaned tool ``pid`` and its descendants, if it is the tool that started
    at ``ticks`` and no longer a child of ``parent`` (the dead pool process). Returns its
    last figures, or None when nothing was killed (gone, reused, or not orphaned)."""
    if not _LINUX or ticks is None:
        return None
    root = _open(pid, ticks, None)
    if root is None:
        return None
    st = read_stat(pid)
    if st is None or st.ppid == parent:
        root.close()  # its pool process still lives: not an orphan
        return None
    handles = [root]
    try:
        if not root.send(signal.SIGSTOP):
            return None
        leads_group = st.pgid == pid
        # Stop the tree top-down: a stopped process forks no more.
        i = 0
        while i < len(handles):
            h = handles[i]
            for child in _children(h.pid):
                c = _open(child, None, h.pid)
                if c is not None:
                    c.send(signal.SIGSTOP)
                    handles.append(c)
            i += 1
        mem = {p.pid: p for p in READER.tree(pid)}
        cpu = 0.0
        read_b = write_b = 0
        for h in handles:
            s = read_stat(h.pid)
            if s is not None:
                cpu += s.cpu_s
            r, w = _io(h.pid)
            read_b, write_b = read_b + r, write_b + w
        figures = Killed(
            pid=pid,
            processes=len(handles),
            rss_bytes=sum(p.rss_bytes for p in mem.values()),
            hwm_bytes=max((p.hwm_bytes or p.rss_bytes for p in mem.values()), default=0),
            cpu_s=cpu,
            read_bytes=read_b,
            write_bytes=write_b,
        )
        for h in handles:
            h.send(signal.SIGKILL)
        if leads_group:
            # Its own process group (verified: the leader is the stopped tool, so the
            # group id cannot have been reused yet).
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)
        _reap_if_mine(handles)
        return figures
    finally:
        for h in handles:
            h.close()


def _reap_if_mine(handles: list[_Handle]) -> None:
    """Where this process is the tools' new parent (a worker running as PID 1 in a
    container, or a subreaper), reap them so no zombie is left. Through the pidfd only:
    waiting by pid could reap (or wait for) an unrelated child that reused the pid.
    Never blocks (this runs on the event loop's thread): one WNOHANG wait each; one not
    dead yet (SIGKILL takes a moment; a process in D state dies when its I/O ends) is
    waited for again at the hub's next ticks (:func:`reap_pending`)."""
    p_pidfd = getattr(os, "P_PIDFD", None)
    if p_pidfd is None:
        return
    me = os.getpid()
    for h in handles:
        st = read_stat(h.pid)
        if h.fd is None or st is None or st.ppid != me:
            continue
        if not _reaped(p_pidfd, h.fd):
            with contextlib.suppress(OSError):
                fd = os.dup(h.fd)  # the handle's own is closed by the caller
                with _pending_lock:
                    _pending.append((fd, time.monotonic() + _REAP_GIVE_UP_S))


# Killed tools of which this process is the parent, not dead yet when killed: (pidfd,
# monotonic time to give up), waited for (WNOHANG) at each of the hub's ticks.
_pending: list[tuple[int, float]] = []
_pending_lock = threading.Lock()
_REAP_GIVE_UP_S = 600.0


def _reaped(p_pidfd: int, fd: int) -> bool:
    """Reap the process of pidfd ``fd`` if it died; True when nothing is left to wait
    for (reaped, or not this process's child)."""
    try:
        return os.waitid(p_pidfd, fd, os.WEXITED | os.WNOHANG) is not None
    except OSError:  # ECHILD: not ours (any more)
        return True


def reap_pending() -> None:
    """Reap the killed tools that were not dead yet when killed (see _reap_if_mine);
    called at each hub tick. Never blocks."""
    p_pidfd: int | None = getattr(os, "P_PIDFD", None)
    if not _pending or p_pidfd is None:
        return
    with _pending_lock:
        items = list(_pending)
        _pending.clear()
    now, keep = time.monotonic(), []
    for fd, until in items:
        if _reaped(p_pidfd, fd) or now > until:
            with contextlib.suppress(OSError):
                os.close(fd)
        else:
            keep.append((fd, until))
    if keep:
        with _pending_lock:
            _pending.extend(keep)
