//! spillway's behaviour, tested against real Redis and ClickHouse servers and against the
//! embedded backend.
//!
//! Start the servers with `scripts/servers.sh start` (or run everything with `scripts/test.sh`);
//! the tests read `SPILLWAY_TEST_REDIS_URL`, `SPILLWAY_TEST_CLICKHOUSE_URL` and
//! `SPILLWAY_TEST_CHDB_URL`. Every test uses its own key prefix, database or data directory, so
//! they run in parallel.
//!
//! The behaviours both backends share are written once, in `conformance/`, and run against
//! each; `redis_only.rs`, `current_clickhouse.rs` and `embedded.rs` hold what only one has.

mod helpers;

mod cli;
mod cluster;
mod conformance;
mod current_clickhouse;
mod embedded;
mod redis_only;
mod reliability;
mod service;
mod status_page;
