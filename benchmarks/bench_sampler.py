"""What the sampler thread costs a stream of short tasks, at several task rates.

    .venv/bin/python benchmarks/bench_sampler.py           # about 4 minutes
    .venv/bin/python benchmarks/bench_sampler.py --quick   # about 40 seconds

One process runs empty tasks (``with taskmeter.measure("t"): pass``), each followed by
a sleep of ``gap`` (the time between tasks of a pool process that keeps up), in three
variants run side by side, each in a fresh forked process, interleaved, the order
alternating between rounds:

- ``off``: the same loop without the measurement (the floor: the sleeps' own CPU);
- ``condition``: the sampler thread waits on a condition variable with a timeout (the
  fallback where there is no timerfd, and what every process used before);
- ``kernel timer``: it blocks on a Linux timerfd. A task that starts more than a
  quarter of an interval after the last one ended arms it and disarms it at its end;
  in a stream (gaps of 1 and 20 ms here, under 25 ms) the timer is left armed at the
  tasks' ends and re-armed by the thread when it wakes, about once an interval.

Printed per task: the process's CPU above ``off`` (``getrusage(RUSAGE_SELF)``: every
thread), the part of it in the tasks' own thread (``RUSAGE_THREAD``, above ``off``'s:
the measurement, the timer's arming and disarming included), the sampler thread's own
CPU (``/proc/self/task/TID/schedstat``) and its wake-ups. Medians over the rounds.
"""

from __future__ import annotations

import argparse
import os
import resource
import struct
import sys
import threading
import time

import taskmeter
from _common import machine, median, table
from taskmeter.measure import wait_idle
from taskmeter.measure.sampler import SAMPLER

VARIANTS = ("off", "condition", "kernel timer")
_OUT = struct.Struct("=4d")


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _thread_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_THREAD)
    return ru.ru_utime + ru.ru_stime


def _sampler_cpu_s() -> float:
    for t in threading.enumerate():
        if t.name == "taskmeter-sampler" and t.native_id is not None:
            with open(f"/proc/self/task/{t.native_id}/schedstat") as f:
                return int(f.read().split()[0]) / 1e9
    return 0.0


def _stream(variant: str, tasks: int, gap_s: float) -> tuple[float, float, float, float]:
    """In a forked process: (process CPU, the tasks' thread's CPU, the sampler thread's
    CPU, its wake-ups) per task."""
    if variant == "condition":
        SAMPLER._kernel_timer = False  # before the first client: no timer made
    measure = variant != "off"
    if measure:
        with taskmeter.measure("warm"):  # the thread exists before the clock starts
            pass
        wait_idle(2.0)
        time.sleep(0.3)  # parked
    cpu0, task0, thread0, woken0 = _cpu_s(), _thread_cpu_s(), _sampler_cpu_s(), SAMPLER.wakeups
    for _ in range(tasks):
        if measure:
            with taskmeter.measure("t"):
                pass
        else:
            time.sleep(0)  # the loop's own work, as near as the measured one's
        time.sleep(gap_s)
    cpu, task = _cpu_s() - cpu0, _thread_cpu_s() - task0
    thread, woken = _sampler_cpu_s() - thread0, SAMPLER.wakeups - woken0
    return cpu / tasks, task / tasks, thread / tasks, woken / tasks


def _forked(variant: str, tasks: int, gap_s: float) -> tuple[float, float, float, float]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            os.write(w, _OUT.pack(*_stream(variant, tasks, gap_s)))
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0 or len(data) != _OUT.size:
        raise RuntimeError(f"the {variant} stream failed (status {status})")
    cpu, task, thread, woken = _OUT.unpack(data)
    return cpu, task, thread, woken


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 s per stream, 2 rounds")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--gaps-ms", default="1,20,100,300", help="comma-separated")
    args = ap.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 3)
    stream_s = 1.0 if args.quick else 3.0
    gaps = [float(g) / 1000 for g in args.gaps_ms.split(",")]
    print(f"# bench_sampler\n\nMachine: {machine()}\n")
    print(
        f"Empty tasks, a sleep of `gap` after each, for about {stream_s:g} s per stream; "
        f"{rounds} rounds, variants interleaved; sampling interval {SAMPLER.interval_s:g} s\n"
    )
    rows = []
    for gap in gaps:
        tasks = max(10 if args.quick else 30, min(3000, round(stream_s / max(gap, 0.0005))))
        seen: dict[str, list[tuple[float, float, float, float]]] = {v: [] for v in VARIANTS}
        for i in range(rounds):
            order = VARIANTS if i % 2 == 0 else VARIANTS[::-1]
            for variant in order:
                seen[variant].append(_forked(variant, tasks, gap))
        off = median(cpu for cpu, _, _, _ in seen["off"])
        off_task = median(task for _, task, _, _ in seen["off"])
        for variant in VARIANTS[1:]:
            got = seen[variant]
            added = [(cpu - off) * 1e6 for cpu, _, _, _ in got]
            rows.append([
                f"{gap * 1000:g} ms ({tasks} tasks)",
                variant,
                f"{median(added):.1f}",
                f"{min(added):.1f}-{max(added):.1f}",
                f"{(median(task for _, task, _, _ in got) - off_task) * 1e6:.1f}",
                f"{median(t for _, _, t, _ in got) * 1e6:.1f}",
                f"{median(w for _, _, _, w in got):.3f}",
            ])  # fmt: skip
        print(f"gap {gap * 1000:g} ms done", file=sys.stderr)
    header = ["gap between tasks", "sampler waits on", "added CPU µs/task", "range",
              "of which the tasks' thread", "the sampler thread", "wake-ups/task"]  # fmt: skip
    print(table(header, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
