#!/bin/sh
# tests/e2e/test_zerocopy_vm.py: zero-copy direct I/O, on a disk whose
# direct-I/O memory alignment (statx STATX_DIOALIGN, stx_dio_mem_align) is
# 4 bytes: the emulated NVMe disk of the one-kernel VM ($NBDLOOP_NVME), ext4
# on it, the images there.  The guest checks the data; the host checks the
# engine's counters, which this prints:
# - NBDLOOP-DIOALIGN: MEMORY OFFSET     an image's direct-I/O alignment;
# - NBDLOOP-ZC-STATS: NAME JSON         the server's counters after NAME;
# - NBDLOOP-ZC-MOVED: NAME BYTES        the bytes NAME's requests carried.
# Scenarios:
# - serve: `nbdloop serve --mode direct` and a libnbd client.  Connection
#   "serve-aligned": writes and reads of 4K, 64K, 1M and mixed sizes, all at
#   multiples of 4096, eight in flight at once, then the whole image read
#   back; connection "serve-unaligned": 512 bytes written and read at
#   offset 100.  Every read is compared with an oracle kept in the guest,
#   and so is the image file once the server has stopped.
# - attach: `nbdloop attach --mode direct`, and dd with O_DIRECT through
#   the kernel's NBD device, 1M and 4K requests; read back, compared, and
#   the image compared after detach ("attach").
# Arguments: SEED (for the data of serve).
here=$(dirname "$0")
# shellcheck source=/dev/null
. "$here/product-lib.sh"
SEED=${1:-1}
MNT=/mnt/nvme
CLIENT=/tmp/zerocopy-client.py
MiB=1048576

# stats NAME FILE: wait (up to 30 s) for the server to write FILE as a
# connection closes, print it as NAME's counters, then remove it so that
# the next close writes it anew.
stats() {
    wait_until 30 "the server's counters in $2" test -s "$2"
    echo "NBDLOOP-ZC-STATS: $1 $(tr -d '\n' < "$2")"
    rm -f "$2"
}

# The libnbd client: python3 CLIENT PHASE SOCKET ORACLE SEED.  Phase
# "aligned" starts from an all-zero oracle (a new sparse image), phase
# "unaligned" from the file ORACLE; each saves the oracle there at the end.
cat > "$CLIENT" << 'EOF'
import random
import sys

import nbd

MiB = 1 << 20
phase, sock, oracle_path, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
h = nbd.NBD()
h.set_strict_mode(0)   # the unaligned request must reach the server
h.connect_unix(sock)
size = h.get_size()
if phase == "aligned":
    oracle = bytearray(size)
else:
    with open(oracle_path, "rb") as f:
        oracle = bytearray(f.read())
rng = random.Random(seed)
moved = 0


def check(what, offset, data):
    want = oracle[offset:offset + len(data)]
    if data != want:
        bad = next(i for i in range(len(data)) if data[i] != want[i])
        sys.exit(f"{what} at {offset}+{len(data)}: byte {offset + bad} is "
                 f"{data[bad]:#04x}, the oracle says {want[bad]:#04x}")


def run_batch(requests):
    """(op, offset, length): started together, then each completion checked."""
    global moved
    started = []
    for op, offset, length in requests:
        if op == "write":
            data = rng.randbytes(length)
            buf = nbd.Buffer.from_bytearray(bytearray(data))
            oracle[offset:offset + length] = data
            cookie = h.aio_pwrite(buf, offset)
        else:
            buf = nbd.Buffer(length)
            cookie = h.aio_pread(buf, offset)
        started.append((op, offset, buf, cookie))
        moved += length
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for op, offset, buf, cookie in started:
        h.aio_command_completed(cookie)   # raises nbd.Error if it failed
        if op == "read":
            check("aio_pread", offset, bytes(buf.to_bytearray()))


