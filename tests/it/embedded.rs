//! The embedded backend (SQLite queue and sink, no servers) against the behaviours the Redis
//! and ClickHouse tests check, plus the golden trace, a `kill -9`, and one process per data
//! directory. Each test opens a fresh data directory through `Embedded::new`; its bodies use
//! the `Queue` and `Flusher` it hands out, and a second SQLite connection where the Redis tests
//! use raw Redis commands.

use std::collections::{BTreeSet, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use futures_util::StreamExt;
use spillway::{
    BatchSettings, Buffer, FlushOutcome, FlushSettings, Flusher, HeldSettings, Queue, QueueError,
    Sink, SqliteQueue, SqliteSink,
};

use crate::helpers::*;

/// One test's data directory, with the queue and the sink opened in it.
struct Embedded {
    dir: PathBuf,
    queue: Queue,
    sink: Sink,
}

impl Embedded {
    fn new() -> Embedded {
        let dir = fresh_dir();
        let (queue, sink) = open(&dir).expect("data directory opens");
        Embedded { dir, queue, sink }
    }

    fn buffer(&self) -> Buffer {
        self.buffer_with(BatchSettings::default())
    }

    fn buffer_with(&self, settings: BatchSettings) -> Buffer {
        Buffer::start(self.queue.clone(), settings, HeldSettings::default()).0
    }

    fn flusher(&self, settings: FlushSettings) -> Flusher {
        Flusher::new(self.queue.clone(), self.sink.clone(), settings)
    }

    /// Adds events and waits until they are in the queue.
    async fn add_all(&self, buffer: &Buffer, events: &[&str]) {
        add_all(buffer, events).await;
    }

    /// A second connection to the database, as `redis-cli` is to Redis.
    fn sql(&self) -> rusqlite::Connection {
        let conn = rusqlite::Connection::open(self.dir.join("spillway.db")).expect("db opens");
        conn.busy_timeout(Duration::from_secs(10))
            .expect("busy timeout");
        conn
    }

    /// Runs a statement on the second connection.
    fn execute(&self, sql: &str, params: impl rusqlite::Params) {
        self.sql().execute(sql, params).expect(sql);
    }

    /// The first column of a query's rows, as text.
    fn strings(&self, sql: &str) -> Vec<String> {
        let conn = self.sql();
        let mut select = conn.prepare(sql).expect(sql);
        let rows = select.query_map([], |row| row.get(0)).expect(sql);
        rows.collect::<Result<_, _>>().expect(sql)
    }

    /// The one integer a query returns.
    fn number(&self, sql: &str) -> i64 {
        self.sql().query_row(sql, [], |row| row.get(0)).expect(sql)
    }

    /// The queued entries, oldest first.
    fn queued(&self) -> Vec<String> {
        self.strings("SELECT entry FROM queue ORDER BY seq")
    }

    /// The labels of the landed rows, in insertion order.
    fn landed(&self) -> Vec<String> {
        let events = self.strings("SELECT event FROM events ORDER BY rowid");
        events.iter().map(|e| label(e)).collect()
    }

    /// The labels of the landed rows, sorted.
    fn landed_sorted(&self) -> Vec<String> {
        let mut labels = self.landed();
        labels.sort();
        labels
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn fresh_dir() -> PathBuf {
    std::env::temp_dir().join(format!("spillway-test-{}", uuid::Uuid::new_v4().simple()))
}

fn open(dir: &Path) -> Result<(Queue, Sink), QueueError> {
    let queue = SqliteQueue::open(dir, HeldSettings::default())?;
    let sink = SqliteSink::open(&queue).expect("sink tables");
    Ok((Queue::Embedded(queue), Sink::Embedded(sink)))
}

async fn add_all(buffer: &Buffer, events: &[&str]) {
    let events = events.iter().map(|e| parse(e)).collect();
    buffer
        .bulk_add(events)
        .await
        .expect("buffer open")
        .written()
        .await
        .expect("written");
}

fn refs(events: &[String]) -> Vec<&str> {
    events.iter().map(String::as_str).collect()
}

// Held screen views (tests/it/screen_views.rs).

#[tokio::test]
async fn first_screen_view_of_a_session_is_held_not_queued() {
    let env = Embedded::new();
    let view = screen_view("a", "s1", "u1", 1000);
    env.add_all(&env.buffer(), &[&view]).await;

    assert_eq!(env.queue.size().await.expect("size"), 0);
    let held = env.queue.last_screen_view_by_session("s1").await;
    assert_eq!(held.expect("read").as_deref(), Some(view.as_str()));
}

#[tokio::test]
async fn next_screen_view_queues_the_previous_with_its_duration() {
    let env = Embedded::new();
    let views = [
        screen_view("a", "s1", "u1", 1000),
        screen_view("b", "s1", "u1", 3500),
        screen_view("c", "s1", "u1", 4000),
    ];
    env.add_all(&env.buffer(), &refs(&views)).await;

    let queued = env.queued();
    assert_eq!(queued.len(), 2);
    assert_eq!(
        (label(&queued[0]), field(&queued[0], "duration")),
        ("a".into(), 2500.into())
    );
    assert_eq!(
        (label(&queued[1]), field(&queued[1], "duration")),
        ("b".into(), 500.into())
    );
    let held = env.queue.last_screen_view_by_session("s1").await;
    assert_eq!(held.expect("read").as_deref(), Some(views[2].as_str()));
}

#[tokio::test]
async fn an_earlier_timestamp_gives_duration_zero() {
    let env = Embedded::new();
    let a = screen_view("a", "s1", "u1", 5000);
    let b = screen_view("b", "s1", "u1", 1000);
    env.add_all(&env.buffer(), &[&a, &b]).await;
    assert_eq!(field(&env.queued()[0], "duration"), 0);
}

#[tokio::test]
async fn session_end_releases_the_held_view_unchanged_then_itself() {
    let env = Embedded::new();
    let view = screen_view("a", "s1", "u1", 1000);
    let end = session_end("e", "s1", "u1", 9000);
    env.add_all(&env.buffer(), &[&view, &end]).await;

    assert_eq!(env.queued(), vec![view, end], "queue +2, texts unchanged");
    assert_eq!(env.queue.size().await.expect("size"), 2);
    let q = &env.queue;
    assert_eq!(q.last_screen_view_by_session("s1").await.expect("r"), None);
    assert_eq!(
        q.last_screen_view_by_profile("p1", "u1").await.expect("r"),
        None,
        "session_end forgets the profile's view"
    );
}

#[tokio::test]
async fn session_end_with_nothing_held_queues_only_itself() {
    let env = Embedded::new();
    let end = session_end("e", "s1", "u1", 9000);
    env.add_all(&env.buffer(), &[&end]).await;
    assert_eq!(env.queued(), vec![end]);
}

#[tokio::test]
async fn last_screen_view_by_profile_is_the_newest_of_any_session() {
    let env = Embedded::new();
    let in_s1 = screen_view("a", "s1", "u1", 1000);
    let in_s2 = screen_view("b", "s2", "u1", 2000);
    env.add_all(&env.buffer(), &[&in_s1, &in_s2]).await;

    let q = &env.queue;
    let by_s1 = q.last_screen_view_by_session("s1").await.expect("r");
    let by_s2 = q.last_screen_view_by_session("s2").await.expect("r");
    let by_u1 = q.last_screen_view_by_profile("p1", "u1").await.expect("r");
    assert_eq!(by_s1.as_deref(), Some(in_s1.as_str()));
    assert_eq!(by_s2.as_deref(), Some(in_s2.as_str()));
    assert_eq!(by_u1.as_deref(), Some(in_s2.as_str()));
    assert_eq!(
        q.size().await.expect("size"),
        0,
        "each session keeps its own view"
    );
}

#[tokio::test]
async fn unknown_session_or_profile_has_no_view() {
    let env = Embedded::new();
    let q = &env.queue;
    assert_eq!(
        q.last_screen_view_by_session("nope").await.expect("r"),
        None
    );
    assert_eq!(
        q.last_screen_view_by_profile("p1", "nope")
            .await
            .expect("r"),
        None
    );
}

#[tokio::test]
async fn interleaved_sessions_are_independent() {
    let env = Embedded::new();
    let events = [
        screen_view("a1", "sa", "ua", 1000),
        screen_view("b1", "sb", "ub", 1100),
        screen_view("a2", "sa", "ua", 1300),
        screen_view("b2", "sb", "ub", 2100),
    ];
    env.add_all(&env.buffer(), &refs(&events)).await;

    let queued = env.queued();
    assert_eq!(queued.len(), 2);
    assert_eq!(
        (label(&queued[0]), field(&queued[0], "duration")),
        ("a1".into(), 300.into())
    );
    assert_eq!(
        (label(&queued[1]), field(&queued[1], "duration")),
        ("b1".into(), 1000.into())
    );
}

#[tokio::test]
async fn screen_view_without_session_is_a_regular_event() {
    let env = Embedded::new();
    let view = r#"{"id":"a","name":"screen_view","project_id":"p1","session_id":"","created_at":"2024-06-01 00:00:00.000"}"#;
    env.add_all(&env.buffer(), &[view]).await;
    assert_eq!(env.queued(), vec![view.to_owned()]);
}

#[tokio::test]
async fn screen_view_without_profile_sets_no_profile_view() {
    let env = Embedded::new();
    env.add_all(&env.buffer(), &[&screen_view("a", "s1", "", 1000)])
        .await;
    assert_eq!(
        env.strings("SELECT profile FROM held_profiles"),
        Vec::<String>::new()
    );
}

#[tokio::test]
async fn held_event_text_survives_exactly_with_only_duration_changed() {
    let env = Embedded::new();
    let buffer = env.buffer();
    // Empty containers, number spellings, escapes and a nested "duration" that must stay.
    let first = r#"{"name":"screen_view","groups":[],"extra":{},"revenue":1.50,"big":12345678901234567890,"project_id":"p1","session_id":"s1","properties":{"duration":"7","q":"say \"hi\" \\ \u00e9 ✓"},"created_at":"2024-06-01 00:00:01.000","duration":0,"tail":[{"duration":3}]}"#;
    let second = r#"{"name":"screen_view","project_id":"p1","session_id":"s1","created_at":"2024-06-01T00:00:03.250Z"}"#;
    env.add_all(&buffer, &[first]).await;
    let held = env.queue.last_screen_view_by_session("s1").await;
    assert_eq!(held.expect("r").as_deref(), Some(first));
    env.add_all(&buffer, &[second]).await;
    let expected = first.replace(r#""duration":0,"tail""#, r#""duration":2250,"tail""#);
    assert_eq!(env.queued(), vec![expected]);

    // A held event without a duration field gets one appended.
    let third = r#"{"name":"screen_view","project_id":"p1","session_id":"s1","created_at":"2024-06-01 00:00:04.000"}"#;
    env.add_all(&buffer, &[third]).await;
    assert_eq!(
        env.queued()[1],
        second.replace(r#"Z"}"#, r#"Z","duration":750}"#)
    );
}

#[tokio::test]
async fn durations_are_the_same_across_micro_batch_boundaries() {
    let events: Vec<String> = (0..40)
        .map(|i| screen_view(&format!("v{i}"), &format!("s{}", i % 3), "", 1000 + i * 137))
        .collect();
    let mut results = Vec::new();
    for max_events in [1, 7, 100] {
        let env = Embedded::new();
        let buffer = env.buffer_with(BatchSettings {
            max_events,
            ..BatchSettings::default()
        });
        for event in &events {
            env.add_all(&buffer, &[event]).await;
        }
        results.push(env.queued());
    }
    assert_eq!(results[0].len(), 37);
    assert_eq!(results[0], results[1]);
    assert_eq!(results[0], results[2]);
}

#[tokio::test]
async fn an_expired_held_view_is_neither_read_nor_released() {
    let env = Embedded::new();
    let buffer = env.buffer();
    env.add_all(&buffer, &[&screen_view("a", "s1", "u1", 1000)])
        .await;
    // As if the hour had passed: Redis would have expired both keys.
    env.execute("UPDATE held_sessions SET expires_ms = 0", []);
    env.execute("UPDATE held_profiles SET expires_ms = 0", []);

    let q = &env.queue;
    assert_eq!(q.last_screen_view_by_session("s1").await.expect("r"), None);
    assert_eq!(
        q.last_screen_view_by_profile("p1", "u1").await.expect("r"),
        None
    );
    env.add_all(&buffer, &[&screen_view("b", "s1", "u1", 2000)])
        .await;
    assert_eq!(
        env.queued(),
        Vec::<String>::new(),
        "the expired view is gone"
    );
}

// The buffer's writes (tests/it/buffer.rs).

#[tokio::test]
async fn a_regular_event_goes_straight_to_the_queue() {
    let env = Embedded::new();
    let event = click("a", "p1", 0);
    env.add_all(&env.buffer(), &[&event]).await;
    assert_eq!(env.queued(), vec![event]);
    assert_eq!(env.queue.size().await.expect("size"), 1);
}

#[tokio::test]
async fn buffer_size_counts_queued_events_not_held_views() {
    let env = Embedded::new();
    let events = [
        click("a", "p1", 0),
        screen_view("v1", "s1", "u1", 10),
        click("b", "p1", 20),
        screen_view("v2", "s2", "u2", 30),
    ];
    env.add_all(&env.buffer(), &refs(&events)).await;
    assert_eq!(env.queue.size().await.expect("size"), 2);
}

#[tokio::test]
async fn order_of_arrival_is_kept_across_micro_batches() {
    let env = Embedded::new();
    let buffer = env.buffer_with(BatchSettings {
        max_events: 7,
        ..BatchSettings::default()
    });
    let events: Vec<String> = (0..50).map(|i| click(&format!("e{i}"), "p1", i)).collect();
    for event in &events {
        let _ = buffer.add(parse(event)).await.expect("open");
    }
    buffer.flush().await.expect("flushed");
    assert_eq!(env.queued(), events);
}

// Live visitors (tests/it/visitors.rs).

#[tokio::test]
async fn an_event_with_a_profile_makes_a_live_visitor() {
    let env = Embedded::new();
    env.add_all(&env.buffer(), &[&screen_view("a", "s1", "u1", 0)])
        .await;
    let now = spillway::time::now();
    let q = &env.queue;
    assert_eq!(q.active_visitor_count("p1", now).await.expect("count"), 1);
    assert_eq!(
        q.active_visitor_count("other", now).await.expect("count"),
        0
    );
    let ttl = env.number("SELECT expires_ms FROM heartbeats") - now.as_millis();
    assert!(
        (295_000..=300_000).contains(&ttl),
        "the heartbeat expires with the window: {ttl}"
    );
}

#[tokio::test]
async fn events_without_a_profile_are_not_visitors() {
    let env = Embedded::new();
    env.add_all(&env.buffer(), &[&click("a", "p1", 0)]).await;
    let now = spillway::time::now();
    assert_eq!(
        env.queue
            .active_visitor_count("p1", now)
            .await
            .expect("count"),
        0
    );
}

#[tokio::test]
async fn heartbeats_are_throttled_within_a_process_and_across_writers() {
    let env = Embedded::new();
    let last_seen = || env.number("SELECT last_ms FROM visitors WHERE profile = 'u1'");
    let first = env.buffer();
    env.add_all(&first, &[&screen_view("a", "s1", "u1", 0)])
        .await;
    assert!(last_seen() > 0);
    env.execute("UPDATE visitors SET last_ms = 1", []);

    // The same buffer: its local throttle skips the heartbeat.
    env.add_all(&first, &[&screen_view("b", "s1", "u1", 10)])
        .await;
    // Another buffer: the queue sees the fresh heartbeat row and skips.
    env.add_all(&env.buffer(), &[&screen_view("c", "s1", "u1", 20)])
        .await;
    assert_eq!(last_seen(), 1, "no refresh within the refresh period");

    // Once the heartbeat is older than the refresh period, the next event refreshes it.
    let before = spillway::time::now().as_millis();
    env.execute("UPDATE heartbeats SET expires_ms = ?1", [before + 200_000]);
    env.add_all(&env.buffer(), &[&screen_view("d", "s1", "u1", 30)])
        .await;
    assert!(last_seen() >= before, "refreshed");
}

#[tokio::test]
async fn visitors_older_than_the_window_are_trimmed_and_not_counted() {
    let env = Embedded::new();
    let now = spillway::time::now().as_millis();
    let insert = "INSERT INTO visitors (project, profile, last_ms) VALUES ('p1', ?1, ?2)";
    env.execute(insert, rusqlite::params!["old", now - 301_000]);
    env.execute(insert, rusqlite::params!["new", now - 1_000]);
    let count = env
        .queue
        .active_visitor_count("p1", spillway::Timestamp::from_millis(now))
        .await
        .expect("count");
    assert_eq!(count, 1);
    assert_eq!(
        env.strings("SELECT profile FROM visitors"),
        ["new"],
        "the stale one is trimmed"
    );
}

// Flushing (tests/it/flush.rs).

#[tokio::test]
async fn flush_inserts_queued_events_and_empties_the_queue() {
    let env = Embedded::new();
    env.add_all(&env.buffer(), &[&click("a", "p1", 0), &click("b", "p1", 5)])
        .await;
    let report = env.flusher(flush_settings(4000, 1000)).drain().await;
    assert_eq!(report.expect("drain").rows, 2);
    assert_eq!(env.landed_sorted(), ["a", "b"]);
    let stats = env.queue.stats().await.expect("stats");
    assert_eq!(
        (stats.queued, stats.in_flight, stats.dead_letter),
        (0, 0, 0)
    );
}

#[tokio::test]
async fn rows_land_with_their_columns() {
    let env = Embedded::new();
    let event = r#"{"id":"x1","name":"click","project_id":"p1","session_id":"s1","profile_id":42,"created_at":"2024-06-01T00:00:01.5Z","properties":{"a":"b","n":[]},"duration":0,"groups":[]}"#;
    env.add_all(&env.buffer(), &[event]).await;
    env.flusher(flush_settings(4000, 1000))
        .drain()
        .await
        .expect("drain");
    let row = env
        .sql()
        .query_row(
            "SELECT id, name, project_id, session_id, profile_id, created_at, duration, \
             properties, event FROM events",
            [],
            |r| {
                Ok((
                    (
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                    ),
                    (
                        r.get::<_, String>(3)?,
                        r.get::<_, String>(4)?,
                        r.get::<_, String>(5)?,
                    ),
                    (
                        r.get::<_, i64>(6)?,
                        r.get::<_, String>(7)?,
                        r.get::<_, String>(8)?,
                    ),
                ))
            },
        )
        .expect("one row");
    assert_eq!(row.0, ("x1".into(), "click".into(), "p1".into()));
    assert_eq!(
        row.1,
        ("s1".into(), "42".into(), "2024-06-01 00:00:01.500".into())
    );
    assert_eq!(row.2, (0, r#"{"a":"b","n":[]}"#.into(), event.into()));
}

#[tokio::test]
async fn rows_are_sorted_by_created_at_and_inserted_in_chunks() {
    let env = Embedded::new();
    // Out of order on purpose.
    let events: Vec<String> = [40, 10, 30, 20, 50]
        .iter()
        .map(|ms| click(&format!("e{ms}"), "p1", *ms))
        .collect();
    env.add_all(&env.buffer(), &refs(&events)).await;

    let report = env.flusher(flush_settings(4000, 2)).drain().await;
    assert_eq!(report.expect("drain").rows, 5);
    assert_eq!(env.landed(), ["e10", "e20", "e30", "e40", "e50"]);
    let chunks = env.strings("SELECT CAST(rows AS TEXT) FROM sink_chunks ORDER BY rowid");
    assert_eq!(chunks, ["2", "2", "1"], "3 inserts: 2 + 2 + 1 rows");
}

#[tokio::test]
async fn batch_size_bounds_one_flush() {
    let env = Embedded::new();
    let events: Vec<String> = (0..10).map(|i| click(&format!("e{i}"), "p1", i)).collect();
    env.add_all(&env.buffer(), &refs(&events)).await;
    let flusher = env.flusher(flush_settings(4, 1000));
    let FlushOutcome::Flushed(first) = flusher.flush_once().await.expect("flush") else {
        panic!("expected a flush");
    };
    assert_eq!(first.rows, 4);
    assert_eq!(env.queue.size().await.expect("size"), 6);
    let report = flusher.drain().await.expect("drain");
    assert_eq!((report.rows, report.batches), (6, 2));
}

#[tokio::test]
async fn a_failed_insert_leaves_the_events_in_flight_and_the_next_flush_lands_them_once() {
    let env = Embedded::new();
    let events: Vec<String> = (0..5).map(|i| click(&format!("e{i}"), "p1", i)).collect();
    env.add_all(&env.buffer(), &refs(&events)).await;
    let flusher = env.flusher(flush_settings(4000, 2));
    env.execute("ALTER TABLE events RENAME TO away", []);

    let err = flusher.flush_once().await.expect_err("the table is gone");
    assert!(err.to_string().contains("chunk 0"), "{err}");
    let stats = env.queue.stats().await.expect("stats");
    assert_eq!(
        (stats.queued, stats.in_flight),
        (0, 5),
        "nothing lost: all in flight"
    );

    env.execute("ALTER TABLE away RENAME TO events", []);
    assert_eq!(flusher.drain().await.expect("drain").rows, 5);
    assert_eq!(env.landed_sorted(), ["e0", "e1", "e2", "e3", "e4"]);
}

#[tokio::test]
async fn corrupt_entries_are_dead_lettered_while_valid_ones_land() {
    let env = Embedded::new();
    let buffer = env.buffer();
    env.add_all(&buffer, &[&click("a", "p1", 0)]).await;
    let insert = "INSERT INTO queue (entry) VALUES (?1)";
    env.execute(insert, ["not json {"]);
    env.execute(
        insert,
        [r#"{"name":"click","created_at":"2024-06-01 00:00:00"}"#],
    );
    env.add_all(&buffer, &[&click("b", "p1", 1)]).await;

    let report = env.flusher(flush_settings(4000, 1000)).drain().await;
    let report = report.expect("drain");
    assert_eq!((report.rows, report.dead_lettered), (2, 2));
    assert_eq!(env.landed_sorted(), ["a", "b"]);
    let dead = env.queue.dead_letters().await.expect("dead letters");
    assert_eq!(dead.len(), 2);
    assert_eq!(field(&dead[0], "entry"), "not json {");
    let reason = field(&dead[0], "reason");
    assert!(
        reason.as_str().expect("reason").starts_with("invalid JSON"),
        "{reason}"
    );
    assert_eq!(
        field(&dead[1], "reason"),
        "field `project_id`: must be a non-empty string"
    );
    assert_eq!(
        env.queue.size().await.expect("size"),
        0,
        "the queue does not stall"
    );
}

/// Puts a batch in flight as a flusher that died after recording `chunks_done` chunks leaves it.
fn abandon(env: &Embedded, batch_id: &str, chunks_done: usize, entries: &[String]) {
    let conn = env.sql();
    for entry in entries {
        conn.execute("INSERT INTO in_flight (entry) VALUES (?1)", [entry])
            .expect("in flight");
    }
    conn.execute(
        "INSERT OR REPLACE INTO in_flight_meta (id, batch_id, chunks_done) VALUES (1, ?1, ?2)",
        rusqlite::params![batch_id, chunks_done],
    )
    .expect("meta");
}

fn five_clicks() -> Vec<String> {
    ["a", "b", "c", "d", "e"]
        .iter()
        .zip(0..)
        .map(|(id, ms)| click(id, "p1", ms))
        .collect()
}

#[tokio::test]
async fn an_abandoned_batch_resumes_after_its_last_recorded_chunk() {
    let env = Embedded::new();
    let flusher = env.flusher(flush_settings(4000, 2));
    // A flusher died after inserting chunk 0 (rows a, b) and recording it.
    abandon(&env, "old", 1, &five_clicks());

    let FlushOutcome::Flushed(report) = flusher.flush_once().await.expect("flush") else {
        panic!("expected the abandoned batch to be flushed");
    };
    assert!(report.resumed);
    assert_eq!(
        (report.batch_id.as_str(), report.rows, report.chunks),
        ("old", 3, 2)
    );
    assert_eq!(env.landed(), ["c", "d", "e"]);
}

#[tokio::test]
async fn a_chunk_inserted_again_with_its_token_is_not_duplicated() {
    let env = Embedded::new();
    let flusher = env.flusher(flush_settings(4000, 2));
    abandon(&env, "old", 0, &five_clicks());
    flusher.flush_once().await.expect("first flush");
    // The same batch again, as if the flusher died after inserting chunks 1 and 2 but before
    // recording them: the sink must recognise both tokens.
    abandon(&env, "old", 1, &five_clicks());

    let FlushOutcome::Flushed(report) = flusher.flush_once().await.expect("flush") else {
        panic!("expected the abandoned batch to be flushed");
    };
    assert_eq!((report.batch_id.as_str(), report.chunks), ("old", 2));
    assert_eq!(env.landed(), ["a", "b", "c", "d", "e"], "each row once");
}

#[tokio::test]
async fn two_flushers_racing_insert_every_event_exactly_once() {
    let env = Embedded::new();
    let events: Vec<String> = (0..3000)
        .map(|i| click(&format!("e{i}"), "p1", i))
        .collect();
    env.add_all(&env.buffer(), &refs(&events)).await;
    let (a, b) = (
        env.flusher(flush_settings(200, 50)),
        env.flusher(flush_settings(200, 50)),
    );

    let (ra, rb) = tokio::join!(a.drain(), b.drain());
    assert_eq!(
        ra.expect("a drains").rows + rb.expect("b drains").rows,
        3000
    );
    let landed = env.landed();
    let unique: HashSet<&String> = landed.iter().collect();
    assert_eq!((landed.len(), unique.len()), (3000, 3000));
}

#[tokio::test]
async fn a_flush_publishes_one_notification_per_project() {
    let env = Embedded::new();
    let events = [
        click("a", "p1", 0),
        click("b", "p2", 1),
        click("c", "p1", 2),
    ];
    env.add_all(&env.buffer(), &refs(&events)).await;
    let mut feed = env.queue.subscribe().await.expect("subscribe");

    env.flusher(flush_settings(4000, 1000))
        .drain()
        .await
        .expect("drain");
    let mut payloads = HashSet::new();
    for _ in 0..2 {
        let payload = tokio::time::timeout(Duration::from_secs(10), feed.next())
            .await
            .expect("a notification")
            .expect("feed open");
        let payload: serde_json::Value = serde_json::from_str(&payload).expect("json");
        payloads.insert(payload.to_string());
    }
    let expected: HashSet<String> = [
        r#"{"count":2,"projectId":"p1"}"#,
        r#"{"count":1,"projectId":"p2"}"#,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    assert_eq!(payloads, expected);
}

// The golden trace (tests/it/golden.rs).

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden");

fn golden(file: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(format!("{GOLDEN}/{file}"))
        .expect("golden file")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect()
}

fn text(value: &serde_json::Value) -> String {
    value.as_str().expect("a string").to_owned()
}

#[tokio::test]
async fn the_golden_trace_lands_the_reference_rows_and_holds_the_reference_views() {
    let env = Embedded::new();
    let trace = std::fs::read_to_string(format!("{GOLDEN}/trace.ndjson")).expect("trace");
    let trace: Vec<&str> = trace.lines().collect();
    env.add_all(&env.buffer(), &trace).await;
    env.flusher(FlushSettings::default())
        .drain()
        .await
        .expect("drain");

    let expected: Vec<[String; 6]> = golden("expected-rows.ndjson")
        .iter()
        .map(|r| {
            let duration = r["duration"].as_u64().expect("ms").to_string();
            let [id, name, project, session, profile] =
                ["id", "name", "project_id", "session_id", "profile_id"].map(|c| text(&r[c]));
            [id, name, project, session, profile, duration]
        })
        .collect();
    let conn = env.sql();
    let mut select = conn
        .prepare(
            "SELECT id, name, project_id, session_id, profile_id, CAST(duration AS TEXT) \
             FROM events ORDER BY id",
        )
        .expect("select");
    let landed: Vec<[String; 6]> = select
        .query_map([], |r| {
            Ok([
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ])
        })
        .expect("rows")
        .collect::<Result<_, _>>()
        .expect("rows");
    assert_eq!(landed.len(), expected.len());
    let differences: Vec<_> = landed
        .iter()
        .zip(&expected)
        .filter(|(g, w)| g != w)
        .take(5)
        .collect();
    assert!(
        differences.is_empty(),
        "first differences (got, expected): {differences:?}"
    );

    let held_view = |key: String, event: &str, ts: i64| {
        let id = text(&field(event, "id"));
        (key, id, ts)
    };
    let mut held = BTreeSet::new();
    let mut sessions = conn
        .prepare("SELECT session, event, ts FROM held_sessions")
        .expect("q");
    let rows = sessions.query_map([], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get(2)?))
    });
    for row in rows.expect("held sessions") {
        let (session, event, ts) = row.expect("row");
        held.insert(held_view(
            format!("event_buffer:last_screen_view:session:{session}"),
            &event,
            ts,
        ));
    }
    let mut profiles = conn
        .prepare("SELECT project, profile, event, ts FROM held_profiles")
        .expect("q");
    let rows = profiles.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get(3)?,
        ))
    });
    for row in rows.expect("held profiles") {
        let (project, profile, event, ts) = row.expect("row");
        let key = format!("event_buffer:last_screen_view:profile:{project}:{profile}");
        held.insert(held_view(key, &event, ts));
    }
    let expected_held: BTreeSet<(String, String, i64)> = golden("expected-held.ndjson")
        .iter()
        .map(|h| {
            (
                text(&h["key"]),
                text(&h["event_id"]),
                h["ts"].as_i64().expect("ts"),
            )
        })
        .collect();
    assert_eq!(held, expected_held);
}

// One process per data directory, and what survives `kill -9`.

#[tokio::test]
async fn a_second_open_of_the_data_directory_is_refused_until_the_first_closes() {
    let dir = fresh_dir();
    let (queue, sink) = open(&dir).expect("first open");
    let (buffer, batcher) = Buffer::start(
        queue.clone(),
        BatchSettings::default(),
        HeldSettings::default(),
    );
    add_all(&buffer, &[&click("a", "p1", 0)]).await;

    let Err(err) = SqliteQueue::open(&dir, HeldSettings::default()) else {
        panic!("a second open must be refused");
    };
    assert!(matches!(err, QueueError::InUse { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains(&dir.display().to_string()), "{message}");
    assert!(
        message.contains("in use by another spillway process"),
        "{message}"
    );

    drop(buffer);
    batcher.await.expect("the batcher stops");
    drop((queue, sink));
    let (queue, _sink) = open(&dir).expect("free once every handle is dropped");
    assert_eq!(
        queue.size().await.expect("size"),
        1,
        "and the event is still there"
    );
    drop(queue);
    let _ = std::fs::remove_dir_all(&dir);
}

const CHILD_DIR: &str = "SPILLWAY_TEST_CHILD_DIR";

/// Run by the test below as a separate process: writes 500 events, says so, then waits to be
/// killed while holding the data directory.
#[tokio::test]
#[ignore = "the child process of a_killed_process_loses_nothing_and_frees_the_directory"]
async fn child_writes_then_waits_to_be_killed() {
    let Some(dir) = std::env::var_os(CHILD_DIR) else {
        return;
    };
    let (queue, _sink) = open(Path::new(&dir)).expect("the child opens the directory");
    let buffer = Buffer::start(queue, BatchSettings::default(), HeldSettings::default()).0;
    let events: Vec<String> = (0..500).map(|i| click(&format!("e{i}"), "p1", i)).collect();
    add_all(&buffer, &refs(&events)).await;
    println!("written");
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}

#[tokio::test]
async fn a_killed_process_loses_nothing_and_frees_the_directory() {
    let dir = fresh_dir();
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "embedded::child_writes_then_waits_to_be_killed",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env(CHILD_DIR, &dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("child starts");
    let stdout = child.stdout.take().expect("child stdout");
    let written = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|line| line == "written")
    });
    let written = tokio::time::timeout(Duration::from_secs(60), written).await;
    assert!(
        matches!(written, Ok(Ok(true))),
        "the child wrote its events"
    );

    let Err(err) = SqliteQueue::open(&dir, HeldSettings::default()) else {
        panic!("the child holds the directory");
    };
    assert!(matches!(err, QueueError::InUse { .. }), "{err:?}");

    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
    let (queue, _sink) = open(&dir).expect("the directory is free once its holder is dead");
    assert_eq!(
        queue.size().await.expect("size"),
        500,
        "every acknowledged event survived"
    );
    drop(queue);
    let _ = std::fs::remove_dir_all(&dir);
}
