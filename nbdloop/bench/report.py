"""The benchmark's report: results.json, results.md (tables of medians,
ratios, latency and CPU) and the charts."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from nbdloop.bench.run import Campaign, Footprint, Workload, medians, ratios, results_json


def unit(w: Workload) -> str:
    return "MiB/s" if w.bs.upper().endswith("M") else "IOPS"


def markdown(campaign: Campaign, footprints: list[Footprint], skipped: dict[str, str]) -> str:
    names = [s.name for s in campaign.subjects]
    lines = [f"Medians of {campaign.rounds} interleaved round(s) (subject order reversed every "
             f"other round), {campaign.runtime:g} s each after an unrecorded {campaign.warmup:g} s "
             f"warm-up; fio on CPUs {campaign.client_cpus or 'chosen by the scheduler'}; "
             f"image {campaign.size >> 20} MiB.  Ratios are medians of per-round ratios "
             "(min-max in brackets).", ""]
    lines.append("| workload | " + " | ".join(names) + " |")
    lines.append("|---|" + "---|" * len(names))
    for w in campaign.workloads:
        cells = []
        for n in names:
            m = medians(campaign, n, w)
            cells.append(f"{m['metric']:.0f}" if m else "failed")
        lines.append(f"| {w.label} ({unit(w)}) | " + " | ".join(cells) + " |")
    for d in [n for n in names if n.startswith("nbdloop-direct")]:
        others = [n for n in names if n != d]
        lines += ["", f"Ratios, {d} / peer:", "",
                  "| workload | " + " | ".join(others) + " |",
                  "|---|" + "---|" * len(others)]
        rat = {o: ratios(campaign, d, o) for o in others}
        for w in campaign.workloads:
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
        lines += ["", "Page cache after writing then reading "
                  f"{footprints[0].bytes_moved >> 20} MiB:", "",
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


def charts(campaign: Campaign, footprints: list[Footprint], out: Path) -> list[Path]:
    """throughput.png (one panel per workload) and footprint.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def write_reports(campaign: Campaign, footprints: list[Footprint], skipped: dict[str, str],
                  out: Path, meta: dict) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    data = results_json(campaign)
    data.update(meta)
    data["skipped"] = skipped
    data["footprint"] = [asdict(f) | {"percent": f.percent} for f in footprints]
    data["summary"] = {
        w.name: {s.name: medians(campaign, s.name, w) for s in campaign.subjects}
        for w in campaign.workloads}
    for d in [s.name for s in campaign.subjects if s.name.startswith("nbdloop-direct")]:
        key = "ratios" if d == "nbdloop-direct" else f"ratios:{d}"
        data[key] = {s.name: ratios(campaign, d, s.name) for s in campaign.subjects if s.name != d}
    paths = [out / "results.json", out / "results.md"]
    paths[0].write_text(json.dumps(data, indent=2) + "\n")
    paths[1].write_text(markdown(campaign, footprints, skipped))
    paths += charts(campaign, footprints, out)
    return paths
