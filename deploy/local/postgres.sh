#!/usr/bin/env bash
# PostgreSQL for this clone: a private cluster (initdb + pg_ctl, Debian's `postgresql` binaries,
# installed with apt-get if missing) whose data, socket and log live under $SHOP_STATE_DIR next to
# Kafka's log, so two clones never share half their state. Listens on 127.0.0.1:$PGPORT only;
# role shop/shop (scram over TCP), databases orders, payments, inventory.
#
#   $SHOP_STATE_DIR/postgres/data        the cluster (owned by the postgres OS user when run as root)
#   $SHOP_STATE_DIR/postgres/            its Unix socket (admin access, peer auth)
#   $SHOP_STATE_DIR/logs/postgres.log    the server log
#
# usage: deploy/local/postgres.sh {start|stop|restart|status|kill|drop-test-databases}
#   start    create the cluster if missing, start it, ensure role and databases (idempotent)
#   stop     fast shutdown (rolls back open transactions); data stays
#   restart  stop + start, same data
#   status   exit 0 when running and accepting connections on $PGPORT
#   kill     SIGKILL the postmaster and its backends, like a crash; the next start recovers
#   drop-test-databases  drop the per-test databases (t_*) earlier test runs left behind: a
#            whole test run leaves ~180 (7 GB), and a start after a crash fsyncs every file
#            of the cluster before it replays the WAL (56 s instead of 1 s on a loaded machine)
#   env: PGPORT (5432 + SHOP_PORT_OFFSET), PG_MAX_CONNECTIONS (400), PG_SHARED_BUFFERS (512MB), SHOP_STATE_DIR
#
# A Debian-managed cluster (pg_createcluster, e.g. the package's 15/main, or the one this script
# used to run) that holds our port is stopped and set to `manual` start when it is the default
# `main` cluster and holds nothing but the defaults and this project's databases (or CI=true);
# anything else on the port is left alone and start fails, asking for another PGPORT.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PG_PORT="$PGPORT"
PG_HOST=127.0.0.1
# Tests open many pools (one database per test, several services at once).
PG_MAX_CONNECTIONS="${PG_MAX_CONNECTIONS:-400}"
DATABASES=(orders payments inventory)
PG_STATE="$SHOP_STATE_DIR/postgres"
PG_DATA="$PG_STATE/data"
PG_SOCKET_DIR="$PG_STATE"
PG_LOG="$SHOP_STATE_DIR/logs/postgres.log"
PG_LOCK="$SHOP_STATE_DIR/pids/postgres.lock"

# initdb and postgres refuse to run as root: as root the cluster belongs to the postgres OS user
# (created by the Debian package); otherwise to whoever runs the script.
if ((EUID == 0)); then
  PG_OWNER=postgres
else
  PG_OWNER="$(id -un)"
fi

ensure_installed() {
  if compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null && command -v psql >/dev/null; then
    return 0
  fi
  ((EUID == 0)) || die "PostgreSQL is not installed; run this once as root or apt-get install postgresql"
  log "installing PostgreSQL (Debian package postgresql, ~1 min)"
  export DEBIAN_FRONTEND=noninteractive
  # The package would create and start its own cluster 15/main on 5432 (our default port); we
  # run a private one, so switch that off for this install only (postgresql-common reads this
  # drop-in), and remove the drop-in afterwards so later installs behave as usual.
  local dropin=/etc/postgresql-common/createcluster.d/00-shop-pipeline-no-main-cluster.conf
  mkdir -p "$(dirname "$dropin")"
  printf '# Temporary, written by deploy/local/postgres.sh while it installs PostgreSQL.\ncreate_main_cluster = off\n' >"$dropin"
  # A fresh machine's package lists may be missing or stale, so update first.
  local ok=1
  apt-get update -q >/dev/null && apt-get install -y -q postgresql >/dev/null || ok=0
  rm -f "$dropin"
  ((ok)) || die "apt-get install postgresql failed"
}

