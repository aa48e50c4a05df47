"""nbdloop against real NBD clients, in both modes: nbdinfo, qemu-img,
qemu-io, nbdcopy, fio's nbd engine, and nbdfuse + the kernel's loop + ext4."""
from __future__ import annotations

import hashlib
import json
import random
import subprocess
import time

import pytest

from conftest import connect, nbdinfo_json, nbdsh, require_root, require_tools, run

MiB = 1 << 20


def test_nbdinfo_shows_advertised_flags(image, serve, mode):
    s = serve(image, mode)
    info = nbdinfo_json(s.uri)
    export = info["exports"][0]
    assert export["export-size"] == 64 * MiB
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero",
                 "can_multi_conn"):
        assert export[flag] is True, flag
    assert export["is_read_only"] is False
    assert "base:allocation" in export["contexts"]
    assert export["block_size_minimum"] == 1     # any byte range is served exactly
    assert export["block_size_preferred"] >= 4096
    assert export["block_size_maximum"] == 32 * MiB
    # Direct mode has no page cache to prefetch into.
    assert export["can_cache"] is (mode == "buffered")


def test_readonly_serving_rejects_writes(image, serve, mode):
    s = serve(image, mode, readonly=True)
    assert nbdinfo_json(s.uri)["exports"][0]["is_read_only"] is True
    import nbd
    h = connect(s.uri)            # not strict: let the write reach the server
    with pytest.raises(nbd.Error) as e:
        h.pwrite(b"x" * 512, 0)
    assert e.value.errno in ("EPERM", "EROFS")
    assert h.pread(512, 0) == bytes(512)
    h.shutdown()
    assert image.read_bytes()[:512] == bytes(512)


def test_qemu_img_and_nbdcopy_round_trip(tmp_path, image, serve, mode):
    require_tools("qemu-img", "nbdcopy")
    src = tmp_path / "src.raw"
    rng = random.Random(7)
    with open(src, "wb") as f:
        for _ in range(64):
            f.write(rng.randbytes(MiB) if rng.random() < 0.7 else bytes(MiB))
    s = serve(image, mode)
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), s.uri])
    out = tmp_path / "out.raw"
    run(["nbdcopy", s.uri, str(out)])
    assert out.read_bytes() == src.read_bytes()
    # And back in through nbdcopy, then out through qemu-img.
    src2 = tmp_path / "src2.raw"
    src2.write_bytes(rng.randbytes(64 * MiB))
    run(["nbdcopy", str(src2), s.uri])
    out2 = tmp_path / "out2.raw"
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", s.uri, str(out2)])
    assert out2.read_bytes() == src2.read_bytes()


def qemu_io(uri: str, *commands: str) -> str:
    require_tools("qemu-io")
    argv = ["qemu-io", "-f", "raw"]
    for c in commands:
        argv += ["-c", c]
    p = run(argv + [uri])
    assert "Pattern verification failed" not in p.stdout, p.stdout
    assert "failed" not in p.stdout.lower(), p.stdout
    return p.stdout


def test_qemu_io_patterns(image, serve, mode):
    s = serve(image, mode)
    qemu_io(s.uri,
            # unaligned writes and reads
            "write -P 0x11 1000 3095", "read -P 0x11 1000 3095",
            "write -P 0x22 4095 2", "read -P 0x22 4095 2", "read -P 0x11 1000 3095",
            "write -P 0x33 70000 200000", "read -P 0x33 70000 200000",
            # write -z, aligned and not
            "write -P 0x44 1M 1M", "write -z 1M 64k", "read -P 0 1M 64k",
            "read -P 0x44 1088k 960k", "write -z 1500000 3333", "read -P 0 1500000 3333",
            "read -P 0x44 1499000 1000", "read -P 0x44 1503333 1000",
            # discard punches a hole: the range then reads as zeroes
            "write -P 0x55 8M 2M", "discard 8M 1M", "read -P 0 8M 1M", "read -P 0x55 9M 1M",
            # a large request, split into many segments and waves
            "write -P 0x66 16M 32M", "read -P 0x66 16M 32M", "flush")
    # Everything also reached the file itself.
    data = image.read_bytes()
    assert data[1000:4095] == b"\x11" * 3095
    assert data[4095:4097] == b"\x22" * 2
    assert data[1 << 20:(1 << 20) + 65536] == bytes(65536)
    assert data[16 * MiB:48 * MiB] == b"\x66" * (32 * MiB)


