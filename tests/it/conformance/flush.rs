//! Flushing: queued events into the sink, sorted, chunked, exactly once, with notifications.

use std::collections::HashSet;
use std::time::Duration;

use futures_util::StreamExt;
use spillway::FlushOutcome;

use crate::helpers::*;

pub(super) async fn flush_inserts_queued_events_and_empties_the_queue(b: Backend) {
    b.add_all(&b.buffer(), &[&click("a", "p1", 0), &click("b", "p1", 5)])
        .await;
    let flusher = b.flusher(flush_settings(4000, 1000)).await;

    let report = flusher.drain().await.expect("drain");
    assert_eq!(report.rows, 2);
    assert_eq!(b.landed_labels().await, ["a", "b"]);
    assert_eq!(b.queue().size().await.expect("size"), 0);
    let stats = b.queue().stats().await.expect("stats");
    assert_eq!(
        (stats.queued, stats.in_flight, stats.dead_letter),
        (0, 0, 0)
    );
}

pub(super) async fn rows_are_sorted_by_created_at_and_inserted_in_chunks(b: Backend) {
    // Out of order on purpose, into a table that keeps rows in insertion order.
    let events: Vec<String> = [40, 10, 30, 20, 50]
        .iter()
        .map(|ms| click(&format!("e{ms}"), "p1", *ms))
        .collect();
    b.add_all(&b.buffer(), &refs(&events)).await;
    let flusher = b.flusher_into_ordered_table(flush_settings(4000, 2)).await;

    let report = flusher.drain().await.expect("drain");
    assert_eq!(report.rows, 5);
    assert_eq!(
        b.landed_in_insertion_order().await,
        ["e10", "e20", "e30", "e40", "e50"]
    );
    b.assert_insert_sizes(&[2, 2, 1], "3 inserts: 2 + 2 + 1 rows")
        .await;
}

pub(super) async fn four_events_with_chunk_size_two_make_exactly_two_inserts(b: Backend) {
    let events: Vec<String> = (0..4).map(|i| click(&format!("e{i}"), "p1", i)).collect();
    b.add_all(&b.buffer(), &refs(&events)).await;
    let flusher = b.flusher(flush_settings(4000, 2)).await;
    flusher.drain().await.expect("drain");
    b.assert_insert_sizes(&[2, 2], "2 inserts of 2 rows").await;
}

pub(super) async fn batch_size_bounds_one_flush(b: Backend) {
    let events: Vec<String> = (0..10).map(|i| click(&format!("e{i}"), "p1", i)).collect();
    b.add_all(&b.buffer(), &refs(&events)).await;
    let flusher = b.flusher(flush_settings(4, 1000)).await;
    let FlushOutcome::Flushed(first) = flusher.flush_once().await.expect("flush") else {
        panic!("expected a flush");
    };
    assert_eq!(first.rows, 4);
    assert_eq!(b.queue().size().await.expect("size"), 6);
    let report = flusher.drain().await.expect("drain");
    assert_eq!((report.rows, report.batches), (6, 2));
}

pub(super) async fn a_failed_insert_leaves_the_events_in_flight_and_the_next_flush_lands_them_once(
    b: Backend,
) {
    let events: Vec<String> = (0..5).map(|i| click(&format!("e{i}"), "p1", i)).collect();
    b.add_all(&b.buffer(), &refs(&events)).await;
    let flusher = b.flusher(flush_settings(4000, 2)).await;
    b.break_sink().await;

    let err = flusher.flush_once().await.expect_err("the table is gone");
    assert!(err.to_string().contains("chunk 0"), "{err}");
    let stats = b.queue().stats().await.expect("stats");
    assert_eq!(
        (stats.queued, stats.in_flight),
        (0, 5),
        "nothing lost: all in flight"
    );

    b.repair_sink().await;
    let report = flusher.drain().await.expect("drain");
    assert_eq!(report.rows, 5);
    assert_eq!(b.landed_count_and_unique().await, (5, 5));
    assert_eq!(b.landed_labels().await, ["e0", "e1", "e2", "e3", "e4"]);
}

fn five_clicks() -> Vec<String> {
    ["a", "b", "c", "d", "e"]
        .iter()
        .zip(0..)
        .map(|(id, ms)| click(id, "p1", ms))
        .collect()
}

