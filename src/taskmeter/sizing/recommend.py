"""Kubernetes requests and limits for one Celery worker Deployment, from measured tasks.

The rules are the seed's (worker_metrics.md), made explicit per worker pool. A prefork
worker runs N tasks at once in N child processes beside its main (parent) process:

    memory request = (N x typical use of the heaviest task type + parent) x (1 + request margin)
    memory limit   = (N x largest footprint of any task type    + parent) x (1 + limit margin)
    CPU request    = N x cores a task keeps busy while running (CPU seconds / wall seconds)
    CPU limit      = optional; a prefork child runs one single-threaded task at a time,
                     so each gets min(1, limit / N) cores: wall >= CPU seconds / that

A solo worker runs one task at a time in its main process (no parent beside it, no
--max-memory-per-child, which only prefork honours):

    memory request = typical use of the heaviest task type x (1 + request margin)
    memory limit   = largest footprint of any task type x (1 + limit margin)

A threads (or eventlet/gevent) worker runs N tasks in one process: the process's RSS
(which every task's worker RSS already includes) counts once, the tools of N
concurrent tasks N times:

    memory request = (largest worker RSS average + N x largest tool RSS average) x (1 + m)
    memory limit   = max(largest worker peak + N x largest tool peak,
                         largest footprint) x (1 + m)

A task type with tasks killed by the OOM killer or lost (their worker died with them in
flight, e.g. the whole pod OOM-killed) has its peaks raised first, as the Kubernetes
VPA does after an OOM kill: max(peak x 1.2, peak + 100 MiB). Time-limit kills and
other signals do not (they say nothing about memory). Memory over the limit is
OOM-killed; CPU over the limit is only throttled.
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
# A task type whose mean queue wait exceeds both its mean wall time and this many
# seconds is short of workers, not of memory.
QUEUE_WAIT_NOTICE_S = 1.0
POOLS = ("prefork", "solo", "threads")
# Causes of a task's death that say it may have needed more memory: the OOM killer, or
# a kill the worker could not explain (no memory cgroup to ask).
OOM_CAUSES = ("oom", "unknown")


def pool_model(pool: str | None) -> str:
    """The sizing rules for a Celery pool name (``celery worker -P``): prefork (also
    for unknown pools), solo, or threads (threads, eventlet, gevent: one process)."""
    name = (pool or "prefork").strip().lower()
    if name in ("threads", "thread", "eventlet", "gevent"):
        return "threads"
    return "solo" if name == "solo" else "prefork"


def oom_bump(peak: float) -> float:
    """What the VPA recommender makes of a peak that ended in an OOM kill."""
    return max(peak * OOM_BUMP_FACTOR, peak + OOM_BUMP_MIN_BYTES)


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
    pool: str = "prefork"  # prefork, solo or threads (see pool_model)

    def __post_init__(self) -> None:
        if self.pool not in POOLS:
            raise SizingError(f"--pool must be one of {', '.join(POOLS)}, not {self.pool!r}")
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
        if self.cpu_limit_cores is not None and not (
            self.cpu_limit_cores > 0 and math.isfinite(self.cpu_limit_cores)
        ):
            raise SizingError("--cpu-limit must be a positive number of cores")


@dataclass(frozen=True)
class TaskSizing:
    task: str
    runs: int
    kills: int
    # Tasks killed by the OOM killer (or for a reason the worker could not tell) and
    # tool runs it ended; tasks lost with their worker; tasks killed by a time limit.
    oom_kills: int
    lost: int
    time_limit_kills: int
    # True when this type's peaks were raised by the VPA's OOM bump.
    oom_bumped: bool
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
    max_memory_per_child_kib: int | None  # prefork only
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
        if self.options.pool == "solo":
            return ["--pool", "solo"]
        if self.options.pool == "threads":
            return ["--pool", "threads", "--concurrency", str(self.options.concurrency)]
        flags = ["--concurrency", str(self.options.concurrency)]
        if self.max_memory_per_child_kib is not None:
            flags += ["--max-memory-per-child", str(self.max_memory_per_child_kib)]
        return flags


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


def _oom_like(s: TaskStats) -> int:
    """Tasks and tool runs of a type that may have died for want of memory."""
    causes = s.kills_by_cause
    lost_without_cause = max(
        0, s.runs_by_state.get("lost", 0) - sum(causes.get(c, 0) for c in OOM_CAUSES)
    )
    return sum(causes.get(c, 0) for c in OOM_CAUSES) + lost_without_cause + s.tool_oom_kills


def recommend(stats: Mapping[str, TaskStats], options: Options) -> Recommendation:
    if not stats:
        raise SizingError("no tasks in the data: nothing to size (check the source and window)")
    few = [f"{s.task} ({s.runs})" for s in stats.values() if s.runs < options.min_tasks]
    if few:
        raise SizingError(
            f"too few tasks to size from: {', '.join(few)}; at least {options.min_tasks} per "
            "task type are needed (--min-tasks to change the threshold, at your own risk)"
        )
    pool = options.pool
    n = 1 if pool == "solo" else options.concurrency
    parent = options.parent_bytes if pool == "prefork" else 0
    pct = options.percentile
    mi = memory_quantity
    how = "mean" if pct is None else f"p{pct * 100:g}"
    rm, lm = 1 + options.request_margin, 1 + options.limit_margin
    reasoning: list[str] = []
    notes: list[str] = []

    # The OOM bump, per task type: the peaks of a type whose tasks (or tools) died for
    # memory understate what it needs.
    bumped = {s.task: _oom_like(s) > 0 for s in stats.values()}

    def peak(s: TaskStats, value: float) -> float:
        return oom_bump(value) if bumped[s.task] else value

    for s in stats.values():
        if bumped[s.task]:
            parts = []
            oom = s.kills_by_cause.get("oom", 0) + s.tool_oom_kills
            if oom:
                parts.append(f"{oom} OOM-killed")
            if s.kills_by_cause.get("unknown", 0):
                parts.append(f"{s.kills_by_cause['unknown']} killed for a reason not known")
            if s.runs_by_state.get("lost", 0):
                parts.append(f"{s.runs_by_state['lost']} lost with their worker")
            reasoning.append(
                f"{s.task}: {', '.join(parts)}: its peaks raised as the VPA does after an OOM "
                f"kill, max(x{OOM_BUMP_FACTOR:g}, +{OOM_BUMP_MIN_BYTES // MiB}Mi): largest "
                f"footprint {mi(s.footprint_max_bytes)} -> {mi(oom_bump(s.footprint_max_bytes))}"
            )
    time_limit = sum(s.kills_by_cause.get("time_limit", 0) for s in stats.values())
    if time_limit:
        notes.append(
            f"{time_limit} task(s) killed by a time limit: not a memory signal, the limit is "
            "not raised for them (raise the time limit or the CPU instead)"
        )
    signalled = sum(s.kills_by_cause.get("signal", 0) for s in stats.values())
    tool_killed = sum(
        max(0, s.kills - s.runs_by_state.get("killed", 0) - s.tool_oom_kills)
        for s in stats.values()
    )
    if signalled or tool_killed:
        notes.append(
            f"{signalled} task(s) and {tool_killed} tool run(s) ended by a signal not from the "
            "OOM killer (kill -9, revoke, a hard time limit): the limit is not raised for them"
        )

    if pool == "threads":
        typical_task = max(stats.values(), key=lambda s: s.mem_tool_avg_mean_bytes)
        process_task = max(stats.values(), key=lambda s: s.mem_overhead_avg_mean_bytes)
        if pct is not None:
            typical_task = max(stats.values(), key=lambda s: s.mem_tool_avg_quantile_bytes or 0)
            process_task = max(stats.values(), key=lambda s: s.mem_overhead_avg_quantile_bytes or 0)
            process_typical = process_task.mem_overhead_avg_quantile_bytes or 0.0
            tool_typical = typical_task.mem_tool_avg_quantile_bytes or 0.0
        else:
            process_typical = process_task.mem_overhead_avg_mean_bytes
            tool_typical = typical_task.mem_tool_avg_mean_bytes
        request = (process_typical + n * tool_typical) * rm
        reasoning.insert(0, (
            f"memory request = ({mi(process_typical)} [{how} RSS of the worker process, "
            f"{process_task.task}; counted once: threads share it] + {n} x "
            f"{mi(tool_typical)} [{how} tool RSS of {typical_task.task}]) x {rm:g} "
            f"= {mi(request)}"
        ))  # fmt: skip

        def tool_part(s: TaskStats) -> float:
            # Tools of one task at once: at least the largest single tool, at least what
            # its footprint held beyond the worker's own peak (concurrent tools).
            return max(s.tool_peak_max_bytes, s.footprint_max_bytes - s.overhead_peak_max_bytes)

        proc_task = max(stats.values(), key=lambda s: peak(s, s.overhead_peak_max_bytes))
        tool_task = max(stats.values(), key=lambda s: peak(s, tool_part(s)) if tool_part(s) else 0)
        foot_task = max(stats.values(), key=lambda s: peak(s, s.footprint_max_bytes))
        proc_peak = peak(proc_task, proc_task.overhead_peak_max_bytes)
        tools_peak = peak(tool_task, tool_part(tool_task)) if tool_part(tool_task) else 0.0
        foot = peak(foot_task, foot_task.footprint_max_bytes)
        limit_raw = max(proc_peak + n * tools_peak, foot)
        limit = limit_raw * lm
        reasoning.insert(1, (
            f"memory limit = max({mi(proc_peak)} [largest worker-process peak, "
            f"{proc_task.task}] + {n} x {mi(tools_peak)} [largest tools peak of one task, "
            f"{tool_task.task}], {mi(foot)} [largest footprint, {foot_task.task}]) x {lm:g} "
            f"= {mi(limit)}"
        ))  # fmt: skip
    else:
        heaviest = max(stats.values(), key=lambda s: s.typical_bytes(pct))
        peakiest = max(stats.values(), key=lambda s: peak(s, s.footprint_max_bytes))
        typical = heaviest.typical_bytes(pct)
        foot = peak(peakiest, peakiest.footprint_max_bytes)
        request = (n * typical + parent) * rm
        limit = (n * foot + parent) * lm
        if pool == "solo":
            reasoning.insert(0, (
                f"memory request = {mi(typical)} [{how} worker + tool RSS of {heaviest.task}; "
                f"solo pool: one task at a time in the worker's own process] x {rm:g} "
                f"= {mi(request)}"
            ))  # fmt: skip
            reasoning.insert(1, (
                f"memory limit = {mi(foot)} [largest footprint, {peakiest.task}] x {lm:g} "
                f"= {mi(limit)}"
            ))  # fmt: skip
        else:
            reasoning.insert(0, (
                f"memory request = ({n} x {mi(typical)} [{how} worker + tool RSS of "
                f"{heaviest.task}] + {mi(parent)} [parent]) x {rm:g} = {mi(request)}"
            ))  # fmt: skip
            reasoning.insert(1, (
                f"memory limit = ({n} x {mi(foot)} [largest footprint, {peakiest.task}] + "
                f"{mi(parent)} [parent]) x {lm:g} = {mi(limit)}"
            ))  # fmt: skip
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
            f"killed); each of the {n} task(s) running at once gets min(1, limit / {n}) cores"
        )
    else:
        notes.append(
            "no CPU limit: tasks may use idle CPU on the node (fastest wall time), at the "
            "risk of noisy neighbours; --cpu-limit CORES caps it, and each task's wall time "
            "then grows to at least its CPU seconds / min(1, limit / N)"
        )
    cores_each = min(1.0, (cpu_limit_mc or cpu_request_mc) / 1000 / n)
    max_per_child_kib: int | None = None
    if pool == "prefork":
        worst_peak = max(s.overhead_peak_max_bytes for s in stats.values())
        max_per_child_kib = math.ceil(worst_peak * lm / 1024)
        reasoning.append(
            f"--max-memory-per-child = largest worker-process peak {mi(worst_peak)} x "
            f"{lm:g} = {max_per_child_kib} KiB (Celery counts KiB)"
        )
    else:
        notes.append(
            f"{pool} pool: tasks run in the worker's main process, so there is no separate "
            "parent to add and no --max-memory-per-child (only prefork honours it)"
        )
    notes.extend(queue_wait_notes(stats))
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
                oom_kills=s.kills_by_cause.get("oom", 0)
                + s.kills_by_cause.get("unknown", 0)
                + s.tool_oom_kills,
                lost=s.runs_by_state.get("lost", 0),
                time_limit_kills=s.kills_by_cause.get("time_limit", 0),
                oom_bumped=bumped[s.task],
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


def queue_wait_notes(stats: Mapping[str, TaskStats]) -> list[str]:
    """One line per task type with stamped tasks: whether its queue wait says the pool
    is too small (more workers or concurrency, not more memory)."""
    from taskmeter.format import seconds_h

    out = []
    for s in stats.values():
        wait = s.queue_wait_mean_s
        if wait is None:
            continue
        if wait > max(s.wall_mean_s, QUEUE_WAIT_NOTICE_S):
            out.append(
                f"{s.task} waits {seconds_h(wait)} in the queue on average, longer than it "
                f"runs ({seconds_h(s.wall_mean_s)}; {s.queue_wait_runs} stamped tasks): the "
                "pool is too small for the load: add workers (replicas) or concurrency, not "
                "memory"
            )
        else:
            out.append(
                f"{s.task} waits {seconds_h(wait)} in the queue on average "
                f"({s.queue_wait_runs} stamped tasks): no sign of too few workers"
            )
    return out


def choose_pool(given: str | None, seen: Mapping[str | None, int], what: str) -> tuple[str, str]:
    """The sizing rules to use and a line saying why.

    ``given``: ``--pool`` (None: from the data); ``seen``: how many ``what`` (task
    records, workers) ran in each Celery pool (None: not recorded). Workers of
    different pools in one input cannot share one pod spec: refused unless ``given``.
    """
    models: dict[str, int] = {}
    for name, count in seen.items():
        if name:
            models[pool_model(name)] = models.get(pool_model(name), 0) + count
    if given is not None:
        others = sorted(set(models) - {given})
        if others:
            return given, (
                f"pool {given} (--pool); the data also has {', '.join(others)} {what}: "
                "only this pool's are used where the source tells them apart"
            )
        return given, f"pool {given} (--pool)"
    if len(models) > 1:
        mix = ", ".join(f"{m}: {n} {what}" for m, n in sorted(models.items()))
        raise SizingError(
            f"the data mixes workers of different pools ({mix}); each pool needs its own "
            "sizing (a solo or threads worker has no parent process and no "
            "--max-memory-per-child): give --pool POOL, or narrow the data to one Deployment "
            "(--task, --selector, or its own ledgers)"
        )
    if models:
        (model,) = models
        return model, f"pool {model}: the pool the workers ran with"
    return "prefork", "pool not recorded in the data: sized as prefork (--pool to set it)"
