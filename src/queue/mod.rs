//! The durable queue between the batcher and the flusher.
//!
//! Events move through three places, and each move is one atomic step of the backend:
//!
//! ```text
//! micro-batch --write--> queue (and held screen views) --claim--> in-flight --commit--> gone
//!                                                                     \--> dead-letter (with reason)
//! ```
//!
//! `write` is applied at most once per micro-batch id, so retrying after a lost reply is safe.
//! `claim`, `progress` and `commit` only succeed for the holder of the flush lock. A claimed
//! batch stays in flight until every chunk of it is in the sink; a flusher that dies leaves it
//! there, and the next lock holder resumes it from the first chunk not recorded as done.

mod redis;
mod sqlite;

pub(crate) use self::redis::redact_url;
use self::redis::RedisShard;
pub use self::redis::{RedisQueue, DEFAULT_CLUSTER_SHARDS};
#[cfg(test)]
pub(crate) use self::sqlite::Scratch;
pub use self::sqlite::SqliteQueue;
pub(crate) use self::sqlite::{Db, DB_FILE};

use std::time::Duration;

use crate::event::Event;
use crate::time::Timestamp;

/// Errors of the queue layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueueError {
    /// The backend could not be reached at start.
    #[error("cannot reach Redis at {url}: {error}")]
    Connect {
        /// The URL, password redacted.
        url: String,
        /// What the client reported.
        error: ::redis::RedisError,
    },
    /// A command failed.
    #[error("Redis command failed: {0}")]
    Redis(::redis::RedisError),
    /// The flush lock expired and another flusher holds it now.
    #[error("the flush lock was lost to another flusher")]
    LockLost,
    /// A write reached its master but not the number of replicas the queue waits for.
    #[error("the write to {key} reached {got} of the {wanted} replicas waited for")]
    NotReplicated {
        /// A key of the write.
        key: String,
        /// Replicas waited for.
        wanted: u32,
        /// Replicas that had the write when the wait ended.
        got: u32,
    },
    /// The queue was set up with another shard count than this process's.
    #[error(
        "the queue has {recorded} shards ({key}), this process is configured for {configured}: \
         every process of a queue needs the same redis.shards (to change it, stop ingest, drain, \
         then delete {key})"
    )]
    ShardCount {
        /// Where the count is recorded.
        key: String,
        /// The count recorded there.
        recorded: usize,
        /// This process's count.
        configured: usize,
    },
    /// A master has fewer replicas than `redis.wait_replicas` asks each write to reach.
    #[error(
        "redis.wait_replicas is {wanted}, but the master of {key} has {found} replicas: \
         attach replicas or lower the setting"
    )]
    TooFewReplicas {
        /// A key on that master.
        key: String,
        /// Replicas waited for.
        wanted: u32,
        /// Replicas found.
        found: u32,
    },
    /// A stored value is not in the expected format.
    #[error("corrupt value: {0}")]
    Corrupt(String),
    /// The embedded queue's SQLite database failed.
    #[error("SQLite queue failed: {0}")]
    Sqlite(rusqlite::Error),
    /// Another process has the embedded queue's data directory open: one process per directory.
    #[error(
        "data directory {dir} is in use by another spillway process \
         (lock file {dir}/spillway.lock, which holds its pid)"
    )]
    InUse {
        /// The data directory.
        dir: String,
    },
    /// The embedded queue's data directory could not be created or locked.
    #[error("data directory {dir}: {error}")]
    DataDir {
        /// The data directory.
        dir: String,
        /// What the file system reported.
        error: std::io::Error,
    },
}

// By hand rather than `#[from]`: the message already carries the cause, and a `source` would
// make error chains print it twice.
impl From<::redis::RedisError> for QueueError {
    fn from(error: ::redis::RedisError) -> Self {
        QueueError::Redis(error)
    }
}

impl From<rusqlite::Error> for QueueError {
    fn from(error: rusqlite::Error) -> Self {
        QueueError::Sqlite(error)
    }
}

impl QueueError {
    /// Whether retrying the same operation later may succeed.
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        match self {
            QueueError::Connect { .. }
            | QueueError::Redis(_)
            | QueueError::NotReplicated { .. } => true,
            // A busy database frees up; a full disk may be cleared, as Redis' OOM.
            QueueError::Sqlite(e) => matches!(
                e.sqlite_error_code(),
                Some(
                    rusqlite::ErrorCode::DatabaseBusy
                        | rusqlite::ErrorCode::DatabaseLocked
                        | rusqlite::ErrorCode::DiskFull
                )
            ),
            QueueError::LockLost
            | QueueError::ShardCount { .. }
            | QueueError::TooFewReplicas { .. }
            | QueueError::Corrupt(_)
            | QueueError::InUse { .. }
            | QueueError::DataDir { .. } => false,
        }
    }
}

/// Batch notifications (`{"projectId": ..., "count": ...}` JSON), as flushes publish them.
pub type BatchFeed = futures_util::stream::BoxStream<'static, String>;

