#!/usr/bin/env bash
# Ingest and flush throughput on Redis Cluster with 1, 2 and 3 shards (and as many processes),
# next to the single-Redis layout, and the cost of waiting for a replica; rewrites the results
# of the "Redis Cluster: 1, 2, 3 shards and processes" section of BENCHMARKS.md.
#
#   scripts/bench-cluster.sh                                  # 200k events, 3 rounds (≈ 4 min)
#   SPILLWAY_CBENCH_EVENTS=50000 SPILLWAY_CBENCH_ROUNDS=1 scripts/bench-cluster.sh   # a quick pass
#
# Steps: build the release binary; start servers of its own (scripts/servers.sh: Redis,
# ClickHouse 18.16; scripts/cluster.sh: 3 masters + 3 replicas) on ports apart from the dev
# servers, in a state dir of its own, and stop them on exit; wait up to
# SPILLWAY_CBENCH_WAIT_SECS (120) for the 1-minute load average to fall below
# SPILLWAY_CBENCH_MAX_LOAD (1.0); `spillway generate` SPILLWAY_CBENCH_EVENTS (200000) events
# once (seed SPILLWAY_CBENCH_SEED, 1) and split them by session into 2 and 3 parts (every event
# of a session in one part, in order; events without a session dealt round robin).
# Then SPILLWAY_CBENCH_ROUNDS (3) rounds of five layouts, the order rotated by one every round:
#   single   the single Redis, OpenPanel's layout (--redis-shards 1), 1 import, 1 drain
#   c1..c3   the cluster with --redis-shards N, N imports (one per part), then N drains
#   c3w      c3 with --redis-wait-replicas 1
# Each run gets a fresh key prefix and ClickHouse database (`spillway schema --variant legacy`);
# the ingest phase runs the imports concurrently with nothing flushing, the flush phase the
# drains concurrently; each phase's wall time is from the first start to the last exit. After
# the drains: count() = uniqExact(id) = the rows the drains report, count() + the held screen
# views = the events, and nothing queued, in flight or dead-lettered; then the database is
# dropped and Redis flushed. CPU per phase comes from /proc (every Redis node, ClickHouse,
# the whole machine) and /usr/bin/time (spillway), Redis calls from INFO commandstats.
# Raw outputs go to $CARGO_TARGET_DIR/bench-cluster/ (runs.tsv, one line per phase; checks.tsv;
# logs/); the workload files are deleted on exit.
# SPILLWAY_CBENCH_WRITE=0 leaves BENCHMARKS.md alone.
#
# Ports and state (own variables, so a dev shell's SPILLWAY_REDIS_PORT cannot point this script
# at the dev servers, which it would flush and stop): SPILLWAY_CBENCH_REDIS_PORT (36379),
# SPILLWAY_CBENCH_CH_HTTP_PORT (38123), SPILLWAY_CBENCH_CH_TCP_PORT (39000),
# SPILLWAY_CBENCH_CHDB_PORT (38124), SPILLWAY_CBENCH_CLUSTER_PORT_BASE (37000: nodes
# 37001-37006, bus 37011-37016), SPILLWAY_CBENCH_DIR (${TMPDIR:-/tmp}/spillway-cbench).
set -euo pipefail
cd "$(dirname "$0")/.."

EVENTS=${SPILLWAY_CBENCH_EVENTS:-200000}
ROUNDS=${SPILLWAY_CBENCH_ROUNDS:-3}
SEED=${SPILLWAY_CBENCH_SEED:-1}
MAX_LOAD=${SPILLWAY_CBENCH_MAX_LOAD:-1.0}
WAIT_SECS=${SPILLWAY_CBENCH_WAIT_SECS:-120}
WRITE=${SPILLWAY_CBENCH_WRITE:-1}
REDIS_PORT=${SPILLWAY_CBENCH_REDIS_PORT:-36379}
CH_HTTP_PORT=${SPILLWAY_CBENCH_CH_HTTP_PORT:-38123}
CH_TCP_PORT=${SPILLWAY_CBENCH_CH_TCP_PORT:-39000}
CHDB_PORT=${SPILLWAY_CBENCH_CHDB_PORT:-38124}
CLUSTER_BASE=${SPILLWAY_CBENCH_CLUSTER_PORT_BASE:-37000}
STATE=${SPILLWAY_CBENCH_DIR:-${TMPDIR:-/tmp}/spillway-cbench}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
OUT=$CARGO_TARGET_DIR/bench-cluster
WORK=$OUT/work   # the workload and its parts (≈ 450 MB at 200k events), deleted on exit
BIN=$CARGO_TARGET_DIR/release/spillway

