"""Shared ground-truth helpers: child processes that report their own kernel figures."""

from __future__ import annotations

import shutil
import sys
import textwrap

import pytest

PY = sys.executable


def child(*parts: str) -> list[str]:
    """argv of a Python child running the code ``parts`` (each dedented), in order."""
    return [PY, "-c", "\n".join(textwrap.dedent(p) for p in parts)]


# Prints the child's own peak RSS (VmHWM, bytes) as its last line: the ground truth a
# tool's reported peak is checked against.
PRINT_OWN_HWM = """
def _own_hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
print(_own_hwm(), flush=True)
"""


def burn_cpu(seconds: float) -> None:
    """Burn ``seconds`` of this thread's CPU in pure Python."""
    import time

    t0 = time.thread_time()
    x = 0
    while time.thread_time() - t0 < seconds:
        x += 1


def burn_child(seconds: float) -> list[str]:
    return child(
        f"""
        import time
        t0 = time.process_time()
        while time.process_time() - t0 < {seconds}:
            pass
        """
    )


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        import os

        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (scripts/setup.sh installs it)")
    return path


linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="exact peaks need Linux /proc"
)
