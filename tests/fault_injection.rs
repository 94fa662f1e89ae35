//! Fault injection: nothing acknowledged is lost or duplicated, whatever breaks.
//!
//! `spillway serve` runs on a Redis and a ClickHouse 18.16 of this test's own (free ports, a
//! temporary directory; the shared test servers are never touched) while concurrent clients
//! send it a steady stream of events with fresh UUIDs, and a driver, at random moments:
//!
//! - kills `spillway serve` with SIGKILL and restarts it on the same data directory;
//! - restarts Redis (SIGTERM: with `appendfsync always` it keeps what it acknowledged; `serve`
//!   journals meanwhile), and flushes its scripts (`SCRIPT FLUSH`);
//! - kills ClickHouse and starts it again a few seconds later;
//! - makes inserts slower than the flush lock: two `spillway flush` workers (`serve` ingests
//!   only) with a 2 s lock and a 1 s ClickHouse timeout; ClickHouse paused (SIGSTOP) for three
//!   lock lifetimes while a batch is in flight; then one worker paused while it holds the lock
//!   with a batch in flight, until the other has taken that batch over and flushed it;
//! - pushes corrupt entries straight into the queue (not JSON, not events, not UTF-8, and an
//!   event ClickHouse refuses).
//!
//! A client re-sends a request that got no `202` with the same ids (it may have landed), and
//! tags every attempt in the event's `path` (`/a0`, `/a1`...), so each copy in ClickHouse says
//! which attempt it came from. The stream goes on until the last fault is over (so it may send
//! more than its size). Then everything drains, and the test compares: every acknowledged id in
//! ClickHouse, no attempt landed twice, every corrupt entry in the dead-letter list. It prints
//! one summary line and fails on any loss or duplicate, including an id that landed from two
//! attempts (the first was written, its answer lost to a kill, and the client sent it again):
//! the queue drops an event whose id it took in within its re-send window.
//!
//! Sizes (environment): `SPILLWAY_FAULT_EVENTS` (at least this many events, 100,000),
//! `SPILLWAY_FAULT_KILLS` (10), `SPILLWAY_FAULT_RATE` (events per second the clients send,
//! 2,000), `SPILLWAY_FAULT_SEED` (replays a run's random choices), `SPILLWAY_FAULT_VERBOSE=1`
//! (prints the faults as they happen), `SPILLWAY_FAULT_KEEP=1` (keeps the data and logs, as a
//! failure does). Needs `redis-server`, `clickhouse-server` and `curl` on the PATH.
//!
//! The other tests here are the regression tests of what this one found, each on a Redis and a
//! ClickHouse of its own (see `notes/fault-injection.md`).

use std::collections::{BTreeSet, HashMap};
use std::fmt::Display;
use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::AsyncCommands;
use serde_json::Value;
use tokio::time::Instant;

/// Key prefix of this test's queue (its Redis is its own; the prefix exercises the layout).
const PREFIX: &str = "fault:";
/// ClickHouse database of the events table.
const DATABASE: &str = "fault";
const CLIENTS: usize = 4;
const EVENTS_PER_REQUEST: usize = 200;
/// Sessions per client; each gets a `session_end` at the end, releasing its held screen view.
const SESSIONS_PER_CLIENT: usize = 20;
/// A client gives up on a request that gets no `202` for this long (the test then fails).
const DELIVERY_DEADLINE: Duration = Duration::from_secs(120);
/// The whole run, faults and drain included.
const RUN_DEADLINE: Duration = Duration::from_secs(20 * 60);
/// `serve`'s settings besides its profile.
const SERVE_ARGS: &[&str] = &[
    "--flush-interval-ms",
    "100",
    "--batch-size",
    "2000",
    "--chunk-size",
    "500",
];
/// `serve`'s usual profile: a 10 s flush lock (and 5 s ClickHouse timeout) instead of 60 s, as
/// a killed flusher's lock stops every flusher until it expires.
const NORMAL: &[&str] = &[
    "--flush-lock-ttl-ms",
    "10000",
    "--clickhouse-timeout-ms",
    "5000",
];
/// Lock TTL and ClickHouse timeout of the slow-insert phase (validation wants lock > timeout).
const SLOW_LOCK_TTL: Duration = Duration::from_secs(2);
/// `serve` in the slow-insert phase: the two workers are the only flushers.
const SLOW_SERVE: &[&str] = &["--no-flush", "--shutdown-timeout-ms", "1000"];
const SLOW_PROFILE: &[&str] = &[
    "--flush-lock-ttl-ms",
    "2000",
    "--clickhouse-timeout-ms",
    "1000",
    "--shutdown-timeout-ms",
    "1000",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_events_land_exactly_once_through_kills_and_outages() {
    let settings = Settings::from_env();
    check_run(&settings, |rng| Fault::plan(settings.kills, rng), true).await;
}

/// A flush worker paused (SIGSTOP) while it held the lock, past the lock's expiry, sent its
/// insert when it ran again, after the worker that took its batch over had inserted the same
/// chunk: 500 rows twice, in two runs of three. Here three such takeovers in a row.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flusher_paused_past_its_lock_sends_nothing_when_it_runs_again() {
    let settings = Settings {
        events: 10_000,
        kills: 0,
        ..Settings::from_env()
    };
    check_run(&settings, |_| vec![Fault::PausedFlusher; 3], false).await;
}

/// Runs the stream through the faults `plan` makes and fails on any loss or duplicate; prints
/// the summary when `summary` is set.
async fn check_run(settings: &Settings, plan: impl FnOnce(&mut Rng) -> Vec<Fault>, summary: bool) {
    require_servers();
    let started = Instant::now();
    let scratch = Scratch::new();
    let timeline = Timeline::new(settings.verbose);
    let mut cluster = Cluster::start(&scratch.0, timeline.clone()).await;
    let mut rng = Rng::new(settings.seed);
    let plan = plan(&mut rng);
    let outcome =
        tokio::time::timeout(RUN_DEADLINE, run(&mut cluster, settings, plan, &mut rng)).await;
    let Ok(tally) = outcome else {
        panic!(
            "the run did not finish within {RUN_DEADLINE:?} (seed {})\n{}",
            settings.seed,
            cluster.diagnostics()
        );
    };
    let secs = started.elapsed().as_secs_f64();
    if summary {
        report(&tally.summary());
        report(&format!(
            "fault injection: {} rows, {} requests in {} attempts; {}; {secs:.0} s (seed {})",
            tally.rows,
            tally.requests,
            tally.attempts,
            cluster.evidence(),
            settings.seed
        ));
    }
    let problems = tally.problems();
    assert!(
        problems.is_empty(),
        "{}\n{}\nseed {}\n{}",
        tally.summary(),
        problems.join("\n"),
        settings.seed,
        cluster.diagnostics()
    );
}

