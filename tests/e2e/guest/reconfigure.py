"""Hand a connection meant for one device to another: both nbdloop's own
check and the kernel's (the backend identifier) must refuse it.
Arguments: RECORD (the JSON record of the device the connection is for) and
INDEX (the other device).  Exits 1 if anything accepted it."""
import json
import sys

from nbdloop.kernel import handshake, netlink

record, index = json.load(open(sys.argv[1])), int(sys.argv[2])
sock, export = handshake.connect_unix(record["socket"], export_name=record["export"])
with netlink.Nbd() as nl:
    try:
        nl.reconfigure(index, [sock.fileno()], identifier=record["identifier"])
        sys.exit(f"nbdloop handed nbd{index} a connection for {record['device']}")
    except netlink.KernelError as e:
        print(f"nbdloop refused: {e}")
    try:
        # Past nbdloop's check, straight to the kernel.
        nl._request(netlink.CMD_RECONFIGURE, [["NBD_ATTR_INDEX", index],
                                              ["NBD_ATTR_BACKEND_IDENTIFIER", record["identifier"]],
                                              nl._sockets([sock.fileno()])], "reconfigure")
        sys.exit(f"the kernel took a connection for {record['device']} on nbd{index}")
    except netlink.KernelError as e:
        print(f"the kernel refused: {e}")
sock.close()
