"""The whole product on one kernel: ``nbdloop attach`` for real.

A guest boots this machine's own root (read-only over 9p, a tmpfs overlay on
top; nbdloop.vm.product), so it runs exactly the nbdkit, Python, venv and
nbd-client that the host has, with the kernel's NBD driver beside them:
server, client and filesystem on one kernel, as on a user's machine.

One boot runs every attach scenario (tests/e2e/guest/attach.sh), each of
which reports on its own; the tests below each hold one scenario to its
verdict.  A second boot, with 256 MiB of memory and no swap, writes three
times that through a filesystem on /dev/nbdN in both modes
(tests/e2e/guest/mempressure.sh).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, require_root, require_tools, run

pytestmark = [pytest.mark.vm, pytest.mark.slow]

GUEST = ROOT / "tests" / "e2e" / "guest"
SCENARIO = re.compile(r"^NBDLOOP-SCENARIO: (\S+) (PASS|FAIL)(?: (.*))?$", re.MULTILINE)
PRESSURE_MEMORY_MB = 256
CHUNK = 16 << 20


def scenarios(console: str) -> dict[str, tuple[str, str]]:
    return {m[1]: (m[2], m[3] or "") for m in SCENARIO.finditer(console)}


def section(console: str, name: str) -> str:
    """The console lines of one scenario, for a failure message."""
    start = console.find(f"NBDLOOP-SCENARIO-START: {name}")
    end = console.find(f"NBDLOOP-SCENARIO: {name} ")
    return console[start:end + 200] if start >= 0 else console[-3000:]


@pytest.fixture(scope="module")
def product_assets():
    require_tools("qemu-system-x86_64", "nbdkit", "nbd-client", "mkfs.xfs", "ss")
    from nbdloop import vm
    return vm.ensure_product_assets()


@pytest.fixture(scope="module")
def attach_run(product_assets, tmp_path_factory):
    from nbdloop import vm
    disk = tmp_path_factory.mktemp("attach-vm") / "data.img"
    # A guard against a hang, not a time limit: under TCG the scenarios
    # take minutes, and more on a slow day (docs/reliability.md).
    result = vm.run_product(GUEST / "attach.sh", disk=disk, disk_size=3 << 30,
                            assets=product_assets, timeout=1500)
    print(f"\nattach scenarios: {result.verdict} in {result.elapsed:.0f} s")
    for line in re.findall(r"^NBDLOOP-SCENARIO-TIME: .*$", result.console, re.MULTILINE):
        print(line)
    return result


def check(run, name: str) -> None:
    found = scenarios(run.console)
    assert name in found, f"scenario {name} did not report:\n{run.message}"
    verdict, reason = found[name]
    assert verdict == "PASS", f"{name}: {reason}\n{section(run.console, name)}"


@pytest.mark.parametrize("name", ["direct-ext4", "buffered-ext4-2conns", "direct-xfs-4096",
                                  "direct-ext4-2procs"])
def test_attach_mkfs_mount_detach_verify(attach_run, name):
    """attach prints /dev/nbdN; mkfs, mount, write, list and list --json
    (device, image, mode, pids, connections, attached); umount, detach by
    device: the device, server and record are gone; fsck is clean; a fresh
    attach verifies every checksum; detach by image.  With --connections 2
    the server has two connections from the kernel; with --block-size 4096
    the device's logical block size is 4096."""
    check(attach_run, name)


def test_list_json_is_what_the_guest_saw(attach_run):
    """The list --json the guest printed parses, with what a user reads."""
    blobs = re.findall(r"^NBDLOOP-LIST-JSON: (.*)$", attach_run.console, re.MULTILINE)
    assert len(blobs) >= 3, attach_run.message
    modes = set()
    for blob in blobs:
        rows = json.loads(blob)["attachments"]
        assert len(rows) == 1 and rows[0]["state"] == "attached", blob
        assert re.fullmatch(r"/dev/nbd\d+", rows[0]["device"])
        modes.add((rows[0]["mode"], rows[0]["connections"]))
    assert {("direct", 1), ("buffered", 2)} <= modes


@pytest.mark.parametrize("name", ["readonly", "two-images"])
def test_options(attach_run, name):
    """--readonly mounts read-only, refuses writes (EROFS/EPERM) and leaves
    the image as it was; a second image gets the next free device;
    attaching an attached image is refused in one line."""
    check(attach_run, name)


@pytest.mark.parametrize("name", ["killed-server", "mounted-detach", "busy-device"])
def test_failure_paths(attach_run, name):
    """SIGKILL of the server with recovery off: list says stale and why,
    detach frees the device; detach of a mounted device is refused in one
    line and the device keeps working; the kernel refusing a busy device
    stops the server and leaves no record."""
    check(attach_run, name)


def test_a_slice_of_an_image(attach_run):
    """attach --offset --sizelimit: the device is that slice (its size, list's
    OFFSET and SIZELIMIT); the pattern on both sides of it is intact after
    mkfs and writes; the filesystem is found at the offset in the image; a
    direct-mode offset off the alignment is refused in one line."""
    check(attach_run, "slice")


