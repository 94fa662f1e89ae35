//! The `spillway` command line: parses flags, sets up logging, and calls the library.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use spillway::config::{ClickHouseConfig, Config, LogFormat, RedisConfig};
use spillway::workload::{Workload, WorkloadSettings};
use spillway::{backend, service, Buffer, Event, Flusher, SchemaVariant};

/// A durable event buffer between analytics ingest and ClickHouse.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP service: ingest, query, live feed, metrics, and a flusher.
    Serve,
    /// Run a flush-only worker until SIGTERM / Ctrl-C.
    Flush,
    /// Add every event of an NDJSON file (or `-` for stdin) through the buffer.
    Import {
        /// The file to read; `-` reads standard input.
        #[arg(default_value = "-")]
        file: PathBuf,
    },
    /// Flush the queue into the sink until it is empty; prints the rows inserted.
    Drain,
    /// Run read-only SQL on the embedded database (e.g. `SELECT name, count(*) FROM events
    /// GROUP BY name`); prints tab-separated rows with a header. Works while `serve` runs.
    Query {
        /// The SQL statement.
        sql: String,
    },
    /// Inspect or act on the dead-letter list.
    DeadLetter {
        #[command(subcommand)]
        action: DeadLetterAction,
    },
    /// Print the effective configuration (secrets redacted) as TOML.
    Config,
    /// Print the DDL of the ClickHouse events table.
    Schema {
        /// Which table shape: `current` ClickHouse (Map, DateTime64) or `legacy` 18.16.
        #[arg(long, value_enum)]
        variant: Option<SchemaVariant>,
    },
    /// Print a deterministic OpenPanel-like workload as NDJSON (for demos and benchmarks).
    Generate {
        /// Number of events.
        #[arg(long, default_value_t = 100_000)]
        events: usize,
        /// Seed of the pseudo-random sequence.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

#[derive(Subcommand)]
enum DeadLetterAction {
    /// Print the records, oldest first, one JSON object per line (`reason`, `code`, `entry`, `at`).
    List,
    /// Queue the records' entries again (an entry still invalid comes back with a new record).
    Replay {
        /// Most records to replay.
        #[arg(long, default_value_t = 10_000)]
        max: usize,
    },
    /// Delete every record.
    Purge,
}

/// Settings from flags and environment; they override the config file, which overrides the
/// defaults.
#[derive(Args)]
struct ConfigArgs {
    /// TOML config file.
    #[arg(long, env = "SPILLWAY_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Directory of the embedded queue and sink.
    #[arg(long, env = "SPILLWAY_DATA_DIR", global = true)]
    data_dir: Option<PathBuf>,
    /// Redis URL; without it, the embedded queue is used.
    #[arg(long, env = "REDIS_URL", global = true)]
    redis_url: Option<String>,
    /// Redis Cluster seed nodes, comma-separated (instead of --redis-url).
    #[arg(
        long,
        env = "REDIS_CLUSTER_NODES",
        global = true,
        value_delimiter = ','
    )]
    redis_cluster_nodes: Option<Vec<String>>,
    /// Queue shards on Redis, each flushed by one flusher at a time (1 on a server, 16 on a
    /// cluster).
    #[arg(long, env = "SPILLWAY_REDIS_SHARDS", global = true)]
    redis_shards: Option<usize>,
    /// Replicas each Redis write must reach (WAIT) before events are acknowledged.
    #[arg(long, env = "SPILLWAY_REDIS_WAIT_REPLICAS", global = true)]
    redis_wait_replicas: Option<u32>,
    /// Longest WAIT for replicas, ms.
    #[arg(long, env = "SPILLWAY_REDIS_WAIT_TIMEOUT_MS", global = true)]
    redis_wait_timeout_ms: Option<u64>,
    /// Prefix for every Redis key and channel; empty keeps OpenPanel's names.
    #[arg(long, env = "SPILLWAY_KEY_PREFIX", global = true)]
    key_prefix: Option<String>,
    /// ClickHouse HTTP URL; without it, the embedded sink is used.
    #[arg(long, env = "CLICKHOUSE_URL", global = true)]
    clickhouse_url: Option<String>,
    /// ClickHouse user.
    #[arg(long, env = "CLICKHOUSE_USER", global = true)]
    clickhouse_user: Option<String>,
    /// ClickHouse password.
    #[arg(
        long,
        env = "CLICKHOUSE_PASSWORD",
        hide_env_values = true,
        global = true
    )]
    clickhouse_password: Option<String>,
    /// Database of the events table.
    #[arg(long, env = "CLICKHOUSE_DATABASE", global = true)]
    clickhouse_database: Option<String>,
    /// The events table.
    #[arg(long, env = "CLICKHOUSE_TABLE", global = true)]
    clickhouse_table: Option<String>,
    /// Timeout of one ClickHouse request, ms.
    #[arg(long, env = "CLICKHOUSE_TIMEOUT_MS", global = true)]
    clickhouse_timeout_ms: Option<u64>,
    /// Address to listen on.
    #[arg(long, env = "SPILLWAY_LISTEN", global = true)]
    listen: Option<String>,
    /// Events per micro-batch write.
    #[arg(long, env = "EVENT_BUFFER_MICRO_BATCH_SIZE", global = true)]
    micro_batch_size: Option<usize>,
    /// Longest wait, ms, before a partial micro-batch is written.
    #[arg(long, env = "EVENT_BUFFER_MICRO_BATCH_MS", global = true)]
    micro_batch_ms: Option<u64>,
    /// Seconds during which an event `id` already taken in is dropped as a re-send (0: off).
    #[arg(long, env = "SPILLWAY_DEDUP_WINDOW_SECS", global = true)]
    dedup_window_secs: Option<u64>,
    /// Events claimed per flush.
    #[arg(long, env = "EVENT_BUFFER_BATCH_SIZE", global = true)]
    batch_size: Option<usize>,
    /// Rows per insert.
    #[arg(long, env = "EVENT_BUFFER_CHUNK_SIZE", global = true)]
    chunk_size: Option<usize>,
    /// Expiry of the flush lock, ms (renewed after every chunk); must exceed the ClickHouse
    /// timeout.
    #[arg(long, env = "SPILLWAY_FLUSH_LOCK_TTL_MS", global = true)]
    flush_lock_ttl_ms: Option<u64>,
    /// Pause between flushes when the queue holds less than a batch, ms.
    #[arg(long, env = "SPILLWAY_FLUSH_INTERVAL_MS", global = true)]
    flush_interval_ms: Option<u64>,
    /// Serve ingest and queries only; flushing is left to `spillway flush` workers.
    #[arg(long, global = true)]
    no_flush: bool,
    /// With a Redis queue, do not journal micro-batches Redis cannot take (they wait in memory).
    #[arg(long, global = true)]
    no_journal: bool,
    /// Most events the outage journal holds before ingest answers 503.
    #[arg(long, env = "SPILLWAY_JOURNAL_MAX_EVENTS", global = true)]
    journal_max_events: Option<u64>,
    /// Events accepted but not yet written that the process may hold before answering 503.
    #[arg(long, env = "SPILLWAY_MAX_PENDING_EVENTS", global = true)]
    max_pending_events: Option<usize>,
    /// Largest request body in bytes (after decompression).
    #[arg(long, env = "SPILLWAY_MAX_BODY_BYTES", global = true)]
    max_body_bytes: Option<usize>,
    /// Most events in one request.
    #[arg(long, env = "SPILLWAY_MAX_EVENTS_PER_REQUEST", global = true)]
    max_events_per_request: Option<usize>,
    /// A project's write key, as PROJECT=KEY; repeatable. With any set, ingest requires them.
    #[arg(
        long = "write-key",
        env = "SPILLWAY_WRITE_KEYS",
        value_delimiter = ',',
        hide_env_values = true,
        global = true
    )]
    write_keys: Vec<String>,
    /// Longest an ingest request waits for its events to be durable, ms; then 503.
    #[arg(long, env = "SPILLWAY_REQUEST_TIMEOUT_MS", global = true)]
    request_timeout_ms: Option<u64>,
    /// Longest graceful shutdown, ms.
    #[arg(long, env = "SPILLWAY_SHUTDOWN_TIMEOUT_MS", global = true)]
    shutdown_timeout_ms: Option<u64>,
    /// Log format.
    #[arg(long, env = "SPILLWAY_LOG_FORMAT", value_enum, global = true)]
    log_format: Option<LogFormat>,
}

