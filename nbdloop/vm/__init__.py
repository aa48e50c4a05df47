"""Run the real Linux kernel NBD client in a throwaway VM.

The host kernel has no NBD client, so tests that need one boot Debian's stock
kernel under qemu (TCG) with a small busybox initramfs. The pieces:

* :mod:`nbdloop.vm.assets`: :func:`ensure_assets` builds, once, a kernel and a
  base initramfs and caches them, keyed on what they are made from.
* :mod:`nbdloop.vm.initramfs`: what goes into that initramfs (busybox, the
  needed modules in load order, ``nbd-client``, ``mkfs.ext4``, ``e2fsck``,
  ``mkfs.xfs``, ``xfs_repair`` and their shared libraries) and the cpio writer.
* :mod:`nbdloop.vm.runner`: :func:`run_guest` boots that kernel, runs one shell
  script in the guest and returns the script's verdict and the whole console;
  :func:`shell_assignments` and :func:`argv_lines` write a script's
  parameters as payload files (data the script sources or reads, never code).
* :mod:`nbdloop.vm.kernel_check`: :func:`kernel_check_script`, the standard
  script: connect, mkfs, mount, write files, verify, fsck, remount, verify
  again, disconnect.
* :mod:`nbdloop.vm.product`: :func:`run_product` boots the same kernel on the
  host's own root filesystem (read-only over 9p, a tmpfs overlay on top) and
  runs one host shell script there: the whole product (nbdkit, the venv,
  nbd-client, the kernel NBD client) on one kernel; the images go on a
  virtio data disk (or, if asked for, a blank emulated NVMe disk).
  :func:`ensure_product_assets` caches its initramfs.
* ``nbdloop/vm/guest/``: the guest's shell scripts (``init.sh``,
  ``kernel-check.sh``, ``product-init.sh``), real files read at run time.

This package imports only the standard library, :mod:`nbdloop.paths` and
:mod:`nbdloop.process`; never nbdkit, nbdloop.engine or its compiled
extension, so it also runs where those are not built yet. (The ``nbdloop
vm-check`` orchestration, which validates images with the engine, is
:mod:`nbdloop.kernel.vmcheck`.)

The names below are the public API, so that ``from nbdloop import vm`` then
``vm.run_guest(...)`` works without knowing which module holds what.
"""
from nbdloop.vm.assets import VmAssets, ensure_assets
from nbdloop.vm.kernel_check import (
    DEFAULT_FILE_SIZES,
    KernelCheck,
    kernel_check_script,
    make_files,
)
from nbdloop.vm.product import (
    GUEST_DATA_DIR,
    GUEST_NVME_DEVICE,
    GUEST_REASON_FILE,
    GUEST_REPORT_PORT,
    ProductAssets,
    ensure_product_assets,
    run_product,
)
from nbdloop.vm.runner import (
    GUEST_NBD_DEVICE,
    GUEST_PAYLOAD_DIR,
    GUEST_SERVER_HOST,
    GUEST_SERVER_PORT,
    STEP_MARKER,
    VERDICT_MARKER,
    GuestResult,
    PowerCut,
    argv_lines,
    run_guest,
    shell_assignments,
)
from nbdloop.vm.tools import VmError

__all__ = [
    "DEFAULT_FILE_SIZES",
    "GUEST_DATA_DIR",
    "GUEST_NBD_DEVICE",
    "GUEST_NVME_DEVICE",
    "GUEST_PAYLOAD_DIR",
    "GUEST_REASON_FILE",
    "GUEST_REPORT_PORT",
    "GUEST_SERVER_HOST",
    "GUEST_SERVER_PORT",
    "STEP_MARKER",
    "VERDICT_MARKER",
    "GuestResult",
    "KernelCheck",
    "PowerCut",
    "ProductAssets",
    "VmAssets",
    "VmError",
    "argv_lines",
    "ensure_assets",
    "ensure_product_assets",
    "kernel_check_script",
    "make_files",
    "run_guest",
    "run_product",
    "shell_assignments",
]
