#!/usr/bin/env bash
# Run the test suite N times in a row (default 3) while other processes keep every core
# busy: a test that passes only on an idle machine is broken.
#
#   bash tests/stress.sh                 # the whole suite, three times
#   bash tests/stress.sh 1 tests/integration/test_flow.py   # any pytest arguments after N
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
shift || true
cores=$(nproc)
hogs=()
stop_hogs() { [ ${#hogs[@]} -eq 0 ] || kill "${hogs[@]}" 2>/dev/null || true; }
trap stop_hogs EXIT
for _ in $(seq 1 "$cores"); do
    python3 -c 'while True: pass' &
    hogs+=($!)
done
echo "stress: ${#hogs[@]} busy processes on $cores cores; $runs runs of pytest $*"
for run in $(seq 1 "$runs"); do
    echo "stress: run $run of $runs"
    if ! .venv/bin/pytest -q -p no:cacheprovider "$@"; then
        echo "stress: run $run FAILED" >&2
        exit 1
    fi
done
echo "stress: $runs runs passed with every core busy"
