"""Kubernetes requests and limits for one Celery worker Deployment, from measured tasks.

The rules are the seed's (worker_metrics.md), made explicit for a prefork worker that
runs N tasks at once beside its main (parent) process:

    memory request = (N x typical use of the heaviest task type + parent) x (1 + request margin)
    memory limit   = (N x largest footprint of any task type    + parent) x (1 + limit margin)
                     then, if tasks were killed, raised as VPA does after an OOM kill:
                     max(limit x 1.2, limit + 100 MiB)
    CPU request    = N x cores a task keeps busy while running (CPU seconds / wall seconds)
    CPU limit      = optional; a prefork child runs one single-threaded task at a time,
                     so each gets min(1, limit / N) cores: wall >= CPU seconds / that

Memory over the limit is OOM-killed; CPU over the limit is only throttled.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from taskmeter.sizing.stats import TaskStats

MiB = 2**20
GiB = 2**30
DEFAULT_MARGIN = 0.20
OOM_BUMP_FACTOR = 1.2  # what the Kubernetes VPA recommender does after an OOM kill
OOM_BUMP_MIN_BYTES = 100 * MiB
SPIKY_RATIO = 2.0


class SizingError(ValueError):
    """The data cannot support a recommendation; the message says why and what to do."""


@dataclass(frozen=True)
class Options:
    concurrency: int
    parent_bytes: int
    request_margin: float = DEFAULT_MARGIN
    limit_margin: float = DEFAULT_MARGIN
    percentile: float | None = None
    min_tasks: int = 20
    cpu_limit_cores: float | None = None

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise SizingError(f"--concurrency must be at least 1, not {self.concurrency}")
        for name, m in (("--request-margin", self.request_margin),
                        ("--limit-margin", self.limit_margin)):  # fmt: skip
            if not 0 <= m <= 10:
                raise SizingError(f"{name} must be between 0 and 10 (0.2 = 20 %), not {m}")
        if self.percentile is not None and not 0 < self.percentile < 1:
            raise SizingError(
                f"--percentile must be between 0 and 1 (e.g. 0.95), not {self.percentile}"
            )
        if self.parent_bytes < 0:
            raise SizingError("--parent-memory must not be negative")
        if self.cpu_limit_cores is not None and self.cpu_limit_cores <= 0:
            raise SizingError("--cpu-limit must be a positive number of cores")


@dataclass(frozen=True)
class TaskSizing:
    task: str
    runs: int
    kills: int
    typical_bytes: float
    footprint_max_bytes: int
    footprint_median_bytes: float
    overhead_peak_max_bytes: int
    cores_busy: float
    cpu_mean_s: float
    wall_mean_s: float
    # The worker's own share of the wall time (the rest: tool subprocesses running):
    # how far a task is from "just running bcftools".
    overhead_wall_share: float
    expected_wall_s: float
    spiky: bool


@dataclass(frozen=True)
class Recommendation:
    options: Options
    tasks: tuple[TaskSizing, ...]
    memory_request_bytes: int
    memory_limit_bytes: int
    cpu_request_millicores: int
    cpu_limit_millicores: int | None
    max_memory_per_child_kib: int
    reasoning: tuple[str, ...]
    notes: tuple[str, ...] = field(default=())

    @property
    def memory_request(self) -> str:
        return memory_quantity(self.memory_request_bytes)

    @property
    def memory_limit(self) -> str:
        return memory_quantity(self.memory_limit_bytes)

    @property
    def cpu_request(self) -> str:
        return cpu_quantity(self.cpu_request_millicores)

    @property
    def cpu_limit(self) -> str | None:
        return (
            None if self.cpu_limit_millicores is None else cpu_quantity(self.cpu_limit_millicores)
        )

    def celery_flags(self) -> list[str]:
        return [
            "--concurrency", str(self.options.concurrency),
            "--max-memory-per-child", str(self.max_memory_per_child_kib),
        ]  # fmt: skip


def memory_quantity(n_bytes: float) -> str:
    """Bytes rounded *up* to a canonical Kubernetes quantity: whole Gi when exact,
    else whole Mi."""
    mib = max(1, math.ceil(n_bytes / MiB))
    return f"{mib // 1024}Gi" if mib % 1024 == 0 else f"{mib}Mi"


def cpu_quantity(millicores: int) -> str:
    """Whole cores when exact ("2"), else millicores ("250m")."""
    return str(millicores // 1000) if millicores % 1000 == 0 else f"{millicores}m"


def _ceil_millicores(cores: float, step: int = 10) -> int:
    return max(step, math.ceil(cores * 1000 / step - 1e-9) * step)


def recommend(stats: Mapping[str, TaskStats], options: Options) -> Recommendation:
    if not stats:
        raise SizingError("no tasks in the data: nothing to size (check the source and window)")
    few = [f"{s.task} ({s.runs})" for s in stats.values() if s.runs < options.min_tasks]
    if few:
        raise SizingError(
            f"too few tasks to size from: {', '.join(few)}; at least {options.min_tasks} per "
            "task type are needed (--min-tasks to change the threshold, at your own risk)"
        )
    n, parent = options.concurrency, options.parent_bytes
    pct = options.percentile
    heaviest = max(stats.values(), key=lambda s: s.typical_bytes(pct))
    peakiest = max(stats.values(), key=lambda s: s.footprint_max_bytes)
    typical = heaviest.typical_bytes(pct)
    how = "mean" if pct is None else f"p{pct * 100:g}"
    mi = memory_quantity
    request_raw = n * typical + parent
    request = request_raw * (1 + options.request_margin)
    limit_raw = n * peakiest.footprint_max_bytes + parent
    limit = limit_raw * (1 + options.limit_margin)
    reasoning = [
        f"memory request = ({n} x {mi(typical)} [{how} worker + tool RSS of "
        f"{heaviest.task}] + {mi(parent)} [parent]) x {1 + options.request_margin:g} "
        f"= {mi(request)}",
        f"memory limit = ({n} x {mi(peakiest.footprint_max_bytes)} [largest footprint, "
        f"{peakiest.task}] + {mi(parent)} [parent]) x {1 + options.limit_margin:g} = {mi(limit)}",
    ]
    notes = []
    kills = sum(s.kills for s in stats.values())
    if kills:
        bumped = max(limit * OOM_BUMP_FACTOR, limit + OOM_BUMP_MIN_BYTES)
        reasoning.append(
            f"{kills} task(s) or tool(s) were killed (SIGKILL: the OOM killer, or a hard time "
            f"limit): limit raised as VPA does after an OOM kill, max(x1.2, +100Mi) = {mi(bumped)}"
        )
        limit = bumped
    limit = max(limit, request)

    busy = max(stats.values(), key=lambda s: s.cores_busy)
    cpu_request_mc = _ceil_millicores(n * busy.cores_busy)
    reasoning.append(
        f"CPU request = {n} x {busy.cores_busy:.3f} cores [CPU / wall of {busy.task}] "
        f"= {cpu_quantity(cpu_request_mc)}"
    )
    cpu_limit_mc = None
    if options.cpu_limit_cores is not None:
        cpu_limit_mc = max(cpu_request_mc, _ceil_millicores(options.cpu_limit_cores))
        reasoning.append(
            f"CPU limit = {cpu_quantity(cpu_limit_mc)}: CPU above it is throttled (never "
            "killed); each of the N children gets min(1, limit / N) cores"
        )
    else:
        notes.append(
            "no CPU limit: tasks may use idle CPU on the node (fastest wall time), at the "
            "risk of noisy neighbours; --cpu-limit CORES caps it, and each task's wall time "
            "then grows to at least its CPU seconds / min(1, limit / N)"
        )
    cores_each = min(1.0, (cpu_limit_mc or cpu_request_mc) / 1000 / n)
    worst_peak = max(s.overhead_peak_max_bytes for s in stats.values())
    max_per_child_kib = math.ceil(worst_peak * (1 + options.limit_margin) / 1024)
    reasoning.append(
        f"--max-memory-per-child = largest worker-process peak {mi(worst_peak)} x "
        f"{1 + options.limit_margin:g} = {max_per_child_kib} KiB (Celery counts KiB)"
    )
    sized = []
    for s in stats.values():
        spiky = s.footprint_median_bytes > 0 and (
            s.footprint_max_bytes / s.footprint_median_bytes >= SPIKY_RATIO
        )
        if spiky:
            extra = n * (s.footprint_max_bytes - s.footprint_median_bytes)
            notes.append(
                f"{s.task} is spiky: its peak footprint is "
                f"{s.footprint_max_bytes / s.footprint_median_bytes:.1f}x its median; the limit "
                f"keeps {mi(extra)} for such peaks that most tasks never use"
            )
        sized.append(
            TaskSizing(
                task=s.task,
                runs=s.runs,
                kills=s.kills,
                typical_bytes=s.typical_bytes(pct),
                footprint_max_bytes=s.footprint_max_bytes,
                footprint_median_bytes=s.footprint_median_bytes,
                overhead_peak_max_bytes=s.overhead_peak_max_bytes,
                cores_busy=s.cores_busy,
                cpu_mean_s=s.cpu_mean_s,
                wall_mean_s=s.wall_mean_s,
                overhead_wall_share=(
                    s.wall_overhead_sum_s / s.wall_sum_s if s.wall_sum_s > 0 else 0.0
                ),
                expected_wall_s=max(s.wall_mean_s, s.cpu_mean_s / cores_each),
                spiky=spiky,
            )
        )
    return Recommendation(
        options=options,
        tasks=tuple(sized),
        memory_request_bytes=math.ceil(request),
        memory_limit_bytes=math.ceil(limit),
        cpu_request_millicores=cpu_request_mc,
        cpu_limit_millicores=cpu_limit_mc,
        max_memory_per_child_kib=max_per_child_kib,
        reasoning=tuple(reasoning),
        notes=tuple(notes),
    )
