"""The per-task record: one immutable :class:`TaskReport` per measured task.

Everything downstream (Prometheus, the ledger, sizing, reports) consumes this record
and nothing else. Its JSON form (``to_dict``) is the contract written down in
DESIGN.md under the schema name ``taskmeter.task/1``; ``from_dict`` reads it back.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from datetime import datetime, timezone
from typing import Any, Literal, TypeVar

import orjson

SCHEMA = "taskmeter.task/1"


def _not_serializable(o: object) -> Any:
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")


def _compact_encoder() -> Callable[[Any], str]:
    """``json.dumps(obj, separators=(",", ":"))``, the same text, with CPython's C
    encoder built once instead of at every call (half the time for a record: this runs
    once per task in the worker). No check for circular references: every caller
    passes a tree of plain values."""
    from json import encoder

    c_make_encoder = getattr(encoder, "c_make_encoder", None)
    if c_make_encoder is None:  # pragma: no cover - not CPython
        return lambda obj: json.dumps(obj, separators=(",", ":"))
    encode = c_make_encoder(
        None, _not_serializable, encoder.encode_basestring_ascii, None, ":", ",", False, False, True
    )
    return lambda obj: "".join(encode(obj, 0))


compact_json = _compact_encoder()


def loads(data: str | bytes | bytearray) -> Any:
    """JSON text (what :meth:`TaskReport.to_json_bytes`, :func:`json_bytes` or a pool
    process wrote) parsed with orjson, else with ``json``: their fallback escapes an
    undecodable argv's lone surrogates (``\\udcff``), which orjson refuses."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def json_bytes(obj: Any) -> bytes:
    """Compact JSON as UTF-8 with orjson, else (a lone surrogate, an integer beyond 64
    bits) :func:`compact_json`'s text, whose escapes make it ASCII."""
    try:
        return orjson.dumps(obj)
    except TypeError:  # orjson.JSONEncodeError
        return compact_json(obj).encode()


# lost: the task was in flight when its whole worker died (e.g. a pod OOM kill) and was
# recovered from the in-flight journal by the next incarnation of the worker.
State = Literal["success", "failure", "retry", "revoked", "killed", "lost"]
STATES: tuple[State, ...] = ("success", "failure", "retry", "revoked", "killed", "lost")

# Why a task's process died (TaskReport.cause; None when it did not die):
#   oom         the memory cgroup's OOM-kill counter rose around the death
#   time_limit  Celery's hard time limit
#   signal      any other kill (kill -9, revoke(terminate=True), ...)
#   unknown     lost with the whole worker and no OOM evidence
Cause = Literal["oom", "time_limit", "signal", "unknown"]
CAUSES: tuple[Cause, ...] = ("oom", "time_limit", "signal", "unknown")

# Why a tool ended other than by itself (ToolRun.cause; None otherwise):
#   oom            SIGKILLed while the cgroup's OOM-kill counter rose
#   orphan-killed  killed by taskmeter because the pool child running its task died
#   lost           still running when the whole worker died (figures are its last sample)
ToolCause = Literal["oom", "orphan-killed", "lost"]
TOOL_CAUSES: tuple[ToolCause, ...] = ("oom", "orphan-killed", "lost")

# How a peak was obtained, so nobody mistakes an estimate for a measurement:
#   hwm      the kernel's high-water mark (VmHWM, or wait4's ru_maxrss when provably the
#            tool's own), exact
#   sampled  the largest of periodic RSS samples, a lower bound
#   none     the process was never observed alive (it exited before the first sample)
PeakMethod = Literal["hwm", "sampled", "none"]

# How the worker's CPU was attributed to a task:
#   process  the whole process's CPU over the task (one task at a time in the process)
#   thread   the CPU of the thread that ran the task (tasks overlapped in one process)
CpuMethod = Literal["process", "thread"]


@dataclass(frozen=True)
class ProcessStats:
    """The worker process's own share of a task or phase: the seed's "overhead"."""

    wall_s: float
    cpu_s: float
    user_s: float
    sys_s: float
    rss_avg_bytes: int
    rss_peak_bytes: int
    peak_method: PeakMethod
    cpu_method: CpuMethod = "process"


