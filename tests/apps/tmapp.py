"""The Celery app the integration tests run in a real `celery worker` process.

Broker and result backend come from TM_BROKER (a real Redis or RabbitMQ). VCF paths are
passed as task arguments; tasks call the real bcftools through taskmeter.run.
"""

from __future__ import annotations

import glob
import os
import struct
import subprocess
import sys
import time
from typing import Any

from celery import Celery

import taskmeter
import taskmeter.celery

app = Celery("tmapp", broker=os.environ["TM_BROKER"], backend=os.environ.get("TM_BACKEND"))
app.conf.update(
    task_acks_late=False,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    task_default_queue=os.environ.get("TM_QUEUE", "taskmeter-tests"),
)
if os.environ.get("TM_INSTRUMENT", "1") == "1":
    taskmeter.celery.instrument(app)


@app.task(name="vcf.query")
def vcf_query(vcf: str) -> int:
    m = taskmeter.current()
    assert m is not None, "the task must run inside a taskmeter measurement"
    with m.phase("check"):
        header = taskmeter.run(["bcftools", "view", "-h", vcf], capture_output=True, check=True)
        assert b"##fileformat=VCF" in header.stdout
    out = taskmeter.run(
        ["bcftools", "query", "-f", r"%POS[\t%GT]\n", vcf], capture_output=True, check=True
    )
    return out.stdout.count(b"\n")


@app.task(name="vcf.view_fail")
def vcf_view_fail(vcf: str) -> None:
    # A missing input: bcftools exits 255, check=True raises, the task fails.
    taskmeter.run(["bcftools", "view", "-h", vcf + ".missing"], capture_output=True, check=True)


@app.task(name="cpu.burn")
def cpu_burn(seconds: float) -> float:
    t0 = time.process_time()
    while time.process_time() - t0 < seconds:
        pass
    return time.process_time() - t0


@app.task(name="noop")
def noop() -> None:
    return None


@app.task(name="sleep")
def sleep(seconds: float) -> None:
    time.sleep(seconds)


@app.task(name="die.now")
def die_now() -> None:
    # SIGKILL itself at once: before the pool process announces the run (tests/test_hot_path.py)
    os.kill(os.getpid(), 9)


_KILLER = """
import os, signal, struct, sys, time
box, main, before = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def pos():
    with open(box, "rb") as f:
        return struct.unpack_from("<Q", f.read(24), 16)[0]
deadline = time.monotonic() + 10
while pos() == before and time.monotonic() < deadline:
    time.sleep(0.0002)
with open(f"/proc/{main}/task/{main}/children") as f:
    pool = [int(p) for p in f.read().split()]
for pid in [main, *pool]:  # as a container OOM kill: every process, nobody warned
    os.kill(pid, signal.SIGKILL)
"""


@app.task(name="end.then.kill.worker")
def end_then_kill_worker() -> None:
    """Returns at once; a helper SIGKILLs the whole worker (main process first, then
    the pool) as soon as this task's end is in its pool process's outbox, before the
    main process collects it (tests/test_outbox.py)."""
    ledger = os.environ["TASKMETER_LEDGER"]
    (box,) = glob.glob(f"{ledger}.inflight/*/{os.getpid()}-*.outbox")
    with open(box, "rb") as f:  # the outbox's write position now, before this end
        before = struct.unpack_from("<Q", f.read(24), 16)[0]
    subprocess.Popen(
        [sys.executable, "-c", _KILLER, box, str(os.getppid()), str(before)],
        start_new_session=True,
    )


@app.task(name="hog")
def hog(mib: int, seconds: float) -> None:
    blob = b"x" * (mib * 1024 * 1024)
    time.sleep(seconds)
    del blob


@app.task(name="retrier", bind=True, max_retries=1, default_retry_delay=0)
def retrier(self) -> None:  # type: ignore[no-untyped-def]
    if self.request.retries == 0:
        raise self.retry(countdown=0)


@app.task(name="threads")
def threads() -> list[str]:
    """Names of the Python threads of the process running the task (solo: the worker)."""
    import threading

    return sorted(t.name for t in threading.enumerate())


@app.task(name="phased", bind=True, max_retries=1, default_retry_delay=0)
def phased(self, mode: str = "ok", seconds: float = 0.0) -> None:  # type: ignore[no-untyped-def]
    """Three phases, one tool (`true`), then ``seconds`` of sleep in the last phase;
    mode "fail" raises, "retry" retries once. Used by the series budget test."""
    m = taskmeter.current()
    assert m is not None, "the task must run inside a taskmeter measurement"
    with m.phase("fetch"):
        pass
    with m.phase("compute"):
        taskmeter.run(["true"], check=True)
    with m.phase("store"):
        time.sleep(seconds)
    if mode == "fail":
        raise RuntimeError("phased: asked to fail")
    if mode == "retry" and self.request.retries == 0:
        raise self.retry(countdown=0)


# A tool (a Python child) holding ``mib`` MiB for ``seconds``, itself starting
# ``children`` grandchildren that hold as much: a tool tree. Used by the OOM and orphan tests.
_HOLD_ONE = "import sys, time; b = b'x' * (int(sys.argv[1]) << 20); time.sleep(float(sys.argv[2]))"
_HOLD = f"""
import subprocess, sys, time
mib, seconds, children = sys.argv[1], sys.argv[2], int(sys.argv[3])
kids = [subprocess.Popen([sys.executable, "-c", {_HOLD_ONE!r}, mib, seconds])
        for _ in range(children)]
exec({_HOLD_ONE!r})
"""


@app.task(name="grow")
def grow(mib: int, step_mib: int = 10, pause_s: float = 0.02) -> None:
    """Memory that grows as real tasks' does: ``step_mib`` at a time up to ``mib``."""
    blobs = []
    for _ in range(mib // step_mib):
        blobs.append(b"x" * (step_mib << 20))
        time.sleep(pause_s)


@app.task(name="tool.hold")
def tool_hold(mib: int, seconds: float, children: int = 0) -> int:
    import sys

    argv = [sys.executable, "-c", _HOLD, str(mib), str(seconds), str(children)]
    return taskmeter.run(argv).returncode


@app.task(name="sub.run")
def sub_run(argv: list[str]) -> str:
    """A tool through plain subprocess.run, no taskmeter call: found by the sampler as
    untracked, or a tracked tool under TASKMETER_PATCH_SUBPROCESS=1."""
    import subprocess

    return subprocess.run(argv, capture_output=True, check=True).stdout.decode()


@app.task(name="clock.now")
def clock_now() -> float:
    """The worker's clock when the task body starts: a queue-wait ground truth."""
    return time.time()


# OpenTelemetry (TM_OTEL=1): each pool child gets a tracer provider that keeps finished
# spans in memory, and the official Celery instrumentor (one span per task).
_SPANS: Any = None


def _otel_init(**_: Any) -> None:
    global _SPANS
    from opentelemetry import trace
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    _SPANS = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(_SPANS))
    trace.set_tracer_provider(provider)
    CeleryInstrumentor().instrument()


if os.environ.get("TM_OTEL") == "1":
    from celery.signals import worker_process_init

    worker_process_init.connect(_otel_init, weak=False)


@app.task(name="otel.spans")
def otel_spans() -> list[dict[str, Any]]:
    """The spans this pool child finished so far, as plain data."""
    spans = [] if _SPANS is None else _SPANS.get_finished_spans()
    return [
        {
            "name": s.name,
            "attributes": dict(s.attributes or {}),
            "events": [{"name": e.name, "attributes": dict(e.attributes or {})} for e in s.events],
        }
        for s in spans
    ]