pub(super) async fn an_abandoned_batch_resumes_after_its_last_recorded_chunk(b: Backend) {
    let flusher = b.flusher(flush_settings(4000, 2)).await;
    // A flusher died after inserting chunk 0 (rows a, b) and recording it.
    b.abandon_batch("old", 1, &five_clicks()).await;

    let FlushOutcome::Flushed(report) = flusher.flush_once().await.expect("flush") else {
        panic!("expected the abandoned batch to be flushed");
    };
    assert!(report.resumed);
    assert_eq!(
        (report.batch_id.as_str(), report.rows, report.chunks),
        ("old", 3, 2)
    );
    assert_eq!(b.landed_labels().await, ["c", "d", "e"]);
    b.assert_insert_sizes(&[2, 1], "chunks 1 and 2 only").await;
}

/// ClickHouse 18.16 has no `insert_deduplication_token`, so the Redis half runs against the
/// current engine (`with redis_current` in `conformance/mod.rs`).
pub(super) async fn a_chunk_inserted_again_after_a_crash_is_deduplicated_by_its_token(b: Backend) {
    let flusher = b.flusher(flush_settings(4000, 2)).await;
    b.abandon_batch("old", 0, &five_clicks()).await;
    assert!(matches!(
        flusher.flush_once().await.expect("first flush"),
        FlushOutcome::Flushed(_)
    ));
    // The same batch again, as if the flusher had died after inserting chunks 1 and 2 but
    // before recording them: the sink must recognise both tokens.
    b.abandon_batch("old", 1, &five_clicks()).await;
    let FlushOutcome::Flushed(report) = flusher.flush_once().await.expect("flush") else {
        panic!("expected the abandoned batch to be flushed");
    };
    assert_eq!((report.batch_id.as_str(), report.chunks), ("old", 2));
    // And once more from chunk 0, as if it had died before recording any: all three again.
    b.abandon_batch("old", 0, &five_clicks()).await;
    assert!(matches!(
        flusher.flush_once().await.expect("flush"),
        FlushOutcome::Flushed(_)
    ));

    assert_eq!(
        b.landed_count_and_unique().await,
        (5, 5),
        "the repeated inserts were deduplicated"
    );
    assert_eq!(
        b.landed_labels().await,
        ["a", "b", "c", "d", "e"],
        "each row once"
    );
}

pub(super) async fn two_flushers_racing_insert_every_event_exactly_once(b: Backend) {
    let events: Vec<String> = (0..3000)
        .map(|i| click(&format!("e{i}"), "p1", i))
        .collect();
    b.add_all(&b.buffer(), &refs(&events)).await;
    let a = b.flusher(flush_settings(200, 50)).await;
    let c = b.flusher(flush_settings(200, 50)).await;

    let (ra, rc) = tokio::join!(a.drain(), c.drain());
    let (ra, rc) = (ra.expect("a drains"), rc.expect("c drains"));
    assert_eq!(ra.rows + rc.rows, 3000);
    assert_eq!(b.landed_count_and_unique().await, (3000, 3000));
    let labels = b.landed_labels().await;
    let unique: HashSet<&String> = labels.iter().collect();
    assert_eq!((labels.len(), unique.len()), (3000, 3000));
}

pub(super) async fn a_flush_publishes_one_notification_per_project(b: Backend) {
    let events = [
        click("a", "p1", 0),
        click("b", "p2", 1),
        click("c", "p1", 2),
    ];
    b.add_all(&b.buffer(), &refs(&events)).await;
    let flusher = b.flusher(flush_settings(4000, 1000)).await;
    let mut feed = b.batch_notifications().await;

    flusher.drain().await.expect("drain");
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

pub(super) async fn corrupt_entries_are_dead_lettered_while_valid_ones_land(b: Backend) {
    let buffer = b.buffer();
    b.add_all(&buffer, &[&click("a", "p1", 0)]).await;
    b.push_raw_entry("not json {").await;
    b.push_raw_entry(r#"{"name":"click","created_at":"2024-06-01 00:00:00"}"#)
        .await;
    b.add_all(&buffer, &[&click("b", "p1", 1)]).await;
    let flusher = b.flusher(flush_settings(4000, 1000)).await;

    let report = flusher.drain().await.expect("drain");
    assert_eq!((report.rows, report.dead_lettered), (2, 2));
    assert_eq!(b.landed_labels().await, ["a", "b"]);
    let dead = b.queue().dead_letters().await.expect("dead letters");
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
        b.queue().size().await.expect("size"),
        0,
        "the queue does not stall"
    );
}
