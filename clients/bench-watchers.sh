#!/usr/bin/env bash
# What open WatchOrder streams cost: starts the order service alone (a release build; no
# payment or inventory, so that orders stay PENDING), with its own database and topic
# prefix on the shared PostgreSQL and Kafka, then runs clients/go/cmd/watchbench: N orders,
# one watcher each over a few HTTP/2 connections, the service's RSS and CPU before, after
# opening and after an idle minute, then every order cancelled in one transaction (with
# store::notify_changed's pg_notify) and the time until every watcher has its final state.
#
# usage: clients/bench-watchers.sh [WATCHERS] [CONNECTIONS]   (default 5000 50)
#   env: CARGO_TARGET_DIR, TEST_DATABASE_URL, KAFKA_BROKERS, BENCH_IDLE (default 60s)
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=../deploy/local/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/../deploy/local/lib.sh"
cd "$REPO"
n="${1:-5000}" conns="${2:-50}"
admin_url="${TEST_DATABASE_URL:-$(pg_url postgres)}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$SHOP_CACHE_DIR/target}"
ensure_build_deps
cargo build --release --quiet -p order --bin order
"$REPO/deploy/local/tools.sh" grpc-health-probe >/dev/null

id="$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
db="clients_${id}_orders"
port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
grpc="$(port)" http="$(port)"
log_file="$(mktemp)"
psql -q "$admin_url" -c "CREATE DATABASE \"$db\"" >/dev/null
pid=""
cleanup() {
  [[ -n "$pid" ]] && kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  psql -q "$admin_url" -c "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null 2>&1 || true
  rm -f "$log_file"
}
trap cleanup EXIT
env DATABASE_URL="${admin_url%/*}/$db" GRPC_ADDR="127.0.0.1:$grpc" HTTP_ADDR="127.0.0.1:$http" \
  KAFKA_TOPIC_PREFIX="t${id}." KAFKA_PARTITIONS=3 KAFKA_GROUP_ID="t${id}-order" \
  ORDER_DEADLINE_SECS=3600 RUST_LOG=warn "$CARGO_TARGET_DIR/release/order" >"$log_file" 2>&1 &
pid=$!
wait_for --pid "$pid" "order to report SERVING" 120 "$log_file" grpc-health-probe -addr="127.0.0.1:$grpc"

finish="psql -qAt '${admin_url%/*}/$db' -c \"BEGIN; SELECT count(*) FROM (SELECT pg_notify('order_changes', order_id::text) FROM orders) n; UPDATE orders SET status = 'CANCELLED', reason = 'bench', updated_at = now(); COMMIT;\" >/dev/null"
(cd clients/go && go run ./cmd/watchbench -addr "127.0.0.1:$grpc" -pid "$pid" -n "$n" -conns "$conns" \
  -idle "${BENCH_IDLE:-60s}" -finish "$finish")
printf 'TCP connections to the order gRPC port during the run: %s (the bench client'"'"'s)\n' "$conns"
