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
(``N = backups``), the oldest dropped. A single line larger than ``max_bytes`` is
still written, alone in its file. Lines are not fsync'ed.

A reader running during a rotation may miss or re-read lines of the files it lists;
read after the writers stopped, or accept that.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from taskmeter.measure.report import SCHEMA, TaskReport

__all__ = ["SCHEMA", "Ledger", "LedgerProblem", "ledger_paths", "read_ledgers"]

_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
_MODE = 0o600


class Ledger:
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
        self._pid = os.getpid()
        self._closed = False
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

    def _is_current(self, fd: int) -> bool:
        """Is ``fd`` still the file at ``path`` (not rotated away or removed)?"""
        try:
            at_path = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (mine.st_dev, mine.st_ino) == (at_path.st_dev, at_path.st_ino)

    def _rotate(self) -> None:
        """Shift ``path.i`` to ``path.i+1`` (the last one dropped), ``path`` to ``path.1``.

        Runs with the lock of the current file held: only one writer at a time can
        see that file as current, so renames never race each other.
        """
        if self.backups == 0:
            _remove(self.path)
            return
        for i in range(self.backups - 1, 0, -1):
            _replace(Path(f"{self.path}.{i}"), Path(f"{self.path}.{i + 1}"))
        _replace(self.path, Path(f"{self.path}.1"))

    def write(self, report: TaskReport) -> None:
        """Append exactly one line: ``report.to_json() + "\\n"``."""
        data = (report.to_json() + "\n").encode("utf-8")
        if self._pid != os.getpid():  # forked: get our own open file description
            self._lock = threading.Lock()
            self._pid = os.getpid()
            if self._fd is not None:
                os.close(self._fd)  # our copy only; the parent keeps its own
            self._fd = None if self._closed else self._open()
        with self._lock:
            if self._fd is None:
                raise ValueError(f"ledger {str(self.path)!r} is closed")
            while True:
                fd = self._fd
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    if not self._is_current(fd):
                        self._fd = self._open()
                        continue
                    size = os.fstat(fd).st_size
                    if size > 0 and size + len(data) > self.max_bytes:
                        self._rotate()
                        self._fd = self._open()
                        continue
                    _write_all(fd, data)
                    return
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    if self._fd != fd:
                        os.close(fd)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._fd is not None and self._pid == os.getpid():
                os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Ledger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Ledger({str(self.path)!r}, max_bytes={self.max_bytes}, backups={self.backups})"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _replace(src: Path, dst: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.replace(src, dst)


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


@dataclass(frozen=True)
class LedgerProblem:
    """A line that could not be read (``line`` 0: the file itself)."""

    path: Path
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


def ledger_paths(path: str | os.PathLike[str]) -> list[Path]:
    """The existing files of a rotated ledger, oldest first: ``path.N`` .. ``path``."""
    base = Path(path)
    rotated: list[tuple[int, Path]] = []
    for candidate in base.parent.glob(f"{base.name}.*"):
        suffix = candidate.name[len(base.name) + 1 :]
        if suffix.isdigit() and candidate.is_file():
            rotated.append((int(suffix), candidate))
    out = [p for _, p in sorted(rotated, reverse=True)]
    if base.is_file():
        out.append(base)
    return out


def read_ledgers(
    paths: Iterable[str | os.PathLike[str]],
) -> tuple[list[TaskReport], list[LedgerProblem]]:
    """Every readable record of the given files, in order, and what went wrong.

    Blank lines are skipped; a malformed line becomes a :class:`LedgerProblem`
    naming its file and 1-based line number and the other lines are still used. A
    file that cannot be opened is a problem with line 0. Rotated files are read only
    when listed (see :func:`ledger_paths`).
    """
    reports: list[TaskReport] = []
    problems: list[LedgerProblem] = []
    for item in paths:
        path = Path(item)
        try:
            content = path.read_bytes()
        except FileNotFoundError:
            problems.append(LedgerProblem(path, 0, "no such file"))
            continue
        except OSError as exc:
            problems.append(LedgerProblem(path, 0, f"cannot read: {exc.strerror or exc}"))
            continue
        for number, raw in enumerate(content.split(b"\n"), start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
                if not isinstance(record, dict):
                    raise ValueError(f"not a JSON object but {type(record).__name__}")
                reports.append(TaskReport.from_dict(record))
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                problems.append(LedgerProblem(path, number, _reason(exc)))
    return reports, problems


def _reason(exc: Exception) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 text ({exc.reason} at byte {exc.start})"
    if isinstance(exc, json.JSONDecodeError):
        return f"not JSON: {exc.msg} at column {exc.colno}"
    return str(exc) or type(exc).__name__
