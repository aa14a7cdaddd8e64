"""Connections read by one thread, requests served by a bounded pool.

The agent's two listening sockets (the shim's unix socket, the health and
metrics port) used to give every connection a thread of its own until it had
sent its request: a local user's idle connections each held a thread, and
with enough of them the agent stalled. Here one selector thread accepts and
reads every connection without blocking; a connection that has sent its whole
request is handed to a fixed pool of workers; one that is silent past its
deadline, or that sends more than the limit, is answered or closed by the
reader. Idle connections cost a descriptor and a few hundred bytes, never a
thread, and there is a cap on how many are kept.
"""

from __future__ import annotations

import errno
import logging
import resource
import selectors
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

LOG = logging.getLogger(__name__)


class Conn:
    __slots__ = ("sock", "data", "deadline")

    def __init__(self, sock: socket.socket, deadline: float):
        self.sock = sock
        self.data = bytearray()
        self.deadline = deadline


class PooledServer:
    """Serve `listener` (bound and listening): `complete(data, eof)` says when a
    request has all arrived; `handle(bytes) -> bytes` answers it on a worker; a
    request larger than `max_request` is answered by `too_large()` at once."""

    def __init__(self, listener: socket.socket, name: str,
                 complete: Callable[[bytearray, bool], bool],
                 handle: Callable[[bytes], bytes], workers: int, read_timeout: float,
                 max_request: int, too_large: Callable[[], bytes],
                 max_connections: Optional[int] = None):
        self.listener = listener
        self.name = name
        self.complete = complete
        self.handle = handle
        self.read_timeout = read_timeout
        self.max_request = max_request
        self.too_large = too_large
        # Connections waiting for their request: at most a quarter of the descriptors
        # the process may open, so that two servers full of idle clients leave room
        # for the work itself.
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.max_connections = max_connections or max(16, min(4096, soft // 4))
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"{name}-worker")
        self.selector = selectors.DefaultSelector()
        self.conns: dict[int, Conn] = {}
        self._stop = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        listener.setblocking(False)
        self.selector.register(listener, selectors.EVENT_READ, None)
        self.selector.register(self._wake_r, selectors.EVENT_READ, "wake")

    # ------------------------------------------------------------ the reader thread

    def serve_forever(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            timeout = min([c.deadline for c in self.conns.values()], default=now + 1.0) - now
            for key, _ in self.selector.select(timeout=max(0.0, min(timeout, 1.0))):
                if key.data == "wake":
                    self._wake_r.recv(4096)
                elif key.data is None:
                    self._accept()
                else:
                    self._read(key.data)
            self._expire(time.monotonic())

    def _accept(self) -> None:
        for _ in range(64):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE) and self.conns:
                    self._drop_oldest()  # out of descriptors: idle clients go first
                    continue
                LOG.warning("%s: accept failed: %s", self.name, exc)
                return
            if len(self.conns) >= self.max_connections:
                self._drop_oldest()
            sock.setblocking(False)
            conn = Conn(sock, time.monotonic() + self.read_timeout)
            self.conns[sock.fileno()] = conn
            self.selector.register(sock, selectors.EVENT_READ, conn)

    def _read(self, conn: Conn) -> None:
        try:
            chunk = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
            conn.data.clear()
        eof = not chunk
        conn.data += chunk
        if len(conn.data) > self.max_request:
            self._release(conn)
            self.pool.submit(self._answer, conn.sock, None)
        elif self.complete(conn.data, eof):
            self._release(conn)
            self.pool.submit(self._answer, conn.sock, bytes(conn.data))
        elif eof:
            self._release(conn)
            conn.sock.close()

    def _release(self, conn: Conn) -> None:
        """Stop watching `conn` (a worker or the caller takes its socket over)."""
        self.selector.unregister(conn.sock)
        self.conns.pop(conn.sock.fileno(), None)

    def _expire(self, now: float) -> None:
        for conn in [c for c in self.conns.values() if c.deadline <= now]:
            self._release(conn)
            conn.sock.close()

    def _drop_oldest(self) -> None:
        oldest = min(self.conns.values(), key=lambda c: c.deadline)
        self._release(oldest)
        oldest.sock.close()

    # ------------------------------------------------------------ workers

    def _answer(self, sock: socket.socket, data: Optional[bytes]) -> None:
        try:
            reply = self.too_large() if data is None else self.handle(data)
            sock.setblocking(True)
            sock.settimeout(self.read_timeout)
            sock.sendall(reply)
        except OSError as exc:  # the client went away or stopped reading
            LOG.debug("%s: answer not delivered: %s", self.name, exc)
        except Exception:
            LOG.exception("%s: could not answer a request", self.name)
        finally:
            sock.close()

    def shutdown(self) -> None:
        self._stop.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def close(self) -> None:
        for conn in list(self.conns.values()):
            self._release(conn)
            conn.sock.close()
        self.selector.close()
        self.listener.close()
        self._wake_r.close()
        self._wake_w.close()
        self.pool.shutdown(wait=False, cancel_futures=True)
