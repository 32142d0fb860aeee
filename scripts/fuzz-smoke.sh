#!/usr/bin/env bash
# Builds the four cargo-fuzz targets (fuzz/) with the ordinary dev profile and runs each one for a
# few thousand generated inputs, so that CI proves they still compile, link against libFuzzer and
# run without a crash. This is a smoke test, not fuzzing: without `cargo fuzz`'s sanitizer and
# coverage flags libFuzzer mutates blindly. Real fuzzing: docs/SECURITY.md, "Fuzzing".
#   scripts/fuzz-smoke.sh [RUNS]     (default 2000 inputs per target, at most 20 s each)
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-2000}"
targets=(manifest envelope tar_gate upload)
cargo build -p deploy-fuzz --bins
out=target/fuzz-smoke
mkdir -p "$out"
for t in "${targets[@]}"; do
    log="$out/$t.log"
    if ! "target/debug/$t" -runs="$runs" -max_total_time=20 -seed=1 -rss_limit_mb=2048 \
        -artifact_prefix="$out/$t-" -print_final_stats=1 >"$log" 2>&1; then
        cat "$log" >&2
        echo "fuzz-smoke: target $t failed (log above, input saved under $out/)" >&2
        exit 1
    fi
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    echo "fuzz-smoke: $t: ${execs:-?} inputs, no crash"
done
