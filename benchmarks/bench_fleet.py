"""Fleet sizing from Prometheus: recommend's cost against the size of the fleet and window.

A synthetic fleet (W workers x T task types, D days, one scrape every S seconds) is
simulated task by task; every scrape is written exactly as a worker exposes it (the
families of export/metrics.py: zero series at start, histograms and first-use counters
from their first observation, the tool component only for tasks that run tools, the
process and taskmeter_worker_info series) and backfilled into a real Prometheus with
``promtool tsdb create-blocks-from openmetrics`` (one input file per 2-hour block, so
promtool reads each sample once). Then ``taskmeter recommend --prometheus`` runs in a
child process: its wall time and peak RSS (VmHWM) against series x samples.

    .venv/bin/python benchmarks/bench_fleet.py                # three sizes, a table
    .venv/bin/python benchmarks/bench_fleet.py --size 2x5x1   # workers x types x days

The same simulation gives the TaskReports of the fleet (its ledger):
tests/test_sizing_prometheus.py checks at a small size that the figures Prometheus
computes equal the ledger's (quantiles within a bucket).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.utils import floatToGoString

from taskmeter.demo.services import free_port, http_get
from taskmeter.measure.report import (
    PhaseStats,
    ProcessStats,
    SamplerInfo,
    TaskReport,
    ToolRun,
    ToolTotals,
    WorkerInfo,
    iso_utc,
)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import machine, table  # noqa: E402

MiB = 2**20
BLOCK_S = 7200  # promtool's block range: 2 hours, aligned to the epoch
# The buckets of export/metrics.py (the contract's): seconds and bytes.
WALL_BUCKETS = (0.05, 0.25, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0)
QUEUE_BUCKETS = (0.1, 0.5, 2.0, 10.0, 30.0, 120.0, 600.0, 1800.0, 7200.0)
MEMORY_BUCKETS = tuple(
    float(b) for b in (16 * MiB, 64 * MiB, 256 * MiB, 2**30, 4 * 2**30, 16 * 2**30, 64 * 2**30)
)
PHASES = ("fetch", "compute", "store")


def _le(bound: float) -> str:
    """The "le" label as prometheus_client writes it (Go's float formatting)."""
    return str(floatToGoString(bound))


@dataclass(frozen=True)
class Fleet:
    workers: int
    types: int
    days: float
    interval_s: int = 60
    end: int = 0  # epoch seconds (a multiple of interval_s); 0: now
    pool: str = "prefork"
    concurrency: int = 4
    seed: int = 7

    def __post_init__(self) -> None:
        if not self.end:
            now = int(time.time())
            object.__setattr__(self, "end", now - now % self.interval_s)

    @property
    def scrapes(self) -> int:
        return round(self.days * 86400 / self.interval_s)

    @property
    def start(self) -> int:
        return self.end - self.scrapes * self.interval_s

    def task(self, j: int) -> str:
        return f"fleet.t{j:02d}"

    @property
    def label(self) -> str:
        return f"{self.workers}x{self.types}x{self.days:g}d@{self.interval_s}s"


@dataclass
class _Hist:
    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def observe(self, value: float) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)
        i = 0
        while i < len(self.bounds) and value > self.bounds[i]:
            i += 1
        self.counts[i] += 1
        self.total += value
        self.n += 1


