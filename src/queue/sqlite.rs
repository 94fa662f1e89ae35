//! The durable queue in one SQLite file: no server, the same semantics as the Redis queue.
//!
//! [`SqliteQueue::open`] keeps everything in `<dir>/spillway.db`, one table per kind of Redis
//! key, and holds an exclusive lock on `<dir>/spillway.lock` (which names the holder's pid) for
//! as long as the queue or a sink sharing its connection lives: one process per data directory.
//!
//! ```text
//! queue           seq INTEGER PRIMARY KEY AUTOINCREMENT, entry   queued event JSON, in seq order
//! in_flight       seq, entry                         the claimed batch, in queue order
//! in_flight_meta  batch_id, chunks_done              one row while a batch is in flight
//! dead_letter     seq, record                        {"reason","code","entry","at"} records
//! held_sessions   session PK, event, ts, expires_ms  held screen view of a session
//! held_profiles   (project, profile) PK, event, ts, expires_ms   newest held view of a profile
//! visitors        (project, profile) PK, last_ms     live:visitors:<project> zset
//! heartbeats      (project, profile) PK, expires_ms  live:visitor:<project>:<profile> key
//! flush_lock      token, expires_ms                  at most one row
//! applied         id PK, at_ms                       micro-batch ids written within the hour
//! seen            id PK, expires_ms                  event_buffer:seen:<window>: ids in the re-send window
//! ```
//!
//! Each step (`write`, `claim`, `progress`, `commit`, ...) is one transaction, so the invariants
//! of `ARCHITECTURE.md` hold as they do with one Lua script per step. Rows that stand for
//! expiring Redis keys carry their expiry (by this process's clock, where Redis uses its own):
//! readers skip expired rows and every write deletes them first.
//!
//! Durability: WAL journal with `synchronous=NORMAL`. When a commit returns, the transaction is
//! in the WAL file (at least in the OS page cache), so it survives a crash or `kill -9` of the
//! process. An OS crash or power loss may roll back the last transactions before the next sync;
//! the database stays consistent either way. `synchronous=FULL` would fsync every commit.
//!
//! All SQLite calls run on tokio's blocking pool, one at a time, through a std `Mutex` around
//! the one connection; the mutex is never held across an `.await`.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write as _;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;

use super::{BatchFeed, Claim, MicroBatch, QueueError, QueueStats};
use crate::config::QueueSettings;
use crate::event::{self, Event, EventKind};
use crate::time::{self, Timestamp};

