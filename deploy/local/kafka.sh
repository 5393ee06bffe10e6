#!/usr/bin/env bash
# Real Apache Kafka 4.x, single node in KRaft mode (broker + controller in one JVM), no containers.
# The jars come from Maven Central via mvn and are cached in $SHOP_CACHE_DIR, shared by clones.
# The log (topics, offsets) lives in $SHOP_STATE_DIR/kafka, next to this clone's PostgreSQL
# cluster (postgres.sh); down.sh --purge removes both.
#
# usage: deploy/local/kafka.sh {install|start|stop|restart|status|kill|create-topics|delete-test-topics}
#   env: KAFKA_VERSION (4.1.1), KAFKA_PORT (9092), KAFKA_CONTROLLER_PORT (9093) (both + SHOP_PORT_OFFSET),
#        KAFKA_TOPIC_PREFIX (""), KAFKA_PARTITIONS (6), SHOP_CACHE_DIR, SHOP_STATE_DIR
# start waits for the group coordinator's loads too, and restarts the broker cleanly once when
# one of them completed from a stale epoch (see coordinator_sound below).
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

KAFKA_HOME="$SHOP_CACHE_DIR/kafka-$KAFKA_VERSION"
KAFKA_LIBS="$KAFKA_HOME/libs"
KAFKA_MARKER="$KAFKA_LIBS/.complete"
KAFKA_STATE="$SHOP_STATE_DIR/kafka"
KAFKA_DATA="$KAFKA_STATE/data"
KAFKA_PROPS="$KAFKA_STATE/server.properties"
KAFKA_LOG="$SHOP_STATE_DIR/logs/kafka.log"
KAFKA_PID="$SHOP_STATE_DIR/pids/kafka.pid"
KAFKA_HOST=127.0.0.1
KAFKA_BOOTSTRAP="$KAFKA_HOST:$KAFKA_PORT"
# Must equal the log4j-api/-core version the chosen Kafka release depends on.
KAFKA_LOG4J_VERSION="${KAFKA_LOG4J_VERSION:-2.24.3}"
TOPICS=(orders payments inventory orders.dlq payments.dlq inventory.dlq)

# ---------------------------------------------------------------------------------------------
# install: resolve the broker and the CLI tools (TopicCommand) with a throwaway pom.
# ---------------------------------------------------------------------------------------------
write_pom() {
  # Kafka 4.1 logs through SLF4J 1.7 and ships log4j-core 2.24.3 itself; log4j-slf4j-impl
  # (the SLF4J 1.x binding, same log4j version) routes that into log4j2, so our log4j2 config
  # decides what reaches the log file. Without it SLF4J would print nothing at all.
  # connect-runtime (Jetty, Jersey, ...) comes with kafka-tools but TopicCommand needs none of it.
  cat >"$KAFKA_HOME/pom.xml" <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.shop</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>$KAFKA_VERSION</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>$KAFKA_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka-tools</artifactId>
      <version>$KAFKA_VERSION</version>
      <exclusions>
        <exclusion>
          <groupId>org.apache.kafka</groupId>
          <artifactId>connect-runtime</artifactId>
        </exclusion>
      </exclusions>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>$KAFKA_LOG4J_VERSION</version>
    </dependency>
  </dependencies>
  <build>
    <plugins>
      <plugin>
        <groupId>org.apache.maven.plugins</groupId>
        <artifactId>maven-dependency-plugin</artifactId>
        <version>3.8.1</version>
      </plugin>
    </plugins>
  </build>
</project>
EOF
}