class _Worker:
    """What one worker's metrics hold for one task type (TaskMetrics.observe)."""

    def __init__(self, task: str) -> None:
        self.task = task
        self.runs = {"success": 0, "failure": 0}  # the zero series
        self.kills: dict[str, int] = {}
        self.cpu = {"overhead": 0.0, "tool": 0.0}
        self.cwall = {"overhead": 0.0, "tool": 0.0}
        self.wall = _Hist(WALL_BUCKETS)
        self.queue = _Hist(QUEUE_BUCKETS)
        self.peak: dict[str, _Hist] = {}
        self.avg: dict[str, list[float]] = {}  # component -> [sum, count]
        self.peak_max: dict[str, float] = {}
        self.footprint = _Hist(MEMORY_BUCKETS)
        self.footprint_max = 0.0
        self.tool_runs: dict[tuple[str, str], int] = {}
        self.phases: dict[str, float] = {}
        self.inflight = 0
        self.inflight_rss = {"overhead": 0.0, "tool": 0.0}

    def observe(self, r: TaskReport) -> None:
        self.runs[r.state] = self.runs.get(r.state, 0) + 1
        cause = r.cause or ("unknown" if r.state in ("killed", "lost") else None)
        if cause is not None:
            self.kills[cause] = self.kills.get(cause, 0) + 1
        self.wall.observe(r.wall_s)
        if r.queue_wait_s is not None:
            self.queue.observe(max(0.0, r.queue_wait_s))
        self.cpu["overhead"] += r.overhead.cpu_s
        self.cpu["tool"] += r.tool_totals.cpu_s
        self.cwall["overhead"] += r.overhead.wall_s
        self.cwall["tool"] += r.tool_totals.wall_s
        values = {"overhead": (float(r.overhead.rss_avg_bytes), float(r.overhead.rss_peak_bytes))}
        tool_avg = r.tool_avg_rss_bytes
        if tool_avg is not None:
            values["tool"] = (tool_avg, float(r.tool_totals.rss_peak_bytes))
        for component, (avg, peak) in values.items():
            s = self.avg.setdefault(component, [0.0, 0])
            s[0] += avg
            s[1] += 1
            self.peak.setdefault(component, _Hist(MEMORY_BUCKETS)).observe(peak)
            self.peak_max[component] = max(self.peak_max.get(component, 0.0), peak)
        self.footprint.observe(float(r.footprint_peak_bytes))
        self.footprint_max = max(self.footprint_max, float(r.footprint_peak_bytes))
        for t in r.tools:
            key = (os.path.basename(t.exe), t.outcome)
            self.tool_runs[key] = self.tool_runs.get(key, 0) + 1
        for p in r.phases:
            self.phases[p.name] = self.phases.get(p.name, 0.0) + p.wall_s

    def samples(self) -> Iterator[tuple[str, float]]:
        """(series, value) as a scrape shows them now."""
        t = f'task="{self.task}"'
        for state, n in self.runs.items():
            yield f'celery_task_runs_total{{{t},state="{state}"}}', n
        for cause, n in self.kills.items():
            yield f'celery_task_kills_total{{{t},cause="{cause}"}}', n
        yield from _hist("celery_task_wall_seconds", t, self.wall)
        yield from _hist("celery_task_queue_wait_seconds", t, self.queue)
        for component, h in self.peak.items():
            yield from _hist("celery_task_memory_peak_bytes", f'{t},component="{component}"', h)
        yield from _hist("celery_task_footprint_peak_bytes", t, self.footprint)
        for component, (total, n) in self.avg.items():
            labels = f'{t},component="{component}"'
            yield f"celery_task_memory_avg_bytes_sum{{{labels}}}", total
            yield f"celery_task_memory_avg_bytes_count{{{labels}}}", n
        for component, value in self.peak_max.items():
            yield f'celery_task_memory_peak_bytes_max{{{t},component="{component}"}}', value
        if self.footprint.n:
            yield f"celery_task_footprint_peak_bytes_max{{{t}}}", self.footprint_max
        for component in ("overhead", "tool"):
            c = f'{t},component="{component}"'
            yield f"celery_task_cpu_seconds_total{{{c}}}", self.cpu[component]
            yield f"celery_task_component_wall_seconds_total{{{c}}}", self.cwall[component]
            yield f"celery_task_inflight_rss_bytes{{{c}}}", self.inflight_rss[component]
        for (tool, outcome), n in self.tool_runs.items():
            yield f'celery_task_tool_runs_total{{{t},tool="{tool}",outcome="{outcome}"}}', n
        for phase, total in self.phases.items():
            yield f'celery_task_phase_wall_seconds_total{{{t},phase="{phase}"}}', total
        yield f"celery_task_inflight{{{t}}}", self.inflight


@functools.cache
def _hist_names(name: str, labels: str, bounds: tuple[float, ...]) -> tuple[str, ...]:
    buckets = [f'{name}_bucket{{{labels},le="{_le(b)}"}}' for b in (*bounds, float("inf"))]
    return (*buckets, f"{name}_sum{{{labels}}}", f"{name}_count{{{labels}}}")


def _hist(name: str, labels: str, h: _Hist) -> Iterator[tuple[str, float]]:
    if not h.n:
        return  # created at the first observation
    names = _hist_names(name, labels, h.bounds)
    running = 0
    for bucket, count in zip(names, h.counts, strict=False):
        running += count
        yield bucket, running
    yield names[-2], h.total
    yield names[-1], h.n


