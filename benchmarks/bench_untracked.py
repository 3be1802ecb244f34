"""What finding untracked subprocesses costs, and what the subprocess patch costs.

    .venv/bin/python benchmarks/bench_untracked.py            # about 1 minute
    .venv/bin/python benchmarks/bench_untracked.py --quick    # about 20 seconds

Prints markdown tables to stdout. Variants are interleaved in one run (A, B, A, B, ...,
the order alternating between rounds) and medians reported.

(a) One untracked scan (``UntrackedScan.scan``: what each of a measurement's samples
    adds, once per interval, in the sampler thread) when the process has no child at
    all, and with 0, 1 and 10 untracked children among ten (``sleep`` processes
    started after the task began, already seen once, so past their exec check; the
    others passed as tracked tools), side by side with one /proc read (``READER.self_rss()``,
    the pread of /proc/self/statm every sampler tick makes) and with one tracked-tool
    sample of one process (``READER.tree``). Also as % of one core at the default
    100 ms interval.
(b) The per-task path: an empty ``with taskmeter.measure("x"): pass`` with this source
    tree against a copy of it with ``measure/core.py`` as before the untracked hooks
    (as of ``ec502a0^``; ``--baseline REV`` compares with a whole tree at REV instead),
    in alternating
    subprocesses (each its own warm loop).
(c) ``subprocess.run(["true"])`` outside any measurement with ``subprocess.Popen``
    patched (TASKMETER_PATCH_SUBPROCESS) and not: the patch must cost nothing there.
(d) The sampler's CPU over a task with no children (``measure()`` around a sleep, at
    the default interval), with the untracked scan and with it switched off
    (``UntrackedScan.scan`` replaced by a no-op), interleaved: ``getrusage`` of this
    process, whose only other thread sleeps.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import taskmeter
from _common import machine, median, table
from taskmeter.measure import patch as patch_module
from taskmeter.measure import wait_idle
from taskmeter.measure.proc import READER
from taskmeter.measure.sampler import DEFAULT_INTERVAL_S
from taskmeter.measure.untracked import UntrackedScan

ROOT = Path(__file__).resolve().parent.parent
HOOKS_COMMIT = "ec502a0"  # added the untracked hooks to measure/core.py


def interleaved(variants: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    names = list(variants)
    results: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            results[name].append(variants[name]())
    return results


def per_call(fn: Callable[[], object], calls: int) -> Callable[[], float]:
    def timed() -> float:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t0) / calls

    return timed


# -- (a) one scan ---------------------------------------------------------------------
def _all_threads() -> int | None:
    return None


def bench_scan(calls: int, rounds: int) -> str:
    variants: dict[str, Callable[[], float]] = {
        "one /proc read (self_rss)": per_call(READER.self_rss, calls),
    }
    children: list[subprocess.Popen[bytes]] = []
    scans: dict[int, UntrackedScan] = {}
    # No child process at all (a pool process running an ordinary task): one waitid.
    alone = UntrackedScan(time.monotonic())
    variants["untracked scan, no child process at all"] = per_call(
        lambda: alone.scan(time.monotonic(), set, _all_threads), calls
    )
    variants_alone = interleaved(dict(variants), rounds)
    try:
        # One pool of ten sleeps, started after every scan's task began; a scan meant to
        # see n of them is told the others are tracked tools (skipped before any read).
        for n in (0, 1, 10):
            scans[n] = UntrackedScan(time.monotonic())
        pool = [subprocess.Popen(["sleep", "600"]) for _ in range(10)]
        children.extend(pool)
        time.sleep(0.05)  # all exec'd
        pids = [p.pid for p in pool]
        variants["one tool sample (READER.tree of 1 process)"] = per_call(
            lambda: READER.tree(pids[0]), calls
        )
        skip = {0: set(pids), 1: set(pids[1:]), 10: set()}
        for n, scan in scans.items():
            now = time.monotonic()
            tracked = skip[n].copy
            scan.scan(now, tracked, _all_threads)  # first sight: reads command lines once
            variants[f"untracked scan, {n} untracked of 10 children"] = per_call(
                lambda scan=scan, t=tracked: scan.scan(time.monotonic(), t, _all_threads), calls
            )
        variants.pop("untracked scan, no child process at all")
        res = {**variants_alone, **interleaved(variants, rounds)}
    finally:
        for p in children:
            p.kill()
            p.wait()
    rows = []
    for name, values in res.items():
        us = median(values) * 1e6
        core = us / (DEFAULT_INTERVAL_S * 1e6) * 100
        rows.append((name, f"{us:.1f}", f"{min(values) * 1e6:.1f}-{max(values) * 1e6:.1f}",
                     f"{core:.3f}"))  # fmt: skip
    return table(["what", "µs per call", "range over rounds", "% of a core at 100 ms"], rows)


# -- (b) the per-task path ----------------------------------------------------------------
LOOP = """
import time, taskmeter
for _ in range(300):
    with taskmeter.measure("x"):
        pass
t0 = time.perf_counter()
for _ in range({n}):
    with taskmeter.measure("x"):
        pass
