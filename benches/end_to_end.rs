//! End-to-end benchmark: spillway on the real local Redis and ClickHouse, each stage next to
//! its baseline measured in the same run (the machine is shared and noisy, so only ratios
//! taken minutes apart mean anything).
//!
//! Stages, in the order they run (each run does all of them; `SPILLWAY_BENCH_RUNS`, default 2):
//!
//! | stage | what is timed | baseline |
//! |---|---|---|
//! | Redis ceiling | `redis-benchmark -P 100` RPUSH of the average event size (50 connections) | — |
//! | seed pattern | the reference's MULTI per micro-batch of 100 (RPUSH+INCR per event, one EVALSHA per screen view / session end, heartbeat ZADD+SET), driven from Rust | — |
//! | add → Redis | `Buffer::add` of every event until every receipt resolved | both above |
//! | drain → ClickHouse | `Flusher::drain` of that queue into an 18.16 legacy table | ClickHouse ceiling |
//! | ClickHouse ceiling | `clickhouse-client` inserting the same rows (selected back) in 1000-row blocks | — |
//! | HTTP → Redis | `spillway serve --no-flush`, NDJSON POSTs of 1000 events from concurrent tasks; then the same count paced at half that rate | — |
//! | end to end | `spillway serve` flushing every 200 ms, a fixed rate for a few seconds; accepted → visible in ClickHouse | — |
//!
//! Figures per stage: events/s; Redis requests per event (commands clients send: script
//! calls, MULTI/EXEC and the commands queued in them) and Redis commands per event (every
//! command executed, including those inside scripts), both from `INFO commandstats` deltas;
//! bytes into Redis per event (`total_net_input_bytes`); bytes sent to ClickHouse per event
//! (counted by a TCP forwarder in front of ClickHouse's HTTP port, headers included); CPU per
//! event of the process doing the work (`/proc/<pid>/stat`), of Redis (`INFO cpu`) and of
//! the stage's inserts in ClickHouse (`system.query_log`, query threads only); peak RSS
//! (`VmHWM`, reset before each stage). Redis counters are server-wide: anything else using the
//! same Redis adds to them (`scripts/bench.sh` gives the bench a Redis of its own), and the
//! report flags the commands a stage does not send.
//!
//! Environment: `SPILLWAY_BENCH_REDIS_URL`, `SPILLWAY_BENCH_CLICKHOUSE_URL` (both required,
//! loopback only; without them the bench prints "skipped" and exits 0, which is what CI's
//! `cargo bench --no-run` relies on never running), `SPILLWAY_BENCH_CLICKHOUSE_TCP_PORT`
//! (19000), `SPILLWAY_BENCH_EVENTS` (200000), `SPILLWAY_BENCH_RUNS` (2),
//! `SPILLWAY_BENCH_HTTP_CONCURRENCY` (4), `SPILLWAY_BENCH_E2E_RATE` (20000 events/s),
//! `SPILLWAY_BENCH_E2E_SECS` (10), `SPILLWAY_BENCH_BIN` (the release `spillway` next to this
//! bench's own directory), `SPILLWAY_BENCH_REPORT` (also write the Markdown report there).
//! `scripts/bench.sh` sets them and rewrites `BENCHMARKS.md`.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context};
use axum::body::Bytes;
use redis::aio::MultiplexedConnection;
use reqwest::Url;
use spillway::workload::{Workload, WorkloadSettings};
use spillway::{
    BatchSettings, Buffer, ClickHouseSettings, ClickHouseSink, Event, EventKind, FlushSettings,
    Flusher, Queue, QueueSettings, RedisQueue, SchemaVariant, Sink,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The reference's scripts, used only by the seed-pattern baseline.
const SEED_SCREEN_VIEW_LUA: &str = include_str!("seed_lua/add_screen_view.lua");
const SEED_SESSION_END_LUA: &str = include_str!("seed_lua/add_session_end.lua");

/// Events per micro-batch, spillway's default and the seed's.
const MICRO_BATCH: usize = 100;
/// Events per HTTP request in the ingest stage.
const REQUEST_EVENTS: usize = 1000;
/// Events per HTTP request in the end-to-end stage (one latency sample group each).
const E2E_REQUEST_EVENTS: usize = 500;
/// Rows per insert, spillway's default `chunk_size`.
const CHUNK_ROWS: usize = 1000;
/// Events per type in the requests-per-event-type measurement.
const PER_TYPE_EVENTS: usize = 5000;

/// Commands only a client sends (never from inside a script): what "requests" counts for
/// spillway's stages. The flusher's lock `SET NX` (one per 4000 events) and the service's
/// `LLEN` sampling (three every 5 s) are left out: they cannot be told apart from the same
/// commands run inside scripts.
const CLIENT_ONLY: &[&str] = &[
    "evalsha",
    "eval",
    "evalsha_ro",
    "eval_ro",
    "script|load",
    "multi",
    "exec",
    "publish",
    "ping",
    "hello",
    "select",
    "client|setinfo",
    "client|setname",
];

/// Commands each kind of stage sends, including from its scripts; anything else in a stage's
/// delta came from another client of the shared server.
const ENQUEUE_COMMANDS: &[&str] = &[
    "evalsha",
    "eval",
    "script|load",
    "set",
    "getdel",
    "del",
    "pttl",
    "zadd",
    "rpush",
    "exists",
    "incrby",
    "llen",
    "ping",
    "client|setinfo",
];
const SEED_COMMANDS: &[&str] = &[
    "multi",
    "exec",
    "evalsha",
    "script|load",
    "rpush",
    "incr",
    "getdel",
    "set",
    "del",
    "zadd",
    "ping",
    "client|setinfo",
];
const FLUSH_COMMANDS: &[&str] = &[
    "set",
    "get",
    "evalsha",
    "eval",
    "script|load",
    "lrange",
    "ltrim",
    "decrby",
    "hset",
    "hmget",
    "pexpire",
    "del",
    "exists",
    "llen",
    "rpush",
    "publish",
    "ping",
    "client|setinfo",
];
const CEILING_COMMANDS: &[&str] = &["rpush", "config|get", "ping"];

fn main() -> ExitCode {
    let settings = match Settings::from_env() {
        Ok(Some(settings)) => settings,
        Ok(None) => {
            println!(
                "end_to_end: skipped: set SPILLWAY_BENCH_REDIS_URL and \
                 SPILLWAY_BENCH_CLICKHOUSE_URL (scripts/bench.sh does) to run it against \
                 local servers"
            );
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            eprintln!("end_to_end: {err:#}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run(&settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("end_to_end failed: {err:#}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Settings

struct Settings {
    redis_url: String,
    redis_port: u16,
    clickhouse_url: String,
    clickhouse_addr: SocketAddr,
    clickhouse_tcp_port: u16,
    events: usize,
    runs: usize,
    http_concurrency: usize,
    e2e_rate: usize,
    e2e_secs: u64,
    spillway_bin: PathBuf,
    report: Option<PathBuf>,
}

impl Settings {
    /// `None` when the servers are not configured: the bench is skipped.
    fn from_env() -> anyhow::Result<Option<Settings>> {
        let (Ok(redis_url), Ok(clickhouse_url)) = (
            std::env::var("SPILLWAY_BENCH_REDIS_URL"),
            std::env::var("SPILLWAY_BENCH_CLICKHOUSE_URL"),
        ) else {
            return Ok(None);
        };
        let redis_port = loopback_port(&redis_url, 6379)?;
        let clickhouse_port = loopback_port(&clickhouse_url, 8123)?;
        let spillway_bin = match std::env::var_os("SPILLWAY_BENCH_BIN") {
            Some(path) => PathBuf::from(path),
            // target/release/deps/end_to_end-<hash> -> target/release/spillway
            None => std::env::current_exe()?
                .parent()
                .and_then(Path::parent)
                .map(|dir| dir.join("spillway"))
                .context("cannot locate target/release from the bench executable")?,
        };
        ensure!(
            spillway_bin.exists(),
            "{} not found: run `cargo build --release` first, or set SPILLWAY_BENCH_BIN",
            spillway_bin.display()
        );
        Ok(Some(Settings {
            redis_url,
            redis_port,
            clickhouse_url,
            clickhouse_addr: SocketAddr::from(([127, 0, 0, 1], clickhouse_port)),
            clickhouse_tcp_port: env_number("SPILLWAY_BENCH_CLICKHOUSE_TCP_PORT", 19000)?,
            events: env_number("SPILLWAY_BENCH_EVENTS", 200_000)?,
            runs: env_number("SPILLWAY_BENCH_RUNS", 2)?,
            http_concurrency: env_number("SPILLWAY_BENCH_HTTP_CONCURRENCY", 4)?,
            e2e_rate: env_number("SPILLWAY_BENCH_E2E_RATE", 20_000)?,
            e2e_secs: env_number("SPILLWAY_BENCH_E2E_SECS", 10)?,
            spillway_bin,
            report: std::env::var_os("SPILLWAY_BENCH_REPORT").map(PathBuf::from),
        }))
    }
}

fn env_number<T: std::str::FromStr + Copy + PartialOrd + Default>(
    name: &str,
    default: T,
) -> anyhow::Result<T> {
    match std::env::var(name) {
        Err(_) => Ok(default),
        Ok(text) => match text.trim().parse::<T>() {
            Ok(value) if value > T::default() => Ok(value),
            _ => bail!("{name}={text:?}: expected a positive number"),
        },
    }
}

/// The port of a URL whose host is this machine; the bench never sends traffic elsewhere.
fn loopback_port(url: &str, default: u16) -> anyhow::Result<u16> {
    let parsed = Url::parse(url).with_context(|| format!("invalid URL {url:?}"))?;
    match parsed.host_str() {
        Some("127.0.0.1" | "localhost") => Ok(parsed.port().unwrap_or(default)),
        other => bail!("{url}: the benchmark only targets 127.0.0.1, not {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Figures and probes

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    RedisCeiling,
    SeedPattern,
    Add,
    Drain,
    ClickHouseCeiling,
    HttpMax,
    HttpHalf,
    EndToEnd,
}

impl Stage {
    fn label(self) -> &'static str {
        match self {
            Stage::RedisCeiling => "Redis ceiling (redis-benchmark RPUSH -P 100, 50 connections)",
            Stage::SeedPattern => "seed pattern → Redis (MULTI per 100)",
            Stage::Add => "**add → Redis** (library `Buffer`)",
            Stage::Drain => "**drain Redis → ClickHouse** (`Flusher::drain`)",
            Stage::ClickHouseCeiling => "ClickHouse ceiling (clickhouse-client, 1000-row blocks)",
            Stage::HttpMax => "**HTTP POST → Redis**, max rate",
            Stage::HttpHalf => "**HTTP POST → Redis**, half of max rate",
            Stage::EndToEnd => "**end to end** (serve, flush every 200 ms)",
        }
    }
}

/// What one stage of one run measured.
#[derive(Debug, Clone, Default)]
struct Figures {
    events: u64,
    secs: f64,
    /// Commands clients sent, per the stage's own count or `CLIENT_ONLY`.
    redis_requests: Option<u64>,
    redis: Option<RedisDelta>,
    clickhouse_bytes: Option<u64>,
    clickhouse_cpu_secs: Option<f64>,
    cpu_secs: Option<f64>,
    cpu_of: &'static str,
    peak_rss: Option<u64>,
    /// p50, p95, p99 in milliseconds.
    latency: Option<[f64; 3]>,
    notes: Vec<String>,
}

impl Figures {
    fn rate(&self) -> f64 {
        self.events as f64 / self.secs.max(1e-9)
    }

    fn per_event(&self, total: f64) -> f64 {
        total / (self.events.max(1) as f64)
    }
}

#[derive(Debug, Clone, Default)]
struct RedisSnapshot {
    calls: BTreeMap<String, u64>,
    net_input_bytes: u64,
    cpu_secs: f64,
}

#[derive(Debug, Clone, Default)]
struct RedisDelta {
    calls: BTreeMap<String, u64>,
    net_input_bytes: u64,
    cpu_secs: f64,
}

impl RedisDelta {
    fn executed(&self) -> u64 {
        self.calls.values().sum()
    }

    fn client_only(&self) -> u64 {
        CLIENT_ONLY
            .iter()
            .filter_map(|name| self.calls.get(*name))
            .sum()
    }

    /// Commands in the delta that the stage does not send, as a note, when there are any.
    fn foreign(&self, expected: &[&str]) -> Option<String> {
        let other: Vec<String> = self
            .calls
            .iter()
            .filter(|(name, calls)| **calls > 0 && !expected.contains(&name.as_str()))
            .map(|(name, calls)| format!("{name}×{calls}"))
            .collect();
        (!other.is_empty())
            .then(|| format!("other Redis traffic during the stage: {}", other.join(", ")))
    }
}

/// ClickHouse's own account of a stage's inserts.
#[derive(Debug, Clone, Copy, Default)]
struct Inserts {
    count: u64,
    /// Sum of the inserts' durations.
    busy_secs: f64,
    /// User + system CPU of the query threads.
    cpu_secs: f64,
}

impl Inserts {
    fn note(self, stage_secs: f64) -> String {
        format!(
            "ClickHouse ran {} inserts for {:.2} s in all ({:.0}% of the stage), {:.2} s CPU \
             (system.query_log)",
            self.count,
            self.busy_secs,
            100.0 * self.busy_secs / stage_secs.max(1e-9),
            self.cpu_secs
        )
    }
}

/// The bench's connections to the servers, and the process-level probes.
struct Env {
    redis: MultiplexedConnection,
    http: reqwest::Client,
    clock_ticks: f64,
}

impl Env {
    async fn connect(settings: &Settings) -> anyhow::Result<Env> {
        let client = redis::Client::open(settings.redis_url.as_str())?;
        let redis = client
            .get_multiplexed_async_connection()
            .await
            .with_context(|| format!("Redis at {} does not answer", settings.redis_url))?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(0)
            .build()?;
        let clock_ticks = Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(100.0);
        Ok(Env {
            redis,
            http,
            clock_ticks,
        })
    }

    async fn redis_snapshot(&self) -> anyhow::Result<RedisSnapshot> {
        let mut conn = self.redis.clone();
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .arg("stats")
            .arg("cpu")
            .query_async(&mut conn)
            .await?;
        let mut snapshot = RedisSnapshot::default();
        for line in info.lines() {
            if let Some(rest) = line.strip_prefix("cmdstat_") {
                let Some((name, stats)) = rest.split_once(':') else {
                    continue;
                };
                let calls = stats
                    .split(',')
                    .find_map(|field| field.strip_prefix("calls="))
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                snapshot.calls.insert(name.to_owned(), calls);
            } else if let Some(n) = line.strip_prefix("total_net_input_bytes:") {
                snapshot.net_input_bytes = n.trim().parse().unwrap_or(0);
            } else if let Some(n) = line
                .strip_prefix("used_cpu_user:")
                .or_else(|| line.strip_prefix("used_cpu_sys:"))
            {
                snapshot.cpu_secs += n.trim().parse::<f64>().unwrap_or(0.0);
            }
        }
        Ok(snapshot)
    }

    async fn redis_delta(&self, before: &RedisSnapshot) -> anyhow::Result<RedisDelta> {
        let after = self.redis_snapshot().await?;
        let mut calls = BTreeMap::new();
        for (name, n) in &after.calls {
            // The probe's own INFO calls are not the stage's.
            if name == "info" {
                continue;
            }
            let delta = n.saturating_sub(before.calls.get(name).copied().unwrap_or(0));
            if delta > 0 {
                calls.insert(name.clone(), delta);
            }
        }
        Ok(RedisDelta {
            calls,
            net_input_bytes: after.net_input_bytes.saturating_sub(before.net_input_bytes),
            cpu_secs: (after.cpu_secs - before.cpu_secs).max(0.0),
        })
    }

    /// Runs one statement on ClickHouse over HTTP and returns the body.
    async fn clickhouse(&self, settings: &Settings, sql: &str) -> anyhow::Result<String> {
        let response = self
            .http
            .post(&settings.clickhouse_url)
            .body(sql.to_owned())
            .send()
            .await
            .with_context(|| format!("ClickHouse at {}", settings.clickhouse_url))?;
        let status = response.status();
        let body = response.text().await?;
        ensure!(status.is_success(), "{sql}\n-> {status}: {body}");
        Ok(body)
    }

    /// The finished inserts whose text starts with `prefix` (a LIKE pattern), from
    /// `system.query_log`: only this bench's queries, whatever else the server runs. The log
    /// entry of a query may land just after its client saw the end, so this waits (at most
    /// 3 s) until at least `expected` inserts are logged.
    async fn inserts(
        &self,
        settings: &Settings,
        prefix: &str,
        expected: u64,
    ) -> anyhow::Result<Inserts> {
        let mut inserts = Inserts::default();
        for _ in 0..15 {
            inserts = self.logged_inserts(settings, prefix).await?;
            if inserts.count >= expected {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(inserts)
    }

    async fn logged_inserts(&self, settings: &Settings, prefix: &str) -> anyhow::Result<Inserts> {
        self.clickhouse(settings, "SYSTEM FLUSH LOGS").await?;
        let body = self
            .clickhouse(
                settings,
                &format!(
                    "SELECT count(), sum(query_duration_ms), \
                     sum(ProfileEvents.Values[indexOf(ProfileEvents.Names, 'UserTimeMicroseconds')] \
                       + ProfileEvents.Values[indexOf(ProfileEvents.Names, 'SystemTimeMicroseconds')]) \
                     FROM system.query_log WHERE type = 2 AND query LIKE '{prefix}%' \
                     FORMAT TabSeparated"
                ),
            )
            .await?;
        let fields: Vec<f64> = body
            .split_whitespace()
            .map(|f| f.parse().unwrap_or(0.0))
            .collect();
        Ok(Inserts {
            count: fields.first().copied().unwrap_or(0.0) as u64,
            busy_secs: fields.get(1).copied().unwrap_or(0.0) / 1e3,
            cpu_secs: fields.get(2).copied().unwrap_or(0.0) / 1e6,
        })
    }

    /// User + system CPU seconds of a process (`None`: this one) or one of its threads.
    fn cpu_secs(&self, stat_path: &Path) -> Option<f64> {
        let stat = std::fs::read_to_string(stat_path).ok()?;
        // Fields after the command name, which is in parentheses and may hold spaces.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let ticks: f64 =
            fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
        Some(ticks / self.clock_ticks)
    }
}

fn proc_stat(pid: Option<u32>) -> PathBuf {
    match pid {
        Some(pid) => PathBuf::from(format!("/proc/{pid}/stat")),
        None => PathBuf::from("/proc/self/stat"),
    }
}

fn proc_dir(pid: Option<u32>) -> String {
    pid.map_or_else(|| "/proc/self".to_owned(), |pid| format!("/proc/{pid}"))
}

/// Resets a process's peak RSS (`VmHWM`) to its current RSS.
fn reset_peak_rss(pid: Option<u32>) {
    let _ = std::fs::write(format!("{}/clear_refs", proc_dir(pid)), "5");
}

/// `VmHWM` or `VmRSS` of a process, in bytes.
fn memory(pid: Option<u32>, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("{}/status", proc_dir(pid))).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn percentiles(mut samples: Vec<f64>) -> Option<[f64; 3]> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| {
        let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
        samples[rank - 1]
    };
    Some([at(0.50), at(0.95), at(0.99)])
}

/// Deletes every key under `prefix` (SCAN + UNLINK).
async fn delete_prefix(env: &Env, prefix: &str) -> anyhow::Result<()> {
    let mut conn = env.redis.clone();
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(5000)
            .query_async(&mut conn)
            .await?;
        if !keys.is_empty() {
            redis::cmd("UNLINK")
                .arg(&keys)
                .query_async::<()>(&mut conn)
                .await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

// ---------------------------------------------------------------------------------------------
// The workload

/// `n` workload events, parsed as the service would, before any clock starts.
fn prepare_events(n: usize) -> Vec<Event> {
    Workload::new(WorkloadSettings::default())
        .take(n)
        .map(|line| Event::parse(&line).expect("workload events are valid"))
        .collect()
}

/// NDJSON request bodies of `REQUEST_EVENTS` workload events each.
fn prepare_bodies(n: usize) -> Vec<Bytes> {
    let mut workload = Workload::new(WorkloadSettings::default());
    (0..n.div_ceil(REQUEST_EVENTS))
        .map(|_| {
            let mut body = String::with_capacity(REQUEST_EVENTS * 760);
            for _ in 0..REQUEST_EVENTS {
                body.push_str(&workload.next_event());
                body.push('\n');
            }
            Bytes::from(body)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The run

struct Run {
    figures: BTreeMap<Stage, Figures>,
    /// Requests per event by event type: (type, spillway, seed pattern).
    per_type: Vec<(&'static str, f64, f64)>,
    avg_event_bytes: usize,
    load_before: String,
}

async fn run(settings: &Settings) -> anyhow::Result<()> {
    let env = Env::connect(settings).await?;
    let version = env.clickhouse(settings, "SELECT version()").await?;
    eprintln!(
        "end_to_end: {} events per stage, {} runs; ClickHouse {}, spillway at {}",
        settings.events,
        settings.runs,
        version.trim(),
        settings.spillway_bin.display()
    );
    let mut runs = Vec::new();
    for number in 1..=settings.runs {
        eprintln!("== run {number} of {}", settings.runs);
        runs.push(one_run(settings, &env, number).await?);
    }
    let report = render(settings, &runs);
    println!("{report}");
    if let Some(path) = &settings.report {
        std::fs::write(path, &report).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

async fn one_run(settings: &Settings, env: &Env, number: usize) -> anyhow::Result<Run> {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let id = &id[..12];
    let load_before = std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    let mut figures = BTreeMap::new();

    let events = prepare_events(settings.events);
    let avg_event_bytes =
        events.iter().map(|e| e.json().len()).sum::<usize>() / events.len().max(1);

    let stage = redis_ceiling(
        settings,
        env,
        &format!("bench:{id}:ceiling"),
        avg_event_bytes,
    )
    .await?;
    report_stage(number, Stage::RedisCeiling, &stage);
    figures.insert(Stage::RedisCeiling, stage);

    let seed_prefix = format!("bench:{id}:seed:");
    let stage = seed_pattern(env, &seed_prefix, &events).await?;
    delete_prefix(env, &seed_prefix).await?;
    report_stage(number, Stage::SeedPattern, &stage);
    figures.insert(Stage::SeedPattern, stage);

    let per_type = requests_per_type(settings, env, id, &events).await?;

    let add_prefix = format!("bench:{id}:add:");
    let queue = Queue::Redis(
        RedisQueue::connect(&settings.redis_url, &add_prefix, QueueSettings::default()).await?,
    );
    let stage = add(env, queue.clone(), events).await?;
    report_stage(number, Stage::Add, &stage);
    figures.insert(Stage::Add, stage);

    let database = format!("bench_{id}");
    let (stage, ceiling) = drain_and_ceiling(settings, env, queue, &database).await?;
    delete_prefix(env, &add_prefix).await?;
    report_stage(number, Stage::Drain, &stage);
    report_stage(number, Stage::ClickHouseCeiling, &ceiling);
    figures.insert(Stage::Drain, stage);
    figures.insert(Stage::ClickHouseCeiling, ceiling);

    let http_prefix = format!("bench:{id}:http:");
    let (max, half) = http_ingest(settings, env, &http_prefix).await?;
    delete_prefix(env, &http_prefix).await?;
    report_stage(number, Stage::HttpMax, &max);
    report_stage(number, Stage::HttpHalf, &half);
    figures.insert(Stage::HttpMax, max);
    figures.insert(Stage::HttpHalf, half);

    let e2e_prefix = format!("bench:{id}:e2e:");
    let stage = end_to_end(settings, env, &e2e_prefix, &format!("{database}_e2e")).await?;
    delete_prefix(env, &e2e_prefix).await?;
    report_stage(number, Stage::EndToEnd, &stage);
    figures.insert(Stage::EndToEnd, stage);

    for db in [database.clone(), format!("{database}_e2e")] {
        env.clickhouse(settings, &format!("DROP DATABASE IF EXISTS {db}"))
            .await?;
    }
    Ok(Run {
        figures,
        per_type,
        avg_event_bytes,
        load_before,
    })
}

fn report_stage(run: usize, stage: Stage, figures: &Figures) {
    let mut line = format!(
        "run {run}: {:<55} {:>9.0} events/s over {:.2} s",
        stage.label().replace("**", ""),
        figures.rate(),
        figures.secs
    );
    if let Some(redis) = &figures.redis {
        let _ = write!(
            line,
            "; Redis {:.3} req/event, {:.2} cmds/event ({})",
            figures.per_event(figures.redis_requests.unwrap_or(0) as f64),
            figures.per_event(redis.executed() as f64),
            redis
                .calls
                .iter()
                .map(|(name, calls)| format!("{name}={calls}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    if let Some(latency) = figures.latency {
        let _ = write!(
            line,
            "; latency p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms",
            latency[0], latency[1], latency[2]
        );
    }
    for note in &figures.notes {
        let _ = write!(line, "\n    note: {note}");
    }
    eprintln!("{line}");
}

// ---------------------------------------------------------------------------------------------
// Stage: Redis ceiling

/// `/usr/bin/time -f "%U %S %M"` around a command: (user + system CPU seconds, max RSS bytes).
fn time_wrapped(program: &str, time_file: &Path) -> Command {
    if Path::new("/usr/bin/time").exists() {
        let mut command = Command::new("/usr/bin/time");
        command
            .arg("-o")
            .arg(time_file)
            .arg("-f")
            .arg("%U %S %M")
            .arg(program);
        command
    } else {
        Command::new(program)
    }
}

fn read_time_file(time_file: &Path) -> (Option<f64>, Option<u64>) {
    let Ok(text) = std::fs::read_to_string(time_file) else {
        return (None, None);
    };
    let _ = std::fs::remove_file(time_file);
    let fields: Vec<&str> = text
        .lines()
        .last()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let cpu = match (fields.first(), fields.get(1)) {
        (Some(user), Some(sys)) => user
            .parse::<f64>()
            .ok()
            .zip(sys.parse::<f64>().ok())
            .map(|(u, s)| u + s),
        _ => None,
    };
    let rss = fields
        .get(2)
        .and_then(|kib| kib.parse::<u64>().ok())
        .map(|kib| kib * 1024);
    (cpu, rss)
}

/// Runs `redis-benchmark` (its default 50 connections, or `connections`) and returns the
/// requests/s it reports.
fn redis_benchmark(
    settings: &Settings,
    key: &str,
    payload: &str,
    connections: Option<u32>,
    time_file: &Path,
) -> anyhow::Result<f64> {
    let mut command = time_wrapped("redis-benchmark", time_file);
    command
        .args(["-h", "127.0.0.1", "-p"])
        .arg(settings.redis_port.to_string())
        .arg("-n")
        .arg(settings.events.to_string())
        .args(["-P", "100", "-q"]);
    if let Some(connections) = connections {
        command.arg("-c").arg(connections.to_string());
    }
    let output = command
        .args(["RPUSH", key, payload])
        .output()
        .context("running redis-benchmark (install redis-tools)")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success(),
        "redis-benchmark failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Quiet mode ends with "RPUSH ...: 123456.78 requests per second, p50=...".
    stdout
        .rsplit("requests per second")
        .nth(1)
        .and_then(|before| before.rsplit([' ', '\r']).find(|s| !s.is_empty()))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow!("no 'requests per second' in redis-benchmark output: {stdout}"))
}

async fn redis_ceiling(
    settings: &Settings,
    env: &Env,
    key: &str,
    payload_bytes: usize,
) -> anyhow::Result<Figures> {
    let payload = "x".repeat(payload_bytes);
    let time_file =
        std::env::temp_dir().join(format!("spillway-bench-{}.time", std::process::id()));
    let mut conn = env.redis.clone();

    let before = env.redis_snapshot().await?;
    let rate = redis_benchmark(settings, key, &payload, None, &time_file);
    let redis = env.redis_delta(&before).await?;
    redis::cmd("UNLINK")
        .arg(key)
        .query_async::<()>(&mut conn)
        .await?;
    let rate = rate?;
    let (cpu, rss) = read_time_file(&time_file);

    // For reference: the same on one connection, as spillway's batcher writes.
    let one = redis_benchmark(settings, key, &payload, Some(1), &time_file);
    redis::cmd("UNLINK")
        .arg(key)
        .query_async::<()>(&mut conn)
        .await?;
    let _ = read_time_file(&time_file);
    let mut notes = vec![format!(
        "{} RPUSH of {payload_bytes} bytes, pipelined 100 deep over redis-benchmark's default \
         50 connections, the rate it reports; over one connection: {:.0} requests/s",
        settings.events, one?
    )];
    notes.extend(redis.foreign(CEILING_COMMANDS));
    Ok(Figures {
        events: settings.events as u64,
        secs: settings.events as f64 / rate,
        redis_requests: redis.calls.get("rpush").copied(),
        redis: Some(redis),
        cpu_secs: cpu,
        cpu_of: "redis-benchmark",
        peak_rss: rss,
        notes,
        ..Figures::default()
    })
}

// ---------------------------------------------------------------------------------------------
// Stage: the seed's pattern

struct SeedScripts {
    screen_view: String,
    session_end: String,
}

impl SeedScripts {
    async fn load(conn: &mut MultiplexedConnection) -> anyhow::Result<SeedScripts> {
        let load = |script: &'static str| {
            let mut conn = conn.clone();
            async move {
                redis::cmd("SCRIPT")
                    .arg("LOAD")
                    .arg(script)
                    .query_async::<String>(&mut conn)
                    .await
            }
        };
        Ok(SeedScripts {
            screen_view: load(SEED_SCREEN_VIEW_LUA).await?,
            session_end: load(SEED_SESSION_END_LUA).await?,
        })
    }
}

/// The seed's `flushLocalBuffer`, one micro-batch at a time: returns the commands sent.
async fn seed_write(
    conn: &mut MultiplexedConnection,
    scripts: &SeedScripts,
    prefix: &str,
    events: &[Event],
    heartbeats: &mut HashMap<(String, String), Instant>,
) -> anyhow::Result<u64> {
    let queue = format!("{prefix}event_buffer:queue");
    let counter = format!("{prefix}event_buffer:total_count");
    let mut sent = 0u64;
    for batch in events.chunks(MICRO_BATCH) {
        let mut pipe = redis::pipe();
        pipe.atomic();
        sent += 2; // MULTI, EXEC
        let now = Instant::now();
        let now_ms = spillway::time::now().as_millis();
        for event in batch {
            let profile_key = event.profile_id().map_or_else(String::new, |profile| {
                format!(
                    "{prefix}event_buffer:last_screen_view:profile:{}:{profile}",
                    event.project_id()
                )
            });
            match (event.kind(), event.session_id()) {
                (EventKind::ScreenView, Some(session)) => {
                    let with_ts = format!(
                        "{{\"event\":{},\"ts\":{}}}",
                        event.json(),
                        event.created_at().as_millis()
                    );
                    pipe.cmd("EVALSHA")
                        .arg(&scripts.screen_view)
                        .arg(4)
                        .arg(format!(
                            "{prefix}event_buffer:last_screen_view:session:{session}"
                        ))
                        .arg(&profile_key)
                        .arg(&queue)
                        .arg(&counter)
                        .arg(with_ts)
                        .arg("3600")
                        .ignore();
                    sent += 1;
                }
                (EventKind::SessionEnd, Some(session)) => {
                    pipe.cmd("EVALSHA")
                        .arg(&scripts.session_end)
                        .arg(4)
                        .arg(format!(
                            "{prefix}event_buffer:last_screen_view:session:{session}"
                        ))
                        .arg(&profile_key)
                        .arg(&queue)
                        .arg(&counter)
                        .arg(event.json())
                        .ignore();
                    sent += 1;
                }
                _ => {
                    pipe.cmd("RPUSH")
                        .arg(&queue)
                        .arg(event.json())
                        .ignore()
                        .cmd("INCR")
                        .arg(&counter)
                        .ignore();
                    sent += 2;
                }
            }
            // The seed's per-process heartbeat throttle: one ZADD + SET per visitor per minute.
            if let Some(profile) = event.profile_id() {
                let key = (event.project_id().to_owned(), profile.to_owned());
                let fresh = heartbeats
                    .get(&key)
                    .is_some_and(|at| now.duration_since(*at) < Duration::from_secs(60));
                if !fresh {
                    pipe.cmd("ZADD")
                        .arg(format!("{prefix}live:visitors:{}", event.project_id()))
                        .arg(now_ms)
                        .arg(profile)
                        .ignore()
                        .cmd("SET")
                        .arg(format!(
                            "{prefix}live:visitor:{}:{profile}",
                            event.project_id()
                        ))
                        .arg("1")
                        .arg("EX")
                        .arg(300)
                        .ignore();
                    heartbeats.insert(key, now);
                    sent += 2;
                }
            }
        }
        pipe.query_async::<()>(conn).await?;
    }
    Ok(sent)
}

async fn seed_pattern(env: &Env, prefix: &str, events: &[Event]) -> anyhow::Result<Figures> {
    let mut conn = env.redis.clone();
    let scripts = SeedScripts::load(&mut conn).await?;
    let mut heartbeats = HashMap::new();
    let before = env.redis_snapshot().await?;
    let cpu_before = env.cpu_secs(&proc_stat(None));
    reset_peak_rss(None);
    let rss_before = memory(None, "VmRSS:");
    let started = Instant::now();
    let sent = seed_write(&mut conn, &scripts, prefix, events, &mut heartbeats).await?;
    let secs = started.elapsed().as_secs_f64();
    let cpu = env
        .cpu_secs(&proc_stat(None))
        .zip(cpu_before)
        .map(|(a, b)| a - b);
    let redis = env.redis_delta(&before).await?;
    let mut notes = vec![
        "driven from this bench over one multiplexed connection, one MULTI at a time; \
         events prepared before the clock starts"
            .to_owned(),
    ];
    notes.extend(redis.foreign(SEED_COMMANDS));
    Ok(Figures {
        events: events.len() as u64,
        secs,
        redis_requests: Some(sent),
        redis: Some(redis),
        cpu_secs: cpu,
        cpu_of: "bench process, driver",
        peak_rss: memory(None, "VmHWM:")
            .zip(rss_before)
            .map(|(peak, start)| peak.saturating_sub(start)),
        notes,
        ..Figures::default()
    })
}

/// Client requests per event for events of one type at a time, spillway and seed pattern.
async fn requests_per_type(
    settings: &Settings,
    env: &Env,
    id: &str,
    events: &[Event],
) -> anyhow::Result<Vec<(&'static str, f64, f64)>> {
    let kinds = [
        ("screen_view", EventKind::ScreenView),
        ("session_end", EventKind::SessionEnd),
        ("other", EventKind::Regular),
    ];
    let mut conn = env.redis.clone();
    let scripts = SeedScripts::load(&mut conn).await?;
    let mut out = Vec::new();
    for (name, kind) in kinds {
        let subset: Vec<Event> = events
            .iter()
            .filter(|e| e.kind() == kind)
            .take(PER_TYPE_EVENTS)
            .cloned()
            .collect();
        let n = subset.len().max(1) as f64;
        let prefix = format!("bench:{id}:type:{name}:");
        let queue = Queue::Redis(
            RedisQueue::connect(&settings.redis_url, &prefix, QueueSettings::default()).await?,
        );
        let before = env.redis_snapshot().await?;
        add_all(queue, subset.clone()).await?;
        let spillway = env.redis_delta(&before).await?.client_only() as f64 / n;
        let seed_prefix = format!("bench:{id}:type:{name}:seed:");
        let seed = seed_write(
            &mut conn,
            &scripts,
            &seed_prefix,
            &subset,
            &mut HashMap::new(),
        )
        .await? as f64
            / n;
        delete_prefix(env, &prefix).await?;
        out.push((name, spillway, seed));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Stage: add through the library

/// Adds every event one by one and waits until every receipt resolved.
async fn add_all(queue: Queue, events: Vec<Event>) -> anyhow::Result<()> {
    let (buffer, batcher) =
        Buffer::start(queue, BatchSettings::default(), QueueSettings::default());
    let mut receipts = Vec::with_capacity(events.len());
    for event in events {
        receipts.push(buffer.add(event).await?);
    }
    for receipt in receipts {
        receipt.written().await?;
    }
    drop(buffer);
    batcher.await?;
    Ok(())
}

async fn add(env: &Env, queue: Queue, events: Vec<Event>) -> anyhow::Result<Figures> {
    let count = events.len() as u64;
    let before = env.redis_snapshot().await?;
    let cpu_before = env.cpu_secs(&proc_stat(None));
    reset_peak_rss(None);
    let rss_before = memory(None, "VmRSS:");
    let started = Instant::now();
    add_all(queue, events).await?;
    let secs = started.elapsed().as_secs_f64();
    let cpu = env
        .cpu_secs(&proc_stat(None))
        .zip(cpu_before)
        .map(|(a, b)| a - b);
    let redis = env.redis_delta(&before).await?;
    let mut notes = vec![
        "`Buffer::add` per event, default settings (micro-batch 100, 10 ms); events \
         parsed before the clock starts"
            .to_owned(),
    ];
    notes.extend(redis.foreign(ENQUEUE_COMMANDS));
    Ok(Figures {
        events: count,
        secs,
        redis_requests: Some(redis.client_only()),
        redis: Some(redis),
        cpu_secs: cpu,
        cpu_of: "bench process, library",
        peak_rss: memory(None, "VmHWM:")
            .zip(rss_before)
            .map(|(peak, start)| peak.saturating_sub(start)),
        notes,
        ..Figures::default()
    })
}

// ---------------------------------------------------------------------------------------------
// Byte-counting forwarder in front of ClickHouse

/// A TCP forwarder on its own thread that counts the bytes clients send through it, so the
/// bytes spillway sends to ClickHouse are measured exactly (HTTP headers included). Its CPU is
/// read from its thread's stat and left out of the bench process's figure.
struct Forwarder {
    addr: SocketAddr,
    sent: Arc<AtomicU64>,
    thread_stat: Option<PathBuf>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Forwarder {
    fn start(target: SocketAddr) -> anyhow::Result<Forwarder> {
        let sent = Arc::new(AtomicU64::new(0));
        let counter = sent.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("ch-forwarder".to_owned())
            .spawn(move || {
                let thread_stat = std::fs::read_link("/proc/thread-self")
                    .ok()
                    .map(|rel| Path::new("/proc").join(rel).join("stat"));
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("forwarder runtime");
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
                        Ok(listener) => listener,
                        Err(err) => {
                            let _ = ready_tx.send(Err(err));
                            return;
                        }
                    };
                    let _ = ready_tx.send(listener.local_addr().map(|a| (a, thread_stat)));
                    let mut stopped = stopped;
                    loop {
                        tokio::select! {
                            accepted = listener.accept() => {
                                if let Ok((client, _)) = accepted {
                                    tokio::spawn(forward(client, target, counter.clone()));
                                }
                            }
                            _ = &mut stopped => return,
                        }
                    }
                });
            })?;
        let (addr, thread_stat) = ready_rx
            .recv_timeout(Duration::from_secs(10))
            .context("forwarder did not start")??;
        Ok(Forwarder {
            addr,
            sent,
            thread_stat,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn forward(client: tokio::net::TcpStream, target: SocketAddr, sent: Arc<AtomicU64>) {
    let Ok(upstream) = tokio::net::TcpStream::connect(target).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut upstream_read, mut upstream_write) = upstream.into_split();
    let up = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match client_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    sent.fetch_add(n as u64, Ordering::Relaxed);
                    if upstream_write.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
    };
    let down = async {
        let _ = tokio::io::copy(&mut upstream_read, &mut client_write).await;
    };
    // Either side closing ends the connection.
    tokio::select! {
        () = up => {}
        () = down => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Stages: drain, and the ClickHouse ceiling on the same rows

async fn create_table(settings: &Settings, env: &Env, database: &str) -> anyhow::Result<()> {
    env.clickhouse(
        settings,
        &format!("CREATE DATABASE IF NOT EXISTS {database}"),
    )
    .await?;
    env.clickhouse(settings, &SchemaVariant::Legacy.ddl(database, "events"))
        .await?;
    Ok(())
}

async fn count_rows(settings: &Settings, env: &Env, database: &str) -> anyhow::Result<u64> {
    let body = env
        .clickhouse(settings, &format!("SELECT count() FROM {database}.events"))
        .await?;
    Ok(body.trim().parse()?)
}

async fn drain_and_ceiling(
    settings: &Settings,
    env: &Env,
    queue: Queue,
    database: &str,
) -> anyhow::Result<(Figures, Figures)> {
    create_table(settings, env, database).await?;
    let forwarder = Forwarder::start(settings.clickhouse_addr)?;
    let sink = ClickHouseSink::connect(ClickHouseSettings {
        url: forwarder.url(),
        database: database.to_owned(),
        table: "events".to_owned(),
        ..ClickHouseSettings::default()
    })
    .await?;
    let flusher = Flusher::new(queue, Sink::ClickHouse(sink), FlushSettings::default());

    let before = env.redis_snapshot().await?;
    let bytes_before = forwarder.sent();
    let cpu_before = env.cpu_secs(&proc_stat(None));
    let forwarder_cpu = |env: &Env| {
        forwarder
            .thread_stat
            .as_deref()
            .and_then(|p| env.cpu_secs(p))
    };
    let forwarder_before = forwarder_cpu(env);
    reset_peak_rss(None);
    let rss_before = memory(None, "VmRSS:");
    let started = Instant::now();
    let report = flusher.drain().await?;
    let secs = started.elapsed().as_secs_f64();
    let forwarder_used = forwarder_cpu(env)
        .zip(forwarder_before)
        .map_or(0.0, |(a, b)| a - b);
    let cpu = env
        .cpu_secs(&proc_stat(None))
        .zip(cpu_before)
        .map(|(a, b)| a - b - forwarder_used);
    let clickhouse_bytes = forwarder.sent() - bytes_before;
    let redis = env.redis_delta(&before).await?;
    let inserts = env
        .inserts(
            settings,
            &format!("INSERT INTO `{database}`."),
            report.rows.div_ceil(CHUNK_ROWS) as u64,
        )
        .await?;
    let peak_rss = memory(None, "VmHWM:")
        .zip(rss_before)
        .map(|(peak, start)| peak.saturating_sub(start));
    drop(forwarder);
    let rows = count_rows(settings, env, database).await?;
    let added = settings.events;
    ensure!(
        rows == report.rows as u64 && report.dead_lettered == 0,
        "drain reported {} rows ({} dead-lettered), the table holds {rows}",
        report.rows,
        report.dead_lettered
    );
    let mut notes = vec![format!(
        "{} rows in {} batches of ≤ 4000, 1000-row JSONEachRow inserts over HTTP; the rest \
         of the {added} events added are screen views still held (their sessions saw no \
         later view); CPU excludes the byte-counting forwarder ({forwarder_used:.2} s)",
        report.rows, report.batches
    )];
    notes.push(inserts.note(secs));
    notes.extend(redis.foreign(FLUSH_COMMANDS));
    let drain = Figures {
        events: report.rows as u64,
        secs,
        redis_requests: Some(redis.client_only()),
        redis: Some(redis),
        clickhouse_bytes: Some(clickhouse_bytes),
        clickhouse_cpu_secs: Some(inserts.cpu_secs),
        cpu_secs: cpu,
        cpu_of: "bench process, library",
        peak_rss,
        notes,
        ..Figures::default()
    };

    // The ceiling: the same rows, as the table holds them, back in through clickhouse-client.
    let rows_file = std::env::temp_dir().join(format!(
        "spillway-bench-{}-{database}.ndjson",
        std::process::id()
    ));
    let dump = env
        .clickhouse(
            settings,
            &format!("SELECT * FROM {database}.events FORMAT JSONEachRow"),
        )
        .await?;
    std::fs::write(&rows_file, &dump)?;
    let dump_bytes = dump.len() as u64;
    drop(dump);
    env.clickhouse(settings, &format!("TRUNCATE TABLE {database}.events"))
        .await?;
    let ceiling = clickhouse_ceiling(settings, env, database, &rows_file, rows, dump_bytes).await;
    let _ = std::fs::remove_file(&rows_file);
    Ok((drain, ceiling?))
}

async fn clickhouse_ceiling(
    settings: &Settings,
    env: &Env,
    database: &str,
    rows_file: &Path,
    rows: u64,
    dump_bytes: u64,
) -> anyhow::Result<Figures> {
    let time_file =
        std::env::temp_dir().join(format!("spillway-bench-{}.time", std::process::id()));
    let started = Instant::now();
    let block = CHUNK_ROWS.to_string();
    let output = time_wrapped("clickhouse-client", &time_file)
        .arg("--port")
        .arg(settings.clickhouse_tcp_port.to_string())
        .arg(format!("--max_insert_block_size={block}"))
        .arg(format!("--min_insert_block_size_rows={block}"))
        .arg("--min_insert_block_size_bytes=0")
        .arg("--query")
        .arg(format!("INSERT INTO {database}.events FORMAT JSONEachRow"))
        .stdin(std::fs::File::open(rows_file)?)
        .output()
        .context("running clickhouse-client")?;
    let secs = started.elapsed().as_secs_f64();
    ensure!(
        output.status.success(),
        "clickhouse-client failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let inserts = env
        .inserts(settings, &format!("INSERT INTO {database}."), 1)
        .await?;
    let (cpu, rss) = read_time_file(&time_file);
    let inserted = count_rows(settings, env, database).await?;
    ensure!(
        inserted == rows,
        "ceiling inserted {inserted} of {rows} rows"
    );
    let parts = env
        .clickhouse(
            settings,
            &format!(
                "SELECT count() FROM system.parts WHERE database = '{database}' \
                 AND table = 'events' AND active"
            ),
        )
        .await?;
    Ok(Figures {
        events: rows,
        secs,
        clickhouse_bytes: Some(dump_bytes),
        clickhouse_cpu_secs: Some(inserts.cpu_secs),
        cpu_secs: cpu,
        cpu_of: "clickhouse-client",
        peak_rss: rss,
        notes: vec![
            format!(
                "one clickhouse-client process (its start included), native protocol, blocks \
                 of {CHUNK_ROWS} rows each written as its own part ({} active parts right after); \
                 input = `SELECT *` of the drained rows as JSONEachRow; bytes = that input \
                 (the client parses it and sends compressed native blocks)",
                parts.trim()
            ),
            inserts.note(secs),
        ],
        ..Figures::default()
    })
}

// ---------------------------------------------------------------------------------------------
// The spillway process

struct ServeProcess {
    child: Child,
    addr: String,
    log: PathBuf,
    _stdout: Option<BufReader<ChildStdout>>,
}

impl ServeProcess {
    fn spawn(settings: &Settings, prefix: &str, extra: &[&str]) -> anyhow::Result<ServeProcess> {
        let log = std::env::temp_dir().join(format!(
            "spillway-bench-{}-{}.log",
            std::process::id(),
            prefix.replace(':', "_")
        ));
        let mut command = Command::new(&settings.spillway_bin);
        // Only the flags below configure it, not the caller's environment.
        for (name, _) in std::env::vars() {
            if name.starts_with("SPILLWAY_")
                || name.starts_with("CLICKHOUSE_")
                || name.starts_with("EVENT_BUFFER_")
                || name == "REDIS_URL"
            {
                command.env_remove(name);
            }
        }
        let mut child = command
            .arg("serve")
            .args(["--listen", "127.0.0.1:0", "--redis-url"])
            .arg(&settings.redis_url)
            .arg("--key-prefix")
            .arg(prefix)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {}", settings.spillway_bin.display()))?;
        let stdout = child.stdout.take().context("serve stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let _ = tx.send((line, reader));
        });
        let mut serve = ServeProcess {
            child,
            addr: String::new(),
            log,
            _stdout: None,
        };
        let (line, reader) = rx
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| anyhow!("spillway serve did not start; log: {}", serve.log.display()))?;
        // Kept open: the service must not see a closed stdout.
        serve._stdout = Some(reader);
        serve.addr = line
            .trim()
            .strip_prefix("spillway listening on http://")
            .map(str::to_owned)
            .ok_or_else(|| {
                anyhow!(
                    "unexpected first line {line:?} from spillway serve; log: {}",
                    serve.log.display()
                )
            })?;
        Ok(serve)
    }

    fn pid(&self) -> Option<u32> {
        Some(self.child.id())
    }

    /// SIGTERM, then wait for the graceful shutdown (at most 30 s).
    fn stop(mut self) -> anyhow::Result<()> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                ensure!(
                    status.success(),
                    "spillway serve exited with {status}; log: {}",
                    self.log.display()
                );
                let _ = std::fs::remove_file(&self.log);
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "spillway serve did not stop within 30 s; log: {}",
            self.log.display()
        )
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Stage: HTTP ingest

struct Posted {
    latencies_ms: Vec<f64>,
    accepted: u64,
    failed: u64,
}

async fn post(client: &reqwest::Client, url: &str, body: Bytes) -> bool {
    match client
        .post(url)
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await
    {
        Ok(response) => {
            let ok = response.status() == reqwest::StatusCode::ACCEPTED;
            let _ = response.bytes().await;
            ok
        }
        Err(_) => false,
    }
}

/// Every body once, from `concurrency` tasks, as fast as the service answers.
async fn post_closed_loop(url: &str, bodies: &Arc<Vec<Bytes>>, concurrency: usize) -> Posted {
    let client = reqwest::Client::new();
    let next = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, next, bodies, url) =
            (client.clone(), next.clone(), bodies.clone(), url.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut posted = Posted {
                latencies_ms: Vec::new(),
                accepted: 0,
                failed: 0,
            };
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= bodies.len() || Instant::now() > deadline {
                    return posted;
                }
                let started = Instant::now();
                let ok = post(&client, &url, bodies[i].clone()).await;
                posted
                    .latencies_ms
                    .push(started.elapsed().as_secs_f64() * 1e3);
                if ok {
                    posted.accepted += REQUEST_EVENTS as u64;
                } else {
                    posted.failed += 1;
                }
            }
        }));
    }
    collect(tasks).await
}

/// Every body once, one every `interval` whatever the answers; latency counts from the planned
/// send time, so a slow answer cannot hide the requests queued behind it.
async fn post_open_loop(url: &str, bodies: &Arc<Vec<Bytes>>, interval: Duration) -> Posted {
    let client = reqwest::Client::new();
    let in_flight = Arc::new(tokio::sync::Semaphore::new(256));
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for (i, body) in bodies.iter().enumerate() {
        let planned = start + interval * u32::try_from(i).unwrap_or(u32::MAX);
        tokio::time::sleep_until(planned).await;
        let (client, url, body, in_flight) = (
            client.clone(),
            url.to_owned(),
            body.clone(),
            in_flight.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let _permit = in_flight.acquire_owned().await;
            let ok = post(&client, &url, body).await;
            Posted {
                latencies_ms: vec![planned.elapsed().as_secs_f64() * 1e3],
                accepted: if ok { REQUEST_EVENTS as u64 } else { 0 },
                failed: u64::from(!ok),
            }
        }));
    }
    collect(tasks).await
}

async fn collect(tasks: Vec<tokio::task::JoinHandle<Posted>>) -> Posted {
    let mut all = Posted {
        latencies_ms: Vec::new(),
        accepted: 0,
        failed: 0,
    };
    for task in tasks {
        if let Ok(posted) = task.await {
            all.latencies_ms.extend(posted.latencies_ms);
            all.accepted += posted.accepted;
            all.failed += posted.failed;
        } else {
            all.failed += 1;
        }
    }
    all
}

/// Measures one phase of load on a running `spillway serve`.
async fn measure_serve<F, Fut>(
    env: &Env,
    serve: &ServeProcess,
    load: F,
) -> anyhow::Result<(Posted, Figures)>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Posted>,
{
    let before = env.redis_snapshot().await?;
    let stat = proc_stat(serve.pid());
    let cpu_before = env.cpu_secs(&stat);
    reset_peak_rss(serve.pid());
    let started = Instant::now();
    let posted = load().await;
    let secs = started.elapsed().as_secs_f64();
    let cpu = env.cpu_secs(&stat).zip(cpu_before).map(|(a, b)| a - b);
    let redis = env.redis_delta(&before).await?;
    let figures = Figures {
        events: posted.accepted,
        secs,
        redis_requests: Some(redis.client_only()),
        redis: Some(redis),
        cpu_secs: cpu,
        cpu_of: "spillway serve",
        peak_rss: memory(serve.pid(), "VmHWM:"),
        latency: percentiles(posted.latencies_ms.clone()),
        ..Figures::default()
    };
    Ok((posted, figures))
}

async fn http_ingest(
    settings: &Settings,
    env: &Env,
    prefix: &str,
) -> anyhow::Result<(Figures, Figures)> {
    let bodies = Arc::new(prepare_bodies(settings.events));
    let serve = ServeProcess::spawn(settings, prefix, &["--no-flush"])?;
    let url = format!("http://{}/v1/events", serve.addr);

    let (posted, mut max) = measure_serve(env, &serve, || {
        post_closed_loop(&url, &bodies, settings.http_concurrency)
    })
    .await?;
    ensure!(
        posted.failed == 0,
        "{} of {} requests failed at max rate; log: {}",
        posted.failed,
        bodies.len(),
        serve.log.display()
    );
    let mut notes = vec![format!(
        "{} requests of {REQUEST_EVENTS} NDJSON events from {} concurrent tasks (closed loop), \
         latency per request; `--no-flush`",
        bodies.len(),
        settings.http_concurrency
    )];
    notes.extend(max.redis.as_ref().and_then(|r| r.foreign(ENQUEUE_COMMANDS)));
    max.notes = notes;

    let half_rate = max.rate() / 2.0;
    let interval = Duration::from_secs_f64(REQUEST_EVENTS as f64 / half_rate.max(1.0));
    let (posted, mut half) =
        measure_serve(env, &serve, || post_open_loop(&url, &bodies, interval)).await?;
    let mut notes = vec![format!(
        "the same {} requests, one every {:.1} ms ({half_rate:.0} events/s offered, open \
         loop), latency from the planned send time; {} failed",
        bodies.len(),
        interval.as_secs_f64() * 1e3,
        posted.failed
    )];
    notes.extend(
        half.redis
            .as_ref()
            .and_then(|r| r.foreign(ENQUEUE_COMMANDS)),
    );
    half.notes = notes;
    serve.stop()?;
    Ok((max, half))
}

// ---------------------------------------------------------------------------------------------
// Stage: end to end

/// One workload event marked with its request (`model`, a column of the table) and its send
/// time (`properties.sent_ms`).
fn mark(line: &str, batch: usize, sent_ms: i64) -> String {
    line.replacen("\"model\":\"\"", &format!("\"model\":\"b{batch}\""), 1)
        .replacen(
            "\"properties\":{",
            &format!("\"properties\":{{\"sent_ms\":\"{sent_ms}\","),
            1,
        )
}

async fn end_to_end(
    settings: &Settings,
    env: &Env,
    prefix: &str,
    database: &str,
) -> anyhow::Result<Figures> {
    create_table(settings, env, database).await?;
    let forwarder = Forwarder::start(settings.clickhouse_addr)?;
    let serve = ServeProcess::spawn(
        settings,
        prefix,
        &[
            "--clickhouse-url",
            &forwarder.url(),
            "--clickhouse-database",
            database,
            "--flush-interval-ms",
            "200",
        ],
    )?;
    let url = format!("http://{}/v1/events", serve.addr);
    let requests =
        (settings.e2e_rate * usize::try_from(settings.e2e_secs)?).div_ceil(E2E_REQUEST_EVENTS);
    let interval = Duration::from_secs_f64(E2E_REQUEST_EVENTS as f64 / settings.e2e_rate as f64);

    // Poll ClickHouse every 100 ms: per request, how many of its events are visible.
    let stop_polling = Arc::new(tokio::sync::Notify::new());
    let poller = {
        let (http, stop) = (env.http.clone(), stop_polling.clone());
        let (ch_url, sql) = (
            settings.clickhouse_url.clone(),
            format!(
                "SELECT model, count() FROM {database}.events GROUP BY model FORMAT TabSeparated"
            ),
        );
        tokio::spawn(async move {
            let mut seen: HashMap<usize, u64> = HashMap::new();
            let mut visible: Vec<(usize, u64, Instant)> = Vec::new();
            loop {
                let asked = Instant::now();
                if let Ok(response) = http.post(&ch_url).body(sql.clone()).send().await {
                    let body = response.text().await.unwrap_or_default();
                    for line in body.lines() {
                        let Some((model, count)) = line.split_once('\t') else {
                            continue;
                        };
                        let (Some(batch), Ok(count)) = (
                            model
                                .strip_prefix('b')
                                .and_then(|b| b.parse::<usize>().ok()),
                            count.parse::<u64>(),
                        ) else {
                            continue;
                        };
                        let before = seen.insert(batch, count).unwrap_or(0);
                        if count > before {
                            visible.push((batch, count - before, asked));
                        }
                    }
                }
                tokio::select! {
                    () = tokio::time::sleep_until(tokio::time::Instant::from_std(asked + Duration::from_millis(100))) => {}
                    () = stop.notified() => return visible,
                }
            }
        })
    };

    let before = env.redis_snapshot().await?;
    let stat = proc_stat(serve.pid());
    let cpu_before = env.cpu_secs(&stat);
    let bytes_before = forwarder.sent();
    reset_peak_rss(serve.pid());
    let client = reqwest::Client::new();
    let mut workload = Workload::new(WorkloadSettings::default());
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(requests);
    for batch in 0..requests {
        tokio::time::sleep_until(start + interval * u32::try_from(batch)?).await;
        let sent_ms = spillway::time::now().as_millis();
        let mut body = String::with_capacity(E2E_REQUEST_EVENTS * 800);
        for _ in 0..E2E_REQUEST_EVENTS {
            body.push_str(&mark(&workload.next_event(), batch, sent_ms));
            body.push('\n');
        }
        let (client, url) = (client.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let ok = post(&client, &url, Bytes::from(body)).await;
            ok.then(Instant::now)
        }));
    }
    let mut accepted_at = Vec::with_capacity(requests);
    for task in tasks {
        accepted_at.push(task.await.ok().flatten());
    }
    let send_secs = start.elapsed().as_secs_f64();
    let accepted = accepted_at.iter().flatten().count() * E2E_REQUEST_EVENTS;

    // Wait until everything accepted is visible, or nothing more arrives for 2 s (at most
    // 15 s): held screen views of sessions that sent nothing later stay in Redis by design.
    let deadline = Instant::now() + Duration::from_secs(15);
    let (mut last, mut changed) = (0u64, Instant::now());
    while Instant::now() < deadline {
        let rows = count_rows(settings, env, database).await?;
        if rows >= accepted as u64 || (rows == last && changed.elapsed() > Duration::from_secs(2)) {
            break;
        }
        if rows != last {
            (last, changed) = (rows, Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // One more poll after the last change, then stop.
    tokio::time::sleep(Duration::from_millis(250)).await;
    stop_polling.notify_one();
    let visible = poller.await?;
    let secs = start.elapsed().as_secs_f64();
    let cpu = env.cpu_secs(&stat).zip(cpu_before).map(|(a, b)| a - b);
    let visible_rows: u64 = visible.iter().map(|(_, n, _)| n).sum();
    let inserts = env
        .inserts(
            settings,
            &format!("INSERT INTO `{database}`."),
            visible_rows.div_ceil(CHUNK_ROWS as u64),
        )
        .await?;
    let clickhouse_bytes = forwarder.sent() - bytes_before;
    let peak_rss = memory(serve.pid(), "VmHWM:");
    let redis = env.redis_delta(&before).await?;
    serve.stop()?;
    drop(forwarder);

    let mut latencies = Vec::with_capacity(accepted);
    let mut visible_events = 0u64;
    for (batch, n, at) in &visible {
        if let Some(Some(accepted)) = accepted_at.get(*batch) {
            let ms = at.saturating_duration_since(*accepted).as_secs_f64() * 1e3;
            latencies.extend(std::iter::repeat_n(ms, usize::try_from(*n)?));
            visible_events += n;
        }
    }
    let mut notes = vec![format!(
        "{requests} requests of {E2E_REQUEST_EVENTS} events, one every {:.1} ms for {send_secs:.1} s \
         ({} events/s offered, {accepted} accepted); latency = first 100 ms poll of ClickHouse \
         that counts the event − its request's 202, over the {visible_events} events visible; \
         {} never became visible (held screen views whose sessions sent nothing later); events/s is the offered rate; Redis and CPU figures cover the whole stage \
         ({secs:.1} s) per accepted event",
        interval.as_secs_f64() * 1e3,
        settings.e2e_rate,
        (accepted as u64).saturating_sub(visible_events)
    )];
    notes.push(inserts.note(secs));
    let both: Vec<&str> = ENQUEUE_COMMANDS
        .iter()
        .chain(FLUSH_COMMANDS)
        .copied()
        .collect();
    notes.extend(redis.foreign(&both));
    Ok(Figures {
        events: accepted as u64,
        secs: send_secs,
        redis_requests: Some(redis.client_only()),
        redis: Some(redis),
        clickhouse_bytes: Some(clickhouse_bytes),
        clickhouse_cpu_secs: Some(inserts.cpu_secs),
        cpu_secs: cpu,
        cpu_of: "spillway serve",
        peak_rss,
        latency: percentiles(latencies),
        notes,
    })
}

// ---------------------------------------------------------------------------------------------
// The report

fn both(runs: &[Run], cell: impl Fn(&Run) -> Option<String>) -> String {
    runs.iter()
        .map(|run| cell(run).unwrap_or_else(|| "—".to_owned()))
        .collect::<Vec<_>>()
        .join(" / ")
}

fn ratio(run: &Run, stage: Stage, baseline: Stage) -> Option<f64> {
    let a = run.figures.get(&stage)?.rate();
    let b = run.figures.get(&baseline)?.rate();
    (b > 0.0).then(|| a / b)
}

fn mib(bytes: u64) -> String {
    format!("{:.0}", bytes as f64 / (1024.0 * 1024.0))
}

/// Met when every run meets it.
fn status(values: &[Option<f64>], met: impl Fn(f64) -> bool) -> &'static str {
    let known: Vec<f64> = values.iter().flatten().copied().collect();
    if known.is_empty() {
        "not measured"
    } else if known.iter().all(|v| met(*v)) {
        "**met**"
    } else if known.iter().any(|v| met(*v)) {
        "met in some runs"
    } else {
        "**missed**"
    }
}

fn render(settings: &Settings, runs: &[Run]) -> String {
    let mut out = String::new();
    let stages = [
        (Stage::RedisCeiling, None),
        (Stage::SeedPattern, None),
        (Stage::Add, Some("vs Redis ceiling / vs seed")),
        (Stage::HttpMax, Some("vs Redis ceiling / vs seed")),
        (Stage::HttpHalf, None),
        (Stage::ClickHouseCeiling, None),
        (Stage::Drain, Some("vs ClickHouse ceiling")),
        (Stage::EndToEnd, None),
    ];
    let _ = writeln!(
        out,
        "{} events per stage ({} bytes per event on average), {} runs; each cell is `run 1 / \
         run 2 / …`. Load average before each run: {}.\n",
        settings.events,
        runs.first().map_or(0, |r| r.avg_event_bytes),
        runs.len(),
        both(runs, |r| Some(format!("`{}`", r.load_before)))
    );
    let _ = writeln!(
        out,
        "| stage | events/s | ratio to baseline | Redis requests / event | Redis commands / event (incl. in scripts) | bytes to Redis / event | bytes to ClickHouse / event | CPU µs / event (whose) | Redis CPU µs / event | ClickHouse insert CPU µs / event | peak RSS MiB | latency p50, p95, p99 ms |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (stage, ratio_kind) in stages {
        let get = |run: &Run| run.figures.get(&stage).cloned();
        let ratio_cell = match (stage, ratio_kind) {
            (Stage::Drain, Some(_)) => {
                both(runs, |r| {
                    ratio(r, Stage::Drain, Stage::ClickHouseCeiling).map(|x| format!("{x:.2}×"))
                }) + " of ClickHouse ceiling"
            }
            (_, Some(_)) => {
                let ceiling = both(runs, |r| {
                    ratio(r, stage, Stage::RedisCeiling).map(|x| format!("{x:.2}×"))
                });
                let seed = both(runs, |r| {
                    ratio(r, stage, Stage::SeedPattern).map(|x| format!("{x:.1}×"))
                });
                format!("{ceiling} of Redis ceiling; {seed} seed")
            }
            _ => String::new(),
        };
        let whose = runs
            .iter()
            .find_map(|r| r.figures.get(&stage).map(|f| f.cpu_of))
            .unwrap_or("");
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} ({whose}) | {} | {} | {} | {} |",
            stage.label(),
            both(runs, |r| get(r).map(|f| format!("{:.0}", f.rate()))),
            ratio_cell,
            both(runs, |r| get(r).and_then(|f| f
                .redis_requests
                .map(|n| format!("{:.3}", f.per_event(n as f64))))),
            both(runs, |r| get(r).and_then(|f| f
                .redis
                .as_ref()
                .map(|d| format!("{:.2}", f.per_event(d.executed() as f64))))),
            both(runs, |r| get(r).and_then(|f| f.redis.as_ref().map(
                |d| format!("{:.0}", f.per_event(d.net_input_bytes as f64))
            ))),
            both(runs, |r| get(r).and_then(|f| f
                .clickhouse_bytes
                .map(|b| format!("{:.0}", f.per_event(b as f64))))),
            both(runs, |r| get(r).and_then(|f| f
                .cpu_secs
                .map(|s| format!("{:.1}", f.per_event(s * 1e6))))),
            both(runs, |r| get(r).and_then(|f| f
                .redis
                .as_ref()
                .map(|d| format!("{:.1}", f.per_event(d.cpu_secs * 1e6))))),
            both(runs, |r| get(r).and_then(|f| f
                .clickhouse_cpu_secs
                .map(|s| format!("{:.1}", f.per_event(s * 1e6))))),
            both(runs, |r| get(r).and_then(|f| f.peak_rss.map(mib))),
            both(runs, |r| get(r).and_then(|f| f
                .latency
                .map(|l| format!("{:.0}, {:.0}, {:.0}", l[0], l[1], l[2]))))
        );
    }

    let _ = writeln!(
        out,
        "\nRedis requests per event by event type ({PER_TYPE_EVENTS} events of one type \
         through each path, heartbeats included):\n"
    );
    let _ = writeln!(
        out,
        "| event type | spillway (`Buffer::add`) | seed pattern |"
    );
    let _ = writeln!(out, "|---|---|---|");
    let types = runs.first().map_or(&[][..], |r| r.per_type.as_slice());
    for (i, (name, _, _)) in types.iter().enumerate() {
        let _ = writeln!(
            out,
            "| {name} | {} | {} |",
            both(runs, |r| r.per_type.get(i).map(|t| format!("{:.3}", t.1))),
            both(runs, |r| r.per_type.get(i).map(|t| format!("{:.3}", t.2)))
        );
    }

    let per_run = |f: &dyn Fn(&Run) -> Option<f64>| runs.iter().map(f).collect::<Vec<_>>();
    let fmt = |values: &[Option<f64>], digits: usize, unit: &str| {
        values
            .iter()
            .map(|v| v.map_or_else(|| "—".to_owned(), |v| format!("{v:.digits$}{unit}")))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    let vs_ceiling = per_run(&|r| ratio(r, Stage::Add, Stage::RedisCeiling));
    let vs_seed = per_run(&|r| ratio(r, Stage::Add, Stage::SeedPattern));
    let requests = per_run(&|r| {
        r.per_type
            .iter()
            .map(|t| t.1)
            .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))))
    });
    let drain = per_run(&|r| ratio(r, Stage::Drain, Stage::ClickHouseCeiling));
    let http = per_run(&|r| r.figures.get(&Stage::HttpMax).map(Figures::rate));
    let p99 = per_run(&|r| {
        r.figures
            .get(&Stage::HttpHalf)
            .and_then(|f| f.latency)
            .map(|l| l[2])
    });
    let e2e = per_run(&|r| {
        r.figures
            .get(&Stage::EndToEnd)
            .and_then(|f| f.latency)
            .map(|l| l[1])
    });
    let rss = per_run(&|r| {
        [Stage::HttpMax, Stage::HttpHalf, Stage::EndToEnd]
            .iter()
            .filter_map(|s| r.figures.get(s).and_then(|f| f.peak_rss))
            .max()
            .map(|b| b as f64 / (1024.0 * 1024.0))
    });
    let targets: [(&str, String, &str); 8] = [
        (
            "ingest into Redis ≥ 0.5× the Redis ceiling (library add)",
            fmt(&vs_ceiling, 2, "×"),
            status(&vs_ceiling, |v| v >= 0.5),
        ),
        (
            "ingest into Redis ≥ 10× the seed pattern (library add)",
            fmt(&vs_seed, 1, "×"),
            status(&vs_seed, |v| v >= 10.0),
        ),
        (
            "≤ 0.05 Redis requests per event, every event type (worst type)",
            fmt(&requests, 3, ""),
            status(&requests, |v| v <= 0.05),
        ),
        (
            "drain ≥ 0.8× the ClickHouse ceiling",
            fmt(&drain, 2, "×"),
            status(&drain, |v| v >= 0.8),
        ),
        (
            "HTTP ingest ≥ 150k events/s, batched requests",
            fmt(&http, 0, " events/s"),
            status(&http, |v| v >= 150_000.0),
        ),
        (
            "HTTP p99 < 50 ms at half of the maximum rate",
            fmt(&p99, 0, " ms"),
            status(&p99, |v| v < 50.0),
        ),
        (
            "accepted → visible in ClickHouse p95 ≤ 2 s, steady load",
            fmt(&e2e, 0, " ms"),
            status(&e2e, |v| v <= 2000.0),
        ),
        (
            "RSS ≤ 150 MiB under sustained load (spillway serve, peak)",
            fmt(&rss, 0, " MiB"),
            status(&rss, |v| v <= 150.0),
        ),
    ];
    let _ = writeln!(out, "\nTargets (issue #6):\n");
    let _ = writeln!(out, "| target | measured (run 1 / run 2 / …) | status |");
    let _ = writeln!(out, "|---|---|---|");
    for (target, measured, state) in targets {
        let _ = writeln!(out, "| {target} | {measured} | {state} |");
    }

    let _ = writeln!(out, "\nNotes (run 1):\n");
    if let Some(first) = runs.first() {
        for (stage, figures) in &first.figures {
            for note in &figures.notes {
                let _ = writeln!(out, "- {}: {note}", stage.label().replace("**", ""));
            }
        }
    }
    let foreign: Vec<String> = runs
        .iter()
        .enumerate()
        .skip(1)
        .flat_map(|(i, r)| {
            r.figures.iter().flat_map(move |(stage, f)| {
                f.notes
                    .iter()
                    .filter(|n| n.starts_with("other Redis traffic"))
                    .map(move |n| {
                        format!("- run {}, {}: {n}", i + 1, stage.label().replace("**", ""))
                    })
            })
        })
        .collect();
    for line in foreign {
        let _ = writeln!(out, "{line}");
    }
    out
}
