"""The sampler thread's deadline: a kernel timer (timerfd) where Linux has one, a
condition variable's timed wait elsewhere. Real threads, real clocks, no mocks."""

from __future__ import annotations

import os
import time

import pytest

import taskmeter
from taskmeter.measure import wait_idle
from taskmeter.measure.sampler import SAMPLER, Sampler

from helpers import burn_cpu, is_timerfd

# Samplers made here keep their (parked) threads: named apart from the process's, which
# other tests count by name.
TEST_THREAD = "test-sampler"


class Ticker:
    """A sampler client due every ``period_s``; remembers when it was sampled."""

    is_tool = True  # sampled on its own due time, not with the process's RSS

    def __init__(self, period_s: float, first_in_s: float | None = None) -> None:
        self.period_s = period_s
        self.next_due = time.monotonic() + (period_s if first_in_s is None else first_in_s)
        self.times: list[float] = []

    def sample(self, now: float, self_rss: int) -> None:
        self.times.append(now)
        self.next_due = now + self.period_s


def _timerfds() -> int:
    """This process's open timerfds."""
    return sum(is_timerfd(int(fd)) for fd in os.listdir("/proc/self/fd"))


def test_the_process_sampler_waits_on_a_kernel_timer():
    with taskmeter.measure("warm"):
        pass
    assert SAMPLER._timer is not None, "no timerfd: the sampler fell back to its condition"
    assert _timerfds() >= 1


@pytest.mark.parametrize("kernel_timer", [True, False], ids=["timerfd", "condition"])
def test_a_client_is_sampled_at_its_due_times_then_the_thread_parks(kernel_timer):
    sampler = Sampler(kernel_timer=kernel_timer, name=TEST_THREAD)
    sampler.interval_s = 0.05
    ticker = Ticker(0.05)
    t0 = time.monotonic()
    sampler.add(ticker)
    assert (sampler._timer is not None) is kernel_timer
    time.sleep(0.52)
    sampler.remove(ticker)
    gaps = [b - a for a, b in zip([t0, *ticker.times], ticker.times, strict=False)]
    # due every 50 ms: never early, and about ten in the half second
    assert 7 <= len(ticker.times) <= 11, ticker.times
    assert min(gaps) >= 0.049, gaps
    assert sorted(gaps)[len(gaps) // 2] < 0.07, gaps
    # A client due sooner than the deadline the thread sleeps to moves it earlier.
    later = Ticker(3600.0)
    sampler.add(later)
    time.sleep(0.05)
    soon = Ticker(10.0, first_in_s=0.03)
    t1 = time.monotonic()
    sampler.add(soon)
    time.sleep(0.2)
    sampler.remove(soon)
    sampler.remove(later)
    assert later.times == []
    assert soon.times and 0.029 <= soon.times[0] - t1 < 0.15, soon.times
    # Nothing left: the thread parks (one more look at most, then no wake-up).
    time.sleep(0.15)
    parked = sampler.wakeups
    time.sleep(0.4)
    assert sampler.wakeups == parked
    assert sampler.thread is not None and sampler.thread.is_alive()


def test_tasks_far_apart_never_wake_the_sampler_thread():
    # Short tasks, each starting long after the last ended (a quiet pool process): with
    # the kernel timer each arms and disarms it, and the thread never wakes. (Waiting
    # on the condition variable, it woke twice a task: once at the task's due time,
    # once an interval later before parking.)
    assert SAMPLER.interval_s == 0.1
    with taskmeter.measure("warm"):
        pass
    assert wait_idle(2.0)
    time.sleep(0.3)  # parked
    woken, arms = SAMPLER.wakeups, SAMPLER.arms
    reports = []
    for _ in range(8):
        with taskmeter.measure("sparse") as m:
            burn_cpu(0.001)
        reports.append(m.report)
        time.sleep(0.15)
    wakeups = SAMPLER.wakeups - woken
    assert SAMPLER.arms - arms == 8  # each task armed it once (and disarmed it)
    assert wakeups <= 1, wakeups  # a task that a busy machine stalled for 100 ms: one
    for report in reports:
        assert report.state == "success"
        assert report.overhead.cpu_s >= 0.0009
        assert report.overhead.rss_peak_bytes > 0


def test_a_long_task_is_still_sampled_every_interval():
    with taskmeter.measure("long") as m:
        time.sleep(0.55)
    # its first reading, about five samples, its last
    assert 5 <= m.rss.n <= 9, m.rss.n


def test_a_timer_that_fails_is_given_up_for_the_condition_variable(caplog):
    # It should not fail; should it (its descriptor closed behind its back), arming it
    # raises nothing into the task, and sampling goes on from a new thread that waits
    # on the condition variable.
    caplog.set_level("WARNING", logger="taskmeter.sampler")
    sampler = Sampler(name=TEST_THREAD)
    sampler.interval_s = 0.05
    first = Ticker(0.05)
    sampler.add(first)
    time.sleep(0.2)
    timer, thread = sampler._timer, sampler.thread
    assert timer is not None and timer.fd is not None and first.times
    os.close(timer.fd)  # the next system call on it fails (EBADF)
    timer.fd = -1
    # Due already: arms the timer (unless the thread is between a tick and its own
    # arming, which fails the same way).
    second = Ticker(0.05, first_in_s=-1.0)
    sampler.add(second)
    deadline = time.monotonic() + 2
    while sampler._timer is not None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert sampler._timer is None and sampler.thread is not thread
    assert "kernel timer failed" in caplog.text
    n1, n2 = len(first.times), len(second.times)
    time.sleep(0.3)
    sampler.remove(second)
    sampler.remove(first)  # no timer to disarm: nothing raised either
    assert len(first.times) - n1 >= 4 and len(second.times) - n2 >= 4
