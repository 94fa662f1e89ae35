//! Settings of each stage, with the seed's defaults.

use std::time::Duration;

/// Micro-batching: how events are gathered before one write to the queue.
#[derive(Debug, Clone, Copy)]
pub struct BatchSettings {
    /// Write when this many events are gathered (`EVENT_BUFFER_MICRO_BATCH_SIZE`, 100).
    pub max_events: usize,
    /// Write at the latest this long after the first event arrived (`EVENT_BUFFER_MICRO_BATCH_MS`, 10 ms).
    pub max_wait: Duration,
    /// Events that may wait in memory for a write before `add` waits for room.
    pub max_pending: usize,
}

impl Default for BatchSettings {
    fn default() -> Self {
        BatchSettings {
            max_events: 100,
            max_wait: Duration::from_millis(10),
            max_pending: 100_000,
        }
    }
}

/// What the queue keeps besides queued events, and for how long: held screen views, live
/// visitors, and the ids of events it has taken in.
#[derive(Debug, Clone, Copy)]
pub struct QueueSettings {
    /// Expiry of a held screen view (3600 s).
    pub ttl: Duration,
    /// A visitor counts as live this long after its last heartbeat (300 s).
    pub visitor_window: Duration,
    /// A visitor's heartbeat is refreshed at most this often, across all processes (60 s).
    pub heartbeat_refresh: Duration,
    /// An event whose `id` the queue took in less than this long ago is dropped as a client's
    /// re-send (120 s); zero turns the check off.
    pub dedup_window: Duration,
}

impl Default for QueueSettings {
    fn default() -> Self {
        QueueSettings {
            ttl: Duration::from_secs(3600),
            visitor_window: Duration::from_secs(300),
            heartbeat_refresh: Duration::from_secs(60),
            dedup_window: Duration::from_secs(120),
        }
    }
}

/// Flushing from the queue into the sink.
#[derive(Debug, Clone, Copy)]
pub struct FlushSettings {
    /// Events claimed per flush (`EVENT_BUFFER_BATCH_SIZE`, 4000).
    pub batch_size: usize,
    /// Rows per insert (`EVENT_BUFFER_CHUNK_SIZE`, 1000).
    pub chunk_size: usize,
    /// Expiry of the flush lock; renewed after every chunk. Kept above the sink's request
    /// timeout so a live flusher cannot lose the lock in the middle of an insert.
    pub lock_ttl: Duration,
}

impl Default for FlushSettings {
    fn default() -> Self {
        FlushSettings {
            batch_size: 4000,
            chunk_size: 1000,
            lock_ttl: Duration::from_secs(60),
        }
    }
}

/// Where the ClickHouse sink writes.
#[derive(Clone)]
pub struct ClickHouseSettings {
    /// Base URL of the HTTP interface, e.g. `http://127.0.0.1:8123`.
    pub url: String,
    /// User name; none sends no credentials.
    pub user: Option<String>,
    /// Password for `user`.
    pub password: Option<String>,
    /// Database of the events table.
    pub database: String,
    /// The events table.
    pub table: String,
    /// Timeout of one request (30 s).
    pub timeout: Duration,
}

impl Default for ClickHouseSettings {
    fn default() -> Self {
        ClickHouseSettings {
            url: "http://127.0.0.1:8123".to_owned(),
            user: None,
            password: None,
            database: "default".to_owned(),
            table: "events".to_owned(),
            timeout: Duration::from_secs(30),
        }
    }
}

impl std::fmt::Debug for ClickHouseSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClickHouseSettings")
            .field("url", &self.url)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("database", &self.database)
            .field("table", &self.table)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// The whole configuration, as a TOML file holds it. Every field has a default; flags and
