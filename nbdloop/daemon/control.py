"""The daemon's control channel: how ``nbdloop attach|detach|list|restart``
ask the daemon for something, over one unix socket.

The transport is an AF_UNIX SOCK_SEQPACKET socket, so the kernel keeps each
message whole and there is no framing of our own.  A message is one JSON
object in UTF-8, at most ``MAX_MESSAGE`` bytes; open files (an image, a
device) travel beside it as SCM_RIGHTS, at most ``MAX_FDS`` of them.

The messages are JSON-RPC 2.0 (https://www.jsonrpc.org/specification), a
well-known format that any tool can speak.  No library: with the kernel
framing the messages, what is left is a handful of checks on a dict, and the
standard library's json does the rest.  A request::

    {"jsonrpc": "2.0", "id": 1, "method": "attach", "params": {...}}

and its answer, either ``{"jsonrpc": "2.0", "id": 1, "result": ...}`` or::

    {"jsonrpc": "2.0", "id": 1, "error":
        {"code": -32000, "message": "one line", "data": {"status": 2}}}

``status`` is the exit status the command shows the error with: 2 when the
caller's input or the state it asked about is wrong, 1 when something failed
at run time.  The codes are JSON-RPC's own for a request that is not JSON,
not a request, names no method we have, or has params that are not an
object (those are all status 2); ``REFUSED`` is ours, for whatever a handler
refuses or fails to do.  Requests must carry an id and be objects:
notifications and batches are not taken, since a caller always waits for
its answer.

One request per connection: the client connects, sends its request and
reads the answer, and the server closes the connection.  That keeps both
ends simple (no ids to match, no state between requests); a client that
needs two things connects twice.

Who asks is what the kernel says of the socket's peer (SO_PEERCRED and
SO_PEERGROUPS, as they were when it connected), never what the message
says.  Root and the members of the group ``nbdloop`` may ask; the socket's
mode (0660, that group) keeps everyone else from connecting at all, and the
check here holds where the socket was made otherwise.  What each may ask is
the handlers' business.
"""
from __future__ import annotations

import dataclasses
import errno
import grp
import json
import os
import select
import socket
import stat
import struct
import sys
import threading
import traceback
from typing import Callable

from nbdloop.paths import USERS_GROUP

#: The largest message, request or answer, in bytes.
MAX_MESSAGE = 64 * 1024
#: The most open files that may travel with one request.
MAX_FDS = 8
#: Seconds a client has to send its request, and the server to send it the
#: answer.  The handler in between is not limited: an attach may take long.
CLIENT_TIMEOUT = 10.0
#: Connections that may wait to be accepted.
BACKLOG = 64
#: Clients served at once; more wait in the backlog.  Users may connect, and
#: each client holds a thread until it speaks or its time runs out.
MAX_CLIENTS = 64
#: SO_PEERGROUPS (asm-generic/socket.h); the socket module lacks it.
SO_PEERGROUPS = 59


#: JSON-RPC 2.0's codes, and ours.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
REFUSED = -32000

#: The id of the one request of a connection that call() makes.
_CALL_ID = 1

_PEERCRED = struct.Struct("iII")     # struct ucred: pid, uid, gid

_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}


# ---- errors -------------------------------------------------------------------

class Refusal(Exception):
    """What a handler raises to refuse a request (status 2: the caller's
    input or the state it asked about) or to report a failure at run time
    (status 1).  The message is one line."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.exit_status = status


class DaemonError(Exception):
    """The daemon answered with an error, or gave no answer; the message is
    one line and ``exit_status`` the status to exit with."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.exit_status = status


class DaemonUnavailable(DaemonError):
    """No daemon listens on the socket (it does not exist, or nobody
    accepts on it): the caller may start one."""


class ControlSocketError(Exception):
    """The control socket cannot be set up: its path is taken, or systemd
    passed something else than what the unit should listen on."""

    exit_status = 1


