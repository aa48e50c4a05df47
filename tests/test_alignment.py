"""Direct mode on a backing filesystem with 4 KiB sectors, where a 512-byte
O_DIRECT write is refused by the kernel: unaligned requests must still be
served exactly, and concurrent 512-byte writes to the same 4K block from
several connections must all survive the read-modify-write."""
from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import threading

import pytest

from conftest import connect, in_threads, nbdinfo_json, require_tools, run

MiB = 1 << 20


def test_the_test_bed_refuses_512_byte_direct_writes(fourk_fs):
    path = fourk_fs / "probe"
    path.write_bytes(bytes(8192))
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        import mmap
        buf = mmap.mmap(-1, 4096)
        with pytest.raises(OSError) as e:
            os.pwrite(fd, memoryview(buf)[:512], 512)
        assert e.value.errno == errno.EINVAL
        assert os.pwrite(fd, buf, 4096) == 4096
    finally:
        os.close(fd)


def test_alignment_is_discovered_and_advertised(fourk_fs, serve):
    require_tools("nbdinfo")
    img = fourk_fs / "disk.img"
    img.write_bytes(b"")
    os.truncate(img, 32 * MiB)
    s = serve(img, "direct")
    info = nbdinfo_json(s.uri)["exports"][0]
    assert info["block_size_minimum"] == 1       # served exactly, by read-modify-write
    assert info["block_size_preferred"] == 4096


def test_unaligned_requests_are_exact(fourk_fs, serve):
    img = fourk_fs / "disk.img"
    rng = random.Random(11)
    content = bytearray(rng.randbytes(8 * MiB))
    img.write_bytes(content)
    s = serve(img, "direct")
    h = connect(s.uri)
    for _ in range(200):
        off = rng.randrange(0, len(content) - 70000)
        n = rng.randrange(1, 70000)
        if rng.random() < 0.5:
            data = rng.randbytes(n)
            h.pwrite(data, off)
            content[off:off + n] = data
        elif rng.random() < 0.5:
            h.zero(n, off)
            content[off:off + n] = bytes(n)
        else:
            assert h.pread(n, off) == content[off:off + n]
    h.flush()
    assert h.pread(len(content), 0) == content
    h.shutdown()
    assert img.read_bytes() == content


def test_concurrent_512_byte_writes_lose_no_update(fourk_fs, serve):
    """Four connections, four threads each; every 512-byte sector of a 4K
    block belongs to one writer, and all writers sweep the same blocks at
    once, in several passes, so edge blocks are read-modify-written
    concurrently."""
    img = fourk_fs / "disk.img"
    blocks = 256
    img.write_bytes(b"")
    os.truncate(img, blocks * 4096)
    s = serve(img, "direct")
    writers = 16          # 4 connections x 4 threads; 8 sectors per block
    passes = 3
    handles = [connect(s.uri) for _ in range(4)]
    start = threading.Barrier(writers)

    def sector_data(sector: int, p: int) -> bytes:
        return bytes([(sector * 7 + p * 13) % 251 + 1]) * 496 + sector.to_bytes(8, "little") \
            + p.to_bytes(8, "little")

    def writer(w: int) -> None:
        h = handles[w % 4]
        start.wait()
        for p in range(passes):
            for b in range(blocks):
                for k in range(8):
                    sector = b * 8 + k
                    if sector % writers == w:
                        h.pwrite(sector_data(sector, p), sector * 512)

    in_threads(writer, writers)
    for h in handles:
        h.flush()
        h.shutdown()
    data = img.read_bytes()
    lost = [sector for sector in range(blocks * 8)
            if data[sector * 512:(sector + 1) * 512] != sector_data(sector, passes - 1)]
    assert not lost, f"{len(lost)} sectors lost their last update, e.g. {lost[:10]}"


def test_libnbd_clients_may_write_512_bytes(fourk_fs, serve, tmp_path):
    """The advertised minimum block size is 1, so libnbd (fio's nbd engine
    here, which enforces it) sends 512-byte random writes, which the 4K
    backing cannot take directly: two jobs, each its own connection and
    region, every write verified (crc32c)."""
    require_tools("fio")
    img = fourk_fs / "disk.img"
    img.write_bytes(b"")
    os.truncate(img, 16 * MiB)
    s = serve(img, "direct")
    out = tmp_path / "fio.json"
    p = subprocess.run(["fio", "--name=w512", "--ioengine=nbd", f"--uri={s.uri}",
                        "--rw=randwrite", "--bs=512", "--iodepth=8", "--numjobs=2",
                        "--size=4M", "--offset_increment=8M", "--io_size=2M",
                        "--verify=crc32c", "--verify_fatal=1", "--do_verify=1",
                        "--output-format=json", f"--output={out}"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    jobs = json.loads(out.read_text())["jobs"]
    assert len(jobs) == 2
    for job in jobs:
        assert job["error"] == 0, job
        assert job["write"]["io_bytes"] == 2 * MiB, job["write"]
        assert job["read"]["io_bytes"] > 0, "nothing was verified"


@pytest.mark.parametrize("where,mode", [("tmp", "direct"), ("fourk", "buffered")])
def test_nbdcopy_copies_an_odd_number_of_sectors(fourk_fs, serve, tmp_path, where, mode):
    """An image of 4097 sectors: nbdcopy in and out, byte for byte; its last
    request is shorter than the preferred block size.  (On the 4K backing
    direct mode refuses such an image: its last block could not be written
    with O_DIRECT without growing the file.)"""
    require_tools("nbdcopy")
    size = 4097 * 512
    source = tmp_path / "source.raw"
    source.write_bytes(random.Random(5).randbytes(size))
    img = (fourk_fs if where == "fourk" else tmp_path) / "odd.img"
    img.write_bytes(b"")
    os.truncate(img, size)
    s = serve(img, mode)
    run(["nbdcopy", str(source), s.uri])
    back = tmp_path / "back.raw"
    run(["nbdcopy", s.uri, str(back)])
    assert back.read_bytes() == source.read_bytes()
    s.stop()
    assert img.read_bytes() == source.read_bytes()