def test_fio_verify_four_jobs(image, serve, mode, tmp_path):
    require_tools("fio")
    s = serve(image, mode)
    out = tmp_path / "fio.json"
    run(["fio", "--name=verify", "--ioengine=nbd", f"--uri={s.uri}", "--rw=randwrite",
         "--bs=4k", "--iodepth=16", "--numjobs=4", "--size=12M", "--offset_increment=16M",
         "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--group_reporting",
         "--output-format=json", f"--output={out}"], cwd=tmp_path)  # verify state files
    job = json.loads(out.read_text())["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["total_ios"] == 4 * 12 * 256       # every block written
    assert job["read"]["total_ios"] == 4 * 12 * 256        # and read back to verify


def test_aligned_requests_are_served_with_no_copy(tmp_path, image, serve):
    """Direct mode on the disk under the tests: nbdkit's buffers (from the
    allocator the server is started with) meet the disk's memory alignment,
    so aligned requests from nbdcopy and fio go to the disk with no bounce
    copy, and the data is right; an unaligned one is still copied."""
    require_tools("nbdcopy", "fio")
    stats_file = tmp_path / "stats.json"
    s = serve(image, "direct", extra=["--stats-file", str(stats_file)])
    src = tmp_path / "src.raw"
    src.write_bytes(random.Random(11).randbytes(32 * MiB))
    run(["nbdcopy", str(src), s.uri])
    out = tmp_path / "out.raw"
    run(["nbdcopy", s.uri, str(out)])
    assert out.read_bytes()[:32 * MiB] == src.read_bytes()
    run(["fio", "--name=zc", "--ioengine=nbd", f"--uri={s.uri}", "--rw=randrw",
         "--bsrange=4k-1m", "--bs_unaligned=0", "--iodepth=8", "--size=16M",
         "--offset=32M", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1"],
        cwd=tmp_path)
    h = connect(s.uri)
    h.pwrite(b"\xab" * 1000, 100)           # unaligned: read-modify-write
    h.shutdown()
    s.stop()
    stats = json.loads(stats_file.read_text())
    assert stats["zero_copy"] > 0, stats
    assert stats["copied"] == 1000, stats       # the unaligned write's bytes alone
    assert image.read_bytes()[100:1100] == b"\xab" * 1000


def test_nbdinfo_map_shows_holes(image, serve, mode):
    require_tools("nbdinfo")
    s = serve(image, mode)
    nbdsh(s.uri, "h.pwrite(b'\\x01' * 1048576, 4 * 1048576); "
                 "h.pwrite(b'\\x02' * 65536, 40 * 1048576); h.flush()")
    p = run(["nbdinfo", "--map", "--json", s.uri])
    extents = json.loads(p.stdout)
    data = [(e["offset"], e["length"]) for e in extents if not e["type"] & 1]
    holes = [(e["offset"], e["length"]) for e in extents if e["type"] & 1]
    assert data == [(4 * MiB, MiB), (40 * MiB, 65536)]
    assert all(e["type"] == 3 for e in extents if e["type"] & 1), "holes read as zero"
    assert sum(n for _, n in holes) == 64 * MiB - MiB - 65536


def test_nbdfuse_loop_mkfs_ext4_mount_fsck(tmp_path, image, serve, mode):
    """The kernel's loop and ext4 code over our server, via nbdfuse."""
    require_root()
    require_tools("nbdfuse", "mkfs.ext4", "e2fsck", "fusermount3")
    s = serve(image, mode)
    fuse_dir = tmp_path / "fuse"
    mnt = tmp_path / "mnt"
    fuse_dir.mkdir()
    mnt.mkdir()
    pidfile = tmp_path / "nbdfuse.pid"
    fuse = subprocess.Popen(["nbdfuse", "-P", str(pidfile), str(fuse_dir), s.uri],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not pidfile.exists() and time.monotonic() < deadline:
            assert fuse.poll() is None, fuse.stdout.read()
            time.sleep(0.05)
        dev = fuse_dir / "nbd"
        assert dev.stat().st_size == 64 * MiB
        run(["mkfs.ext4", "-q", "-F", str(dev)])
        run(["mount", "-o", "loop", str(dev), str(mnt)])
        files = {}
        try:
            rng = random.Random(3)
            for i in range(8):
                data = rng.randbytes(rng.randrange(1, 3 * MiB))
                (mnt / f"f{i}").write_bytes(data)
                files[f"f{i}"] = hashlib.sha256(data).hexdigest()
            run(["sync"])
        finally:
            run(["umount", str(mnt)])
        run(["e2fsck", "-fn", str(dev)])
        run(["mount", "-o", "loop,ro", str(dev), str(mnt)])
        try:
            for name, digest in files.items():
                assert hashlib.sha256((mnt / name).read_bytes()).hexdigest() == digest
        finally:
            run(["umount", str(mnt)])
    finally:
        subprocess.run(["fusermount3", "-u", str(fuse_dir)], capture_output=True)
        fuse.wait(timeout=30)
    # The image file itself holds a clean filesystem.
    run(["e2fsck", "-fn", str(image)])
