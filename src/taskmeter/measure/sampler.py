"""One sampler thread per process, serving every live measurement and tool.

The thread starts with the first client and then lives as long as the process: with
nothing to sample it is parked on a condition variable (no timer, no wake-up, no CPU),
so a task costs a list append and a list removal, not a thread start. It is woken only
when a new client is due before the time it already waits for. After clients came and
went (a stream of short tasks) it waits one more interval before parking, so that in
a busy worker it wakes once an interval, never once a task. A forked child (a
prefork pool process) never inherits it: threads do not survive ``fork``, and the
child's sampler is reset (``os.register_at_fork``), its first client starting a
thread of its own. Peaks do not depend on it where the kernel keeps a high-water mark;
it feeds the time-weighted RSS averages, the footprint, and the peaks of processes
whose high-water mark can only be read while they live. A tool that a thread waits
for is taken off the list for the wait: that thread samples it (tools.Popen._wait).
"""

from __future__ import annotations

import logging
import os
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


class Client(Protocol):
    next_due: float

    def sample(self, now: float, self_rss: int) -> None: ...


class Sampler:
    def __init__(self) -> None:
        self._interval_s: float | None = None
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
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._clients: list[Client] = []
        self._thread: threading.Thread | None = None
        # When the thread looks next (monotonic): inf while parked, -inf while ticking
        # (it looks again right after). A new client wakes it only if due earlier.
        self._wake_at = _INF
        # How often the thread returned from a wait, and how many ticks it ran (for
        # tests and benchmarks: a tool its owner waits for must not wake it).
        self.wakeups = self.ticks = 0
        # Clients added so far, and as many as the thread had seen when it last found
        # none: it parks only after a whole interval in which none came (see _loop).
        self._adds = self._adds_seen = 0

    # add() and remove() hold the condition's lock itself (a C-level ``with``, not the
    # Condition's Python __enter__/__exit__): notify() needs only that lock held.
    def add(self, client: Client) -> None:
        with self._lock:
            self._clients.append(client)
            self._adds += 1
            if self._thread is None:
                self._wake_at = -_INF
                self._thread = threading.Thread(
                    target=self._run, name="taskmeter-sampler", daemon=True
                )
                self._thread.start()
            elif client.next_due < self._wake_at:
                self._wake_at = -_INF  # one notify is enough until it looks again
                self._cond.notify()

    def remove(self, client: Client) -> None:
        # No wake-up: the thread finds nothing due when it next looks, and parks.
        with self._lock:
            try:
                self._clients.remove(client)
            except ValueError:
                return

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
            self._loop()
        finally:  # should it ever end, the next client starts a new thread
            with self._cond:
                if self._thread is me:
                    self._thread = None
                    self._wake_at = _INF

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
