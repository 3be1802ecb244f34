"""Fixtures that start real services (see workerkit.py)."""

from workerkit import prometheus, start_worker

__all__ = ["prometheus", "start_worker"]
