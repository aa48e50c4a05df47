"""The VM's kernel and base initramfs, built once and cached.

:func:`ensure_assets` downloads Debian's kernel package (``apt-get
download`` of what ``linux-image-amd64`` names, unpacked with ``dpkg-deb
-x``), builds the base initramfs from the host's installed packages
(:mod:`nbdloop.vm.initramfs`) and keeps both under
:func:`nbdloop.paths.vm_cache_dir`, in a directory keyed on everything they
are made from: the package versions, the module and tool lists, the guest's
/init (``nbdloop/vm/guest/init.sh``, by the sha256 of its content) and the
kernel command line. The kernel's .deb itself is kept too
(:func:`kernel_deb`, under ``kernel-deb/``), so that the product VM's
initramfs (:mod:`nbdloop.vm.product`), made from the same kernel package's
modules, needs no second download.

Standard library, :mod:`nbdloop.paths` and the other nbdloop.vm modules only.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from nbdloop.paths import GUEST_SCRIPTS, vm_cache_dir
from nbdloop.vm.initramfs import GUEST_TOOLS, HOST_PACKAGES, MODULE_ROOTS, build_initramfs
from nbdloop.vm.tools import VmError, require_tool, run

__all__ = [
    "INIT_SCRIPT",
    "KERNEL_CMDLINE",
    "VmAssets",
    "VmError",
    "cache_lock",
    "ensure_assets",
    "kernel_deb",
    "unpack_kernel",
]

#: The guest's /init, built into the base initramfs.
INIT_SCRIPT = GUEST_SCRIPTS / "init.sh"

#: The kernel command line; run_guest boots with it, and it keys the cache.
KERNEL_CMDLINE = "console=ttyS0 panic=-1 loglevel=4 rdinit=/init"

#: Bump when the layout of the cached assets changes without a package change.
_ASSET_FORMAT = 1

#: The Debian metapackage that names the current kernel image package.
_KERNEL_METAPACKAGE = "linux-image-amd64"

_APT_LISTS = Path("/var/lib/apt/lists")


@dataclasses.dataclass(frozen=True)
class VmAssets:
    """A kernel image and a base initramfs that fit together."""

    kernel: Path
    initrd: Path
    #: The kernel's release, e.g. ``6.1.0-56-amd64``.
    kernel_release: str = ""
    #: The Debian version of the kernel package, e.g. ``6.1.192-2``.
    kernel_version: str = ""
    #: The modules /init loads, in load order.
    modules: tuple[str, ...] = ()


def ensure_assets(cache_dir: Path | None = None) -> VmAssets:
    """Return the cached kernel and base initramfs, building them if needed.

    ``cache_dir`` defaults to :func:`nbdloop.paths.vm_cache_dir`
    (``$NBDLOOP_CACHE/vm``, or ``~/.cache/nbdloop/vm``).

    A build downloads the kernel package with ``apt-get download`` and unpacks
    it with ``dpkg-deb -x``; busybox and the guest tools come from the host's
    installed packages. With a current cache this runs one ``dpkg-query`` and
    reads three small files.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else vm_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    host_versions = host_package_versions(
        HOST_PACKAGES, "the VM initramfs is built from host packages that are not installed")
    kernel_package, kernel_version = _kernel_package(cache_dir)
    release = kernel_package.removeprefix("linux-image-")
    init = INIT_SCRIPT.read_bytes()
    recipe = _recipe(kernel_package, kernel_version, host_versions, init)
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    entry = cache_dir / f"{release}_{kernel_version}_{key}"
    assets = _load_entry(entry)
    if assets is not None:
        return assets
    with _locked(cache_dir / ".lock"):
        assets = _load_entry(entry)
        if assets is not None:
            return assets
        build = Path(tempfile.mkdtemp(prefix=".build-", dir=cache_dir))
        try:
            _build_entry(build, kernel_package, kernel_version, recipe, init)
            build.chmod(0o755)
            os.rename(build, entry)
        finally:
            shutil.rmtree(build, ignore_errors=True)
    assets = _load_entry(entry)
    if assets is None:
        raise VmError(f"building VM assets in {entry} left no usable manifest")
    return assets


