"""The NBD client handshake against real servers: nbdkit, qemu-nbd and
nbdloop's own.  What they report is checked against nbdinfo (libnbd) on the
same server, and that the socket ends in the transmission phase is checked
by a simple NBD_CMD_READ on it.

Only what no real server does (hang up at once, send garbage, break the
spec) is played by a scripted server in a thread.
"""
from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import nbdinfo_json, require_tools
from nbdloop.kernel import handshake as hs
from nbdloop.serve import children as srv

SIZE = 1 << 20
#: Known bytes at a known offset of the image, read back through the socket.
PATTERN_OFFSET = 512 * 1024
PATTERN = bytes(range(256)) * 16


@pytest.fixture
def disk(tmp_path) -> Path:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(SIZE)
        f.seek(PATTERN_OFFSET)
        f.write(PATTERN)
    return path


@pytest.fixture
def server(tmp_path):
    """Factory: start a server from ``argv(socket, pidfile)``; ready once its
    pidfile exists, killed at teardown."""
    started: list[srv.ServerProcess] = []

    def start(name: str, argv: Callable[[str, str], list[str]]) -> str:
        sock, pid, log = (str(tmp_path / f"{name}.{s}") for s in ("sock", "pid", "log"))
        s = srv.ServerProcess(argv(sock, pid), socket_path=sock, pidfile=pid, log=log)
        started.append(s)
        s.start(timeout=10)
        return sock

    yield start
    for s in started:
        s.stop(timeout=5)


def nbdkit(server, *args: str, name: str = "nbdkit") -> str:
    require_tools("nbdkit")
    return server(name, lambda sock, pid: ["nbdkit", "-f", "-U", sock, "-P", pid, *args])


def qemu_nbd(server, *args: str) -> str:
    require_tools("qemu-nbd")
    # -t: stay up after the first client, since nbdinfo comes first.
    return server("qemu-nbd", lambda sock, pid: ["qemu-nbd", "-t", "-k", sock,
                                                 f"--pid-file={pid}", *args])


def nbdinfo(sock: str, export_name: str = "") -> dict:
    (export,) = nbdinfo_json(f"nbd+unix:///{export_name}?socket={sock}")["exports"]
    return export


def assert_matches_nbdinfo(export: hs.Export, info: dict) -> None:
    """nbdinfo negotiates structured replies, so flags that depend on them
    (can_df) may differ; these do not."""
    seen = {
        "export-size": export.size,
        "is_read_only": export.readonly,
        "can_flush": export.can_flush,
        "can_fua": export.can_fua,
        "can_trim": export.can_trim,
        "can_zero": export.can_write_zeroes,
        "can_multi_conn": export.can_multi_conn,
        "block_size_minimum": export.min_block,
        "block_size_preferred": export.preferred_block,
        "block_size_maximum": export.max_block,
    }
    # nbdinfo leaves the block sizes out when the server sends none: then
    # they must be the spec's defaults.
    expected = {"block_size_minimum": 1, "block_size_preferred": 4096,
                "block_size_maximum": 32 << 20}
    expected.update({k: info[k] for k in seen if k in info})
    assert seen == expected


def simple_read(sock: socket.socket, offset: int, length: int, cookie: int = 0x1234) -> bytes:
    """One NBD_CMD_READ as the kernel sends it, and its simple reply."""
    sock.settimeout(5)
    sock.sendall(struct.pack(">IHHQQI", hs.NBD_REQUEST_MAGIC, 0, hs.NBD_CMD_READ, cookie,
                             offset, length))
    reply = recv_exactly(sock, 16 + length)
    magic, error, got_cookie = struct.unpack_from(">IIQ", reply)
    assert (hex(magic), error, got_cookie) == (hex(hs.NBD_SIMPLE_REPLY_MAGIC), 0, cookie)
    return reply[16:]


def disconnect(sock: socket.socket) -> None:
    sock.sendall(struct.pack(">IHHQQI", hs.NBD_REQUEST_MAGIC, 0, hs.NBD_CMD_DISC, 0, 0, 0))
    sock.close()


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        assert chunk, f"connection closed after {len(buf)} of {n} bytes"
        buf += chunk
    return bytes(buf)


