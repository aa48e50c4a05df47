"""Zero-copy direct I/O, on an emulated NVMe disk.

In direct mode the engine hands nbdkit's own request buffer to the kernel,
with no copy through a bounce slot, when the buffer's address meets the
backing's direct-I/O memory alignment (``stx_dio_mem_align``) and the
request's offset and length meet its offset alignment.  On a virtio disk
the memory alignment is 512, which nbdkit's buffers meet only through the
allocator nbdkit is started with (tcmalloc; glibc's are 16 bytes past a
boundary), and tests/test_clients.py checks that on the host; on an NVMe
disk it is 4, which any allocator's buffers meet.  So one boot of the
one-kernel VM (nbdloop.vm.product) with qemu's ``nvme`` device runs
tests/e2e/guest/zerocopy.sh: ext4 on the NVMe disk, the images there, a
libnbd client of ``nbdloop serve`` and the kernel NBD client of ``nbdloop
attach``, every byte compared with an oracle.  Here, from the counters the
servers wrote (``--stats-file``): aligned requests copy nothing and all go
zero-copy; an unaligned one is copied (the control that shows the counter
can move).
"""
from __future__ import annotations

import json
import re

import pytest

from conftest import ROOT, check_scenario, require_tools

pytestmark = [pytest.mark.vm, pytest.mark.slow]

GUEST = ROOT / "tests" / "e2e" / "guest"
SEED = 20261207
STATS = re.compile(r"^NBDLOOP-ZC-STATS: (\S+) (.*)$", re.MULTILINE)
MOVED = re.compile(r"^NBDLOOP-ZC-MOVED: (\S+) (\d+)$", re.MULTILINE)
DIOALIGN = re.compile(r"^NBDLOOP-DIOALIGN: (\d+) (\d+)$", re.MULTILINE)


@pytest.fixture(scope="module")
def zerocopy_run():
    require_tools("qemu-system-x86_64", "nbdkit")
    from nbdloop import vm
    assets = vm.ensure_product_assets()
    result = vm.run_product(GUEST / "zerocopy.sh", args=[str(SEED)], disk_size=256 << 20,
                            nvme_size=1 << 30, assets=assets, timeout=900)
    print(f"\nzero-copy scenarios: {result.verdict} in {result.elapsed:.0f} s")
    for line in re.findall(r"^NBDLOOP-(?:ZC-\S+|DIOALIGN|SCENARIO-TIME):.*$", result.console,
                           re.MULTILINE):
        print(line)
    return result


def stats(run, name: str) -> dict[str, int]:
    """The counters the guest printed after ``name``."""
    found = {m[1]: m[2] for m in STATS.finditer(run.console)}
    assert name in found, f"no counters for {name}:\n{run.message}"
    return json.loads(found[name])


def moved(run, name: str) -> int:
    """The bytes that ``name``'s requests carried, as the guest counted them."""
    found = {m[1]: int(m[2]) for m in MOVED.finditer(run.console)}
    assert name in found, f"no byte count for {name}:\n{run.message}"
    return found[name]


@pytest.mark.parametrize("name", ["serve", "attach"])
def test_scenario(zerocopy_run, name):
    """Every byte read, and the image afterwards, matched the oracle."""
    check_scenario(zerocopy_run, name)


def test_nvme_asks_for_less_than_512_byte_memory_alignment(zerocopy_run):
    m = DIOALIGN.search(zerocopy_run.console)
    assert m, f"the guest printed no direct-I/O alignment:\n{zerocopy_run.message}"
    memory, offset = int(m[1]), int(m[2])
    assert 0 < memory < 512, (memory, offset)
    assert offset == 512, (memory, offset)


def test_aligned_requests_copy_nothing(zerocopy_run):
    found = stats(zerocopy_run, "serve-aligned")
    assert found["copied"] == 0, found
    assert found.get("zero_copy", 0) > 0, found
    assert found.get("zero_copy_bytes") == moved(zerocopy_run, "serve-aligned"), found


def test_an_unaligned_request_is_copied(zerocopy_run):
    """512 bytes written and read at offset 100: copied, and not zero-copy."""
    before = stats(zerocopy_run, "serve-aligned")
    after = stats(zerocopy_run, "serve-unaligned")
    assert after["copied"] - before["copied"] >= moved(zerocopy_run, "serve-unaligned"), \
        (before, after)
    assert after.get("zero_copy") == before.get("zero_copy"), (before, after)
    assert after.get("zero_copy_bytes") == before.get("zero_copy_bytes"), (before, after)


def test_the_kernel_device_copies_nothing(zerocopy_run):
    """Through /dev/nbdN with O_DIRECT, 1M and 4K requests; the kernel's own
    reads (the partition table) come on top, aligned too."""
    found = stats(zerocopy_run, "attach")
    assert found["copied"] == 0, found
    assert found.get("zero_copy", 0) > 0, found
    assert found.get("zero_copy_bytes", 0) >= moved(zerocopy_run, "attach"), found


def test_every_scenario_passed(zerocopy_run):
    assert zerocopy_run.verdict == "PASS", zerocopy_run.message
