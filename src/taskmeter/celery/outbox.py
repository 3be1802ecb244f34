"""A pool process's outbox: the records of the tasks it ended, left in a shared file
mapping for the main process to collect in batches, instead of one message per task.

A message per task costs the main process a read, a parse and a ledger write per task,
with caches gone cold between tasks (docs/benchmarks.md, issue 10). An outbox entry is
two memory copies in the pool process and nothing in the main process until it
collects: at its ``POLL_S`` timer, before a scrape, when a pool process exits, and at
shutdown, all entries of all outboxes at once, in one ledger write.

Where it lives decides what survives. In the in-flight journal's folder (the usual
case) the file is shared memory backed by the page cache, which outlives the death of
every process of the worker (a container OOM kill): the next incarnation collects what
its predecessor's main process had not (:func:`recover`), so a whole-worker kill loses
no record of a task that ended. Without the journal it lives in a private temporary
folder, removed at shutdown.

Layout of ``<pid>.outbox`` (``SIZE`` bytes, little-endian): a 64-byte header (magic,
the data area's size, the producer's write position, the consumer's read position;
positions only grow), then the data area, a ring of 8-aligned entries: length (u32),
crc32 of the payload (u32), payload (one report line, as the channel carries it). An
entry that does not fit before the end of the ring leaves a wrap marker (length
``0xFFFFFFFF``) and starts again at its beginning. One producer (the pool process,
under the sender's lock) and one consumer (the main process, one reader at a time):
the producer writes an entry, then its new write position; the consumer reads up to
that position, checks each entry's crc (a position seen before its entry, as weakly
ordered CPUs may show it, stops the read until the next collection), and writes its
read position once the entries' records are written.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import re
import stat
import struct
import zlib
from pathlib import Path

log = logging.getLogger("taskmeter.outbox")

SUFFIX = ".outbox"
SIZE = 1 << 20  # bytes per pool process (sparse: only what entries touched is memory)
_MAGIC = b"TMO1"
_HEAD = 64
_CAP = SIZE - _HEAD
# magic, data area size; write position at 16, read position at 24
_H = struct.Struct("<4s4xQ")
_POS = struct.Struct("<Q")
_W, _R = 16, 24
_E = struct.Struct("<II")  # entry: payload length, crc32
_WRAP = 0xFFFFFFFF
_NAME = re.compile(r"^(\d+)\.outbox$")


def _aligned(n: int) -> int:
    return (n + 7) & ~7


def _map(path: Path, create: bool) -> mmap.mmap:
    flags = os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    if create:
        flags |= os.O_CREAT | os.O_EXCL
    fd = os.open(path, flags, 0o600)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        if create:
            os.ftruncate(fd, SIZE)
        elif st.st_size != SIZE:
            raise OSError(errno.EINVAL, f"{st.st_size} bytes, not {SIZE}", str(path))
        return mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


def path_of(folder: Path, pid: int) -> Path:
    return folder / f"{pid}{SUFFIX}"


class Outbox:
    """One pool process's outbox, mapped shared: :meth:`put` in the pool process,
    :meth:`take` and :meth:`commit` in the main process."""

    __slots__ = ("_mm", "_pending", "_r", "_w", "path")

    def __init__(self, mm: mmap.mmap, path: Path) -> None:
        self._mm, self.path = mm, path
        self._pending = -1  # the consumer's position after what take() returned
        # The producer's own copies: its write position (it alone writes it), and the
        # read position as it last read it (re-read only when the ring looks full).
        # Fewer reads of the shared map per entry: with cold caches each costs µs.
        self._w = _POS.unpack_from(mm, _W)[0]
        self._r = _POS.unpack_from(mm, _R)[0]

    @classmethod
    def create(cls, folder: Path, pid: int) -> Outbox:
        """The pool process's side: a new, empty outbox. Made under a temporary name
        and renamed into place, so a file of the same name the main process still maps
        (an earlier connection's) is replaced, never shrunk under its map (SIGBUS)."""
        path = path_of(folder, pid)
        tmp = path.with_name(path.name + ".new")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        mm = _map(tmp, create=True)
        try:
            _H.pack_into(mm, 0, _MAGIC, _CAP)
            os.replace(tmp, path)
        except BaseException:
            mm.close()
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return cls(mm, path)

    @classmethod
    def attach(cls, path: Path) -> Outbox:
        """The main process's side: map an outbox a pool process made. Raises OSError
        (or ValueError for a file that is not an outbox)."""
        mm = _map(path, create=False)
        magic, cap = _H.unpack_from(mm, 0)
        if magic != _MAGIC or cap != _CAP:
            mm.close()
            raise ValueError(f"{path} is not a taskmeter outbox")
        return cls(mm, path)

    # -- the pool process -----------------------------------------------------------------
    def put(self, payload: bytes) -> bool:
        """Leave one entry; False (nothing written) when it does not fit: the caller
        sends it another way."""
        mm = self._mm
        n = len(payload)
        need = 8 + _aligned(n)
        w = self._w
        at = w % _CAP
        room = _CAP - at
        want = need + room if need > room else need  # (a wrap wastes the ring's end)
        if want > _CAP - (w - self._r):  # full, as last seen: what was freed since?
            self._r = _POS.unpack_from(mm, _R)[0]
            if want > _CAP - (w - self._r):
                return False
        if need > room:  # does not fit before the ring's end: a wrap marker, then 0
            _E.pack_into(mm, _HEAD + at, _WRAP, 0)
            w += room
            at = 0
        start = _HEAD + at
        _E.pack_into(mm, start, n, zlib.crc32(payload))
        mm[start + 8 : start + 8 + n] = payload
        self._w = w = w + need
        _POS.pack_into(mm, _W, w)  # last: the entry is whole before it counts
        return True

    # -- the main process -----------------------------------------------------------------
    def take(self) -> list[bytes]:
        """The entries left since the last :meth:`commit` (or the last take), in order.
        An entry whose crc does not match yet stops the read: it is
        taken at the next call (see the module's docstring)."""
        mm = self._mm
        w = _POS.unpack_from(mm, _W)[0]
        r = self._pending if self._pending >= 0 else _POS.unpack_from(mm, _R)[0]
        out: list[bytes] = []
        while r < w:
            at = r % _CAP
            if _CAP - at < 8:  # cannot happen with 8-aligned entries; never loop on it
                r += _CAP - at
                continue
            n, crc = _E.unpack_from(mm, _HEAD + at)
            if n == _WRAP:
                r += _CAP - at
                continue
            need = 8 + _aligned(n)
            if need > _CAP - at or r + need > w:
                break  # not whole (yet)
            payload = mm[_HEAD + at + 8 : _HEAD + at + 8 + n]
            if zlib.crc32(payload) != crc:
                break
            out.append(payload)
            r += need
        self._pending = r
        return out

    def stuck(self) -> bool:
        """Entries remain that :meth:`take` could not read (a torn one)."""
        r = self._pending if self._pending >= 0 else _POS.unpack_from(self._mm, _R)[0]
        w: int = _POS.unpack_from(self._mm, _W)[0]
        return r < w

    def commit(self) -> None:
        """What :meth:`take` returned is handled (its records written): free its room."""
        if self._pending >= 0:
            _POS.pack_into(self._mm, _R, self._pending)

    def close(self) -> None:
        with contextlib.suppress(BufferError, ValueError):
            self._mm.close()

    def remove(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def leftovers(folder: Path) -> list[tuple[Path, list[bytes]]]:
    """The entries a previous incarnation's main process had not collected, per outbox
    file in ``folder`` (which the caller removes once the entries are handled); a file
    that is not an outbox is reported with no entries."""
    out: list[tuple[Path, list[bytes]]] = []
    for path in sorted(folder.glob("*" + SUFFIX)):
        if not _NAME.match(path.name):
            continue
        try:
            box = Outbox.attach(path)
        except (OSError, ValueError) as exc:
            log.warning("taskmeter: ignored outbox %s: %s", path, exc)
            out.append((path, []))
            continue
        try:
            out.append((path, box.take()))
        finally:
            box.close()
    return out
