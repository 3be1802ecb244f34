"""Linux fast paths: ``/proc`` read directly, no psutil on the hot path."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from collections.abc import Callable

from taskmeter.measure.proc import PID as _PID
from taskmeter.measure.proc import ProcMem, tree_totals

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _parse_status(data: bytes) -> tuple[int, int | None] | None:
    """(VmRSS, VmHWM) in bytes from the text of /proc/PID/status (None: a zombie, whose
    memory is released and which has no Vm* lines). Finds the two lines directly rather
    than splitting ~55 lines: this runs twice per task and at every tool sample."""
    i = data.find(b"\nVmRSS:")
    if i < 0:
        return None
    rss = int(data[i + 7 : data.index(b"kB", i)]) * 1024
    j = data.find(b"\nVmHWM:")
    hwm = int(data[j + 7 : data.index(b"kB", j)]) * 1024 if j >= 0 else None
    return rss, hwm


@functools.cache
def _gil_held_pread() -> Callable[..., int] | None:
    """libc's pread called with the GIL held (ctypes.PyDLL), where os.pread releases
    it; None where it cannot be loaded."""
    try:
        pread = ctypes.PyDLL(None, use_errno=True).pread
    except (OSError, AttributeError):
        return None
    pread.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_long]
    pread.restype = ctypes.c_ssize_t
    return pread


def _status_mem(pid: int | str) -> tuple[int, int | None] | None:
    """(VmRSS, VmHWM) in bytes from /proc/PID/status; None for a zombie or a gone pid."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return _parse_status(data)


def _children(pid: int) -> list[int]:
    # Needs CONFIG_PROC_CHILDREN (on in every mainstream distribution kernel). Only the
    # main thread's children: shell pipelines and tools fork from their main thread.
    try:
        with open(f"/proc/{pid}/task/{pid}/children", "rb") as f:
            return [int(p) for p in f.read().split()]
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []


