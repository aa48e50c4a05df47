"""Benchmark nbdloop against its peers with fio, in interleaved rounds.

Every subject (nbdloop direct/buffered, qemu-nbd, nbdkit's file plugin, the
kernel loop device with direct I/O, the raw file) is measured in the same
invocation, round by round (A B C ... A B C ...), so that drift on a noisy
machine cancels.  Ratios are medians of per-round ratios.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nbdloop.serve import children as srv

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Workload:
    name: str
    rw: str
    bs: str
    iodepth: int
    numjobs: int = 1
    rwmixread: int | None = None
    region: int | None = None   # bytes of the image the workload touches

    @property
    def label(self) -> str:
        jobs = f" {self.numjobs}x" if self.numjobs > 1 else " "
        where = f" in {self.region >> 20}M" if self.region else ""
        return f"{self.bs} {self.rw}{jobs}QD{self.iodepth}{where}"


WORKLOADS = {w.name: w for w in [
    Workload("randread-4k-qd1", "randread", "4k", 1),
    Workload("randread-4k-qd32", "randread", "4k", 32),
    Workload("randwrite-4k-qd32", "randwrite", "4k", 32),
    Workload("randrw-4k-qd32", "randrw", "4k", 32, rwmixread=70),
    Workload("read-1m-qd8", "read", "1M", 8),
    Workload("write-1m-qd8", "write", "1M", 8),
    Workload("multiconn-4k-4x8", "randread", "4k", 8, numjobs=4),
    # A working set that fits in the page cache: buffered mode's home ground.
    Workload("cached-reread-4k-qd32", "randread", "4k", 32, region=256 << 20),
]}

DEFAULT_WORKLOADS = list(WORKLOADS)

QUICK_WORKLOADS = ["randread-4k-qd32", "randwrite-4k-qd32", "randread-4k-qd1",
                   "read-1m-qd8", "write-1m-qd8"]


@dataclass
class Target:
    """What fio runs against: an NBD URI (nbd engine) or a file/device
    (io_uring engine, O_DIRECT)."""
    uri: str | None = None
    filename: str | None = None
    server_pid: int | None = None   # whose CPU time to charge


@dataclass
class Subject:
    name: str
    kind: str          # "nbdloop", "peer"
    start: Callable[[], contextlib.AbstractContextManager[Target]]
    mode: str = ""


@dataclass
class RunResult:
    subject: str
    workload: str
    round: int
    iops: float
    mib_s: float
    lat_mean_us: float
    lat_p99_us: float
    server_cpu_s: float | None
    cpu_s_per_gib: float | None
    gib: float
    cache_bytes: int | None
    error: str = ""
    # Busy time of every CPU over the run (/proc/stat): client, server,
    # interrupts and anything else running; the only CPU figure for subjects
    # without a server process (loop-dio, raw).
    machine_cpu_s: float | None = None
    machine_cpu_s_per_gib: float | None = None


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _machine_busy_seconds() -> float:
    """CPU seconds all CPUs have spent busy since boot: user, nice, system,
    irq and softirq from /proc/stat (not idle, iowait or steal)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    user, nice, system, _idle, _iowait, irq, softirq = map(int, fields[1:8])
    return (user + nice + system + irq + softirq) / CLK_TCK


def page_cache_bytes(path: str) -> int:
    """Bytes of ``path`` resident in the page cache, by mmap + mincore(2)."""
    size = os.path.getsize(path)
    if size == 0:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    page = mmap.PAGESIZE
    resident = 0
    chunk = 1 << 30
    fd = os.open(path, os.O_RDONLY)
    try:
        for off in range(0, size, chunk):
            n = min(chunk, size - off)
            addr = libc.mmap(None, n, mmap.PROT_READ, mmap.MAP_SHARED, fd, off)
            if addr in (None, ctypes.c_void_p(-1).value):
                err = ctypes.get_errno()
                raise OSError(err, f"mmap of {path}: {os.strerror(err)}")
            try:
                vec = ctypes.create_string_buffer((n + page - 1) // page)
                if libc.mincore(addr, n, vec) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"mincore on {path}: {os.strerror(err)}")
                resident += sum(b & 1 for b in vec.raw)
            finally:
                libc.munmap(addr, n)
    finally:
        os.close(fd)
    return min(resident * page, size)