if phase == "aligned":
    slots = size // MiB
    for kind, count in (("4K", 64), ("64K", 48), ("1M", 16), ("mixed", 32)):
        for op in ("write", "read"):
            left = count
            while left:
                # Distinct 1 MiB slots: requests in flight together never overlap.
                batch = []
                for slot in rng.sample(range(slots), min(8, left)):
                    length = {"4K": 4096, "64K": 65536, "1M": MiB}.get(kind)
                    length = length or rng.randrange(1, 257) * 4096
                    offset = slot * MiB + rng.randrange((MiB - length) // 4096 + 1) * 4096
                    batch.append((op, offset, length))
                run_batch(batch)
                left -= len(batch)
        print(f"{kind}: {count} writes and {count} reads checked", flush=True)
    for offset in range(0, size, MiB):
        check("pread", offset, h.pread(MiB, offset))
        moved += MiB
    print(f"the whole image ({size} bytes) read back and checked", flush=True)
else:
    data = rng.randbytes(512)
    h.pwrite(data, 100)
    oracle[100:612] = data
    check("pread", 100, h.pread(512, 100))
    moved += 1024
    print("512 bytes written at offset 100, read back and checked", flush=True)
h.flush()
h.shutdown()
with open(oracle_path, "wb") as f:
    f.write(oracle)
print(f"NBDLOOP-ZC-MOVED: serve-{phase} {moved}")
EOF

nvme_disk() {
    step nvme
    [ -n "$NBDLOOP_NVME" ] || fail "no NVMe disk: run_product(nvme_size=...) sets \$NBDLOOP_NVME"
    wait_until 30 "$NBDLOOP_NVME appearing" test -b "$NBDLOOP_NVME"
    queue=/sys/block/${NBDLOOP_NVME#/dev/}/queue
    echo "$NBDLOOP_NVME: $(cat "$queue/logical_block_size")-byte blocks," \
        "dma_alignment $(cat "$queue/dma_alignment")"
    must mkfs.ext4 -q -F "$NBDLOOP_NVME"
    mkdir -p "$MNT"
    must mount "$NBDLOOP_NVME" "$MNT"
}

# listening PID PIDFILE: serve wrote its pidfile (it listens); fails the
# script if the server PID exited instead.
listening() {
    kill -0 "$1" 2> /dev/null || fail "serve exited: $(tail -n 3 /tmp/zc-serve.log)"
    test -s "$2"
}

no_nbdkit() { ! pgrep -x nbdkit > /dev/null; }

serve_check() {
    img=$MNT/serve.img sock=/tmp/zc.sock stats=/tmp/zc-stats.json pidfile=/tmp/zc.pid
    oracle=/tmp/zc-oracle.bin
    step serve-create
    must nbdloop create "$img" 64M
    python3 -c 'import os, sys
from nbdloop.engine import uring
print("NBDLOOP-DIOALIGN: %d %d" % uring.dio_alignment(os.open(sys.argv[1], os.O_RDONLY)))' \
        "$img" || fail "statx of $img failed"
    step serve-start
    nbdloop serve "$img" --mode direct --socket "$sock" --stats-file "$stats" \
        --pidfile "$pidfile" > /tmp/zc-serve.log 2>&1 &
    server=$!
    trap 'kill "$server" 2> /dev/null' EXIT
    wait_until 60 "serve listening" listening "$server" "$pidfile"
    step serve-aligned
    must python3 "$CLIENT" aligned "$sock" "$oracle" "$SEED"
    stats serve-aligned "$stats"
    step serve-unaligned
    must python3 "$CLIENT" unaligned "$sock" "$oracle" "$((SEED + 1))"
    stats serve-unaligned "$stats"
    step serve-stop
    kill "$server"
    wait "$server"
    rc=$?
    trap - EXIT
    [ "$rc" -eq 0 ] || fail "serve exited $rc on SIGTERM: $(tail -n 3 /tmp/zc-serve.log)"
    cmp "$img" "$oracle" || fail "the image differs from the oracle after the server stopped"
    echo "the image matches the oracle"
}

attach_check() {
    img=$MNT/attach.img stats=/tmp/zc-attach-stats.json
    step attach-create
    must nbdloop create "$img" 32M
    head -c $((17 * MiB)) /dev/urandom > /tmp/zc-src || fail "no random data"
    step attach
    dev=$(nbdloop attach "$img" --mode direct --stats-file "$stats" 2> /tmp/attach.err) ||
        fail "attach exited $?: $(cat /tmp/attach.err)"
    echo "attached $img as $dev, $(cat "/sys/block/${dev#/dev/}/queue/logical_block_size")-byte blocks"
    step attach-write
    must dd if=/tmp/zc-src of="$dev" bs=1M count=16 oflag=direct status=none
    must dd if=/tmp/zc-src of="$dev" bs=4k skip=4096 seek=4096 count=256 oflag=direct status=none
    step attach-read
    must dd if="$dev" of=/tmp/zc-back bs=64k count=272 iflag=direct status=none
    cmp /tmp/zc-src /tmp/zc-back || fail "what was read through $dev differs from what was written"
    step detach
    must nbdloop detach "$dev"
    # The counters are written as the server's last connection closes.
    wait_until 30 "the server's exit after detach" no_nbdkit
    echo "NBDLOOP-ZC-MOVED: attach $((2 * 17 * MiB))"
    stats attach "$stats"
    cmp -n $((17 * MiB)) /tmp/zc-src "$img" || fail "the image differs from what was written"
    echo "the image matches what was written"
}

nvme_disk
scenario serve serve_check
scenario attach attach_check
umount "$MNT"
[ "$FAILED" -eq 0 ] || fail "$FAILED scenario(s) failed"
