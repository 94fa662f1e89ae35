//! Micro-batching: events gathered in memory, written to the queue in one atomic call per batch.
//!
//! A [`Buffer`] hands events to one batcher task over a bounded channel. The task writes a
//! micro-batch when it holds `max_events` events or `max_wait` after the first one arrived,
//! whichever comes first, or at once on [`Buffer::flush`]. A write that fails is retried with
//! the same micro-batch id (the queue applies an id once), so a retry after a lost reply cannot
//! queue events twice, and later events wait behind it, so order is kept.
//!
//! [`Buffer::add`] returns once the batcher has the event, like the seed's `add`; the returned
//! [`Receipt`] resolves once the event is in the queue, for callers that acknowledge to a client.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::{BatchSettings, QueueSettings};
use crate::event::Event;
use crate::journal::Journal;
use crate::metrics;
use crate::queue::{MicroBatch, Queue, QueueError};
use crate::time;

/// Errors of the batching layer.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum BufferError {
    /// The batcher task has stopped; nothing more can be added.
    #[error("the buffer is shut down")]
    Closed,
    /// The queue rejected the micro-batch in a way retrying cannot fix.
    #[error("queue write failed: {0}")]
    Write(String),
}

type Done = oneshot::Sender<Result<(), BufferError>>;

enum Command {
    Add { events: Vec<Event>, done: Done },
    Flush(oneshot::Sender<()>),
}

/// Resolves once the events it was returned for are in the queue.
#[derive(Debug)]
#[must_use = "a receipt does nothing unless awaited; drop it explicitly for fire-and-forget"]
pub struct Receipt(oneshot::Receiver<Result<(), BufferError>>);

impl Receipt {
    /// Waits until the events are in the queue.
    ///
    /// # Errors
    /// [`BufferError`] when the write failed for good or the buffer shut down first.
    pub async fn written(self) -> Result<(), BufferError> {
        self.0.await.unwrap_or(Err(BufferError::Closed))
    }
}

/// Handle to the micro-batcher. Cheap to clone; the batcher stops when every handle is dropped
/// and writes what it still holds first.
#[derive(Clone)]
pub struct Buffer {
    tx: mpsc::Sender<Command>,
    queue: Queue,
}

impl Buffer {
    /// Starts the batcher task for `queue`.
    pub fn start(
        queue: Queue,
        batch: BatchSettings,
        held: QueueSettings,
    ) -> (Buffer, JoinHandle<()>) {
        Buffer::start_with(queue, batch, held, None)
    }

    /// Starts the batcher task for `queue`, with an outage journal: micro-batches the queue
    /// cannot take are kept there (and acknowledged) until it can.
    pub fn start_journaled(
        queue: Queue,
        batch: BatchSettings,
        held: QueueSettings,
        journal: Journal,
    ) -> (Buffer, JoinHandle<()>) {
        Buffer::start_with(queue, batch, held, Some(journal))
    }

    fn start_with(
        queue: Queue,
        batch: BatchSettings,
        held: QueueSettings,
        journal: Option<Journal>,
    ) -> (Buffer, JoinHandle<()>) {
        // The channel holds commands, not events; bulk adds make a command carry many.
        let capacity = (batch.max_pending / batch.max_events.max(1)).max(16);
        let (tx, rx) = mpsc::channel(capacity);
        let batcher = Batcher {
            queue: queue.clone(),
            settings: batch,
            held,
            pending: Vec::new(),
            waiters: Vec::new(),
            heartbeats: HashMap::new(),
            last_prune: Instant::now(),
            journal: journal.map(|journal| (journal, 0)),
        };
        let task = tokio::spawn(batcher.run(rx));
        (Buffer { tx, queue }, task)
    }

    /// Adds one event to the current micro-batch.
    ///
    /// # Errors
    /// [`BufferError::Closed`] when the batcher has stopped.
    pub async fn add(&self, event: Event) -> Result<Receipt, BufferError> {
        self.bulk_add(vec![event]).await
    }

    /// Adds events, in order, to the micro-batches. One receipt covers them all.
    ///
    /// # Errors
    /// [`BufferError::Closed`] when the batcher has stopped.
    pub async fn bulk_add(&self, events: Vec<Event>) -> Result<Receipt, BufferError> {
        let (done, receipt) = oneshot::channel();
        self.tx
            .send(Command::Add { events, done })
            .await
            .map_err(|_| BufferError::Closed)?;
        Ok(Receipt(receipt))
    }

    /// Writes everything added so far to the queue, and waits for it.
    ///
    /// # Errors
    /// [`BufferError::Closed`] when the batcher has stopped.
    pub async fn flush(&self) -> Result<(), BufferError> {
        let (done, flushed) = oneshot::channel();
        self.tx
            .send(Command::Flush(done))
            .await
            .map_err(|_| BufferError::Closed)?;
        flushed.await.map_err(|_| BufferError::Closed)
    }