cmd_install() {
  [[ -f "$KAFKA_MARKER" ]] && return 0
  command -v java >/dev/null || die "java (17+) is not on PATH; install openjdk-17-jre-headless"
  command -v mvn >/dev/null || die "mvn is not on PATH; install maven"
  mkdir -p "$KAFKA_HOME"
  # Several scripts may start Kafka at once: only one resolves, the others wait for it.
  exec 8>"$KAFKA_HOME.lock"
  flock 8
  if [[ -f "$KAFKA_MARKER" ]]; then
    flock -u 8
    return 0
  fi
  log "resolving Apache Kafka $KAFKA_VERSION jars from Maven Central (first run only, ~1 min)"
  write_pom
  # Copy into a scratch dir and rename, so an interrupted run never leaves a half-filled libs/.
  local tmp="$KAFKA_HOME/libs.tmp"
  rm -rf "$tmp" "$KAFKA_LIBS"
  if ! mvn -q -B -f "$KAFKA_HOME/pom.xml" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$tmp" >"$KAFKA_HOME/mvn.log" 2>&1; then
    tail -n 30 "$KAFKA_HOME/mvn.log" >&2
    die "could not resolve Kafka $KAFKA_VERSION from Maven Central (log: $KAFKA_HOME/mvn.log)"
  fi
  mv "$tmp" "$KAFKA_LIBS"
  touch "$KAFKA_MARKER"
  flock -u 8
  log "Kafka $KAFKA_VERSION: $(find "$KAFKA_LIBS" -name '*.jar' | wc -l) jars in $KAFKA_LIBS"
}

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
ensure_kcat() {
  command -v kcat >/dev/null && return 0
  log "installing kcat (Debian package)"
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q kcat >/dev/null 2>&1; then
    # A fresh machine's package lists may be missing or stale.
    DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q kcat >/dev/null
  fi
}

# Run a Kafka main class with our jars. Tools log WARN+ to stderr only.
kafka_java() {
  local main="$1"
  shift
  # C1 only: these JVMs live a few seconds, so full JIT would be wasted start-up time.
  java -Xmx512m -XX:TieredStopAtLevel=1 \
    -Dlog4j2.configurationFile="$KAFKA_STATE/log4j2-tools.xml" \
    -cp "$KAFKA_LIBS/*" "$main" "$@"
}

write_log4j_configs() {
  mkdir -p "$KAFKA_STATE"
  # Broker: INFO to the log file (stdout is redirected there), quieter for chatty packages.
  cat >"$KAFKA_STATE/log4j2.xml" <<'EOF'
<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="WARN">
  <Appenders>
    <Console name="stdout" target="SYSTEM_OUT">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
    </Console>
  </Appenders>
  <Loggers>
    <Root level="INFO"><AppenderRef ref="stdout"/></Root>
    <Logger name="kafka.request.logger" level="WARN"/>
    <Logger name="kafka.network.RequestChannel$" level="WARN"/>
    <Logger name="kafka.log.LogCleaner" level="WARN"/>
    <Logger name="kafka.controller" level="WARN"/>
    <Logger name="state.change.logger" level="WARN"/>
    <Logger name="org.apache.kafka.clients" level="WARN"/>
    <Logger name="org.apache.kafka.common.utils.AppInfoParser" level="WARN"/>
    <Logger name="org.apache.kafka.common.config.AbstractConfig" level="WARN"/>
    <Logger name="org.apache.kafka.storage.internals.log" level="WARN"/>
    <Logger name="kafka.log" level="WARN"/>
    <Logger name="org.apache.kafka.raft" level="WARN"/>
    <Logger name="org.apache.kafka.image" level="WARN"/>
    <Logger name="org.apache.kafka.metadata" level="WARN"/>
  </Loggers>
</Configuration>
EOF
  # CLI tools (format, create-topics): only problems, on stderr.
  cat >"$KAFKA_STATE/log4j2-tools.xml" <<'EOF'
<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="WARN">
  <Appenders>
    <Console name="stderr" target="SYSTEM_ERR">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
    </Console>
  </Appenders>
  <Loggers>
    <Root level="WARN"><AppenderRef ref="stderr"/></Root>
  </Loggers>
</Configuration>
EOF
}