/// A ClickHouse 18.16 insert whose answer never came (the server stalled, the flusher timed
/// out) is still executed once the server runs again: a retry of its chunk that looked for the
/// chunk's rows meanwhile inserted them a second time. Found by the run above; here on purpose.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_insert_that_lands_after_its_timeout_is_not_inserted_again() {
    let mut bench = Bench::start().await;
    for round in 1..=3 {
        bench.queue_events(50).await;
        let slow = bench.flusher(Duration::from_secs(1)).await;
        // The insert waits in the stalled server's socket; the flusher gives up after 1 s.
        bench.clickhouse.pause();
        assert!(slow.flush_once().await.is_err(), "the insert timed out");
        // The retry starts while the server is still stalled; then it runs again.
        let retry = tokio::spawn(async move { slow.flush_once().await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        bench.clickhouse.resume();
        let _ = retry.await.expect("the retry");
        bench.drain().await;
        assert_eq!(bench.rows_and_ids().await, (50 * round, 50 * round));
    }
}

/// On ClickHouse 18.16 an attempt at a chunk that still runs (a flusher stopped in the middle of
/// sending it, its lock gone) keeps every other attempt at that chunk from running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_does_not_run_while_an_earlier_attempt_at_its_chunk_still_runs() {
    let mut bench = Bench::start().await;
    bench.queue_events(50).await;
    // A first attempt fails without reaching the server: the batch stays in flight.
    let flusher = bench.flusher(Duration::from_secs(5)).await;
    bench.clickhouse.kill().await;
    assert!(flusher.flush_once().await.is_err());
    bench.clickhouse.spawn();
    // An earlier attempt at chunk 0, still running: ClickHouse reads its rows as they come
    // (ClickHouse 18.16 runs a query once it has read its first MiB, or all of it), and the
    // last ones have not come yet. They never will: the connection closes in the middle of a
    // row, so ClickHouse drops the whole insert.
    let mut conn = bench.redis.connection().await;
    let batch: String = conn
        .hget(format!("{PREFIX}event_buffer:inflight:meta"), "batch_id")
        .await
        .expect("the batch in flight");
    let rows = r#"{"id":"00000000-0000-0000-0000-000000000000","name":"earlier attempt"}"#;
    let rows = format!("{rows}\n").repeat(40_000);
    let mut earlier =
        std::net::TcpStream::connect(("127.0.0.1", bench.clickhouse.ports[0])).expect("connect");
    write!(
        earlier,
        "POST /?query=INSERT%20INTO%20{DATABASE}.events%20FORMAT%20JSONEachRow&query_id={batch}:0 \
         HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 9999999\r\n\r\n{rows}{{\"id\":"
    )
    .expect("send most of an insert");
    let running = format!("SELECT count() FROM system.processes WHERE query_id = '{batch}:0'");
    wait_until(
        "ClickHouse runs the earlier attempt",
        Duration::from_secs(10),
        || {
            let (clickhouse, running) = (&bench.clickhouse, &running);
            async move { clickhouse.sql(running).await.trim() == "1" }
        },
    )
    .await;

    let refused = flusher
        .flush_once()
        .await
        .expect_err("refused while the other runs");
    assert!(refused.to_string().contains("Code: 216"), "{refused}");
    // Cut off in the middle of a row, the earlier attempt fails and inserts nothing.
    drop(earlier);
    wait_until("the earlier attempt ends", Duration::from_secs(10), || {
        let (clickhouse, running) = (&bench.clickhouse, &running);
        async move { clickhouse.sql(running).await.trim() == "0" }
    })
    .await;
    bench.drain().await;
    assert_eq!(bench.rows_and_ids().await, (50, 50));
}

/// A Redis and a ClickHouse of a test's own, an events table, and a queue with a buffer.
struct Bench {
    clickhouse: ClickHouse,
    redis: Redis,
    queue: spillway::Queue,
    buffer: spillway::Buffer,
    _scratch: Scratch,
}

impl Bench {
    async fn start() -> Bench {
        require_servers();
        let scratch = Scratch::new();
        let [redis_port, http, tcp, chdb] = free_ports::<4>();
        let redis = Redis::start(redis_port, scratch.0.join("redis")).await;
        let clickhouse = ClickHouse::start(scratch.0.join("servers"), [http, tcp, chdb]);
        clickhouse.create_events_table().await;
        let held = spillway::QueueSettings::default();
        let queue = spillway::Queue::Redis(
            spillway::RedisQueue::connect(&redis.url(), PREFIX, held)
                .await
                .expect("queue"),
        );
        let batch = spillway::BatchSettings::default();
        let (buffer, _batcher) = spillway::Buffer::start(queue.clone(), batch, held);
        Bench {
            clickhouse,
            redis,
            queue,
            buffer,
            _scratch: scratch,
        }
    }

    async fn queue_events(&self, count: usize) {
        let events = (0..count)
            .map(|_| {
                let text = format!(
                    r#"{{"id":"{}","name":"click","project_id":"fault","created_at":{}}}"#,
                    uuid::Uuid::new_v4(),
                    now_millis()
                );
                spillway::Event::parse(&text).expect("an event")
            })
            .collect();
        let receipt = self.buffer.bulk_add(events).await.expect("buffer");
        receipt.written().await.expect("queued");
    }

    /// A flusher whose ClickHouse requests time out after `timeout` (its lock after twice that).
    async fn flusher(&self, timeout: Duration) -> spillway::Flusher {
        let settings = spillway::ClickHouseSettings {
            url: self.clickhouse.url(),
            database: DATABASE.to_owned(),
            timeout,
            ..spillway::ClickHouseSettings::default()
        };
        let sink = spillway::ClickHouseSink::connect(settings)
            .await
            .expect("sink");
        let flush = spillway::FlushSettings {
            batch_size: 1000,
            chunk_size: 1000,
            lock_ttl: timeout * 2,
        };
        spillway::Flusher::new(self.queue.clone(), spillway::Sink::ClickHouse(sink), flush)
    }

