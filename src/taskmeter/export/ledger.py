"""The ledger: one JSON line per finished task, safe to share between processes.

Line format
-----------
Each line is one :class:`~taskmeter.measure.report.TaskReport` as compact JSON
(``TaskReport.to_json()``) followed by ``\\n``; the file is UTF-8 and every string is
ASCII-escaped, so a record never spans lines. The record's first key is
``"schema": "taskmeter.task/1"``; the fields are those of DESIGN.md::

    {"schema":"taskmeter.task/1","task":"vcf.query","task_id":"...","state":"success",
     "started_at":"2024-05-01T12:00:00.000000+00:00","ended_at":"...","wall_s":1.2,
     "cpu_s":0.9,"overhead":{"wall_s":..,"cpu_s":..,"user_s":..,"sys_s":..,
     "rss_avg_bytes":..,"rss_peak_bytes":..,"peak_method":"hwm","cpu_method":"process"},
     "tools":[{"argv":[..],"exe":"bcftools","pid":..,"exit_code":0,"signal":null,
               "start_s":..,"end_s":..,"wall_s":..,"cpu_s":..,"user_s":..,"sys_s":..,
               "rss_avg_bytes":..,"rss_peak_bytes":..,"peak_method":"hwm",
               "samples":..,"read_bytes":..,"write_bytes":..}],
     "tool_totals":{"runs":1,"wall_s":..,"cpu_s":..,"rss_peak_bytes":..},
     "footprint_peak_bytes":..,"phases":[{"name":"download","wall_s":..,"cpu_s":..,
     "rss_avg_bytes":..,"rss_peak_bytes":..}],"unattributed_child_cpu_s":0.0,
     "worker":{"hostname":"..","pid":..,"pool":"prefork"},"sampler":{"interval_s":0.05}}

Tool ``argv`` is recorded as run: if tools get secrets on their command line (a
presigned URL, say) the ledger holds them, so files are created with mode 0600.

Writing
-------
Any number of processes (and threads) may append to the same path. Each write opens
nothing new: under ``flock(LOCK_EX)`` on its ``O_APPEND`` descriptor a writer checks
that the descriptor still is the file at ``path`` (another writer may have rotated
it), rotates when the line would take the file beyond ``max_bytes``, then writes the
whole line. Rotation is logrotate's: ``path`` -> ``path.1`` -> ... -> ``path.N``
(``N = backups``, ``TASKMETER_LEDGER_BACKUPS``), the oldest dropped; the records it
held are counted (``taskmeter_ledger_rotation_dropped_records_total``) and logged. A
single line larger than ``max_bytes`` is still written, alone in its file. Lines are
not fsync'ed.

Durability: a record is written whole or not at all. The line goes out in one
``os.write``; a short write (the disk filled up mid-line) or a failed one is cut back
with ``ftruncate`` to the size before it, so the file always ends with a whole line.
A write that fails (``ENOSPC``, ``EACCES``, ``EIO``, a removed directory) drops that
record, counts it (``taskmeter_ledger_errors_total``) and never raises into the
worker; the first failure is logged once with the path and the error, then at most
one reminder and one "writing again" every 10 minutes (never one line per record).
Each write tries again, so records flow as soon as there is space. Should a tail ever
be torn anyway (a truncate that failed, another program), the next record starts on a
new line rather than being glued to it.

Standard output
---------------
``TASKMETER_LEDGER=stdout`` (or ``-``) writes each record as one line on file
descriptor 1 (:class:`StreamLedger`), for log pipelines: ``{"event":"taskmeter.task",
"schema":"taskmeter.task/1",...}`` (``event`` first, then the record's own keys), in
one ``os.write`` per line under a lock, so Celery's own log lines (other writes, on
standard error or through ``sys.stdout``) do not land inside one; on a pipe, a line
longer than ``PIPE_BUF`` (4 KiB) written while another process writes to the same pipe
can still be interleaved (the reader then skips the damaged line: docs/celery.md).

A reader running during a rotation may miss or re-read lines of the files it lists;
read after the writers stopped, or accept that.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import TypeVar

# The reader lives in records.py; these names stay importable from here.
from taskmeter.export.records import LedgerProblem, ledger_paths, read_ledgers
from taskmeter.measure.report import SCHEMA, TaskReport

__all__ = [
    "EVENT",
    "SCHEMA",
    "STDOUT",
    "AnyLedger",
    "Ledger",
    "LedgerProblem",
    "StreamLedger",
    "ledger_paths",
    "open_ledger",
    "read_ledgers",
]

# Read too: a write checks the last byte of the file (a torn tail gets a newline first).
_FLAGS = os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
_MODE = 0o600
# TASKMETER_LEDGER values meaning "standard output, as JSON log lines".
STDOUT = ("stdout", "-")
# The stable first key of a record written as a log line.
EVENT = "taskmeter.task"
_CHUNK = 1 << 20

log = logging.getLogger("taskmeter.ledger")


def _count(counter: str, n: int = 1) -> None:
    """Add to a process-wide counter of export/metrics.py (imported when first needed)."""
    from taskmeter.export import metrics

    target = getattr(metrics, counter, None)
    if target is not None:
        target.inc(n)


class _Health:
    """Counts failed writes; logs the first failure once, with the path and the error,
    then at most one reminder (and one "writing again") per ``REMIND_S``: a disk that
    is nearly full, taking some records and not others, never logs once per record."""

    REMIND_S = 600.0

    def __init__(self, where: str) -> None:
        self.where = where
        self.errors = 0  # records lost to failed writes, since start
        self._spell = 0  # failures since the last write that succeeded
        self._told = False
        self._next_fail_log = self._next_ok_log = 0.0

    def failed(self, exc: OSError) -> None:
        self.errors += 1
        self._spell += 1
        _count("LEDGER_ERRORS")
        now = time.monotonic()
        if not self._told or now >= self._next_fail_log:
            self._next_fail_log = now + self.REMIND_S
            log.error(
                "taskmeter: %s the ledger %s: %s; records are dropped (%d so far, counted "
                "in taskmeter_ledger_errors_total) until a write succeeds again",
                "still cannot write" if self._told else "cannot write",
                self.where,
                exc.strerror or exc,
                self.errors,
            )
            self._told = True

    def succeeded(self) -> None:
        if self._spell:
            self._spell = 0
            now = time.monotonic()
            if now >= self._next_ok_log:
                self._next_ok_log = now + self.REMIND_S
                log.warning(
                    "taskmeter: writing the ledger %s again; %d record(s) dropped so far",
                    self.where,
                    self.errors,
                )


_L = TypeVar("_L", bound="_Closing")


class _Closing:
    """``with ledger:`` closes it: what both kinds of ledger share."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: _L) -> _L:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Ledger(_Closing):
    """Appends one JSON line per :class:`TaskReport` to ``path``, rotating by size.

    The directory must exist: a missing one is an error naming it, raised here.
    A ledger opened before a ``fork`` reopens the file in the child at its first write
    (a shared open file description would share the lock too).
    """

    def __init__(
        self, path: str | os.PathLike[str], *, max_bytes: int = 100 * 2**20, backups: int = 5
    ) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, not {max_bytes}")
        if backups < 0:
            raise ValueError(f"backups must be >= 0, not {backups}")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self._lock = threading.Lock()
        self._fd: int | None = None
        # Where our last write through _fd ended: a file that still ends there ends
        # with our newline (no read of its last byte needed); -1 when not known.
        self._end = -1
        self._pid = os.getpid()
        self._closed = False
        self.health = _Health(str(self.path))
        parent = self.path.parent
        if not parent.is_dir():
            raise FileNotFoundError(
                errno.ENOENT,
                f"cannot open ledger {str(self.path)!r}: directory {str(parent)!r} does not "
                "exist (create it first)",
                str(self.path),
            )
        self._fd = self._open()

    def _open(self) -> int:
        try:
            return os.open(self.path, _FLAGS, _MODE)
        except OSError as exc:
            raise type(exc)(
                exc.errno, f"cannot open ledger {str(self.path)!r}: {exc.strerror}", str(self.path)
            ) from exc

    def _is_current(self, mine: os.stat_result) -> bool:
        """Is the file of stat ``mine`` still the one at ``path`` (not rotated away or
        removed)?"""
        try:
            at_path = os.stat(self.path)
        except FileNotFoundError:
            return False
        return (mine.st_dev, mine.st_ino) == (at_path.st_dev, at_path.st_ino)

    def _rotate(self) -> None:
        """Shift ``path.i`` to ``path.i+1`` (the last one dropped), ``path`` to ``path.1``.

        Runs with the lock of the current file held: only one writer at a time can
        see that file as current, so renames never race each other.
        """
        oldest = self.path if self.backups == 0 else Path(f"{self.path}.{self.backups}")
        dropped = _count_lines(oldest)
        if dropped:
            _count("LEDGER_DROPPED", dropped)
            log.info(
                "taskmeter: ledger rotation dropped %s (%d records); keeping %d rotated "
                "file(s) (TASKMETER_LEDGER_BACKUPS)",
                oldest,
                dropped,
                self.backups,
            )
        if self.backups == 0:
            _remove(self.path)
            return
        for i in range(self.backups - 1, 0, -1):
            _replace(Path(f"{self.path}.{i}"), Path(f"{self.path}.{i + 1}"))
        _replace(self.path, Path(f"{self.path}.1"))

    def write(self, report: TaskReport) -> None:
        """Append exactly one line, ``report.to_json() + "\\n"``, whole or not at all.

        A write that fails is counted and logged (see the module's docstring), never
        raised: the worker goes on, and the next record is written whole.
        """
        self.write_encoded(report.to_json_bytes())

    def tail(self, n: int) -> bytes:
        """The file's last ``n`` bytes (fewer when shorter; empty when missing)."""
        try:
            with open(self.path, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(size - n, 0))
                return f.read(n)
        except OSError:
            return b""

    def write_encoded(self, record: bytes) -> None:
        """:meth:`write` of a record already encoded (``report.to_json()`` as UTF-8,
        no newline): the Celery integration's pool processes encode it once."""
        self.write_many([record])

    def write_many(self, records: list[bytes]) -> None:
        """Append encoded records (each as :meth:`write_encoded` takes it) in one write:
        all of them or none (a failure counts each as dropped)."""
        if not records:
            return
        data = b"\n".join(records) + b"\n"
        if self._pid != os.getpid():  # forked: get our own open file description
            self._lock = threading.Lock()
            self._pid = os.getpid()
            if self._fd is not None:
                os.close(self._fd)  # our copy only; the parent keeps its own
            self._fd, self._end = None, -1
            if not self._closed:
                with contextlib.suppress(OSError):  # retried at the write below
                    self._fd = self._open()
        with self._lock:
            if self._closed:
                raise ValueError(f"ledger {str(self.path)!r} is closed")
            try:
                self._append(data)
            except OSError as exc:
                for _ in records:
                    self.health.failed(exc)
            else:
                self.health.succeeded()

    def _append(self, data: bytes) -> None:
        while True:
            if self._fd is None:
                self._fd = self._open()
            fd = self._fd
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                mine = os.fstat(fd)
                if not self._is_current(mine):
                    self._fd = self._open()
                    continue
                size = mine.st_size
                if size > 0 and size + len(data) > self.max_bytes:
                    self._rotate()
                    self._fd = self._open()
                    continue
                # Another writer may have left a torn line at the end (our own writes
                # end with a newline, or are undone by _append_whole).
                if size > 0 and size != self._end and os.pread(fd, 1, size - 1) != b"\n":
                    data = b"\n" + data  # a torn tail stays a line of its own
                _append_whole(fd, data, size)
                self._end = size + len(data)
                return
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
                if self._fd != fd:
                    os.close(fd)
                    self._end = -1

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._fd is not None and self._pid == os.getpid():
                os.close(self._fd)
            self._fd = None

    def __repr__(self) -> str:
        return f"Ledger({str(self.path)!r}, max_bytes={self.max_bytes}, backups={self.backups})"


