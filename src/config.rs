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

/// Held screen views and live visitors.
#[derive(Debug, Clone, Copy)]
pub struct HeldSettings {
    /// Expiry of a held screen view (3600 s).
    pub ttl: Duration,
    /// A visitor counts as live this long after its last heartbeat (300 s).
    pub visitor_window: Duration,
    /// A visitor's heartbeat is refreshed at most this often, across all processes (60 s).
    pub heartbeat_refresh: Duration,
}

impl Default for HeldSettings {
    fn default() -> Self {
        HeldSettings {
            ttl: Duration::from_secs(3600),
            visitor_window: Duration::from_secs(300),
            heartbeat_refresh: Duration::from_secs(60),
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