    /// Flushes everything; like the flush loop, retries a failed flush (an attempt at a chunk
    /// is refused while another one still runs).
    async fn drain(&self) {
        let flusher = self.flusher(Duration::from_secs(30)).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Err(err) = flusher.drain().await {
            assert!(Instant::now() < deadline, "drain: {err}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Rows in the events table, and distinct ids among them.
    async fn rows_and_ids(&self) -> (usize, usize) {
        let sql = format!("SELECT count(), uniqExact(id) FROM {DATABASE}.events FORMAT TSV");
        let counts = self.clickhouse.sql(&sql).await;
        let (rows, ids) = counts.trim().split_once('\t').expect("two numbers");
        (rows.parse().expect("rows"), ids.parse().expect("ids"))
    }
}

fn require_servers() {
    for binary in ["redis-server", "clickhouse-server", "curl"] {
        assert!(
            on_path(binary),
            "the fault-injection suite needs `{binary}` on the PATH; `scripts/test.sh` installs \
             it (apt-get install redis-server clickhouse-server curl)"
        );
    }
}

/// The stream and the faults, then the drain and the comparison.
async fn run(cluster: &mut Cluster, settings: &Settings, plan: Vec<Fault>, rng: &mut Rng) -> Tally {
    let stream = Stream::start(cluster.ingest_url(), settings);
    let count = plan.len();
    for (done, fault) in plan.into_iter().enumerate() {
        // Spread over what is left of the stream: after a random share (0.5 to 1.5 times
        // the even one, and that at least a 40th of the stream) of the events not yet
        // acknowledged. The stream goes on, beyond its size if need be, until the last fault is
        // over, so every fault meets traffic and late faults stay apart.
        let acknowledged = stream.acknowledged();
        let left = (settings.events as u64).saturating_sub(acknowledged) as f64;
        let share = (left / (count - done + 1) as f64).max(settings.events as f64 / 40.0);
        let gap = share * (0.5 + rng.unit());
        stream.wait_for(acknowledged + gap as u64, cluster).await;
        tokio::time::sleep(rng.millis(0, 300)).await;
        cluster.inject(fault, rng).await;
    }
    cluster.note(format_args!(
        "faults done; waiting for the stream ({} acknowledged)",
        stream.acknowledged()
    ));
    let requests = stream.finish(settings.events).await;
    cluster.note("stream done; draining");
    cluster.drain().await;
    cluster.tally(&requests).await
}

/// Sizes and switches, from the environment.
struct Settings {
    events: usize,
    kills: usize,
    rate: f64,
    seed: u64,
    verbose: bool,
}

impl Settings {
    fn from_env() -> Settings {
        let seed = std::env::var("SPILLWAY_FAULT_SEED").map_or_else(
            |_| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            },
            |v| parse_env("SPILLWAY_FAULT_SEED", &v),
        );
        Settings {
            events: env_or("SPILLWAY_FAULT_EVENTS", 100_000),
            kills: env_or("SPILLWAY_FAULT_KILLS", 10),
            rate: env_or("SPILLWAY_FAULT_RATE", 2000.0),
            seed,
            verbose: std::env::var_os("SPILLWAY_FAULT_VERBOSE").is_some(),
        }
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).map_or(default, |v| parse_env(name, &v))
}

fn parse_env<T: std::str::FromStr>(name: &str, value: &str) -> T {
    value
        .trim()
        .replace('_', "")
        .parse()
        .unwrap_or_else(|_| panic!("{name}={value:?} is not a number"))
}

/// Whether `binary` is an executable file in a PATH directory.
fn on_path(binary: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(binary).is_file()))
}

/// Written to the process's stderr directly, so `cargo test` shows it even when the test
/// passes (it captures `println!`, not the file descriptor).
fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// xorshift64*: random enough to place faults, and replayable from its seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn millis(&mut self, low: u64, high: u64) -> Duration {
        Duration::from_millis(low + self.next() % (high - low + 1))
    }
}

/// What happened when, for the failure message (and live with `SPILLWAY_FAULT_VERBOSE`).
#[derive(Clone)]
struct Timeline {
    started: Instant,
    lines: Arc<Mutex<Vec<String>>>,
    verbose: bool,
}

impl Timeline {
    fn new(verbose: bool) -> Timeline {
        Timeline {
            started: Instant::now(),
            lines: Arc::default(),
            verbose,
        }
    }

    fn note(&self, text: impl Display) {
        let line = format!("{:>6.1}s  {text}", self.started.elapsed().as_secs_f64());
        if self.verbose {
            report(&format!("fault injection: {line}"));
        }
        self.lines.lock().expect("timeline").push(line);
    }

    fn save(&self, dir: &Path) {
        let _ = std::fs::write(dir.join("timeline.txt"), self.text() + "\n");
    }

    fn text(&self) -> String {
        self.lines.lock().expect("timeline").join("\n")
    }
}

/// A temporary directory for the servers' data and every process's log; kept when the test
/// fails, so the logs can be read.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("spillway-fault-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("create the scratch directory");
        Scratch(dir)
    }
}

/// Whether to keep the data and logs: when the test fails, or on request.
fn keep_scratch() -> bool {
    std::thread::panicking() || std::env::var_os("SPILLWAY_FAULT_KEEP").is_some()
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if keep_scratch() {
            report(&format!(
                "fault injection: data and logs kept in {}",
                self.0.display()
            ));
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Free loopback ports, all distinct (the listeners are held until every port is chosen).
fn free_ports<const N: usize>() -> [u16; N] {
    let listeners: Vec<std::net::TcpListener> = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("a free port"))
        .collect();
    std::array::from_fn(|i| listeners[i].local_addr().expect("local address").port())
}

/// Sends `kill -<signal> <pid>`.
fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .expect("`kill` runs");
    assert!(status.success(), "kill -{signal} {pid} failed");
}

/// Whether a process (not necessarily a child of this one) runs: exists and is no zombie.
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // "pid (comm) state ...": the state follows the last parenthesis.
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
    })
}