pub(crate) const DB_FILE: &str = "spillway.db";
const LOCK_FILE: &str = "spillway.lock";
/// How long a micro-batch id is remembered (`EX 3600` of the Redis marker).
const APPLIED_TTL_MS: i64 = 3_600_000;
/// Batch notifications a slow subscriber may fall behind by before it skips some.
const FEED_CAPACITY: usize = 1024;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS queue (seq INTEGER PRIMARY KEY AUTOINCREMENT, entry TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS in_flight (seq INTEGER PRIMARY KEY, entry TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS in_flight_meta (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    batch_id TEXT NOT NULL,
    chunks_done INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS dead_letter (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS held_sessions (
    session TEXT PRIMARY KEY,
    event TEXT NOT NULL, ts INTEGER NOT NULL, expires_ms INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS held_sessions_expiry ON held_sessions (expires_ms);
CREATE TABLE IF NOT EXISTS held_profiles (
    project TEXT NOT NULL, profile TEXT NOT NULL,
    event TEXT NOT NULL, ts INTEGER NOT NULL, expires_ms INTEGER NOT NULL,
    PRIMARY KEY (project, profile));
CREATE INDEX IF NOT EXISTS held_profiles_expiry ON held_profiles (expires_ms);
CREATE TABLE IF NOT EXISTS visitors (
    project TEXT NOT NULL, profile TEXT NOT NULL, last_ms INTEGER NOT NULL,
    PRIMARY KEY (project, profile));
CREATE TABLE IF NOT EXISTS heartbeats (
    project TEXT NOT NULL, profile TEXT NOT NULL, expires_ms INTEGER NOT NULL,
    PRIMARY KEY (project, profile));
CREATE INDEX IF NOT EXISTS heartbeats_expiry ON heartbeats (expires_ms);
CREATE TABLE IF NOT EXISTS flush_lock (
    id INTEGER PRIMARY KEY CHECK (id = 1), token TEXT NOT NULL, expires_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS applied (id TEXT PRIMARY KEY, at_ms INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS applied_age ON applied (at_ms);
CREATE TABLE IF NOT EXISTS seen (id TEXT PRIMARY KEY, expires_ms INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS seen_expiry ON seen (expires_ms);
";

/// The data directory's one SQLite connection, shared by the queue and the embedded sink. It
/// holds the directory's lock for as long as it lives.
pub(crate) struct Db {
    conn: Mutex<Connection>,
    /// Dropped after `conn`: the connection is closed before the directory is free.
    _lock: File,
}

impl Db {
    /// Locks `<dir>/<lock_file>` for this process and opens `<dir>/<file>` in WAL mode.
    ///
    /// # Errors
    /// [`QueueError::InUse`] when another process holds the lock, [`QueueError::DataDir`] or
    /// [`QueueError::Sqlite`] when the directory or the file cannot be used.
    pub(crate) fn open(dir: &Path, file: &str, lock_file: &str) -> Result<Db, QueueError> {
        let lock = lock_dir(dir, lock_file)?;
        let conn = Connection::open(dir.join(file))?;
        conn.busy_timeout(Duration::from_secs(5))?;
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(mode, "SQLite cannot use a WAL journal on this file system");
        }
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        Ok(Db {
            conn: Mutex::new(conn),
            _lock: lock,
        })
    }

    /// Runs `f` on the connection, on tokio's blocking pool.
    pub(crate) async fn call<T, E>(
        self: &Arc<Self>,
        f: impl FnOnce(&mut Connection) -> Result<T, E> + Send + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: Send + 'static,
    {
        let db = Arc::clone(self);
        let task = tokio::task::spawn_blocking(move || f(&mut db.lock()));
        match task.await {
            Ok(result) => result,
            // A blocking task is only cancelled by a runtime shutting down; `into_panic` then
            // panics too, which is all that is left to do.
            Err(err) => std::panic::resume_unwind(err.into_panic()),
        }
    }

    /// The connection, for setup on the caller's thread. A panic in an earlier call rolled its
    /// transaction back while unwinding, so a poisoned connection is still consistent.
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The queue in a SQLite file in a data directory, for running without servers.
#[derive(Clone)]
pub struct SqliteQueue {
    db: Arc<Db>,
    held: QueueSettings,
    feed: broadcast::Sender<String>,
}

impl SqliteQueue {
    /// Opens the queue in `dir`, creating the directory and the tables when missing, and locks
    /// the directory for this process.
    ///
    /// # Errors
    /// [`QueueError::InUse`] when another process has the directory open,
    /// [`QueueError::DataDir`] when it cannot be created or locked, [`QueueError::Sqlite`] when
    /// the database cannot be opened.
    pub fn open(dir: &Path, held: QueueSettings) -> Result<SqliteQueue, QueueError> {
        let db = Db::open(dir, DB_FILE, LOCK_FILE)?;
        let conn = db.lock();
        conn.execute_batch(SCHEMA)?;
        // This process holds the directory lock, so no other process can be flushing: a flush
        // lock still in the table belongs to a process that died. Without this, a restart after
        // `kill -9` would wait out the lock's TTL before resuming the abandoned batch.
        conn.execute("DELETE FROM flush_lock", [])?;
        drop(conn);
        let (feed, _) = broadcast::channel(FEED_CAPACITY);
        Ok(SqliteQueue {
            db: Arc::new(db),
            held,
            feed,
        })
    }

    /// The connection, for the embedded sink.
    pub(crate) fn db(&self) -> Arc<Db> {
        Arc::clone(&self.db)
    }

    /// Writes one micro-batch in one transaction, once per micro-batch id; returns how many of
    /// its events were dropped as re-sent (as `enqueue.lua`).
    pub(crate) async fn write(&self, batch: &MicroBatch<'_>) -> Result<usize, QueueError> {
        let id = batch.id.to_owned();
        let events = batch.events.to_vec();
        let heartbeats = batch.heartbeats.to_vec();
        let stamp = batch.now.as_millis();
        let held = self.held;
        self.db
            .call(move |conn| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let now = time::now().as_millis();
                delete_expired(&tx, now)?;
                let first_time = tx.execute(
                    "INSERT OR IGNORE INTO applied (id, at_ms) VALUES (?1, ?2)",
                    params![id, now],
                )? == 1;
                let mut resent = 0;
                if first_time {
                    for event in &events {
                        if !first_seen(&tx, event, now, held.dedup_window)? {
                            resent += 1;
                            continue;
                        }
                        write_event(&tx, event, now.saturating_add(millis(held.ttl)))?;
                    }
                    for (project, profile) in &heartbeats {
                        heartbeat(&tx, (project, profile), (stamp, now), held)?;
                    }
                }
                tx.commit()?;
                Ok(resent)
            })
            .await
    }

    /// The held screen view of a session, as its event JSON.
    pub(crate) async fn last_screen_view_by_session(
        &self,
        session: &str,
    ) -> Result<Option<String>, QueueError> {
        let session = session.to_owned();
        self.db
            .call(move |conn| {
                let mut select = conn.prepare_cached(
                    "SELECT event FROM held_sessions WHERE session = ?1 AND expires_ms > ?2",
                )?;
                let now = time::now().as_millis();
                Ok(select
                    .query_row(params![session, now], |row| row.get(0))
                    .optional()?)
            })
            .await
    }

    /// The newest held screen view of a profile in a project, as its event JSON.
    pub(crate) async fn last_screen_view_by_profile(
        &self,
        project: &str,
        profile: &str,
    ) -> Result<Option<String>, QueueError> {
        let (project, profile) = (project.to_owned(), profile.to_owned());
        self.db
            .call(move |conn| {
                let mut select = conn.prepare_cached(
                    "SELECT event FROM held_profiles \
                     WHERE project = ?1 AND profile = ?2 AND expires_ms > ?3",
                )?;
                let now = time::now().as_millis();
                Ok(select
                    .query_row(params![project, profile, now], |row| row.get(0))
                    .optional()?)
            })
            .await
    }

    /// Queued events (held screen views and the in-flight batch excluded).
    pub(crate) async fn size(&self) -> Result<u64, QueueError> {
        self.db
            .call(|conn| Ok(conn.query_row("SELECT count(*) FROM queue", [], |row| row.get(0))?))
            .await
    }

    /// Releases, unchanged, the live held views whose session has been quiet since `cutoff`
    /// (held at or before it), as `sweep.lua` does.
    pub(crate) async fn sweep_idle(
        &self,
        cutoff: Timestamp,
        max: usize,
    ) -> Result<usize, QueueError> {
        // A view's expiry is its hold time plus the TTL.
        let expires_by = cutoff.as_millis().saturating_add(millis(self.held.ttl));
        let max = i64::try_from(max).unwrap_or(i64::MAX);
        self.db
            .call(move |conn| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let now = time::now().as_millis();
                let idle: Vec<(String, String)> = tx
                    .prepare_cached(
                        "SELECT session, event FROM held_sessions \
                         WHERE expires_ms <= ?1 AND expires_ms > ?2 ORDER BY expires_ms LIMIT ?3",
                    )?
                    .query_map(params![expires_by, now, max], |row| {
                        Ok((row.get(0)?, row.get(1)?))
                    })?
                    .collect::<rusqlite::Result<_>>()?;
                for (session, json) in &idle {
                    tx.prepare_cached("DELETE FROM held_sessions WHERE session = ?1")?
                        .execute([session])?;
                    // The profile's view is forgotten when it is this same view.
                    if let Ok(event) = Event::parse(json) {
                        if let Some(profile) = event.profile_id() {
                            tx.prepare_cached(
                                "DELETE FROM held_profiles \
                                 WHERE project = ?1 AND profile = ?2 AND event = ?3",
                            )?
                            .execute([
                                event.project_id(),
                                profile,
                                json.as_str(),
                            ])?;
                        }
                    }
                    enqueue(&tx, json)?;
                }
                tx.commit()?;
                Ok(idle.len())
            })
            .await
    }

    /// Moves up to `max` dead-letter records' entries back to the queue, as `replay.lua`.
    pub(crate) async fn replay_dead_letters(&self, max: usize) -> Result<usize, QueueError> {
        let max = i64::try_from(max).unwrap_or(i64::MAX);
        self.db
            .call(move |conn| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let records: Vec<(i64, String)> = tx
                    .prepare("SELECT seq, record FROM dead_letter ORDER BY seq LIMIT ?1")?
                    .query_map([max], |row| Ok((row.get(0)?, row.get(1)?)))?
                    .collect::<rusqlite::Result<_>>()?;
                for (seq, record) in &records {
                    let entry = serde_json::from_str::<serde_json::Value>(record)
                        .ok()
                        .and_then(|r| r["entry"].as_str().map(str::to_owned))
                        .unwrap_or_else(|| record.clone());
                    enqueue(&tx, &entry)?;
                    tx.execute("DELETE FROM dead_letter WHERE seq = ?1", [seq])?;
                }
                tx.commit()?;
                Ok(records.len())
            })
            .await
    }

    /// Deletes every dead-letter record; returns how many there were.
    pub(crate) async fn purge_dead_letters(&self) -> Result<usize, QueueError> {
        self.db
            .call(|conn| Ok(conn.execute("DELETE FROM dead_letter", [])?))
            .await
    }

    /// Live held screen views.
    pub(crate) async fn held_count(&self) -> Result<u64, QueueError> {
        self.db
            .call(|conn| {
                let now = time::now().as_millis();
                Ok(conn.query_row(
                    "SELECT count(*) FROM held_sessions WHERE expires_ms > ?1",
                    [now],
                    |row| row.get(0),
                )?)
            })
            .await
    }

    /// The oldest queued entry, if any.
    pub(crate) async fn oldest_queued(&self) -> Result<Option<String>, QueueError> {
        self.db
            .call(|conn| {
                Ok(conn
                    .query_row("SELECT entry FROM queue ORDER BY seq LIMIT 1", [], |row| {
                        row.get(0)
                    })
                    .optional()?)
            })
            .await
    }

    /// Queue, in-flight and dead-letter sizes, from one snapshot.
    pub(crate) async fn stats(&self) -> Result<QueueStats, QueueError> {
        self.db
            .call(|conn| {
                Ok(conn.query_row(
                    "SELECT (SELECT count(*) FROM queue), (SELECT count(*) FROM in_flight), \
                     (SELECT count(*) FROM dead_letter)",
                    [],
                    |row| {
                        Ok(QueueStats {
                            queued: row.get(0)?,
                            in_flight: row.get(1)?,
                            dead_letter: row.get(2)?,
                        })
                    },
                )?)
            })
            .await
    }

    /// Visitors of a project with a heartbeat inside the window; older entries are trimmed.
    pub(crate) async fn active_visitor_count(
        &self,
        project: &str,
        now: Timestamp,
    ) -> Result<u64, QueueError> {
        let project = project.to_owned();
        let cutoff = now
            .as_millis()
            .saturating_sub(millis(self.held.visitor_window));
        self.db
            .call(move |conn| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                tx.execute(
                    "DELETE FROM visitors WHERE project = ?1 AND last_ms <= ?2",
                    params![project, cutoff],
                )?;
                let count = tx.query_row(
                    "SELECT count(*) FROM visitors WHERE project = ?1",
                    [&project],
                    |row| row.get(0),
                )?;
                tx.commit()?;
                Ok(count)
            })
            .await
    }

    /// Takes the flush lock if it is free or expired.
    pub(crate) async fn try_lock(&self, token: &str, ttl: Duration) -> Result<bool, QueueError> {
        let token = token.to_owned();
        self.db
            .call(move |conn| {
                let now = time::now().as_millis();
                let taken = conn.execute(
                    "INSERT INTO flush_lock (id, token, expires_ms) VALUES (1, ?1, ?2) \
                     ON CONFLICT (id) DO UPDATE \
                     SET token = excluded.token, expires_ms = excluded.expires_ms \
                     WHERE flush_lock.expires_ms <= ?3",
                    params![token, now.saturating_add(millis(ttl)), now],
                )?;
                Ok(taken == 1)
            })
            .await
    }

    /// Releases the flush lock if this token still holds it.
    pub(crate) async fn unlock(&self, token: &str) -> Result<(), QueueError> {
        let token = token.to_owned();
        self.db
            .call(move |conn| {
                conn.execute("DELETE FROM flush_lock WHERE token = ?1", [&token])?;
                Ok(())
            })
            .await
    }

    /// Claims the abandoned in-flight batch, or a new one from the head of the queue.
    pub(crate) async fn claim(
        &self,
        token: &str,
        max: usize,
        new_id: &str,
    ) -> Result<Claim, QueueError> {
        let (token, new_id) = (token.to_owned(), new_id.to_owned());
        self.db
            .call(move |conn| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                check_lock(&tx, &token)?;
                let abandoned: bool =
                    tx.query_row("SELECT EXISTS (SELECT 1 FROM in_flight)", [], |row| {
                        row.get(0)
                    })?;
                if abandoned {
                    // An abandoned batch without its meta row gets the new id.
                    tx.execute(
                        "INSERT OR IGNORE INTO in_flight_meta (id, batch_id, chunks_done) \
                         VALUES (1, ?1, 0)",
                        [&new_id],
                    )?;
                } else {
                    let moved = tx.execute(
                        "INSERT INTO in_flight (seq, entry) \
                         SELECT seq, entry FROM queue ORDER BY seq LIMIT ?1",
                        [max],
                    )?;
                    if moved == 0 {
                        return Ok(Claim {
                            batch_id: String::new(),
                            chunks_done: 0,
                            entries: Vec::new(),
                            not_utf8: Vec::new(),
                            resumed: false,
                        });
                    }
                    tx.execute(
                        "DELETE FROM queue WHERE seq <= (SELECT max(seq) FROM in_flight)",
                        [],
                    )?;
                    tx.execute(
                        "INSERT OR REPLACE INTO in_flight_meta (id, batch_id, chunks_done) \
                         VALUES (1, ?1, 0)",
                        [&new_id],
                    )?;
                }
                let (batch_id, chunks_done): (String, usize) = tx.query_row(
                    "SELECT batch_id, chunks_done FROM in_flight_meta",
                    [],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )?;
                let entries = tx
                    .prepare("SELECT entry FROM in_flight ORDER BY seq")?
                    .query_map([], |row| row.get(0))?
                    .collect::<Result<Vec<String>, _>>()?;
                tx.commit()?;
                Ok(Claim {
                    resumed: batch_id != new_id,
                    batch_id,
                    chunks_done,
                    entries,
                    not_utf8: Vec::new(),
                })
            })
            .await
    }

    /// Records that the first `chunks_done` chunks are in the sink and extends the lock.
    pub(crate) async fn progress(
        &self,
        token: &str,
        chunks_done: usize,
        ttl: Duration,
        dead: &[String],
    ) -> Result<(), QueueError> {
        let token = token.to_owned();
        let dead = dead.to_vec();
        self.db
            .call(move |conn| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                check_lock(&tx, &token)?;
                tx.execute("UPDATE in_flight_meta SET chunks_done = ?1", [chunks_done])?;
                for record in &dead {
                    tx.prepare_cached("INSERT INTO dead_letter (record) VALUES (?1)")?
                        .execute([record])?;
                }
                let expires = time::now().as_millis().saturating_add(millis(ttl));
                tx.execute("UPDATE flush_lock SET expires_ms = ?1", [expires])?;
                tx.commit()?;
                Ok(())
            })
            .await
    }

    /// Retires the in-flight batch and appends the dead-letter records, in one step.
    pub(crate) async fn commit(&self, token: &str, dead: &[String]) -> Result<(), QueueError> {
        let token = token.to_owned();
        let dead = dead.to_vec();
        self.db
            .call(move |conn| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                check_lock(&tx, &token)?;
                tx.execute("DELETE FROM in_flight", [])?;
                tx.execute("DELETE FROM in_flight_meta", [])?;
                {
                    let mut insert = tx.prepare("INSERT INTO dead_letter (record) VALUES (?1)")?;
                    for record in &dead {
                        insert.execute([record])?;
                    }
                }
                tx.commit()?;
                Ok(())
            })
            .await
    }

    /// Sends a batch notification to this queue's subscribers (of this process: the directory
    /// has no other).
    pub(crate) async fn publish(&self, payload: &str) -> Result<(), QueueError> {
        // An error only means nobody is subscribed, as a PUBLISH that reaches no one.
        let _ = self.feed.send(payload.to_owned());
        Ok(())
    }

    /// Batch notifications from every flusher on this queue, as they are published. A
    /// subscriber that falls more than a thousand behind skips the oldest.
    pub(crate) async fn subscribe(&self) -> Result<BatchFeed, QueueError> {
        let feed = futures_util::stream::unfold(self.feed.subscribe(), |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(payload) => return Some((payload, rx)),
                    Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => return None,
                }
            }
        });
        Ok(Box::pin(feed))
    }

    /// The dead-letter records, oldest first.
    pub(crate) async fn dead_letters(&self) -> Result<Vec<String>, QueueError> {
        self.db
            .call(|conn| {
                let mut select = conn.prepare("SELECT record FROM dead_letter ORDER BY seq")?;
                let records = select.query_map([], |row| row.get(0))?;
                Ok(records.collect::<Result<Vec<String>, _>>()?)
            })
            .await
    }
}

