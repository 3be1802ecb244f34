"""Opt-in: every ``subprocess.Popen`` started inside a measured task becomes a tool run.

For code that cannot be changed call by call (a library that calls
``subprocess.run``), :func:`patch` replaces the ``subprocess`` module's ``Popen`` with
a subclass of taskmeter's :class:`~taskmeter.measure.tools.Popen`. ``subprocess.run``,
``call``, ``check_call``, ``check_output``, ``getoutput`` and ``os.popen`` look
``Popen`` up in the module at each call, so they go through it too.

- Inside a measurement (``taskmeter.current()`` in the constructing thread), the
  process is a tracked tool run: exact CPU from ``wait4``, the kernel's peaks, like
  ``taskmeter.Popen``. Same arguments, return values, attributes and exceptions as
  ``subprocess.Popen`` (``wait``, ``poll``, ``communicate``, timeouts, ``with``).
- Outside a measurement, and in threads that are not running a task, it *is*
  ``subprocess.Popen``: the constructor and every method defer to it unchanged.
- ``isinstance(p, subprocess.Popen)`` and ``issubclass(C, subprocess.Popen)`` keep
  their answers for objects and classes made before the patch.
- Not routed: code that bound ``Popen`` before the patch (``from subprocess import
  Popen`` at import time), and asyncio's subprocesses (asyncio reaps them itself, so
  taskmeter could not read their exit accounting; the sampler still finds them as
  untracked processes). Not patched at all when another library replaced
  ``subprocess.Popen`` after taskmeter was imported (a warning says so).

Reversible: :func:`unpatch` puts the original class back.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from typing import Any

from taskmeter.measure.tools import Popen as _ToolPopen

# The class taskmeter's Popen derives from: subprocess.Popen when taskmeter was imported.
ORIGINAL: type[subprocess.Popen[Any]] = _ToolPopen.__bases__[0]
_lock = threading.Lock()
_saved: Any = None
log = logging.getLogger("taskmeter.patch")


class _SameAsOriginal(type):
    """isinstance/issubclass against the patched name answer as for the original; a
    class derived from it after the patch (``class MyPopen(subprocess.Popen)``) answers
    as any class (a plain Popen is not a MyPopen)."""

    def __instancecheck__(cls, obj: Any) -> bool:
        if cls is PatchedPopen:
            return isinstance(obj, ORIGINAL)
        return type.__instancecheck__(cls, obj)

    def __subclasscheck__(cls, sub: type) -> bool:
        if cls is PatchedPopen:
            return issubclass(sub, ORIGINAL)
        return type.__subclasscheck__(cls, sub)


class PatchedPopen(_ToolPopen, metaclass=_SameAsOriginal):
    """``subprocess.Popen`` while :func:`patch` is in force."""

    def __init__(self, args: Any, *posargs: Any, **kwargs: Any) -> None:
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith("asyncio."):
            # asyncio's child watcher reaps with its own waitpid: not a tool run.
            self._taskmeter_watch = None
            ORIGINAL.__init__(self, args, *posargs, **kwargs)
            return
        super().__init__(args, *posargs, **kwargs)


def patch() -> bool:
    """Route ``subprocess.Popen`` through taskmeter inside measured tasks. Idempotent;
    returns False if it was already patched, or if ``subprocess.Popen`` is no longer
    the class taskmeter's Popen derives from (another library, gevent say, replaced it
    since: taskmeter leaves that one alone and says so)."""
    global _saved
    with _lock:
        if subprocess.Popen is PatchedPopen:
            return False
        if subprocess.Popen is not ORIGINAL:
            log.warning(
                "taskmeter: subprocess.Popen was replaced by %r; not patching it "
                "(TASKMETER_PATCH_SUBPROCESS ignored)",
                subprocess.Popen,
            )
            return False
        _saved = subprocess.Popen
        subprocess.Popen = PatchedPopen  # type: ignore[misc]
        return True


def unpatch() -> bool:
    """Put back the ``subprocess.Popen`` that :func:`patch` replaced; False if it was not
    patched (or someone patched over taskmeter since, whose patch is left alone)."""
    global _saved
    with _lock:
        if subprocess.Popen is not PatchedPopen:
            return False
        subprocess.Popen = _saved  # type: ignore[misc]
        _saved = None
        return True


def patched() -> bool:
    """Whether ``subprocess.Popen`` is taskmeter's now."""
    return subprocess.Popen is PatchedPopen
