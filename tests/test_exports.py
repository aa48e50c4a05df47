"""One nbdkit serving the images of an exports directory, each under its
own name, through real clients (libnbd, nbdinfo): the export a client
names is read from ``DIR/NAME.json`` when it connects, so exports are
added while the server runs; a name that is no export is refused and the
others are served on; an image is locked while a connection to it is open,
and only then, and the processes of a shared server lock it together."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from conftest import (connect, create_image, nbdinfo_json, read_stats, require_tools, run,
                      stop_cleanly)
from nbdloop.engine.backing import ImageError, open_image
from nbdloop.engine.config import Export, Server, export_json
from nbdloop.serve.children import ServerProcess
from nbdloop.serve.cmdline import nbdkit_argv, plugin_env

MiB = 1 << 20


@pytest.fixture
def exports(tmp_path) -> Path:
    """The exports directory that ``start_server``'s servers serve."""
    path = tmp_path / "exports"
    path.mkdir()
    return path


@pytest.fixture
def start_server(tmp_path, exports):
    """Factory: an nbdkit serving ``exports``, started with nbdkit_argv and
    plugin_env as the daemon starts one; stopped (and checked to have
    exited cleanly) at teardown."""
    require_tools("nbdkit")
    started: list[ServerProcess] = []

    def start(name: str = "exports", **settings) -> ServerProcess:
        sock, pid, log = (str(tmp_path / f"{name}.{s}") for s in ("sock", "pid", "log"))
        server = Server(exports_dir=str(exports), socket=sock, pidfile=pid, **settings)
        s = ServerProcess(nbdkit_argv(server), socket_path=sock, pidfile=pid, log=log,
                          env=plugin_env())
        started.append(s)
        return s.start()

    yield start
    stop_cleanly(started)


def define(exports: Path, name: str, image: Path, **fields) -> None:
    (exports / f"{name}.json").write_text(export_json(Export(str(image), **fields)))


def uri(server: ServerProcess, name: str) -> str:
    return f"nbd+unix:///{name}?socket={server.socket_path}"


def assert_refused(server: ServerProcess, name: str) -> None:
    """Connecting to ``name`` fails in the handshake.  The name is sent as
    it is (a URI would have its path normalised)."""
    import nbd
    h = nbd.NBD()
    h.set_export_name(name)
    with pytest.raises(nbd.Error, match="handshake"):
        h.connect_unix(server.socket_path)


def test_the_command_line_leaves_slices_and_readonly_to_the_plugin():
    require_tools("nbdkit")
    argv = nbdkit_argv(Server(exports_dir="/run/exports", socket="/run/s.sock"))
    assert "--readonly" not in argv
    assert not [a for a in argv if a.startswith("--filter")]
    assert argv[argv.index("python") + 2:] == ["exports-dir=/run/exports"]


def test_two_images_are_served_at_once_each_by_its_name(tmp_path, exports, start_server,
                                                         mode):
    require_tools("nbdinfo")
    images = {name: create_image(tmp_path / f"{name}.img", "8M") for name in ("a", "vm-1:b")}
    for name, image in images.items():
        define(exports, name, image, mode=mode)
    (exports / "notes.txt").write_text("not an export\n")
    s = start_server()
    listed = json.loads(run(["nbdinfo", "--list", "--json", s.uri]).stdout)["exports"]
    assert sorted(e["export-name"] for e in listed) == ["a", "vm-1:b"]

    handles = {name: connect(uri(s, name)) for name in images}
    # Both connections open, the requests interleaved: aligned, and
    # unaligned ones that read-modify-write their edge blocks.
    for n, (name, h) in enumerate(handles.items(), start=1):
        h.pwrite(bytes([n]) * 4096, 0)
    for n, (name, h) in enumerate(handles.items(), start=1):
        h.pwrite(bytes([0x10 + n]) * 3000, MiB + 1000)
    for n, (name, h) in enumerate(handles.items(), start=1):
        assert h.get_size() == 8 * MiB
        assert h.pread(4096, 0) == bytes([n]) * 4096
        assert h.pread(3000, MiB + 1000) == bytes([0x10 + n]) * 3000
        h.flush()
        h.shutdown()
    for n, image in enumerate(images.values(), start=1):
        expected = bytearray(8 * MiB)
        expected[:4096] = bytes([n]) * 4096
        expected[MiB + 1000:MiB + 4000] = bytes([0x10 + n]) * 3000
        assert image.read_bytes() == expected, image.name


