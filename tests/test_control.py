"""The daemon's control channel: a ControlServer on a thread, real unix
sockets in tmp_path, and real clients, well-behaved (``call``) or not (raw
sockets, a process that is not root, a client that never speaks)."""
from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
import traceback

import pytest

from conftest import ROOT, require_root, require_tools
from nbdloop.daemon import control
from nbdloop.paths import USERS_GROUP
from nbdloop.daemon.control import (
    INVALID_PARAMS, INVALID_REQUEST, MAX_FDS, MAX_MESSAGE, METHOD_NOT_FOUND, PARSE_ERROR,
    REFUSED, ControlServer, ControlSocketError, DaemonError, DaemonUnavailable, Refusal, call,
)

#: How long a test waits for what must happen before it calls the server
#: stuck; a guard against a hang, never a measure of speed.
WAIT = 60.0
NOBODY = 65534


def echo(request):
    return {"params": request.params, "fds": len(request.fds), "uid": request.uid,
            "gid": request.gid, "pid": request.pid, "groups": list(request.groups)}


def read_file(request):
    """Takes the file it was sent, reads it and closes it."""
    fd = request.fds.pop(0)
    try:
        return os.pread(fd, 100, 0).decode()
    finally:
        os.close(fd)


def peek(request):
    """Reads every file it was sent, taking none."""
    return [os.pread(fd, 100, 0).decode() for fd in request.fds]


def refuse(request):
    raise Refusal(f"{request.params['device']} is not attached")


def fail(request):
    raise Refusal("nbdkit did not start", status=1)


def broken(request):
    raise RuntimeError("the handler broke\nover two lines")


def too_big(request):
    return "x" * MAX_MESSAGE


METHODS = {"echo": echo, "read": read_file, "peek": peek, "refuse": refuse, "fail": fail,
           "broken": broken, "too-big": too_big}


@pytest.fixture
def daemon(tmp_path):
    """Factory: a ControlServer serving ``methods`` on a thread, by default
    on ``tmp_path/control.sock`` made by ``control.listen``; the address to
    call.  At teardown, close() must make serve_forever return."""
    require_root()     # the server takes requests from root and the group nbdloop
    started = []

    def start(methods=METHODS, sock=None, client_timeout=control.CLIENT_TIMEOUT):
        if sock is None:
            sock = control.listen(tmp_path / "control.sock")
        server = ControlServer(sock, methods, client_timeout=client_timeout)
        address = sock.getsockname()
        thread = threading.Thread(target=server.serve_forever)
        thread.start()
        started.append((server, thread))
        return address

    yield start
    for server, thread in started:
        server.close()
        thread.join(WAIT)
        assert not thread.is_alive(), "serve_forever did not return after close()"


def request(method="echo", params=None, request_id=1) -> bytes:
    message = {"jsonrpc": "2.0", "id": request_id, "method": method}
    if params is not None:
        message["params"] = params
    return json.dumps(message).encode()


def exchange(address, data: bytes, fds=()) -> dict | None:
    """Send ``data`` as one message, with the open files ``fds``, on a raw
    socket: the answer, parsed, or None if the server hung up without one.
    Returns once the server has closed the connection, so that it holds
    nothing more for this client."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(WAIT)
        sock.connect(address)
        if fds:
            socket.send_fds(sock, [data], list(fds))
        else:
            sock.send(data)
        answer = sock.recv(MAX_MESSAGE)
        if answer:
            assert sock.recv(MAX_MESSAGE) == b"", "a second message on the connection"
    return json.loads(answer) if answer else None


def open_fds() -> int:
    """This process's open files, once every server has finished with its
    clients (a connection that call() left is closed by the server a moment
    after the answer, and those of earlier tests too)."""
    for thread in threading.enumerate():
        if thread.name == "nbdloop control client":
            thread.join(WAIT)
    return len(os.listdir("/proc/self/fd"))


def in_child(work, user: int | None = None, groups=(), gid: int | None = None) -> dict:
    """``work()`` in a forked process, which first becomes ``user`` (uid, and
    gid ``gid`` or the same number, with the supplementary ``groups``) if
    given: ``{"result": ..., "pid": ...}``, or ``{"error": message,
    "status": status}`` if it raised DaemonError; reported through a pipe."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            if user is not None:
                os.setgroups(list(groups))
                os.setgid(user if gid is None else gid)
                os.setuid(user)
            try:
                report = {"result": work(), "pid": os.getpid()}
            except DaemonError as e:
                report = {"error": str(e), "status": e.exit_status}
            os.write(w, json.dumps(report).encode())
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    os.close(w)
    with open(r, "rb") as f:
        report = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child failed (its traceback is above)"
    return json.loads(report)


