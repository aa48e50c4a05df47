"""The product VM (nbdloop.vm.run_product): one kernel that runs the whole
product, on the host's own root filesystem.

Two boots: tests/e2e/guest/product-smoke.sh checks, in the guest, that / is
the host's root under a tmpfs overlay, that /run, /tmp and /dev/shm are the
guest's own tmpfs, that the data disk takes O_DIRECT, that nbd has 16
devices with 8 partitions each, that there is no network but lo, that the
script has every capability and that the host's Python, venv, nbdloop and
nbdkit run; the host then checks that nothing the guest wrote reached the
host's root, and that what it wrote to the data disk is there, on a clean
filesystem. A hung script is killed at the timeout.
"""
from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, require_tools

from nbdloop import vm
from nbdloop.paths import SBIN_PATH
from nbdloop.vm import product

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("qemu_installed")]

GUEST = ROOT / "tests" / "e2e" / "guest"
#: Data-disk size of the smoke run: small, so that mkfs and e2fsck are quick.
DISK_SIZE = 256 << 20


@pytest.fixture(scope="module")
def assets() -> vm.ProductAssets:
    return vm.ensure_product_assets()


@pytest.fixture
def host_dir() -> Iterator[Path]:
    """A directory on the host's root that the guest sees: /var/tmp, since
    pytest's tmp_path is under /tmp, which the guest mounts a tmpfs over."""
    with product.visible_tempdir("nbdloop-product-test-") as d:
        assert product.hidden_by(d) is None
        yield Path(d)


def _uptime_at_script_start(console: str) -> float | None:
    m = re.search(r"NBDLOOP-GUEST: running script \(uptime ([0-9.]+) s\)", console)
    return float(m.group(1)) if m else None


def test_assets_are_cached_and_share_the_kernel(assets: vm.ProductAssets) -> None:
    start = time.monotonic()
    again = vm.ensure_product_assets()
    elapsed = time.monotonic() - start
    print(f"cached ensure_product_assets() took {elapsed * 1000:.0f} ms")
    assert again == assets
    assert assets.kernel == vm.ensure_assets().kernel
    order = {name: i for i, name in enumerate(assets.modules)}
    for dependency, module in [("virtio_ring", "virtio_pci"), ("virtio_pci", "virtio_blk"),
                               ("9pnet", "9pnet_virtio"), ("netfs", "9p"), ("fscache", "9p"),
                               ("crc32c_generic", "ext4"), ("jbd2", "ext4"),
                               ("libcrc32c", "xfs")]:
        assert order[dependency] < order[module], f"{dependency} must load before {module}"
    assert {"nbd", "overlay", "9p", "virtio_blk"} <= set(order)


def test_initrd_holds_init_busybox_and_the_modules(assets: vm.ProductAssets) -> None:
    require_tools("cpio")
    listing = subprocess.run(
        f"zcat {assets.initrd} | cpio -it --quiet",
        shell=True, capture_output=True, text=True, check=True,
    ).stdout.split()
    for path in ["init", "bin/busybox", "bin/sh", "sbin/switch_root", "dev/console",
                 "etc/nbdloop/modules", "etc/nbdloop/modparams/nbd",
                 *(f"lib/modules/{m}.ko" for m in assets.modules)]:
        assert path in listing, f"{path} is missing from {assets.initrd}"
    init = subprocess.run(f"zcat {assets.initrd} | cpio -i --quiet --to-stdout init",
                          shell=True, capture_output=True, check=True).stdout
    assert init == product.PRODUCT_INIT_SCRIPT.read_bytes()


def test_init_names_the_paths_product_py_names() -> None:
    init = product.PRODUCT_INIT_SCRIPT.read_text()
    assert f'echo "{vm.VERDICT_MARKER} $*"' in init
    assert f"\nDATA={vm.GUEST_DATA_DIR}\n" in init
    assert f"\nREASON={vm.GUEST_REASON_FILE}\n" in init
    assert f"\nRUN={product.GUEST_RUN_DIR}\n" in init


