"""`taskmeter demo` with its real parts: a `celery worker` subprocess (prefork, instrumented),
moto's S3 server, kombu's filesystem broker (or the machine's Redis / RabbitMQ), bcftools."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest
import yaml

from taskmeter.demo.command import metric_sums
from taskmeter.demo.vcfgen import generate_vcf
from taskmeter.export.ledger import read_ledgers
from taskmeter.measure.report import TaskReport

from helpers import require, require_service
from workerkit import AMQP_URL, port_open, wait_for

# The demo's click command; `taskmeter demo` once cli.py wires it in.
DEMO = [sys.executable, "-m", "taskmeter.cli", "demo"]
REDIS_DB12 = "redis://127.0.0.1:6379/12"


def _ctrl_c_as_on_a_terminal() -> None:
    """In the demo's child: SIGINT handled as in a shell's foreground job. A test run
    started as a background job of a non-interactive shell inherits SIGINT ignored
    (POSIX), and the demo would inherit that too."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def run_demo(*args: str, timeout: float = 180, **kw: Any) -> subprocess.CompletedProcess[str]:
    # A wide "terminal" (rich reads COLUMNS when stdout is not one): names stay on one line.
    kw["env"] = {"COLUMNS": "200", **kw.get("env", os.environ)}
    return subprocess.run([*DEMO, *args], capture_output=True, text=True, timeout=timeout, **kw)


def ledger(workdir: Path) -> list[TaskReport]:
    reports, problems = read_ledgers([workdir / "reports.jsonl"])
    assert not problems, problems
    return reports


def check_reports_match_metrics(workdir: Path, expected_tasks: int) -> list[TaskReport]:
    """The ledger, the /metrics snapshot and the printed summary of one run agree."""
    reports = ledger(workdir)
    assert len(reports) == expected_tasks
    assert {r.state for r in reports} == {"success"}
    samples = metric_sums((workdir / "metrics.txt").read_text())
    summary = json.loads((workdir / "summary.json").read_text())

    runs = Counter(r.task for r in reports)
    cpu: dict[tuple[str, str], float] = defaultdict(float)
    for r in reports:
        cpu[(r.task, "overhead")] += r.overhead.cpu_s
        cpu[(r.task, "tool")] += r.tool_totals.cpu_s
    for task, n in runs.items():
        assert samples[("celery_task_runs_total", (("state", "success"), ("task", task)))] == n
        for component in ("overhead", "tool"):
            key = ("celery_task_cpu_seconds_total", (("component", component), ("task", task)))
            assert math.isclose(samples[key], cpu[(task, component)], rel_tol=1e-9), key
        shown = summary["by_task"][task]
        assert shown["runs"] == n
        assert math.isclose(shown["cpu_overhead_s"], cpu[(task, "overhead")], rel_tol=1e-12)
        assert math.isclose(shown["cpu_tool_s"], cpu[(task, "tool")], rel_tol=1e-12)
    assert summary["tasks"] == expected_tasks
    total_runs = sum(v for (name, _), v in samples.items() if name == "celery_task_runs_total")
    assert total_runs == expected_tasks
    return reports


