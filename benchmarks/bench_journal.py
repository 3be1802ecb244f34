"""What the in-flight journal costs a task: its start and end records, side by side with
an empty ``taskmeter.measure()`` and a bare loop.

    .venv/bin/python benchmarks/bench_journal.py           # about 10 seconds
    .venv/bin/python benchmarks/bench_journal.py --quick   # about 3 seconds

Per task, a pool process writes its record at start (``Journal.begin``: name, id, start,
CPU, a crc32, into a MAP_SHARED page) and clears one byte at the end (``Journal.end``):
memory stores, no system call. The main process's side (``Journal.observe``, at each
hub tick, per task in flight) is timed too: it is not per task but per tick.

Variants run interleaved (A, B, C, then C, B, A, ...) in one process; medians of the
per-call time of each batch.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import taskmeter
from _common import machine, median, table
from taskmeter.celery.hub import Run
from taskmeter.celery.journal import Journal
from taskmeter.measure import wait_idle


def per_call(fn: Callable[[], None], calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    calls, rounds = (2000, 5) if args.quick else (5000, 15)

    with tempfile.TemporaryDirectory() as tmp:
        journal = Journal.open(Path(tmp), "bench@host")
        assert journal is not None
        journal.recover([], hostname="h", pool="prefork", interval_s=0.1)
        task_id = "0b7f2a8e-3c1d-4e5f-9a6b-7c8d9e0f1a2b"
        seq = iter(range(1, 10**9))

        def nothing() -> None:
            pass

        def journal_task() -> None:
            journal.begin(next(seq), "vcf.query", task_id, time.time(), 1.25)
            journal.end()

        def empty_measure() -> None:
            with taskmeter.measure("x"):
                pass

        # The main process's tick for one task in flight (a pool child's record).
        child_pid = os.getpid()
        run = Run(f"{child_pid}:1", "vcf.query", task_id, child_pid, time.time(), 0.0)
        run.rss.add(0.0, 50 << 20)

        def tick() -> None:
            journal.observe([run])

        variants: dict[str, Callable[[], None]] = {
            "bare loop (no call)": nothing,
            "journal: begin + end (per task)": journal_task,
            "empty taskmeter.measure()": empty_measure,
            "journal: observe 1 task (per hub tick)": tick,
        }
        results: dict[str, list[float]] = {n: [] for n in variants}
        names = list(variants)
        for r in range(rounds):
            for name in names if r % 2 == 0 else reversed(names):
                n = calls if "measure" not in name else max(calls // 5, 200)
                results[name].append(per_call(variants[name], n))
                wait_idle()
        journal.close()

    base = median(results["bare loop (no call)"])
    rows = [
        (name, f"{(median(v) - base) * 1e6:.2f}", f"{min(v) * 1e6:.2f}-{max(v) * 1e6:.2f}")
        for name, v in results.items()
        if name != "bare loop (no call)"
    ]
    print(f"In-flight journal cost ({machine()}; {rounds} rounds, medians)\n")
    print(table(["variant", "µs per call (minus loop)", "range µs"], rows))
    print(f"\nbare loop: {base * 1e6:.3f} µs per call; {sys.executable}")


if __name__ == "__main__":
    main()
