//! Micro-batching into the queue, and the buffer-size reader.

use std::time::Duration;

use redis::AsyncCommands;
use spillway::BatchSettings;

use crate::helpers::*;

#[tokio::test]
async fn a_regular_event_goes_straight_to_the_queue() {
    let env = TestEnv::new().await;
    let buffer = env.buffer();
    let event = click("a", "p1", 0);
    env.add_all(&buffer, &[&event]).await;
    assert_eq!(env.queued().await, vec![event]);
    assert_eq!(env.queue.size().await.expect("size"), 1);
}

#[tokio::test]
async fn buffer_size_counts_queued_events_not_held_views() {
    let env = TestEnv::new().await;
    let buffer = env.buffer();
    let events = [
        click("a", "p1", 0),
        screen_view("v1", "s1", "u1", 10),
        click("b", "p1", 20),
        screen_view("v2", "s2", "u2", 30),
    ];
    let refs: Vec<&str> = events.iter().map(String::as_str).collect();
    env.add_all(&buffer, &refs).await;
    assert_eq!(env.queue.size().await.expect("size"), 2);
}

#[tokio::test]
async fn a_missing_or_negative_counter_is_repaired_from_the_list() {
    let env = TestEnv::new().await;
    let buffer = env.buffer();
    env.add_all(&buffer, &[&click("a", "p1", 0), &click("b", "p1", 1)])
        .await;
    let mut redis = env.redis.clone();
    let counter = env.key("event_buffer:total_count");

    let _: () = redis.del(&counter).await.expect("DEL");
    assert_eq!(env.queue.size().await.expect("size"), 2);
    let repaired: i64 = redis.get(&counter).await.expect("GET");
    assert_eq!(repaired, 2);

    let _: () = redis.set(&counter, -5).await.expect("SET");
    assert_eq!(env.queue.size().await.expect("size"), 2);

    // A write with the counter missing sets it from the list instead of starting at the batch.
    let _: () = redis.del(&counter).await.expect("DEL");
    env.add_all(&buffer, &[&click("c", "p1", 2)]).await;
    let counted: i64 = redis.get(&counter).await.expect("GET");
    assert_eq!(counted, 3);
}

#[tokio::test]
async fn a_full_micro_batch_is_written_without_waiting_for_the_timer() {
    let env = TestEnv::new().await;
    let buffer = env.buffer_with(BatchSettings {
        max_events: 3,
        max_wait: Duration::from_secs(3600),
        ..BatchSettings::default()
    });
    let events: Vec<_> = (0..3)
        .map(|i| parse(&click(&format!("e{i}"), "p1", i)))
        .collect();
    let receipt = buffer.bulk_add(events).await.expect("open");
    receipt.written().await.expect("written at the size limit");
    assert_eq!(env.llen("event_buffer:queue").await, 3);
}

#[tokio::test]
async fn a_partial_micro_batch_is_written_when_the_timer_fires() {
    let env = TestEnv::new().await;
    let buffer = env.buffer_with(BatchSettings {
        max_events: 100,
        max_wait: Duration::from_millis(10),
        ..BatchSettings::default()
    });
    let receipt = buffer.add(parse(&click("a", "p1", 0))).await.expect("open");
    receipt
        .written()
        .await
        .expect("written by the timer, no flush called");
    assert_eq!(env.llen("event_buffer:queue").await, 1);
}

#[tokio::test]
async fn flush_writes_a_partial_micro_batch_at_once() {
    let env = TestEnv::new().await;
    let buffer = env.buffer_with(BatchSettings {
        max_events: 100,
        max_wait: Duration::from_secs(3600),
        ..BatchSettings::default()
    });
    let _receipt = buffer.add(parse(&click("a", "p1", 0))).await.expect("open");
    buffer.flush().await.expect("flushed");
    assert_eq!(env.llen("event_buffer:queue").await, 1);
}

#[tokio::test]
async fn order_of_arrival_is_kept_across_micro_batches() {
    let env = TestEnv::new().await;
    let buffer = env.buffer_with(BatchSettings {
        max_events: 7,
        ..BatchSettings::default()
    });
    let events: Vec<String> = (0..50).map(|i| click(&format!("e{i}"), "p1", i)).collect();
    for event in &events {
        let _ = buffer.add(parse(event)).await.expect("open");
    }
    buffer.flush().await.expect("flushed");
    assert_eq!(env.queued().await, events);
}