impl ConfigArgs {
    /// Defaults, then the file, then these flags and variables.
    fn load(&self) -> anyhow::Result<Config> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        fn set<T: Clone>(target: &mut T, value: Option<&T>) {
            if let Some(value) = value {
                *target = value.clone();
            }
        }
        set(&mut config.data_dir, self.data_dir.as_ref());
        // A server or a cluster given here replaces the file's choice of either.
        if self.redis_url.is_some() || self.redis_cluster_nodes.is_some() {
            let redis = config.redis.get_or_insert_with(|| RedisConfig::single(""));
            redis.url = self.redis_url.clone().unwrap_or_default();
            redis.cluster_nodes = self.redis_cluster_nodes.clone().unwrap_or_default();
        }
        if let Some(redis) = &mut config.redis {
            set(&mut redis.key_prefix, self.key_prefix.as_ref());
            if self.redis_shards.is_some() {
                redis.shards = self.redis_shards;
            }
            set(&mut redis.wait_replicas, self.redis_wait_replicas.as_ref());
            set(
                &mut redis.wait_timeout_ms,
                self.redis_wait_timeout_ms.as_ref(),
            );
        }
        if let Some(url) = &self.clickhouse_url {
            match &mut config.clickhouse {
                Some(clickhouse) => clickhouse.url.clone_from(url),
                None => {
                    config.clickhouse = Some(toml::from_str::<ClickHouseConfig>(&format!(
                        "url = {}",
                        toml::Value::String(url.clone())
                    ))?);
                }
            }
        }
        if let Some(clickhouse) = &mut config.clickhouse {
            if self.clickhouse_user.is_some() {
                clickhouse.user.clone_from(&self.clickhouse_user);
            }
            if self.clickhouse_password.is_some() {
                clickhouse.password.clone_from(&self.clickhouse_password);
            }
            set(&mut clickhouse.database, self.clickhouse_database.as_ref());
            set(&mut clickhouse.table, self.clickhouse_table.as_ref());
            set(
                &mut clickhouse.timeout_ms,
                self.clickhouse_timeout_ms.as_ref(),
            );
        }
        set(&mut config.http.listen, self.listen.as_ref());
        set(
            &mut config.http.max_pending_events,
            self.max_pending_events.as_ref(),
        );
        set(
            &mut config.http.max_body_bytes,
            self.max_body_bytes.as_ref(),
        );
        set(
            &mut config.http.max_events_per_request,
            self.max_events_per_request.as_ref(),
        );
        set(
            &mut config.batch.micro_batch_size,
            self.micro_batch_size.as_ref(),
        );
        set(
            &mut config.batch.micro_batch_ms,
            self.micro_batch_ms.as_ref(),
        );
        set(
            &mut config.batch.dedup_window_secs,
            self.dedup_window_secs.as_ref(),
        );
        set(&mut config.flush.batch_size, self.batch_size.as_ref());
        set(&mut config.flush.chunk_size, self.chunk_size.as_ref());
        set(
            &mut config.flush.lock_ttl_ms,
            self.flush_lock_ttl_ms.as_ref(),
        );
        set(
            &mut config.flush.interval_ms,
            self.flush_interval_ms.as_ref(),
        );
        if self.no_flush {
            config.flush.enabled = false;
        }
        if self.no_journal {
            config.journal.enabled = false;
        }
        set(
            &mut config.journal.max_events,
            self.journal_max_events.as_ref(),
        );
        set(
            &mut config.shutdown_timeout_ms,
            self.shutdown_timeout_ms.as_ref(),
        );
        set(&mut config.log_format, self.log_format.as_ref());
        let mut keys = BTreeMap::new();
        for pair in &self.write_keys {
            let (project, key) = pair
                .split_once('=')
                .filter(|(p, k)| !p.is_empty() && !k.is_empty())
                .ok_or_else(|| {
                    anyhow::anyhow!("invalid setting `write-key`: expected PROJECT=KEY")
                })?;
            keys.insert(project.to_owned(), key.to_owned());
        }
        config.write_keys.extend(keys);
        config.validate()?;
        Ok(config)
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,spillway=info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Human => builder.init(),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Schema { variant } => {
            let database = cli
                .config
                .clickhouse_database
                .as_deref()
                .unwrap_or("default");
            let table = cli.config.clickhouse_table.as_deref().unwrap_or("events");
            let variants = match variant {
                Some(v) => vec![v],
                None => vec![SchemaVariant::Current, SchemaVariant::Legacy],
            };
            for v in variants {
                let label = match v {
                    SchemaVariant::Current => "current ClickHouse (22.2 and later)",
                    SchemaVariant::Legacy => "ClickHouse 18.16 (Debian)",
                };
                println!("-- {label}\n{};\n", v.ddl(database, table));
            }
            return Ok(());
        }
        Command::Generate { events, seed } => {
            let settings = WorkloadSettings {
                seed,
                ..WorkloadSettings::default()
            };
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            for line in Workload::new(settings).take(events) {
                writeln!(out, "{line}")?;
            }
            out.flush()?;
            return Ok(());
        }
        _ => {}
    }
    let config = cli.config.load()?;
    match &cli.command {
        Command::Config => {
            print!("{}", config.redacted_toml());
            return Ok(());
        }
        Command::Query { sql } => {
            let (columns, rows) = spillway::sink::query_embedded(&config.data_dir, sql)
                .with_context(|| format!("cannot query {}", config.data_dir.display()))?;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            writeln!(out, "{}", columns.join("\t"))?;
            for row in rows {
                writeln!(out, "{}", row.join("\t"))?;
            }
            out.flush()?;
            return Ok(());
        }
        _ => {}
    }
    // The one-shot commands print results on stdout; keep their stderr to warnings.
    if matches!(cli.command, Command::Serve | Command::Flush) {
        init_logging(config.log_format);
    } else if std::env::var_os("RUST_LOG").is_none() {
        tracing_subscriber::fmt()
            .with_env_filter("warn")
            .with_writer(std::io::stderr)
            .init();
    }
    match cli.command {
        Command::Serve => {
            let service = service::Service::open(config.clone()).await?;
            let listener = tokio::net::TcpListener::bind(&config.http.listen)
                .await
                .with_context(|| format!("cannot listen on {}", config.http.listen))?;
            let address = listener.local_addr()?;
            println!("spillway listening on http://{address}");
            std::io::stdout().flush()?;
            service.run(listener, shutdown_signal()).await?;
        }
        Command::Flush => service::run_flusher(config, shutdown_signal()).await?,
        Command::DeadLetter { action } => {
            let queue = backend::open_queue(&config).await?;
            match action {
                DeadLetterAction::List => {
                    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
                    for record in queue.dead_letters().await? {
                        writeln!(out, "{record}")?;
                    }
                    out.flush()?;
                }
                DeadLetterAction::Replay { max } => {
                    let replayed = queue.replay_dead_letters(max).await?;
                    println!("queued {replayed} dead-lettered entries again");
                }
                DeadLetterAction::Purge => {
                    let purged = queue.purge_dead_letters().await?;
                    println!("deleted {purged} dead-letter records");
                }
            }
        }
        Command::Import { file } => import(&file, &config).await?,
        Command::Drain => {
            let (queue, sink) = backend::open(&config).await?;
            let sink = sink.context("nothing to drain into: no sink configured")?;
            let started = Instant::now();
            let report = Flusher::new(queue, sink, config.flush_settings())
                .drain()
                .await?;
            let secs = started.elapsed().as_secs_f64();
            println!(
                "inserted {} rows in {} batches ({} dead-lettered) in {secs:.2}s ({:.0} rows/s)",
                report.rows,
                report.batches,
                report.dead_lettered,
                report.rows as f64 / secs.max(1e-9)
            );
        }
        Command::Config
        | Command::Query { .. }
        | Command::Schema { .. }
        | Command::Generate { .. } => {}
    }
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(err) => {
                    tracing::error!(error = %err, "cannot listen for SIGTERM; Ctrl-C only");
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}

