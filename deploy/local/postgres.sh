#!/usr/bin/env bash
# Debian's PostgreSQL, run through its cluster tools (pg_createcluster / pg_ctlcluster), no
# containers. Creates role shop/shop and the databases orders, payments, inventory.
#
# usage: deploy/local/postgres.sh {start|stop|restart|status|kill}
#   env: PGPORT (5432), PG_CLUSTER (main), PG_MAX_CONNECTIONS (400)
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PG_PORT="${PGPORT:-5432}"
PG_CLUSTER="${PG_CLUSTER:-main}"
PG_HOST=127.0.0.1
# Tests open many pools (one database per test, several services at once).
PG_MAX_CONNECTIONS="${PG_MAX_CONNECTIONS:-400}"
DATABASES=(orders payments inventory)

ensure_installed() {
  if command -v pg_ctlcluster >/dev/null && compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null; then
    return 0
  fi
  log "installing PostgreSQL (Debian package postgresql, ~1 min)"
  export DEBIAN_FRONTEND=noninteractive
  # A fresh machine's package lists may be missing or stale, so update first.
  apt-get update -q >/dev/null
  apt-get install -y -q postgresql >/dev/null
}

# The newest installed server major version (e.g. 15).
pg_version() {
  local v
  v="$(find /usr/lib/postgresql -mindepth 3 -maxdepth 3 -path '*/bin/postgres' 2>/dev/null |
    sed -E 's|^/usr/lib/postgresql/([^/]+)/bin/postgres$|\1|' | sort -V | tail -n 1)"
  [[ -n "$v" ]] || die "no PostgreSQL server found under /usr/lib/postgresql"
  echo "$v"
}

as_postgres() {
  # cd / so psql does not complain that it cannot read the caller's cwd.
  (cd / && runuser -u postgres -- "$@")
}

psql_admin() {
  as_postgres psql -X -q -v ON_ERROR_STOP=1 -h /var/run/postgresql -p "$PG_PORT" -d postgres "$@"
}

cluster_running() {
  # Status column: "online", "online,recovery" or "down".
  [[ "$(pg_lsclusters -h "$PG_VER" "$PG_CLUSTER" 2>/dev/null | awk '{print $4}')" == online* ]]
}

ready() {
  pg_isready -q -h "$PG_HOST" -p "$PG_PORT"
}

configure_cluster() {
  local conf="/etc/postgresql/$PG_VER/$PG_CLUSTER"
  if [[ ! -d "$conf" ]]; then
    log "creating PostgreSQL $PG_VER cluster '$PG_CLUSTER'"
    pg_createcluster "$PG_VER" "$PG_CLUSTER" -p "$PG_PORT" >/dev/null
  fi
  # pg_conftool edits postgresql.conf in place; values only take effect at the next start.
  # pg_conftool leaves a dotted address unquoted (invalid) and quoting it ourselves gets the
  # quotes doubled, so set listen_addresses with sed; the first assignment line wins the edit.
  sed -i -E "s/^#?[[:space:]]*listen_addresses[[:space:]]*=.*/listen_addresses = '$PG_HOST'/" "$conf/postgresql.conf"
  pg_conftool "$PG_VER" "$PG_CLUSTER" set port "$PG_PORT"
  pg_conftool "$PG_VER" "$PG_CLUSTER" set max_connections "$PG_MAX_CONNECTIONS"
  # Debian's pg_hba.conf already allows scram-sha-256 from 127.0.0.1/32; make sure it does.
  local hba="$conf/pg_hba.conf"
  if ! grep -Eq '^host[[:space:]]+all[[:space:]]+all[[:space:]]+127\.0\.0\.1/32[[:space:]]+(scram-sha-256|md5)' "$hba"; then
    echo 'host    all             all             127.0.0.1/32            scram-sha-256' >>"$hba"
  fi
}

data_dir() {
  pg_lsclusters -h "$PG_VER" "$PG_CLUSTER" 2>/dev/null | awk '{print $6}'
}

postmaster_pid() {
  local pidfile
  pidfile="$(data_dir)/postmaster.pid"
  [[ -f "$pidfile" ]] || return 1
  head -n 1 "$pidfile"
}

# After a SIGKILL the dead postmaster can linger as a zombie for a while (PID 1 here reaps
# late), and PostgreSQL's own lock check (kill -0) then takes it for a live server and
# refuses to start. A pid file whose process is gone or a zombie is stale: remove it.
clear_stale_pidfile() {
  local pid
  pid="$(postmaster_pid)" || return 0
  if ! proc_alive "$pid"; then
    rm -f "$(data_dir)/postmaster.pid"
  fi
}

