"""The client side of the NBD handshake, for sockets handed to the kernel.

The kernel's NBD driver (netlink ``NBD_CMD_CONNECT`` and
``NBD_CMD_RECONFIGURE``) takes sockets that have already been through the
handshake: it speaks only the transmission phase, with simple replies.  So
this module negotiates up to there and stops: fixed newstyle, then one
``NBD_OPT_GO``, and the socket is left at the first byte of the transmission
phase, together with what the kernel must be told about the export (size,
transmission flags, block sizes).

It deliberately negotiates nothing the kernel cannot speak: no structured
replies, no extended headers, no meta contexts, no TLS.  A server that
insists on any of them is refused, as are oldstyle and plain newstyle
servers (they cannot report errors, and nbdloop's own server is nbdkit,
which does fixed newstyle).  There is no fallback to
``NBD_OPT_EXPORT_NAME`` either: every server nbdloop talks to supports
``NBD_OPT_GO``, and without it a wrong export name is a silent hang-up
instead of a message.

The protocol is nbd's ``doc/proto.md``.  :class:`HandshakeError` is the one
error; its message is one line, fit for the CLI to print as it is.
"""
from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass

# ---- protocol constants (doc/proto.md "Values"; all integers big-endian) ---------

NBDMAGIC = 0x4E42444D41474943           # "NBDMAGIC": every handshake starts with it
IHAVEOPT = 0x49484156454F5054           # "IHAVEOPT": newstyle greeting, and every option
OLDSTYLE_MAGIC = 0x00420281861253       # cliserv_magic: recognised only to refuse it
NBD_REP_MAGIC = 0x0003E889045565A9      # precedes every fixed-newstyle option reply

# Handshake flags (server, 16 bits) and client flags (32 bits).
NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_NO_ZEROES = 1 << 1
NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_C_NO_ZEROES = 1 << 1

# Options: only the two this client sends.
NBD_OPT_ABORT = 2
NBD_OPT_GO = 7

# Option reply types.  Errors are the ones with bit 31 set.
NBD_REP_ACK = 1
NBD_REP_INFO = 3
NBD_REP_FLAG_ERROR = 1 << 31
NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR | 1
NBD_REP_ERR_POLICY = NBD_REP_FLAG_ERROR | 2
NBD_REP_ERR_INVALID = NBD_REP_FLAG_ERROR | 3
NBD_REP_ERR_PLATFORM = NBD_REP_FLAG_ERROR | 4
NBD_REP_ERR_TLS_REQD = NBD_REP_FLAG_ERROR | 5
NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR | 6
NBD_REP_ERR_SHUTDOWN = NBD_REP_FLAG_ERROR | 7
NBD_REP_ERR_BLOCK_SIZE_REQD = NBD_REP_FLAG_ERROR | 8
NBD_REP_ERR_TOO_BIG = NBD_REP_FLAG_ERROR | 9
NBD_REP_ERR_EXT_HEADER_REQD = NBD_REP_FLAG_ERROR | 10

# NBD_REP_INFO types.  NAME and DESCRIPTION may come unasked and are ignored
# like any other type we do not know.
NBD_INFO_EXPORT = 0
NBD_INFO_BLOCK_SIZE = 3

# Transmission flags (16 bits), what the kernel is given as NBD_ATTR_SERVER_FLAGS.
NBD_FLAG_HAS_FLAGS = 1 << 0
NBD_FLAG_READ_ONLY = 1 << 1
NBD_FLAG_SEND_FLUSH = 1 << 2
NBD_FLAG_SEND_FUA = 1 << 3
NBD_FLAG_ROTATIONAL = 1 << 4
NBD_FLAG_SEND_TRIM = 1 << 5
NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6
NBD_FLAG_SEND_DF = 1 << 7
NBD_FLAG_CAN_MULTI_CONN = 1 << 8
NBD_FLAG_SEND_CACHE = 1 << 10
NBD_FLAG_SEND_FAST_ZERO = 1 << 11

# The transmission phase this module leaves the socket in: simple requests
# and simple replies, since no structured replies were negotiated.  Only what
# a caller needs to check the socket or leave it cleanly.
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_CMD_READ = 0
NBD_CMD_DISC = 2

