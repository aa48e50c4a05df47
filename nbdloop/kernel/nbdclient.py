"""nbd-client's command line, for the guests that run it, and the NBD
limits attach shares with it.

``nbdloop attach`` does not run nbd-client: the daemon does the handshake
(:mod:`nbdloop.kernel.handshake`) and configures the device over netlink
(:mod:`nbdloop.kernel.netlink`) itself.  :func:`nbd_client_args` is what
``nbdloop vm-check`` (:mod:`nbdloop.kernel.vmcheck`) and the VM tests run in
the guest; attach takes only the constants below (its default request
timeout, the block sizes it accepts).
"""
from __future__ import annotations

#: How long the kernel waits on a request before it gives up on the connection.
DEFAULT_TIMEOUT = 60
#: The logical block sizes nbd-client's ``-block-size`` takes.
BLOCK_SIZES = (512, 1024, 2048, 4096)


def nbd_client_args(
    device: str,
    *,
    unix_path: str | None = None,
    host: str | None = None,
    port: int = 10809,
    block_size: int = 512,
    connections: int = 1,
    export_name: str = "",
    timeout: int = DEFAULT_TIMEOUT,
    readonly: bool = False,
    nbd_client: str = "nbd-client",
) -> list[str]:
    """Return the argv that connects ``device`` to an nbdloop server.

    Exactly one of ``unix_path`` (the host, over a unix socket) or ``host``
    (the VM, over TCP) names the server.
    """
    if (unix_path is None) == (host is None):
        raise ValueError("give exactly one of unix_path or host")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block size {block_size} is not one of "
                         f"{', '.join(map(str, BLOCK_SIZES))}")
    if connections < 1:
        raise ValueError(f"connections must be at least 1, not {connections}")
    if unix_path is not None:
        argv = [nbd_client, "-unix", unix_path, device]
    else:
        argv = [nbd_client, host, str(port), device]
    argv += ["-block-size", str(block_size), "-timeout", str(timeout)]
    if connections > 1:
        argv += ["-connections", str(connections)]
    if export_name:
        argv += ["-name", export_name]
    if readonly:
        argv.append("-readonly")
    return argv
