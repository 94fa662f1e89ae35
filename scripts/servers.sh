#!/usr/bin/env bash
# Starts and stops the real Redis and ClickHouse servers that spillway's tests and local runs use.
#
#   scripts/servers.sh start             # install (only when missing), start on private loopback ports, print env
#   scripts/servers.sh start-clickhouse  # only ClickHouse 18.16 (no install); prints CLICKHOUSE_URL
#   scripts/servers.sh env               # print the export lines for the running servers
#   scripts/servers.sh stop              # stop what runs and delete their throwaway data dirs
#
# Ports and the state directory can be moved with SPILLWAY_REDIS_PORT, SPILLWAY_CH_HTTP_PORT,
# SPILLWAY_CH_TCP_PORT, SPILLWAY_CHDB_PORT and SPILLWAY_SERVERS_DIR. ClickHouse's pid is in
# $SPILLWAY_SERVERS_DIR/clickhouse/server.pid. Nothing here touches the system services.
set -euo pipefail

REDIS_PORT=${SPILLWAY_REDIS_PORT:-16379}
CH_HTTP_PORT=${SPILLWAY_CH_HTTP_PORT:-18123}
CH_TCP_PORT=${SPILLWAY_CH_TCP_PORT:-19000}
CHDB_PORT=${SPILLWAY_CHDB_PORT:-18124}
STATE=${SPILLWAY_SERVERS_DIR:-${TMPDIR:-/tmp}/spillway-servers-$REDIS_PORT}

log() { echo "servers.sh: $*" >&2; }

