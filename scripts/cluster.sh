#!/usr/bin/env bash
# Starts and stops a real Redis Cluster (3 masters + 3 replicas) for spillway's cluster tests.
#
#   scripts/cluster.sh start   # install redis (only when missing), start 6 nodes on private loopback
#                              # ports, create the cluster, wait until it is healthy, print env
#   scripts/cluster.sh env     # print the export line for the running cluster
#   scripts/cluster.sh stop    # stop the nodes and delete their throwaway data dirs
#
# Ports: SPILLWAY_CLUSTER_PORT_BASE (default 17000) -> nodes on BASE+1..BASE+6 (17001..17006),
# their cluster bus on BASE+11..BASE+16 (not Redis's default port+10000, which would put the
# default cluster's bus on 27001..27006, another base's client ports): a cluster takes
# BASE+1..BASE+16, so two bases at least 20 apart never collide.
# State: SPILLWAY_CLUSTER_DIR, else $SPILLWAY_SERVERS_DIR/cluster when that is set, else
# ${TMPDIR:-/tmp}/spillway-cluster-$BASE; one dir per node (nodes.conf, redis.pid, redis.log).
# When the state dir is under SPILLWAY_SERVERS_DIR, run `cluster.sh stop` before
# `servers.sh stop` (which deletes that dir; a cluster node dies when it cannot save nodes.conf).
# SPILLWAY_CLUSTER_TIMEOUT (seconds, default 30) bounds each wait.
#
# The nodes run with cluster-node-timeout 1000 (a SIGKILLed master's replica takes over in about
# 1-3 s), cluster-replica-validity-factor 0 (a replica always may take over), no persistence
# (save "", appendonly no) and repl-diskless-sync-delay 0 (replicas sync at once).
# `start` is idempotent: a healthy cluster is left as it is; nodes that died (e.g. a test's
# kill -9) are restarted from their nodes.conf and rejoin, as replicas of whoever took over;
# a cluster that still is not healthy after that is deleted and created anew.
# The printed SPILLWAY_TEST_REDIS_CLUSTER lists the current masters' URLs (on a fresh cluster:
# BASE+1, BASE+2, BASE+3), comma-separated. Nothing here touches the system services.
set -euo pipefail

BASE=${SPILLWAY_CLUSTER_PORT_BASE:-17000}
PORTS=()
for i in 1 2 3 4 5 6; do PORTS+=($((BASE + i))); done
if [ -n "${SPILLWAY_CLUSTER_DIR:-}" ]; then
  STATE=$SPILLWAY_CLUSTER_DIR
elif [ -n "${SPILLWAY_SERVERS_DIR:-}" ]; then
  STATE=$SPILLWAY_SERVERS_DIR/cluster
else
  STATE=${TMPDIR:-/tmp}/spillway-cluster-$BASE
fi
TIMEOUT=${SPILLWAY_CLUSTER_TIMEOUT:-30}

log() { echo "cluster.sh: $*" >&2; }

cli() { local port=$1; shift; timeout 5 redis-cli -h 127.0.0.1 -p "$port" "$@" 2>/dev/null; }
alive() { [ "$(cli "$1" ping)" = "PONG" ]; }
# One field of `CLUSTER INFO` / `INFO ...` ("key:value" lines, CRLF-terminated).
field() { tr -d '\r' | sed -n "s/^$1://p"; }

install_missing() {
  command -v redis-server >/dev/null && command -v redis-cli >/dev/null && return 0
  log "installing redis-server (apt-get)"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends redis-server redis-tools >/dev/null
}

