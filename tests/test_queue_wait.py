"""Queue wait with real parts: separate sending processes (one with taskmeter, one
without), a real prefork worker started 2 s later, Redis as broker and result backend.

Ground truth: the sender prints its clock just before and just after each send (the
publish, and its stamp, happen in between: the first send also connects to the broker),
and the task body returns the worker's clock when it starts (same host, same clock).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from taskmeter.demo.command import metric_sums

from workerkit import REDIS_URL, broker_url

BACKEND = "redis://127.0.0.1:6379/14"

SENDER = """
import json, sys, time
from celery import Celery
broker, queue, stamped = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
app = Celery("sender", broker=broker)
if stamped:
    import taskmeter.celery
    taskmeter.celery.instrument(app)
out = []
for countdown in ([None, None, None, 3] if stamped else [None, None]):
    t = time.time()
    r = app.send_task("clock.now", queue=queue, countdown=countdown)
    out.append({"id": r.id, "sent": t, "returned": time.time(), "countdown": countdown})
print(json.dumps(out))
"""


def _send(queue: str, stamped: bool) -> list[dict[str, object]]:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SENDER), REDIS_URL, queue, "1" if stamped else "0"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return list(json.loads(out.stdout))


@pytest.mark.slow
def test_queue_wait_of_held_back_tasks_matches_the_truth_and_unstamped_have_none(
    start_worker, tmp_path: Path
):
    broker_url("redis")
    queue = f"tm-qw-{uuid.uuid4().hex[:8]}"
    stamped = _send(queue, True)
    plain = _send(queue, False)
    time.sleep(2.0)  # the worker starts 2 s after the tasks were sent
    w = start_worker(concurrency=2, TM_QUEUE=queue, TM_BACKEND=BACKEND)
    reports = {r.task_id: r for r in w.wait_reports(len(stamped) + len(plain), timeout=60)}

    from celery import Celery

    client = Celery("client", broker=REDIS_URL, backend=BACKEND)
    for sent in stamped:
        started = float(client.AsyncResult(sent["id"]).get(timeout=30))
        countdown = float(sent["countdown"] or 0)  # type: ignore[arg-type]
        longest = started - (float(sent["sent"]) + countdown)  # type: ignore[arg-type]
        shortest = started - (float(sent["returned"]) + countdown)  # type: ignore[arg-type]
        got = reports[str(sent["id"])].queue_wait_s
        assert got is not None
        # Within 100 ms of the truth, which lies between the two bounds.
        assert shortest - 0.1 < got < longest + 0.1, (sent, got, shortest, longest)
        if sent["countdown"] is None:
            assert got >= 1.9, "held back 2 s"
        else:
            assert got < 1.0, "an ETA task waits from its ETA, not from publish"
    for sent in plain:
        assert reports[str(sent["id"])].queue_wait_s is None, "no stamp: no wait, not 0"

    waits = [r.queue_wait_s for r in reports.values() if r.queue_wait_s is not None]
    samples = metric_sums(w.metrics())
    key = ("celery_task_queue_wait_seconds_count", (("task", "clock.now"),))
    assert samples[key] == len(stamped)
    total = samples[("celery_task_queue_wait_seconds_sum", (("task", "clock.now"),))]
    assert math.isclose(total, sum(waits), rel_tol=1e-9)
