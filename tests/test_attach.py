"""attach, detach, list, restart and the daemon behind them, on the host.

This host's kernel has no NBD driver, so a device is never connected here:
that runs in the one-kernel VM (tests/e2e/test_attach_vm.py,
test_daemon_vm.py).  Here: the records and what is read from them; which
device an attach takes, against a stand-in for /sys/block; the daemon as a
real process (it starts, answers, refuses bad requests in one line and
lives on, ends at SIGTERM); what a new daemon makes of the records, servers
and exports that the one before left; and the commands' refusals, in one
line, without starting a daemon that would find nothing.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest

from conftest import (CLI, ROOT, assert_one_line_error, create_image, require, require_root,
                      require_tools, run, run_cli)
from nbdloop import process
from nbdloop.cli import kernel as cli_kernel
from nbdloop.daemon import control, servers
from nbdloop.daemon.daemon import Daemon
from nbdloop.engine.config import export_from_json
from nbdloop.kernel import attach as A
from nbdloop.serve import children as srv

MiB = 1 << 20
#: Seconds a daemon gets to answer after it is started (it imports, and
#: takes over what it finds); a bound on a failure, not a measure.
DAEMON_START = 120.0
#: What a record says of a device that the kernel no longer has when a
#: daemon takes it over.
DISCONNECTED = ("the device was disconnected while no daemon ran (its recovery time ran out, "
                "or nbd-client -d)")


def processes_mentioning(text: str) -> list[str]:
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{d.name}: {cmdline}")
    return found


def daemons_of(rt: Path) -> list[int]:
    """The nbdloop daemons that run for runtime directory ``rt``, whoever
    started them (a test, or a command that needed one)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            args = (d / "cmdline").read_bytes().split(b"\0")
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"daemon" in args and any(a.startswith(b"nbdloop.cli") for a in args) and \
                f"NBDLOOP_RUNTIME_DIR={rt}".encode() in env:
            found.append(int(d.name))
    return found


def host_has_nbd() -> bool:
    return bool(A.nbd_devices()) or bool(list(Path("/dev").glob("nbd[0-9]*")))


def fake_sys_block(tmp_path: Path, devices: dict[str, str | bool]) -> Path:
    """A stand-in for /sys/block listing NBD devices: name -> False (not
    connected), True (connected) or the backend identifier it was
    connected with.  The host kernel has none, so device choice and what
    the daemon reads of the kernel are tested against this."""
    sys_block = tmp_path / "sys" / "block"
    for name, connected in devices.items():
        (sys_block / name).mkdir(parents=True)
        if connected:
            (sys_block / name / "pid").write_text("1234\n")
        if isinstance(connected, str):
            (sys_block / name / "backend").write_text(connected + "\n")
    (sys_block / "loop0").mkdir(parents=True)
    return sys_block


def record(device: str, image: str = "/srv/x.img", **fields) -> A.Attachment:
    """An attachment as the daemon records one (``fields`` override)."""
    name = os.path.basename(device)
    values = dict(device=device, image=image, mode="direct", readonly=False,
                  socket=f"/run/nbdloop/attached/servers/{name}.sock", pid=0, server_pid=0,
                  connections=1, block_size=512, log=f"/run/nbdloop/attached/servers/{name}.log",
                  started="2026-12-06T10:00:00+0000", identifier=A.new_identifier(image),
                  group="shared", export=name)
    values.update(fields)
    return A.Attachment(**values)


