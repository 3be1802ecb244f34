"""A pool process's outbox: the records of the tasks it ended, left in a shared file
mapping for the main process to collect in batches, instead of one message per task.

A message per task costs the main process a read, a parse and a ledger write per task,
with caches gone cold between tasks (docs/benchmarks.md, issue 10). An outbox entry is
two memory copies in the pool process and nothing in the main process until it
collects (transport.py): at its ``POLL_S`` timer, before a scrape or a verdict of its
own, when a pool process exits, and at shutdown, all entries of all outboxes at once,
in one ledger write.

Where it lives decides what survives. In the in-flight journal's folder (the usual
case) the file is shared memory backed by the page cache, which outlives the death of
every process of the worker (a container OOM kill): the next incarnation collects what
its predecessor's main process had not (:func:`leftovers`), so a whole-worker kill loses
no record of a task that ended. Without the journal it lives in a private temporary
folder, removed at shutdown.

Layout of ``<pid>-<n>.outbox`` (connection ``n`` of pool process ``pid``: a new file
per connection, never one the main process may still map; ``SIZE`` bytes, allocated
on disk when made, so a full disk cannot fault a write into it): a 64-byte header
(magic, the data area's size; then, as 8-byte native integers written with one store
each, the producer's write position, the consumer's read position, the position up
to which the consumer took entries to write; then the state byte: 0 not yet attached
by the main process, 1 attached, 2 detached), then the data area, a ring of 8-aligned
entries: length (u32), crc32 of the payload seeded with the entry's position (u32),
payload (one report line, as the channel carries it). An entry that does not fit
before the end of the ring leaves a wrap marker (length ``0xFFFFFFFF``, and the seed
of its position) and starts again at its beginning. Positions only grow.

One producer (the pool process, under its sender's lock) and one consumer (the main
process, one reader at a time). The producer writes only while the main process has
attached the outbox (else it sends through the channel), an entry before its new
write position. The consumer reads up to that position and checks each entry: its
crc, seeded with its position, tells a whole entry from one a weakly ordered CPU
shows before its bytes (zeroes, or the entry of an earlier lap of the ring at the
same place), which stops the read until the next collection. Before it writes the
entries' records it stores how far it took them; after, its read position. So a
restart (:func:`leftovers`) knows which entries were surely not written and which
may have been.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import re
import struct
import zlib
from pathlib import Path
from typing import NamedTuple

from taskmeter.celery.journal import map_shared

log = logging.getLogger("taskmeter.outbox")

SUFFIX = ".outbox"
SIZE = 1 << 20  # bytes per pool process and channel (page cache, and its disk blocks)
_MAGIC = b"TMO1"
_HEAD = 64
_CAP = SIZE - _HEAD
# magic, data area size; then positions, 8-byte native integers read and written
# through a memoryview of the map (one load or store each, never seen half written:
# struct.pack_into zeroes its bytes before it copies the value in): write at 16 (index
# 2 of the view), read at 24 (3), taken at 32 (4); the state byte at 40
_H = struct.Struct("<4s4xQ")
_W, _R, _T = 2, 3, 4
_STATE = 40
_ATTACHED, _DETACHED = 1, 2
_E = struct.Struct("<II")  # entry: payload length, crc32 seeded with its position
_WRAP = 0xFFFFFFFF
NAME = re.compile(r"^(\d+)-(\d+)\.outbox$")


def _seed(pos: int) -> int:
    """The crc seed of an entry at ``pos``: never 0 for an 8-aligned position, so a
    zeroed slot never checks as an empty entry."""
    return (pos ^ 0x5A5A5A5A) & 0xFFFFFFFF


def _aligned(n: int) -> int:
    return (n + 7) & ~7


def path_of(folder: Path, pid: int, n: int) -> Path:
    return folder / f"{pid}-{n}{SUFFIX}"


class Outbox:
    """One pool process's outbox, mapped shared: :meth:`put` in the pool process,
    :meth:`take` and :meth:`commit` in the main process."""

    __slots__ = ("_mm", "_pending", "_q", "_r", "_w", "path")

    def __init__(self, mm: mmap.mmap, path: Path) -> None:
        self._mm, self.path = mm, path
        self._q = memoryview(mm).cast("Q")  # the positions (released at close)
        self._pending = -1  # the consumer's position after what take() returned
        # The producer's own copies: its write position (it alone writes it), and the
        # read position as it last read it (re-read only when the ring looks full).
        # Fewer reads of the shared map per entry: with cold caches each costs µs.
        self._w: int = self._q[_W]
        self._r: int = self._q[_R]

    @classmethod
    def create(cls, folder: Path, pid: int, n: int) -> Outbox:
        """The pool process's side: a new, empty outbox for its connection ``n`` (a
        stale file of that name, a reused pid's, is replaced: its map elsewhere, if
        any, keeps the old file, never shrunk under it). Made under a temporary name
        and renamed into place whole."""
        path = path_of(folder, pid, n)
        tmp = path.with_name(path.name + ".new")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        mm = map_shared(tmp, SIZE, new=True)
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
    def attach(cls, path: Path, *, recovering: bool = False) -> Outbox:
        """The main process's side: map an outbox a pool process made, and tell it so
        (it writes entries only from then on; not when ``recovering`` a dead one's).
        Raises OSError (or ValueError for a file that is not an outbox)."""
        mm = map_shared(path, SIZE)
        magic, cap = _H.unpack_from(mm, 0)
        if magic != _MAGIC or cap != _CAP:
            mm.close()
            raise ValueError(f"{path} is not a taskmeter outbox")
        if not recovering:
            mm[_STATE] = _ATTACHED
        return cls(mm, path)

    # -- the pool process -----------------------------------------------------------------
    @property
    def attached(self) -> bool:
        """Whether the main process reads this outbox now (put() may succeed); False
        once closed (another thread's reconnection may close it at any time)."""
        try:
            return self._mm[_STATE] == _ATTACHED
        except ValueError:  # closed
            return False

    def put(self, payload: bytes) -> bool:
        """Leave one entry; False (nothing written) when it does not fit, or the main
        process does not read this outbox (yet, or any more): the caller sends it
        another way."""
        mm = self._mm
        if mm[_STATE] != _ATTACHED:
            return False
        n = len(payload)
        need = 8 + _aligned(n)
        w = self._w
        at = w % _CAP
        room = _CAP - at
        want = need + room if need > room else need  # (a wrap wastes the ring's end)
        if want > _CAP - (w - self._r):  # full, as last seen: what was freed since?
            self._r = self._q[_R]
            if want > _CAP - (w - self._r):
                return False
        if need > room:  # does not fit before the ring's end: a wrap marker, then 0
            _E.pack_into(mm, _HEAD + at, _WRAP, _seed(w))
            w += room
            at = 0
        start = _HEAD + at
        _E.pack_into(mm, start, n, zlib.crc32(payload, _seed(w)))
        mm[start + 8 : start + 8 + n] = payload
        self._w = w = w + need
        self._q[_W] = w  # last: the entry is whole before it counts
        return True

    # -- the main process -----------------------------------------------------------------
    def take(self) -> list[bytes]:
        """The entries left since the last :meth:`commit` (or the last take), in order.
        An entry that does not check stops the read: it is taken at the next call (see
        the module's docstring)."""
        r = self._pending if self._pending >= 0 else self._q[_R]
        out, self._pending = self._scan(r)
        return [payload for _, payload in out]

    def _scan(self, r: int) -> tuple[list[tuple[int, bytes]], int]:
        """The whole entries from position ``r`` on (each with its position), and the
        position after them."""
        mm = self._mm
        w = self._q[_W]
        out: list[tuple[int, bytes]] = []
        while r < w:
            at = r % _CAP
            n, crc = _E.unpack_from(mm, _HEAD + at)
            if n == _WRAP:
                if crc != _seed(r):
                    break  # not whole yet (or not a marker of this lap)
                r += _CAP - at
                continue
            need = 8 + _aligned(n)
            if n == 0 or need > _CAP - at or r + need > w:
                break  # not whole (yet)
            payload = mm[_HEAD + at + 8 : _HEAD + at + 8 + n]
            if zlib.crc32(payload, _seed(r)) != crc:
                break
            out.append((r, payload))
            r += need
        return out, r

    def stuck(self) -> bool:
        """Entries remain that :meth:`take` could not read (a torn one)."""
        r = self._pending if self._pending >= 0 else self._q[_R]
        w: int = self._q[_W]
        return r < w

    def mark_taken(self) -> None:
        """Before the records of what :meth:`take` returned are written: how far they
        go (a restart then knows which entries may have been written)."""
        if self._pending >= 0:
            self._q[_T] = self._pending

    def commit(self) -> None:
        """What :meth:`take` returned is handled (its records written): free its room."""
        if self._pending >= 0:
            self._q[_R] = self._pending

    def detach(self) -> None:
        """The main process stops reading this outbox: the producer sends through the
        channel from now on (it may have begun one more entry: take after this)."""
        self._mm[_STATE] = _DETACHED

    def close(self) -> None:
        self._q.release()
        with contextlib.suppress(BufferError, ValueError):
            self._mm.close()

    def remove(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class Leftover(NamedTuple):
    """What a previous incarnation left in one outbox (see :func:`leftovers`)."""

    path: Path
    maybe: list[bytes]  # taken to be written when it died: perhaps in the ledger
    fresh: list[bytes]  # never taken: surely not in the ledger
    end: int  # the position after the last entry (for note_taken)


def leftovers(folder: Path) -> list[Leftover]:
    """What a previous incarnation's main process left in the outboxes in ``folder``
    (which the caller removes once it handled them), per file: the entries it had
    taken and may have written to the ledger before it died, and those it surely had
    not. A file that is not an outbox is listed with no entries. Nothing is noted in
    the files: the caller calls :func:`note_taken` right before it writes."""
    out: list[Leftover] = []
    for path in sorted(folder.glob("*" + SUFFIX)):
        if not NAME.match(path.name):
            continue
        try:
            box = Outbox.attach(path, recovering=True)
        except (OSError, ValueError) as exc:
            log.warning("taskmeter: ignored outbox %s: %s", path, exc)
            out.append(Leftover(path, [], [], 0))
            continue
        try:
            t = box._q[_T]
            entries, end = box._scan(box._q[_R])
        finally:
            box.close()
        # taken up to t before the death: those entries may be in the ledger already
        maybe = [payload for pos, payload in entries if pos < t]
        fresh = [payload for pos, payload in entries if pos >= t]
        out.append(Leftover(path, maybe, fresh, end))
    return out


def note_taken(left: Leftover) -> None:
    """Note in its file that ``left``'s entries are taken to be written (right before
    the write): a restart after a death midway looks them up rather than write them
    again."""
    if not left.maybe and not left.fresh:
        return
    try:
        box = Outbox.attach(left.path, recovering=True)
    except (OSError, ValueError) as exc:
        log.warning("taskmeter: could not note outbox %s as taken: %s", left.path, exc)
        return
    try:
        box._q[_T] = max(box._q[_T], left.end)
    finally:
        box.close()
