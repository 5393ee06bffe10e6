# shellcheck shell=bash
# Shared settings and helpers for the local runner scripts (deploy/local/*.sh).
# Sourced, never executed: it sets variables and functions in the caller's shell.

# Repo root, derived from this file's location so the scripts work from any cwd and any clone.
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export REPO

# Kafka jars and go-installed tools are slow to fetch and identical across clones,
# so they live outside the work tree and are reused (CI runs in a fresh clone each time).
SHOP_CACHE_DIR="${SHOP_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/shop-pipeline}"
export SHOP_CACHE_DIR

# Per-clone runtime state: pid files, logs, the PostgreSQL cluster and Kafka's log, all under one
# directory so that two clones never share half their state (see postgres.sh, down.sh --purge).
SHOP_STATE_DIR="${SHOP_STATE_DIR:-$REPO/.run}"
export SHOP_STATE_DIR

# Ports. SHOP_PORT_OFFSET (default 0) moves every port at once, so a second clone runs beside
# the first with e.g. `export SHOP_PORT_OFFSET=100` (PostgreSQL 5532, Kafka 9192/9193, order
# 50151 + 8181, payment 50152, inventory 50153, metrics 9564-9566, Prometheus 9190, Jaeger 4417/4418
# and UI 16786). Offset 1 would collide (9092+1 = 9093), so
# use a multiple of 10. Each variable below can also be set on its own and wins over the offset.
SHOP_PORT_OFFSET="${SHOP_PORT_OFFSET:-0}"
[[ "$SHOP_PORT_OFFSET" =~ ^[0-9]+$ ]] || {
  printf 'error: SHOP_PORT_OFFSET must be a number, not "%s"\n' "$SHOP_PORT_OFFSET" >&2
  exit 1
}
PGPORT="${PGPORT:-$((5432 + SHOP_PORT_OFFSET))}"
KAFKA_PORT="${KAFKA_PORT:-$((9092 + SHOP_PORT_OFFSET))}"
KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-$((9093 + SHOP_PORT_OFFSET))}"
ORDER_GRPC_PORT="${ORDER_GRPC_PORT:-$((50051 + SHOP_PORT_OFFSET))}"
ORDER_HTTP_PORT="${ORDER_HTTP_PORT:-$((8081 + SHOP_PORT_OFFSET))}"
PAYMENT_GRPC_PORT="${PAYMENT_GRPC_PORT:-$((50052 + SHOP_PORT_OFFSET))}"
INVENTORY_GRPC_PORT="${INVENTORY_GRPC_PORT:-$((50053 + SHOP_PORT_OFFSET))}"
# Prometheus /metrics of each service, and the observability stack of `up.sh --observe`.
ORDER_METRICS_PORT="${ORDER_METRICS_PORT:-$((9464 + SHOP_PORT_OFFSET))}"
PAYMENT_METRICS_PORT="${PAYMENT_METRICS_PORT:-$((9465 + SHOP_PORT_OFFSET))}"
INVENTORY_METRICS_PORT="${INVENTORY_METRICS_PORT:-$((9466 + SHOP_PORT_OFFSET))}"
PROMETHEUS_PORT="${PROMETHEUS_PORT:-$((9090 + SHOP_PORT_OFFSET))}"
JAEGER_OTLP_GRPC_PORT="${JAEGER_OTLP_GRPC_PORT:-$((4317 + SHOP_PORT_OFFSET))}"
JAEGER_OTLP_HTTP_PORT="${JAEGER_OTLP_HTTP_PORT:-$((4318 + SHOP_PORT_OFFSET))}"
JAEGER_UI_PORT="${JAEGER_UI_PORT:-$((16686 + SHOP_PORT_OFFSET))}"
JAEGER_QUERY_GRPC_PORT="${JAEGER_QUERY_GRPC_PORT:-$((16685 + SHOP_PORT_OFFSET))}"
for _port in "$PGPORT" "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT" "$ORDER_GRPC_PORT" "$ORDER_HTTP_PORT" \
  "$PAYMENT_GRPC_PORT" "$INVENTORY_GRPC_PORT" "$ORDER_METRICS_PORT" "$PAYMENT_METRICS_PORT" \
  "$INVENTORY_METRICS_PORT" "$PROMETHEUS_PORT" "$JAEGER_OTLP_GRPC_PORT" "$JAEGER_OTLP_HTTP_PORT" \
  "$JAEGER_UI_PORT" "$JAEGER_QUERY_GRPC_PORT"; do
  if ! [[ "$_port" =~ ^[0-9]+$ ]] || ((_port < 1 || _port > 65535)); then
    printf 'error: port %s is not a valid TCP port (check SHOP_PORT_OFFSET and the *_PORT variables)\n' "$_port" >&2
    exit 1
  fi
done
unset _port
export SHOP_PORT_OFFSET PGPORT KAFKA_PORT KAFKA_CONTROLLER_PORT
export ORDER_GRPC_PORT ORDER_HTTP_PORT PAYMENT_GRPC_PORT INVENTORY_GRPC_PORT
export ORDER_METRICS_PORT PAYMENT_METRICS_PORT INVENTORY_METRICS_PORT PROMETHEUS_PORT
export JAEGER_OTLP_GRPC_PORT JAEGER_OTLP_HTTP_PORT JAEGER_UI_PORT JAEGER_QUERY_GRPC_PORT

# 4.1.1 resolves from Maven Central and runs on Java 17 here (checked 2026-11, so the planned
# fallback 4.4.0 was not needed). Another version may need KAFKA_LOG4J_VERSION (see kafka.sh).
KAFKA_VERSION="${KAFKA_VERSION:-4.1.1}"
KAFKA_BROKERS="${KAFKA_BROKERS:-127.0.0.1:${KAFKA_PORT}}"
export KAFKA_VERSION KAFKA_BROKERS

