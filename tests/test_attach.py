"""attach, detach, list and vm-check's input checks, on the host.

This host's kernel has no NBD driver (FACTS.md), so the kernel side of
attach, and the device's agent, run only in the one-kernel VM
(tests/e2e/test_attach_vm.py, test_recover_vm.py).  Here: attach without NBD
support fails in one line and leaves nothing; an agent that cannot reach the
kernel's NBD family stops its server and leaves nothing; records of real
servers are listed, shown stale when their agent dies, and cleaned up by
detach; bad input is one line and exit status 2.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (assert_one_line_error, create_image, nbdinfo_json, require, require_root,
                      require_tools, run, run_cli)
from nbdloop.kernel import attach as A
from nbdloop.process import wait_exit
from nbdloop.serve import children as srv

MiB = 1 << 20


@pytest.fixture
def rt(tmp_path, monkeypatch) -> Path:
    """A private runtime directory (NBDLOOP_RUNTIME_DIR), for the CLI (the
    environment ``run_cli`` passes on) and for the servers these tests start
    themselves."""
    d = tmp_path / "rt"
    d.mkdir(mode=0o700)
    monkeypatch.setenv("NBDLOOP_RUNTIME_DIR", str(d))
    return d


@pytest.fixture
def state(rt) -> Path:
    d = rt / "attached"
    d.mkdir(mode=0o700)
    return d


@pytest.fixture
def cleanup(state):
    """Stop every server recorded in the state directory at teardown."""
    yield
    for att in A.load(state):
        A.stop_agent(att)


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


def leftovers(state: Path) -> list[str]:
    return sorted(p.name for p in state.iterdir() if p.name != ".lock")


def host_has_nbd() -> bool:
    return bool(A.nbd_devices()) or bool(list(Path("/dev").glob("nbd[0-9]*")))


def wait_gone(pid: int) -> None:
    """Wait for ``pid`` to exit (it may be our child: reap it then)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        assert wait_exit(pidfd, 30), f"process {pid} did not exit"
    finally:
        os.close(pidfd)
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def fake_sys_block(tmp_path: Path, devices: dict[str, bool]) -> Path:
    """A stand-in for /sys/block listing NBD devices (name -> connected).
    The host kernel has none, so device choice is tested against this."""
    sys_block = tmp_path / "sys-block"
    for name, connected in devices.items():
        (sys_block / name).mkdir(parents=True)
        if connected:
            (sys_block / name / "pid").write_text("1234\n")
    (sys_block / "loop0").mkdir(parents=True)
    return sys_block


# ---- without NBD support --------------------------------------------------------------

def test_attach_without_nbd_support_fails_in_one_line_and_leaves_nothing(rt, image):
    require(not host_has_nbd(),
            "a host without the kernel NBD client (with it, the refusal cannot happen)")
    p = run_cli("attach", str(image))
    line = assert_one_line_error(p, "attach needs the kernel NBD client", status=1)
    assert p.stdout == ""
    if not host_has_nbd():
        assert "modprobe nbd" in line or "no NBD driver" in line, line
        assert "vm-check" in line or "modprobe nbd" in line
    assert processes_mentioning(str(image)) == []
    state = rt / "attached"
    assert not state.exists() or leftovers(state) == []
    assert sorted(p.name for p in rt.iterdir()) in ([], ["attached"])


def test_partitions_are_listed_in_order(tmp_path):
    sys_block = fake_sys_block(tmp_path, {"nbd3": True, "nbd30": True})
    for part in ("nbd3p10", "nbd3p2", "nbd3p1"):
        (sys_block / "nbd3" / part).mkdir()
    (sys_block / "nbd3" / "queue").mkdir()
    assert A.partitions("/dev/nbd3", sys_block) == ["/dev/nbd3p1", "/dev/nbd3p2", "/dev/nbd3p10"]
    assert A.partitions("/dev/nbd30", sys_block) == []
    assert A.partitions("/dev/nbd7", sys_block) == []


