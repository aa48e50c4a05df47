"""The command line: create, serve's options, and every bad input, which must
give one line, exit status 2, and leave the image untouched."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (CLI, ROOT, assert_one_line_error, invoke, nbdinfo_json, require,
                      require_root, require_tools, run)
from nbdloop.sizes import parse_size

MiB = 1 << 20


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- sizes and create -----------------------------------------------------------

@pytest.mark.parametrize("text,value", [
    ("512M", 512 * MiB), ("1G", 1 << 30), ("1.5T", 3 << 39), ("4096", 4096),
    ("2g", 2 << 30), ("64KiB", 64 << 10), ("1.5K", 1536), ("100B", 100),
    # util-linux: an i or none is binary, a bare B after the letter decimal.
    ("1KB", 1000), ("1kb", 1000), ("5MB", 5 * 10**6), ("2GB", 2 * 10**9), ("1TB", 10**12),
    ("1.5MB", 1_500_000), ("3MiB", 3 * MiB), ("1E", 1 << 60),
    ("1EB", 10**18)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["abc", "", "1.5.5G", "-5", "10Q", "1.0001K",
                                  "1KiBB", "1BB", "K", "1.5B", "1iB", "1Ki"])
def test_parse_size_rejects_nonsense(text):
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize("size,expected", [("512M", 512 * MiB), ("1G", 1 << 30),
                                           ("1.5T", 3 << 39), ("1048576", MiB)])
def test_create_makes_sparse_image(tmp_path, size, expected):
    img = tmp_path / "a.img"
    r = invoke("create", str(img), size)
    assert r.exit_code == 0, r.stderr
    st = img.stat()
    assert st.st_size == expected
    assert st.st_blocks * 512 < MiB, "sparse"


def test_create_refuses_to_overwrite_without_force(tmp_path):
    img = tmp_path / "a.img"
    img.write_bytes(b"precious" * 128)
    before = digest(img)
    assert_one_line_error(invoke("create", str(img), "1M"), "already exists", "--force")
    assert digest(img) == before
    r = invoke("create", "--force", str(img), "1M")
    assert r.exit_code == 0
    assert img.stat().st_size == MiB and img.read_bytes() == bytes(MiB)


@pytest.mark.parametrize("size,phrase", [("abc", "not a size"), ("0", "positive"),
                                         ("1000", "multiple of 512"), ("-1G", "-1")])
def test_create_rejects_nonsense_sizes(tmp_path, size, phrase):
    img = tmp_path / "a.img"
    assert_one_line_error(invoke("create", str(img), size), phrase)
    assert not img.exists()


def test_create_size_that_does_not_fit(tmp_path):
    img = tmp_path / "huge.img"
    assert_one_line_error(invoke("create", str(img), "64P"), "does not fit")
    assert not img.exists()


# ---- bad input to serve ------------------------------------------------------------

@pytest.fixture
def img(tmp_path) -> Path:
    p = tmp_path / "disk.img"
    p.write_bytes(os.urandom(MiB))
    return p


def test_serve_missing_file(tmp_path):
    assert_one_line_error(invoke("serve", str(tmp_path / "nope.img")), "no such file")


def test_serve_directory(tmp_path):
    assert_one_line_error(invoke("serve", str(tmp_path)), "is a directory")


def test_serve_unreadable_file(img):
    before = digest(img)
    img.chmod(0o000)
    try:
        assert_one_line_error(invoke("serve", str(img)), "not readable")
    finally:
        img.chmod(0o644)
    assert digest(img) == before


def test_serve_read_only_file_needs_readonly(img):
    before = digest(img)
    img.chmod(0o444)
    assert_one_line_error(invoke("serve", str(img)), "read-only", "--readonly")
    assert digest(img) == before


def test_serve_immutable_file_needs_readonly(img):
    require_root()
    require_tools("chattr")
    before = digest(img)
    immutable = subprocess.run(["chattr", "+i", str(img)], capture_output=True).returncode == 0
    require(immutable, "the immutable attribute (chattr +i) on tmp_path's filesystem")
    try:
        assert_one_line_error(invoke("serve", str(img)), "cannot open for writing",
                              "--readonly")
    finally:
        subprocess.run(["chattr", "-i", str(img)], check=True)
    assert digest(img) == before


def test_serve_size_not_multiple_of_512(tmp_path):
    p = tmp_path / "odd.img"
    p.write_bytes(b"\1" * 1000)
    assert_one_line_error(invoke("serve", str(p)), "not a multiple of 512")
    assert p.read_bytes() == b"\1" * 1000


def test_serve_empty_image(tmp_path):
    p = tmp_path / "empty.img"
    p.touch()
    assert_one_line_error(invoke("serve", str(p)), "empty")


@pytest.mark.parametrize("args,phrase", [
    (["--segment-size", "1000"], "segment-size"),
    (["--segment-size", "lots"], "not a size"),
    (["--mode", "fast"], "mode"),
    (["--sched", "fifo"], "sched"),
    (["--threads", "0"], "threads"),
    (["--cpus", "9999"], "usable CPUs"),
    (["--cpus", "one"], "not a CPU list"),
    (["--socket", "/tmp/x.sock", "--port", "10809"], "not both"),
])
def test_serve_bad_options(img, args, phrase):
    before = digest(img)
    assert_one_line_error(invoke("serve", str(img), *args), phrase)
    assert digest(img) == before


def test_serve_socket_path_that_is_not_a_socket(img, tmp_path):
    f = tmp_path / "notasocket"
    f.write_text("keep me")
    assert_one_line_error(invoke("serve", str(img), "--socket", str(f)), "not a socket")
    assert f.read_text() == "keep me"


def test_serve_socket_already_in_use(img, tmp_path, serve):
    other = tmp_path / "other.img"
    other.write_bytes(bytes(MiB))
    s = serve(other)
    assert_one_line_error(invoke("serve", str(img), "--socket", s.socket_path),
                          "already in use")


def test_second_server_on_same_image(img, tmp_path, serve):
    before = digest(img)
    serve(img)
    r = invoke("serve", str(img), "--socket", str(tmp_path / "second.sock"))
    assert_one_line_error(r, "already in use", "locked")
    # A read-only second server is refused too: the writer holds it exclusively.
    r = invoke("serve", str(img), "--readonly", "--socket", str(tmp_path / "third.sock"))
    assert_one_line_error(r, "already in use")
    assert not (tmp_path / "second.sock").exists()
    assert digest(img) == before


def test_port_already_in_use(img):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert_one_line_error(invoke("serve", str(img), "--port", str(port)),
                              "cannot listen", str(port))


def test_filesystem_without_o_direct(tmp_path, serve):
    """ramfs has no direct I/O: direct mode refuses with a hint, buffered works."""
    require_root()
    mnt = tmp_path / "ram"
    mnt.mkdir()
    run(["mount", "-t", "ramfs", "ramfs", str(mnt)])
    try:
        p = mnt / "disk.img"
        p.write_bytes(b"\7" * MiB)
        assert_one_line_error(invoke("serve", str(p)), "O_DIRECT", "--mode buffered")
        s = serve(p, "buffered")
        require_tools("nbdinfo")
        info = nbdinfo_json(s.uri)
        assert info["exports"][0]["export-size"] == MiB
        s.stop()
        assert p.read_bytes() == b"\7" * MiB
    finally:
        run(["umount", str(mnt)])


def test_errors_from_the_installed_command(tmp_path):
    """The real executable, not CliRunner: exit status 2, one line, no traceback."""
    exe = Path(sys.executable).parent / "nbdloop"
    argv = [str(exe)] if exe.exists() else CLI
    p = subprocess.run(argv + ["serve", str(tmp_path / "missing.img")],
                       capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "no such file" in p.stderr
    assert "Traceback" not in p.stderr


# ---- serve's behaviour -------------------------------------------------------------

def serve_cmd(*args: str) -> list[str]:
    return [*CLI, "serve", *args]


@contextlib.contextmanager
def background(argv, pidfile: Path, env=None):
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                         cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not (pidfile.exists() and pidfile.read_text().strip()):
            assert p.poll() is None, p.stdout.read().decode()
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        yield p
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            p.wait(30)


def test_default_socket_is_private(img, tmp_path):
    require_tools("nbdinfo")
    rt = tmp_path / "rt"
    env = dict(os.environ, NBDLOOP_RUNTIME_DIR=str(rt))
    pid = tmp_path / "pid"
    with background(serve_cmd(str(img), "--pidfile", str(pid)), pid, env=env):
        socks = list(rt.glob("*.sock"))
        assert len(socks) == 1 and socks[0].name.startswith("disk.img-")
        assert stat.S_IMODE(socks[0].stat().st_mode) == 0o600
        assert stat.S_IMODE(rt.stat().st_mode) == 0o711   # root's: users reach the daemon only
        run(["nbdinfo", f"nbd+unix:///?socket={socks[0]}"])


def test_tcp_listens_on_loopback_only(img, tmp_path):
    require_tools("nbdinfo", "ss")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pid = tmp_path / "pid"
    with background(serve_cmd(str(img), "--port", str(port), "--pidfile", str(pid)), pid):
        listening = run(["ss", "-Hltn", f"sport = :{port}"]).stdout
        assert f"127.0.0.1:{port}" in listening
        assert f"0.0.0.0:{port}" not in listening and f"*:{port}" not in listening
        info = nbdinfo_json(f"nbd://127.0.0.1:{port}")
        assert info["exports"][0]["export-size"] == MiB


def test_export_name(img, tmp_path):
    require_tools("nbdinfo")
    pid, sock = tmp_path / "pid", tmp_path / "s.sock"
    with background(serve_cmd(str(img), "--socket", str(sock), "--export-name", "disk0",
                              "--pidfile", str(pid)), pid):
        run(["nbdinfo", f"nbd+unix:///disk0?socket={sock}"])
        p = subprocess.run(["nbdinfo", f"nbd+unix:///../../etc/passwd?socket={sock}"],
                           capture_output=True, text=True)
        assert p.returncode != 0
        listed = run(["nbdinfo", "--list", "--json", f"nbd+unix:///?socket={sock}"]).stdout
        assert [e["export-name"] for e in json.loads(listed)["exports"]] == ["disk0"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stops_cleanly_with_an_idle_client(img, tmp_path, sig):
    """A client holding an idle connection (like the kernel's) must not keep
    the server from stopping."""
    import nbd
    pid, sock = tmp_path / "pid", tmp_path / "s.sock"
    with background(serve_cmd(str(img), "--socket", str(sock), "--pidfile", str(pid)),
                    pid) as p:
        h = nbd.NBD()
        h.connect_uri(f"nbd+unix:///?socket={sock}")
        h.pwrite(b"\x42" * 4096, 0)
        h.flush()
        t0 = time.monotonic()
        os.kill(int(pid.read_text()), sig)
        assert p.wait(30) == 0
        assert time.monotonic() - t0 < 15
        assert not pid.exists() and not sock.exists()
    assert img.read_bytes()[:4096] == b"\x42" * 4096


def test_pidfile_appears_only_when_accepting(img, tmp_path):
    """The moment the pidfile exists, a client can connect."""
    import nbd
    for i in range(3):
        pid, sock = tmp_path / f"pid{i}", tmp_path / f"s{i}.sock"
        p = subprocess.Popen(serve_cmd(str(img), "--socket", str(sock), "--pidfile", str(pid)),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while not pid.exists():
                assert p.poll() is None
                time.sleep(0.001)
            h = nbd.NBD()
            h.connect_uri(f"nbd+unix:///?socket={sock}")
            assert h.get_size() == MiB
            h.shutdown()
        finally:
            p.send_signal(signal.SIGTERM)
            assert p.wait(30) == 0


def test_cpus_pins_the_server(img, tmp_path):
    """--cpus confines nbdkit and every worker thread it starts later."""
    import nbd
    cpu = max(os.sched_getaffinity(0))
    pid, sock = tmp_path / "pid", tmp_path / "s.sock"
    with background(serve_cmd(str(img), "--socket", str(sock), "--pidfile", str(pid),
                              "--cpus", str(cpu)), pid):
        sup = int(pid.read_text())
        server = int(Path(f"/proc/{sup}/task/{sup}/children").read_text().split()[0])
        h = nbd.NBD()
        h.connect_uri(f"nbd+unix:///?socket={sock}")
        h.pread(4096, 0)
        tids = os.listdir(f"/proc/{server}/task")
        assert len(tids) > 2
        assert all(os.sched_getaffinity(int(t)) == {cpu} for t in tids)
        h.shutdown()
