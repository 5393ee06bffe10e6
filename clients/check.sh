#!/usr/bin/env bash
# The clients' part of the test command (deploy/local/test.sh runs it after cargo test):
#   0. buf lint, and buf breaking against proto/ as of the last tag (or, with no tag, the
#      first commit that had proto/shop): a renumbered, retyped or removed field fails here;
#   1. regenerates the Python and Go stubs and order/openapi.json from proto/ into a
#      temporary folder and fails if what is committed differs (stale generated code);
#   2. starts order, payment and inventory as processes (the binaries `cargo build --bins`
#      made) on free ports, with their own databases (clients_<id>_*) on the shared
#      PostgreSQL and their own topic prefix on the shared Kafka, and waits until all three
#      report SERVING;
#   3. runs the Python and the Go example against that order service: each places an
#      order and follows it with WatchOrder to its final status;
#   4. fuzzes the REST shim from the OpenAPI description it serves at /openapi.json
#      (schemathesis): no 5xx, no response outside the schema (status, content type,
#      body, headers), and no request slower than CLIENTS_FUZZ_MAX_RESPONSE_SECS;
#   5. stops the services and drops their databases.
#
# usage: clients/check.sh [--generated-only]   (--generated-only: steps 0 and 1)
#   env: CARGO_TARGET_DIR (where the service binaries are; test.sh sets it),
#        TEST_DATABASE_URL (admin URL of the shared PostgreSQL), KAFKA_BROKERS,
#        CLIENTS_FUZZ_EXAMPLES (per operation, default 200), CLIENTS_FUZZ_MAX_RESPONSE_SECS (5)
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=tools.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/tools.sh"
clients_tools
cd "$REPO"

work="$(mktemp -d)"
pids=()
databases=()
admin_url="${TEST_DATABASE_URL:-$(pg_url postgres)}"
cleanup() {
  local pid
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  for db in "${databases[@]}"; do
    psql -q "$admin_url" -c "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null 2>&1 || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

log "buf lint (buf.yaml)"
buf lint || die "buf lint found problems in proto/ (see buf.yaml for the rules)"
# A shallow clone has no released proto/ to compare with: fetch the history
# if the origin can give it, otherwise the comparison would be with itself.
if [[ "$(git rev-parse --is-shallow-repository 2>/dev/null)" == true ]]; then
  git fetch --quiet --unshallow 2>/dev/null ||
    log "warning: shallow clone without reachable history: buf breaking compares with this commit"
fi
baseline="$(git describe --tags --abbrev=0 2>/dev/null ||
  git log --diff-filter=A --format=%H -- proto/shop | tail -n 1)"
[[ -n "$baseline" ]] || die "no commit with proto/shop to compare with (a shallow clone?)"
mkdir -p "$work/baseline"
git archive "$baseline" proto | tar -x -C "$work/baseline" ||
  die "cannot read proto/ at $baseline (a shallow clone? fetch the history)"
log "buf breaking against proto/ at $(git log -1 --format='%h (%s)' "$baseline")"
buf breaking --against "$work/baseline/proto" ||
  die "proto/ breaks the contract released at $baseline: add fields and messages, never renumber, retype or remove"

log "regenerating the stubs and the OpenAPI description from proto/ (stale check)"
"$REPO/clients/generate.sh" "$work/gen" 2>"$work/generate.log" || {
  cat "$work/generate.log" >&2
  die "clients/generate.sh failed"
}
stale=0
for path in clients/python/shop clients/go/shop order/openapi.json; do
  if ! diff -r -x __pycache__ "$REPO/$path" "$work/gen/$path" >"$work/diff" 2>&1; then
    stale=1
    printf 'stale generated code: %s differs from what proto/ generates:\n' "$path" >&2
    head -n 40 "$work/diff" >&2
  fi
done
((stale == 0)) || die "generated code is stale: run clients/generate.sh and commit the result"
log "generated code matches proto/"
[[ "${1:-}" == --generated-only ]] && exit 0

