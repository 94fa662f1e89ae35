//! The durable queue on Redis, in OpenPanel's key layout.
//!
//! ```text
//! <prefix>event_buffer:queue                               list    queued event JSON, oldest first
//! <prefix>event_buffer:total_count                         string  == LLEN queue (repaired when missing)
//! <prefix>event_buffer:last_screen_view:session:<session>  string  {"ts":<ms>,"at":<n>,"event":<json>}, EX 3600
//! <prefix>event_buffer:last_screen_view:profile:<p>:<pr>   string  same value, newest view of the profile
//! <prefix>live:visitors:<project>                          zset    profile -> last heartbeat ms
//! <prefix>live:visitor:<project>:<profile>                 string  "1", expires after the visitor window
//! <prefix>lock:event                                       string  flush lock token, PX lock TTL
//! <prefix>event_buffer:inflight                            list    the batch a flusher has claimed
//! <prefix>event_buffer:inflight:meta                       hash    batch_id, chunks_done
//! <prefix>event_buffer:dead_letter                         list    {"reason","entry","at"} records
//! <prefix>event_buffer:applied:<micro-batch id>            string  marker, EX 3600 (retry guard)
//! <prefix>event_buffer:held_index                          zset    session view key -> held at ms
//! <prefix>event_buffer:seen:<event id>                     string  "1", EX re-send window
//! <prefix>events:batch                                     channel {"projectId","count"} per flush
//! ```
//!
//! With an empty prefix these are exactly the seed's names, so spillway can share a Redis with an
//! OpenPanel deployment. Every write that touches more than one key is one Lua script
//! (`lua/*.lua`), so each step is atomic; the scripts are called by SHA and reloaded on
//! `NOSCRIPT` (after a restart or `SCRIPT FLUSH`) before the call is retried.

use std::sync::LazyLock;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};
use serde::Deserialize;
use serde_json::value::RawValue;

use futures_util::StreamExt;

use super::{BatchFeed, Claim, MicroBatch, QueueError, QueueStats};
use crate::config::QueueSettings;
use crate::event::EventKind;
use crate::time::Timestamp;

static ENQUEUE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("lua/held.lua"),
        include_str!("lua/enqueue.lua")
    ))
});
static SWEEP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("lua/held.lua"),
        include_str!("lua/sweep.lua")
    ))
});
static REPLAY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("lua/held.lua"),
        include_str!("lua/replay.lua")
    ))
});
static RECONCILE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/reconcile.lua")));
static CLAIM: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/claim.lua")));
static PROGRESS: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/progress.lua")));
static COMMIT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/commit.lua")));
static UNLOCK: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/unlock.lua")));
static SIZE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/size.lua")));

/// The Redis key names, with an optional prefix in front of every one.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    prefix: String,
}

impl Keys {
    pub(crate) fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_owned(),
        }
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    pub(crate) fn queue(&self) -> String {
        self.key("event_buffer:queue")
    }
    pub(crate) fn counter(&self) -> String {
        self.key("event_buffer:total_count")
    }
    pub(crate) fn in_flight(&self) -> String {
        self.key("event_buffer:inflight")
    }
    pub(crate) fn in_flight_meta(&self) -> String {
        self.key("event_buffer:inflight:meta")
    }
    pub(crate) fn dead_letter(&self) -> String {
        self.key("event_buffer:dead_letter")
    }
    pub(crate) fn lock(&self) -> String {
        self.key("lock:event")
    }
    pub(crate) fn channel(&self) -> String {
        self.key("events:batch")
    }
    pub(crate) fn held_index(&self) -> String {
        self.key("event_buffer:held_index")
    }
    pub(crate) fn applied(&self, batch_id: &str) -> String {
        self.key(&format!("event_buffer:applied:{batch_id}"))
    }
    pub(crate) fn seen(&self, event_id: &str) -> String {
        self.key(&format!("event_buffer:seen:{event_id}"))
    }
    pub(crate) fn session_view(&self, session: &str) -> String {
        self.key(&format!("event_buffer:last_screen_view:session:{session}"))
    }
    pub(crate) fn profile_view(&self, project: &str, profile: &str) -> String {
        self.key(&format!(
            "event_buffer:last_screen_view:profile:{project}:{profile}"
        ))
    }
    pub(crate) fn visitors(&self, project: &str) -> String {
        self.key(&format!("live:visitors:{project}"))
    }
    pub(crate) fn heartbeat(&self, project: &str, profile: &str) -> String {
        self.key(&format!("live:visitor:{project}:{profile}"))
    }
}

