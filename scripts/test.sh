#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs and starts Redis, ClickHouse 18.16, the
# current ClickHouse engine (chdb) and a Redis Cluster (3 masters, 3 replicas) on private
# loopback ports, runs every test against them, then stops them and deletes their data. Extra
# arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

# A private state dir per run, so a run never meets another's data.
export SPILLWAY_SERVERS_DIR=${SPILLWAY_SERVERS_DIR:-$(mktemp -d -t spillway-test-XXXXXX)}
eval "$(scripts/servers.sh start)"
# The cluster's state is under SPILLWAY_SERVERS_DIR: stop it first (servers.sh stop deletes it).
trap 'scripts/cluster.sh stop; scripts/servers.sh stop' EXIT
eval "$(scripts/cluster.sh start)"
# The status page test looks at the page in headless Chromium.
if ! command -v chromium >/dev/null; then
  echo "test.sh: installing chromium (apt-get)" >&2
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi

log=$SPILLWAY_SERVERS_DIR/cargo-test.log
status=0
cargo test --all-targets "$@" 2>&1 | tee "$log" || status=$?
# One closing line for the whole run, summed over every test binary.
awk '/^test result:/ { p += $4; f += $6; i += $8 } END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, i }' "$log"
exit "$status"
