"""The memory cgroup's OOM-kill counter: the kernel's word on whether a death was an
OOM kill.

A process killed by the OOM killer dies of SIGKILL, exactly like one killed by
``kill -9``; only its memory cgroup remembers the difference, in a counter of the
processes the OOM killer killed in it:

- cgroup v2: ``oom_kill N`` in ``<cgroup>/memory.events`` (hierarchical: it counts
  kills in the cgroup and every cgroup below it);
- cgroup v1: ``oom_kill N`` in ``<memory cgroup>/memory.oom_control`` (this cgroup only;
  Linux >= 4.13).

:func:`oom_kills` reads that counter for the calling process's memory cgroup; callers
read it when something starts and again when it dies, and call the death an OOM kill
when the counter rose in between. It is ``None`` where there is no such counter: not
Linux (macOS has no cgroups), no memory controller mounted, the root cgroup of a
cgroup v2 host (which has no ``memory.events``), or a kernel older than 4.13 on v1.

The counter counts kills in the whole cgroup: when it rose during a task, *some*
process of the cgroup was OOM-killed, not necessarily the one that died. The OOM killer
picks the largest process, which is usually the one that allocated, but with several
tasks in one container another task's process may be chosen. See docs/measurement.md.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from dataclasses import dataclass

from taskmeter.measure.proc import PID as _PID

_V1_FILE = "memory.oom_control"
_V2_FILE = "memory.events"


@dataclass(frozen=True)
class MemoryCgroup:
    """Where the calling process's OOM-kill counter lives."""

    version: int  # 1 or 2
    directory: str
    file: str  # the counter's file (memory.oom_control or memory.events)


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _mounts(mountinfo: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(v1 memory mounts, v2 mounts) as (root, mount point) pairs, from mountinfo."""
    v1: list[tuple[str, str]] = []
    v2: list[tuple[str, str]] = []
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, after = left.split(), right.split()
        if len(fields) < 5 or len(after) < 3:
            continue
        root, point = _unescape(fields[3]), _unescape(fields[4])
        if after[0] == "cgroup2":
            v2.append((root, point))
        elif after[0] == "cgroup" and "memory" in after[2].split(","):
            v1.append((root, point))
    return v1, v2


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal (\040 ...)
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _candidates(path: str, mounts: list[tuple[str, str]]) -> list[str]:
    """Directories where ``path`` (from /proc/self/cgroup) may be under these mounts."""
    out = []
    for root, point in mounts:
        rel = path
        if root != "/" and (rel == root or rel.startswith(root.rstrip("/") + "/")):
            rel = rel[len(root.rstrip("/")) :]  # a mount of a sub-tree (no cgroupns)
        out.append(os.path.normpath(os.path.join(point, rel.lstrip("/"))))
        out.append(point)  # a cgroup namespace whose root is this mount
    return out


def find(
    proc_cgroup: str = "/proc/self/cgroup", mountinfo: str = "/proc/self/mountinfo"
) -> MemoryCgroup | None:
    """The memory cgroup of the process whose ``/proc/<pid>/cgroup`` is given, or None.

    A v1 ``memory`` controller wins over the v2 hierarchy (hybrid hosts mount a v2
    hierarchy without the memory controller next to the v1 ones)."""
    if not sys.platform.startswith("linux"):
        return None
    text, mounts = _read(proc_cgroup), _read(mountinfo)
    if text is None:
        return None
    v1_mounts, v2_mounts = _mounts(mounts or "")
    if not v1_mounts and not v2_mounts and mounts is None:
        v1_mounts, v2_mounts = [("/", "/sys/fs/cgroup/memory")], [("/", "/sys/fs/cgroup")]
    v1_path = v2_path = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hier, controllers, path = parts
        if hier == "0" and controllers == "":
            v2_path = path
        elif "memory" in controllers.split(","):
            v1_path = path
    if v1_path is not None:
        for d in _candidates(v1_path, v1_mounts):
            if _counter_in(os.path.join(d, _V1_FILE)) is not None:
                return MemoryCgroup(1, d, os.path.join(d, _V1_FILE))
    if v2_path is not None:
        for d in _candidates(v2_path, v2_mounts):
            if _counter_in(os.path.join(d, _V2_FILE)) is not None:
                return MemoryCgroup(2, d, os.path.join(d, _V2_FILE))
    return None


def _counter_in(file: str) -> int | None:
    text = _read(file)
    if text is None:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            try:
                return int(value)
            except ValueError:
                return None
    return None


_lock = threading.Lock()
# (pid, cgroup, an open fd of its counter file) of the last find; the fd is read with
# pread at offset 0, which regenerates a cgroup file: ~3 us instead of ~15-40 us for
# open/read/close. Keyed by pid: a forked child finds (and opens) its own.
_cached: tuple[int, MemoryCgroup | None, int | None] | None = None


def _load() -> tuple[MemoryCgroup | None, int | None]:
    global _cached
    # (after a fork that runs no hooks, the parent's pid: then its fd, inherited, open
    # on the same cgroup's file)
    pid = _PID[0]
    cached = _cached
    if cached is not None and cached[0] == pid:
        return cached[1], cached[2]
    with _lock:
        cached = _cached
        if cached is not None and cached[0] == pid:
            return cached[1], cached[2]
        found = find()
        fd = None
        if found is not None:
            try:
                fd = os.open(found.file, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                fd = None
        _cached = (pid, found, fd)
        return found, fd


def _after_fork_in_child() -> None:
    """A forked child: a new lock (the parent's may have been held by another thread at
    the fork, and would never be released in the child) and no cached counter (the
    parent's; its inherited copy of the parent's fd is closed, the child opens its own).
    An fd cached by another process (a fork that ran no hooks) is left alone: its number
    may have been reused since."""
    global _lock, _cached
    _lock = threading.Lock()
    cached, _cached = _cached, None
    if cached is not None and cached[2] is not None and cached[0] == os.getppid():
        with contextlib.suppress(OSError):
            os.close(cached[2])


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def memory_cgroup() -> MemoryCgroup | None:
    """This process's memory cgroup (found once per process; see :func:`reset`)."""
    return _load()[0]


def reset() -> None:
    """Forget the cgroup found: call after moving this process to another cgroup."""
    global _cached
    with _lock:
        if _cached is not None and _cached[0] == _PID[0] and _cached[2] is not None:
            with contextlib.suppress(OSError):
                os.close(_cached[2])
        _cached = None


def _parse(data: bytes) -> int | None:
    """N of the line ``oom_kill N`` (not ``oom_kill_disable``, ``oom_group_kill``)."""
    if data.startswith(b"oom_kill "):
        i = 0
    else:
        i = data.find(b"\noom_kill ") + 1
        if i == 0:
            return None
    end = data.find(b"\n", i)
    try:
        return int(data[i + 9 : end if end >= 0 else len(data)])
    except ValueError:
        return None


def oom_kills() -> int | None:
    """How many processes the OOM killer has killed in this process's memory cgroup
    (v2: and below it), or None where no such counter exists. One pread of an open
    file (a few microseconds)."""
    cg, fd = _load()
    if cg is None:
        return None
    if fd is not None:
        try:
            return _parse(os.pread(fd, 4096, 0))
        except OSError:
            pass  # e.g. the cgroup was removed: read it by name
    return _counter_in(cg.file)


def rose(before: int | None, after: int | None) -> bool:
    """Whether the counter rose between two readings (False when either is unknown)."""
    return before is not None and after is not None and after > before
