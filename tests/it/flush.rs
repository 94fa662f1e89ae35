//! Flushing: queued events into ClickHouse, sorted, chunked, exactly once, with notifications.

use std::collections::HashSet;

use futures_util::StreamExt;
use redis::AsyncCommands;
use spillway::{FlushOutcome, SchemaVariant};

use crate::helpers::*;

#[tokio::test]
async fn flush_inserts_queued_events_and_empties_the_queue() {
    let env = TestEnv::new().await;
    let buffer = env.buffer();
    env.add_all(&buffer, &[&click("a", "p1", 0), &click("b", "p1", 5)])
        .await;
    let flusher = env
        .flusher(SchemaVariant::Legacy, flush_settings(4000, 1000))
        .await;

    let report = flusher.drain().await.expect("drain");
    assert_eq!(report.rows, 2);
    let ids = env
        .sql(&labels_sql(&format!("{}.events", env.database)))
        .await;
    assert_eq!(ids.split_whitespace().collect::<Vec<_>>(), ["a", "b"]);
    assert_eq!(env.queue.size().await.expect("size"), 0);
    let stats = env.queue.stats().await.expect("stats");
    assert_eq!(
        (stats.queued, stats.in_flight, stats.dead_letter),
        (0, 0, 0)
    );
}

#[tokio::test]
async fn rows_are_sorted_by_created_at_and_inserted_in_chunks() {
    let env = TestEnv::new().await;
    let buffer = env.buffer();
    // Out of order on purpose; a Log table keeps rows in insertion order.
    let events: Vec<String> = [40, 10, 30, 20, 50]
        .iter()
        .map(|ms| click(&format!("e{ms}"), "p1", *ms))
        .collect();
    let refs: Vec<&str> = events.iter().map(String::as_str).collect();
    env.add_all(&buffer, &refs).await;
    env.sql(&format!("CREATE DATABASE IF NOT EXISTS {}", env.database))
        .await;
    env.sql(&format!(
        "CREATE TABLE {}.log_events (path String, created_at DateTime, duration UInt64) ENGINE = Log",
        env.database
    ))
    .await;
    let sink = env.sink("log_events").await;
    let flusher = spillway::Flusher::new(env.queue.clone(), sink, flush_settings(4000, 2));

    let report = flusher.drain().await.expect("drain");
    assert_eq!(report.rows, 5);
    let ids: Vec<String> = env
        .rows(&format!("SELECT path FROM {}.log_events", env.database))
        .await
        .into_iter()
        .map(|r| {
            r["path"]
                .as_str()
                .expect("path")
                .trim_start_matches('/')
                .to_owned()
        })
        .collect();
    assert_eq!(ids, ["e10", "e20", "e30", "e40", "e50"]);
    assert_eq!(
        env.inserts_into("log_events").await,
        vec![1, 2, 2],
        "3 inserts: 2 + 2 + 1 rows"
    );
}

#[tokio::test]
async fn four_events_with_chunk_size_two_make_exactly_two_inserts() {
    let env = TestEnv::new().await;
    let buffer = env.buffer();
    let events: Vec<String> = (0..4).map(|i| click(&format!("e{i}"), "p1", i)).collect();
    let refs: Vec<&str> = events.iter().map(String::as_str).collect();
    env.add_all(&buffer, &refs).await;
    let flusher = env
        .flusher(SchemaVariant::Legacy, flush_settings(4000, 2))
        .await;
    flusher.drain().await.expect("drain");
    assert_eq!(env.inserts_into("events").await, vec![2, 2]);
}

#[tokio::test]
async fn batch_size_bounds_one_flush() {
    let env = TestEnv::new().await;
    let buffer = env.buffer();
    let events: Vec<String> = (0..10).map(|i| click(&format!("e{i}"), "p1", i)).collect();
    let refs: Vec<&str> = events.iter().map(String::as_str).collect();
    env.add_all(&buffer, &refs).await;
    let flusher = env
        .flusher(SchemaVariant::Legacy, flush_settings(4, 1000))
        .await;
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
    let env = TestEnv::new().await;
    let buffer = env.buffer();
    let events: Vec<String> = (0..5).map(|i| click(&format!("e{i}"), "p1", i)).collect();
    let refs: Vec<&str> = events.iter().map(String::as_str).collect();
    env.add_all(&buffer, &refs).await;
    let flusher = env
        .flusher(SchemaVariant::Legacy, flush_settings(4000, 2))
        .await;
    let table = format!("{}.events", env.database);
    env.sql(&format!("RENAME TABLE {table} TO {}.away", env.database))
        .await;

    let err = flusher.flush_once().await.expect_err("the table is gone");
    assert!(err.to_string().contains("chunk 0"), "{err}");
    let stats = env.queue.stats().await.expect("stats");
    assert_eq!(
        (stats.queued, stats.in_flight),
        (0, 5),
        "nothing lost: all in flight"
    );

    env.sql(&format!("RENAME TABLE {}.away TO {table}", env.database))
        .await;
    let report = flusher.drain().await.expect("drain");
    assert_eq!(report.rows, 5);
    let count = env
        .sql(&format!("SELECT count(), uniqExact(id) FROM {table}"))
        .await;
    assert_eq!(count.trim(), "5\t5");
}

