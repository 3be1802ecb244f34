"""What the demo needs before it starts: bcftools on PATH."""

from __future__ import annotations

import shutil


class DemoError(RuntimeError):
    """Something the user must fix before the demo can run (it says what)."""


def require_bcftools() -> None:
    missing = [t for t in ("bcftools", "bgzip") if shutil.which(t) is None]
    if missing:
        raise DemoError(
            f"{' and '.join(missing)} not found on PATH. Install them with "
            "`make setup` (Debian: apt-get install bcftools tabix)."
        )