/// Events per `bulk_add` call while importing.
const IMPORT_CHUNK: usize = 1000;

async fn import(file: &PathBuf, config: &Config) -> anyhow::Result<()> {
    let reader: Box<dyn BufRead + Send> = if file.as_os_str() == "-" {
        Box::new(BufReader::new(std::io::stdin()))
    } else {
        let f =
            std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
        Box::new(BufReader::with_capacity(1 << 20, f))
    };
    let queue = backend::open_queue(config).await?;
    // A one-shot import waits for the queue rather than journaling: nothing would replay it.
    let (buffer, batcher) = Buffer::start(queue, config.batch_settings(), config.queue_settings());
    let started = Instant::now();
    let (mut accepted, mut rejected) = (0usize, 0usize);
    let mut receipts = Vec::new();
    let mut chunk = Vec::with_capacity(IMPORT_CHUNK);
    let stderr = std::io::stderr();
    for (index, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("cannot read line {}", index + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        match Event::parse(&line) {
            Ok(event) => {
                chunk.push(event);
                accepted += 1;
            }
            Err(err) => {
                rejected += 1;
                let _ = writeln!(stderr.lock(), "line {}: {err}", index + 1);
            }
        }
        if chunk.len() == IMPORT_CHUNK {
            receipts.push(buffer.bulk_add(std::mem::take(&mut chunk)).await?);
        }
    }
    if !chunk.is_empty() {
        receipts.push(buffer.bulk_add(chunk).await?);
    }
    buffer.flush().await?;
    for receipt in receipts {
        receipt.written().await?;
    }
    drop(buffer);
    batcher.await.context("batcher task failed")?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "accepted {accepted}, rejected {rejected} in {secs:.2}s ({:.0} events/s)",
        accepted as f64 / secs.max(1e-9)
    );
    Ok(())
}
