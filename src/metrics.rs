//! Instrumentation: every metric spillway emits is named here, once.
//!
//! Names follow Prometheus conventions (`spillway_<what>_<unit>[_total]`) and labels have low
//! cardinality (reason codes, error kinds, status codes; never project ids or raw errors).
//! The library records through the `metrics` facade; `spillway serve` installs the Prometheus
//! recorder and renders it at `/metrics`. Without a recorder every call is a no-op.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::queue::QueueStats;

/// Installs the process-wide Prometheus recorder (once) and returns its handle.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Suffix("_seconds".to_owned()),
                    &[
                        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                        10.0, 30.0,
                    ],
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("spillway_batch_micro_batch_events".to_owned()),
                        &[1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0],
                    )
                });
            match builder.and_then(PrometheusBuilder::install_recorder) {
                Ok(handle) => handle,
                // Another recorder is installed (only possible in tests): render an empty one.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            }
        })
        .clone()
}

/// Events received by the HTTP ingest, valid or not.
pub(crate) fn events_received(n: usize) {
    counter!("spillway_ingest_events_received_total").increment(n as u64);
}

/// Events accepted and durably queued.
pub(crate) fn events_accepted(n: usize) {
    counter!("spillway_ingest_events_accepted_total").increment(n as u64);
}

/// Events or whole requests refused, by reason code.
pub(crate) fn events_rejected(reason: &'static str, n: usize) {
    counter!("spillway_ingest_events_rejected_total", "reason" => reason).increment(n as u64);
}

/// Events dropped at the queue because their `id` was taken in within the re-send window.
pub(crate) fn events_resent(n: usize) {
    counter!("spillway_queue_resent_events_dropped_total").increment(n as u64);
}

/// Ingest requests by response status.
pub(crate) fn ingest_request(status: u16) {
    counter!("spillway_ingest_requests_total", "status" => status.to_string()).increment(1);
}

/// One micro-batch written to the queue.
pub(crate) fn micro_batch_written(events: usize, took: Duration) {
    histogram!("spillway_batch_micro_batch_events").record(events as f64);
    histogram!("spillway_queue_write_duration_seconds").record(took.as_secs_f64());
}

/// A queue write that failed and will be retried.
pub(crate) fn queue_write_retry() {
    counter!("spillway_queue_write_retries_total").increment(1);
}

/// Events the queue refused for good (reported to their callers, not queued).
pub(crate) fn queue_write_failed(events: usize) {
    counter!("spillway_queue_write_failed_events_total").increment(events as u64);
}

/// A flush found the lock held by another flusher.
pub(crate) fn flush_lock_wait() {
    counter!("spillway_flush_lock_waits_total").increment(1);
}

/// A batch flushed.
pub(crate) fn flush_done(rows: usize, chunks: usize, dead_lettered: usize, took: Duration) {
    counter!("spillway_flush_batches_total").increment(1);
    counter!("spillway_flush_rows_total").increment(rows as u64);
    counter!("spillway_flush_chunks_total").increment(chunks as u64);
    counter!("spillway_dead_letter_events_total").increment(dead_lettered as u64);
    histogram!("spillway_flush_duration_seconds").record(took.as_secs_f64());
}

/// A flush that failed; the batch stays in flight and is retried.
pub(crate) fn flush_retry() {
    counter!("spillway_flush_retries_total").increment(1);
}

/// One insert request to the sink.
pub(crate) fn sink_request(took: Duration) {
    histogram!("spillway_sink_request_duration_seconds").record(took.as_secs_f64());
}

/// A sink error, by kind (`transport`, `server`, `rejected`, `setup`, ...).
pub(crate) fn sink_error(kind: &'static str) {
    counter!("spillway_sink_errors_total", "kind" => kind).increment(1);
}

/// The queue's sizes, sampled.
pub(crate) fn queue_sampled(stats: &QueueStats) {
    gauge!("spillway_queue_depth_events").set(stats.queued as f64);
    gauge!("spillway_queue_in_flight_events").set(stats.in_flight as f64);
    gauge!("spillway_dead_letter_depth_events").set(stats.dead_letter as f64);
}

/// Held screen views, sampled.
pub(crate) fn held_sampled(count: u64) {
    gauge!("spillway_held_screen_views").set(count as f64);
}

/// A micro-batch journaled because the queue could not take it.
pub(crate) fn journaled(events: usize, held: u64) {
    counter!("spillway_journal_events_written_total").increment(events as u64);
    gauge!("spillway_journal_events").set(held as f64);
}

/// A journaled micro-batch written to the queue.
pub(crate) fn journal_replayed(events: usize, held: u64) {
    counter!("spillway_journal_events_replayed_total").increment(events as u64);
    gauge!("spillway_journal_events").set(held as f64);
}

/// Held views released unchanged because their session went quiet.
pub(crate) fn held_views_released_idle(count: usize) {
    counter!("spillway_held_views_released_idle_total").increment(count as u64);
}

/// Drift between the queue counter and the queue's length found (and corrected) by the last
/// reconcile; every correction is also counted.
pub(crate) fn counter_drift(drift: i64) {
    gauge!("spillway_queue_counter_drift_events").set(drift as f64);
    if drift != 0 {
        counter!("spillway_queue_counter_corrections_total").increment(1);
    }
}
