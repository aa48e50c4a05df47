"""Every path and environment variable nbdloop uses, in one place.

Environment variables (all optional):

- ``NBDLOOP_RUNTIME_DIR``: sockets, ready files and attachment records
  [default: ``/run/nbdloop`` for root, else ``$XDG_RUNTIME_DIR/nbdloop``, else
  ``/tmp/nbdloop-UID``].  A user's commands reach root's daemon at
  ``control.sock`` in it [default: ``/run/nbdloop``].
- ``NBDLOOP_ATTACHMENTS``: the table of attachments that ``attach --all``
  reads [default: ``/etc/nbdloop/attachments``].
- ``NBDLOOP_MAX_PER_USER``: ``nbdloop daemon --max-per-user``.
- ``NBDLOOP_CACHE``: what is kept between runs, because it is slow to make:
  ``vm/`` (the VM's kernel and initramfs) and the benchmark's images
  [default: ``~/.cache/nbdloop``].

Standard library only: the engine, the VM code and the CLI may all use it.
"""
from __future__ import annotations

import os
import stat
import sysconfig
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
#: What nbdkit's embedded Python needs on its PYTHONPATH to import nbdloop.
PACKAGE_ROOT = PACKAGE_DIR.parent
#: The script nbdkit's python plugin loads.
PLUGIN = PACKAGE_DIR / "engine" / "plugin.py"
#: The guest's shell scripts.
GUEST_SCRIPTS = PACKAGE_DIR / "vm" / "guest"
#: Debian's libpython3.11, which nbdkit embeds.
EMBEDDED_PYTHON_HOME = "/usr"
#: The allocator loaded into nbdkit (Debian's libtcmalloc-minimal4).
ALLOCATOR = f"/usr/lib/{sysconfig.get_config_var('MULTIARCH')}/libtcmalloc_minimal.so.4"

#: Where system tools live; a user's PATH often lacks the sbin directories.
SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

RUNTIME_DIR_ENV = "NBDLOOP_RUNTIME_DIR"
#: Root's runtime directory, where the daemon of the host listens.
SYSTEM_RUNTIME_DIR = Path("/run/nbdloop")
#: The group whose members may attach their own images (make install makes it).
USERS_GROUP = "nbdloop"
CACHE_ENV = "NBDLOOP_CACHE"
ATTACHMENTS_ENV = "NBDLOOP_ATTACHMENTS"
MAX_PER_USER_ENV = "NBDLOOP_MAX_PER_USER"


class PathError(Exception):
    """A directory that cannot be used; one line."""


def runtime_dir() -> Path:
    """Where sockets and state live, created 0700 so that only its owner
    can use it (root's 0711: users reach the control socket in it by its
    name, and nothing else); PathError if it exists and others could write
    it."""
    override = os.environ.get(RUNTIME_DIR_ENV)
    if override:
        base = Path(override)
    elif os.geteuid() == 0:
        base = SYSTEM_RUNTIME_DIR
    elif os.environ.get("XDG_RUNTIME_DIR"):
        base = Path(os.environ["XDG_RUNTIME_DIR"]) / "nbdloop"
    else:
        base = Path(f"/tmp/nbdloop-{os.geteuid()}")
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = base.stat()
    if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o022:
        raise PathError(f"runtime directory {base} is not private to this user")
    if os.geteuid() == 0 and stat.S_IMODE(st.st_mode) != 0o711:
        base.chmod(0o711)
    return base


def state_dir() -> Path:
    """Where attachments are recorded: ``<runtime dir>/attached`` (private)."""
    d = runtime_dir() / "attached"
    d.mkdir(mode=0o700, exist_ok=True)
    return d


def write_whole(path: Path, text: str) -> None:
    """Write ``path`` in one step: a reader sees the old file or the new
    one, never a part (a temporary file beside it, renamed over it)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.rename(path)


def control_socket() -> Path:
    """The daemon's control socket (nbdloop.daemon.control): root's, for
    root and users alike."""
    if os.geteuid() == 0:
        return runtime_dir() / "control.sock"
    return Path(os.environ.get(RUNTIME_DIR_ENV) or SYSTEM_RUNTIME_DIR) / "control.sock"


def device_properties_dir() -> Path:
    """Where the daemon leaves, per device, the udev properties that the
    rule make install puts in place reads (``nbdN``: KEY=value lines)."""
    d = runtime_dir() / "devices"
    d.mkdir(mode=0o700, exist_ok=True)
    return d


def attachments_table() -> Path:
    """The table of attachments (nbdloop.kernel.table)."""
    return Path(os.environ.get(ATTACHMENTS_ENV) or "/etc/nbdloop/attachments")


def cache_dir() -> Path:
    """``$NBDLOOP_CACHE``, or ``~/.cache/nbdloop`` (not created here)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "nbdloop"


def vm_cache_dir() -> Path:
    """The VM's kernel and initramfs, kept between runs."""
    return cache_dir() / "vm"
