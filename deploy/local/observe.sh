#!/usr/bin/env bash
# The local observability stack, no containers, loopback only: Jaeger v2 (traces: OTLP in, UI and
# /api/traces out, in-memory storage) and Prometheus (Debian's package) scraping the three services'
# /metrics. `up.sh --observe` starts it; `down.sh` stops it; `down.sh --purge` deletes its data.
# State (configs, Prometheus TSDB, pids, logs) lives under $SHOP_STATE_DIR.
#
# usage: deploy/local/observe.sh start|stop|status
#   env: SHOP_PORT_OFFSET moves every port; one by one: PROMETHEUS_PORT (9090),
#        JAEGER_UI_PORT (16686), JAEGER_QUERY_GRPC_PORT (16685), JAEGER_OTLP_GRPC_PORT (4317),
#        JAEGER_OTLP_HTTP_PORT (4318), ORDER_METRICS_PORT (9464), PAYMENT_METRICS_PORT (9465),
#        INVENTORY_METRICS_PORT (9466); JAEGER_VERSION (see tools.sh); JAEGER_UI_ASSETS: a folder
#        with a built jaeger-ui (its index.html) for the Jaeger UI. The binary built from the Go
#        module proxy carries no UI assets, so without it the UI port serves Jaeger's placeholder
#        page; the query API (/api/services, /api/traces) works either way.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
here="$REPO/deploy/local"

prom_dir="$SHOP_STATE_DIR/prometheus"
jaeger_dir="$SHOP_STATE_DIR/jaeger"

# ensure_prometheus — Debian's package, installed without starting its system service (a
# policy-rc.d that refuses every start while apt runs) and without the recommended node exporter:
# the only Prometheus that runs is ours, on loopback.
ensure_prometheus() {
  command -v prometheus >/dev/null && return 0
  ((EUID == 0)) || die "prometheus is not installed; run this once as root or apt-get install prometheus"
  log "installing Prometheus (Debian package prometheus, ~1 min)"
  local policy=/usr/sbin/policy-rc.d had_policy=0 ok=1
  if [[ -e "$policy" ]]; then
    had_policy=1
    cp -p "$policy" "$policy.shop-pipeline"
  fi
  printf '#!/bin/sh\n# Temporary, written by deploy/local/observe.sh while it installs prometheus.\nexit 101\n' >"$policy"
  chmod 755 "$policy"
  DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null || ok=0
  if ((had_policy)); then mv "$policy.shop-pipeline" "$policy"; else rm -f "$policy"; fi
  ((ok)) || die "apt-get install prometheus failed"
  # Some init systems start it anyway; a system Prometheus on 0.0.0.0:9090 is not wanted here.
  if command -v service >/dev/null; then service prometheus stop >/dev/null 2>&1 || true; fi
}

write_prometheus_config() {
  mkdir -p "$prom_dir/data"
  cat >"$prom_dir/prometheus.yml" <<YAML
# Written by deploy/local/observe.sh; rewritten at each start.
global:
  scrape_interval: 5s
  evaluation_interval: 5s
scrape_configs:
  - job_name: order
    static_configs: [{ targets: ["127.0.0.1:$ORDER_METRICS_PORT"] }]
  - job_name: payment
    static_configs: [{ targets: ["127.0.0.1:$PAYMENT_METRICS_PORT"] }]
  - job_name: inventory
    static_configs: [{ targets: ["127.0.0.1:$INVENTORY_METRICS_PORT"] }]
YAML
}

