"""CPU per /metrics scrape of a worker's registry at 10, 100 and 500 task types.

Every task type carries the contract's worst case (one tool, three phases, every state,
two kill causes, queue wait: 80 series). The scrape is rendered exactly as the worker's
endpoint does it (export/server.py ``Renderer``: TaskMetrics families from their cache,
the process collector through prometheus_client, gzip when asked), in this process,
and timed with ``time.process_time`` (CPU of this process, so the figures are what the
worker's main process pays per scrape). Cases:

- unchanged: nothing arrived since the last scrape (the common case between tasks);
- 1 record: one task ended since the last scrape;
- all types: one task of every type ended since the last scrape (worst case);
- cold: the first scrape of a freshly fed registry (every series formatted).

Run: ``.venv/bin/python benchmarks/bench_scrape.py`` (about 30 s; ``--quick``: 10 s).
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from prometheus_client import CollectorRegistry, ProcessCollector

import taskmeter
from _common import machine, median, table
from taskmeter.export.metrics import TaskMetrics
from taskmeter.export.server import Renderer, ServerConfig, start_server
from taskmeter.measure.report import TaskReport

SIZES = (10, 100, 500)


def template() -> TaskReport:
    with taskmeter.measure("bench.t", "00000000-0000-0000-0000-000000000000") as m:
        for phase in ("fetch", "compute", "store"):
            with m.phase(phase):
                if phase == "compute":
                    taskmeter.run(["true"], check=True)
    return dataclasses.replace(m.report, queue_wait_s=0.4)


def variants(base: TaskReport, task: str) -> list[TaskReport]:
    """The reports that create all 80 series of one task type."""
    states = [("success", None), ("failure", None), ("retry", None), ("revoked", None),
              ("killed", "oom"), ("lost", "unknown")]  # fmt: skip
    return [
        dataclasses.replace(base, task=task, task_id=f"{task}-{i}", state=s, cause=c)
        for i, (s, c) in enumerate(states)
    ]


def registry_of(n: int, base: TaskReport) -> tuple[TaskMetrics, Renderer, list[str]]:
    metrics = TaskMetrics(inflight=lambda: [], pool="prefork", concurrency=4)
    names = [f"proj.tasks.task_{i:03d}" for i in range(n)]
    metrics.declare(names)
    for name in names:
        for r in variants(base, name):
            metrics.observe(r)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics)
    ProcessCollector(registry=registry)  # as in the worker
    return metrics, Renderer(registry), names


def scrape(renderer: Renderer, openmetrics: bool, gz: bool) -> int:
    body = renderer.render(openmetrics)
    if gz:
        body = renderer.gzip(body, openmetrics)
    return len(body)


def cpu_ms(run: Callable[[], object], between: Callable[[], object], reps: int) -> float:
    """Median CPU ms of ``run`` over ``reps`` repetitions, ``between`` untimed before each."""
    times = []
    for _ in range(reps):
        between()
        t0 = time.process_time()
        run()
        times.append(time.process_time() - t0)
    return median(times) * 1e3


def measure_size(n: int, base: TaskReport, reps: int) -> list[object]:
    metrics, renderer, names = registry_of(n, base)
    one = dataclasses.replace(base, task=names[0])
    every = [dataclasses.replace(base, task=name) for name in names]
    t0 = time.perf_counter()
    for r in every:
        metrics.observe(r)
    observe_us = (time.perf_counter() - t0) / n * 1e6
    text_kib = scrape(renderer, False, False) / 1024
    om_gz_kib = scrape(renderer, True, True) / 1024
    series = sum(1 for ln in renderer.render().decode().splitlines() if 'task="' in ln[:200])

    def nothing() -> None:
        pass

    def feed_one() -> None:
        metrics.observe(one)

    def feed_all() -> None:
        for r in every:
            metrics.observe(r)

    row: list[object] = [n, f"{series:,}".replace(",", " "), f"{observe_us:.1f}"]
    for openmetrics, gz in ((False, False), (True, True)):

        def fn(om: bool = openmetrics, g: bool = gz) -> int:
            return scrape(renderer, om, g)

        fn()
        row.append(f"{cpu_ms(fn, nothing, reps):.2f}")
        row.append(f"{cpu_ms(fn, feed_one, reps):.2f}")
        row.append(f"{cpu_ms(fn, feed_all, max(3, reps // 3)):.1f}")
    cold: list[float] = []
    for _ in range(3):
        _, fresh, _ = registry_of(n, base)
        t0 = time.process_time()
        scrape(fresh, True, True)
        cold.append(time.process_time() - t0)
    row.append(f"{median(cold) * 1e3:.1f}")
    row.append(f"{http_cpu_ms(renderer.registry, reps * 4):.2f}")
    row += [f"{text_kib:.0f}", f"{om_gz_kib:.0f}"]
    return row


CLIENT = """
import sys, urllib.request
req = urllib.request.Request(sys.argv[1], headers={
    "Accept": "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
    "Accept-Encoding": "gzip"})
for _ in range(int(sys.argv[2])):
    with urllib.request.urlopen(req, timeout=30) as resp:
        resp.read()
"""


def http_cpu_ms(registry: CollectorRegistry, gets: int) -> float:
    """CPU of this process (the server's threads) per GET by a client in another
    process, as Prometheus asks (OpenMetrics, gzip), nothing new between scrapes."""
    server = start_server(registry, ServerConfig(port=0, addr="127.0.0.1"))
    try:
        url = server.url + "/metrics"
        subprocess.run([sys.executable, "-c", CLIENT, url, "2"], check=True)  # warm
        t0 = time.process_time()
        subprocess.run([sys.executable, "-c", CLIENT, url, str(gets)], check=True)
        return (time.process_time() - t0) / gets * 1e3
    finally:
        server.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (about 10 s)")
    args = ap.parse_args(argv)
    reps = 5 if args.quick else 15
    base = template()
    t_start = time.monotonic()
    print("# bench_scrape\n")
    print(f"Machine: {machine()}\n")
    rows = [measure_size(n, base, reps) for n in SIZES]
    print(
        table(
            [
                "task types",
                "series",
                "observe µs",
                "text: unchanged ms",
                "text: 1 record ms",
                "text: all types ms",
                "OM+gzip: unchanged ms",
                "OM+gzip: 1 record ms",
                "OM+gzip: all types ms",
                "OM+gzip: cold ms",
                "HTTP GET, unchanged ms",
                "text KiB",
                "OM gzip KiB",
            ],
            rows,
        )
    )
    print(
        f"\nCPU ms per scrape (median of {reps}; 'all types' of {max(3, reps // 3)}), "
        "process collector included; 'HTTP GET': CPU of the serving process per GET of a "
        "client in another process (OpenMetrics + gzip, as Prometheus asks), the spawn of "
        "that client included. Budget: 5 ms per 10 task types "
        "(10: 5 ms, 100: 50 ms, 500: 250 ms).\n"
    )
    print(f"Total {time.monotonic() - t_start:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
