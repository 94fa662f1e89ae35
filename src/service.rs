//! `spillway serve`: the HTTP service around the buffer.
//!
//! One process runs the router (ingest, query, live feed, operations), the batcher, and unless
//! disabled a flusher loop. [`Service::run`] takes the listener and the shutdown future, so tests bind
//! port 0. Shutdown is a sequence: stop accepting and let requests finish (live feeds end), drop
//! the last buffer handle so the batcher writes what it holds, let the flush in progress finish,
//! all within the configured timeout.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify, Semaphore};

use crate::backend::{self, BackendError};
use crate::config::{Config, ConfigError};
use crate::flusher::{FlushOutcome, Flusher};
use crate::ingest::{self, BodyFormat, IngestError, Limits};
use crate::queue::Queue;
use crate::sink::Sink;
use crate::status::{self, StatusBoard};
use crate::{metrics, time, Buffer, Timestamp};

/// Errors that stop the service.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A backend could not be opened.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The listener failed.
    #[error("HTTP server failed: {0}")]
    Io(std::io::Error),
}

impl From<std::io::Error> for ServiceError {
    fn from(error: std::io::Error) -> Self {
        ServiceError::Io(error)
    }
}

/// The routes, as the OpenAPI document lists them (kept equal by a test).
pub const ROUTES: &[(&str, &str)] = &[
    ("post", "/v1/events"),
    ("get", "/v1/buffer"),
    ("get", "/v1/projects/{project}/live-visitors"),
    ("get", "/v1/projects/{project}/batches"),
    (
        "get",
        "/v1/projects/{project}/profiles/{profile}/last-screen-view",
    ),
    ("get", "/v1/sessions/{session}/last-screen-view"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
    ("get", "/"),
    ("get", "/v1/status"),
];

/// The OpenAPI description of [`ROUTES`].
pub const OPENAPI: &str = include_str!("openapi.json");

#[derive(Clone)]
struct AppState {
    buffer: Buffer,
    queue: Queue,
    sink: Option<Sink>,
    config: Arc<Config>,
    /// One permit per event that may be pending in memory; ingest answers 503 without one.
    pending: Arc<Semaphore>,
    metrics: PrometheusHandle,
    /// Wakes the flusher when a full batch may be queued.
    flush_wakeup: Arc<Notify>,
    accepted_since_wakeup: Arc<AtomicUsize>,
    /// Turns true when shutdown starts, ending live feeds.
    closing: watch::Receiver<bool>,
    started: Instant,
    /// What the status page shows.
    board: Arc<StatusBoard>,
}

/// The service with its backends open and its batcher running, ready to serve.
pub struct Service {
    config: Config,
    queue: Queue,
    sink: Option<Sink>,
    buffer: Buffer,
    batcher: tokio::task::JoinHandle<()>,
}

impl Service {
    /// Checks the configuration, opens the backends (and the outage journal) and starts the
    /// batcher, so that a listener is only announced for a service that can work.
    ///
    /// # Errors
    /// [`ServiceError`] when the configuration or a backend is unusable.
    pub async fn open(config: Config) -> Result<Service, ServiceError> {
        config.validate()?;
        let (queue, sink) = backend::open(&config).await?;
        if config.flush.enabled && sink.is_none() {
            return Err(ConfigError::Invalid {
                setting: "clickhouse.url",
                problem: "a Redis queue needs a ClickHouse sink to flush into (or --no-flush)"
                    .to_owned(),
            }
            .into());
        }
        let (buffer, batcher) = backend::start_buffer(&config, queue.clone())?;
        Ok(Service {
            config,
            queue,
            sink,
            buffer,
            batcher,
        })
    }

    /// Serves on `listener` until `shutdown` resolves, then shuts down in order.
    ///
    /// # Errors
    /// [`ServiceError::Io`] when the listener fails.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServiceError> {
        let Service {
            config,
            queue,
            sink,
            buffer,
            batcher,
        } = self;
        let metrics_handle = metrics::install();
        let (closing_tx, closing) = watch::channel(false);
        let flush_wakeup = Arc::new(Notify::new());
        let board = Arc::new(StatusBoard::default());

        let mut tasks = Vec::new();
        if config.flush.enabled {
            if let Some(sink) = &sink {
                let flush_loop =
                    FlushLoop::new(&config, queue.clone(), sink.clone(), board.clone());
                tasks.push(tokio::spawn(
                    flush_loop.run(flush_wakeup.clone(), closing.clone()),
                ));
            }
        }
        tasks.push(tokio::spawn(sample_loop(queue.clone(), closing.clone())));

        let shutdown_timeout = Duration::from_millis(config.shutdown_timeout_ms);
        let state = AppState {
            buffer,
            queue,
            sink,
            pending: Arc::new(Semaphore::new(config.http.max_pending_events)),
            config: Arc::new(config),
            metrics: metrics_handle,
            flush_wakeup,
            accepted_since_wakeup: Arc::new(AtomicUsize::new(0)),
            closing,
            started: Instant::now(),
            board,
        };
        let app = router(state);
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                shutdown.await;
                tracing::info!("shutting down: no new requests");
                let _ = closing_tx.send(true);
            })
            .await?;

        // Every request has finished and the router (with its buffer handles) is dropped: the
        // batcher now writes what it holds and stops; the flusher finishes its current flush.
        let drained = tokio::time::timeout(shutdown_timeout, async {
            let _ = batcher.await;
            for task in tasks {
                let _ = task.await;
            }
        })
        .await;
        match drained {
            Ok(()) => tracing::info!("shutdown complete"),
            Err(_) => tracing::error!(
                timeout_ms = shutdown_timeout.as_millis() as u64,
                "shutdown timed out; events not yet written stay unacknowledged"
            ),
        }
        Ok(())
    }
}