def assert_error(answer: dict, code: int, phrase: str, request_id=None, status: int = 2):
    assert answer["jsonrpc"] == "2.0" and answer["id"] == request_id, answer
    assert "result" not in answer, answer
    error = answer["error"]
    assert error["code"] == code, error
    assert error["data"] == {"status": status}, error
    assert "\n" not in error["message"] and phrase in error["message"], error


# ---- requests that work ---------------------------------------------------------

def test_a_request_gets_its_result(daemon):
    path = daemon()
    params = {"image": "/srv/disk é.img", "size": 1 << 40, "options": [None, True, 1.5]}
    assert call(path, "echo", params)["params"] == params
    assert call(path, "echo")["params"] == {}


def test_the_raw_answer_is_json_rpc(daemon):
    answer = exchange(daemon(), request("echo", {"n": 7}, request_id="seven"))
    assert answer.keys() == {"jsonrpc", "id", "result"}
    assert answer["jsonrpc"] == "2.0" and answer["id"] == "seven"
    assert answer["result"]["params"] == {"n": 7}


def test_the_caller_is_who_the_kernel_says(daemon):
    path = daemon()
    report = in_child(lambda: call(path, "echo", {"uid": 12, "pid": 34}))
    seen = report["result"]
    assert seen["pid"] == report["pid"] != os.getpid()
    assert (seen["uid"], seen["gid"]) == (os.getuid(), os.getgid())


def test_a_handler_reads_a_file_sent_with_the_request(daemon, tmp_path):
    image = tmp_path / "disk.img"
    image.write_text("the image's first bytes")
    path = daemon()
    with open(image, "rb") as f:
        assert call(path, "read", fds=[f.fileno()]) == "the image's first bytes"
        before = open_fds()
        assert exchange(path, request("read"), [f.fileno()])["result"] == \
            "the image's first bytes"
        assert open_fds() == before, "the handler's file was not closed"
        # The caller keeps its own.
        assert os.pread(f.fileno(), 3, 0) == b"the"


def test_files_that_the_handler_did_not_take_are_closed(daemon, tmp_path):
    path = daemon()
    files = []
    for i in range(MAX_FDS):
        (tmp_path / f"f{i}").write_text(f"file {i}")
        files.append(open(tmp_path / f"f{i}", "rb"))
    try:
        before = open_fds()
        answer = exchange(path, request("peek"), [f.fileno() for f in files])
        assert answer["result"] == [f"file {i}" for i in range(MAX_FDS)]
        assert open_fds() == before, "the daemon kept files that no handler took"
    finally:
        for f in files:
            f.close()


@pytest.mark.parametrize("method, message, status", [
    ("refuse", "/dev/nbd9 is not attached", 2),
    ("fail", "nbdkit did not start", 1),
])
def test_a_refusal_reaches_the_caller_with_its_status(daemon, method, message, status):
    path = daemon()
    with pytest.raises(DaemonError) as e:
        call(path, method, {"device": "/dev/nbd9"})
    assert (str(e.value), e.value.exit_status) == (message, status)
    answer = exchange(path, request(method, {"device": "/dev/nbd9"}))
    assert_error(answer, REFUSED, message, request_id=1, status=status)


# ---- who may ask ----------------------------------------------------------------

@pytest.fixture(scope="module")
def users_group() -> int:
    """The group nbdloop, as make install makes it."""
    if control.group_id() is None:
        subprocess.run(["groupadd", "--system", USERS_GROUP], check=True)
    return control.group_id()


def test_only_root_and_the_group_may_ask(daemon, tmp_path, users_group):
    # An abstract address: no file whose mode stops nobody before the
    # daemon's own check does.
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.bind(f"\0nbdloop-test{tmp_path}")
    sock.listen()
    address = daemon(sock=sock)
    report = in_child(lambda: call(address, "echo"), user=NOBODY)
    assert report == {"error": "only root and members of the group nbdloop may ask the "
                               "nbdloop daemon", "status": 2}
    # A member by a supplementary group, and one whose primary group it is.
    member = in_child(lambda: call(address, "echo"), user=NOBODY, groups=[users_group])
    assert member["result"]["uid"] == NOBODY, member
    assert users_group in member["result"]["groups"], member
    primary = in_child(lambda: call(address, "echo"), user=NOBODY, gid=users_group)
    assert primary["result"]["uid"] == NOBODY, primary
    assert call(address, "echo")["uid"] == 0



