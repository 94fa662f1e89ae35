//! The durable queue on Redis: by default in OpenPanel's key layout, optionally in shards, on
//! one server or on Redis Cluster.
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
//! <prefix>event_buffer:seen:<window number>                set     event ids taken in, EX 2 windows
//! <prefix>event_buffer:shards                              string  the shard count (1 here), set on first use
//! <prefix>events:batch                                     channel {"projectId","count"} per flush
//! ```
//!
//! With an empty prefix these are exactly the seed's names, so spillway can share a Redis with an
//! OpenPanel deployment. Every write that touches more than one key is one Lua script
//! (`lua/*.lua`), so each step is atomic; the scripts are called by SHA and reloaded on
//! `NOSCRIPT` (after a restart, a failover or `SCRIPT FLUSH`) before the call is retried.
//!
//! **Sharded layout** (`shards > 1`, and always on a cluster). Shard *n*'s keys are the ones
//! above (all but `live:*` and the channel) behind `<prefix>{s<n>[.<k>]}:` (see `shard_tag`),
//! so each shard lives in one cluster slot and every script touches one slot. An event goes to
//! the shard of its session (else of its id, else of its profile): a session's screen views,
//! their durations and its `session_end` stay together, in order. Each shard has its own flush
//! lock, which is a flusher's lease on it. Visitors are keyed by project,
//! `live:visitors:{<project>}` and `live:visitor:{<project>}:<profile>` on a cluster, and
//! refreshed by `heartbeat.lua`. The profile's last screen view is read from every shard, newest
//! wins. `<prefix>event_buffer:shards` records the shard count (see
//! [`RedisQueue::check_layout`]).

mod conn;
mod shard;

use std::collections::BTreeMap;
use std::sync::LazyLock;
use std::time::Duration;

use futures_util::future::try_join_all;
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::{AsyncCommands, Script, ScriptInvocation};
use serde::Deserialize;
use serde_json::value::RawValue;

use self::conn::Conn;
pub(crate) use self::shard::RedisShard;
use super::{BatchFeed, MicroBatch, QueueError, QueueStats};
use crate::config::QueueSettings;
use crate::event::{Event, EventKind};
use crate::time::Timestamp;

static ENQUEUE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("../lua/held.lua"),
        include_str!("../lua/enqueue.lua")
    ))
});
static SWEEP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("../lua/held.lua"),
        include_str!("../lua/sweep.lua")
    ))
});
static REPLAY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("../lua/held.lua"),
        include_str!("../lua/replay.lua")
    ))
});
static HEARTBEAT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("../lua/held.lua"),
        include_str!("../lua/heartbeat.lua")
    ))
});
static RECONCILE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../lua/reconcile.lua")));
static CLAIM: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("../lua/claim.lua")));
static PROGRESS: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../lua/progress.lua")));
static COMMIT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("../lua/commit.lua")));
static UNLOCK: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("../lua/unlock.lua")));
static SIZE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("../lua/size.lua")));

/// The Redis key names of one shard (or of the whole queue, in OpenPanel's layout).
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    /// In front of every shard key: `<prefix>`, or `<prefix>{<shard tag>}:` when sharded.
    prefix: String,
    /// In front of the keys shared by all shards (visitors, the channel).
    base: String,
    /// Whether visitor keys carry their project as hash tag (on a cluster).
    tag_projects: bool,
}