def _task_report(
    fleet: Fleet, w: int, j: int, k: int, end: float, rng: random.Random
) -> TaskReport:
    """Task k of type j on worker w, ending at ``end``: figures drawn from rng, with
    failures, OOM kills, lost tasks and time-limit kills at fixed places."""
    has_tool = j % 2 == 0
    state, cause = "success", None
    if k % 17 == 5:
        state = "failure"
    if j % 5 == 1 and k % 40 == 20:
        state, cause = "killed", "oom"
    elif j % 7 == 2 and k % 60 == 30:
        state, cause = "lost", "unknown"
    elif j % 6 == 3 and k % 50 == 7:
        state, cause = "killed", "time_limit"
    r = rng.random
    wall = (0.2 + 0.7 * j) * (0.5 + r())
    tool_wall = wall * (0.4 + 0.4 * r()) if has_tool else 0.0
    over_wall = wall - tool_wall
    over_avg = int((40 + 3 * j) * MiB * (0.8 + 0.4 * r()))
    over_peak = int(over_avg * (1.05 + 0.5 * r()))
    tool_avg = int((10 + 12 * j) * MiB * (0.7 + 0.6 * r()))
    tool_peak = int(tool_avg * (1.1 + 0.8 * r()))
    if cause == "oom":
        tool_peak *= 3
    footprint = over_peak + (int(tool_peak * (0.8 + 0.2 * r())) if has_tool else 0)
    start = end - wall
    tools: tuple[ToolRun, ...] = ()
    if has_tool:
        tools = (
            ToolRun(
                argv=("bcftools", "view"), exe="/usr/bin/bcftools", pid=1000 + k, exit_code=(
                    None if cause == "oom" else 1 if state == "failure" else 0
                ), signal=9 if cause == "oom" else None, start_s=over_wall / 2,
                end_s=over_wall / 2 + tool_wall, wall_s=tool_wall, cpu_s=tool_wall * 0.9,
                user_s=tool_wall * 0.8, sys_s=tool_wall * 0.1, rss_avg_bytes=tool_avg,
                rss_peak_bytes=tool_peak, peak_method="hwm", samples=10, read_bytes=0,
                write_bytes=0, cause="oom" if cause == "oom" else None,
            ),
        )  # fmt: skip
    phases = tuple(
        PhaseStats(
            name=p,
            wall_s=over_wall / 3,
            cpu_s=over_wall / 10,
            rss_avg_bytes=over_avg,
            rss_peak_bytes=over_peak,
        )
        for p in PHASES
    )
    return TaskReport(
        task=fleet.task(j),
        task_id=f"{w}-{j}-{k}",
        state=state,  # type: ignore[arg-type]
        started_at=iso_utc(start),
        ended_at=iso_utc(end),
        wall_s=wall,
        cpu_s=over_wall * 0.3 + tool_wall * 0.9,
        overhead=ProcessStats(
            wall_s=over_wall,
            cpu_s=over_wall * 0.3,
            user_s=over_wall * 0.25,
            sys_s=over_wall * 0.05,
            rss_avg_bytes=over_avg,
            rss_peak_bytes=over_peak,
            peak_method="hwm",
        ),
        tools=tools,
        tool_totals=ToolTotals.of(tools),
        footprint_peak_bytes=footprint,
        phases=phases,
        unattributed_child_cpu_s=0.0,
        worker=WorkerInfo(hostname=f"worker-{w}", pid=100 + w, pool=fleet.pool),
        sampler=SamplerInfo(interval_s=0.1),
        cause=cause,  # type: ignore[arg-type]
        queue_wait_s=r() * 20,
    )