class ProcTree:
    """``tree(pid)`` with the root's status and children files kept open: a sample of a
    one-process tool is two preads, not three opens, reads and closes. The status file
    is read as soon as it is open (a 1 ms tool may be gone after a second open); the
    children file from the second reading of :meth:`totals` on (the first is taken
    right after the exec, when the tool has hardly started, let alone forked). The open
    files stay the root process's (a reused pid never answers through them). Close with
    :meth:`close`, before the root is reaped."""

    __slots__ = ("_children", "_fresh", "_status", "alone", "pid", "reader")

    def __init__(self, reader: LinuxReader, pid: int) -> None:
        self.reader, self.pid = reader, pid
        self._children = -1
        self._fresh = True
        # The last reading of totals() found the root process alone (no children).
        self.alone = False
        try:
            self._status = os.open(f"/proc/{pid}/status", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._status = -2  # not readable this way: tree() by name at every read

    def read(self) -> list[ProcMem]:
        if self._status < 0:
            return self.reader.tree(self.pid)
        try:
            mem = _parse_status(os.pread(self._status, 8192, 0))
        except OSError:  # gone
            return []
        out = [] if mem is None else [ProcMem(self.pid, mem[0], mem[1])]
        for kid in self._kids():
            out.extend(self.reader.tree(kid))
        return out

    def totals(self) -> tuple[int, int] | None:
        """(summed RSS, largest VmHWM) of the tree, None when no process of it is alive:
        :meth:`read` without a record per process (a tool's sample, 50 times a second)."""
        self.alone = False
        if self._status < 0:
            procs = self.reader.tree(self.pid)
            self.alone = len(procs) == 1 and procs[0].pid == self.pid
            return tree_totals(procs)
        try:
            data = os.pread(self._status, 8192, 0)
        except OSError:  # gone
            return None
        i = data.find(b"\nVmRSS:")
        if i < 0:  # a zombie: its children (if any) are reparented, not its own any more
            rss = hwm = -1
        else:
            rss = int(data[i + 7 : data.index(b"kB", i)]) * 1024
            j = data.find(b"\nVmHWM:")
            hwm = int(data[j + 7 : data.index(b"kB", j)]) * 1024 if j >= 0 else 0
        if self._children == -1 and self._fresh:
            # The first reading, right after the exec: the tool has not forked yet
            # (the children file is opened from the second reading on).
            self._fresh = False
            self.alone = rss >= 0
            return None if rss < 0 else (rss, hwm)
        kids = self._kids()
        self.alone = rss >= 0 and not kids
        sub = tree_totals([q for kid in kids for q in self.reader.tree(kid)]) if kids else None
        if sub is not None:  # the root's own figures (none for a zombie) and its tree's
            rss, hwm = max(rss, 0) + sub[0], max(hwm, sub[1])
        return None if rss < 0 else (rss, hwm)

    def _kids(self) -> list[int]:
        fd = self._children
        if fd == -1:
            try:
                fd = self._children = os.open(
                    f"/proc/{self.pid}/task/{self.pid}/children", os.O_RDONLY | os.O_CLOEXEC
                )
            except OSError:
                self._children = -2  # gone, or no such file: no children read
                return []
        elif fd < 0:
            return []
        try:
            data = os.pread(fd, 65536, 0)
        except OSError:
            return []
        return [int(p) for p in data.split()] if data else []

    def close(self) -> None:
        fds = (self._status, self._children)
        self._status = self._children = -2
        for fd in fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def __del__(self) -> None:
        self.close()


class LinuxReader:
    name = "linux-proc"

    def __init__(self) -> None:
        # This process's statm, status and clear_refs stay open: pread at offset 0
        # regenerates a /proc file, and a write to clear_refs acts at any offset. Keyed
        # by pid: a forked child must reopen its own instead of its parent's.
        self._pid = -1
        self._fds: dict[str, int] = {}
        # statm and clear_refs, read or written at every span's start and end: their
        # fds (-1 until open) for the pid _fds holds, without a call to _fd
        self._statm = self._clear = -1

    def _fd(self, name: str, flags: int = os.O_RDONLY) -> int:
        pid = _PID[0]
        if pid != self._pid:
            for fd in self._fds.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._fds = {}
            self._statm = self._clear = -1
            self._pid = pid
        if name not in self._fds:
            fd = os.open(f"/proc/{pid}/{name}", flags | os.O_CLOEXEC)
            if self._fds.setdefault(name, fd) != fd:  # another thread won (no lock: fork)
                os.close(fd)
        fd = self._fds[name]
        if name == "statm":
            self._statm = fd
        elif name == "clear_refs":
            self._clear = fd
        return fd

    def usable(self) -> bool:
        return os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")

    def self_rss(self) -> int:
        # the pid first: _fd() resets the fds before it records a new pid
        fd = self._statm if self._pid == _PID[0] else -1
        if fd < 0:
            fd = self._fd("statm")
        return int(os.pread(fd, 256, 0).split()[1]) * _PAGE

    def self_hwm(self) -> int | None:
        try:
            data = os.pread(self._fd("status"), 8192, 0)
        except OSError:
            return None
        mem = _parse_status(data)
        return None if mem is None else mem[1]

    def self_mem(self) -> tuple[int, int | None]:
        """(VmRSS, VmHWM) from one read of /proc/self/status."""
        try:
            mem = _parse_status(os.pread(self._fd("status"), 8192, 0))
        except OSError:
            mem = None
        return mem if mem is not None else (self.self_rss(), None)

    def reset_self_hwm(self) -> bool:
        # "5" resets only the peak-RSS counter (Linux >= 4.0) and walks no page tables.
        fd = self._clear if self._pid == _PID[0] else -1
        try:
            if fd < 0:
                fd = self._fd("clear_refs", os.O_WRONLY)
            os.write(fd, b"5")
        except OSError:
            return False
        return True

    def self_hwm_before_reset(self) -> int | None:
        """:meth:`self_hwm`, read with the GIL held (libc's pread, see
        _gil_held_pread; a read of the status file takes no lock that could make it
        wait): os.pread would hand the GIL to a waiting Python thread, which could
        raise the peak and free it again before the reset that follows, and that
        peak would be lost to the spans the value is folded into. The reset's write
        releases the GIL as before (it waits for the address space's lock, held by
        any thread mapping or unmapping memory), so only what is allocated and freed
        again within that one system call can still be lost."""
        pread = _gil_held_pread()
        try:
            fd = self._fd("status")
        except OSError:
            return None
        if pread is None:
            return self.self_hwm()
        buf = ctypes.create_string_buffer(8192)
        n = pread(fd, buf, 8192, 0)
        mem = _parse_status(buf.raw[:n]) if n > 0 else None
        return None if mem is None else mem[1]

    def open_tree(self, pid: int) -> ProcTree:
        return ProcTree(self, pid)

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
