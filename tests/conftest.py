"""Shared fixtures: real servers started the way users start them.

A test that needs a tool or root that is missing skips with a reason that
names it, except under NBDLOOP_STRICT=1 (set by ``make test`` and CI, which
install everything): there a missing prerequisite is a failure.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nbdloop.serve import children as srv  # noqa: E402

MODES = ["direct", "buffered"]
STRICT = os.environ.get("NBDLOOP_STRICT") == "1"
#: The command line as ``python -m`` runs it, with this interpreter.
CLI = [sys.executable, "-m", "nbdloop.cli"]


def read_stats(path: Path, timeout: float = 5.0) -> dict:
    """The engine counters that ``serve --stats-file`` writes when a
    connection closes: wait for the file, then read it."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} was not written in {timeout}s"
        time.sleep(0.01)
    return json.loads(path.read_text())


def preads_in_flight(h, size: int, depth: int, rounds: int, stride: int | None = None) -> None:
    """``rounds`` times, ``depth`` reads of ``size`` bytes in flight at once on
    the libnbd handle ``h``, the i-th at offset i * ``stride`` (default: size)."""
    import nbd
    bufs = [nbd.Buffer(size) for _ in range(depth)]
    for _ in range(rounds):
        for i, b in enumerate(bufs):
            h.aio_pread(b, i * (stride or size))
        while h.aio_in_flight() > 0:
            h.poll(1000)


def in_threads(worker, count: int) -> None:
    """``worker(0)`` ... ``worker(count - 1)``, each in a thread of its own;
    wait for them all, then assert that none raised (what they raised is
    the message)."""
    errors: list[Exception] = []

    def run_one(i: int) -> None:
        try:
            worker(i)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run_one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


#: A guest script's verdict on one of its scenarios (tests/e2e/guest/product-lib.sh).
SCENARIO = re.compile(r"^NBDLOOP-SCENARIO: (\S+) (PASS|FAIL)(?: (.*))?$", re.MULTILINE)


def check_scenario(run, name: str) -> None:
    """Scenario ``name`` of a VM run reported PASS; else its reason and its
    part of the console."""
    found = {m[1]: (m[2], m[3] or "") for m in SCENARIO.finditer(run.console)}
    assert name in found, f"scenario {name} did not report:\n{run.message}"
    verdict, reason = found[name]
    start = run.console.find(f"NBDLOOP-SCENARIO-START: {name}")
    assert verdict == "PASS", f"{name}: {reason}\n{run.console[start:start + 6000]}"


def require(condition: bool, what: str) -> None:
    """Skip (or, under NBDLOOP_STRICT, fail) unless ``condition``."""
    if condition:
        return
    if STRICT:
        pytest.fail(f"missing prerequisite: {what}")
    pytest.skip(f"missing prerequisite: {what}")


def require_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    require(not missing, f"{', '.join(missing)} not installed (run: make setup)")


def require_root() -> None:
    require(os.geteuid() == 0, "root (for losetup/mount)")


def run(argv, **kw) -> subprocess.CompletedProcess:
    """Run a command; on failure the assertion shows its output."""
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    p = subprocess.run(argv, **kw)
    assert p.returncode == 0, f"{argv} exited {p.returncode}:\n{p.stdout}\n{p.stderr}"
    return p


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120,
            check: bool = False) -> subprocess.CompletedProcess:
    """``nbdloop ARGS...`` in a process of its own, from the checkout, with
    ``env`` added to the environment; its output captured as text.  With
    ``check`` it must exit 0 (the assertion shows its output)."""
    kw = {"cwd": ROOT, "timeout": timeout,
          "env": None if env is None else {**os.environ, **env}}
    if check:
        return run([*CLI, *args], **kw)
    return subprocess.run([*CLI, *args], capture_output=True, text=True, **kw)


def create_image(path: Path, size: str, *options: str) -> Path:
    """``nbdloop create PATH SIZE OPTIONS...``, which must succeed."""
    run_cli("create", str(path), size, *options, check=True)
    return path


def invoke(*args: str):
    """``nbdloop ARGS...`` in this process, through click's test runner
    (stdout and stderr apart): a ``click.testing.Result``."""
    from click.testing import CliRunner

    from nbdloop.cli import main as cli
    return CliRunner().invoke(cli.main, list(args))