/// environment variables override the file (see `spillway --help`).
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Directory of the embedded queue and sink (used when Redis / ClickHouse are not set).
    pub data_dir: std::path::PathBuf,
    /// Redis queue; absent means the embedded queue.
    pub redis: Option<RedisConfig>,
    /// ClickHouse sink; absent means the embedded sink.
    pub clickhouse: Option<ClickHouseConfig>,
    /// The HTTP service.
    pub http: HttpConfig,
    /// Micro-batching.
    pub batch: BatchConfig,
    /// Flushing.
    pub flush: FlushConfig,
    /// Held screen views and live visitors.
    pub held: HeldConfig,
    /// The outage journal of a Redis queue.
    pub journal: JournalConfig,
    /// Per-project write keys; empty means no authentication.
    pub write_keys: std::collections::BTreeMap<String, String>,
    /// Longest graceful shutdown, in ms, before the process exits anyway.
    pub shutdown_timeout_ms: u64,
    /// Log format: `human` or `json`.
    pub log_format: LogFormat,
}

/// Log output format.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Readable lines, for a terminal.
    Human,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Where the Redis queue is.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]` of a single server; empty with `cluster_nodes`.
    #[serde(default)]
    pub url: String,
    /// Seed nodes of a Redis Cluster (`redis://host:port` each); any reachable one will do.
    #[serde(default)]
    pub cluster_nodes: Vec<String>,
    /// Prefix for every key and channel; empty keeps OpenPanel's names.
    #[serde(default)]
    pub key_prefix: String,
    /// Queue shards, each with its own flush lock (one flusher at a time per shard). Default:
    /// 1 on a single server (OpenPanel's layout), 16 on a cluster.
    #[serde(default)]
    pub shards: Option<usize>,
    /// Replicas each write must reach (`WAIT`) before events are acknowledged; 0 waits for
    /// none (Redis' asynchronous replication: a master that dies may lose its last writes).
    #[serde(default)]
    pub wait_replicas: u32,
    /// Longest `WAIT`, ms; a write that reached fewer replicas is retried (or journaled).
    #[serde(default = "default_wait_timeout_ms")]
    pub wait_timeout_ms: u64,
}

fn default_wait_timeout_ms() -> u64 {
    1000
}

impl RedisConfig {
    /// A single server at `url`, everything else default.
    #[must_use]
    pub fn single(url: &str) -> RedisConfig {
        RedisConfig {
            url: url.to_owned(),
            cluster_nodes: Vec::new(),
            key_prefix: String::new(),
            shards: None,
            wait_replicas: 0,
            wait_timeout_ms: default_wait_timeout_ms(),
        }
    }
}

/// Where the ClickHouse sink writes.
#[derive(Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClickHouseConfig {
    /// Base URL of the HTTP interface.
    pub url: String,
    /// User; none sends no credentials.
    #[serde(default)]
    pub user: Option<String>,
    /// Password of `user`.
    #[serde(default)]
    pub password: Option<String>,
    /// Database of the events table.
    #[serde(default = "default_database")]
    pub database: String,
    /// The events table.
    #[serde(default = "default_table")]
    pub table: String,
    /// Timeout of one request, ms.
    #[serde(default = "default_clickhouse_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_database() -> String {
    "default".to_owned()
}
fn default_table() -> String {
    "events".to_owned()
}
fn default_clickhouse_timeout_ms() -> u64 {
    30_000
}

impl std::fmt::Debug for ClickHouseConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClickHouseConfig")
            .field("url", &self.url)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("database", &self.database)
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

/// The HTTP service.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address to listen on.
    pub listen: String,
    /// Largest request body, bytes, after decompression (10 MiB).
    pub max_body_bytes: usize,
    /// Most events in one request (10,000).
    pub max_events_per_request: usize,
    /// Events accepted but not yet written that the process may hold; beyond it, ingest
    /// answers 503 with `Retry-After`.
    pub max_pending_events: usize,
    /// Longest a request may take, ms; an ingest that cannot be made durable by then gets 503.
    pub request_timeout_ms: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:8080".to_owned(),
            max_body_bytes: 10 * 1024 * 1024,
            max_events_per_request: 10_000,
            max_pending_events: 100_000,
            request_timeout_ms: 10_000,
        }
    }
}

/// Micro-batching, with the seed's names in the environment.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// `EVENT_BUFFER_MICRO_BATCH_SIZE`.
    pub micro_batch_size: usize,
    /// `EVENT_BUFFER_MICRO_BATCH_MS`.
    pub micro_batch_ms: u64,
    /// An event whose `id` was taken in less than this many seconds ago is dropped as a
    /// client's re-send of a request whose answer it lost; 0 turns the check off. Costs
    /// ≈ 80 bytes of Redis per event for one to two windows, and ≈ 3 µs of Redis CPU per event.
    pub dedup_window_secs: u64,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            micro_batch_size: 100,
            micro_batch_ms: 10,
            dedup_window_secs: 120,
        }
    }
}

