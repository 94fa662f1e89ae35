//! spillway's behaviour, tested against real Redis and ClickHouse servers.
//!
//! Start them with `scripts/servers.sh start` (or run everything with `scripts/test.sh`); the
//! tests read `SPILLWAY_TEST_REDIS_URL`, `SPILLWAY_TEST_CLICKHOUSE_URL` and
//! `SPILLWAY_TEST_CHDB_URL`. Every test uses its own key prefix and database, so they run in
//! parallel.

mod helpers;

mod buffer;
mod cli;
mod current_clickhouse;
mod embedded;
mod flush;
mod golden;
mod reliability;
mod screen_views;
mod service;
mod visitors;
