"""The VM's guest scripts are real shell files: POSIX sh (busybox sh runs
them) that shellcheck passes, the same bytes on every run, with every
parameter passed as data in the payload.  No VM is booted here.
"""
from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT, require_tools

from nbdloop import paths, vm
from nbdloop.vm import assets, kernel_check

#: Every guest script: the VM's own, those of the e2e tests, and the demo's
#: steps (which run in the one-kernel VM where the host has no NBD driver).
SCRIPTS = sorted([*paths.GUEST_SCRIPTS.glob("*.sh"), *(ROOT / "tests/e2e/guest").glob("*.sh"),
                  ROOT / "scripts" / "demo-steps.sh"])


def nbd_args(*extra: str) -> list[str]:
    return ["nbd-client", vm.GUEST_SERVER_HOST, str(vm.GUEST_SERVER_PORT),
            vm.GUEST_NBD_DEVICE, *extra]


def test_the_guest_scripts_are_there() -> None:
    names = {p.name for p in SCRIPTS}
    assert {"init.sh", "kernel-check.sh"} <= names, SCRIPTS
    assert assets.INIT_SCRIPT.is_file() and kernel_check.KERNEL_CHECK_SCRIPT.is_file()


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shellcheck_passes(script: Path) -> None:
    """shellcheck in its POSIX sh dialect (busybox sh is an ash), at every
    severity, excluding nothing here: the one busybox extension the scripts
    use ($RANDOM, in tests/e2e/guest/crash.sh) is allowed by a directive on
    its line, with the reason."""
    require_tools("shellcheck")
    p = subprocess.run(["shellcheck", "-s", "sh", str(script)],
                       capture_output=True, text=True)
    assert p.returncode == 0, f"shellcheck {script}:\n{p.stdout}{p.stderr}"


def test_kernel_check_parameters_are_data_not_code() -> None:
    """Two checks that differ in every parameter: the script is the same
    bytes (the file's), and only the payload differs."""
    one = vm.kernel_check_script(nbd_args("-b", "4096"), "ext4", vm.make_files(1),
                                 expect_connections=1)
    two = vm.kernel_check_script(nbd_args("-b", "512", "-C", "2"), "xfs",
                                 vm.make_files(2, sizes=(3, 1 << 20)),
                                 device="/dev/nbd1", mountpoint="/mnt/it's here",
                                 expect_connections=None)
    assert one.script == two.script == kernel_check.KERNEL_CHECK_SCRIPT.read_text()
    assert set(one.params) == set(two.params)
    for name in one.params:
        assert one.params[name] != two.params[name], name
    assert one.params["kernel-check/nbd-client.argv"] == b"".join(
        f"{a}\n".encode() for a in nbd_args("-b", "4096"))
    assert two.params["kernel-check/mkfs.argv"] == b"mkfs.xfs\n-f\n-q\n/dev/nbd1\n"
    assert two.params["kernel-check/fsck.argv"] == b"xfs_repair\n-n\n/dev/nbd1\n"
    # The files go into the payload under their own names, as before.
    files = vm.make_files(1)
    assert {n: d for n, d in one.payload.items() if n not in one.params} == files
    sums = one.params["kernel-check/expected.sha256"].decode().splitlines()
    assert sums == [f"{hashlib.sha256(d).hexdigest()}  /mnt/{n}" for n, d in files.items()]
    assert one.params["kernel-check/files"].decode().splitlines() == list(files)


def test_kernel_check_rejects_a_file_named_like_its_parameters() -> None:
    with pytest.raises(ValueError, match="taken by the check's parameters"):
        vm.kernel_check_script(nbd_args(), "ext4", {"kernel-check/params": b"x"})
    with pytest.raises(ValueError, match="plain relative path"):
        vm.kernel_check_script(nbd_args(), "ext4", {"../x": b"x"})


@pytest.mark.parametrize("shell", ["sh", "busybox"])
def test_parameters_reach_the_script_unchanged(shell: str, tmp_path: Path) -> None:
    """Sourcing shell_assignments() and reading argv_lines() the way the
    guest scripts do gives back exactly the values, whatever they hold."""
    require_tools(shell)
    tricky = ["plain", "two words", "it's", '"$(touch pwned)"', "`id`", "a;b|c&d", "*",
              "back\\slash", "", " lead and trail ", "$HOME", "new\nline"]
    params = {f"V{i}": v for i, v in enumerate(tricky)}
    (tmp_path / "params").write_bytes(vm.shell_assignments(params))
    argv = [v for v in tricky if "\n" not in v]
    (tmp_path / "argv").write_bytes(vm.argv_lines(argv))
    names = " ".join(f'"${name}"' for name in params)
    script = f"""
. ./params
printf '%s\\0' {names}
set --
while IFS= read -r arg; do
    set -- "$@" "$arg"
done < ./argv
printf '%s\\0' "$#" "$@"
"""
    cmd = [shell, "-c", script] if shell == "sh" else [shell, "sh", "-c", script]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, check=True)
    out = p.stdout.decode().split("\0")[:-1]
    assert out[:len(params)] == tricky
    assert out[len(params)] == str(len(argv))
    assert out[len(params) + 1:] == argv
    assert sorted(x.name for x in tmp_path.iterdir()) == ["argv", "params"]   # nothing ran
    with pytest.raises(ValueError):
        vm.argv_lines(["new\nline"])
    with pytest.raises(ValueError):
        vm.shell_assignments({"lower": "x"})


def test_the_guest_scripts_speak_the_runners_protocol() -> None:
    """The shell files spell out what runner.py parses and provides."""
    init = assets.INIT_SCRIPT.read_text()
    check = kernel_check.KERNEL_CHECK_SCRIPT.read_text()
    assert f'echo "{vm.VERDICT_MARKER} $*"' in init
    assert f"export NBDLOOP_PAYLOAD={vm.GUEST_PAYLOAD_DIR}\n" in init
    assert f'echo "{vm.STEP_MARKER} $1"' in check
    for script in SCRIPTS:
        if "NBDLOOP-STEP:" in script.read_text():
            assert f"{vm.STEP_MARKER} $1" in script.read_text(), script


def test_init_sh_keys_the_asset_cache() -> None:
    """The cache entry's recipe holds the sha256 of init.sh's content, so a
    change to init.sh builds a new initramfs."""
    init = assets.INIT_SCRIPT.read_bytes()
    recipe = assets._recipe("linux-image-x", "1", {"busybox-static": "1"}, init)
    assert recipe["init"] == hashlib.sha256(init).hexdigest()
    other = assets._recipe("linux-image-x", "1", {"busybox-static": "1"}, init + b"\n")
    assert other != recipe


def test_shellcheck_is_in_setup() -> None:
    setup = (ROOT / "scripts/setup.sh").read_text()
    packages = setup.split('APT_PACKAGES="', 1)[1].split('"', 1)[0].split()
    assert "shellcheck" in packages