/// Flushing.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlushConfig {
    /// Whether `serve` runs a flusher (false: an ingest-only node).
    pub enabled: bool,
    /// Pause between flushes when the last one was not full, ms.
    pub interval_ms: u64,
    /// `EVENT_BUFFER_BATCH_SIZE`.
    pub batch_size: usize,
    /// `EVENT_BUFFER_CHUNK_SIZE`.
    pub chunk_size: usize,
    /// Flush lock expiry, ms; must exceed the ClickHouse timeout.
    pub lock_ttl_ms: u64,
}

impl Default for FlushConfig {
    fn default() -> Self {
        FlushConfig {
            enabled: true,
            interval_ms: 1000,
            batch_size: 4000,
            chunk_size: 1000,
            lock_ttl_ms: 60_000,
        }
    }
}

/// The outage journal: with a Redis queue, micro-batches Redis cannot take go to
/// `<data_dir>/journal.db` (and are acknowledged) until it can.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct JournalConfig {
    /// Whether to journal; without it, writes wait in memory (bounded) and ingest answers 503.
    pub enabled: bool,
    /// Most events the journal holds; beyond it, writes wait and ingest answers 503.
    pub max_events: u64,
}

impl Default for JournalConfig {
    fn default() -> Self {
        JournalConfig {
            enabled: true,
            max_events: 1_000_000,
        }
    }
}

/// Held screen views and live visitors.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeldConfig {
    /// Expiry of a held screen view, s.
    pub ttl_secs: u64,
    /// Live-visitor window, s.
    pub visitor_window_secs: u64,
    /// Heartbeat refresh period, s.
    pub heartbeat_refresh_secs: u64,
    /// A held screen view whose session sent nothing for this long is released unchanged (as a
    /// `session_end` would), s; below `ttl_secs`, so none is lost to expiry.
    pub idle_release_secs: u64,
}

impl Default for HeldConfig {
    fn default() -> Self {
        HeldConfig {
            ttl_secs: 3600,
            visitor_window_secs: 300,
            heartbeat_refresh_secs: 60,
            idle_release_secs: 1800,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: "./spillway-data".into(),
            redis: None,
            clickhouse: None,
            http: HttpConfig::default(),
            batch: BatchConfig::default(),
            flush: FlushConfig::default(),
            held: HeldConfig::default(),
            journal: JournalConfig::default(),
            write_keys: std::collections::BTreeMap::new(),
            shutdown_timeout_ms: 30_000,
            log_format: LogFormat::Human,
        }
    }
}

/// A setting that cannot be used, named by its path in the configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {error}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        error: std::io::Error,
    },
    /// The file is not valid TOML for this configuration.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A value is out of range.
    #[error("invalid setting `{setting}`: {problem}")]
    Invalid {
        /// Dotted path of the setting, e.g. `flush.chunk_size`.
        setting: &'static str,
        /// What is wrong.
        problem: String,
    },
}

impl Config {
    /// Reads a TOML file.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file and the problem.
    pub fn from_file(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.display().to_string(),
            error,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    }

