"""Where taskmeter's per-task time goes, section by section, with warm and cold caches.

    .venv/bin/python benchmarks/profile_sections.py                # about 40 s
    .venv/bin/python benchmarks/profile_sections.py --gap-ms 50    # colder
    .venv/bin/python benchmarks/profile_sections.py --src /tmp/old/src  # another tree

Runs ``bench_hotpath.child`` (a pool process running the Celery signal handlers, a
main process serving the channels from a kombu loop) twice: tasks back to back (warm
caches), then with a sleep of ``--gap-ms`` before each (cold caches: the usual case in
a worker that keeps up, where a pool process waits for its next task). The functions
listed in SECTIONS are wrapped with a clock (``time.perf_counter_ns``, wall time while
the process runs); each prints its time per task, in the process it ran in. Sections
nest (indented under their caller), so a parent's time includes its children's; the
wrappers add about a microsecond each (more when cold), and are in the "in all" rows,
which ``bench_hotpath.py`` measures without them.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import mmap
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import machine, table

REPO = Path(__file__).resolve().parent.parent
POOL, MAIN = 0, 1

# (process, label, module, attribute path); a label's leading spaces show its nesting.
SECTIONS: list[tuple[int, str, str, str]] = [
    # pool process
    (POOL, "task start (task_prerun handler)", "taskmeter.celery.integration", "_on_prerun"),
    (POOL, "  Measurement()", "taskmeter.measure.core", "Measurement.__init__"),
    (POOL, "  Measurement.start", "taskmeter.measure.core", "Measurement.start"),
    (POOL, "    Span.begin", "taskmeter.measure.span", "Span.begin"),
    (POOL, "      Book.open (clear_refs)", "taskmeter.measure.span", "Book.open"),
    (POOL, "  Journal.begin", "taskmeter.celery.journal", "Journal.begin"),
    (POOL, "task end (task_postrun handler)", "taskmeter.celery.integration", "_on_postrun"),
    (POOL, "  Measurement.finish", "taskmeter.measure.core", "Measurement.finish"),
    (
        POOL,
        "  Measurement.finish_packed (no report built)",
        "taskmeter.measure.core",
        "Measurement.finish_packed",
    ),
    (POOL, "    Span.end", "taskmeter.measure.span", "Span.end"),
    (POOL, "    Measurement._build", "taskmeter.measure.core", "Measurement._build"),
    (POOL, "  TaskReport.to_json_bytes", "taskmeter.measure.report", "TaskReport.to_json_bytes"),
    (POOL, "  observation (the metrics' figures)", "taskmeter.celery.integration", "observation"),
    (
        POOL,
        "  Sender.send_end (the outbox, else send_line)",
        "taskmeter.celery.transport",
        "Sender.send_end",
    ),
    (POOL, "    Outbox.put", "taskmeter.celery.outbox", "Outbox.put"),
    (POOL, "  Sender.send_line", "taskmeter.celery.transport", "Sender.send_line"),
    # main process
    (MAIN, "Listener._read (a channel)", "taskmeter.celery.transport", "Listener._read"),
    (MAIN, "Listener._collect (the outboxes)", "taskmeter.celery.transport", "Listener._collect"),
    (MAIN, "  Outbox.take", "taskmeter.celery.outbox", "Outbox.take"),
    (MAIN, "  TaskReport.from_trusted", "taskmeter.measure.report", "TaskReport.from_trusted"),
    (MAIN, "  _unpack_end (a packed end's record)", "taskmeter.celery.integration", "_unpack_end"),
    (MAIN, "  Hub.ended", "taskmeter.celery.hub", "Hub.ended"),
    (MAIN, "    TaskMetrics.observe", "taskmeter.export.metrics", "TaskMetrics.observe"),
    (MAIN, "  Hub.ended_final", "taskmeter.celery.hub", "Hub.ended_final"),
    (
        MAIN,
        "  TaskMetrics.observe_figures",
        "taskmeter.export.metrics",
        "TaskMetrics.observe_figures",
    ),
    (
        MAIN,
        "ledger write (a round's records)",
        "taskmeter.celery.integration",
        "_Worker._flush_ledger",
    ),
    (MAIN, "Hub.tick (every 0.1 s, its thread)", "taskmeter.celery.hub", "Hub.tick"),
]
_SIDE = [MAIN]  # which process a wrapper runs in (set in the forked pool process)


class Clocks:
    """Nanoseconds and calls per section and process side, in memory shared across
    the fork (each side writes only its own half)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self._mm = mmap.mmap(-1, 8 * 2 * 2 * k)
        self.v = memoryview(self._mm).cast("d")

    def add(self, i: int, ns: int) -> None:
        base = (_SIDE[0] * self.k + i) * 2
        self.v[base] += ns
        self.v[base + 1] += 1

    def reset_side(self) -> None:
        start = _SIDE[0] * self.k * 2
        for j in range(start, start + self.k * 2):
            self.v[j] = 0.0

    def read(self, side: int, i: int) -> tuple[float, float]:
        base = (side * self.k + i) * 2
        return self.v[base], self.v[base + 1]


