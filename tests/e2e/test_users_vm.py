"""A user's own image, grown online, found by name.

One boot of the one-kernel VM (nbdloop.vm.product) with Debian's udev
running, the group and udev rule that make install puts in place, and real
users made there with useradd, runs tests/e2e/guest/users.sh: a member of
the group nbdloop attaches her own image, which only she can open, and the
device is hers (qemu-img, qemu-io, mkfs and fsck run as her) and kept
from the host's automatic machinery (no by-label or by-uuid link, LVM and
md not activated, where root's device gets them); every refusal
(another user's device, a user outside the group, a file she may not open,
a fifo, a directory, a device node, a taken or a bad name, her limit) is
one line with status 2 and leaves nothing; her device outlives its server,
the daemon and a restart; references link /dev/nbdloop/by-ref/NAME; ext4
and xfs, mounted with writers, are grown online in both modes.
"""
from __future__ import annotations

import re

import pytest

from conftest import ROOT, check_scenario, require_tools

pytestmark = [pytest.mark.vm, pytest.mark.slow]

GUEST = ROOT / "tests" / "e2e" / "guest"
SCENARIOS = ["own", "refs", "resize-direct-buffered", "resize-buffered-direct", "slice"]


@pytest.fixture(scope="module")
def users_run():
    require_tools("qemu-system-x86_64", "nbdkit", "udevadm", "useradd")
    from nbdloop import vm
    assets = vm.ensure_product_assets()
    result = vm.run_product(GUEST / "users.sh", disk_size=3 << 30, memory_mb=2048,
                            assets=assets, timeout=1200)
    print(f"\nuser scenarios: {result.verdict} in {result.elapsed:.0f} s")
    for line in re.findall(r"^NBDLOOP-(?:SCENARIO-TIME|COST): .*$", result.console,
                           re.MULTILINE):
        print(line)
    return result


@pytest.mark.parametrize("name", SCENARIOS)
def test_scenario(users_run, name):
    check_scenario(users_run, name)


def test_every_scenario_passed(users_run):
    assert users_run.verdict == "PASS", users_run.message
