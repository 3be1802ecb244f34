"""Shared by the benchmarks: machine description, medians, markdown tables.

The machine these run on is often shared and noisy, so every benchmark compares its
variants side by side in one run, interleaved (A, B, A, B, ...), and reports medians.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import sys
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone

MiB = 1024 * 1024


def machine() -> str:
    """One line: date, cores, kernel, Python, load (the context a figure needs)."""
    load = os.getloadavg()
    return (
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}; nproc {os.cpu_count()}; "
        f"kernel {platform.release()}; Python {platform.python_version()} "
        f"({sys.implementation.name}); load avg {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def percentile(values: Iterable[float], p: float) -> float:
    """Nearest-rank percentile (``p`` in 0-100): always one of the values measured."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table; numeric-looking columns right-aligned."""
    body = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]

    def numeric(i: int) -> bool:
        cells = [r[i] for r in body if r[i] not in ("N/A", "-", "")]
        return bool(cells) and all(c[:1].isdigit() or c[:1] in "+-." for c in cells)

    right = [numeric(i) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        cols = zip(cells, widths, right, strict=True)
        out = [c.rjust(w) if r else c.ljust(w) for c, w, r in cols]
        return "| " + " | ".join(out) + " |"

    rule = [("-" * (w - 1) + ":") if r else "-" * w for w, r in zip(widths, right, strict=True)]
    return "\n".join([line(header), "| " + " | ".join(rule) + " |", *map(line, body)])
