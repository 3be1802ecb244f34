"""A real Celery worker with and without taskmeter: CPU per task, throughput, and /metrics
scrape latency.

    .venv/bin/python benchmarks/bench_worker.py --skip-scrape   # (a) only, about 2 minutes
    .venv/bin/python benchmarks/bench_worker.py --quick         # under a minute
    .venv/bin/python benchmarks/bench_worker.py --skip-scrape --baseline /tmp/old/src
        # a third worker runs taskmeter from another source tree (before/after in one run)
    .venv/bin/python benchmarks/bench_worker.py --skip-scrape --events
        # a fourth worker: taskmeter off, Celery's task events (-E) on, for comparison
    .venv/bin/python benchmarks/bench_worker.py --skip-scrape --floor
        # two more workers: taskmeter's main process, pool processes that make only the
        # system calls of a measurement and send one record, or none (floor_worker.py)
    .venv/bin/python benchmarks/bench_worker.py --skip-scrape --floor --pace 100
        # tasks sent at 100 a second, not a batch at once: a worker that is not saturated

Needs Redis on 127.0.0.1:6379 (``scripts/services.sh`` starts it); uses database 13.
Prints markdown tables to stdout.

(a) Throughput. Two real ``celery -A tmapp worker -P prefork -c 2`` processes (the
    tests' app, ``tests/apps/tmapp.py``) run side by side for the whole benchmark, each
    on its own queue: one with taskmeter on (``ENABLE_WORKER_METRICS=1``, metrics
    endpoint and ledger on), one with it off (``ENABLE_WORKER_METRICS=0``: the same
    app calls ``taskmeter.celery.instrument``, but the bootstep connects nothing). Each
    round sends a batch of N ``noop`` tasks and of N ``cpu.burn(0.01)`` tasks (10 ms of
    CPU each) to each worker in turn, the order alternating between rounds (on, off,
    then off, on), and only one worker has work at any time. A batch is timed from its
    first send to the ``date_done`` of its last result: the workers store results in
    a Redis backend, the client reads the result keys straight from Redis (no
    per-task ``AsyncResult.get``: the client stays light, and no result can be missed
    or counted twice) and checks that every task succeeded. Reported: tasks/s per
    variant (median of rounds) and the on/off ratio of each round (median, range).
    The worker's log level is Celery's default (WARNING), so no per-task log lines.
    With ``--pace N`` the tasks of a batch are sent N a second on a fixed schedule
    instead of all at once: a worker that keeps up, as most do, where every task has
    Celery's loop wake up for it with taskmeter on or off (saturated, a slower pool
    process also makes that loop handle fewer results per wake-up, which bills Celery's
    own work to whatever slows the pool); tasks/s is then the pace.
    Where the time goes: the CPU of each worker's main process and of its pool
    processes over each batch, per task, from the kernel's CPU clock of each process
    (ns, every thread; not utime+stime, which count 10 ms ticks), plus cutime+cstime
    from /proc/PID/stat so a pool process or tool reaped during the batch still
    counts: the headline figure is their sum, on minus off, as a share of off.
    After each batch on the instrumented worker the benchmark also waits for its
    ledger to hold one line per task, so no bookkeeping spills into the next batch;
    at the end the endpoint's ``celery_task_runs_total`` and the ledger are checked
    against the tasks sent. ``--floor`` adds two workers run through
    ``floor_worker.py``, taskmeter's main process unchanged: "floor", whose pool
    processes make only the system calls of a measurement and send one prebuilt record
    per task, the least any design that measures every task this way can cost; and
    "floor0", whose pool processes make the system calls and send nothing, the least
    any design can cost that reads the kernel's counters per task.
(b) Scrape latency. A :class:`TaskMetrics` in this process is fed ~10 reports for each
    of K task names (a real report from ``taskmeter.measure`` around
    ``taskmeter.run(["true"])``, its task renamed with ``dataclasses.replace``) and
    served by ``taskmeter.export.server.start_server`` on 127.0.0.1 (port 0). ``curl``
    (a separate process, like Prometheus; ``urllib`` if curl is missing) GETs
    ``/metrics``, plain and with ``Accept-Encoding: gzip``, alternately. Reported:
    median and p95 of the request time, the response size, and the time the collector
    holds its lock while building the families (``observe`` from the worker's
    listener thread waits that long).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import taskmeter
from _common import machine, median, percentile, table
from taskmeter.demo.services import free_port

REPO = Path(__file__).resolve().parent.parent
APPS = REPO / "tests" / "apps"
REDIS_URL = "redis://127.0.0.1:6379/13"
CONCURRENCY = 2
RESULT_KEY = "celery-task-meta-{}"


@dataclass(frozen=True)
class Settings:
    rounds: int
    noop_n: int  # tasks per noop batch
    burn_n: int  # tasks per cpu.burn batch
    burn_s: float  # CPU seconds per cpu.burn task
    scrape_names: tuple[int, ...]  # task names in the collector, one table row each
    reports_per_name: int
    scrape_gets: int  # GETs per encoding (fewer for the largest collectors, see gets_for)
    pace: float = 0.0  # tasks sent per second (0: a batch's tasks all at once)


FULL = Settings(9, 500, 300, 0.01, (1, 200, 500), 10, 40)
QUICK = Settings(3, 200, 100, 0.01, (1, 200), 10, 8)


def gets_for(s: Settings, names: int) -> int:
    """A 500-name scrape takes over a second: keep the full run under ~5 minutes."""
    return s.scrape_gets if names <= 200 else max(5, s.scrape_gets * 3 // 8)


# -- the workers -----------------------------------------------------------------------
def redis_client() -> Any:
    import redis

    return redis.Redis.from_url(REDIS_URL)


class LedgerTail:
    """Counts the lines of a growing ledger file without rereading it."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.lines = path, 0, 0

    def count(self) -> int:
        with contextlib.suppress(FileNotFoundError), open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
            self.offset += len(data)
            self.lines += data.count(b"\n")
        return self.lines


