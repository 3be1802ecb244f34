"""A real `celery worker` on a real broker, instrumented by taskmeter, scraped by a real
Prometheus: every task counted exactly, whatever the pool, the broker or the ending."""

from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest

from taskmeter.demo.vcfgen import generate_vcf
from taskmeter.measure.report import TaskReport

from helpers import require
from workerkit import launch, port_open, wait_for, worker_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vcf(tmp_path_factory: pytest.TempPathFactory) -> str:
    require("bcftools")
    path = tmp_path_factory.mktemp("vcf") / "small.vcf.gz"
    return str(generate_vcf(path, samples=40, variants=4_000, seed=3))


def runs_by_task_state(reports: list[TaskReport]) -> dict[tuple[str, str], float]:
    return dict(collections.Counter((r.task, r.state) for r in reports))


def cpu_by_task_component(reports: list[TaskReport]) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = collections.defaultdict(float)
    for r in reports:
        out[(r.task, "overhead")] += r.overhead.cpu_s
        out[(r.task, "tool")] += r.tool_totals.cpu_s
    return dict(out)


def series(exposition: str) -> set[str]:
    """Name and labels of every sample line of a text exposition."""
    return {line.rsplit(" ", 1)[0] for line in exposition.splitlines() if line[:1] not in "#"}


def nonzero(d: dict[tuple[str, ...], float]) -> dict[tuple[str, ...], float]:
    return {k: v for k, v in d.items() if v}


@pytest.mark.parametrize(
    ("broker", "pool", "concurrency"),
    [("redis", "prefork", 2), ("rabbitmq", "prefork", 4), ("redis", "solo", 1),
     ("redis", "threads", 2)],
)  # fmt: skip
def test_prometheus_sees_every_task_exactly(
    start_worker, prometheus, vcf, broker, pool, concurrency
):
    w = start_worker(broker, pool, concurrency)
    prom = prometheus([f"127.0.0.1:{w.port}"])
    for _ in range(4):
        w.send("vcf.query", vcf)
    for _ in range(2):
        w.send("vcf.view_fail", vcf)
    for _ in range(3):
        w.send("cpu.burn", 0.1)
    reports = w.wait_reports(9)
    assert len(reports) == 9
    expected_runs = {("vcf.query", "success"): 4, ("vcf.view_fail", "failure"): 2,
                     ("cpu.burn", "success"): 3}  # fmt: skip
    assert runs_by_task_state(reports) == expected_runs
    assert all(r.worker.pool == pool for r in reports)
    assert all(len(r.tools) == 2 for r in reports if r.task == "vcf.query")

    prom.wait_scrape_after(time.time())
    runs = prom.by("sum by (task, state) (celery_task_runs_total)", "task", "state")
    assert nonzero(runs) == expected_runs
    cpu = prom.by("sum by (task, component) (celery_task_cpu_seconds_total)", "task", "component")
    truth = cpu_by_task_component(reports)
    assert nonzero(cpu).keys() == nonzero(truth).keys()
    for key, value in truth.items():
        assert cpu.get(key, 0.0) == pytest.approx(value, rel=1e-9, abs=1e-9), key
    walls = prom.by("sum by (task) (celery_task_wall_seconds_count)", "task")
    assert nonzero(walls) == {("vcf.query",): 4, ("vcf.view_fail",): 2, ("cpu.burn",): 3}
    if pool == "prefork":  # one task at a time per process: exact per-task peaks
        assert all(r.overhead.peak_method == "hwm" for r in reports)


def test_recycled_children_are_all_counted_and_the_scrape_does_not_grow(start_worker):
    w = start_worker("redis", "prefork", 2, ("--max-tasks-per-child", "1"))
    for _ in range(20):
        w.send("noop")
    w.wait_reports(20)
    text_20 = w.metrics()
    for _ in range(180):
        w.send("noop")
    reports = w.wait_reports(200, timeout=180)
    assert len(reports) == 200
    assert len({r.worker.pid for r in reports}) >= 150, "children were recycled"
    text = w.metrics()
    assert 'celery_task_runs_total{state="success",task="noop"} 200.0' in text
    # The same series after 200 children as after 20: only values change (a count going
    # from 20 to 200 is one digit longer per line, so compare series, not bytes).
    assert series(text) == series(text_20), "series must not pile up as children come and go"
    assert len(text) < 1.05 * len(text_20)
    assert "pid" not in text and reports[0].task_id not in text