# Nothing from the caller's shell may configure spillway or move the servers: every setting
# below is passed explicitly.
while read -r var; do unset "$var"; done < <(compgen -e | grep -E '^(SPILLWAY_|REDIS_|CLICKHOUSE_|EVENT_BUFFER_)' || true)
export SPILLWAY_SERVERS_DIR=$STATE SPILLWAY_REDIS_PORT=$REDIS_PORT SPILLWAY_CH_HTTP_PORT=$CH_HTTP_PORT \
  SPILLWAY_CH_TCP_PORT=$CH_TCP_PORT SPILLWAY_CHDB_PORT=$CHDB_PORT SPILLWAY_CLUSTER_PORT_BASE=$CLUSTER_BASE
SINGLE_URL=redis://127.0.0.1:$REDIS_PORT
CLICKHOUSE=http://127.0.0.1:$CH_HTTP_PORT
NODE_PORTS=()
for i in 1 2 3 4 5 6; do NODE_PORTS+=($((CLUSTER_BASE + i))); done
CLUSTER_NODES=redis://127.0.0.1:${NODE_PORTS[0]},redis://127.0.0.1:${NODE_PORTS[1]},redis://127.0.0.1:${NODE_PORTS[2]}
CLK_TCK=$(getconf CLK_TCK)
CONFIGS=(single c1 c2 c3 c3w)

log() { echo "bench-cluster.sh: $(date -u +%T) $*" >&2; }
die() { log "$*"; exit 1; }

command -v /usr/bin/time >/dev/null || die "/usr/bin/time is missing (apt-get install time)"
command -v redis-cli >/dev/null || command -v apt-get >/dev/null || die "redis-cli is missing"

# Servers answering on our ports while our state dir does not exist belong to someone else:
# this script flushes and stops what it uses, so it refuses.
if [ ! -d "$STATE" ]; then
  for port in "$REDIS_PORT" "${NODE_PORTS[@]}"; do
    if timeout 2 redis-cli -p "$port" ping >/dev/null 2>&1; then
      die "port $port already answers and $STATE does not exist: set SPILLWAY_CBENCH_*_PORT"
    fi
  done
  if curl -fsS "http://127.0.0.1:$CH_HTTP_PORT/ping" >/dev/null 2>&1; then
    die "port $CH_HTTP_PORT already answers and $STATE does not exist: set SPILLWAY_CBENCH_CH_HTTP_PORT"
  fi
fi

PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  log "stopping the benchmark's servers"
  scripts/cluster.sh stop || true   # first: its state dir is under SPILLWAY_SERVERS_DIR
  scripts/servers.sh stop || true
  rm -rf "$WORK"
}
trap cleanup EXIT

mkdir -p "$OUT"
rm -rf "$OUT/logs" && mkdir -p "$OUT/logs"
log "building the release binary"
cargo build --release --quiet

scripts/servers.sh start >/dev/null
scripts/cluster.sh start >/dev/null

rcli() { timeout 10 redis-cli -h 127.0.0.1 -p "$@"; }
ch() { curl -fsS "$CLICKHOUSE" --data-binary "$1"; }
field() { tr -d '\r' | sed -n "s/^$1://p"; }
cluster_masters() {
  rcli "${NODE_PORTS[0]}" cluster nodes | awk '$3 ~ /master/ && $3 !~ /fail/ { split($2, a, "[:@]"); print a[2] }' | sort -n
}
pidfile_pid() { cat "$1" 2>/dev/null || echo 0; }
REDIS_PIDS=("$(pidfile_pid "$STATE/redis/redis.pid")")
for port in "${NODE_PORTS[@]}"; do REDIS_PIDS+=("$(pidfile_pid "$STATE/cluster/$port/redis.pid")"); done
CH_PID=$(pidfile_pid "$STATE/clickhouse/server.pid")
MASTERS=$(cluster_masters)

