"""Real services for integration tests: a `celery worker` subprocess, brokers, and a
real Prometheus server (Debian's `prometheus`) scraping the worker."""

from __future__ import annotations

import calendar
import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from taskmeter.demo.services import free_port, http_get, port_open  # noqa: F401 - the tests import it from here
from taskmeter.export.ledger import read_ledgers
from taskmeter.measure.report import TaskReport

from helpers import require, require_service

APPS = Path(__file__).parent / "apps"
CELERY = [sys.executable, "-m", "celery"]
REDIS_URL = "redis://127.0.0.1:6379/15"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"


def broker_url(kind: str) -> str:
    if kind == "redis":
        require_service("Redis", "127.0.0.1", 6379)  # fails under CI=true, else skips
        return REDIS_URL
    require_service("RabbitMQ", "127.0.0.1", 5672)
    return AMQP_URL


def wait_for(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    port: int
    ledger: Path
    log: Path
    queue: str
    broker: str
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def metrics(self) -> str:
        return http_get(self.url + "/metrics")

    def inflight(self) -> list[dict[str, Any]]:
        return list(json.loads(http_get(self.url + "/inflight")))

    def reports(self) -> list[TaskReport]:
        if not self.ledger.exists():
            return []
        reports, problems = read_ledgers([self.ledger])
        assert not problems, problems
        return reports

    def wait_reports(self, n: int, timeout: float = 60) -> list[TaskReport]:
        return list(
            wait_for(
                lambda: (r := self.reports()) and len(r) >= n and r,
                timeout,
                f"{n} reports in {self.ledger} (log: {self.log_text()[-2000:]})",
            )
        )

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def client(self) -> Any:
        from celery import Celery

        return Celery("client", broker=self.broker)

    def send(self, name: str, *args: Any, **options: Any) -> Any:
        return self.client().send_task(name, args=args, queue=self.queue, **options)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # warm shutdown
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def worker_env(tmp: Path, broker: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TASKMETER_", "ENABLE_"))}
    env.update(
        TM_BROKER=broker,
        TM_QUEUE=f"tm-{uuid.uuid4().hex[:10]}",
        PYTHONPATH=os.pathsep.join([str(APPS), env.get("PYTHONPATH", "")]),
        ENABLE_WORKER_METRICS="1",
        TASKMETER_LEDGER=str(tmp / "ledger.jsonl"),
        TASKMETER_PORT=str(free_port()),
        TASKMETER_ADDR="127.0.0.1",
    )
    env.update(extra)
    return env


def launch(
    tmp: Path, env: dict[str, str], pool: str = "prefork", concurrency: int = 2, *args: str
) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp / f"worker-{uuid.uuid4().hex[:6]}.log"
    cmd = [
        *CELERY, "-A", "tmapp", "worker", "-P", pool, "-c", str(concurrency),
        "-Q", env["TM_QUEUE"], "-n", f"tm-{uuid.uuid4().hex[:8]}@%h", "--loglevel", "INFO",
        "--without-gossip", "--without-mingle", "--without-heartbeat", *args,
    ]  # fmt: skip
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=tmp)
    return proc, log


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    workers: list[Worker] = []

    def start(
        broker: str = "redis",
        pool: str = "prefork",
        concurrency: int = 2,
        args: tuple[str, ...] = (),
        **env_extra: str,
    ) -> Worker:
        url = broker_url(broker)
        env = worker_env(tmp_path, url, **env_extra)
        proc, log = launch(tmp_path, env, pool, concurrency, *args)
        w = Worker(
            proc, int(env["TASKMETER_PORT"]), Path(env["TASKMETER_LEDGER"]), log,
            env["TM_QUEUE"], url, env,
        )  # fmt: skip
        workers.append(w)
        wait_for(
            lambda: proc.poll() is not None or "ready." in w.log_text(),
            60,
            f"the worker to be ready (log: {log})",
        )
        assert proc.poll() is None, f"worker exited: {w.log_text()[-3000:]}"
        return w

    yield start
    for w in workers:
        w.stop()


# -- Prometheus ----------------------------------------------------------------------------
@dataclass
class Prometheus:
    proc: subprocess.Popen[bytes]
    url: str

    def query(self, promql: str) -> list[dict[str, Any]]:
        q = urllib.parse.urlencode({"query": promql})
        body = json.loads(http_get(f"{self.url}/api/v1/query?{q}"))
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def by(self, promql: str, *labels: str) -> dict[tuple[str, ...], float]:
        return {
            tuple(r["metric"].get(lbl, "") for lbl in labels): float(r["value"][1])
            for r in self.query(promql)
        }

    def wait_scrape_after(self, t: float, job: str = "worker") -> None:
        """Wait until a scrape that started after ``t`` (epoch) is stored: one is
        reported up, and then the next one too (so the first is surely committed)."""

        def last_scrape() -> float | None:
            body = json.loads(http_get(f"{self.url}/api/v1/targets"))
            for target in body["data"]["activeTargets"]:
                if target["labels"].get("job") == job and target["health"] == "up":
                    last = target["lastScrape"]
                    # UTC, whole seconds (floored: "after t" stays true)
                    return calendar.timegm(time.strptime(last[:19], "%Y-%m-%dT%H:%M:%S"))
            return None

        first = wait_for(
            lambda: (ts := last_scrape()) is not None and ts > t + 0.5 and ts,
            30,
            "a fresh Prometheus scrape",
        )
        wait_for(lambda: (ts := last_scrape()) is not None and ts > first, 30, "the next scrape")


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[..., Prometheus]]:
    exe = require("prometheus")  # Debian package 'prometheus'; fails under CI=true
    procs: list[subprocess.Popen[bytes]] = []

    def start(
        targets: list[str], exemplars: bool = False, rule_files: Sequence[Path] = ()
    ) -> Prometheus:
        """A Prometheus scraping ``targets`` every second; ``exemplars`` turns on its
        exemplar storage (then /api/v1/query_exemplars answers); ``rule_files`` are
        loaded (evaluated every second unless a group sets its own interval)."""
        port = free_port()
        cfg = tmp_path / "prometheus.yml"
        cfg.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
            "  evaluation_interval: 1s\n"
            f"rule_files: {json.dumps([str(f) for f in rule_files])}\n"
            "scrape_configs:\n  - job_name: worker\n    static_configs:\n"
            f"      - targets: {json.dumps(targets)}\n"
        )
        log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed with the test dir
        proc = subprocess.Popen(
            [
                exe,
                f"--config.file={cfg}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                *(["--enable-feature=exemplar-storage"] if exemplars else []),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        procs.append(proc)
        prom = Prometheus(proc, f"http://127.0.0.1:{port}")

        def ready() -> bool:
            # It listens before its storage is open, and answers 503 until then.
            assert proc.poll() is None, f"prometheus exited: {log.name}"
            try:
                return "Ready" in http_get(f"{prom.url}/-/ready", timeout=1)
            except OSError:  # refused, 503 (HTTPError), timeout
                return False

        wait_for(ready, 60, "Prometheus to be ready")
        return prom

    yield start
    for p in procs:
        p.terminate()
        p.wait(10)