def assert_one_line(e: pytest.ExceptionInfo, *parts: str) -> str:
    message = str(e.value)
    assert "\n" not in message
    for part in parts:
        assert part in message
    return message


# ---- real servers -------------------------------------------------------------------

@pytest.mark.parametrize("readonly", [False, True], ids=["rw", "ro"])
def test_nbdkit_file(server, disk, readonly):
    sock_path = nbdkit(server, *(["-r"] if readonly else []), "file", str(disk))
    info = nbdinfo(sock_path)
    sock, export = hs.connect_unix(sock_path)
    try:
        assert sock.gettimeout() is None and sock.getblocking()
        assert_matches_nbdinfo(export, info)
        assert export.readonly is readonly
        # Simple replies only: the flag that needs structured ones is clear.
        assert not export.flags & hs.NBD_FLAG_SEND_DF
        assert simple_read(sock, PATTERN_OFFSET, len(PATTERN)) == PATTERN
        assert simple_read(sock, 0, 512) == bytes(512)
    finally:
        disconnect(sock)


def test_nbdkit_block_sizes_are_passed_on(server):
    sock_path = nbdkit(server, "--filter=blocksize-policy", "memory", str(SIZE),
                       "blocksize-minimum=512", "blocksize-preferred=8192",
                       "blocksize-maximum=1M")
    info = nbdinfo(sock_path)
    sock, export = hs.connect_unix(sock_path)
    disconnect(sock)
    assert (export.min_block, export.preferred_block, export.max_block) == (512, 8192, 1 << 20)
    assert_matches_nbdinfo(export, info)


def test_nbdkit_without_block_sizes_gets_the_spec_defaults(server):
    sock_path = nbdkit(server, "memory", str(SIZE))
    sock, export = hs.connect_unix(sock_path)
    disconnect(sock)
    assert (export.size, export.min_block, export.preferred_block, export.max_block) == \
        (SIZE, 1, 4096, 32 << 20)


def test_nbdkit_wrong_export_name_is_refused(server):
    sock_path = nbdkit(server, "--filter=exportname", "memory", str(SIZE), "exportname=disk",
                       "exportname-strict=true")
    sock, export = hs.connect_unix(sock_path, "disk")
    disconnect(sock)
    assert export.size == SIZE
    with pytest.raises(hs.HandshakeError) as e:
        hs.connect_unix(sock_path, "nosuch")
    assert_one_line(e, f"nbd+unix socket {sock_path}: ", "'nosuch'", "no such export")


def test_nbdkit_oldstyle_is_refused(server):
    sock_path = nbdkit(server, "--oldstyle", "memory", str(SIZE))
    with pytest.raises(hs.HandshakeError) as e:
        hs.connect_unix(sock_path)
    assert str(e.value) == (f"nbd+unix socket {sock_path}: "
                            "the server speaks oldstyle NBD, not fixed newstyle")


def test_nbdkit_requiring_tls_is_refused(server, tmp_path):
    psk = tmp_path / "keys.psk"
    psk.write_text(f"nbdloop:{os.urandom(16).hex()}\n")
    psk.chmod(0o600)
    sock_path = nbdkit(server, "--tls=require", f"--tls-psk={psk}", "memory", str(SIZE))
    with pytest.raises(hs.HandshakeError) as e:
        hs.connect_unix(sock_path)
    assert_one_line(e, sock_path, "requires TLS")


@pytest.mark.parametrize("readonly", [False, True], ids=["rw", "ro"])
def test_qemu_nbd(server, disk, readonly):
    sock_path = qemu_nbd(server, "-f", "raw", "-x", "vol", *(["-r"] if readonly else []),
                         str(disk))
    info = nbdinfo(sock_path, "vol")
    sock, export = hs.connect_unix(sock_path, "vol")
    try:
        assert_matches_nbdinfo(export, info)
        assert export.readonly is readonly
        assert simple_read(sock, PATTERN_OFFSET, len(PATTERN)) == PATTERN
    finally:
        disconnect(sock)
    with pytest.raises(hs.HandshakeError) as e:
        hs.connect_unix(sock_path, "")
    assert_one_line(e, sock_path, "export ''", "no such export")