# The spec's block sizes for a server that advertises none ("Size
# constraints"): what it SHOULD support, so what the kernel may rely on.
DEFAULT_MIN_BLOCK = 1
DEFAULT_PREFERRED_BLOCK = 4096
DEFAULT_MAX_BLOCK = 32 * 1024 * 1024

# Strings (export names, error messages) MUST NOT exceed 4096 bytes.
MAX_STRING = 4096
# Every reply this client can receive is at most a 4096-byte string plus a
# few bytes of header; a larger length is garbage, not something to allocate.
_MAX_REPLY = MAX_STRING + 64
# Server text in an error message is cut here, to keep the message one line
# a person can read.
_MAX_SHOWN = 200

_ERROR_NAMES = {
    NBD_REP_ERR_UNSUP: "NBD_REP_ERR_UNSUP",
    NBD_REP_ERR_POLICY: "NBD_REP_ERR_POLICY",
    NBD_REP_ERR_INVALID: "NBD_REP_ERR_INVALID",
    NBD_REP_ERR_PLATFORM: "NBD_REP_ERR_PLATFORM",
    NBD_REP_ERR_TLS_REQD: "NBD_REP_ERR_TLS_REQD",
    NBD_REP_ERR_UNKNOWN: "NBD_REP_ERR_UNKNOWN",
    NBD_REP_ERR_SHUTDOWN: "NBD_REP_ERR_SHUTDOWN",
    NBD_REP_ERR_BLOCK_SIZE_REQD: "NBD_REP_ERR_BLOCK_SIZE_REQD",
    NBD_REP_ERR_TOO_BIG: "NBD_REP_ERR_TOO_BIG",
    NBD_REP_ERR_EXT_HEADER_REQD: "NBD_REP_ERR_EXT_HEADER_REQD",
}


class HandshakeError(Exception):
    """The handshake failed; the message is one line naming the problem."""

    exit_status = 1


@dataclass(frozen=True)
class Export:
    """What ``NBD_OPT_GO`` told us about the export: the size, the
    transmission flags and the block sizes, as the kernel needs them."""

    size: int
    flags: int
    min_block: int
    preferred_block: int
    max_block: int

    @property
    def readonly(self) -> bool:
        return bool(self.flags & NBD_FLAG_READ_ONLY)

    @property
    def can_flush(self) -> bool:
        return bool(self.flags & NBD_FLAG_SEND_FLUSH)

    @property
    def can_fua(self) -> bool:
        return bool(self.flags & NBD_FLAG_SEND_FUA)

    @property
    def can_trim(self) -> bool:
        return bool(self.flags & NBD_FLAG_SEND_TRIM)

    @property
    def can_write_zeroes(self) -> bool:
        return bool(self.flags & NBD_FLAG_SEND_WRITE_ZEROES)

    @property
    def can_multi_conn(self) -> bool:
        return bool(self.flags & NBD_FLAG_CAN_MULTI_CONN)


