//! Shared test setup: isolated key prefixes and databases on the real servers, a fresh data
//! directory for the embedded backend, and [`Backend`], which runs one behaviour test against
//! either.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use redis::AsyncCommands;
use spillway::{
    BatchSettings, Buffer, ClickHouseSettings, ClickHouseSink, Event, FlushSettings, Flusher,
    Queue, QueueError, QueueSettings, RedisQueue, SchemaVariant, Sink, SqliteQueue, SqliteSink,
};

fn server_url(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!(
            "{var} is not set: these tests need the real servers. Run `scripts/test.sh`, or \
             `eval \"$(scripts/servers.sh start)\"` before `cargo test`."
        )
    })
}

/// The seed nodes of the test cluster (`scripts/cluster.sh start`, which `scripts/test.sh` runs).
pub(crate) fn cluster_nodes() -> Vec<String> {
    server_url("SPILLWAY_TEST_REDIS_CLUSTER")
        .split(',')
        .map(str::to_owned)
        .collect()
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

    /// Against the Redis Cluster of `SPILLWAY_TEST_REDIS_CLUSTER` (a queue of `shards` shards)
    /// and ClickHouse 18.16. The single Redis connection stays for what tests read raw.
    pub(crate) async fn on_cluster(shards: usize) -> TestEnv {
        let mut env = TestEnv::new().await;
        let nodes = cluster_nodes();
        env.queue = Queue::Redis(
            RedisQueue::connect_cluster(&nodes, &env.prefix, QueueSettings::default())
                .await
                .expect("cluster queue connects")
                .sharded(shards),
        );
        env
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
            RedisQueue::connect(&redis_url, &prefix, QueueSettings::default())
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
        Buffer::start(self.queue.clone(), settings, QueueSettings::default()).0
    }

    /// Adds events and waits until they are in Redis.
    pub(crate) async fn add_all(&self, buffer: &Buffer, events: &[&str]) {
        add_all(buffer, events).await;
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

    /// Rows in this test's `events` table, read until there are at least `at_least` or two
    /// minutes have passed; returns the last count.
    pub(crate) async fn wait_for_rows(&self, at_least: u64) -> u64 {
        let count = format!("SELECT count() FROM {}.events", self.database);
        let mut rows = 0;
        for _ in 0..1200 {
            rows = self.sql(&count).await.trim().parse().expect("count");
            if rows >= at_least {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        rows
    }

    /// INSERT queries that finished on `table` of this test's database, from the query log:
    /// the rows of each, once the log holds at least `expected` of them and two reads a moment
    /// apart agree (the log is written in the background; a loaded machine can be seconds late).
    pub(crate) async fn inserts_into(&self, table: &str, expected: usize) -> Vec<u64> {
        let mut previous: Option<Vec<u64>> = None;
        for _ in 0..100 {
            self.sql("SYSTEM FLUSH LOGS").await;
            let body = self
                .sql(&format!(
                    "SELECT written_rows FROM system.query_log WHERE type = 2 \
                     AND query LIKE 'INSERT INTO `{}`.`{table}`%' ORDER BY event_time, written_rows",
                    self.database
                ))
                .await;
            let sizes: Vec<u64> = body.lines().map(|l| l.parse().expect("number")).collect();
            if sizes.len() >= expected.max(1) && previous.as_ref() == Some(&sizes) {
                return sizes;
            }
            previous = Some(sizes);
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        }
        previous.unwrap_or_default()
    }
}

/// One test's data directory for the embedded backend, with the queue and the sink opened in
/// it; deleted on drop.
pub(crate) struct EmbeddedEnv {
    pub(crate) dir: PathBuf,
    pub(crate) queue: Queue,
    pub(crate) sink: Sink,
}

impl EmbeddedEnv {
    pub(crate) fn new() -> EmbeddedEnv {
        let dir = fresh_dir();
        let (queue, sink) = open_embedded(&dir).expect("data directory opens");
        EmbeddedEnv { dir, queue, sink }
    }

    /// A buffer with the default settings.
    pub(crate) fn buffer(&self) -> Buffer {
        Buffer::start(
            self.queue.clone(),
            BatchSettings::default(),
            QueueSettings::default(),
        )
        .0
    }

    /// A flusher into the embedded sink.
    pub(crate) fn flusher(&self, settings: FlushSettings) -> Flusher {
        Flusher::new(self.queue.clone(), self.sink.clone(), settings)
    }

    /// A second connection to the database, as `redis-cli` is to Redis.
    pub(crate) fn sql(&self) -> rusqlite::Connection {
        let conn = rusqlite::Connection::open(self.dir.join("spillway.db")).expect("db opens");
        conn.busy_timeout(Duration::from_secs(10))
            .expect("busy timeout");
        conn
    }

    /// Runs a statement on the second connection.
    pub(crate) fn execute(&self, sql: &str, params: impl rusqlite::Params) {
        self.sql().execute(sql, params).expect(sql);
    }

    /// The first column of a query's rows, as text.
    pub(crate) fn strings(&self, sql: &str) -> Vec<String> {
        let conn = self.sql();
        let mut select = conn.prepare(sql).expect(sql);
        let rows = select.query_map([], |row| row.get(0)).expect(sql);
        rows.collect::<Result<_, _>>().expect(sql)
    }

    /// The one integer a query returns.
    pub(crate) fn number(&self, sql: &str) -> i64 {
        self.sql().query_row(sql, [], |row| row.get(0)).expect(sql)
    }

    /// The queued entries, oldest first.
    pub(crate) fn queued(&self) -> Vec<String> {
        self.strings("SELECT entry FROM queue ORDER BY seq")
    }
}

impl Drop for EmbeddedEnv {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A data directory path no test has used.
pub(crate) fn fresh_dir() -> PathBuf {
    std::env::temp_dir().join(format!("spillway-test-{}", uuid::Uuid::new_v4().simple()))
}

/// Opens the embedded queue and sink in `dir`.
pub(crate) fn open_embedded(dir: &Path) -> Result<(Queue, Sink), QueueError> {
    let queue = SqliteQueue::open(dir, QueueSettings::default())?;
    let sink = SqliteSink::open(&queue).expect("sink tables");
    Ok((Queue::Embedded(queue), Sink::Embedded(sink)))
}

/// One test's backend, for the behaviour tests both backends must pass (`conformance/`): each
/// operation a test body needs beyond the public API, implemented once per backend.
pub(crate) enum Backend {
    /// Redis and a ClickHouse server; flushers write into an `events` table of `schema`'s shape.
    Redis { env: TestEnv, schema: SchemaVariant },
    /// The SQLite queue and sink in a fresh data directory.
    Embedded(EmbeddedEnv),
}

/// A landed row's columns that the golden trace fixes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct LandedRow {
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) project_id: String,
    pub(crate) session_id: String,
    pub(crate) profile_id: String,
    pub(crate) duration: u64,
}

impl Backend {
    /// Redis and ClickHouse 18.16, flushing into the legacy table.
    pub(crate) async fn redis() -> Backend {
        Backend::Redis {
            env: TestEnv::new().await,
            schema: SchemaVariant::Legacy,
        }
    }

    /// The test Redis Cluster, a queue of `shards` shards, and ClickHouse 18.16.
    pub(crate) async fn cluster(shards: usize) -> Backend {
        Backend::Redis {
            env: TestEnv::on_cluster(shards).await,
            schema: SchemaVariant::Legacy,
        }
    }

    /// Redis and the current ClickHouse engine (chdb), flushing into OpenPanel's current table.
    pub(crate) async fn redis_current() -> Backend {
        Backend::Redis {
            env: TestEnv::current().await,
            schema: SchemaVariant::Current,
        }
    }

    /// The SQLite queue and sink in a fresh data directory.
    pub(crate) async fn embedded() -> Backend {
        Backend::Embedded(EmbeddedEnv::new())
    }

    /// A fresh backend of the same kind, sharing nothing with this one.
    pub(crate) async fn another(&self) -> Backend {
        match self {
            Backend::Redis {
                schema: SchemaVariant::Legacy,
                ..
            } => Backend::redis().await,
            Backend::Redis {
                schema: SchemaVariant::Current,
                ..
            } => Backend::redis_current().await,
            Backend::Embedded(_) => Backend::embedded().await,
        }
    }

    pub(crate) fn queue(&self) -> &Queue {
        match self {
            Backend::Redis { env, .. } => &env.queue,
            Backend::Embedded(env) => &env.queue,
        }
    }

    /// A buffer with the default settings.
    pub(crate) fn buffer(&self) -> Buffer {
        self.buffer_with(BatchSettings::default())
    }

    pub(crate) fn buffer_with(&self, settings: BatchSettings) -> Buffer {
        Buffer::start(self.queue().clone(), settings, QueueSettings::default()).0
    }

    /// Adds events and waits until they are in the queue.
    pub(crate) async fn add_all(&self, buffer: &Buffer, events: &[&str]) {
        add_all(buffer, events).await;
    }

    /// The queued entries, oldest first.
    pub(crate) async fn queued(&self) -> Vec<String> {
        match self {
            Backend::Redis { env, .. } => env.queued().await,
            Backend::Embedded(env) => env.queued(),
        }
    }

    /// The held screen views as `(key, event id, ts)`, the key named as in OpenPanel's Redis
    /// layout (`event_buffer:last_screen_view:session:<session>` and
    /// `...:profile:<project>:<profile>`) on both backends. Expired views are left out.
    pub(crate) async fn held_keys(&self) -> BTreeSet<(String, String, i64)> {
        let event_id = |event: &serde_json::Value| -> String {
            event["id"].as_str().expect("held event id").to_owned()
        };
        let mut held = BTreeSet::new();
        match self {
            Backend::Redis { env, .. } => {
                let mut redis = env.redis.clone();
                let keys: Vec<String> = redis
                    .keys(format!("{}event_buffer:last_screen_view:*", env.prefix))
                    .await
                    .expect("KEYS");
                for key in keys {
                    let value: String = redis.get(&key).await.expect("GET");
                    let value: serde_json::Value = serde_json::from_str(&value).expect("held json");
                    held.insert((
                        key.trim_start_matches(&env.prefix).to_owned(),
                        event_id(&value["event"]),
                        value["ts"].as_i64().expect("ts"),
                    ));
                }
            }
            Backend::Embedded(env) => {
                let now = spillway::time::now().as_millis();
                let conn = env.sql();
                let mut select = conn
                    .prepare(
                        "SELECT 'session:' || session, event, ts FROM held_sessions \
                         WHERE expires_ms > ?1 \
                         UNION ALL SELECT 'profile:' || project || ':' || profile, event, ts \
                         FROM held_profiles WHERE expires_ms > ?1",
                    )
                    .expect("select held");
                let rows = select
                    .query_map([now], |r| {
                        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get(2)?))
                    })
                    .expect("held rows");
                for row in rows {
                    let (key, event, ts) = row.expect("held row");
                    let event: serde_json::Value = serde_json::from_str(&event).expect("json");
                    held.insert((
                        format!("event_buffer:last_screen_view:{key}"),
                        event_id(&event),
                        ts,
                    ));
                }
            }
        }
        held
    }

    /// Appends an entry to the queue as is, bypassing the buffer's validation (on Redis keeping
    /// the counter equal to the list, as the enqueue script does).
    pub(crate) async fn push_raw_entry(&self, entry: &str) {
        match self {
            Backend::Redis { env, .. } => {
                let mut redis = env.redis.clone();
                let _: () = redis
                    .rpush(env.key("event_buffer:queue"), entry)
                    .await
                    .expect("RPUSH");
                let _: () = redis
                    .incr(env.key("event_buffer:total_count"), 1)
                    .await
                    .expect("INCR");
            }
            Backend::Embedded(env) => env.execute("INSERT INTO queue (entry) VALUES (?1)", [entry]),
        }
    }

    /// Puts a batch in flight as a flusher that died after recording `chunks_done` chunks of it
    /// leaves it.
    pub(crate) async fn abandon_batch(
        &self,
        batch_id: &str,
        chunks_done: usize,
        entries: &[String],
    ) {
        match self {
            Backend::Redis { env, .. } => {
                let mut redis = env.redis.clone();
                let _: () = redis
                    .rpush(env.key("event_buffer:inflight"), entries)
                    .await
                    .expect("RPUSH");
                let _: () = redis
                    .hset_multiple(
                        env.key("event_buffer:inflight:meta"),
                        &[
                            ("batch_id", batch_id),
                            ("chunks_done", &chunks_done.to_string()),
                        ],
                    )
                    .await
                    .expect("HSET");
            }
            Backend::Embedded(env) => {
                let conn = env.sql();
                for entry in entries {
                    conn.execute("INSERT INTO in_flight (entry) VALUES (?1)", [entry])
                        .expect("in flight");
                }
                conn.execute(
                    "INSERT OR REPLACE INTO in_flight_meta (id, batch_id, chunks_done) \
                     VALUES (1, ?1, ?2)",
                    rusqlite::params![batch_id, chunks_done],
                )
                .expect("meta");
            }
        }
    }

    /// Milliseconds until a visitor's heartbeat expires.
    pub(crate) async fn heartbeat_ttl_ms(&self, project: &str, profile: &str) -> i64 {
        match self {
            Backend::Redis { env, .. } => {
                let mut redis = env.redis.clone();
                redis
                    .pttl(env.key(&format!("live:visitor:{project}:{profile}")))
                    .await
                    .expect("PTTL")
            }
            Backend::Embedded(env) => {
                let expires = env.sql().query_row(
                    "SELECT expires_ms FROM heartbeats WHERE project = ?1 AND profile = ?2",
                    [project, profile],
                    |r| r.get::<_, i64>(0),
                );
                expires.expect("a heartbeat") - spillway::time::now().as_millis()
            }
        }
    }

    /// Makes a visitor's heartbeat look older than the refresh period: 200 s of its 300 s left.
    pub(crate) async fn age_heartbeat(&self, project: &str, profile: &str) {
        match self {
            Backend::Redis { env, .. } => {
                let mut redis = env.redis.clone();
                let _: () = redis
                    .pexpire(
                        env.key(&format!("live:visitor:{project}:{profile}")),
                        200_000,
                    )
                    .await
                    .expect("PEXPIRE");
            }
            Backend::Embedded(env) => env.execute(
                "UPDATE heartbeats SET expires_ms = ?1 WHERE project = ?2 AND profile = ?3",
                rusqlite::params![
                    spillway::time::now().as_millis() + 200_000,
                    project,
                    profile
                ],
            ),
        }
    }

    /// When a visitor was last seen (ms), as the live-visitor count reads it.
    pub(crate) async fn visitor_last_seen(&self, project: &str, profile: &str) -> i64 {
        match self {
            Backend::Redis { env, .. } => {
                let mut redis = env.redis.clone();
                let score: f64 = redis
                    .zscore(env.key(&format!("live:visitors:{project}")), profile)
                    .await
                    .expect("ZSCORE");
                // Scores are whole milliseconds.
                score as i64
            }
            Backend::Embedded(env) => env
                .sql()
                .query_row(
                    "SELECT last_ms FROM visitors WHERE project = ?1 AND profile = ?2",
                    [project, profile],
                    |r| r.get(0),
                )
                .expect("a visitor"),
        }
    }

    /// Records a visitor as last seen at `millis`, without a heartbeat.
    pub(crate) async fn add_visitor_at(&self, project: &str, profile: &str, millis: i64) {
        match self {
            Backend::Redis { env, .. } => {
                let mut redis = env.redis.clone();
                let _: () = redis
                    .zadd(
                        env.key(&format!("live:visitors:{project}")),
                        profile,
                        millis,
                    )
                    .await
                    .expect("ZADD");
            }
            Backend::Embedded(env) => env.execute(
                "INSERT OR REPLACE INTO visitors (project, profile, last_ms) VALUES (?1, ?2, ?3)",
                rusqlite::params![project, profile, millis],
            ),
        }
    }

    /// The profiles recorded as visitors of a project, trimmed or not, oldest first.
    pub(crate) async fn visitors(&self, project: &str) -> Vec<String> {
        match self {
            Backend::Redis { env, .. } => {
                let mut redis = env.redis.clone();
                redis
                    .zrange(env.key(&format!("live:visitors:{project}")), 0, -1)
                    .await
                    .expect("ZRANGE")
            }
            Backend::Embedded(env) => {
                let conn = env.sql();
                let mut select = conn
                    .prepare("SELECT profile FROM visitors WHERE project = ?1 ORDER BY last_ms")
                    .expect("select visitors");
                let rows = select.query_map([project], |r| r.get(0)).expect("visitors");
                rows.collect::<Result<_, _>>().expect("visitors")
            }
        }
    }

    /// A flusher into this test's sink: on Redis, a fresh `events` table of the backend's shape
    /// (created once; a second call adds a flusher on the same table).
    pub(crate) async fn flusher(&self, settings: FlushSettings) -> Flusher {
        match self {
            Backend::Redis { env, schema } => env.flusher(*schema, settings).await,
            Backend::Embedded(env) => env.flusher(settings),
        }
    }

    /// A flusher into a table that keeps rows in insertion order, for
    /// [`Backend::landed_in_insertion_order`]. On ClickHouse that is a `Log` table with only the
    /// columns the tests read (a MergeTree table returns rows in its key's order); the embedded
    /// `events` table always does.
    pub(crate) async fn flusher_into_ordered_table(&self, settings: FlushSettings) -> Flusher {
        match self {
            Backend::Redis { env, .. } => {
                env.sql(&format!("CREATE DATABASE IF NOT EXISTS {}", env.database))
                    .await;
                env.sql(&format!(
                    "CREATE TABLE {}.events (path String, created_at DateTime, duration UInt64) \
                     ENGINE = Log",
                    env.database
                ))
                .await;
                Flusher::new(env.queue.clone(), env.sink("events").await, settings)
            }
            Backend::Embedded(_) => self.flusher(settings).await,
        }
    }

    /// Makes every insert into the sink fail: its table is renamed away.
    pub(crate) async fn break_sink(&self) {
        match self {
            Backend::Redis { env, .. } => {
                let db = &env.database;
                env.sql(&format!("RENAME TABLE {db}.events TO {db}.away"))
                    .await;
            }
            Backend::Embedded(env) => env.execute("ALTER TABLE events RENAME TO away", []),
        }
    }

    /// Undoes [`Backend::break_sink`].
    pub(crate) async fn repair_sink(&self) {
        match self {
            Backend::Redis { env, .. } => {
                let db = &env.database;
                env.sql(&format!("RENAME TABLE {db}.away TO {db}.events"))
                    .await;
            }
            Backend::Embedded(env) => env.execute("ALTER TABLE away RENAME TO events", []),
        }
    }

    /// The labels of the landed rows, sorted.
    pub(crate) async fn landed_labels(&self) -> Vec<String> {
        match self {
            Backend::Redis { env, .. } => {
                let table = format!("{}.events", env.database);
                let labels = env.sql(&labels_sql(&table)).await;
                labels.split_whitespace().map(str::to_owned).collect()
            }
            Backend::Embedded(env) => {
                let events = env.strings("SELECT event FROM events");
                let mut labels: Vec<String> = events.iter().map(|e| label(e)).collect();
                labels.sort();
                labels
            }
        }
    }

    /// The labels of the landed rows in the order they were inserted; on Redis + ClickHouse
    /// only after [`Backend::flusher_into_ordered_table`].
    pub(crate) async fn landed_in_insertion_order(&self) -> Vec<String> {
        match self {
            Backend::Redis { env, .. } => env
                .rows(&format!("SELECT path FROM {}.events", env.database))
                .await
                .iter()
                .map(|r| r["path"].as_str().expect("path")[1..].to_owned())
                .collect(),
            Backend::Embedded(env) => {
                let events = env.strings("SELECT event FROM events ORDER BY rowid");
                events.iter().map(|e| label(e)).collect()
            }
        }
    }

    /// How many rows landed, and how many distinct ids they have.
    pub(crate) async fn landed_count_and_unique(&self) -> (u64, u64) {
        match self {
            Backend::Redis { env, .. } => {
                let counts = env
                    .sql(&format!(
                        "SELECT count(), uniqExact(id) FROM {}.events",
                        env.database
                    ))
                    .await;
                let (count, unique) = counts.trim().split_once('\t').expect("two columns");
                (
                    count.parse().expect("count"),
                    unique.parse().expect("unique"),
                )
            }
            Backend::Embedded(env) => {
                let count = env.number("SELECT count(*) FROM events");
                let unique = env.number("SELECT count(DISTINCT id) FROM events");
                (
                    u64::try_from(count).expect("count"),
                    u64::try_from(unique).expect("unique"),
                )
            }
        }
    }

    /// The landed rows' golden columns, sorted by id as text.
    pub(crate) async fn landed_rows(&self) -> Vec<LandedRow> {
        let mut rows: Vec<LandedRow> = match self {
            Backend::Redis { env, .. } => env
                .rows(&format!(
                    "SELECT id, name, project_id, session_id, profile_id, duration FROM {}.events",
                    env.database
                ))
                .await
                .iter()
                .map(|r| {
                    let text = |column: &str| r[column].as_str().expect(column).to_owned();
                    // ClickHouse quotes 64-bit integers in JSON.
                    let duration = match &r["duration"] {
                        serde_json::Value::String(ms) => ms.parse().expect("UInt64"),
                        ms => ms.as_u64().expect("UInt64"),
                    };
                    LandedRow {
                        id: text("id"),
                        name: text("name"),
                        project_id: text("project_id"),
                        session_id: text("session_id"),
                        profile_id: text("profile_id"),
                        duration,
                    }
                })
                .collect(),
            Backend::Embedded(env) => {
                let conn = env.sql();
                let mut select = conn
                    .prepare(
                        "SELECT id, name, project_id, session_id, profile_id, duration FROM events",
                    )
                    .expect("select rows");
                let rows = select
                    .query_map([], |r| {
                        Ok(LandedRow {
                            id: r.get(0)?,
                            name: r.get(1)?,
                            project_id: r.get(2)?,
                            session_id: r.get(3)?,
                            profile_id: r.get(4)?,
                            duration: r.get(5)?,
                        })
                    })
                    .expect("rows");
                rows.collect::<Result<_, _>>().expect("rows")
            }
        };
        rows.sort();
        rows
    }

    /// Asserts the rows each insert request carried, `expected` in insertion order. ClickHouse's
    /// query log times queries to the second only, so on Redis + ClickHouse the sizes are
    /// compared in sorted order; the embedded sink records its chunks in order.
    pub(crate) async fn assert_insert_sizes(&self, expected: &[u64], message: &str) {
        match self {
            Backend::Redis { env, .. } => {
                let mut expected = expected.to_vec();
                expected.sort_unstable();
                let sizes = env.inserts_into("events", expected.len()).await;
                assert_eq!(sizes, expected, "{message}");
            }
            Backend::Embedded(env) => {
                let sizes =
                    env.strings("SELECT CAST(rows AS TEXT) FROM sink_chunks ORDER BY rowid");
                let sizes: Vec<u64> = sizes.iter().map(|s| s.parse().expect("rows")).collect();
                assert_eq!(sizes, expected, "{message}");
            }
        }
    }

    /// The batch notifications flushes publish from now on: on Redis, read straight off
    /// OpenPanel's `events:batch` channel; the embedded queue has no channel, only
    /// [`Queue::subscribe`].
    pub(crate) async fn batch_notifications(&self) -> BoxStream<'static, String> {
        match self {
            Backend::Redis { env, .. } => {
                let client = redis::Client::open(env.redis_url.as_str()).expect("url");
                let mut pubsub = client.get_async_pubsub().await.expect("pubsub");
                pubsub
                    .subscribe(env.key("events:batch"))
                    .await
                    .expect("SUBSCRIBE");
                pubsub
                    .into_on_message()
                    .map(|message| message.get_payload::<String>().expect("text"))
                    .boxed()
            }
            Backend::Embedded(env) => env.queue.subscribe().await.expect("subscribe"),
        }
    }
}

/// Adds events and waits until they are in the queue.
pub(crate) async fn add_all(buffer: &Buffer, events: &[&str]) {
    let events = events.iter().map(|e| parse(e)).collect();
    buffer
        .bulk_add(events)
        .await
        .expect("buffer open")
        .written()
        .await
        .expect("written");
}

/// The events as `&str`s.
pub(crate) fn refs(events: &[String]) -> Vec<&str> {
    events.iter().map(String::as_str).collect()
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
