#!/usr/bin/env bash
# Bounded load test of a pipeline started by up.sh, on loopback only.
#   1. ghz sends ORDERS CreateOrder calls (ghz/create_order.json) and prints
#      the intake latency and rate.
#   2. Then it waits until every one of those orders is decided and prints
#      the end-to-end rate: orders created -> CONFIRMED/CANCELLED per second.
#   3. k6 posts REST orders at a constant K6_RATE per second (default 200)
#      for K6_DURATION (default 20s) and prints latency at that steady rate.
#
# usage: deploy/local/bench.sh [ORDERS (default 20000)] [CONCURRENCY (default 50)]
#   env: the ports of up.sh (SHOP_PORT_OFFSET, PGPORT, ORDER_GRPC_PORT, ...), K6_RATE, K6_DURATION
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO"
orders="${1:-20000}"
concurrency="${2:-50}"
db="$(pg_url orders)"

"$REPO/deploy/local/tools.sh" ghz k6 grpcurl grpc-health-probe
grpc-health-probe -addr="127.0.0.1:$ORDER_GRPC_PORT" >/dev/null ||
  die "order is not SERVING on 127.0.0.1:$ORDER_GRPC_PORT: run deploy/local/up.sh (same SHOP_PORT_OFFSET)"

# Restock generously so that the benchmark measures the pipeline, not stock-outs.
for product in PROD013 PROD014; do
  grpcurl -plaintext -d "{\"product_id\":\"$product\",\"available\":100000000}" \
    "127.0.0.1:$INVENTORY_GRPC_PORT" shop.inventory.v1.InventoryService/SetStock >/dev/null
done

run="bench-$(date +%s)"
start="$(psql -qAt "$db" -c "SELECT now()")"
log "ghz: $orders CreateOrder calls, concurrency $concurrency (customers $run-N)"
# The host argument overrides the config's 127.0.0.1:50051 (SHOP_PORT_OFFSET moves it).
ghz --config ghz/create_order.json -n "$orders" -c "$concurrency" \
  -d "{\"customer_id\":\"$run-{{.RequestNumber}}\",\"items\":[{\"product_id\":\"PROD013\",\"quantity\":1},{\"product_id\":\"PROD014\",\"quantity\":1}]}" \
  "127.0.0.1:$ORDER_GRPC_PORT"

log "waiting until every order of this run is decided (up to 300 s)"
query="SELECT count(*) FILTER (WHERE status = 'PENDING'), count(*),
              count(*) FILTER (WHERE status = 'CONFIRMED'),
              round(extract(epoch FROM max(updated_at) - min(created_at))::numeric, 2)
       FROM orders WHERE created_at >= '$start' AND customer_id LIKE '$run-%'"
deadline=$((SECONDS + 300))
while :; do
  IFS='|' read -r pending total confirmed seconds < <(psql -qAt "$db" -c "$query")
  [[ "$pending" == 0 && "$total" -gt 0 ]] && break
  ((SECONDS < deadline)) || die "still $pending of $total orders pending after 300 s"
  sleep 1
done
rate="$(awk -v n="$total" -v s="$seconds" 'BEGIN { printf "%.0f", (s > 0 ? n / s : 0) }')"
printf '\nend to end: %s orders (%s confirmed) created and decided in %s s: %s orders/s\n' \
  "$total" "$confirmed" "$seconds" "$rate"

log "k6: REST POST /api/v1/orders at ${K6_RATE:-200}/s for ${K6_DURATION:-20s} (ghz/k6/rest_orders.js)"
k6 run -q -e BASE_URL="http://127.0.0.1:$ORDER_HTTP_PORT" -e RATE="${K6_RATE:-200}" -e DURATION="${K6_DURATION:-20s}" ghz/k6/rest_orders.js