def timed(f: Callable[..., Any], i: int, clocks: Clocks) -> Callable[..., Any]:
    """``f``, its time added to section ``i``."""

    @functools.wraps(f)
    def call(*a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter_ns()
        try:
            return f(*a, **kw)
        finally:
            clocks.add(i, time.perf_counter_ns() - t0)

    return call


def wrap(clocks: Clocks) -> None:
    for i, (_, _, module, path) in enumerate(SECTIONS):
        try:
            owner: Any = importlib.import_module(module)
        except ImportError:  # not in this tree (a baseline): its row says "-"
            continue
        *outer, name = path.split(".")
        for part in outer:
            owner = getattr(owner, part)
        if not hasattr(owner, name):  # not in this tree (a baseline): its row says "-"
            continue
        original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        if isinstance(original, classmethod):  # the bound one, called through the class
            setattr(owner, name, staticmethod(timed(getattr(owner, name), i, clocks)))
        else:
            setattr(owner, name, timed(original, i, clocks))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", type=Path, default=REPO / "src", help="the source tree")
    ap.add_argument("--gap-ms", type=float, default=20.0, help="sleep before each cold task")
    ap.add_argument("--tasks", type=int, default=300, help="tasks per run")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(args.src.resolve()))
    import bench_hotpath

    clocks = Clocks(len(SECTIONS))
    wrap(clocks)
    os.register_at_fork(after_in_child=lambda: _SIDE.__setitem__(0, POOL))
    print(f"# profile_sections\n\nMachine: {machine()}; src {args.src}\n")
    runs: dict[str, tuple[dict[str, float], list[tuple[float, float]]]] = {}
    for label, gap_ms, n in (("warm", 0.0, args.tasks * 10), ("cold", args.gap_ms, args.tasks)):
        totals = bench_hotpath.child(args.src.resolve(), n, gap_ms / 1000, clocks.reset_side)
        per = [clocks.read(side, j) for j, (side, *_) in enumerate(SECTIONS)]
        runs[label] = (totals, [(ns / n / 1000, calls / n) for ns, calls in per])
    print(
        f"µs per task: warm = {args.tasks * 10} tasks back to back, cold = {args.tasks} "
        f"tasks {args.gap_ms:g} ms apart; each process in all as bench_hotpath measures it "
        f"(wrappers included)\n"
    )
    rows = []
    for j, (side, label, _, _) in enumerate(SECTIONS):
        if j == 0 or side != SECTIONS[j - 1][0]:
            name = "pool" if side == POOL else "main"
            w, c = runs["warm"][0][f"{name}_us"], runs["cold"][0][f"{name}_us"]
            rows.append([f"**{name} process, in all**", f"{w:.1f}", f"{c:.1f}", f"{c / w:.1f}"])
        w_us, _ = runs["warm"][1][j]
        c_us, c_calls = runs["cold"][1][j]
        if not c_calls:  # not called (not in this tree, or not on its path)
            rows.append([label.replace(" ", "\u00a0", len(label) - len(label.lstrip())),
                         "-", "-", "-"])  # fmt: skip
            continue
        ratio = f"{c_us / w_us:.1f}" if w_us > 0 else "-"
        calls = f" ({c_calls:.2g} calls)" if abs(c_calls - 1) > 0.05 else ""
        rows.append([label.replace(" ", "\u00a0", len(label) - len(label.lstrip())) + calls,
                     f"{w_us:.1f}", f"{c_us:.1f}", ratio])  # fmt: skip
    print(table(["section", "warm µs/task", "cold µs/task", "cold / warm"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
