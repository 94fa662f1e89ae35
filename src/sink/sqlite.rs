//! The embedded sink: flushed events in an `events` table of the embedded queue's SQLite file,
//! written over the queue's connection.
//!
//! ```text
//! events       id, name, project_id, session_id, profile_id   TEXT ('' when missing or null)
//!              created_at  TEXT 'YYYY-MM-DD HH:MM:SS.mmm' (UTC)
//!              duration    INTEGER (0 when missing)
//!              properties  TEXT, JSON ('{}' when missing or null)
//!              event       TEXT, the event's JSON as queued
//!              index (project_id, created_at)
//! sink_chunks  token PRIMARY KEY, rows                         one row per inserted chunk
//! ```
//!
//! Missing fields take the defaults ClickHouse gives its `String`, `UInt64` and `Map` columns.
//! A chunk is one transaction that records its token first: a chunk retried with the same token
//! (after a crash between its insert and the queue's `progress`) finds the token and inserts
//! nothing, so every row lands exactly once, as `insert_deduplication_token` makes ClickHouse
//! do. Tokens are kept (a few dozen bytes per chunk), so a batch resumed at any later time is
//! still deduplicated.

use std::sync::Arc;

use rusqlite::{params, TransactionBehavior};
use serde_json::value::RawValue;

use super::{Row, SinkError};
use crate::queue::{Db, SqliteQueue};
use crate::time;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    id TEXT NOT NULL, name TEXT NOT NULL, project_id TEXT NOT NULL,
    session_id TEXT NOT NULL, profile_id TEXT NOT NULL,
    created_at TEXT NOT NULL, duration INTEGER NOT NULL,
    properties TEXT NOT NULL, event TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_project_time ON events (project_id, created_at);
CREATE TABLE IF NOT EXISTS sink_chunks (token TEXT PRIMARY KEY, rows INTEGER NOT NULL);
";

/// Inserts rows into the `events` table next to a [`SqliteQueue`], in the same file.
#[derive(Clone)]
pub struct SqliteSink {
    db: Arc<Db>,
}

impl SqliteSink {
    /// A sink into the database of `queue`; creates the tables when missing.
    ///
    /// # Errors
    /// [`SinkError::Sqlite`] when the tables cannot be created.
    pub fn open(queue: &SqliteQueue) -> Result<SqliteSink, SinkError> {
        let db = queue.db();
        db.lock().execute_batch(SCHEMA)?;
        Ok(SqliteSink { db })
    }