def assert_one_line_error(result, *phrases: str, status: int = 2) -> str:
    """The command failed as bad input must make it fail: exit status
    ``status`` (2 for bad input, 1 for a failure at run time), one line on
    stderr that holds every phrase, and no traceback.  ``result`` is
    ``run_cli``'s (a process) or ``invoke``'s (click's Result).  Returns
    the line."""
    if isinstance(result, subprocess.CompletedProcess):
        code, out = result.returncode, result.stdout
    else:
        code, out = result.exit_code, result.output
    assert code == status, (code, out, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr + out
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


def connect(uri: str, *meta_contexts: str, strict: bool = False):
    """A libnbd handle connected to ``uri``, having asked for
    ``meta_contexts``.  Unless ``strict``, libnbd's own checks of requests
    are off, so that what a test sends reaches the server even below the
    minimum block size or out of range."""
    import nbd
    h = nbd.NBD()
    if not strict:
        h.set_strict_mode(0)
    for context in meta_contexts:
        h.add_meta_context(context)
    h.connect_uri(uri)
    return h


def nbdinfo_json(uri: str) -> dict:
    """What ``nbdinfo --json`` says about ``uri``."""
    require_tools("nbdinfo")
    return json.loads(run(["nbdinfo", "--json", uri]).stdout)


def umount(mnt: Path, wait: float = 30.0) -> None:
    """Unmount ``mnt``, retrying while the kernel says it is busy.

    After an io_uring ring is freed, an io-wq worker can still hold the
    request that last used the image, and with it the file, for a moment;
    the mount is busy until the worker lets go (the same delay that the
    teardown of tests/test_engine.py's machine notes for the flock)."""
    deadline = time.monotonic() + wait
    while True:
        p = subprocess.run(["umount", str(mnt)], capture_output=True, text=True)
        if p.returncode == 0:
            return
        if "busy" not in p.stderr or time.monotonic() > deadline:
            raise AssertionError(f"umount {mnt} exited {p.returncode}: {p.stderr.strip()}")
        time.sleep(0.05)


def nbdsh(uri: str, code: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run nbdsh with this interpreter (Debian's, which has python3-libnbd),
    whatever python3 comes first on PATH."""
    argv = [sys.executable, "-m", "nbd", "-u", uri, "-c", code]
    if check:
        return run(argv)
    return subprocess.run(argv, capture_output=True, text=True)


@pytest.fixture(scope="session")
def qemu_installed() -> None:
    """For a VM test module as a whole (``pytest.mark.usefixtures``): session
    scope, so that it is checked before the module's assets are built."""
    require_tools("qemu-system-x86_64")


@pytest.fixture(params=MODES)
def mode(request) -> str:
    return request.param


@pytest.fixture
def image(tmp_path) -> Path:
    """A 64 MiB sparse image."""
    return create_image(tmp_path / "disk.img", "64M")


@pytest.fixture
def serve(tmp_path):
    """Factory: start ``nbdloop serve`` on an image; stopped (and checked to
    have exited cleanly) at teardown."""
    require_tools("nbdkit")
    started: list[srv.ServerProcess] = []

    def start(img, mode="direct", name="nbdloop", **kw) -> srv.ServerProcess:
        s = srv.nbdloop_server(str(img), tmp_path, name=name, mode=mode, **kw)
        started.append(s)
        return s.start()

    yield start
    stop_cleanly(started)


def stop_cleanly(servers) -> None:
    """Stop every server that still runs; each must exit with status 0."""
    for s in servers:
        if s.alive():
            status = s.stop()
            assert status == 0, f"server exited {status}: {s.log_tail()}"


@pytest.fixture
def fourk_fs(tmp_path):
    """An ext4 filesystem on a loop device with 4096-byte logical sectors
    (1 GiB, sparse): direct I/O there must be 4 KiB-aligned, and a 512-byte
    O_DIRECT write fails with EINVAL."""
    require_root()
    require_tools("losetup", "mkfs.ext4")
    raw = tmp_path / "fourk.raw"
    raw.write_bytes(b"")
    os.truncate(raw, 1 << 30)
    dev = run(["losetup", "-f", "--show", "-b", "4096", str(raw)]).stdout.strip()
    mnt = tmp_path / "fourk"
    mnt.mkdir()
    try:
        run(["mkfs.ext4", "-q", "-b", "4096", dev])
        run(["mount", dev, str(mnt)])
        try:
            yield mnt
        finally:
            umount(mnt)
    finally:
        run(["losetup", "-d", dev])


def dio_alignment(directory: Path) -> int | None:
    """The direct-I/O offset alignment of files in ``directory``, or None if
    O_DIRECT is not supported there."""
    probe = directory / "dio-probe"
    probe.write_bytes(bytes(4096))
    try:
        fd = os.open(probe, os.O_RDWR | os.O_DIRECT)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return None
        raise
    from nbdloop.engine import uring
    try:
        return uring.dio_alignment(fd)[1] or None
    finally:
        os.close(fd)
        probe.unlink()
