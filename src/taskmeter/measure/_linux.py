"""Linux fast paths: ``/proc`` read directly, no psutil on the hot path."""

from __future__ import annotations

import os

from taskmeter.measure.proc import ProcMem

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _status_mem(pid: int | str) -> tuple[int, int | None] | None:
    """(VmRSS, VmHWM) in bytes from /proc/PID/status; None for a zombie or a gone pid."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    rss = hwm = None
    for line in data.split(b"\n"):
        if line.startswith(b"VmHWM:"):
            hwm = int(line.split()[1]) * 1024
        elif line.startswith(b"VmRSS:"):
            rss = int(line.split()[1]) * 1024
            break  # VmRSS comes after VmHWM in every kernel since 2.6
    if rss is None:  # a zombie has released its memory: no Vm* lines at all
        return None
    return rss, hwm


def _children(pid: int) -> list[int]:
    # Needs CONFIG_PROC_CHILDREN (on in every mainstream distribution kernel). Only the
    # main thread's children: shell pipelines and tools fork from their main thread.
    try:
        with open(f"/proc/{pid}/task/{pid}/children", "rb") as f:
            return [int(p) for p in f.read().split()]
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []


class LinuxReader:
    name = "linux-proc"

    def __init__(self) -> None:
        self._statm_pid = -1
        self._statm_fd = -1

    def usable(self) -> bool:
        return os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")

    def self_rss(self) -> int:
        pid = os.getpid()
        if pid != self._statm_pid:  # a forked child must not read its parent's statm
            if self._statm_fd >= 0:
                os.close(self._statm_fd)
            self._statm_fd = os.open(f"/proc/{pid}/statm", os.O_RDONLY | os.O_CLOEXEC)
            self._statm_pid = pid
        return int(os.pread(self._statm_fd, 256, 0).split()[1]) * _PAGE

    def self_hwm(self) -> int | None:
        mem = _status_mem("self")
        return None if mem is None else mem[1]

    def reset_self_hwm(self) -> bool:
        # "5" resets only the peak-RSS counter (Linux >= 4.0) and walks no page tables.
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            return False
        return True

    def tree(self, pid: int) -> list[ProcMem]:
        out: list[ProcMem] = []
        todo = [pid]
        while todo:
            p = todo.pop()
            mem = _status_mem(p)
            if mem is not None:
                out.append(ProcMem(p, mem[0], mem[1]))
            todo.extend(_children(p))
        return out
