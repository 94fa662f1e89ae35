//! In-process benchmarks of spillway's per-event work, on the deterministic workload.
//!
//! No servers: these measure the CPU cost of what every event goes through before it reaches
//! Redis (parsing one event, splitting a request body, inflating a gzip body), of the duration
//! rewrite on a released screen view, and of generating the workload itself (so the end-to-end
//! bench can say how much of its own time is spent making events).
//!
//! ```sh
//! cargo bench --bench components                                   # full criterion run
//! cargo bench --bench components -- --warm-up-time 1 --measurement-time 3   # what scripts/bench.sh runs
//! ```

use std::hint::black_box;
use std::io::Write as _;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use spillway::event;
use spillway::ingest::{self, BodyFormat, Limits};
use spillway::workload::{Workload, WorkloadSettings};
use spillway::Event;

/// Events per benchmark iteration: one request body's worth, as the HTTP bench sends.
const EVENTS: usize = 1000;

const LIMITS: Limits = Limits {
    max_body_bytes: 10 << 20,
    max_events: 10_000,
};

fn workload_lines() -> Vec<String> {
    Workload::new(WorkloadSettings::default())
        .take(EVENTS)
        .collect()
}

fn elements() -> Throughput {
    Throughput::Elements(EVENTS as u64)
}

fn bytes(lines: &[String]) -> Throughput {
    Throughput::Bytes(lines.iter().map(String::len).sum::<usize>() as u64)
}

fn event_parse(c: &mut Criterion) {
    let lines = workload_lines();
    let parse_all = |lines: &[String]| {
        for line in lines {
            black_box(Event::parse(black_box(line)).expect("workload events are valid"));
        }
    };
    let mut group = c.benchmark_group("event_parse");
    group.throughput(elements());
    group.bench_function("events", |b| b.iter(|| parse_all(&lines)));
    group.throughput(bytes(&lines));
    group.bench_function("bytes", |b| b.iter(|| parse_all(&lines)));
    group.finish();
}

fn parse_body(c: &mut Criterion) {
    let lines = workload_lines();
    let body = lines.join("\n").into_bytes();
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(&body).expect("gzip into memory");
    let gzipped = encoder.finish().expect("gzip into memory");
    let now = spillway::time::now();

    let mut group = c.benchmark_group("parse_body");
    group.throughput(elements());
    group.bench_function("ndjson_1000", |b| {
        b.iter(|| {
            let parsed = ingest::parse_body(black_box(&body), BodyFormat::Ndjson, LIMITS, now)
                .expect("valid body");
            black_box(parsed.events.len())
        });
    });
    group.bench_function("ndjson_1000_gzip", |b| {
        b.iter(|| {
            let inflated =
                ingest::gunzip(black_box(&gzipped), LIMITS.max_body_bytes).expect("valid gzip");
            let parsed =
                ingest::parse_body(&inflated, BodyFormat::Ndjson, LIMITS, now).expect("valid body");
            black_box(parsed.events.len())
        });
    });
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("ndjson_1000_bytes", |b| {
        b.iter(|| {
            let parsed = ingest::parse_body(black_box(&body), BodyFormat::Ndjson, LIMITS, now)
                .expect("valid body");
            black_box(parsed.events.len())
        });
    });
    group.finish();
}

fn with_duration(c: &mut Criterion) {
    let lines = workload_lines();
    let mut group = c.benchmark_group("with_duration");
    group.throughput(elements());
    group.bench_function("events", |b| {
        b.iter(|| {
            for (i, line) in lines.iter().enumerate() {
                black_box(
                    event::with_duration(black_box(line), i as u64).expect("workload events"),
                );
            }
        });
    });
    group.finish();
}

fn workload(c: &mut Criterion) {
    let lines = workload_lines();
    let mut group = c.benchmark_group("workload");
    // One endless generator, so its start (500 sessions) is not counted per iteration.
    let mut generator = Workload::new(WorkloadSettings::default());
    let mut generate = move || {
        for _ in 0..EVENTS {
            black_box(generator.next_event());
        }
    };
    group.throughput(elements());
    group.bench_function("events", |b| b.iter(&mut generate));
    group.throughput(bytes(&lines));
    group.bench_function("bytes", |b| b.iter(&mut generate));
    group.finish();
}

criterion_group!(benches, event_parse, parse_body, with_duration, workload);
criterion_main!(benches);
