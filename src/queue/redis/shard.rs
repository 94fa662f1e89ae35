//! One shard of the Redis queue: its queue list, counter, in-flight batch, held views,
//! dead-letter list and flush lock, all under one key prefix (on a cluster, one hash tag, so
//! one slot). A flusher leases a shard by taking its lock; the steps of a flush (`claim`,
//! `progress`, `commit`) are scripts that check that lock.

use std::time::Duration;

use redis::AsyncCommands;

use super::conn::Conn;
use super::{Keys, CLAIM, COMMIT, PROGRESS, RECONCILE, REPLAY, SIZE, SWEEP, UNLOCK};
use crate::queue::{Claim, QueueError, QueueStats};
use crate::time::Timestamp;

/// One shard's keys, over the queue's connection.
#[derive(Clone)]
pub(crate) struct RedisShard {
    pub(super) conn: Conn,
    pub(super) keys: Keys,
    /// Replicas each flush step waits for (`WAIT`), and how long: a claim, progress or commit a
    /// failover rolled back would re-insert chunks under new tokens.
    pub(super) replica_wait: Option<(u32, Duration)>,
}

impl RedisShard {
    /// Queued events (held screen views and the in-flight batch excluded), from the counter,
    /// repairing it from the list length when it is missing or negative.
    pub(crate) async fn size(&self) -> Result<u64, QueueError> {
        let mut conn = self.conn.clone();
        let size: i64 = SIZE
            .key(self.keys.queue())
            .key(self.keys.counter())
            .invoke_async(&mut conn)
            .await?;
        Ok(size.max(0).unsigned_abs())
    }

    /// Releases, unchanged, the held views whose session has been quiet since `cutoff`.
    pub(crate) async fn sweep_idle(
        &self,
        cutoff: Timestamp,
        max: usize,
    ) -> Result<usize, QueueError> {
        let mut conn = self.conn.clone();
        let released: usize = SWEEP
            .key(self.keys.held_index())
            .key(self.keys.queue())
            .key(self.keys.counter())
            .arg(cutoff.as_millis())
            .arg(max)
            .arg(&self.keys.prefix)
            .invoke_async(&mut conn)
            .await?;
        Ok(released)
    }

    /// Moves up to `max` dead-letter records' entries back to the queue.
    pub(crate) async fn replay_dead_letters(&self, max: usize) -> Result<usize, QueueError> {
        let mut conn = self.conn.clone();
        Ok(REPLAY
            .key(self.keys.dead_letter())
            .key(self.keys.queue())
            .key(self.keys.counter())
            .arg(max)
            .invoke_async(&mut conn)
            .await?)
    }

    /// Deletes every dead-letter record; returns how many there were.
    pub(crate) async fn purge_dead_letters(&self) -> Result<usize, QueueError> {
        let mut conn = self.conn.clone();
        let (count, ()): (usize, ()) = redis::pipe()
            .atomic()
            .llen(self.keys.dead_letter())
            .del(self.keys.dead_letter())
            .query_async(&mut conn)
            .await?;
        Ok(count)
    }

    /// Sets the counter to the queue's length; returns the drift it corrected.
    pub(crate) async fn reconcile(&self) -> Result<i64, QueueError> {
        let mut conn = self.conn.clone();
        Ok(RECONCILE
            .key(self.keys.queue())
            .key(self.keys.counter())
            .invoke_async(&mut conn)
            .await?)
    }

    /// Held screen views (sessions in the held-view index).
    pub(crate) async fn held_count(&self) -> Result<u64, QueueError> {
        let mut conn = self.conn.clone();
        Ok(conn.zcard(self.keys.held_index()).await?)
    }

    /// The oldest queued entry, if any.
    pub(crate) async fn oldest_queued(&self) -> Result<Option<String>, QueueError> {
        let mut conn = self.conn.clone();
        let entry: Option<Vec<u8>> = conn.lindex(self.keys.queue(), 0).await?;
        Ok(entry.map(|bytes| String::from_utf8_lossy(&bytes).into_owned()))
    }

    /// Queue, in-flight and dead-letter sizes in one round trip.
    pub(crate) async fn stats(&self) -> Result<QueueStats, QueueError> {
        let mut conn = self.conn.clone();
        let (queued, in_flight, dead_letter): (u64, u64, u64) = redis::pipe()
            .llen(self.keys.queue())
            .llen(self.keys.in_flight())
            .llen(self.keys.dead_letter())
            .query_async(&mut conn)
            .await?;
        Ok(QueueStats {
            queued,
            in_flight,
            dead_letter,
        })
    }

