"""Sinks for :class:`~taskmeter.measure.report.TaskReport`: Prometheus metrics
(:class:`TaskMetrics`, a custom collector) and the JSON-lines ledger (:class:`Ledger`).
"""

from taskmeter.export.ledger import Ledger, LedgerProblem, ledger_paths, read_ledgers
from taskmeter.export.metrics import (
    MEMORY_BUCKETS,
    QUEUE_WAIT_BUCKETS,
    TIME_BUCKETS,
    WALL_BUCKETS,
    InflightTask,
    TaskMetrics,
)

__all__ = [
    "MEMORY_BUCKETS",
    "QUEUE_WAIT_BUCKETS",
    "TIME_BUCKETS",
    "WALL_BUCKETS",
    "InflightTask",
    "Ledger",
    "LedgerProblem",
    "TaskMetrics",
    "ledger_paths",
    "read_ledgers",
]