/// Creates `dir` and takes its exclusive lock, writing this process's id into the lock file.
fn lock_dir(dir: &Path, lock_file: &str) -> Result<File, QueueError> {
    let dir_error = |error| QueueError::DataDir {
        dir: dir.display().to_string(),
        error,
    };
    std::fs::create_dir_all(dir).map_err(dir_error)?;
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join(lock_file))
        .map_err(dir_error)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            return Err(QueueError::InUse {
                dir: dir.display().to_string(),
            })
        }
        Err(TryLockError::Error(error)) => return Err(dir_error(error)),
    }
    // For the operator who wonders which process holds the directory.
    file.set_len(0)
        .and_then(|()| writeln!(file, "{}", std::process::id()))
        .map_err(dir_error)?;
    Ok(file)
}

/// Deletes what Redis would have expired by `now`: held views, heartbeats, micro-batch ids.
fn delete_expired(tx: &Transaction<'_>, now: i64) -> rusqlite::Result<()> {
    tx.execute("DELETE FROM held_sessions WHERE expires_ms <= ?1", [now])?;
    tx.execute("DELETE FROM held_profiles WHERE expires_ms <= ?1", [now])?;
    tx.execute("DELETE FROM heartbeats WHERE expires_ms <= ?1", [now])?;
    tx.execute(
        "DELETE FROM applied WHERE at_ms <= ?1",
        [now - APPLIED_TTL_MS],
    )?;
    tx.execute("DELETE FROM seen WHERE expires_ms <= ?1", [now])?;
    Ok(())
}

