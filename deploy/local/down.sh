#!/usr/bin/env bash
# Stops everything the local runner started: the three services (by pid file), then Kafka,
# then PostgreSQL. Safe to run twice and when nothing is running.
#
# usage: deploy/local/down.sh
#   env: SHOP_STOP_TIMEOUT (seconds per service before SIGKILL, default 30)
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

here="$(dirname "${BASH_SOURCE[0]}")"
timeout="${SHOP_STOP_TIMEOUT:-30}"

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

"$here/kafka.sh" stop
"$here/postgres.sh" stop
log "all down"
