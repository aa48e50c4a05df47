"""The block writer of the power-cut test (tests/e2e/guest/powercut.sh),
run in the one-kernel VM with the host's Python: on a fresh, fully written
image served by ``nbdloop serve``, keep writes in flight (4 KiB mostly, some
64 KiB and 1 MiB; a quarter FUA) with a flush now and then, each write in
bytes no other write touches, and report on the report port, as they
happen, what the host needs to check the image after the power cut:

    W MODE GEN OFFSET LENGTH FUA   a write was acknowledged
    S MODE N                       flush N was sent (it covers every W before)
    F MODE N                       flush N was acknowledged
    FULL MODE                      the image is used up: nothing more is sent

A line is written only after what it reports has happened, so the host
may hold back none of them.  The content of each write names its sectors
(tests/sectors.py).  Usage: MODE SOCKET REPORT_FD STARTED_FILE.
"""
from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # tests/
import nbd  # noqa: E402
from sectors import SECTOR, pattern  # noqa: E402

QUEUE_DEPTH = 16
FLUSH_EVERY = 1 / 24      # the share of sends that is a flush


def size_of(rng: random.Random) -> int:
    r = rng.random()
    return 4096 if r < 0.80 else 65536 if r < 0.97 else 1 << 20


def main(mode: str, socket: str, report_fd: int, started: str) -> int:
    h = nbd.NBD()
    h.connect_unix(socket)
    size = h.get_size()
    rng = random.Random()
    lines: list[str] = []
    errors: list[str] = []
    state = {"in_flight": 0, "flushing": False}
    buffers: dict[int, object] = {}
    offset, gen, flushes = 0, 1, 0

    def wrote(err, gen=0, offset=0, length=0, fua=False):
        state["in_flight"] -= 1
        buffers.pop(gen, None)
        if err.value:
            errors.append(f"write {gen} at {offset}+{length}: errno {err.value}")
        else:
            lines.append(f"W {mode} {gen} {offset} {length} {int(fua)}\n")
        return 1

    def flushed(err, n=0):
        state["in_flight"] -= 1
        state["flushing"] = False
        if err.value:
            errors.append(f"flush {n}: errno {err.value}")
        else:
            lines.append(f"F {mode} {n}\n")
        return 1

    while not errors:
        while state["in_flight"] < QUEUE_DEPTH and offset < size:
            if not state["flushing"] and rng.random() < FLUSH_EVERY:
                flushes += 1
                lines.append(f"S {mode} {flushes}\n")
                state["flushing"] = True
                state["in_flight"] += 1
                h.aio_flush(completion=lambda err, n=flushes: flushed(err, n))
                continue
            length = min(size_of(rng), size - offset)
            fua = rng.random() < 0.25
            buf = nbd.Buffer.from_buffer(pattern(offset, length // SECTOR, gen))
            buffers[gen] = buf
            state["in_flight"] += 1
            h.aio_pwrite(buf, offset, flags=nbd.CMD_FLAG_FUA if fua else 0,
                         completion=lambda err, g=gen, o=offset, n=length, f=fua:
                         wrote(err, g, o, n, f))
            offset += length
            gen += 1
        if state["in_flight"] == 0:
            break
        h.poll(-1)
        if lines:
            os.write(report_fd, "".join(lines).encode())
            if gen > 1 and not os.path.exists(started):
                Path(started).touch()
            lines.clear()
    if errors:
        os.write(report_fd, f"ERROR {mode} block writer: {errors[0]}\n".encode())
        print(errors[0], file=sys.stderr)
        return 1
    os.write(report_fd, f"FULL {mode}\n".encode())
    print(f"{mode}: the image is full after {gen - 1} writes; waiting for the power cut")
    while True:
        time.sleep(60)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]))
