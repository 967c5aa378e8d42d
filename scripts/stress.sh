#!/bin/bash
# make stress: the guest-path test groups run N times back to back with a
# CPU hog beside them, each failure reported with its log. Races that hide on
# an idle machine (stream output lost, virtio-fs read before it is served)
# show under load, which is what users' hosts have.
#
#   N=5 HOGS=1 TESTS="agent_guest stream_races shim_containerd" scripts/stress.sh
set -uo pipefail
cd "$(dirname "$0")/.."

N=${N:-5}
# One busy process per hog, at normal priority: it takes a core's share
# from the guests' vCPU threads as another tenant would.
HOGS=${HOGS:-1}
BINARIES=${TESTS:-"agent_guest stream_races shim_containerd shim_cri"}
out=target/stress
mkdir -p "$out"

tests=()
for g in $BINARIES; do tests+=(--test "$g"); done
cargo build --workspace --locked --bins || exit 1
cargo test --locked -p husk-tests --no-run "${tests[@]}" || exit 1

hogs=()
for _ in $(seq "$HOGS"); do
    sh -c 'while :; do :; done' &
    hogs+=($!)
done
trap 'kill "${hogs[@]}" 2>&1 | grep -v "No such process" >&2' EXIT
echo "stress: $N runs of [$BINARIES] beside $HOGS CPU hog(s) (pids ${hogs[*]}) on $(nproc) cores"

failed=0
for i in $(seq "$N"); do
    log="$out/run-$i.log"
    start=$(date +%s)
    if cargo test --locked -p husk-tests "${tests[@]}" -- --include-ignored --nocapture >"$log" 2>&1; then
        echo "stress: run $i/$N passed in $(( $(date +%s) - start )) s"
    else
        failed=$((failed + 1))
        echo "stress: run $i/$N FAILED in $(( $(date +%s) - start )) s (log: $log):"
        grep -E "^test .* FAILED|panicked at|^---- " "$log" | head -20 | sed 's/^/    /'
    fi
done
echo "stress: $((N - failed)) of $N runs green, $HOGS CPU hog(s) beside them"
[ "$failed" = 0 ]
