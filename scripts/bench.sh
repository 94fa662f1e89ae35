#!/usr/bin/env bash
# Reruns every benchmark and rewrites the results section of BENCHMARKS.md.
#
#   scripts/bench.sh                                # end to end (2 runs) + criterion components
#   SPILLWAY_BENCH_EVENTS=50000 scripts/bench.sh    # a quicker, noisier pass
#
# Steps: start the servers (scripts/servers.sh), plus a Redis of the benchmark's own on
# SPILLWAY_BENCH_REDIS_PORT (16389, started by the same script) so that `INFO commandstats`
# counts only the benchmark's commands while test suites use the shared one; build the release
# binary; wait up to SPILLWAY_BENCH_WAIT_SECS (600) for the 1-minute load average to fall below
# SPILLWAY_BENCH_MAX_LOAD (1.0); run `cargo bench --bench end_to_end`, then
# `cargo bench --bench components` (short measurement); then replace what lies between the
# results markers of BENCHMARKS.md with the tables, the date, the machine and the commit. Raw
# outputs are kept in target/bench/. Every end_to_end setting (SPILLWAY_BENCH_*) passes
# through; see the header of benches/end_to_end.rs.
set -euo pipefail
cd "$(dirname "$0")/.."

BENCH_REDIS_PORT=${SPILLWAY_BENCH_REDIS_PORT:-16389}
MAX_LOAD=${SPILLWAY_BENCH_MAX_LOAD:-1.0}
WAIT_SECS=${SPILLWAY_BENCH_WAIT_SECS:-600}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
OUT=$CARGO_TARGET_DIR/bench
mkdir -p "$OUT"

log() { echo "bench.sh: $*" >&2; }

eval "$(scripts/servers.sh start)"
# The benchmark's own Redis; ClickHouse (already up) is shared: the bench reads its own inserts
# from system.query_log.
eval "$(SPILLWAY_REDIS_PORT=$BENCH_REDIS_PORT scripts/servers.sh start | grep -E '^export (REDIS_URL|CLICKHOUSE_URL)=')"
export SPILLWAY_BENCH_REDIS_URL=$REDIS_URL SPILLWAY_BENCH_CLICKHOUSE_URL=$CLICKHOUSE_URL
log "Redis $SPILLWAY_BENCH_REDIS_URL (the benchmark's own), ClickHouse $SPILLWAY_BENCH_CLICKHOUSE_URL"

cargo build --release --quiet
cargo bench --no-run --quiet

# shellcheck source=scripts/quiet.sh
source scripts/quiet.sh
wait_for_quiet_machine "$MAX_LOAD" "$WAIT_SECS"

# End to end first: the load average it records should not include criterion's own runs.
SPILLWAY_BENCH_REPORT=$OUT/end_to_end.md cargo bench --bench end_to_end 2> >(tee "$OUT/end_to_end.log" >&2)
[ -s "$OUT/end_to_end.md" ] || { log "end_to_end wrote no report"; exit 1; }
cargo bench --bench components -- --warm-up-time 1 --measurement-time 3 | tee "$OUT/components.txt"

# criterion's "name time: [lo mid hi]" / "thrpt: [lo mid hi]" lines -> one table row each.
components_table() {
  echo "| benchmark | time per iteration (1000 events) | throughput |"
  echo "|---|---|---|"
  awk '
    /%/ { next }  # the "change:" block against the previous run
    NF == 1 && $1 ~ /\// { name = $1; next }
    /time:/ {
      if ($1 != "time:") name = $1
      split($0, t, "["); split(t[2], v, " "); time = v[3] " " v[4]
    }
    /thrpt:/ {
      split($0, t, "["); split(t[2], v, " ")
      printf "| `%s` | %s | %s %s |\n", name, time, v[3], v[4]
    }' "$OUT/components.txt"
}

cpu_model=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')
memory=$(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD 2>/dev/null || commit="$commit (with uncommitted changes)"
redis_version=$(redis-cli -p "$BENCH_REDIS_PORT" info server | awk -F: '/^redis_version/ { sub("\r", "", $2); print $2 }')
clickhouse_version=$(curl -fsS "$CLICKHOUSE_URL" --data-binary 'SELECT version()')

RESULTS=$OUT/results.md
{
  echo "Measured $(date -u '+%Y-%m-%d %H:%M UTC') at commit \`$commit\` on $(nproc) cores ($cpu_model), $memory;"
  echo "Redis $redis_version, ClickHouse $clickhouse_version; load average at start \`$LOAD_AT_START\`."
  echo
  echo "### End to end"
  echo
  cat "$OUT/end_to_end.md"
  echo
  echo "### Components (criterion, in process, 1000 workload events per iteration)"
  echo
  components_table
} > "$RESULTS"

grep -q '<!-- results:start -->' BENCHMARKS.md && grep -q '<!-- results:end -->' BENCHMARKS.md \
  || { log "BENCHMARKS.md lacks the results markers"; exit 1; }
awk -v results="$RESULTS" '
  /<!-- results:start -->/ { print; while ((getline line < results) > 0) print line; skip = 1; next }
  /<!-- results:end -->/ { skip = 0 }
  !skip { print }' BENCHMARKS.md > "$OUT/BENCHMARKS.md.new"
mv "$OUT/BENCHMARKS.md.new" BENCHMARKS.md
log "BENCHMARKS.md results rewritten (raw outputs in $OUT)"