def connect_unix(path: str, export_name: str = "", timeout: float | None = 30
                 ) -> tuple[socket.socket, Export]:
    """Connect to the NBD server on the unix socket ``path`` and negotiate
    ``export_name``.  Returns the socket, blocking and in the transmission
    phase, and the export.  On failure the socket is closed and
    :class:`HandshakeError` names ``path``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # connect() too can wait, on a server whose listen backlog is full.
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as e:
            raise HandshakeError(f"cannot connect: {_reason(e)}") from None
        export = negotiate(sock, export_name, timeout)
        sock.settimeout(None)
    except HandshakeError as e:
        sock.close()
        raise HandshakeError(f"nbd+unix socket {path}: {e}") from None
    except BaseException:
        sock.close()
        raise
    return sock, export


def negotiate(sock: socket.socket, export_name: str = "", timeout: float | None = 30
              ) -> Export:
    """Run the handshake on the connected ``sock`` and leave it in the
    transmission phase, with simple replies.

    ``timeout`` bounds the whole handshake (None: wait for ever); the
    socket's own timeout is restored afterwards.  :class:`HandshakeError`
    says what went wrong but not which server: the caller knows that.  After
    an error the socket is of no further use."""
    name = _encode_name(export_name)
    previous = sock.gettimeout()
    try:
        peer = _Peer(sock, timeout)
        _greet(peer)
        return _go(peer, export_name, name)
    finally:
        sock.settimeout(previous)


# ---- the steps --------------------------------------------------------------------

def _greet(peer: _Peer) -> None:
    """The greeting and the flags: only fixed newstyle goes on."""
    magic = _u64(peer.recv(8, "reading the greeting"))
    if magic != NBDMAGIC:
        raise HandshakeError(f"not an NBD server: it sent 0x{magic:016x} instead of NBDMAGIC")
    magic = _u64(peer.recv(8, "reading the greeting"))
    if magic == OLDSTYLE_MAGIC:
        raise HandshakeError("the server speaks oldstyle NBD, not fixed newstyle")
    if magic != IHAVEOPT:
        raise HandshakeError(f"not an NBD server: it sent 0x{magic:016x} after NBDMAGIC")
    (flags,) = struct.unpack(">H", peer.recv(2, "reading the greeting"))
    if not flags & NBD_FLAG_FIXED_NEWSTYLE:
        raise HandshakeError("the server speaks plain newstyle NBD, not fixed newstyle")
    client_flags = NBD_FLAG_C_FIXED_NEWSTYLE
    # Irrelevant after NBD_OPT_GO, which never sends the zeroes; set because
    # the server offered it, as other clients do, and a flag it did not offer
    # would make it hang up.
    if flags & NBD_FLAG_NO_ZEROES:
        client_flags |= NBD_FLAG_C_NO_ZEROES
    peer.send(struct.pack(">I", client_flags), "sending the client flags")


def _go(peer: _Peer, export_name: str, name: bytes) -> Export:
    """``NBD_OPT_GO`` asking for the block sizes, then its replies up to
    ``NBD_REP_ACK``: from there on the socket is in the transmission phase."""
    # Asking for NBD_INFO_BLOCK_SIZE promises the server that its client obeys
    # the sizes it sends, which lets it keep them strict (O_DIRECT).
    data = struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, NBD_INFO_BLOCK_SIZE)
    peer.send(struct.pack(">QII", IHAVEOPT, NBD_OPT_GO, len(data)) + data,
              "sending NBD_OPT_GO")
    what = "reading the reply to NBD_OPT_GO"
    size_flags: tuple[int, int] | None = None
    blocks = (DEFAULT_MIN_BLOCK, DEFAULT_PREFERRED_BLOCK, DEFAULT_MAX_BLOCK)
    while True:
        magic, option, kind, length = struct.unpack(">QIII", peer.recv(20, what))
        if magic != NBD_REP_MAGIC:
            raise HandshakeError(f"the server sent 0x{magic:016x} where an option reply "
                                 "belongs")
        if option != NBD_OPT_GO:
            raise HandshakeError(f"the server replied to option {option}, not to NBD_OPT_GO")
        if length > _MAX_REPLY:
            raise HandshakeError(f"the server sent a {length}-byte reply to NBD_OPT_GO; "
                                 f"none is longer than {_MAX_REPLY}")
        payload = peer.recv(length, what)
        if kind & NBD_REP_FLAG_ERROR:
            peer.abort()
            raise HandshakeError(_refusal(export_name, kind, payload))
        if kind == NBD_REP_ACK:
            break
        if kind != NBD_REP_INFO:
            raise HandshakeError(f"the server sent reply type {kind} to NBD_OPT_GO, "
                                 "neither information, success nor an error")
        if len(payload) < 2:
            raise HandshakeError(f"the server sent a {len(payload)}-byte NBD_REP_INFO")
        (info,) = struct.unpack_from(">H", payload)
        if info == NBD_INFO_EXPORT:
            size_flags = _fields(">QH", payload, "NBD_INFO_EXPORT")
        elif info == NBD_INFO_BLOCK_SIZE:
            blocks = _fields(">III", payload, "NBD_INFO_BLOCK_SIZE")
    if size_flags is None:
        raise HandshakeError("the server accepted NBD_OPT_GO without sending NBD_INFO_EXPORT")
    size, flags = size_flags
    if not flags & NBD_FLAG_HAS_FLAGS:
        raise HandshakeError(f"the server's transmission flags 0x{flags:04x} lack "
                             "NBD_FLAG_HAS_FLAGS")
    _check_block_sizes(*blocks)
    return Export(size, flags, *blocks)


def _fields(fmt: str, payload: bytes, info: str) -> tuple[int, ...]:
    """The fields of an ``NBD_REP_INFO`` after its 2-byte type; its length
    is fixed by the spec."""
    if len(payload) != 2 + struct.calcsize(fmt):
        raise HandshakeError(f"the server sent a {len(payload)}-byte {info}, "
                             f"not {2 + struct.calcsize(fmt)} bytes")
    return struct.unpack_from(fmt, payload, 2)


def _check_block_sizes(minimum: int, preferred: int, maximum: int) -> None:
    """The spec's MUSTs for advertised block sizes: the kernel derives its
    logical block size from them, so nonsense must not reach it."""
    problem = None
    if not (_power_of_2(minimum) and minimum <= 65536):
        problem = "the minimum must be a power of 2 up to 65536"
    elif not (_power_of_2(preferred) and preferred >= max(minimum, 512)):
        problem = "the preferred must be a power of 2, at least the minimum and 512"
    elif maximum < preferred:
        problem = "the maximum must be at least the preferred"
    if problem:
        raise HandshakeError(f"the server's block sizes (minimum {minimum}, preferred "
                             f"{preferred}, maximum {maximum}) break the NBD spec: {problem}")


def _refusal(export_name: str, kind: int, payload: bytes) -> str:
    """One line for an error reply to ``NBD_OPT_GO``, with the server's own
    message when it sent one."""
    export = f"export {export_name!r}"
    text = _one_line(payload)
    said = f": {text}" if text else ""
    if kind == NBD_REP_ERR_TLS_REQD:
        return f"{export}: the server requires TLS, which nbdloop does not negotiate{said}"
    if kind == NBD_REP_ERR_UNKNOWN:
        return f"{export}: the server has no such export{said}"
    if kind == NBD_REP_ERR_UNSUP:
        return f"the server does not support NBD_OPT_GO, which nbdloop needs{said}"
    error = _ERROR_NAMES.get(kind, f"error {kind & ~NBD_REP_FLAG_ERROR}")
    return f"{export}: the server refused NBD_OPT_GO with {error}{said}"


# ---- bytes on the wire ------------------------------------------------------------

class _Peer:
    """The socket during the handshake, with one deadline for all of it, so
    that a server trickling bytes cannot stretch it."""

    def __init__(self, sock: socket.socket, timeout: float | None) -> None:
        self.sock = sock
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout

    def _arm(self, what: str) -> None:
        if self.deadline is None:
            self.sock.settimeout(None)
            return
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise self._timed_out(what)
        self.sock.settimeout(left)

    def _timed_out(self, what: str) -> HandshakeError:
        return HandshakeError(f"the handshake did not finish within {self.timeout:g}s "
                              f"(stuck {what})")

    def send(self, data: bytes, what: str) -> None:
        self._arm(what)
        try:
            self.sock.sendall(data)
        except TimeoutError:
            raise self._timed_out(what) from None
        except OSError as e:
            raise HandshakeError(f"connection lost while {what}: {_reason(e)}") from None

    def recv(self, n: int, what: str) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            self._arm(what)
            try:
                chunk = self.sock.recv(n - len(buf))
            except TimeoutError:
                raise self._timed_out(what) from None
            except OSError as e:
                raise HandshakeError(f"connection lost while {what}: {_reason(e)}") from None
            if not chunk:
                raise HandshakeError(f"the server closed the connection while {what}")
            buf += chunk
        return bytes(buf)

    def abort(self) -> None:
        """``NBD_OPT_ABORT``, the soft disconnect the spec asks of a client
        that gives up after an error reply.  Best effort: the connection is
        closed next whatever happens, so the reply is not awaited."""
        try:
            self.sock.settimeout(0)
            self.sock.send(struct.pack(">QII", IHAVEOPT, NBD_OPT_ABORT, 0))
        except OSError:
            pass


def _encode_name(export_name: str) -> bytes:
    try:
        name = export_name.encode("utf-8")
    except UnicodeEncodeError:
        raise HandshakeError(f"export name {export_name!r} is not valid UTF-8") from None
    if b"\0" in name:
        raise HandshakeError(f"export name {export_name!r} contains NUL")
    if len(name) > MAX_STRING:
        raise HandshakeError(f"export name is {len(name)} bytes long; NBD allows "
                             f"{MAX_STRING}")
    return name


def _one_line(payload: bytes) -> str:
    text = " ".join(payload.decode("utf-8", "replace").split())
    return text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN] + "..."


def _reason(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


def _u64(data: bytes) -> int:
    return int.from_bytes(data, "big")


def _power_of_2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0
