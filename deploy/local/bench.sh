#!/usr/bin/env bash
# The benchmark (issue 11, BENCHMARKS.md) in one command, on the stack of this checkout: starts it
# with up.sh when order is not SERVING, builds bench-echo (the tonic ceiling), then runs
# deploy/local/bench.py: the pgbench and echo ceilings, a closed-model run at 50 callers,
# fixed-rate runs at 1,000 orders/s over gRPC (ghz) and REST (k6), and a fixed-rate run at the
# target rate. Prints every figure with its target and ratio; writes
# bench-results/<timestamp>/{summary.json,samples.csv,chart.png}. Loopback only, bounded.
#
# usage: deploy/local/bench.sh
#   env: BENCH_* settings (see the head of bench.py; e.g. BENCH_TARGET_RATE=2000,
#        BENCH_PHASES=closed-50,grpc-1000), the ports of up.sh (SHOP_PORT_OFFSET, ...)
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$SHOP_CACHE_DIR/target}"

# A full run writes about 2 GB (300,000 orders in three databases, their WAL and topics), and
# the data only grows (a day of runs left 27 GB): PostgreSQL stops when it cannot write its WAL.
# Check first, and say what the stack already holds.
mkdir -p "$SHOP_STATE_DIR"
free_kib="$(df -Pk "$SHOP_STATE_DIR" | awk 'NR == 2 { print $4 }')"
log "the stack's data: $(du -sh "$SHOP_STATE_DIR" 2>/dev/null | cut -f1) in $SHOP_STATE_DIR, $((free_kib / 1024 / 1024)) GiB free"
((free_kib >= 4 * 1024 * 1024)) ||
  die "less than 4 GiB free for $SHOP_STATE_DIR; deploy/local/down.sh --purge deletes the stack's data"

"$REPO/deploy/local/tools.sh" ghz k6 grpcurl grpc-health-probe
command -v pgbench >/dev/null || die "pgbench is missing (it comes with PostgreSQL: run deploy/local/postgres.sh start)"
if ! grpc-health-probe -addr="127.0.0.1:$ORDER_GRPC_PORT" >/dev/null 2>&1; then
  log "order is not SERVING on 127.0.0.1:$ORDER_GRPC_PORT: starting the stack with up.sh"
  "$REPO/deploy/local/up.sh"
fi

# Topics that earlier test runs left on this broker (t<id>.*; `cargo test` run directly leaves
# them) cost the broker CPU while idle: with ~2,000 of them it used 13 % of a core at rest
# against 4 % without (BENCHMARKS.md). Never run the tests and the benchmark at once.
"$REPO/deploy/local/kafka.sh" delete-test-topics

log "building bench-echo and bench-load (release)"
cargo build --release --quiet -p bench
export BENCH_ECHO_BIN="$CARGO_TARGET_DIR/release/bench-echo"
export BENCH_LOAD_BIN="$CARGO_TARGET_DIR/release/bench-load"

# matplotlib for the chart, in a private virtualenv (first run only).
venv="$SHOP_CACHE_DIR/bench-venv"
if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c 'import matplotlib' 2>/dev/null; then
  log "installing matplotlib into $venv (first run only)"
  python3 -m venv "$venv" || die "python3 -m venv failed"
  "$venv/bin/pip" install -q "matplotlib==3.11.*" || die "pip install matplotlib failed"
fi
exec "$venv/bin/python" "$REPO/deploy/local/bench.py"
