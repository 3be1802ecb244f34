"""Optional parts of taskmeter and the pip extra that installs each.

The base install is what a worker image needs (measuring, Celery, Prometheus export,
sizing). Commands that need more name their extra instead of failing on an import.
"""

from __future__ import annotations

import importlib.util

import click

# extra -> modules it provides
EXTRAS: dict[str, tuple[str, ...]] = {
    "demo": ("boto3", "moto", "plotly"),
    "report": ("plotly",),
    "otel": ("opentelemetry",),
}


def missing(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here."""
    return [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]


def require(extra: str, command: str) -> None:
    """Exit 2 with a message naming the extra when ``command`` cannot run here."""
    absent = missing(extra)
    if absent:
        click.echo(
            f"Error: taskmeter {command} needs the '{extra}' extra (missing: "
            f"{', '.join(absent)}). Install it with: pip install 'taskmeter[{extra}]'",
            err=True,
        )
        raise SystemExit(2)