# The newest installed server major version (e.g. 15).
pg_version() {
  local v
  v="$(find /usr/lib/postgresql -mindepth 3 -maxdepth 3 -path '*/bin/postgres' 2>/dev/null |
    sed -E 's|^/usr/lib/postgresql/([^/]+)/bin/postgres$|\1|' | sort -V | tail -n 1)"
  [[ -n "$v" ]] || die "no PostgreSQL server found under /usr/lib/postgresql"
  echo "$v"
}

as_owner() {
  # cd / so the tools do not complain that they cannot read the caller's cwd.
  if ((EUID == 0)); then
    (cd / && runuser -u "$PG_OWNER" -- "$@")
  else
    (cd / && "$@")
  fi
}

psql_admin() {
  as_owner "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$PG_SOCKET_DIR" -p "$PG_PORT" \
    -U "$PG_OWNER" -d postgres "$@"
}

ready() {
  "$PG_BIN/pg_isready" -q -h "$PG_HOST" -p "$PG_PORT"
}

# postmaster_pid — the pid in our data dir's postmaster.pid (may be stale).
postmaster_pid() {
  [[ -f "$PG_DATA/postmaster.pid" ]] || return 1
  head -n 1 "$PG_DATA/postmaster.pid"
}

# is_our_postmaster PID — a live postgres process whose working directory is our data dir (the
# postmaster chdirs there). A stale pid file must never make us wait on or kill another process.
is_our_postmaster() {
  local pid="$1"
  proc_alive "$pid" || return 1
  [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == postgres ]] || return 1
  [[ "$(readlink -f "/proc/$pid/cwd" 2>/dev/null)" == "$(readlink -f "$PG_DATA")" ]]
}

running() {
  local pid
  pid="$(postmaster_pid)" && is_our_postmaster "$pid"
}

# The port our running server listens on (line 4 of postmaster.pid).
running_port() {
  sed -n 4p "$PG_DATA/postmaster.pid" 2>/dev/null
}

# After a SIGKILL the dead postmaster can linger as a zombie for a while (PID 1 here reaps
# late), and PostgreSQL's own lock check (kill -0) then takes it for a live server and
# refuses to start. A pid file whose process is gone or a zombie is stale: remove it.
clear_stale_pidfile() {
  local pid
  pid="$(postmaster_pid)" || return 0
  if ! proc_alive "$pid"; then
    rm -f "$PG_DATA/postmaster.pid"
  fi
}

# ensure_reachable DIR — the cluster's owner must be able to reach DIR. As root the state dir may
# sit under /root (mode 700 on many machines): grant the postgres user search permission (x,
# not read) on each blocking ancestor with an ACL, so that no other user gains anything.
ensure_reachable() {
  local dir="$1" d="" part
  ((EUID == 0)) || return 0
  as_owner test -x "$dir" && return 0
  # Top down, so that only the directories that really block get the grant.
  local parts
  IFS=/ read -ra parts <<<"${dir#/}"
  for part in "${parts[@]}"; do
    d="$d/$part"
    as_owner test -x "$d" && continue
    if ! command -v setfacl >/dev/null; then
      log "installing acl (Debian package) to grant the postgres user access to $d"
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q acl >/dev/null 2>&1 ||
        { DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null &&
          DEBIAN_FRONTEND=noninteractive apt-get install -y -q acl >/dev/null; } ||
        die "apt-get install acl failed"
    fi
    log "granting the postgres user search permission (ACL u:postgres:x) on $d so it can reach $dir"
    setfacl -m u:postgres:x "$d" 2>/dev/null || true
    as_owner test -x "$d" ||
      die "the postgres user cannot reach $dir (ACLs unsupported here?); grant it search permission on $d (chmod o+x $d) or set SHOP_STATE_DIR to a directory it can reach"
  done
}

