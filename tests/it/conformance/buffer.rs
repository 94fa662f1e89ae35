//! Micro-batching into the queue, and the buffer-size reader.

use std::time::Duration;

use spillway::BatchSettings;

use crate::helpers::*;

pub(super) async fn a_regular_event_goes_straight_to_the_queue(b: Backend) {
    let event = click("a", "p1", 0);
    b.add_all(&b.buffer(), &[&event]).await;
    assert_eq!(b.queued().await, vec![event]);
    assert_eq!(b.queue().size().await.expect("size"), 1);
}

pub(super) async fn buffer_size_counts_queued_events_not_held_views(b: Backend) {
    let events = [
        click("a", "p1", 0),
        screen_view("v1", "s1", "u1", 10),
        click("b", "p1", 20),
        screen_view("v2", "s2", "u2", 30),
    ];
    b.add_all(&b.buffer(), &refs(&events)).await;
    assert_eq!(b.queue().size().await.expect("size"), 2);
}

pub(super) async fn a_full_micro_batch_is_written_without_waiting_for_the_timer(b: Backend) {
    let buffer = b.buffer_with(BatchSettings {
        max_events: 3,
        max_wait: Duration::from_secs(3600),
        ..BatchSettings::default()
    });
    let events: Vec<_> = (0..3)
        .map(|i| parse(&click(&format!("e{i}"), "p1", i)))
        .collect();
    let receipt = buffer.bulk_add(events).await.expect("open");
    receipt.written().await.expect("written at the size limit");
    assert_eq!(b.queued().await.len(), 3);
}

pub(super) async fn a_partial_micro_batch_is_written_when_the_timer_fires(b: Backend) {
    let buffer = b.buffer_with(BatchSettings {
        max_events: 100,
        max_wait: Duration::from_millis(10),
        ..BatchSettings::default()
    });
    let receipt = buffer.add(parse(&click("a", "p1", 0))).await.expect("open");
    receipt
        .written()
        .await
        .expect("written by the timer, no flush called");
    assert_eq!(b.queued().await.len(), 1);
}

pub(super) async fn flush_writes_a_partial_micro_batch_at_once(b: Backend) {
    let buffer = b.buffer_with(BatchSettings {
        max_events: 100,
        max_wait: Duration::from_secs(3600),
        ..BatchSettings::default()
    });
    let _receipt = buffer.add(parse(&click("a", "p1", 0))).await.expect("open");
    buffer.flush().await.expect("flushed");
    assert_eq!(b.queued().await.len(), 1);
}

pub(super) async fn order_of_arrival_is_kept_across_micro_batches(b: Backend) {
    let buffer = b.buffer_with(BatchSettings {
        max_events: 7,
        ..BatchSettings::default()
    });
    let events: Vec<String> = (0..50).map(|i| click(&format!("e{i}"), "p1", i)).collect();
    for event in &events {
        let _ = buffer.add(parse(event)).await.expect("open");
    }
    buffer.flush().await.expect("flushed");
    assert_eq!(b.queued().await, events);
}
