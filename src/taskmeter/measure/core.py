"""``measure``: one TaskReport per task, from a ``with`` block, a decorator or
explicit ``start``/``finish`` calls (what a framework integration uses)."""

from __future__ import annotations

import contextvars
import functools
import logging
import math
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import ParamSpec, TypeVar

from taskmeter.measure.proc import PID as _PID
from taskmeter.measure.report import (
    SCHEMA,
    STATES,
    PhaseStats,
    ProcessStats,
    SamplerInfo,
    State,
    TaskReport,
    ToolRun,
    ToolTotals,
    WorkerInfo,
    iso_utc,
    new_record,
)
from taskmeter.measure.sampler import SAMPLER
from taskmeter.measure.span import Span, SpanStats, children_cpu
from taskmeter.measure.tools import REAPED, ToolWatch
from taskmeter.measure.untracked import UntrackedScan

P = ParamSpec("P")
R = TypeVar("R")

_current: contextvars.ContextVar[Measurement | None] = contextvars.ContextVar(
    "taskmeter_current", default=None
)
_HOSTNAME = socket.gethostname()
_log = logging.getLogger("taskmeter.measure")


def current() -> Measurement | None:
    """The innermost measurement open in this thread (or context), if any."""
    return _current.get()


class Measurement(Span):
    """One task being measured. Use through :func:`measure`."""

    def __init__(
        self,
        name: str,
        task_id: str | None = None,
        *,
        on_report: Callable[[TaskReport], None] | None = None,
        pool: str | None = None,
    ) -> None:
        super().__init__()
        if not name:
            raise ValueError("measure() needs a task name")
        self.name, self.task_id, self.pool = name, task_id, pool
        self.on_report = on_report
        self.state: State | None = None
        self.parent: Measurement | None = None
        self._token: contextvars.Token[Measurement | None] | None = None
        self._watches: list[ToolWatch] = []
        self._live: dict[ToolWatch, None] = {}  # the tools not finished yet (ordered set)
        self._tools_lock = threading.Lock()
        self._phases: list[tuple[str, SpanStats]] = []
        self._footprint = 0
        self._report: TaskReport | None = None
        self._packed: bytes | None = None  # finish_packed's figures
        self._started = False
        self._epoch0 = 0.0
        self._children0 = self._reaped0 = 0.0
        self._untracked: UntrackedScan | None = None  # made at the first sample
        self._untracked_rss = 0  # untracked processes' RSS at the last sample
        # Seconds the task waited in its queue, when an integration knows (the record's
        # queue_wait_s): set before finish()
        self.queue_wait_s: float | None = None
        # Called once, from the sampler thread, at the measurement's first sample (one
        # interval in): an integration announces a task that outlives it (Celery).
        self.on_first_sample: Callable[[], None] | None = None

    # -- lifecycle --------------------------------------------------------------
    def start(self) -> Measurement:
        if self._started:
            raise RuntimeError(f"measurement {self.name!r} was already started")
        self._started = True
        self.parent = _current.get()
        self._token = _current.set(self)
        self._epoch0 = time.time()
        self._children0, self._reaped0 = children_cpu(), REAPED.total_s
        self.begin()
        self._footprint = self.rss.peak
        return self

    def finish(self, state: State | None = None, exc: BaseException | None = None) -> TaskReport:
        """End the measurement and build its report. ``state`` defaults to "failure"
        when ``exc`` is given, else "success"."""
        if self._report is None and self._packed is None:
            self._report = self._build(*self._end(state, exc))
            if self.on_report is not None:
                self.on_report(self._report)
        return self.report

    def finish_packed(self, state: State) -> bytes | None:
        """:meth:`finish` for a caller that hands the report to another process: the
        report's figures packed (:func:`unpack_report` rebuilds the equal report),
        without building it here, when it has no tools, phases or untracked processes
        and no ``on_report``; else None, the report built (``report``) as by
        :meth:`finish`. A Celery pool process ends most short tasks this way: the main
        process builds their records in batches, with warm caches."""
        if self._report is not None or self._packed is not None:
            return self._packed
        figures = self._end(state, None)
        packed = None
        if not (self._watches or self._phases or self._untracked is not None or self.on_report):
            packed = _pack(self, *figures)  # None: a figure it cannot hold as it is
        if packed is None:
            self._report = self._build(*figures)
            if self.on_report is not None:
                self.on_report(self._report)
            return None
        self._packed = packed
        return packed

    def _end(
        self, state: State | None, exc: BaseException | None
    ) -> tuple[SpanStats, State, float, float]:
        if not self._started:
            raise RuntimeError(f"measurement {self.name!r} was never started")
        stats = self.end()
        epoch1 = time.time()
        children = children_cpu() - self._children0
        reaped = REAPED.total_s - self._reaped0
        if self._token is not None:
            try:
                _current.reset(self._token)
            except ValueError:  # finished from another context (e.g. a signal handler)
                _current.set(self.parent)
            self._token = None
        state = state or self.state or ("failure" if exc is not None else "success")
        if state not in STATES:
            raise ValueError(f"state {state!r}: expected one of {', '.join(STATES)}")
        return stats, state, epoch1, children - reaped

    def set_state(self, state: State) -> None:
        """Record the state to report at the end (e.g. "retry" from an integration)."""
        if state not in STATES:
            raise ValueError(f"state {state!r}: expected one of {', '.join(STATES)}")
        self.state = state

    @property
    def report(self) -> TaskReport:
        if self._report is None:
            if self._packed is None:
                raise RuntimeError(f"measurement {self.name!r} has not finished yet")
            self._report = unpack_report(self._packed)
        return self._report

    def __enter__(self) -> Measurement:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.finish(exc=exc)

    def __call__(self, func: Callable[P, R]) -> Callable[P, R]:
        """Use as a decorator: each call is measured as its own task."""
        if self._started:
            raise RuntimeError("a started measurement cannot decorate a function")
        name, on_report, pool = self.name, self.on_report, self.pool

        @functools.wraps(func)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            with Measurement(name, on_report=on_report, pool=pool):
                return func(*args, **kwargs)

        return wrapper

    # -- phases and tools ---------------------------------------------------------
    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """A named sub-span ("download", "query") with its own wall, CPU and memory."""
        span = Span()
        span.begin()
        try:
            yield
        finally:
            self._phases.append((name, span.end()))

    def lineage(self) -> list[Measurement]:
        """This measurement and the ones it is nested in: a tool belongs to all."""
        out: list[Measurement] = []
        m: Measurement | None = self
        while m is not None:
            out.append(m)
            m = m.parent
        return out

    def _tool_started(self, watch: ToolWatch) -> None:
        with self._tools_lock:
            self._watches.append(watch)
            self._live[watch] = None

    def _tool_finished(self, watch: ToolWatch, self_rss: int) -> None:
        # The tool's peak (from its high-water mark, perhaps between two samples) was
        # held while the worker sat at about its current RSS and the other tools at
        # their latest: the best estimate of the footprint at that moment.
        peak, _ = watch.peak()
        with self._tools_lock:
            self._live.pop(watch, None)
            others = sum(w.last_rss for w in self._live if not w.done)
            others += self._untracked_rss
            self._footprint = max(self._footprint, self_rss + peak + others)

    def sample(self, now: float, self_rss: int) -> None:
        super().sample(now, self_rss)
        hook = self.on_first_sample
        if hook is not None:
            self.on_first_sample = None
            try:
                hook()
            except Exception:  # never let an integration's hook stop the sampling
                _log.exception("taskmeter: a first-sample hook failed")
        # Descendants not started through taskmeter (plain subprocess.run): at the
        # sampler's interval only, never on the task's start/end path. While tasks
        # overlap in threads, only the children of this task's thread are its own.
        if self._untracked is None:
            self._untracked = UntrackedScan(self.t0)
        untracked, gone_peak = self._untracked.scan(now, self._tracked_pids, self._scan_tid)
        with self._tools_lock:
            tools = sum(w.last_rss for w in self._live if not w.done)
            # An untracked run that ended since the last sample: its peak (VmHWM, perhaps
            # between two samples) while the rest stood at about their latest.
            self._untracked_rss = untracked
            self._footprint = max(self._footprint, self_rss + tools + untracked + gone_peak)

    def _tracked_pids(self) -> set[int]:
        pids: set[int] = set()
        for m in self.lineage():  # an outer task's tools are not this one's untracked
            with m._tools_lock:
                pids.update(w.pid for w in m._watches)
        return pids

    def _scan_tid(self) -> int | None:
        # While tasks overlap in threads, only the children of this task's thread.
        return _native_id(self.thread_id) if self.shared else None

    # -- the record ---------------------------------------------------------------
    def _build(
        self, stats: SpanStats, state: State, epoch1: float, unattributed: float
    ) -> TaskReport:
        end = self.t0 + stats.wall_s
        tools: tuple[ToolRun, ...] = ()
        if self._watches:
            with self._tools_lock:
                tools = tuple(w.to_run(self.t0, end) for w in self._watches)
        if self._untracked is not None:
            # Sampled lower bounds, listed with the tools (tracked=False). The CPU of
            # those this process reaped is in its RUSAGE_CHILDREN: not unattributed.
            extra, reaped_untracked = self._untracked.finish(self.t0, end, {t.pid for t in tools})
            tools += tuple(extra)
            unattributed -= reaped_untracked
        return _assemble(
            self.name,
            self.task_id,
            state,
            self._epoch0,
            epoch1,
            stats,
            max(self._footprint, stats.rss_peak_bytes),
            _merge_phases(self._phases) if self._phases else (),
            max(unattributed, 0.0),
            tools,
            _worker_info(self.pool),
            SAMPLER.interval_s,
            self.queue_wait_s,
        )