init_cluster() {
  mkdir -p "$PG_STATE"
  if ((EUID == 0)); then
    chown "$PG_OWNER:$PG_OWNER" "$PG_STATE"
  fi
  chmod 700 "$PG_STATE"
  ensure_reachable "$PG_STATE"
  # Unix socket paths are limited to 107 bytes; fail clearly instead of in the server log.
  local socket="$PG_SOCKET_DIR/.s.PGSQL.$PG_PORT"
  ((${#socket} <= 100)) ||
    die "socket path $socket is too long for a Unix socket; choose a shorter SHOP_STATE_DIR"
  [[ -f "$PG_DATA/PG_VERSION" ]] && return 0
  log "creating a private PostgreSQL $PG_VER cluster in $PG_DATA (initdb)"
  # A Kafka log that outlives its databases replays events the new databases never saw.
  if [[ -f "$SHOP_STATE_DIR/kafka/data/meta.properties" ]]; then
    log "warning: $SHOP_STATE_DIR/kafka already holds a Kafka log written next to other databases;" \
      "for a consistent start run deploy/local/down.sh --purge first"
  fi
  rm -rf "$PG_DATA"
  # peer for the owner over the socket (admin), scram-sha-256 over TCP (the services).
  as_owner "$PG_BIN/initdb" -D "$PG_DATA" -U "$PG_OWNER" -E UTF8 --locale=C.UTF-8 \
    --auth-local=peer --auth-host=scram-sha-256 >"$PG_STATE/initdb.log" 2>&1 || {
    cat "$PG_STATE/initdb.log" >&2
    rm -rf "$PG_DATA"
    die "initdb failed"
  }
}

# Our settings, rewritten at every start (a changed PGPORT takes effect at the next start) and
# included from postgresql.conf, so `pg_ctl start` by hand brings up the same server.
write_config() {
  as_owner tee "$PG_DATA/shop.conf" >/dev/null <<EOF
# Written by deploy/local/postgres.sh at every start; edits are overwritten.
listen_addresses = '$PG_HOST'
port = $PG_PORT
unix_socket_directories = '$PG_SOCKET_DIR'
max_connections = $PG_MAX_CONNECTIONS
# A write-heavy node: every order is a few small transactions. Larger
# buffers and rarer checkpoints cut the WAL written per order (fewer
# full-page images); commits still wait for the WAL flush
# (synchronous_commit stays on: an accepted order is durable).
shared_buffers = '${PG_SHARED_BUFFERS:-512MB}'
wal_buffers = '16MB'
max_wal_size = '4GB'
min_wal_size = '1GB'
checkpoint_timeout = '15min'
checkpoint_completion_target = 0.9
# Per-statement counts and times for profiling (BENCHMARKS.md): SELECT ... FROM
# pg_stat_statements after CREATE EXTENSION pg_stat_statements in any database.
shared_preload_libraries = 'pg_stat_statements'
EOF
  grep -qxF "include_if_exists = 'shop.conf'" "$PG_DATA/postgresql.conf" ||
    echo "include_if_exists = 'shop.conf'" | as_owner tee -a "$PG_DATA/postgresql.conf" >/dev/null
}

# ---------------------------------------------------------------------------------------------
# Our port held by someone else.
# ---------------------------------------------------------------------------------------------

# debian_cluster_on_port — prints "VERSION NAME OWNER DATADIR" of an online Debian-managed
# cluster configured on our port, if any.
debian_cluster_on_port() {
  command -v pg_lsclusters >/dev/null || return 1
  pg_lsclusters -h 2>/dev/null | awk -v p="$PG_PORT" '$3 == p && $4 ~ /^online/ { print $1, $2, $5, $6; exit }' | grep .
}

# Databases a package-created cluster has, plus the ones this project's scripts create there.
only_default_databases() {
  local ver="$1" name="$2" dbs
  dbs="$( (cd / && runuser -u postgres -- psql --cluster "$ver/$name" -X -At -d postgres \
    -c 'SELECT datname FROM pg_database') 2>/dev/null)" || return 1
  ! grep -vxE 'postgres|template0|template1|orders|payments|inventory|t_.*' <<<"$dbs" | grep -q .
}

# port_owner_hint — what holds our port, as far as we can tell (pid and data dir).
port_owner_hint() {
  local pid
  pid="$(ss -Hltnp "sport = :$PG_PORT" 2>/dev/null | grep -oE 'pid=[0-9]+' | head -n 1 | cut -d= -f2)"
  [[ -n "$pid" ]] || return 0
  printf ' (pid %s: %s, cwd %s)' "$pid" "$(cat "/proc/$pid/comm" 2>/dev/null)" \
    "$(readlink "/proc/$pid/cwd" 2>/dev/null)"
}

# free_our_port — make sure nothing but us will listen on $PG_PORT.
free_our_port() {
  port_open "$PG_HOST" "$PG_PORT" || return 0
  local found ver name owner datadir
  if found="$(debian_cluster_on_port)"; then
    read -r ver name owner datadir <<<"$found"
    local why=""
    if [[ "$name" == main && "$owner" == postgres && "$datadir" == "/var/lib/postgresql/$ver/main" ]] && ((EUID == 0)); then
      if [[ "${CI:-}" == true ]]; then
        why="CI=true"
      elif only_default_databases "$ver" "$name"; then
        why="it holds only the default databases and this project's"
      fi
    fi
    if [[ -z "$why" ]]; then
      die "port $PG_PORT is taken by the Debian cluster $ver/$name (data $datadir), which is not ours and" \
        "may hold someone's data; leave it running and set PGPORT (or SHOP_PORT_OFFSET) to another port"
    fi
    log "port $PG_PORT is held by the Debian cluster $ver/$name (made by the package or by an older" \
      "postgres.sh; $why): stopping it and setting its start.conf to manual. Its data stays in" \
      "$datadir (start it again with: pg_ctlcluster $ver $name start, on another port; remove it with: pg_dropcluster --stop $ver $name)"
    pg_ctlcluster "$ver" "$name" stop -m fast 9>&-
    local conf="/etc/postgresql/$ver/$name/start.conf"
    if [[ -f "$conf" ]]; then
      sed -i -E 's/^(auto|disabled)[[:space:]]*$/manual/' "$conf"
    fi
    wait_port_closed 10 || die "port $PG_PORT still open after stopping $ver/$name"
    return 0
  fi
  die "port $PG_PORT on $PG_HOST is taken by a process not started from $SHOP_STATE_DIR$(port_owner_hint);" \
    "stop it or set PGPORT (or SHOP_PORT_OFFSET) to another port"
}

# just_killed ERRFILE — the failed start looks like the one right after a SIGKILL (old lock file or
# shared memory still around), which is worth a retry.
just_killed() {
  { cat "$1"; tail -n 5 "$PG_LOG"; } 2>/dev/null | grep -qiE 'lock file|shared memory|already'
}

wait_port_closed() {
  local deadline=$((SECONDS + $1))
  while port_open "$PG_HOST" "$PG_PORT"; do
    ((SECONDS < deadline)) || return 1
    sleep 0.2
  done
}

# ---------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------
cmd_start() {
  # Serialise concurrent starts of this state dir (role and database creation would race).
  exec 9>"$PG_LOCK"
  flock 9
  ensure_installed
  PG_VER="$(pg_version)"
  PG_BIN="/usr/lib/postgresql/$PG_VER/bin"
  if running; then
    local port
    port="$(running_port)"
    [[ "$port" == "$PG_PORT" ]] ||
      die "this state dir's PostgreSQL runs on port $port, not $PG_PORT; run '$0 stop' and start again, or set PGPORT=$port"
    ready || wait_for "PostgreSQL on $PG_HOST:$PG_PORT" 60 "$PG_LOG" ready ||
      die "PostgreSQL (pid $(postmaster_pid)) runs but does not accept connections (log: $PG_LOG)"
    log "PostgreSQL $PG_VER already running on $PG_HOST:$PG_PORT ($PG_DATA)"
  else
    # Other clones' clusters, and Debian's, must not answer in our place.
    (
      exec 8>"$SHOP_CACHE_DIR/postgres-port.lock"
      flock 8
      free_our_port
    )
    init_cluster
    write_config
    clear_stale_pidfile
    rotate_log "$PG_LOG"
    touch "$PG_LOG"
    ((EUID != 0)) || chown "$PG_OWNER" "$PG_LOG"
    as_owner test -w "$PG_LOG" || die "the $PG_OWNER user cannot write $PG_LOG (check the modes of $SHOP_STATE_DIR/logs)"
    log "starting PostgreSQL $PG_VER on $PG_HOST:$PG_PORT ($PG_DATA, log $PG_LOG)"
    # Right after a SIGKILL the old server may still hold its lock file or shared memory for a
    # moment; retry that case within a deadline, fail at once on anything else.
    local deadline=$((SECONDS + 60)) err
    err="$(mktemp)"
    # 9>&-: the server must not inherit the lock, or it would hold it for its lifetime.
    # pg_ctl puts the postmaster in its own session, so the caller's Ctrl-C does not reach it.
    until as_owner "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -w -t 60 start >/dev/null 2>"$err" 9>&-; do
      if running || ((SECONDS >= deadline)) || ! just_killed "$err"; then
        cat "$err" >&2
        tail -n 20 "$PG_LOG" >&2
        rm -f "$err"
        die "PostgreSQL did not start (log: $PG_LOG)"
      fi
      sleep 1
      clear_stale_pidfile
    done
    rm -f "$err"
    wait_for "PostgreSQL on $PG_HOST:$PG_PORT" 60 "$PG_LOG" ready ||
      die "PostgreSQL did not accept connections (log: $PG_LOG)"
  fi
  ensure_role_and_databases
  # Prove what the services will do: password login over TCP.
  "$PG_BIN/psql" -X -q -At "$(pg_url orders)" -c 'select 1' >/dev/null ||
    die "password login as shop over TCP failed; check $PG_DATA/pg_hba.conf"
  local dbs
  printf -v dbs '%s,' "${DATABASES[@]}"
  log "PostgreSQL ready: $(pg_url "{${dbs%,}}")"
}

ensure_role_and_databases() {
  # DO block: CREATE ROLE has no IF NOT EXISTS. The password is (re)set every time, so the role
  # works however it was left.
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
-- For profiling (BENCHMARKS.md): shop reads every database's statements from here.
CREATE EXTENSION IF NOT EXISTS pg_stat_statements;
GRANT pg_read_all_stats TO shop;
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
  if ! running; then
    log "PostgreSQL ($PG_DATA) not running"
    return 0
  fi
  PG_VER="$(pg_version)"
  PG_BIN="/usr/lib/postgresql/$PG_VER/bin"
  ensure_reachable "$PG_STATE"
  log "stopping PostgreSQL ($PG_DATA)"
  # fast: roll back open transactions and disconnect clients instead of waiting for them.
  as_owner "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w -t 60 stop >/dev/null
}

cmd_kill() {
  # For fault tests: a crash, so the next start runs crash recovery from the WAL.
  local pid
  if ! pid="$(postmaster_pid)" || ! is_our_postmaster "$pid"; then
    log "PostgreSQL ($PG_DATA) not running"
    return 0
  fi
  log "killing PostgreSQL (SIGKILL postmaster $pid and its backends)"
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

cmd_drop_test_databases() {
  running || die "PostgreSQL ($PG_DATA) is not running; run '$0 start' first"
  PG_VER="$(pg_version)"
  PG_BIN="/usr/lib/postgresql/$PG_VER/bin"
  ensure_reachable "$PG_STATE"
  local db dropped=0
  while read -r db; do
    [[ -n "$db" ]] || continue
    psql_admin -c "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null || true
    dropped=$((dropped + 1))
  done < <(psql_admin -At -c "SELECT datname FROM pg_database WHERE datname LIKE 't\\_%'")
  ((dropped == 0)) || log "dropped $dropped databases left by earlier test runs"
}

cmd_status() {
  if running; then
    PG_VER="$(pg_version)"
    PG_BIN="/usr/lib/postgresql/$PG_VER/bin"
    if [[ "$(running_port)" == "$PG_PORT" ]] && ready; then
      echo "postgres: running (pid $(postmaster_pid), PostgreSQL $PG_VER) on $PG_HOST:$PG_PORT, data $PG_DATA"
      return 0
    fi
    echo "postgres: pid $(postmaster_pid) alive (data $PG_DATA, port $(running_port)) but not answering on $PG_HOST:$PG_PORT"
    return 1
  fi
  echo "postgres: not running (data $PG_DATA)"
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
  drop-test-databases) cmd_drop_test_databases ;;
  *)
    echo "usage: $0 {start|stop|restart|status|kill|drop-test-databases}" >&2
    exit 2
    ;;
esac
