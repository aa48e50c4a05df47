"""Where the server's worker threads run: off the CPUs that take the backing
device's completion interrupts while the pool is busy.

With many requests in flight, the worker pool serves fastest kept together
on CPUs that do *not* take the disk's interrupts; with one request at a
time, it serves fastest left to the scheduler.  So the engine moves a worker
onto the "busy" CPUs when several requests are in progress and gives it
back every CPU the server may use ("idle") when it is alone.  The sets are
found once, at start; docs/decisions.md has the figures behind the rule.

This module finds the sets, and parses and prints the kernel's CPU-list
syntax for everyone; it does no I/O beyond reading sysfs and /proc, and it
gives up (returns None) whenever the answer is not clear: no block device
under the image, interrupts on every CPU (multi-queue NVMe), one CPU only.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Placement:
    busy: frozenset[int]   # CPUs for the worker pool under load: not the irq ones
    idle: frozenset[int]   # CPUs for a lone request: every CPU the server may use
    irq: frozenset[int]    # CPUs that take the disk's completion interrupts


_CPU_RANGE = re.compile(r"(\d+)(?:-(\d+)(?::(\d+)(?:/(\d+))?)?)?")


def parse_cpu_list(text: str) -> set[int]:
    """``"0-2,5"`` -> {0, 1, 2, 5}: the kernel's list syntax (cpuset,
    isolcpus, /proc/irq/*/effective_affinity_list), with its groups
    (``0-15:2/8`` is 0, 1, 8, 9: 2 of every 8) and taskset's strides
    (``0-7:2`` is 0, 2, 4, 6).  Raises ValueError naming the bad part."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        m = _CPU_RANGE.fullmatch(part.strip())
        if not m:
            raise ValueError(f"{part!r} is not a CPU, a range (0-3) or a strided range (0-7:2)")
        lo, hi, used, group = (None if g is None else int(g) for g in m.groups())
        hi = lo if hi is None else hi
        if hi < lo:
            raise ValueError(f"{part!r}: the range runs backwards")
        if used is None:
            used, group = 1, 1
        elif group is None:
            used, group = 1, used      # a stride: one of every `used`
        if used == 0 or group == 0 or used > group:
            raise ValueError(f"{part!r}: a group takes 1 to its length of CPUs (like 0-7:2/4)")
        for first in range(lo, hi + 1, group):
            cpus.update(range(first, min(first + used, hi + 1)))
    return cpus


def format_cpu_list(cpus) -> str:
    """{0, 2, 1} -> ``"0,1,2"``."""
    return ",".join(map(str, sorted(cpus)))


def interrupt_counts(text: str) -> dict[int, list[int]]:
    """Per-CPU counts of each numbered IRQ in /proc/interrupts."""
    lines = text.splitlines()
    if not lines:
        return {}
    ncpu = len(lines[0].split())
    out = {}
    for line in lines[1:]:
        name, _, rest = line.partition(":")
        if not name.strip().isdigit():
            continue
        fields = rest.split()
        counts = []
        for f in fields[:ncpu]:
            if not f.isdigit():
                break
            counts.append(int(f))
        out[int(name)] = counts
    return out


def device_dirs(dev: int, sysfs: Path, depth: int = 0) -> list[Path]:
    """The sysfs device directories under block device ``dev``: itself, or
    what it sits on (partition -> disk, dm/md -> slaves, loop -> its file)."""
    if depth > 4:
        return []
    node = sysfs / "dev" / "block" / f"{os.major(dev)}:{os.minor(dev)}"
    try:
        node = node.resolve(strict=True)
    except OSError:
        return []
    if (node / "partition").exists():
        node = node.parent
    found: list[Path] = []
    slaves = node / "slaves"
    if slaves.is_dir() and any(slaves.iterdir()):
        for s in slaves.iterdir():
            try:
                found += device_dirs(os.makedev(*map(int, (s / "dev").read_text().split(":"))),
                                     sysfs, depth + 1)
            except (OSError, ValueError):
                pass
        return found
    backing = node / "loop" / "backing_file"
    if backing.exists():
        try:
            return device_dirs(os.stat(backing.read_text().strip()).st_dev, sysfs, depth + 1)
        except OSError:
            return []
    if (node / "device").exists():
        found.append((node / "device").resolve())
    return found


def device_irqs(device_dir: Path) -> set[int]:
    """The MSI interrupts of the (PCI) function that holds ``device_dir``."""
    for d in [device_dir, *device_dir.parents]:
        msi = d / "msi_irqs"
        if msi.is_dir():
            return {int(n) for n in os.listdir(msi) if n.isdigit()}
        if d == d.parent or d.name == "devices":
            break
    return set()


def irq_cpus(path: str, sysfs: Path = Path("/sys"), proc: Path = Path("/proc"),
             min_share: float = 0.1) -> set[int]:
    """CPUs that take the completion interrupts of the storage under
    ``path``: those with at least ``min_share`` of the device's interrupts
    so far, or, before there are many, the interrupts' effective affinity."""
    st = os.stat(path)
    dev = st.st_rdev if (st.st_mode & 0o170000) == 0o060000 else st.st_dev
    irqs: set[int] = set()
    for d in device_dirs(dev, sysfs):
        irqs |= device_irqs(d)
    if not irqs:
        return set()
    counts = interrupt_counts((proc / "interrupts").read_text())
    per_cpu: dict[int, int] = {}
    for irq in irqs:
        for cpu, n in enumerate(counts.get(irq, [])):
            per_cpu[cpu] = per_cpu.get(cpu, 0) + n
    total = sum(per_cpu.values())
    if total >= 1000:
        return {cpu for cpu, n in per_cpu.items() if n >= min_share * total}
    cpus: set[int] = set()
    for irq in irqs:
        try:
            cpus |= parse_cpu_list((proc / "irq" / str(irq) /
                                    "effective_affinity_list").read_text())
        except OSError:
            pass
    return cpus


def choose(path: str, allowed: set[int] | None = None, **kw) -> Placement | None:
    """The busy and idle CPU sets for serving ``path``, or None to leave the
    scheduler alone."""
    allowed = set(os.sched_getaffinity(0)) if allowed is None else set(allowed)
    try:
        irq = irq_cpus(path, **kw) & allowed
    except OSError:
        return None
    busy = allowed - irq
    if not irq or not busy:
        return None
    return Placement(busy=frozenset(busy), idle=frozenset(allowed), irq=frozenset(irq))
