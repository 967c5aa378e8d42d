#!/bin/bash
# Runs fuzz targets for SECONDS each and prints a table: target,
# executions, coverage (edges, features), crashes. A crash fails the run
# (libFuzzer stops at the first one and keeps the input in
# <crate>/fuzz/artifacts/<target>/); its log is printed.
#
#   scripts/fuzz.sh SECONDS DIR:TARGET...
set -euo pipefail

seconds=$1
shift
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$root/target"
printf '%-22s %12s %8s %10s %8s\n' target executions edges features crashes
failed=0
for spec in "$@"; do
    dir=${spec%%:*}
    t=${spec#*:}
    log=$root/target/fuzz-$t.log
    rc=0
    # Committed seeds (inputs a mutation alone rarely reaches) join the
    # working corpus, which gets what the run finds.
    corpus=()
    if [ -d "$root/$dir/seeds/$t" ]; then
        mkdir -p "$root/$dir/corpus/$t"
        corpus=("corpus/$t" "seeds/$t")
    fi
    (cd "$root/$dir" && cargo +nightly fuzz run "$t" "${corpus[@]}" -- \
        -max_total_time="$seconds" -print_final_stats=1) >"$log" 2>&1 || rc=$?
    execs=$(grep -oP 'stat::number_of_executed_units:\s*\K[0-9]+' "$log" | tail -1 || true)
    cov=$(grep -oP '(DONE|pulse|NEW|REDUCE)\s+cov: \K[0-9]+' "$log" | tail -1 || true)
    ft=$(grep -oP '(DONE|pulse|NEW|REDUCE)\s+cov: [0-9]+ ft: \K[0-9]+' "$log" | tail -1 || true)
    crashes=0
    if [ "$rc" -ne 0 ]; then
        crashes=1
        failed=1
    fi
    printf '%-22s %12s %8s %10s %8s\n' "$t" "${execs:-?}" "${cov:-?}" "${ft:-?}" "$crashes"
    if [ "$rc" -ne 0 ]; then
        tail -n 80 "$log"
        echo "fuzz target $t failed (exit $rc; log: target/fuzz-$t.log)"
    fi
done
exit $failed
