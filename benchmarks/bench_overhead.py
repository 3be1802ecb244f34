"""What measuring costs: an empty measurement, one tool run, and the sampler thread.

    .venv/bin/python benchmarks/bench_overhead.py           # full run, about 3.5 minutes
    .venv/bin/python benchmarks/bench_overhead.py --quick   # about 40 seconds
    PYTHONPATH=/tmp/old/src .venv/bin/python benchmarks/bench_overhead.py --quick
        # the same against another source tree (before/after: run both back to back)

Prints markdown tables to stdout. Every comparison interleaves its variants in one run
(A, B, A, B, ... with the order alternating between rounds) and reports medians, so a
noisy shared machine slows both sides alike.

(a) ``with taskmeter.measure("x"): pass`` against ``with contextlib.nullcontext(): pass``.
(b) ``taskmeter.run(["true"])`` inside a measurement against ``subprocess.run(["true"])``
    (and ``taskmeter.run`` outside any measurement, which must be a plain pass-through).
(c) CPU of sampling: this process's CPU (``getrusage(RUSAGE_SELF)``) while a measurement
    tracks N concurrent ``sleep`` tools, minus the same with plain ``subprocess.Popen``
    sleeps and no measurement; per tracked process per second, as % of one core. N = 0
    is a measurement around a plain ``time.sleep`` (the worker's own sampling alone).
    The worker is sampled every ``interval``; tools every ``min(interval, 20 ms)``
    (``TOOL_INTERVAL_MAX_S``), except a one-process tool whose memory tops this
    process's (the floor it inherits: "1 above the floor", a Python child holding
    200 MB or twice this process's RSS), sampled every ``interval`` once it holds it.
    The sampler thread's own CPU
    (``/proc/self/task/TID/schedstat``) is shown as a check.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import taskmeter
from _common import machine, median, table
from taskmeter.measure import tools as tools_module
from taskmeter.measure import wait_idle
from taskmeter.measure.proc import READER
from taskmeter.measure.sampler import DEFAULT_INTERVAL_S, SAMPLER


@dataclass(frozen=True)
class Settings:
    ctx_calls: int  # calls per batch in (a)
    ctx_rounds: int
    run_calls: int  # calls per batch in (b)
    run_rounds: int
    sleep_s: float  # life of each tool in (c)
    sampler_rounds: int
    tool_counts: tuple[int, ...]
    intervals_s: tuple[float, ...]


FULL = Settings(2000, 15, 200, 9, 5.0, 3, (0, 1, 4, 16), (DEFAULT_INTERVAL_S, 0.01))
QUICK = Settings(300, 5, 50, 4, 1.0, 2, (0, 1, 4, 16), (DEFAULT_INTERVAL_S, 0.01))
# Tools are sampled at least this often whatever the interval (taskmeter.measure.tools).
TOOL_PERIOD_S: float = getattr(tools_module, "TOOL_INTERVAL_MAX_S", float("inf"))


def interleaved(variants: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Each variant's results over ``rounds``, run A, B, C, then C, B, A, ..."""
    names = list(variants)
    results: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            results[name].append(variants[name]())
            wait_idle()  # no sampler thread left over from one variant into the next
    return results


def us_range(values: list[float]) -> str:
    return f"{min(values) * 1e6:.0f}-{max(values) * 1e6:.0f}"


