//! Shared test setup: isolated key prefixes and databases on the real servers.

#![allow(dead_code)]

use std::time::Duration;

use redis::AsyncCommands;
use spillway::{
    BatchSettings, Buffer, ClickHouseSettings, ClickHouseSink, Event, FlushSettings, Flusher,
    HeldSettings, Queue, RedisQueue, SchemaVariant, Sink,
};

fn server_url(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!(
            "{var} is not set: these tests need the real servers. Run `scripts/test.sh`, or \
             `eval \"$(scripts/servers.sh start)\"` before `cargo test`."
        )
    })
}

/// One test's slice of the servers: its own Redis key prefix and ClickHouse database.
pub(crate) struct TestEnv {
    pub(crate) redis_url: String,
    pub(crate) clickhouse_url: String,
    pub(crate) prefix: String,
    pub(crate) database: String,
    pub(crate) redis: redis::aio::MultiplexedConnection,
    pub(crate) queue: Queue,
    http: reqwest::Client,
}

impl TestEnv {
    /// Against Redis and ClickHouse 18.16.
    pub(crate) async fn new() -> TestEnv {
        TestEnv::with_clickhouse("SPILLWAY_TEST_CLICKHOUSE_URL").await
    }

    /// Against Redis and the current ClickHouse engine (chdb).
    pub(crate) async fn current() -> TestEnv {
        TestEnv::with_clickhouse("SPILLWAY_TEST_CHDB_URL").await
    }

    async fn with_clickhouse(var: &str) -> TestEnv {
        let redis_url = server_url("SPILLWAY_TEST_REDIS_URL");
        let clickhouse_url = server_url(var);
        let id = uuid::Uuid::new_v4().simple().to_string();
        let prefix = format!("test:{id}:");
        let database = format!("t_{id}");
        let client = redis::Client::open(redis_url.as_str()).expect("redis url");
        let redis = client
            .get_multiplexed_async_connection()
            .await
            .expect("Redis at SPILLWAY_TEST_REDIS_URL answers");
        let queue = Queue::Redis(
            RedisQueue::connect(&redis_url, &prefix, HeldSettings::default())
                .await
                .expect("queue connects"),
        );
        TestEnv {
            redis_url,
            clickhouse_url,
            prefix,
            database,
            redis,
            queue,
            // No pooling: a connection the server closed while idle would fail the next query.
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()
                .expect("http client"),
        }
    }

    /// A prefixed Redis key.
    pub(crate) fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// A buffer with the default settings.
    pub(crate) fn buffer(&self) -> Buffer {
        self.buffer_with(BatchSettings::default())
    }

    pub(crate) fn buffer_with(&self, settings: BatchSettings) -> Buffer {
        Buffer::start(self.queue.clone(), settings, HeldSettings::default()).0
    }

    /// Adds events and waits until they are in Redis.
    pub(crate) async fn add_all(&self, buffer: &Buffer, events: &[&str]) {
        let events = events.iter().map(|e| parse(e)).collect();
        buffer
            .bulk_add(events)
            .await
            .expect("buffer open")
            .written()
            .await
            .expect("written");
    }

    pub(crate) async fn llen(&self, name: &str) -> usize {
        let mut redis = self.redis.clone();
        redis.llen(self.key(name)).await.expect("LLEN")
    }

    /// The queued entries, oldest first.
    pub(crate) async fn queued(&self) -> Vec<String> {
        let mut redis = self.redis.clone();
        redis
            .lrange(self.key("event_buffer:queue"), 0, -1)
            .await
            .expect("LRANGE")
    }

    /// Runs SQL on this test's ClickHouse and returns the body.
    pub(crate) async fn sql(&self, sql: &str) -> String {
        let response = self
            .http
            .post(&self.clickhouse_url)
            .body(sql.to_owned())
            .send()
            .await
            .expect("ClickHouse answers");
        let status = response.status();
        let body = response.text().await.expect("body");
        assert!(status.is_success(), "{sql}\n-> {status}: {body}");
        body
    }

    /// Creates this test's database and an events table of the given shape.
    pub(crate) async fn create_table(&self, variant: SchemaVariant, table: &str) {
        self.sql(&format!("CREATE DATABASE IF NOT EXISTS {}", self.database))
            .await;
        self.sql(&variant.ddl(&self.database, table)).await;
    }