def test_an_export_added_while_the_server_runs_is_served(tmp_path, exports, start_server):
    first = create_image(tmp_path / "first.img", "4M")
    define(exports, "first", first)
    s = start_server()
    h = connect(uri(s, "first"))
    assert_refused(s, "later")
    later = create_image(tmp_path / "later.img", "8M")
    define(exports, "later", later, mode="buffered")
    h2 = connect(uri(s, "later"))
    assert h2.get_size() == 8 * MiB
    h2.pwrite(b"late" * 1024, 4096)
    h.pwrite(b"first" * 100, 0)
    h2.shutdown()
    h.shutdown()
    assert later.read_bytes()[4096:8192] == b"late" * 1024
    assert first.read_bytes()[:500] == b"first" * 100


@pytest.mark.parametrize("mode,offset,length", [
    ("direct", 1 * MiB, 3 * MiB),
    ("buffered", 1 * MiB + 100, 3 * MiB + 512),     # buffered: any byte offset
])
def test_a_slice_is_all_that_its_export_serves(tmp_path, exports, start_server,
                                               mode, offset, length):
    import nbd
    require_tools("nbdinfo", "fallocate")
    image = tmp_path / "disk.img"
    rng = random.Random(5)
    before = bytearray(rng.randbytes(8 * MiB))
    image.write_bytes(before)
    # A hole inside the slice, where block status must show it, moved.
    hole = (offset + MiB + 4095) // 4096 * 4096
    run(["fallocate", "--punch-hole", "--offset", str(hole), "--length", "65536",
         str(image)])
    before[hole:hole + 65536] = bytes(65536)
    define(exports, "part", image, mode=mode, offset=offset, length=length)
    s = start_server()
    h = connect(uri(s, "part"))
    assert h.get_size() == length
    end = offset + length
    assert h.pread(length, 0) == before[offset:end]
    extents = json.loads(run(["nbdinfo", "--map", "--json", uri(s, "part")]).stdout)
    assert sum(e["length"] for e in extents) == length
    holes = [(e["offset"], e["length"]) for e in extents if e["type"] & 1]
    assert holes and all(at <= hole - offset and hole - offset + 65536 <= at + n
                         for at, n in holes), extents

    for at, n in ((0, 4096), (length - 4096, 4096), (100, 1000), (length - 1000, 1000)):
        h.pwrite(rng.randbytes(n), at)
    h.zero(8192, 0)
    h.zero(8192, length - 8192)
    assert h.pread(8192, 0) == bytes(8192) == h.pread(8192, length - 8192)
    h.trim(length, 0)
    for at, n in ((length - 512, 1024), (length, 512)):
        with pytest.raises(nbd.Error):
            h.pwrite(b"x" * n, at)
    served = h.pread(length, 0)
    h.flush()
    h.shutdown()
    after = image.read_bytes()
    assert after[:offset] == before[:offset], "bytes before the slice changed"
    assert after[end:] == before[end:], "bytes after the slice changed"
    assert after[offset:end] == served


def test_a_readonly_export_refuses_writes_beside_a_writable_one(tmp_path, exports,
                                                                start_server):
    import nbd
    ro, rw = (create_image(tmp_path / f"{name}.img", "4M") for name in ("ro", "rw"))
    define(exports, "ro", ro, readonly=True)
    define(exports, "rw", rw)
    s = start_server()
    assert nbdinfo_json(uri(s, "ro"))["exports"][0]["is_read_only"] is True
    assert nbdinfo_json(uri(s, "rw"))["exports"][0]["is_read_only"] is False
    h_ro, h_rw = connect(uri(s, "ro")), connect(uri(s, "rw"))
    with pytest.raises(nbd.Error) as e:
        h_ro.pwrite(b"x" * 4096, 0)
    assert e.value.errno in ("EPERM", "EROFS")
    h_rw.pwrite(b"y" * 4096, 0)
    # Served read-only, the image is shared: other readers may open it,
    # no writer.
    os.close(open_image(str(ro), readonly=True)[0])
    with pytest.raises(ImageError, match="already in use"):
        open_image(str(ro))
    h_ro.shutdown()
    h_rw.shutdown()
    assert ro.read_bytes() == bytes(4 * MiB)
    assert rw.read_bytes()[:4096] == b"y" * 4096