# -- (a) an empty measurement ----------------------------------------------------------
def bench_context(s: Settings) -> str:
    def measured() -> float:
        t0 = time.perf_counter()
        for _ in range(s.ctx_calls):
            with taskmeter.measure("x"):
                pass
        return (time.perf_counter() - t0) / s.ctx_calls

    def null() -> float:
        t0 = time.perf_counter()
        for _ in range(s.ctx_calls):
            with contextlib.nullcontext():
                pass
        return (time.perf_counter() - t0) / s.ctx_calls

    def nested() -> float:
        # With another measurement open the sampler thread already runs: no thread start.
        with taskmeter.measure("outer"):
            return measured()

    res = interleaved({"measure": measured, "null": null, "nested": nested}, s.ctx_rounds)
    med = {k: median(v) for k, v in res.items()}
    null_range = f"{min(res['null']) * 1e6:.2f}-{max(res['null']) * 1e6:.2f}"
    rows = [
        ("`with contextlib.nullcontext(): pass`", f"{med['null'] * 1e6:.2f}", null_range, "1"),
        (
            '`with taskmeter.measure("x"): pass`',
            f"{med['measure'] * 1e6:.0f}",
            us_range(res["measure"]),
            f"{med['measure'] / med['null']:.0f}",
        ),
        (
            "same, inside an open measurement",
            f"{med['nested'] * 1e6:.0f}",
            us_range(res["nested"]),
            f"{med['nested'] / med['null']:.0f}",
        ),
    ]
    return table(["block", "µs per call", "range over rounds", "ratio"], rows)


# -- (b) one tool run --------------------------------------------------------------------
def bench_run(s: Settings) -> str:
    argv = ["true"]

    def tm_inside() -> float:
        with taskmeter.measure("runs"):
            t0 = time.perf_counter()
            for _ in range(s.run_calls):
                taskmeter.run(argv)
            return (time.perf_counter() - t0) / s.run_calls

    def tm_outside() -> float:
        t0 = time.perf_counter()
        for _ in range(s.run_calls):
            taskmeter.run(argv)
        return (time.perf_counter() - t0) / s.run_calls

    def plain() -> float:
        t0 = time.perf_counter()
        for _ in range(s.run_calls):
            subprocess.run(argv)
        return (time.perf_counter() - t0) / s.run_calls

    res = interleaved({"plain": plain, "inside": tm_inside, "outside": tm_outside}, s.run_rounds)
    med = {k: median(v) for k, v in res.items()}
    base = med["plain"]
    rows = [
        ('`subprocess.run(["true"])`', f"{base * 1e6:.0f}", us_range(res["plain"]), "1.00", "0"),
    ]
    for key, label in (
        ("inside", '`taskmeter.run(["true"])` inside a measurement'),
        ("outside", '`taskmeter.run(["true"])` outside any measurement'),
    ):
        rows.append(
            (
                label,
                f"{med[key] * 1e6:.0f}",
                us_range(res[key]),
                f"{med[key] / base:.2f}",
                f"{(med[key] - base) * 1e6:+.0f}",
            )
        )
    return table(["call", "µs per call", "range over rounds", "ratio", "added µs"], rows)


