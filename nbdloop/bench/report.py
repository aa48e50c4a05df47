"""The benchmark's report: results.json, results.md (tables of medians,
ratios, latency and CPU; the durability table) and the charts."""
from __future__ import annotations

import json
import statistics
from dataclasses import asdict
from pathlib import Path

from nbdloop.bench.durability import Durability, PhaseResult
from nbdloop.bench.run import (
    NULL_PEER,
    Campaign,
    Footprint,
    Workload,
    medians,
    ratios,
    results_json,
    spread,
)
from nbdloop.sizes import format_size


def unit(w: Workload) -> str:
    return "MiB/s" if w.bs.upper().endswith("M") else "IOPS"


def _range(t: tuple[float, float, float] | None, digits: int, bold: bool = False) -> str:
    """A median with its min-max in brackets, or "-"."""
    if t is None:
        return "-"
    med = f"**{t[0]:.{digits}f}**" if bold else f"{t[0]:.{digits}f}"
    return f"{med} ({t[1]:.{digits}f}-{t[2]:.{digits}f})"


def _cpu_per_gib(campaign: Campaign, names: list[str]) -> list[str]:
    """The 1M workloads' throughput beside the server's CPU seconds per GiB,
    a subject a row, each figure a median with its range over rounds."""
    big = [w for w in campaign.workloads if unit(w) == "MiB/s"]
    if not big:
        return []
    lines = ["", "1M workloads: MiB/s and the server's CPU seconds per GiB moved, medians "
             "(min-max over rounds); - where there is none (no server process, or no run "
             "succeeded).  "
             f"{NULL_PEER} serves no disk: its CPU is the NBD protocol's floor.", "",
             "| subject | " + " | ".join(f"{w.label} MiB/s | server CPU s/GiB" for w in big)
             + " |", "|---|" + "---|---|" * len(big)]
    for n in names:
        cells = []
        for w in big:
            cells += [_range(spread(campaign, n, w, "mib_s"), 0),
                      _range(spread(campaign, n, w, "cpu_s_per_gib"), 2)]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return lines