cmd_start() {
  # One cluster per machine, shared by every clone: serialise concurrent starts (role and
  # database creation would race).
  exec 9>"$SHOP_CACHE_DIR/postgres.lock"
  flock 9
  ensure_installed
  PG_VER="$(pg_version)"
  if cluster_running && ready; then
    log "PostgreSQL $PG_VER/$PG_CLUSTER already running on $PG_HOST:$PG_PORT"
  else
    configure_cluster
    clear_stale_pidfile
    log "starting PostgreSQL $PG_VER/$PG_CLUSTER on $PG_HOST:$PG_PORT"
    # Right after a SIGKILL the old server may still hold its lock file or shared memory for a
    # moment; retry that case within a deadline, fail at once on anything else.
    local deadline=$((SECONDS + 60)) err
    err="$(mktemp)"
    # 9>&-: the server must not inherit the lock, or it would hold it for its lifetime.
    until cluster_running || pg_ctlcluster "$PG_VER" "$PG_CLUSTER" start 2>"$err" 9>&-; do
      if ((SECONDS >= deadline)) || ! grep -qiE 'lock file|shared memory|already' "$err"; then
        cat "$err" >&2
        rm -f "$err"
        die "PostgreSQL $PG_VER/$PG_CLUSTER did not start (log: $(pg_log))"
      fi
      sleep 1
      clear_stale_pidfile
    done
    rm -f "$err"
    wait_for "PostgreSQL on $PG_HOST:$PG_PORT" 60 "$(pg_log)" ready ||
      die "PostgreSQL did not accept connections (log: $(pg_log))"
  fi
  ensure_role_and_databases
  # Prove what the services will do: password login over TCP.
  PGPASSWORD=shop psql -X -q -At "postgres://shop@$PG_HOST:$PG_PORT/orders" -c 'select 1' >/dev/null ||
    die "password login as shop over TCP failed; check /etc/postgresql/$PG_VER/$PG_CLUSTER/pg_hba.conf"
  log "PostgreSQL ready: postgres://shop:shop@$PG_HOST:$PG_PORT/{${DATABASES[*]}}"
}

pg_log() {
  echo "/var/log/postgresql/postgresql-$PG_VER-$PG_CLUSTER.log"
}

ensure_role_and_databases() {
  # DO block: CREATE ROLE has no IF NOT EXISTS. The password is (re)set every time, so a
  # role left by someone else with another password still ends up usable.
  psql_admin <<'SQL'
DO $$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'shop') THEN
    CREATE ROLE shop LOGIN CREATEDB PASSWORD 'shop';
  ELSE
    ALTER ROLE shop LOGIN CREATEDB PASSWORD 'shop';
  END IF;
END
$$;
SQL
  local db
  for db in "${DATABASES[@]}"; do
    # CREATE DATABASE cannot run inside a DO block; check first.
    if [[ "$(psql_admin -At -c "SELECT 1 FROM pg_database WHERE datname = '$db'")" != 1 ]]; then
      log "creating database $db"
      psql_admin -c "CREATE DATABASE \"$db\" OWNER shop"
    fi
  done
}

cmd_stop() {
  PG_VER="$(pg_version)"
  if ! cluster_running; then
    log "PostgreSQL $PG_VER/$PG_CLUSTER not running"
    return 0
  fi
  log "stopping PostgreSQL $PG_VER/$PG_CLUSTER"
  # fast: roll back open transactions and disconnect clients instead of waiting for them.
  pg_ctlcluster "$PG_VER" "$PG_CLUSTER" stop -m fast
}

cmd_kill() {
  # For fault tests: a crash, so the next start runs crash recovery from the WAL.
  PG_VER="$(pg_version)"
  local pid
  # Check the name too: a stale pid file must never make us kill an unrelated process.
  if ! pid="$(postmaster_pid)" || ! proc_alive "$pid" ||
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" != postgres ]]; then
    log "PostgreSQL $PG_VER/$PG_CLUSTER not running"
    return 0
  fi
  log "killing PostgreSQL $PG_VER/$PG_CLUSTER (SIGKILL postmaster $pid and its backends)"
  # Backends of a dead postmaster linger (and keep the shared memory) until they notice,
  # so kill them too: that is what a machine crash would do, and the next start is prompt.
  local children
  children="$(pgrep -P "$pid" || true)"
  kill -KILL "$pid" 2>/dev/null || true
  if [[ -n "$children" ]]; then
    # shellcheck disable=SC2086 # word splitting of the pid list is intended
    kill -KILL $children 2>/dev/null || true
  fi
  local i
  for ((i = 0; i < 50; i++)); do
    proc_alive "$pid" || break
    sleep 0.2
  done
}

cmd_status() {
  PG_VER="$(pg_version)"
  if cluster_running && ready; then
    echo "postgres: running ($PG_VER/$PG_CLUSTER) on $PG_HOST:$PG_PORT"
    return 0
  fi
  echo "postgres: not running ($PG_VER/$PG_CLUSTER)"
  return 1
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  restart)
    cmd_stop
    cmd_start
    ;;
  status) cmd_status ;;
  kill) cmd_kill ;;
  *)
    echo "usage: $0 {start|stop|restart|status|kill}" >&2
    exit 2
    ;;
esac
