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

With ``--placement auto`` the busy set is not fixed: :class:`Adaptive`, a
thread of the server, feeds the rule of :mod:`nbdloop.engine.contention`
with samples :class:`Watch` reads from /proc, and moves the pool to the
other CPUs (or spreads it over every allowed one) when it waits for a CPU
while another idles (the client crowds its own); ``--placement irq`` keeps
it fixed.
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


# ---- the adaptive rule: its samples, and the thread that feeds it ------------------

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


def thread_times(schedstat: str) -> tuple[int, int]:
    """(ns run, ns waited for a CPU) of one thread, from its /proc/.../schedstat."""
    run, wait, _ = schedstat.split()
    return int(run), int(wait)


def thread_switches(status: str) -> tuple[int, int]:
    """(context switches, of them involuntary) of one thread, from its
    /proc/.../status; (0, 0) where the kernel does not say."""
    counts = {}
    for line in status.splitlines():
        name, _, value = line.partition(":")
        if name in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"):
            counts[name] = int(value)
    if len(counts) != 2:
        return 0, 0
    preempted = counts["nonvoluntary_ctxt_switches"]
    return counts["voluntary_ctxt_switches"] + preempted, preempted


#: Each thread's (tid, ns run, ns waited, switches, of them involuntary),
#: and each CPU's (busy, idle) clock ticks.
Times = tuple[list[tuple[int, int, int, int, int]], dict[int, tuple[int, int]]]


def read_times(pid: int | str = "self", proc: Path = Path("/proc")) -> Times:
    """What :func:`nbdloop.engine.uring.sample_times` reads, read from
    Python, for a process other than this one (scripts/record-contention.py
    records a server's samples from outside)."""
    threads = []
    tasks = proc / str(pid) / "task"
    for name in os.listdir(tasks):
        try:
            run, wait = thread_times((tasks / name / "schedstat").read_text())
            switches, preempted = thread_switches((tasks / name / "status").read_text())
        except (OSError, ValueError):
            continue            # the thread has just ended
        threads.append((int(name), run, wait, switches, preempted))
    return threads, cpu_times((proc / "stat").read_text())


class Watch:
    """The samples the contention rule is fed: the process's threads' run
    time, run delay and context switches (how many of them preemptions),
    and each allowed CPU's busy share, as differences between two reads of
    ``read`` (default :func:`nbdloop.engine.uring.sample_times`: this
    process, read without holding the GIL)."""

    def __init__(self, cpus: set[int], read: Callable[[], Times] | None = None) -> None:
        self.cpus = frozenset(cpus)
        if read is None:
            from nbdloop.engine import uring
            read = uring.sample_times
        self._read = read
        self._threads: dict[int, tuple[int, int, int, int]] = {}
        self._cpus: dict[int, tuple[int, int]] = {}
        self._when: float | None = None

    def sample(self, now: float) -> Sample | None:
        """What happened since the last call (None at the first)."""
        threads, times = self._read()
        run = wait = 0.0
        switches = preempted = 0
        seen = {}
        for tid, r, w, n, p in threads:
            r0, w0, n0, p0 = self._threads.get(tid, (r, w, n, p))
            seen[tid] = (r, w, n, p)
            run += (r - r0) / 1e9
            wait += (w - w0) / 1e9
            switches += n - n0
            preempted += p - p0
        self._threads = seen
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
        return Sample(seconds=seconds, run=run, wait=wait, busy=busy,
                      switches=switches, preempted=preempted)


class Adaptive:
    """The contention rule at work in the server: a thread of its own takes
    a sample every ``interval`` seconds, feeds the rule and, if the rule
    says so, gives the engine the pool's new CPUs.  Nothing of it runs per
    request: the request count is the engine's own counter, and the thread
    holds the GIL only to do the arithmetic (the reading is one C call
    without it).  While no request comes it reads only that counter, and
    the first sample after a pause starts afresh: one that spanned the
    pause would count the load as light and delay the rule by a sample."""

    def __init__(self, where: Placement, apply: Callable[[set[int], set[int]], None],
                 log: Callable[[str], None], requests: Callable[[], int], *,
                 interval: float = 0.15,
                 watch: Watch | None = None, **rule) -> None:
        self.where = where
        self.rule = Rule(home=where.busy, allowed=where.idle, **rule)
        self.watch = watch or Watch(set(where.idle))
        self._apply = apply
        self._log = log
        self._requests = requests
        self._interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="nbdloop-placement",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        counted = self._requests()
        paused = True
        while not self._stop.wait(self._interval):
            if paused and self._requests() == counted:
                continue
            now = time.monotonic()
            sample = self.watch.sample(now)
            count = self._requests()
            requests, counted = count - counted, count
            if paused:
                paused = False      # the sample is only the new baseline
                continue
            if sample is not None:
                self.step(now, dataclasses.replace(sample, requests=requests))
            paused = requests == 0

    def step(self, now: float, sample: Sample) -> None:
        """Feed one sample to the rule and act on its answer."""
        cpus = self.rule.feed(now, sample)
        if cpus is not None:
            self._apply(set(cpus), set(self.where.idle))
            self._log(f"workers {self.rule.state}: CPU {format_cpu_list(cpus)} under load: "
                      f"{self.rule.changes[-1][2]} (the pool waited "
                      f"{sample.waiting():.0%} of its time, preempted in "
                      f"{sample.preemptions():.0%} of its switches, "
                      f"{sample.rate():.0f} requests/s)")