@dataclass(frozen=True)
class ToolRun:
    """One external tool subprocess started through taskmeter (with its descendants)."""

    argv: tuple[str, ...]
    exe: str
    pid: int
    exit_code: int | None
    signal: int | None
    start_s: float
    end_s: float
    wall_s: float
    cpu_s: float
    user_s: float
    sys_s: float
    rss_avg_bytes: int
    rss_peak_bytes: int
    peak_method: PeakMethod
    samples: int
    read_bytes: int
    write_bytes: int
    # None, or why the tool ended other than by itself (see TOOL_CAUSES).
    cause: ToolCause | None = None
    # False for a descendant of the task that was not started through taskmeter: found
    # by the sampler, its figures are sampled (CPU and peak are lower bounds).
    tracked: bool = True

    @property
    def outcome(self) -> str:
        """``untracked`` (not started through taskmeter), the ``cause`` when one is set
        (``oom``, ``orphan-killed``, ``lost``), else ``ok``, ``error`` (non-zero exit),
        ``killed`` (SIGKILL), ``signal`` (any other signal) or ``running``."""
        if not self.tracked:
            return "untracked"
        if self.cause is not None:
            return self.cause
        if self.signal == 9:
            return "killed"
        if self.signal is not None:
            return "signal"
        if self.exit_code is None:
            return "running"
        return "ok" if self.exit_code == 0 else "error"


@dataclass(frozen=True)
class ToolTotals:
    runs: int
    wall_s: float
    cpu_s: float
    rss_peak_bytes: int

    @classmethod
    def of(cls, tools: Iterable[ToolRun]) -> ToolTotals:
        runs = list(tools)
        return cls(
            runs=len(runs),
            wall_s=union_length((t.start_s, t.end_s) for t in runs),
            cpu_s=sum(t.cpu_s for t in runs),
            rss_peak_bytes=max((t.rss_peak_bytes for t in runs), default=0),
        )


@dataclass(frozen=True)
class PhaseStats:
    name: str
    wall_s: float
    cpu_s: float
    rss_avg_bytes: int
    rss_peak_bytes: int


@dataclass(frozen=True)
class WorkerInfo:
    hostname: str
    pid: int
    pool: str | None = None


@dataclass(frozen=True)
class SamplerInfo:
    interval_s: float


