"""Bad input on the daemon's control socket, from the kinds of client a
daemon meets: garbage, JSON that is not a request, a message cut short or
too long, an unknown request, a client that never speaks, a client that is
not root.  Each must get a one-line error or a closed connection, and the
daemon must answer a good request afterwards.  Argument: the socket.
Exits 1 with a reason."""
import json
import os
import socket
import sys

from nbdloop.daemon import control

path = sys.argv[1]


def exchange(data: bytes) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.settimeout(30)
        s.connect(path)
        s.send(data)
        answer = s.recv(control.MAX_MESSAGE)
    if not answer:
        return "closed"
    error = json.loads(answer)["error"]
    assert "\n" not in error["message"], error
    return error["message"]


good = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "list", "params": {}}).encode()
silent = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
silent.connect(path)          # says nothing while the others are served
for what, data in [("garbage", os.urandom(300)), ("a list", b"[1, 2]"),
                   ("cut short", good[:len(good) // 2]),
                   ("too long", b" " * (control.MAX_MESSAGE + 10)),
                   ("unknown", json.dumps({"jsonrpc": "2.0", "id": 1,
                                           "method": "format-disk"}).encode()),
                   ("bad params", json.dumps({"jsonrpc": "2.0", "id": 1, "method": "detach",
                                              "params": {"target": 7}}).encode())]:
    print(f"{what}: {exchange(data)}")

pid = os.fork()
if pid == 0:
    os.setgid(65534)
    os.setuid(65534)
    try:
        print(f"not root: {control.call(path, 'list')}")
        os._exit(1)
    except control.DaemonError as e:
        print(f"not root: {e}")
        os._exit(0)
if os.waitpid(pid, 0)[1] != 0:
    sys.exit("a client that is not root was answered")
print(f"a good request: {len(control.call(path, 'list')['attachments'])} attachment(s)")
silent.settimeout(30)
if silent.recv(100) != b"":
    sys.exit("the silent client got an answer")
print("the silent client was dropped")
