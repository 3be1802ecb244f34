"""Synthetic taskmeter.task/1 records, fast: varied figures on a fixed template.

For tests of the readers (streaming, validation), where hundreds of thousands of
records are needed and measuring real tasks would take hours. Every record is what
``TaskReport.to_json()`` writes (``to_json`` round-trips it: see test_streaming).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from taskmeter.measure.report import iso_utc

MiB = 2**20
T0 = 1_780_000_000.0  # 2026-05-28, a fixed start

TASKS = ("vcf.subset", "vcf.query", "mem.hold", "shell.steps", "s3.fetch", "report.build")
HOSTS = ("worker-a", "worker-b", "worker-c")
CONCURRENCY = 4


def record(
    i: int,
    *,
    task: str = "vcf.subset",
    start: float = T0,
    wall: float = 1.0,
    host: str = "worker-a",
    worker_avg: int = 60 * MiB,
    worker_peak: int = 80 * MiB,
    tool_peak: int = 100 * MiB,
    tools: int = 1,
    state: str = "success",
    cause: str | None = None,
    queue_wait: float | None = None,
    pool: str | None = "prefork",
) -> dict[str, Any]:
    """One record as a dict (the JSON object a ledger line holds)."""
    tool_wall = wall * 0.6
    runs = []
    for k in range(tools):
        t_start = 0.1 * wall + k * tool_wall / max(tools, 1)
        t_wall = tool_wall / max(tools, 1)
        runs.append({
            "argv": ["bcftools", "view", f"in{i}.vcf.gz"], "exe": "bcftools", "pid": 1000 + i,
            "exit_code": 0, "signal": None, "start_s": t_start, "end_s": t_start + t_wall,
            "wall_s": t_wall, "cpu_s": t_wall * 0.9, "user_s": t_wall * 0.8,
            "sys_s": t_wall * 0.1, "rss_avg_bytes": tool_peak * 3 // 4,
            "rss_peak_bytes": tool_peak, "peak_method": "hwm", "samples": 10,
            "read_bytes": 4096, "write_bytes": 8192, "cause": None, "tracked": True,
        })  # fmt: skip
    tools_wall = tool_wall if tools else 0.0
    tools_cpu = sum(t["cpu_s"] for t in runs)
    return {
        "schema": "taskmeter.task/1", "task": task, "task_id": f"id-{i:07d}", "state": state,
        "started_at": iso_utc(start), "ended_at": iso_utc(start + wall), "wall_s": wall,
        "cpu_s": 0.1 * wall + tools_cpu,
        "overhead": {"wall_s": wall - tools_wall, "cpu_s": 0.1 * wall, "user_s": 0.08 * wall,
                     "sys_s": 0.02 * wall, "rss_avg_bytes": worker_avg,
                     "rss_peak_bytes": worker_peak, "peak_method": "hwm",
                     "cpu_method": "process"},
        "tools": runs,
        "tool_totals": {"runs": tools, "wall_s": tools_wall, "cpu_s": tools_cpu,
                        "rss_peak_bytes": tool_peak if tools else 0},
        "footprint_peak_bytes": worker_peak + (tool_peak if tools else 0),
        "phases": [{"name": "download", "wall_s": 0.05 * wall, "cpu_s": 0.01 * wall,
                    "rss_avg_bytes": worker_avg, "rss_peak_bytes": worker_peak}],
        "unattributed_child_cpu_s": 0.0,
        "worker": {"hostname": host, "pid": 4000 + i % 7, "pool": pool},
        "sampler": {"interval_s": 0.05}, "cause": cause, "queue_wait_s": queue_wait,
    }  # fmt: skip


def fleet(n: int, seed: int = 7) -> Iterator[dict[str, Any]]:
    """``n`` records of several task types from ``HOSTS``, each running
    ``CONCURRENCY`` task slots back to back, in the order the tasks ended (as a shared
    ledger has them). Figures vary per task type and per task."""
    rng = random.Random(seed)
    slots = {(h, s): T0 for h in HOSTS for s in range(CONCURRENCY)}
    pending: list[tuple[float, int, dict[str, Any]]] = []
    for i in range(n):
        host, slot = min(slots, key=lambda k: slots[k])
        start = slots[host, slot] + rng.uniform(0.0, 0.2)
        kind = i % len(TASKS)
        task = TASKS[kind]
        wall = rng.uniform(0.2, 3.0) * (1 + kind)
        base = (40 + 10 * kind) * MiB
        rec = record(
            i, task=task, start=start, wall=wall, host=host,
            worker_avg=base + rng.randrange(0, 20 * MiB),
            worker_peak=base + rng.randrange(20 * MiB, 60 * MiB),
            tool_peak=rng.randrange(10 * MiB, 200 * MiB) * (1 + kind % 3),
            tools=kind % 3, state="success" if rng.random() > 0.02 else "failure",
            queue_wait=rng.uniform(0, 5) if kind % 2 else None,
        )  # fmt: skip
        slots[host, slot] = start + wall
        pending.append((start + wall, i, rec))
        if len(pending) > 64:
            pending.sort(key=lambda p: (p[0], p[1]))
            for _, _, r in pending[:32]:
                yield r
            del pending[:32]
    pending.sort(key=lambda p: (p[0], p[1]))
    for _, _, r in pending:
        yield r


def line(rec: dict[str, Any]) -> str:
    return json.dumps(rec, separators=(",", ":"))


@dataclass
class Truth:
    """What a generated ledger holds, per task type, computed as it is written."""

    runs: dict[str, int] = field(default_factory=dict)
    footprint_max: dict[str, int] = field(default_factory=dict)
    worker_peak_max: dict[str, int] = field(default_factory=dict)
    wall_sum: dict[str, float] = field(default_factory=dict)
    intervals: dict[str, list[tuple[float, float]]] = field(default_factory=dict)

    def concurrency(self) -> int:
        """The most tasks running at once on one host ([start, end), a sweep)."""
        best = 0
        for spans in self.intervals.values():
            events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
            running = 0
            for _, delta in events:
                running += delta
                best = max(best, running)
        return best


# One record with one tool, as to_json writes it, with the varied figures as fields.
_TEMPLATE = (
    '{{"schema":"taskmeter.task/1","task":"{task}","task_id":"id-{i:07d}","state":"{state}",'
    '"started_at":"{started}","ended_at":"{ended}","wall_s":{wall!r},"cpu_s":{cpu!r},'
    '"overhead":{{"wall_s":{ow!r},"cpu_s":{ocpu!r},"user_s":{ocpu!r},"sys_s":0.0,'
    '"rss_avg_bytes":{avg},"rss_peak_bytes":{peak},"peak_method":"hwm","cpu_method":"process"}},'
    '"tools":[{{"argv":["bcftools","view","in{i}.vcf.gz"],"exe":"bcftools","pid":{pid},'
    '"exit_code":0,"signal":null,"start_s":{ts!r},"end_s":{te!r},"wall_s":{tw!r},"cpu_s":{tcpu!r},'
    '"user_s":{tcpu!r},"sys_s":0.0,"rss_avg_bytes":{tavg},"rss_peak_bytes":{tpeak},'
    '"peak_method":"hwm","samples":12,"read_bytes":4096,"write_bytes":8192,"cause":null,'
    '"tracked":true}}],"tool_totals":{{"runs":1,"wall_s":{tw!r},"cpu_s":{tcpu!r},'
    '"rss_peak_bytes":{tpeak}}},"footprint_peak_bytes":{foot},"phases":[],'
    '"unattributed_child_cpu_s":0.0,"worker":{{"hostname":"{host}","pid":{wpid},'
    '"pool":"prefork"}},"sampler":{{"interval_s":0.05}},"cause":null,"queue_wait_s":null}}\n'
)


def write_fleet_ledger(path: str | os.PathLike[str], n: int, seed: int = 3) -> Truth:
    """``n`` one-tool records from ``HOSTS`` x ``CONCURRENCY`` slots, each host giving
    the next task to its slot free first (as a prefork pool does), written in the order
    tasks start (a ledger has them in the order they end: a few seconds apart here), fast
    (a format string, no json.dumps). Returns the truth per task type."""
    rng = random.Random(seed)
    truth = Truth()
    slots = [[T0 + 0.01 * k] * CONCURRENCY for k in range(len(HOSTS))]
    with open(path, "w") as f:
        for i in range(n):
            h = i % len(HOSTS)
            s = min(range(CONCURRENCY), key=slots[h].__getitem__)  # the slot free first
            kind = rng.randrange(len(TASKS))
            task = TASKS[kind]
            start = slots[h][s] + rng.uniform(0.0, 0.05)
            wall = round(rng.uniform(0.5, 1.5) * (1 + kind), 6)
            end = start + wall
            slots[h][s] = end
            avg = (40 + 10 * kind) * MiB + rng.randrange(0, 20 * MiB)
            peak = avg + rng.randrange(0, 40 * MiB)
            tpeak = rng.randrange(10 * MiB, 300 * MiB)
            foot = peak + tpeak
            tw = round(wall * 0.6, 6)
            f.write(_TEMPLATE.format(
                task=task, i=i, state="success", started=iso_utc(start), ended=iso_utc(end),
                wall=wall, cpu=round(wall * 0.1 + tw * 0.9, 6), ow=round(wall - tw, 6),
                ocpu=round(wall * 0.1, 6), avg=avg, peak=peak, pid=1000 + i % 30000,
                ts=round(wall * 0.2, 6), te=round(wall * 0.2 + tw, 6), tw=tw,
                tcpu=round(tw * 0.9, 6), tavg=tpeak * 3 // 4, tpeak=tpeak, foot=foot,
                host=HOSTS[h], wpid=4000 + s,
            ))  # fmt: skip
            truth.runs[task] = truth.runs.get(task, 0) + 1
            truth.footprint_max[task] = max(truth.footprint_max.get(task, 0), foot)
            truth.worker_peak_max[task] = max(truth.worker_peak_max.get(task, 0), peak)
            truth.wall_sum[task] = truth.wall_sum.get(task, 0.0) + wall
            truth.intervals.setdefault(HOSTS[h], []).append(
                (datetime.fromisoformat(iso_utc(start)).timestamp(),
                 datetime.fromisoformat(iso_utc(end)).timestamp())
            )  # fmt: skip
    return truth