/// `spillway flush`: a flush-only worker, until `shutdown` resolves (the flush in progress
/// finishes first).
///
/// # Errors
/// [`ServiceError`] when the configuration or a backend is unusable.
pub async fn run_flusher(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServiceError> {
    config.validate()?;
    let (queue, sink) = backend::open(&config).await?;
    let Some(sink) = sink else {
        return Err(ConfigError::Invalid {
            setting: "clickhouse.url",
            problem: "a flush worker needs a sink".to_owned(),
        }
        .into());
    };
    let (closing_tx, closing) = watch::channel(false);
    let worker = tokio::spawn(
        FlushLoop::new(&config, queue, sink, Arc::default()).run(Arc::new(Notify::new()), closing),
    );
    shutdown.await;
    let _ = closing_tx.send(true);
    let timeout = Duration::from_millis(config.shutdown_timeout_ms);
    if tokio::time::timeout(timeout, worker).await.is_err() {
        tracing::error!("flush worker did not stop within the shutdown timeout");
    }
    Ok(())
}

fn router(state: AppState) -> Router {
    let body_limit = state.config.http.max_body_bytes;
    Router::new()
        .route("/v1/events", post(ingest_events))
        .route("/v1/buffer", get(buffer_stats))
        .route("/v1/projects/{project}/live-visitors", get(live_visitors))
        .route("/v1/projects/{project}/batches", get(batch_feed))
        .route(
            "/v1/projects/{project}/profiles/{profile}/last-screen-view",
            get(last_view_by_profile),
        )
        .route(
            "/v1/sessions/{session}/last-screen-view",
            get(last_view_by_session),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readiness))
        .route("/metrics", get(render_metrics))
        .route("/openapi.json", get(openapi))
        .route("/", get(|| async { Html(status::PAGE) }))
        .route("/v1/status", get(status_snapshot))
        .fallback(|| async { ApiError::NotFound("no such route".to_owned()) })
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

/// An HTTP error answer: a status and `{"error": message}`.
#[derive(Debug)]
enum ApiError {
    BadRequest(String),
    Unauthorized(String),
    NotFound(String),
    PayloadTooLarge(String),
    UnsupportedMediaType(String),
    Unavailable(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, message) = match self {
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, m),
            ApiError::Unauthorized(m) => (StatusCode::UNAUTHORIZED, m),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, m),
            ApiError::PayloadTooLarge(m) => (StatusCode::PAYLOAD_TOO_LARGE, m),
            ApiError::UnsupportedMediaType(m) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, m),
            ApiError::Unavailable(m) => (StatusCode::SERVICE_UNAVAILABLE, m),
        };
        let mut response = (status, Json(json!({ "error": message }))).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

impl From<IngestError> for ApiError {
    fn from(err: IngestError) -> Self {
        match err {
            IngestError::TooLarge { .. } | IngestError::TooManyEvents { .. } => {
                ApiError::PayloadTooLarge(err.to_string())
            }
            _ => ApiError::BadRequest(err.to_string()),
        }
    }
}

async fn ingest_events(State(app): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let response = match accept_events(&app, &headers, &body).await {
        Ok(response) => response,
        Err(err) => err.into_response(),
    };
    metrics::ingest_request(response.status().as_u16());
    response
}

