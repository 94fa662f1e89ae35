#!/usr/bin/env bash
# Runs spillway end to end on a local Redis and ClickHouse: starts them (installing them when
# missing), creates the events table, imports a generated 10,000-event workload, drains it into
# ClickHouse and shows what landed. The servers keep running; `scripts/servers.sh stop` ends them.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/servers.sh start)"
cargo build --release --quiet
bin=target/release/spillway
export CLICKHOUSE_DATABASE=demo
curl -fsS "$CLICKHOUSE_URL" --data-binary "CREATE DATABASE IF NOT EXISTS demo"
curl -fsS "$CLICKHOUSE_URL" --data-binary "$($bin schema --variant legacy)"
events=$(mktemp)
$bin generate --events "${EVENTS:-10000}" --seed "$(date +%s)" > "$events"
$bin import "$events"
$bin drain
rm -f "$events"
echo "landed in ClickHouse (demo.events), by event name:"
curl -fsS "$CLICKHOUSE_URL" --data-binary \
  "SELECT name, count() AS events, round(avg(duration)) AS avg_duration_ms FROM demo.events GROUP BY name ORDER BY events DESC FORMAT PrettyCompact"
echo "queued: $(redis-cli -u "$REDIS_URL" get event_buffer:total_count); held screen views: $(redis-cli -u "$REDIS_URL" --scan --pattern 'event_buffer:last_screen_view:session:*' | wc -l)"