    /// Inserts one chunk in one transaction, unless a chunk with this token was inserted before.
    pub(crate) async fn insert(&self, rows: &[Row<'_>], token: &str) -> Result<(), SinkError> {
        let rows: Vec<EventRow> = rows.iter().map(EventRow::new).collect();
        let token = token.to_owned();
        self.db
            .call(move |conn| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let first_time = tx.execute(
                    "INSERT OR IGNORE INTO sink_chunks (token, rows) VALUES (?1, ?2)",
                    params![token, rows.len()],
                )? == 1;
                if first_time {
                    let mut insert = tx.prepare_cached(
                        "INSERT INTO events (id, name, project_id, session_id, profile_id, \
                         created_at, duration, properties, event) \
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                    )?;
                    for row in &rows {
                        insert.execute(params![
                            row.id,
                            row.name,
                            row.project_id,
                            row.session_id,
                            row.profile_id,
                            row.created_at,
                            row.duration,
                            row.properties,
                            row.event
                        ])?;
                    }
                }
                tx.commit()?;
                Ok(())
            })
            .await
    }

    /// Whether the `events` table can be read.
    pub(crate) async fn check(&self) -> Result<(), SinkError> {
        self.db
            .call(|conn| {
                conn.query_row(
                    "SELECT count(*) FROM (SELECT 1 FROM events LIMIT 1)",
                    [],
                    |_| Ok(()),
                )?;
                Ok(())
            })
            .await
    }
}

/// One row of `events`, owned, to cross into the blocking pool.
struct EventRow {
    id: String,
    name: String,
    project_id: String,
    session_id: String,
    profile_id: String,
    created_at: String,
    duration: i64,
    properties: String,
    event: String,
}

impl EventRow {
    fn new(row: &Row<'_>) -> EventRow {
        let fields = &row.fields;
        let text = |name| text(fields.get(name));
        EventRow {
            id: text("id"),
            name: text("name"),
            project_id: text("project_id"),
            session_id: text("session_id"),
            profile_id: text("profile_id"),
            created_at: time::format_millis(row.created_at),
            duration: fields.get("duration").map_or(0, integer),
            properties: match fields.get("properties").map(RawValue::get) {
                None | Some("null") => "{}".to_owned(),
                Some(json) => json.to_owned(),
            },
            event: fields.source().to_owned(),
        }
    }
}

/// A text column: a JSON string decoded, any other value as its JSON text, empty when missing.
fn text(raw: Option<&RawValue>) -> String {
    match raw.map(RawValue::get) {
        None | Some("null") => String::new(),
        Some(json) => serde_json::from_str(json).unwrap_or_else(|_| json.to_owned()),
    }
}

/// An integer column: a number, truncated when it has a fraction; 0 for anything else.
fn integer(raw: &RawValue) -> i64 {
    let json = raw.get();
    json.parse::<i64>()
        .ok()
        .or_else(|| json.parse::<f64>().ok().map(|n| n as i64))
        .unwrap_or(0)
}

/// The result of [`query`]: column names and rows, each value as text.
pub type QueryResult = (Vec<String>, Vec<Vec<String>>);

/// Runs one read-only SQL statement on the embedded database in `dir`, for `spillway query`.
/// It opens the file read-only and takes no lock, so it works while `spillway serve` runs.
///
/// # Errors
/// [`SinkError::Sqlite`] when the file is missing or the statement fails (writes are refused).
pub fn query(dir: &std::path::Path, sql: &str) -> Result<QueryResult, SinkError> {
    use rusqlite::types::ValueRef;
    let conn = rusqlite::Connection::open_with_flags(
        dir.join(crate::queue::DB_FILE),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    let mut statement = conn.prepare(sql)?;
    let columns: Vec<String> = statement.column_names().map(str::to_owned).collect();
    let width = columns.len();
    let rows = statement
        .query_map([], |row| {
            (0..width)
                .map(|i| {
                    Ok(match row.get_ref(i)? {
                        ValueRef::Null => "NULL".to_owned(),
                        ValueRef::Integer(n) => n.to_string(),
                        ValueRef::Real(x) => x.to_string(),
                        ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
                        ValueRef::Blob(b) => format!("<{} bytes>", b.len()),
                    })
                })
                .collect::<Result<Vec<String>, rusqlite::Error>>()
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok((columns, rows))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event;
    use crate::queue::Scratch;

    #[tokio::test]
    async fn a_chunk_with_a_known_token_inserts_nothing() {
        let s = Scratch::new();
        let sink = SqliteSink::open(&s.queue).expect("tables");
        let entry = r#"{"name":"click","project_id":"p","created_at":"2024-06-01 00:00:00.006"}"#;
        let (fields, created_at) = event::read_queued(entry).expect("valid");
        let rows = [Row { created_at, fields }];
        sink.insert(&rows, "b:0").await.expect("insert");
        sink.insert(&rows, "b:0").await.expect("retry");
        assert_eq!(s.count("SELECT count(*) FROM events"), 1);
        sink.insert(&rows, "b:1").await.expect("another chunk");
        assert_eq!(s.count("SELECT count(*) FROM events"), 2);
        sink.check().await.expect("readable");
    }

    #[tokio::test]
    async fn missing_fields_take_clickhouse_defaults() {
        let s = Scratch::new();
        let sink = SqliteSink::open(&s.queue).expect("tables");
        let entry = r#"{"name":"click","project_id":"p","session_id":null,"created_at":1717200000006,"duration":2.5}"#;
        let (fields, created_at) = event::read_queued(entry).expect("valid");
        sink.insert(&[Row { created_at, fields }], "t")
            .await
            .expect("insert");
        let row: (String, String, String, i64, String) = s
            .queue
            .db()
            .lock()
            .query_row(
                "SELECT id || session_id || profile_id, created_at, properties, duration, event \
                 FROM events",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .expect("row");
        let expected = ("", "2024-06-01 00:00:00.006", "{}", 2, entry);
        assert_eq!(
            (
                row.0.as_str(),
                row.1.as_str(),
                row.2.as_str(),
                row.3,
                row.4.as_str()
            ),
            expected
        );
    }
}