_HZ = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> tuple[float, float]:
    """(its own CPU, cutime+cstime) of a process in seconds; zeros once it is gone.

    Its own CPU comes from the kernel's CPU clock of the process (``clock_gettime``
    on the clock id Linux derives from a pid: every thread, exited ones included, in
    ns), not from utime+stime, which count in ticks of 1/CLK_TCK s: 10 ms per batch
    and process, 33 µs per task in a batch of 300. Its reaped children's CPU
    (cutime+cstime) exists only in ticks."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return 0.0, 0.0
    fields = data[data.rindex(b")") + 2 :].split()
    try:
        own = time.clock_gettime_ns(((~pid) << 3) | 2) / 1e9  # CPUCLOCK_SCHED of pid
    except OSError:  # gone meanwhile, or no such clock: the ticks
        own = (int(fields[11]) + int(fields[12])) / _HZ
    return own, (int(fields[13]) + int(fields[14])) / _HZ


def descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/children", "rb") as f:
                    kids = [int(c) for c in f.read().split()]
            except OSError:
                continue
            out.extend(kids)
            todo.extend(kids)
    return out


# Variants: taskmeter on (this tree), off, on from a baseline source tree, and off with
# Celery's task events (-E), which Flower and the common Celery exporters need.
VARIANTS = ("off", "on", "base", "events")


@dataclass
class Worker:
    label: str  # one of VARIANTS
    proc: subprocess.Popen[bytes]
    queue: str
    log: Path
    port: int | None
    ledger: LedgerTail | None
    sent: dict[str, int] = field(default_factory=dict)  # task name -> tasks sent

    def alive(self) -> None:
        if self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"worker {self.label} exited ({self.proc.returncode}):\n{tail}")

    def cpu_s(self) -> tuple[float, float]:
        """CPU seconds so far of (the main process, its pool processes), from /proc:
        utime+stime of the main process, cutime+cstime (its reaped children: recycled
        pool processes) counted with the pool; each live descendant's
        utime+stime+cutime+cstime (its reaped tools)."""
        main, reaped = proc_cpu(self.proc.pid)
        pool = reaped
        for pid in descendants(self.proc.pid):
            own, gone = proc_cpu(pid)
            pool += own + gone
        return main, pool

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # warm shutdown
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_worker(tmp: Path, label: str, enabled: bool, src: Path | None = None) -> Worker:
    wdir = tmp / label
    wdir.mkdir()
    queue = f"tm-bench-{label}-{uuid.uuid4().hex[:10]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TASKMETER_", "ENABLE_"))}
    env.update(
        TM_BROKER=REDIS_URL,
        TM_BACKEND=REDIS_URL,
        TM_QUEUE=queue,
        TM_INSTRUMENT="1",
        PYTHONPATH=os.pathsep.join(
            p for p in (str(src or ""), str(APPS), env.get("PYTHONPATH", "")) if p
        ),
        ENABLE_WORKER_METRICS="1" if enabled else "0",
    )
    port = ledger = None
    if enabled:
        port = free_port()
        ledger = wdir / "ledger.jsonl"
        env.update(
            TASKMETER_PORT=str(port), TASKMETER_ADDR="127.0.0.1", TASKMETER_LEDGER=str(ledger)
        )
    if label == "floor0":  # the floor worker's pool processes send nothing: no lines
        env.update(TM_FLOOR_SEND="0")
        ledger = None
    log = wdir / "worker.log"
    # the floor variant: the same worker, its pool processes patched (floor_worker.py)
    entry = (
        [str(Path(__file__).with_name("floor_worker.py"))]
        if label.startswith("floor")
        else ["-m", "celery"]
    )
    cmd = [
        sys.executable, *entry, "-A", "tmapp", "worker",
        "-P", "prefork", "-c", str(CONCURRENCY), "-Q", queue,
        "-n", f"bench-{label}-{uuid.uuid4().hex[:6]}@%h", "--loglevel", "WARNING",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip
    if label == "events":
        cmd.append("-E")
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=wdir)
    return Worker(label, proc, queue, log, port, LedgerTail(ledger) if ledger else None)


def epoch_of(date_done: str) -> float:
    dt = datetime.fromisoformat(date_done)
    if dt.tzinfo is None:  # Celery stores UTC
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


@dataclass(frozen=True)
class Batch:
    seconds: float  # first send to the date_done of the last result
    n: int
    ledger_lag_s: float | None = None  # last result to the last ledger line
    main_cpu_s: float = 0.0  # CPU of the worker's main process over the batch
    pool_cpu_s: float = 0.0  # CPU of its pool processes over the batch

    @property
    def rate(self) -> float:
        return self.n / self.seconds


class Client:
    def __init__(self) -> None:
        from celery import Celery

        self.app = Celery("bench-client", broker=REDIS_URL)  # no backend: no subscriptions
        self.redis = redis_client()

    def batch(
        self, w: Worker, task: str, args: Sequence[Any], n: int, timeout: float, pace: float = 0.0
    ) -> Batch:
        """``pace``: tasks sent per second, on a fixed schedule (0: all at once)."""
        ids = [str(uuid.uuid4()) for _ in range(n)]
        keys = [RESULT_KEY.format(i) for i in ids]
        main0, pool0 = w.cpu_s()
        with self.app.producer_or_acquire() as producer:
            t0 = time.time()
            for i, task_id in enumerate(ids):
                if pace > 0:
                    time.sleep(max(0.0, t0 + i / pace - time.time()))
                self.app.send_task(
                    task, args=tuple(args), queue=w.queue, task_id=task_id, producer=producer
                )
        w.sent[task] = w.sent.get(task, 0) + n
        deadline = time.monotonic() + timeout
        next_check = 0.0
        while self.redis.exists(*keys) < n:
            now = time.monotonic()
            if now > next_check:
                w.alive()
                next_check = now + 1
            if now > deadline:
                raise RuntimeError(f"worker {w.label}: {n} x {task} not done in {timeout} s")
            time.sleep(0.005)
        metas = [json.loads(raw) for raw in self.redis.mget(keys)]
        self.redis.delete(*keys)
        failed = [m for m in metas if m["status"] != "SUCCESS"]
        if failed:
            raise RuntimeError(f"worker {w.label}: {len(failed)} x {task} failed: {failed[0]}")
        end = max(epoch_of(m["date_done"]) for m in metas)
        lag = None
        if w.ledger is not None:
            expected = sum(w.sent.values())
            while w.ledger.count() < expected:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"ledger of worker {w.label}: {w.ledger.lines} lines, {expected} tasks"
                    )
                time.sleep(0.002)
            lag = max(time.time() - end, 0.0)
        main1, pool1 = w.cpu_s()
        return Batch(end - t0, n, lag, main1 - main0, pool1 - pool0)

    def cleanup(self, queues: Sequence[str]) -> None:
        for q in queues:
            keys = list(self.redis.scan_iter(match=f"*{q}*"))
            if keys:
                self.redis.delete(*keys)


def scrape_worker(port: int) -> dict[tuple[str, str], float]:
    """celery_task_runs_total of a worker, by (task, state)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "celery_task_runs_total":
                out[(sample.labels["task"], sample.labels["state"])] = sample.value
    return out