# The hash tag spillway gives shard n of count: s<n>, or s<n>.<k> with the smallest k whose
# slot lies in the n-th of count equal slot ranges (src/queue/redis/mod.rs, shard_tag).
shard_tag() {
  local n=$1 count=$2 k=0 tag slot lo hi
  lo=$((n * 16384 / count)); hi=$(((n + 1) * 16384 / count))
  while :; do
    if [ "$k" = 0 ]; then tag="s$n"; else tag="s$n.$k"; fi
    slot=$(rcli "${NODE_PORTS[0]}" cluster keyslot "$tag")
    if [ "$slot" -ge "$lo" ] && [ "$slot" -lt "$hi" ]; then echo "$tag"; return; fi
    k=$((k + 1))
  done
}

# Which master holds each shard's hash tag, with 3 shards.
shard_masters() {
  local n slot nodes tag
  nodes=$(rcli "${NODE_PORTS[0]}" cluster nodes)
  for n in 0 1 2; do
    tag=$(shard_tag "$n" 3)
    slot=$(rcli "${NODE_PORTS[0]}" cluster keyslot "$tag")
    awk -v s="$slot" -v t="$tag" '$3 ~ /master/ {
        split($2, a, "[:@]")
        for (i = 9; i <= NF; i++) { m = split($i, r, "-"); hi = m > 1 ? r[2] : r[1]
          if (r[1] + 0 <= s && s <= hi + 0) printf "{%s} slot %d on :%s\n", t, s, a[2] }
      }' <<<"$nodes"
  done
}

