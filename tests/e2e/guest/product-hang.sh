#!/bin/sh
# tests/e2e/test_product_vm.py: a script that never ends; the host kills the
# product VM at its timeout.
step() { echo "NBDLOOP-STEP: $1"; }
step sleeping
sleep 1000
