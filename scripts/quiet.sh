# Sourced by the benchmark scripts (bench.sh, bench-cluster.sh), which define `log`:
# wait_for_quiet_machine MAX_LOAD WAIT_SECS waits, up to WAIT_SECS, for the 1-minute load
# average to fall to MAX_LOAD or below, then sets LOAD_AT_START to the three load averages.
# shellcheck shell=bash

load1() { cut -d' ' -f1 /proc/loadavg; }

wait_for_quiet_machine() {
  local max_load=$1 wait_secs=$2 waited=0
  while awk -v l="$(load1)" -v m="$max_load" 'BEGIN { exit !(l > m) }' && [ "$waited" -lt "$wait_secs" ]; do
    [ "$waited" -eq 0 ] && log "load average $(load1) > $max_load: waiting up to ${wait_secs}s for a quieter machine"
    sleep 10
    waited=$((waited + 10))
  done
  LOAD_AT_START=$(cut -d' ' -f1-3 /proc/loadavg)
  log "load average at start: $LOAD_AT_START"
}