class StreamLedger(_Closing):
    """Records as JSON log lines on a file descriptor (standard output by default).

    Each line is ``{"event":"taskmeter.task",`` followed by the record's own keys
    (``schema`` first), written with one ``os.write`` under a lock (the rest of a
    line only if a pipe took part of it). A failed write is counted and logged like
    :class:`Ledger`'s and the next line starts on a line of its own. The descriptor is
    never closed.
    """

    path = None  # not a file: nothing to rotate, no folder next to it

    def __init__(self, fd: int = 1, name: str = "stdout") -> None:
        self.fd, self.name = fd, name
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._torn = False
        self._closed = False
        self.health = _Health(name)

    def write(self, report: TaskReport) -> None:
        self.write_encoded(report.to_json_bytes())

    def write_encoded(self, record: bytes) -> None:
        """:meth:`write` of a record already encoded (``report.to_json()``, UTF-8)."""
        self.write_many([record])

    def write_many(self, records: list[bytes]) -> None:
        """Records already encoded, as log lines in one write."""
        if not records:
            return
        head = b'{"event":"' + EVENT.encode() + b'",'
        data = b"".join(head + r[1:] + b"\n" for r in records)
        if self._pid != os.getpid():  # forked while another thread held the lock
            self._lock, self._pid = threading.Lock(), os.getpid()
        with self._lock:
            if self._closed:
                raise ValueError(f"ledger {self.name} is closed")
            if self._torn:
                data = b"\n" + data
            try:
                written = os.write(self.fd, data)
                if written < len(data):
                    self._torn = True
                    _write_all(self.fd, data[written:])
            except OSError as exc:
                for _ in records:
                    self.health.failed(exc)
                return
            self._torn = False
            self.health.succeeded()

    def close(self) -> None:
        with self._lock:
            self._closed = True

    def __repr__(self) -> str:
        return f"StreamLedger({self.name})"


AnyLedger = Ledger | StreamLedger


def open_ledger(
    spec: str, *, max_bytes: int = 100 * 2**20, backups: int = 5
) -> Ledger | StreamLedger:
    """The ledger a ``TASKMETER_LEDGER`` value names: ``stdout`` or ``-`` for JSON log
    lines on standard output, else a file path."""
    if spec.strip() in STDOUT:
        return StreamLedger()
    return Ledger(spec, max_bytes=max_bytes, backups=backups)


def _append_whole(fd: int, data: bytes, size: int) -> None:
    """Write ``data`` at the end of a file of ``size`` bytes, whole or not at all."""
    try:
        written = os.write(fd, data)
        if written < len(data):  # the disk filled up mid-line (the next write says so)
            _write_all(fd, data[written:])
    except OSError:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, size)
        raise


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written == 0:
            raise OSError(errno.EIO, "write wrote nothing")
        view = view[written:]


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(_CHUNK), b""))
    except OSError:
        return 0


def _replace(src: Path, dst: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.replace(src, dst)


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
