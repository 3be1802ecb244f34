"""Human-readable quantities for tables and summaries (never used in records)."""

from __future__ import annotations

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def bytes_h(n: float) -> str:
    """1536 -> '1.5 KiB'; binary units, as Kubernetes quantities use."""
    value = float(n)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def seconds_h(s: float) -> str:
    """0.0123 -> '12.3 ms'; 75 -> '1m15.0s'."""
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    if s < 60:
        return f"{s:.2f} s"
    minutes, rest = divmod(s, 60)
    if minutes < 60:
        return f"{minutes:.0f}m{rest:04.1f}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours:.0f}h{minutes:02.0f}m"