def test_what_is_no_export_is_refused_and_the_others_are_served(tmp_path, exports,
                                                                start_server):
    image = create_image(tmp_path / "disk.img", "4M")
    define(exports, "disk", image)
    # Good definitions where a name used as a path would find them.
    define(tmp_path, "outside", image)
    (exports / "sub").mkdir()
    define(exports / "sub", "x", image)
    define(exports, "..", image)
    # And bad ones in the directory.
    (exports / "junk.json").write_bytes(random.Random(1).randbytes(300))
    (exports / "colour.json").write_text(json.dumps({"image": str(image), "colour": "red"}))
    define(exports, "lost", tmp_path / "no-such.img")
    define(exports, "far", image, offset=8 * MiB)
    define(exports, "long", image, offset=MiB, length=4 * MiB)
    define(exports, "skew", image, offset=100)      # direct: a slice must be aligned
    s = start_server()
    names = ["nosuch", "../outside", "sub/x", "..", ".", "", "/disk", "junk", "colour", "lost",
             "far", "long", "skew"]
    for name in names:
        assert_refused(s, name)
        h = connect(uri(s, "disk"))      # the server serves on
        assert h.pread(512, 0) == bytes(512)
        h.shutdown()
    log = s.log.read_text()
    assert "Traceback" not in log, log
    refusals = [line for line in log.splitlines() if ": open: error: " in line]
    assert len(refusals) == len(names), log
    for phrase in ("no export named 'nosuch'", "no export named '../outside'",
                   "no export named 'sub/x'", "no export named ''",
                   "export 'junk': ", 'no key "colour"',
                   "no-such.img: no such file", "No such file or directory",
                   "export 'far': the slice's offset 8388608 is not inside",
                   "export 'long': the slice 1048576+4194304 ends past the end",
                   "export 'skew': the slice 100+"):
        assert phrase in log, (phrase, log)


def test_the_image_lock_goes_with_the_last_connection(tmp_path, exports, start_server, mode):
    image = create_image(tmp_path / "disk.img", "4M")
    define(exports, "disk", image, mode=mode)
    stats = tmp_path / "stats.json"
    s = start_server(stats_file=str(stats))
    first, second = connect(uri(s, "disk")), connect(uri(s, "disk"))
    first.pwrite(b"1" * 4096, 0)

    def closed(h) -> None:
        """Disconnect ``h`` and wait for the server to have run its close()
        (which writes the stats file)."""
        stats.unlink(missing_ok=True)
        h.shutdown()
        read_stats(stats)

    closed(first)
    with pytest.raises(ImageError, match="already in use"):
        open_image(str(image), mode=mode)
    assert second.pread(4096, 0) == b"1" * 4096
    closed(second)
    fd, _ = open_image(str(image), mode=mode)
    try:
        # Its image locked elsewhere, the export is refused, in one line.
        assert_refused(s, "disk")
    finally:
        os.close(fd)
    third = connect(uri(s, "disk"))
    assert third.pread(4096, 0) == b"1" * 4096
    closed(third)
    log = s.log.read_text()
    refused = [line for line in log.splitlines() if "already in use" in line]
    assert len(refused) == 1 and refused[0].endswith("Device or resource busy"), log
    assert "Traceback" not in log, log


def test_the_processes_of_a_shared_server_serve_one_image_together(tmp_path, exports,
                                                                   start_server):
    import nbd
    image = create_image(tmp_path / "disk.img", "8M")
    define(exports, "disk", image)
    servers = [start_server(f"p{k}", shared=True) for k in range(2)]
    handles = [connect(uri(s, "disk")) for s in servers]
    for k, h in enumerate(handles):
        h.pwrite(bytes([k + 1]) * 4096, k * MiB)
    for h in handles:
        assert [h.pread(4096, k * MiB) for k in range(2)] == [b"\1" * 4096, b"\2" * 4096]
    # Another process's read-modify-write could lose this one's write.
    with pytest.raises(nbd.Error) as e:
        handles[0].pwrite(b"x" * 100, 100)
    assert e.value.errno == "EINVAL"
    # Each process holds a shared lock: a server of its own is kept out.
    with pytest.raises(ImageError, match="already in use"):
        open_image(str(image))
    for h in handles:
        h.shutdown()
    for s in servers:
        assert s.stop() == 0
    os.close(open_image(str(image))[0])
