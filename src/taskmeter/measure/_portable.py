"""psutil fallback for systems without Linux's /proc (e.g. a developer's macOS laptop).

No resettable per-process peak exists there, so every peak from this reader is sampled.
"""

from __future__ import annotations

import os

import psutil

from taskmeter.measure.proc import ProcMem


class _Tree:
    def __init__(self, reader: PsutilReader, pid: int) -> None:
        self.reader, self.pid = reader, pid

    def read(self) -> list[ProcMem]:
        return self.reader.tree(self.pid)

    def close(self) -> None:
        pass


class PsutilReader:
    name = "psutil"

    def __init__(self) -> None:
        self._me = psutil.Process()

    def self_rss(self) -> int:
        if self._me.pid != os.getpid():  # forked since: do not read the parent
            self._me = psutil.Process()
        return int(self._me.memory_info().rss)

    def self_hwm(self) -> int | None:
        return None

    def reset_self_hwm(self) -> bool:
        return False

    def self_hwm_before_reset(self) -> int | None:
        return None

    def self_mem(self) -> tuple[int, int | None]:
        return self.self_rss(), None

    def open_tree(self, pid: int) -> _Tree:
        return _Tree(self, pid)

    def tree(self, pid: int) -> list[ProcMem]:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return []
        out = []
        for p in procs:
            try:
                if p.status() == psutil.STATUS_ZOMBIE:
                    continue
                out.append(ProcMem(p.pid, int(p.memory_info().rss), None))
            except psutil.Error:
                continue
        return out
