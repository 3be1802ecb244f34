"""One sampler thread per process, serving every live measurement and tool.

The thread starts with the first client and then lives as long as the process. It
sleeps until the earliest time a client is due, on a deadline the kernel holds (a
Linux timerfd): a client due earlier re-arms it, one system call in the client's
thread that wakes nobody, and with nothing due the thread is parked (no timer, no
wake-up, no CPU). A task that starts more than a quarter of an interval after the
last one ended arms the timer and disarms it at its end, so a task shorter than the
interval never wakes the thread. In a stream of short tasks (each coming within a
quarter of an interval of the last) the timer is left armed at their ends, and the
thread wakes once an interval, never once a task, the later tasks arming nothing.
Where there is no timerfd, or should it fail, it waits on a
condition variable with a timeout, woken only when a new client is due before the
time it already waits for; after clients came and went it waits one more interval
before parking. A forked child (a prefork pool process) never inherits it: threads do
not survive ``fork``, and the child's sampler is reset (``os.register_at_fork``; it
closes its copy of the parent's timer), its first client starting a thread and a
timer of its own. Peaks do not depend on it where the kernel keeps a high-water mark;
it feeds the time-weighted RSS averages, the footprint, and the peaks of processes
whose high-water mark can only be read while they live. A tool that a thread waits
for is taken off the list for the wait: that thread samples it (tools.Popen._wait).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import struct
import sys
import threading
import time
from typing import Protocol

from taskmeter.measure.proc import READER

log = logging.getLogger("taskmeter.sampler")

ENV_INTERVAL = "TASKMETER_SAMPLE_INTERVAL"
# 100 ms: peaks come from the kernel's high-water marks, so the interval only sets
# the resolution of averages and footprints. At 100 ms a task with no tools costs
# about 0.15 % of a core (docs/benchmarks.md), and a task of one second still gets ten
# points for its average.
DEFAULT_INTERVAL_S = 0.1
_INF = float("inf")
_MAX_WAIT_S = 3600.0


def interval_from_env(environ: dict[str, str] | None = None) -> float:
    env = os.environ if environ is None else environ
    raw = env.get(ENV_INTERVAL, "").strip()
    if not raw:
        return DEFAULT_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0.001 <= value <= 60:
        from taskmeter.config import ConfigError  # a ValueError; config imports this module

        raise ConfigError(
            f"{ENV_INTERVAL}={raw!r}: expected seconds between 0.001 and 60 "
            f"(default {DEFAULT_INTERVAL_S})"
        )
    return value


class RssSeries:
    """Streaming time-weighted mean and maximum of an RSS series (trapezoid rule).

    Keeps no samples, so a two-hour task costs the same memory as a 1 ms one.
    """

    __slots__ = ("_lock", "closed", "integral", "n", "peak", "rss_last", "t0", "t_last")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.t0 = self.t_last = 0.0
        self.rss_last = self.peak = self.n = 0
        self.integral = 0.0
        self.closed = False

    def add(self, t: float, rss: int) -> None:
        with self._lock:
            self.add_unlocked(t, rss)

    def add_unlocked(self, t: float, rss: int) -> None:
        """:meth:`add` for a caller that serializes every add and the close itself (a
        tool's samples, under the tool's lock)."""
        if self.closed or (self.n and t < self.t_last):
            return  # a late sample from the sampler thread after the final one
        if self.n:
            self.integral += (t - self.t_last) * (rss + self.rss_last) / 2
        else:
            self.t0 = t
        self.t_last, self.rss_last = t, rss
        if rss > self.peak:
            self.peak = rss
        self.n += 1

    def close(self) -> None:
        with self._lock:
            self.closed = True

    def add_last(self, t: float, rss: int) -> None:
        """:meth:`add` then :meth:`close`, under one lock: a span's final reading."""
        with self._lock:
            self.add_unlocked(t, rss)
            self.closed = True

    @property
    def avg(self) -> int:
        span = self.t_last - self.t0
        return round(self.integral / span) if span > 0 else self.rss_last


