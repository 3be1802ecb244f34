"""Reading TaskReports back: ledger files, rotated backups, or a log stream on stdin.

One streaming reader serves ``taskmeter recommend --ledger`` and ``taskmeter report
--ledger``: :class:`RecordReader` yields one validated
:class:`~taskmeter.measure.report.TaskReport` at a time and keeps nothing of the
records it has yielded, so memory does not grow with the number of records.

What a line may be
------------------
A record is a line that is exactly one JSON object (leading and trailing white space
aside) whose ``"schema"`` is ``"taskmeter.task/1"``: what :class:`~taskmeter.export.
ledger.Ledger` writes, and what a worker with ``TASKMETER_LEDGER=stdout`` prints (that
form may carry an extra top-level ``"event"`` key, ignored here like any unknown key).
Text before the ``{`` (a timestamp or pod prefix added by ``kubectl logs --timestamps``
or ``--prefix``, a logger's format) is not stripped: such a line is not read (see below).

Every line falls in exactly one of three kinds:

* **record**: valid; yielded.
* **bad record**: a line meant to be a taskmeter record that cannot be used: valid JSON
  with our schema key but a value that breaks the schema (NaN, Infinity, a negative or
  out-of-range number such as ``1e400``, a string or a boolean where a number belongs, an
  unknown state or cause, a timestamp that is not ISO 8601 with a time zone, a missing
  field), another version of our schema, or a line that holds ``taskmeter.task/`` but is
  not a JSON object on its own (cut short by a crash, or prefixed by log text). Skipped
  with a :class:`LedgerProblem` (``file:line: why``) passed to ``on_bad``, and counted.
* **not a record**: anything else (a Celery log line, other JSON, a blank line, bytes
  that are not UTF-8): skipped and counted, with no message per line: a log stream is
  mostly such lines.

Valid records are used exactly as if the other lines were not there.

Numbers are checked once here, so nothing downstream sees NaN or infinity: every number
is finite, not negative (exit codes and signals aside) and below 2**63; booleans are not
numbers; byte counts, pids and counts are integers (an integral float such as ``1e6`` is
accepted for them).
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import IO, Any, TypeVar

from taskmeter.measure.report import (
    CAUSES,
    SCHEMA,
    STATES,
    TOOL_CAUSES,
    PhaseStats,
    ProcessStats,
    SamplerInfo,
    TaskReport,
    ToolRun,
    ToolTotals,
    WorkerInfo,
)

__all__ = [
    "STDIN",
    "LedgerProblem",
    "ReadSummary",
    "RecordError",
    "RecordReader",
    "WarningPrinter",
    "check_sources",
    "ledger_paths",
    "parse_record",
    "read_ledgers",
]

STDIN = "-"
MARKER = b"taskmeter.task/"
MAX_NUMBER = 2**63
_MAX_FLOAT = float(MAX_NUMBER)
_PEAK_METHODS = ("hwm", "sampled", "none")
_CPU_METHODS = ("process", "thread")


@dataclass(frozen=True)
class LedgerProblem:
    """A line that could not be used (``line`` 0: the file itself)."""

    path: Path
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


class RecordError(ValueError):
    """A taskmeter record that breaks the schema; the message names the field."""


@dataclass
class ReadSummary:
    """What a :class:`RecordReader` saw, by kind of line."""

    records: int = 0
    bad: int = 0
    skipped: int = 0
    sources: list[str] = field(default_factory=list)

    def text(self) -> str:
        """One line for standard error, e.g. ``read 998 records from a.jsonl; skipped 2
        bad records (warnings above) and 5 lines that are not taskmeter records``."""
        where = ", ".join("standard input" if s == STDIN else s for s in self.sources)
        out = f"read {self.records} record{'s' if self.records != 1 else ''} from {where}"
        parts = []
        if self.bad:
            parts.append(f"{self.bad} bad record{'s' if self.bad != 1 else ''} (warnings above)")
        if self.skipped:
            parts.append(
                f"{self.skipped} lines that are not taskmeter records"
                if self.skipped != 1
                else "1 line that is not a taskmeter record"
            )
        if parts:
            out += "; skipped " + " and ".join(parts)
        return out


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


def check_sources(sources: Iterable[str | os.PathLike[str]]) -> list[LedgerProblem]:
    """Sources that cannot be read (missing, a directory, no permission), as problems
    with line 0; ``-`` (standard input) at most once. Empty when all can be opened."""
    problems = []
    dashes = 0
    for item in sources:
        if os.fspath(item) == STDIN:
            dashes += 1
            if dashes == 2:
                problems.append(LedgerProblem(Path(STDIN), 0, "standard input given twice"))
            continue
        path = Path(item)
        try:
            with open(path, "rb"):
                pass
        except FileNotFoundError:
            problems.append(LedgerProblem(path, 0, "no such file"))
        except IsADirectoryError:
            problems.append(LedgerProblem(path, 0, "is a directory"))
        except OSError as exc:
            problems.append(LedgerProblem(path, 0, f"cannot read: {exc.strerror or exc}"))
    return problems


class RecordReader:
    """Iterate over the valid records of ``sources`` (paths, or ``-`` for ``stdin``), in
    order, one at a time.

    ``on_bad`` gets a :class:`LedgerProblem` per bad record as it is met; ``on_skipped``
    (rarely wanted) one per line that is not a record. A source that cannot be opened is
    an ``on_bad`` problem with line 0 (use :func:`check_sources` first to refuse it).
    :attr:`summary` holds the counts; it is complete when the iteration ends. Rotated
    files are read only when listed (:func:`ledger_paths` lists them, oldest first).
    """

    def __init__(
        self,
        sources: Iterable[str | os.PathLike[str]],
        *,
        stdin: IO[bytes] | None = None,
        on_bad: Callable[[LedgerProblem], None] | None = None,
        on_skipped: Callable[[LedgerProblem], None] | None = None,
    ) -> None:
        self.sources = [os.fspath(s) for s in sources]
        self.stdin = stdin
        self.on_bad = on_bad
        self.on_skipped = on_skipped
        self.summary = ReadSummary(sources=list(self.sources))

    def __iter__(self) -> Iterator[TaskReport]:
        for source in self.sources:
            path = Path(source)
            try:
                if source == STDIN:
                    stream = self.stdin if self.stdin is not None else sys.stdin.buffer
                    yield from self._lines(path, stream)
                    continue
                with open(path, "rb") as f:
                    yield from self._lines(path, f)
            except OSError as exc:  # cannot open, or a read error midway: the rest is used
                why = "no such file" if isinstance(exc, FileNotFoundError) else (
                    f"cannot read: {exc.strerror or exc}"
                )  # fmt: skip
                self._bad(LedgerProblem(path, 0, why))

    def _bad(self, problem: LedgerProblem) -> None:
        self.summary.bad += 1
        if self.on_bad is not None:
            self.on_bad(problem)

    def _skip(self, path: Path, number: int, why: Callable[[], str]) -> None:
        self.summary.skipped += 1
        if self.on_skipped is not None:
            self.on_skipped(LedgerProblem(path, number, why()))

    def _lines(self, path: Path, stream: IO[bytes]) -> Iterator[TaskReport]:
        summary = self.summary
        for number, raw in enumerate(stream, start=1):
            line = raw.strip()
            if number == 1 and line.startswith(codecs.BOM_UTF8):
                line = line[len(codecs.BOM_UTF8) :].strip()
            if not line:
                self._skip(path, number, partial(str, "blank"))
                continue
            marked = MARKER in line
            if not line.startswith(b"{"):
                if marked:
                    self._bad(LedgerProblem(path, number, _prefixed(line)))
                else:
                    self._skip(path, number, partial(_not_json_reason, line))
                continue
            try:
                text = line.decode("utf-8")
                record, end = _DECODER.raw_decode(text)  # the line is stripped: no leading space
                if end != len(text):
                    raise json.JSONDecodeError("Extra data", text, end)
            except (ValueError, RecursionError) as exc:  # UnicodeDecodeError, JSONDecodeError
                reason = _reason(exc)
                if marked:
                    self._bad(LedgerProblem(path, number, reason))
                else:
                    self._skip(path, number, partial(str, reason))
                continue
            if not isinstance(record, dict):
                kind = type(record).__name__
                self._skip(path, number, partial(str, f"not a JSON object but {kind}"))
                continue
            schema = record.get("schema")
            if schema != SCHEMA:
                if isinstance(schema, str) and schema.startswith(MARKER.decode()):
                    self._bad(
                        LedgerProblem(
                            path, number, f"schema {schema!r} is not {SCHEMA!r} (newer taskmeter?)"
                        )
                    )
                else:
                    why = f"not a {SCHEMA} record (schema={schema!r})"
                    self._skip(path, number, partial(str, why))
                continue
            try:
                report = parse_record(record)
            except RecordError as exc:
                self._bad(LedgerProblem(path, number, str(exc)))
                continue
            summary.records += 1
            yield report


class WarningPrinter:
    """An ``on_bad`` callback that writes ``warning: file:line: why`` lines, the first
    ``limit`` of them (a stream of a million bad lines should not bury the answer);
    :meth:`tail` says how many more there were."""

    def __init__(self, write: Callable[[str], None], limit: int = 1000) -> None:
        self.write = write
        self.limit = limit
        self.count = 0

    def __call__(self, problem: LedgerProblem) -> None:
        self.count += 1
        if self.count <= self.limit:
            self.write(f"warning: {problem}")

    def tail(self) -> str | None:
        more = self.count - self.limit
        if more <= 0:
            return None
        return f"warning: {more} more bad record{'s' if more != 1 else ''} not shown"


def read_ledgers(
    paths: Iterable[str | os.PathLike[str]],
) -> tuple[list[TaskReport], list[LedgerProblem]]:
    """Every valid record of the given files, in order, and every line that is not one.

    The list form of :class:`RecordReader` for files a :class:`~taskmeter.export.ledger.
    Ledger` wrote, which should hold nothing else: unlike the streaming commands, lines
    that are not taskmeter records are problems here too (blank lines aside). A file
    that cannot be opened is a problem with line 0. Holds every record in memory: the
    commands stream instead.
    """
    reports: list[TaskReport] = []
    problems: list[LedgerProblem] = []

    def skipped(problem: LedgerProblem) -> None:
        if problem.message != "blank":
            problems.append(problem)

    reader = RecordReader(paths, on_bad=problems.append, on_skipped=skipped)
    reports.extend(reader)
    return reports, problems


# -- validation --------------------------------------------------------------------------------
class _Constant(float):
    """NaN, Infinity or -Infinity as written in the JSON text (kept to name it)."""

    text: str


def _constant(name: str) -> float:
    value = _Constant(float(name.replace("Infinity", "inf")))
    value.text = name
    return value


# One decoder for every line (json.loads with options builds a new one per call).
_DECODER = json.JSONDecoder(parse_constant=_constant)


def _num(d: Mapping[str, Any], key: str, where: str) -> float:
    """A finite, non-negative number below 2**63."""
    v: Any = d.get(key)
    kind = type(v)  # the fast path: exactly float or int (not bool, not NaN's subclass)
    if kind is float:
        if 0.0 <= v < _MAX_FLOAT:  # False for NaN and infinity
            return float(v)
    elif kind is int and 0 <= v < MAX_NUMBER:
        return float(v)
    return _num_checked(d, key, where)


def _num_checked(d: Mapping[str, Any], key: str, where: str) -> float:
    try:
        v = d[key]
    except KeyError:
        raise RecordError(f"{where}{key} is missing") from None
    if isinstance(v, _Constant):
        raise RecordError(f"{where}{key} is {v.text}, not a finite number")
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise RecordError(f"{where}{key} is {_show(v)}, not a number")
    if not math.isfinite(v):
        raise RecordError(f"{where}{key} is out of range (overflows to infinity)")
    if v < 0:
        raise RecordError(f"{where}{key} is negative ({v!r})")
    if v >= MAX_NUMBER:
        raise RecordError(f"{where}{key} is out of range ({v:.3g} >= 2**63)")
    return float(v)


def _int(d: Mapping[str, Any], key: str, where: str) -> int:
    """A non-negative integer below 2**63 (an integral float is accepted)."""
    raw: Any = d.get(key)
    if type(raw) is int and 0 <= raw < MAX_NUMBER:
        return raw
    v = _num_checked(d, key, where)
    if isinstance(raw, int):
        return raw
    if not v.is_integer():
        raise RecordError(f"{where}{key} is {raw!r}, not a whole number")
    return int(v)


def _opt_code(d: Mapping[str, Any], key: str, where: str) -> int | None:
    """An exit code or signal number: None or any integer (exit codes may be negative)."""
    v = d.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise RecordError(f"{where}{key} is {_show(v)}, not an integer or null")
    if abs(v) >= MAX_NUMBER:
        raise RecordError(f"{where}{key} is out of range")
    return v


def _str(d: Mapping[str, Any], key: str, where: str, *, optional: bool = False) -> Any:
    """A string (None allowed when ``optional``)."""
    v = d.get(key)
    if v is None and optional:
        return None
    if key not in d and not optional:
        raise RecordError(f"{where}{key} is missing")
    if not isinstance(v, str):
        raise RecordError(f"{where}{key} is {_show(v)}, not a string")
    return v


def _text(d: Mapping[str, Any], key: str, where: str, *, optional: bool = False) -> Any:
    """A string that can be printed as UTF-8 (no unpaired surrogate from a ``\\ud800``
    escape): names that end up in tables and pages."""
    v = _str(d, key, where, optional=optional)
    if v is not None:
        _printable(v, f"{where}{key}")
    return v


def _printable(text: str, what: str) -> None:
    """Refuse text that cannot be written as UTF-8 (an unpaired surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RecordError(f"{what} holds an unpaired UTF-16 surrogate") from None


def _choice(d: Mapping[str, Any], key: str, where: str, allowed: tuple[str, ...],
            *, optional: bool = False, default: str | None = None) -> Any:  # fmt: skip
    if key not in d or d[key] is None:
        if optional:
            return default
        raise RecordError(f"{where}{key} is missing")
    v = d[key]
    if v not in allowed:
        raise RecordError(f"{where}{key} {_show(v)} is unknown; expected one of {allowed}")
    return v


def _obj(d: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    v = d.get(key)
    if not isinstance(v, dict):
        what = "missing" if key not in d else f"{_show(v)}, not an object"
        raise RecordError(f"{where}{key} is {what}")
    return v


def _list(d: Mapping[str, Any], key: str, where: str) -> list[Any]:
    v = d.get(key)
    if not isinstance(v, list):
        what = "missing" if key not in d else f"{_show(v)}, not a list"
        raise RecordError(f"{where}{key} is {what}")
    return v


def _time(d: Mapping[str, Any], key: str) -> str:
    v: str = _str(d, key, "")
    text = v[:-1] + "+00:00" if v.endswith(("Z", "z")) else v
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise RecordError(f"{key} {_show(v)} is not an ISO 8601 timestamp") from None
    if parsed.tzinfo is None:
        raise RecordError(f"{key} {_show(v)} has no time zone (expected UTC, +00:00)")
    return text


_T = TypeVar("_T")
# Per dataclass: (plain defaults, or None to always call __init__; fields without one).
_PLAIN: dict[type, tuple[dict[str, Any] | None, frozenset[str], tuple[str, ...]]] = {}


def _new(cls: type[_T], **values: Any) -> _T:
    """``cls(**values)`` for a frozen dataclass, without its ``__init__`` (which sets each
    field through ``object.__setattr__``: most of the cost of reading a record). The
    values were checked here. Falls back to ``cls(**values)`` for a class with a
    ``__post_init__`` or a field this reader does not fill and that has no plain default
    (a field added to the schema later)."""
    plain = _PLAIN.get(cls)
    if plain is None:
        fields = dataclasses.fields(cls)  # type: ignore[arg-type]
        defaults = {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}
        plain = _PLAIN[cls] = (
            None if hasattr(cls, "__post_init__") else defaults,
            frozenset(f.name for f in fields if f.name not in defaults),
            tuple(f.name for f in fields),
        )
    plain_defaults, required, names = plain
    if plain_defaults is None or not required.issubset(values):
        return cls(**values)
    obj = object.__new__(cls)
    if len(values) == len(names):
        obj.__dict__.update(values)
    else:  # in field order, as __init__ would set them
        obj.__dict__.update((n, values[n] if n in values else plain_defaults[n]) for n in names)
    return obj


def _process(d: Mapping[str, Any], where: str) -> ProcessStats:
    return _new(ProcessStats,
        wall_s=_num(d, "wall_s", where),
        cpu_s=_num(d, "cpu_s", where),
        user_s=_num(d, "user_s", where),
        sys_s=_num(d, "sys_s", where),
        rss_avg_bytes=_int(d, "rss_avg_bytes", where),
        rss_peak_bytes=_int(d, "rss_peak_bytes", where),
        peak_method=_choice(d, "peak_method", where, _PEAK_METHODS),
        cpu_method=_choice(d, "cpu_method", where, _CPU_METHODS, optional=True,
                           default="process"),
    )  # fmt: skip


def _tool(t: Any, i: int) -> ToolRun:
    where = f"tools[{i}]."
    if not isinstance(t, dict):
        raise RecordError(f"tools[{i}] is {_show(t)}, not an object")
    argv = _list(t, "argv", where)
    if not all(isinstance(a, str) for a in argv):
        raise RecordError(f"{where}argv holds something that is not a string")
    _printable("".join(argv), f"{where}argv")  # shown in the report's table and hovers
    tracked = t.get("tracked", True)
    if not isinstance(tracked, bool):
        raise RecordError(f"{where}tracked is {_show(tracked)}, not true or false")
    return _new(
        ToolRun,
        argv=tuple(argv),
        exe=_text(t, "exe", where),
        pid=_int(t, "pid", where),
        exit_code=_opt_code(t, "exit_code", where),
        signal=_opt_code(t, "signal", where),
        start_s=_num(t, "start_s", where),
        end_s=_num(t, "end_s", where),
        wall_s=_num(t, "wall_s", where),
        cpu_s=_num(t, "cpu_s", where),
        user_s=_num(t, "user_s", where),
        sys_s=_num(t, "sys_s", where),
        rss_avg_bytes=_int(t, "rss_avg_bytes", where),
        rss_peak_bytes=_int(t, "rss_peak_bytes", where),
        peak_method=_choice(t, "peak_method", where, _PEAK_METHODS),
        samples=_int(t, "samples", where),
        read_bytes=_int(t, "read_bytes", where),
        write_bytes=_int(t, "write_bytes", where),
        cause=_choice(t, "cause", where, TOOL_CAUSES, optional=True),
        tracked=tracked,
    )


def _phase(p: Any, i: int) -> PhaseStats:
    where = f"phases[{i}]."
    if not isinstance(p, dict):
        raise RecordError(f"phases[{i}] is {_show(p)}, not an object")
    return _new(
        PhaseStats,
        name=_text(p, "name", where),
        wall_s=_num(p, "wall_s", where),
        cpu_s=_num(p, "cpu_s", where),
        rss_avg_bytes=_int(p, "rss_avg_bytes", where),
        rss_peak_bytes=_int(p, "rss_peak_bytes", where),
    )


def parse_record(d: Mapping[str, Any]) -> TaskReport:
    """A :class:`TaskReport` from a decoded ``taskmeter.task/1`` object, every field
    checked; :class:`RecordError` names the first field that breaks the schema."""
    if d.get("schema") != SCHEMA:
        raise RecordError(f"not a {SCHEMA} record (schema={d.get('schema')!r})")
    task = _text(d, "task", "")
    if not task:
        raise RecordError("task is empty")
    totals = _obj(d, "tool_totals", "")
    worker = _obj(d, "worker", "")
    pool = _text(worker, "pool", "worker.", optional=True)
    queue_wait = None if d.get("queue_wait_s") is None else _num(d, "queue_wait_s", "")
    return _new(
        TaskReport,
        schema=SCHEMA,
        task=task,
        task_id=_text(d, "task_id", "", optional=True),
        state=_choice(d, "state", "", STATES),
        started_at=_time(d, "started_at"),
        ended_at=_time(d, "ended_at"),
        wall_s=_num(d, "wall_s", ""),
        cpu_s=_num(d, "cpu_s", ""),
        overhead=_process(_obj(d, "overhead", ""), "overhead."),
        tools=tuple(_tool(t, i) for i, t in enumerate(_list(d, "tools", ""))),
        tool_totals=_new(
            ToolTotals,
            runs=_int(totals, "runs", "tool_totals."),
            wall_s=_num(totals, "wall_s", "tool_totals."),
            cpu_s=_num(totals, "cpu_s", "tool_totals."),
            rss_peak_bytes=_int(totals, "rss_peak_bytes", "tool_totals."),
        ),
        footprint_peak_bytes=_int(d, "footprint_peak_bytes", ""),
        phases=tuple(_phase(p, i) for i, p in enumerate(_list(d, "phases", ""))),
        unattributed_child_cpu_s=_num(d, "unattributed_child_cpu_s", ""),
        worker=_new(
            WorkerInfo,
            hostname=_text(worker, "hostname", "worker."),
            pid=_int(worker, "pid", "worker."),
            pool=pool,
        ),
        sampler=_new(
            SamplerInfo, interval_s=_num(_obj(d, "sampler", ""), "interval_s", "sampler.")
        ),
        cause=_choice(d, "cause", "", CAUSES, optional=True),
        queue_wait_s=queue_wait,
    )


def _show(v: object, limit: int = 40) -> str:
    """A value as it would appear in JSON, shortened: ``"abc"``, ``true``, ``null``."""
    if isinstance(v, _Constant):
        return v.text
    try:
        text = json.dumps(v)
    except (TypeError, ValueError):
        text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _prefixed(line: bytes) -> str:
    start = line.find(b"{")
    if start < 0:
        return "mentions taskmeter.task/ but holds no JSON object"
    prefix = line[:start].decode("utf-8", "replace")
    if len(prefix) > 30:
        prefix = prefix[:27] + "..."
    return (
        f"text before the JSON object ({prefix!r}): records must be whole lines "
        "(drop kubectl logs --timestamps/--prefix, or the log format's prefix)"
    )


def _not_json_reason(line: bytes) -> str:
    try:
        value = json.loads(line.decode("utf-8"))
    except ValueError as exc:
        return _reason(exc)
    return f"not a JSON object but {type(value).__name__}"


def _reason(exc: Exception) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 text ({exc.reason} at byte {exc.start})"
    if isinstance(exc, json.JSONDecodeError):
        return f"not JSON: {exc.msg} at column {exc.colno}"
    return str(exc) or type(exc).__name__
