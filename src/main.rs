//! The `spillway` command line: thin; everything it does is in the library.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use spillway::workload::{Workload, WorkloadSettings};
use spillway::{
    BatchSettings, Buffer, ClickHouseSettings, ClickHouseSink, Event, FlushSettings, Flusher,
    HeldSettings, Queue, RedisQueue, SchemaVariant, Sink,
};

/// A durable event buffer between analytics ingest and ClickHouse.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Add every event of an NDJSON file (or `-` for stdin) through the buffer, then flush it.
    Import {
        /// The file to read; `-` reads standard input.
        #[arg(default_value = "-")]
        file: PathBuf,
        #[command(flatten)]
        redis: RedisArgs,
        #[command(flatten)]
        batch: BatchArgs,
    },
    /// Flush the queue into ClickHouse until it is empty; prints the rows inserted.
    Drain {
        #[command(flatten)]
        redis: RedisArgs,
        #[command(flatten)]
        clickhouse: ClickHouseArgs,
        #[command(flatten)]
        flush: FlushArgs,
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
    /// Print the DDL of the events table.
    Schema {
        /// Which table shape: `current` ClickHouse (Map, DateTime64) or `legacy` 18.16.
        #[arg(long, value_enum)]
        variant: Option<SchemaVariant>,
        /// Database to create the table in.
        #[arg(long, env = "CLICKHOUSE_DATABASE", default_value = "default")]
        database: String,
        /// Table name.
        #[arg(long, env = "CLICKHOUSE_TABLE", default_value = "events")]
        table: String,
    },
}

#[derive(Args)]
struct RedisArgs {
    /// Redis URL.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// Prefix for every Redis key and channel; empty keeps OpenPanel's names.
    #[arg(long, env = "SPILLWAY_KEY_PREFIX", default_value = "")]
    key_prefix: String,
}

#[derive(Args)]
struct BatchArgs {
    /// Events per micro-batch write.
    #[arg(long, env = "EVENT_BUFFER_MICRO_BATCH_SIZE", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..))]
    micro_batch_size: u32,
    /// Longest wait, in ms, before a partial micro-batch is written.
    #[arg(long, env = "EVENT_BUFFER_MICRO_BATCH_MS", default_value_t = 10)]
    micro_batch_ms: u64,
}

#[derive(Args)]
struct ClickHouseArgs {
    /// ClickHouse HTTP URL.
    #[arg(long, env = "CLICKHOUSE_URL", default_value = "http://127.0.0.1:8123")]
    clickhouse_url: String,
    /// ClickHouse user.
    #[arg(long, env = "CLICKHOUSE_USER")]
    clickhouse_user: Option<String>,
    /// ClickHouse password.
    #[arg(long, env = "CLICKHOUSE_PASSWORD", hide_env_values = true)]
    clickhouse_password: Option<String>,
    /// Database of the events table.
    #[arg(long, env = "CLICKHOUSE_DATABASE", default_value = "default")]
    clickhouse_database: String,
    /// The events table.
    #[arg(long, env = "CLICKHOUSE_TABLE", default_value = "events")]
    clickhouse_table: String,
}

#[derive(Args)]
struct FlushArgs {
    /// Events claimed per flush.
    #[arg(long, env = "EVENT_BUFFER_BATCH_SIZE", default_value_t = 4000,
          value_parser = clap::value_parser!(u32).range(1..))]
    batch_size: u32,
    /// Rows per insert.
    #[arg(long, env = "EVENT_BUFFER_CHUNK_SIZE", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..))]
    chunk_size: u32,
}

impl RedisArgs {
    async fn connect(&self) -> anyhow::Result<Queue> {
        let queue =
            RedisQueue::connect(&self.redis_url, &self.key_prefix, HeldSettings::default()).await?;
        Ok(Queue::Redis(queue))
    }
}

impl ClickHouseArgs {
    async fn connect(&self) -> anyhow::Result<Sink> {
        let settings = ClickHouseSettings {
            url: self.clickhouse_url.clone(),
            user: self.clickhouse_user.clone(),
            password: self.clickhouse_password.clone(),
            database: self.clickhouse_database.clone(),
            table: self.clickhouse_table.clone(),
            ..ClickHouseSettings::default()
        };
        let url = settings.url.clone();
        let sink = ClickHouseSink::connect(settings)
            .await
            .with_context(|| format!("cannot use ClickHouse at {url}"))?;
        Ok(Sink::ClickHouse(sink))
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Import { file, redis, batch } => import(&file, &redis, &batch).await,
        Command::Drain {
            redis,
            clickhouse,
            flush,
        } => {
            let queue = redis.connect().await?;
            let sink = clickhouse.connect().await?;
            let settings = FlushSettings {
                batch_size: flush.batch_size as usize,
                chunk_size: flush.chunk_size as usize,
                ..FlushSettings::default()
            };
            let started = Instant::now();
            let report = Flusher::new(queue, sink, settings).drain().await?;
            let secs = started.elapsed().as_secs_f64();
            println!(
                "inserted {} rows in {} batches ({} dead-lettered) in {secs:.2}s ({:.0} rows/s)",
                report.rows,
                report.batches,
                report.dead_lettered,
                report.rows as f64 / secs.max(1e-9)
            );
            Ok(())
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
            Ok(())
        }
        Command::Schema {
            variant,
            database,
            table,
        } => {
            let variants = match variant {
                Some(v) => vec![v],
                None => vec![SchemaVariant::Current, SchemaVariant::Legacy],
            };
            for v in variants {
                let label = match v {
                    SchemaVariant::Current => "current ClickHouse (22.2 and later)",
                    SchemaVariant::Legacy => "ClickHouse 18.16 (Debian)",
                };
                println!("-- {label}\n{};\n", v.ddl(&database, &table));
            }
            Ok(())
        }
    }
}

/// Events per `bulk_add` call while importing.
const IMPORT_CHUNK: usize = 1000;

async fn import(file: &PathBuf, redis: &RedisArgs, batch: &BatchArgs) -> anyhow::Result<()> {
    let reader: Box<dyn BufRead + Send> = if file.as_os_str() == "-" {
        Box::new(BufReader::new(std::io::stdin()))
    } else {
        let f =
            std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
        Box::new(BufReader::with_capacity(1 << 20, f))
    };
    let queue = redis.connect().await?;
    let settings = BatchSettings {
        max_events: batch.micro_batch_size as usize,
        max_wait: Duration::from_millis(batch.micro_batch_ms),
        ..BatchSettings::default()
    };
    let (buffer, batcher) = Buffer::start(queue, settings, HeldSettings::default());
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