install_missing() {
  local missing=()
  command -v redis-server >/dev/null || missing+=(redis-server)
  command -v clickhouse-server >/dev/null || missing+=(clickhouse-server)
  command -v clickhouse-client >/dev/null || missing+=(clickhouse-client)
  command -v curl >/dev/null || missing+=(curl)
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing ${missing[*]} (apt-get)"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

start_redis() {
  if redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; then return 0; fi
  mkdir -p "$STATE/redis"
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$STATE/redis" \
    --save '' --appendonly no --maxmemory-policy noeviction \
    --daemonize yes --pidfile "$STATE/redis/redis.pid" --logfile "$STATE/redis/redis.log"
  for _ in $(seq 1 100); do
    redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  log "redis did not start; log: $STATE/redis/redis.log"; exit 1
}

write_clickhouse_config() {
  local dir=$STATE/clickhouse
  mkdir -p "$dir/data" "$dir/tmp" "$dir/user_files" "$dir/log"
  cat > "$dir/config.xml" <<XML
<?xml version="1.0"?>
<yandex>
  <logger><level>warning</level><log>$dir/log/server.log</log><errorlog>$dir/log/error.log</errorlog><size>100M</size><count>1</count></logger>
  <http_port>$CH_HTTP_PORT</http_port>
  <tcp_port>$CH_TCP_PORT</tcp_port>
  <listen_host>127.0.0.1</listen_host>
  <max_connections>512</max_connections>
  <keep_alive_timeout>10</keep_alive_timeout>
  <max_concurrent_queries>200</max_concurrent_queries>
  <uncompressed_cache_size>268435456</uncompressed_cache_size>
  <mark_cache_size>268435456</mark_cache_size>
  <path>$dir/data/</path>
  <tmp_path>$dir/tmp/</tmp_path>
  <user_files_path>$dir/user_files/</user_files_path>
  <users_config>$dir/users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <timezone>UTC</timezone>
  <mlock_executable>false</mlock_executable>
  <builtin_dictionaries_reload_interval>3600</builtin_dictionaries_reload_interval>
  <query_log><database>system</database><table>query_log</table><flush_interval_milliseconds>500</flush_interval_milliseconds></query_log>
  <max_session_timeout>3600</max_session_timeout>
  <default_session_timeout>60</default_session_timeout>
</yandex>
XML
  cat > "$dir/users.xml" <<XML
<?xml version="1.0"?>
<yandex>
  <profiles><default><log_queries>1</log_queries><max_memory_usage>4000000000</max_memory_usage><load_balancing>random</load_balancing></default></profiles>
  <users>
    <default>
      <password></password>
      <networks><ip>127.0.0.1</ip><ip>::1</ip></networks>
      <profile>default</profile>
      <quota>default</quota>
    </default>
  </users>
  <quotas><default><interval><duration>3600</duration><queries>0</queries><errors>0</errors><result_rows>0</result_rows><read_rows>0</read_rows><execution_time>0</execution_time></interval></default></quotas>
</yandex>
XML
}

start_clickhouse() {
  if curl -fsS "http://127.0.0.1:$CH_HTTP_PORT/ping" >/dev/null 2>&1; then return 0; fi
  write_clickhouse_config
  local dir=$STATE/clickhouse
  # A server killed with SIGKILL leaves its pid file; ClickHouse refuses to start while that pid
  # runs, and by now it may be another process's. This state dir's server does not answer.
  rm -f "$dir/server.pid"
  clickhouse-server --config-file="$dir/config.xml" --pid-file="$dir/server.pid" --daemon
  for _ in $(seq 1 300); do
    curl -fsS "http://127.0.0.1:$CH_HTTP_PORT/ping" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  log "clickhouse did not start; log: $dir/log/error.log"; tail -20 "$dir/log/error.log" >&2 || true; exit 1
}

# The current ClickHouse engine, in-process via the chdb-core Python package, behind a small
# HTTP shim (scripts/chdb_http.py): for what ClickHouse 18.16 cannot do (Map, DateTime64,
# insert_deduplication_token).
start_chdb() {
  if curl -fsS "http://127.0.0.1:$CHDB_PORT/ping" >/dev/null 2>&1; then return 0; fi
  if ! python3 -c 'import chdb' 2>/dev/null; then
    log "installing chdb-core (pip)"
    python3 -m pip install --quiet --disable-pip-version-check chdb-core >/dev/null 2>&1 \
      || python3 -m pip install --quiet --break-system-packages chdb-core >/dev/null
  fi
  mkdir -p "$STATE/chdb"
  python3 "$(dirname "$0")/chdb_http.py" --port "$CHDB_PORT" --path "$STATE/chdb/data" \
    >"$STATE/chdb/server.log" 2>&1 &
  echo $! > "$STATE/chdb/server.pid"
  for _ in $(seq 1 300); do
    curl -fsS "http://127.0.0.1:$CHDB_PORT/ping" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  log "chdb shim did not start; log: $STATE/chdb/server.log"; tail -20 "$STATE/chdb/server.log" >&2 || true; exit 1
}

print_env() {
  echo "export REDIS_URL=redis://127.0.0.1:$REDIS_PORT"
  echo "export CLICKHOUSE_URL=http://127.0.0.1:$CH_HTTP_PORT"
  echo "export SPILLWAY_TEST_REDIS_URL=redis://127.0.0.1:$REDIS_PORT"
  echo "export SPILLWAY_TEST_CLICKHOUSE_URL=http://127.0.0.1:$CH_HTTP_PORT"
  echo "export SPILLWAY_TEST_CHDB_URL=http://127.0.0.1:$CHDB_PORT"
}

stop_pidfile() {
  local pidfile=$1
  [ -f "$pidfile" ] || return 0
  local pid; pid=$(cat "$pidfile")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
}

case "${1:-start}" in
  start)
    install_missing
    start_redis
    start_clickhouse
    start_chdb
    print_env
    ;;
  start-clickhouse)
    # For a test that needs a ClickHouse of its own (the fault-injection suite stops it).
    command -v clickhouse-server >/dev/null || { log "clickhouse-server is not installed"; exit 1; }
    start_clickhouse
    echo "export CLICKHOUSE_URL=http://127.0.0.1:$CH_HTTP_PORT"
    ;;
  env) print_env ;;
  stop)
    stop_pidfile "$STATE/redis/redis.pid"
    stop_pidfile "$STATE/clickhouse/server.pid"
    stop_pidfile "$STATE/chdb/server.pid"
    rm -rf "$STATE"
    ;;
  *) echo "usage: $0 start|start-clickhouse|env|stop" >&2; exit 2 ;;
esac
