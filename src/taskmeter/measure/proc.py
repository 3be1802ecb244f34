"""One reader interface over the operating system's process accounting.

Callers never branch on the platform: they use :data:`READER`. On Linux it reads
``/proc`` directly (a few microseconds a call, and the kernel's high-water marks);
elsewhere it falls back to psutil, where peaks can only be sampled.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Protocol

_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

# This process's pid as PID[0], kept current across fork by the hook below (which runs
# before those of the modules that import it): os.getpid() is a system call, and the
# hot path would otherwise make several per task. A fork that runs no hooks keeps the
# parent's pid here.
PID = [os.getpid()]
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=lambda: PID.__setitem__(0, os.getpid()))


@dataclass(frozen=True)
class ProcStat:
    """One read of ``/proc/<pid>/stat`` (Linux): what the untracked-process scan and
    the orphan kill need to count and identify a process."""

    comm: str  # the executable's name, to 15 characters (kept by a zombie)
    state: str
    ppid: int
    pgid: int
    start_tick: int  # clock ticks since boot: with the pid, the process's identity
    user_s: float  # utime + cutime: its own and its reaped descendants'
    sys_s: float  # stime + cstime
    rss_bytes: int

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s


def parse_stat(data: bytes) -> ProcStat | None:
    """``/proc/<pid>/stat`` text; None when it was cut short (the process went away)."""
    try:
        # The command name (field 2) may hold spaces and parentheses: the fields resume
        # after the last ")" (none in an empty read).
        end = data.rindex(b")")
        f = data[end + 2 :].split()
        return ProcStat(
            comm=data[data.index(b"(") + 1 : end].decode(errors="replace"),
            state=f[0].decode(),
            ppid=int(f[1]),
            pgid=int(f[2]),
            start_tick=int(f[19]),
            user_s=(int(f[11]) + int(f[13])) / _HZ,
            sys_s=(int(f[12]) + int(f[14])) / _HZ,
            rss_bytes=int(f[21]) * _PAGE,
        )
    except (ValueError, IndexError):
        return None


def read_stat(pid: int) -> ProcStat | None:
    """``/proc/<pid>/stat`` of a live (or zombie) process; None when it is gone."""
    try:  # os.open/os.read: half the cost of open() and its file object
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, 4096)  # one line, well under a page
    except OSError:
        return None
    finally:
        os.close(fd)
    return parse_stat(data)


@dataclass(frozen=True)
class ProcMem:
    """Memory of one live process: its current RSS and, where the OS keeps one, its
    own peak since exec (``VmHWM``)."""

    pid: int
    rss_bytes: int
    hwm_bytes: int | None


def tree_totals(procs: list[ProcMem]) -> tuple[int, int] | None:
    """(summed RSS, largest VmHWM, 0 where unknown) of a tree's processes; None for
    none: what a tool's sample keeps."""
    if not procs:
        return None
    return sum(p.rss_bytes for p in procs), max(p.hwm_bytes or 0 for p in procs)


class OpenTree(Protocol):
    def read(self) -> list[ProcMem]:
        """What ``tree(pid)`` gives, now."""

    def close(self) -> None: ...


class ProcReader(Protocol):
    name: str

    def self_rss(self) -> int:
        """RSS of the calling process, in bytes."""

    def self_hwm(self) -> int | None:
        """The calling process's peak RSS since exec or the last reset; None if unknown."""

    def reset_self_hwm(self) -> bool:
        """Reset the calling process's peak to its current RSS; False if not permitted."""

    def self_hwm_before_reset(self) -> int | None:
        """:meth:`self_hwm` read right before :meth:`reset_self_hwm`, leaving other
        threads as little time as possible to raise the peak in between."""

    def self_mem(self) -> tuple[int, int | None]:
        """(RSS, peak RSS or None) of the calling process, in one read where possible."""

    def tree(self, pid: int) -> list[ProcMem]:
        """Memory of ``pid`` and its live descendants; empty once ``pid`` has exited."""

    def open_tree(self, pid: int) -> OpenTree:
        """``tree(pid)`` to read repeatedly (keeps files open where that is cheaper)."""


def _select() -> ProcReader:
    if sys.platform.startswith("linux"):
        from taskmeter.measure._linux import LinuxReader

        reader = LinuxReader()
        if reader.usable():
            return reader
    from taskmeter.measure._portable import PsutilReader

    return PsutilReader()


READER: ProcReader = _select()
