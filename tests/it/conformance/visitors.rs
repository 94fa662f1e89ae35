//! Live visitors: a throttled heartbeat per visitor with a profile.

use crate::helpers::*;

pub(super) async fn an_event_with_a_profile_makes_a_live_visitor(b: Backend) {
    b.add_all(&b.buffer(), &[&screen_view("a", "s1", "u1", 0)])
        .await;
    let now = spillway::time::now();
    let q = b.queue();
    assert_eq!(q.active_visitor_count("p1", now).await.expect("count"), 1);
    assert_eq!(
        q.active_visitor_count("other", now).await.expect("count"),
        0
    );
    let ttl = b.heartbeat_ttl_ms("p1", "u1").await;
    assert!(
        (295_000..=300_000).contains(&ttl),
        "the heartbeat expires with the window: {ttl} ms"
    );
}

pub(super) async fn events_without_a_profile_are_not_visitors(b: Backend) {
    b.add_all(&b.buffer(), &[&click("a", "p1", 0)]).await;
    let now = spillway::time::now();
    assert_eq!(
        b.queue()
            .active_visitor_count("p1", now)
            .await
            .expect("count"),
        0
    );
}

/// A second buffer stands for another process on Redis (and another writer in the one process
/// the embedded backend allows per data directory).
pub(super) async fn heartbeats_are_throttled_within_a_buffer_and_across_buffers(b: Backend) {
    let first = b.buffer();
    b.add_all(&first, &[&screen_view("a", "s1", "u1", 0)]).await;
    let seen = b.visitor_last_seen("p1", "u1").await;
    assert!(seen > 0);
    // Marked, so that any refresh shows even within the same millisecond.
    b.add_visitor_at("p1", "u1", 1).await;

    // The same buffer: its local throttle skips the heartbeat.
    b.add_all(&first, &[&screen_view("b", "s1", "u1", 10)])
        .await;
    // Another buffer: the queue sees the fresh heartbeat and skips.
    b.add_all(&b.buffer(), &[&screen_view("c", "s1", "u1", 20)])
        .await;
    assert_eq!(
        b.visitor_last_seen("p1", "u1").await,
        1,
        "no refresh within the refresh period"
    );

    // Once the heartbeat is older than the refresh period, the next event refreshes it.
    b.age_heartbeat("p1", "u1").await;
    let before = spillway::time::now().as_millis();
    b.add_all(&b.buffer(), &[&screen_view("d", "s1", "u1", 30)])
        .await;
    let refreshed = b.visitor_last_seen("p1", "u1").await;
    assert!(refreshed >= before, "refreshed: {refreshed} >= {before}");
    assert!(refreshed > seen, "{refreshed} > {seen}");
}

pub(super) async fn visitors_older_than_the_window_are_trimmed_and_not_counted(b: Backend) {
    let now = spillway::time::now().as_millis();
    b.add_visitor_at("p1", "old", now - 301_000).await;
    b.add_visitor_at("p1", "new", now - 1_000).await;
    let count = b
        .queue()
        .active_visitor_count("p1", spillway::Timestamp::from_millis(now))
        .await
        .expect("count");
    assert_eq!(count, 1);
    assert_eq!(
        b.visitors("p1").await,
        ["new"],
        "the stale entry is trimmed"
    );
}