def files(directory: Path) -> list[str]:
    """Every file under ``directory``, as paths relative to it."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


@pytest.fixture
def rt(tmp_path, monkeypatch) -> Path:
    """A private runtime directory (NBDLOOP_RUNTIME_DIR), for the CLI (the
    environment ``run_cli`` passes on) and the daemons.  Any daemon still
    running for it at teardown is stopped, and must then be gone."""
    d = tmp_path / "rt"
    d.mkdir(mode=0o700)
    monkeypatch.setenv("NBDLOOP_RUNTIME_DIR", str(d))
    yield d
    for pid in daemons_of(d):
        started = process.process_started(pid)
        process.terminate(pid, lambda pid=pid: process.process_started(pid) == started, 30.0)
    assert daemons_of(d) == []


@pytest.fixture
def state(rt) -> Path:
    d = rt / "attached"
    d.mkdir(mode=0o700)
    return d


@dataclasses.dataclass
class RunningDaemon:
    proc: subprocess.Popen
    socket: Path
    log: Path

    def call(self, method: str, params: dict | None = None):
        return control.call(self.socket, method, params, timeout=60)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def daemon(rt) -> RunningDaemon:
    """``nbdloop daemon`` for ``rt``, as a user starts it, once it answers;
    stopped at teardown."""
    log = rt.parent / "daemon.log"     # not in rt, whose contents the tests check
    with open(log, "wb") as f:
        proc = subprocess.Popen([*CLI, "daemon"], cwd=ROOT, stdin=subprocess.DEVNULL,
                                stdout=f, stderr=f)
    running = RunningDaemon(proc, rt / "control.sock", log)
    try:
        deadline = time.monotonic() + DAEMON_START
        while True:
            try:
                running.call("list")
                break
            except control.DaemonUnavailable:
                pass
            assert proc.poll() is None, f"the daemon exited {proc.returncode}: " \
                                        f"{running.log_text()}"
            assert time.monotonic() < deadline, f"no answer in {DAEMON_START:g} s: " \
                                                f"{running.log_text()}"
            time.sleep(0.05)
        yield running
    finally:
        process.stop(proc, 30.0)


@pytest.fixture
def stand_in():
    """Factory: a process standing for one that a record names (an agent,
    an nbdkit), running ``argv`` (default: a long sleep) until killed;
    killed at teardown if it still runs."""
    started: list[subprocess.Popen] = []

    def start(*argv: str) -> subprocess.Popen:
        proc = subprocess.Popen(list(argv) or ["sleep", "600"])
        started.append(proc)
        return proc

    yield start
    for proc in started:
        process.kill(proc)


@pytest.fixture
def taken_over():
    """Factory: a :class:`Daemon` of ``state`` that has taken over what the
    records there say, reading the kernel's devices from ``sys_block``;
    returns it and the lines it logged."""
    made: list[Daemon] = []

    def take_over(state: Path, sys_block: Path) -> tuple[Daemon, list[str]]:
        logged: list[str] = []
        d = Daemon(state, log=logged.append, sys_block=sys_block)
        made.append(d)
        d.take_over()
        return d, logged

    yield take_over
    for d in made:
        # A Daemon lives as long as its process and has no close(); this
        # process goes on with the other tests.
        for fd in d.watched:
            os.close(fd)
        os.close(d._wake_r)
        os.close(d._wake_w)


def alive(proc: subprocess.Popen) -> bool:
    return process.process_started(proc.pid) is not None


# ---- without NBD support --------------------------------------------------------------

def test_attach_without_nbd_support_fails_in_one_line_and_starts_nothing(rt, image):
    require(not host_has_nbd(),
            "a host without the kernel NBD client (with it, the refusal cannot happen)")
    p = run_cli("attach", str(image))
    line = assert_one_line_error(p, "attach needs the kernel NBD client", status=1)
    assert p.stdout == ""
    if A._kernel_lacks_nbd_module(os.uname().release):
        assert "has no NBD driver" in line and "vm-check" in line, line
    else:
        assert "modprobe nbd" in line, line
    # Refused before any daemon is asked: none started, nothing recorded.
    assert daemons_of(rt) == []
    assert processes_mentioning(str(image)) == []
    assert files(rt) == []


def test_support_problem_names_what_is_missing_and_how_to_get_it(tmp_path):
    sys_block = fake_sys_block(tmp_path, {})
    dev = tmp_path / "dev"
    dev.mkdir()
    problem = A.nbd_support_problem(sys_block=sys_block, dev=dev)
    assert problem is not None and "\n" not in problem
    assert problem.startswith("attach needs the kernel NBD client: ")
    if A._kernel_lacks_nbd_module(os.uname().release):
        assert f"the running kernel ({os.uname().release}) has no NBD driver" in problem
    else:
        assert "`modprobe nbd`" in problem
    # Any sign of the driver will do: the module loaded (with no device yet:
    # they are made on demand), a device in sysfs or in /dev.
    module = sys_block.parent / "module" / "nbd"
    module.mkdir(parents=True)
    assert A.nbd_support_problem(sys_block=sys_block, dev=dev) is None
    module.rmdir()
    (dev / "nbd0").touch()
    assert A.nbd_support_problem(sys_block=sys_block, dev=dev) is None
    (dev / "nbd0").unlink()
    assert A.nbd_support_problem(sys_block=fake_sys_block(tmp_path / "with", {"nbd0": False}),
                                 dev=dev) is None
    assert A.nbd_support_problem(sys_block=sys_block, dev=dev) == problem


def test_partitions_are_listed_in_order(tmp_path):
    sys_block = fake_sys_block(tmp_path, {"nbd3": True, "nbd30": True})
    for part in ("nbd3p10", "nbd3p2", "nbd3p1"):
        (sys_block / "nbd3" / part).mkdir()
    (sys_block / "nbd3" / "queue").mkdir()
    assert A.partitions("/dev/nbd3", sys_block) == ["/dev/nbd3p1", "/dev/nbd3p2", "/dev/nbd3p10"]
    assert A.partitions("/dev/nbd30", sys_block) == []
    assert A.partitions("/dev/nbd7", sys_block) == []


# ---- which device -------------------------------------------------------------------

def test_device_choice(tmp_path):
    sys_block = fake_sys_block(tmp_path, {"nbd0": True, "nbd1": False, "nbd2": False,
                                          "nbd10": False})
    assert A.nbd_devices(sys_block) == ["/dev/nbd0", "/dev/nbd1", "/dev/nbd2", "/dev/nbd10"]
    # The first device the kernel has that is neither connected nor recorded.
    assert A.choose_device(set(), None, sys_block) == ("/dev/nbd1", False)
    assert A.choose_device({"/dev/nbd1"}, None, sys_block) == ("/dev/nbd2", False)
    # None free: the first number the kernel has none of, and no record
    # names either; the kernel makes that device when it is connected.
    every = {"/dev/nbd1", "/dev/nbd2", "/dev/nbd10"}
    assert A.choose_device(every, None, sys_block) == ("/dev/nbd3", True)
    assert A.choose_device(every | {"/dev/nbd3"}, None, sys_block) == ("/dev/nbd4", True)
    none = fake_sys_block(tmp_path / "none", {})
    assert A.choose_device(set(), None, none) == ("/dev/nbd0", True)
    assert A.choose_device({"/dev/nbd0"}, None, none) == ("/dev/nbd1", True)

    # --device: a free one, whether the kernel has it or will make it.
    assert A.choose_device(set(), "/dev/nbd10", sys_block) == ("/dev/nbd10", False)
    assert A.choose_device(set(), "/dev/nbd7", sys_block) == ("/dev/nbd7", True)
    for taken, wanted, phrase in [
            (set(), "/dev/nbd0", "/dev/nbd0: in use (connected by another NBD client)"),
            ({"/dev/nbd1"}, "/dev/nbd1", "/dev/nbd1: already attached by nbdloop"),
            ({"/dev/nbd7"}, "/dev/nbd7", "/dev/nbd7: already attached by nbdloop")]:
        with pytest.raises(A.AttachError) as e:
            A.choose_device(taken, wanted, sys_block)
        assert not isinstance(e.value, A.DeviceNameError)
        assert str(e.value).startswith(phrase) and e.value.exit_status == 2
    for wanted in ("/dev/sda", "nbd1", "/dev/nbd", "/dev/nbd1p1"):
        with pytest.raises(A.DeviceNameError, match=f"^{wanted}: not an NBD device name"):
            A.choose_device(set(), wanted, sys_block)


# ---- records ------------------------------------------------------------------------

def test_records_are_saved_loaded_and_found(tmp_path):
    state = tmp_path / "attached"
    state.mkdir()
    image = create_image(tmp_path / "b.img", "1M")
    a = record("/dev/nbd10", str(image), state="attached", since=1000.0, made=True,
               mlock=True, stats_file="/run/s.json", group="nbd10")
    b = record("/dev/nbd2", "/srv/a.img", connections=4, state="recovering", reason="why")
    A.save(state, a)
    A.save(state, b)
    # Not ours to interpret: skipped, not fatal.
    (state / "nbd3.json").write_text("{not json")
    (state / "nbd4.json").write_text(json.dumps({"device": "/dev/nbd4"}))
    assert A.load(state) == [b, a]          # by number
    assert files(state) == ["nbd10.json", "nbd2.json", "nbd3.json", "nbd4.json"]

    found = A.load(state)
    assert A.find(found, "nbd10") is found[1]
    assert A.find(found, "/dev/nbd2") is found[0]
    assert A.find(found, str(image)) is found[1]
    assert A.find(found, str(tmp_path / "." / "b.img")) is found[1]
    (tmp_path / "link.img").symlink_to(image)
    assert A.find(found, str(tmp_path / "link.img")) is found[1]
    for other in ("nbd3", "/dev/nbd1", "/srv/other.img"):
        assert A.find(found, other) is None

    A.remove(state, a)
    assert [r.device for r in A.load(state)] == ["/dev/nbd2"]


def test_describe_shows_what_list_shows_and_hides_the_rest(tmp_path):
    sys_block = fake_sys_block(tmp_path, {"nbd10": True})
    (sys_block / "nbd10" / "nbd10p1").mkdir()
    att = record("/dev/nbd10", "/srv/b.img", mode="buffered", readonly=True, block_size=4096,
                 state="attached", since=1000.0, pid=41, server_pid=41, server_pids=[41],
                 made=True, mlock=True, stats_file="/run/s.json", group="nbd10",
                 agent_pid=7, agent_started=9, offset=MiB, sizelimit=8 * MiB)
    assert A.describe(att, sys_block, now=1002.5) == {
        "device": "/dev/nbd10", "image": "/srv/b.img", "mode": "buffered", "readonly": True,
        "socket": att.socket, "pid": 41, "server_pid": 41, "connections": 1,
        "block_size": 4096, "log": att.log, "started": att.started, "state": "attached",
        "reason": "", "timeout": 60, "recover_timeout": 120, "identifier": att.identifier,
        "recoveries": 0, "last_recovery": None, "offset": MiB, "sizelimit": 8 * MiB,
        "partscan": False, "processes": 1, "server_pids": [41], "state_seconds": 2.5,
        "partitions": ["/dev/nbd10p1"], "ref": "", "owner": 0, "size": 0}
    gone = A.describe(dataclasses.replace(att, since=0.0), fake_sys_block(tmp_path / "e", {}))
    assert (gone["state"], gone["state_seconds"], gone["partitions"]) == \
        ("disconnected", None, [])


@pytest.mark.parametrize("recorded,connected,shown", [
    ("attached", True, "attached"),
    ("attached", False, "disconnected"),
    ("recovering", True, "recovering"),
    ("recovering", False, "recovering"),
    ("starting", False, "starting"),
    ("detaching", True, "detaching"),
    ("stale", True, "stale"),
    ("stale", False, "stale"),
])
def test_state_is_the_records_unless_the_kernel_let_an_attached_device_go(
        tmp_path, recorded, connected, shown):
    sys_block = fake_sys_block(tmp_path, {"nbd0": connected})
    assert A.state_of(record("/dev/nbd0", state=recorded), sys_block) == shown


def test_a_record_of_the_version_before_typed_options_still_loads(state):
    """An upgrade takes over the devices from the records the old version
    wrote: their serve options become typed ones."""
    old = {"device": "/dev/nbd3", "image": "/srv/x.img", "mode": "direct",
           "readonly": False, "socket": str(state / "nbd3.sock"), "pid": 10,
           "server_pid": 11, "connections": 2, "block_size": 4096,
           "log": str(state / "nbd3.log"), "started": "2026-12-06T10:00:00+0000",
           "offset": 4096, "sizelimit": 1 << 20,
           "serve_options": ["--mlock", "--stats-file", "/run/s.json",
                             "--offset", "4096", "--sizelimit", str(1 << 20)]}
    (state / "nbd3.json").write_text(json.dumps(old))
    [att] = A.load(state)
    assert (att.mlock, att.stats_file, att.offset, att.sizelimit) == \
        (True, "/run/s.json", 4096, 1 << 20)
    assert (att.group, att.export, att.agent_pid, att.made) == ("", "", 0, False)
    shown = A.describe(att)
    assert "serve_options" not in shown and "mlock" not in shown
    # A record naming what this version does not know says which, in one
    # line, and load() passes over it.
    with pytest.raises(ValueError, match="^serve option --sched is not known"):
        A.Attachment.from_dict({**old, "serve_options": ["--sched", "normal"]})
    (state / "nbd3.json").write_text(json.dumps({**old, "serve_options": ["--sched", "x"]}))
    assert A.load(state) == []


def agent_era_record(state: Path, **fields) -> dict:
    """A record as the per-device agent of an nbdloop before the daemon
    wrote it: an agent, a supervisor and its nbdkit, no group or export."""
    data = {"device": "/dev/nbd1", "image": "/srv/old.img", "mode": "buffered",
            "readonly": True, "socket": str(state / "nbd1.sock"), "pid": 20,
            "server_pid": 21, "connections": 2, "block_size": 4096,
            "log": str(state / "nbd1.log"), "started": "2026-12-06T10:00:00+0000",
            "agent_pid": 19, "agent_started": 12345, "state": "attached", "since": 1.5,
            "reason": "", "timeout": 60, "recover_timeout": 120,
            "identifier": "nbdloop:0123456789ab:/srv/old.img", "recoveries": 1,
            "last_recovery": {"cause": "nbdkit (pid 9) ended", "seconds": 0.4,
                              "at": "2026-12-06T11:00:00+0000"},
            "mlock": False, "stats_file": "", "offset": 0, "sizelimit": 0,
            "partscan": False, "processes": 1, "server_pids": [21]}
    data.update(fields)
    (state / "nbd1.json").write_text(json.dumps(data, indent=2) + "\n")
    return data


def test_a_record_of_the_agent_era_still_loads(state):
    data = agent_era_record(state)
    [att] = A.load(state)
    assert att.as_dict() == {**data, "group": "", "export": "", "made": False, "ref": "",
                             "owner": 0, "owner_gid": 0, "owner_groups": [], "image_id": []}
    assert not att.agent_alive()        # no such agent runs
    assert "agent_pid" not in A.describe(att)


def test_an_agent_is_known_across_its_exec_and_not_by_its_pid_alone(tmp_path):
    """An agent of before the daemon restarted by exec'ing itself: it must
    stay alive in the record (its command line changes, its start does
    not), since the daemon stops it before taking its device over; a
    record whose start is not the process's names another process that got
    the pid."""
    go = tmp_path / "go"
    child = subprocess.Popen([sys.executable, "-c",
                              "import os, sys, time\n"
                              f"while not os.path.exists({str(go)!r}): time.sleep(0.01)\n"
                              "os.execv('/bin/sleep', ['sleep', '30'])"])
    try:
        att = record("/dev/nbd0", agent_pid=child.pid,
                     agent_started=process.process_started(child.pid))
        assert att.agent_alive()
        go.touch()
        deadline = time.monotonic() + 30
        while Path(f"/proc/{child.pid}/cmdline").read_bytes() != b"sleep\x0030\x00":
            assert time.monotonic() < deadline, "the child did not exec"
            time.sleep(0.01)
        assert att.agent_alive()
        assert not dataclasses.replace(att, agent_started=att.agent_started - 1).agent_alive()
        assert not dataclasses.replace(att, agent_started=0).agent_alive()
        child.kill()
        while process.process_started(child.pid) is not None:   # a zombie is not alive
            assert time.monotonic() < deadline, "the killed child still runs"
            time.sleep(0.01)
        assert not att.agent_alive()
    finally:
        child.kill()
        child.wait()


# ---- the daemon, a real process ------------------------------------------------------

def test_the_daemon_answers_and_a_second_one_leaves_it_be(rt, daemon):
    assert daemon.call("list") == {"attachments": []}
    mode = os.lstat(daemon.socket).st_mode
    # 0660 and the group nbdloop's where make install made that group.
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) in (0o600, 0o660)
    assert f"ready: 0 device(s), pid {daemon.proc.pid}" in daemon.log_text()

    second = run_cli("daemon")
    assert second.returncode == 0, second.stderr
    assert second.stderr.strip().splitlines() == ["nbdloop: another nbdloop daemon runs"]
    assert daemons_of(rt) == [daemon.proc.pid]
    assert daemon.call("list") == {"attachments": []}


def test_sigterm_ends_the_daemon_with_status_0(rt, daemon):
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(60) == 0, daemon.log_text()
    assert daemon.log_text().splitlines()[-1] == \
        "nbdloop daemon: stopping; the devices and their servers stay"
    assert daemons_of(rt) == []
    with pytest.raises(control.DaemonUnavailable):
        daemon.call("list")


def test_a_daemon_that_ended_leaves_no_reason_to_start_another(rt, daemon):
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(60) == 0, daemon.log_text()
    p = run_cli("list")
    assert (p.returncode, p.stdout) == (0, ""), p.stderr
    assert daemons_of(rt) == []


@pytest.mark.parametrize("args,line", [
    (["detach", "nbd3"], "nbdloop: /dev/nbd3: not attached (see nbdloop list)"),
    (["detach", "/dev/nbd3"], "nbdloop: /dev/nbd3: not attached (see nbdloop list)"),
    (["restart", "nbd0"], "nbdloop: nbd0: not attached (see nbdloop list)"),
])
def test_commands_on_what_the_daemon_does_not_have_are_one_line(rt, daemon, args, line):
    assert assert_one_line_error(run_cli(*args), status=2) == line
    assert daemons_of(rt) == [daemon.proc.pid]
    assert daemon.call("list") == {"attachments": []}


def test_list_without_a_daemon_or_records_starts_none(rt):
    p = run_cli("list")
    assert (p.returncode, p.stdout, p.stderr) == (0, "", "")
    p = run_cli("list", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == {"attachments": []}
    assert daemons_of(rt) == []
    assert not (rt / "control.sock").exists()


#: What the daemon's attach refuses: (params, a phrase of its one-line
#: refusal).  "{img}" is an image that exists.
BAD_ATTACH = [
    pytest.param({"image": "disk.img"}, "disk.img: the image's path must be absolute",
                 id="relative"),
    pytest.param({}, "image must be a non-empty string", id="no-image"),
    pytest.param({"image": 5}, "image must be a non-empty string", id="image-number"),
    pytest.param({"image": "{img}", "options": ["direct"]}, "options must be an object",
                 id="options-array"),
    pytest.param({"image": "{img}", "options": "mode=direct"}, "options must be an object",
                 id="options-string"),
    pytest.param({"image": "{img}", "options": {"bogus": 1}}, "bogus", id="unknown-key"),
    pytest.param({"image": "{img}", "options": {"mode": "sideways"}},
                 "unknown mode 'sideways'", id="mode"),
    pytest.param({"image": "{img}", "options": {"device": "/dev/sda"}},
                 "not an NBD device name", id="device-name"),
] + [pytest.param({"image": "{img}", "options": {name: value}}, name, id=f"{name}-type")
     for name, value in [("connections", "two"), ("readonly", "yes"), ("offset", "x"),
                         ("block_size", "4096"), ("device", 5)]]


@pytest.mark.parametrize("params,phrase", BAD_ATTACH)
def test_a_bad_attach_request_is_refused_in_one_line_and_the_daemon_lives_on(
        rt, daemon, image, params, phrase):
    params = {k: str(image) if v == "{img}" else v for k, v in params.items()}
    with pytest.raises(control.DaemonError) as e:
        daemon.call("attach", params)
    message = str(e.value)
    assert (e.value.exit_status, "\n" in message) == (2, False), message
    assert phrase in message
    assert daemon.proc.poll() is None
    assert daemon.call("list") == {"attachments": []}
    assert "Traceback" not in daemon.log_text()
    assert files(rt / "attached") == []


def test_list_with_records_starts_a_daemon_that_shows_them_stale(rt, state, tmp_path):
    """Records of devices that this host's kernel does not have (a daemon
    that ended, a reboot without the records' removal): a command that
    lists them starts a daemon, which takes them over as stale; detach
    removes them, by device or by image."""
    images = [os.path.realpath(create_image(tmp_path / name, "16M"))
              for name in ("a.img", "b.img")]
    a = record("/dev/nbd10", images[0], mode="buffered", readonly=True, block_size=4096,
               state="attached", pid=4242, server_pid=4242, server_pids=[4242])
    b = record("/dev/nbd2", images[1], connections=4, state="attached", pid=4242,
               server_pid=4242, server_pids=[4242])
    A.save(state, a)
    A.save(state, b)

    p = run_cli("list", "--json")
    assert p.returncode == 0, p.stderr
    [started] = daemons_of(rt)
    rows = json.loads(p.stdout)["attachments"]
    assert [r["device"] for r in rows] == ["/dev/nbd2", "/dev/nbd10"]   # by number
    assert rows[1].pop("state_seconds") >= 0
    assert rows[1] == {
        "device": "/dev/nbd10", "image": images[0], "mode": "buffered", "readonly": True,
        "socket": a.socket, "pid": 4242, "server_pid": 4242, "connections": 1,
        "block_size": 4096, "log": a.log, "started": a.started, "state": "stale",
        "reason": DISCONNECTED, "timeout": 60, "recover_timeout": 120,
        "identifier": a.identifier, "recoveries": 0, "last_recovery": None,
        "offset": 0, "sizelimit": 0, "partscan": False, "partitions": [], "processes": 1,
        "server_pids": [4242], "ref": "", "owner": 0, "size": 0}
    assert (rows[0]["connections"], rows[0]["state"]) == (4, "stale")

    table = run_cli("list").stdout.splitlines()
    assert [r.split()[:14] for r in table] == [
        ["NAME", "SIZE", "SIZELIMIT", "OFFSET", "RO", "BACK-FILE", "DIO", "LOG-SEC", "MODE",
         "PID", "CONNS", "PARTS", "REF", "OWNER"],
        ["/dev/nbd2", "0", "0", "0", "0", images[1], "1", "512", "direct", "4242", "4", "-",
         "-", "root"],
        ["/dev/nbd10", "0", "0", "0", "1", images[0], "0", "4096", "buffered", "4242", "1", "-",
         "-", "root"]]
    assert table[0].endswith(" STATE")
    assert all(line.endswith(f" stale: {DISCONNECTED}") for line in table[1:])
    # losetup's -O, -n and -j.
    p = run_cli("list", "-O", "name,back-file,CONNS", "--noheadings")
    assert p.returncode == 0, p.stderr
    assert [line.split() for line in p.stdout.splitlines()] == [
        ["/dev/nbd2", images[1], "4"], ["/dev/nbd10", images[0], "1"]]
    p = run_cli("list", "-j", str(tmp_path / "." / "a.img"), "--output", "NAME")
    assert p.stdout.splitlines() == ["NAME", "/dev/nbd10"]
    assert run_cli("list", "-j", str(tmp_path / "other.img")).stdout == ""

    p = run_cli("detach", "nbd2")
    assert (p.returncode, p.stdout) == (0, ""), p.stderr
    [line] = p.stderr.splitlines()
    assert line.startswith(f"nbdloop: /dev/nbd2: removed a stale attachment of {images[1]} (")
    p = run_cli("detach", str(tmp_path / "a.img"))
    assert p.returncode == 0, p.stderr
    assert "removed a stale attachment of" in p.stderr
    assert run_cli("list").stdout == ""
    assert files(state) == []
    assert daemons_of(rt) == [started]      # the first command's daemon served them all


def test_detach_of_a_stale_device_says_why_it_was_stale(rt, state, image):
    A.save(state, record("/dev/nbd3", os.path.realpath(image), state="stale",
                         reason="nbdkit (pid 9) ended; recovery is off (--recover-timeout 0)"))
    p = run_cli("detach", "nbd3")
    assert (p.returncode, p.stdout) == (0, ""), p.stderr
    assert p.stderr.splitlines() == [
        f"nbdloop: /dev/nbd3: removed a stale attachment of {os.path.realpath(image)} "
        "(nbdkit (pid 9) ended; recovery is off (--recover-timeout 0))"]


# ---- what a new daemon makes of what the one before left ------------------------------

def test_take_over_forgets_what_no_device_backs(tmp_path, state, taken_over, stand_in):
    exports = servers.exports_dir(state)
    starting = record("/dev/nbd0", state="starting")
    attached = record("/dev/nbd1", state="attached")
    detaching = record("/dev/nbd2", state="detaching")
    stale = record("/dev/nbd3", state="stale", reason="gave up", since=5.0)
    for att in (starting, attached, detaching, stale):
        A.save(state, att)
        A.export_file(state, att).write_text("{}\n")
    (exports / "orphan.json").write_text("{}\n")
    # A group started for an attach that never recorded its device.
    server = stand_in()
    group = servers.Group(name="nbd5", pids=[server.pid],
                          starts=[process.process_started(server.pid)])
    servers.save(state, group)
    Path(group.log(state)).write_text("nbdkit: started\n")

    d, logged = taken_over(state, fake_sys_block(tmp_path, {}))

    assert not alive(server)
    assert d.groups == {} and d.watched == {}
    assert sorted(d.devices) == ["/dev/nbd1", "/dev/nbd3"]
    assert files(state) == ["exports/nbd1.json", "exports/nbd3.json", "nbd1.json", "nbd3.json"]
    now = {a.device: a for a in A.load(state)}
    assert (now["/dev/nbd1"].state, now["/dev/nbd1"].reason) == ("stale", DISCONNECTED)
    assert now["/dev/nbd1"].since > 0
    assert now["/dev/nbd3"] == stale
    assert logged == [f"/dev/nbd2 detached from {detaching.image}"]


def test_take_over_keeps_what_the_kernel_still_has(tmp_path, state, taken_over, stand_in):
    kept = record("/dev/nbd2", state="attached")
    connected = record("/dev/nbd3", state="starting")
    reused = record("/dev/nbd4", state="attached")
    for att in (kept, connected, reused):
        A.save(state, att)
    server = stand_in()
    group = servers.Group(name="shared", pids=[server.pid],
                          starts=[process.process_started(server.pid)])
    servers.save(state, group)
    sys_block = fake_sys_block(tmp_path, {
        "nbd2": kept.identifier, "nbd3": connected.identifier,
        # Connected since, for another attachment: not this record's device.
        "nbd4": A.new_identifier(reused.image),
        # Another program's device, with no record: none of ours.
        "nbd8": "someone else"})

    d, logged = taken_over(state, sys_block)

    assert alive(server)
    assert list(d.watched.values()) == [("shared", server.pid)]
    assert d.groups == {"shared": group}
    now = {a.device: (a.state, a.reason) for a in A.load(state)}
    assert now == {"/dev/nbd2": ("attached", ""), "/dev/nbd3": ("attached", ""),
                   "/dev/nbd4": ("stale", DISCONNECTED)}
    assert logged == []


def test_take_over_stops_the_agent_of_an_nbdloop_before_the_daemon(
        tmp_path, state, taken_over, stand_in):
    """A device of an agent: the agent is stopped (SIGTERM), what its
    supervisor left is killed, and the record joins one of the daemon's
    groups; here the kernel has no device, so it is stale."""
    agent = stand_in()
    left = stand_in(sys.executable, "-c", "import time; time.sleep(600)",
                    str(state / "nbd1.sock"))
    agent_era_record(state, agent_pid=agent.pid,
                     agent_started=process.process_started(agent.pid), pid=left.pid,
                     server_pid=left.pid, server_pids=[left.pid])

    d, logged = taken_over(state, fake_sys_block(tmp_path, {}))

    assert not alive(agent) and agent.wait() == -signal.SIGTERM
    assert not alive(left)
    assert logged == [f"/dev/nbd1: taking it over from its agent (pid {agent.pid})"]
    [att] = A.load(state)
    assert (att.agent_pid, att.agent_started, att.group, att.export) == (0, 0, "shared", "nbd1")
    assert (att.socket, att.log) == (str(state / "servers" / "shared.sock"),
                                     str(state / "servers" / "shared.log"))
    assert (att.state, att.reason) == ("stale", DISCONNECTED)
    assert A.export_file(state, att) == state / "exports" / "nbd1.json"
    export = export_from_json(A.export_file(state, att).read_text())
    assert (export.image, export.mode, export.readonly, export.offset, export.length) == \
        ("/srv/old.img", "buffered", True, 0, 0)
    assert d.groups == {}


# ---- list's table and attach --persist's line ------------------------------------------

def row(**fields) -> dict:
    """A row of ``list --json``."""
    return {**A.describe(record("/dev/nbd0")), "state": "attached", **fields}


@pytest.mark.parametrize("fields,text", [
    ({"state": "attached", "reason": "ignored"}, "attached"),
    ({"state": "recovering", "state_seconds": 3.25, "reason": "nbdkit (pid 9) ended"},
     "recovering for 3.25 s: nbdkit (pid 9) ended"),
    ({"state": "recovering", "state_seconds": None, "reason": ""}, "recovering"),
    ({"state": "stale", "reason": "gave up"}, "stale: gave up"),
    ({"state": "disconnected", "reason": ""}, "disconnected"),
])
def test_state_text(fields, text):
    assert cli_kernel.state_text(row(**fields)) == text


def test_columns_are_named_as_losetup_names_them():
    assert cli_kernel.parse_columns(None, None, None) == cli_kernel.DEFAULT_COLUMNS
    assert cli_kernel.parse_columns(None, None, "name, back-file,STATE") == \
        ["NAME", "BACK-FILE", "STATE"]
    with pytest.raises(click.BadParameter, match="unknown column 'AUTOCLEAR'"):
        cli_kernel.parse_columns(None, None, "NAME,AUTOCLEAR")
    assert_one_line_error(run_cli("list", "-O", "NAME,AUTOCLEAR"), "AUTOCLEAR", "--output")


def test_table_lines_align_like_losetup():
    rows = [row(device="/dev/nbd2", image="/srv/a.img", connections=12, block_size=512),
            row(device="/dev/nbd10", image="/srv/longer.img", connections=1, block_size=4096,
                partitions=["/dev/nbd10p1", "/dev/nbd10p2"], state="stale", reason="gave up")]
    lines = cli_kernel.table_lines(rows, ["NAME", "BACK-FILE", "CONNS", "LOG-SEC", "PARTS",
                                          "STATE"])
    assert lines == ["NAME       BACK-FILE       CONNS LOG-SEC PARTS           STATE",
                     "/dev/nbd2  /srv/a.img         12     512 -               attached",
                     "/dev/nbd10 /srv/longer.img     1    4096 nbd10p1,nbd10p2 stale: gave up"]
    assert cli_kernel.table_lines(rows, ["NAME"], headings=False) == ["/dev/nbd2", "/dev/nbd10"]


def test_persist_keeps_the_options_given_on_the_command_line(tmp_path):
    ctx = cli_kernel.attach.make_context("attach", [
        "disk.img", "--mode", "buffered", "-r", "--connections", "1",
        "--stats-file", "stats.json", "--persist"])
    options = {k: v for k, v in ctx.params.items() if k not in cli_kernel._NOT_IN_TABLE}
    # Given ones only (--connections 1 too, though it is the default); a
    # relative path as the table's reader will not find it from elsewhere.
    assert cli_kernel._table_options(ctx, options) == [
        "mode=buffered", "connections=1", "readonly",
        f"stats-file={os.path.abspath('stats.json')}"]
    bare = cli_kernel.attach.make_context("attach", ["disk.img"])
    assert cli_kernel._table_options(bare, dict(bare.params)) == []


# ---- bad input: one line, exit status 2, no daemon --------------------------------------

@pytest.mark.parametrize("args,phrase", [
    (["attach", "{tmp}/missing.img"], "no such file"),
    (["attach", "{tmp}"], "is a directory"),
    (["attach", "{img}", "--block-size", "3000"], "--block-size"),
    (["attach", "{img}", "-b", "8192"], "--block-size"),
    (["attach", "{img}", "--connections", "0"], "--connections"),
    (["attach", "{img}", "--mode", "sideways"], "--mode"),
    (["attach", "{img}", "--device", "/dev/sda"], "not an NBD device"),
    (["attach"], "IMAGE"),
    (["detach", "/dev/nbd9"], "not attached"),
    (["detach", "{img}"], "not attached"),
    (["restart", "nbd0"], "not attached"),
    (["vm-check", "{tmp}/missing.img"], "no such file"),
    (["vm-check", "{img}", "--fstype", "xfs"], "too small for xfs"),
    (["vm-check", "{img}", "--fstype", "btrfs"], "--fstype"),
    (["vm-check", "{img}", "-b", "100"], "--block-size"),
    (["vm-check", "{data}"], "holds data"),
])
def test_bad_input_is_one_line(rt, tmp_path, image, args, phrase):
    data = tmp_path / "data.img"
    data.write_bytes(b"precious" * (8 * MiB))   # 64 MiB of data: not a fresh image
    before = data.read_bytes()[:4096]
    args = [a.format(tmp=tmp_path, img=image, data=data) for a in args]
    assert_one_line_error(run_cli(*args), phrase)
    assert data.read_bytes()[:4096] == before
    assert processes_mentioning(str(tmp_path)) == []
    assert daemons_of(rt) == []


def test_attach_read_only_file_needs_readonly(rt, image):
    image.chmod(0o444)
    try:
        assert_one_line_error(run_cli("attach", str(image)), "--readonly")
    finally:
        image.chmod(0o644)


def test_server_error_picks_the_reason_from_the_log(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("nbdloop: serving /x.img (64M, direct, alignment 512) on unix:/s\n"
                   "nbdkit: python.0: error: /p/plugin.py: config_complete: error: Traceback\n"
                   '  File "/p/uring.py", line 53, in set_io_flusher\n'
                   "PermissionError: [Errno 1] prctl(PR_SET_IO_FLUSHER): Operation not permitted\n"
                   "\n"
                   "nbdloop: server exited with status 1\n")
    assert srv.server_error(log) == ("PermissionError: [Errno 1] prctl(PR_SET_IO_FLUSHER): "
                                     "Operation not permitted")
    log.write_text("nbdloop: /x.img: in use by another server (locked)\n")
    assert srv.server_error(log) == "/x.img: in use by another server (locked)"
    assert srv.server_error(tmp_path / "missing.log") == "no log"


def test_users_sees_mounts_and_swap_on_partitions(tmp_path):
    """detach's refusal rests on this: a partition mounted where the path
    has a space, and swap on the other partition.  (Stacked devices, device
    mapper or md, are lsblk's children too; this host's kernel has neither.)"""
    require_root()
    require_tools("losetup", "sfdisk", "mkfs.ext4", "mkswap", "swapon", "lsblk")
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"")
    os.truncate(raw, 64 * MiB)
    dev = run(["losetup", "-f", "--show", "-P", str(raw)]).stdout.strip()
    mnt = tmp_path / "mount point"
    mnt.mkdir()
    try:
        assert A.users(dev) == ([], [])
        run(["sfdisk", "-q", dev], input="label: gpt\n,24M\n,\n", text=True)
        run(["partx", "-u", dev])
        run(["mkfs.ext4", "-q", f"{dev}p1"])
        run(["mkswap", f"{dev}p2"])
        run(["mount", f"{dev}p1", str(mnt)])
        try:
            assert A.users(dev) == ([str(mnt)], [])
            run(["swapon", f"{dev}p2"])
            try:
                assert sorted(A.users(dev)[0]) == sorted([str(mnt), "[SWAP]"])
            finally:
                run(["swapoff", f"{dev}p2"])
        finally:
            run(["umount", str(mnt)])
        assert A.users(dev) == ([], [])
    finally:
        run(["losetup", "-d", dev])
    with pytest.raises(A.AttachFailed, match="cannot tell whether /dev/nonexistent"):
        A.users("/dev/nonexistent")