def test_nbdloop_serve(serve, disk):
    """The server whose sockets the kernel will really be given."""
    s = serve(disk)
    info = nbdinfo(s.socket_path)
    sock, export = hs.connect_unix(s.socket_path)
    try:
        assert_matches_nbdinfo(export, info)
        assert simple_read(sock, PATTERN_OFFSET, len(PATTERN)) == PATTERN
    finally:
        disconnect(sock)


def test_negotiate_on_a_socket_of_ones_own_keeps_its_timeout(server):
    sock_path = nbdkit(server, "memory", str(SIZE))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(7)
        sock.connect(sock_path)
        export = hs.negotiate(sock, timeout=3)
        assert sock.gettimeout() == 7
        assert export.size == SIZE
        assert simple_read(sock, 0, 4096) == bytes(4096)


# ---- no server ----------------------------------------------------------------------

def test_missing_socket_is_refused(tmp_path):
    path = str(tmp_path / "absent.sock")
    with pytest.raises(hs.HandshakeError) as e:
        hs.connect_unix(path)
    assert str(e.value) == f"nbd+unix socket {path}: cannot connect: No such file or directory"


def test_socket_nobody_listens_on_is_refused(tmp_path):
    path = str(tmp_path / "dead.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bound:
        bound.bind(path)
        with pytest.raises(hs.HandshakeError) as e:
            hs.connect_unix(path)
    assert str(e.value) == f"nbd+unix socket {path}: cannot connect: Connection refused"


@pytest.mark.parametrize("name, problem", [("a\0b", "contains NUL"),
                                           ("x" * 4097, "4097 bytes long"),
                                           ("\udc80", "not valid UTF-8")])
def test_bad_export_names_are_refused_before_anything_is_sent(name, problem):
    a, b = socket.socketpair()
    with a, b:
        with pytest.raises(hs.HandshakeError) as e:
            hs.negotiate(a, name)
        assert_one_line(e, problem)
        b.setblocking(False)
        with pytest.raises(BlockingIOError):
            b.recv(1)


# ---- scripted servers: what no real one does ----------------------------------------

class Scripted:
    """A server on a unix socket that plays ``script(conn)`` to one client in
    a thread, then records what the client sends until it closes."""

    def __init__(self, path: Path, script: Callable[[socket.socket], None]) -> None:
        self.path = str(path)
        self.received = b""
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(1)
        self.thread = threading.Thread(target=self._serve, args=(script,), daemon=True)
        self.thread.start()

    def _serve(self, script: Callable[[socket.socket], None]) -> None:
        try:
            conn, _ = self.listener.accept()
            with conn:
                conn.settimeout(5)
                script(conn)
                while chunk := conn.recv(65536):
                    self.received += chunk
        except OSError:
            pass  # the client hung up mid-script: what some tests are about

    def finish(self) -> bytes:
        """What the client sent after the script, up to its close."""
        self.thread.join(5)
        assert not self.thread.is_alive()
        self.listener.close()
        return self.received


@pytest.fixture
def scripted(tmp_path):
    servers: list[Scripted] = []

    def start(script: Callable[[socket.socket], None]) -> Scripted:
        s = Scripted(tmp_path / f"scripted{len(servers)}.sock", script)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.listener.close()


def greeting(flags: int = hs.NBD_FLAG_FIXED_NEWSTYLE | hs.NBD_FLAG_NO_ZEROES) -> bytes:
    return struct.pack(">QQH", hs.NBDMAGIC, hs.IHAVEOPT, flags)


def reply(kind: int, data: bytes = b"", option: int = hs.NBD_OPT_GO) -> bytes:
    return struct.pack(">QIII", hs.NBD_REP_MAGIC, option, kind, len(data)) + data


def info_export(size: int = SIZE, flags: int = hs.NBD_FLAG_HAS_FLAGS) -> bytes:
    return reply(hs.NBD_REP_INFO, struct.pack(">HQH", hs.NBD_INFO_EXPORT, size, flags))


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return reply(hs.NBD_REP_INFO, struct.pack(">HIII", hs.NBD_INFO_BLOCK_SIZE, minimum,
                                              preferred, maximum))


class handshake_then:
    """A script: greet, read the client flags and its NBD_OPT_GO (kept in
    ``received``), send ``replies`` and nothing more."""

    def __init__(self, replies: bytes, flags: int | None = None) -> None:
        self.replies = replies
        self.greeting = greeting() if flags is None else greeting(flags)
        self.received = b""

    def __call__(self, conn: socket.socket) -> None:
        conn.sendall(self.greeting)
        client = recv_exactly(conn, 4 + 16)
        (length,) = struct.unpack_from(">I", client, 16)
        conn.sendall(self.replies)
        conn.shutdown(socket.SHUT_WR)
        self.received = client + recv_exactly(conn, length)


def go_option(name: bytes) -> bytes:
    data = struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, hs.NBD_INFO_BLOCK_SIZE)
    return struct.pack(">QII", hs.IHAVEOPT, hs.NBD_OPT_GO, len(data)) + data


