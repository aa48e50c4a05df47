"""Worker placement: under load the workers gather on CPUs that do not take
the disk's interrupts; a lone request gets every CPU back."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from conftest import preads_in_flight, read_stats, require
from nbdloop.engine import placement

PROC_INTERRUPTS = """\
           CPU0       CPU1
  1:          9          0   IO-APIC   1-edge      i8042
 35:          0          1  PCI-MSIX-0000:00:02.0   0-edge      virtio1-config
 36:        120   11736938  PCI-MSIX-0000:00:02.0   1-edge      virtio1-req.0
NMI:          0          0   Non-maskable interrupts
LOC:    1234567    7654321   Local timer interrupts
"""


def test_parse_cpu_list():
    assert placement.parse_cpu_list("0-2,5\n") == {0, 1, 2, 5}
    assert placement.parse_cpu_list("3") == {3}
    assert placement.parse_cpu_list("") == set()
    assert placement.parse_cpu_list("0-7:2") == {0, 2, 4, 6}          # taskset's stride
    assert placement.parse_cpu_list("1-8:3,10") == {1, 4, 7, 10}
    assert placement.parse_cpu_list("0-15:2/8") == {0, 1, 8, 9}       # the kernel's groups
    assert placement.parse_cpu_list("0-9:3/4") == {0, 1, 2, 4, 5, 6, 8, 9}
    assert placement.parse_cpu_list("2-2:1/1") == {2}


@pytest.mark.parametrize("text", ["a", "1-", "-1", "3-1", "0-7:0", "0-7:3/2", "0-7:2/0",
                                  "0:2", "1-2-3", "0-7:/2"])
def test_parse_cpu_list_refuses_what_the_kernel_would(text):
    with pytest.raises(ValueError, match=repr(text)):
        placement.parse_cpu_list(text)


def test_interrupt_counts():
    counts = placement.interrupt_counts(PROC_INTERRUPTS)
    assert counts[36] == [120, 11736938]
    assert counts[35] == [0, 1]
    assert "NMI" not in counts and 1 in counts


def fake_machine(tmp_path: Path, counts: str, effective: dict[int, str]):
    """A sysfs and /proc shaped like this project's VM, for the cases it
    cannot show (other interrupt layouts)."""
    sysfs, proc = tmp_path / "sys", tmp_path / "proc"
    pci = sysfs / "devices" / "pci0000:00" / "0000:00:02.0"
    disk = pci / "virtio1" / "block" / "vda"
    (disk).mkdir(parents=True)
    (disk / "device").symlink_to(pci / "virtio1")
    (pci / "msi_irqs").mkdir()
    for irq in effective:
        (pci / "msi_irqs" / str(irq)).write_text("msix\n")
    img = tmp_path / "img"
    img.write_bytes(b"\0" * 512)
    dev = os.stat(img).st_dev
    (sysfs / "dev" / "block").mkdir(parents=True)
    (sysfs / "dev" / "block" / f"{os.major(dev)}:{os.minor(dev)}").symlink_to(disk)
    proc.mkdir()
    (proc / "interrupts").write_text(counts)
    for irq, cpus in effective.items():
        (proc / "irq" / str(irq)).mkdir(parents=True)
        (proc / "irq" / str(irq) / "effective_affinity_list").write_text(cpus + "\n")
    return img, sysfs, proc


def test_plan_from_interrupt_counts(tmp_path):
    img, sysfs, proc = fake_machine(tmp_path, PROC_INTERRUPTS, {35: "1", 36: "1"})
    p = placement.choose(str(img), allowed={0, 1}, sysfs=sysfs, proc=proc)
    assert p == placement.Placement(busy=frozenset({0}), idle=frozenset({0, 1}),
                                    irq=frozenset({1}))


def test_plan_gives_up_when_interrupts_are_everywhere(tmp_path):
    spread = PROC_INTERRUPTS.replace("120   11736938", "5000000    5000000")
    img, sysfs, proc = fake_machine(tmp_path, spread, {35: "0", 36: "0-1"})
    assert placement.choose(str(img), allowed={0, 1}, sysfs=sysfs, proc=proc) is None
    # One CPU: nowhere to move to.
    img, sysfs, proc = fake_machine(tmp_path / "b", PROC_INTERRUPTS, {35: "1", 36: "1"})
    assert placement.choose(str(img), allowed={1}, sysfs=sysfs, proc=proc) is None


def test_plan_uses_affinity_before_there_are_counts(tmp_path):
    young = PROC_INTERRUPTS.replace("120   11736938", "0          3")
    img, sysfs, proc = fake_machine(tmp_path, young, {35: "0", 36: "1"})
    p = placement.choose(str(img), allowed={0, 1, 2}, sysfs=sysfs, proc=proc)
    assert p == placement.Placement(busy=frozenset({2}), idle=frozenset({0, 1, 2}),
                                    irq=frozenset({0, 1}))


def test_no_block_device_no_placement():
    require(Path("/dev/shm").is_dir(), "a tmpfs at /dev/shm")
    assert placement.choose("/dev/shm") is None


def affinities(pid: int) -> dict[int, frozenset[int]]:
    return {int(t): frozenset(os.sched_getaffinity(int(t)))
            for t in os.listdir(f"/proc/{pid}/task")}


def test_workers_move_with_the_load(image, serve, tmp_path):
    """The real engine on this machine's disk: 32 requests in flight put the
    workers on the busy CPUs, one at a time gives them every CPU back."""
    where = placement.choose(str(image))
    require(where is not None, "a block device whose interrupts go to some CPUs only "
                               "(this project's VM has one)")
    import nbd
    stats = tmp_path / "stats.json"
    # The default is the rule.
    s = serve(image, "direct", extra=["--stats-file", str(stats)])
    assert "under load (CPU" in s.log.read_text()
    h = nbd.NBD()
    h.connect_uri(s.uri)
    for i in range(16):                    # real blocks to read: holes cost no I/O
        h.pwrite(os.urandom(1 << 20), i << 20)
    h.flush()
    fd = os.open(image, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    stop = threading.Event()
    seen_busy = []

    def load():
        bufs = [nbd.Buffer(4096) for _ in range(32)]
        while not stop.is_set():
            for i, b in enumerate(bufs):
                h.aio_pread(b, (i * 7919 % 4096) * 4096)
            while h.aio_in_flight() > 0:
                h.poll(1000)

    t = threading.Thread(target=load)
    t.start()
    try:
        for _ in range(200):
            aff = affinities(s.server_pid)
            busy = [tid for tid, cpus in aff.items() if cpus == where.busy]
            if len(busy) >= 8:
                seen_busy = busy
                break
            stop.wait(0.02)
    finally:
        stop.set()
        t.join()
    assert len(seen_busy) >= 8, "workers gathered on the busy CPUs under load"
    assert where.idle == frozenset(os.sched_getaffinity(s.server_pid)) != where.busy
    for i in range(400):                       # one request at a time
        h.pread(4096, i * 4096)
    aff = affinities(s.server_pid)
    back = [tid for tid in seen_busy if aff.get(tid) == where.idle]
    assert back, "a worker that was on the busy CPUs got every CPU back when alone"
    h.shutdown()
    assert read_stats(stats)["moves"] >= 8


def test_placement_off_leaves_threads_alone(image, serve):
    import nbd
    s = serve(image, "direct", extra=["--placement", "off"])
    h = nbd.NBD()
    h.connect_uri(s.uri)
    for i in range(100):
        h.pread(4096, i * 4096)
    everything = frozenset(os.sched_getaffinity(0))
    assert all(cpus == everything for cpus in affinities(s.server_pid).values())
    h.shutdown()


def test_long_requests_leave_workers_where_they_are(image, serve, tmp_path):
    """Requests over NBDL_PLACE_MAX_LEN never move a worker, at any depth;
    short ones on the same server still do."""
    where = placement.choose(str(image))
    require(where is not None, "a block device whose interrupts go to some CPUs only "
                               "(this project's VM has one)")
    import nbd
    from nbdloop.engine import uring
    big = 1 << 20
    assert big > uring.PLACE_MAX_LEN
    stats = tmp_path / "stats.json"
    s = serve(image, "direct", extra=["--stats-file", str(stats), "--placement", "irq"])
    everything = frozenset(os.sched_getaffinity(s.server_pid))
    h = nbd.NBD()
    h.connect_uri(s.uri)
    for i in range(16):
        h.pwrite(os.urandom(big), i * big)
    preads_in_flight(h, big, depth=8, rounds=25, stride=2 * big)   # 8 in flight: past busy_at
    for i in range(16):                        # and alone
        h.pread(big, i * big)
    assert all(cpus == everything for cpus in affinities(s.server_pid).values())
    h.shutdown()
    # A lone worker's "idle" CPUs are every CPU, so only the counter can show
    # that the long requests alone did not move anyone either.
    st = read_stats(stats)
    assert st["unplaced"] >= 16 + 25 * 8 + 16
    assert st["moves"] == 0
    stats.unlink()
    h = nbd.NBD()                              # short requests, 16 in flight
    h.connect_uri(s.uri)
    preads_in_flight(h, 4096, depth=16, rounds=50)
    assert any(cpus == where.busy for cpus in affinities(s.server_pid).values())
    h.shutdown()
    st2 = read_stats(stats)
    assert st2["moves"] >= 1 and st2["unplaced"] == st["unplaced"]
