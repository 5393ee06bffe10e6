#!/usr/bin/env bash
# The test command (README, .ci/run): starts PostgreSQL and Kafka if they are
# not running (installing them on a fresh machine), checks formatting and
# lints, then runs every test of the workspace against the real servers.
#
# usage: deploy/local/test.sh [extra cargo test args...]
#   env: CARGO_TARGET_DIR (default $SHOP_CACHE_DIR/target, shared by clones); the ports of
#        up.sh (SHOP_PORT_OFFSET, PGPORT, KAFKA_PORT, ...): the tests get TEST_DATABASE_URL and
#        KAFKA_BROKERS for this state dir's servers, so the suite runs on any ports.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
here="$REPO/deploy/local"
cd "$REPO"

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$SHOP_CACHE_DIR/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

# What tests/src/lib.rs connects to (KAFKA_BROKERS is exported by lib.sh). The fault suite
# calls postgres.sh and kafka.sh itself and inherits SHOP_STATE_DIR and the ports from here.
export TEST_DATABASE_URL="${TEST_DATABASE_URL:-$(pg_url postgres)}"

"$here/postgres.sh" start
"$here/kafka.sh" start

# Each test creates its own databases (t_<id>_*); drop those of earlier runs.
"$here/postgres.sh" drop-test-databases
"$here/kafka.sh" delete-test-topics

ensure_build_deps
log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --quiet -- -D warnings
log "building the service binaries (the fault suite runs them as processes)"
cargo build --workspace --bins --quiet
log "cargo test (one test binary at a time: the fault suite restarts Kafka and PostgreSQL)"
results="$SHOP_STATE_DIR/logs/test-results.log"
set +e
cargo test --workspace "$@" 2>&1 | tee "$results"
status=${PIPESTATUS[0]}
set -e
# Generated clients current, the Python and Go examples and the REST fuzz against
# services run as processes, buf lint and breaking (clients/check.sh).
"$REPO/clients/check.sh" || status=1
# One closing line for the whole run (cargo prints one per test binary, the
# last of which is often an empty doc-test run).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) } }
     END { printf "all tests: %d passed, %d failed\n", p, f }' "$results"
# Deploy (README "Deploy"): manifests validated offline, then the image played with Podman.
"$REPO/deploy/k8s/validate.sh" || status=1
"$REPO/deploy/k8s/smoke.sh" || status=1
exit "$status"
