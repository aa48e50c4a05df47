"""One daemon for every device, on one kernel.

In the one-kernel VM (nbdloop.vm.product; the nbd module loaded with
nbds_max=8), one boot runs tests/e2e/guest/daemon.sh: many devices attached
at once (made on demand past the eighth), written, verified and detached,
with what they cost; the daemon SIGKILLed under two mounted filesystems with
writers, once also every server while no daemon ran; the daemon killed at
each step of an attach and of a detach; bad input on its socket.  The
costs are printed (docs/benchmarks.md quotes them), not held to a figure:
a timed test would fail on a slow day for no fault of the code.
"""
from __future__ import annotations

import re

import pytest

from conftest import ROOT, check_scenario, require_tools

pytestmark = [pytest.mark.vm, pytest.mark.slow]

GUEST = ROOT / "tests" / "e2e" / "guest"
COST = re.compile(r"^NBDLOOP-COST: (.*)$", re.MULTILINE)
DEVICES = 64
KILLS = 5


@pytest.fixture(scope="module")
def daemon_run(tmp_path_factory):
    require_tools("qemu-system-x86_64", "nbdkit")
    from nbdloop import vm
    assets = vm.ensure_product_assets()
    disk = tmp_path_factory.mktemp("daemon-vm") / "data.img"
    result = vm.run_product(GUEST / "daemon.sh", args=[str(DEVICES), str(KILLS)], disk=disk,
                            disk_size=6 << 30, memory_mb=2048, assets=assets, timeout=1500)
    print(f"\ndaemon scenarios: {result.verdict} in {result.elapsed:.0f} s")
    for line in COST.findall(result.console):
        print(f"cost: {line}")
    for line in re.findall(r"^NBDLOOP-SCENARIO-TIME: .*$", result.console, re.MULTILINE):
        print(line)
    return result


def costs(run) -> dict[str, float]:
    return {k: float(v) for k, v in
            (line.split()[:2] for line in COST.findall(run.console) if line[:7] != "server ")}


@pytest.mark.parametrize("name", ["many", "kills", "steps", "bad-input"])
def test_scenario(daemon_run, name):
    check_scenario(daemon_run, name)


def test_at_most_one_process_per_device(daemon_run):
    """The daemon and the servers: never more processes than devices."""
    check_scenario(daemon_run, "many")
    found = costs(daemon_run)
    assert 2 <= found["processes"] <= DEVICES, found
    assert found["nbd_devices"] >= DEVICES, found


def test_every_scenario_passed(daemon_run):
    assert daemon_run.verdict == "PASS", daemon_run.message