def drop_image_cache(path: str) -> None:
    """Evict ``path`` from the page cache so each run starts cold."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def fio_argv(w: Workload, t: Target, runtime: float, out: str, size: int,
             client_cpus: str | None = None) -> list[str]:
    argv = ["fio", f"--name={w.name}", f"--rw={w.rw}", f"--bs={w.bs}",
            f"--iodepth={w.iodepth}", f"--numjobs={w.numjobs}", "--group_reporting",
            f"--runtime={runtime}", "--time_based", "--randrepeat=0",
            "--output-format=json", f"--output={out}"]
    if client_cpus:
        argv.append(f"--cpus_allowed={client_cpus}")
    if w.rwmixread is not None:
        argv.append(f"--rwmixread={w.rwmixread}")
    if w.region is not None:
        argv.append(f"--size={min(w.region, size)}")
    if t.uri is not None:
        argv += ["--ioengine=nbd", f"--uri={t.uri}"]
    else:
        argv += ["--ioengine=io_uring", "--direct=1", f"--filename={t.filename}"]
        if w.region is None:
            argv.append(f"--size={size}")
    if w.numjobs > 1 and w.rw.startswith("read"):
        argv.append(f"--offset_increment={size // w.numjobs}")
    return argv


def run_fio(w: Workload, t: Target, runtime: float, size: int,
            client_cpus: str | None = None) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        argv = fio_argv(w, t, runtime, out.name, size, client_cpus)
        p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           timeout=runtime + 120)
        if p.returncode != 0:
            raise RuntimeError(f"fio failed ({p.returncode}): "
                               f"{(p.stderr or p.stdout).strip().splitlines()[-1:]}")
        return json.load(open(out.name))


def summarize(job: dict) -> tuple[float, float, float, float, float]:
    """IOPS, MiB/s, mean and p99 completion latency (us), GiB moved."""
    iops = mib = 0.0
    lat_sum = lat_n = 0.0
    p99 = 0.0
    gib = 0.0
    for d in ("read", "write"):
        s = job[d]
        if not s["io_bytes"]:
            continue
        iops += s["iops"]
        mib += s["bw_bytes"] / (1 << 20)
        gib += s["io_bytes"] / (1 << 30)
        lat = s["clat_ns"]
        lat_sum += lat["mean"] * s["total_ios"]
        lat_n += s["total_ios"]
        pct = lat.get("percentile", {})
        p99 = max(p99, pct.get("99.000000", 0.0))
    mean = lat_sum / lat_n if lat_n else 0.0
    return iops, mib, mean / 1000, p99 / 1000, gib


# ---- subjects --------------------------------------------------------------------

def nbdloop_subject(image: str, workdir: str, mode: str, cpus: str | None = None,
                    **kw) -> Subject:
    name = f"nbdloop-{mode}" + (f"-cpu{cpus}" if cpus else "")
    extra = ["--cpus", cpus] if cpus else []

    @contextlib.contextmanager
    def start() -> Iterator[Target]:
        s = srv.nbdloop_server(image, workdir, name=name, mode=mode, extra=extra, **kw)
        with s:
            yield Target(uri=s.uri, server_pid=s.server_pid)   # nbdkit, not the supervisor
    return Subject(name, "nbdloop", start, mode=mode)


def qemu_nbd_subject(image: str, workdir: str) -> Subject:
    @contextlib.contextmanager
    def start() -> Iterator[Target]:
        s = srv.qemu_nbd_server(image, workdir)
        with s:
            yield Target(uri=s.uri, server_pid=s.pid)
    return Subject("qemu-nbd", "peer", start)


def nbdkit_file_subject(image: str, workdir: str) -> Subject:
    @contextlib.contextmanager
    def start() -> Iterator[Target]:
        s = srv.nbdkit_file_server(image, workdir)
        with s:
            yield Target(uri=s.uri, server_pid=s.pid)
    return Subject("nbdkit-file", "peer", start)


def loop_dio_subject(image: str) -> Subject:
    @contextlib.contextmanager
    def start() -> Iterator[Target]:
        dev = subprocess.run(["losetup", "-f", "--show", "--direct-io=on", image],
                             check=True, capture_output=True, text=True).stdout.strip()
        try:
            yield Target(filename=dev)
        finally:
            subprocess.run(["losetup", "-d", dev], check=False)
    return Subject("loop-dio", "peer", start)


def raw_subject(image: str) -> Subject:
    @contextlib.contextmanager
    def start() -> Iterator[Target]:
        yield Target(filename=image)
    return Subject("raw", "peer", start)


# ---- the run ----------------------------------------------------------------------

@dataclass
class Plan:
    image: str
    subjects: list[Subject]
    workloads: list[Workload]
    rounds: int
    runtime: float
    size: int
    # An unrecorded run of the same workload before each measured one, so that
    # no subject is measured cold (fresh threads, rings, caches) and none pays
    # for what the previous subject left behind (measured: the first 1-3 s
    # after another server's 1M writes ran up to 40 % slower).
    warmup: float = 1.0
    # fio's CPUs ("1", "0-3"), or None to leave the client to the scheduler.
    # On a small machine where the client shares CPUs with the server, where
    # the scheduler puts it moves the results more than anything the servers
    # do (docs/BENCHMARKS.md, "Where the client runs").
    client_cpus: str | None = None
    results: list[RunResult] = field(default_factory=list)


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def run(plan: Plan, progress: Callable[[str], None] = lambda s: print(s, file=sys.stderr,
                                                                       flush=True)) -> None:
    """Measure every subject on every workload, interleaved by round: A B C
    in even rounds and C B A in odd ones, so that no subject always runs
    right after another's workload."""
    total = plan.rounds * len(plan.subjects) * len(plan.workloads)
    done = 0
    t0 = time.monotonic()
    for rnd in range(plan.rounds):
        order = plan.subjects if rnd % 2 == 0 else plan.subjects[::-1]
        for w in plan.workloads:
            for subj in order:
                elapsed = time.monotonic() - t0
                eta = (elapsed / done * (total - done) if done
                       else (plan.runtime + plan.warmup) * total)
                progress(f"[{done + 1}/{total}] round {rnd + 1}/{plan.rounds} {w.label:>22} "
                         f"on {subj.name:<16} (ETA {_fmt_eta(eta)})")
                plan.results.append(measure(plan, subj, w, rnd))
                done += 1


