"""The in-flight journal: which tasks a worker has started and not yet finished, kept
where it survives the death of the whole worker (a container OOM kill SIGKILLs every
process of the cgroup at once: nothing gets to write a word).

Layout: ``<journal folder>/<node name>/`` (the Celery node name, sanitised, so a
restarted worker finds its own) holds

- ``lock``: the main process holds an exclusive ``flock`` on it while it lives, so a
  second live worker of the same name never recovers the first one's tasks (it logs a
  warning and runs without a journal);
- ``main.state``: the main process's heartbeat and the memory cgroup's OOM-kill counter
  as it last read them (once a second);
- ``<pid>-<n>.slot``: one fixed-size record per process (thread ``n`` of that process;
  prefork children use only ``0``) that runs tasks. The process maps it ``MAP_SHARED``
  and writes the task's name, id, start and CPU at start, then clears one byte at the
  end: plain memory writes, no system call, no fsync. The kernel keeps the dirty pages
  of a shared file mapping in its page cache when the process dies, even by SIGKILL, so
  the next incarnation reads what was there. (Not a node crash: that loses the page
  cache, and the pod with it.) The main process writes, at each tick of its hub, what
  it last observed of the task into the second half of the child's record: worker RSS,
  its high-water mark, the tools running and their RSS, CPU.

At worker start (main process, before the pool forks) :meth:`Journal.recover` turns
every record holding a task into a ``TaskReport`` with state ``lost`` and hands it to
the sinks (metrics, ledger); the record is removed after that, never before. A task
that ended normally is cleared by its process before its report is sent, and a task
the main process reported itself (a killed child) is cleared by :meth:`report_done`,
so no task is recorded twice. Records are fixed-size and removed when their process
is gone, so the journal never grows.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import re
import stat
import struct
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from taskmeter.measure.report import (
    Cause,
    ProcessStats,
    SamplerInfo,
    TaskReport,
    ToolRun,
    ToolTotals,
    WorkerInfo,
    iso_utc,
)

if TYPE_CHECKING:
    from taskmeter.celery.hub import Run

log = logging.getLogger("taskmeter.journal")

SLOT_SIZE = 4096
LOCK_NAME = "lock"
STATE_NAME = "main.state"
SLOT_SUFFIX = ".slot"
MAX_TOOLS = 8  # the largest tools running, per task
MAX_SLOTS_PER_PROCESS = 256  # threads of one process with a record (threads pool)
_MAX_NAME, _MAX_ID, _MAX_ARGV = 400, 255, 240

_RUNNING = 1
_SLOT_MAGIC = b"TMJ1"
_STATE_MAGIC = b"TMM1"
# task half (written by the process running the task), bytes 0..1023:
#   magic, state, seq (run number in the process), pid, started (epoch), cpu0 (process
#   CPU at start, -1 unknown), len(name), len(id); then name, id; crc32 at 1020
_A = struct.Struct("<4sB3xQqddHH")
_A_CRC = 1020
# observation half (written by the main process), bytes 1024..4095:
#   seq it refers to, updated (epoch), worker rss, hwm, rss avg, footprint, samples,
#   cpu (process CPU, -1 unknown), n tools; then per tool: pid, rss now, rss peak,
#   first seen (epoch), samples, len(argv); argv (NUL-separated); crc32 at 4092
_B_OFF = 1024
_B = struct.Struct("<Qdqqqqqdh")
_T = struct.Struct("<iqqdqH")
_B_CRC = 4092
# main.state: magic, pid, started, heartbeat, oom kills (-1 unknown), len(cgroup dir);
# cgroup dir; crc32 at 252
_M = struct.Struct("<4sqddqH")
_M_CRC = 252
_CRC = struct.Struct("<I")

_SLOT_NAME = re.compile(r"^(\d+)-(\d+)\.slot$")
_OOM_EVERY_S = 1.0


class SlotError(ValueError):
    """A record that is not a whole, valid journal record (torn or garbage)."""


@dataclass(frozen=True)
class ToolSeen:
    pid: int
    argv: tuple[str, ...]
    rss_bytes: int
    rss_peak_bytes: int
    first_seen: float
    samples: int


@dataclass(frozen=True)
class Observed:
    """The main process's last observation of a run (the second half of a record)."""

    seq: int
    updated: float
    worker_rss_bytes: int
    hwm_bytes: int
    rss_avg_bytes: int
    footprint_bytes: int
    samples: int
    cpu_s: float | None
    tools: tuple[ToolSeen, ...]