@dataclass(frozen=True)
class Kind:
    label: str
    task: str
    args: tuple[Any, ...]
    n: int


def bench_throughput(
    s: Settings, baseline: Path | None = None, events: bool = False, floor: bool = False
) -> str:
    import redis

    try:
        redis_client().ping()
    except redis.exceptions.ConnectionError:
        raise SystemExit("Redis is not running on 127.0.0.1:6379 (scripts/services.sh)") from None
    kinds = [
        Kind("`noop`", "noop", (), s.noop_n),
        Kind(f"`cpu.burn({s.burn_s:g})`", "cpu.burn", (s.burn_s,), s.burn_n),
    ]
    labels = ["off", "on"] + (["base"] if baseline else []) + (["events"] if events else [])
    labels += ["floor", "floor0"] if floor else []
    client = Client()
    results: dict[tuple[str, str], list[Batch]] = {(k.task, v): [] for k in kinds for v in labels}
    with tempfile.TemporaryDirectory(prefix="bench-worker-") as tmp:
        workers = {
            v: start_worker(
                Path(tmp),
                v,
                v in ("on", "base", "floor", "floor0"),
                baseline if v == "base" else None,
            )
            for v in labels
        }
        try:
            for w in workers.values():  # ready when a first task comes back
                client.batch(w, "noop", (), 1, timeout=90)
            for w in workers.values():  # warm up: pool children, connections, imports
                for k in kinds:
                    client.batch(w, k.task, k.args, max(k.n // 5, 10), timeout=120)
            for r in range(s.rounds):
                for k in kinds:
                    for label in labels if r % 2 == 0 else labels[::-1]:
                        res = client.batch(
                            workers[label], k.task, k.args, k.n, timeout=300, pace=s.pace
                        )
                        results[(k.task, label)].append(res)
                        time.sleep(0.2)  # let the worker settle
                print(f"round {r + 1}/{s.rounds} done", file=sys.stderr, flush=True)
            on = workers["on"]
            assert on.port is not None and on.ledger is not None
            runs_total = scrape_worker(on.port)
            from taskmeter.export.ledger import read_ledgers

            reports, problems = read_ledgers([on.ledger.path])
        finally:
            for w in workers.values():
                w.stop()
            client.cleanup([w.queue for w in workers.values()])

    names = {
        "off": "off",
        "on": "on",
        "base": "on, baseline src",
        "events": "off, Celery events (-E)",
        "floor": "on, floor: system calls and one message only",
        "floor0": "on, floor: system calls only, no message",
    }
    rows = []
    for k in kinds:
        off_b = results[(k.task, "off")]
        for v in labels:
            bs = results[(k.task, v)]
            ratios = [a.rate / b.rate for a, b in zip(bs, off_b, strict=True)]
            cpu = [(b.main_cpu_s + b.pool_cpu_s) / b.n for b in bs]
            off_cpu = [(b.main_cpu_s + b.pool_cpu_s) / b.n for b in off_b]
            # CPU added per task, paired within each round, then the median of rounds.
            added = [a - b for a, b in zip(cpu, off_cpu, strict=True)]
            rows.append(
                (
                    k.label,
                    names[v],
                    f"{median(b.rate for b in bs):.0f}",
                    f"{median(ratios):.3f}" if v != "off" else "1",
                    f"{min(ratios):.3f}-{max(ratios):.3f}" if v != "off" else "-",
                    f"{median(b.main_cpu_s / b.n for b in bs) * 1e6:.0f}",
                    f"{median(b.pool_cpu_s / b.n for b in bs) * 1e6:.0f}",
                    f"{median(cpu) * 1e6:.0f}",
                    f"{median(added) * 1e6:+.0f}" if v != "off" else "-",
                    f"{median(added) / median(off_cpu) * 100:+.1f} %" if v != "off" else "-",
                )
            )
    out = [
        table(
            [
                "tasks",
                "worker",
                "tasks/s (median)",
                "on/off (median of rounds)",
                "on/off range",
                "CPU µs/task: main",
                "pool",
                "total",
                "added µs/task vs off (median of paired rounds)",
                "added / off",
            ],
            rows,
        )
    ]

    # What the instrumented worker recorded, against what was sent.
    on = workers["on"]
    check = []
    for k in kinds:
        mine = [rep for rep in reports if rep.task == k.task]
        lags = [b.ledger_lag_s for b in results[(k.task, "on")] if b.ledger_lag_s is not None]
        check.append(
            (
                f"`{k.task}`",
                on.sent.get(k.task, 0),
                len(mine),
                f"{runs_total.get((k.task, 'success'), 0):.0f}",
                sum(1 for rep in mine if rep.state != "success"),
                f"{median(rep.wall_s for rep in mine) * 1e3:.2f}" if mine else "N/A",
                f"{median(rep.cpu_s for rep in mine) * 1e3:.2f}" if mine else "N/A",
                f"{median(lags) * 1e3:.1f}" if lags else "N/A",
            )
        )
    out.append(
        table(
            [
                "task (instrumented worker)",
                "sent",
                "ledger lines",
                'runs_total{state="success"}',
                "not success",
                "median wall ms (taskmeter)",
                "median CPU ms (taskmeter)",
                "ledger lag ms after last result",
            ],
            check,
        )
    )
    if problems:
        out.append(f"Ledger problems: {problems[:3]}")
    return "\n\n".join(out)


# -- (b) scrape latency ----------------------------------------------------------------
def one_report() -> Any:
    with taskmeter.measure("bench.template") as m:
        taskmeter.run(["true"])
    taskmeter.wait_idle()
    return m.report


def fetch_curl(url: str, gzip: bool) -> tuple[float, int, str]:
    cmd = ["curl", "-sS", "-o", "/dev/null"]
    if gzip:
        cmd += ["-H", "Accept-Encoding: gzip"]  # not --compressed: size as sent
    cmd += ["-w", "%{time_total} %{size_download} %{http_code} %header{content-encoding}", url]
    fields = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()
    if fields[2] != "200":
        raise RuntimeError(f"GET {url}: HTTP {fields[2]}")
    return float(fields[0]), int(fields[1]), fields[3] if len(fields) > 3 else ""


def fetch_urllib(url: str, gzip: bool) -> tuple[float, int, str]:
    req = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"} if gzip else {})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=60) as resp:
        body = resp.read()
        enc = resp.headers.get("Content-Encoding", "")
    return time.perf_counter() - t0, len(body), enc


@contextlib.contextmanager
def served_metrics(template: Any, names: int, per_name: int) -> Iterator[tuple[Any, str, float]]:
    from prometheus_client import CollectorRegistry

    from taskmeter.export.metrics import TaskMetrics
    from taskmeter.export.server import ServerConfig, start_server

    metrics = TaskMetrics(inflight=lambda: [])  # as in the worker: nothing in flight
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics)
    reports = [dataclasses.replace(template, task=f"proj.tasks.task_{i:03d}") for i in range(names)]
    t0 = time.perf_counter()
    for _ in range(per_name):
        for rep in reports:
            metrics.observe(rep)
    observe_s = (time.perf_counter() - t0) / (names * per_name)
    server = start_server(registry, ServerConfig(port=0, addr="127.0.0.1"))
    try:
        yield metrics, server.url + "/metrics", observe_s
    finally:
        server.close()


def bench_scrape(s: Settings) -> str:
    from prometheus_client import CollectorRegistry, generate_latest

    fetch: Callable[[str, bool], tuple[float, int, str]] = (
        fetch_curl if shutil.which("curl") else fetch_urllib
    )
    template = one_report()
    rows = []
    for names in s.scrape_names:
        with served_metrics(template, names, s.reports_per_name) as (metrics, url, observe_s):
            registry = CollectorRegistry(auto_describe=False)
            registry.register(metrics)
            text = generate_latest(registry)
            lines = sum(1 for ln in text.splitlines() if ln and not ln.startswith(b"#"))
            collect_s = []
            for _ in range(5):
                t0 = time.perf_counter()
                list(metrics.collect())
                collect_s.append(time.perf_counter() - t0)
            times: dict[bool, list[float]] = {False: [], True: []}
            sizes: dict[bool, int] = {}
            for i in range(gets_for(s, names)):
                for gz in (False, True) if i % 2 == 0 else (True, False):
                    seconds, size, enc = fetch(url, gz)
                    if gz and enc != "gzip":
                        raise RuntimeError(f"asked for gzip, got Content-Encoding {enc!r}")
                    times[gz].append(seconds)
                    sizes[gz] = size
        rows.append(
            (
                names,
                f"{lines:,}".replace(",", " "),
                f"{observe_s * 1e6:.1f}",
                f"{median(collect_s) * 1e3:.1f}",
                f"{median(times[False]) * 1e3:.1f}",
                f"{percentile(times[False], 95) * 1e3:.1f}",
                f"{sizes[False] / 1024:.0f}",
                f"{median(times[True]) * 1e3:.1f}",
                f"{percentile(times[True], 95) * 1e3:.1f}",
                f"{sizes[True] / 1024:.0f}",
                len(times[False]),
            )
        )
    client = "curl" if fetch is fetch_curl else "urllib (no curl)"
    return (
        table(
            [
                "task names",
                "samples",
                "observe µs",
                "collect ms (lock held)",
                "GET ms median",
                "GET ms p95",
                "KiB",
                "gzip GET ms median",
                "gzip GET ms p95",
                "gzip KiB",
                "GETs each",
            ],
            rows,
        )
        + f"\n\nClient: {client}; {s.reports_per_name} reports per task name, each with one "
        "tool run (`true`); nothing in flight."
    )


def source_state() -> str:
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "src"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git)"
    return head + (" + uncommitted changes in src/" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 rounds, small batches: < 1 min")
    ap.add_argument("--rounds", type=int, help="rounds of the throughput comparison")
    ap.add_argument("--skip-throughput", action="store_true", help="only the scrape part")
    ap.add_argument("--skip-scrape", action="store_true", help="only the throughput part")
    ap.add_argument("--noop-n", type=int, help="noop tasks per batch")
    ap.add_argument("--burn-n", type=int, help="cpu.burn tasks per batch")
    ap.add_argument(
        "--pace",
        type=float,
        help="send N tasks a second instead of each batch at once (a worker not saturated)",
    )
    ap.add_argument(
        "--baseline", type=Path, help="a src/ folder: a third worker runs taskmeter from it"
    )
    ap.add_argument("--events", action="store_true", help="a worker with Celery events (-E)")
    ap.add_argument(
        "--floor",
        action="store_true",
        help="a worker whose pool processes make only a measurement's system calls",
    )
    args = ap.parse_args(argv)
    s = QUICK if args.quick else FULL
    if args.rounds is not None:
        s = dataclasses.replace(s, rounds=args.rounds)
    if args.noop_n is not None:
        s = dataclasses.replace(s, noop_n=args.noop_n)
    if args.burn_n is not None:
        s = dataclasses.replace(s, burn_n=args.burn_n)
    if args.pace is not None:
        s = dataclasses.replace(s, pace=args.pace)
    if not sys.platform.startswith("linux"):
        print("note: not Linux: peaks fall back to psutil sampling", file=sys.stderr)

    t_start = time.monotonic()
    print(f"# bench_worker ({'quick' if args.quick else 'full'})\n")
    print(f"Machine: {machine()}; src {source_state()}\n")
    if not args.skip_throughput:
        print(
            f"## (a) throughput: `celery worker -P prefork -c {CONCURRENCY}` on Redis, "
            f"taskmeter on vs off, {s.rounds} rounds, median"
            + (f"; tasks sent at {s.pace:g}/s, so tasks/s is the pace" if s.pace else "")
            + "\n",
            flush=True,
        )
        print(bench_throughput(s, args.baseline, args.events, args.floor), end="\n\n", flush=True)
    if not args.skip_scrape:
        print("## (b) `/metrics` scrape latency\n", flush=True)
        print(bench_scrape(s), end="\n\n", flush=True)
    print(f"Total {time.monotonic() - t_start:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
