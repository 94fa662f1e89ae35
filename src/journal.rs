//! The outage journal: micro-batches the Redis queue could not take, kept on local disk until
//! it can.
//!
//! When a write to Redis fails for a reason that may pass (connection refused, timeout,
//! `LOADING`, `OOM`...), the batcher appends the micro-batch here and acknowledges its events:
//! they are durable on this machine (SQLite, WAL). While the journal holds anything, new
//! micro-batches are appended behind it, so the order of arrival is kept; the batcher replays
//! the oldest micro-batch first, with its original id, so a replay whose reply was lost is not
//! applied twice. A process that dies during the outage replays the journal when it starts
//! again. Heartbeats of journaled micro-batches are dropped: a live-visitor count is about now.
//!
//! ```text
//! <data dir>/journal.db    journal (seq PK, batch_id, events JSON array, count)
//! <data dir>/journal.lock  held by the one process that uses the journal
//! ```

use std::path::Path;
use std::sync::Arc;

use rusqlite::params;

use crate::event::Event;
use crate::queue::{Db, QueueError};

const FILE: &str = "journal.db";
const LOCK_FILE: &str = "journal.lock";
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS journal (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    batch_id TEXT NOT NULL,
    events TEXT NOT NULL,
    count INTEGER NOT NULL);
";

/// One journaled micro-batch.
pub(crate) struct JournaledBatch {
    pub(crate) seq: i64,
    pub(crate) id: String,
    pub(crate) events: Vec<Event>,
}

/// The journal of one process, bounded in events.
#[derive(Clone)]
pub struct Journal {
    db: Arc<Db>,
    max_events: u64,
}

impl Journal {
    /// Opens (or creates) the journal in `dir`, for this process only.
    ///
    /// # Errors
    /// [`QueueError::InUse`] when another process uses it; [`QueueError::Sqlite`] or
    /// [`QueueError::DataDir`] when it cannot be opened.
    pub fn open(dir: &Path, max_events: u64) -> Result<Journal, QueueError> {
        let db = Db::open(dir, FILE, LOCK_FILE)?;
        db.lock().execute_batch(SCHEMA)?;
        Ok(Journal {
            db: Arc::new(db),
            max_events,
        })
    }

    /// Events in the journal.
    pub(crate) async fn len(&self) -> Result<u64, QueueError> {
        self.db
            .call(|conn| {
                Ok(
                    conn.query_row("SELECT coalesce(sum(count), 0) FROM journal", [], |row| {
                        row.get(0)
                    })?,
                )
            })
            .await
    }

    /// Appends a micro-batch; refuses (returning `false`) when it would exceed the bound.
    pub(crate) async fn append(
        &self,
        id: &str,
        events: &[Event],
        journaled: u64,
    ) -> Result<bool, QueueError> {
        let count = events.len() as u64;
        if journaled.saturating_add(count) > self.max_events {
            return Ok(false);
        }
        let texts: Vec<&str> = events.iter().map(Event::json).collect();
        let encoded = serde_json::to_string(&texts).unwrap_or_default();
        let id = id.to_owned();
        self.db
            .call(move |conn| {
                conn.execute(
                    "INSERT INTO journal (batch_id, events, count) VALUES (?1, ?2, ?3)",
                    params![id, encoded, count],
                )?;
                Ok(true)
            })
            .await
    }

    /// The oldest micro-batch, if any.
    pub(crate) async fn oldest(&self) -> Result<Option<JournaledBatch>, QueueError> {
        let row: Option<(i64, String, String)> = self
            .db
            .call(|conn| -> Result<_, QueueError> {
                use rusqlite::OptionalExtension;
                Ok(conn
                    .query_row(
                        "SELECT seq, batch_id, events FROM journal ORDER BY seq LIMIT 1",
                        [],
                        |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
                    )
                    .optional()?)
            })
            .await?;
        let Some((seq, id, encoded)) = row else {
            return Ok(None);
        };
        let texts: Vec<String> = serde_json::from_str(&encoded)
            .map_err(|e| QueueError::Corrupt(format!("journal entry {seq}: {e}")))?;
        // They were valid when journaled (and carry their created_at), so this keeps each text.
        let events = texts
            .iter()
            .map(|text| Event::parse(text))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| QueueError::Corrupt(format!("journal entry {seq}: {e}")))?;
        Ok(Some(JournaledBatch { seq, id, events }))
    }

    /// Removes a replayed micro-batch.
    pub(crate) async fn remove(&self, seq: i64) -> Result<(), QueueError> {
        self.db
            .call(move |conn| {
                conn.execute("DELETE FROM journal WHERE seq = ?1", [seq])?;
                Ok(())
            })
            .await
    }
}