/// One micro-batch on its way into the queue.
pub(crate) struct MicroBatch<'a> {
    /// Unique id; the backend applies a given id once.
    pub(crate) id: &'a str,
    /// The events, in arrival order.
    pub(crate) events: &'a [Event],
    /// `(project, profile)` pairs whose live-visitor heartbeat is due.
    pub(crate) heartbeats: &'a [(String, String)],
    /// The time heartbeats are stamped with.
    pub(crate) now: Timestamp,
}

/// A batch handed to a flusher.
#[derive(Debug)]
pub(crate) struct Claim {
    /// Identity of the batch; stable across resumptions.
    pub(crate) batch_id: String,
    /// Chunks already recorded as in the sink by an earlier holder.
    pub(crate) chunks_done: usize,
    /// The claimed entries, in queue order. Empty when there was nothing to flush.
    pub(crate) entries: Vec<String>,
    /// Claimed entries that are not UTF-8 text (so not events), decoded lossily; the flusher
    /// dead-letters them. Only a Redis queue written by something else can hold them.
    pub(crate) not_utf8: Vec<String>,
    /// Whether this batch was abandoned by an earlier flusher.
    pub(crate) resumed: bool,
}

/// Sizes of the queue's parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct QueueStats {
    /// Events waiting to be flushed.
    pub queued: u64,
    /// Events claimed by a flusher and not yet committed.
    pub in_flight: u64,
    /// Records in the dead-letter list.
    pub dead_letter: u64,
}

/// The queue backend.
#[derive(Clone)]
#[non_exhaustive]
pub enum Queue {
    /// Redis, in OpenPanel's key layout. Durable as far as Redis persistence is configured.
    Redis(RedisQueue),
    /// One SQLite file in a data directory: no server to run. Survives a crash of the process;
    /// a power loss may take the last commits. One process per directory, so the flush lock and
    /// batch notifications only reach flushers and subscribers in that process.
    Embedded(SqliteQueue),
}

impl Queue {
    /// Writes one micro-batch atomically, once per micro-batch id. Events whose `id` the queue
    /// took in within the re-send window are dropped (counted in the metrics).
    pub(crate) async fn write(&self, batch: &MicroBatch<'_>) -> Result<(), QueueError> {
        let resent = match self {
            Queue::Redis(q) => q.write(batch).await?,
            Queue::Embedded(q) => q.write(batch).await?,
        };
        if resent > 0 {
            crate::metrics::events_resent(resent);
        }
        Ok(())
    }

    /// The held screen view of a session.
    ///
    /// # Errors
    /// When the backend fails.
    pub async fn last_screen_view_by_session(
        &self,
        session: &str,
    ) -> Result<Option<String>, QueueError> {
        match self {
            Queue::Redis(q) => q.last_screen_view_by_session(session).await,
            Queue::Embedded(q) => q.last_screen_view_by_session(session).await,
        }
    }

    /// The newest held screen view of a profile in a project.
    ///
    /// # Errors
    /// When the backend fails.
    pub async fn last_screen_view_by_profile(
        &self,
        project: &str,
        profile: &str,
    ) -> Result<Option<String>, QueueError> {
        match self {
            Queue::Redis(q) => q.last_screen_view_by_profile(project, profile).await,
            Queue::Embedded(q) => q.last_screen_view_by_profile(project, profile).await,
        }
    }

    /// Queued events (not held, not in flight).
    ///
    /// # Errors
    /// When the backend fails.
    pub async fn size(&self) -> Result<u64, QueueError> {
        match self {
            Queue::Redis(q) => q.size().await,
            Queue::Embedded(q) => q.size().await,
        }
    }

    /// Queue, in-flight and dead-letter sizes.
    ///
    /// # Errors
    /// When the backend fails.
    pub async fn stats(&self) -> Result<QueueStats, QueueError> {
        match self {
            Queue::Redis(q) => q.stats().await,
            Queue::Embedded(q) => q.stats().await,
        }
    }

    /// Visitors of a project seen within the visitor window.
    ///
    /// # Errors
    /// When the backend fails.
    pub async fn active_visitor_count(
        &self,
        project: &str,
        now: Timestamp,
    ) -> Result<u64, QueueError> {
        match self {
            Queue::Redis(q) => q.active_visitor_count(project, now).await,
            Queue::Embedded(q) => q.active_visitor_count(project, now).await,
        }
    }

    /// The dead-letter records, oldest first.
    ///
    /// # Errors
    /// When the backend fails.
    pub async fn dead_letters(&self) -> Result<Vec<String>, QueueError> {
        match self {
            Queue::Redis(q) => q.dead_letters().await,
            Queue::Embedded(q) => q.dead_letters().await,
        }
    }

    /// Subscribes to the batch notifications of every flusher sharing this queue.
    ///
    /// # Errors
    /// When the backend fails.
    pub async fn subscribe(&self) -> Result<BatchFeed, QueueError> {
        match self {
            Queue::Redis(q) => q.subscribe().await,
            Queue::Embedded(q) => q.subscribe().await,
        }
    }