def _assemble(
    name: str,
    task_id: str | None,
    state: State,
    epoch0: float,
    epoch1: float,
    stats: SpanStats,
    footprint: int,
    phases: tuple[PhaseStats, ...],
    unattributed: float,
    tools: tuple[ToolRun, ...],
    worker: WorkerInfo,
    interval_s: float,
    queue_wait_s: float | None,
) -> TaskReport:
    """The report of a measurement from its figures: :meth:`Measurement._build`'s, and
    :func:`unpack_report`'s from the same figures packed (the equal report)."""
    totals = ToolTotals.of(tools) if tools else _NO_TOOLS
    cpu = stats.user_s + stats.sys_s
    overhead = new_record(
        ProcessStats,
        {
            "wall_s": max(stats.wall_s - totals.wall_s, 0.0),
            "cpu_s": cpu,
            "user_s": stats.user_s,
            "sys_s": stats.sys_s,
            "rss_avg_bytes": stats.rss_avg_bytes,
            "rss_peak_bytes": stats.rss_peak_bytes,
            "peak_method": stats.peak_method,
            "cpu_method": stats.cpu_method,
        },
    )
    return new_record(
        TaskReport,
        {
            "task": name,
            "task_id": task_id,
            "state": state,
            "started_at": _iso_utc(epoch0),
            "ended_at": _iso_utc(epoch1),
            "wall_s": stats.wall_s,
            "cpu_s": cpu + totals.cpu_s,
            "overhead": overhead,
            "tools": tools,
            "tool_totals": totals,
            "footprint_peak_bytes": footprint,
            "phases": phases,
            "unattributed_child_cpu_s": unattributed,
            "worker": worker,
            "sampler": _sampler_info(interval_s),
            "schema": SCHEMA,
            "cause": None,
            "queue_wait_s": queue_wait_s,
        },
    )