def test_support_problem_names_what_is_missing_and_how_to_get_it(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    problem = A.nbd_support_problem(sys_block=empty, dev=empty)
    assert problem is not None and "\n" not in problem
    assert "modprobe nbd" in problem or "no NBD driver" in problem
    assert A.nbd_support_problem(sys_block=fake_sys_block(tmp_path, {"nbd0": False}),
                                 dev=empty) is None


def test_an_agent_that_cannot_reach_the_kernel_stops_its_server(tmp_path, rt, state, image):
    """The real agent and a real server, on a device the kernel cannot
    connect (no NBD driver here): attach must undo everything and say why
    in one line."""
    require_tools("nbdkit")
    require(not host_has_nbd(),
            "a host without NBD devices (with them, the agent would really connect one)")
    sys_block = fake_sys_block(tmp_path, {"nbd0": False})
    with pytest.raises(A.AttachFailed) as e:     # a failure at run time: exit status 1
        A.attach(state, str(image), A.Options(block_size=4096), sys_block=sys_block)
    assert e.value.exit_status == 1
    message = str(e.value)
    assert message == "the kernel has no NBD netlink family (load the driver: `modprobe nbd`)"
    assert processes_mentioning(str(image)) == []
    assert leftovers(state) == []
    assert sorted(p.name for p in rt.iterdir()) == ["attached"]


# ---- list, stale entries, detach ------------------------------------------------------

def start(state: Path, image: Path, device: str, *, mode: str = "direct",
          readonly: bool = False, connections: int = 1, block_size: int = 512
          ) -> A.Attachment:
    """A real server, recorded as attach's agent records it, with the
    supervisor standing in for the agent (an agent needs the kernel's NBD
    driver, which this host lacks)."""
    require_tools("nbdkit")
    name = A.check_device_name(device)
    sock, pidfile, log = (str(state / f"{name}.{s}") for s in ("sock", "pid", "log"))
    argv = srv.nbdloop_serve_argv(str(image), sock, mode=mode, pidfile=pidfile,
                                  readonly=readonly, extra=["--agent"])
    proc = srv.ServerProcess(argv, socket_path=sock, pidfile=pidfile, log=log)
    try:
        proc.start(60)
    except srv.ServerError:
        raise A.AttachError(f"the server for {os.path.realpath(image)} did not start: "
                            f"{A.server_error(Path(log))}") from None
    att = A.Attachment(device=device, image=os.path.realpath(image), mode=mode,
                       readonly=readonly, socket=sock, pid=proc.pid,
                       server_pid=proc.server_pid, connections=connections,
                       block_size=block_size, log=log, started=A.now_iso(),
                       agent_pid=proc.pid, agent_started=A.process_started(proc.pid),
                       state="attached", since=time.time(),
                       identifier=A.new_identifier(os.path.realpath(image)))
    A.save(state, att)
    return att


def serves(att: A.Attachment) -> bool:
    return A._serves(att.server_pid, att)


def test_started_server_is_recorded_and_serves(state, image, cleanup):
    require_tools("nbdinfo")
    att = start(state, image, "/dev/nbd0", connections=2, block_size=4096)
    assert att.image == os.path.realpath(image)
    assert A.agent_alive(att) and serves(att)
    assert A.state_of(att) == "disconnected"   # no kernel client here
    assert leftovers(state) == ["nbd0.json", "nbd0.log", "nbd0.pid", "nbd0.sock"]
    saved = json.loads((state / "nbd0.json").read_text())
    assert saved["pid"] == att.pid and saved["server_pid"] == att.server_pid
    assert saved["connections"] == 2 and saved["block_size"] == 4096
    info = nbdinfo_json(f"nbd+unix:///?socket={att.socket}")
    assert info["exports"][0]["export-size"] == 64 * MiB


def test_an_agent_is_known_across_its_exec_and_not_by_its_pid_alone(tmp_path):
    """restart execs the agent anew: it must stay alive in the record (its
    command line changes, its start does not); a record whose start is not
    the process's names another process that got the pid."""
    go = tmp_path / "go"
    child = subprocess.Popen([sys.executable, "-c",
                              "import os, sys, time\n"
                              f"while not os.path.exists({str(go)!r}): time.sleep(0.01)\n"
                              "os.execv('/bin/sleep', ['sleep', '30'])"])
    try:
        att = A.Attachment(device="/dev/nbd0", image="/x.img", mode="direct", readonly=False,
                           socket="/x.sock", pid=0, server_pid=0, connections=1,
                           block_size=512, log="/x.log", started=A.now_iso(),
                           agent_pid=child.pid,
                           agent_started=A.process_started(child.pid))
        assert A.agent_alive(att)
        go.touch()
        deadline = time.monotonic() + 30
        while Path(f"/proc/{child.pid}/cmdline").read_bytes() != b"sleep\x0030\x00":
            assert time.monotonic() < deadline, "the child did not exec"
            time.sleep(0.01)
        assert A.agent_alive(att)
        assert not A.agent_alive(dataclasses.replace(att, agent_started=att.agent_started - 1))
        assert not A.agent_alive(dataclasses.replace(att, agent_started=0))
        child.kill()
        while A.process_started(child.pid) is not None:   # a zombie is not alive
            assert time.monotonic() < deadline, "the killed child still runs"
            time.sleep(0.01)
        assert not A.agent_alive(att)
    finally:
        child.kill()
        child.wait()


def test_list_shows_a_dead_server_as_stale_and_detach_cleans_it(rt, state, image, cleanup):
    att = start(state, image, "/dev/nbd0")
    p = run_cli("list")
    assert p.returncode == 0, p.stderr
    header, row = p.stdout.splitlines()
    assert header.split() == ["NAME", "SIZELIMIT", "OFFSET", "RO", "BACK-FILE", "DIO",
                              "LOG-SEC", "MODE", "PID", "CONNS", "PARTS", "STATE"]
    assert row.split() == ["/dev/nbd0", "0", "0", "0", os.path.realpath(image), "1", "512",
                           "direct", str(att.pid), "1", "-", "disconnected"]

    os.kill(att.pid, signal.SIGKILL)
    wait_gone(att.pid)
    assert serves(att)          # under an agent, nbdkit outlives its supervisor
    p = run_cli("list")
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[1].split()[-6:] == [
        "stale:", "its", "agent", "(pid", f"{att.pid})", "has", "died"][-6:]
    rows = json.loads(run_cli("list", "--json").stdout)["attachments"]
    assert [(r["state"], r["reason"]) for r in rows] == [
        ("stale", f"its agent (pid {att.pid}) has died")]

    p = run_cli("detach", "/dev/nbd0")
    assert p.returncode == 0, p.stderr
    assert "stale" in p.stderr
    wait_gone(att.server_pid)   # detach stopped the orphaned nbdkit
    assert leftovers(state) == []
    assert sorted(f.name for f in rt.iterdir()) == ["attached"], "serve's ready file is left"
    assert run_cli("list").stdout == ""
    assert processes_mentioning(str(image)) == []


def test_detach_by_image_stops_a_running_server(rt, state, image, cleanup):
    att = start(state, image, "/dev/nbd3", mode="buffered")
    p = run_cli("detach", str(image))
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""
    wait_gone(att.pid)
    assert not A.agent_alive(att) and not serves(att)
    assert processes_mentioning(str(image)) == []
    assert leftovers(state) == []
    # The server stopped cleanly: the image lock is free for the next one.
    again = start(state, image, "/dev/nbd3")
    assert A.agent_alive(again)


def test_list_json_and_table(rt, state, tmp_path, cleanup):
    images = []
    for name in ("a.img", "b.img"):
        images.append(create_image(tmp_path / name, "16M"))
    a = start(state, images[0], "/dev/nbd10", mode="buffered", readonly=True, block_size=4096)
    b = start(state, images[1], "/dev/nbd2", connections=4)
    p = run_cli("list", "--json")
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout)["attachments"]
    assert [r["device"] for r in rows] == ["/dev/nbd2", "/dev/nbd10"]   # by number
    assert rows[1].pop("state_seconds") >= 0
    assert rows[1] == {
        "device": "/dev/nbd10", "image": os.path.realpath(images[0]), "mode": "buffered",
        "readonly": True,
        "socket": a.socket, "pid": a.pid, "server_pid": a.server_pid, "connections": 1,
        "block_size": 4096, "log": a.log, "started": a.started, "state": "disconnected",
        "agent_pid": a.pid, "reason": "", "timeout": 60, "recover_timeout": 120,
        "identifier": a.identifier, "recoveries": 0, "last_recovery": None,
        "offset": 0, "sizelimit": 0, "partscan": False, "partitions": [], "processes": 1,
        "server_pids": []}
    assert rows[0]["connections"] == 4 and rows[0]["pid"] == b.pid
    table = run_cli("list").stdout.splitlines()
    assert [r.split()[0] for r in table] == ["NAME", "/dev/nbd2", "/dev/nbd10"]
    assert table[2].split()[3:8] == ["1", os.path.realpath(images[0]), "0", "4096", "buffered"]
    # Columns line up like losetup's: text to the left, numbers to the right.
    assert len({line.index(line.split()[4]) for line in table}) == 1
    assert len({line.index(line.split()[6]) + len(line.split()[6]) for line in table}) == 1

    # losetup's -O, -n and -j.
    p = run_cli("list", "-O", "name,back-file,CONNS", "--noheadings")
    assert p.returncode == 0, p.stderr
    assert [line.split() for line in p.stdout.splitlines()] == [
        ["/dev/nbd2", os.path.realpath(images[1]), "4"],
        ["/dev/nbd10", os.path.realpath(images[0]), "1"]]
    p = run_cli("list", "-j", str(images[0]), "--output", "NAME")
    assert p.stdout.splitlines() == ["NAME", "/dev/nbd10"]
    p = run_cli("list", "-j", str(tmp_path / "." / "b.img"), "--json")
    assert [r["device"] for r in json.loads(p.stdout)["attachments"]] == ["/dev/nbd2"]
    assert run_cli("list", "-j", str(tmp_path / "other.img")).stdout == ""
    assert_one_line_error(run_cli("list", "-O", "NAME,AUTOCLEAR"), "AUTOCLEAR", "--output")


