#!/usr/bin/env bash
# Runs each cargo-fuzz target for a bounded time (default 60 s each; FUZZ_SECONDS to change).
# Needs cargo-fuzz (`cargo install cargo-fuzz`). The machine's toolchain is stable; cargo-fuzz
# needs nightly flags, which RUSTC_BOOTSTRAP=1 unlocks on stable.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
seconds=${FUZZ_SECONDS:-60}
for target in event_parse ingest_body; do
  echo "== $target for ${seconds}s"
  mkdir -p "fuzz/corpus/$target"
  RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz "$target" "fuzz/corpus/$target" -- \
    -max_total_time="$seconds" -max_len=65536
done