# --- a pipeline of processes for the examples and the fuzz ---
bin_dir="${CARGO_TARGET_DIR:-$SHOP_CACHE_DIR/target}/debug"
for service in order payment inventory; do
  [[ -x "$bin_dir/$service" ]] || die "$bin_dir/$service is missing: run cargo build --workspace --bins first"
done
"$REPO/deploy/local/tools.sh" grpc-health-probe >/dev/null

id="$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
free_port() {
  "$CLIENTS_VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
order_grpc="$(free_port)" order_http="$(free_port)" payment_grpc="$(free_port)" inventory_grpc="$(free_port)"
base_url="${admin_url%/*}"
declare -A grpc_port=([order]="$order_grpc" [payment]="$payment_grpc" [inventory]="$inventory_grpc")
declare -A database=([order]=orders [payment]=payments [inventory]=inventory)
log "starting order, payment and inventory (databases clients_${id}_*, topics t${id}.*)"
for service in order payment inventory; do
  db="clients_${id}_${database[$service]}"
  psql -q "$admin_url" -c "CREATE DATABASE \"$db\"" >/dev/null
  databases+=("$db")
  env DATABASE_URL="$base_url/$db" GRPC_ADDR="127.0.0.1:${grpc_port[$service]}" \
    HTTP_ADDR="127.0.0.1:$order_http" METRICS_ADDR="127.0.0.1:0" \
    KAFKA_BROKERS="$KAFKA_BROKERS" KAFKA_TOPIC_PREFIX="t${id}." KAFKA_PARTITIONS=3 \
    KAFKA_GROUP_ID="t${id}-$service" LOG_FORMAT=text RUST_LOG="${RUST_LOG:-warn}" \
    "$bin_dir/$service" >"$work/$service.log" 2>&1 &
  pids+=("$!")
done
i=0
for service in order payment inventory; do
  wait_for --pid "${pids[$i]}" "$service to report SERVING" 120 "$work/$service.log" \
    grpc-health-probe -addr="127.0.0.1:${grpc_port[$service]}" || die "$service did not start"
  i=$((i + 1))
done

failed=0
log "Python example (clients/python/example.py)"
(cd "$REPO/clients/python" && PYTHONDONTWRITEBYTECODE=1 "$CLIENTS_VENV/bin/python" example.py --addr "127.0.0.1:$order_grpc") ||
  { failed=1; printf 'error: the Python example failed\n' >&2; }

log "Go example (clients/go/cmd/example)"
(cd "$REPO/clients/go" && GOFLAGS=-mod=readonly go run ./cmd/example -addr "127.0.0.1:$order_grpc" -customer CUST002) ||
  { failed=1; printf 'error: the Go example failed\n' >&2; }

log "fuzzing the REST shim from its /openapi.json (schemathesis)"
# Checks: server errors, and every response against the schema. Not the negative-data
# ones: proto3 JSON accepts on purpose what a JSON Schema reading rejects (numbers as
# strings, unknown enum numbers, camelCase and snake_case names).
fuzz_checks=not_a_server_error,status_code_conformance,content_type_conformance
fuzz_checks+=,response_headers_conformance,response_schema_conformance
(cd "$work" && "$CLIENTS_VENV/bin/st" run "http://127.0.0.1:$order_http/openapi.json" \
  --url "http://127.0.0.1:$order_http" --checks "$fuzz_checks" \
  --max-examples "${CLIENTS_FUZZ_EXAMPLES:-200}" --workers 2 --seed 1 \
  --request-timeout 10 --max-response-time "${CLIENTS_FUZZ_MAX_RESPONSE_SECS:-5}" \
  --phases examples,coverage,fuzzing,stateful --suppress-health-check all --no-color) ||
  { failed=1; printf 'error: the REST fuzz found failures (above)\n' >&2; }

for service in order payment inventory; do
  if grep -qE '"level":"ERROR"| ERROR ' "$work/$service.log"; then
    printf -- '--- errors logged by %s ---\n' "$service" >&2
    grep -E '"level":"ERROR"| ERROR ' "$work/$service.log" | tail -n 20 >&2
  fi
done
((failed == 0)) || die "clients check failed"
log "clients check passed: stubs current, both examples followed their orders, fuzz clean"