def test_attach_refuses_an_image_that_is_already_attached(tmp_path, state, image, cleanup):
    start(state, image, "/dev/nbd0")
    sys_block = fake_sys_block(tmp_path, {"nbd0": False, "nbd1": False})
    with pytest.raises(A.AttachError, match=r"already attached to /dev/nbd0$"):
        A.attach(state, str(image), sys_block=sys_block)
    assert leftovers(state) == ["nbd0.json", "nbd0.log", "nbd0.pid", "nbd0.sock"]


def test_device_choice(tmp_path, state, image, cleanup):
    sys_block = fake_sys_block(tmp_path, {"nbd0": True, "nbd1": False, "nbd2": False,
                                          "nbd10": False})
    assert A.nbd_devices(sys_block) == ["/dev/nbd0", "/dev/nbd1", "/dev/nbd2", "/dev/nbd10"]
    assert A.choose_device(state, None, sys_block) == "/dev/nbd1"
    start(state, image, "/dev/nbd1")     # recorded by nbdloop: taken, even if not connected
    assert A.choose_device(state, None, sys_block) == "/dev/nbd2"
    assert A.choose_device(state, "/dev/nbd10", sys_block) == "/dev/nbd10"
    for wanted, phrase in [("/dev/nbd0", "in use"), ("/dev/nbd1", "already attached"),
                           ("/dev/nbd7", "no such NBD device"), ("/dev/sda", "not an NBD")]:
        with pytest.raises(A.AttachError, match=phrase):
            A.choose_device(state, wanted, sys_block)
    full = fake_sys_block(tmp_path / "full", {"nbd0": True})
    with pytest.raises(A.AttachError, match="no free NBD device"):
        A.choose_device(state, None, full)