async fn accept_events(
    app: &AppState,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ApiError> {
    let header_text = |name| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    let format =
        BodyFormat::from_content_type(header_text(header::CONTENT_TYPE)).ok_or_else(|| {
            ApiError::UnsupportedMediaType(
                "Content-Type must be application/json or application/x-ndjson".to_owned(),
            )
        })?;
    let limits = Limits {
        max_body_bytes: app.config.http.max_body_bytes,
        max_events: app.config.http.max_events_per_request,
    };
    let decoded;
    let body = match header_text(header::CONTENT_ENCODING) {
        None | Some("identity") => body,
        Some("gzip") => {
            decoded = ingest::gunzip(body, limits.max_body_bytes).inspect_err(|e| {
                metrics::events_rejected(e.code(), 1);
            })?;
            &decoded
        }
        Some(other) => {
            return Err(ApiError::UnsupportedMediaType(format!(
                "Content-Encoding {other} is not supported; use gzip or none"
            )))
        }
    };
    let parsed = ingest::parse_body(body, format, limits, time::now()).inspect_err(|e| {
        metrics::events_rejected(e.code(), 1);
    })?;
    metrics::events_received(parsed.events.len() + parsed.rejected.len());
    for rejection in &parsed.rejected {
        metrics::events_rejected(rejection.code, 1);
    }
    authorize(app, headers, &parsed.events)?;
    app.board.saw(&parsed.events);

    let count = parsed.events.len();
    let permits = u32::try_from(count).unwrap_or(u32::MAX);
    let Ok(permit) = app.pending.clone().try_acquire_many_owned(permits) else {
        metrics::events_rejected("buffer_full", count);
        return Err(ApiError::Unavailable(
            "buffer full: events cannot be written as fast as they arrive; retry later".to_owned(),
        ));
    };
    let receipt = app
        .buffer
        .bulk_add(parsed.events)
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    // The permits stay taken until the events are written, even when the request gives up
    // first: they bound what this process holds in memory, not what it is waiting on.
    let timeout = Duration::from_millis(app.config.http.request_timeout_ms);
    let mut written = Box::pin(receipt.written());
    match tokio::time::timeout(timeout, &mut written).await {
        Ok(result) => {
            drop(permit);
            result.map_err(|err| ApiError::Unavailable(err.to_string()))?;
        }
        Err(_) => {
            tokio::spawn(async move {
                let _ = written.await;
                drop(permit);
            });
            return Err(ApiError::Unavailable(
                "events not yet durable within the request timeout (queue unreachable?); \
                 they may still be written"
                    .to_owned(),
            ));
        }
    }
    metrics::events_accepted(count);
    app.board.accepted(count);
    let since = app
        .accepted_since_wakeup
        .fetch_add(count, Ordering::Relaxed)
        + count;
    if since >= app.config.flush.batch_size {
        app.accepted_since_wakeup.store(0, Ordering::Relaxed);
        app.flush_wakeup.notify_one();
    }
    let answer = json!({ "accepted": count, "rejected": parsed.rejected });
    Ok((StatusCode::ACCEPTED, Json(answer)).into_response())
}

/// With write keys configured, every event's project must have one, and the request must carry
/// it (`Authorization: Bearer <key>` or `X-Spillway-Key`). Keys are never logged.
fn authorize(app: &AppState, headers: &HeaderMap, events: &[crate::Event]) -> Result<(), ApiError> {
    let keys = &app.config.write_keys;
    if keys.is_empty() {
        return Ok(());
    }
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| headers.get("x-spillway-key").and_then(|v| v.to_str().ok()));
    for event in events {
        let project = event.project_id();
        if presented.is_none() || keys.get(project).map(String::as_str) != presented {
            metrics::events_rejected("unauthorized", events.len());
            return Err(ApiError::Unauthorized(format!(
                "missing or wrong write key for project {project}"
            )));
        }
    }
    Ok(())
}

fn unavailable(err: impl std::fmt::Display) -> ApiError {
    ApiError::Unavailable(format!("queue unavailable: {err}"))
}

async fn buffer_stats(State(app): State<AppState>) -> Result<Response, ApiError> {
    Ok(Json(buffer_json(&app.queue).await.map_err(unavailable)?).into_response())
}

/// The queue's sizes and the age of its oldest event, as `GET /v1/buffer` shows them.
async fn buffer_json(queue: &Queue) -> Result<serde_json::Value, crate::QueueError> {
    let stats = queue.stats().await?;
    let held = queue.held_count().await?;
    let oldest = queue.oldest_queued_at().await?;
    Ok(json!({
        "queued": stats.queued,
        "in_flight": stats.in_flight,
        "dead_letter": stats.dead_letter,
        "held_screen_views": held,
        "oldest_queued_age_ms": oldest.map(status::age_ms),
    }))
}

