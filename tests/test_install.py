"""make install, into a PREFIX of its own: the man pages (one per command,
made from the click definitions), bash completion (click's), and the systemd
unit nbdloop@.service, which systemd-analyze verify accepts.  The unit's
commands run in the one-kernel VM (tests/e2e/guest/attach.sh)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, require_tools, run
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


def test_systemd_analyze_verifies_the_unit(prefix, tmp_path):
    require_tools("systemd-analyze")
    unit = prefix / "lib" / "systemd" / "system" / "nbdloop@.service"
    text = unit.read_text()
    assert f"ExecStart={prefix}/bin/nbdloop attach --foreground --from-table %f" in text
    assert "@BINDIR@" not in text
    # An instance, as systemctl enable makes it for /srv/disk.img.
    instance = tmp_path / "nbdloop@srv-disk.img.service"
    shutil.copy(unit, instance)
    p = subprocess.run(["systemd-analyze", "verify", str(instance)], capture_output=True,
                       text=True, env={**os.environ, "MANPATH": str(prefix / "share" / "man")})
    assert p.returncode == 0 and p.stderr == "", p.stderr