# ---- bad input: one line, exit status 2 -------------------------------------------------

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


def test_attach_read_only_file_needs_readonly(rt, image):
    image.chmod(0o444)
    try:
        assert_one_line_error(run_cli("attach", str(image)), "--readonly")
    finally:
        image.chmod(0o644)


def test_a_server_that_cannot_start_is_reported_in_one_line(tmp_path, state, image, cleanup):
    """A second writable server on one image is refused by serve (the image
    is locked by a server started behind nbdloop's back, under another
    name): the agent reports serve's own reason and keeps nothing."""
    start(state, image, "/dev/nbd0")
    (state / "nbd0.json").rename(tmp_path / "hidden.json")
    sys_block = fake_sys_block(tmp_path, {"nbd0": False, "nbd1": False})
    try:
        with pytest.raises(A.AttachError) as e:
            A.attach(state, str(image), A.Options(device="/dev/nbd1"), sys_block=sys_block)
    finally:
        (tmp_path / "hidden.json").rename(state / "nbd0.json")
    message = str(e.value)
    assert message.startswith(f"the server for {os.path.realpath(image)} did not start: ")
    assert "\n" not in message and "in use" in message, message
    assert leftovers(state) == ["nbd0.json", "nbd0.log", "nbd0.pid", "nbd0.sock"]


