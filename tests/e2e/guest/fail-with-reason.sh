#!/bin/sh
# tests/e2e/test_vm_harness.py: a script that fails names its reason.
echo guest-was-here
echo "custom reason 42" > "$NBDLOOP_REASON"
exit 3