def markdown(campaign: Campaign, footprints: list[Footprint], skipped: dict[str, str]) -> str:
    names = [s.name for s in campaign.subjects]
    intro = (f"Medians of {campaign.rounds} interleaved round(s) (subject order reversed every "
             f"other round), {campaign.runtime:g} s each after an unrecorded {campaign.warmup:g} s "
             f"warm-up; fio on CPUs {campaign.client_cpus or 'chosen by the scheduler'}; "
             f"image {campaign.size >> 20} MiB.  Ratios are medians of per-round ratios "
             "(min-max in brackets).")
    lines = [intro, ""]
    steals = [r for r in campaign.results if r.steal is not None and not r.error]
    if steals:
        worst = max(steals, key=lambda r: r.steal)
        lines += [f"Steal, the share of the machine's CPU time its hypervisor gave to others: "
                  f"median {100 * statistics.median(r.steal for r in steals):.1f} % of a run, "
                  f"at most {100 * worst.steal:.1f} % ({worst.subject}, {worst.workload}, "
                  f"round {worst.round + 1}).  Ratios from runs that lost much of it say "
                  "little.", ""]
    lines.append("| workload | " + " | ".join(names) + " |")
    lines.append("|---|" + "---|" * len(names))
    for w in campaign.workloads:
        cells = []
        for n in names:
            m = medians(campaign, n, w)
            cells.append(f"{m['metric']:.0f}" if m else "failed")
        lines.append(f"| {w.label} ({unit(w)}) | " + " | ".join(cells) + " |")
    lines += _cpu_per_gib(campaign, names)
    for d in [n for n in names if n.startswith("nbdloop-direct")]:
        # A server with no disk is a floor, not a peer: no ratios to it.
        others = [n for n in names if n not in (d, NULL_PEER)]
        if not others:
            continue
        lines += ["", f"Ratios, {d} / peer:", "",
                  "| workload | " + " | ".join(others) + " |",
                  "|---|" + "---|" * len(others)]
        rat = {o: ratios(campaign, d, o) for o in others}
        for w in campaign.workloads:
            cells = [_range(rat[o][w.name], 2, bold=True) for o in others]
            lines.append(f"| {w.label} | " + " | ".join(cells) + " |")
    legend = ("Latency (mean / p99, microseconds), CPU seconds per GiB moved (the "
              "server's own, and the whole machine's: client, server and interrupts), "
              "and the image's page-cache footprint after the run:")
    head = ("| workload | subject | mean | p99 | server CPU s/GiB | machine CPU s/GiB "
            "| page cache |")
    lines += ["", legend, "", head, "|---|---|---|---|---|---|---|"]
    for w in campaign.workloads:
        for n in names:
            m = medians(campaign, n, w)
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
        moved = footprints[0].bytes_moved >> 20
        lines += ["", f"Page cache after writing then reading {moved} MiB:", "",
                  "| subject | page cache | of the bytes moved |", "|---|---|---|"]
        for f in footprints:
            lines.append(f"| {f.subject} | {f.cache_bytes / (1 << 20):.1f} MiB | "
                         f"{f.percent:.1f}% |")
    if skipped:
        lines += ["", "Skipped: " + "; ".join(f"{k}: {v}" for k, v in skipped.items())]
    errors = [r for r in campaign.results if r.error]
    if errors:
        lines += ["", "Failed runs:"] + [f"- {r.subject} {r.workload} round {r.round + 1}: "
                                         f"{r.error}" for r in errors]
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def charts(campaign: Campaign, footprints: list[Footprint], out: Path) -> list[Path]:
    """throughput.png (one panel per workload) and footprint.png."""
    plt = _pyplot()

    names = [s.name for s in campaign.subjects]
    paths = []
    n = len(campaign.workloads)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, w in enumerate(campaign.workloads):
        ax = axes[i // cols][i % cols]
        meds, lo, hi = [], [], []
        for nme in names:
            m = medians(campaign, nme, w)
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


# ---- durability ---------------------------------------------------------------------

SUBJECT_LABELS = {"control-pwrite": "control: pwrite",
                  "control-odirect": "control: O_DIRECT pwrite"}
PHASE_LABELS = {"fua": "FUA", "flush": "then FLUSH"}


def _phase_label(p: PhaseResult) -> str:
    label = PHASE_LABELS.get(p.phase, p.phase.upper())
    return f"{label}, QD{p.depth}" if p.phase in PHASE_LABELS else label


def _bytes(n: int | None) -> str:
    return "-" if n is None else ("0" if n == 0 else format_size(n))


def _landed(p: PhaseResult) -> str:
    """When the phase's writes were found on the device, after their
    acknowledgement."""
    if not p.observed:
        return "-"
    if not p.missing_at_ack:
        return "at ack"
    if p.landed_after is None:
        return "none"
    lo, hi = p.landed_after
    span = f"{lo:.1f} s" if f"{lo:.1f}" == f"{hi:.1f}" else f"{lo:.1f}-{hi:.1f} s"
    return span + (" (not all)" if p.missing_at_end else "")


def durability_markdown(d: Durability) -> str:
    if d.error:
        return f"Durability: the measurement failed: {d.error}\n"
    counts = d.phases[0].sizes if d.phases else {}
    mix = ", ".join(f"{n} of {format_size(int(size))}" for size, n in counts.items())
    flusher = ""
    if d.dirty_expire_centisecs is not None:
        flusher = (f"  The kernel writes back a dirty page after "
                   f"{d.dirty_expire_centisecs / 100:g} s (dirty_expire_centisecs), "
                   f"looking every {(d.dirty_writeback_centisecs or 0) / 100:g} s "
                   "(dirty_writeback_centisecs).")
    intro = (f"Durability: bytes of acknowledged writes not yet on the block device under "
             f"the image ({d.filesystem} on {d.device}, a loop device with direct I/O, read "
             "with O_DIRECT at the image's FIEMAP offsets), each write probed at its "
             f"acknowledgement; the QD1 and QD32 writes then every {d.interval:g} s until "
             f"the last landed, for at most {d.window:g} s.  {d.writes_per_phase} writes a "
             f"phase ({mix}), each at its own offset.{flusher}")
    head = ("| subject | phase | writes | bytes | not on the device at ack | on the device "
            f"after ack | not there after {d.window:g} s | before FLUSH | after FLUSH |")
    lines = [intro, "", head, "|---|---|---|---|---|---|---|---|---|"]
    for p in d.phases:
        at_ack = _bytes(p.missing_at_ack)
        if p.missing_at_ack:
            at_ack += f" ({p.writes_missing_at_ack} writes)"
        lines.append(f"| {SUBJECT_LABELS.get(p.subject, p.subject)} | {_phase_label(p)} | "
                     f"{p.writes} | {format_size(p.bytes)} | {at_ack} | {_landed(p)} | "
                     f"{_bytes(p.missing_at_end)} | {_bytes(p.missing_before_flush)} | "
                     f"{_bytes(p.missing_after_flush)} |")
    late = [p for p in d.phases if p.missing_at_end]
    if late:
        lines += ["", f"Not on the device when the {d.window:g} s window ended: " + "; ".join(
            f"{SUBJECT_LABELS.get(p.subject, p.subject)} {_phase_label(p)}: "
            f"{_bytes(p.missing_at_end)} of {p.writes_missing_at_end} writes" for p in late)
            + "."]
    return "\n".join(lines) + "\n"


def durability_chart(d: Durability, out: Path) -> Path:
    """durability.png: bytes at risk against seconds since acknowledgement,
    one panel per mode (and one for the control)."""
    plt = _pyplot()
    groups: dict[str, list[PhaseResult]] = {}
    for p in d.phases:
        if p.observed:
            group = "control (no server)" if p.subject.startswith("control") else p.subject
            groups.setdefault(group, []).append(p)
    cols = max(1, len(groups))
    fig, axes = plt.subplots(1, cols, figsize=(4.4 * cols, 3.6), sharey=True, squeeze=False)
    end = max(d.window, 1.0)
    for ax, (group, phases) in zip(axes[0], groups.items()):
        # Wide solid under thin dashed: the phases often land together.
        for i, p in enumerate(phases):
            label = (SUBJECT_LABELS.get(p.subject, p.subject) if group.startswith("control")
                     else _phase_label(p))
            xs = [t for t, _ in p.samples]
            ys = [b / (1 << 20) for _, b in p.samples]
            if ys[-1] == 0:         # landed writes stay landed
                xs.append(end)
                ys.append(0)
            ax.step(xs, ys, where="post", label=label, linewidth=4 if i == 0 else 1.5,
                    alpha=0.5 if i == 0 else 1.0, linestyle="-" if i == 0 else "--")
        if d.dirty_expire_centisecs:
            ax.axvline(d.dirty_expire_centisecs / 100, color="grey", linestyle=":",
                       linewidth=1, label="dirty_expire_centisecs")
        if not any(p.missing_at_ack for p in phases):
            ax.text(0.5, 0.5, "every write on the device\nwhen acknowledged",
                    transform=ax.transAxes, ha="center", va="center", fontsize=9,
                    bbox={"facecolor": "white", "edgecolor": "none"})
        ax.set_title(group, fontsize=10)
        ax.set_xlabel("seconds since acknowledgement")
        ax.set_xlim(0, end)
        ax.legend(fontsize=7, loc="upper right")
    axes[0][0].set_ylabel("MiB not yet on the block device")
    fig.suptitle("Acknowledged writes not yet on the block device under the image")
    fig.tight_layout()
    path = out / "durability.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_reports(campaign: Campaign | None, footprints: list[Footprint],
                  skipped: dict[str, str], out: Path, meta: dict,
                  durability: Durability | None = None) -> list[Path]:
    """results.json, results.md and the charts of the fio campaign, of the
    durability measurement, or of both."""
    out.mkdir(parents=True, exist_ok=True)
    data: dict = {}
    md = ""
    if campaign is not None:
        data = results_json(campaign)
    data.update(meta)
    data["skipped"] = skipped
    if campaign is not None:
        data["footprint"] = [asdict(f) | {"percent": f.percent} for f in footprints]
        data["summary"] = {
            w.name: {s.name: medians(campaign, s.name, w) for s in campaign.subjects}
            for w in campaign.workloads}
        for d in [s.name for s in campaign.subjects if s.name.startswith("nbdloop-direct")]:
            key = "ratios" if d == "nbdloop-direct" else f"ratios:{d}"
            data[key] = {s.name: ratios(campaign, d, s.name)
                         for s in campaign.subjects if s.name not in (d, NULL_PEER)}
        md = markdown(campaign, footprints, skipped)
    elif skipped:
        md = "Skipped: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()) + "\n"
    if durability is not None:
        data["durability"] = asdict(durability)
        md += ("\n" if md else "") + durability_markdown(durability)
    paths = [out / "results.json", out / "results.md"]
    paths[0].write_text(json.dumps(data, indent=2) + "\n")
    paths[1].write_text(md)
    if campaign is not None:
        paths += charts(campaign, footprints, out)
    if durability is not None and not durability.error:
        paths.append(durability_chart(durability, out))
    return paths
