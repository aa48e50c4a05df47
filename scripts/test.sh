#!/bin/bash
# The suite behind `make test`, in two parts: the tests that run on this
# machine, one at a time (several of them measure where threads run and how
# busy the CPUs are), then the VM tests, NBDLOOP_VM_JOBS (2) at a time.  A
# guest under TCG keeps about one host CPU busy, so two of them use a 2-core
# machine where one left half of it idle.  With arguments (make test
# PYTEST_ARGS=...) it is one plain pytest run of what they name.
# Exit status: non-zero if either part failed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
export NBDLOOP_STRICT=1
pytest=(.venv/bin/python -m pytest -ra --durations=25)

if [ $# -gt 0 ]; then
    exec "${pytest[@]}" "$@"
fi

"${pytest[@]}" -m "not vm"
local_rc=$?
# The longest files first, so that neither worker is left with one of them at
# the end, then every other test file, so that no VM test is left out
# wherever it lives.  (A directory among the arguments would bring its files
# back into alphabetical order.)  loadfile keeps each
# file on one worker: its tests share one guest boot.
first=(tests/e2e/test_attach_vm.py tests/e2e/test_powercut_vm.py tests/e2e/test_recover_vm.py)
files=("${first[@]}")
for f in $(find tests -name 'test_*.py' | sort); do
    [[ " ${first[*]} " == *" $f "* ]] || files+=("$f")
done
"${pytest[@]}" -m vm -n "${NBDLOOP_VM_JOBS:-2}" --dist loadfile --no-loadscope-reorder \
    "${files[@]}"
vm_rc=$?
echo "make test: tests on this machine exited $local_rc, VM tests $vm_rc"
[ "$local_rc" -eq 0 ] && [ "$vm_rc" -eq 0 ]
