"""Where the server's worker threads should run: find the CPUs that take the
backing device's completion interrupts.

With many requests in flight, the worker pool serves fastest kept together
on CPUs that do *not* take the disk's interrupts; with one request at a time,
it serves fastest left to the scheduler (docs/BENCHMARKS.md has the
measurements).  So the engine moves a worker onto the "busy" CPUs when
several requests are in progress and gives it back every CPU the server may
use ("idle") when it is alone.

This module finds the sets, and parses and prints the kernel's CPU-list
syntax for everyone; it does no I/O beyond reading sysfs and /proc, and it
gives up (returns None) whenever the answer is not clear: no block device
under the image, interrupts on every CPU (multi-queue NVMe), one CPU only.

With ``--placement auto`` the busy set is not fixed: :class:`Adaptive` feeds
the rule of :mod:`nbdloop.engine.contention` with samples :class:`Watch`
reads from /proc, and spreads the pool over every allowed CPU when other
work (the client) crowds its own; ``--placement irq`` keeps it fixed.
"""
from __future__ import annotations

import dataclasses
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nbdloop.engine.contention import Rule, Sample


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


# ---- the adaptive rule's samples, and the rule run from the request path ----------

_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)   # user nice system irq softirq steal, in /proc/stat
_IDLE_FIELDS = (3, 4)               # idle iowait


def cpu_times(text: str) -> dict[int, tuple[int, int]]:
    """Per CPU of /proc/stat: (busy, idle) clock ticks so far."""
    out = {}
    for line in text.splitlines():
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu":
            continue
        ticks = [int(f) for f in fields]
        out[int(name[3:])] = (sum(ticks[i] for i in _BUSY_FIELDS if i < len(ticks)),
                              sum(ticks[i] for i in _IDLE_FIELDS if i < len(ticks)))
    return out


def thread_times(schedstat: str, stat: str) -> tuple[int, int, int]:
    """(ns run, ns waited for a CPU, the CPU it last ran on) of one thread,
    from its /proc/.../schedstat and stat."""
    run, wait, _ = schedstat.split()
    # The command name may hold spaces and parentheses; what follows the
    # last ')' starts at field 3 (state), so field 39 (processor) is [36].
    cpu = int(stat[stat.rindex(")") + 2:].split()[36])
    return int(run), int(wait), cpu


class Watch:
    """The samples the contention rule is fed, read from /proc: each of this
    process's threads' run time and run delay (``/proc/self/task/*/schedstat``)
    and the CPU it last ran on (its ``stat``: where its run time is counted),
    and each CPU's busy and idle ticks (``/proc/stat``).  The files stay
    open and are re-read with pread, so a sample costs a few system calls
    per thread."""

    def __init__(self, cpus: set[int], proc: Path = Path("/proc"), pid: str = "self") -> None:
        self.cpus = frozenset(cpus)
        self.proc = proc
        self._tasks_dir = proc / pid / "task"     # another pid: to record its samples
        self._stat_fd = os.open(proc / "stat", os.O_RDONLY | os.O_CLOEXEC)
        self._tasks: dict[int, tuple[int, int]] = {}
        self._threads: dict[int, tuple[int, int]] = {}
        self._cpus: dict[int, tuple[int, int]] = {}
        self._when: float | None = None

    def close(self) -> None:
        for fds in self._tasks.values():
            for fd in fds:
                os.close(fd)
        self._tasks.clear()
        if self._stat_fd >= 0:
            os.close(self._stat_fd)
            self._stat_fd = -1

    def _read(self, fd: int) -> str:
        return os.pread(fd, 65536, 0).decode()

    def _task_fds(self, tid: int) -> tuple[int, int] | None:
        fds = self._tasks.get(tid)
        if fds is None:
            task = self._tasks_dir / str(tid)
            try:
                first = os.open(task / "schedstat", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return None
            try:
                fds = (first, os.open(task / "stat", os.O_RDONLY | os.O_CLOEXEC))
            except OSError:
                os.close(first)
                return None
            self._tasks[tid] = fds
        return fds

    def sample(self, now: float) -> Sample | None:
        """What happened since the last call (None at the first)."""
        run = wait = 0.0
        pool: dict[int, float] = {}
        alive = set()
        for name in os.listdir(self._tasks_dir):
            tid = int(name)
            fds = self._task_fds(tid)
            if fds is None:
                continue
            try:
                r, w, cpu = thread_times(self._read(fds[0]), self._read(fds[1]))
            except (OSError, ValueError, IndexError):
                continue        # the thread has just ended
            alive.add(tid)
            r0, w0 = self._threads.get(tid, (r, w))
            self._threads[tid] = (r, w)
            run += (r - r0) / 1e9
            wait += (w - w0) / 1e9
            pool[cpu] = pool.get(cpu, 0.0) + (r - r0) / 1e9
        for tid in set(self._tasks) - alive:
            for fd in self._tasks.pop(tid):
                os.close(fd)
            self._threads.pop(tid, None)
        times = cpu_times(self._read(self._stat_fd))
        before, self._cpus = self._cpus, times
        when, self._when = self._when, now
        if when is None or now <= when:
            return None
        seconds = now - when
        busy = {}
        for cpu in self.cpus:
            b1, i1 = times.get(cpu, (0, 0))
            b0, i0 = before.get(cpu, (b1, i1))
            ticks = (b1 - b0) + (i1 - i0)
            busy[cpu] = seconds * (b1 - b0) / ticks if ticks > 0 else 0.0
        return Sample(seconds=seconds, run=run, wait=wait, busy=busy, pool=pool)


class Adaptive:
    """The contention rule run from the request path: every ``every``
    requests a worker looks at the clock, and once ``interval`` has passed
    (and no other worker is at it) it takes a sample, feeds the rule and,
    if the rule says so, gives the engine the pool's new CPUs.  A request
    costs a counter; a sample, a few system calls per thread."""

    def __init__(self, where: Placement, apply: Callable[[set[int], set[int]], None],
                 log: Callable[[str], None], *, interval: float = 0.15, every: int = 64,
                 watch: Watch | None = None, **rule) -> None:
        self.where = where
        self.rule = Rule(home=where.busy, allowed=where.idle, **rule)
        self.watch = watch or Watch(set(where.idle))
        self._apply = apply
        self._log = log
        self._interval = interval
        self._every = every
        self._count = 0
        self._counted = 0
        self._last = 0.0
        self._lock = threading.Lock()

    def tick(self) -> None:
        self._count += 1        # under the GIL; a lost increment only delays a sample
        if self._count % self._every:
            return
        now = time.monotonic()
        if now - self._last < self._interval or not self._lock.acquire(blocking=False):
            return
        try:
            self._last = now
            sample = self.watch.sample(now)
            requests, self._counted = self._count - self._counted, self._count
            if sample is None:
                return
            sample = dataclasses.replace(sample, requests=requests)
            cpus = self.rule.feed(now, sample)
            if cpus is not None:
                self._apply(set(cpus), set(self.where.idle))
                self._log(f"workers {self.rule.state}: CPU {format_cpu_list(cpus)} under load: "
                          f"{self.rule.changes[-1][2]} (the pool waited "
                          f"{sample.waiting():.0%} of its time, {sample.rate():.0f} requests/s)")
        finally:
            self._lock.release()

    def close(self) -> None:
        self.watch.close()