def measure(plan: Plan, subj: Subject, w: Workload, rnd: int) -> RunResult:
    drop_image_cache(plan.image)
    try:
        with subj.start() as target:
            if plan.warmup > 0:
                run_fio(w, target, plan.warmup, plan.size, plan.client_cpus)
            busy0 = _machine_busy_seconds()
            cpu0 = _cpu_seconds(target.server_pid) if target.server_pid else None
            job = run_fio(w, target, plan.runtime, plan.size, plan.client_cpus)["jobs"][0]
            cpu1 = _cpu_seconds(target.server_pid) if target.server_pid else None
            busy1 = _machine_busy_seconds()
            cache = page_cache_bytes(plan.image)
    except Exception as e:  # a failed run is recorded, not fatal
        return RunResult(subj.name, w.name, rnd, 0, 0, 0, 0, None, None, 0, None,
                         error=str(e).splitlines()[0] if str(e) else type(e).__name__)
    iops, mib, lat, p99, gib = summarize(job)
    cpu = (cpu1 - cpu0) if cpu0 is not None and cpu1 is not None else None
    busy = busy1 - busy0
    return RunResult(subj.name, w.name, rnd, iops, mib, lat, p99, cpu,
                     (cpu / gib) if cpu is not None and gib else None, gib, cache,
                     machine_cpu_s=busy, machine_cpu_s_per_gib=busy / gib if gib else None)