# --- workload -------------------------------------------------------------------------------
mkdir -p "$WORK"
"$BIN" generate --events "$EVENTS" --seed "$SEED" > "$WORK/events.ndjson"
cp "$WORK/events.ndjson" "$WORK/part1.0"
for n in 2 3; do
  awk -v n="$n" -v out="$WORK/part$n" '
    { if (match($0, /"session_id":"[^"]*"/)) s = substr($0, RSTART + 14, RLENGTH - 15); else s = ""
      if (s == "") p = NR % n
      else { if (!(s in part)) part[s] = (k++) % n; p = part[s] }
      print > (out "." p) }' "$WORK/events.ndjson"
done
EVENT_BYTES=$(($(wc -c < "$WORK/events.ndjson") / EVENTS))
log "$EVENTS events ($EVENT_BYTES bytes each on average); parts: $(wc -l "$WORK"/part[23].* | awk '$2 != "total" { printf "%s ", $1 }')"

# --- measuring ------------------------------------------------------------------------------
# One line: machine busy ticks, then utime+stime ticks of the single Redis, the 6 cluster nodes
# and ClickHouse, then EVALSHA and WAIT calls summed over every Redis.
proc_ticks() {
  local pid=$1
  if [ "$pid" = 0 ] || [ ! -r "/proc/$pid/stat" ]; then echo 0; return; fi
  sed 's/^.*) //' "/proc/$pid/stat" | awk '{ print $12 + $13 }'
}
calls() {
  local port=$1
  rcli "$port" info commandstats | tr -d '\r' | awk -F'[:=,]' '
    $1 == "cmdstat_evalsha" { e = $3 } $1 == "cmdstat_wait" { w = $3 } END { print e + 0, w + 0 }'
}
snapshot() {
  local pid port e=0 w=0 c
  awk '/^cpu / { printf "%d", $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat
  for pid in "${REDIS_PIDS[@]}" "$CH_PID"; do printf ' %s' "$(proc_ticks "$pid")"; done
  for port in "$REDIS_PORT" "${NODE_PORTS[@]}"; do
    read -r -a c <<<"$(calls "$port")"
    e=$((e + c[0])); w=$((w + c[1]))
  done
  echo " $e $w"
}

# run_phase ROUND CONFIG PHASE N WAIT_REPLICAS: N `spillway import` (one part each) or
# `spillway drain` processes at once; appends a line to runs.tsv and sets PHASE_TOTAL to the
# summed count (accepted events, or rows inserted). Fails when a process failed.
run_phase() {
  local round=$1 config=$2 phase=$3 n=$4 wait=$5 i pid t0 t1 before after status=0 total=0 cpu=0 load base
  local -a layout=() args=()
  if [ "$config" = single ]; then layout=(--redis-url "$SINGLE_URL"); else layout=(--redis-cluster-nodes "$CLUSTER_NODES"); fi
  load=$(cut -d' ' -f1 /proc/loadavg)
  before=$(snapshot)
  t0=$(date +%s.%N)
  PIDS=()
  for ((i = 0; i < n; i++)); do
    base=$OUT/logs/r$round-$config-$phase-$i
    args=("${layout[@]}" --redis-shards "$n" --redis-wait-replicas "$wait" --key-prefix "cb$round$config:"
      --clickhouse-url "$CLICKHOUSE" --clickhouse-database "cb_r${round}_$config")
    if [ "$phase" = ingest ]; then args+=(import "$WORK/part$n.$i"); else args+=(drain); fi
    /usr/bin/time -f '%U %S' -o "$base.time" "$BIN" "${args[@]}" >"$base.out" 2>"$base.err" &
    PIDS+=($!)
  done
  for pid in "${PIDS[@]}"; do wait "$pid" || status=1; done
  t1=$(date +%s.%N)
  PIDS=()
  after=$(snapshot)
  for ((i = 0; i < n; i++)); do
    base=$OUT/logs/r$round-$config-$phase-$i
    if [ "$status" != 0 ]; then log "round $round $config $phase, process $i:"; cat "$base.err" >&2; fi
    total=$((total + $(awk '$1 == "accepted" || $1 == "inserted" { n = $2 } END { print n + 0 }' "$base.out")))
    cpu=$(awk -v c="$cpu" 'NF == 2 { c += $1 + $2 } END { print c }' "$base.time")
  done
  PHASE_TOTAL=$total
  [ "$status" = 0 ] || return 1
  # The columns of runs.tsv's header.
  awk -v r="$round" -v c="$config" -v p="$phase" -v n="$n" -v t="$total" -v t0="$t0" -v t1="$t1" \
    -v load="$load" -v tck="$CLK_TCK" -v cpu="$cpu" -v b="$before" -v a="$after" 'BEGIN {
      split(b, x, " "); split(a, y, " "); wall = t1 - t0
      printf "%s\t%s\t%s\t%d\t%d\t%.3f\t%.0f\t%s\t%.2f\t%.2f", r, c, p, n, t, wall, t / wall, load, (y[1] - x[1]) / tck / wall, cpu
      for (i = 2; i <= 9; i++) printf "\t%.2f", (y[i] - x[i]) / tck
      printf "\t%d\t%d\n", y[10] - x[10], y[11] - x[11]
    }' >> "$OUT/runs.tsv"
}

# Key prefixes of a run's shards, for checking what is left in Redis.
shard_prefixes() {
  local round=$1 config=$2 n=$3 i
  if [ "$config" = single ]; then echo "cb$round$config:"; return; fi
  for ((i = 0; i < n; i++)); do echo "cb$round$config:{$(shard_tag "$i" "$n")}:"; done
}

procs() { case $1 in single | c1) echo 1 ;; c2) echo 2 ;; *) echo 3 ;; esac; }