write_server_properties() {
  mkdir -p "$KAFKA_DATA"
  cat >"$KAFKA_PROPS" <<EOF
# Written by deploy/local/kafka.sh; edits are overwritten on the next start.
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=$KAFKA_HOST:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://$KAFKA_HOST:$KAFKA_PORT,CONTROLLER://$KAFKA_HOST:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://$KAFKA_HOST:$KAFKA_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$KAFKA_DATA
num.partitions=6
# Topics are created explicitly (create-topics); a typo must fail, not create a topic.
auto.create.topics.enable=false
# Single node: every internal topic has one replica.
default.replication.factor=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=6
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=6
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# Tests join consumer groups constantly; don't wait 3 s for more members.
group.initial.rebalance.delay.ms=0
# After a crash (kill) the controller refuses the restarted broker until the old incarnation's
# session expires; the default 9 s made each kill+start in fault tests take ~15 s. Heartbeats
# go over loopback inside one JVM, so a short session is safe here.
broker.heartbeat.interval.ms=500
broker.session.timeout.ms=3000
num.network.threads=2
num.io.threads=4
log.retention.hours=24
# A start replays the metadata log written since the last snapshot, and by default a snapshot
# waits for 20 MB of records or an hour: a development broker whose tests create and delete
# thousands of topics a day, restarted often, replayed ~300,000 records (20 s) at every start.
metadata.log.max.record.bytes.between.snapshots=1048576
metadata.log.max.snapshot.interval.ms=60000
EOF
}

# kafka_running — the pid file names a live JVM running our broker. Checking the command line
# means a stale pid file (e.g. after a reboot) never makes us wait on, or kill, another process.
kafka_running() {
  pid_alive "$KAFKA_PID" || return 1
  tr '\0' ' ' <"/proc/$(cat "$KAFKA_PID")/cmdline" 2>/dev/null | grep -qF "kafka.Kafka $KAFKA_PROPS"
}

ports_free() {
  ! port_open "$KAFKA_HOST" "$KAFKA_PORT" && ! port_open "$KAFKA_HOST" "$KAFKA_CONTROLLER_PORT"
}

