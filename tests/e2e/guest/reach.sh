#!/bin/sh
# tests/e2e/test_vm_harness.py: the guest reaches the server's socket on the
# host, and nothing else (not qemu's gateway, DNS, another port, the world).
# Payload ($NBDLOOP_PAYLOAD): params, sourced: SERVER_HOST, SERVER_PORT.
# Made per run by the test, so there is nothing here to follow.
# shellcheck source=/dev/null
. "$NBDLOOP_PAYLOAD/params"
got=$(nc "$SERVER_HOST" "$SERVER_PORT" < /dev/null)
echo "server said: $got"
[ "$got" = hello-from-host ] || { echo "no greeting: $got" > "$NBDLOOP_REASON"; exit 1; }
for target in "10.0.2.2 22" "10.0.2.3 53" "$SERVER_HOST 80" "1.1.1.1 80"; do
    # shellcheck disable=SC2086 # host and port, split on purpose
    ( if nc -w 3 $target < /dev/null > /dev/null 2>&1; then echo "$target" >> /tmp/reached; fi ) &
done
wait
if [ -s /tmp/reached ]; then
    echo "reached $(tr '\n' ' ' < /tmp/reached)" > "$NBDLOOP_REASON"
    exit 1
fi
