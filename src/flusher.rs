//! Flushing: from the queue into the sink, one locked batch at a time.
//!
//! A flush takes one batch from each shard of the queue whose flush lock it gets (a plain
//! queue is one shard; a lock held by another flusher is that flusher's lease, and the shard is
//! skipped). For each shard, under its lock:
//!
//! 1. claim a batch (the abandoned in-flight one first, else up to `batch_size` queued events);
//! 2. parse each entry; one that is not a valid event (or not even UTF-8) becomes a dead-letter
//!    record;
//! 3. sort the rows by `created_at` (stable, so the order is the same on every resumption);
//! 4. insert them in chunks of `chunk_size`, recording after each chunk that it is done (and
//!    renewing the lock), skipping the chunks an earlier holder recorded;
//! 5. commit: drop the in-flight batch and write the dead-letter records, in one step;
//! 6. publish one `{"projectId","count"}` notification per project.
//!
//! A failed insert leaves the batch in flight for the next flush; nothing leaves the queue
//! until it is in the sink or in the dead-letter list.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::config::FlushSettings;
use crate::event;
use crate::metrics;
use crate::queue::{Queue, QueueError, Shard};
use crate::sink::{Row, Sink, SinkError};
use crate::time;

/// Errors of a flush.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FlushError {
    /// The queue failed; the batch stays where it was.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// An insert failed; the batch stays in flight and is retried by the next flush.
    #[error("insert of chunk {chunk} of batch {batch_id} failed: {error}")]
    Sink {
        /// The batch.
        batch_id: String,
        /// Index of the chunk that failed.
        chunk: usize,
        /// What the sink reported.
        error: SinkError,
    },
}

/// What one flush did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlushOutcome {
    /// Nothing flushed: other flushers hold the locks of the shards with events.
    Busy,
    /// Nothing was queued or in flight.
    Empty,
    /// Batches were flushed (one per shard at most).
    Flushed(FlushReport),
}

/// Figures of one flush: of its batch, or summed over the shards' batches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlushReport {
    /// Identity of the batch (of each batch, comma-separated, when several shards flushed).
    pub batch_id: String,
    /// Rows inserted by this flush (chunks an earlier flusher recorded are not counted).
    pub rows: usize,
    /// Insert requests made by this flush.
    pub chunks: usize,
    /// Entries moved to the dead-letter list.
    pub dead_lettered: usize,
    /// Whether a batch had been abandoned by an earlier flusher.
    pub resumed: bool,
    /// Whether a batch was full, so more events may be waiting.
    pub full: bool,
    /// Batches flushed: one per shard at most.
    pub batches: usize,
}

impl FlushReport {
    fn add(&mut self, other: FlushReport) {
        self.batch_id = format!("{},{}", self.batch_id, other.batch_id);
        self.rows += other.rows;
        self.chunks += other.chunks;
        self.dead_lettered += other.dead_lettered;
        self.resumed |= other.resumed;
        self.full |= other.full;
        self.batches += other.batches;
    }
}

/// Moves batches from the queue into the sink.
#[derive(Clone)]
pub struct Flusher {
    queue: Queue,
    shards: Vec<Shard>,
    /// The shard the next flush starts with: flushes take turns, so no shard waits behind
    /// another.
    next_shard: Arc<AtomicUsize>,
    sink: Sink,
    settings: FlushSettings,
}

impl Flusher {
    /// A flusher for `queue` into `sink`.
    #[must_use]
    pub fn new(queue: Queue, sink: Sink, settings: FlushSettings) -> Flusher {
        Flusher {
            shards: queue.shards(),
            queue,
            next_shard: Arc::new(AtomicUsize::new(0)),
            sink,
            settings,
        }
    }

