"""Checks of command-line input that end in a message and an exit code, never a traceback.

Option values are checked by click before a command does anything (exit 2, the
option named); ``taskmeter run`` maps a command that cannot be started to the
shell's exit codes (127 not found, 126 found but not executable).
"""

from __future__ import annotations

import errno
import math
import os
import secrets
from pathlib import Path
from typing import Any

import click

# The shell's exit codes for a command it could not start (POSIX, "Command Search and
# Execution"): 127 not found, 126 found but not executable.
EXIT_NOT_FOUND = 127
EXIT_CANNOT_EXECUTE = 126


class FiniteFloat(click.FloatRange):
    """``click.FloatRange`` that also refuses ``nan`` and ``inf`` (which pass a range
    check: every comparison with nan is false)."""

    name = "float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


class SettingError(click.ClickException):
    """A bad environment setting (e.g. ``TASKMETER_SAMPLE_INTERVAL``): a message and
    exit 2, as for a bad option, without the usage line of an option error."""

    exit_code = 2


def output_file(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Callback of ``-o/--output``: the file's folder must exist and be writable, and
    the path must not be a folder, checked before the command does any work."""
    if value is None:
        return value
    parent = os.path.dirname(os.path.abspath(value))
    if os.path.isdir(value):
        raise click.BadParameter(f"{value!r} is a directory; give a file name in it")
    if not os.path.isdir(parent):
        what = "is not a directory" if os.path.exists(parent) else "does not exist"
        raise click.BadParameter(f"cannot write {value!r}: directory {parent!r} {what}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise click.BadParameter(f"cannot write {value!r}: directory {parent!r} is not writable")
    if os.path.exists(value) and not os.access(value, os.W_OK):
        raise click.BadParameter(f"cannot write {value!r}: permission denied")
    return value


def cannot_start(command: str, exc: OSError) -> tuple[int, str]:
    """Exit code and message for a command that could not be started, as a shell says
    them: 127 for not found, 126 for found but not executable."""
    if exc.errno == errno.ENOENT or not command:
        if os.sep in command:
            return EXIT_NOT_FOUND, f"{command}: No such file or directory"
        return EXIT_NOT_FOUND, f"{command}: command not found"
    if os.path.isdir(command):
        return EXIT_CANNOT_EXECUTE, f"{command}: Is a directory"
    reason = exc.strerror or str(exc)
    return EXIT_CANNOT_EXECUTE, f"{command}: {reason}"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a new file beside ``path``, then rename it over ``path``: readers
    see the old file or the whole new one, and a failure leaves no partial file."""
    directory = path.parent
    tmp = directory / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(tmp, flags, 0o666)  # the umask applies, as for any new file
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
