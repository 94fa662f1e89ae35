//! Where flushed events land.
//!
//! The flusher hands the sink sorted chunks of rows; each chunk carries a token that is the same
//! every time that chunk is retried (`<batch id>:<chunk index>`), so a sink that can deduplicate
//! by it turns a retried insert into a no-op.

mod clickhouse;
mod sqlite;

pub use self::clickhouse::{ClickHouseSink, SchemaVariant};
pub use self::sqlite::{query as query_embedded, QueryResult, SqliteSink};

use crate::event::Fields;
use crate::time::Timestamp;

/// Errors of the sink layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SinkError {
    /// The server could not be reached or the request did not complete.
    #[error("ClickHouse request failed: {0}")]
    Transport(String),
    /// The server answered with an error.
    #[error("ClickHouse error (HTTP {status}, code {code}): {message}")]
    Server {
        /// HTTP status.
        status: u16,
        /// ClickHouse's exception code; 0 when the answer had none.
        code: u32,
        /// ClickHouse's message, first line.
        message: String,
    },
    /// The configuration or the target table is unusable.
    #[error("{0}")]
    Setup(String),
    /// The embedded sink's SQLite database failed.
    #[error("SQLite sink failed: {0}")]
    Sqlite(rusqlite::Error),
}

/// ClickHouse exception codes that mean the data itself was rejected: retrying cannot help.
const DATA_ERROR_CODES: &[u32] = &[
    6,   // CANNOT_PARSE_TEXT
    25,  // CANNOT_PARSE_ESCAPE_SEQUENCE
    26,  // CANNOT_PARSE_QUOTED_STRING
    27,  // CANNOT_PARSE_INPUT_ASSERTION_FAILED
    38,  // CANNOT_PARSE_DATE
    41,  // CANNOT_PARSE_DATETIME
    53,  // TYPE_MISMATCH
    69,  // ARGUMENT_OUT_OF_BOUND
    70,  // CANNOT_CONVERT_TYPE
    72,  // CANNOT_PARSE_NUMBER
    117, // INCORRECT_DATA
    131, // TOO_LARGE_STRING_SIZE
    321, // VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE
    349, // CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN
    376, // CANNOT_PARSE_UUID
];

// The transport error with its causes, which `reqwest` keeps out of its own message.
impl From<reqwest::Error> for SinkError {
    fn from(error: reqwest::Error) -> Self {
        let mut message = error.to_string();
        let mut cause = std::error::Error::source(&error);
        while let Some(inner) = cause {
            message.push_str(": ");
            message.push_str(&inner.to_string());
            cause = inner.source();
        }
        SinkError::Transport(message)
    }
}

// By hand rather than `#[from]`, so error chains do not print the cause twice.
impl From<rusqlite::Error> for SinkError {
    fn from(error: rusqlite::Error) -> Self {
        SinkError::Sqlite(error)
    }
}

impl SinkError {
    /// The one place that decides whether a failed insert is retried: transport errors, server
    /// overload and unknown server errors are; errors about the data and setup errors are not.
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        match self {
            SinkError::Transport(_) => true,
            SinkError::Server { status, code, .. } => {
                *status == 429 || *status >= 500 && !DATA_ERROR_CODES.contains(code)
            }
            SinkError::Setup(_) => false,
            SinkError::Sqlite(e) => matches!(
                e.sqlite_error_code(),
                Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
            ),
        }
    }

    /// Whether the sink refused the rows themselves (a value it cannot parse or store): the
    /// chunk is then split to find the rows at fault, which go to the dead-letter list.
    #[must_use]
    pub fn is_data_error(&self) -> bool {
        matches!(self, SinkError::Server { code, .. } if DATA_ERROR_CODES.contains(code))
    }

    /// A short, fixed label for metrics.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            SinkError::Transport(_) => "transport",
            SinkError::Server { .. } if self.is_retryable() => "server",
            SinkError::Server { .. } => "rejected",
            SinkError::Setup(_) => "setup",
            SinkError::Sqlite(_) => "sqlite",
        }
    }
}

/// One row on its way to the sink: the event's fields as sent, and its time.
pub(crate) struct Row<'a> {
    pub(crate) created_at: Timestamp,
    pub(crate) fields: Fields<'a>,
}

/// The sink backend.
#[derive(Clone)]
#[non_exhaustive]
#[allow(
    clippy::large_enum_variant,
    reason = "one sink per flusher, built once; boxing would change how a ClickHouse sink is built"
)]
pub enum Sink {
    /// ClickHouse over HTTP, rows shaped to the target table's columns.
    ClickHouse(ClickHouseSink),
    /// The `events` table in the embedded queue's SQLite file: no server, and each chunk lands
    /// exactly once, retried or not.
    Embedded(SqliteSink),
}

impl Sink {
    /// Inserts one chunk. `token` identifies the chunk across retries: an attempt at a chunk
    /// that has landed, however late it arrives, inserts nothing (see each sink).
    pub(crate) async fn insert(&self, rows: &[Row<'_>], token: &str) -> Result<(), SinkError> {
        match self {
            Sink::ClickHouse(sink) => sink.insert(rows, token).await,
            Sink::Embedded(sink) => sink.insert(rows, token).await,
        }
    }

    /// Whether the sink answers.
    ///
    /// # Errors
    /// The reason it does not.
    pub async fn check(&self) -> Result<(), SinkError> {
        match self {
            Sink::ClickHouse(sink) => sink.ping().await,
            Sink::Embedded(sink) => sink.check().await,
        }
    }
}