def metric(r: RunResult, w: Workload) -> float:
    """The figure that ratios compare: MiB/s for 1M workloads, else IOPS."""
    return r.mib_s if w.bs.upper().endswith("M") else r.iops


def ratios(plan: Plan, a: str, b: str) -> dict[str, tuple[float, float, float] | None]:
    """Per workload: median, min and max over rounds of metric(a) / metric(b)."""
    out = {}
    for w in plan.workloads:
        per_round = []
        for rnd in range(plan.rounds):
            ra = [r for r in plan.results if r.subject == a and r.workload == w.name
                  and r.round == rnd and not r.error]
            rb = [r for r in plan.results if r.subject == b and r.workload == w.name
                  and r.round == rnd and not r.error]
            if ra and rb and metric(rb[0], w) > 0:
                per_round.append(metric(ra[0], w) / metric(rb[0], w))
        out[w.name] = ((statistics.median(per_round), min(per_round), max(per_round))
                       if per_round else None)
    return out


def medians(plan: Plan, subject: str, w: Workload) -> dict | None:
    rs = [r for r in plan.results if r.subject == subject and r.workload == w.name
          and not r.error]
    if not rs:
        return None
    vals = [metric(r, w) for r in rs]

    def med(attr):
        xs = [getattr(r, attr) for r in rs if getattr(r, attr) is not None]
        return statistics.median(xs) if xs else None
    return {"metric": statistics.median(vals), "min": min(vals), "max": max(vals),
            "iops": med("iops"), "mib_s": med("mib_s"), "lat_mean_us": med("lat_mean_us"),
            "lat_p99_us": med("lat_p99_us"), "cpu_s_per_gib": med("cpu_s_per_gib"),
            "machine_cpu_s_per_gib": med("machine_cpu_s_per_gib"),
            "cache_bytes": med("cache_bytes")}


def prepare_image(path: str, size: int) -> None:
    """A fully written image of ``size`` bytes (reads of holes would flatter
    everyone), made once and reused."""
    p = Path(path)
    if p.exists() and p.stat().st_size == size and p.stat().st_blocks * 512 >= size:
        return
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size // len(chunk)):
            f.write(chunk)
        f.write(chunk[: size % len(chunk)])
        f.flush()
        os.fsync(f.fileno())


def results_json(plan: Plan) -> dict:
    return {"image": plan.image, "size": plan.size, "rounds": plan.rounds,
            "runtime": plan.runtime,
            "warmup": plan.warmup,
            "client_cpus": plan.client_cpus,
            "subjects": [s.name for s in plan.subjects],
            "workloads": [asdict(w) for w in plan.workloads],
            "runs": [asdict(r) for r in plan.results]}


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


# ---- availability -------------------------------------------------------------------

PEERS = ("qemu-nbd", "nbdkit-file", "loop-dio", "raw")


def make_subjects(image: str, workdir: str, modes: list[str], peers: list[str],
                  pin: str | None = None) -> tuple[list[Subject], dict[str, str]]:
    """The subjects to measure, and the reason each skipped one was skipped.
    ``pin`` adds nbdloop direct mode run with ``--cpus pin``."""
    subjects: list[Subject] = []
    skipped: dict[str, str] = {}
    for m in modes:
        subjects.append(nbdloop_subject(image, workdir, m))
    if pin:
        subjects.append(nbdloop_subject(image, workdir, "direct", cpus=pin))
    for p in peers:
        if p == "qemu-nbd":
            if have("qemu-nbd"):
                subjects.append(qemu_nbd_subject(image, workdir))
            else:
                skipped[p] = "qemu-nbd not installed (apt-get install qemu-utils)"
        elif p == "nbdkit-file":
            if have("nbdkit"):
                subjects.append(nbdkit_file_subject(image, workdir))
            else:
                skipped[p] = "nbdkit not installed"
        elif p == "loop-dio":
            if os.geteuid() != 0 or not have("losetup"):
                skipped[p] = "needs root and losetup"
            elif not Path("/dev/loop-control").exists():
                skipped[p] = "no loop driver (/dev/loop-control)"
            else:
                subjects.append(loop_dio_subject(image))
        elif p == "raw":
            subjects.append(raw_subject(image))
        else:
            raise ValueError(f"unknown peer {p!r} (choose from {', '.join(PEERS)})")
    return subjects, skipped