# struct itimerspec: it_interval (0: one-shot), then it_value (tv_sec, tv_nsec); time_t
# and long are 64 bits on the platforms that have timerfd and a 64-bit Python
_ITIMERSPEC = struct.Struct("=4q")
_CLOCK_MONOTONIC = 1  # time.monotonic()'s clock on Linux
_TFD_CLOEXEC = os.O_CLOEXEC  # TFD_CLOEXEC is O_CLOEXEC: a tool never inherits it
_TFD_TIMER_ABSTIME = 1


class KernelTimer:
    """A one-shot deadline on ``time.monotonic()``'s clock that the kernel holds: a
    Linux timerfd, through ctypes (``os.timerfd_create`` came in Python 3.13). The
    sampler thread blocks reading it; arming and disarming it from another thread is
    one system call each and wakes nobody. Raises OSError where there is none."""

    def __init__(self) -> None:
        if not sys.platform.startswith("linux") or ctypes.sizeof(ctypes.c_long) != 8:
            raise OSError("a timerfd here needs 64-bit Linux")
        # PyDLL: called with the GIL held (it never blocks), cheaper than releasing it
        libc = ctypes.PyDLL(None, use_errno=True)
        try:
            create, settime = libc.timerfd_create, libc.timerfd_settime
        except AttributeError as exc:
            raise OSError(f"no timerfd in the C library: {exc}") from None
        fd = create(_CLOCK_MONOTONIC, _TFD_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_create: {os.strerror(err)}")
        self.fd: int | None = fd
        # No argtypes: ctypes passes ints as C ints and the buffer's byref as a pointer
        # with its default conversions, cheaper than argtypes' per-call from_param.
        self._settime = settime
        self._buf = ctypes.create_string_buffer(_ITIMERSPEC.size)
        self._ref = ctypes.byref(self._buf)

    def arm(self, at: float) -> None:
        """Expire at monotonic time ``at`` (at once if that has passed; a finite
        number of seconds)."""
        at = max(at, 1e-9)  # (0 0 would disarm it; a negative time is refused)
        sec = int(at)
        nsec = int((at - sec) * 1e9)
        _ITIMERSPEC.pack_into(self._buf, 0, 0, 0, sec, nsec)
        self._set(_TFD_TIMER_ABSTIME)

    def disarm(self) -> None:
        _ITIMERSPEC.pack_into(self._buf, 0, 0, 0, 0, 0)
        self._set(0)

    def _set(self, flags: int) -> None:
        if self._settime(self.fd, flags, self._ref, None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_settime: {os.strerror(err)}")

    def wait(self) -> None:
        """Block until the deadline (forever while disarmed)."""
        assert self.fd is not None
        os.read(self.fd, 8)

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)


class Client(Protocol):
    next_due: float

    def sample(self, now: float, self_rss: int) -> None: ...


class Sampler:
    def __init__(self, *, kernel_timer: bool = True, name: str = "taskmeter-sampler") -> None:
        """``kernel_timer=False``: wait on a condition variable even where a timerfd
        exists (the fallback); ``name``: the thread's. Both for tests."""
        self._interval_s: float | None = None
        self._kernel_timer = kernel_timer
        self._name = name
        self._timer: KernelTimer | None = None
        self._reset()

    @property
    def interval_s(self) -> float:
        # Read on first use, so a bad TASKMETER_SAMPLE_INTERVAL is reported as a clear
        # error where measuring starts, not as an import failure.
        if self._interval_s is None:
            self._interval_s = interval_from_env()
        return self._interval_s

    @interval_s.setter
    def interval_s(self, value: float) -> None:
        self._interval_s = value

    def _reset(self) -> None:
        # In a forked child, the timer is its copy of the parent's: closed after the
        # rest is reset (should the close fail, the child still starts afresh).
        inherited, self._timer = self._timer, None
        self._reset_state()
        if inherited is not None:
            with contextlib.suppress(OSError):
                inherited.close()

    def _reset_state(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._clients: list[Client] = []
        self._thread: threading.Thread | None = None
        # When the thread looks next (monotonic): inf while parked, -inf while ticking
        # (it looks again right after). A new client wakes it only if due earlier.
        self._wake_at = _INF
        # With a kernel timer: the deadline it is armed for, inf while disarmed, -inf
        # while the thread ticks or is about to look (it arms the timer after); when
        # the last client left, and whether the clients come in a stream (see add).
        self._armed_at = _INF
        self._emptied_at = -_INF
        self._stream = False
        # How often the thread returned from a wait, how many ticks it ran, how often
        # the kernel timer was armed (for tests and benchmarks: a tool its owner waits
        # for must not wake it; a stream of tasks arms nothing).
        self.wakeups = self.ticks = self.arms = 0
        # Clients added so far, and as many as the thread had seen when it last found
        # none: it parks only after a whole interval in which none came (see _loop;
        # with the timer, only in a stream: _loop_timer).
        self._adds = self._adds_seen = 0

    # add() and remove() hold the condition's lock itself (a C-level ``with``, not the
    # Condition's Python __enter__/__exit__): notify() needs only that lock held.
    def add(self, client: Client) -> None:
        with self._lock:
            if not self._clients and self._timer is not None:
                # Tasks in a stream (this one came soon after the last left) leave the
                # timer armed at their ends: the next one, due after that deadline,
                # costs no system call, and the thread wakes once an interval (see
                # _loop_timer). Far apart, each task arms and disarms it: two system
                # calls, against the thread's one or two wake-ups after every task.
                self._stream = time.monotonic() - self._emptied_at < self.interval_s / 4
            self._clients.append(client)
            self._adds += 1
            if self._thread is None:
                self._start_thread()
            elif self._timer is not None:
                if client.next_due < self._armed_at:
                    self._arm(client.next_due)
            elif client.next_due < self._wake_at:
                self._wake_at = -_INF  # one notify is enough until it looks again
                self._cond.notify()

    def remove(self, client: Client) -> None:
        # No wake-up: the last client of a task far from the others disarms the timer
        # (the thread parks); otherwise the thread finds nothing due when it next
        # looks, and parks unless clients came and went meanwhile.
        with self._lock:
            try:
                self._clients.remove(client)
            except ValueError:
                return
            timer = self._timer
            if not self._clients and timer is not None:
                self._emptied_at = time.monotonic()
                if not self._stream and -_INF < self._armed_at < _INF:
                    try:
                        timer.disarm()
                    except OSError as exc:
                        self._timer_failed(exc)
                    else:
                        self._armed_at = _INF

    def _start_thread(self) -> None:
        """(Under the lock.) The thread looks at its clients as soon as it runs."""
        if self._kernel_timer and self._timer is None:
            try:
                self._timer = KernelTimer()
            except OSError as exc:  # waits on the condition variable instead
                log.debug("taskmeter sampler: no kernel timer (%s)", exc)
                self._kernel_timer = False
        self._wake_at = -_INF
        self._armed_at = -_INF if self._timer is not None else _INF
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def _arm(self, at: float) -> None:
        """(Under the lock.) Wake the thread at ``at``, capped (a client due "never").
        Never raises: a timer that fails is given up for the condition variable."""
        assert self._timer is not None
        try:
            self._timer.arm(min(at, time.monotonic() + _MAX_WAIT_S))
        except (OSError, ValueError, OverflowError, struct.error) as exc:
            self._timer_failed(exc)
            return
        self._armed_at = at  # only once the kernel holds it
        self.arms += 1

    def _timer_failed(self, exc: BaseException) -> None:
        """(Under the lock.) The kernel timer failed (it should not): from now on a
        new thread waits on the condition variable. The old one, asleep on the timer,
        ends should it ever wake (its timer is left open under it: one descriptor)."""
        log.warning(
            "taskmeter sampler: its kernel timer failed (%s); waiting on a condition "
            "variable from now on",
            exc,
        )
        self._kernel_timer = False
        self._timer = None
        self._armed_at = _INF
        self._start_thread()

    @property
    def idle(self) -> bool:
        """No client, and the thread (if any) parked or about to park."""
        with self._cond:
            return not self._clients

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def _run(self) -> None:
        me = threading.current_thread()
        try:
            if self._timer is not None:
                self._loop_timer(self._timer)
            else:
                self._loop()
        finally:  # should it ever end, the next client starts a new thread
            with self._cond:
                if self._thread is me:
                    self._thread = None
                    self._wake_at = self._armed_at = _INF

    def _loop(self) -> None:
        while True:
            try:
                with self._cond:
                    if not self._clients:
                        if self._adds == self._adds_seen:
                            self._wake_at = _INF
                            self._cond.wait()  # parked: no timeout, woken by add()
                            self.wakeups += 1
                            continue
                        # Clients came and went since it last found none (short tasks,
                        # back to back): it waits one interval rather than park, so the
                        # next one (due an interval after its start, so after this
                        # wait) costs no notify and no extra wake-up; it parks after a
                        # whole interval in which no client came.
                        self._adds_seen = self._adds
                        interval = self.interval_s
                        self._wake_at = time.monotonic() + interval
                        self._cond.wait(interval)
                        self.wakeups += 1
                        continue
                    now = time.monotonic()
                    due = min(c.next_due for c in self._clients)
                    if due > now:
                        self._wake_at = due
                        # (capped: a client due "never" must not overflow the timeout)
                        self._cond.wait(min(due - now, _MAX_WAIT_S))
                        self.wakeups += 1
                        continue
                    self._wake_at = -_INF
                    clients = list(self._clients)
                    self.ticks += 1
                self._tick(clients)
            except Exception:  # never let a sampling bug kill measurement silently
                log.exception("taskmeter sampler tick failed")
                time.sleep(self.interval_s)

    def _loop_timer(self, timer: KernelTimer) -> None:
        while True:
            try:
                with self._lock:
                    if self._timer is not timer:
                        return  # given up (_timer_failed): another thread serves
                    clients = self._clients
                    now = time.monotonic()
                    due = min(c.next_due for c in clients) if clients else _INF
                    if not clients and self._stream and self._adds != self._adds_seen:
                        # Clients came and went since it last looked, in a stream: it
                        # looks again an interval on (as _loop does), so the next task
                        # finds the timer armed and arms nothing.
                        self._adds_seen = self._adds
                        due = now + self.interval_s
                    if due > now:
                        if due < _INF:
                            self._arm(due)
                        else:  # parked: nothing to sample (the timer expired or is off)
                            self._armed_at = _INF
                        clients = []
                    else:
                        self._armed_at = -_INF  # it looks again right after the tick
                        clients = list(clients)
                        self.ticks += 1
                if self._timer is not timer:
                    return  # given up meanwhile, by its own _arm
                if clients:
                    self._tick(clients)
                    continue
                timer.wait()  # until the deadline; add() or remove() may move it
                self.wakeups += 1
            except Exception:  # never let a sampling bug kill measurement silently
                log.exception("taskmeter sampler tick failed")
                time.sleep(self.interval_s)

    def _tick(self, clients: list[Client]) -> None:
        now = time.monotonic()
        # A measurement due within a quarter of the interval is sampled in this wake-up
        # (tools wake the thread every 20 ms anyway): its samples fall in step with its
        # tools' instead of waking the thread on their own.
        early = now + self.interval_s / 4
        spans: list[Client] = []
        for c in clients:
            if getattr(c, "is_tool", False):
                if c.next_due <= now:  # tools first: a footprint adds their latest RSS
                    c.sample(now, 0)
            elif c.next_due <= early:
                spans.append(c)
        if spans:  # this process's RSS only when a measurement (not only tools) is due
            rss = READER.self_rss()
            for c in spans:
                c.sample(now, rss)


SAMPLER = Sampler()


def configure(*, interval_s: float | None = None) -> None:
    """Set the process-wide sampling interval (seconds, 0.001 to 60)."""
    if interval_s is not None:
        if not 0.001 <= interval_s <= 60:
            raise ValueError(f"interval_s={interval_s}: expected seconds between 0.001 and 60")
        SAMPLER.interval_s = interval_s


def wait_idle(timeout_s: float = 2.0) -> bool:
    """Wait until nothing is sampled any more (the thread, if started, parks and stays);
    True if so within ``timeout_s``. For tests and benchmarks."""
    deadline = time.monotonic() + timeout_s
    while not SAMPLER.idle:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


if hasattr(os, "register_at_fork"):
    # A forked child (a prefork pool worker) has no sampler thread and must not inherit
    # its parent's clients or a lock held mid-tick: its first client starts its own.
    os.register_at_fork(after_in_child=SAMPLER._reset)