@pytest.mark.parametrize("server_flags, client_flags", [
    (hs.NBD_FLAG_FIXED_NEWSTYLE | hs.NBD_FLAG_NO_ZEROES,
     hs.NBD_FLAG_C_FIXED_NEWSTYLE | hs.NBD_FLAG_C_NO_ZEROES),
    (hs.NBD_FLAG_FIXED_NEWSTYLE, hs.NBD_FLAG_C_FIXED_NEWSTYLE),
    # Handshake flags the client does not know are ignored, not echoed.
    (hs.NBD_FLAG_FIXED_NEWSTYLE | 0x8000, hs.NBD_FLAG_C_FIXED_NEWSTYLE),
], ids=["no-zeroes", "plain", "unknown-flag"])
def test_what_the_client_sends(scripted, server_flags, client_flags):
    # An unknown information type comes first, and is ignored.
    script = handshake_then(reply(hs.NBD_REP_INFO, struct.pack(">H", 99) + b"whatever")
                            + info_export(flags=0x2F) + reply(hs.NBD_REP_ACK)
                            + b"after the handshake", flags=server_flags)
    s = scripted(script)
    sock, export = hs.connect_unix(s.path, "vol")
    with sock:
        assert recv_exactly(sock, 19) == b"after the handshake"
    s.finish()
    assert script.received == struct.pack(">I", client_flags) + go_option(b"vol")
    assert export == hs.Export(SIZE, 0x2F, 1, 4096, 32 << 20)
    assert (export.readonly, export.can_flush, export.can_fua, export.can_trim,
            export.can_write_zeroes, export.can_multi_conn) == (True, True, True, True,
                                                                False, False)


def test_an_error_reply_is_followed_by_a_soft_disconnect(scripted):
    s = scripted(handshake_then(reply(hs.NBD_REP_ERR_SHUTDOWN, b"going\ndown")))
    with pytest.raises(hs.HandshakeError) as e:
        hs.connect_unix(s.path)
    assert str(e.value) == (f"nbd+unix socket {s.path}: export '': the server refused "
                            "NBD_OPT_GO with NBD_REP_ERR_SHUTDOWN: going down")
    # NBD_OPT_ABORT, then the socket was closed (finish saw EOF).
    assert s.finish() == struct.pack(">QII", hs.IHAVEOPT, hs.NBD_OPT_ABORT, 0)


def send(data: bytes) -> Callable[[socket.socket], None]:
    """Send ``data`` and nothing more."""
    def script(conn: socket.socket) -> None:
        conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
    return script