    /// The queue this buffer writes to, for its readers.
    #[must_use]
    pub fn queue(&self) -> &Queue {
        &self.queue
    }
}

struct Batcher {
    queue: Queue,
    settings: BatchSettings,
    held: QueueSettings,
    /// Events not yet written, in arrival order.
    pending: Vec<Event>,
    /// `(n, done)`: resolve `done` once the first `n` pending events are written.
    waiters: Vec<(usize, Done)>,
    /// Last heartbeat sent per `(project, profile)`; the queue also throttles across processes.
    heartbeats: HashMap<(String, String), Instant>,
    last_prune: Instant,
    /// The outage journal and the events it holds.
    journal: Option<(Journal, u64)>,
}

impl Batcher {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        if let Some((journal, journaled)) = &mut self.journal {
            match journal.len().await {
                Ok(0) => {}
                Ok(events) => {
                    tracing::warn!(
                        events,
                        "the outage journal holds events; replaying them first"
                    );
                    *journaled = events;
                }
                Err(err) => tracing::error!(error = %err, "cannot read the outage journal"),
            }
        }
        let mut deadline: Option<Instant> = None;
        loop {
            let replay_due = self.journal.as_ref().is_some_and(|(_, n)| *n > 0);
            let command = tokio::select! {
                command = rx.recv() => command,
                () = sleep_until(deadline) => {
                    self.write_all().await;
                    deadline = None;
                    continue;
                }
                () = tokio::time::sleep(JOURNAL_REPLAY_PERIOD), if replay_due => {
                    if let Some((journal, journaled)) = &mut self.journal {
                        replay(&self.queue, journal, journaled).await;
                    }
                    continue;
                }
            };
            match command {
                Some(Command::Add { events, done }) => {
                    if self.pending.is_empty() {
                        deadline = Some(Instant::now() + self.settings.max_wait);
                    }
                    self.pending.extend(events);
                    self.waiters.push((self.pending.len(), done));
                    while self.pending.len() >= self.settings.max_events {
                        self.write_front(self.settings.max_events).await;
                    }
                    if self.pending.is_empty() {
                        deadline = None;
                    }
                }
                Some(Command::Flush(done)) => {
                    self.write_all().await;
                    deadline = None;
                    let _ = done.send(());
                }
                None => {
                    self.write_all().await;
                    return;
                }
            }
        }
    }

    async fn write_all(&mut self) {
        while !self.pending.is_empty() {
            self.write_front(self.settings.max_events).await;
        }
    }

    /// Writes the first `n` pending events as one micro-batch, retrying until it lands.
    async fn write_front(&mut self, n: usize) {
        let n = n.min(self.pending.len()).max(1);
        let now = time::now();
        let heartbeats = self.due_heartbeats(n);
        let id = uuid::Uuid::new_v4().to_string();
        let batch = MicroBatch {
            id: &id,
            events: &self.pending[..n],
            heartbeats: &heartbeats,
            now,
        };
        let result = match &mut self.journal {
            Some((journal, journaled)) => {
                write_or_journal(&self.queue, journal, journaled, &batch).await
            }
            None => write_with_retry(&self.queue, &batch).await,
        };
        self.pending.drain(..n);
        let mut remaining = Vec::with_capacity(self.waiters.len());
        for (count, done) in self.waiters.drain(..) {
            if count <= n {
                let _ = done.send(result.clone());
            } else {
                remaining.push((count - n, done));
            }
        }
        self.waiters = remaining;
    }

    /// The heartbeats due among the first `n` pending events, marked as sent.
    fn due_heartbeats(&mut self, n: usize) -> Vec<(String, String)> {
        let now = Instant::now();
        let refresh = self.held.heartbeat_refresh;
        if now.duration_since(self.last_prune) >= refresh {
            self.heartbeats
                .retain(|_, sent| now.duration_since(*sent) < refresh);
            self.last_prune = now;
        }
        let mut due = Vec::new();
        for event in &self.pending[..n] {
            let Some(profile) = event.profile_id() else {
                continue;
            };
            let key = (event.project_id().to_owned(), profile.to_owned());
            let fresh = self
                .heartbeats
                .get(&key)
                .is_some_and(|sent| now.duration_since(*sent) < refresh);
            if !fresh {
                self.heartbeats.insert(key.clone(), now);
                due.push(key);
            }
        }
        due
    }
}

/// How often a non-empty journal is replayed while no events arrive.
const JOURNAL_REPLAY_PERIOD: Duration = Duration::from_secs(1);

