//! Opening the configured backends: Redis or the embedded queue, ClickHouse or the embedded sink.

use std::time::Duration;

use crate::config::Config;
use crate::journal::Journal;
use crate::queue::{Queue, QueueError, RedisQueue, SqliteQueue};
use crate::sink::{ClickHouseSink, Sink, SinkError, SqliteSink};
use crate::Buffer;

/// A backend that could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The queue.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// The ClickHouse sink.
    #[error("cannot use ClickHouse at {url}: {error}")]
    ClickHouse {
        /// The sink's URL.
        url: String,
        /// Why.
        error: SinkError,
    },
    /// The embedded sink.
    #[error("cannot use the embedded sink in {dir}: {error}")]
    Embedded {
        /// The data directory.
        dir: String,
        /// Why.
        error: SinkError,
    },
}

/// Opens the queue and the sink.
///
/// # Errors
/// [`BackendError`] naming the backend that cannot be used.
pub async fn open(config: &Config) -> Result<(Queue, Option<Sink>), BackendError> {
    let queue = open_queue(config).await?;
    let sink = open_sink(config, &queue).await?;
    Ok((queue, sink))
}

/// Opens the configured queue: Redis when a URL is set, else the embedded queue in the data
/// directory.
///
/// # Errors
/// [`BackendError::Queue`] when it cannot be reached or the data directory is in use.
pub async fn open_queue(config: &Config) -> Result<Queue, BackendError> {
    Ok(match &config.redis {
        Some(redis) => {
            let settings = config.queue_settings();
            let queue = if redis.cluster_nodes.is_empty() {
                RedisQueue::connect(&redis.url, &redis.key_prefix, settings).await?
            } else {
                RedisQueue::connect_cluster(&redis.cluster_nodes, &redis.key_prefix, settings)
                    .await?
            };
            let queue = match redis.shards {
                Some(shards) => queue.sharded(shards),
                None => queue,
            };
            let queue = queue.waiting_for_replicas(
                redis.wait_replicas,
                Duration::from_millis(redis.wait_timeout_ms),
            );
            queue.check_layout().await?;
            Queue::Redis(queue)
        }
        None => Queue::Embedded(SqliteQueue::open(
            &config.data_dir,
            config.queue_settings(),
        )?),
    })
}

/// Opens the configured sink: ClickHouse when a URL is set, else the embedded sink next to an
/// embedded queue. A Redis queue without ClickHouse has no sink (an ingest-only node).
///
/// # Errors
/// [`BackendError::ClickHouse`] or [`BackendError::Embedded`] when it cannot be used.
pub async fn open_sink(config: &Config, queue: &Queue) -> Result<Option<Sink>, BackendError> {
    if let Some(settings) = config.clickhouse_settings() {
        let url = settings.url.clone();
        let sink = ClickHouseSink::connect(settings)
            .await
            .map_err(|error| BackendError::ClickHouse { url, error })?;
        return Ok(Some(Sink::ClickHouse(sink)));
    }
    match queue {
        Queue::Embedded(queue) => {
            let sink = SqliteSink::open(queue).map_err(|error| BackendError::Embedded {
                dir: config.data_dir.display().to_string(),
                error,
            })?;
            Ok(Some(Sink::Embedded(sink)))
        }
        Queue::Redis(_) => Ok(None),
    }
}

/// Starts the batcher for `queue`; a Redis queue gets the outage journal in the data directory
/// unless it is disabled.
///
/// # Errors
/// [`BackendError::Queue`] when the journal cannot be opened (another process uses it).
pub fn start_buffer(
    config: &Config,
    queue: Queue,
) -> Result<(Buffer, tokio::task::JoinHandle<()>), BackendError> {
    let (batch, held) = (config.batch_settings(), config.queue_settings());
    match &queue {
        Queue::Redis(_) if config.journal.enabled => {
            let journal = Journal::open(&config.data_dir, config.journal.max_events)?;
            Ok(Buffer::start_journaled(queue, batch, held, journal))
        }
        _ => Ok(Buffer::start(queue, batch, held)),
    }
}

/// A one-line description of the backends, for readiness and the status page.
#[must_use]
pub fn describe(queue: &Queue, sink: Option<&Sink>) -> String {
    let queue = match queue {
        Queue::Redis(redis) => redis.describe(),
        Queue::Embedded(_) => "embedded".to_owned(),
    };
    let sink = match sink {
        Some(Sink::ClickHouse(_)) => "clickhouse",
        Some(Sink::Embedded(_)) => "embedded",
        None => "none",
    };
    format!("{queue}+{sink}")
}
