"""The demo's Celery app: DivBase-style VCF tasks, measured by taskmeter.

The worker runs ``celery -A taskmeter.demo.app worker``; everything it needs comes from
the environment ``taskmeter demo`` gives it:

* ``TASKMETER_DEMO_BROKER``: broker URL (default ``filesystem://``), with
  ``TASKMETER_DEMO_BROKER_DIR`` holding the folders of kombu's filesystem transport;
* ``TASKMETER_DEMO_QUEUE``: the queue of this run;
* ``TASKMETER_DEMO_S3_ENDPOINT`` (empty: AWS itself), ``TASKMETER_DEMO_BUCKET`` and the
  usual ``AWS_*`` credentials;
* ``TASKMETER_DEMO_SCRATCH``: where tasks put their files (removed after each task).

No result backend: results are read from the worker's ledger (``TASKMETER_LEDGER``).
Each task downloads its VCF and index from S3 (phase ``download``), runs bcftools
through ``taskmeter.run`` (see :mod:`taskmeter.demo.steps`) and uploads its output
(phase ``upload``).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from celery import Celery

import taskmeter
import taskmeter.celery
from taskmeter.demo import steps
from taskmeter.demo.appconfig import (
    BROKER_DIR_ENV,
    BROKER_ENV,
    BUCKET_ENV,
    DEFAULT_QUEUE,
    QUEUE_ENV,
    S3_ENDPOINT_ENV,
    SCRATCH_ENV,
    configure,
)

app = configure(
    Celery("taskmeter_demo"),
    os.environ.get(BROKER_ENV, "filesystem://"),
    os.environ.get(BROKER_DIR_ENV),
    os.environ.get(QUEUE_ENV, DEFAULT_QUEUE),
)


taskmeter.celery.instrument(app)

_s3_client: Any = None


def s3() -> Any:
    """One boto3 S3 client per process (created after the pool's fork)."""
    global _s3_client
    if _s3_client is None:
        import boto3  # type: ignore[import-untyped]

        _s3_client = boto3.client("s3", endpoint_url=os.environ.get(S3_ENDPOINT_ENV) or None)
    return _s3_client


def _bucket() -> str:
    return os.environ.get(BUCKET_ENV, "taskmeter-demo")


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """A named phase of the current task (nothing when the worker does not measure)."""
    m = taskmeter.current()
    if m is None:
        yield
        return
    with m.phase(name):
        yield


def _run(kind: str, task_id: str, key: str, index_key: str, samples: list[str],
         region: str) -> dict[str, Any]:  # fmt: skip
    scratch = os.environ.get(SCRATCH_ENV) or None
    with tempfile.TemporaryDirectory(prefix="task-", dir=scratch) as tmp:
        work = Path(tmp)
        local = work / Path(key).name
        with phase("download"):
            s3().download_file(_bucket(), key, str(local))
            s3().download_file(_bucket(), index_key, str(work / Path(index_key).name))
        plan = steps.plan(kind, local, work, samples, region)
        for argv in plan.argvs:
            taskmeter.run(argv, check=True, capture_output=True)
        out_key = f"results/{task_id}/{plan.output.name}"
        with phase("upload"):
            s3().upload_file(str(plan.output), _bucket(), out_key)
        return {"output": out_key, "bytes": plan.output.stat().st_size}


@app.task(name=steps.SUBSET_QUERY, bind=True)  # type: ignore[untyped-decorator]
def subset_query(
    self: Any, key: str, index_key: str, samples: list[str], region: str
) -> dict[str, Any]:
    """Download a VCF, subset samples and a region, query genotypes, upload the TSV."""
    return _run(steps.SUBSET_QUERY, self.request.id, key, index_key, samples, region)


@app.task(name=steps.MERGE, bind=True)  # type: ignore[untyped-decorator]
def merge(self: Any, key: str, index_key: str, samples: list[str], region: str) -> dict[str, Any]:
    """Download a VCF, split it into two sample halves, merge them, upload the result."""
    return _run(steps.MERGE, self.request.id, key, index_key, samples, region)