# ---- bad input ------------------------------------------------------------------

VALID = request("echo", {"image": "/srv/disk.img", "mode": "direct"})

BAD_INPUT = [
    # name, message, expected code (None: no answer), phrase, id in the answer
    ("garbage", b"\xff\xfe\x00\x01garbage", PARSE_ERROR, "not JSON", None),
    ("invalid JSON", b"{jsonrpc: 2.0, id: 1}", PARSE_ERROR, "not JSON", None),
    ("a JSON list", b'[{"jsonrpc": "2.0", "id": 1, "method": "echo"}]',
     INVALID_REQUEST, "an array", None),
    ("a JSON string", b'"echo"', INVALID_REQUEST, "a string", None),
    ("truncated", VALID[:len(VALID) // 2], PARSE_ERROR, "not JSON", None),
    ("oversized", request("echo", {"pad": "x" * MAX_MESSAGE}),
     INVALID_REQUEST, f"larger than {MAX_MESSAGE} bytes", None),
    ("deeply nested", b"[" * MAX_MESSAGE, PARSE_ERROR, "not JSON", None),
    ("no id", b'{"jsonrpc": "2.0", "method": "echo"}', INVALID_REQUEST, "no id", None),
    ("not 2.0", b'{"jsonrpc": "1.0", "id": 1, "method": "echo"}',
     INVALID_REQUEST, '"jsonrpc": "2.0"', 1),
    ("no method", b'{"jsonrpc": "2.0", "id": 1}', INVALID_REQUEST, "no method", 1),
    ("unknown method", request("format-disk"), METHOD_NOT_FOUND, "'format-disk'", 1),
    ("params a list", request("echo", ["/srv/disk.img"]), INVALID_PARAMS, "not an object", 1),
    ("an empty message", b"", None, None, None),
]


@pytest.mark.parametrize("data, code, phrase, request_id",
                         [case[1:] for case in BAD_INPUT], ids=[case[0] for case in BAD_INPUT])
def test_bad_input_gets_one_line_and_the_server_carries_on(daemon, capfd, data, code, phrase,
                                                         request_id):
    path = daemon()
    answer = exchange(path, data)
    if code is None:
        assert answer is None
    else:
        assert_error(answer, code, phrase, request_id)
    assert call(path, "echo", {"after": "bad input"})["params"] == {"after": "bad input"}
    assert "Traceback" not in capfd.readouterr().err


def test_too_many_files_are_refused_and_all_closed(daemon):
    path = daemon()
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(MAX_FDS + 1)]
    try:
        before = open_fds()
        answer = exchange(path, request("echo"), fds)
        assert open_fds() == before, "the daemon kept files sent with a refused request"
        with pytest.raises(DaemonError) as e:
            call(path, "echo", fds=fds)
        assert call(path, "echo", fds=fds[:MAX_FDS])["fds"] == MAX_FDS
    finally:
        for fd in fds:
            os.close(fd)
    assert_error(answer, INVALID_REQUEST, f"more than {MAX_FDS} open files", request_id=1)
    assert e.value.exit_status == 2 and f"more than {MAX_FDS}" in str(e.value)


def test_a_handler_bug_is_one_line_for_the_caller_and_a_traceback_in_the_log(daemon, capfd):
    path = daemon()
    with pytest.raises(DaemonError) as e:
        call(path, "broken")
    assert (str(e.value), e.value.exit_status) == ("the handler broke over two lines", 1)
    assert call(path, "echo", {"after": "a bug"})["params"] == {"after": "a bug"}
    log = capfd.readouterr().err
    assert "Traceback" in log and "RuntimeError: the handler broke" in log


def test_an_answer_too_large_is_a_failure(daemon):
    with pytest.raises(DaemonError) as e:
        call(daemon(), "too-big")
    assert e.value.exit_status == 1 and f"larger than {MAX_MESSAGE} bytes" in str(e.value)


# ---- clients at once ------------------------------------------------------------

def test_a_silent_client_is_dropped_while_others_are_served(daemon):
    timeout = 0.5
    entered, release = threading.Event(), threading.Event()

    def slow(request):
        entered.set()
        release.wait()
        return "attached at last"

    path = daemon({**METHODS, "slow": slow}, client_timeout=timeout)
    results = []
    slow_call = threading.Thread(target=lambda: results.append(call(path, "slow")))
    slow_call.start()
    try:
        assert entered.wait(WAIT)
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as silent:
            silent.settimeout(WAIT)
            connected = time.monotonic()
            silent.connect(path)
            assert call(path, "echo", {"n": 1})["params"] == {"n": 1}
            assert silent.recv(MAX_MESSAGE) == b"", "the silent client got an answer"
            assert time.monotonic() - connected >= timeout
        # The slow handler has run longer than a client may stay silent,
        # and nothing cut it short.
        assert slow_call.is_alive() and not results
    finally:
        release.set()
        slow_call.join(WAIT)
    assert results == ["attached at last"]


def test_a_caller_that_stops_waiting_gets_a_failure(daemon):
    release = threading.Event()
    path = daemon({"slow": lambda request: release.wait(WAIT)})
    try:
        with pytest.raises(DaemonError) as e:
            call(path, "slow", timeout=0.5)
    finally:
        release.set()
    assert e.value.exit_status == 1 and "no answer" in str(e.value)
    assert call(path, "slow") is True


# ---- the client against no daemon or a broken one ------------------------------

@pytest.mark.parametrize("what", ["missing", "stale"])
def test_no_daemon_is_unavailable(tmp_path, what):
    path = tmp_path / "control.sock"
    if what == "stale":
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            sock.bind(str(path))
    with pytest.raises(DaemonUnavailable) as e:
        call(path, "echo")
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert e.value.exit_status == 1


def test_a_daemon_that_hangs_up_without_answering(tmp_path):
    path = tmp_path / "control.sock"
    listener = control.listen(path)

    def hang_up():
        conn, _ = listener.accept()
        with conn:
            conn.recv(MAX_MESSAGE)

    accepter = threading.Thread(target=hang_up)
    accepter.start()
    try:
        with pytest.raises(DaemonError) as e:
            call(path, "echo", timeout=WAIT)
    finally:
        accepter.join(WAIT)
        listener.close()
    assert e.value.exit_status == 1 and "without an answer" in str(e.value)


# ---- the socket -----------------------------------------------------------------

def test_listen_makes_a_socket_only_root_and_the_group_can_use(tmp_path, users_group):
    path = tmp_path / "control.sock"
    umask = os.umask(0o022)
    try:
        with control.listen(path):
            assert os.umask(0o022) == 0o022, "listen() left the umask changed"
    finally:
        os.umask(umask)
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o660, 0, users_group)


