"""Benchmark nbdloop against its peers with fio, in interleaved rounds.

Every subject (nbdloop direct/buffered, qemu-nbd, nbdkit's file plugin,
nbdkit's null plugin, the kernel loop device with direct I/O, the raw file)
is measured in the same invocation, round by round (A B C ... A B C ...),
so that drift on a noisy machine cancels.  Ratios are medians of
per-round ratios.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from nbdloop.serve import children as srv


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
    server_pids: tuple[int, ...] = ()   # whose CPU time to charge
    # Several jobs connect to these in turn (a server of several processes).
    uris: tuple[str, ...] = ()


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
    # Busy time of every CPU over the run: client, server,
    # interrupts and anything else running; the only CPU figure for subjects
    # without a server process (loop-dio, raw).
    machine_cpu_s: float | None = None
    machine_cpu_s_per_gib: float | None = None
    # The share of the machine's CPU time the hypervisor gave to others
    # during the run (steal): a run that lost much of it says little.
    steal: float | None = None


def _cpu_seconds(pids: tuple[int, ...]) -> float:
    """CPU seconds ``pids`` (all their threads) have used, user and system."""
    return sum(t.user + t.system for t in (psutil.Process(pid).cpu_times() for pid in pids))


def _machine_times() -> tuple[float, float, float]:
    """CPU seconds all CPUs have spent since boot: busy (user, nice, system,
    irq and softirq), stolen by the hypervisor, and in all."""
    t = psutil.cpu_times()
    busy = t.user + t.nice + t.system + t.irq + t.softirq
    return busy, t.steal, busy + t.steal + t.idle + t.iowait


def page_cache_bytes(path: str) -> int:
    """Bytes of ``path`` resident in the page cache, by util-linux's fincore
    (mincore(2) underneath)."""
    p = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", path],
                       capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"fincore {path}: {p.stderr.strip() or f'exit {p.returncode}'}")
    return int(p.stdout.strip())


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
    # In milliseconds: fio reads --runtime=0.5 as 0 seconds, 1.5 as 1.
    argv = ["fio", f"--name={w.name}", f"--rw={w.rw}", f"--bs={w.bs}",
            f"--iodepth={w.iodepth}", f"--numjobs={w.numjobs}", "--group_reporting",
            f"--runtime={round(runtime * 1000)}ms", "--time_based", "--randrepeat=0",
            "--output-format=json", f"--output={out}"]
    if client_cpus:
        argv.append(f"--cpus_allowed={client_cpus}")
    if w.rwmixread is not None:
        argv.append(f"--rwmixread={w.rwmixread}")
    if w.region is not None:
        argv.append(f"--size={min(w.region, size)}")
    if t.uri is not None and len(t.uris) > 1 and w.numjobs > 1:
        # One job section each, so that job k connects to uris[k % n].
        argv = [a for a in argv if not a.startswith(("--name=", "--numjobs="))]
        argv.append("--ioengine=nbd")
        for k in range(w.numjobs):
            argv += [f"--name={w.name}", f"--uri={t.uris[k % len(t.uris)]}"]
            if w.rw.startswith("read"):
                argv.append(f"--offset={k * (size // w.numjobs)}")
        return argv
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
        p = subprocess.run(argv, capture_output=True, text=True, check=False,
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
                    placement: str | None = None, processes: int = 1, **kw) -> Subject:
    name = (f"nbdloop-{mode}" + (f"-cpu{cpus}" if cpus else "")
            + (f"-{placement}" if placement else "")
            + (f"-{processes}proc" if processes > 1 else ""))
    extra = (["--cpus", cpus] if cpus else []) + (["--placement", placement] if placement
                                                   else [])

    @contextlib.contextmanager
    def start() -> Iterator[Target]:
        s = srv.nbdloop_server(image, workdir, name=name, mode=mode, extra=extra,
                               processes=processes, **kw)
        with s:
            # nbdkit, not the supervisor
            yield Target(uri=s.uri, server_pids=tuple(s.server_pids), uris=tuple(s.uris))
    return Subject(name, "nbdloop", start, mode=mode)


def _peer_subject(name: str, server: Callable[[], srv.ServerProcess]) -> Subject:
    @contextlib.contextmanager
    def start() -> Iterator[Target]:
        with server() as s:
            yield Target(uri=s.uri, server_pids=(s.pid,))
    return Subject(name, "peer", start)


def qemu_nbd_subject(image: str, workdir: str) -> Subject:
    return _peer_subject("qemu-nbd", lambda: srv.qemu_nbd_server(image, workdir))


def nbdkit_file_subject(image: str, workdir: str) -> Subject:
    return _peer_subject("nbdkit-file", lambda: srv.nbdkit_file_server(image, workdir))


def nbdkit_null_subject(workdir: str, size: int) -> Subject:
    """nbdkit's null plugin, as big as the image: the NBD protocol alone
    (reads return zeros, writes are dropped; fio_argv asks fio to verify
    nothing), the floor for a server's CPU per GiB.  It runs every
    workload, as it costs a few seconds each and is the floor for 4K
    requests too; only its ratios mean nothing (no disk), so the report
    leaves it out of them."""
    return _peer_subject(NULL_PEER, lambda: srv.nbdkit_null_server(size, workdir))


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
class Campaign:
    image: str
    subjects: list[Subject]
    workloads: list[Workload]
    rounds: int
    runtime: float
    size: int
    # An unrecorded run of the same workload before each measured one, so that
    # no subject is measured cold (fresh threads, rings, caches) and none pays
    # for what the previous subject left behind (docs/decisions.md, "Measuring",
    # has what that cost).
    warmup: float = 1.0
    # fio's CPUs ("1", "0-3"), or None to leave the client to the scheduler.
    # On a small machine where the client shares CPUs with the server, where
    # the scheduler puts it moves the results more than anything the servers
    # do (docs/benchmarks.md, "Where the client runs").
    client_cpus: str | None = None
    results: list[RunResult] = field(default_factory=list)


def run(campaign: Campaign,
        progress: Callable[[int, str], None] = lambda done, what: None) -> None:
    """Measure every subject on every workload, interleaved by round: A B C
    in even rounds and C B A in odd ones, so that no subject always runs
    right after another's workload.  ``progress(runs done, the next run)``
    before each run."""
    for rnd in range(campaign.rounds):
        order = campaign.subjects if rnd % 2 == 0 else campaign.subjects[::-1]
        for w in campaign.workloads:
            for subj in order:
                progress(len(campaign.results),
                         f"round {rnd + 1}/{campaign.rounds} {w.label} on {subj.name}")
                campaign.results.append(measure(campaign, subj, w, rnd))


def measure(campaign: Campaign, subj: Subject, w: Workload, rnd: int) -> RunResult:
    drop_image_cache(campaign.image)
    try:
        with subj.start() as target:
            if campaign.warmup > 0:
                run_fio(w, target, campaign.warmup, campaign.size, campaign.client_cpus)
            busy0, steal0, all0 = _machine_times()
            cpu0 = _cpu_seconds(target.server_pids) if target.server_pids else None
            job = run_fio(w, target, campaign.runtime, campaign.size,
                          campaign.client_cpus)["jobs"][0]
            cpu1 = _cpu_seconds(target.server_pids) if target.server_pids else None
            busy1, steal1, all1 = _machine_times()
            cache = page_cache_bytes(campaign.image)
    except Exception as e:  # noqa: BLE001 - a failed run is recorded, not fatal
        return RunResult(subj.name, w.name, rnd, 0, 0, 0, 0, None, None, 0, None,
                         error=str(e).splitlines()[0] if str(e) else type(e).__name__)
    iops, mib, lat, p99, gib = summarize(job)
    cpu = (cpu1 - cpu0) if cpu0 is not None and cpu1 is not None else None
    busy = busy1 - busy0
    return RunResult(subj.name, w.name, rnd, iops, mib, lat, p99, cpu,
                     (cpu / gib) if cpu is not None and gib else None, gib, cache,
                     machine_cpu_s=busy, machine_cpu_s_per_gib=busy / gib if gib else None,
                     steal=(steal1 - steal0) / (all1 - all0) if all1 > all0 else None)


def metric(r: RunResult, w: Workload) -> float:
    """The figure that ratios compare: MiB/s for 1M workloads, else IOPS."""
    return r.mib_s if w.bs.upper().endswith("M") else r.iops


def ratios(campaign: Campaign, a: str, b: str) -> dict[str, tuple[float, float, float] | None]:
    """Per workload: median, min and max over rounds of metric(a) / metric(b)."""
    out = {}
    for w in campaign.workloads:
        per_round = []
        for rnd in range(campaign.rounds):
            ra = [r for r in campaign.results if r.subject == a and r.workload == w.name
                  and r.round == rnd and not r.error]
            rb = [r for r in campaign.results if r.subject == b and r.workload == w.name
                  and r.round == rnd and not r.error]
            if ra and rb and metric(rb[0], w) > 0:
                per_round.append(metric(ra[0], w) / metric(rb[0], w))
        out[w.name] = ((statistics.median(per_round), min(per_round), max(per_round))
                       if per_round else None)
    return out


def spread(campaign: Campaign, subject: str, w: Workload,
           attr: str) -> tuple[float, float, float] | None:
    """Median, min and max over rounds of ``attr`` of ``subject``'s runs of
    ``w`` that succeeded and have it; None if none has."""
    xs = [getattr(r, attr) for r in campaign.results if r.subject == subject
          and r.workload == w.name and not r.error and getattr(r, attr) is not None]
    return (statistics.median(xs), min(xs), max(xs)) if xs else None


def medians(campaign: Campaign, subject: str, w: Workload) -> dict | None:
    rs = [r for r in campaign.results if r.subject == subject and r.workload == w.name
          and not r.error]
    if not rs:
        return None
    vals = [metric(r, w) for r in rs]

    def med(attr):
        s = spread(campaign, subject, w, attr)
        return s[0] if s else None
    cpu = spread(campaign, subject, w, "cpu_s_per_gib")
    return {"metric": statistics.median(vals), "min": min(vals), "max": max(vals),
            "iops": med("iops"), "mib_s": med("mib_s"), "lat_mean_us": med("lat_mean_us"),
            "lat_p99_us": med("lat_p99_us"), "cpu_s_per_gib": med("cpu_s_per_gib"),
            "cpu_s_per_gib_range": list(cpu[1:]) if cpu else None,
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
        f.writelines(chunk for _ in range(size // len(chunk)))
        f.write(chunk[: size % len(chunk)])
        f.flush()
        os.fsync(f.fileno())


def results_json(campaign: Campaign) -> dict:
    return {"image": campaign.image, "size": campaign.size, "rounds": campaign.rounds,
            "runtime": campaign.runtime,
            "warmup": campaign.warmup,
            "client_cpus": campaign.client_cpus,
            "subjects": [s.name for s in campaign.subjects],
            "workloads": [asdict(w) for w in campaign.workloads],
            "runs": [asdict(r) for r in campaign.results]}


def have(tool: str, path: str | None = None) -> bool:
    """Whether ``tool`` is on ``path`` (default: $PATH)."""
    return shutil.which(tool, path=path) is not None


# ---- availability -------------------------------------------------------------------

NULL_PEER = "nbdkit-null"
PEERS = ("qemu-nbd", "nbdkit-file", NULL_PEER, "loop-dio", "raw")


def make_subjects(image: str, workdir: str, modes: list[str], peers: list[str],
                  pin: str | None = None, placements: tuple[str, ...] = (),
                  processes: int = 1) -> tuple[list[Subject], dict[str, str]]:
    """The subjects to measure, and the reason each skipped one was skipped.
    ``pin`` adds nbdloop direct mode run with ``--cpus pin``; each of
    ``placements`` adds it run with that ``--placement``; ``processes``
    (above 1) adds it run with that ``--processes``."""
    subjects: list[Subject] = []
    skipped: dict[str, str] = {}
    for m in modes:
        subjects.append(nbdloop_subject(image, workdir, m))
    if pin:
        subjects.append(nbdloop_subject(image, workdir, "direct", cpus=pin))
    for p in placements:
        subjects.append(nbdloop_subject(image, workdir, "direct", placement=p))
    if processes > 1:
        subjects.append(nbdloop_subject(image, workdir, "direct", processes=processes))
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
        elif p == NULL_PEER:
            if have("nbdkit"):
                subjects.append(nbdkit_null_subject(workdir, os.path.getsize(image)))
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
                p = subprocess.run(argv, capture_output=True, text=True, check=False,
                                   timeout=600)
                if p.returncode != 0:
                    raise RuntimeError(f"fio failed: {p.stderr.strip()[-200:]}")
        cache = page_cache_bytes(image)
    return Footprint(subj.name, nbytes, cache)


# ---- reports ------------------------------------------------------------------------
