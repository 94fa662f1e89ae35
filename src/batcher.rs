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

use crate::config::{BatchSettings, HeldSettings};
use crate::event::Event;
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
        held: HeldSettings,
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
    held: HeldSettings,
    /// Events not yet written, in arrival order.
    pending: Vec<Event>,
    /// `(n, done)`: resolve `done` once the first `n` pending events are written.
    waiters: Vec<(usize, Done)>,
    /// Last heartbeat sent per `(project, profile)`; the queue also throttles across processes.
    heartbeats: HashMap<(String, String), Instant>,
    last_prune: Instant,
}

impl Batcher {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut deadline: Option<Instant> = None;
        loop {
            let command = match deadline {
                Some(at) => tokio::select! {
                    command = rx.recv() => command,
                    () = tokio::time::sleep_until(at) => {
                        self.write_all().await;
                        deadline = None;
                        continue;
                    }
                },
                None => rx.recv().await,
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
        let result = write_with_retry(&self.queue, &batch).await;
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

/// Retries transient failures with capped exponential backoff. Non-retryable failures are
/// reported to every waiter and logged: the events are not in the queue.
async fn write_with_retry(queue: &Queue, batch: &MicroBatch<'_>) -> Result<(), BufferError> {
    let mut delay = Duration::from_millis(50);
    let mut attempt = 0u32;
    loop {
        let started = std::time::Instant::now();
        match queue.write(batch).await {
            Ok(()) => {
                metrics::micro_batch_written(batch.events.len(), started.elapsed());
                return Ok(());
            }
            Err(err) if is_transient(&err) => {
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
            Err(err) => {
                metrics::queue_write_failed(batch.events.len());
                tracing::error!(
                    error = %err,
                    events = batch.events.len(),
                    "queue rejected a micro-batch; its events were not queued"
                );
                return Err(BufferError::Write(err.to_string()));
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
        }
        other => other.is_retryable(),
    }
}