@pytest.mark.slow
def test_default_demo_end_to_end(tmp_path: Path):
    require("bcftools")
    workdir = tmp_path / "work"
    t0 = time.monotonic()
    out = run_demo("--workdir", str(workdir), timeout=240)
    elapsed = time.monotonic() - t0
    assert out.returncode == 0, out.stderr[-4000:]
    assert elapsed < 180, f"the default demo took {elapsed:.0f} s"

    # 3 generated inputs x 2 task types x 2 tasks, all in the real worker (prefork, 2).
    reports = check_reports_match_metrics(workdir, 12)
    assert Counter(r.task for r in reports) == {"vcf.subset_query": 6, "vcf.merge": 6}
    assert {r.worker.pool for r in reports} == {"prefork"}
    assert len({r.worker.pid for r in reports}) >= 2  # two pool processes worked
    for r in reports:
        assert [p.name for p in r.phases] == ["download", "upload"]
        assert r.tools and {t.exe for t in r.tools} == {"bcftools"}
        assert all(t.exit_code == 0 for t in r.tools)
        assert r.tool_totals.cpu_s > 0 and r.overhead.cpu_s > 0
        assert r.footprint_peak_bytes >= r.overhead.rss_peak_bytes
    merge = next(r for r in reports if r.task == "vcf.merge")
    assert [t.argv[1] for t in merge.tools] == ["view", "index", "view", "index", "merge", "index"]

    # What is printed: the per task type tables next to bcftools alone, the sizing and
    # the patch written to the workdir.
    for text in ("vcf.subset_query: time (means per task)", "vcf.merge: time (means per task)",
                 "vcf.merge: CPU and memory", "alone", "memory request",
                 "Kustomize patch"):  # fmt: skip
        assert text in out.stdout
    patch = yaml.safe_load((workdir / "resources.yaml").read_text())
    assert patch["kind"] == "Deployment"
    resources = patch["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources["requests"]["memory"].endswith(("Mi", "Gi"))
    assert str(workdir / "resources.yaml") in out.stdout
    summary = json.loads((workdir / "summary.json").read_text())
    assert {(a["task"], a["input"]) for a in summary["bcftools_alone"]} == {
        (k, r) for k in ("vcf.subset_query", "vcf.merge")
        for r in ("50 samples × 5k variants", "200 samples × 20k variants",
                  "500 samples × 50k variants")
    }  # fmt: skip
    # Everything stopped: the worker's endpoint is gone.
    port = int(summary["metrics_url"].rsplit(":", 1)[1])
    assert not port_open("127.0.0.1", port)


@pytest.mark.slow
@pytest.mark.parametrize("broker", [REDIS_DB12, AMQP_URL], ids=["redis", "rabbitmq"])
def test_quick_demo_with_a_real_broker(tmp_path: Path, broker: str):
    require("bcftools")
    port = 6379 if broker.startswith("redis") else 5672
    require_service("Redis" if port == 6379 else "RabbitMQ", "127.0.0.1", port)
    out = run_demo("--quick", "--broker", broker, "--workdir", str(tmp_path))
    assert out.returncode == 0, out.stderr[-4000:]
    check_reports_match_metrics(tmp_path, 4)


def _small_vcf(path: Path) -> Path:
    return generate_vcf(path, samples=12, variants=400, seed=7)


@pytest.mark.slow
def test_user_vcfs_are_bgzipped_and_indexed(tmp_path: Path):
    require("bcftools")
    mine = tmp_path / "mine"
    mine.mkdir()
    gz = _small_vcf(mine / "noindex.vcf.gz")
    Path(f"{gz}.csi").unlink()  # bgzipped, no index
    plain = mine / "plain.vcf"
    with open(plain, "wb") as f:
        subprocess.run(["bgzip", "-dc", str(_small_vcf(tmp_path / "p.vcf.gz"))], stdout=f,
                       check=True)  # fmt: skip
    before = sorted(p.name for p in mine.iterdir())
    workdir = tmp_path / "work"
    out = run_demo("--quick", "--vcf", str(gz), "--vcf", str(plain), "--workdir", str(workdir))
    assert out.returncode == 0, out.stderr[-4000:]
    assert f"{gz}: not indexed: indexed with bcftools index" in out.stderr
    assert f"{plain}: not compressed: bgzipped into the workdir and indexed" in out.stderr
    assert sorted(p.name for p in mine.iterdir()) == before  # the user's files untouched
    # 3 inputs (the smallest generated one and the two given) x 2 types x 2 tasks.
    reports = check_reports_match_metrics(workdir, 12)
    inputs = {t.argv[-1].rsplit("/", 1)[1] for r in reports for t in r.tools[:1]}
    assert inputs == {"cohort_50x5000.vcf.gz", "noindex.vcf.gz", "plain.vcf.gz"}
    assert "noindex.vcf.gz" in out.stdout and "plain.vcf" in out.stdout


def test_a_file_that_is_not_a_vcf_is_rejected_before_anything_starts(tmp_path: Path):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello\nworld\n")
    workdir = tmp_path / "work"
    out = run_demo("--vcf", str(bad), "--workdir", str(workdir), timeout=60)
    assert out.returncode == 2
    assert f"{bad} is not a VCF (" in out.stderr
    assert not workdir.exists()


def test_demo_without_bcftools_says_how_to_install_it(tmp_path: Path):
    env = {"PATH": str(tmp_path), "HOME": str(tmp_path)}
    out = run_demo("--quick", env=env, timeout=60)
    assert out.returncode == 1
    assert "bcftools" in out.stderr and "make setup" in out.stderr


@pytest.mark.slow
def test_keep_running_serves_until_ctrl_c_then_stops_everything(tmp_path: Path):
    require("bcftools")
    err = tmp_path / "stderr.txt"
    workdir = tmp_path / "work"
    with open(err, "w") as f:
        proc = subprocess.Popen([*DEMO, "--quick", "--keep-running", "--workdir", str(workdir)],
                                stdout=subprocess.DEVNULL, stderr=f,
                                preexec_fn=_ctrl_c_as_on_a_terminal)  # fmt: skip
    try:
        wait_for(lambda: "Ctrl-C to stop" in err.read_text(), 120, "the demo to keep running")
        url = json.loads((workdir / "summary.json").read_text())["metrics_url"]
        port = int(url.rsplit(":", 1)[1])
        assert port_open("127.0.0.1", port)  # still serving after the report
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        assert not port_open("127.0.0.1", port)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert shutil.which("bcftools")


@pytest.mark.slow
def test_quick_demo_sizes_from_a_real_prometheus_too(tmp_path: Path, prometheus):
    require("bcftools")
    from workerkit import free_port

    port = free_port()
    prom = prometheus([f"127.0.0.1:{port}"])
    out = run_demo("--quick", "--metrics-port", str(port), "--prometheus", prom.url,
                   "--workdir", str(tmp_path / "w"))  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    assert "The same recommendation, read from Prometheus" in out.stdout, out.stdout[-3000:]
    # What Prometheus scraped matches the ledger of the same run.
    reports = ledger(tmp_path / "w")
    # (The worker is gone: its series are stale now, so look back over the run.)
    runs = prom.by("sum by (task) (max_over_time(celery_task_runs_total[5m]))", "task")
    assert {k: v for k, v in runs.items() if v} == {
        (t,): float(n) for t, n in Counter(r.task for r in reports).items()
    }


@pytest.mark.slow
def test_ctrl_c_mid_run_stops_the_worker_its_children_and_s3(tmp_path: Path):
    require("bcftools")
    import psutil

    err = tmp_path / "stderr.txt"
    workdir = tmp_path / "work"
    with open(err, "w") as f:  # a terminal's Ctrl-C reaches the demo's whole process group
        proc = subprocess.Popen([*DEMO, "--quick", "--tasks", "200", "--workdir", str(workdir)],
                                stdout=subprocess.DEVNULL, stderr=f, start_new_session=True,
                                preexec_fn=_ctrl_c_as_on_a_terminal)  # fmt: skip
    try:
        ledger_file = workdir / "reports.jsonl"
        wait_for(lambda: ledger_file.exists() and ledger_file.read_text().count("\n") >= 2,
                 120, "tasks to be running")  # fmt: skip
        family = psutil.Process(proc.pid).children(recursive=True)

        def cmdline(p: psutil.Process) -> str:
            try:
                return " ".join(p.cmdline())
            except psutil.NoSuchProcess:  # a bcftools run that just ended
                return ""

        workers = [p for p in family if "celery" in cmdline(p)]
        assert len(workers) >= 3, "a main worker process and its 2 pool children"
        s3_port = int(workers[0].environ()["TASKMETER_DEMO_S3_ENDPOINT"].rsplit(":", 1)[1])
        assert port_open("127.0.0.1", s3_port)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "interrupted: the worker and S3 are stopped" in err.read_text()
    _gone, alive = psutil.wait_procs(family, timeout=5)
    assert alive == [], f"left running: {[cmdline(p) for p in alive]}"
    assert not port_open("127.0.0.1", s3_port)
    assert ledger_file.read_text().count("\n") < 200  # it really stopped mid-run


@pytest.mark.slow
def test_demo_on_an_external_s3_endpoint_with_its_own_tasks_and_concurrency(tmp_path: Path):
    """--s3-endpoint with a separately started S3-compatible server (moto's, as no real S3
    is reachable from this machine), --tasks and --concurrency other than the defaults."""
    require("bcftools")
    import boto3

    from workerkit import free_port

    port = free_port()
    creds = {"AWS_ACCESS_KEY_ID": "test-key", "AWS_SECRET_ACCESS_KEY": "test-secret",
             "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    env = {**os.environ, **creds}
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                               "-p", str(port)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for(lambda: port_open("127.0.0.1", port), 30, "the S3 server")
        endpoint = f"http://127.0.0.1:{port}"
        out = run_demo("--quick", "--s3-endpoint", endpoint, "--bucket", "my-vcfs",
                       "--tasks", "3", "--concurrency", "1", "--workdir", str(tmp_path / "w"),
                       env=env)  # fmt: skip
        assert out.returncode == 0, out.stderr[-4000:]
        reports = check_reports_match_metrics(tmp_path / "w", 3)
        s3 = boto3.client("s3", endpoint_url=endpoint, **{
            k.lower(): v for k, v in creds.items() if k != "AWS_DEFAULT_REGION"})  # fmt: skip
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="my-vcfs")["Contents"]]
        results = {k.split("/")[1] for k in keys if k.startswith("results/")}
        assert results == {r.task_id for r in reports}, "each task uploaded its output there"
        assert len({r.worker.pid for r in reports}) == 1, "one pool child at -c 1"
        assert "--concurrency 1" in out.stdout
    finally:
        server.terminate()
        server.wait(10)
