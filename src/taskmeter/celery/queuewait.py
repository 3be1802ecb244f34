"""Queue wait: the time a task waited between being sent and starting in a worker.

The sender stamps each message at publish (``before_task_publish``) with its wall
clock in the header :data:`HEADER`; the worker subtracts it from the task's start.
Two clocks are involved when sender and worker run on different hosts: a worker whose
clock is behind the sender's would see a negative wait, which is clamped to 0 (the
error is the clock skew, usually milliseconds under NTP). A task with an ETA or a
countdown waits from its ETA, not from publish: waiting for the ETA is what was asked.
A message without the stamp (a sender without taskmeter) has no wait: ``None``,
never 0.
"""

from __future__ import annotations

import math
import time
from datetime import datetime, timezone
from typing import Any

HEADER = "taskmeter_published"


def stamp(headers: Any = None, **_: Any) -> None:
    """``before_task_publish`` receiver: add the publish time to the message headers
    (protocol 2: ``headers`` is the message's own header dict). Always overwritten: a
    retry re-publishes with the old request's headers, and waits from its own publish."""
    if isinstance(headers, dict):
        headers[HEADER] = time.time()


def _epoch(value: Any) -> float | None:
    """An ETA as Celery carries it (ISO 8601 string or datetime) in epoch seconds."""
    if value is None:
        return None
    if isinstance(value, str):
        if value.endswith(("Z", "z")):  # Python 3.10's fromisoformat wants +00:00
            value = value[:-1] + "+00:00"
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return float(value.timestamp())
    return None


def wait_s(request: Any, started_epoch: float) -> float | None:
    """Seconds ``request`` (a task's ``self.request``) waited before starting at
    ``started_epoch``; None when the sender did not stamp the message, or stamped
    something that is not a finite time (the ledger holds strict JSON)."""
    published = getattr(request, HEADER, None)
    if published is None:
        headers = getattr(request, "headers", None)
        if isinstance(headers, dict):
            published = headers.get(HEADER)
    if not isinstance(published, (int, float)) or isinstance(published, bool):
        return None
    ref = float(published)
    if not math.isfinite(ref):
        return None
    eta = _epoch(getattr(request, "eta", None))
    if eta is not None and eta > ref:
        ref = eta
    wait = max(0.0, started_epoch - ref)
    return wait if math.isfinite(wait) else None