impl Keys {
    /// OpenPanel's layout behind `prefix`.
    pub(crate) fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_owned(),
            base: prefix.to_owned(),
            tag_projects: false,
        }
    }

    /// Shard `n` of `count` in a sharded layout.
    fn shard(prefix: &str, n: usize, count: usize, cluster: bool) -> Keys {
        Keys {
            prefix: format!("{prefix}{{{}}}:", shard_tag(n, count)),
            base: prefix.to_owned(),
            tag_projects: cluster,
        }
    }

    /// Where the queue records its shard count.
    fn shard_count(&self) -> String {
        format!("{}event_buffer:shards", self.base)
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
        format!("{}events:batch", self.base)
    }
    pub(crate) fn held_index(&self) -> String {
        self.key("event_buffer:held_index")
    }
    pub(crate) fn applied(&self, batch_id: &str) -> String {
        self.key(&format!("event_buffer:applied:{batch_id}"))
    }
    pub(crate) fn seen(&self, window: u64) -> String {
        self.key(&format!("event_buffer:seen:{window}"))
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
        match self.tag_projects {
            true => format!("{}live:visitors:{{{project}}}", self.base),
            false => format!("{}live:visitors:{project}", self.base),
        }
    }
    pub(crate) fn heartbeat(&self, project: &str, profile: &str) -> String {
        match self.tag_projects {
            true => format!("{}live:visitor:{{{project}}}:{profile}", self.base),
            false => format!("{}live:visitor:{project}:{profile}", self.base),
        }
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

/// The queue on one Redis server (6.2 or later, or a compatible one with Lua, `SET .. GET` and
/// `SMISMEMBER`), or on a Redis Cluster.
#[derive(Clone)]
pub struct RedisQueue {
    /// For subscriptions: plain clients of the server, or of each seed node of a cluster
    /// (pub/sub messages reach every node; the first that answers is used). Behind an `Arc`:
    /// they are large, and clones are frequent.
    clients: std::sync::Arc<Vec<redis::Client>>,
    conn: Conn,
    /// In front of every key and the channel.
    prefix: String,
    /// One entry in OpenPanel's layout, or the shards.
    shards: Vec<RedisShard>,
    sharded: bool,
    held: QueueSettings,
    /// Replicas each write waits for before it counts as done, and for how long.
    replica_wait: Option<(u32, Duration)>,
}

/// Shards of a queue on a cluster unless set otherwise.
pub const DEFAULT_CLUSTER_SHARDS: usize = 16;

impl RedisQueue {
    /// Connects to one server and checks it answers; OpenPanel's key layout behind `prefix`.
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
        let conn =
            within_connect_timeout(ConnectionManager::new_with_config(client.clone(), config))
                .await
                .map_err(connect_error)?;
        let mut conn = Conn::Single(conn);
        redis::cmd("PING")
            .query_async::<()>(&mut conn)
            .await
            .map_err(connect_error)?;
        Ok(RedisQueue {
            clients: vec![client].into(),
            prefix: prefix.to_owned(),
            shards: vec![RedisShard {
                conn: conn.clone(),
                keys: Keys::new(prefix),
                replica_wait: None,
            }],
            conn,
            sharded: false,
            held,
            replica_wait: None,
        })
    }

    /// Connects to a Redis Cluster through any of its `nodes` (seed URLs) and checks it
    /// answers; [`DEFAULT_CLUSTER_SHARDS`] shards behind `prefix` (see [`RedisQueue::sharded`]).
    ///
    /// # Errors
    /// [`QueueError::Connect`] when a URL is invalid or the cluster does not answer.
    pub async fn connect_cluster(
        nodes: &[String],
        prefix: &str,
        held: QueueSettings,
    ) -> Result<Self, QueueError> {
        let shown = nodes
            .iter()
            .map(|node| redact_url(node))
            .collect::<Vec<_>>()
            .join(",");
        let connect_error = |error| QueueError::Connect {
            url: shown.clone(),
            error,
        };
        if nodes.is_empty() {
            return Err(connect_error(redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "no cluster node given",
            ))));
        }
        let clients = nodes
            .iter()
            .map(|node| redis::Client::open(node.as_str()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(connect_error)?;
        let cluster = ClusterClientBuilder::new(nodes.to_vec())
            .connection_timeout(Duration::from_secs(5))
            .response_timeout(Duration::from_secs(30))
            // A failover takes a few seconds; bounded retries end a call with an error the
            // batcher retries or journals, instead of one that blocks for long.
            .retries(8)
            .min_retry_wait(50)
            .max_retry_wait(500)
            .build()
            .map_err(connect_error)?;
        let conn = within_connect_timeout(cluster.get_async_connection())
            .await
            .map_err(connect_error)?;
        let mut conn = Conn::Cluster(conn);
        redis::cmd("PING")
            .query_async::<()>(&mut conn)
            .await
            .map_err(connect_error)?;
        let queue = RedisQueue {
            clients: clients.into(),
            prefix: prefix.to_owned(),
            shards: Vec::new(),
            conn,
            sharded: true,
            held,
            replica_wait: None,
        };
        Ok(queue.with_shards(DEFAULT_CLUSTER_SHARDS, true))
    }

    /// The same queue in `shards` shards. One shard on a single server is OpenPanel's layout;
    /// a cluster always uses the sharded one (a script's keys must share a slot there).
    #[must_use]
    pub fn sharded(self, shards: usize) -> Self {
        let cluster = matches!(self.conn, Conn::Cluster(_));
        self.with_shards(shards, cluster)
    }

    fn with_shards(mut self, shards: usize, cluster: bool) -> Self {
        let prefix = self.prefix.as_str();
        let count = shards.max(1);
        self.sharded = cluster || count > 1;
        self.shards = if self.sharded {
            (0..count)
                .map(|n| RedisShard {
                    conn: self.conn.clone(),
                    keys: Keys::shard(prefix, n, count, cluster),
                    replica_wait: self.replica_wait,
                })
                .collect()
        } else {
            vec![RedisShard {
                conn: self.conn.clone(),
                keys: Keys::new(prefix),
                replica_wait: self.replica_wait,
            }]
        };
        self
    }

    /// Every write, and every step of a flush, waits until `replicas` replicas of its master
    /// have it (`WAIT`), at most `timeout`, before it counts as done; fewer is a failed write,
    /// retried (or journaled). With a replica in the count, a failover loses no acknowledged
    /// event and rolls back no flush step.
    #[must_use]
    pub fn waiting_for_replicas(mut self, replicas: u32, timeout: Duration) -> Self {
        self.replica_wait = (replicas > 0).then_some((replicas, timeout));
        for shard in &mut self.shards {
            shard.replica_wait = self.replica_wait;
        }
        self
    }

    /// Checks, before the first write, that this process sees the queue as every other one does:
    /// the shard count is recorded under the prefix on first use (a process with another count
    /// would route sessions elsewhere and leave shards unflushed), and with a replica wait set,
    /// every shard's master has the replicas waited for.
    ///
    /// # Errors
    /// [`QueueError::ShardCount`] or [`QueueError::TooFewReplicas`], with what was found.
    pub async fn check_layout(&self) -> Result<(), QueueError> {
        let key = self.shards[0].keys.shard_count();
        let configured = self.shards.len();
        let mut conn = self.conn.clone();
        // SET NX, then GET (rather than SET NX GET, which needs Redis 7).
        let () = redis::cmd("SET")
            .arg(&key)
            .arg(configured)
            .arg("NX")
            .query_async(&mut conn)
            .await?;
        let recorded: Option<String> = conn.get(&key).await?;
        let recorded = recorded.map(|text| text.parse::<usize>().unwrap_or(0));
        if let Some(recorded) = recorded.filter(|&n| n != configured) {
            return Err(QueueError::ShardCount {
                key,
                recorded,
                configured,
            });
        }
        // Before this connection wrote anything, the shards' replica wait counts the connected
        // replicas at once; too few there is a setup error, not a write to retry.
        let counts = self.shards.iter().map(|shard| async move {
            shard.replicated().await.map_err(|err| match err {
                QueueError::NotReplicated { key, wanted, got } => QueueError::TooFewReplicas {
                    key,
                    wanted,
                    found: got,
                },
                other => other,
            })
        });
        try_join_all(counts).await.map(drop)
    }

    /// `redis`, `redis[4 shards]` or `redis-cluster[16 shards]`, for readiness and the status
    /// page.
    pub(crate) fn describe(&self) -> String {
        match (&self.conn, self.sharded) {
            (Conn::Cluster(_), _) => format!("redis-cluster[{} shards]", self.shards.len()),
            (Conn::Single(_), true) => format!("redis[{} shards]", self.shards.len()),
            (Conn::Single(_), false) => "redis".to_owned(),
        }
    }

    /// The shards, for flushers to lease one at a time.
    pub(crate) fn shards(&self) -> &[RedisShard] {
        &self.shards
    }

    /// The shard of a routing key: an event's session, else its id, else its profile.
    fn shard_index(&self, routing_key: &str) -> usize {
        let n = fnv1a(routing_key.as_bytes()) % self.shards.len() as u64;
        // Below shards.len(), so it fits.
        usize::try_from(n).unwrap_or(0)
    }

    /// Writes one micro-batch: one `EVALSHA` of `enqueue.lua`, or on a sharded queue one per
    /// shard it touches (each applied once per micro-batch id) plus one `heartbeat.lua` per
    /// project, concurrently. Returns how many events were dropped as re-sent.
    pub(crate) async fn write(&self, batch: &MicroBatch<'_>) -> Result<usize, QueueError> {
        if !self.sharded {
            let shard = &self.shards[0];
            let events: Vec<&Event> = batch.events.iter().collect();
            let mut call = self.enqueue_call(shard, batch, &events);
            for (project, profile) in batch.heartbeats {
                call.key(shard.keys.visitors(project))
                    .key(shard.keys.heartbeat(project, profile))
                    .arg("h")
                    .arg(profile.as_str());
            }
            let resent = self.invoke(call).await?;
            shard.replicated().await?;
            return Ok(resent);
        }
        let mut by_shard: BTreeMap<usize, Vec<&Event>> = BTreeMap::new();
        for event in batch.events {
            let routing_key = event
                .session_id()
                .or(event.id())
                .or(event.profile_id())
                .unwrap_or("");
            by_shard
                .entry(self.shard_index(routing_key))
                .or_default()
                .push(event);
        }
        let calls: Vec<ScriptInvocation<'_>> = by_shard
            .iter()
            .map(|(&n, events)| self.enqueue_call(&self.shards[n], batch, events))
            .collect();
        let heartbeats = self.heartbeat_calls(batch);
        let (resent, _) = tokio::try_join!(
            try_join_all(calls.into_iter().map(|call| self.invoke(call))),
            try_join_all(heartbeats.into_iter().map(|call| self.invoke(call))),
        )?;
        try_join_all(by_shard.keys().map(|&n| self.shards[n].replicated())).await?;
        Ok(resent.into_iter().sum())
    }

    /// The `enqueue.lua` call that writes `events` of `batch` into `shard`.
    fn enqueue_call(
        &self,
        shard: &RedisShard,
        batch: &MicroBatch<'_>,
        events: &[&Event],
    ) -> ScriptInvocation<'static> {
        let keys = &shard.keys;
        let window = self.held.dedup_window.as_secs();
        // Ids are remembered per window of `window` seconds, in this and the last one's set.
        let window_number = u64::try_from(batch.now.as_millis())
            .unwrap_or(0)
            .checked_div(window * 1000)
            .unwrap_or(0);
        let ids: Vec<&str> = match window {
            0 => Vec::new(),
            _ => events.iter().filter_map(|event| event.id()).collect(),
        };
        let mut call = ENQUEUE.prepare_invoke();
        call.key(keys.queue())
            .key(keys.counter())
            .key(keys.applied(batch.id))
            .key(keys.held_index())
            .key(keys.seen(window_number))
            .key(keys.seen(window_number.saturating_sub(1)))
            .arg(self.held.ttl.as_secs())
            .arg(self.held.visitor_window.as_secs())
            .arg(self.held.heartbeat_refresh.as_secs())
            .arg(batch.now.as_millis())
            .arg(window)
            .arg(ids.len());
        for id in &ids {
            call.arg(*id);
        }
        for event in events {
            // An event with an id is marked with '+' after its kind.
            let seen = window > 0 && event.id().is_some();
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
        call
    }

    /// One `heartbeat.lua` call per project with heartbeats due (sharded queues).
    fn heartbeat_calls(&self, batch: &MicroBatch<'_>) -> Vec<ScriptInvocation<'static>> {
        let keys = &self.shards[0].keys;
        let mut by_project: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (project, profile) in batch.heartbeats {
            by_project.entry(project).or_default().push(profile);
        }
        by_project
            .into_iter()
            .map(|(project, profiles)| {
                let mut call = HEARTBEAT.prepare_invoke();
                call.key(keys.visitors(project))
                    .arg(self.held.visitor_window.as_secs())
                    .arg(self.held.heartbeat_refresh.as_secs())
                    .arg(batch.now.as_millis());
                for profile in profiles {
                    call.key(keys.heartbeat(project, profile)).arg(profile);
                }
                call
            })
            .collect()
    }

    /// Runs an `enqueue.lua` or `heartbeat.lua` call; the re-sent events it dropped.
    async fn invoke(&self, call: ScriptInvocation<'static>) -> Result<usize, QueueError> {
        let mut conn = self.conn.clone();
        let answer: i64 = call.invoke_async(&mut conn).await?;
        // -1: this micro-batch was written before (a retry after a lost reply).
        Ok(usize::try_from(answer).unwrap_or(0))
    }

    /// The held screen view of a session, as its event JSON.
    pub(crate) async fn last_screen_view_by_session(
        &self,
        session: &str,
    ) -> Result<Option<String>, QueueError> {
        let key = self.shards[self.shard_index(session)]
            .keys
            .session_view(session);
        Ok(self.held_value(key).await?.map(|(_, event)| event))
    }

    /// The newest held screen view of a profile in a project, as its event JSON: on a sharded
    /// queue, the newest of every shard's.
    pub(crate) async fn last_screen_view_by_profile(
        &self,
        project: &str,
        profile: &str,
    ) -> Result<Option<String>, QueueError> {
        let reads = self
            .shards
            .iter()
            .map(|shard| self.held_value(shard.keys.profile_view(project, profile)));
        let views = try_join_all(reads).await?;
        Ok(views
            .into_iter()
            .flatten()
            .max_by_key(|(ts, _)| *ts)
            .map(|(_, event)| event))
    }

    /// A held value's time and event JSON.
    async fn held_value(&self, key: String) -> Result<Option<(i64, String)>, QueueError> {
        #[derive(Deserialize)]
        struct Held<'a> {
            ts: i64,
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
        Ok(Some((held.ts, held.event.get().to_owned())))
    }

    /// Queued events (held screen views and the in-flight batch excluded), of every shard.
    pub(crate) async fn size(&self) -> Result<u64, QueueError> {
        let sizes = try_join_all(self.shards.iter().map(RedisShard::size)).await?;
        Ok(sizes.into_iter().sum())
    }

    /// Releases, unchanged, the held views whose session has been quiet since `cutoff`, up to
    /// `max` per shard.
    pub(crate) async fn sweep_idle(
        &self,
        cutoff: Timestamp,
        max: usize,
    ) -> Result<usize, QueueError> {
        let released = try_join_all(self.shards.iter().map(|s| s.sweep_idle(cutoff, max))).await?;
        Ok(released.into_iter().sum())
    }

    /// Moves up to `max` dead-letter records' entries of each shard back to its queue.
    pub(crate) async fn replay_dead_letters(&self, max: usize) -> Result<usize, QueueError> {
        let replayed = try_join_all(self.shards.iter().map(|s| s.replay_dead_letters(max))).await?;
        Ok(replayed.into_iter().sum())
    }

    /// Deletes every dead-letter record; returns how many there were.
    pub(crate) async fn purge_dead_letters(&self) -> Result<usize, QueueError> {
        let purged = try_join_all(self.shards.iter().map(RedisShard::purge_dead_letters)).await?;
        Ok(purged.into_iter().sum())
    }

    /// Sets each shard's counter to its queue's length; returns the total drift corrected.
    pub(crate) async fn reconcile(&self) -> Result<i64, QueueError> {
        let drift = try_join_all(self.shards.iter().map(RedisShard::reconcile)).await?;
        Ok(drift.into_iter().sum())
    }

    /// Held screen views (sessions in the held-view indexes).
    pub(crate) async fn held_count(&self) -> Result<u64, QueueError> {
        let counts = try_join_all(self.shards.iter().map(RedisShard::held_count)).await?;
        Ok(counts.into_iter().sum())
    }

    /// The oldest of the shards' first queued entries.
    pub(crate) async fn oldest_queued(&self) -> Result<Option<String>, QueueError> {
        let heads = try_join_all(self.shards.iter().map(RedisShard::oldest_queued)).await?;
        Ok(heads.into_iter().flatten().min_by_key(|entry| {
            crate::event::read_queued(entry).map_or(i64::MAX, |(_, at)| at.as_millis())
        }))
    }

    /// Queue, in-flight and dead-letter sizes, summed over the shards.
    pub(crate) async fn stats(&self) -> Result<QueueStats, QueueError> {
        let stats = try_join_all(self.shards.iter().map(RedisShard::stats)).await?;
        Ok(stats.into_iter().fold(
            QueueStats {
                queued: 0,
                in_flight: 0,
                dead_letter: 0,
            },
            |sum, s| QueueStats {
                queued: sum.queued + s.queued,
                in_flight: sum.in_flight + s.in_flight,
                dead_letter: sum.dead_letter + s.dead_letter,
            },
        ))
    }

    /// The dead-letter records, oldest first within each shard.
    pub(crate) async fn dead_letters(&self) -> Result<Vec<String>, QueueError> {
        let lists = try_join_all(self.shards.iter().map(RedisShard::dead_letters)).await?;
        Ok(lists.into_iter().flatten().collect())
    }

    /// Visitors of a project with a heartbeat inside the window; older entries are trimmed.
    pub(crate) async fn active_visitor_count(
        &self,
        project: &str,
        now: Timestamp,
    ) -> Result<u64, QueueError> {
        let key = self.shards[0].keys.visitors(project);
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

    /// Publishes a batch notification on `events:batch`.
    pub(crate) async fn publish(&self, payload: &str) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        conn.publish::<_, _, i64>(self.shards[0].keys.channel(), payload)
            .await?;
        Ok(())
    }

    /// Batch notifications from every flusher on this Redis, as they are published.
    pub(crate) async fn subscribe(&self) -> Result<BatchFeed, QueueError> {
        let mut failed = None;
        // Through the first seed node that answers: a node that is down has no say.
        for client in self.clients.iter() {
            let mut pubsub = match client.get_async_pubsub().await {
                Ok(pubsub) => pubsub,
                Err(err) => {
                    failed = Some(err);
                    continue;
                }
            };
            pubsub.subscribe(self.shards[0].keys.channel()).await?;
            let feed = pubsub
                .into_on_message()
                .filter_map(|message| async move { message.get_payload::<String>().ok() });
            return Ok(Box::pin(feed));
        }
        Err(failed.map_or_else(
            || QueueError::Corrupt("no Redis node to subscribe through".to_owned()),
            QueueError::from,
        ))
    }
}

/// Connecting gives up after this long rather than hanging on an unreachable server.
async fn within_connect_timeout<T>(
    connecting: impl std::future::Future<Output = Result<T, redis::RedisError>>,
) -> Result<T, redis::RedisError> {
    tokio::time::timeout(Duration::from_secs(10), connecting)
        .await
        .map_err(|_| redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut)))?
}

