"""The measurement core: framework-free, one :class:`TaskReport` per task.

Knows nothing of Celery or Prometheus; everything downstream consumes the report.
"""

from taskmeter.measure.core import Measurement, current, measure
from taskmeter.measure.report import (
    SCHEMA,
    PhaseStats,
    ProcessStats,
    TaskReport,
    ToolRun,
    ToolTotals,
)
from taskmeter.measure.sampler import configure, wait_idle
from taskmeter.measure.tools import Popen, run

__all__ = [
    "SCHEMA",
    "Measurement",
    "PhaseStats",
    "Popen",
    "ProcessStats",
    "TaskReport",
    "ToolRun",
    "ToolTotals",
    "configure",
    "current",
    "measure",
    "run",
    "wait_idle",
]