@dataclass(frozen=True)
class InFlight:
    """A task as its record holds it."""

    seq: int
    pid: int
    task: str
    task_id: str | None
    started: float
    cpu0_s: float | None
    observed: Observed | None


@dataclass(frozen=True)
class MainState:
    pid: int
    started: float
    heartbeat: float
    oom_kills: int | None
    cgroup: str


# -- encoding ------------------------------------------------------------------------------
def encode_task(
    seq: int, pid: int, task: str, task_id: str | None, started: float, cpu0_s: float | None
) -> bytes:
    """The task half of a record, without its crc."""
    name = task.encode("utf-8", "replace")[:_MAX_NAME]
    tid = (task_id or "").encode("utf-8", "replace")[:_MAX_ID]
    cpu0 = -1.0 if cpu0_s is None else cpu0_s
    return _A.pack(_SLOT_MAGIC, _RUNNING, seq, pid, started, cpu0, len(name), len(tid)) + name + tid


def _as_recorded(task_id: str | None) -> str | None:
    """A task id as a record holds it (long ids are cut)."""
    tid = (task_id or "").encode("utf-8", "replace")[:_MAX_ID]
    return tid.decode("utf-8", "replace") or None


def decode_slot(buf: bytes) -> InFlight | None:
    """The task a record holds; None when it holds none. Raises :class:`SlotError` for
    a record that is torn (killed mid-write) or not a journal record at all."""
    if len(buf) != SLOT_SIZE:
        raise SlotError(f"{len(buf)} bytes, not {SLOT_SIZE}")
    if buf[:4] == b"\0\0\0\0":
        return None  # never written
    if buf[:4] != _SLOT_MAGIC:
        raise SlotError("not a taskmeter journal record")
    if buf[4] != _RUNNING:
        return None  # the task ended
    _magic, _state, seq, pid, started, cpu0, n_name, n_id = _A.unpack_from(buf, 0)
    end = _A.size + n_name + n_id
    if end > _A_CRC or _CRC.unpack_from(buf, _A_CRC)[0] != zlib.crc32(buf[:end]):
        raise SlotError("torn record (its checksum does not match)")
    name = buf[_A.size : _A.size + n_name].decode("utf-8", "replace")
    tid = buf[_A.size + n_name : end].decode("utf-8", "replace")
    observed = _decode_observed(buf, seq)
    return InFlight(
        seq=seq,
        pid=pid,
        task=name or "unknown",
        task_id=tid or None,
        started=started,
        cpu0_s=None if cpu0 < 0 else cpu0,
        observed=observed,
    )


def encode_observed(obs: Observed) -> bytes:
    parts = [
        _B.pack(
            obs.seq, obs.updated, obs.worker_rss_bytes, obs.hwm_bytes, obs.rss_avg_bytes,
            obs.footprint_bytes, obs.samples, -1.0 if obs.cpu_s is None else obs.cpu_s,
            len(obs.tools[:MAX_TOOLS]),
        )
    ]  # fmt: skip
    for t in obs.tools[:MAX_TOOLS]:
        argv = "\0".join(t.argv).encode("utf-8", "replace")[:_MAX_ARGV]
        parts.append(
            _T.pack(t.pid, t.rss_bytes, t.rss_peak_bytes, t.first_seen, t.samples, len(argv))
        )
        parts.append(argv)
    return b"".join(parts)


def _decode_observed(buf: bytes, seq: int) -> Observed | None:
    """The observation half, if it is whole and about run ``seq``."""
    try:
        fields = _B.unpack_from(buf, _B_OFF)
        if fields[0] != seq:
            return None
        pos = _B_OFF + _B.size
        tools = []
        for _ in range(min(max(fields[8], 0), MAX_TOOLS)):
            pid, rss, peak, first, samples, n = _T.unpack_from(buf, pos)
            pos += _T.size
            argv = buf[pos : pos + n].decode("utf-8", "replace")
            pos += n
            tools.append(ToolSeen(pid, tuple(argv.split("\0")) if argv else (), rss, peak, first,
                                  samples))  # fmt: skip
        if pos > _B_CRC or _CRC.unpack_from(buf, _B_CRC)[0] != zlib.crc32(buf[_B_OFF:pos]):
            return None
    except struct.error:
        return None
    return Observed(
        seq=seq,
        updated=fields[1],
        worker_rss_bytes=fields[2],
        hwm_bytes=fields[3],
        rss_avg_bytes=fields[4],
        footprint_bytes=fields[5],
        samples=fields[6],
        cpu_s=None if fields[7] < 0 else fields[7],
        tools=tuple(tools),
    )


