"""One reader interface over the operating system's process accounting.

Callers never branch on the platform: they use :data:`READER`. On Linux it reads
``/proc`` directly (a few microseconds a call, and the kernel's high-water marks);
elsewhere it falls back to psutil, where peaks can only be sampled.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class ProcMem:
    """Memory of one live process: its current RSS and, where the OS keeps one, its
    own peak since exec (``VmHWM``)."""

    pid: int
    rss_bytes: int
    hwm_bytes: int | None


class OpenTree(Protocol):
    def read(self) -> list[ProcMem]:
        """What ``tree(pid)`` gives, now."""

    def close(self) -> None: ...


class ProcReader(Protocol):
    name: str

    def self_rss(self) -> int:
        """RSS of the calling process, in bytes."""

    def self_hwm(self) -> int | None:
        """The calling process's peak RSS since exec or the last reset; None if unknown."""

    def reset_self_hwm(self) -> bool:
        """Reset the calling process's peak to its current RSS; False if not permitted."""

    def self_mem(self) -> tuple[int, int | None]:
        """(RSS, peak RSS or None) of the calling process, in one read where possible."""

    def tree(self, pid: int) -> list[ProcMem]:
        """Memory of ``pid`` and its live descendants; empty once ``pid`` has exited."""

    def open_tree(self, pid: int) -> OpenTree:
        """``tree(pid)`` to read repeatedly (keeps files open where that is cheaper)."""


def _select() -> ProcReader:
    if sys.platform.startswith("linux"):
        from taskmeter.measure._linux import LinuxReader

        reader = LinuxReader()
        if reader.usable():
            return reader
    from taskmeter.measure._portable import PsutilReader

    return PsutilReader()


READER: ProcReader = _select()
