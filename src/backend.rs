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
    #[error("cannot use ClickHouse at {url}: {source}")]
    Sink {
        /// The sink's URL.
        url: String,
        /// Why.
        source: SinkError,
    },
}

/// Opens the queue and, when flushing is possible from this process, the sink.
///
/// # Errors
/// [`BackendError`] naming the backend that cannot be used.
pub async fn open(config: &Config) -> Result<(Queue, Option<Sink>), BackendError> {
    let queue = match &config.redis {
        Some(redis) => Queue::Redis(
            RedisQueue::connect(&redis.url, &redis.key_prefix, config.held_settings()).await?,
        ),
        None => {
            return Err(BackendError::Queue(QueueError::Corrupt(
                "the embedded queue is not built yet: set REDIS_URL (and CLICKHOUSE_URL)"
                    .to_owned(),
            )))
        }
    };
    let sink = match config.clickhouse_settings() {
        Some(settings) => {
            let url = settings.url.clone();
            Some(Sink::ClickHouse(
                ClickHouseSink::connect(settings)
                    .await
                    .map_err(|source| BackendError::Sink { url, source })?,
            ))
        }
        None => None,
    };
    Ok((queue, sink))
}

/// A one-line description of the backends, for readiness and the status page.
#[must_use]
pub fn describe(queue: &Queue, sink: Option<&Sink>) -> String {
    let queue = match queue {
        Queue::Redis(_) => "redis",
    };
    let sink = match sink {
        Some(Sink::ClickHouse(_)) => "clickhouse",
        None => "none",
    };
    format!("{queue}+{sink}")
}