/// Polls `ready` every 50 ms until it holds; panics with `what` after `limit`.
async fn wait_until<F, Fut>(what: &str, limit: Duration, mut ready: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !ready().await {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The last `lines` lines of a log file.
fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A `redis-server` of this test's own, persisting every write before acknowledging it.
struct Redis {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Redis {
    async fn start(port: u16, dir: PathBuf) -> Redis {
        std::fs::create_dir_all(&dir).expect("create the Redis directory");
        let mut redis = Redis {
            port,
            dir,
            child: None,
        };
        redis.spawn().await;
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn log(&self) -> PathBuf {
        self.dir.join("redis.log")
    }

    async fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .args(["--maxmemory-policy", "noeviction", "--dir"])
            .arg(&self.dir)
            .arg("--logfile")
            .arg(self.log())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let url = self.url();
        wait_until("Redis answers PING", Duration::from_secs(30), || {
            let url = url.clone();
            async move { ping(&url).await }
        })
        .await;
    }

    /// SIGTERM: Redis fsyncs its append-only file and exits (unlike `SHUTDOWN NOSAVE`).
    async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        signal(child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().expect("redis-server status").is_none() {
            assert!(Instant::now() < deadline, "redis-server ignored SIGTERM");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("Redis URL")
            .get_multiplexed_async_connection()
            .await
            .expect("Redis answers")
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn ping(url: &str) -> bool {
    let Ok(client) = redis::Client::open(url) else {
        return false;
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return false;
    };
    // While it loads its append-only file, Redis answers LOADING.
    redis::cmd("PING")
        .query_async::<String>(&mut conn)
        .await
        .is_ok()
}

/// A ClickHouse 18.16 of this test's own, started and stopped by `scripts/servers.sh`.
struct ClickHouse {
    state: PathBuf,
    ports: [u16; 3],
    pid: u32,
    paused: bool,
    http: reqwest::Client,
}

impl ClickHouse {
    fn start(state: PathBuf, ports: [u16; 3]) -> ClickHouse {
        let mut clickhouse = ClickHouse {
            state,
            ports,
            pid: 0,
            paused: false,
            http: reqwest::Client::builder()
                .no_proxy()
                .pool_max_idle_per_host(0)
                .build()
                .expect("HTTP client"),
        };
        clickhouse.spawn();
        clickhouse
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports[0])
    }

    fn servers_sh(&self, command: &str) -> std::process::Output {
        let [http, tcp, chdb] = self.ports;
        Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/servers.sh"))
            .arg(command)
            .env("SPILLWAY_SERVERS_DIR", &self.state)
            .env("SPILLWAY_CH_HTTP_PORT", http.to_string())
            .env("SPILLWAY_CH_TCP_PORT", tcp.to_string())
            .env("SPILLWAY_CHDB_PORT", chdb.to_string())
            .output()
            .expect("scripts/servers.sh runs")
    }

    fn spawn(&mut self) {
        let out = self.servers_sh("start-clickhouse");
        assert!(
            out.status.success(),
            "scripts/servers.sh start-clickhouse failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            tail(&self.state.join("clickhouse/log/error.log"), 20)
        );
        let pidfile = self.state.join("clickhouse/server.pid");
        let pid = std::fs::read_to_string(&pidfile).expect("ClickHouse pid file");
        self.pid = pid
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{} holds {pid:?}", pidfile.display()));
    }

    /// Kills the server (SIGKILL: inserts in progress die with it) and waits until it is gone;
    /// its data stays.
    async fn kill(&mut self) {
        signal(self.pid, "KILL");
        wait_until("ClickHouse exits", Duration::from_secs(30), || async {
            !running(self.pid)
        })
        .await;
    }

    fn pause(&mut self) {
        signal(self.pid, "STOP");
        self.paused = true;
    }

    fn resume(&mut self) {
        signal(self.pid, "CONT");
        self.paused = false;
    }

    /// `DATABASE.events`, as `spillway schema --variant legacy` prints it.
    async fn create_events_table(&self) {
        self.sql(&format!("CREATE DATABASE IF NOT EXISTS {DATABASE}"))
            .await;
        let schema = Command::new(env!("CARGO_BIN_EXE_spillway"))
            .args(["schema", "--variant", "legacy", "--clickhouse-database"])
            .arg(DATABASE)
            .output()
            .expect("spillway schema runs");
        let ddl: String = String::from_utf8_lossy(&schema.stdout)
            .lines()
            .filter(|line| !line.starts_with("--"))
            .collect::<Vec<_>>()
            .join("\n");
        self.sql(ddl.trim().trim_end_matches(';')).await;
    }

    async fn sql(&self, sql: &str) -> String {
        let response = self
            .http
            .post(self.url())
            .body(sql.to_owned())
            .send()
            .await
            .expect("ClickHouse answers");
        let status = response.status();
        let body = response.text().await.expect("ClickHouse's answer");
        assert!(status.is_success(), "{sql}\n-> {status}: {body}");
        body
    }
}

impl Drop for ClickHouse {
    fn drop(&mut self) {
        if self.paused {
            let _ = Command::new("kill")
                .args(["-CONT", &self.pid.to_string()])
                .status();
        }
        if keep_scratch() {
            // Its data stays for a look (`scripts/servers.sh start-clickhouse` on the same dir).
            let _ = Command::new("kill").arg(self.pid.to_string()).status();
        } else {
            let _ = self.servers_sh("stop");
        }
    }
}

/// A `spillway serve` or `spillway flush` process, killed on drop; its output is appended to
/// a log file.
struct Spillway {
    child: Child,
    log: PathBuf,
}

impl Spillway {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn kill(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("killed");
    }

    /// SIGTERM, then waits for the graceful exit (SIGKILL after `limit`).
    async fn terminate(&mut self, limit: Duration) -> Option<ExitStatus> {
        signal(self.pid(), "TERM");
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() > deadline {
                self.kill();
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Spillway {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = Command::new("kill")
                .args(["-CONT", &self.pid().to_string()])
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The faults the driver injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Kill,
    RestartRedis,
    FlushScripts,
    ClickHouseOutage,
    SlowInserts,
    /// The second half of [`Fault::SlowInserts`] alone.
    PausedFlusher,
    Corrupt,
}

impl Fault {
    /// `kills` kills, one of each outage, three rounds of corrupt entries, in random order.
    fn plan(kills: usize, rng: &mut Rng) -> Vec<Fault> {
        let mut plan = vec![Fault::Kill; kills];
        plan.extend([
            Fault::RestartRedis,
            Fault::FlushScripts,
            Fault::ClickHouseOutage,
            Fault::SlowInserts,
            Fault::Corrupt,
            Fault::Corrupt,
            Fault::Corrupt,
        ]);
        for i in (1..plan.len()).rev() {
            plan.swap(i, rng.below(i + 1));
        }
        plan
    }
}

/// Entries that are not events, each carrying a `garbage-<n>` marker to find it again.
fn corrupt_entries(first: usize) -> Vec<Vec<u8>> {
    let now = now_millis();
    let texts = [
        format!("garbage-{first}: not JSON at all"),
        format!(r#"{{"garbage":"garbage-{}"}}"#, first + 1),
        format!(r#"["garbage-{}"]"#, first + 2),
        format!(
            r#"{{"name":"click","project_id":"fault","path":"garbage-{}""#,
            first + 3
        ),
        // A valid event ClickHouse refuses (its id is no UUID): isolated by halving the chunk.
        format!(
            r#"{{"id":"garbage-{}","name":"click","project_id":"fault","created_at":{now}}}"#,
            first + 4
        ),
    ];
    let mut entries: Vec<Vec<u8>> = texts.into_iter().map(String::into_bytes).collect();
    let mut not_utf8 = format!("garbage-{}: ", first + 5).into_bytes();
    not_utf8.extend_from_slice(b"\xff\xfe not UTF-8");
    entries.push(not_utf8);
    entries
}

/// The `garbage-<n>` markers in a text.
fn garbage_markers(text: &str) -> Vec<usize> {
    text.match_indices("garbage-")
        .filter_map(|(at, marker)| {
            let digits: String = text[at + marker.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().ok()
        })
        .collect()
}

fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The servers, the spillway processes, and what the driver did to them.
struct Cluster {
    dir: PathBuf,
    redis: Redis,
    clickhouse: ClickHouse,
    listen: String,
    serve: Option<Spillway>,
    /// Flags of the running `serve` beyond [`SERVE_ARGS`].
    profile: &'static [&'static str],
    workers: Vec<Spillway>,
    http: reqwest::Client,
    timeline: Timeline,
    kills: usize,
    corrupt: usize,
    /// Whether a paused flush worker's batch was taken over by the other.
    takeover: bool,
}

impl Cluster {
    async fn start(dir: &Path, timeline: Timeline) -> Cluster {
        let [redis_port, http, tcp, chdb, listen] = free_ports::<5>();
        let redis = Redis::start(redis_port, dir.join("redis")).await;
        let clickhouse = ClickHouse::start(dir.join("servers"), [http, tcp, chdb]);
        clickhouse.create_events_table().await;
        let mut cluster = Cluster {
            dir: dir.to_owned(),
            redis,
            clickhouse,
            listen: format!("127.0.0.1:{listen}"),
            serve: None,
            profile: NORMAL,
            workers: Vec::new(),
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(5))
                .build()
                .expect("HTTP client"),
            timeline,
            kills: 0,
            corrupt: 0,
            takeover: false,
        };
        cluster.start_serve(NORMAL).await;
        cluster
    }

    fn note(&self, text: impl Display) {
        self.timeline.note(text);
    }

    fn ingest_url(&self) -> String {
        format!("http://{}/v1/events", self.listen)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// `spillway <subcommand>` on this cluster's servers, with nothing from the environment
    /// (`scripts/test.sh` exports the shared servers' URLs).
    fn spillway(&self, subcommand: &str, args: &[&str], log: &str) -> (Command, PathBuf) {
        let log = self.dir.join(log);
        let mut command = Command::new(env!("CARGO_BIN_EXE_spillway"));
        command
            .arg(subcommand)
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env("REDIS_URL", self.redis.url())
            .env("SPILLWAY_KEY_PREFIX", PREFIX)
            .env("CLICKHOUSE_URL", self.clickhouse.url())
            .env("CLICKHOUSE_DATABASE", DATABASE)
            .env("SPILLWAY_DATA_DIR", self.data_dir());
        (command, log)
    }

    fn spawn(&self, subcommand: &str, args: &[&str], log: &str) -> Spillway {
        let (mut command, log) = self.spillway(subcommand, args, log);
        // The flush loop logs each batch it flushed at debug: a worker's sign of life.
        command.env("RUST_LOG", "info,spillway::service=debug");
        let mut file = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .expect("open the log");
        let _ = writeln!(
            file,
            "---- {:.1}s: spillway {subcommand} {}",
            self.timeline.started.elapsed().as_secs_f64(),
            args.join(" ")
        );
        let child = command
            .stdout(file.try_clone().expect("log handle"))
            .stderr(file)
            .spawn()
            .expect("spillway starts");
        Spillway { child, log }
    }

    /// Starts `serve` with `profile` and waits until it answers.
    async fn start_serve(&mut self, profile: &'static [&'static str]) {
        let mut args = vec!["--listen", self.listen.as_str()];
        args.extend(SERVE_ARGS);
        args.extend(profile);
        let serve = self.spawn("serve", &args, "serve.log");
        self.serve = Some(serve);
        self.profile = profile;
        let health = format!("http://{}/healthz", self.listen);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let answered = self
                .http
                .get(&health)
                .timeout(Duration::from_millis(500))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if answered {
                return;
            }
            let serve = self.serve.as_mut().expect("serve");
            if let Some(status) = serve.exited() {
                panic!(
                    "spillway serve exited ({status}) instead of starting:\n{}",
                    tail(&serve.log, 30)
                );
            }
            assert!(
                Instant::now() < deadline,
                "spillway serve did not answer within 60 s:\n{}",
                tail(&serve.log, 30)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops `serve` gracefully (SIGTERM); it exits 0 within its shutdown timeout.
    async fn stop_serve(&mut self) {
        let Some(mut serve) = self.serve.take() else {
            return;
        };
        let status = serve.terminate(Duration::from_secs(60)).await;
        assert!(
            status.is_some_and(|s| s.success()),
            "spillway serve did not exit 0 on SIGTERM ({status:?}):\n{}",
            tail(&serve.log, 30)
        );
    }

    async fn inject(&mut self, fault: Fault, rng: &mut Rng) {
        match fault {
            Fault::Kill => {
                self.kills += 1;
                let down = rng.millis(0, 500);
                self.note(format_args!(
                    "kill #{}: SIGKILL serve, restart after {down:?}",
                    self.kills
                ));
                self.serve.as_mut().expect("serve").kill();
                tokio::time::sleep(down).await;
                self.start_serve(self.profile).await;
            }
            Fault::RestartRedis => {
                let down = rng.millis(500, 2000);
                self.note(format_args!(
                    "Redis: SIGTERM, restart after {down:?} (serve journals meanwhile)"
                ));
                self.redis.stop().await;
                tokio::time::sleep(down).await;
                self.redis.spawn().await;
                self.note("Redis back");
            }
            Fault::FlushScripts => {
                self.note("Redis: SCRIPT FLUSH");
                let mut conn = self.redis.connection().await;
                redis::cmd("SCRIPT")
                    .arg("FLUSH")
                    .query_async::<()>(&mut conn)
                    .await
                    .expect("SCRIPT FLUSH");
            }
            Fault::ClickHouseOutage => {
                let down = rng.millis(2000, 4000);
                self.note(format_args!("ClickHouse: SIGKILL, restart after {down:?}"));
                self.clickhouse.kill().await;
                tokio::time::sleep(down).await;
                self.clickhouse.spawn();
                self.note("ClickHouse back");
            }
            Fault::SlowInserts => self.slow_inserts(true).await,
            Fault::PausedFlusher => self.slow_inserts(false).await,
            Fault::Corrupt => {
                let entries = corrupt_entries(self.corrupt);
                self.corrupt += entries.len();
                self.note(format_args!(
                    "{} corrupt entries pushed into the queue",
                    entries.len()
                ));
                let mut conn = self.redis.connection().await;
                let _: usize = conn
                    .rpush(format!("{PREFIX}event_buffer:queue"), entries)
                    .await
                    .expect("RPUSH");
            }
        }
    }

    /// Inserts slower than the flush lock. `serve` (ingest only now) and two `spillway flush`
    /// workers get a 2 s lock and a 1 s ClickHouse timeout. With `stall_clickhouse`,
    /// ClickHouse is paused for three lock lifetimes while a batch is in flight; then a worker
    /// is paused holding the lock until the other has taken its batch over.
    async fn slow_inserts(&mut self, stall_clickhouse: bool) {
        self.note("slow inserts: two flush workers with a 2 s lock and a 1 s timeout");
        self.stop_serve().await;
        self.start_serve(SLOW_SERVE).await;
        let mut args = SERVE_ARGS.to_vec();
        args.extend(SLOW_PROFILE);
        self.workers = (1..=2)
            .map(|n| self.spawn("flush", &args, &format!("flush-{n}.log")))
            .collect();
        // Each must be past its start (which needs ClickHouse) before ClickHouse is paused.
        for n in 0..self.workers.len() {
            self.wait_until_flushing(n).await;
        }

        if stall_clickhouse {
            self.wait_for_in_flight().await;
            self.clickhouse.pause();
            self.note("ClickHouse paused (SIGSTOP) with a batch in flight");
            tokio::time::sleep(SLOW_LOCK_TTL * 3).await;
            self.clickhouse.resume();
            self.note("ClickHouse resumed");
        }

        self.take_over_a_paused_flusher().await;

        for mut worker in std::mem::take(&mut self.workers) {
            let status = worker.terminate(Duration::from_secs(30)).await;
            assert!(
                status.is_some_and(|s| s.success()),
                "a flush worker did not exit 0 on SIGTERM ({status:?}):\n{}",
                tail(&worker.log, 30)
            );
        }
        self.stop_serve().await;
        self.start_serve(NORMAL).await;
        self.note("slow inserts over: flush workers stopped, serve back to its defaults");
    }

    /// A flusher slower than its lock: worker 1 is paused (SIGSTOP) holding the lock with a
    /// batch in flight; worker 2 must take the batch over once the lock expires and flush it,
    /// and worker 1, resumed, must not commit anything.
    async fn take_over_a_paused_flusher(&mut self) {
        let (first, second) = (self.workers[0].pid(), self.workers[1].pid());
        // Worker 2 waits, paused, until worker 1 is caught; a lock it held meanwhile expires
        // and worker 1 takes its batch over.
        signal(second, "STOP");
        tokio::time::sleep(SLOW_LOCK_TTL + Duration::from_millis(500)).await;
        let mut conn = self.redis.connection().await;
        let mut batch = None;
        for _ in 0..20 {
            // Right after worker 1 claimed a new batch: it is building its first insert.
            let seen = in_flight_batch(&mut conn).await;
            wait_for_another_batch(&mut conn, seen.as_deref()).await;
            signal(first, "STOP");
            // Worker 1 is the only flusher running: a lock held now is its own.
            let lock: Option<String> = conn.get(format!("{PREFIX}lock:event")).await.expect("GET");
            batch = in_flight_batch(&mut conn).await.filter(|_| lock.is_some());
            if batch.is_some() {
                break;
            }
            signal(first, "CONT");
        }
        let Some(batch) = batch else {
            signal(first, "CONT");
            signal(second, "CONT");
            panic!(
                "flush worker 1 never held the lock with a batch in flight\n{}",
                self.diagnostics()
            );
        };
        self.note(format_args!(
            "flush worker 1 paused holding the lock, batch {batch} in flight; worker 2 resumed"
        ));
        signal(second, "CONT");
        let mut batch_left = false;
        for _ in 0..600 {
            if in_flight_batch(&mut conn).await.as_ref() != Some(&batch) {
                batch_left = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        signal(first, "CONT");
        assert!(
            batch_left,
            "worker 2 did not take over the batch of the paused worker 1 within 30 s"
        );
        self.takeover = true;
        self.note("worker 2 took the batch over and flushed it; worker 1 resumed");
    }

    /// Waits until flush worker `n` has flushed a batch (its debug log says `flushed`).
    async fn wait_until_flushing(&mut self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let worker = &mut self.workers[n];
        loop {
            let log = std::fs::read_to_string(&worker.log).unwrap_or_default();
            if log.contains(" flushed") {
                return;
            }
            if let Some(status) = worker.exited() {
                panic!("flush worker {} exited ({status}):\n{log}", n + 1);
            }
            assert!(
                Instant::now() < deadline,
                "flush worker {} flushed nothing within 60 s:\n{log}",
                n + 1
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_for_in_flight(&self) {
        let mut conn = self.redis.connection().await;
        let key = format!("{PREFIX}event_buffer:inflight");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let exists: bool = conn.exists(&key).await.expect("EXISTS");
            if exists {
                return;
            }
            if Instant::now() > deadline {
                self.note("no batch in flight for 10 s; going on");
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn buffer_stats(&self) -> Option<Value> {
        let url = format!("http://{}/v1/buffer", self.listen);
        let response = self.http.get(url).send().await.ok()?;
        response.json().await.ok()
    }

    /// Waits until nothing is queued or in flight, stops `serve` gracefully, checks its
    /// journal is empty, and runs `spillway drain` to be sure.
    async fn drain(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let stats = self.buffer_stats().await;
            let idle = stats
                .as_ref()
                .is_some_and(|s| s["queued"] == 0 && s["in_flight"] == 0);
            if idle {
                self.note(format_args!("drained: {}", stats.unwrap_or_default()));
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the queue did not drain within 180 s; last /v1/buffer: {stats:?}\n{}",
                self.diagnostics()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.stop_serve().await;
        let journal = rusqlite::Connection::open_with_flags(
            self.data_dir().join("journal.db"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .expect("open the outage journal");
        let journaled: i64 = journal
            .query_row("SELECT count(*) FROM journal", [], |row| row.get(0))
            .expect("read the outage journal");
        assert_eq!(journaled, 0, "the outage journal still holds micro-batches");
        let (mut drain, _) = self.spillway("drain", &[], "drain.log");
        let out = drain.output().expect("spillway drain runs");
        assert!(
            out.status.success(),
            "spillway drain failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.note(format_args!(
            "spillway drain: {}",
            String::from_utf8_lossy(&out.stdout).trim()
        ));
    }

    /// Compares what the clients sent and had acknowledged with ClickHouse and the
    /// dead-letter list.
    async fn tally(&self, requests: &[Request]) -> Tally {
        let rows = self
            .clickhouse
            .sql(&format!(
                "SELECT toString(id), path, count() FROM {DATABASE}.events GROUP BY id, path \
                 FORMAT TabSeparated"
            ))
            .await;
        let mut landed: HashMap<String, Vec<(usize, u64)>> = HashMap::new();
        let mut foreign = Vec::new();
        let mut total_rows = 0;
        for line in rows.lines() {
            let mut fields = line.split('\t');
            let (Some(id), Some(path), Some(count)) = (fields.next(), fields.next(), fields.next())
            else {
                panic!("unexpected ClickHouse row {line:?}");
            };
            let count: u64 = count.parse().expect("a count");
            total_rows += count;
            match path.strip_prefix("/a").and_then(|a| a.parse().ok()) {
                Some(attempt) => landed
                    .entry(id.to_owned())
                    .or_default()
                    .push((attempt, count)),
                None => foreign.push(format!("{id} {path}")),
            }
        }

        let mut conn = self.redis.connection().await;
        let records: Vec<Vec<u8>> = conn
            .lrange(format!("{PREFIX}event_buffer:dead_letter"), 0, -1)
            .await
            .expect("LRANGE dead letters");
        let mut corrupt_found = BTreeSet::new();
        let mut dead_texts = Vec::new();
        for record in &records {
            let text = String::from_utf8_lossy(record);
            let entry = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["entry"].as_str().map(str::to_owned))
                .unwrap_or_else(|| text.clone().into_owned());
            let markers = garbage_markers(&entry);
            if markers.is_empty() {
                dead_texts.push(entry);
            }
            corrupt_found.extend(markers);
        }

        let mut tally = Tally {
            kills: self.kills,
            corrupt: self.corrupt,
            dead_lettered: corrupt_found.len(),
            rows: total_rows,
            foreign,
            ..Tally::default()
        };
        tally.dead_lettered_other = dead_texts.len();
        for request in requests {
            tally.requests += 1;
            tally.attempts += request.outcomes.len();
            let acknowledged = request.outcomes.contains(&Outcome::Acknowledged);
            for id in &request.ids {
                tally.sent += 1;
                let copies = landed.remove(id).unwrap_or_default();
                if acknowledged {
                    tally.acknowledged += 1;
                } else {
                    tally
                        .never_acknowledged
                        .push(format!("{id} {:?}", request.outcomes));
                }
                if !copies.is_empty() {
                    tally.landed += 1;
                }
                if copies.iter().any(|&(_, count)| count > 1) {
                    tally.duplicated.push(format!("{id} {copies:?}"));
                }
                if copies.len() > 1 {
                    tally.resent_twice.push(id.clone());
                }
                let refused = copies.iter().find(|&&(attempt, _)| {
                    matches!(
                        request.outcomes.get(attempt),
                        Some(Outcome::Refused(_)) | None
                    )
                });
                if let Some(&(attempt, _)) = refused {
                    tally
                        .phantom
                        .push(format!("{id} attempt {attempt} of {:?}", request.outcomes));
                }
                if acknowledged && copies.is_empty() {
                    if dead_texts.iter().any(|t| t.contains(id.as_str())) {
                        tally.valid_dead_lettered.push(id.clone());
                    } else {
                        tally.lost.push(id.clone());
                    }
                }
            }
        }
        tally.foreign.extend(
            landed
                .into_iter()
                .map(|(id, copies)| format!("{id} {copies:?}")),
        );
        tally
    }

    /// How often the logs show the faults biting: lock takeovers, journaling, flush retries.
    fn evidence(&self) -> String {
        let logs: String = ["serve.log", "flush-1.log", "flush-2.log"]
            .iter()
            .map(|name| std::fs::read_to_string(self.dir.join(name)).unwrap_or_default())
            .collect();
        let count = |needle: &str| logs.matches(needle).count();
        let takeover = if self.takeover {
            "a paused worker's batch taken over"
        } else {
            "no paused worker caught holding the lock"
        };
        format!(
            "{takeover}; logs: {} lock lost, {} journaling, {} journal replays at start, \
             {} flush retries, {} rows dead-lettered by ClickHouse",
            count("flush lock was lost"),
            count("journaling micro-batches"),
            count("replaying them first"),
            count("flush failed"),
            count("the sink rejected a row"),
        )
    }

    /// The timeline and the tail of `serve`'s log, for a failure message.
    fn diagnostics(&self) -> String {
        format!(
            "timeline:\n{}\n{}\nserve.log (last lines):\n{}",
            self.timeline.text(),
            self.evidence(),
            tail(&self.dir.join("serve.log"), 40)
        )
    }
}

impl Drop for Cluster {
    /// The processes stop with their guards; the timeline joins the logs (kept on failure).
    fn drop(&mut self) {
        self.timeline.save(&self.dir);
    }
}

/// The id of the batch in flight, if any.
async fn in_flight_batch(conn: &mut redis::aio::MultiplexedConnection) -> Option<String> {
    conn.hget(format!("{PREFIX}event_buffer:inflight:meta"), "batch_id")
        .await
        .expect("HGET")
}

/// Waits (up to 10 s) until a batch other than `seen` is in flight.
async fn wait_for_another_batch(conn: &mut redis::aio::MultiplexedConnection, seen: Option<&str>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let batch = in_flight_batch(conn).await;
        if batch.is_some() && batch.as_deref() != seen {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// What became of one attempt to send a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// `202`, every event accepted.
    Acknowledged,
    /// `503`: the events may still be written (the request timed out waiting for them).
    Unavailable,
    /// No answer (connection refused or reset, timeout): the events may have been written.
    NoAnswer,
    /// Another status, or a `202` that did not accept every event.
    Refused(u16),
}

/// One request's events and the outcome of each attempt to send it.
struct Request {
    ids: Vec<String>,
    outcomes: Vec<Outcome>,
}

/// One event of a request; rendered again for each attempt, with the attempt in `path`.
struct Draft {
    id: String,
    name: &'static str,
    session: usize,
    created_at: u64,
}

/// Concurrent clients sending the events at a steady rate, each request until it gets `202`.
struct Stream {
    acknowledged: Arc<AtomicU64>,
    /// Events the clients send at least; they go on until the driver sets it.
    size: Arc<AtomicUsize>,
    clients: Vec<tokio::task::JoinHandle<Vec<Request>>>,
}

impl Stream {
    fn start(url: String, settings: &Settings) -> Stream {
        let acknowledged = Arc::new(AtomicU64::new(0));
        let size = Arc::new(AtomicUsize::new(usize::MAX));
        let next_request = Arc::new(AtomicUsize::new(0));
        let pacer = Arc::new(Pacer::new(settings.rate));
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("HTTP client");
        let clients = (0..CLIENTS)
            .map(|client| {
                let sender = Sender {
                    client,
                    http: http.clone(),
                    url: url.clone(),
                    acknowledged: acknowledged.clone(),
                    size: size.clone(),
                };
                let (next_request, pacer) = (next_request.clone(), pacer.clone());
                let seed = settings.seed ^ client as u64;
                tokio::spawn(async move { sender.run(&next_request, &pacer, seed).await })
            })
            .collect();
        Stream {
            acknowledged,
            size,
            clients,
        }
    }

    fn acknowledged(&self) -> u64 {
        self.acknowledged.load(Ordering::Relaxed)
    }

    /// Waits until `count` events are acknowledged; fails if the stream stalls for 2 minutes.
    async fn wait_for(&self, count: u64, cluster: &Cluster) {
        let mut last = (self.acknowledged(), Instant::now());
        while self.acknowledged() < count {
            let now = self.acknowledged();
            if now != last.0 {
                last = (now, Instant::now());
            }
            assert!(
                last.1.elapsed() < Duration::from_secs(120),
                "no event acknowledged for 2 minutes ({now} so far)\n{}",
                cluster.diagnostics()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Lets the clients stop once `events` are sent (or now, if they are), and waits for them.
    async fn finish(self, events: usize) -> Vec<Request> {
        self.size.store(events, Ordering::Relaxed);
        let mut requests = Vec::new();
        for client in self.clients {
            requests.extend(client.await.expect("a client task"));
        }
        requests
    }
}

/// Spreads the requests of all clients evenly over time, at `rate` events per second.
struct Pacer {
    started: Instant,
    per_event: Duration,
    reserved: AtomicU64,
}

impl Pacer {
    fn new(rate: f64) -> Pacer {
        Pacer {
            started: Instant::now(),
            per_event: Duration::from_secs_f64(1.0 / rate.max(1.0)),
            reserved: AtomicU64::new(0),
        }
    }

    async fn wait(&self, events: usize) {
        let before = self.reserved.fetch_add(events as u64, Ordering::Relaxed);
        tokio::time::sleep_until(self.started + self.per_event.mul_f64(before as f64)).await;
    }
}

/// One client: screen views and clicks in its own sessions, then a `session_end` for each.
struct Sender {
    client: usize,
    http: reqwest::Client,
    url: String,
    acknowledged: Arc<AtomicU64>,
    size: Arc<AtomicUsize>,
}

impl Sender {
    async fn run(self, next_request: &AtomicUsize, pacer: &Pacer, seed: u64) -> Vec<Request> {
        let mut rng = Rng::new(seed);
        let mut requests = Vec::new();
        loop {
            pacer.wait(EVENTS_PER_REQUEST).await;
            let first = next_request.fetch_add(1, Ordering::Relaxed) * EVENTS_PER_REQUEST;
            let size = self.size.load(Ordering::Relaxed);
            if first >= size {
                break;
            }
            let count = EVENTS_PER_REQUEST.min(size - first);
            let drafts: Vec<Draft> = (0..count)
                .map(|_| Draft {
                    id: uuid::Uuid::new_v4().to_string(),
                    name: if rng.below(2) == 0 {
                        "screen_view"
                    } else {
                        "click"
                    },
                    session: rng.below(SESSIONS_PER_CLIENT),
                    created_at: now_millis(),
                })
                .collect();
            requests.push(self.deliver(&drafts).await);
        }
        // The sessions end: their last held screen views are released into the queue.
        let ends: Vec<Draft> = (0..SESSIONS_PER_CLIENT)
            .map(|session| Draft {
                id: uuid::Uuid::new_v4().to_string(),
                name: "session_end",
                session,
                created_at: now_millis(),
            })
            .collect();
        requests.push(self.deliver(&ends).await);
        requests
    }

    fn body(&self, drafts: &[Draft], attempt: usize) -> String {
        let client = self.client;
        let events: Vec<String> = drafts
            .iter()
            .map(|d| {
                format!(
                    r#"{{"id":"{}","name":"{}","project_id":"fault","session_id":"s{client}-{}","profile_id":"u{client}-{}","created_at":{},"path":"/a{attempt}"}}"#,
                    d.id, d.name, d.session, d.session, d.created_at
                )
            })
            .collect();
        format!("[{}]", events.join(","))
    }

    /// Sends the request until it is acknowledged, with the same ids every time.
    async fn deliver(&self, drafts: &[Draft]) -> Request {
        let deadline = Instant::now() + DELIVERY_DEADLINE;
        let mut outcomes = Vec::new();
        loop {
            let outcome = self.attempt(drafts, outcomes.len()).await;
            outcomes.push(outcome);
            match outcome {
                Outcome::Acknowledged => {
                    self.acknowledged
                        .fetch_add(drafts.len() as u64, Ordering::Relaxed);
                    break;
                }
                Outcome::Refused(_) => break,
                Outcome::Unavailable | Outcome::NoAnswer if Instant::now() > deadline => break,
                Outcome::Unavailable | Outcome::NoAnswer => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        Request {
            ids: drafts.iter().map(|d| d.id.clone()).collect(),
            outcomes,
        }
    }

    async fn attempt(&self, drafts: &[Draft], attempt: usize) -> Outcome {
        let sent = self
            .http
            .post(&self.url)
            .header("content-type", "application/json")
            .body(self.body(drafts, attempt))
            .send()
            .await;
        let Ok(response) = sent else {
            return Outcome::NoAnswer;
        };
        match response.status().as_u16() {
            202 => {
                // The status line is the acknowledgement; a body lost to a kill changes nothing.
                let accepted = response
                    .json::<Value>()
                    .await
                    .ok()
                    .map(|v| v["accepted"].clone());
                match accepted {
                    Some(n) if n != drafts.len() => Outcome::Refused(202),
                    _ => Outcome::Acknowledged,
                }
            }
            503 => Outcome::Unavailable,
            status => Outcome::Refused(status),
        }
    }
}

/// The comparison's figures, and the first offending ids of each kind.
#[derive(Default)]
struct Tally {
    sent: usize,
    acknowledged: usize,
    /// Distinct ids found in ClickHouse.
    landed: usize,
    rows: u64,
    requests: usize,
    attempts: usize,
    /// Ids one attempt of which landed more than once: spillway duplicated a write.
    duplicated: Vec<String>,
    /// Ids that landed from two attempts: the client re-sent a request whose first attempt
    /// landed without an answer, and the queue took the id in twice.
    resent_twice: Vec<String>,
    lost: Vec<String>,
    never_acknowledged: Vec<String>,
    /// Ids that landed from an attempt that was refused.
    phantom: Vec<String>,
    /// Rows that are not this stream's, or whose attempt tag is missing.
    foreign: Vec<String>,
    valid_dead_lettered: Vec<String>,
    /// Corrupt entries found in the dead-letter list, of `corrupt` pushed.
    dead_lettered: usize,
    corrupt: usize,
    /// Dead-letter records that are neither corrupt entries nor events of the stream.
    dead_lettered_other: usize,
    kills: usize,
}

impl Tally {
    fn summary(&self) -> String {
        format!(
            "fault injection: sent {}, acknowledged {}, landed {}, duplicated {}, \
             dead-lettered {} (of {} corrupt), lost {}, kills {}; requests sent again {}, \
             re-sent and landed twice {}",
            self.sent,
            self.acknowledged,
            self.landed,
            self.duplicated.len(),
            self.dead_lettered,
            self.corrupt,
            self.lost.len(),
            self.kills,
            self.attempts - self.requests,
            self.resent_twice.len()
        )
    }

    fn problems(&self) -> Vec<String> {
        let first = |ids: &[String]| ids.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
        let mut problems = Vec::new();
        let mut check = |label: &str, ids: &[String]| {
            if !ids.is_empty() {
                problems.push(format!("{} {label}, first: {}", ids.len(), first(ids)));
            }
        };
        check("acknowledged events lost", &self.lost);
        check(
            "events duplicated (one attempt landed twice)",
            &self.duplicated,
        );
        check(
            "events landed twice from a re-sent request",
            &self.resent_twice,
        );
        check("events never acknowledged", &self.never_acknowledged);
        check("events landed from a refused attempt", &self.phantom);
        check("rows in ClickHouse the stream did not send", &self.foreign);
        check("valid events dead-lettered", &self.valid_dead_lettered);
        if self.dead_lettered != self.corrupt || self.dead_lettered_other > 0 {
            problems.push(format!(
                "{} of {} corrupt entries dead-lettered; {} other dead-letter records",
                self.dead_lettered, self.corrupt, self.dead_lettered_other
            ));
        }
        problems
    }
}
