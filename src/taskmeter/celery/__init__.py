"""Celery integration: ``taskmeter.celery.instrument(app)``.

Adapter code only: it wires Celery's worker and task signals to the measurement core
and ships reports to the worker's one exporter. The core never imports it.
"""

from taskmeter.celery.integration import TaskmeterStep, instrument, uninstrument

__all__ = ["TaskmeterStep", "instrument", "uninstrument"]
