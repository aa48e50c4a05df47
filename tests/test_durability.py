"""`nbdloop bench --durability`: of acknowledged writes, how many bytes are
not yet on the block device under the image, per mode, beside a control
of plain pwrites.  No timing thresholds: what is asserted is what the
modes promise (direct: on the device when acknowledged; FUA and FLUSH:
on the device in both modes) and what the kernel cannot do within
milliseconds (write a buffered write back on its own)."""
from __future__ import annotations

import itertools
import json
import subprocess
from pathlib import Path

import pytest
from conftest import CLI, ROOT, require_root, require_tools, run_cli

from nbdloop.bench import durability
from nbdloop.extents import Extent

KiB, MiB = 1 << 10, 1 << 20
WRITES = 12
WINDOW = 2


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One measurement for the whole file: it takes a few windows."""
    require_root()
    require_tools(*durability.TOOLS)
    out = tmp_path_factory.mktemp("durability") / "out"
    p = run_cli("bench", "--durability", "--durability-writes", str(WRITES),
                "--durability-window", str(WINDOW), "--out", str(out), timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    data = json.loads((out / "results.json").read_text())
    phases = {(ph["subject"], ph["phase"]): ph for ph in data["durability"]["phases"]}
    return out, data, phases


def test_every_phase_was_measured(run):
    _, data, phases = run
    assert data["durability"]["error"] == ""
    subjects = ["nbdloop-direct", "nbdloop-buffered"]
    assert set(phases) == ({("control-pwrite", "qd1"), ("control-odirect", "qd1")}
                           | {(s, p) for s in subjects for p in ("qd1", "qd32", "fua", "flush")})
    for ph in phases.values():
        assert ph["writes"] == WRITES
        assert set(ph["sizes"]) == {str(4 * KiB), str(64 * KiB), str(MiB)}
        assert ph["bytes"] == sum(int(size) * n for size, n in ph["sizes"].items())
        assert ph["samples"][0] == [0.0, ph["missing_at_ack"]]
    assert phases["nbdloop-direct", "qd32"]["depth"] == 32
    assert phases["nbdloop-buffered", "fua"]["fua"]


def test_the_control_tells_buffered_from_direct(run):
    """A probe that read the image file, or the device through its page
    cache, would fail one of these two."""
    _, _, phases = run
    buffered, direct = phases["control-pwrite", "qd1"], phases["control-odirect", "qd1"]
    assert buffered["missing_at_ack"] > 0 and buffered["writes_missing_at_ack"] > 0
    assert direct["missing_at_ack"] == 0


@pytest.mark.parametrize("phase", ["qd1", "qd32"])
def test_direct_mode_writes_are_on_the_device_when_acknowledged(run, phase):
    ph = run[2]["nbdloop-direct", phase]
    assert ph["missing_at_ack"] == 0
    assert ph["observed"] and ph["missing_at_end"] == 0


@pytest.mark.parametrize("phase", ["qd1", "qd32"])
def test_buffered_mode_writes_are_not_yet_on_the_device(run, phase):
    ph = run[2]["nbdloop-buffered", phase]
    assert ph["missing_at_ack"] > 0
    assert ph["observed"]


@pytest.mark.parametrize("mode", ["direct", "buffered"])
def test_fua_and_flush_reach_the_device(run, mode):
    phases = run[2]
    assert phases[f"nbdloop-{mode}", "fua"]["missing_at_ack"] == 0
    flush = phases[f"nbdloop-{mode}", "flush"]
    assert flush["missing_after_flush"] == 0
    if mode == "buffered":       # so that the flush is what made the difference
        assert flush["missing_before_flush"] > 0


def test_the_report(run):
    out, data, phases = run
    md = (out / "results.md").read_text()
    assert "| subject | phase | writes | bytes | not on the device at ack |" in md
    assert "| nbdloop-buffered | QD1 | 12 |" in md
    assert "| control: O_DIRECT pwrite | QD1 | 12 |" in md
    late = [ph for ph in phases.values() if ph["missing_at_end"]]
    if late:
        assert f"Not on the device when the {WINDOW} s window ended" in md
    assert (out / "durability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"date", "command", "kernel", "durability"} <= set(data)


def test_the_scratch_is_gone(run):
    scratch = run[1]["durability"]["scratch"]
    assert scratch.startswith(durability.SCRATCH_PARENT + "/nbdloop-durability-")
    assert not Path(scratch).exists()
    attached = subprocess.run(["losetup", "-a"], check=True, capture_output=True,
                              text=True).stdout
    assert scratch not in attached, attached
    assert scratch not in Path("/proc/mounts").read_text()


def test_a_user_without_root_is_refused_in_one_line(tmp_path):
    require_root()          # to become someone else
    require_tools("setpriv")
    out = tmp_path / "out"
    p = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        *CLI, "bench", "--durability", "--out", str(out)],
                       check=False, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 1, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs root" in lines[0], p.stderr
    assert "Traceback" not in p.stderr
    assert not out.exists()


@pytest.mark.parametrize("args,phrase", [
    (["--modes", ""], "nothing to measure"),
    (["--modes", "sync"], "--modes"),
    (["--durability-window", "-1"], "--durability-window"),
    (["--durability-writes", "0"], "--durability-writes")])
def test_bad_options_are_refused_in_one_line(tmp_path, args, phrase):
    p = run_cli("bench", "--durability", *args, "--out", str(tmp_path / "out"), timeout=300)
    assert p.returncode == 2, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and phrase in lines[0], p.stderr
    assert not (tmp_path / "out").exists()


# ---- the pieces without a device ---------------------------------------------------

def test_writes_never_share_a_byte_and_carry_their_own_content():
    layout = durability.Layout(7, [Extent(0, 1 << 30, 1 << 30, 0)])
    writes = layout.writes(40) + layout.writes(40)
    spans = sorted((w.offset, w.offset + w.length) for w in writes)
    assert all(end <= nxt for (_, end), (nxt, _) in itertools.pairwise(spans))
    blocks = [w.data[b:b + durability.BLOCK] for w in writes
              for b in range(0, w.length, durability.BLOCK)]
    assert len(set(blocks)) == len(blocks)
    sizes = [w.length for w in writes[:40]]
    assert sizes.count(4 * KiB) > sizes.count(64 * KiB) > sizes.count(MiB) > 0


def test_a_write_is_placed_across_extents():
    w = durability.Write(1, 60 * KiB, bytes(8 * KiB))
    durability.place(w, [Extent(0, 1 * MiB, 64 * KiB, 0), Extent(64 * KiB, 5 * MiB, MiB, 0)])
    assert w.pieces == [(MiB + 60 * KiB, 0, 4 * KiB), (5 * MiB, 4 * KiB, 4 * KiB)]
    hole = durability.Write(2, 60 * KiB, bytes(8 * KiB))
    with pytest.raises(durability.DurabilityError, match="do not cover"):
        durability.place(hole, [Extent(0, MiB, 64 * KiB, 0)])
