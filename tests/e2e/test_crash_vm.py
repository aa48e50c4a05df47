"""The crash loop with a mounted filesystem: the real kernel NBD client in a
VM writes and fsyncs files on ext4 while the host SIGKILLs the server and
starts a new one on the same socket.

The guest (busybox sh) connects with the ``nbd-client`` arguments ``nbdloop
attach`` uses (with a 10 s request timeout), makes ext4 on all but the last
MiB of the device, mounts it and writes files, each followed by fsync; a
file whose write and fsync succeeded is "synced" and its sha256 is kept in
guest RAM.  After each synced file the guest writes a progress marker
(``NBDLOOP-CRASH phase P files N``) into the device's last 4 KiB, outside
the filesystem, where the host reads it from the image file.

The host waits for a random number of synced files, SIGKILLs nbdkit and
starts a new server on the same image and socket path.  In the guest the
next write or fsync fails (the connection is gone; nbd-client's netlink
mode does not reconnect by itself), so it recovers the way an operator
would: umount, ``nbd-client -d``, connect again (retrying until the new
server answers), mount (ext4 replays its journal), umount, ``e2fsck -fn``
(must be clean), mount, and every synced file so far must match its sha256.
Three kills per boot.  Afterwards the host checks the image itself:
``e2fsck -fn`` and every synced file through debugfs.
"""
from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import create_image, require_root, require_tools, run

from nbdloop import vm
from nbdloop.kernel.nbdclient import nbd_client_args

pytestmark = [pytest.mark.vm, pytest.mark.slow]

MiB = 1 << 20
IMAGE_SIZE = 256 * MiB
KILLS = 3
MARK = re.compile(rb"NBDLOOP-CRASH phase (\d+) files (\d+)\n")
SYNCED = re.compile(r"^SYNCED ([0-9a-f]{64})  /mnt/(\S+)$", re.MULTILINE)


@pytest.fixture(scope="module")
def assets() -> vm.VmAssets:
    require_tools("qemu-system-x86_64", "socat", "nbdkit", "e2fsck", "debugfs")
    return vm.ensure_assets()


def guest_script(nbd_args: list[str], kills: int) -> tuple[str, dict[str, bytes]]:
    """The guest script (guest/crash.sh) and its payload: its parameters, as data."""
    params = {
        "FS_BLOCKS": str((IMAGE_SIZE - MiB) // 4096),
        "MARK_BLOCK": str(IMAGE_SIZE // 4096 - 1),
        "KILLS": str(kills),
    }
    payload = {"params": vm.shell_assignments(params),
               "nbd-client.argv": vm.argv_lines(nbd_args)}
    return (Path(__file__).resolve().parent / "guest" / "crash.sh").read_text(), payload


def read_mark(image: Path) -> tuple[int, int] | None:
    with open(image, "rb") as f:
        f.seek(IMAGE_SIZE - 4096)
        m = MARK.match(f.read(4096))
    return (int(m.group(1)), int(m.group(2))) if m else None


@pytest.mark.parametrize("mode", ["direct", "buffered"])
def test_fsynced_files_survive_server_kills(assets, tmp_path, serve, mode):
    require_root()
    image = create_image(tmp_path / "disk.img", str(IMAGE_SIZE))
    server = serve(image, mode)
    argv = nbd_client_args(vm.GUEST_NBD_DEVICE, host=vm.GUEST_SERVER_HOST,
                           port=vm.GUEST_SERVER_PORT, block_size=512, timeout=10)
    script, payload = guest_script(argv, KILLS)
    result: list[vm.GuestResult] = []
    guest = threading.Thread(target=lambda: result.append(
        vm.run_guest(server.socket_path, script, payload=payload, assets=assets, timeout=600)))
    guest.start()
    rng = random.Random()
    kills = []
    try:
        for k in range(KILLS):
            target = rng.randint(2, 15)
            while guest.is_alive():
                mark = read_mark(image)
                if mark is not None and mark[0] == k and mark[1] >= target:
                    break
                time.sleep(0.1)
            else:
                break
            # A moment later, so that the kill lands anywhere in a file's
            # write or fsync, not right after a marker.
            time.sleep(rng.uniform(0, 0.5))
            os.kill(server.server_pid, signal.SIGKILL)
            assert server.proc.wait(60) != 0
            kills.append(read_mark(image))
            server.start()          # same image, same socket path
    finally:
        guest.join()
    [res] = result
    (tmp_path / "console.txt").write_text(res.console)     # for a post-mortem
    print(f"\n{mode}: kills at (phase, files synced in the phase): {kills}; "
          f"guest {res.elapsed:.0f}s")
    assert res.ok, res.message
    assert len(kills) == KILLS
    assert res.steps[-1] == "done"
    assert server.stop() == 0, server.log_tail()

    # The host checks the image on its own.
    run(["e2fsck", "-fn", str(image)])
    synced = SYNCED.findall(res.console)
    print(f"{mode}: {len(synced)} fsynced files, all intact in the guest; "
          + re.sub(r"\s+", " ", " ".join(
              line for line in res.console.splitlines() if line.startswith("kill "))))
    assert len(synced) >= KILLS * 2
    bad = []
    for digest, name in synced:
        cat = subprocess.run(["debugfs", "-R", f"cat /{name}", str(image)],
                             capture_output=True)
        if cat.returncode != 0 or hashlib.sha256(cat.stdout).hexdigest() != digest:
            bad.append(name)
    assert bad == [], f"fsynced files wrong on the image: {bad}"
