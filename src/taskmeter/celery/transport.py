"""Pool processes -> main worker process: newline-delimited JSON over a Unix socket.

A task's end is one line ``E<head JSON>\t<record JSON>``: the record exactly as the
ledger writes it, encoded once in the pool process (which runs in parallel), handed to
``on_message`` as ``{"type": "end-line", "head": ..., "body": bytes}`` unparsed (the
head: see ``_Worker._on_message`` in integration.py). Most ends of short tasks are an
outbox entry ``R<figures packed>`` instead (``Measurement.finish_packed``), handed on as
``{"type": "end-packed", "entry": bytes}``: the main process builds their records in
its batches, with warm caches, where a pool process would build each with cold ones.

Why not prometheus_client's multiprocess mode: it needs PROMETHEUS_MULTIPROC_DIR, leaves
one file per process that ever lived (recycled children pile up), and cannot tell a
killed task from a finished one. Instead each prefork child sends its task starts and
finished reports to the main process, which owns the only collector and endpoint.

The socket lives in Linux's abstract namespace (nothing on disk to leak); elsewhere a
file in a private temporary directory. A channel counts only if its first line carries
a random token the pool processes inherited in memory through fork (it is in no
environment, file or command line) and, on Linux, if its peer runs as the same user
(SO_PEERCRED), so another process in the pod cannot inject figures. (Checking that the
peer is a child of this worker would race: a recycled child may exit before its
channel is accepted, its messages still queued.)

Task ends after a pool process's first go into its outbox (outbox.py) rather than its
channel, while the main process collects outboxes (with Celery's event loop, or its
own thread): the main process then handles them in batches, at its POLL_S timer, and
at once before a scrape or a verdict of its own (``collect``) or after a pool process
exits. The channel stays
for the first message (its hello names the outbox), for starts and tools, for ends the
main process judges (killed, revoked), and for an entry that does not fit.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import mmap
import os
import secrets
import select
import selectors
import socket
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from taskmeter.celery.journal import pid_alive
from taskmeter.celery.outbox import NAME, Outbox
from taskmeter.measure.report import json_bytes, loads

log = logging.getLogger("taskmeter.transport")

Message = dict[str, Any]
# The listener handles what arrived, then lets messages gather this long (seconds): a
# report reaches the main process at most this much later, and a busy worker's main
# process wakes up at most 1 / COALESCE_S times a second for them.
COALESCE_S = 0.02
_RECV = 1 << 16  # bytes per recv from a channel
# With Celery's event loop, the channels are read when a pool process says it sent
# something (see Listener.attach), and at the latest this often (seconds): a long
# task's start or a dead pool process's closed channel is seen at most this late.
POLL_S = 0.2
_LINUX = sys.platform.startswith("linux")


def _address() -> str:
    token = f"taskmeter-{os.getpid()}-{secrets.token_hex(6)}"
    if _LINUX:
        return "\0" + token
    return os.path.join(tempfile.mkdtemp(prefix="taskmeter-"), "sock")


def _peer(conn: socket.socket) -> tuple[int | None, int | None]:
    """(pid, uid) of the connected process, where the OS tells."""
    if not _LINUX:
        return None, None
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", creds)
    return int(pid), int(uid)


class Listener:
    """Main process side: accepts pool processes and hands each message to ``on_message``
    (with the sender's pid), and each closed channel to ``on_gone``."""

    def __init__(
        self,
        on_message: Callable[[Message, int | None], None],
        on_gone: Callable[[int], None],
        on_batch: Callable[[], None] | None = None,
        outbox_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        """``outbox_dir``: where pool processes keep their outboxes (a private folder:
        the journal's); None: a private temporary folder, removed at :meth:`close`."""
        self.address = _address()
        self._on_batch = on_batch  # after each round of messages (buffered sinks flush)
        self.token = secrets.token_hex(16)
        self._on_message, self._on_gone = on_message, on_gone
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.address)
        self._sock.listen(128)
        self._sock.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._sock, selectors.EVENT_READ, None)
        self._wake_r, self._wake_w = socket.socketpair()
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        # per channel: unparsed bytes, peer pid, whether its token was checked
        self._buffers: dict[socket.socket, tuple[bytearray, int | None, bool]] = {}
        # The channels by fd, polled together: a round of reads asks the kernel once
        # which channels hold something and reads only those, rather than trying every
        # pool process's channel (an exception per empty one) per task.
        self._pollset = select.poll()
        self._by_fd: dict[int, socket.socket] = {}
        self._thread: threading.Thread | None = None
        self._closing = False
        self._stop = threading.Event()
        self._loop: Any = None  # an event loop serving the channels (see attach)
        self._flush_due = False
        self._flush_at = 0.0
        # One shared byte, inherited by every pool process forked later: a sender sets
        # it after each message, the event loop's tick reads it (a memory load) and
        # reads the channels only then. See attach().
        # Byte 1: the outboxes are collected (set once the channels are served in a
        # way that collects them, cleared at close): senders leave task ends there.
        self.dirty = mmap.mmap(-1, 2)
        self._own_outbox_dir = outbox_dir is None
        self.outbox_dir: Path | None = None if outbox_dir is None else Path(outbox_dir)
        if outbox_dir is None:
            try:
                self.outbox_dir = Path(tempfile.mkdtemp(prefix="taskmeter-outbox-"))
            except OSError as exc:  # e.g. a read-only root file system without /tmp
                log.info("taskmeter: no outboxes (%s): task ends go through the channels", exc)
        # The outboxes attached, by channel (a new file per channel: a sender that
        # reconnects makes a new one), with the pool process's pid
        self._boxes: dict[socket.socket, tuple[int | None, Outbox]] = {}
        self._polled = False  # channels read at the loop's ticks, not woken for
        self._timer: Any = None
        self._batched_at = 0.0  # when buffered sinks were last flushed (polled mode)
        self._read_at = 0.0  # when a tick last read the channels (polled mode)
        # One reader of the channels at a time: the loop's tick or timer, close(), and
        # Celery's prefork shutdown, which fires the loop's timers from a thread of its
        # own while the pool joins (TaskPool.on_stop).
        self._reading = threading.Lock()

    def drop_in_child(self) -> None:
        """In a forked child: close this process's copies of the sockets (the main
        process keeps its own). Closing the objects, not their fd numbers, so nothing
        closes a reused fd number again when they are garbage-collected."""
        for sock in (self._sock, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                sock.close()
        with contextlib.suppress(OSError):
            self._sel.close()

    def attach(self, loop: Any) -> None:
        """Serve the channels from an event loop's thread (Celery's kombu hub, the
        worker's main loop) instead of a thread of our own.

        With a kombu hub (``on_tick``), the channels are not in the loop's poll set at
        all: a pool process sends a task's record just before Celery's own result for
        the task, and the loop reads the channels at the start of its next iteration
        (``on_tick``), which that result triggers, when the shared ``dirty`` byte says
        something was sent. So a record costs the main process no wake-up of its own
        (for tasks of 10 ms, a wake-up of Celery's loop costs more than handling the
        record), and the ledger gets one write per iteration that read records. Other
        messages (a long task's start, its tools) and closed channels are read at the
        next iteration, or by a timer every POLL_S. Elsewhere, the channels are
        readers of the loop and buffered sinks are flushed at most COALESCE_S later.

        Call again whenever the loop (re)starts: Celery resets its hub after a lost
        broker connection, which drops every reader and may cancel pending timers
        (``celery.worker.loops.asynloop``); the channels are registered anew and what
        was buffered is handled now."""
        self._unhook()
        self._loop = loop
        for sock in (self._sock, *self._buffers):
            with contextlib.suppress(Exception):
                loop.remove_reader(sock)
        loop.add_reader(self._sock, self._on_ready, None)
        self._polled = isinstance(getattr(loop, "on_tick", None), set) and hasattr(
            loop, "call_repeatedly"
        )
        if self._polled:
            loop.on_tick.add(self._on_tick)
            self._timer = loop.call_repeatedly(POLL_S, self._poll)
            self.dirty[1] = 1  # the timer collects the outboxes
        else:
            self.dirty[1] = 0  # (a loop without ticks: ends go through the channels)
            for conn in list(self._buffers):
                loop.add_reader(conn, self._on_ready, conn)
        self._flush_due = False
        with self._reading:
            try:
                self._drain()  # what arrived while no loop listened
            finally:
                self._flush_taken()

    def _unhook(self) -> None:
        """Cancel the POLL_S timer and take ``_on_tick`` off the loop (polled mode)."""
        if self._timer is not None:
            with contextlib.suppress(Exception):
                self._timer.cancel()
            self._timer = None
        if self._loop is not None and self._polled:
            with contextlib.suppress(Exception):
                self._loop.on_tick.discard(self._on_tick)

    def _on_tick(self) -> None:
        """Every iteration of the event loop: read the channels if a sender said so.
        A busy loop iterates several times per task, so buffered sinks are flushed at
        most every COALESCE_S from here (a one-shot timer flushes the rest then),
        except after a read that came COALESCE_S or more after the one before: a
        record alone, flushed at once rather than by a timer of its own."""
        dirty = self.dirty
        if not dirty[0] or self._closing:
            return
        dirty[0] = 0  # before reading: a message sent meanwhile sets it again
        self._poll(flush=False)
        now = time.monotonic()
        last_read, self._read_at = self._read_at, now
        if now - self._batched_at >= COALESCE_S or now - last_read >= COALESCE_S:
            self._batched_at = now
            self._batch_done()
        elif not self._flush_due and self._on_batch is not None:
            self._flush_due, self._flush_at = True, now
            self._loop.call_later(COALESCE_S, self._loop_flush)

    def _poll(self, flush: bool = True) -> None:
        """Read every channel until empty (closed ones are dropped), then flush.
        Skipped if another thread is reading them (it reads what this would)."""
        if self._closing or not self._reading.acquire(blocking=False):
            return
        try:
            # new channels: _on_ready, from the poll set; the timer reads until empty
            self._drain(accept=False, until_empty=flush)
        except Exception:  # never into the event loop
            log.exception("taskmeter: reading the report channels failed")
        finally:
            try:
                if flush:
                    self._batched_at = time.monotonic()
                    self._flush_taken()
            finally:
                self._reading.release()

    def _on_ready(self, conn: socket.socket | None) -> None:
        try:
            with self._reading:
                if conn is None:
                    self._accept()
                else:
                    self._read(conn)
        except Exception:  # never into the event loop (asynloop would reset its hub)
            log.exception("taskmeter: reading a report channel failed")
        finally:
            if self._on_batch is not None and not self._closing:
                now = time.monotonic()
                if not self._flush_due or now - self._flush_at > 1.0:
                    if self._flush_due:  # its timer was lost (a reset hub): flush now
                        self._batch_done()
                    self._flush_due, self._flush_at = True, now
                    self._loop.call_later(COALESCE_S, self._loop_flush)

    def _loop_flush(self) -> None:
        self._flush_due = False
        self._batched_at = time.monotonic()
        self._batch_done()

    def _batch_done(self) -> None:
        if self._on_batch is not None:
            try:
                self._on_batch()
            except Exception:
                log.exception("taskmeter: handling a batch of report messages failed")

    def _flush_taken(self) -> None:
        """With ``_reading`` held: flush (the ledger's sink writes what was handled,
        every entry taken so far included), then free the room of the outbox entries
        taken (see _collect for how far each was taken, noted before)."""
        self._batch_done()
        for _, box in self._boxes.values():
            box.commit()

    def collect(self, timeout: float = 2.0) -> None:
        """Handle now what pool processes left in their outboxes (and sent before): for
        a scrape, whose counters must hold every task ended before it, and before the
        main process judges a task. Any thread."""
        if not self.dirty[1] or self._closing or not self._reading.acquire(timeout=timeout):
            return  # (no outboxes in use: the channels are read by the loop's thread)
        try:
            if self._closing:  # closed while this waited
                return
            # Channels first: a task's start, sent before its end went to the outbox.
            # Not accepting (the loop's thread owns the listening socket's reader).
            try:
                self._drain(accept=False)
            finally:
                self._flush_taken()
        except Exception:
            log.exception("taskmeter: collecting the outboxes failed")
        finally:
            self._reading.release()

    def _collect(self, only: socket.socket | None = None) -> None:
        """Handle the entries of every outbox (or ``only``'s channel's), with
        ``_reading`` held, after the channels were read. Each outbox notes how far
        its entries were taken before any is handled: their records may be written by
        any flush from then on (one of another thread's too), and a whole-worker kill
        after that leaves a restart knowing which may be in the ledger."""
        for conn, (pid, box) in list(self._boxes.items()):
            if only is None or conn is only:
                lines = box.take()
                if lines:
                    box.mark_taken()
                for line in lines:
                    self._handle(line, pid)

    def _open_outbox(self, name: object, pid: int | None, conn: socket.socket) -> None:
        """A pool process's hello named its outbox: map it, which tells the pool
        process to use it (a name not of that pid's, or a file that cannot be mapped:
        its ends keep coming through the channel)."""
        if name is None or self.outbox_dir is None:
            return
        m = NAME.match(name) if isinstance(name, str) else None
        if m is None or (pid is not None and int(m.group(1)) != pid):
            log.warning("taskmeter: ignored an outbox name from pid %s: %r", pid, name)
            return
        try:
            box = Outbox.attach(self.outbox_dir / m.group(0))
        except (OSError, ValueError) as exc:
            log.warning("taskmeter: cannot read the outbox of pid %s: %s", pid, exc)
            return
        self._boxes[conn] = (pid, box)

    def start(self) -> None:
        self.dirty[1] = 1  # _serve collects the outboxes every POLL_S
        self._thread = threading.Thread(target=self._serve, name="taskmeter-listener", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.dirty[1] = 0  # from now on task ends go through the channels
        self._closing = True
        self._stop.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self._thread is not None:
            self._thread.join(5)
        if self._loop is not None:
            self._unhook()
            for sock in (self._sock, *self._buffers):
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(sock)
        # What pool processes sent since the last round (tasks that ended during a
        # warm shutdown, while the event loop no longer ran): handled now, once no
        # other thread reads the channels (Celery's shutdown timer thread may).
        with self._reading:
            for _, box in self._boxes.values():
                box.detach()  # from now on pool processes send their ends
            try:
                self._drain()
            finally:
                self._flush_taken()
            for pid, box in self._boxes.values():
                if pid is not None and not self._own_outbox_dir and pid_alive(pid):
                    # It may have begun one more entry as it was detached: its outbox
                    # stays for the next incarnation to collect (the journal's folder).
                    box.close()
                    continue
                if box.stuck():
                    log.warning("taskmeter: outbox %s holds an entry cut short", box.path)
                box.remove()
            self._boxes = {}
        if self._own_outbox_dir and self.outbox_dir is not None:
            with contextlib.suppress(OSError):
                for left in self.outbox_dir.iterdir():
                    left.unlink()
                self.outbox_dir.rmdir()
        for conn in list(self._buffers):
            conn.close()
        self._sel.close()
        self._sock.close()
        self._wake_r.close()
        self._wake_w.close()
        if not _LINUX:
            try:
                os.unlink(self.address)
                os.rmdir(os.path.dirname(self.address))
            except OSError:
                pass

    def _serve(self) -> None:
        collected = time.monotonic()
        while not self._closing:
            events = self._sel.select(timeout=POLL_S)
            now = time.monotonic()
            collect = now - collected >= POLL_S
            with self._reading:
                try:
                    for key, _ in events:
                        if key.data == "wake":
                            return
                        if key.fileobj is self._sock:
                            self._accept()
                        elif key.fileobj in self._buffers:  # (a scrape may have dropped it)
                            self._read(key.fileobj)
                    if collect:
                        collected = now
                        self._collect()
                except Exception:  # never end this thread: nothing else would read
                    log.exception("taskmeter: reading the report channels failed")
                finally:
                    if events or collect:
                        self._flush_taken()
            # Let messages gather in the sockets' buffers (a pool process's send wakes
            # nobody meanwhile) and handle them in one wake-up: at hundreds of tasks a
            # second this thread wakes at most 1 / COALESCE_S times a second instead of
            # once per message, and stops contending for the GIL.
            if events and COALESCE_S > 0 and self._stop.wait(COALESCE_S):
                return

    def _drain(self, accept: bool = True, until_empty: bool = True) -> None:
        """Accept the channels waiting (unless ``accept`` is False: the listening
        socket is in the loop's poll set), then read every channel that holds
        something (one ``poll``: the others are not tried) until it is empty
        (``until_empty``) or, from the loop's ticks, until a read comes back short: a
        stream socket had no more then, and what a sender adds later sets the shared
        byte again (one recv per sending channel and tick, not two; a closed channel
        is readable, seen at the next tick that reads or the POLL_S timer's). Then,
        when reading until empty (not at the loop's ticks), the outboxes."""
        while accept and self._accept():
            pass
        for fd, _ in self._pollset.poll(0):
            conn = self._by_fd.get(fd)
            while conn is not None and conn in self._buffers:
                n = self._read(conn)
                if not n or (not until_empty and n < _RECV):
                    break
        if until_empty:
            self._collect()

    def _accept(self) -> bool:
        try:
            conn, _ = self._sock.accept()
        except (BlockingIOError, OSError):
            return False
        pid, uid = _peer(conn)
        if uid is not None and uid != os.getuid():
            log.warning("taskmeter: refused a report channel from pid %s (uid %s)", pid, uid)
            conn.close()
            return True
        conn.setblocking(False)
        self._buffers[conn] = (bytearray(), pid, False)
        self._by_fd[conn.fileno()] = conn
        self._pollset.register(conn, select.POLLIN)
        if self._loop is not None:
            if not self._closing and not self._polled:
                self._loop.add_reader(conn, self._on_ready, conn)
        else:
            self._sel.register(conn, selectors.EVENT_READ, "conn")
        return True

    def _drop(self, conn: socket.socket, pid: int | None) -> None:
        if self._loop is not None:
            if not self._closing and not self._polled:
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(conn)
        else:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(conn)
        del self._buffers[conn]
        del self._by_fd[conn.fileno()]
        self._pollset.unregister(conn)
        conn.close()
        if conn in self._boxes:
            # What the process left before it exited: handled and written before its
            # exit is (a task it ended is not judged killed), then the outbox removed.
            box = self._boxes[conn][1]
            box.detach()
            self._collect(conn)
            self._flush_taken()
            if box.stuck():
                log.warning("taskmeter: pool process %s left an outbox entry cut short", pid)
            del self._boxes[conn]
            box.remove()
        if pid is not None:
            try:
                self._on_gone(pid)
            except Exception:  # never into the event loop (kombu's hub) or our thread
                log.exception("taskmeter: handling the exit of pool process %d failed", pid)

    def _read(self, conn: socket.socket) -> int:
        """Read and handle what one channel holds: the bytes read (at most _RECV), 0
        when it held nothing (or closed)."""
        buf, pid, trusted = self._buffers[conn]
        try:
            data = conn.recv(_RECV)
        except BlockingIOError:
            return 0
        except OSError:
            data = b""
        if not data:
            self._drop(conn, pid)
            return 0
        buf += data
        *lines, rest = buf.split(b"\n")
        for line in lines:
            if not line:
                continue
            if trusted:
                self._handle(line, pid)
                continue
            try:
                msg = loads(line)
            except ValueError:
                log.warning("taskmeter: dropped a malformed report message from pid %s", pid)
                continue
            token = msg.get("hello") if isinstance(msg, dict) else None
            if not isinstance(token, str) or not hmac.compare_digest(token, self.token):
                log.warning("taskmeter: refused a report channel without the token (pid %s)", pid)
                self._drop(conn, None)
                return 0
            trusted = True
            assert isinstance(msg, dict)
            self._open_outbox(msg.get("outbox"), pid, conn)
        self._buffers[conn] = (bytearray(rest), pid, trusted)
        return len(data)

    def _handle(self, line: bytes | bytearray, pid: int | None) -> None:
        """One message of a trusted channel or outbox."""
        try:
            kind = line[:1]
            if kind == b"E":
                tab = line.index(b"\t")
                head, body = loads(line[1:tab]), bytes(line[tab + 1 :])
                msg = {"type": "end-line", "head": head, "body": body}
            elif kind == b"R":  # outboxes only: binary
                msg = {"type": "end-packed", "entry": bytes(line)}
            else:
                msg = loads(line)
        except ValueError:
            log.warning("taskmeter: dropped a malformed report message from pid %s", pid)
            return
        try:
            self._on_message(msg, pid)
        except Exception:
            log.exception("taskmeter: handling a report message failed")


# How long a pool process waits for room in its channel before dropping a message:
# nobody reads the channels during a warm shutdown until the worker's end, and a task
# must finish meanwhile rather than block (until its pod is SIGKILLed).
SEND_TIMEOUT_S = 5.0


class Sender:
    """Pool process side. Connects lazily (after the fork) and never fails a task: a
    message that cannot be delivered is logged and dropped. A message that waited
    SEND_TIMEOUT_S for room in the channel (the kernel's SO_SNDTIMEO: no extra system
    call per message) is dropped, and the following ones are sent only if they fit at
    once (MSG_DONTWAIT) until one does: a stalled reader costs a task one wait."""

    def __init__(
        self,
        address: str,
        token: str,
        dirty: mmap.mmap | None = None,
        outbox_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.address, self._token = address, token
        self._dirty = dirty  # the listener's shared bytes: set around every message
        self._outbox_dir = None if outbox_dir is None else Path(outbox_dir)
        self._outbox: Outbox | None = None  # made when the channel connects
        self._connections = 0  # how many this process made (each its own outbox)
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        # the channel's reader stalled: the stream may end in a partial line, so the
        # next message starts with a newline (the listener drops the partial line)
        self._stalled = False
        self._dropped = 0

    def send(self, msg: Message) -> None:
        self.send_line(json_bytes(msg) + b"\n")

    def send_end(self, line: bytes) -> None:
        """A task's end (one line, no newline): into the outbox while the main process
        collects it and it has room, else through the channel."""
        if not self.put_end(line):
            self.send_line(line + b"\n")

    def outbox_ready(self) -> bool:
        """Whether an end would go into the outbox now (the main process collects
        outboxes and has this one attached): what put_end() needs, short of room."""
        box = self._outbox
        return box is not None and self._dirty is not None and bool(self._dirty[1]) and box.attached

    def put_end(self, entry: bytes) -> bool:
        """A task's end into the outbox, if the main process collects it and it has
        room; False otherwise (nothing sent: binary entries, such as packed figures,
        cannot go through the line-delimited channel)."""
        if self._outbox is not None and self._dirty is not None and self._dirty[1]:
            with self._lock:
                box = self._outbox  # (a reconnection replaces it)
                return box is not None and box.put(entry)
        return False

    def _new_outbox(self) -> str | None:
        """A fresh outbox for this connection (its name goes in the hello; see
        :meth:`Outbox.create` for why a new file each time)."""
        if self._outbox_dir is None:
            return None
        if self._outbox is not None:
            self._outbox.close()
            self._outbox = None
        try:
            self._connections += 1
            self._outbox = Outbox.create(self._outbox_dir, os.getpid(), self._connections)
        except OSError as exc:
            log.warning("taskmeter: no outbox (%s): task ends go through the channel", exc)
            return None
        return self._outbox.path.name

    def send_line(self, data: bytes) -> None:
        """One message already encoded (ending with a newline)."""
        with self._lock:
            for attempt in (1, 2):
                try:
                    if self._sock is None:
                        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                        self._sock.connect(self.address)
                        with contextlib.suppress(OSError):
                            sec, usec = int(SEND_TIMEOUT_S), int(SEND_TIMEOUT_S % 1 * 1e6)
                            tv = struct.pack("ll", sec, usec)
                            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
                        self._stalled = False
                        hello = {"hello": self._token, "outbox": self._new_outbox()}
                        self._sock.sendall(json.dumps(hello).encode() + b"\n")
                    if self._dirty is not None:
                        # before too: a message larger than the room left in the
                        # channel is read at the loop's next iteration, not its timer's
                        self._dirty[0] = 1
                    if self._stalled:
                        self._sock.sendall(b"\n" + data, socket.MSG_DONTWAIT)
                        self._stalled = False
                    else:
                        self._sock.sendall(data)
                    if self._dirty is not None:
                        self._dirty[0] = 1
                    return
                except BlockingIOError:  # no room within SEND_TIMEOUT_S, or at once
                    self._stalled = True  # (the channel stays open: closing it would
                    self._dropped += 1  # tell the main process this process exited)
                    if self._dropped == 1:
                        log.warning(
                            "taskmeter: the report channel is not read (warm shutdown?): "
                            "dropping report messages until it is (logged once)"
                        )
                    return
                except OSError as exc:
                    if self._sock is not None:
                        self._sock.close()
                        self._sock = None
                    if attempt == 2:
                        log.warning("taskmeter: could not deliver a task report: %s", exc)

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            if self._outbox is not None:
                self._outbox.close()
                self._outbox = None
