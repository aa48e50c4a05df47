"""Holes and unwritten extents (nbdloop.extents), create --preallocate, and
the warning serve and attach give in direct mode for an image that has
them: there an acknowledged write is durable only after a flush."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import create_image, run, run_cli
from nbdloop import extents

MiB = 1 << 20


def unsettled(path: Path, start: int = 0, end: int | None = None) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return extents.unsettled(fd, start, os.fstat(fd).st_size if end is None else end)
    finally:
        os.close(fd)


def test_holes_and_unwritten_extents_are_counted_once(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"")
    os.truncate(path, 8 * MiB)
    with open(path, "r+b") as f:                       # data at 2M-3M
        f.seek(2 * MiB)
        f.write(os.urandom(MiB))
        os.fsync(f.fileno())
    run(["fallocate", "--offset", str(4 * MiB), "--length", str(2 * MiB), str(path)])
    fd = os.open(path, os.O_RDONLY)
    try:
        found = extents.fiemap(fd, 8 * MiB)
    finally:
        os.close(fd)
    assert [(e.logical, e.length, e.unwritten) for e in found] == [
        (2 * MiB, MiB, False), (4 * MiB, 2 * MiB, True)]
    assert unsettled(path) == 7 * MiB
    assert unsettled(path, 2 * MiB, 3 * MiB) == 0
    assert unsettled(path, 3 * MiB, 5 * MiB) == 2 * MiB
    assert unsettled(path, 4 * MiB, 6 * MiB) == 2 * MiB


def test_create_preallocate_writes_every_block(tmp_path):
    sparse, full = tmp_path / "sparse.img", tmp_path / "full.img"
    said = run_cli("create", str(sparse), "8M", check=True).stdout
    assert said.strip().endswith("(8388608 bytes), sparse")
    said = run_cli("create", str(full), "8M", "--preallocate", check=True).stdout
    assert said.strip().endswith("(8388608 bytes), fully written")
    assert unsettled(sparse) == 8 * MiB
    assert unsettled(full) == 0
    assert full.read_bytes() == bytes(8 * MiB)


@pytest.mark.parametrize("mode,preallocate,warned", [
    ("direct", False, True), ("direct", True, False), ("buffered", False, False)])
def test_serve_warns_of_holes_in_direct_mode(tmp_path, serve, mode, preallocate, warned):
    image = create_image(tmp_path / "disk.img", "8M",
                         *(["--preallocate"] if preallocate else []))
    s = serve(image, mode)
    log = s.log.read_text()
    line = [ln for ln in log.splitlines() if "holes or unwritten extents" in ln]
    assert bool(line) is warned, log
    if warned:
        assert line[0].startswith(f"nbdloop: warning: {image}: 8M of it is holes")
        assert "nbdloop create --preallocate" in line[0]
