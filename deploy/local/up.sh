#!/usr/bin/env bash
# Sets up and runs the whole system on this machine, no containers:
# PostgreSQL (Debian package) with the three databases, Apache Kafka 4.x in
# KRaft mode (jars from Maven Central), the topics, the gRPC tools, then the
# three services built in release mode. Safe to run again: PostgreSQL, Kafka and their data
# stay as they are; the services are rebuilt, and any that run are stopped and restarted on
# the new build.
# Everything it keeps (database cluster, Kafka log, pids, logs) is under SHOP_STATE_DIR
# (default .run/ of this clone).
#
# usage: deploy/local/up.sh [--observe]        stop with: deploy/local/down.sh [--purge]
#   --observe also starts Jaeger (traces, OTLP in) and Prometheus scraping the services
#   (deploy/local/observe.sh), and points the services' OTEL_EXPORTER_OTLP_ENDPOINT at Jaeger.
#   env: SHOP_PORT_OFFSET (0) adds to every port below, so a second clone runs beside the first:
#          SHOP_PORT_OFFSET=100 deploy/local/up.sh    (export it for down.sh/test.sh/bench.sh too)
#        or one by one: PGPORT (5432), KAFKA_PORT (9092), KAFKA_CONTROLLER_PORT (9093),
#        ORDER_GRPC_PORT (50051), ORDER_HTTP_PORT (8081), PAYMENT_GRPC_PORT (50052),
#        INVENTORY_GRPC_PORT (50053), ORDER_METRICS_PORT (9464), PAYMENT_METRICS_PORT (9465),
#        INVENTORY_METRICS_PORT (9466), with --observe PROMETHEUS_PORT (9090), JAEGER_OTLP_GRPC_PORT
#        (4317), JAEGER_OTLP_HTTP_PORT (4318), JAEGER_UI_PORT (16686), JAEGER_QUERY_GRPC_PORT
#        (16685); GRPC_BIND (127.0.0.1); CARGO_TARGET_DIR, SHOP_STATE_DIR
set -euo pipefail

observe=0
case "${1:-}" in
  "") ;;
  --observe) observe=1 ;;
  *)
    echo "usage: $0 [--observe]" >&2
    exit 2
    ;;
esac

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
if ((observe)); then
  # Before the services, so that their first spans have somewhere to go.
  step "$here/observe.sh" start
  export OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:$JAEGER_OTLP_GRPC_PORT"
fi
ensure_build_deps
log "building the services (release with LTO: the first build takes about 10 minutes on two cores)"
step cargo build --release --quiet -p order -p payment -p inventory -p shopctl

declare -A PORTS=([order]=$ORDER_GRPC_PORT [payment]=$PAYMENT_GRPC_PORT [inventory]=$INVENTORY_GRPC_PORT)
declare -A METRICS_PORTS=([order]=$ORDER_METRICS_PORT [payment]=$PAYMENT_METRICS_PORT [inventory]=$INVENTORY_METRICS_PORT)
declare -A DBS=([order]=orders [payment]=payments [inventory]=inventory)
bind="${GRPC_BIND:-127.0.0.1}"
# One tokio worker thread per service by default: here the three services
# share the machine's cores with PostgreSQL, Kafka and the load generators,
# and at a fixed 1,000 orders/s order spent 7-9 % less CPU per order with one
# worker than with one per core (BENCHMARKS.md). Set it to override.
export TOKIO_WORKER_THREADS="${TOKIO_WORKER_THREADS:-1}"
for svc in payment inventory order; do
  pidfile="$SHOP_STATE_DIR/pids/$svc.pid"
  logfile="$SHOP_STATE_DIR/logs/$svc.log"
  if pid_alive "$pidfile"; then
    log "$svc already running (pid $(cat "$pidfile")); restarting it on the new build"
    stop_pidfile "$svc" "$pidfile"
  fi
  log "starting $svc (log: $logfile)"
  rotate_log "$logfile"
  # KAFKA_BROKERS comes exported from lib.sh (this state dir's broker). One process per
  # service, always restarted under its name: static group members, which take their
  # partitions back at once after a crash or a broker restart (README, "Static group
  # membership").
  GRPC_ADDR="$bind:${PORTS[$svc]}" HTTP_ADDR="$bind:$ORDER_HTTP_PORT" \
    METRICS_ADDR="$bind:${METRICS_PORTS[$svc]}" OTEL_SERVICE_NAME="$svc" \
    KAFKA_GROUP_INSTANCE_ID="$svc" \
    DATABASE_URL="$(pg_url "${DBS[$svc]}")" \
    nohup setsid "$CARGO_TARGET_DIR/release/$svc" >>"$logfile" 2>&1 </dev/null &
  echo $! >"$pidfile"
done

for svc in payment inventory order; do
  wait_for --pid "$(cat "$SHOP_STATE_DIR/pids/$svc.pid")" "$svc to report SERVING" 120 \
    "$SHOP_STATE_DIR/logs/$svc.log" \
    grpc-health-probe -addr="127.0.0.1:${PORTS[$svc]}"
done

cat <<MSG

The pipeline is up: order gRPC 127.0.0.1:$ORDER_GRPC_PORT, REST http://127.0.0.1:$ORDER_HTTP_PORT,
payment gRPC 127.0.0.1:$PAYMENT_GRPC_PORT, inventory gRPC 127.0.0.1:$INVENTORY_GRPC_PORT,
Kafka $KAFKA_BROKERS, PostgreSQL $(pg_url '{orders,payments,inventory}').
Metrics: http://127.0.0.1:$ORDER_METRICS_PORT/metrics (order), :$PAYMENT_METRICS_PORT (payment), :$INVENTORY_METRICS_PORT (inventory)
State and logs: $SHOP_STATE_DIR/   Tools: $SHOP_CACHE_DIR/bin/ (add it to PATH)

Try:
  export PATH="$SHOP_CACHE_DIR/bin:\$PATH"
  grpcurl -plaintext 127.0.0.1:$ORDER_GRPC_PORT list
  grpcurl -plaintext -d '{"customer_id":"CUST001","product_id":"PROD001","quantity":2}' \\
    127.0.0.1:$ORDER_GRPC_PORT shop.order.v1.OrderService/CreateOrder
  curl -s -X POST localhost:$ORDER_HTTP_PORT/api/v1/orders -H 'Content-Type: application/json' \\
    -d '{"customer_id":"CUST001","product_id":"PROD001","quantity":2}'
  curl -s localhost:$ORDER_HTTP_PORT/api/v1/orders/<order_id>
  grpc-health-probe -addr=127.0.0.1:$PAYMENT_GRPC_PORT

Stop everything with: deploy/local/down.sh (--purge also deletes the data)
MSG
if ((observe)); then
  cat <<MSG

Observe: Prometheus http://127.0.0.1:$PROMETHEUS_PORT (try: sum by (job) (rate(shop_events_consumed_total[1m])))
         Jaeger UI http://127.0.0.1:$JAEGER_UI_PORT (traces API: /api/traces?service=order)
         Grafana dashboard to import: $REPO/deploy/grafana/shop-pipeline.json
MSG
fi
