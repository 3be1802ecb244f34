"""The worker process's own wall, CPU and memory over a span (a task or a phase).

Process-wide bookkeeping lives in :data:`BOOK`: which spans are open in which thread
(tasks overlapping in one process switch to per-thread CPU), and the kernel's peak-RSS
counter, which is shared by the whole process and so must be reset and read in one
place.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from taskmeter.measure.proc import READER
from taskmeter.measure.report import CpuMethod, PeakMethod
from taskmeter.measure.sampler import SAMPLER, RssSeries

T = TypeVar("T")

_RUSAGE_THREAD: int | None = getattr(resource, "RUSAGE_THREAD", None)


def thread_cpu() -> tuple[float, float]:
    """(user, sys) seconds of the calling thread."""
    if _RUSAGE_THREAD is not None:
        ru = resource.getrusage(_RUSAGE_THREAD)
        return ru.ru_utime, ru.ru_stime
    return time.thread_time(), 0.0  # no split outside Linux: all counted as user


# ru_maxrss is in KiB on Linux, where it is max(the memory's high-water mark, the mark
# this process inherited through exec: the image it replaced, e.g. a big parent's).
_MAXRSS_KIB = sys.platform.startswith("linux")


def process_usage() -> tuple[float, float, int]:
    """(user, sys, ru_maxrss in bytes; 0 where not in KiB) in one system call."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime, ru.ru_stime, ru.ru_maxrss * 1024 if _MAXRSS_KIB else 0


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


@dataclass(frozen=True)
class SpanStats:
    wall_s: float
    user_s: float
    sys_s: float
    rss_avg_bytes: int
    rss_peak_bytes: int
    peak_method: PeakMethod
    cpu_method: CpuMethod

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s


class Span:
    """Open with :meth:`begin`, close with :meth:`end`; sampled in between."""

    is_tool = False

    def __init__(self) -> None:
        self.thread_id = threading.get_ident()
        self.shared = False  # another thread had a span open at the same time
        self.rss = RssSeries()
        self.hwm_peak = 0
        self.hwm_ok = False
        # Book.open left the peak counter's reset to begin(): needed only if the
        # counter stands above the span's first RSS (Book.settle)
        self.reset_pending = False
        self.next_due = 0.0
        self.t0 = 0.0
        self._cpu0 = self._tcpu0 = (0.0, 0.0)
        self._maxrss_exact = False

    def begin(self) -> None:
        BOOK.open(self)
        rss = READER.self_rss()
        self.next_due = time.monotonic() + SAMPLER.interval_s
        SAMPLER.add(self)
        # Clocks last, so taskmeter's own bookkeeping is not billed to the task.
        self._tcpu0 = thread_cpu()
        user, sys_, maxrss = process_usage()
        if self.reset_pending:
            if 0 < maxrss <= rss:
                self.reset_pending = False  # nothing from before this span: no reset
            else:
                # The peak counter holds a mark from before this span: reset it (see
                # Book.open), and read the clocks again after that.
                BOOK.settle(self)
                self._tcpu0 = thread_cpu()
                user, sys_, maxrss = process_usage()
        self._cpu0 = (user, sys_)
        # ru_maxrss no higher than the RSS read before it: the mark inherited through
        # exec is no higher than the span's own values, and ru_maxrss is VmHWM, which
        # holds nothing from before the span (no higher than its first RSS, or reset
        # since). Then the peak at the end comes with the CPU (one getrusage), not
        # from /proc/self/status.
        self._maxrss_exact = exact = 0 < maxrss <= rss
        BOOK.maxrss_exact = exact  # until the next reset (Book.spawn)
        self.t0 = t0 = time.monotonic()
        self.rss.add(t0, rss)

    def sample(self, now: float, self_rss: int) -> None:
        self.rss.add(now, self_rss)
        self.next_due = now + SAMPLER.interval_s

    def end(self) -> SpanStats:
        t1 = time.monotonic()
        user, sys_, maxrss = process_usage()
        # The thread's own CPU only counts when another thread had a span open: read
        # now if so, else (a span opening before this one closes) right after the close.
        tcpu1 = thread_cpu() if self.shared else None
        # The peak read while this span is still open (a span opening in another thread
        # meanwhile folds the counter into this one before resetting it): from
        # ru_maxrss when exact (see begin), else with the RSS from one /proc read.
        hwm: int | None = None
        if self.hwm_ok and self._maxrss_exact:
            rss, hwm = READER.self_rss(), maxrss
        elif self.hwm_ok:
            rss, hwm = READER.self_mem()
        else:
            rss = READER.self_rss()
        series = self.rss
        series.add_last(t1, rss)
        SAMPLER.remove(self)
        BOOK.close(self, hwm)
        if self.shared:
            if tcpu1 is None:
                tcpu1 = thread_cpu()
            user, sys_ = tcpu1[0] - self._tcpu0[0], tcpu1[1] - self._tcpu0[1]
            method: CpuMethod = "thread"
        else:
            user, sys_ = user - self._cpu0[0], sys_ - self._cpu0[1]
            method = "process"
        if self.hwm_ok:
            peak, peak_method = max(self.hwm_peak, series.peak), "hwm"
        else:
            peak, peak_method = series.peak, "sampled"
        # SpanStats(...) without the frozen __init__'s per-field object.__setattr__
        stats = object.__new__(SpanStats)
        stats.__dict__.update(
            wall_s=t1 - self.t0,
            user_s=max(user, 0.0),
            sys_s=max(sys_, 0.0),
            rss_avg_bytes=series.avg,
            rss_peak_bytes=peak,
            peak_method=peak_method,
            cpu_method=method,
        )
        return stats


