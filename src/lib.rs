//! spillway: a durable event buffer between analytics ingest and ClickHouse.
//!
//! An event travels through these modules, in this order:
//!
//! - [`event`]: parses and validates one JSON event, keeping its text as sent.
//! - [`batcher`]: gathers events into micro-batches and writes each in one atomic call.
//! - [`queue`]: the durable queue (Redis in OpenPanel's key layout, or one SQLite file): held
//!   screen views, live visitors, the flush lock, in-flight batches and the dead-letter list.
//! - [`flusher`]: claims batches, sorts them by `created_at`, inserts them chunk by chunk.
//! - [`sink`]: ClickHouse over HTTP, rows shaped to the target table's columns, or a table in
//!   the embedded queue's SQLite file.
//!
//! [`config`] holds each stage's settings with the reference design's defaults, and [`time`]
//! the timestamp type. `ARCHITECTURE.md` states the invariants.

pub mod backend;
pub mod batcher;
pub mod config;
pub mod event;
pub mod flusher;
pub mod ingest;
pub mod journal;
pub mod metrics;
pub mod queue;
pub mod service;
pub mod sink;
mod status;
pub mod time;
pub mod workload;

pub use batcher::{Buffer, BufferError, Receipt};
pub use config::{BatchSettings, ClickHouseSettings, FlushSettings, QueueSettings};
pub use event::{Event, EventError, EventKind};
pub use flusher::{DrainReport, FlushError, FlushOutcome, FlushReport, Flusher};
pub use queue::{BatchFeed, Queue, QueueError, QueueStats, RedisQueue, SqliteQueue};
pub use sink::{ClickHouseSink, SchemaVariant, Sink, SinkError, SqliteSink};
pub use time::Timestamp;
