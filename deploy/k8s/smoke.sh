#!/usr/bin/env bash
# Plays the `local` overlay for real with Podman: builds the image from the host's binaries,
# runs the rendered Deployments with `podman kube play` against this checkout's PostgreSQL and
# Kafka (start them first: deploy/local/test.sh does), waits until grpc-health-probe reports
# SERVING on every service's probe port, places an order through the containerized order
# service and waits until it is CONFIRMED, then `podman kube down` (SIGTERM) and checks that
# every service finished its drain ("shutdown complete") within the grace period. Cleans up
# its containers, image, secret, databases and topics, also on failure.
#
# Each run is isolated on a shared host: its own databases (smoke_<id>_*), topic prefix and
# consumer groups (t<id>.), pod names, Podman secret, and free ports 3xxxx on the host network.
#
# usage: deploy/k8s/smoke.sh
#   env: CARGO_TARGET_DIR (default $SHOP_CACHE_DIR/target; its debug binaries are used, built if
#        missing), SMOKE_KEEP_IMAGE=1 (keep the image), the ports of lib.sh (PGPORT, KAFKA_PORT).
#   Skips (exit 0, with the reason) only where Podman cannot run: not Linux, not root without a
#   working podman, no apt-get to install it, or a container that cannot start.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=../local/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../local/lib.sh"
here="$REPO/deploy/k8s"
cd "$REPO"

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$SHOP_CACHE_DIR/target}"
export CONTAINERS_CONF="$REPO/deploy/container/containers.conf"
BASE_IMAGE="localhost/debian:bookworm-slim"
venv="$SHOP_CACHE_DIR/k8s-venv"
t0=$SECONDS

skip() {
  printf '\nSKIPPED: container smoke test: %s\n\n' "$*" >&2
  exit 0
}
phase() { # phase NAME — prints how long the previous phase took
  local now=$SECONDS
  [[ -n "${phase_name:-}" ]] && timings+=("$phase_name: $((now - phase_start)) s")
  phase_name="$1"
  phase_start=$now
  [[ -n "$1" ]] && log "$1"
  return 0
}
timings=()

# ---- Podman (Debian's 4.3 with runc; see deploy/container/containers.conf) --------------------
[[ "$(uname -s)" == Linux ]] || skip "Podman needs Linux"
need_pkgs=()
for tool in podman:podman runc:runc mmdebstrap:mmdebstrap catatonit:catatonit \
  newuidmap:uidmap objcopy:binutils; do
  command -v "${tool%%:*}" >/dev/null || need_pkgs+=("${tool#*:}")