    /// Flushes one batch of each shard whose lock is free and that holds anything.
    ///
    /// # Errors
    /// The first [`FlushError`] of a shard, when no shard flushed: a failing shard (its master
    /// down, say) does not hold back the healthy ones, whose batches count as a flush. The
    /// failed batch is retried later.
    pub async fn flush_once(&self) -> Result<FlushOutcome, FlushError> {
        let count = self.shards.len();
        let first = self.next_shard.fetch_add(1, Ordering::Relaxed);
        let (mut flushed, mut busy, mut failed) = (None::<FlushReport>, false, None);
        for i in 0..count {
            match self.flush_shard(&self.shards[(first + i) % count]).await {
                Ok(FlushOutcome::Flushed(report)) => match &mut flushed {
                    Some(total) => total.add(report),
                    None => flushed = Some(report),
                },
                Ok(FlushOutcome::Busy) => busy = true,
                Ok(FlushOutcome::Empty) => {}
                Err(err) => {
                    failed.get_or_insert(err);
                }
            }
        }
        match (flushed, failed) {
            (Some(report), failed) => {
                if let Some(err) = failed {
                    tracing::warn!(error = %err, "a shard's flush failed; the others flushed");
                }
                Ok(FlushOutcome::Flushed(report))
            }
            (None, Some(err)) => Err(err),
            (None, None) if busy => Ok(FlushOutcome::Busy),
            (None, None) => Ok(FlushOutcome::Empty),
        }
    }

    /// Flushes one batch of `shard`, if its lock is free and it holds anything.
    async fn flush_shard(&self, shard: &Shard) -> Result<FlushOutcome, FlushError> {
        let token = uuid::Uuid::new_v4().to_string();
        if !shard.try_lock(&token, self.settings.lock_ttl).await? {
            metrics::flush_lock_wait();
            return Ok(FlushOutcome::Busy);
        }
        let started = std::time::Instant::now();
        let result = self.flush_locked(shard, &token).await;
        match &result {
            Ok(FlushOutcome::Flushed(report)) => metrics::flush_done(
                report.rows,
                report.chunks,
                report.dead_lettered,
                started.elapsed(),
            ),
            Ok(_) => {}
            Err(err) => {
                metrics::flush_retry();
                if let FlushError::Sink { error, .. } = err {
                    metrics::sink_error(error.kind());
                }
            }
        }
        if let Err(err) = shard.unlock(&token).await {
            tracing::warn!(error = %err, "could not release the flush lock; it expires by itself");
        }
        result
    }

    /// Flushes until the queue and the in-flight batches are empty, waiting while another
    /// flusher holds a lock. Returns the rows inserted.
    ///
    /// # Errors
    /// The first [`FlushError`]; what was flushed before it stays flushed.
    pub async fn drain(&self) -> Result<DrainReport, FlushError> {
        let mut report = DrainReport::default();
        loop {
            match self.flush_once().await? {
                FlushOutcome::Empty => return Ok(report),
                FlushOutcome::Busy => tokio::time::sleep(Duration::from_millis(50)).await,
                FlushOutcome::Flushed(batch) => {
                    report.batches += batch.batches;
                    report.rows += batch.rows;
                    report.dead_lettered += batch.dead_lettered;
                }
            }
        }
    }

    async fn flush_locked(&self, shard: &Shard, token: &str) -> Result<FlushOutcome, FlushError> {
        let new_id = uuid::Uuid::new_v4().to_string();
        let claim = shard
            .claim(token, self.settings.batch_size, &new_id)
            .await?;
        if claim.entries.is_empty() && claim.not_utf8.is_empty() {
            return Ok(FlushOutcome::Empty);
        }
        let (rows, mut dead) = prepare(&claim.entries);
        dead.extend(
            claim
                .not_utf8
                .iter()
                .map(|entry| dead_letter_record(entry, "the entry is not UTF-8 text", "not_utf8")),
        );
        let chunk_size = self.settings.chunk_size.max(1);
        let mut report = FlushReport {
            batch_id: claim.batch_id.clone(),
            rows: 0,
            chunks: 0,
            dead_lettered: dead.len(),
            resumed: claim.resumed,
            full: claim.entries.len() + claim.not_utf8.len() >= self.settings.batch_size,
            batches: 1,
        };
        for (index, chunk) in rows.chunks(chunk_size).enumerate() {
            if index < claim.chunks_done {
                continue;
            }
            // The first chunk not recorded as done may have landed before this flush (its
            // flusher failed or died during or right after the insert, or is still at it): the
            // sink recognises it by its token and does not insert it twice.
            let chunk_token = format!("{}:{index}", claim.batch_id);
            let mut rejected = Vec::new();
            let requests = self
                .insert_chunk(chunk, &chunk_token, &mut rejected)
                .await
                .map_err(|error| FlushError::Sink {
                    batch_id: claim.batch_id.clone(),
                    chunk: index,
                    error,
                })?;
            shard
                .progress(token, index + 1, self.settings.lock_ttl, &rejected)
                .await?;
            report.rows += chunk.len() - rejected.len();
            report.chunks += requests;
            report.dead_lettered += rejected.len();
        }
        shard.commit(token, &dead).await?;
        self.publish(&rows).await;
        Ok(FlushOutcome::Flushed(report))
    }

