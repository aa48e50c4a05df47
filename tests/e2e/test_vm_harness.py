"""The VM harness drives the real kernel NBD client against a real NBD server.

The server here is qemu-nbd, not nbdloop, so these tests check the harness
itself: the guest boots, reaches the server and nothing else, reports failures
and hangs, and what the guest writes through /dev/nbd0 is on the host's image
afterwards, checked by host tools that never went through the guest.
"""
from __future__ import annotations

import hashlib
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import require
from nbdloop import paths, vm
from nbdloop.kernel import vmcheck
from nbdloop.kernel.nbdclient import nbd_client_args

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("qemu_installed")]

#: mkfs.xfs refuses filesystems smaller than 300 MB.
IMAGE_SIZE = 512 << 20
GUEST = Path(__file__).resolve().parent / "guest"
SEED = 20240611


def _need(tool: str, package: str) -> str:
    path = shutil.which(tool, path=paths.SBIN_PATH)
    require(path is not None, f"{tool} not installed (apt-get install {package})")
    return path


@pytest.fixture(scope="session")
def assets() -> vm.VmAssets:
    return vm.ensure_assets()


class QemuNbd:
    """qemu-nbd serving one raw image on a unix socket, for as long as the test runs."""

    def __init__(self, image: Path, sock: Path, log: Path) -> None:
        self.sock = sock
        self.log = log
        self._log_file = open(log, "wb")
        self.proc = subprocess.Popen(
            [_need("qemu-nbd", "qemu-utils"), "--persistent", "--shared=8", "--format=raw",
             f"--socket={sock}", str(image)],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while not sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"qemu-nbd did not create {sock}: {self.output()}")
            time.sleep(0.02)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(IMAGE_SIZE)
    return path


@pytest.fixture
def greeter(tmp_path: Path) -> Iterator[Path]:
    """A unix socket whose every connection is answered with one greeting line."""
    path = tmp_path / "greeter.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(8)
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.sendall(b"hello-from-host\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield path
    stop.set()
    thread.join()
    server.close()


def test_assets_are_cached(assets: vm.VmAssets) -> None:
    """A second ensure_assets() reuses the files of the first instead of rebuilding."""
    before = (assets.kernel.stat().st_mtime_ns, assets.initrd.stat().st_mtime_ns)
    start = time.monotonic()
    again = vm.ensure_assets()
    elapsed = time.monotonic() - start
    print(f"cached ensure_assets() took {elapsed * 1000:.0f} ms")
    assert again == assets
    assert (again.kernel.stat().st_mtime_ns, again.initrd.stat().st_mtime_ns) == before


def test_modules_load_after_their_dependencies(assets: vm.VmAssets) -> None:
    order = {name: i for i, name in enumerate(assets.modules)}
    needs = [
        ("virtio_ring", "virtio_pci"), ("virtio", "virtio_pci"),
        ("virtio_pci_modern_dev", "virtio_pci"), ("virtio_pci_legacy_dev", "virtio_pci"),
        ("failover", "net_failover"), ("net_failover", "virtio_net"),
        ("crc32c_generic", "ext4"), ("crc16", "ext4"), ("mbcache", "ext4"), ("jbd2", "ext4"),
        ("crc32c_generic", "libcrc32c"), ("libcrc32c", "xfs"),
    ]
    for dependency, module in needs:
        assert order[dependency] < order[module], f"{dependency} must load before {module}"
    assert "nbd" in order


def test_initrd_holds_the_guest_tools(assets: vm.VmAssets, tmp_path: Path) -> None:
    cpio = _need("cpio", "cpio")
    listing = subprocess.run(
        f"zcat {assets.initrd} | {cpio} -it --quiet",
        shell=True, capture_output=True, text=True, check=True,
    ).stdout.split()
    for path in [
        "init", "bin/busybox", "bin/sh", "usr/bin/sha256sum", "dev/console",
        "lib64/ld-linux-x86-64.so.2", "lib/x86_64-linux-gnu/libc.so.6",
        "usr/sbin/nbd-client", "usr/sbin/mkfs.ext4", "usr/sbin/mke2fs", "usr/sbin/e2fsck",
        "usr/sbin/mkfs.xfs", "usr/sbin/xfs_repair", "lib/modules/nbd.ko", "lib/modules/xfs.ko",
    ]:
        assert path in listing, f"{path} is missing from {assets.initrd}"


@pytest.mark.slow
def test_guest_reaches_only_the_server_socket(assets: vm.VmAssets, greeter: Path) -> None:
    params = vm.shell_assignments({"SERVER_HOST": vm.GUEST_SERVER_HOST,
                                   "SERVER_PORT": str(vm.GUEST_SERVER_PORT)})
    result = vm.run_guest(str(greeter), (GUEST / "reach.sh").read_text(), assets=assets,
                          payload={"params": params}, timeout=120)
    assert result.ok, result.message
    assert "server said: hello-from-host" in result.console


@pytest.mark.slow
def test_failing_script_names_its_reason(assets: vm.VmAssets, greeter: Path) -> None:
    result = vm.run_guest(str(greeter), (GUEST / "fail-with-reason.sh").read_text(),
                          assets=assets, timeout=120)
    assert not result.ok
    assert result.verdict == "FAIL custom reason 42"
    assert "guest-was-here" in result.console
    assert "custom reason 42" in result.message


def test_hung_guest_is_killed_at_the_timeout(assets: vm.VmAssets, greeter: Path) -> None:
    start = time.monotonic()
    result = vm.run_guest(str(greeter), (GUEST / "product-hang.sh").read_text(), assets=assets,
                          timeout=3)
    assert time.monotonic() - start < 30
    assert not result.ok
    assert result.timed_out
    assert result.verdict == "FAIL timed out after 3 s"
    assert "last 30 console lines" in result.message


# One reference run against qemu-nbd: if the nbdloop kernel tests
# (test_kernel.py: ext4 and xfs, both modes, -C 2) fail while this passes,
# the fault is in nbdloop, not in the harness.
@pytest.mark.slow
@pytest.mark.parametrize(
    ("fstype", "block_size", "connections"),
    [("ext4", 4096, 1)],
)
def test_kernel_check_against_qemu_nbd(
    assets: vm.VmAssets, image: Path, tmp_path: Path,
    fstype: str, block_size: int, connections: int,
) -> None:
    files = vm.make_files(SEED)
    argv = nbd_client_args(
        vm.GUEST_NBD_DEVICE, host=vm.GUEST_SERVER_HOST, port=vm.GUEST_SERVER_PORT,
        block_size=block_size, connections=connections,
    )
    check = vm.kernel_check_script(argv, fstype, files, expect_connections=connections)
    server = QemuNbd(image, tmp_path / "nbd.sock", tmp_path / "qemu-nbd.log")
    try:
        result = vm.run_guest(str(server.sock), check.script, payload=check.payload, assets=assets)
    finally:
        server.stop()
    print(f"{fstype} -b {block_size} -C {connections}: {result.verdict} in {result.elapsed:.1f} s")
    assert result.ok, f"{result.message}\n--- qemu-nbd ---\n{server.output()}"
    assert result.steps[-1] == "done"
    assert f"logical block {block_size}," in result.console
    assert f"{connections} connection(s) to the server" in result.console

    # Now the host, on its own: the filesystem is clean and holds the files.
    expected = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    assert check.expected_sha256 == expected
    checks = vmcheck.host_checks(str(image), fstype, expected)
    assert checks and all(c.ok for c in checks), checks