run_config() {
  local round=$1 config=$2 n wait=0 db accepted rows count uniq held=0 left=0 prefix key
  local -a redis=("$REDIS_PORT")
  n=$(procs "$config")
  [ "$config" = c3w ] && wait=1
  [ "$config" = single ] || redis=("${NODE_PORTS[0]}" -c)
  db=cb_r${round}_$config
  ch "CREATE DATABASE IF NOT EXISTS $db" >/dev/null || return 1
  "$BIN" schema --variant legacy --clickhouse-database "$db" | curl -fsS "$CLICKHOUSE" --data-binary @- >/dev/null || return 1
  run_phase "$round" "$config" ingest "$n" "$wait" || return 1
  accepted=$PHASE_TOTAL
  run_phase "$round" "$config" flush "$n" "$wait" || return 1
  rows=$PHASE_TOTAL
  read -r count uniq <<<"$(ch "SELECT count(), uniqExact(id) FROM $db.events FORMAT TSV")"
  while read -r prefix; do
    held=$((held + $(rcli "${redis[@]}" zcard "${prefix}event_buffer:held_index")))
    for key in queue inflight dead_letter; do
      left=$((left + $(rcli "${redis[@]}" llen "${prefix}event_buffer:$key")))
    done
  done < <(shard_prefixes "$round" "$config" "$n")
  local verdict=ok
  if ! { [ "$accepted" = "$EVENTS" ] && [ "$count" = "$rows" ] && [ "$uniq" = "$count" ] \
    && [ $((count + held)) = "$EVENTS" ] && [ "$left" = 0 ]; }; then
    verdict=FAILED
    FAILURES+=("round $round $config: accepted $accepted, drained $rows, count() $count, uniqExact(id) $uniq, held $held, left $left")
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$config" "$accepted" "$rows" "$count" "$uniq" "$held" "$left" >> "$OUT/checks.tsv"
  log "round $round $config: $(tail -2 "$OUT/runs.tsv" | awk -F'\t' '{ printf "%s %s/s in %ss; ", $3, $7, $6 }')count() $count, uniqExact(id) $uniq, held $held, left $left: $verdict"
  ch "DROP DATABASE $db" >/dev/null
  rcli "$REDIS_PORT" flushall >/dev/null
  for key in $(cluster_masters); do rcli "$key" flushall >/dev/null; done
}

# --- run ------------------------------------------------------------------------------------
# shellcheck source=scripts/quiet.sh
source scripts/quiet.sh
wait_for_quiet_machine "$MAX_LOAD" "$WAIT_SECS"
STARTED=$(date -u '+%Y-%m-%d %H:%M UTC')

printf 'round\tconfig\tphase\tprocs\tcount\twall_s\trate\tload1\tbusy_cores\tspillway_cpu_s\tredis_single_cpu_s\tnode1\tnode2\tnode3\tnode4\tnode5\tnode6\tclickhouse_cpu_s\tevalsha\twait\n' > "$OUT/runs.tsv"
printf 'round\tconfig\taccepted\tdrained\tcount\tuniq_id\theld\tleft\n' > "$OUT/checks.tsv"
FAILURES=()
LOADS=()
for ((round = 1; round <= ROUNDS; round++)); do
  LOADS+=("$(cut -d' ' -f1-3 /proc/loadavg)")
  for ((k = 0; k < ${#CONFIGS[@]}; k++)); do
    run_config "$round" "${CONFIGS[(k + round - 1) % ${#CONFIGS[@]}]}" \
      || FAILURES+=("round $round ${CONFIGS[(k + round - 1) % ${#CONFIGS[@]}]}: a process failed (logs in $OUT/logs)")
  done
done
LOAD_AT_END=$(cut -d' ' -f1-3 /proc/loadavg)
[ "$(cluster_masters)" = "$MASTERS" ] || FAILURES+=("the cluster's masters changed during the run (a failover): $(cluster_masters | paste -sd ' ') instead of $(paste -sd ' ' <<<"$MASTERS")")

# --- report ---------------------------------------------------------------------------------
# median CONFIG PHASE COLUMN: the median of that column over the rounds (mean of the middle two
# when even).
median() {
  awk -F'\t' -v c="$1" -v p="$2" -v col="$3" '$2 == c && $3 == p { print $col }' "$OUT/runs.tsv" | sort -g \
    | awk '{ v[NR] = $1 } END { if (NR == 0) print "nan"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
each() {
  awk -F'\t' -v c="$1" -v p="$2" -v col="$3" '$2 == c && $3 == p { printf "%s%.1fk", sep, $col / 1000; sep = " / " }' "$OUT/runs.tsv"
}
# per_event CONFIG PHASE COLUMN...: the median over the rounds of those columns' sum divided by
# the count (CPU seconds or calls per event or row).
per_event() {
  local config=$1 phase=$2; shift 2
  awk -F'\t' -v c="$config" -v p="$phase" -v cols="$*" '
    $2 == c && $3 == p { n = split(cols, k, " "); v = 0; for (i = 1; i <= n; i++) v += $k[i]; print v / $5 }' "$OUT/runs.tsv" \
    | sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print "nan"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
# others [max]: cores busy with something else than this benchmark's processes, median (or max)
# over every phase.
others() {
  awk -F'\t' 'NR > 1 { v = $10; for (i = 11; i <= 18; i++) v += $i; print $9 - v / $6 }' "$OUT/runs.tsv" | sort -g \
    | awk -v max="${1:-}" '{ v[NR] = $1 } END { if (max != "") printf "%.2f", v[NR]; else printf "%.2f", NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f×", a / b; else print "—" }'; }
fmt() { awk -v v="$1" -v s="${2:-1}" -v d="${3:-1}" 'BEGIN { printf "%.*f", d, v * s }'; }
label() {
  case $1 in
    single) echo "single Redis, OpenPanel layout" ;;
    c1) echo "cluster, 1 shard" ;;
    c2) echo "cluster, 2 shards" ;;
    c3) echo "cluster, 3 shards" ;;
    c3w) echo "cluster, 3 shards, \`--redis-wait-replicas 1\`" ;;
  esac
}
# runs.tsv columns of the single Redis (11) and the cluster's masters, and of its replicas.
MASTER_CPU=(11) REPLICA_CPU=()
for ((i = 0; i < 6; i++)); do
  if grep -qx "${NODE_PORTS[i]}" <<<"$MASTERS"; then MASTER_CPU+=($((12 + i))); else REPLICA_CPU+=($((12 + i))); fi
