"""Pool processes -> main worker process: newline-delimited JSON over a Unix socket.

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
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import secrets
import selectors
import socket
import struct
import sys
import tempfile
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("taskmeter.transport")

Message = dict[str, Any]
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
    ) -> None:
        self.address = _address()
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
        self._thread: threading.Thread | None = None
        self._closing = False

    def drop_in_child(self) -> None:
        """In a forked child: close this process's copies of the sockets (the main
        process keeps its own). Closing the objects, not their fd numbers, so nothing
        closes a reused fd number again when they are garbage-collected."""
        for sock in (self._sock, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                sock.close()
        with contextlib.suppress(OSError):
            self._sel.close()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="taskmeter-listener", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closing = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self._thread is not None:
            self._thread.join(5)
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
        while not self._closing:
            for key, _ in self._sel.select(timeout=1.0):
                if key.data == "wake":
                    return
                if key.fileobj is self._sock:
                    self._accept()
                else:
                    self._read(key.fileobj)  # type: ignore[arg-type]

    def _accept(self) -> None:
        try:
            conn, _ = self._sock.accept()
        except BlockingIOError:
            return
        pid, uid = _peer(conn)
        if uid is not None and uid != os.getuid():
            log.warning("taskmeter: refused a report channel from pid %s (uid %s)", pid, uid)
            conn.close()
            return
        conn.setblocking(False)
        self._buffers[conn] = (bytearray(), pid, False)
        self._sel.register(conn, selectors.EVENT_READ, "conn")

    def _drop(self, conn: socket.socket, pid: int | None) -> None:
        self._sel.unregister(conn)
        del self._buffers[conn]
        conn.close()
        if pid is not None:
            self._on_gone(pid)

    def _read(self, conn: socket.socket) -> None:
        buf, pid, trusted = self._buffers[conn]
        try:
            data = conn.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(conn, pid)
            return
        buf += data
        *lines, rest = buf.split(b"\n")
        for line in lines:
            if not line:
                continue
            try:
                msg = json.loads(line)
            except ValueError:
                log.warning("taskmeter: dropped a malformed report message from pid %s", pid)
                continue
            if not trusted:
                token = msg.get("hello") if isinstance(msg, dict) else None
                if not isinstance(token, str) or not hmac.compare_digest(token, self.token):
                    log.warning(
                        "taskmeter: refused a report channel without the token (pid %s)", pid
                    )
                    self._drop(conn, None)
                    return
                trusted = True
                continue
            try:
                self._on_message(msg, pid)
            except Exception:
                log.exception("taskmeter: handling a report message failed")
        self._buffers[conn] = (bytearray(rest), pid, trusted)


class Sender:
    """Pool process side. Connects lazily (after the fork) and never fails a task: a
    message that cannot be delivered is logged and dropped."""

    def __init__(self, address: str, token: str) -> None:
        self.address, self._token = address, token
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def send(self, msg: Message) -> None:
        data = json.dumps(msg, separators=(",", ":")).encode() + b"\n"
        with self._lock:
            for attempt in (1, 2):
                try:
                    if self._sock is None:
                        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                        self._sock.connect(self.address)
                        self._sock.sendall(json.dumps({"hello": self._token}).encode() + b"\n")
                    self._sock.sendall(data)
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