def _decode_state(buf: bytes) -> MainState | None:
    try:
        magic, pid, started, heartbeat, oom, n = _M.unpack_from(buf, 0)
        end = _M.size + n
        if magic != _STATE_MAGIC or end > _M_CRC:
            return None
        if _CRC.unpack_from(buf, _M_CRC)[0] != zlib.crc32(buf[:end]):
            return None
    except struct.error:
        return None
    cg = buf[_M.size : end].decode("utf-8", "replace")
    return MainState(pid, started, heartbeat, None if oom < 0 else oom, cg)


# -- files ----------------------------------------------------------------------------------
def node_folder_name(node: str) -> str:
    """A Celery node name (``celery@host``) as a safe folder name."""
    name = re.sub(r"[^A-Za-z0-9._@+-]", "_", node)[:120].strip(".")
    return name or "worker"


def map_shared(path: Path, size: int, *, create: bool = False, new: bool = False) -> mmap.mmap:
    """``path`` mapped shared, read-write: a regular file of ``size`` bytes, never
    reached through a symlink. ``create``: made, or given that size, when it is not
    so. ``new``: made, failing if it exists, its blocks allocated on disk (a write
    into a sparse map on a full disk is SIGBUS). Raises OSError, or SlotError for an
    existing file of another size."""
    flags = os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    if create or new:
        flags |= os.O_CREAT | (os.O_EXCL if new else 0)
    fd = os.open(path, flags, 0o600)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        if new and hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, size)
        elif st.st_size != size:
            if not (create or new):
                raise SlotError(f"{st.st_size} bytes, not {size}")
            os.ftruncate(fd, size)
        return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


def _map(path: Path, create: bool) -> mmap.mmap:
    return map_shared(path, SLOT_SIZE, create=create)


class Slot:
    """One process's (or thread's) record, mapped shared; writes are memory stores."""

    __slots__ = ("mm", "path", "pid")

    def __init__(self, path: Path, pid: int) -> None:
        self.path, self.pid = path, pid
        self.mm = _map(path, create=True)
        self.mm[:] = bytes(SLOT_SIZE)  # a fresh process: nothing of a previous owner

    def begin(
        self, seq: int, task: str, task_id: str | None, started: float, cpu0_s: float | None
    ) -> None:
        data = encode_task(seq, self.pid, task, task_id, started, cpu0_s)
        mm = self.mm
        mm[0 : len(data)] = data
        _CRC.pack_into(mm, _A_CRC, zlib.crc32(data))

    def end(self) -> None:
        self.mm[4] = 0

    def close(self) -> None:
        with contextlib.suppress(BufferError, ValueError):
            self.mm.close()


@dataclass
class _Watched:
    """The main process's map of a pool child's record."""

    mm: mmap.mmap


def pid_alive(pid: int) -> bool:
    """Whether a process of that pid exists (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _oom_reading() -> tuple[int | None, str]:
    """The memory cgroup's OOM-kill counter and the cgroup it belongs to."""
    try:
        from taskmeter.measure import cgroup
    except ImportError:
        return None, ""
    try:
        cg = cgroup.memory_cgroup()
        return (cgroup.oom_kills() if cg is not None else None), (cg.directory if cg else "")
    except Exception:
        log.debug("taskmeter: reading the OOM-kill counter failed", exc_info=True)
        return None, ""