# ---- the page-cache footprint of a write-then-read ----------------------------------

@dataclass
class Footprint:
    subject: str
    bytes_moved: int
    cache_bytes: int

    @property
    def percent(self) -> float:
        return 100.0 * self.cache_bytes / self.bytes_moved if self.bytes_moved else 0.0


def footprint(subj: Subject, image: str, nbytes: int, size: int) -> Footprint:
    """Write ``nbytes`` then read them back (1M, QD8), and report how much of
    the image the page cache holds afterwards."""
    drop_image_cache(image)
    write = Workload("fp-write", "write", "1M", 8, region=nbytes)
    read = Workload("fp-read", "read", "1M", 8, region=nbytes)
    with subj.start() as target:
        for w in (write, read):
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                argv = fio_argv(w, target, 0, out.name, size)
                argv = [a for a in argv if not a.startswith(("--runtime", "--time_based"))]
                p = subprocess.run(argv, capture_output=True, text=True, timeout=600)
                if p.returncode != 0:
                    raise RuntimeError(f"fio failed: {p.stderr.strip()[-200:]}")
        cache = page_cache_bytes(image)
    return Footprint(subj.name, nbytes, cache)


# ---- reports ------------------------------------------------------------------------

def unit(w: Workload) -> str:
    return "MiB/s" if w.bs.upper().endswith("M") else "IOPS"


def markdown(plan: Plan, footprints: list[Footprint], skipped: dict[str, str]) -> str:
    names = [s.name for s in plan.subjects]
    lines = [f"Medians of {plan.rounds} interleaved round(s) (subject order reversed every "
             f"other round), {plan.runtime:g} s each after an unrecorded {plan.warmup:g} s "
             f"warm-up; fio on CPUs {plan.client_cpus or 'chosen by the scheduler'}; "
             f"image {plan.size >> 20} MiB.  Ratios are medians of per-round ratios "
             "(min-max in brackets).", ""]
    lines.append("| workload | " + " | ".join(names) + " |")
    lines.append("|---|" + "---|" * len(names))
    for w in plan.workloads:
        cells = []
        for n in names:
            m = medians(plan, n, w)
            cells.append(f"{m['metric']:.0f}" if m else "failed")
        lines.append(f"| {w.label} ({unit(w)}) | " + " | ".join(cells) + " |")
    for d in [n for n in names if n.startswith("nbdloop-direct")]:
        others = [n for n in names if n != d]
        lines += ["", f"Ratios, {d} / peer:", "",
                  "| workload | " + " | ".join(others) + " |",
                  "|---|" + "---|" * len(others)]
        rat = {o: ratios(plan, d, o) for o in others}
        for w in plan.workloads:
            cells = []
            for o in others:
                r = rat[o][w.name]
                cells.append(f"**{r[0]:.2f}** ({r[1]:.2f}-{r[2]:.2f})" if r else "-")
            lines.append(f"| {w.label} | " + " | ".join(cells) + " |")
    lines += ["", "Latency (mean / p99, microseconds), CPU seconds per GiB moved (the "
              "server's own, and the whole machine's: client, server and interrupts), "
              "and the image's page-cache footprint after the run:", "",
              "| workload | subject | mean | p99 | server CPU s/GiB | machine CPU s/GiB "
              "| page cache |",
              "|---|---|---|---|---|---|---|"]
    for w in plan.workloads:
        for n in names:
            m = medians(plan, n, w)
            if not m:
                continue
            cpu = f"{m['cpu_s_per_gib']:.2f}" if m["cpu_s_per_gib"] is not None else "-"
            mcpu = (f"{m['machine_cpu_s_per_gib']:.2f}"
                    if m["machine_cpu_s_per_gib"] is not None else "-")
            cache = (f"{m['cache_bytes'] / (1 << 20):.0f} MiB"
                     if m["cache_bytes"] is not None else "-")
            lines.append(f"| {w.label} | {n} | {m['lat_mean_us']:.0f} | "
                         f"{m['lat_p99_us']:.0f} | {cpu} | {mcpu} | {cache} |")
    if footprints:
        lines += ["", "Page cache after writing then reading "
                  f"{footprints[0].bytes_moved >> 20} MiB:", "",
                  "| subject | page cache | of the bytes moved |", "|---|---|---|"]
        for f in footprints:
            lines.append(f"| {f.subject} | {f.cache_bytes / (1 << 20):.1f} MiB | "
                         f"{f.percent:.1f}% |")
    if skipped:
        lines += ["", "Skipped: " + "; ".join(f"{k}: {v}" for k, v in skipped.items())]
    errors = [r for r in plan.results if r.error]
    if errors:
        lines += ["", "Failed runs:"] + [f"- {r.subject} {r.workload} round {r.round + 1}: "
                                         f"{r.error}" for r in errors]
    return "\n".join(lines) + "\n"


