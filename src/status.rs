//! The live status page: `GET /` serves one self-contained HTML file (no CDN, no build step)
//! that polls `GET /v1/status` every second, keeps a few minutes of history in the browser and
//! draws it, and listens to the batch feeds of the projects it sees.
//!
//! The service keeps what the page needs and `/metrics` does not give in one read: running
//! totals (the page turns their differences into rates), the last flush, and the projects seen
//! recently (for their live-visitor counts).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

use crate::flusher::{FlushError, FlushOutcome};
use crate::time::{self, Timestamp};
use crate::Event;

/// The page.
pub(crate) const PAGE: &str = include_str!("status.html");

/// Projects remembered for the visitor table; the oldest names are dropped beyond it.
const MAX_PROJECTS: usize = 50;

/// What the status page shows that the service keeps itself.
#[derive(Default)]
pub(crate) struct StatusBoard {
    accepted: AtomicU64,
    flushed_rows: AtomicU64,
    last_flush: Mutex<Option<LastFlush>>,
    projects: Mutex<BTreeSet<String>>,
}

/// The last flush that did something (or failed).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct LastFlush {
    /// When it ended, `YYYY-MM-DD HH:MM:SS.mmm` UTC.
    at: String,
    /// `ok`, or the error.
    result: String,
    /// Rows it inserted.
    rows: usize,
    /// How long it took, ms.
    duration_ms: u64,
}

/// Totals since start, for rates.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Totals {
    accepted: u64,
    flushed_rows: u64,
}

impl StatusBoard {
    /// Counts events acknowledged to a client.
    pub(crate) fn accepted(&self, count: usize) {
        self.accepted.fetch_add(count as u64, Ordering::Relaxed);
    }

    /// Remembers the projects of events received.
    pub(crate) fn saw(&self, events: &[Event]) {
        let mut projects = self
            .projects
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for event in events {
            if projects.len() >= MAX_PROJECTS && !projects.contains(event.project_id()) {
                continue;
            }
            projects.insert(event.project_id().to_owned());
        }
    }

    /// Records a flush that flushed something or failed; empty and busy flushes are not news.
    pub(crate) fn flushed(&self, outcome: &Result<FlushOutcome, FlushError>, took: Duration) {
        let (result, rows) = match outcome {
            Ok(FlushOutcome::Flushed(report)) => ("ok".to_owned(), report.rows),
            Ok(FlushOutcome::Empty | FlushOutcome::Busy) => return,
            Err(err) => (err.to_string(), 0),
        };
        self.flushed_rows.fetch_add(rows as u64, Ordering::Relaxed);
        let last = LastFlush {
            at: time::format_millis(time::now()),
            result,
            rows,
            duration_ms: u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
        };
        *self
            .last_flush
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(last);
    }

    pub(crate) fn totals(&self) -> Totals {
        Totals {
            accepted: self.accepted.load(Ordering::Relaxed),
            flushed_rows: self.flushed_rows.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn last_flush(&self) -> Option<LastFlush> {
        self.last_flush
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn projects(&self) -> Vec<String> {
        self.projects
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }
}

/// Milliseconds since `at`, never negative.
pub(crate) fn age_ms(at: Timestamp) -> i64 {
    (time::now().as_millis() - at.as_millis()).max(0)
}