# Measurement.finish_packed's figures: format version, state, peak method is "hwm",
# CPU method is "thread", which of task id / queue wait / pool are set (bits 0-2);
# start and end epochs, wall, user, sys, unattributed child CPU, queue wait, sampling
# interval (s); RSS average, RSS peak, footprint peak (bytes), pid; lengths of the
# UTF-8 host name, task name, task id and pool that follow. Native byte order: read
# back by the same machine (an outbox outlives a restart, an upgrade too: hence the
# version, which also fixes the states' order).
_PACKED = struct.Struct("=5B8d4q4H")
_PACKED_VERSION = 1
_STATE_CODE = {s: i for i, s in enumerate(STATES)}
_HOSTNAME_B = _HOSTNAME.encode("utf-8", "surrogatepass")
_MAX_PACKED_TEXT = 0xFFFF


def _pack(
    m: Measurement, stats: SpanStats, state: State, epoch1: float, unattributed: float
) -> bytes | None:
    """The figures :func:`unpack_report` makes into the report ``m._build`` would
    build from them; None for what the packed form cannot hold as it is: a name, id
    or pool that is not a str or is too long, an interval or queue wait that is not a
    float (the record writes an int as an int)."""
    task_id, pool, wait, interval = m.task_id, m.pool, m.queue_wait_s, SAMPLER.interval_s
    if type(interval) is not float or (wait is not None and type(wait) is not float):
        return None
    try:
        name_b = m.name.encode("utf-8", "surrogatepass")
        id_b = b"" if task_id is None else task_id.encode("utf-8", "surrogatepass")
        pool_b = b"" if pool is None else pool.encode("utf-8", "surrogatepass")
        if max(len(name_b), len(id_b), len(pool_b)) > _MAX_PACKED_TEXT:
            return None
        return (
            _PACKED.pack(
                _PACKED_VERSION,
                _STATE_CODE[state],
                stats.peak_method == "hwm",
                stats.cpu_method == "thread",
                (task_id is not None) | (wait is not None) << 1 | (pool is not None) << 2,
                m._epoch0,
                epoch1,
                stats.wall_s,
                stats.user_s,
                stats.sys_s,
                max(unattributed, 0.0),
                0.0 if wait is None else wait,
                interval,
                stats.rss_avg_bytes,
                stats.rss_peak_bytes,
                max(m._footprint, stats.rss_peak_bytes),
                _PID[0],
                len(_HOSTNAME_B),
                len(name_b),
                len(id_b),
                len(pool_b),
            )
            + _HOSTNAME_B
            + name_b
            + id_b
            + pool_b
        )
    except (AttributeError, TypeError, ValueError, OverflowError, struct.error):
        return None  # e.g. a task id that is not a str (a UUID object)