def test_the_guest_environment_and_argv(tmp_path: Path) -> None:
    env = product.guest_environment({"FOO": "x y", "HOME": "/elsewhere"})
    assert env["NBDLOOP_DATA"] == "/data" and env["NBDLOOP_REASON"] == vm.GUEST_REASON_FILE
    assert env["HOME"] == "/elsewhere" and env["FOO"] == "x y"
    if sys.prefix != sys.base_prefix:
        assert env["PATH"].split(":")[0] == f"{sys.prefix}/bin"
    assert env["PATH"].endswith(SBIN_PATH)
    argv = product.product_argv("/x/s.sh", ["a b", "$(id)"], {"K": "v"})
    assert argv[:2] == ["/usr/bin/env", "-i"]
    assert argv[-4:] == ["/bin/sh", "/x/s.sh", "a b", "$(id)"]
    with pytest.raises(ValueError):
        product.product_argv("/x/s.sh", ["new\nline"])
    with pytest.raises(ValueError):
        product.guest_environment({"A=B": "x"})
    # The guest mounts fresh tmpfs over /tmp and /run; what it must see from
    # there (the checkout and venv if CI cloned under /tmp, the script's
    # directory, what the caller shares) is bound back at its own path.
    script = tmp_path / "s.sh"
    script.write_text("true\n")
    if product.hidden_by(script) == "/tmp":
        assert str(tmp_path) in product.kept_paths(script)
    assert "/tmp/a/b" in product.kept_paths(Path("/var/x.sh"), ["/tmp/a/b"])
    assert "/tmp/co/t" in product.kept_paths(Path("/tmp/co/t/x.sh"))
    # A directory inside one that is kept comes with it.
    assert product.kept_paths(Path("/var/x.sh"), ["/tmp/a/b", "/tmp/a"]).count("/tmp/a/b") == 0
    assert all(not k.startswith(("/proc", "/sys", "/dev")) for k in
               product.kept_paths(Path("/var/x.sh"), ["/proc/1", "/dev/shm"]))
    with pytest.raises(ValueError, match="cannot see it"):
        product._check_visible(Path("/proc/self/status"), [])


@pytest.mark.slow
def test_the_product_runs_on_the_host_root(assets: vm.ProductAssets, host_dir: Path) -> None:
    require_tools("debugfs", "e2fsck")
    host_file = host_dir / "from-host.txt"
    content = f"made on the host {time.time_ns()}"
    host_file.write_text(content + "\n")
    disk = host_dir / "data.img"
    tricky = "it's $(touch /pwned) `id` \"q\" * ;|&"
    with tempfile.NamedTemporaryFile(dir="/tmp", prefix="nbdloop-hidden-") as hidden, \
            tempfile.TemporaryDirectory(dir="/tmp", prefix="nbdloop-shared-") as shared:
        shared_file = Path(shared) / "shared.txt"
        shared_file.write_text(content + "\n")
        result = vm.run_product(
            GUEST / "product-smoke.sh",
            args=[str(host_file), hidden.name, tricky],
            env={"HOST_CONTENT": content, "PYTHON": sys.executable, "ARG3_EXPECTED": tricky,
                 "SHARED_FILE": str(shared_file)},
            share=[shared], disk=disk, disk_size=DISK_SIZE, assets=assets, timeout=240,
        )
    started = _uptime_at_script_start(result.console)
    print(f"product VM: {result.verdict} in {result.elapsed:.1f} s "
          f"(script started at guest uptime {started} s)")
    assert result.ok, result.message
    assert result.steps[-1] == "all-checked", result.steps
    assert "product-smoke: this line is on stderr" in result.console

    # Nothing the guest wrote reached the host's root.
    assert host_file.read_text() == content + "\n"
    assert not Path("/nbdloop-smoke-written").exists()
    assert not Path("/pwned").exists()
    # What it wrote to the data disk is there, on a filesystem it unmounted cleanly.
    fsck = subprocess.run(["e2fsck", "-fn", str(disk)], capture_output=True, text=True,
                          check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    marker = subprocess.run(["debugfs", "-R", "cat /marker", str(disk)],
                            capture_output=True, text=True, check=True).stdout
    assert marker == "written to the data disk\n"
    direct = subprocess.run(["debugfs", "-R", "cat /direct.bin", str(disk)],
                            capture_output=True, check=True).stdout
    assert hashlib.sha256(direct).digest() == hashlib.sha256(bytes(64 * 4096)).digest()


@pytest.mark.slow
def test_a_hung_script_is_killed_at_the_timeout(assets: vm.ProductAssets) -> None:
    """A guest that does not finish is killed at the timeout and reported as
    a failure with the console's last lines.  The guest may still be booting
    when it is killed: the kill is _run_qemu's, the code every guest runs
    through, which test_vm_harness.py also tests on a hung script."""
    timeout = 20
    start = time.monotonic()
    result = vm.run_product(GUEST / "product-hang.sh", assets=assets, timeout=timeout,
                            disk_size=64 << 20)
    assert time.monotonic() - start < timeout + 30
    assert not result.ok
    assert result.timed_out
    assert result.verdict == f"FAIL timed out after {timeout} s"
    assert "last 30 console lines" in result.message
    assert result.console.strip(), "the console's last lines are shown"