class Journal:
    """The journal folder of one worker node. Open it with :meth:`Journal.open`."""

    def __init__(
        self,
        folder: Path,
        lock_fd: int,
        *,
        oom_reading: Callable[[], tuple[int | None, str]] = _oom_reading,
    ) -> None:
        self.folder = folder
        self._lock_fd: int | None = lock_fd
        self._oom_reading = oom_reading
        self._main_pid = os.getpid()
        self._state: mmap.mmap | None = None
        self._started = time.time()
        self._oom: tuple[int | None, str] = (None, "")
        self._oom_at = 0.0
        self._watched: dict[int, _Watched] = {}
        self._gone: set[int] = set()  # exited children whose record waits for a report
        # the main process's hub, listener and sink threads share the maps above
        self._mlock = threading.Lock()
        self._made_root = False  # removed at a clean close when empty
        self._local = threading.local()
        self._threads = 0
        self._tlock = threading.Lock()
        self._mine: list[Slot] = []

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        root: str | os.PathLike[str],
        node: str,
        *,
        oom_reading: Callable[[], tuple[int | None, str]] = _oom_reading,
    ) -> Journal | None:
        """Lock and return the journal of ``node`` under ``root``; None (with a warning)
        when it cannot be used: another live worker of that name holds it, or the folder
        cannot be made private to this user."""
        folder = Path(root) / node_folder_name(node)
        made_root = not os.path.lexists(root)
        try:
            _private_dirs(Path(root), folder)
            fd = _lock(folder / LOCK_NAME)
        except OSError as exc:
            log.warning(
                "taskmeter: the in-flight journal %s cannot be used (%s); running without "
                "it: tasks in flight if the whole worker is killed will not be recorded "
                "(set TASKMETER_JOURNAL to a writable folder, or off)",
                folder, exc.strerror or exc,
            )  # fmt: skip
            return None
        if fd is None:
            log.warning(
                "taskmeter: another live worker holds the in-flight journal %s (same node "
                "name?); running without it. Give each worker its own name (-n).",
                folder,
            )
            return None
        journal = cls(folder, fd, oom_reading=oom_reading)
        journal._made_root = made_root
        return journal

    # -- main process: recovery ------------------------------------------------------------
    def recover(
        self,
        sinks: Sequence[Callable[[TaskReport], None]],
        *,
        hostname: str,
        pool: str,
        interval_s: float,
    ) -> list[TaskReport]:
        """Report every task a previous incarnation left in flight as ``lost``, then
        start this incarnation's state. Call once, in the main process, before the pool
        starts."""
        previous = self._read_state()
        oom_now, cg_now = self._oom_reading()
        cause: Cause = "unknown"
        if (
            previous is not None
            and previous.oom_kills is not None
            and oom_now is not None
            and previous.cgroup == cg_now
            and oom_now > previous.oom_kills
        ):
            cause = "oom"
        reports: list[TaskReport] = []
        for path in sorted(self.folder.glob("*" + SLOT_SUFFIX)):
            try:
                task = self._read_slot(path)
            except (OSError, SlotError) as exc:
                log.warning("taskmeter: ignored journal record %s: %s", path, exc)
                _unlink(path)
                continue
            if task is None:
                _unlink(path)
                continue
            report = lost_report(
                task, previous, cause, hostname=hostname, pool=pool, interval_s=interval_s
            )
            for sink in sinks:
                try:
                    sink(report)
                except Exception:
                    log.exception("taskmeter sink %r failed for a lost task", sink)
            _unlink(path)  # after the report reached the sinks, not before
            reports.append(report)
        if reports:
            log.warning(
                "taskmeter: %d task(s) were in flight when this worker's previous "
                "incarnation died; recorded as lost (cause: %s): %s",
                len(reports), cause,
                ", ".join(f"{r.task}[{r.task_id}]" for r in reports),
            )  # fmt: skip
        self._start_state(oom_now, cg_now)
        return reports

    def _read_slot(self, path: Path) -> InFlight | None:
        if not _SLOT_NAME.match(path.name):
            raise SlotError("not a journal record name")
        with open(path, "rb") as f:
            return decode_slot(f.read(SLOT_SIZE + 1))

    def _read_state(self) -> MainState | None:
        try:
            with open(self.folder / STATE_NAME, "rb") as f:
                return _decode_state(f.read(SLOT_SIZE))
        except OSError:
            return None

    def _start_state(self, oom: int | None, cg: str) -> None:
        path = self.folder / STATE_NAME
        try:
            self._state = _map(path, create=True)
        except (OSError, SlotError):
            _unlink(path)
            self._state = _map(path, create=True)
        self._state[:] = bytes(SLOT_SIZE)
        self._oom, self._oom_at = (oom, cg), time.monotonic()
        self.heartbeat()

    def heartbeat(self) -> None:
        """Record that the main process is alive now (and, once a second, the OOM
        counter): a lost task ran at least until the last heartbeat."""
        mm = self._state
        if mm is None:
            return
        mono = time.monotonic()
        if mono - self._oom_at >= _OOM_EVERY_S:
            self._oom, self._oom_at = self._oom_reading(), mono
        oom, cg = self._oom
        cgb = cg.encode("utf-8", "replace")[: _M_CRC - _M.size]
        data = _M.pack(
            _STATE_MAGIC, self._main_pid, self._started, time.time(),
            -1 if oom is None else oom, len(cgb),
        ) + cgb  # fmt: skip
        mm[0 : len(data)] = data
        _CRC.pack_into(mm, _M_CRC, zlib.crc32(data))

    # -- main process: while running ---------------------------------------------------------
    def observe(self, runs: Sequence[Run]) -> None:
        """The hub's tick: write what it observed of each pool child's task into that
        child's record, and the heartbeat."""
        with self._mlock:
            self._observe(runs)

    def _observe(self, runs: Sequence[Run]) -> None:
        self.heartbeat()
        now = time.time()
        for run in runs:
            if run.pid == self._main_pid or run.child_gone_at is not None:
                continue
            w = self._watch(run.pid)
            if w is None:
                continue
            try:
                seq = int(run.run_id.rsplit(":", 1)[1])
            except (IndexError, ValueError):
                continue
            mono = time.monotonic()
            seen = [
                ToolSeen(
                    pid=t.pid,
                    argv=t.argv,
                    rss_bytes=t.rss.rss_last,
                    rss_peak_bytes=max(t.hwm, t.rss.peak),
                    first_seen=now - max(mono - t.started_mono, 0.0),
                    samples=t.rss.n,
                )
                for t in list(run.tools.values())
                if not t.handled
            ]
            seen.sort(key=lambda t: t.rss_peak_bytes, reverse=True)
            data = encode_observed(
                Observed(
                    seq=seq,
                    updated=now,
                    worker_rss_bytes=run.worker_rss,
                    hwm_bytes=run.hwm,
                    rss_avg_bytes=run.rss.avg,
                    footprint_bytes=run.footprint,
                    samples=run.rss.n,
                    cpu_s=run.cpu_s,
                    tools=tuple(seen[:MAX_TOOLS]),
                )
            )
            mm = w.mm
            mm[_B_OFF : _B_OFF + len(data)] = data
            _CRC.pack_into(mm, _B_CRC, zlib.crc32(data))

    def _watch(self, pid: int) -> _Watched | None:
        w = self._watched.get(pid)
        if w is None:
            try:
                w = self._watched[pid] = _Watched(_map(self._slot_path(pid, 0), create=False))
            except (OSError, SlotError):
                return None
        return w

    def _slot_path(self, pid: int, n: int) -> Path:
        return self.folder / f"{pid}-{n}{SLOT_SUFFIX}"

    def report_done(self, report: TaskReport) -> None:
        """A sink, after the metrics and the ledger: the main process reported a task
        whose process could not end it (killed, revoked); clear its record so that a
        restart does not report it again."""
        if report.state not in ("killed", "revoked") or report.worker.pid == self._main_pid:
            return
        with self._mlock:
            self._report_done(report)

    def _report_done(self, report: TaskReport) -> None:
        pid = report.worker.pid
        path = self._slot_path(pid, 0)
        w = self._watched.get(pid)
        try:
            mm = w.mm if w is not None else _map(path, create=False)
        except (OSError, SlotError):
            return
        try:
            task = decode_slot(bytes(mm))
        except SlotError:
            task = None
        if task is not None and task.task_id == _as_recorded(report.task_id):
            mm[4] = 0
            if pid in self._gone or not pid_alive(pid):
                self._gone.discard(pid)
                self._forget(pid)
                _unlink(path)
        if w is None:
            mm.close()

    def child_gone(self, pid: int) -> None:
        """A pool child exited: remove its record unless it holds a task not yet
        reported (the hub's report for it clears it through :meth:`report_done`)."""
        with self._mlock:
            self._child_gone(pid)

    def _child_gone(self, pid: int) -> None:
        path = self._slot_path(pid, 0)
        w = self._watched.get(pid)
        try:
            buf = bytes(w.mm) if w is not None else path.read_bytes()
            task = decode_slot(buf)
        except (OSError, SlotError):
            task = None
        if task is None:
            self._forget(pid)
            _unlink(path)
        else:
            self._gone.add(pid)

    def in_flight(self, pid: int | None = None, task_id: str | None = None) -> list[InFlight]:
        """Main process: the tasks pool processes' records hold (those of ``pid``, or
        with ``task_id``): what the hub asks when a pool process dies, or Celery judges a
        task, before the pool process announced the task (it does so only for tasks that
        outlive their first sample)."""
        want = _as_recorded(task_id) if task_id is not None else None
        pattern = f"{pid}-*{SLOT_SUFFIX}" if pid is not None else "*" + SLOT_SUFFIX
        out: list[InFlight] = []
        for path in self.folder.glob(pattern):
            try:
                task = self._read_slot(path)
            except (OSError, SlotError):
                continue
            if task is None or task.pid == self._main_pid:
                continue
            if (pid is None or task.pid == pid) and (want is None or task.task_id == want):
                out.append(task)
        return out

    def _forget(self, pid: int) -> None:
        w = self._watched.pop(pid, None)
        if w is not None:
            with contextlib.suppress(BufferError, ValueError):
                w.mm.close()

    def close(self) -> None:
        """Clean shutdown: remove the records holding no task; when none is left, the
        whole node folder. Then release the lock."""
        with self._mlock:
            self._close()

    def _close(self) -> None:
        for pid in list(self._watched):
            self._forget(pid)
        for s in self._mine:
            s.close()
        self._mine = []
        left = False
        for path in self.folder.glob("*" + SLOT_SUFFIX):
            try:
                task = self._read_slot(path)
            except (OSError, SlotError):
                task = None
            if task is None:
                _unlink(path)
            else:
                left = True
        if self._state is not None:
            with contextlib.suppress(BufferError, ValueError):
                self._state.close()
            self._state = None
        if self._lock_fd is not None:
            if not left:
                _unlink(self.folder / STATE_NAME)
                _unlink(self.folder / LOCK_NAME)  # while locked: see _lock()
                with contextlib.suppress(OSError):
                    self.folder.rmdir()
                    if self._made_root:
                        self.folder.parent.rmdir()
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- every process that runs tasks -----------------------------------------------------
    def after_fork_in_child(self) -> None:
        """In a pool child: drop the main process's maps and its copy of the lock fd
        (the lock stays with the main process)."""
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = None
        self._watched = {}
        self._gone = set()
        self._state = None  # the child's copy of the map goes with the child
        self._mine = []
        self._local = threading.local()
        self._threads = 0
        self._tlock = threading.Lock()
        self._main_pid = -1

    def begin(
        self, seq: int, task: str, task_id: str | None, started: float, cpu0_s: float | None
    ) -> None:
        """A task starts in this thread: memory writes into this thread's record."""
        slot: Slot | None = getattr(self._local, "slot", None)
        if slot is None:
            if getattr(self._local, "tried", False):
                return  # this thread could not have a record (logged once)
            slot = self._new_slot()
            if slot is None:
                return
        slot.begin(seq, task, task_id, started, cpu0_s)

    def end(self) -> None:
        """The task of this thread ended (before its report is sent)."""
        slot: Slot | None = getattr(self._local, "slot", None)
        if slot is not None:
            slot.end()

    def _new_slot(self) -> Slot | None:
        self._local.tried = True
        pid = os.getpid()
        with self._tlock:
            n = self._threads
            self._threads += 1
        if n >= MAX_SLOTS_PER_PROCESS:
            if n == MAX_SLOTS_PER_PROCESS:
                log.warning(
                    "taskmeter: more than %d threads ran tasks in pid %d; the in-flight "
                    "journal records the tasks of the first %d only",
                    MAX_SLOTS_PER_PROCESS, pid, MAX_SLOTS_PER_PROCESS,
                )  # fmt: skip
            return None
        try:
            slot = Slot(self._slot_path(pid, n), pid)
        except OSError as exc:
            log.warning("taskmeter: no in-flight journal record for pid %d: %s", pid, exc)
            return None
        self._local.slot = slot
        self._mine.append(slot)
        return slot