# -- (c) the sampler's CPU -------------------------------------------------------------
def self_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def thread_cpu_s(native_id: int) -> float:
    """On-CPU time of one thread of this process (ns precision where schedstat exists)."""
    try:
        with open(f"/proc/self/task/{native_id}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except OSError:
        return float("nan")


@dataclass(frozen=True)
class SamplerRun:
    cpu_s: float
    wall_s: float
    samples: int
    thread_cpu_s: float


def big_tool_argv(sleep_s: float) -> list[str]:
    """A one-process tool that holds more memory than this process (the floor every tool
    inherits), then sleeps: its exact peak comes from wait4, so it is sampled at the
    measurement's interval rather than every 20 ms (taskmeter.measure.tools)."""
    hold = max(200 << 20, 2 * READER.self_rss())
    code = f"import time; b = b'x' * {hold}; time.sleep({sleep_s:g})"
    return [sys.executable, "-c", code]


def sleeps(n: int, sleep_s: float, interval_s: float | None, big: bool = False) -> SamplerRun:
    argv = big_tool_argv(sleep_s) if big else ["sleep", f"{sleep_s:g}"]
    t0, c0 = time.monotonic(), self_cpu_s()
    if interval_s is None:
        procs = [subprocess.Popen(argv) for _ in range(n)]
        for p in procs:
            p.wait()
        if n == 0:
            time.sleep(sleep_s)
        samples, thread = 0, 0.0
    else:
        taskmeter.configure(interval_s=interval_s)
        # The sampler thread may live on between measurements (parked): its CPU over
        # this measurement is the difference.
        th0 = SAMPLER.thread
        thread0 = thread_cpu_s(th0.native_id) if th0 and th0.native_id else 0.0
        with taskmeter.measure("sleeps") as m:
            tprocs = [taskmeter.Popen(argv) for _ in range(n)]
            for tp in tprocs:
                tp.wait()
            if n == 0:  # the task alone: only the worker's own RSS is sampled
                time.sleep(sleep_s)
            th = SAMPLER.thread
            thread = thread_cpu_s(th.native_id) if th and th.native_id else float("nan")
            if th is th0:
                thread -= thread0
        samples = sum(t.samples for t in m.report.tools)
    return SamplerRun(self_cpu_s() - c0, time.monotonic() - t0, samples, thread)


def bench_sampler(s: Settings) -> str:
    rows = []
    keys: list[float | None] = [None, *s.intervals_s]
    # (tools, big): N sleeps, then one tool holding more memory than this process
    cases = [(n, False) for n in s.tool_counts] + [(1, True)]
    for n, big in cases:
        runs: dict[float | None, list[SamplerRun]] = {k: [] for k in keys}
        for r in range(s.sampler_rounds):
            for k in keys if r % 2 == 0 else reversed(keys):
                runs[k].append(sleeps(n, s.sleep_s, k, big))
                wait_idle()
        base_cpu = median(x.cpu_s for x in runs[None])
        for k in s.intervals_s:
            cpu = median(x.cpu_s for x in runs[k])
            wall = median(x.wall_s for x in runs[k])
            thread = median(x.thread_cpu_s for x in runs[k])
            samples = median(x.samples for x in runs[k])
            extra = cpu - base_cpu
            period = k if big else min(k, TOOL_PERIOD_S)
            rows.append(
                (
                    "1 above the floor" if big else str(n) if n else "0 (task alone)",
                    f"{k:g}",
                    f"{period * 1e3:g}" if n else "-",
                    f"{cpu * 1e3:.1f}",
                    f"{base_cpu * 1e3:.1f}",
                    f"{thread * 1e3:.1f}",
                    f"{samples:.0f}",
                    f"{extra / samples * 1e6:.0f}" if samples else "-",
                    f"{extra / (max(n, 1) * wall) * 100:.3f}",
                )
            )
    return table(
        [
            "tools",
            "interval s",
            "tool period ms",
            "CPU ms (taskmeter)",
            "CPU ms (baseline)",
            "sampler thread ms",
            "tool samples",
            "µs per sample",
            "% of a core per tool (task alone: per task)",
        ],
        rows,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds, 1 s tools: < 1 min")
    ap.add_argument("--sleep", type=float, help="life of each tool in (c), seconds")
    ap.add_argument("--rounds", type=int, help="rounds of every comparison")
    args = ap.parse_args(argv)
    s = QUICK if args.quick else FULL
    if args.sleep is not None:
        s = Settings(**{**s.__dict__, "sleep_s": args.sleep})
    if args.rounds is not None:
        r = args.rounds
        s = Settings(**{**s.__dict__, "ctx_rounds": r, "run_rounds": r, "sampler_rounds": r})
    if not sys.platform.startswith("linux"):
        print("note: not Linux: peaks fall back to psutil sampling", file=sys.stderr)

    print(f"# bench_overhead ({'quick' if args.quick else 'full'})\n")
    print(f"Machine: {machine()}\n")
    print(f"## (a) an empty measurement: {s.ctx_calls} calls x {s.ctx_rounds} rounds, median\n")
    print(bench_context(s), end="\n\n", flush=True)
    print(f"## (b) one tool run: {s.run_calls} calls x {s.run_rounds} rounds, median\n")
    print(bench_run(s), end="\n\n", flush=True)
    print(
        f"## (c) sampler CPU: N concurrent `sleep {s.sleep_s:g}`, "
        f"{s.sampler_rounds} rounds, median\n"
    )
    print(bench_sampler(s), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
