"""A device that outlives its server, on one kernel.

In the one-kernel VM (nbdloop.vm.product), ext4 on /dev/nbdN with a writer
that writes and fsyncs files in a loop, while nbdkit (alone, or with the daemon) is
killed with SIGKILL in turn at random moments, in both modes, with one and
two connections, and then ``nbdloop restart`` runs under the same load: the
writer sees no error, the filesystem stays read-write, the kernel logs no
I/O error, fsck is clean and every fsynced file is intact.  A server that
cannot come back fails the writer's I/O with EIO, hangs nothing and is listed as
stale with the reason; a connection for another device is refused.  One boot
runs it all (tests/e2e/guest/recover.sh).
"""
from __future__ import annotations

import re
import statistics

import pytest

from conftest import ROOT, check_scenario, require_tools

pytestmark = [pytest.mark.vm, pytest.mark.slow]

GUEST = ROOT / "tests" / "e2e" / "guest"
RECOVERY = re.compile(r"^NBDLOOP-RECOVERY: (\w+) (\d) (\w+) ([\d.]+)$", re.MULTILINE)
KILLS = 5        # per mode and connection count: ten per mode


@pytest.fixture(scope="module")
def recover_run(tmp_path_factory):
    require_tools("qemu-system-x86_64", "nbdkit")
    from nbdloop import vm
    assets = vm.ensure_product_assets()
    disk = tmp_path_factory.mktemp("recover-vm") / "data.img"
    result = vm.run_product(GUEST / "recover.sh", args=[str(KILLS)], disk=disk,
                            disk_size=2 << 30, assets=assets, timeout=900)
    print(f"\nrecovery scenarios: {result.verdict} in {result.elapsed:.0f} s")
    for mode, conns, who, seconds in RECOVERY.findall(result.console):
        print(f"recovery: {mode} -C {conns}, {who} killed: {seconds} s")
    for line in re.findall(r"^NBDLOOP-(?:RESTART|SCENARIO-TIME): .*$", result.console,
                           re.MULTILINE):
        print(line)
    return result


@pytest.mark.parametrize("name", ["survive-direct-1", "survive-direct-2",
                                  "survive-buffered-1", "survive-buffered-2"])
def test_the_device_survives_its_server(recover_run, name):
    """Kills of nbdkit, alone or with the daemon, then a restart, under a
    writer: no error, still read-write, no I/O error in the kernel log,
    fsck clean, every fsynced file intact."""
    check_scenario(recover_run, name)


def test_every_kill_was_a_recovery(recover_run):
    found = RECOVERY.findall(recover_run.console)
    per_mode = {m: sum(1 for f in found if f[0] == m) for m in ("direct", "buffered")}
    assert per_mode == {"direct": 2 * KILLS, "buffered": 2 * KILLS}, recover_run.message
    assert {who for *_, who, _ in found} == {"nbdkit", "both"}
    seconds = [float(s) for *_, s in found]
    print(f"\nrecovery seconds: median {statistics.median(seconds):.2f}, "
          f"max {max(seconds):.2f} over {len(seconds)}")
    restarts = re.findall(r"^NBDLOOP-RESTART: (\w+) (\d) ([\d.]+)$", recover_run.console,
                          re.MULTILINE)
    assert len(restarts) == 4, recover_run.message


def test_a_server_that_cannot_come_back_fails_the_device(recover_run):
    """The image gone: the device fails the writer's I/O with EIO within
    the recovery timeout (the writer sees EIO, or EROFS if ext4's journal
    met the EIO first), a direct read of the device fails with EIO,
    nothing hangs, list says stale and why, detach frees the device."""
    check_scenario(recover_run, "gone-for-good")


def test_a_connection_for_another_device_is_refused(recover_run):
    check_scenario(recover_run, "wrong-device")


def test_every_scenario_passed(recover_run):
    assert recover_run.ok, recover_run.message