def test_listen_replaces_a_stale_socket_but_not_a_live_one(tmp_path):
    path = tmp_path / "control.sock"
    with control.listen(path):
        with pytest.raises(ControlSocketError, match="another nbdloop daemon listens"):
            control.listen(path)
    # Closed without unlinking, as a daemon that died leaves it.
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    with control.listen(path) as again:
        assert again.getsockname() == str(path)


def test_listen_leaves_what_is_not_a_socket(tmp_path):
    path = tmp_path / "control.sock"
    path.write_text("not a socket")
    with pytest.raises(ControlSocketError, match="not a socket"):
        control.listen(path)
    assert path.read_text() == "not a socket"


def test_close_stops_the_server_and_callers_find_no_daemon(daemon, tmp_path):
    server = ControlServer(control.listen(tmp_path / "other.sock"), METHODS)
    server.close()
    server.close()
    server.serve_forever()      # returns at once: closed before it started
    with pytest.raises(DaemonUnavailable):
        call(tmp_path / "other.sock", "echo")


ACTIVATED = """
import os
from nbdloop.daemon import control
from nbdloop.paths import USERS_GROUP
sock = control.from_systemd()
methods = {"env": lambda request: [os.environ.get("LISTEN_FDS"), os.getpid()]}
control.ControlServer(sock, methods).serve_forever()
"""


def test_systemd_socket_activation(tmp_path, monkeypatch):
    require_root()
    require_tools("systemd-socket-activate")
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    assert control.from_systemd() is None
    path = tmp_path / "control.sock"
    activator = subprocess.Popen(
        ["systemd-socket-activate", "--seqpacket", "-l", str(path),
         sys.executable, "-c", ACTIVATED],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # Written once it listens (the socket file appears before that).
        line = activator.stdout.readline()
        assert line.startswith("Listening on"), line + activator.stdout.read()
        # The first connection starts the daemon, which finds it queued.
        listen_fds, pid = call(path, "env", timeout=WAIT)
        assert pid == activator.pid, "systemd-socket-activate execs the daemon in its place"
        assert listen_fds is None, "the daemon's children would think the socket theirs"
        assert call(path, "env", timeout=WAIT) == [None, pid]
    finally:
        activator.terminate()
        out, _ = activator.communicate(timeout=WAIT)
    assert "Traceback" not in out, out