class _BadRequest(Exception):
    """A request that cannot be served as sent; becomes an error answer."""

    def __init__(self, code: int, message: str, request_id: int | str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.request_id = request_id


# ---- the messages -------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Request:
    """One request, as a handler sees it.

    ``fds`` are the open files that came with it.  A handler that keeps one
    removes it from the list (``request.fds.pop(0)``) and closes it when it
    is done; those still in the list when the handler returns or raises are
    closed for it.  They arrive close-on-exec.
    """
    method: str
    params: dict
    fds: list[int]
    uid: int
    gid: int
    pid: int
    groups: tuple[int, ...] = ()    # the supplementary groups


Handler = Callable[[Request], object]


def _one_line(text: str) -> str:
    """``text`` as one line: its non-blank lines joined by spaces."""
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _parse_request(data: bytes) -> tuple[int | str, str, dict]:
    """(id, method, params) of a request; _BadRequest says what is wrong
    with one that cannot be served, with its id once that is known."""
    try:
        message = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _BadRequest(PARSE_ERROR, f"request is not JSON in UTF-8: {_one_line(str(e))}")
    if not isinstance(message, dict):
        raise _BadRequest(INVALID_REQUEST, f"request is {_JSON_TYPES[type(message)]}, "
                                           "not an object (batches are not taken)")
    request_id = message.get("id")
    if isinstance(request_id, bool) or not isinstance(request_id, (int, str)):
        raise _BadRequest(INVALID_REQUEST, "request has no id (an integer or a string)")
    if message.get("jsonrpc") != "2.0":
        raise _BadRequest(INVALID_REQUEST, 'request lacks "jsonrpc": "2.0"', request_id)
    method = message.get("method")
    if not isinstance(method, str):
        raise _BadRequest(INVALID_REQUEST, "request has no method (a string)", request_id)
    params = message.get("params", {})
    if not isinstance(params, dict):
        raise _BadRequest(INVALID_PARAMS,
                          f"params of {method} are {_JSON_TYPES[type(params)]}, not an object",
                          request_id)
    return request_id, method, params


def _result(request_id: int | str, result: object) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": request_id, "result": result},
                      allow_nan=False).encode()


def _error(request_id: int | str | None, code: int, message: str, status: int) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": request_id,
                       "error": {"code": code, "message": _one_line(message),
                                 "data": {"status": status}}}).encode()


def _authorize(request: Request) -> None:
    """Refuse a caller that may not ask the daemon anything: anyone but root
    and the members of the group (not only by their primary group)."""
    if request.uid == 0:
        return
    gid = group_id()
    if gid is None or gid not in (request.gid, *request.groups):
        raise Refusal(f"only root and members of the group {USERS_GROUP} may ask the nbdloop "
                      "daemon")


def group_id() -> int | None:
    """The gid of the group whose members may ask; None if it does not exist."""
    try:
        return grp.getgrnam(USERS_GROUP).gr_gid
    except KeyError:
        return None


def _peer_groups(conn: socket.socket) -> tuple[int, ...]:
    """The supplementary groups of the peer (SO_PEERGROUPS)."""
    for room in (256, 65536):
        try:
            data = conn.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * room)
        except OSError as e:
            if e.errno == errno.ERANGE:
                continue
            raise
        return struct.unpack(f"{len(data) // 4}I", data)
    return ()


def _log(message: str) -> None:
    print(f"nbdloop daemon: {message}", file=sys.stderr, flush=True)


# ---- the server ---------------------------------------------------------------

