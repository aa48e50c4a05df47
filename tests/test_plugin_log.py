"""What nbdkit logs when a request fails: one line naming the request for
an OSError (the engine's errors), the whole traceback for anything else (a
bug).  Served by a small plugin (tests/plugins/faulty.py) that loads
nbdloop's plugin module, whose formatter nbdkit's python plugin uses."""
from __future__ import annotations

import subprocess
import time

from conftest import ROOT, require_tools


def test_a_failed_request_is_one_line_and_a_bug_keeps_its_traceback(tmp_path):
    require_tools("nbdkit")
    import nbd
    from nbdloop.serve.cmdline import plugin_env
    sock, pid, log = tmp_path / "s.sock", tmp_path / "pid", tmp_path / "log"
    with open(log, "wb") as out:
        server = subprocess.Popen(["nbdkit", "-f", "-U", str(sock), "-P", str(pid), "python",
                                   str(ROOT / "tests" / "plugins" / "faulty.py")],
                                  stdout=out, stderr=subprocess.STDOUT, env=plugin_env())
    try:
        deadline = time.monotonic() + 30
        while not (pid.exists() and pid.read_text().strip()):
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        h = nbd.NBD()
        h.connect_unix(str(sock))
        for offset, errno_name in ((4096, "ENOSPC"), (0, "EIO")):
            try:
                h.pread(512, offset)
            except nbd.Error as e:
                assert e.errno == errno_name, (offset, e)
            else:
                raise AssertionError(f"the read at {offset} succeeded")
        h.shutdown()
    finally:
        server.terminate()
        server.wait(30)
    text = log.read_text()
    failed = [ln for ln in text.splitlines() if "pread at 4096+512" in ln]
    assert len(failed) == 1, text
    assert failed[0].endswith("pread: error: pread at 4096+512 on faulty: No space left on device")
    before_bug = text[:text.index("a bug in the plugin")]
    assert "Traceback" in before_bug and "ValueError" in text, text
    assert text.count("Traceback") == 1, text
