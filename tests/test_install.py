"""The base install is what a worker image needs, and it is light.

A fresh virtual environment gets `pip install .` (no extras): its site-packages is
measured, a real `celery worker` with taskmeter enabled runs from it (real Redis), and
the commands that need an extra say which one instead of failing on an import.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from taskmeter.demo.command import metric_total
from taskmeter.demo.services import free_port, http_get

from workerkit import broker_url, wait_for

ROOT = Path(__file__).resolve().parents[1]
SITE_LIMIT = 80 * 2**20


def _du(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            p = Path(dirpath, f)
            if not p.is_symlink():
                total += p.stat().st_size
    return total


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    # taskmeter's base install plus the broker client a worker image has anyway
    # (celery[redis]: the transport is the user's choice, not taskmeter's).
    venv = tmp_path_factory.mktemp("base-venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run(
        [str(venv / "bin/python"), "-m", "pip", "install", "--quiet",
         "--disable-pip-version-check", str(ROOT), "celery[redis]"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert pip.returncode == 0, pip.stderr[-3000:]
    yield venv


def _site_packages(venv: Path) -> Path:
    (site,) = venv.glob("lib/python3*/site-packages")
    return site


def test_base_install_is_small_and_has_no_demo_or_report_dependencies(base_venv: Path):
    site = _site_packages(base_venv)
    size = _du(site)
    assert size <= SITE_LIMIT, f"base install is {size / 2**20:.0f} MiB of site-packages"
    present = {p.name.lower() for p in site.iterdir()}
    for heavy in ("boto3", "moto", "plotly", "flask"):
        assert heavy not in present, f"{heavy} is in the base install"
    for needed in ("celery", "prometheus_client", "psutil", "taskmeter"):
        assert needed in present, f"{needed} missing from the base install"


@pytest.mark.parametrize(("command", "extra"), [("demo", "demo"), ("report", "report")])
def test_commands_name_their_missing_extra(base_venv: Path, tmp_path: Path, command: str,
                                           extra: str):  # fmt: skip
    args = [str(base_venv / "bin/taskmeter"), command]
    if command == "report":
        ledger = tmp_path / "l.jsonl"
        ledger.write_text("")
        args += ["--ledger", str(ledger), "-o", str(tmp_path / "r.html")]
    out = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert f"pip install 'taskmeter[{extra}]'" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout


def test_a_real_worker_runs_from_the_base_install(base_venv: Path, tmp_path: Path):
    broker = broker_url("redis")
    (tmp_path / "lightapp.py").write_text(textwrap.dedent(f"""
        from celery import Celery
        import taskmeter, taskmeter.celery

        app = Celery("lightapp", broker={broker!r})
        app.conf.update(broker_connection_retry_on_startup=True,
                        worker_hijack_root_logger=False)
        taskmeter.celery.instrument(app)

        @app.task(name="light.echo")
        def echo(n):
            return taskmeter.run(["true"]).returncode + n
    """))
    queue = f"tm-light-{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TASKMETER_", "ENABLE_"))}
    env.update(ENABLE_WORKER_METRICS="1", TASKMETER_PORT=str(port), TASKMETER_ADDR="127.0.0.1",
               TASKMETER_LEDGER=str(tmp_path / "ledger.jsonl"), PYTHONPATH=str(tmp_path))
    env.pop("VIRTUAL_ENV", None)
    log = tmp_path / "worker.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [str(base_venv / "bin/celery"), "-A", "lightapp", "worker", "-P", "prefork",
             "-c", "1", "-Q", queue, "--without-gossip", "--without-mingle",
             "--without-heartbeat", "--loglevel", "INFO"],
            env=env, stdout=f, stderr=subprocess.STDOUT, cwd=tmp_path,
        )  # fmt: skip
    try:
        wait_for(lambda: proc.poll() is not None or b"ready." in log.read_bytes(), 60,
                 "the worker to be ready")  # fmt: skip
        assert proc.poll() is None, log.read_text()[-3000:]
        from celery import Celery

        Celery("client", broker=broker).send_task("light.echo", args=[1], queue=queue)
        def runs() -> float:
            text = http_get(f"http://127.0.0.1:{port}/metrics")
            return metric_total(text, "celery_task_runs_total", task="light.echo",
                                state="success")  # fmt: skip

        wait_for(lambda: runs() >= 1, 60, "the task in the worker's /metrics")
        assert runs() == 1
        assert (tmp_path / "ledger.jsonl").read_text().count("\n") == 1
    finally:
        proc.terminate()
        proc.wait(30)
