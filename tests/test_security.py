"""Who may connect (TLS with a pre-shared key) and how the server protects
itself under memory pressure (PR_SET_IO_FLUSHER, --mlock)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conftest import invoke, nbdinfo_json, require_tools

MiB = 1 << 20
PF_MEMALLOC_NOIO = 0x00080000
PF_LOCAL_THROTTLE = 0x00100000


def psk_file(path: Path, user: str = "alice") -> Path:
    path.write_text(f"{user}:{os.urandom(32).hex()}\n")
    path.chmod(0o600)
    return path


def test_tls_psk_required(image, serve, tmp_path):
    require_tools("nbdinfo")
    keys = psk_file(tmp_path / "keys.psk")
    s = serve(image, "direct", extra=["--tls-psk", str(keys)])
    tls_uri = f"nbds+unix://alice@/?socket={s.socket_path}&tls-psk-file={keys}"
    info = nbdinfo_json(tls_uri)
    assert info["TLS"] is True
    assert info["exports"][0]["export-size"] == 64 * MiB
    # Data really flows over TLS.
    import nbd
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)   # for tls-psk-file in the URI
    h.connect_uri(tls_uri)
    h.pwrite(b"\x5a" * 4096, 0)
    assert h.pread(4096, 0) == b"\x5a" * 4096
    h.shutdown()
    # Without TLS: refused.
    p = subprocess.run(["nbdinfo", f"nbd+unix:///?socket={s.socket_path}"],
                       capture_output=True, text=True)
    assert p.returncode != 0
    # With TLS but another key: refused.
    other = psk_file(tmp_path / "other.psk")
    p = subprocess.run(["nbdinfo", f"nbds+unix://alice@/?socket={s.socket_path}"
                        f"&tls-psk-file={other}"], capture_output=True, text=True)
    assert p.returncode != 0
    assert image.read_bytes()[:4096] == b"\x5a" * 4096


@pytest.mark.parametrize("content", ["", "no colon here\n", "alice:not-hex\n"])
def test_bad_psk_file(image, tmp_path, content):
    f = tmp_path / "bad.psk"
    f.write_text(content)
    r = invoke("serve", str(image), "--tls-psk", str(f))
    assert r.exit_code == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "PSK file" in r.stderr


def task_flags(pid: int) -> dict[int, int]:
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        out[int(tid)] = int(fields[6])
    return out


def has_cap_sys_resource() -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) & (1 << 24))
    return False


def test_io_flusher_on_every_worker(image, serve, mode):
    """Worker threads (created after get_ready) carry the I/O-flusher flags;
    where the capability is missing the server says so in its log."""
    s = serve(image, mode)
    import nbd
    h = nbd.NBD()
    h.connect_uri(s.uri)
    h.pread(4096, 0)
    flags = task_flags(s.server_pid)
    h.shutdown()
    assert len(flags) > 2, "main thread plus the connection's workers"
    flusher = {t: bool(f & PF_MEMALLOC_NOIO) and bool(f & PF_LOCAL_THROTTLE)
               for t, f in flags.items()}
    if has_cap_sys_resource():
        assert all(flusher.values()), flusher
    else:
        assert not any(flusher.values())
        assert "PR_SET_IO_FLUSHER not permitted (no CAP_SYS_RESOURCE)" in s.log.read_text()


def test_workers_report_their_io_flusher_flag(image, serve, mode, tmp_path):
    """Each worker reads PR_GET_IO_FLUSHER back when it first calls in, and
    the stats file counts them: all of them, or none without the capability."""
    from conftest import read_stats
    stats = tmp_path / "stats.json"
    s = serve(image, mode, extra=["--stats-file", str(stats)])
    import nbd
    h = nbd.NBD()
    h.connect_uri(s.uri)
    for i in range(32):
        h.aio_pread(nbd.Buffer(4096), i * 4096)
    while h.aio_in_flight() > 0:
        h.poll(1000)
    h.shutdown()
    st = read_stats(stats)
    assert st["threads"] >= 1
    assert st["io_flushers"] == (st["threads"] if has_cap_sys_resource() else 0), st


def test_mlock_locks_the_server(image, serve):
    s = serve(image, "direct", extra=["--mlock"])
    status = Path(f"/proc/{s.server_pid}/status").read_text()
    locked = [int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("VmLck:")][0]
    rss = [int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("VmRSS:")][0]
    assert locked > 0 and locked >= rss // 2, (locked, rss)
