#!/usr/bin/env bash
# Stops everything the local runner started for this SHOP_STATE_DIR: the three services (by pid
# file), then Kafka, then PostgreSQL. Safe to run twice and when nothing is running.
#
# usage: deploy/local/down.sh            stop; the data stays for the next up.sh
#        deploy/local/down.sh --purge    stop, then delete this state dir's data: the PostgreSQL
#                                        cluster, the Kafka log, Prometheus' TSDB, pids and logs (the next up.sh
#                                        starts from empty databases and an empty broker, together)
#   env: SHOP_STATE_DIR (.run/ of this clone), SHOP_STOP_TIMEOUT (seconds per service before
#        SIGKILL, default 30). Ports do not matter here: processes are found by pid file and
#        data dir, so it stops what runs even after SHOP_PORT_OFFSET changed.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

here="$(dirname "${BASH_SOURCE[0]}")"
timeout="${SHOP_STOP_TIMEOUT:-30}"
purge=0
case "${1:-}" in
  "") ;;
  --purge) purge=1 ;;
  *)
    echo "usage: $0 [--purge]" >&2
    exit 2
    ;;
esac

# Services first: on SIGTERM they flush producers and commit offsets, which needs the broker
# and the databases still up. All get SIGTERM at once and shut down in parallel, under one
# deadline; a second SIGTERM is never sent (a service may treat it as "exit now").
declare -A pid_of=()
for svc in order payment inventory; do
  pidfile="$SHOP_STATE_DIR/pids/$svc.pid"
  if pid_alive "$pidfile"; then
    pid_of[$svc]="$(cat "$pidfile")"
    log "stopping $svc (pid ${pid_of[$svc]})"
    kill -TERM "${pid_of[$svc]}" 2>/dev/null || true
  else
    rm -f "$pidfile"
  fi
done
if ((${#pid_of[@]} > 0)); then
  deadline=$((SECONDS + timeout))
  for svc in "${!pid_of[@]}"; do
    pid="${pid_of[$svc]}"
    while proc_alive "$pid" && ((SECONDS < deadline)); do sleep 0.2; done
    if proc_alive "$pid"; then
      log "$svc did not exit within ${timeout}s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      for ((i = 0; i < 50; i++)); do
        proc_alive "$pid" || break
        sleep 0.2
      done
    fi
    rm -f "$SHOP_STATE_DIR/pids/$svc.pid"
  done
fi

# The observability stack of `up.sh --observe`, if it runs (Jaeger keeps its traces in memory).
"$here/observe.sh" stop
"$here/kafka.sh" stop
"$here/postgres.sh" stop

if ((purge)); then
  # Refuse to delete data under a server that still runs (e.g. stop failed half-way). By pid,
  # not by port: a port variable that changed since the start must not hide a live server.
  pg_pid="$(head -n 1 "$SHOP_STATE_DIR/postgres/data/postmaster.pid" 2>/dev/null || true)"
  if pid_alive "$SHOP_STATE_DIR/pids/kafka.pid" || proc_alive "$pg_pid" ||
    pid_alive "$SHOP_STATE_DIR/pids/prometheus.pid"; then
    die "a server of $SHOP_STATE_DIR still runs; not purging"
  fi
  log "purging $SHOP_STATE_DIR: PostgreSQL cluster, Kafka log, Prometheus TSDB, pids, logs"
  # Only what the scripts create, so a mistaken SHOP_STATE_DIR loses nothing else.
  rm -rf "$SHOP_STATE_DIR/postgres" "$SHOP_STATE_DIR/kafka" "$SHOP_STATE_DIR/prometheus" \
    "$SHOP_STATE_DIR/jaeger" "$SHOP_STATE_DIR/pids" "$SHOP_STATE_DIR/logs"
  rmdir "$SHOP_STATE_DIR" 2>/dev/null || log "kept $SHOP_STATE_DIR: it holds other files"
fi
log "all down"