def _recipe(kernel_package: str, kernel_version: str, host_versions: dict[str, str],
            init: bytes) -> dict:
    """Everything the assets are made from: a change to any of it is a new entry."""
    return {
        "format": _ASSET_FORMAT,
        "kernel": [kernel_package, kernel_version],
        "host": host_versions,
        "modules": MODULE_ROOTS,
        "tools": GUEST_TOOLS,
        "init": hashlib.sha256(init).hexdigest(),
        "cmdline": KERNEL_CMDLINE,
    }


def _load_entry(entry: Path) -> VmAssets | None:
    try:
        manifest = json.loads((entry / "manifest.json").read_text())
    except (FileNotFoundError, ValueError):
        return None
    kernel = entry / "vmlinuz"
    initrd = entry / "initrd.img"
    if not (kernel.is_file() and initrd.is_file()):
        return None
    return VmAssets(
        kernel=kernel,
        initrd=initrd,
        kernel_release=manifest["kernel_release"],
        kernel_version=manifest["kernel_version"],
        modules=tuple(manifest["modules"]),
    )


def cache_lock(cache_dir: Path) -> AbstractContextManager[None]:
    """Hold ``cache_dir``'s build lock (the one :func:`ensure_assets` takes) for a
    ``with`` block: builds of cache entries, and :func:`kernel_deb`, run under it."""
    return _locked(Path(cache_dir) / ".lock")


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def host_package_versions(packages: Sequence[str], problem: str) -> dict[str, str]:
    """The installed versions of ``packages`` on this host; VmError
    (``problem: apt-get install ...``) if any is not installed."""
    dpkg_query = require_tool("dpkg-query", "dpkg")
    proc = subprocess.run(
        [dpkg_query, "-W", "-f", "${Package}\t${Version}\t${db:Status-Abbrev}\n", *packages],
        capture_output=True,
        text=True,
        check=False,
    )
    versions = {}
    for line in proc.stdout.splitlines():
        name, version, status = line.split("\t")
        if status.startswith("ii"):
            versions[name] = version
    missing = [p for p in packages if p not in versions]
    if missing:
        raise VmError(f"{problem}: apt-get install {' '.join(missing)}")
    return versions


def _apt_lists_stamp() -> list[list]:
    """Sizes and mtimes of apt's package lists; apt-get update changes them."""
    stamp = []
    paths = [*_APT_LISTS.glob("*"), Path("/etc/apt/preferences"), Path("/etc/apt/preferences.d")]
    for path in sorted(paths):
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        stamp.append([str(path), st.st_size, st.st_mtime_ns])
    return stamp


