"""Sectors that say who wrote them, for the tests that check what a crash
or a power cut left behind (tests/test_crash.py on the host, the power-cut
writer in the one-kernel VM, tests/e2e/guest/powercut-writer.py).

Every 512-byte sector a write covers carries ``MAGIC | offset | generation``
followed by filler derived from that header by BLAKE2b, so a sector that is
torn, misplaced, stale or foreign is told apart from the one expected.

Standard library only: the guest imports it with the host's Python.
"""
from __future__ import annotations

import hashlib
import struct

SECTOR = 512
MAGIC = b"NBDLCRSH"
HEADER = struct.Struct("<8sQQ")           # magic, byte offset, generation
ZERO_SECTOR = bytes(SECTOR)


def sector_bytes(offset: int, gen: int) -> bytes:
    """The content that generation ``gen`` writes into the sector at ``offset``."""
    header = HEADER.pack(MAGIC, offset, gen)
    filler = hashlib.blake2b(header, digest_size=64).digest() * 8
    return header + filler[:SECTOR - HEADER.size]


def pattern(offset: int, sectors: int, gen: int) -> bytearray:
    """What generation ``gen`` writes into ``sectors`` sectors from byte ``offset``."""
    return bytearray(b"".join(sector_bytes(offset + i * SECTOR, gen) for i in range(sectors)))


def identify(data: bytes, offset: int) -> int | str:
    """The generation the sector ``data`` at byte ``offset`` holds (0 for
    zeroes), or what is wrong with it."""
    if data == ZERO_SECTOR:
        return 0
    magic, where, gen = HEADER.unpack_from(data)
    if magic != MAGIC:
        return "foreign data"
    if where != offset:
        return f"misplaced: holds the sector written at {where}"
    if data != sector_bytes(where, gen):
        return f"torn: header says generation {gen} but the content differs"
    return gen