def simulate(fleet: Fleet, out_dir: Path, ledger: list[TaskReport] | None = None) -> dict[str, int]:
    """Write the fleet's scrapes as OpenMetrics text, one file per 2-hour block, into
    ``out_dir``; append every TaskReport to ``ledger`` when given. Returns counts."""
    out_dir.mkdir(parents=True, exist_ok=True)
    times = [fleet.start + i * fleet.interval_s for i in range(fleet.scrapes + 1)]
    n = len(times)
    bounds = [0] + [i for i in range(1, n) if times[i] // BLOCK_S != times[i - 1] // BLOCK_S]
    blocks = list(zip(bounds, [*bounds[1:], n], strict=True))
    files = [open(out_dir / f"block-{b:04d}.om", "w") for b in range(len(blocks))]  # noqa: SIM115
    tails = [f" {t}\n" for t in times]
    counts = {"series": 0, "samples": 0, "tasks": 0}

    def write(columns: dict[str, list[tuple[int, float]]]) -> None:
        """Each series from its change points [(scrape index, value)], to the end."""
        for name, points in columns.items():
            born = points[0][0]
            lines: list[str] = [""] * born
            for (a, value), (b, _) in zip(points, [*points[1:], (n, 0.0)], strict=True):
                lines.extend([f"{name} {value}"] * (b - a))
            counts["series"] += 1
            counts["samples"] += n - born
            for f, (lo, hi) in zip(files, blocks, strict=True):
                lo = max(lo, born)
                if lo < hi:
                    f.write("".join(map(str.__add__, lines[lo:hi], tails[lo:hi])))

    for w in range(fleet.workers):
        instance = f'job="celery",instance="worker-{w}:9808"'
        info = f'pool="{fleet.pool}",concurrency="{fleet.concurrency}"'
        write({
            f"process_resident_memory_bytes{{{instance}}}": [
                (i, float(110 * MiB + (i * 7919 % 13) * MiB)) for i in range(0, n, 7)
            ],
            f"process_start_time_seconds{{{instance}}}": [(0, float(fleet.start - 5))],
            f"taskmeter_worker_info{{{instance},{info}}}": [(0, 1.0)],
        })  # fmt: skip
        for j in range(fleet.types):
            rng = random.Random(fleet.seed * 1_000_003 + w * 1009 + j)
            state = _Worker(fleet.task(j))
            period = 1 + j % 4  # scrapes between two tasks of this type on this worker
            columns: dict[str, list[tuple[int, float]]] = {}

            def snapshot(
                i: int,
                state: _Worker = state,
                columns: dict[str, list[tuple[int, float]]] = columns,
            ) -> None:
                for name, value in state.samples():
                    points = columns.get(name)
                    if points is None:
                        # the instance labels, added as Prometheus does at scrape time
                        columns[name] = [(i, value)]
                    elif points[-1][1] != value:
                        points.append((i, value))

            snapshot(0)
            k = 0
            for i in range(1, n):
                if (i + w) % period == 0:
                    end = times[i] - fleet.interval_s * rng.random() * 0.9
                    report = _task_report(fleet, w, j, k, end, rng)
                    state.observe(report)
                    if ledger is not None:
                        ledger.append(report)
                    k += 1
                    state.inflight = k % 2
                    state.inflight_rss["overhead"] = float(state.inflight * (40 + 3 * j) * MiB)
                    snapshot(i)
            counts["tasks"] += k
            write({nm.replace("{", "{" + instance + ",", 1): pts for nm, pts in columns.items()})
    for f in files:
        f.write("# EOF\n")
        f.close()
    return counts


def backfill(om_dir: Path, tsdb: Path, jobs: int = 2) -> float:
    """promtool tsdb create-blocks-from openmetrics, each block file, ``jobs`` at once."""
    promtool = shutil.which("promtool")
    if promtool is None:
        raise RuntimeError("promtool is not installed (Debian package 'prometheus')")
    tsdb.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()

    def one(path: Path) -> None:
        subprocess.run([promtool, "tsdb", "create-blocks-from", "openmetrics", "-q", str(path),
                        str(tsdb)], check=True, capture_output=True)  # fmt: skip
        path.unlink()

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(one, sorted(om_dir.glob("block-*.om"))))
    return time.monotonic() - t0


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_prometheus(tsdb: Path, log: Path, *args: str) -> Server:
    """A real Prometheus serving the backfilled blocks (no scrape; no compaction, so the
    blocks stay as promtool wrote them while we measure)."""
    exe = shutil.which("prometheus")
    if exe is None:
        raise RuntimeError("prometheus is not installed (Debian package 'prometheus')")
    cfg = tsdb.parent / "prometheus.yml"
    cfg.write_text("global:\n  scrape_interval: 1m\n")
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [exe, f"--config.file={cfg}", f"--storage.tsdb.path={tsdb}",
             "--storage.tsdb.retention.time=60d", "--storage.tsdb.min-block-duration=2h",
             "--storage.tsdb.max-block-duration=2h", f"--web.listen-address=127.0.0.1:{port}",
             *args],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    server = Server(proc, f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prometheus exited: {log.read_text()[-2000:]}")
        try:
            if "Ready" in http_get(f"{server.url}/-/ready", timeout=1):
                return server
        except OSError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"prometheus not ready after 60 s: {log.read_text()[-2000:]}")


def query(url: str, promql: str, at: float) -> list[dict[str, object]]:
    q = urllib.parse.urlencode({"query": promql, "time": f"{at:.3f}"})
    body = json.loads(http_get(f"{url}/api/v1/query?{q}", timeout=60))
    return list(body["data"]["result"])