/// Everything the status page shows, in one read.
async fn status_snapshot(State(app): State<AppState>) -> Response {
    let (ready, dependencies) = dependencies(&app).await;
    let buffer = buffer_json(&app.queue).await.ok();
    let mut visitors = Vec::new();
    for project in app.board.projects() {
        if let Ok(count) = app.queue.active_visitor_count(&project, time::now()).await {
            visitors.push(json!({ "project": project, "count": count }));
        }
    }
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": app.started.elapsed().as_secs(),
        "backend": backend::describe(&app.queue, app.sink.as_ref()),
        "ready": ready,
        "dependencies": dependencies,
        "buffer": buffer,
        "totals": app.board.totals(),
        "last_flush": app.board.last_flush(),
        "flushing": app.config.flush.enabled && app.sink.is_some(),
        "visitors": visitors,
    }))
    .into_response()
}

async fn live_visitors(
    State(app): State<AppState>,
    Path(project): Path<String>,
) -> Result<Response, ApiError> {
    let count = app
        .queue
        .active_visitor_count(&project, time::now())
        .await
        .map_err(unavailable)?;
    Ok(Json(json!({ "count": count })).into_response())
}

fn held_view(view: Option<String>, what: String) -> Result<Response, ApiError> {
    match view {
        Some(json) => Ok(([(header::CONTENT_TYPE, "application/json")], json).into_response()),
        None => Err(ApiError::NotFound(format!(
            "no screen view held for {what}"
        ))),
    }
}

async fn last_view_by_session(
    State(app): State<AppState>,
    Path(session): Path<String>,
) -> Result<Response, ApiError> {
    let view = app
        .queue
        .last_screen_view_by_session(&session)
        .await
        .map_err(unavailable)?;
    held_view(view, format!("session {session}"))
}

async fn last_view_by_profile(
    State(app): State<AppState>,
    Path((project, profile)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let view = app
        .queue
        .last_screen_view_by_profile(&project, &profile)
        .await
        .map_err(unavailable)?;
    held_view(view, format!("profile {profile} of project {project}"))
}

/// Server-Sent Events: one `batch` event per flush that landed rows of this project.
async fn batch_feed(
    State(app): State<AppState>,
    Path(project): Path<String>,
) -> Result<Response, ApiError> {
    let feed = app.queue.subscribe().await.map_err(unavailable)?;
    let mut closing = app.closing.clone();
    let ended = async move {
        let _ = closing.wait_for(|closing| *closing).await;
    };
    let events = feed
        .filter_map(move |payload| {
            let wanted = serde_json::from_str::<serde_json::Value>(&payload)
                .is_ok_and(|v| v["projectId"] == project.as_str());
            async move {
                wanted.then(|| {
                    Ok::<_, std::convert::Infallible>(
                        SseEvent::default().event("batch").data(payload),
                    )
                })
            }
        })
        .take_until(ended);
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}

async fn readiness(State(app): State<AppState>) -> Response {
    let (ready, dependencies) = dependencies(&app).await;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "ready": ready,
        "queue": dependencies["queue"],
        "sink": dependencies["sink"],
        "backend": backend::describe(&app.queue, app.sink.as_ref()),
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": app.started.elapsed().as_secs(),
    });
    (status, Json(body)).into_response()
}

/// Whether the queue and the sink answer within 2 s, and what each said.
async fn dependencies(app: &AppState) -> (bool, serde_json::Value) {
    let check = Duration::from_secs(2);
    let queue = match tokio::time::timeout(check, app.queue.size()).await {
        Ok(Ok(_)) => "ok".to_owned(),
        Ok(Err(e)) => e.to_string(),
        Err(_) => "timed out".to_owned(),
    };
    let sink = match &app.sink {
        None => "not configured (ingest-only)".to_owned(),
        Some(sink) => match tokio::time::timeout(check, sink.check()).await {
            Ok(Ok(())) => "ok".to_owned(),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "timed out".to_owned(),
        },
    };
    let ready = queue == "ok" && (sink == "ok" || app.sink.is_none());
    (ready, json!({ "queue": queue, "sink": sink }))
}

