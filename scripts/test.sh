#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs and starts Redis, ClickHouse 18.16 and
# the current ClickHouse engine (chdb) on private loopback ports, runs every test against them,
# then stops them and deletes their data.
set -euo pipefail
cd "$(dirname "$0")/.."

# A private set of ports and a private state dir per run, so a run never meets another's data.
export SPILLWAY_SERVERS_DIR=${SPILLWAY_SERVERS_DIR:-$(mktemp -d -t spillway-test-XXXXXX)}
eval "$(scripts/servers.sh start)"
trap 'scripts/servers.sh stop' EXIT

cargo test --all-targets "$@"
cargo test --doc