# What the services, test.sh and bench.sh connect to: the PostgreSQL of this state dir.
pg_url() {
  printf 'postgres://shop:shop@127.0.0.1:%s/%s' "$PGPORT" "$1"
}

mkdir -p "$SHOP_CACHE_DIR/bin" "$SHOP_STATE_DIR/pids" "$SHOP_STATE_DIR/logs"
case ":$PATH:" in
  *":$SHOP_CACHE_DIR/bin:"*) ;;
  *) PATH="$SHOP_CACHE_DIR/bin:$PATH" ;;
esac
export PATH

# log MSG... — progress to stderr so stdout stays usable for data.
log() {
  printf '==> %s\n' "$*" >&2
}

# rotate_log FILE — before a start that appends to FILE: past 64 MiB it becomes FILE.1 (the one
# before is dropped), so that a development stack restarted all day by the tests does not fill
# the disk (the broker's log reached 1.1 GB in a day of test runs).
rotate_log() {
  local size
  size="$(stat -c %s "$1" 2>/dev/null || echo 0)"
  if ((size > 64 * 1024 * 1024)); then
    mv -f "$1" "$1.1"
  fi
}

# die MSG... — print an error and exit non-zero.
die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

# ensure_build_deps — what compiling the workspace needs from Debian beyond a C toolchain:
# librdkafka is built with SSL (rdkafka's `ssl` feature links the system's OpenSSL, found by
# pkg-config). Installs libssl-dev and pkg-config with apt-get if missing (CI runs as root).
ensure_build_deps() {
  local missing=()
  command -v pkg-config >/dev/null || missing+=(pkg-config)
  dpkg-query -W -f='${Status}' libssl-dev 2>/dev/null | grep -q 'install ok installed' ||
    missing+=(libssl-dev)
  ((${#missing[@]} == 0)) && return 0
  ((EUID == 0)) || die "missing ${missing[*]}; run this once as root or apt-get install ${missing[*]}"
  log "installing ${missing[*]} (Debian packages, to build librdkafka with SSL)"
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null 2>&1; then
    # A fresh machine's package lists may be missing or stale.
    DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null ||
      die "apt-get install ${missing[*]} failed"
  fi
}

# wait_for [--pid PID] DESCRIPTION TIMEOUT_SECONDS LOGFILE CMD [ARGS...]
# Polls CMD (its output discarded) every 0.5 s until it succeeds or the deadline passes.
# With --pid, fails at once if that process exits meanwhile (a crashed server, not a slow one).
# On failure prints the tail of LOGFILE (pass "" when there is none) so the cause shows.
wait_for() {
  local pid=""
  if [[ "${1:-}" == --pid ]]; then
    pid="$2"
    shift 2
  fi
  local what="$1" timeout="$2" logfile="$3"
  shift 3
  log "waiting for ${what} (up to ${timeout}s)"
  local deadline=$((SECONDS + timeout)) why=""
  until "$@" >/dev/null 2>&1; do
    if [[ -n "$pid" ]] && ! proc_alive "$pid"; then
      why="process $pid exited while waiting for ${what}"
    elif ((SECONDS >= deadline)); then
      why="timed out after ${timeout}s waiting for ${what}"
    else
      sleep 0.5
      continue
    fi
    printf 'error: %s\n' "$why" >&2
    if [[ -n "$logfile" && -f "$logfile" ]]; then
      printf -- '--- last lines of %s ---\n' "$logfile" >&2
      tail -n 30 "$logfile" >&2
      printf -- '---\n' >&2
    fi
    return 1
  done
}

# proc_alive PID — true if PID runs and is not a zombie. PID 1 on these machines is not
# an init that reaps orphans, so a killed daemon can linger as a zombie that `kill -0` still sees.
proc_alive() {
  local pid="$1" state
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  # Field 3 of /proc/PID/stat is the state; the command name (field 2) may hold spaces,
  # so cut at the last ')'.
  state="$(sed -e 's/^.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1)" || return 1
  [[ -n "$state" && "$state" != Z && "$state" != X ]]
}

# pid_alive PIDFILE — true if PIDFILE names a running process.
pid_alive() {
  local pidfile="$1" pid
  [[ -f "$pidfile" ]] || return 1
  pid="$(cat "$pidfile" 2>/dev/null || true)"
  proc_alive "$pid"
}

# stop_pidfile NAME PIDFILE [TIMEOUT] — SIGTERM the process, wait up to TIMEOUT s, then SIGKILL.
# Removes the pid file. Quietly does nothing when the process is not running.
stop_pidfile() {
  local name="$1" pidfile="$2" timeout="${3:-30}" pid
  if ! pid_alive "$pidfile"; then
    rm -f "$pidfile"
    return 0
  fi
  pid="$(cat "$pidfile")"
  log "stopping ${name} (pid ${pid})"
  kill -TERM "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + timeout))
  while proc_alive "$pid"; do
    if ((SECONDS >= deadline)); then
      log "${name} did not exit within ${timeout}s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.5
  done
  # SIGKILL is asynchronous: wait (bounded) until the process is really gone.
  local i
  for ((i = 0; i < 50; i++)); do
    proc_alive "$pid" || break
    sleep 0.2
  done
  rm -f "$pidfile"
}

# port_open HOST PORT — true if something accepts TCP connections there (bash /dev/tcp, no nc needed).
port_open() {
  (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}