/// Whether the event is taken in for the first time within the re-send window (always, for an
/// event without an id or with the check off); remembers its id. Expired ids were deleted at
/// the start of the transaction.
fn first_seen(
    tx: &Transaction<'_>,
    event: &Event,
    now: i64,
    window: Duration,
) -> rusqlite::Result<bool> {
    let Some(id) = event.id().filter(|_| !window.is_zero()) else {
        return Ok(true);
    };
    let inserted = tx
        .prepare_cached("INSERT OR IGNORE INTO seen (id, expires_ms) VALUES (?1, ?2)")?
        .execute(params![id, now.saturating_add(millis(window))])?;
    Ok(inserted == 1)
}

/// One event of a micro-batch, as `enqueue.lua` handles its op. Expired views were deleted at
/// the start of the transaction, so every held row found is live.
fn write_event(tx: &Transaction<'_>, event: &Event, held_until: i64) -> rusqlite::Result<()> {
    match (event.kind(), event.session_id()) {
        (EventKind::ScreenView, Some(session)) => {
            let ts = event.created_at().as_millis();
            let previous: Option<(String, i64)> = tx
                .prepare_cached("SELECT event, ts FROM held_sessions WHERE session = ?1")?
                .query_row([session], |row| Ok((row.get(0)?, row.get(1)?)))
                .optional()?;
            tx.prepare_cached(
                "INSERT OR REPLACE INTO held_sessions (session, event, ts, expires_ms) \
                 VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![session, event.json(), ts, held_until])?;
            if let Some(profile) = event.profile_id() {
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO held_profiles \
                     (project, profile, event, ts, expires_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
                )?
                .execute(params![
                    event.project_id(),
                    profile,
                    event.json(),
                    ts,
                    held_until
                ])?;
            }
            if let Some((json, previous_ts)) = previous {
                let duration = (ts - previous_ts).max(0).unsigned_abs();
                // Held events were valid objects when written; should one not be, it is queued
                // as it is and the flusher dead-letters it with the reason.
                let json = event::with_duration(&json, duration).unwrap_or(json);
                enqueue(tx, &json)?;
            }
        }
        (EventKind::SessionEnd, Some(session)) => {
            let previous: Option<String> = tx
                .prepare_cached("DELETE FROM held_sessions WHERE session = ?1 RETURNING event")?
                .query_row([session], |row| row.get(0))
                .optional()?;
            if let Some(json) = previous {
                enqueue(tx, &json)?;
            }
            enqueue(tx, event.json())?;
            if let Some(profile) = event.profile_id() {
                tx.prepare_cached("DELETE FROM held_profiles WHERE project = ?1 AND profile = ?2")?
                    .execute([event.project_id(), profile])?;
            }
        }
        _ => enqueue(tx, event.json())?,
    }
    Ok(())
}

fn enqueue(tx: &Transaction<'_>, json: &str) -> rusqlite::Result<()> {
    tx.prepare_cached("INSERT INTO queue (entry) VALUES (?1)")?
        .execute([json])?;
    Ok(())
}

/// Refreshes a visitor's heartbeat unless some writer did less than a refresh period ago: as in
/// `enqueue.lua`, the heartbeat row lives for the whole window, so a remaining lifetime above
/// `window - refresh` means it is fresh. `stamp` is the micro-batch's time, `now` the store's.
fn heartbeat(
    tx: &Transaction<'_>,
    (project, profile): (&str, &str),
    (stamp, now): (i64, i64),
    held: QueueSettings,
) -> rusqlite::Result<()> {
    let window = millis(held.visitor_window);
    let refresh = millis(held.heartbeat_refresh);
    let expires: Option<i64> = tx
        .prepare_cached("SELECT expires_ms FROM heartbeats WHERE project = ?1 AND profile = ?2")?
        .query_row([project, profile], |row| row.get(0))
        .optional()?;
    if expires.is_some_and(|expires| expires - now > window - refresh) {
        return Ok(());
    }
    tx.prepare_cached(
        "INSERT OR REPLACE INTO visitors (project, profile, last_ms) VALUES (?1, ?2, ?3)",
    )?
    .execute(params![project, profile, stamp])?;
    tx.prepare_cached(
        "INSERT OR REPLACE INTO heartbeats (project, profile, expires_ms) VALUES (?1, ?2, ?3)",
    )?
    .execute(params![project, profile, now.saturating_add(window)])?;
    Ok(())
}

/// Fails with [`QueueError::LockLost`] unless `token` holds the unexpired flush lock.
fn check_lock(tx: &Transaction<'_>, token: &str) -> Result<(), QueueError> {
    let holder: Option<String> = tx
        .query_row(
            "SELECT token FROM flush_lock WHERE expires_ms > ?1",
            [time::now().as_millis()],
            |row| row.get(0),
        )
        .optional()?;
    if holder.as_deref() == Some(token) {
        Ok(())
    } else {
        Err(QueueError::LockLost)
    }
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// A queue in a fresh data directory, removed when dropped.
#[cfg(test)]
pub(crate) struct Scratch {
    dir: std::path::PathBuf,
    pub(crate) queue: SqliteQueue,
}

#[cfg(test)]
impl Scratch {
    pub(crate) fn new() -> Scratch {
        let name = format!("spillway-unit-{}", uuid::Uuid::new_v4().simple());
        let dir = std::env::temp_dir().join(name);
        let queue = SqliteQueue::open(&dir, QueueSettings::default()).expect("opens");
        Scratch { dir, queue }
    }

    pub(crate) fn execute(&self, sql: &str, params: impl rusqlite::Params) {
        self.queue.db.lock().execute(sql, params).expect(sql);
    }

    pub(crate) fn count(&self, sql: &str) -> i64 {
        let conn = self.queue.db.lock();
        conn.query_row(sql, [], |row| row.get(0)).expect(sql)
    }
}

#[cfg(test)]
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn click() -> Vec<Event> {
        vec![Event::parse(r#"{"name":"click","project_id":"p"}"#).expect("valid")]
    }

    fn batch<'a>(id: &'a str, events: &'a [Event]) -> MicroBatch<'a> {
        MicroBatch {
            id,
            events,
            heartbeats: &[],
            now: time::now(),
        }
    }

    #[tokio::test]
    async fn a_micro_batch_id_is_applied_once() {
        let s = Scratch::new();
        let events = click();
        s.queue.write(&batch("b1", &events)).await.expect("write");
        s.queue.write(&batch("b1", &events)).await.expect("retry");
        assert_eq!(s.queue.size().await.expect("size"), 1);
        s.queue.write(&batch("b2", &events)).await.expect("next");
        assert_eq!(s.queue.size().await.expect("size"), 2);
    }

    #[tokio::test]
    async fn applied_ids_are_forgotten_after_an_hour() {
        let s = Scratch::new();
        let events = click();
        s.queue.write(&batch("b1", &events)).await.expect("write");
        let hour_ago = time::now().as_millis() - APPLIED_TTL_MS;
        s.execute("UPDATE applied SET at_ms = ?1", [hour_ago]);
        s.queue.write(&batch("b2", &events)).await.expect("write");
        assert_eq!(s.count("SELECT count(*) FROM applied WHERE id = 'b1'"), 0);
        assert_eq!(s.count("SELECT count(*) FROM applied WHERE id = 'b2'"), 1);
    }

    #[tokio::test]
    async fn the_flush_lock_is_exclusive_until_it_expires() {
        let s = Scratch::new();
        let q = &s.queue;
        let minute = Duration::from_secs(60);
        assert!(q.try_lock("a", minute).await.expect("lock"));
        assert!(!q.try_lock("b", minute).await.expect("lock"));
        let claim = q.claim("b", 10, "x").await;
        assert!(matches!(claim, Err(QueueError::LockLost)), "{claim:?}");
        assert!(q
            .claim("a", 10, "x")
            .await
            .expect("holder")
            .entries
            .is_empty());
        q.unlock("b").await.expect("unlock");
        assert!(
            !q.try_lock("b", minute).await.expect("lock"),
            "b cannot unlock a"
        );

        s.execute("UPDATE flush_lock SET expires_ms = 0", []);
        assert!(
            q.try_lock("b", minute).await.expect("lock"),
            "an expired lock is free"
        );
        let lost = [
            q.claim("a", 10, "x").await.err(),
            q.progress("a", 1, minute, &[]).await.err(),
            q.commit("a", &[]).await.err(),
        ];
        for err in lost {
            assert!(matches!(err, Some(QueueError::LockLost)), "{err:?}");
        }
    }

    #[tokio::test]
    async fn a_claim_moves_the_oldest_entries_and_a_commit_retires_them() {
        let s = Scratch::new();
        let q = &s.queue;
        for i in 0..5 {
            s.execute("INSERT INTO queue (entry) VALUES (?1)", [format!("e{i}")]);
        }
        assert!(q
            .try_lock("a", Duration::from_secs(60))
            .await
            .expect("lock"));
        let claim = q.claim("a", 3, "b1").await.expect("claim");
        assert_eq!(claim.entries, ["e0", "e1", "e2"]);
        assert_eq!((claim.batch_id.as_str(), claim.resumed), ("b1", false));
        let again = q.claim("a", 3, "b2").await.expect("claim");
        assert_eq!((again.batch_id.as_str(), again.resumed), ("b1", true));
        assert_eq!(again.entries, claim.entries);

        q.commit("a", &["dead".to_owned()]).await.expect("commit");
        let stats = q.stats().await.expect("stats");
        assert_eq!(
            (stats.queued, stats.in_flight, stats.dead_letter),
            (2, 0, 1)
        );
        assert_eq!(
            q.claim("a", 3, "b3").await.expect("claim").entries,
            ["e3", "e4"]
        );
    }
}