class Book:
    """Process-wide register of open spans and owner of the peak-RSS counter."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._open: list[Span] = []
        self._reset_works: bool | None = None
        # ru_maxrss equals VmHWM since the last reset (the span that made it found the
        # mark inherited through exec no higher than its RSS): see spawn()
        self.maxrss_exact = False

    def open(self, span: Span) -> None:
        with self._lock:
            opened = self._open
            if not opened:  # the usual case: one task at a time in the process
                if self._reset_works:
                    # Nothing open to fold the counter into: reset it, unless it holds
                    # nothing from before this span. begin() tells (ru_maxrss no higher
                    # than the span's first RSS: in a worker between short tasks, most
                    # often) and calls settle() otherwise: a write saved per task.
                    span.reset_pending = True
                elif self._reset_works is None:  # the first span: does the counter work?
                    self._reset_works = READER.self_hwm() is not None and READER.reset_self_hwm()
                span.hwm_ok = bool(self._reset_works)
                opened.append(span)
                return
            if any(s.thread_id != span.thread_id for s in opened):
                span.shared = True
                for s in opened:
                    s.shared = True
            # The counter is per process. Before resetting it for the new span, fold
            # its value into every open span, so each still gets the exact peak of its
            # own time: max(values read at resets during it, value read at its end).
            # A span whose own reset is pending has had no time of its own yet (it is
            # in begin()): this reset serves as its own.
            if self._reset_works is not False:
                self._reset_works = self._fold_and_reset([s for s in opened if not s.reset_pending])
                for s in opened:
                    if s.reset_pending:  # done for it too; or, failed, its peak sampled
                        s.reset_pending = False
                        s.hwm_ok = s.hwm_ok and bool(self._reset_works)
            span.hwm_ok = bool(self._reset_works)
            opened.append(span)

    def settle(self, span: Span) -> None:
        """The reset :meth:`open` left to ``span``'s begin(), now that the counter is
        known to hold a mark from before the span (unless another span's open reset
        it meanwhile), folded into the other open spans first, as open() does."""
        with self._lock:
            if not span.reset_pending:
                return
            span.reset_pending = False
            self._reset_works = self._fold_and_reset([s for s in self._open if s is not span])
            span.hwm_ok = bool(self._reset_works)

    def _fold_and_reset(self, spans: list[Span]) -> bool:
        """Reset the counter (under the lock), its value first folded into ``spans``
        (open, each with time of its own); whether it was reset. Not when there are
        such spans and the value cannot be read: their peaks would be lost."""
        if spans:
            # (another thread's peak between the read and the reset would be lost)
            hwm = READER.self_hwm_before_reset()
            if hwm is None:
                return False
            for s in spans:
                s.hwm_peak = max(s.hwm_peak, hwm)
        return READER.reset_self_hwm()

    def close(self, span: Span, hwm: int | None = None) -> None:
        """``hwm``: the counter as the span read it at its end (else read here)."""
        with self._lock:
            if span.hwm_ok:
                if hwm is None:
                    hwm = READER.self_hwm()
                if hwm is not None:
                    span.hwm_peak = max(span.hwm_peak, hwm)
            self._open.remove(span)

    def spawn(self, start: Callable[[], T]) -> tuple[T, int | None]:
        """Run ``start`` (which forks a tool) and read this process's peak right after.

        A child's wait4 ``ru_maxrss`` is at least the floor it inherited: this
        process's high-water mark (VmHWM) at the fork (or, with vfork, at the exec,
        while this process waits), carried across fork and exec by the kernel; only a
        larger figure is the tool's own. Read from this process's ``ru_maxrss`` (one
        getrusage) when that equals VmHWM since the last reset, else from
        ``/proc/self/status``: ``ru_maxrss`` also keeps the mark this process inherited
        through exec (a worker started by a big process), which clear_refs does not
        reset and can stand far above VmHWM, and a floor too high would turn an exact
        tool peak into a sampled one. Holding the lock keeps a reset from
        landing between the two.
        """
        with self._lock:
            result = start()
            maxrss = process_usage()[2] if self.maxrss_exact else 0
            return result, (maxrss or READER.self_hwm())


BOOK = Book()

if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=BOOK._reset)
