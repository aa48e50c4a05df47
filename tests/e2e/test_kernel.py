"""The real kernel NBD client against nbdloop, in a VM.

The guest runs nbd-client with the arguments ``nbdloop attach`` uses, makes
a filesystem, writes files, fscks, remounts and verifies; the verdict comes
from its console.  Afterwards the host checks the image on its own
(e2fsck -fn or xfs_repair -n, and the files' checksums through debugfs or a
read-only loop mount).

Which combinations run (each boot costs 10-20 s of TCG):
- ext4, direct, on a backing with 4 KiB sectors, default -b: the block size
  attach picks is the image's alignment (4096), so every request is aligned.
- ext4, buffered, through the ``nbdloop vm-check`` command: the other mode,
  and the command users (and ``make demo``) run.
- xfs, direct, -C 2, -b 512, on the 4 KiB-sector backing: the kernel sends
  512-byte I/O (xfs writes its log in sectors) that direct mode must serve
  by read-modify-write, over two connections at once.  The hardest case for
  the server; xfs in buffered mode adds nothing the ext4 case does not test.
- a server that hangs: the guest is killed at the timeout and the failure
  names the step and shows the console's last lines.
- the sysfs mark (``/sys/block/nbdN/pid``) that attach and list read as
  "connected", as the real kernel sets and clears it.
"""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import create_image, require_tools, run_cli
from nbdloop import vm
from nbdloop.kernel import vmcheck
from nbdloop.kernel.nbdclient import nbd_client_args

pytestmark = [pytest.mark.vm, pytest.mark.slow]

MiB = 1 << 20
#: Guest scripts of these tests.
GUEST = Path(__file__).resolve().parent / "guest"


@pytest.fixture(scope="module")
def assets() -> vm.VmAssets:
    require_tools("qemu-system-x86_64", "socat", "nbdkit", "e2fsck", "debugfs", "xfs_repair")
    return vm.ensure_assets()


def assert_passed(report: vmcheck.VmCheckReport) -> None:
    text = "\n".join(report.lines())
    assert report.ok, text
    assert report.guest is not None and report.guest.ok, text
    assert report.guest.steps[-1] == "done", text
    assert report.server_status == 0, text
    assert [c.ok for c in report.host] == [True, True], text   # none skipped


def debugfs_sha256(image: Path, name: str) -> str:
    cat = subprocess.run(["debugfs", "-R", f"cat /{name}", str(image)], capture_output=True)
    assert cat.returncode == 0, cat.stderr
    return hashlib.sha256(cat.stdout).hexdigest()


def test_ext4_direct_takes_the_block_size_from_the_alignment(assets, fourk_fs):
    image = create_image(fourk_fs / "disk.img", "128M")
    report = vmcheck.run_vm_check(str(image), mode="direct", fstype="ext4", seed=1,
                                  assets=assets)
    print("\n".join(report.lines()))
    assert_passed(report)
    assert report.block_size == 4096
    assert report.nbd_args == nbd_client_args(vm.GUEST_NBD_DEVICE, host=vm.GUEST_SERVER_HOST,
                                              port=vm.GUEST_SERVER_PORT, block_size=4096)
    assert "logical block 4096," in report.guest.console
    # The host checks in the report are vm-check's own; one more, by hand.
    files = vm.make_files(1)
    name = max(files, key=lambda n: len(files[n]))
    assert debugfs_sha256(image, name) == hashlib.sha256(files[name]).hexdigest()


def test_ext4_buffered_through_the_vm_check_command(assets, tmp_path):
    image = create_image(tmp_path / "disk.img", "128M")
    p = run_cli("vm-check", str(image), "--mode", "buffered", "--fstype", "ext4", "--seed", "2",
                timeout=600)
    print(p.stdout, p.stderr)
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    assert "serving" in out and "buffered" in out
    assert "/dev/nbd0: 262144 sectors, logical block 512," in out   # the file's alignment
    for step in ("connect", "mkfs", "mount", "write", "verify-written", "umount", "fsck",
                 "remount", "verify-remounted", "disconnect"):
        assert f"guest: {step:<20} ok" in out, step
    assert "guest: verdict PASS" in out
    assert f"host:  {'e2fsck -fn':<20} ok: clean" in out
    assert f"host:  {'debugfs checksums':<20} ok: all 8 files match" in out
    assert out.rstrip().endswith("vm-check: PASS")
    files = vm.make_files(2)
    for name, data in files.items():
        assert debugfs_sha256(image, name) == hashlib.sha256(data).hexdigest(), name


def test_xfs_direct_two_connections_512_byte_blocks_on_4k_sectors(assets, fourk_fs):
    image = create_image(fourk_fs / "disk.img", "400M")
    report = vmcheck.run_vm_check(str(image), mode="direct", fstype="xfs", connections=2,
                                  block_size=512, seed=3, assets=assets)
    print("\n".join(report.lines()))
    assert_passed(report)
    assert "2 connection(s) to the server" in report.guest.console
    assert "logical block 512," in report.guest.console
    assert [c.name for c in report.host] == ["xfs_repair -n", "loop-mount checksums"]


def test_hung_server_is_a_failure_with_the_console_tail(assets, tmp_path, serve):
    """nbdkit is frozen (SIGSTOP): nbd-client's handshake never completes,
    the guest is killed at the timeout, and the failure says where."""
    image = create_image(tmp_path / "disk.img", "64M")
    server = serve(image, "direct")
    argv = nbd_client_args(vm.GUEST_NBD_DEVICE, host=vm.GUEST_SERVER_HOST,
                           port=vm.GUEST_SERVER_PORT, block_size=512)
    check = vm.kernel_check_script(argv, "ext4", vm.make_files(4))
    os.kill(server.server_pid, signal.SIGSTOP)
    try:
        result = vm.run_guest(server.socket_path, check.script, payload=check.payload,
                              assets=assets, timeout=30)
    finally:
        os.kill(server.server_pid, signal.SIGCONT)
    print(result.message)
    assert not result.ok
    assert result.timed_out
    assert result.verdict == "FAIL timed out after 30 s"
    assert result.steps == ["connect"]
    assert "--- last 30 console lines ---" in result.message
    assert f"{vm.STEP_MARKER} connect" in result.tail(30)


def test_vm_check_command_reports_a_timeout_with_exit_status_1(assets, tmp_path):
    image = create_image(tmp_path / "disk.img", "64M")
    p = run_cli("vm-check", str(image), "--timeout", "2", timeout=300)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "guest: verdict FAIL timed out after 2 s" in p.stdout
    assert "--- last 30 console lines ---" in p.stdout
    assert "host:  fsck                 skipped: the guest failed" in p.stdout
    assert p.stdout.rstrip().splitlines()[-1] != "vm-check: PASS"
    assert "vm-check: FAIL" in p.stdout


def test_kernel_marks_a_connected_device_the_way_attach_reads_it(assets, tmp_path, serve):
    """attach and list take /sys/block/nbdN/pid as "connected": check that
    the real kernel creates it on connect and removes it on disconnect."""
    server = serve(create_image(tmp_path / "disk.img", "64M"), "direct")
    argv = nbd_client_args(vm.GUEST_NBD_DEVICE, host=vm.GUEST_SERVER_HOST,
                           port=vm.GUEST_SERVER_PORT, block_size=512)
    script = (GUEST / "sysfs-pid.sh").read_text()
    payload = {"nbd-client.argv": vm.argv_lines(argv)}
    result = vm.run_guest(server.socket_path, script, payload=payload, assets=assets,
                          timeout=120)
    assert result.ok, result.message
    assert "pid file: present while connected, gone after disconnect" in result.console