def _kernel_package(cache_dir: Path) -> tuple[str, str]:
    """Resolve linux-image-amd64 to (``linux-image-<release>``, version).

    apt-cache takes about half a second, so the answer is remembered until
    apt's package lists change.
    """
    memo = cache_dir / "kernel-package.json"
    stamp = _apt_lists_stamp()
    try:
        known = json.loads(memo.read_text())
        if known["stamp"] == stamp:
            return known["package"], known["version"]
    except (FileNotFoundError, ValueError, KeyError):
        pass
    apt_cache = require_tool("apt-cache", "apt")
    proc = subprocess.run(
        [apt_cache, "show", "--no-all-versions", _KERNEL_METAPACKAGE],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise VmError(
            f"apt-cache show {_KERNEL_METAPACKAGE} failed (run apt-get update?): "
            f"{proc.stderr.strip()}"
        )
    fields = dict(re.findall(r"^(Version|Depends): (.*)$", proc.stdout, re.MULTILINE))
    depends = re.search(r"\b(linux-image-\d[^\s,(]*)", fields.get("Depends", ""))
    if depends is None or "Version" not in fields:
        raise VmError(f"apt-cache show {_KERNEL_METAPACKAGE} names no linux-image package")
    package, version = depends.group(1), fields["Version"]
    fd, tmp = tempfile.mkstemp(prefix=".kernel-package-", dir=cache_dir)
    with os.fdopen(fd, "w") as f:
        json.dump({"stamp": stamp, "package": package, "version": version}, f)
    os.replace(tmp, memo)
    return package, version


def _build_entry(out: Path, kernel_package: str, kernel_version: str, recipe: dict,
                 init: bytes) -> None:
    """Unpack the kernel (:func:`unpack_kernel`), then write vmlinuz and initrd.img
    into ``out``."""
    require_tool("ldd", "libc-bin")
    work = out / "work"
    work.mkdir()
    release = kernel_package.removeprefix("linux-image-")
    vmlinuz, moddir = unpack_kernel(out.parent, kernel_package, kernel_version, work)

    initrd, modules = build_initramfs(moddir, init)
    (out / "initrd.img").write_bytes(initrd)
    shutil.copyfile(vmlinuz, out / "vmlinuz")
    shutil.rmtree(work)
    manifest = {
        "kernel_package": kernel_package,
        "kernel_version": kernel_version,
        "kernel_release": release,
        "modules": modules,
        "recipe": recipe,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))


def unpack_kernel(cache_dir: Path, kernel_package: str, kernel_version: str,
                  work: Path) -> tuple[Path, Path]:
    """Unpack the kernel package into ``work/root``; return its vmlinuz and its
    ``lib/modules/<release>``.

    The .deb comes from :func:`kernel_deb`, so every initramfs built from the
    same kernel package (the client VM's, the product VM's) shares one
    download. The caller holds ``cache_dir``'s lock.
    """
    dpkg_deb = require_tool("dpkg-deb", "dpkg")
    deb = kernel_deb(cache_dir, kernel_package, kernel_version)
    root = work / "root"
    run([dpkg_deb, "-x", str(deb), str(root)])
    release = kernel_package.removeprefix("linux-image-")
    vmlinuz = root / "boot" / f"vmlinuz-{release}"
    moddir = root / "lib" / "modules" / release
    if not vmlinuz.is_file() or not moddir.is_dir():
        raise VmError(f"{deb.name} has no boot/vmlinuz-{release} or lib/modules/{release}")
    return vmlinuz, moddir


def kernel_deb(cache_dir: Path, kernel_package: str, kernel_version: str) -> Path:
    """The kernel package's .deb, downloaded once with ``apt-get download`` and
    kept under ``cache_dir/kernel-deb/<package>_<version>/``; the .debs of
    other kernel versions are removed when a new one arrives. The caller holds
    ``cache_dir``'s lock."""
    debs_dir = cache_dir / "kernel-deb"
    keep = debs_dir / f"{kernel_package}_{kernel_version}"
    found = list(keep.glob("*.deb")) if keep.is_dir() else []
    if len(found) == 1:
        return found[0]
    apt_get = require_tool("apt-get", "apt")
    debs_dir.mkdir(parents=True, exist_ok=True)
    download = Path(tempfile.mkdtemp(prefix=".download-", dir=debs_dir))
    try:
        cmd = [apt_get, "download", "-q"]
        if os.geteuid() == 0:
            # As root apt drops to the _apt user, which cannot write here.
            cmd += ["-o", "APT::Sandbox::User=root"]
        cmd.append(f"{kernel_package}={kernel_version}")
        run(cmd, cwd=download)
        debs = list(download.glob("*.deb"))
        if len(debs) != 1:
            raise VmError(
                f"apt-get download {kernel_package} left {len(debs)} .deb files in {download}"
            )
        download.chmod(0o755)
        for old in debs_dir.iterdir():
            if old != download:
                shutil.rmtree(old, ignore_errors=True)
        os.rename(download, keep)
    finally:
        shutil.rmtree(download, ignore_errors=True)
    return keep / debs[0].name