def test_partitions(attach_run):
    """A GPT made with sfdisk on the device, ext4 on each of its two
    partitions; detach of the mounted device refused; attach -P: both
    partitions there at once, listed by list and list --json, and verified."""
    check(attach_run, "partitions")


def test_the_table_of_attachments(attach_run):
    """attach --persist writes the image's line; attach --all attaches each
    line not attached, with its options, and nothing twice; detach --all;
    detach --forget removes the line and no other."""
    check(attach_run, "table")


def test_the_systemd_units_commands(attach_run):
    """nbdloop@.service's ExecStart (attach --from-table) attaches with the
    line's options, and says the same device when the image is attached
    already; with the daemon killed (SIGKILL) under a mounted filesystem the
    device keeps working; nbdloop.service's ExecStart (daemon
    --attach-table) takes it over and attaches the rest of the table before
    READY=1; ExecStop (detach) refuses the mounted device, then detaches
    it; attach --foreground says READY=1 and ends at detach."""
    check(attach_run, "unit-commands")


def test_every_scenario_passed(attach_run):
    assert attach_run.ok, attach_run.message
    assert len(scenarios(attach_run.console)) == 13


@pytest.fixture(scope="module")
def chunk_file():
    """A 16 MiB pattern on the host, where the guest sees it through its 9p
    root (not under /tmp, which the guest mounts over)."""
    from nbdloop.vm.product import visible_tempdir
    with visible_tempdir() as d:
        path = Path(d) / "chunk"
        path.write_bytes(os.urandom(CHUNK))
        yield path


def test_memory_pressure_on_one_host(product_assets, chunk_file, tmp_path):
    """With 256 MiB of memory and no swap, 768 MiB through ext4 on
    /dev/nbdN with fsync, in both modes, served on the same kernel: it
    finishes within the timeout, and the host finds each image's filesystem
    clean and the file's checksum right; the server is locked in memory
    (--mlock) and every worker carries PR_SET_IO_FLUSHER, by the kernel's
    task flags and by the engine's own count."""
    from nbdloop import vm
    require_tools("debugfs", "e2fsck")
    require_root()
    repeat = 3 * PRESSURE_MEMORY_MB * (1 << 20) // CHUNK   # three times the memory
    data = chunk_file.read_bytes()
    want = hashlib.sha256()
    for _ in range(repeat):
        want.update(data)
    disk = tmp_path / "data.img"
    result = vm.run_product(GUEST / "mempressure.sh",
                            args=[str(chunk_file), str(repeat), "direct", "buffered"],
                            disk=disk, disk_size=5 << 30, memory_mb=PRESSURE_MEMORY_MB,
                            assets=product_assets, timeout=600)
    (tmp_path / "console.txt").write_text(result.console)
    rates = re.findall(r"^NBDLOOP-RESULT: (\w+) write_mib (\d+) seconds ([\d.]+) "
                       r"mib_per_s ([\d.]+)$", result.console, re.MULTILINE)
    for mode, mib, seconds, rate in rates:
        print(f"\n{mode}: {mib} MiB in {seconds} s, {rate} MiB/s with "
              f"{PRESSURE_MEMORY_MB} MiB of guest memory")
    assert result.ok, f"{result.message}\n(whole console: {tmp_path / 'console.txt'})"
    found = scenarios(result.console)
    assert found == {"pressure-direct": ("PASS", ""), "pressure-buffered": ("PASS", "")}, found
    assert {mode for mode, *_ in rates} == {"direct", "buffered"}
    assert all(int(mib) == repeat * CHUNK >> 20 for _, mib, _, _ in rates)
    memtotal = int(re.search(r"MemTotal:\s+(\d+) kB", result.console)[1]) >> 10
    assert repeat * CHUNK >> 20 >= 3 * memtotal, (repeat, memtotal)
    flush = re.findall(r"^NBDLOOP-RESULT: (\w+) engine threads (\d+) io_flushers (\d+)$",
                       result.console, re.MULTILINE)
    assert len(flush) == 2 and all(t == f and int(t) > 0 for _, t, f in flush), flush
    # The images, on the guest's data disk, checked here at the host's speed.
    mnt = tmp_path / "data"
    mnt.mkdir()
    run(["mount", "-o", "loop,ro", str(disk), str(mnt)])
    try:
        for mode in ("direct", "buffered"):
            image = mnt / f"pressure-{mode}.img"
            run(["e2fsck", "-fn", str(image)])
            big = subprocess.run(["debugfs", "-R", "cat /big", str(image)],
                                 capture_output=True, check=True).stdout
            assert len(big) == repeat * CHUNK, (mode, len(big))
            assert hashlib.sha256(big).hexdigest() == want.hexdigest(), mode
    finally:
        run(["umount", str(mnt)])