# The pid in a node's pidfile, only when that process still is this node's redis-server
# (a SIGKILLed node leaves its pidfile behind, and the pid may since be another process's).
node_pid() {
  local port=$1 pidfile=$STATE/$1/redis.pid pid
  [ -f "$pidfile" ] || return 1
  pid=$(cat "$pidfile" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "redis-server.*:$port\b" || return 1
  echo "$pid"
}

start_node() {
  local port=$1 dir=$STATE/$1
  mkdir -p "$dir"
  rm -f "$dir/redis.pid"
  redis-server --port "$port" --bind 127.0.0.1 --dir "$dir" \
    --cluster-enabled yes --cluster-port $((port + 10)) --cluster-config-file nodes.conf \
    --cluster-node-timeout 1000 \
    --cluster-replica-validity-factor 0 \
    --save '' --appendonly no --repl-diskless-sync-delay 0 --maxmemory-policy noeviction \
    --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log"
}

# Dump what helps to see why the cluster is not up: each node's view and its log's tail.
diagnose() {
  local port
  for port in "${PORTS[@]}"; do
    echo "---- node $port: $(alive "$port" && echo up || echo DOWN)" >&2
    if alive "$port"; then
      cli "$port" cluster info | tr -d '\r' | grep -E '^cluster_(state|slots_assigned|slots_ok|known_nodes|size)' | sed 's/^/  /' >&2 || true
      cli "$port" cluster nodes | sed 's/^/  /' >&2 || true
    fi
    if [ -f "$STATE/$port/redis.log" ]; then
      echo "  log tail ($STATE/$port/redis.log):" >&2
      tail -15 "$STATE/$port/redis.log" | sed 's/^/    /' >&2
    fi
  done
}

# Waits up to $TIMEOUT s for a condition (a function name); on timeout: message, diagnosis, exit 1.
wait_for() {
  local what=$1 check=$2 deadline=$((SECONDS + TIMEOUT))
  while ! "$check"; do
    if [ $SECONDS -ge $deadline ]; then
      log "timed out after ${TIMEOUT}s waiting for $what (state dir $STATE)"
      diagnose
      return 1
    fi
    sleep 0.2
  done
}

all_alive() { local p; for p in "${PORTS[@]}"; do alive "$p" || return 1; done; }

# Master ports per the first live node's view: "host:port@bus" of nodes flagged master, not failed.
master_ports() {
  local p
  for p in "${PORTS[@]}"; do
    if alive "$p"; then
      cli "$p" cluster nodes | awk '$3 ~ /master/ && $3 !~ /fail/ { split($2, a, "[:@]"); print a[2] }' | sort -n
      return 0
    fi
  done
  return 1
}

# Healthy: every node up, cluster_state ok with all 16384 slots served and all 6 nodes known;
# no node sees another as failed or unreachable; 3 masters, each with an online replica whose
# link to it is up.
healthy() {
  local p info nodes masters m slaves
  for p in "${PORTS[@]}"; do
    info=$(cli "$p" cluster info) || return 1
    [ "$(field cluster_state <<<"$info")" = ok ] || return 1
    [ "$(field cluster_slots_ok <<<"$info")" = 16384 ] || return 1
    [ "$(field cluster_known_nodes <<<"$info")" = 6 ] || return 1
    nodes=$(cli "$p" cluster nodes) || return 1
    ! awk '{print $3}' <<<"$nodes" | grep -qE 'fail|handshake|noaddr' || return 1
  done
  masters=$(master_ports) || return 1
  [ "$(wc -w <<<"$masters")" = 3 ] || return 1
  for m in $masters; do
    info=$(cli "$m" info replication) || return 1
    slaves=$(field connected_slaves <<<"$info")
    [ "${slaves:-0}" -ge 1 ] || return 1
    grep -q 'state=online' <<<"$info" || return 1
  done
  for p in "${PORTS[@]}"; do
    grep -qw "$p" <<<"$masters" && continue
    info=$(cli "$p" info replication) || return 1
    [ "$(field master_link_status <<<"$info")" = up ] || return 1
  done
}

# Stops every node of this cluster at once (a node takes ~2 s to exit after SIGTERM), SIGKILL
# after 10 s; then deletes the state dir.
stop_all() {
  local p pid pids=()
  for p in "${PORTS[@]}"; do
    if pid=$(node_pid "$p"); then
      kill "$pid" 2>/dev/null || true
      pids+=("$pid")
    elif alive "$p" && [ "$(cli "$p" config get dir | sed -n 2p)" = "$STATE/$p" ]; then
      # Ours (its dir is ours) but its pidfile is gone.
      cli "$p" shutdown nosave >/dev/null || true
    fi
  done
  for pid in "${pids[@]}"; do
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  rm -rf "$STATE"
}

create_cluster() {
  local p args=()
  log "creating a cluster on 127.0.0.1:${PORTS[0]}..${PORTS[5]} (state $STATE)"
  for p in "${PORTS[@]}"; do
    if alive "$p"; then
      log "port $p already answers, and not as a node of this cluster; stop it or set SPILLWAY_CLUSTER_PORT_BASE"
      exit 1
    fi
  done
  for p in "${PORTS[@]}"; do
    start_node "$p"
    args+=("127.0.0.1:$p")
  done
  wait_for "all 6 nodes to answer PING" all_alive || exit 1
  if ! redis-cli --cluster create "${args[@]}" --cluster-replicas 1 --cluster-yes \
      >"$STATE/create.log" 2>&1; then
    log "redis-cli --cluster create failed:"; tail -30 "$STATE/create.log" >&2
    diagnose; exit 1
  fi
  touch "$STATE/created"
}

start() {
  install_missing
  if [ -f "$STATE/created" ] && healthy; then return 0; fi
  if [ -f "$STATE/created" ]; then
    # Restart the nodes that died; they rejoin from their nodes.conf.
    local p restarted=0
    for p in "${PORTS[@]}"; do
      if ! alive "$p"; then
        log "restarting node $p"; start_node "$p"; restarted=1
      fi
    done
    [ $restarted = 1 ] && log "waiting for the cluster to heal"
    if wait_for "the cluster to heal" healthy 2>/dev/null; then return 0; fi
    log "the cluster did not heal within ${TIMEOUT}s; deleting it and creating it anew"
  fi
  stop_all
  mkdir -p "$STATE"
  create_cluster
  wait_for "cluster_state:ok on every node, all slots covered and a replica online per master" healthy || exit 1
}

print_env() {
  local masters urls="" m
  masters=$(master_ports 2>/dev/null) || masters="${PORTS[*]:0:3}"
  [ -n "$masters" ] || masters="${PORTS[*]:0:3}"
  for m in $masters; do urls+="${urls:+,}redis://127.0.0.1:$m"; done
  echo "export SPILLWAY_TEST_REDIS_CLUSTER=$urls"
}

case "${1:-start}" in
  start) start; print_env ;;
  env) print_env ;;
  stop) stop_all ;;
  *) echo "usage: $0 start|env|stop" >&2; exit 2 ;;
esac