# wait_broker_ports_free — after stop or kill, wait (10 s) for the ports the broker was started
# with (its server.properties), not the ones the environment names now: a changed KAFKA_PORT or
# SHOP_PORT_OFFSET must neither hide our broker's ports nor make us wait on another broker's.
wait_broker_ports_free() {
  local listeners port=$KAFKA_PORT cport=$KAFKA_CONTROLLER_PORT deadline=$((SECONDS + 10))
  listeners="$(sed -n 's/^listeners=//p' "$KAFKA_PROPS" 2>/dev/null || true)"
  [[ "$listeners" =~ PLAINTEXT://[^,]*:([0-9]+) ]] && port="${BASH_REMATCH[1]}"
  [[ "$listeners" =~ CONTROLLER://[^,]*:([0-9]+) ]] && cport="${BASH_REMATCH[1]}"
  while port_open "$KAFKA_HOST" "$port" || port_open "$KAFKA_HOST" "$cport"; do
    ((SECONDS < deadline)) || return 1
    sleep 0.2
  done
}

# wait_ports_free SECONDS — quietly wait until both listener ports are closed.
wait_ports_free() {
  local deadline=$((SECONDS + $1))
  until ports_free; do
    ((SECONDS < deadline)) || return 1
    sleep 0.2
  done
}

broker_answers() {
  kcat -b "$KAFKA_BOOTSTRAP" -L -m 2 >/dev/null 2>&1
}

all_partitions_led() {
  local meta
  meta="$(kcat -b "$KAFKA_BOOTSTRAP" -L -m 5 2>/dev/null)" || return 1
  ! grep -q 'leader -1' <<<"$meta"
}

# stale_coordinator_loads FROM_LINE — the broker's group coordinator after an unclean stop.
# Such a start changes every __consumer_offsets partition's leader epoch three times in well
# under a second (the stale epoch the broker's own metadata still names, then fenced, then led
# again), and Kafka 4.1.1 lets the load of the stale epoch complete the new epoch's loading:
# the coordinator then serves a state out of step with its log, every write for that partition
# fails ("New last written offset ... must be greater than ...", "No in-memory snapshot for
# epoch 0") and the consumer groups on it can never join again (NOT_COORDINATOR) until the
# broker restarts (BENCHMARKS.md, twelfth session). Prints "stale <partitions>" (empty when
# none) and "pending <n>" (loads not yet completed) for this start's part of the log.
stale_coordinator_loads() {
  tail -n "+$1" "$KAFKA_LOG" | awk '
    /Scheduling loading of metadata from __consumer_offsets-[0-9]+ with epoch/ {
      p = partition(); sched[p] = epoch(); done[p] = 0
    }
    /Finished loading of metadata from __consumer_offsets-[0-9]+ with epoch/ {
      p = partition(); if ((p in sched) && epoch() != sched[p]) stale[p] = 1; done[p] = 1
    }
    /(Ignored load completion from|Failed to load metadata from) __consumer_offsets-[0-9]+/ {
      done[partition()] = 1
    }
    function partition() { match($0, /__consumer_offsets-[0-9]+/); return substr($0, RSTART + 19, RLENGTH - 19) }
    function epoch() { match($0, /with epoch [0-9]+/); return substr($0, RSTART + 11, RLENGTH - 11) }
    END {
      s = ""; for (p in stale) s = s " " p
      n = 0; for (p in sched) if (!done[p]) n++
      printf "stale%s\npending %d\n", s, n
    }'
}

# coordinator_sound FROM_LINE — waits (20 s at most) until every group-coordinator load of
# this start has completed; false when one of them completed from a stale epoch.
coordinator_sound() {
  local deadline=$((SECONDS + 20)) report
  while :; do
    report="$(stale_coordinator_loads "$1")"
    if [[ "$(sed -n 1p <<<"$report")" != stale ]]; then
      log "group coordinator loaded __consumer_offsets partition(s)$(sed -n '1s/^stale//p' <<<"$report") from a stale epoch"
      return 1
    fi
    [[ "$(sed -n 2p <<<"$report")" == "pending 0" ]] && return 0
    ((SECONDS < deadline)) || return 0
    sleep 0.5
  done
}

# ---------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------
cmd_start() {
  cmd_install
  ensure_kcat
  mkdir -p "$KAFKA_STATE"
  # Serialise concurrent starts of the same state dir.
  exec 9>"$KAFKA_STATE/.lock"
  flock 9
  if kafka_running && broker_answers; then
    log "Kafka already running (pid $(cat "$KAFKA_PID")) on $KAFKA_BOOTSTRAP"
    return 0
  fi
  if kafka_running; then
    # Alive but not answering: maybe still starting (another caller), else hung.
    if wait_for --pid "$(cat "$KAFKA_PID")" "Kafka on $KAFKA_BOOTSTRAP (already starting)" 90 "$KAFKA_LOG" broker_answers; then
      return 0
    fi
    die "Kafka pid $(cat "$KAFKA_PID") is alive but not answering; run '$0 kill' and start again"
  fi
  rm -f "$KAFKA_PID"
  # A JVM just killed can hold its sockets a moment after its main thread is gone.
  if ! wait_ports_free 10; then
    die "port $KAFKA_PORT or $KAFKA_CONTROLLER_PORT on $KAFKA_HOST is taken by a process not started from $SHOP_STATE_DIR; stop it or set KAFKA_PORT/KAFKA_CONTROLLER_PORT"
  fi

  write_log4j_configs
  write_server_properties

  if [[ ! -f "$KAFKA_DATA/meta.properties" ]]; then
    local cluster_id
    cluster_id="$(kafka_java kafka.tools.StorageTool random-uuid)"
    log "formatting KRaft storage in $KAFKA_DATA (cluster id $cluster_id)"
    kafka_java kafka.tools.StorageTool format --standalone -t "$cluster_id" -c "$KAFKA_PROPS" >/dev/null
  fi

  log "starting Kafka $KAFKA_VERSION (KRaft) on $KAFKA_BOOTSTRAP, log: $KAFKA_LOG"
  rotate_log "$KAFKA_LOG"
  printf '\n===== %s starting Kafka %s =====\n' "$(date -Is)" "$KAFKA_VERSION" >>"$KAFKA_LOG"
  local from_line
  from_line="$(wc -l <"$KAFKA_LOG")"
  # setsid: own session, so Ctrl-C or the caller's process group ending does not take it down.
  # fd 8/9 (locks) must not leak into the daemon, or the lock would be held for its lifetime.
  setsid nohup java -Xms256m -Xmx1g -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -XX:+ExplicitGCInvokesConcurrent -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$KAFKA_STATE/log4j2.xml" \
    -Dkafka.logs.dir="$SHOP_STATE_DIR/logs" \
    -cp "$KAFKA_LIBS/*" kafka.Kafka "$KAFKA_PROPS" \
    >>"$KAFKA_LOG" 2>&1 </dev/null 8>&- 9>&- &
  local pid=$!
  echo "$pid" >"$KAFKA_PID"
  if ! wait_for --pid "$pid" "Kafka metadata on $KAFKA_BOOTSTRAP" 90 "$KAFKA_LOG" broker_answers; then
    proc_alive "$pid" || rm -f "$KAFKA_PID"
    die "Kafka did not come up (full log: $KAFKA_LOG)"
  fi
  # After a crash the controller re-elects leaders as the broker unfences; producers that
  # start before that see LEADER_NOT_AVAILABLE, so wait until every partition has one.
  wait_for --pid "$pid" "a leader for every partition" 30 "$KAFKA_LOG" all_partitions_led ||
    die "Kafka is up but some partitions have no leader (log: $KAFKA_LOG)"
  if ! coordinator_sound "$from_line"; then
    if [[ -n "${KAFKA_COORDINATOR_RESTARTED:-}" ]]; then
      die "the group coordinator loaded from a stale epoch again after a clean restart (log: $KAFKA_LOG)"
    fi
    # A clean stop and start loads each partition once, from its current epoch.
    log "restarting Kafka cleanly so that its group coordinator loads again (a Kafka 4.1.1 race after an unclean stop)"
    flock -u 9
    cmd_stop
    KAFKA_COORDINATOR_RESTARTED=1 cmd_start
    return
  fi
  log "Kafka up (pid $(cat "$KAFKA_PID")) on $KAFKA_BOOTSTRAP"
}

cmd_stop() {
  # Controlled shutdown moves nothing on one node but flushes and closes the logs cleanly.
  if ! kafka_running; then
    rm -f "$KAFKA_PID"
    log "Kafka not running"
    return 0
  fi
  stop_pidfile kafka "$KAFKA_PID" 60
  wait_broker_ports_free || log "warning: Kafka ports still open 10 s after it exited"
  log "Kafka stopped"
}

cmd_kill() {
  # For fault tests: an abrupt crash, no clean shutdown of the logs.
  if ! kafka_running; then
    rm -f "$KAFKA_PID"
    log "Kafka not running"
    return 0
  fi
  local pid
  pid="$(cat "$KAFKA_PID")"
  log "killing Kafka (SIGKILL pid $pid)"
  kill -KILL "$pid" 2>/dev/null || true
  local i
  for ((i = 0; i < 50; i++)); do
    proc_alive "$pid" || break
    sleep 0.2
  done
  rm -f "$KAFKA_PID"
  # The main thread dies first; other threads close the sockets a moment later.
  wait_broker_ports_free || log "warning: Kafka ports still open 10 s after SIGKILL"
}

cmd_status() {
  if kafka_running && broker_answers; then
    echo "kafka: running (pid $(cat "$KAFKA_PID")) on $KAFKA_BOOTSTRAP"
    return 0
  fi
  if kafka_running; then
    echo "kafka: process $(cat "$KAFKA_PID") alive but not answering on $KAFKA_BOOTSTRAP"
  else
    echo "kafka: not running"
  fi
  return 1
}

# topics_present PREFIX — true when every project topic has a leader for all its partitions.
topics_present() {
  local prefix="$1" meta t
  meta="$(kcat -b "$KAFKA_BOOTSTRAP" -L -m 5 2>/dev/null)" || return 1
  for t in "${TOPICS[@]}"; do
    grep -qE "topic \"${prefix//./\\.}${t//./\\.}\" with [1-9][0-9]* partitions:\$" <<<"$meta" || return 1
  done
  # A partition still without a leader shows as "leader -1".
  ! grep -q 'leader -1' <<<"$meta"
}

cmd_create_topics() {
  ensure_kcat
  broker_answers || die "Kafka is not answering on $KAFKA_BOOTSTRAP; run '$0 start' first"
  cmd_install
  write_log4j_configs
  local prefix="${KAFKA_TOPIC_PREFIX:-}" partitions="${KAFKA_PARTITIONS:-6}"
  # One cheap metadata call tells which topics exist, so re-runs skip the slow JVM calls.
  local existing
  existing="$(kcat -b "$KAFKA_BOOTSTRAP" -L -m 5 2>/dev/null | sed -n 's/^ *topic "\([^"]*\)".*/\1/p')"
  local t name pids=() names=()
  for t in "${TOPICS[@]}"; do
    name="$prefix$t"
    if grep -qxF -- "$name" <<<"$existing"; then
      log "topic $name exists"
      continue
    fi
    names+=("$name")
  done
  if ((${#names[@]} > 0)); then
    log "creating topics ${names[*]} ($partitions partitions each, ~5 s of JVM start-up)"
    # TopicCommand takes one --topic per run, so one JVM each, all at once.
    for name in "${names[@]}"; do
      kafka_java org.apache.kafka.tools.TopicCommand --bootstrap-server "$KAFKA_BOOTSTRAP" \
        --create --if-not-exists --topic "$name" \
        --partitions "$partitions" --replication-factor 1 >/dev/null &
      pids+=("$!")
    done
    local i failed=0
    for i in "${!pids[@]}"; do
      if ! wait "${pids[$i]}"; then
        printf 'error: creating topic %s failed\n' "${names[$i]}" >&2
        failed=1
      fi
    done
    ((failed == 0)) || die "topic creation failed"
  fi
  # Verify with a fresh metadata call; a new topic reaches the broker's metadata cache a
  # moment after CreateTopics returns, hence the short wait.
  wait_for "topics in broker metadata" 30 "$KAFKA_LOG" topics_present "$prefix" ||
    die "topics missing from broker metadata after create"
  log "topics ready: ${TOPICS[*]/#/$prefix}"
}

# delete-test-topics: remove the per-test topics (t<id>.*) earlier test runs left behind,
# so that a developer's broker does not accumulate thousands of partitions.
cmd_delete_test_topics() {
  ensure_kcat
  broker_answers || die "Kafka is not answering on $KAFKA_BOOTSTRAP; run '$0 start' first"
  cmd_install
  write_log4j_configs
  if ! kcat -b "$KAFKA_BOOTSTRAP" -L -m 5 2>/dev/null | grep -qE '^ *topic "t[0-9a-f]{12}\.'; then
    return 0
  fi
  log "deleting topics left by earlier test runs"
  kafka_java org.apache.kafka.tools.TopicCommand --bootstrap-server "$KAFKA_BOOTSTRAP" \
    --delete --if-exists --topic 't[0-9a-f]{12}\..*' >/dev/null
}

usage() {
  echo "usage: $0 {install|start|stop|restart|status|kill|create-topics|delete-test-topics}" >&2
  exit 2
}

case "${1:-}" in
  install) cmd_install ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  restart)
    cmd_stop
    cmd_start
    ;;
  status) cmd_status ;;
  kill) cmd_kill ;;
  create-topics) cmd_create_topics ;;
  delete-test-topics) cmd_delete_test_topics ;;
  *) usage ;;
esac