def test_server_error_picks_the_reason_from_the_log(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("nbdloop: serving /x.img (64M, direct, alignment 512) on unix:/s\n"
                   "nbdkit: python.0: error: /p/plugin.py: config_complete: error: Traceback\n"
                   '  File "/p/uring.py", line 53, in set_io_flusher\n'
                   "PermissionError: [Errno 1] prctl(PR_SET_IO_FLUSHER): Operation not permitted\n"
                   "\n"
                   "nbdloop: server exited with status 1\n")
    assert A.server_error(log) == ("PermissionError: [Errno 1] prctl(PR_SET_IO_FLUSHER): "
                                   "Operation not permitted")
    log.write_text("nbdloop: /x.img: in use by another server (locked)\n")
    assert A.server_error(log) == "/x.img: in use by another server (locked)"
    assert A.server_error(tmp_path / "missing.log") == "no log"


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


def test_a_record_of_the_version_before_typed_options_still_loads(state):
    """An upgrade restarts the servers under mounted filesystems from the
    records the old version wrote: their serve options become typed ones."""
    record = {"device": "/dev/nbd3", "image": "/srv/x.img", "mode": "direct",
              "readonly": False, "socket": str(state / "nbd3.sock"), "pid": 10,
              "server_pid": 11, "connections": 2, "block_size": 4096,
              "log": str(state / "nbd3.log"), "started": "2026-12-06T10:00:00+0000",
              "offset": 4096, "sizelimit": 1 << 20,
              "serve_options": ["--mlock", "--stats-file", "/run/s.json",
                                "--offset", "4096", "--sizelimit", str(1 << 20)]}
    (state / "nbd3.json").write_text(json.dumps(record))
    [att] = A.load(state)
    assert (att.mlock, att.stats_file, att.offset, att.sizelimit) == \
        (True, "/run/s.json", 4096, 1 << 20)
    server = att.server()
    assert server.mlock and server.stats_file == "/run/s.json"
    assert (server.export.offset, server.export.length) == (4096, 1 << 20)
    assert server.pidfile == str(state / "nbd3.pid")
    assert "serve_options" not in A.describe(att) and "mlock" not in A.describe(att)
    # A record naming what this version does not know says which, in one line.
    with pytest.raises(ValueError, match="serve option --sched is not known"):
        A.Attachment.from_dict({**record, "serve_options": ["--sched", "normal"]})


def test_removing_a_record_removes_the_ready_files_of_every_process(rt, state):
    """A killed server of several processes leaves one ready file each."""
    from nbdloop.serve.cmdline import ready_files
    att = A.Attachment(device="/dev/nbd4", image="/srv/y.img", mode="direct", readonly=False,
                       socket=str(state / "nbd4.sock"), pid=4242, server_pid=4243,
                       connections=2, block_size=4096, log=str(state / "nbd4.log"),
                       started=A.now_iso(), processes=2)
    A.save(state, att)
    ready = ready_files(att.image, att.pid, 2)
    assert len(ready) == 2 and all(p.parent == rt for p in ready)
    for path in ready:
        path.write_text("4243\n")
    A.remove_files(state, att)
    assert leftovers(state) == []
    assert sorted(f.name for f in rt.iterdir()) == ["attached"]


def test_an_agent_given_a_record_it_cannot_read_says_so_in_one_line(state):
    """restart execs the new agent on the old record: one it cannot read is
    one line in the log, not a traceback."""
    record = state / "nbd5.json"
    record.write_text(json.dumps({
        "device": "/dev/nbd5", "image": "/srv/z.img", "mode": "direct", "readonly": False,
        "socket": str(state / "nbd5.sock"), "pid": 1, "server_pid": 1, "connections": 1,
        "block_size": 512, "log": str(state / "nbd5.log"), "started": A.now_iso(),
        "serve_options": ["--sched", "normal"]}))
    p = subprocess.run([sys.executable, "-m", "nbdloop.kernel.agent", str(record)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [
        f"nbdloop agent: {record}: cannot take the device over: "
        "serve option --sched is not known to this nbdloop"]