    /// Releases, unchanged and as a `session_end` would, up to `max` held screen views whose
    /// session has been quiet since `cutoff`; returns how many were queued.
    ///
    /// # Errors
    /// When the backend fails.
    pub async fn sweep_idle(&self, cutoff: Timestamp, max: usize) -> Result<usize, QueueError> {
        match self {
            Queue::Redis(q) => q.sweep_idle(cutoff, max).await,
            Queue::Embedded(q) => q.sweep_idle(cutoff, max).await,
        }
    }

    /// Moves up to `max` dead-letter records' entries back to the queue, oldest first, in one
    /// step; returns how many. An entry still invalid is dead-lettered again by the next flush.
    ///
    /// # Errors
    /// When the backend fails.
    pub async fn replay_dead_letters(&self, max: usize) -> Result<usize, QueueError> {
        match self {
            Queue::Redis(q) => q.replay_dead_letters(max).await,
            Queue::Embedded(q) => q.replay_dead_letters(max).await,
        }
    }

    /// Deletes every dead-letter record; returns how many there were.
    ///
    /// # Errors
    /// When the backend fails.
    pub async fn purge_dead_letters(&self) -> Result<usize, QueueError> {
        match self {
            Queue::Redis(q) => q.purge_dead_letters().await,
            Queue::Embedded(q) => q.purge_dead_letters().await,
        }
    }

    /// Sets the queue counter to the queue's length; returns the drift corrected (always 0 on
    /// the embedded queue, which counts rows).
    ///
    /// # Errors
    /// When the backend fails.
    pub async fn reconcile(&self) -> Result<i64, QueueError> {
        match self {
            Queue::Redis(q) => q.reconcile().await,
            Queue::Embedded(_) => Ok(0),
        }
    }

    /// Held screen views.
    ///
    /// # Errors
    /// When the backend fails.
    pub async fn held_count(&self) -> Result<u64, QueueError> {
        match self {
            Queue::Redis(q) => q.held_count().await,
            Queue::Embedded(q) => q.held_count().await,
        }
    }

    /// When the oldest queued event happened (its `created_at`), if any is queued.
    ///
    /// # Errors
    /// When the backend fails.
    pub async fn oldest_queued_at(&self) -> Result<Option<Timestamp>, QueueError> {
        let entry = match self {
            Queue::Redis(q) => q.oldest_queued().await?,
            Queue::Embedded(q) => q.oldest_queued().await?,
        };
        Ok(entry.and_then(|e| crate::event::read_queued(&e).ok().map(|(_, at)| at)))
    }

    /// The parts of the queue a flusher leases one at a time: the shards of a sharded Redis
    /// queue, else the whole queue.
    pub(crate) fn shards(&self) -> Vec<Shard> {
        match self {
            Queue::Redis(q) => q.shards().iter().cloned().map(Shard::Redis).collect(),
            Queue::Embedded(q) => vec![Shard::Embedded(q.clone())],
        }
    }

    /// Publishes a batch notification.
    pub(crate) async fn publish(&self, payload: &str) -> Result<(), QueueError> {
        match self {
            Queue::Redis(q) => q.publish(payload).await,
            Queue::Embedded(q) => q.publish(payload).await,
        }
    }
}

/// A part of the queue with its own flush lock, in-flight batch and dead-letter list: what one
/// flusher leases at a time. `claim`, `progress` and `commit` succeed only for the holder of
/// its lock.
#[derive(Clone)]
pub(crate) enum Shard {
    /// One shard of a Redis queue (the whole queue in OpenPanel's layout).
    Redis(RedisShard),
    /// The embedded queue, which is one shard.
    Embedded(SqliteQueue),
}

impl Shard {
    pub(crate) async fn try_lock(&self, token: &str, ttl: Duration) -> Result<bool, QueueError> {
        match self {
            Shard::Redis(q) => q.try_lock(token, ttl).await,
            Shard::Embedded(q) => q.try_lock(token, ttl).await,
        }
    }

    pub(crate) async fn unlock(&self, token: &str) -> Result<(), QueueError> {
        match self {
            Shard::Redis(q) => q.unlock(token).await,
            Shard::Embedded(q) => q.unlock(token).await,
        }
    }

    pub(crate) async fn claim(
        &self,
        token: &str,
        max: usize,
        new_id: &str,
    ) -> Result<Claim, QueueError> {
        match self {
            Shard::Redis(q) => q.claim(token, max, new_id).await,
            Shard::Embedded(q) => q.claim(token, max, new_id).await,
        }
    }

    pub(crate) async fn progress(
        &self,
        token: &str,
        chunks_done: usize,
        ttl: Duration,
        dead: &[String],
    ) -> Result<(), QueueError> {
        match self {
            Shard::Redis(q) => q.progress(token, chunks_done, ttl, dead).await,
            Shard::Embedded(q) => q.progress(token, chunks_done, ttl, dead).await,
        }
    }

    pub(crate) async fn commit(&self, token: &str, dead: &[String]) -> Result<(), QueueError> {
        match self {
            Shard::Redis(q) => q.commit(token, dead).await,
            Shard::Embedded(q) => q.commit(token, dead).await,
        }
    }
}