    /// Inserts one chunk and returns the insert requests it took. Rows the sink refuses for their
    /// data are isolated by halving the chunk (sub-chunks get the tokens `<token>/0` and
    /// `<token>/1`, the same on every attempt) and become dead-letter records in `rejected`
    /// with the sink's message; the other rows land.
    async fn insert_chunk(
        &self,
        rows: &[Row<'_>],
        token: &str,
        rejected: &mut Vec<String>,
    ) -> Result<usize, SinkError> {
        let started = std::time::Instant::now();
        let inserted = self.sink.insert(rows, token).await;
        metrics::sink_request(started.elapsed());
        match inserted {
            Ok(()) => Ok(1),
            Err(error) if error.is_data_error() => {
                metrics::sink_error(error.kind());
                if let [row] = rows {
                    tracing::warn!(error = %error, "the sink rejected a row; dead-lettered");
                    rejected.push(dead_letter_record(
                        row.fields.source(),
                        &error.to_string(),
                        "rejected_by_sink",
                    ));
                    return Ok(1);
                }
                let (left, right) = rows.split_at(rows.len() / 2);
                let (left_token, right_token) = (format!("{token}/0"), format!("{token}/1"));
                let left = Box::pin(self.insert_chunk(left, &left_token, rejected)).await?;
                let right = Box::pin(self.insert_chunk(right, &right_token, rejected)).await?;
                Ok(1 + left + right)
            }
            Err(error) => Err(error),
        }
    }

    /// One notification per project, as OpenPanel's `publishEvent('events', 'batch', ...)`.
    async fn publish(&self, rows: &[Row<'_>]) {
        let mut per_project: BTreeMap<String, usize> = BTreeMap::new();
        for row in rows {
            if let Some(project) = row.fields.get("project_id") {
                let project: String = serde_json::from_str(project.get()).unwrap_or_default();
                *per_project.entry(project).or_default() += 1;
            }
        }
        for (project, count) in per_project {
            let payload = serde_json::json!({ "projectId": project, "count": count }).to_string();
            if let Err(err) = self.queue.publish(&payload).await {
                tracing::warn!(error = %err, project, "batch notification not published");
            }
        }
    }
}

/// Totals of a drain.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DrainReport {
    /// Batches flushed.
    pub batches: usize,
    /// Rows inserted.
    pub rows: usize,
    /// Entries dead-lettered.
    pub dead_lettered: usize,
}

/// Parses claimed entries into rows sorted by `created_at`, and dead-letter records for the
/// entries that are not valid events.
fn prepare(entries: &[String]) -> (Vec<Row<'_>>, Vec<String>) {
    let mut rows = Vec::with_capacity(entries.len());
    let mut dead = Vec::new();
    for entry in entries {
        match event::read_queued(entry) {
            Ok((fields, created_at)) => rows.push(Row { created_at, fields }),
            Err(err) => dead.push(dead_letter_record(entry, &err.to_string(), err.code())),
        }
    }
    rows.sort_by_key(|row| row.created_at);
    (rows, dead)
}

fn dead_letter_record(entry: &str, reason: &str, code: &str) -> String {
    serde_json::json!({
        "reason": reason,
        "code": code,
        "entry": entry,
        "at": time::format_millis(time::now()),
    })
    .to_string()
}