    /// Checks every value once, at start.
    ///
    /// # Errors
    /// The first invalid setting, by name.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |setting, problem: &str| {
            Err(ConfigError::Invalid {
                setting,
                problem: problem.to_owned(),
            })
        };
        let positive: [(&'static str, u64); 9] = [
            ("batch.micro_batch_size", self.batch.micro_batch_size as u64),
            ("flush.batch_size", self.flush.batch_size as u64),
            ("flush.chunk_size", self.flush.chunk_size as u64),
            ("flush.interval_ms", self.flush.interval_ms),
            ("http.max_body_bytes", self.http.max_body_bytes as u64),
            (
                "http.max_events_per_request",
                self.http.max_events_per_request as u64,
            ),
            (
                "http.max_pending_events",
                self.http.max_pending_events as u64,
            ),
            ("http.request_timeout_ms", self.http.request_timeout_ms),
            ("held.ttl_secs", self.held.ttl_secs),
        ];
        for (setting, value) in positive {
            if value == 0 {
                return invalid(setting, "must be greater than 0");
            }
        }
        if self.held.heartbeat_refresh_secs >= self.held.visitor_window_secs {
            return invalid(
                "held.heartbeat_refresh_secs",
                "must be less than held.visitor_window_secs",
            );
        }
        if self.held.idle_release_secs >= self.held.ttl_secs {
            return invalid(
                "held.idle_release_secs",
                "must be less than held.ttl_secs, or quiet sessions' views expire unwritten",
            );
        }
        if let Some(redis) = &self.redis {
            match (redis.url.is_empty(), redis.cluster_nodes.is_empty()) {
                (true, true) => {
                    return invalid("redis.url", "is empty: set it or redis.cluster_nodes")
                }
                (false, false) => {
                    return invalid(
                        "redis.cluster_nodes",
                        "is set next to redis.url: a queue is on one server or on a cluster",
                    )
                }
                _ => {}
            }
            if redis.shards == Some(0) {
                return invalid("redis.shards", "must be greater than 0");
            }
            if redis.key_prefix.contains(['{', '}']) {
                return invalid(
                    "redis.key_prefix",
                    "must not contain { or }: spillway's keys choose their own hash tags",
                );
            }
        }
        if self.http.listen.parse::<std::net::SocketAddr>().is_err() {
            return invalid("http.listen", "must be an address like 127.0.0.1:8080");
        }
        if let Some(clickhouse) = &self.clickhouse {
            if self.flush.lock_ttl_ms <= clickhouse.timeout_ms {
                return invalid(
                    "flush.lock_ttl_ms",
                    "must exceed clickhouse.timeout_ms, or a slow insert could outlive the lock",
                );
            }
        }
        Ok(())
    }

    /// Micro-batching settings.
    #[must_use]
    pub fn batch_settings(&self) -> BatchSettings {
        BatchSettings {
            max_events: self.batch.micro_batch_size,
            max_wait: Duration::from_millis(self.batch.micro_batch_ms),
            max_pending: self.http.max_pending_events,
        }
    }

    /// Held-view and visitor settings.
    #[must_use]
    pub fn queue_settings(&self) -> QueueSettings {
        QueueSettings {
            ttl: Duration::from_secs(self.held.ttl_secs),
            visitor_window: Duration::from_secs(self.held.visitor_window_secs),
            heartbeat_refresh: Duration::from_secs(self.held.heartbeat_refresh_secs),
            dedup_window: Duration::from_secs(self.batch.dedup_window_secs),
        }
    }

    /// Flush settings.
    #[must_use]
    pub fn flush_settings(&self) -> FlushSettings {
        FlushSettings {
            batch_size: self.flush.batch_size,
            chunk_size: self.flush.chunk_size,
            lock_ttl: Duration::from_millis(self.flush.lock_ttl_ms),
        }
    }

    /// The ClickHouse sink's settings, when one is configured.
    #[must_use]
    pub fn clickhouse_settings(&self) -> Option<ClickHouseSettings> {
        self.clickhouse.as_ref().map(|c| ClickHouseSettings {
            url: c.url.clone(),
            user: c.user.clone(),
            password: c.password.clone(),
            database: c.database.clone(),
            table: c.table.clone(),
            timeout: Duration::from_millis(c.timeout_ms),
        })
    }

    /// The configuration as TOML with secrets replaced by `***`.
    #[must_use]
    pub fn redacted_toml(&self) -> String {
        let mut shown = self.clone();
        if let Some(redis) = &mut shown.redis {
            redis.url = crate::queue::redact_url(&redis.url);
            for node in &mut redis.cluster_nodes {
                *node = crate::queue::redact_url(node);
            }
        }
        if let Some(clickhouse) = &mut shown.clickhouse {
            if clickhouse.password.is_some() {
                clickhouse.password = Some("***".to_owned());
            }
        }
        for key in shown.write_keys.values_mut() {
            *key = "***".to_owned();
        }
        toml::to_string(&shown).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}