done
# busiest CONFIG PHASE: the median over the rounds of the busiest Redis process's CPU seconds
# per second of the phase (1.00: one core all the time).
busiest() {
  awk -F'\t' -v c="$1" -v p="$2" '$2 == c && $3 == p { m = 0; for (i = 11; i <= 17; i++) if ($i > m) m = $i; print m / $6 }' "$OUT/runs.tsv" \
    | sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print "nan"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

cpu_model=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')
memory=$(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || commit="$commit (with uncommitted changes)"
redis_version=$(rcli "$REDIS_PORT" info server | field redis_version)
clickhouse_version=$(ch 'SELECT version()')
ROUND_LOADS=""
for l in "${LOADS[@]}"; do ROUND_LOADS+="\`$l\` "; done
RESULTS=$OUT/results.md
{
  echo "Measured $STARTED at commit \`$commit\`: $(nproc) cores ($cpu_model), $memory; Redis $redis_version, ClickHouse $clickhouse_version."
  echo "$EVENTS events ($EVENT_BYTES bytes each on average, seed $SEED), rounds: $ROUNDS; each cell is the median over the rounds, the runs in parentheses."
  echo "Load average at start \`$LOAD_AT_START\`, at each round's start ${ROUND_LOADS}and at the end \`$LOAD_AT_END\`."
  echo "Shards on the cluster's masters: $(shard_masters | paste -sd ';' | sed 's/;/; /g') (masters $(paste -sd ' ' <<<"$MASTERS"))."
  echo
  echo "**Ingest** (N \`spillway import\` at once, one part of the workload each, nothing flushing):"
  echo
  echo "| layout | processes | events/s | × cluster 1 shard | × single Redis | busy cores (of $(nproc)) | busiest Redis (cores) | spillway CPU µs / event | Redis CPU µs / event, masters + replicas | EVALSHA / event | WAIT / event |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|"
  for c in "${CONFIGS[@]}"; do
    m=$(median "$c" ingest 7)
    echo "| $(label "$c") | $(procs "$c") | $(fmt "$m" 0.001)k ($(each "$c" ingest 7)) | $(ratio "$m" "$(median c1 ingest 7)") | $(ratio "$m" "$(median single ingest 7)") | $(fmt "$(median "$c" ingest 9)" 1 2) | $(fmt "$(busiest "$c" ingest)" 1 2) | $(fmt "$(per_event "$c" ingest 10)" 1000000) | $(fmt "$(per_event "$c" ingest "${MASTER_CPU[@]}")" 1000000) + $(fmt "$(per_event "$c" ingest "${REPLICA_CPU[@]}")" 1000000) | $(fmt "$(per_event "$c" ingest 19)" 1 3) | $(fmt "$(per_event "$c" ingest 20)" 1 3) |"
  done
  echo
  echo "**Flush** (N \`spillway drain\` at once, batch 4000, chunk 1000, into a fresh 18.16 table):"
  echo
  echo "| layout | processes | rows/s | × cluster 1 shard | × single Redis | busy cores (of $(nproc)) | busiest Redis (cores) | spillway CPU µs / row | Redis CPU µs / row, masters + replicas | ClickHouse CPU µs / row |"
  echo "|---|---|---|---|---|---|---|---|---|---|"
  for c in "${CONFIGS[@]}"; do
    m=$(median "$c" flush 7)
    echo "| $(label "$c") | $(procs "$c") | $(fmt "$m" 0.001)k ($(each "$c" flush 7)) | $(ratio "$m" "$(median c1 flush 7)") | $(ratio "$m" "$(median single flush 7)") | $(fmt "$(median "$c" flush 9)" 1 2) | $(fmt "$(busiest "$c" flush)" 1 2) | $(fmt "$(per_event "$c" flush 10)" 1000000) | $(fmt "$(per_event "$c" flush "${MASTER_CPU[@]}")" 1000000) + $(fmt "$(per_event "$c" flush "${REPLICA_CPU[@]}")" 1000000) | $(fmt "$(per_event "$c" flush 18)" 1000000) |"
  done
  echo
  echo "Redis CPU seconds of each cluster master during the phase (medians), where the shards' work lands:"
  echo
  echo "| layout | ingest: $(awk '{ printf "%s:%s", (NR > 1 ? " / " : ""), $1 }' <<<"$MASTERS") | flush: same masters |"
  echo "|---|---|---|"
  for c in c1 c2 c3 c3w; do
    echo "| $(label "$c") | $(for col in "${MASTER_CPU[@]:1}"; do median "$c" ingest "$col"; done | paste -sd '/' | sed 's#/# / #g') | $(for col in "${MASTER_CPU[@]:1}"; do median "$c" flush "$col"; done | paste -sd '/' | sed 's#/# / #g') |"
  done
  echo
  echo "Other processes on the machine (busy cores minus spillway, every Redis and ClickHouse): median $(others) cores per phase, at most $(others max)."
  echo "Replica wait: 3 shards with \`--redis-wait-replicas 1\` ingest at $(ratio "$(median c3w ingest 7)" "$(median c3 ingest 7)") the rate without it (medians)."
  runs=$(($(wc -l < "$OUT/checks.tsv") - 1))
  if [ ${#FAILURES[@]} -eq 0 ]; then
    echo "Checks: in all $runs runs every event was accepted, count() = uniqExact(id) = the rows the drains reported, count() + held screen views = $EVENTS, nothing left queued, in flight or dead-lettered."
  else
    echo "Checks **failed** in ${#FAILURES[@]} of $((ROUNDS * ${#CONFIGS[@]})) runs:"
    for f in "${FAILURES[@]}"; do echo "- $f"; done
  fi
} > "$RESULTS"
cat "$RESULTS"

if [ "$WRITE" = 1 ]; then
  if ! grep -q '<!-- cluster-results:start -->' BENCHMARKS.md || ! grep -q '<!-- cluster-results:end -->' BENCHMARKS.md; then
    die "BENCHMARKS.md lacks the cluster-results markers"
  fi
  awk -v results="$RESULTS" '
    /<!-- cluster-results:start -->/ { print; while ((getline line < results) > 0) print line; skip = 1; next }
    /<!-- cluster-results:end -->/ { skip = 0 }
    !skip { print }' BENCHMARKS.md > "$OUT/BENCHMARKS.md.new"
  mv "$OUT/BENCHMARKS.md.new" BENCHMARKS.md
  log "BENCHMARKS.md cluster results rewritten (raw outputs in $OUT)"
fi
[ ${#FAILURES[@]} -eq 0 ] || die "checks failed in ${#FAILURES[@]} runs"
