#!/usr/bin/env bash
# Sets up and runs the whole system on this machine, no containers:
# PostgreSQL (Debian package) with the three databases, Apache Kafka 4.x in
# KRaft mode (jars from Maven Central), the topics, the gRPC tools, then the
# three services built in release mode. Safe to run again: what runs stays.
#
# usage: deploy/local/up.sh        stop with: deploy/local/down.sh
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
here="$REPO/deploy/local"
cd "$REPO"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$SHOP_CACHE_DIR/target}"

step() {
  local started=$SECONDS
  "$@"
  log "done in $((SECONDS - started))s: $*"
}

step "$here/postgres.sh" start
step "$here/kafka.sh" start
step "$here/kafka.sh" create-topics
step "$here/tools.sh" grpcurl grpc-health-probe
log "building the services (release; the first build takes several minutes)"
step cargo build --release --quiet -p order -p payment -p inventory -p shopctl

declare -A PORTS=([order]=50051 [payment]=50052 [inventory]=50053)
for svc in payment inventory order; do
  pidfile="$SHOP_STATE_DIR/pids/$svc.pid"
  logfile="$SHOP_STATE_DIR/logs/$svc.log"
  if pid_alive "$pidfile"; then
    log "$svc already running (pid $(cat "$pidfile")); restarting it on the new build"
    stop_pidfile "$svc" "$pidfile"
  fi
  log "starting $svc (log: $logfile)"
  GRPC_ADDR="${GRPC_BIND:-127.0.0.1}:${PORTS[$svc]}" \
    nohup setsid "$CARGO_TARGET_DIR/release/$svc" >>"$logfile" 2>&1 </dev/null &
  echo $! >"$pidfile"
done

for svc in payment inventory order; do
  wait_for --pid "$(cat "$SHOP_STATE_DIR/pids/$svc.pid")" "$svc to report SERVING" 120 \
    "$SHOP_STATE_DIR/logs/$svc.log" \
    grpc-health-probe -addr="127.0.0.1:${PORTS[$svc]}"
done

cat <<MSG

The pipeline is up: order gRPC 127.0.0.1:50051, REST http://127.0.0.1:8081,
payment gRPC 127.0.0.1:50052, inventory gRPC 127.0.0.1:50053, Kafka 127.0.0.1:9092.
Logs: $SHOP_STATE_DIR/logs/   Tools: $SHOP_CACHE_DIR/bin/ (add it to PATH)

Try:
  export PATH="$SHOP_CACHE_DIR/bin:\$PATH"
  grpcurl -plaintext 127.0.0.1:50051 list
  grpcurl -plaintext -d '{"customer_id":"CUST001","product_id":"PROD001","quantity":2}' \\
    127.0.0.1:50051 shop.order.v1.OrderService/CreateOrder
  curl -s -X POST localhost:8081/api/v1/orders -H 'Content-Type: application/json' \\
    -d '{"customer_id":"CUST001","product_id":"PROD001","quantity":2}'
  curl -s localhost:8081/api/v1/orders/<order_id>
  grpc-health-probe -addr=127.0.0.1:50052

Stop everything with: deploy/local/down.sh
MSG
