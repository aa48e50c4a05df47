"""Check ``nbdloop list --json`` in the one-kernel VM: one attachment of
DEVICE with IMAGE, MODE, CONNECTIONS and STATE, whose server pids are alive
when STATE is attached.  Prints ``PID SERVER_PID``; exits 1 with a reason."""
import json
import os
import sys

data, device, image, mode, connections, state = sys.argv[1:7]
rows = [a for a in json.load(open(data))["attachments"] if a["device"] == device]
if len(rows) != 1:
    sys.exit(f"{device} is listed {len(rows)} times: {data}")
a = rows[0]
want = {"image": os.path.realpath(image), "mode": mode, "connections": int(connections),
        "state": state}
for key, value in want.items():
    if a[key] != value:
        sys.exit(f"list --json says {key}={a[key]!r}, not {value!r}")
for key in ("pid", "server_pid", "socket", "block_size", "readonly", "started", "log"):
    if key not in a:
        sys.exit(f"list --json has no {key}")
if state == "attached":
    for key in ("pid", "server_pid"):
        os.kill(a[key], 0)   # ProcessLookupError: the server is not running
print(a["pid"], a["server_pid"])