write_jaeger_config() {
  mkdir -p "$jaeger_dir"
  local ui=""
  if [[ -n "${JAEGER_UI_ASSETS:-}" ]]; then
    [[ -f "$JAEGER_UI_ASSETS/index.html" ]] || die "JAEGER_UI_ASSETS=$JAEGER_UI_ASSETS has no index.html"
    ui="    ui:
      assets_path: $JAEGER_UI_ASSETS"
  fi
  # Only what is needed, every listener on 127.0.0.1: OTLP in, the query service (UI, /api/traces)
  # out, traces kept in memory. Jaeger's own telemetry (metrics server, self-tracing) is off.
  cat >"$jaeger_dir/config.yaml" <<YAML
# Written by deploy/local/observe.sh; rewritten at each start.
service:
  extensions: [jaeger_storage, jaeger_query]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
    logs:
      level: info
extensions:
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: 100000
  jaeger_query:
    storage:
      traces: memstore
    enable_tracing: false
$ui
    http:
      endpoint: 127.0.0.1:$JAEGER_UI_PORT
    grpc:
      endpoint: 127.0.0.1:$JAEGER_QUERY_GRPC_PORT
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:$JAEGER_OTLP_GRPC_PORT
      http:
        endpoint: 127.0.0.1:$JAEGER_OTLP_HTTP_PORT
processors:
  batch:
exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
YAML
}

start() {
  "$here/tools.sh" jaeger
  ensure_prometheus

  local pidfile="$SHOP_STATE_DIR/pids/jaeger.pid" logfile="$SHOP_STATE_DIR/logs/jaeger.log"
  if pid_alive "$pidfile"; then
    log "jaeger already running (pid $(cat "$pidfile"))"
  else
    port_open 127.0.0.1 "$JAEGER_OTLP_GRPC_PORT" &&
      die "127.0.0.1:$JAEGER_OTLP_GRPC_PORT is taken by another process (set JAEGER_OTLP_GRPC_PORT or SHOP_PORT_OFFSET)"
    write_jaeger_config
    log "starting jaeger (log: $logfile)"
    nohup setsid "$SHOP_CACHE_DIR/bin/jaeger" --config "$jaeger_dir/config.yaml" \
      >>"$logfile" 2>&1 </dev/null &
    echo $! >"$pidfile"
  fi

  pidfile="$SHOP_STATE_DIR/pids/prometheus.pid"
  logfile="$SHOP_STATE_DIR/logs/prometheus.log"
  if pid_alive "$pidfile"; then
    log "prometheus already running (pid $(cat "$pidfile"))"
  else
    port_open 127.0.0.1 "$PROMETHEUS_PORT" &&
      die "127.0.0.1:$PROMETHEUS_PORT is taken by another process (set PROMETHEUS_PORT or SHOP_PORT_OFFSET)"
    write_prometheus_config
    log "starting prometheus (log: $logfile)"
    nohup setsid prometheus \
      --config.file="$prom_dir/prometheus.yml" \
      --storage.tsdb.path="$prom_dir/data" \
      --storage.tsdb.retention.time=7d \
      --web.listen-address="127.0.0.1:$PROMETHEUS_PORT" \
      >>"$logfile" 2>&1 </dev/null &
    echo $! >"$pidfile"
  fi

  wait_for --pid "$(cat "$SHOP_STATE_DIR/pids/jaeger.pid")" "jaeger's OTLP and UI ports" 60 \
    "$SHOP_STATE_DIR/logs/jaeger.log" \
    bash -c "(exec 3<>/dev/tcp/127.0.0.1/$JAEGER_OTLP_GRPC_PORT) && (exec 3<>/dev/tcp/127.0.0.1/$JAEGER_UI_PORT)"
  wait_for --pid "$(cat "$SHOP_STATE_DIR/pids/prometheus.pid")" "prometheus to be ready" 60 \
    "$SHOP_STATE_DIR/logs/prometheus.log" \
    curl -sf "http://127.0.0.1:$PROMETHEUS_PORT/-/ready"
}

stop() {
  stop_pidfile prometheus "$SHOP_STATE_DIR/pids/prometheus.pid"
  stop_pidfile jaeger "$SHOP_STATE_DIR/pids/jaeger.pid"
}

status() {
  local name
  for name in jaeger prometheus; do
    if pid_alive "$SHOP_STATE_DIR/pids/$name.pid"; then
      echo "$name: running (pid $(cat "$SHOP_STATE_DIR/pids/$name.pid"))"
    else
      echo "$name: stopped"
    fi
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
