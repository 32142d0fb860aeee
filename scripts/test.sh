#!/usr/bin/env bash
# The project's test command: prerequisites, formatting, lints, then every test (unit, integration
# and end-to-end against the real Docker engine and a loopback Kafka-protocol broker).
set -euo pipefail
cd "$(dirname "$0")/.."
# A CI machine builds once from nothing: incremental caches would only take disk (a few GiB over
# the workspace's test binaries) and time.
if [[ -n "${CI:-}" ]]; then
    export CARGO_INCREMENTAL=0
    # File and line numbers in backtraces are all a failing test's report needs; full debug info
    # makes every one of the ~40 test binaries slower to write and to link.
    export CARGO_PROFILE_DEV_DEBUG=line-tables-only
    # The build and the test hosts need a few GiB: say what there is, so a full disk is plain.
    df -h . /tmp /var/lib/docker 2>/dev/null | sed 's/^/disk: /' || true
fi
scripts/prereqs.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
deploy/check-compose.sh
# Everything the tests run, built once (the fuzz targets' own build then only redoes the few
# crates whose features differ without the tests: about 45 s instead of 4 min from nothing).
cargo build --workspace --all-targets
scripts/fuzz-smoke.sh
cargo nextest run --workspace --no-fail-fast "$@"
