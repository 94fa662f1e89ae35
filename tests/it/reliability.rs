//! Nothing lost to expiry, drift or bad rows, where only one backend can lose it: the Redis
//! sweep's index, the Redis counter, ClickHouse rejecting rows and 18.16 re-inserting a chunk.
//! That both backends release the held views of quiet sessions is tested once for both, in
//! `conformance/screen_views.rs`.

use redis::AsyncCommands;
use spillway::Timestamp;

use crate::helpers::*;

fn later() -> Timestamp {
    Timestamp::from_millis(spillway::time::now().as_millis() + 1000)
}

// Redis only: its sweep index (`event_buffer:held_index`) is a key of its own that outlives a
// view Redis expired or a session_end released; SQLite's held rows are their own index.
#[tokio::test]
async fn redis_sweep_skips_views_that_expired_or_were_released_meanwhile() {
    let env = TestEnv::new().await;
    let buffer = env.buffer();
    env.add_all(
        &buffer,
        &[
            &screen_view("a", "s1", "u1", 0),
            &session_end("e", "s1", "u1", 1),
        ],
    )
    .await;
    env.add_all(&buffer, &[&screen_view("b", "s2", "", 0)])
        .await;
    let mut redis = env.redis.clone();
    let _: () = redis
        .del(env.key("event_buffer:last_screen_view:session:s2"))
        .await
        .expect("DEL");
    assert_eq!(env.queue.sweep_idle(later(), 1000).await.expect("sweep"), 0);
    assert_eq!(
        env.queue.held_count().await.expect("count"),
        0,
        "stale index entries dropped"
    );
}

// Redis only: the embedded queue has no counter to drift (it counts its table).
#[tokio::test]
async fn redis_counter_drift_is_reconciled_and_reported() {
    let env = TestEnv::new().await;
    let buffer = env.buffer();
    env.add_all(&buffer, &[&click("a", "p1", 0), &click("b", "p1", 1)])
        .await;
    assert_eq!(env.queue.reconcile().await.expect("reconcile"), 0);
    let mut redis = env.redis.clone();
    let counter = env.key("event_buffer:total_count");
    let _: () = redis.set(&counter, 17).await.expect("SET");
    assert_eq!(env.queue.reconcile().await.expect("reconcile"), 15);
    let repaired: i64 = redis.get(&counter).await.expect("GET");
    assert_eq!(repaired, 2);
}

// No backend: a configuration check.
#[test]
fn idle_release_must_stay_below_the_held_view_expiry() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_spillway"))
        .args(["config"])
        .env(
            "SPILLWAY_CONFIG",
            write_config("[held]\nttl_secs = 600\nidle_release_secs = 600\n"),
        )
        .output()
        .expect("runs");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "error: invalid setting `held.idle_release_secs`: must be less than held.ttl_secs, or \
         quiet sessions' views expire unwritten"
    );
}

fn write_config(text: &str) -> std::path::PathBuf {
    let path =
        std::env::temp_dir().join(format!("spillway-{}.toml", uuid::Uuid::new_v4().simple()));
    std::fs::write(&path, text).expect("write");
    path
}

// Redis + ClickHouse only: the embedded sink's columns take every valid event; no row is
// rejected there.
#[tokio::test]
async fn rows_clickhouse_rejects_are_dead_lettered_with_its_message_while_the_rest_land() {
    let env = TestEnv::new().await;
    let buffer = env.buffer();
    let bad = r#"{"id":"00000000-0000-0000-0000-0000000000b1","name":"purchase","project_id":"p1","created_at":"2024-06-01 00:00:00.002","path":"/bad","revenue":"twelve"}"#;
    let uuid_bad = r#"{"id":"not-a-uuid","name":"click","project_id":"p1","created_at":"2024-06-01 00:00:00.004","path":"/bad-id"}"#;
    let events = [
        click("a", "p1", 1),
        bad.to_owned(),
        click("b", "p1", 3),
        uuid_bad.to_owned(),
        click("c", "p1", 5),
    ];
    let refs: Vec<&str> = events.iter().map(String::as_str).collect();
    env.add_all(&buffer, &refs).await;
    let flusher = env
        .flusher(spillway::SchemaVariant::Legacy, flush_settings(4000, 1000))
        .await;

    let report = flusher.drain().await.expect("drain");
    assert_eq!((report.rows, report.dead_lettered), (3, 2));
    let landed = env
        .sql(&labels_sql(&format!("{}.events", env.database)))
        .await;
    assert_eq!(
        landed.split_whitespace().collect::<Vec<_>>(),
        ["a", "b", "c"]
    );
    let dead = env.queue.dead_letters().await.expect("dead letters");
    let entries: Vec<serde_json::Value> = dead.iter().map(|d| field(d, "entry")).collect();
    assert_eq!(
        entries,
        [serde_json::json!(bad), serde_json::json!(uuid_bad)]
    );
    assert!(
        field(&dead[0], "reason")
            .as_str()
            .expect("text")
            .contains("Cannot parse input"),
        "{}",
        dead[0]
    );
    assert!(
        field(&dead[1], "reason")
            .as_str()
            .expect("text")
            .contains("value of key id"),
        "{}",
        dead[1]
    );
    assert_eq!(field(&dead[0], "code"), "rejected_by_sink");
    let stats = env.queue.stats().await.expect("stats");
    assert_eq!(
        (stats.queued, stats.in_flight, stats.dead_letter),
        (0, 0, 2)
    );
}

// ClickHouse 18.16 only: it has no deduplication token; engines with one (chdb, SQLite) are
// tested in `conformance::*::flush`.
#[tokio::test]
async fn on_clickhouse_18_a_chunk_that_landed_before_a_crash_is_not_inserted_again() {
    let env = TestEnv::new().await;
    let flusher = env
        .flusher(spillway::SchemaVariant::Legacy, flush_settings(4000, 2))
        .await;
    let entries: Vec<String> = (0..5).map(|i| click(&format!("e{i}"), "p1", i)).collect();
    let abandon = |chunks_done: &'static str| {
        let mut redis = env.redis.clone();
        let entries = entries.clone();
        let (list, meta) = (
            env.key("event_buffer:inflight"),
            env.key("event_buffer:inflight:meta"),
        );
        async move {
            let _: () = redis.rpush(&list, &entries).await.expect("RPUSH");
            let _: () = redis
                .hset_multiple(&meta, &[("batch_id", "b1"), ("chunks_done", chunks_done)])
                .await
                .expect("HSET");
        }
    };
    // The whole batch landed, then it reappears as if its flusher had died after inserting
    // chunk 1 (rows e2, e3) but before recording it: 18.16 has no deduplication token, so
    // each insert leaves out the rows whose ids the table holds (here chunk 1 and e4 of
    // chunk 2, which had landed too).
    abandon("0").await;
    flusher.drain().await.expect("drain");
    abandon("1").await;
    let spillway::FlushOutcome::Flushed(report) = flusher.flush_once().await.expect("flush") else {
        panic!("expected the abandoned batch to be flushed");
    };
    assert!(report.resumed);
    let counts = env
        .sql(&format!(
            "SELECT count(), uniqExact(id) FROM {}.events",
            env.database
        ))
        .await;
    assert_eq!(counts.trim(), "5\t5", "nothing lands twice");
}