/// The hash tag of shard `n` of `count`: `s<n>`, or `s<n>.<k>` with the smallest `k` that puts
/// it in the `n`-th of `count` equal ranges of the 16384 cluster slots. A cluster splits its
/// slots into contiguous ranges, one per master, so shards spread evenly over the masters
/// (plain `{s0}` and `{s1}` share a master on the usual 3-master split).
fn shard_tag(n: usize, count: usize) -> String {
    const SLOTS: usize = 16_384;
    let range = n * SLOTS / count..(n + 1) * SLOTS / count;
    let in_range = |tag: &str| range.contains(&usize::from(slot(tag.as_bytes())));
    let plain = format!("s{n}");
    if in_range(&plain) {
        return plain;
    }
    // A range holds 16384/count slots: a few times `count` tries find one.
    (1..)
        .map(|k| format!("s{n}.{k}"))
        .find(|tag| in_range(tag))
        .unwrap_or(plain)
}

/// The cluster slot of a hash tag: CRC16 (XMODEM) mod 16384, as Redis computes it.
fn slot(tag: &[u8]) -> u16 {
    let crc = tag.iter().fold(0u16, |crc, &byte| {
        (0..8).fold(crc ^ (u16::from(byte) << 8), |crc, _| {
            if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            }
        })
    });
    crc % 16_384
}

/// FNV-1a: a shard choice that is the same in every process and every release.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
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

#[cfg(test)]
mod tests {
    use super::{shard_tag, slot};

    #[test]
    fn slots_are_the_ones_redis_computes() {
        // CRC16 check value, and slots read from a real cluster (`CLUSTER KEYSLOT`).
        assert_eq!(slot(b"123456789"), 0x31C3);
        assert_eq!(
            ["s0", "s1", "s2", "s3"].map(|t| slot(t.as_bytes())),
            [11097, 15224, 2843, 6970]
        );
    }

    #[test]
    fn shard_tags_spread_over_equal_slot_ranges() {
        for count in [1, 2, 3, 5, 16] {
            for n in 0..count {
                let tag = shard_tag(n, count);
                let slot = usize::from(slot(tag.as_bytes()));
                assert!(
                    (n * 16_384 / count..(n + 1) * 16_384 / count).contains(&slot),
                    "{tag} of {count}: slot {slot}"
                );
            }
        }
    }
}