@pytest.mark.parametrize("script, problem", [
    (send(b""), "the server closed the connection while reading the greeting"),
    (send(b"HTTP/1.1 400 Bad Request\r\n\r\n"),
     "not an NBD server: it sent 0x485454502f312e31 instead of NBDMAGIC"),
    (send(struct.pack(">QQ", hs.NBDMAGIC, 0x1234)),
     "not an NBD server: it sent 0x0000000000001234 after NBDMAGIC"),
    (send(greeting(0)), "the server speaks plain newstyle NBD, not fixed newstyle"),
    (send(greeting()[:12]), "the server closed the connection while reading the greeting"),
    (handshake_then(b""), "the server closed the connection while reading the reply to "
                          "NBD_OPT_GO"),
    (handshake_then(info_export()[:30]), "the server closed the connection while reading "
                                         "the reply to NBD_OPT_GO"),
    (handshake_then(struct.pack(">QIII", 0xDEADBEEF, hs.NBD_OPT_GO, hs.NBD_REP_ACK, 0)),
     "the server sent 0x00000000deadbeef where an option reply belongs"),
    (handshake_then(reply(hs.NBD_REP_ACK, option=hs.NBD_OPT_ABORT)),
     "the server replied to option 2, not to NBD_OPT_GO"),
    (handshake_then(struct.pack(">QIII", hs.NBD_REP_MAGIC, hs.NBD_OPT_GO, hs.NBD_REP_INFO,
                                1 << 30)),
     "a 1073741824-byte reply to NBD_OPT_GO"),
    (handshake_then(reply(hs.NBD_REP_ACK)),
     "the server accepted NBD_OPT_GO without sending NBD_INFO_EXPORT"),
    (handshake_then(reply(hs.NBD_REP_INFO, struct.pack(">HQ", hs.NBD_INFO_EXPORT, SIZE))),
     "the server sent a 10-byte NBD_INFO_EXPORT, not 12 bytes"),
    (handshake_then(info_export(flags=0) + reply(hs.NBD_REP_ACK)),
     "transmission flags 0x0000 lack NBD_FLAG_HAS_FLAGS"),
    (handshake_then(info_export() + info_block_size(3, 4096, 1 << 20) + reply(hs.NBD_REP_ACK)),
     "block sizes (minimum 3, preferred 4096, maximum 1048576) break the NBD spec"),
    (handshake_then(info_export() + info_block_size(512, 256, 1 << 20)
                    + reply(hs.NBD_REP_ACK)),
     "the preferred must be a power of 2, at least the minimum and 512"),
    (handshake_then(info_export() + info_block_size(512, 4096, 512) + reply(hs.NBD_REP_ACK)),
     "the maximum must be at least the preferred"),
    (handshake_then(reply(2, b"vol")), "reply type 2 to NBD_OPT_GO"),
    (handshake_then(reply(hs.NBD_REP_ERR_UNSUP)),
     "the server does not support NBD_OPT_GO, which nbdloop needs"),
    (handshake_then(reply(hs.NBD_REP_FLAG_ERROR | 77, b"x" * 4000)),
     "refused NBD_OPT_GO with error 77: " + "x" * 200 + "..."),
], ids=["hang-up", "http", "bad-option-magic", "plain-newstyle", "short-greeting",
        "no-reply", "short-reply", "bad-reply-magic", "wrong-option", "huge-reply",
        "no-info-export", "short-info-export", "no-has-flags", "bad-minimum",
        "bad-preferred", "bad-maximum", "unexpected-reply", "go-unsupported",
        "long-error-text"])
def test_broken_servers_are_refused_in_one_line(scripted, script, problem):
    s = scripted(script)
    with pytest.raises(hs.HandshakeError) as e:
        hs.connect_unix(s.path, timeout=5)
    assert_one_line(e, f"nbd+unix socket {s.path}: ", problem)
    s.finish()


def gives_up_in_time(s, done: threading.Event) -> pytest.ExceptionInfo:
    """connect_unix to the scripted server ``s`` with a 0.3 s timeout: the
    HandshakeError it gives up with, well before the 30 s default.  ``done``
    ends the server's script."""
    start = time.monotonic()
    try:
        with pytest.raises(hs.HandshakeError) as e:
            hs.connect_unix(s.path, timeout=0.3)
    finally:
        done.set()
    assert time.monotonic() - start < 10   # the 0.3 s, not the 30 s default
    return e


def test_a_silent_server_times_out(scripted):
    done = threading.Event()
    s = scripted(lambda conn: done.wait(5))
    e = gives_up_in_time(s, done)
    assert str(e.value) == (f"nbd+unix socket {s.path}: the handshake did not finish "
                            "within 0.3s (stuck reading the greeting)")
    s.finish()


def test_the_timeout_bounds_the_whole_handshake(scripted):
    """A server that trickles a byte at a time never lets one recv time out;
    the deadline is for the handshake, not for each read."""
    done = threading.Event()

    def trickle(conn: socket.socket) -> None:
        for byte in greeting():
            if done.wait(0.05):
                return
            conn.sendall(bytes([byte]))
        done.wait(5)

    s = scripted(trickle)
    e = gives_up_in_time(s, done)
    assert_one_line(e, "did not finish within 0.3s (stuck reading the greeting)")
    s.finish()