async fn render_metrics(State(app): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
        .into_response()
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// The background flusher of `serve` and `spillway flush`: releases held views whose session
/// went quiet, then flushes while batches are full; otherwise waits for the interval or a
/// wake-up. Stops between flushes once shutdown starts, so the flush in progress always
/// finishes.
struct FlushLoop {
    flusher: Flusher,
    queue: Queue,
    interval: Duration,
    /// A held view whose session sent nothing for this long is released unchanged.
    idle_release: Duration,
    /// Where the last flush is shown.
    board: Arc<StatusBoard>,
}

/// Held views released per sweep; the rest wait for the next round.
const SWEEP_MAX: usize = 1000;

impl FlushLoop {
    fn new(config: &Config, queue: Queue, sink: Sink, board: Arc<StatusBoard>) -> FlushLoop {
        FlushLoop {
            board,
            flusher: Flusher::new(queue.clone(), sink, config.flush_settings()),
            queue,
            interval: Duration::from_millis(config.flush.interval_ms),
            idle_release: Duration::from_secs(config.held.idle_release_secs),
        }
    }

    /// Releases the held views of sessions quiet for longer than `idle_release`.
    async fn sweep(&self) {
        let idle = i64::try_from(self.idle_release.as_millis()).unwrap_or(i64::MAX);
        let cutoff = Timestamp::from_millis(time::now().as_millis().saturating_sub(idle));
        match self.queue.sweep_idle(cutoff, SWEEP_MAX).await {
            Ok(0) => {}
            Ok(released) => {
                metrics::held_views_released_idle(released);
                tracing::info!(released, "released held screen views of quiet sessions");
            }
            Err(err) => tracing::warn!(error = %err, "sweeping quiet sessions failed"),
        }
    }

    async fn run(self, wakeup: Arc<Notify>, mut closing: watch::Receiver<bool>) {
        let (flusher, interval) = (&self.flusher, self.interval);
        let mut failures = 0u32;
        loop {
            if *closing.borrow() {
                return;
            }
            self.sweep().await;
            let started = Instant::now();
            let outcome = flusher.flush_once().await;
            self.board.flushed(&outcome, started.elapsed());
            let pause = match outcome {
                Ok(FlushOutcome::Flushed(report)) => {
                    failures = 0;
                    tracing::debug!(rows = report.rows, batch = %report.batch_id, "flushed");
                    if report.full {
                        continue;
                    }
                    interval
                }
                Ok(FlushOutcome::Empty | FlushOutcome::Busy) => {
                    failures = 0;
                    interval
                }
                Err(err) => {
                    failures = failures.saturating_add(1);
                    let pause = backoff(interval, failures);
                    tracing::warn!(
                        error = %err,
                        failures,
                        retry_in_ms = pause.as_millis() as u64,
                        "flush failed; the batch stays in flight and is retried"
                    );
                    pause
                }
            };
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = wakeup.notified(), if failures == 0 => {}
                _ = closing.changed() => return,
            }
        }
    }
}

/// Exponential backoff from `base`, capped at 30 s, with ±20% jitter so that flushers that
/// failed together do not retry together.
fn backoff(base: Duration, failures: u32) -> Duration {
    let exponential = base
        .saturating_mul(1 << failures.min(10))
        .min(Duration::from_secs(30));
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let jitter = 0.8 + 0.4 * f64::from(nanos % 1000) / 1000.0;
    exponential.mul_f64(jitter)
}

/// Samples the queue's sizes into gauges every 5 s, and reconciles the queue counter with the
/// queue's length every minute.
async fn sample_loop(queue: Queue, mut closing: watch::Receiver<bool>) {
    for round in 0u64.. {
        match queue.stats().await {
            Ok(stats) => metrics::queue_sampled(&stats),
            Err(err) => tracing::debug!(error = %err, "queue stats unavailable"),
        }
        if let Ok(held) = queue.held_count().await {
            metrics::held_sampled(held);
        }
        if round % 12 == 0 {
            match queue.reconcile().await {
                Ok(0) => metrics::counter_drift(0),
                Ok(drift) => {
                    metrics::counter_drift(drift);
                    tracing::warn!(
                        drift,
                        "queue counter drifted from the queue's length; reset"
                    );
                }
                Err(err) => tracing::debug!(error = %err, "counter reconcile failed"),
            }
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = closing.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_then_caps_with_jitter() {
        let base = Duration::from_secs(1);
        let first = backoff(base, 1);
        assert!(first >= Duration::from_millis(1600) && first <= Duration::from_millis(2400));
        let late = backoff(base, 20);
        assert!(
            late >= Duration::from_secs(24) && late <= Duration::from_secs(36),
            "{late:?}"
        );
    }
}