    /// Takes the flush lock if it is free. `SET NX PX`, as OpenPanel's base buffer does.
    pub(crate) async fn try_lock(&self, token: &str, ttl: Duration) -> Result<bool, QueueError> {
        let mut conn = self.conn.clone();
        let set: Option<String> = redis::cmd("SET")
            .arg(self.keys.lock())
            .arg(token)
            .arg("NX")
            .arg("PX")
            .arg(ttl_millis(ttl))
            .query_async(&mut conn)
            .await?;
        Ok(set.is_some())
    }

    /// Releases the flush lock if this token still holds it.
    pub(crate) async fn unlock(&self, token: &str) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        UNLOCK
            .key(self.keys.lock())
            .arg(token)
            .invoke_async::<i64>(&mut conn)
            .await?;
        Ok(())
    }

    /// Claims the abandoned in-flight batch, or a new one from the head of the queue.
    pub(crate) async fn claim(
        &self,
        token: &str,
        max: usize,
        new_id: &str,
    ) -> Result<Claim, QueueError> {
        let keys = &self.keys;
        let mut conn = self.conn.clone();
        // Entries as bytes: one that is not UTF-8 must not fail the whole claim, or it would
        // stay in flight and stop every flush after it.
        let (batch_id, chunks_done, raw): (String, usize, Vec<Vec<u8>>) = CLAIM
            .key(keys.queue())
            .key(keys.counter())
            .key(keys.in_flight())
            .key(keys.in_flight_meta())
            .key(keys.lock())
            .arg(token)
            .arg(max)
            .arg(new_id)
            .invoke_async(&mut conn)
            .await
            .map_err(lock_lost)?;
        let mut entries = Vec::with_capacity(raw.len());
        let mut not_utf8 = Vec::new();
        for bytes in raw {
            match String::from_utf8(bytes) {
                Ok(entry) => entries.push(entry),
                Err(err) => not_utf8.push(String::from_utf8_lossy(err.as_bytes()).into_owned()),
            }
        }
        if !entries.is_empty() || !not_utf8.is_empty() {
            self.replicated().await?;
        }
        Ok(Claim {
            resumed: batch_id != new_id && !batch_id.is_empty(),
            batch_id,
            chunks_done,
            entries,
            not_utf8,
        })
    }

    /// Records that the first `chunks_done` chunks are in the sink and extends the lock.
    pub(crate) async fn progress(
        &self,
        token: &str,
        chunks_done: usize,
        ttl: Duration,
        dead: &[String],
    ) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        let mut call = PROGRESS.prepare_invoke();
        call.key(self.keys.lock())
            .key(self.keys.in_flight_meta())
            .key(self.keys.dead_letter())
            .arg(token)
            .arg(chunks_done)
            .arg(ttl_millis(ttl));
        for record in dead {
            call.arg(record.as_str());
        }
        call.invoke_async::<i64>(&mut conn)
            .await
            .map_err(lock_lost)?;
        self.replicated().await
    }

    /// Retires the in-flight batch and appends the dead-letter records, in one step.
    pub(crate) async fn commit(&self, token: &str, dead: &[String]) -> Result<(), QueueError> {
        let keys = &self.keys;
        let mut conn = self.conn.clone();
        let mut call = COMMIT.prepare_invoke();
        call.key(keys.lock())
            .key(keys.in_flight())
            .key(keys.in_flight_meta())
            .key(keys.dead_letter())
            .arg(token);
        for record in dead {
            call.arg(record.as_str());
        }
        call.invoke_async::<i64>(&mut conn)
            .await
            .map_err(lock_lost)?;
        self.replicated().await
    }

    /// With a replica wait set: waits until the replicas have this shard's writes so far.
    pub(super) async fn replicated(&self) -> Result<(), QueueError> {
        let Some((wanted, timeout)) = self.replica_wait else {
            return Ok(());
        };
        let key = self.keys.queue();
        let mut conn = self.conn.clone();
        let got = conn.wait_for_replicas(&key, wanted, timeout).await?;
        match got >= wanted {
            true => Ok(()),
            false => Err(QueueError::NotReplicated { key, wanted, got }),
        }
    }

    /// The dead-letter records, oldest first.
    pub(crate) async fn dead_letters(&self) -> Result<Vec<String>, QueueError> {
        let mut conn = self.conn.clone();
        Ok(conn.lrange(self.keys.dead_letter(), 0, -1).await?)
    }
}

fn ttl_millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)
}

fn lock_lost(err: redis::RedisError) -> QueueError {
    if err.code() == Some("LOCKLOST") {
        QueueError::LockLost
    } else {
        QueueError::Redis(err)
    }
}