def lost_report(
    task: InFlight,
    previous: MainState | None,
    cause: Cause,
    *,
    hostname: str,
    pool: str,
    interval_s: float,
) -> TaskReport:
    """The report of a task found in flight at start: what the journal knew of it."""
    obs = task.observed
    ends = [task.started]
    if obs is not None:
        ends.append(obs.updated)
    if previous is not None and previous.started <= task.started + 1.0:
        ends.append(previous.heartbeat)  # the last moment its main process was alive
    end = max(ends)
    wall = max(end - task.started, 0.0)
    tools = tuple(_lost_tool(t, task.started, end) for t in (obs.tools if obs else ()))
    totals = ToolTotals.of(tools)
    cpu = 0.0
    if obs is not None and obs.cpu_s is not None and task.cpu0_s is not None:
        cpu = max(obs.cpu_s - task.cpu0_s, 0.0)
    peak = max(obs.hwm_bytes, obs.worker_rss_bytes) if obs else 0
    tools_now = sum(t.rss_bytes for t in obs.tools) if obs else 0
    return TaskReport(
        task=task.task,
        task_id=task.task_id,
        state="lost",
        started_at=iso_utc(task.started),
        ended_at=iso_utc(end),
        wall_s=wall,
        cpu_s=cpu,
        overhead=ProcessStats(
            wall_s=max(wall - totals.wall_s, 0.0),
            cpu_s=cpu,
            user_s=cpu,  # /proc CPU as last read: no user/sys split kept
            sys_s=0.0,
            rss_avg_bytes=obs.rss_avg_bytes if obs else 0,
            rss_peak_bytes=peak,
            peak_method="sampled" if obs else "none",
        ),
        tools=tools,
        tool_totals=totals,
        footprint_peak_bytes=max(obs.footprint_bytes if obs else 0, peak + tools_now),
        phases=(),
        unattributed_child_cpu_s=0.0,
        worker=WorkerInfo(hostname=hostname, pid=task.pid, pool=pool),
        sampler=SamplerInfo(interval_s=interval_s),
        cause=cause,
    )