    /// A sink into `table` of this test's database (the table must exist).
    pub(crate) async fn sink(&self, table: &str) -> Sink {
        let settings = ClickHouseSettings {
            url: self.clickhouse_url.clone(),
            database: self.database.clone(),
            table: table.to_owned(),
            ..ClickHouseSettings::default()
        };
        Sink::ClickHouse(
            ClickHouseSink::connect(settings)
                .await
                .expect("sink connects"),
        )
    }

    /// A flusher into a fresh `events` table of the given shape.
    pub(crate) async fn flusher(&self, variant: SchemaVariant, settings: FlushSettings) -> Flusher {
        self.create_table(variant, "events").await;
        Flusher::new(self.queue.clone(), self.sink("events").await, settings)
    }

    /// Rows of a table as JSON values, in the order ClickHouse returns them.
    pub(crate) async fn rows(&self, select: &str) -> Vec<serde_json::Value> {
        let body = self.sql(&format!("{select} FORMAT JSONEachRow")).await;
        body.lines()
            .map(|l| serde_json::from_str(l).expect("JSONEachRow"))
            .collect()
    }

    /// INSERT queries that finished on `table` of this test's database, from the query log.
    pub(crate) async fn inserts_into(&self, table: &str) -> Vec<u64> {
        self.sql("SYSTEM FLUSH LOGS").await;
        let body = self
            .sql(&format!(
                "SELECT written_rows FROM system.query_log WHERE type = 2 \
                 AND query LIKE 'INSERT INTO `{}`.`{table}`%' ORDER BY event_time, written_rows",
                self.database
            ))
            .await;
        body.lines().map(|l| l.parse().expect("number")).collect()
    }
}

pub(crate) fn parse(json: &str) -> Event {
    Event::parse(json).unwrap_or_else(|e| panic!("{json}: {e}"))
}

/// A flusher's settings with small batches, for tests.
pub(crate) fn flush_settings(batch_size: usize, chunk_size: usize) -> FlushSettings {
    FlushSettings {
        batch_size,
        chunk_size,
        lock_ttl: Duration::from_secs(60),
    }
}

/// `2024-06-01 00:00:SS.mmm` plus `millis`.
pub(crate) fn at(millis: u64) -> String {
    let secs = millis / 1000;
    format!(
        "2024-06-01 {:02}:{:02}:{:02}.{:03}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        millis % 1000
    )
}

/// A UUID (the `id` column's type) made from a short label: its bytes in hex.
pub(crate) fn uid(label: &str) -> String {
    let hex: String = label.bytes().map(|b| format!("{b:02x}")).collect();
    format!("00000000-0000-0000-0000-{hex:0>12}")
}

/// The label of an event made by the helpers below (its `path` without the slash).
pub(crate) fn label(json: &str) -> String {
    let path = field(json, "path");
    path.as_str()
        .expect("path")
        .trim_start_matches('/')
        .to_owned()
}

/// The labels of a table's rows, as SQL: ordered by label.
pub(crate) fn labels_sql(table: &str) -> String {
    format!("SELECT substring(path, 2) FROM {table} ORDER BY path")
}

pub(crate) fn screen_view(label: &str, session: &str, profile: &str, millis: u64) -> String {
    format!(
        r#"{{"id":"{}","name":"screen_view","project_id":"p1","session_id":"{session}","profile_id":"{profile}","created_at":"{}","path":"/{label}","duration":0}}"#,
        uid(label),
        at(millis)
    )
}

pub(crate) fn session_end(label: &str, session: &str, profile: &str, millis: u64) -> String {
    format!(
        r#"{{"id":"{}","name":"session_end","project_id":"p1","session_id":"{session}","profile_id":"{profile}","created_at":"{}","path":"/{label}","duration":0}}"#,
        uid(label),
        at(millis)
    )
}

pub(crate) fn click(label: &str, project: &str, millis: u64) -> String {
    format!(
        r#"{{"id":"{}","name":"click","project_id":"{project}","session_id":"s-{label}","profile_id":"","created_at":"{}","path":"/{label}","duration":0}}"#,
        uid(label),
        at(millis)
    )
}

/// A field of a JSON text.
pub(crate) fn field(json: &str, name: &str) -> serde_json::Value {
    let value: serde_json::Value = serde_json::from_str(json).expect("json");
    value[name].clone()
}