def test_killed_time_limited_retried_and_revoked_tasks_are_recorded(start_worker):
    w = start_worker("redis", "prefork", 2)
    w.send("hog", 200, 60)
    hog = wait_for(
        lambda: [r for r in w.inflight() if r["task"] == "hog" and r["worker_rss_bytes"] > 200e6],
        30,
        "the hog task in flight with its memory",
    )[0]
    os.kill(hog["pid"], signal.SIGKILL)
    killed_at = time.time()
    w.send("sleep", 30, time_limit=1)
    w.send("retrier")
    sleeper = w.send("sleep", 30)
    wait_for(lambda: any(r["task_id"] == sleeper.id for r in w.inflight()), 30, "sleeper running")
    w.client().control.revoke(sleeper.id, terminate=True, signal="SIGTERM")
    reports = w.wait_reports(5, timeout=60)
    time.sleep(4)  # late or duplicate verdicts must not add anything
    reports = w.reports()
    assert runs_by_task_state(reports) == {
        ("hog", "killed"): 1, ("sleep", "killed"): 1, ("sleep", "revoked"): 1,
        ("retrier", "retry"): 1, ("retrier", "success"): 1,
    }  # fmt: skip
    (hog_report,) = [r for r in reports if r.task == "hog"]
    assert hog_report.overhead.rss_peak_bytes >= 200 << 20, "the killed task keeps its peak"
    # Its wall ends at its death (as seen by the main process), not when judged.
    started = datetime.fromisoformat(hog_report.started_at).timestamp()
    assert killed_at - started - 0.05 <= hog_report.wall_s <= killed_at - started + 1.5
    text = w.metrics()
    assert 'celery_task_runs_total{state="killed",task="hog"} 1.0' in text
    assert 'celery_task_runs_total{state="revoked",task="sleep"} 1.0' in text
    assert 'celery_task_runs_total{state="killed",task="sleep"} 1.0' in text


def test_disabled_worker_opens_no_port_and_starts_no_thread(tmp_path: Path, start_worker):
    w = start_worker("redis", "solo", 1, ENABLE_WORKER_METRICS="0",
                     TM_BACKEND="redis://127.0.0.1:6379/15")  # fmt: skip
    from celery import Celery

    client = Celery("client", broker=w.broker, backend="redis://127.0.0.1:6379/15")
    names = client.send_task("threads", queue=w.queue).get(timeout=30)
    assert not [n for n in names if n.startswith("taskmeter")], names
    assert not port_open("127.0.0.1", w.port)
    assert not w.ledger.exists()


def _start_and_wait_exit(tmp_path: Path, **env_extra: str) -> tuple[int, str]:
    from workerkit import broker_url

    env = worker_env(tmp_path, broker_url("redis"), **env_extra)
    proc, log = launch(tmp_path, env, "prefork", 1)
    try:
        code = proc.wait(60)
    except subprocess.TimeoutExpired as exc:
        proc.kill()
        raise AssertionError(f"the worker should have refused to start: {log.read_text()}") from exc
    return code, log.read_text()


def test_bad_toggle_value_stops_the_worker_naming_the_variable(tmp_path: Path):
    code, log = _start_and_wait_exit(tmp_path, ENABLE_WORKER_METRICS="maybe")
    assert code != 0
    assert "ENABLE_WORKER_METRICS='maybe'" in log
    assert "1/true/yes/on" in log and "0/false/no/off" in log


def test_port_in_use_stops_the_worker_with_a_clear_error(tmp_path: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, log = _start_and_wait_exit(tmp_path, TASKMETER_PORT=str(port))
    assert code != 0
    assert f"cannot serve metrics on 127.0.0.1:{port}" in log
    assert "Address already in use" in log


def test_plugin_enables_a_worker_with_no_code_change(start_worker):
    # TM_INSTRUMENT=0: the app never calls instrument(); the installed entry point adds
    # --metrics-port and the bootstep, which is off unless asked for.
    from workerkit import free_port, http_get

    port = free_port()
    w = start_worker("redis", "prefork", 1, ("--metrics-port", str(port)), TM_INSTRUMENT="0",
                     ENABLE_WORKER_METRICS="")  # fmt: skip
    w.send("noop")
    wait_for(
        lambda: (
            'celery_task_runs_total{state="success",task="noop"} 1.0'
            in http_get(f"http://127.0.0.1:{port}/metrics")
        ),
        30,
        "the noop task on the plugin's endpoint",
    )
    off = start_worker("redis", "prefork", 1, TM_INSTRUMENT="0", ENABLE_WORKER_METRICS="")
    assert not port_open("127.0.0.1", off.port), "without the option or the toggle: off"


def test_instrument_is_idempotent_and_reversible():
    from celery import Celery

    import taskmeter.celery as tmc
    from taskmeter.celery.integration import TaskmeterStep

    app = Celery("t")
    tmc.instrument(app)
    tmc.instrument(app)
    assert sum(1 for s in app.steps["worker"] if issubclass(s, TaskmeterStep)) == 1
    assert any("--metrics-port" in o.opts for o in app.user_options["worker"])
    tmc.uninstrument(app)
    assert not any(issubclass(s, TaskmeterStep) for s in app.steps["worker"])
    assert not any("--metrics-port" in o.opts for o in app.user_options["worker"])