@dataclass(frozen=True)
class TaskReport:
    task: str
    task_id: str | None
    state: State
    started_at: str
    ended_at: str
    wall_s: float
    cpu_s: float
    overhead: ProcessStats
    tools: tuple[ToolRun, ...]
    tool_totals: ToolTotals
    footprint_peak_bytes: int
    phases: tuple[PhaseStats, ...]
    unattributed_child_cpu_s: float
    worker: WorkerInfo
    sampler: SamplerInfo
    schema: str = field(default=SCHEMA)
    # Why the task's process died (see CAUSES); None when it did not die.
    cause: Cause | None = None
    # Seconds from publish (or ETA) to start, when the sender stamped the message with
    # taskmeter; None for messages without the stamp (never 0 for "unknown").
    queue_wait_s: float | None = None

    @property
    def tool_avg_rss_bytes(self) -> float | None:
        """The tools' wall-weighted mean RSS (None when the task ran none): what the
        worker exports as celery_task_memory_avg_bytes{component="tool"}."""
        if not self.tools:
            return None
        wall = sum(t.wall_s for t in self.tools)
        if wall > 0:
            return sum(t.rss_avg_bytes * t.wall_s for t in self.tools) / wall
        return sum(t.rss_avg_bytes for t in self.tools) / len(self.tools)

    def to_dict(self) -> dict[str, Any]:
        # What dataclasses.asdict gives (the tests check it), without its deep copy of
        # every field: this runs once per task on the worker's hot path. Every nested
        # record holds only plain values, argv aside.
        d: dict[str, Any] = {"schema": self.schema}
        d.update((k, v) for k, v in vars(self).items() if k != "schema")
        for key in ("overhead", "tool_totals", "worker", "sampler"):
            d[key] = dict(vars(d[key]))
        d["tools"] = [{**vars(t), "argv": list(t.argv)} for t in self.tools]
        d["phases"] = [dict(vars(p)) for p in self.phases]
        return d

    def to_json(self) -> str:
        return self.to_json_bytes().decode()

    def to_json_bytes(self) -> bytes:
        """:meth:`to_json` as UTF-8 (all ASCII), what the ledger writes.

        orjson encodes the record's dataclasses directly, ten times faster than
        ``json`` (this runs once per task in the worker); its text differs from
        ``json.dumps`` only in how some floats are written (``0.00001`` for ``1e-05``:
        the same value). A record orjson cannot write as ASCII (a non-ASCII name, a
        lone surrogate from an undecodable argv, an integer beyond 64 bits) is written
        by ``json``, which escapes it: read such text with :func:`loads`. (orjson
        would write a non-finite float as ``null``; no field of a record can be one:
        the figures are differences of kernel counters and clocks.)"""
        try:
            out = orjson.dumps({"schema": self.schema, **vars(self)})
        except TypeError:  # orjson.JSONEncodeError
            out = b""
        if out and out.isascii():
            return out
        return compact_json(self.to_dict()).encode()

    @classmethod
    def from_trusted(cls, d: Mapping[str, Any]) -> TaskReport:
        """A record that :meth:`to_dict` of this same version made (a pool process of
        this worker, over its authenticated channel), read back without
        :meth:`from_dict`'s checks and without the frozen ``__init__``'s per-field
        ``object.__setattr__``: the equal object, field order included."""
        values = {name: d[name] for name in _REPORT_FIELDS}
        values["overhead"] = new_record(ProcessStats, d["overhead"])
        values["tools"] = tuple(
            new_record(ToolRun, {**t, "argv": tuple(t["argv"])}) for t in d["tools"]
        )
        values["tool_totals"] = new_record(ToolTotals, d["tool_totals"])
        values["phases"] = tuple(new_record(PhaseStats, p) for p in d["phases"])
        values["worker"] = new_record(WorkerInfo, d["worker"])
        values["sampler"] = new_record(SamplerInfo, d["sampler"])
        return new_record(cls, values)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TaskReport:
        """Read a record back; raises ValueError naming the problem on bad input."""
        if d.get("schema") != SCHEMA:
            raise ValueError(f"not a {SCHEMA} record (schema={d.get('schema')!r})")
        try:
            if d["state"] not in STATES:
                raise ValueError(f"unknown state {d['state']!r}; expected one of {STATES}")
            tools = tuple(_build(ToolRun, {**t, "argv": tuple(t["argv"])}) for t in d["tools"])
            return cls(
                task=str(d["task"]),
                task_id=d.get("task_id"),
                state=d["state"],
                started_at=d["started_at"],
                ended_at=d["ended_at"],
                wall_s=float(d["wall_s"]),
                cpu_s=float(d["cpu_s"]),
                overhead=_build(ProcessStats, d["overhead"]),
                tools=tools,
                tool_totals=_build(ToolTotals, d["tool_totals"]),
                footprint_peak_bytes=int(d["footprint_peak_bytes"]),
                phases=tuple(_build(PhaseStats, p) for p in d["phases"]),
                unattributed_child_cpu_s=float(d["unattributed_child_cpu_s"]),
                worker=_build(WorkerInfo, d["worker"]),
                sampler=_build(SamplerInfo, d["sampler"]),
                cause=d.get("cause"),
                queue_wait_s=d.get("queue_wait_s"),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed {SCHEMA} record: {exc!r}") from exc

    @classmethod
    def from_json(cls, text: str | bytes) -> TaskReport:
        return cls.from_dict(loads(text))


_T = TypeVar("_T")
_DEFAULTS: dict[type, dict[str, Any]] = {}


def new_record(cls: type[_T], values: dict[str, Any]) -> _T:
    """A frozen dataclass record from trusted values given in field order (the
    defaulted fields last, may be left out): the object ``cls(**values)`` makes, field
    order included (``to_dict`` keeps it), without the per-field
    ``object.__setattr__`` of a frozen ``__init__`` (a few µs per task). ``values``
    becomes the record's ``__dict__``'s content; pass a dict of your own."""
    defaults = _DEFAULTS.get(cls)
    obj = object.__new__(cls)
    d = obj.__dict__
    d.update(values)
    if defaults is None:  # first use: the fields, and a check of the order given
        record_fields = fields(cls)  # type: ignore[arg-type]
        names = [f.name for f in record_fields]
        defaults = {f.name: f.default for f in record_fields if f.default is not MISSING}
        for k, v in defaults.items():
            d.setdefault(k, v)
        if list(d) != names:
            raise TypeError(f"{cls.__name__}: fields given out of order: {list(values)}")
        _DEFAULTS[cls] = defaults
        return obj
    for k, v in defaults.items():
        if k not in values:
            d[k] = v
    return obj


def _build(cls: Any, d: Mapping[str, Any]) -> Any:
    names = {f.name for f in fields(cls)}
    missing = [f.name for f in fields(cls) if f.name not in d and f.default is MISSING]
    if missing:
        raise KeyError(f"{cls.__name__} lacks {', '.join(missing)}")
    return cls(**{k: v for k, v in d.items() if k in names})


_REPORT_FIELDS = tuple(f.name for f in fields(TaskReport))


def union_length(intervals: Iterable[tuple[float, float]]) -> float:
    """Total length covered by possibly overlapping ``(start, end)`` intervals.

    Overhead wall time subtracts the *union* of tool runs: two tools running side by
    side for 10 s took 10 s of the task's wall time, not 20 s. For tools run one after
    another this equals the seed's plain sum.
    """
    total = 0.0
    cur_start: float | None = None
    cur_end = 0.0
    for start, end in sorted(intervals):
        if cur_start is None or start > cur_end:
            if cur_start is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_start is not None:
        total += cur_end - cur_start
    return total


def iso_utc(epoch_s: float) -> str:
    """The record's timestamp format: ISO 8601, UTC, microseconds."""
    return datetime.fromtimestamp(epoch_s, timezone.utc).isoformat(timespec="microseconds")
