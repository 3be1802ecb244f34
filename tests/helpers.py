"""Shared ground-truth helpers: child processes that report their own kernel figures."""

from __future__ import annotations

import functools
import importlib
import os
import shutil
import socket
import sys
import textwrap
from collections.abc import Callable
from types import ModuleType
from typing import Any, NoReturn, TypeVar

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


def is_timerfd(fd: int) -> bool:
    """Whether this process's descriptor ``fd`` is open on a timerfd."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[timerfd]"
    except OSError:  # not open
        return False


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


# -- What a test needs from the machine -------------------------------------------------
# Under CI (env CI=true, as CI runners set it) a missing tool or service FAILS the test:
# a green CI run must never mean "most integration tests were skipped". Locally the
# test is skipped with the reason (pytest -ra lists them). Every such check in tests/
# goes through unavailable(), never through pytest.skip directly.


def strict() -> bool:
    """True under CI: env CI is "true", "1" or "yes" (any case)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def unavailable(reason: str) -> NoReturn:
    """This test cannot run here for ``reason``: fail under CI, skip otherwise."""
    if strict():
        pytest.fail(f"{reason} [CI=true: a missing tool or service fails the run]", pytrace=False)
    pytest.skip(reason)


def require(tool: str, *more: str) -> str:
    """Path of the executable ``tool`` (and check ``more`` tools too); unavailable() when
    one is not on PATH."""
    missing = [t for t in (tool, *more) if shutil.which(t) is None]
    if missing:
        unavailable(f"{', '.join(missing)} not installed (scripts/setup.sh installs it)")
    path = shutil.which(tool)
    assert path is not None
    return path


def require_path(path: str | os.PathLike[str], what: str) -> str:
    """``path`` when it exists; unavailable() naming ``what`` otherwise."""
    if not os.path.exists(path):
        unavailable(f"{path} is absent ({what})")
    return os.fspath(path)


def require_module(name: str, what: str = "pip install -e '.[dev]'") -> ModuleType:
    """``import name``; unavailable() when it cannot be imported."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        unavailable(f"Python module {name} cannot be imported ({e}; {what})")


def service_up(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    """A server (Redis, RabbitMQ, ...) answering on host:port; unavailable() otherwise."""
    if not service_up(host, port):
        unavailable(f"{name} is not running on {host}:{port} (scripts/services.sh starts it)")


F = TypeVar("F", bound=Callable[..., Any])


def requires(*tools: str) -> Callable[[F], F]:
    """Decorator form of require() for a test function (fixtures keep working)."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def test(*args: Any, **kwargs: Any) -> Any:
            require(*tools)
            return fn(*args, **kwargs)

        return test  # type: ignore[return-value]

    return wrap


linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="exact peaks need Linux /proc"
)