done
if ((${#need_pkgs[@]})); then
  ((EUID == 0)) || skip "missing ${need_pkgs[*]} and not root to install them"
  command -v apt-get >/dev/null || skip "missing ${need_pkgs[*]} and no apt-get to install them"
  log "installing ${need_pkgs[*]} from Debian"
  apt-get update -qq >/dev/null || true
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" \
    containernetworking-plugins slirp4netns fuse-overlayfs >/dev/null ||
    skip "apt-get could not install ${need_pkgs[*]}"
fi
"$REPO/deploy/local/tools.sh" grpcurl grpc-health-probe
"$venv/bin/python" -c 'import yaml' 2>/dev/null || {
  python3 -m venv "$venv" && "$venv/bin/pip" install -q "kubernetes-validate==1.37.0"
} || die "cannot set up $venv (run deploy/k8s/validate.sh)"

phase "base image $BASE_IMAGE"
if ! podman image exists "$BASE_IMAGE"; then
  # No registry is reachable here: build Debian's minimal base from its packages (~1 min).
  rootfs="$(mktemp -d)/rootfs.tar"
  log "building $BASE_IMAGE with mmdebstrap --variant=minbase (first run only)"
  mmdebstrap --variant=minbase --quiet bookworm "$rootfs" || die "mmdebstrap failed"
  podman import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' "$rootfs" "$BASE_IMAGE" >/dev/null || die "podman import failed"
  rm -rf "$(dirname "$rootfs")"
fi
podman run --rm --network host "$BASE_IMAGE" true >/dev/null 2>&1 ||
  skip "podman cannot run a container here: $(podman run --rm --network host "$BASE_IMAGE" true 2>&1 | tail -n1)"

# ---- the run's identity and cleanup -----------------------------------------------------------
id="t$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')" # t + 12 hex: kafka.sh delete-test-topics knows it
image="localhost/shop-pipeline:smoke-$id"
secret="shop-database-$id"
dbs=("smoke_${id}_orders" "smoke_${id}_payments" "smoke_${id}_inventory")
work="$(mktemp -d)"
admin_url="$(pg_url postgres)"
played=""

cleanup() {
  local rc=$?
  set +e
  [[ -n "$played" ]] && podman kube down "$played" >/dev/null 2>&1
  podman secret rm "$secret" >/dev/null 2>&1
  [[ "${SMOKE_KEEP_IMAGE:-0}" == 1 ]] || podman rmi -f "$image" >/dev/null 2>&1
  for db in "${dbs[@]}"; do
    for _ in 1 2 3; do # a service still reconnecting can hold it for a moment
      psql -q "$admin_url" -c "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null 2>&1 && break
      sleep 1
    done
  done
  local libs="$SHOP_CACHE_DIR/kafka-$KAFKA_VERSION/libs"
  if [[ -d "$libs" ]] && command -v java >/dev/null; then
    java -Xmx256m -XX:TieredStopAtLevel=1 -cp "$libs/*" org.apache.kafka.tools.TopicCommand \
      --bootstrap-server "$KAFKA_BROKERS" --delete --if-exists --topic "$id\\..*" >/dev/null 2>&1
  fi
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT

# ---- the image from the host's binaries -------------------------------------------------------
phase "building the image from the host's binaries"
bin="$CARGO_TARGET_DIR/debug"
for b in order payment inventory shopctl; do
  [[ -x "$bin/$b" ]] || {
    log "building the binaries (cargo build --bins)"
    ensure_build_deps
    cargo build --quiet --bins -p order -p payment -p inventory -p shopctl
    break
  }
done
mkdir -p "$work/ctx/bin"
for b in order payment inventory shopctl; do
  # Debug info is most of a debug binary's size and no use in the image.
  objcopy --strip-debug "$bin/$b" "$work/ctx/bin/$b"
done
podman build --quiet --network host -f deploy/container/Containerfile --target host-binaries \
  --build-arg BASE_IMAGE="$BASE_IMAGE" -t "$image" "$work/ctx" >/dev/null ||
  die "podman build failed"
size="$(podman image inspect --format '{{.Size}}' "$image")"
printf 'image %s: %s MB (base %s MB)\n' "$image" "$((size / 1000000))" \
  "$(($(podman image inspect --format '{{.Size}}' "$BASE_IMAGE") / 1000000))"

# ---- databases, ports, manifests --------------------------------------------------------------
phase "rendering the local overlay for this run"
psql -qAt "$admin_url" -c 'SELECT 1' >/dev/null 2>&1 ||
  die "PostgreSQL does not answer at $admin_url (start it: deploy/local/postgres.sh start)"
(exec 3<>"/dev/tcp/${KAFKA_BROKERS%%:*}/${KAFKA_BROKERS##*:}") 2>/dev/null ||
  die "Kafka does not answer at $KAFKA_BROKERS (start it: deploy/local/kafka.sh start)"
for db in "${dbs[@]}"; do
  psql -q "$admin_url" -c "CREATE DATABASE \"$db\"" >/dev/null
done
port_free() { # nothing listens on it (ss, or a connection attempt where there is no ss)
  if command -v ss >/dev/null; then
    [[ -z "$(ss -Hltn "sport = :$1")" ]]
  elif (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
    return 1
  fi
}
for _ in $(seq 50); do
  base=$((30000 + (RANDOM % 900) * 10))
  all_free=1
  for off in 1 2 3 4 5 6 7; do port_free $((base + off)) || all_free=0; done
  ((all_free)) && break
done
((all_free)) || die "found no 7 free ports in 30000-39000"
order_grpc=$((base + 1)) payment_grpc=$((base + 2)) inventory_grpc=$((base + 3)) order_http=$((base + 4))
# The Secret the overlay expects, as Podman 4.3 reads one: a JSON map of base64 values.
"$venv/bin/python" - "$work/secret.json" "$PGPORT" "$id" <<'PY'
import base64, json, sys
out, port, run = sys.argv[1:]
url = lambda db: base64.b64encode(f"postgres://shop:shop@127.0.0.1:{port}/smoke_{run}_{db}".encode()).decode()
json.dump({"orders-url": url("orders"), "payments-url": url("payments"), "inventory-url": url("inventory")}, open(out, "w"))
PY
podman secret create "$secret" "$work/secret.json" >/dev/null
rm -f "$work/secret.json"
kubectl_kustomize() { if command -v kubectl >/dev/null; then kubectl kustomize "$1"; else kustomize build "$1"; fi; }
kubectl_kustomize "$here/overlays/local" >"$work/local.yaml"
"$venv/bin/python" "$here/smoke_manifests.py" "$work/local.yaml" "$id" "$image" "$secret" "$base" \
  "$KAFKA_BROKERS" "$work/smoke.yaml" "$work/play.yaml"
# What is played obeys the same rules as the overlays (ports, probes, env).
"$venv/bin/python" "$here/check_manifests.py" check "$REPO" "$work/smoke.yaml" | grep -v '^note:' ||
  die "the smoke manifests break the project's rules"
grace="$(awk '/terminationGracePeriodSeconds:/ { print $2; exit }' "$work/smoke.yaml")"

# ---- play ---------------------------------------------------------------------------------------
phase "podman kube play (ports: order gRPC $order_grpc, REST $order_http; payment $payment_grpc; inventory $inventory_grpc)"
played="$work/play.yaml"
podman kube play "$played" >"$work/play.out" 2>&1 || {
  cat "$work/play.out" >&2
  die "podman kube play failed"
}
ctrs=()
for svc in order payment inventory; do
  ctrs+=("$id-$svc-pod-0-$svc")
done
show_logs() {
  for c in "${ctrs[@]}"; do
    printf -- '--- %s (last lines) ---\n' "$c" >&2
    podman logs --tail 15 "$c" >&2 2>&1 || tail -n 15 "$work/$c.log" >&2 2>/dev/null
  done
}

phase "waiting for SERVING (grpc-health-probe on each probe port)"
for svc in order payment inventory; do
  port_var="${svc}_grpc"
  wait_for "$svc SERVING on 127.0.0.1:${!port_var}" 120 "" \
    grpc-health-probe -addr="127.0.0.1:${!port_var}" -connect-timeout 1s -rpc-timeout 1s ||
    { show_logs; die "$svc did not become SERVING"; }
  printf '%s: %s\n' "$svc" "$(grpc-health-probe -addr="127.0.0.1:${!port_var}" 2>&1)"
done

phase "placing an order through the containerized order service"
created="$(grpcurl -plaintext -d '{"customer_id":"CUST-SMOKE","product_id":"PROD001","quantity":1}' \
  "127.0.0.1:$order_grpc" shop.order.v1.OrderService/CreateOrder)" || { show_logs; die "CreateOrder failed"; }
order_id="$(sed -n 's/.*"orderId": *"\([^"]*\)".*/\1/p' <<<"$created" | head -n1)"
[[ -n "$order_id" ]] || die "no orderId in the answer: $created"
log "order $order_id created; waiting for CONFIRMED"
order_status() {
  grpcurl -plaintext -d "{\"order_id\":\"$order_id\"}" "127.0.0.1:$order_grpc" \
    shop.order.v1.OrderService/GetOrder | grep -q '"ORDER_STATUS_CONFIRMED"'
}
wait_for "order $order_id CONFIRMED" 60 "" order_status || {
  grpcurl -plaintext -d "{\"order_id\":\"$order_id\"}" "127.0.0.1:$order_grpc" shop.order.v1.OrderService/GetOrder >&2
  show_logs
  die "the order was not confirmed"
}
rest="$(curl -fsS "http://127.0.0.1:$order_http/api/v1/orders/$order_id")" || die "REST GET of the order failed"
grep -q '"ORDER_STATUS_CONFIRMED"' <<<"$rest" || die "REST says otherwise: $rest"
printf 'order %s CONFIRMED (gRPC and REST)\n' "$order_id"
# Resident memory and CPU time so far of each service process (what the requests are sized on).
for c in "${ctrs[@]}"; do
  pid="$(podman inspect --format '{{.State.Pid}}' "$c")"
  awk -v c="$c" -v tck="$(getconf CLK_TCK)" 'NR == FNR { if ($1 == "VmRSS:") rss = $2; next }
    { sub(/.*\) /, ""); split($0, f, " "); printf "%s: RSS %.1f MiB, CPU %.2f s\n", c, rss / 1024, (f[12] + f[13]) / tck }' \
    "/proc/$pid/status" "/proc/$pid/stat" 2>/dev/null || true
done

phase "SIGTERM and the drain (grace period ${grace}s), then podman kube down"
# Podman 4.3's `kube down` stops with no grace at all (measured: a container trapping SIGTERM
# is killed within 0.6 s), so send what a kubelet sends first: SIGTERM to every container,
# SIGKILL only after terminationGracePeriodSeconds. Then `kube down` removes the pods.
down_start=$SECONDS
pods=()
for svc in order payment inventory; do pods+=("$id-$svc-pod-0"); done
podman pod stop --time "$grace" "${pods[@]}" >/dev/null || die "podman pod stop failed"
down_secs=$((SECONDS - down_start))
for c in "${ctrs[@]}"; do
  podman logs "$c" >"$work/$c.log" 2>&1 || true
  code="$(podman inspect --format '{{.State.ExitCode}}' "$c")"
  if [[ "$code" != 0 ]] || ! grep -q 'shutdown complete' "$work/$c.log"; then
    show_logs
    die "$c exited with status $code without a complete drain after SIGTERM (killed at the end of the grace period?)"
  fi
done
podman kube down "$played" >/dev/null || die "podman kube down failed"
played=""
((down_secs <= grace)) || die "stopping took ${down_secs}s, more than the grace period ${grace}s"
printf 'drain: all three services logged "shutdown complete" and exited 0 within %s s of SIGTERM (grace period %s s)\n' \
  "$down_secs" "$grace"

phase ""
printf 'container smoke test passed in %s s:\n' "$((SECONDS - t0))"
printf '  %s\n' "${timings[@]}"
