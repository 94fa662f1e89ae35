//! Opening the configured backends: Redis or the embedded queue, ClickHouse or the embedded sink.

use crate::config::Config;
use crate::queue::{Queue, QueueError, RedisQueue};
use crate::sink::{ClickHouseSink, Sink, SinkError};

/// A backend that could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The queue.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// The sink.
    #[error("cannot use ClickHouse at {url}: {error}")]
    Sink {
        /// The sink's URL.
        url: String,
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
    let sink = open_sink(config).await?;
    Ok((queue, sink))
}

/// Opens the configured queue: Redis when a URL is set.
///
/// # Errors
/// [`BackendError::Queue`] when it cannot be reached.
pub async fn open_queue(config: &Config) -> Result<Queue, BackendError> {
    match &config.redis {
        Some(redis) => Ok(Queue::Redis(
            RedisQueue::connect(&redis.url, &redis.key_prefix, config.held_settings()).await?,
        )),
        None => Err(BackendError::Queue(QueueError::Corrupt(
            "the embedded queue is not built yet: set REDIS_URL (and CLICKHOUSE_URL)".to_owned(),
        ))),
    }
}

/// Opens the configured sink, if any: ClickHouse when a URL is set.
///
/// # Errors
/// [`BackendError::Sink`] when it cannot be used.
pub async fn open_sink(config: &Config) -> Result<Option<Sink>, BackendError> {
    let Some(settings) = config.clickhouse_settings() else {
        return Ok(None);
    };
    let url = settings.url.clone();
    let sink = ClickHouseSink::connect(settings)
        .await
        .map_err(|error| BackendError::Sink { url, error })?;
    Ok(Some(Sink::ClickHouse(sink)))
}

/// A one-line description of the backends, for readiness and the status page.
#[must_use]
pub fn describe(queue: &Queue, sink: Option<&Sink>) -> String {
    let queue = match queue {
        Queue::Redis(_) => "redis",
        Queue::Embedded(_) => "embedded",
    };
    let sink = match sink {
        Some(Sink::ClickHouse(_)) => "clickhouse",
        Some(Sink::Embedded(_)) => "embedded",
        None => "none",
    };
    format!("{queue}+{sink}")
}
