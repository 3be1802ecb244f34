"""Settings the demo's worker (:mod:`taskmeter.demo.app`) and its client share: the
environment variables ``taskmeter demo`` passes to the worker and the Celery
configuration. Importing this creates no Celery app."""

from __future__ import annotations

import os
from typing import Any

BROKER_ENV = "TASKMETER_DEMO_BROKER"
BROKER_DIR_ENV = "TASKMETER_DEMO_BROKER_DIR"
QUEUE_ENV = "TASKMETER_DEMO_QUEUE"
S3_ENDPOINT_ENV = "TASKMETER_DEMO_S3_ENDPOINT"
BUCKET_ENV = "TASKMETER_DEMO_BUCKET"
SCRATCH_ENV = "TASKMETER_DEMO_SCRATCH"
DEFAULT_QUEUE = "taskmeter-demo"


def transport_options(broker: str, broker_dir: str | None) -> dict[str, Any]:
    """kombu's filesystem transport: one folder both ends read and write."""
    if not broker.startswith("filesystem:"):
        return {}
    if not broker_dir:
        raise RuntimeError(f"{BROKER_ENV}={broker} needs {BROKER_DIR_ENV} (a shared folder)")
    queue = os.path.join(broker_dir, "queue")
    return {
        "data_folder_in": queue,
        "data_folder_out": queue,
        "processed_folder": os.path.join(broker_dir, "processed"),
        "store_processed": False,
        "control_folder": os.path.join(broker_dir, "control"),
        "polling_interval": 0.1,
    }


def configure(app: Any, broker: str, broker_dir: str | None, queue: str) -> Any:
    """The settings the demo's worker and its client share."""
    app.conf.update(
        broker_url=broker,
        broker_transport_options=transport_options(broker, broker_dir),
        broker_connection_retry_on_startup=True,
        task_default_queue=queue,
        task_ignore_result=True,
        task_acks_late=False,
        worker_prefetch_multiplier=1,
        worker_enable_remote_control=False,
        worker_send_task_events=False,
        worker_hijack_root_logger=False,
    )
    return app