def _lost_tool(t: ToolSeen, started: float, end: float) -> ToolRun:
    start_s = max(t.first_seen - started, 0.0)
    end_s = max(end - started, start_s)
    exe = os.path.basename(t.argv[0]) if t.argv else "unknown"
    return ToolRun(
        argv=t.argv,
        exe=exe,
        pid=t.pid,
        exit_code=None,
        signal=None,
        start_s=start_s,
        end_s=end_s,
        wall_s=end_s - start_s,
        cpu_s=0.0,
        user_s=0.0,
        sys_s=0.0,
        rss_avg_bytes=t.rss_bytes,
        rss_peak_bytes=max(t.rss_peak_bytes, t.rss_bytes),
        peak_method="sampled",
        samples=t.samples,
        read_bytes=0,
        write_bytes=0,
        cause="lost",
    )


def _private_dirs(root: Path, folder: Path) -> None:
    """Make ``folder`` (and ``root``) if needed, owned by this user, mode 0700."""
    for d in (root, folder):
        with contextlib.suppress(FileExistsError):
            d.mkdir(mode=0o700, parents=True)
        st = os.lstat(d)
        if not stat.S_ISDIR(st.st_mode):
            raise OSError(errno.ENOTDIR, "not a directory (or a symlink)", str(d))
        if hasattr(os, "getuid") and st.st_uid != os.getuid():
            raise OSError(errno.EPERM, f"owned by uid {st.st_uid}, not this user", str(d))


def _lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on ``path``; None if another process holds it.
    Retries when the file was removed by a closing worker between open and lock."""
    for _ in range(10):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError:
            os.close(fd)
            raise
        try:
            same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
    raise OSError(errno.EAGAIN, "the lock file keeps changing", str(path))


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


__all__ = [
    "SLOT_SIZE",
    "InFlight",
    "Journal",
    "MainState",
    "Observed",
    "Slot",
    "SlotError",
    "ToolSeen",
    "decode_slot",
    "encode_observed",
    "encode_task",
    "lost_report",
    "node_folder_name",
]