/// An `enqueue.lua` op kind, marked with '+' when the op's first key is its id's marker.
fn with_seen(kind: &'static str, seen: bool) -> &'static str {
    match (kind, seen) {
        ("e", true) => "e+",
        ("v", true) => "v+",
        ("V", true) => "V+",
        ("x", true) => "x+",
        ("X", true) => "X+",
        _ => kind,
    }
}

/// The queue on a single Redis server (or a Redis-compatible one with Lua and `SET .. GET`).
#[derive(Clone)]
pub struct RedisQueue {
    client: redis::Client,
    conn: ConnectionManager,
    keys: Keys,
    held: QueueSettings,
}

impl RedisQueue {
    /// Connects and checks the server answers.
    ///
    /// # Errors
    /// [`QueueError::Connect`] when the URL is invalid or the server does not answer.
    pub async fn connect(url: &str, prefix: &str, held: QueueSettings) -> Result<Self, QueueError> {
        let connect_error = |error| QueueError::Connect {
            url: redact_url(url),
            error,
        };
        let client = redis::Client::open(url).map_err(connect_error)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(30)))
            .set_number_of_retries(2);
        let mut conn = tokio::time::timeout(
            Duration::from_secs(10),
            ConnectionManager::new_with_config(client.clone(), config),
        )
        .await
        .map_err(|_| {
            connect_error(redis::RedisError::from(std::io::Error::from(
                std::io::ErrorKind::TimedOut,
            )))
        })?
        .map_err(connect_error)?;
        redis::cmd("PING")
            .query_async::<()>(&mut conn)
            .await
            .map_err(connect_error)?;
        Ok(RedisQueue {
            client,
            conn,
            keys: Keys::new(prefix),
            held,
        })
    }

    /// Writes one micro-batch with a single `EVALSHA` of `enqueue.lua`; returns how many of its
    /// events were dropped as re-sent.
    pub(crate) async fn write(&self, batch: &MicroBatch<'_>) -> Result<usize, QueueError> {
        let keys = &self.keys;
        let mut call = ENQUEUE.prepare_invoke();
        call.key(keys.queue())
            .key(keys.counter())
            .key(keys.applied(batch.id))
            .key(keys.held_index())
            .arg(self.held.ttl.as_secs())
            .arg(self.held.visitor_window.as_secs())
            .arg(self.held.heartbeat_refresh.as_secs())
            .arg(batch.now.as_millis())
            .arg(self.held.dedup_window.as_secs());
        let dedup = !self.held.dedup_window.is_zero();
        for event in batch.events {
            // An event with an id has its marker first, and '+' after its kind.
            let seen = match event.id() {
                Some(id) if dedup => {
                    call.key(keys.seen(id));
                    true
                }
                _ => false,
            };
            let profile = event
                .profile_id()
                .map(|profile| keys.profile_view(event.project_id(), profile));
            match (event.kind(), event.session_id()) {
                (EventKind::ScreenView, Some(session)) => {
                    call.key(keys.session_view(session));
                    let kind = match profile {
                        Some(profile) => {
                            call.key(profile);
                            "V"
                        }
                        None => "v",
                    };
                    call.arg(with_seen(kind, seen)).arg(event.held_value());
                }
                (EventKind::SessionEnd, Some(session)) => {
                    call.key(keys.session_view(session));
                    let kind = match profile {
                        Some(profile) => {
                            call.key(profile);
                            "X"
                        }
                        None => "x",
                    };
                    call.arg(with_seen(kind, seen)).arg(event.json());
                }
                _ => {
                    call.arg(with_seen("e", seen)).arg(event.json());
                }
            }
        }
        for (project, profile) in batch.heartbeats {
            call.key(keys.visitors(project))
                .key(keys.heartbeat(project, profile))
                .arg("h")
                .arg(profile.as_str());
        }
        let mut conn = self.conn.clone();
        let resent: i64 = call.invoke_async(&mut conn).await?;
        // -1: this micro-batch was written before (a retry after a lost reply).
        Ok(usize::try_from(resent).unwrap_or(0))
    }

    /// The held screen view of a session, as its event JSON.
    pub(crate) async fn last_screen_view_by_session(
        &self,
        session: &str,
    ) -> Result<Option<String>, QueueError> {
        self.held_event(self.keys.session_view(session)).await
    }

    /// The newest held screen view of a profile in a project, as its event JSON.
    pub(crate) async fn last_screen_view_by_profile(
        &self,
        project: &str,
        profile: &str,
    ) -> Result<Option<String>, QueueError> {
        self.held_event(self.keys.profile_view(project, profile))
            .await
    }

    async fn held_event(&self, key: String) -> Result<Option<String>, QueueError> {
        #[derive(Deserialize)]
        struct Held<'a> {
            #[serde(borrow)]
            event: &'a RawValue,
        }
        let mut conn = self.conn.clone();
        let value: Option<String> = conn.get(&key).await?;
        let Some(value) = value else {
            return Ok(None);
        };
        let held: Held<'_> = serde_json::from_str(&value)
            .map_err(|e| QueueError::Corrupt(format!("held screen view at {key}: {e}")))?;
        Ok(Some(held.event.get().to_owned()))
    }

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

    /// Visitors of a project with a heartbeat inside the window; older entries are trimmed.
    pub(crate) async fn active_visitor_count(
        &self,
        project: &str,
        now: Timestamp,
    ) -> Result<u64, QueueError> {
        let key = self.keys.visitors(project);
        let window = i64::try_from(self.held.visitor_window.as_millis()).unwrap_or(i64::MAX);
        let cutoff = now.as_millis().saturating_sub(window);
        let mut conn = self.conn.clone();
        let (count,): (u64,) = redis::pipe()
            .atomic()
            .zrembyscore(&key, "-inf", cutoff)
            .ignore()
            .zcount(&key, cutoff, "+inf")
            .query_async(&mut conn)
            .await?;
        Ok(count)
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
        Ok(())
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
        Ok(())
    }

    /// Publishes a batch notification on `events:batch`.
    pub(crate) async fn publish(&self, payload: &str) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        conn.publish::<_, _, i64>(self.keys.channel(), payload)
            .await?;
        Ok(())
    }

    /// Batch notifications from every flusher on this Redis, as they are published.
    pub(crate) async fn subscribe(&self) -> Result<BatchFeed, QueueError> {
        let mut pubsub = self.client.get_async_pubsub().await?;
        pubsub.subscribe(self.keys.channel()).await?;
        let feed = pubsub
            .into_on_message()
            .filter_map(|message| async move { message.get_payload::<String>().ok() });
        Ok(Box::pin(feed))
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

/// The URL without its password, for error messages and logs.
pub(crate) fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{}:***{}", &url[..scheme + 3], user, &url[at..])
        }
        _ => url.to_owned(),
    }
}
