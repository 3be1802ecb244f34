"""taskmeter: what each Celery task really costs.

import taskmeter

with taskmeter.measure("vcf.query", task_id) as m:
    with m.phase("download"):
        fetch(...)
    taskmeter.run(["bcftools", "query", ...], check=True)
print(m.report.to_json())
"""

from taskmeter.measure import (
    SCHEMA,
    Measurement,
    PhaseStats,
    Popen,
    ProcessStats,
    TaskReport,
    ToolRun,
    ToolTotals,
    configure,
    current,
    measure,
    run,
    wait_idle,
)

__version__ = "0.1.0"

__all__ = [
    "SCHEMA",
    "Measurement",
    "PhaseStats",
    "Popen",
    "ProcessStats",
    "TaskReport",
    "ToolRun",
    "ToolTotals",
    "__version__",
    "configure",
    "current",
    "measure",
    "run",
    "wait_idle",
]
