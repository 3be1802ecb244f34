"""Parsers for command-line values shared by the commands (click callbacks)."""

from __future__ import annotations

import click

DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_QUANTITY_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 10**3, "M": 10**6, "G": 10**9}


def duration_s(ctx: click.Context, param: click.Parameter, value: str) -> float:
    """Seconds from ``90s``, ``30m``, ``12h``, ``7d`` or ``2w``."""
    text = value.strip()
    unit = text[-1:]
    try:
        seconds = float(text[:-1]) * DURATION_UNITS[unit]
    except (KeyError, ValueError):
        raise click.BadParameter(f"{value!r}: expected a duration like 90s, 30m, 12h, 7d") from None
    if not seconds > 0 or seconds == float("inf"):
        raise click.BadParameter(f"{value!r}: must be a positive duration")
    return seconds


def memory_bytes(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """Bytes from ``150Mi``, ``2Gi``, ``500M`` or a plain number; None stays None."""
    if value is None:
        return None
    text = value.strip()
    for suffix, factor in _QUANTITY_UNITS.items():
        if text.endswith(suffix):
            number, scale = text[: -len(suffix)], factor
            break
    else:
        number, scale = text, 1
    try:
        amount = float(number) * scale
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected bytes or a quantity like 150Mi") from None
    if not 0 <= amount < float("inf"):
        raise click.BadParameter(f"{value!r}: must not be negative")
    return int(amount)