/// Resolves at `deadline`, or never.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Writes a micro-batch to the queue, or into the journal when the queue cannot take it (or the
/// journal still holds earlier ones: order is kept). When the journal is full too, waits,
/// replaying, until one of them can take it; callers then wait, and ingest answers 503.
async fn write_or_journal(
    queue: &Queue,
    journal: &Journal,
    journaled: &mut u64,
    batch: &MicroBatch<'_>,
) -> Result<(), BufferError> {
    let mut delay = Duration::from_millis(100);
    loop {
        replay(queue, journal, journaled).await;
        if *journaled == 0 {
            match try_write(queue, batch).await {
                Ok(()) => return Ok(()),
                Err(WriteFailure::Transient(err)) => {
                    tracing::warn!(error = %err, "queue unreachable; journaling micro-batches");
                }
                Err(WriteFailure::Final(err)) => return Err(err),
            }
        }
        match journal.append(batch.id, batch.events, *journaled).await {
            Ok(true) => {
                *journaled += batch.events.len() as u64;
                metrics::journaled(batch.events.len(), *journaled);
                return Ok(());
            }
            Ok(false) => tracing::warn!(
                journaled = *journaled,
                "outage journal full; waiting for the queue"
            ),
            Err(err) => tracing::error!(error = %err, "cannot write the outage journal"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Writes journaled micro-batches to the queue, oldest first, with their original ids, until
/// the journal is empty or the queue fails.
async fn replay(queue: &Queue, journal: &Journal, journaled: &mut u64) {
    while *journaled > 0 {
        let oldest = match journal.oldest().await {
            Ok(Some(oldest)) => oldest,
            Ok(None) => {
                *journaled = 0;
                break;
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot read the outage journal");
                return;
            }
        };
        let batch = MicroBatch {
            id: &oldest.id,
            events: &oldest.events,
            heartbeats: &[],
            now: time::now(),
        };
        if let Err(err) = queue.write(&batch).await {
            tracing::debug!(error = %err, "queue still unreachable; journal kept");
            return;
        }
        if let Err(err) = journal.remove(oldest.seq).await {
            // Replayed again later: the queue applies a micro-batch id once.
            tracing::error!(error = %err, "cannot remove a replayed journal entry");
            return;
        }
        *journaled = journaled.saturating_sub(oldest.events.len() as u64);
        metrics::journal_replayed(oldest.events.len(), *journaled);
        if *journaled == 0 {
            tracing::info!("outage journal replayed; writing to the queue again");
        }
    }
}

/// Why one write attempt failed.
enum WriteFailure {
    /// It may succeed later (connection refused, timeout, `LOADING`, `OOM`, ...).
    Transient(QueueError),
    /// It will not: reported to the events' waiters, logged and counted.
    Final(BufferError),
}

/// One write of a micro-batch, with its metrics.
async fn try_write(queue: &Queue, batch: &MicroBatch<'_>) -> Result<(), WriteFailure> {
    let started = std::time::Instant::now();
    match queue.write(batch).await {
        Ok(()) => {
            metrics::micro_batch_written(batch.events.len(), started.elapsed());
            Ok(())
        }
        Err(err) if is_transient(&err) => Err(WriteFailure::Transient(err)),
        Err(err) => {
            metrics::queue_write_failed(batch.events.len());
            tracing::error!(
                error = %err,
                events = batch.events.len(),
                "queue rejected a micro-batch; its events were not queued"
            );
            Err(WriteFailure::Final(BufferError::Write(err.to_string())))
        }
    }
}

/// Retries transient failures with capped exponential backoff. Final failures are reported to
/// every waiter: the events are not in the queue.
async fn write_with_retry(queue: &Queue, batch: &MicroBatch<'_>) -> Result<(), BufferError> {
    let mut delay = Duration::from_millis(50);
    let mut attempt = 0u32;
    loop {
        match try_write(queue, batch).await {
            Ok(()) => return Ok(()),
            Err(WriteFailure::Final(err)) => return Err(err),
            Err(WriteFailure::Transient(err)) => {
                metrics::queue_write_retry();
                attempt += 1;
                tracing::warn!(
                    error = %err,
                    attempt,
                    events = batch.events.len(),
                    "queue write failed; retrying the same micro-batch"
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

fn is_transient(err: &QueueError) -> bool {
    match err {
        QueueError::Redis(e) => {
            e.is_io_error()
                || e.is_connection_dropped()
                || e.is_timeout()
                || matches!(
                    e.code(),
                    Some("LOADING" | "BUSY" | "TRYAGAIN" | "OOM" | "MASTERDOWN" | "READONLY")
                )
                // A cluster in failover: slots whose master died, redirects to it.
                || matches!(e.code(), Some("CLUSTERDOWN" | "MOVED" | "ASK"))
        }
        other => other.is_retryable(),
    }
}
