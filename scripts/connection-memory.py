"""What a connection costs a server of the daemon's kind, in PSS.

One nbdkit with the plugin in its exports-directory mode (as the daemon
starts it) serves CONNECTIONS images of 64 MiB, one connection each, made
with libnbd.  Printed, in KiB, with the server's thread count: before any
client, once connected, after 1 MiB written on each connection, after a
burst of 16 reads of 1 MiB in flight on each, after 16 s idle (when the
engine has freed the idle workers' rings), and after the clients left.

    .venv/bin/python scripts/connection-memory.py --threads 4 --connections 16
"""
from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

import nbd

from nbdloop.engine.config import Export, Server, export_json
from nbdloop.serve.cmdline import nbdkit_argv, plugin_env


def pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith("Pss:"))


def threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("Threads:")).split()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=4, help="nbdkit's workers per connection")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--mode", choices=("direct", "buffered"), default="direct")
    parser.add_argument("--dir", default="/var/tmp",
                        help="where the images go (a filesystem with O_DIRECT)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        exports = Path(d) / "exports"
        exports.mkdir()
        for i in range(args.connections):
            image = Path(d) / f"{i}.img"
            with open(image, "wb") as f:
                f.truncate(64 << 20)
            (exports / f"e{i}.json").write_text(
                export_json(Export(image=str(image), mode=args.mode, name=f"e{i}")))
        sock, pidfile = f"{d}/server.sock", f"{d}/server.pid"
        server = Server(exports=(), exports_dir=str(exports), socket=sock, pidfile=pidfile,
                        threads=args.threads)
        with open(f"{d}/server.log", "wb") as log:
            proc = subprocess.Popen(nbdkit_argv(server), env=plugin_env(), stderr=log)
        try:
            while not os.path.exists(pidfile):
                time.sleep(0.05)
            pid = proc.pid

            def say(what: str) -> None:
                print(f"{what:<24} {pss_kib(pid):>8} KiB {threads(pid):>5} threads")

            say("no client")
            handles = []
            for i in range(args.connections):
                h = nbd.NBD()
                h.set_export_name(f"e{i}")
                h.connect_unix(sock)
                handles.append(h)
            time.sleep(0.5)
            say("connected")
            data = os.urandom(1 << 20)
            for h in handles:
                h.pwrite(data, 0)
            say("1 MiB written each")
            for h in handles:
                for k in range(16):
                    h.aio_pread(nbd.Buffer(1 << 20), k << 20)
                while h.aio_in_flight() > 0:
                    h.poll(-1)
            say("after 16 x 1 MiB reads")
            time.sleep(16)
            say("idle 16 s")
            for h in handles:
                h.shutdown()
            time.sleep(1)
            say("clients gone")
        finally:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
