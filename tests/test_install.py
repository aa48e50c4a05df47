"""make install, into a PREFIX of its own: the man pages (one per command,
made from the click definitions), bash completion (click's), the systemd
units (the daemon, its socket and the per-image template), which
systemd-analyze verify accepts, and the udev rule."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, require, require_tools, run
from nbdloop.cli.main import COMMANDS


@pytest.fixture(scope="module")
def prefix(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("prefix")
    run(["sh", str(ROOT / "scripts" / "install.sh")], env={**os.environ, "PREFIX": str(d)})
    return d


def test_nbdloop_is_on_the_prefix_path(prefix):
    exe = prefix / "bin" / "nbdloop"
    assert exe.is_symlink() and os.access(exe, os.X_OK)
    assert run([str(exe), "--version"]).stdout.startswith("nbdloop, version ")


def test_a_man_page_per_command_as_help_says(prefix):
    require_tools("man")
    mandir = prefix / "share" / "man" / "man1"
    assert sorted(p.name for p in mandir.iterdir()) == sorted(
        ["nbdloop.1"] + [f"nbdloop-{c}.1" for c in COMMANDS])
    env = {**os.environ, "MANPATH": str(prefix / "share" / "man"), "MANWIDTH": "100"}
    for command in COMMANDS:
        page = run(["man", f"nbdloop-{command}"], env=env).stdout
        assert f"nbdloop {command}" in page
    attach = run(["man", "nbdloop-attach"], env=env).stdout
    help_ = run([str(prefix / "bin" / "nbdloop"), "attach", "--help"]).stdout
    options = set(re.findall(r"^ +(?:-\w, )?(--[\w-]+)", help_, re.MULTILINE)) - {"--help"}
    assert len(options) > 15 and all(o in attach for o in options), \
        [o for o in options if o not in attach]


def test_bash_completion_completes_commands_and_options(prefix):
    require_tools("bash")
    script = prefix / "share" / "bash-completion" / "completions" / "nbdloop"
    nbdloop = prefix / "bin" / "nbdloop"

    def complete(*words: str) -> list[str]:
        p = run(["bash", "-c", f'source "{script}"; COMP_WORDS=({" ".join(words)}); '
                 f'COMP_CWORD={len(words) - 1}; _nbdloop_completion "{nbdloop}"; '
                 'printf "%s\\n" "${COMPREPLY[@]}"'],
                env={**os.environ, "PATH": f"{prefix / 'bin'}:{os.environ['PATH']}"})
        return p.stdout.split()

    assert complete("nbdloop", "at") == ["attach"]
    assert "--partscan" in complete("nbdloop", "attach", "--pa")
    assert complete("nbdloop", "list", "--assoc") == ["--associated"]


UNITS = ("nbdloop.service", "nbdloop.socket", "nbdloop@.service")


def unit_settings(path: Path) -> dict[str, list[str]]:
    """Each "Section.Key" of a unit file with its values in order (a key
    such as After= may repeat).  systemctl show needs systemd as PID 1, and
    systemd-analyze cat-config reads only systemd's own directories; verify
    (below) fails on a value that systemd cannot parse."""
    settings: dict[str, list[str]] = {}
    section = ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line.strip("[]")
        elif line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            settings.setdefault(f"{section}.{key}", []).append(value)
    return settings


@pytest.fixture(scope="module")
def unitdir(prefix) -> Path:
    return prefix / "lib" / "systemd" / "system"


def test_the_units_run_the_installed_nbdloop(prefix, unitdir):
    nbdloop = prefix / "bin" / "nbdloop"
    daemon = unit_settings(unitdir / "nbdloop.service")
    template = unit_settings(unitdir / "nbdloop@.service")
    assert daemon["Service.ExecStart"] == [f"{nbdloop} daemon --attach-table"]
    assert template["Service.ExecStart"] == [f"{nbdloop} attach --from-table %f"]
    assert template["Service.ExecStop"] == [f"{nbdloop} detach %f"]
    assert unit_settings(unitdir / "nbdloop.socket")["Socket.ListenSequentialPacket"] == \
        ["/run/nbdloop/control.sock"]
    for unit in UNITS:
        assert "@BINDIR@" not in (unitdir / unit).read_text(), unit


def test_stopping_the_daemon_leaves_the_servers(unitdir):
    """The devices outlive the daemon: systemd signals its main process
    only, never the servers in its cgroup."""
    daemon = unit_settings(unitdir / "nbdloop.service")
    assert daemon["Service.KillMode"] == ["process"]
    assert "shutdown.target" in daemon["Unit.Conflicts"]


def test_systemd_analyze_verifies_the_units(unitdir, tmp_path):
    """Together, as systemd loads them: the service requires the socket and
    the template wants the service.  verify also builds each unit's start
    transaction (a unit missing from it, or an ordering cycle in it, fails
    it) and checks that ExecStart's binary exists; it runs nothing, and
    needs no systemd as PID 1."""
    require_tools("systemd-analyze")
    for unit in UNITS[:2]:
        shutil.copy(unitdir / unit, tmp_path)
    # An instance, as systemctl enable makes it for /srv/disk.img.
    shutil.copy(unitdir / "nbdloop@.service", tmp_path / "nbdloop@srv-disk.img.service")
    units = [str(tmp_path / u) for u in
             ("nbdloop.service", "nbdloop.socket", "nbdloop@srv-disk.img.service")]
    p = subprocess.run(["systemd-analyze", "verify", "--man=no", *units],
                       capture_output=True, text=True)
    assert p.returncode == 0 and p.stderr == "", p.stderr


def test_the_units_documentation_is_installed(prefix, unitdir):
    """verify's own man check (off above) would run man on each
    Documentation= page; here each is one that make install wrote."""
    mandir = prefix / "share" / "man" / "man1"
    unwritten = set()
    for unit in UNITS:
        for doc in unit_settings(unitdir / unit)["Unit.Documentation"]:
            page = re.fullmatch(r"man:(nbdloop-([\w-]+))\(1\)", doc)
            assert page, f"{unit}: {doc}"
            if page[2] not in COMMANDS:
                unwritten.add(page[2])
            else:
                assert (mandir / f"{page[1]}.1").is_file(), f"{unit}: {doc}"
    if unwritten:
        pytest.skip("no man page for a command not written yet: "
                    + ", ".join(f"nbdloop {c}" for c in sorted(unwritten)))


RULE = "60-nbdloop.rules"


def test_the_udev_rule_is_installed_where_that_udev_reads(prefix):
    """A PREFIX other than /usr/local gets $PREFIX/lib/udev/rules.d, as
    /usr gets /usr/lib/udev/rules.d; /usr/local's goes to /etc/udev/rules.d,
    since udev reads nothing under /usr/local."""
    installed = prefix / "lib" / "udev" / "rules.d" / RULE
    assert installed.read_text() == (ROOT / "systemd" / RULE).read_text()


def test_the_hosts_rules_still_read_the_flags_the_rule_sets():
    """The variables the rule sets are the ones the host's rules test, under
    the names this udev, mdadm and lvm2 use (a rename upstream would leave
    the rule setting a flag nobody reads), and those rules run after it:
    udev runs /etc/udev/rules.d and /lib/udev/rules.d as one list sorted by
    name."""
    rules = Path("/lib/udev/rules.d")
    require((rules / "69-lvm.rules").is_file() and (rules / "64-md-raid-assembly.rules").is_file(),
            "lvm2 or mdadm not installed (run: make setup)")
    ours = (ROOT / "systemd" / RULE).read_text()
    read_by = {
        "UDEV_DISABLE_PERSISTENT_STORAGE_RULES_FLAG": "60-persistent-storage.rules",
        "SYSTEMD_READY": "64-md-raid-assembly.rules",
        "DM_UDEV_DISABLE_OTHER_RULES_FLAG": "69-lvm.rules",
    }
    assert "50-udev-default.rules" < RULE  # its GROUP="disk", overridden
    for flag, rule in read_by.items():
        assert RULE < rule
        assert f'ENV{{{flag}}}="' in ours, flag
        assert f"ENV{{{flag}}}==" in (rules / rule).read_text(), f"{rule} no longer tests {flag}"
    # Without blkid's ID_FS_TYPE, neither md nor lvm2 looks further.
    assert 'ENV{ID_FS_TYPE}=="linux_raid_member", GOTO="md_inc"' in \
        (rules / "64-md-raid-assembly.rules").read_text()
    assert 'ENV{ID_FS_TYPE}!="LVM2_member", GOTO="lvm_end"' in (rules / "69-lvm.rules").read_text()


def test_a_root_install_makes_the_group_nbdloop(prefix):
    """The socket unit's SocketGroup= and the rule's users: install.sh makes
    the system group when root runs it (the prefix fixture did)."""
    require(os.geteuid() == 0, "root (make install makes the group only as root)")
    assert run(["getent", "group", "nbdloop"]).stdout.startswith("nbdloop:")