def charts(plan: Plan, footprints: list[Footprint], out: Path) -> list[Path]:
    """throughput.png (one panel per workload) and footprint.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s.name for s in plan.subjects]
    paths = []
    n = len(plan.workloads)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, w in enumerate(plan.workloads):
        ax = axes[i // cols][i % cols]
        meds, lo, hi = [], [], []
        for nme in names:
            m = medians(plan, nme, w)
            meds.append(m["metric"] if m else 0)
            lo.append(m["metric"] - m["min"] if m else 0)
            hi.append(m["max"] - m["metric"] if m else 0)
        ax.bar(range(len(names)), meds, yerr=[lo, hi], capsize=3,
               color=[colors[j % len(colors)] for j in range(len(names))])
        ax.set_title(w.label, fontsize=10)
        ax.set_ylabel(unit(w))
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
    for j in range(n, rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.suptitle("Throughput, median of rounds (bars: min-max)")
    fig.tight_layout()
    p = out / "throughput.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    fig, ax = plt.subplots(figsize=(6, 3.6))
    if footprints:
        ax.bar([f.subject for f in footprints], [f.percent for f in footprints],
               color=[colors[j % len(colors)] for j in range(len(footprints))])
        ax.set_ylabel(f"% of {footprints[0].bytes_moved >> 20} MiB in page cache")
        ax.set_title("Page cache after write + read")
        for j, f in enumerate(footprints):
            ax.text(j, f.percent, f"{f.percent:.1f}%", ha="center", va="bottom", fontsize=9)
        ax.set_ylim(0, 110)
    else:
        ax.text(0.5, 0.5, "no footprint measured", ha="center")
    ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    p = out / "footprint.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths


def write_reports(plan: Plan, footprints: list[Footprint], skipped: dict[str, str],
                  out: Path, meta: dict) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    data = results_json(plan)
    data.update(meta)
    data["skipped"] = skipped
    data["footprint"] = [asdict(f) | {"percent": f.percent} for f in footprints]
    data["summary"] = {
        w.name: {s.name: medians(plan, s.name, w) for s in plan.subjects}
        for w in plan.workloads}
    for d in [s.name for s in plan.subjects if s.name.startswith("nbdloop-direct")]:
        key = "ratios" if d == "nbdloop-direct" else f"ratios:{d}"
        data[key] = {s.name: ratios(plan, d, s.name) for s in plan.subjects if s.name != d}
    paths = [out / "results.json", out / "results.md"]
    paths[0].write_text(json.dumps(data, indent=2) + "\n")
    paths[1].write_text(markdown(plan, footprints, skipped))
    paths += charts(plan, footprints, out)
    return paths