def recommend_cost(url: str, since_s: float, *args: str) -> tuple[float, float, dict[str, object]]:
    """Run `taskmeter recommend --prometheus` in a child: (wall s, peak RSS MiB, JSON)."""
    # The child's own peak: VmHWM of its address space. (Its ru_maxrss would also count
    # this benchmark's RSS: Linux carries the forking process's high-water mark over exec.)
    code = (
        "import sys, time\n"
        "from taskmeter.cli import main\n"
        "t0 = time.monotonic()\n"
        "try:\n"
        "    main(sys.argv[1:], standalone_mode=False)\n"
        "finally:\n"
        "    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
        "    sys.stderr.write(f'\\nCOST {time.monotonic() - t0} {hwm}\\n')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, "recommend", "--prometheus", url, "--since", f"{since_s:.0f}s",
         "--prometheus-method", "server", "--format", "json", *args],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"recommend failed: {out.stderr[-3000:]}")
    cost = [line for line in out.stderr.splitlines() if line.startswith("COST ")][-1].split()
    return float(cost[1]), int(cost[2]) / 1024, json.loads(out.stdout)


def run(fleet: Fleet, work: Path, compare: bool = False) -> dict[str, object]:
    """Build, backfill, serve and size one fleet. ``compare``: also size from the same
    fleet's ledger and say whether the pods agree (limits exactly, requests within
    increase()'s bound: docs/sizing.md)."""
    t0 = time.monotonic()
    ledger: list[TaskReport] | None = [] if compare else None
    counts = simulate(fleet, work / "om", ledger)
    generated = time.monotonic() - t0
    loaded = backfill(work / "om", work / "tsdb")
    server = start_prometheus(work / "tsdb", work / "prometheus.log")
    try:
        since = time.time() - fleet.start + 10 * fleet.interval_s
        wall, rss, rec = recommend_cost(server.url, since, "--min-tasks", "1")
    finally:
        server.stop()
    same = "-"
    if ledger is not None:
        path = work / "ledger.jsonl"
        path.write_text("".join(r.to_json() + "\n" for r in ledger))
        out = subprocess.run(
            [sys.executable, "-m", "taskmeter.cli", "recommend", "--ledger", str(path),
             "--min-tasks", "1", "--concurrency", str(fleet.concurrency), "--format", "json",
             "--parent-memory", f"{rec['options']['parent_bytes']}"],  # type: ignore[index]
            capture_output=True, text=True, timeout=600, check=True,
        )  # fmt: skip
        led = json.loads(out.stdout)
        bound = fleet.interval_s / (fleet.end - fleet.start)
        request = float(rec["memory_request_bytes"])  # type: ignore[arg-type]
        same = "yes" if (
            rec["memory_limit_bytes"] == led["memory_limit_bytes"]
            and rec["max_memory_per_child_kib"] == led["max_memory_per_child_kib"]
            and abs(request / led["memory_request_bytes"] - 1) <= bound
        ) else "NO"  # fmt: skip
    return {"fleet": fleet.label, **counts, "generate_s": generated, "backfill_s": loaded,
            "recommend_s": wall, "rss_mib": rss, "resources": rec["resources"],
            "same_as_ledger": same}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", action="append", default=[],
                        help="WORKERSxTYPESxDAYS (e.g. 5x20x3); repeatable")  # fmt: skip
    parser.add_argument("--interval", type=int, default=60, help="scrape interval (s)")
    args = parser.parse_args()
    sizes = args.size or ["2x5x1", "5x20x3", "20x30x1"]
    print(machine())
    rows = []
    for size in sizes:
        w, t, d = size.split("x")
        fleet = Fleet(int(w), int(t), float(d), args.interval)
        with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
            result = run(fleet, Path(tmp), compare=fleet.workers * fleet.types * fleet.days <= 10)
        print(json.dumps(result), flush=True)
        rows.append([
            result["fleet"], f"{result['series']:,}", f"{result['samples']:,}",
            f"{result['tasks']:,}", f"{result['generate_s']:.0f}", f"{result['backfill_s']:.0f}",
            f"{result['recommend_s']:.2f}", f"{result['rss_mib']:.0f}", result["same_as_ledger"],
        ])  # fmt: skip
    print(table(["fleet (workers x types x window @ scrape)", "series", "samples", "tasks",
                 "generate s", "backfill s", "recommend wall s", "recommend peak RSS MiB",
                 "= ledger"],
                rows))  # fmt: skip


if __name__ == "__main__":
    main()