def listen(path: str | os.PathLike) -> socket.socket:
    """A listening control socket at ``path``, mode 0660 and of the group
    (0600 where there is no such group), in place of a stale one that nobody
    listens on.  ControlSocketError if another daemon listens there or the
    path is something else than a socket."""
    path = os.fspath(path)
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        # The mode is the socket's from its creation: a chmod after bind
        # would let anyone connect in between.  The umask is the process's,
        # so this belongs at start-up, before other threads create files.
        old = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        gid = group_id()
        if gid is not None:
            # Root's group until now: nobody but root could connect meanwhile.
            os.chown(path, -1, gid)
            os.chmod(path, 0o660)
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def _remove_stale(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ControlSocketError(f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
        # A full backlog makes connect wait: a daemon that busy is alive.
        probe.settimeout(CLIENT_TIMEOUT)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)
            return
        except FileNotFoundError:
            return
        except TimeoutError:
            pass
    raise ControlSocketError(f"another nbdloop daemon listens on {path}")


def from_systemd() -> socket.socket | None:
    """The control socket that systemd passed (socket activation), or None
    if it passed none or python3-systemd is not installed.
    ControlSocketError unless it is one listening AF_UNIX SOCK_SEQPACKET
    socket."""
    try:
        from systemd import daemon
    except ImportError:
        return None
    fds = daemon.listen_fds()
    # So that the processes the daemon starts do not take the socket for
    # theirs.  listen_fds clears the C environment only, and os.environ is
    # what a child started with env={**os.environ, ...} gets.
    for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if not fds:
        return None
    if len(fds) != 1 or not daemon.is_socket_unix(fds[0], socket.SOCK_SEQPACKET, listening=1):
        raise ControlSocketError(f"systemd passed {len(fds)} file descriptor(s), not one "
                                 "listening AF_UNIX SOCK_SEQPACKET socket")
    return socket.socket(fileno=fds[0])


def notify(state: str) -> None:
    """Tell systemd ``state`` (``READY=1``) if it is listening
    ($NOTIFY_SOCKET); nothing without python3-systemd."""
    try:
        from systemd import daemon
    except ImportError:
        return
    daemon.notify(state)


class ControlServer:
    """Serves requests on a listening socket, which it owns, by calling
    ``methods[request.method](request)``.

    A handler returns the result (anything json can encode) or raises
    Refusal.  Anything else it raises is a bug: the caller gets a status-1
    error with its message, the traceback goes to stderr (the daemon's log),
    and the server carries on.

    Each client is served in a thread of its own, so that a long attach
    holds up nobody else; at most :data:`MAX_CLIENTS` at once, and a client
    has ``client_timeout`` seconds to send its request.
    """

    def __init__(self, sock: socket.socket, methods: dict[str, Handler], *,
                 client_timeout: float = CLIENT_TIMEOUT) -> None:
        self.methods = methods
        self.client_timeout = client_timeout
        self._sock = sock
        # close() wakes serve_forever through this pipe: closing the socket
        # under a thread blocked in accept() does not wake it, and the fd
        # number could be reused meanwhile.
        self._wake_r, self._wake_w = os.pipe()
        self._lock = threading.Lock()
        self._serving = False
        self._closed = False
        self._clients = threading.BoundedSemaphore(MAX_CLIENTS)

    def serve_forever(self) -> None:
        """Accept clients until close() is called (from another thread)."""
        with self._lock:
            if self._closed:
                return
            self._serving = True
        try:
            self._sock.setblocking(False)
            poller = select.poll()
            poller.register(self._sock, select.POLLIN)
            poller.register(self._wake_r, select.POLLIN)
            while True:
                if any(fd == self._wake_r for fd, _ in poller.poll()):
                    return
                if not self._clients.acquire(timeout=0.1):
                    continue
                try:
                    conn, _ = self._sock.accept()
                except (BlockingIOError, InterruptedError):
                    self._clients.release()
                    continue
                except OSError as e:
                    self._clients.release()
                    # Out of fds, say: the connection stays queued, so
                    # polling again at once would spin.
                    _log(f"accepting a client: {e}")
                    select.select([self._wake_r], [], [], 0.1)
                    continue
                threading.Thread(target=self._serve_client, args=(conn,),
                                 name="nbdloop control client", daemon=True).start()
        finally:
            with self._lock:
                self._serving = False
                self._closed = True
            self._release()

    def close(self) -> None:
        """Stop serving: serve_forever returns and the socket is closed.
        Requests already accepted are still served, each on its thread.
        Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._serving:
                os.write(self._wake_w, b"x")
                return
        self._release()

    def __enter__(self) -> ControlServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _release(self) -> None:
        self._sock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _serve_client(self, conn: socket.socket) -> None:
        try:
            self._serve(conn)
        finally:
            self._clients.release()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            pid, uid, gid = _PEERCRED.unpack(
                conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
            groups = _peer_groups(conn)
            conn.settimeout(self.client_timeout)
            try:
                data, fds, flags, _ = socket.recv_fds(conn, MAX_MESSAGE, MAX_FDS,
                                                      socket.MSG_CMSG_CLOEXEC)
            except TimeoutError:
                return      # it never spoke
            except OSError as e:
                _log(f"reading a request from pid {pid}: {e}")
                return
            try:
                if not data and not fds and not flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                    return  # it hung up without a word
                answer = self._answer(data, fds, flags, (pid, uid, gid), groups)
            finally:
                # Closed before the answer is sent, so that a caller who has
                # it knows that the daemon holds no copy it did not keep.
                for fd in fds:
                    os.close(fd)
            try:
                conn.send(answer, socket.MSG_NOSIGNAL)
            except OSError as e:
                _log(f"answering pid {pid}: {e}")

    def _answer(self, data: bytes, fds: list[int], flags: int,
                peer: tuple[int, int, int], groups: tuple[int, ...]) -> bytes:
        pid, uid, gid = peer
        request_id = method = None
        try:
            if flags & socket.MSG_TRUNC:
                raise _BadRequest(INVALID_REQUEST, f"request larger than {MAX_MESSAGE} bytes")
            request_id, method, params = _parse_request(data)
            if flags & socket.MSG_CTRUNC:
                raise _BadRequest(INVALID_REQUEST,
                                  f"more than {MAX_FDS} open files sent with one request",
                                  request_id)
            request = Request(method, params, fds, uid, gid, pid, groups)
            _authorize(request)
            handler = self.methods.get(method)
            if handler is None:
                raise _BadRequest(METHOD_NOT_FOUND, f"unknown method {method!r}", request_id)
            answer = _result(request_id, handler(request))
            if len(answer) > MAX_MESSAGE:
                return _error(request_id, REFUSED, f"the answer to {method} is larger than "
                              f"{MAX_MESSAGE} bytes", 1)
            return answer
        except _BadRequest as e:
            return _error(e.request_id, e.code, str(e), 2)
        except Refusal as e:
            return _error(request_id, REFUSED, str(e), e.exit_status)
        except Exception as e:
            _log(f"{method} (request {request_id!r}) from pid {pid} failed:\n"
                 f"{traceback.format_exc()}")
            return _error(request_id, REFUSED, _one_line(str(e)) or type(e).__name__, 1)


# ---- the client ---------------------------------------------------------------

def call(path: str | os.PathLike, method: str, params: dict | None = None, *,
         fds=(), timeout: float | None = None) -> object:
    """Ask the daemon listening on ``path`` to do ``method``, sending it the
    open files ``fds`` (the caller keeps its own); its result.

    DaemonUnavailable if no daemon listens there; DaemonError if it refused
    or failed (with the status it gave), or closed the connection or took
    longer than ``timeout`` seconds (None: no limit) without answering
    (status 1).
    """
    path = os.fspath(path)
    request = json.dumps({"jsonrpc": "2.0", "id": _CALL_ID, "method": method,
                          "params": {} if params is None else params}).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            if fds:
                socket.send_fds(sock, [request], list(fds), socket.MSG_NOSIGNAL)
            else:
                sock.send(request, socket.MSG_NOSIGNAL)
            data, _, flags, _ = sock.recvmsg(MAX_MESSAGE)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise DaemonUnavailable(f"no nbdloop daemon listens on {path}: {e.strerror}") \
                from None
        except PermissionError as e:
            raise DaemonError(f"connecting to the nbdloop daemon at {path}: {e.strerror} "
                              f"(only root and members of the group {USERS_GROUP} may)", 2) \
                from None
        except TimeoutError:
            raise DaemonError(f"no answer from the nbdloop daemon at {path} "
                              f"in {timeout:g} s") from None
        except OSError as e:
            raise DaemonError(f"talking to the nbdloop daemon at {path}: "
                              f"{e.strerror or e}") from None
    if not data:
        raise DaemonError(f"the nbdloop daemon at {path} closed the connection "
                          "without an answer")
    if flags & socket.MSG_TRUNC:
        raise DaemonError(f"the answer of the nbdloop daemon at {path} is larger than "
                          f"{MAX_MESSAGE} bytes")
    return _read_answer(data, path)


def _read_answer(data: bytes, path: str) -> object:
    try:
        answer = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        answer = None
    if isinstance(answer, dict) and answer.get("id") == _CALL_ID and "result" in answer:
        return answer["result"]
    error = answer.get("error") if isinstance(answer, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        detail = error.get("data")
        status = detail.get("status") if isinstance(detail, dict) else None
        raise DaemonError(_one_line(error["message"]) or "the daemon gave no reason",
                          status if status in (1, 2) and not isinstance(status, bool) else 1)
    raise DaemonError(f"the nbdloop daemon at {path} answered something else than "
                      "a JSON-RPC 2.0 response")
