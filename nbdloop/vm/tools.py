"""VmError, and finding and running the host tools that build and boot the VM.

Standard library and :mod:`nbdloop.paths` only.
"""
from __future__ import annotations

import shlex
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from nbdloop.paths import SBIN_PATH


class VmError(RuntimeError):
    """The VM cannot be built or started: a tool or package is missing."""

    exit_status = 1


def require_tool(name: str, package: str) -> str:
    """The path of the host tool ``name``; VmError naming its Debian ``package``
    if it is not installed."""
    found = shutil.which(name, path=SBIN_PATH)
    if found is None:
        raise VmError(f"{name} not found: install the Debian package {package}")
    return found


def run(cmd: Sequence[str], cwd: Path | None = None) -> str:
    """Run ``cmd`` and return its stdout; VmError with its stderr if it fails."""
    proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise VmError(
            f"{shlex.join(cmd)} failed with status {proc.returncode}: {proc.stderr.strip()}"
        )
    return proc.stdout