print((time.perf_counter() - t0) / {n})
"""


def export_tree(rev: str, dest: Path) -> Path:
    archive = dest / "src.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), rev, "src"], check=True)
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4
            tar.extractall(dest, filter="data")
        else:
            tar.extractall(dest)  # our own git archive
    return dest / "src"


def tree_without_hooks(dest: Path) -> Path:
    """A copy of this tree's src/ with measure/core.py as before the untracked hooks
    (core.py has had no other change since)."""
    shutil.copytree(ROOT / "src", dest / "src", ignore=shutil.ignore_patterns("__pycache__"))
    core = "src/taskmeter/measure/core.py"
    old = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{HOOKS_COMMIT}^:{core}"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    (dest / core).write_text(old)
    return dest / "src"


def bench_task_path(baseline: str | None, calls: int, rounds: int) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        if baseline:
            name, old = f"baseline {baseline}", export_tree(baseline, Path(tmp))
        else:
            name, old = "same tree, untracked hooks reverted", tree_without_hooks(Path(tmp))
        trees = {"this tree": ROOT / "src", name: old}

        def runner(src: Path) -> Callable[[], float]:
            def run() -> float:
                env = {**os.environ, "PYTHONPATH": str(src)}
                out = subprocess.run(
                    [sys.executable, "-c", LOOP.format(n=calls)],
                    env=env, capture_output=True, text=True, check=True,
                )  # fmt: skip
                return float(out.stdout.split()[-1])

            return run

        res = interleaved({name: runner(src) for name, src in trees.items()}, rounds)
    base = median(res[name])
    rows = [
        (
            f'`with taskmeter.measure("x"): pass`, {name}',
            f"{median(v) * 1e6:.1f}",
            f"{min(v) * 1e6:.1f}-{max(v) * 1e6:.1f}",
            f"{median(v) / base:.3f}",
        )
        for name, v in res.items()
    ]
    return table(["block", "µs per call", "range over rounds", "vs baseline"], rows)


# -- (c) the patch outside a task ----------------------------------------------------------
def bench_patch(calls: int, rounds: int) -> str:
    argv = ["true"]

    def unpatched() -> float:
        return per_call(lambda: subprocess.run(argv), calls)()

    def patched() -> float:
        patch_module.patch()
        try:
            return per_call(lambda: subprocess.run(argv), calls)()
        finally:
            patch_module.unpatch()

    res = interleaved({"plain": unpatched, "patched": patched}, rounds)
    base = median(res["plain"])
    rows = [
        (f"`subprocess.run(['true'])`, {name}, outside a measurement",
         f"{median(v) * 1e6:.0f}", f"{min(v) * 1e6:.0f}-{max(v) * 1e6:.0f}",
         f"{median(v) / base:.3f}")
        for name, v in res.items()
    ]  # fmt: skip
    return table(["call", "µs per call", "range over rounds", "ratio"], rows)


# -- (d) the sampler's CPU over a task -------------------------------------------------------
def bench_sampler(seconds: float, rounds: int) -> str:
    real_scan = UntrackedScan.scan

    def no_scan(self: UntrackedScan, now: float, tracked: object, tid: object) -> tuple[int, int]:
        return 0, 0

    def task(scan_on: bool) -> Callable[[], float]:
        def run() -> float:
            UntrackedScan.scan = real_scan if scan_on else no_scan  # type: ignore[method-assign]
            try:
                ru0 = resource.getrusage(resource.RUSAGE_SELF)
                with taskmeter.measure("sleepy"):
                    time.sleep(seconds)
                wait_idle()
                ru1 = resource.getrusage(resource.RUSAGE_SELF)
            finally:
                UntrackedScan.scan = real_scan  # type: ignore[method-assign]
            cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
            return cpu / seconds

        return run

    res = interleaved({"scan on": task(True), "scan off": task(False)}, rounds)
    rows = [
        (f"`measure()` around a {seconds:g} s sleep, {name}", f"{median(v) * 1e3:.2f}",
         f"{min(v) * 1e3:.2f}-{max(v) * 1e3:.2f}", f"{median(v) * 100:.3f}")
        for name, v in res.items()
    ]  # fmt: skip
    return table(["task", "CPU ms per second", "range over rounds", "% of a core"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--baseline", help="compare (b) with the whole tree at this git revision")
    a = ap.parse_args()
    scan_calls, scan_rounds = (300, 5) if a.quick else (2000, 9)
    task_calls, task_rounds = (1000, 4) if a.quick else (3000, 8)
    run_calls, run_rounds = (30, 4) if a.quick else (100, 16)
    sleep_s, sleep_rounds = (1.0, 4) if a.quick else (2.0, 8)
    print(f"Machine: {machine()}\n")
    print("### (a) One untracked scan per sample\n")
    print(bench_scan(scan_calls, scan_rounds) + "\n")
    print("### (b) The per-task path\n")
    print(bench_task_path(a.baseline, task_calls, task_rounds) + "\n")
    print("### (c) The subprocess patch outside a measurement\n")
    print(bench_patch(run_calls, run_rounds) + "\n")
    print("### (d) The sampler's CPU over a task with no children\n")
    print(bench_sampler(sleep_s, sleep_rounds) + "\n")


if __name__ == "__main__":
    main()