#[tokio::test]
async fn an_abandoned_batch_resumes_after_its_last_recorded_chunk() {
    let env = TestEnv::new().await;
    let flusher = env
        .flusher(SchemaVariant::Legacy, flush_settings(4000, 2))
        .await;
    // A flusher died after inserting chunk 0 (rows a, b) and recording it.
    let entries: Vec<String> = ["a", "b", "c", "d", "e"]
        .iter()
        .enumerate()
        .map(|(i, id)| click(id, "p1", i as u64))
        .collect();
    let mut redis = env.redis.clone();
    let _: () = redis
        .rpush(env.key("event_buffer:inflight"), &entries)
        .await
        .expect("RPUSH");
    let _: () = redis
        .hset_multiple(
            env.key("event_buffer:inflight:meta"),
            &[("batch_id", "old"), ("chunks_done", "1")],
        )
        .await
        .expect("HSET");

    let FlushOutcome::Flushed(report) = flusher.flush_once().await.expect("flush") else {
        panic!("expected the abandoned batch to be flushed");
    };
    assert!(report.resumed);
    assert_eq!(
        (report.batch_id.as_str(), report.rows, report.chunks),
        ("old", 3, 2)
    );
    let ids = env
        .sql(&labels_sql(&format!("{}.events", env.database)))
        .await;
    assert_eq!(ids.split_whitespace().collect::<Vec<_>>(), ["c", "d", "e"]);
}

#[tokio::test]
async fn two_flushers_racing_insert_every_event_exactly_once() {
    let env = TestEnv::new().await;
    let buffer = env.buffer();
    let events: Vec<String> = (0..3000)
        .map(|i| click(&format!("e{i}"), "p1", i))
        .collect();
    let refs: Vec<&str> = events.iter().map(String::as_str).collect();
    env.add_all(&buffer, &refs).await;
    let a = env
        .flusher(SchemaVariant::Legacy, flush_settings(200, 50))
        .await;
    let b = spillway::Flusher::new(
        env.queue.clone(),
        env.sink("events").await,
        flush_settings(200, 50),
    );

    let (ra, rb) = tokio::join!(a.drain(), b.drain());
    let (ra, rb) = (ra.expect("a drains"), rb.expect("b drains"));
    assert_eq!(ra.rows + rb.rows, 3000);
    let count = env
        .sql(&format!(
            "SELECT count(), uniqExact(id) FROM {}.events",
            env.database
        ))
        .await;
    assert_eq!(count.trim(), "3000\t3000");
}

#[tokio::test]
async fn a_flush_publishes_one_notification_per_project() {
    let env = TestEnv::new().await;
    let buffer = env.buffer();
    env.add_all(
        &buffer,
        &[
            &click("a", "p1", 0),
            &click("b", "p2", 1),
            &click("c", "p1", 2),
        ],
    )
    .await;
    let flusher = env
        .flusher(SchemaVariant::Legacy, flush_settings(4000, 1000))
        .await;
    let client = redis::Client::open(env.redis_url.as_str()).expect("url");
    let mut pubsub = client.get_async_pubsub().await.expect("pubsub");
    pubsub
        .subscribe(env.key("events:batch"))
        .await
        .expect("SUBSCRIBE");

    flusher.drain().await.expect("drain");
    let mut messages = pubsub.on_message();
    let mut payloads = HashSet::new();
    for _ in 0..2 {
        let message = tokio::time::timeout(std::time::Duration::from_secs(10), messages.next())
            .await
            .expect("a notification")
            .expect("stream open");
        let payload: String = message.get_payload().expect("text");
        payloads.insert(payload);
    }
    let expected: HashSet<String> = [
        r#"{"count":2,"projectId":"p1"}"#,
        r#"{"count":1,"projectId":"p2"}"#,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let parsed: HashSet<String> = payloads
        .iter()
        .map(|p| {
            serde_json::from_str::<serde_json::Value>(p)
                .expect("json")
                .to_string()
        })
        .collect();
    assert_eq!(parsed, expected);
}

#[tokio::test]
async fn corrupt_entries_are_dead_lettered_while_valid_ones_land() {
    let env = TestEnv::new().await;
    let buffer = env.buffer();
    env.add_all(&buffer, &[&click("a", "p1", 0)]).await;
    let mut redis = env.redis.clone();
    let queue = env.key("event_buffer:queue");
    let _: () = redis.rpush(&queue, "not json {").await.expect("RPUSH");
    let _: () = redis
        .rpush(
            &queue,
            r#"{"name":"click","created_at":"2024-06-01 00:00:00"}"#,
        )
        .await
        .expect("RPUSH");
    let _: () = redis
        .incr(env.key("event_buffer:total_count"), 2)
        .await
        .expect("INCR");
    env.add_all(&buffer, &[&click("b", "p1", 1)]).await;
    let flusher = env
        .flusher(SchemaVariant::Legacy, flush_settings(4000, 1000))
        .await;

    let report = flusher.drain().await.expect("drain");
    assert_eq!((report.rows, report.dead_lettered), (2, 2));
    let ids = env
        .sql(&labels_sql(&format!("{}.events", env.database)))
        .await;
    assert_eq!(ids.split_whitespace().collect::<Vec<_>>(), ["a", "b"]);
    let dead = env.queue.dead_letters().await.expect("dead letters");
    assert_eq!(dead.len(), 2);
    assert_eq!(field(&dead[0], "entry"), "not json {");
    assert!(field(&dead[0], "reason")
        .as_str()
        .expect("reason")
        .starts_with("invalid JSON"));
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
