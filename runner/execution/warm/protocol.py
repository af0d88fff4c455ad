"""What a command and a warm worker say to each other: length-prefixed pickles over a Unix
socket of this user (`Channel`), the peer's uid checked (`peer`), sends that time out.
"""
from __future__ import annotations

import pickle
import select
import socket
import struct
import threading
from typing import Any, Optional

from .folder import WarmError

MAX_FRAME = 1 << 30
SEND_TIMEOUT_S = 60.0  # a peer that takes nothing for this long is frozen: the send fails
_HEADER = struct.Struct("!Q")


class Channel:
    """Length-prefixed pickles over a connected Unix socket. A read interrupted (Ctrl-C) keeps
    what it got: the next read goes on from there."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self._sending = threading.Lock()

    def send(self, kind: str, body: Any = None) -> None:
        data = pickle.dumps((kind, body), protocol=pickle.HIGHEST_PROTOCOL)
        with self._sending:
            self.sock.sendall(_HEADER.pack(len(data)) + data)

    def read(self, timeout: Optional[float] = None) -> tuple[str, Any]:
        """The next message; TimeoutError when none began within `timeout`; EOFError when the
        other side closed."""
        if timeout is not None and not self.buf:
            ready, _, _ = select.select([self.sock], [], [], timeout)
            if not ready:
                raise TimeoutError(f"no message within {timeout:g} s")
        self._fill(_HEADER.size)
        (size,) = _HEADER.unpack_from(self.buf)
        if size > MAX_FRAME:
            raise WarmError(f"a message of {size} bytes: not from a warm worker of this runner")
        self._fill(_HEADER.size + size)
        data = bytes(self.buf[_HEADER.size:_HEADER.size + size])
        del self.buf[:_HEADER.size + size]
        return pickle.loads(data)

    def _fill(self, size: int) -> None:
        while len(self.buf) < size:
            chunk = self.sock.recv(max(1 << 16, size - len(self.buf)))
            if not chunk:
                raise EOFError("the connection was closed")
            self.buf += chunk


def peer(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a Unix socket (Linux SO_PEERCRED)."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        raise WarmError("this system cannot tell who is at the other end of a socket (no SO_PEERCRED)")
    pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i")))
    return pid, uid


def send_timeout(conn: socket.socket) -> None:
    """A blocking socket whose sends fail after SEND_TIMEOUT_S (a frozen command takes nothing):
    the job's log and record are never what keeps the worker from its next command."""
    seconds = int(SEND_TIMEOUT_S)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", seconds, 0))