def unpack_report(data: bytes | bytearray | memoryview) -> TaskReport:
    """The report :meth:`Measurement.finish_packed` packed, equal to the one
    :meth:`Measurement.finish` would have built (its record byte for byte). Raises
    ValueError on data that is not such figures (or another version's)."""
    try:
        (
            version, state, hwm, thread, flags, epoch0, epoch1, wall, user, sys_,
            unattributed, wait, interval, rss_avg, rss_peak, footprint, pid,
            n_host, n_name, n_id, n_pool,
        ) = _PACKED.unpack_from(data)  # fmt: skip
        if version != _PACKED_VERSION:
            raise ValueError(f"packed by format {version}, this version reads {_PACKED_VERSION}")
        strings = bytes(data[_PACKED.size :])
        if len(strings) != n_host + n_name + n_id + n_pool:
            raise ValueError(f"{len(strings)} bytes of text, expected the lengths' sum")
        texts = []
        i = 0
        for n in (n_host, n_name, n_id, n_pool):
            texts.append(strings[i : i + n].decode("utf-8", "surrogatepass"))
            i += n
        host, name, task_id, pool = texts
        stats = object.__new__(SpanStats)
        stats.__dict__.update(
            wall_s=wall,
            user_s=user,
            sys_s=sys_,
            rss_avg_bytes=rss_avg,
            rss_peak_bytes=rss_peak,
            peak_method="hwm" if hwm else "sampled",
            cpu_method="thread" if thread else "process",
        )
        return _assemble(
            name,
            task_id if flags & 1 else None,
            STATES[state],
            epoch0,
            epoch1,
            stats,
            footprint,
            (),
            unattributed,
            (),
            _worker_info_at(host, pid, pool if flags & 4 else None),
            interval,
            wait if flags & 2 else None,
        )
    except (struct.error, IndexError, UnicodeDecodeError, OverflowError, OSError) as exc:
        raise ValueError(f"not a packed report: {exc}") from None


_NO_TOOLS = ToolTotals.of(())


@functools.lru_cache(maxsize=64)
def _worker_info_at(hostname: str, pid: int, pool: str | None) -> WorkerInfo:
    return WorkerInfo(hostname=hostname, pid=pid, pool=pool)


def _worker_info(pool: str | None) -> WorkerInfo:
    # immutable: one object per host, pid and pool
    return _worker_info_at(_HOSTNAME, _PID[0], pool)


@functools.lru_cache(maxsize=16)
def _sampler_info(interval_s: float) -> SamplerInfo:
    return SamplerInfo(interval_s=interval_s)


# The last whole second formatted, and its text (one tuple: replaced atomically).
_iso_second: tuple[float, str] = (-1.0, "")


def _iso_utc(epoch_s: float) -> str:
    """:func:`iso_utc`, the same text, with the date and time of day formatted once per
    second (microseconds rounded half-even, as ``datetime.fromtimestamp``)."""
    global _iso_second
    frac, whole = math.modf(epoch_s)
    us = round(frac * 1e6)
    if us >= 1_000_000 or us < 0 or whole < 0:
        return iso_utc(epoch_s)
    second, text = _iso_second
    if second != whole:
        text = iso_utc(whole)[:19]
        _iso_second = (whole, text)
    return f"{text}.{us:06d}+00:00"


def _native_id(ident: int) -> int | None:
    """The kernel's id of the thread ``ident`` (None if unknown), looked up when needed
    rather than read (a system call) at every task's start."""
    thread = getattr(threading, "_active", {}).get(ident)
    return getattr(thread, "native_id", None)


def _merge_phases(phases: list[tuple[str, SpanStats]]) -> tuple[PhaseStats, ...]:
    """One entry per phase name, in order of first completion: a task that downloads
    five files in a loop has one "download" phase, its wall and CPU summed."""
    merged: dict[str, list[SpanStats]] = {}
    for name, stats in phases:
        merged.setdefault(name, []).append(stats)
    out = []
    for name, parts in merged.items():
        wall = sum(p.wall_s for p in parts)
        avg = (
            sum(p.rss_avg_bytes * p.wall_s for p in parts) / wall
            if wall > 0
            else parts[-1].rss_avg_bytes
        )
        out.append(
            PhaseStats(
                name=name,
                wall_s=wall,
                cpu_s=sum(p.cpu_s for p in parts),
                rss_avg_bytes=round(avg),
                rss_peak_bytes=max(p.rss_peak_bytes for p in parts),
            )
        )
    return tuple(out)


def measure(
    name: str,
    task_id: str | None = None,
    *,
    on_report: Callable[[TaskReport], None] | None = None,
    pool: str | None = None,
) -> Measurement:
    """Measure a block (``with measure("t") as m:``) or a function (``@measure("t")``).

    On exit ``m.report`` holds the :class:`TaskReport`; when the block raises, the
    report says "failure" and the exception propagates. ``on_report`` is called with
    every finished report (each call, when decorating).
    """
    return Measurement(name, task_id, on_report=on_report, pool=pool)
