//! Screen views are held per session; the next one releases the previous with its duration;
//! `session_end` releases the held one unchanged, then itself; so does a sweep when the session
//! has been quiet.

use spillway::{BatchSettings, Timestamp};

use crate::helpers::*;

pub(super) async fn first_screen_view_of_a_session_is_held_not_queued(b: Backend) {
    let buffer = b.buffer();
    let view = screen_view("a", "s1", "u1", 1000);
    b.add_all(&buffer, &[&view]).await;

    assert_eq!(b.queue().size().await.expect("size"), 0);
    let held = b.queue().last_screen_view_by_session("s1").await;
    assert_eq!(
        held.expect("read").as_deref(),
        Some(view.as_str()),
        "held with identical text"
    );
}

pub(super) async fn next_screen_view_queues_the_previous_with_its_duration(b: Backend) {
    let views = [
        screen_view("a", "s1", "u1", 1000),
        screen_view("b", "s1", "u1", 3500),
        screen_view("c", "s1", "u1", 4000),
    ];
    b.add_all(&b.buffer(), &refs(&views)).await;

    let queued = b.queued().await;
    assert_eq!(queued.len(), 2);
    assert_eq!(
        (label(&queued[0]), field(&queued[0], "duration")),
        ("a".into(), 2500.into())
    );
    assert_eq!(
        (label(&queued[1]), field(&queued[1], "duration")),
        ("b".into(), 500.into())
    );
    let held = b.queue().last_screen_view_by_session("s1").await;
    assert_eq!(
        held.expect("read").as_deref(),
        Some(views[2].as_str()),
        "the newest is held"
    );
}

pub(super) async fn an_earlier_timestamp_gives_duration_zero(b: Backend) {
    let a = screen_view("a", "s1", "u1", 5000);
    let later_but_earlier = screen_view("b", "s1", "u1", 1000);
    b.add_all(&b.buffer(), &[&a, &later_but_earlier]).await;
    assert_eq!(field(&b.queued().await[0], "duration"), 0);
}

pub(super) async fn session_end_releases_the_held_view_unchanged_then_itself(b: Backend) {
    let view = screen_view("a", "s1", "u1", 1000);
    let end = session_end("e", "s1", "u1", 9000);
    b.add_all(&b.buffer(), &[&view, &end]).await;

    assert_eq!(
        b.queued().await,
        vec![view, end],
        "queue +2, texts unchanged"
    );
    let q = b.queue();
    assert_eq!(q.size().await.expect("size"), 2);
    assert_eq!(q.last_screen_view_by_session("s1").await.expect("r"), None);
    assert_eq!(
        q.last_screen_view_by_profile("p1", "u1").await.expect("r"),
        None,
        "session_end forgets the profile's view"
    );
}

pub(super) async fn session_end_with_nothing_held_queues_only_itself(b: Backend) {
    let end = session_end("e", "s1", "u1", 9000);
    b.add_all(&b.buffer(), &[&end]).await;
    assert_eq!(b.queued().await, vec![end]);
}

pub(super) async fn last_screen_view_by_profile_is_the_newest_of_any_session(b: Backend) {
    let in_s1 = screen_view("a", "s1", "u1", 1000);
    let in_s2 = screen_view("b", "s2", "u1", 2000);
    b.add_all(&b.buffer(), &[&in_s1, &in_s2]).await;

    let q = b.queue();
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

pub(super) async fn unknown_session_or_profile_has_no_view(b: Backend) {
    let q = b.queue();
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

pub(super) async fn interleaved_sessions_are_independent(b: Backend) {
    let events = [
        screen_view("a1", "sa", "ua", 1000),
        screen_view("b1", "sb", "ub", 1100),
        screen_view("a2", "sa", "ua", 1300),
        screen_view("b2", "sb", "ub", 2100),
    ];
    b.add_all(&b.buffer(), &refs(&events)).await;

    let queued = b.queued().await;
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

pub(super) async fn screen_view_without_session_is_a_regular_event(b: Backend) {
    let view = r#"{"id":"a","name":"screen_view","project_id":"p1","session_id":"","created_at":"2024-06-01 00:00:00.000"}"#;
    b.add_all(&b.buffer(), &[view]).await;
    assert_eq!(b.queued().await, vec![view.to_owned()]);
}

pub(super) async fn screen_view_without_profile_sets_no_profile_key(b: Backend) {
    b.add_all(&b.buffer(), &[&screen_view("a", "s1", "", 1000)])
        .await;
    let held = b.held_keys().await;
    let keys: Vec<&String> = held.iter().map(|(key, _, _)| key).collect();
    assert_eq!(
        keys,
        ["event_buffer:last_screen_view:session:s1"],
        "a session key, no profile key"
    );
}

pub(super) async fn held_event_text_survives_exactly_with_only_duration_changed(b: Backend) {
    let buffer = b.buffer();
    // Empty containers, number spellings, escapes and a nested "duration" that must stay.
    let first = r#"{"name":"screen_view","groups":[],"extra":{},"revenue":1.50,"big":12345678901234567890,"project_id":"p1","session_id":"s1","properties":{"duration":"7","q":"say \"hi\" \\ \u00e9 ✓"},"created_at":"2024-06-01 00:00:01.000","duration":0,"tail":[{"duration":3}]}"#;
    let second = r#"{"name":"screen_view","project_id":"p1","session_id":"s1","created_at":"2024-06-01T00:00:03.250Z"}"#;
    b.add_all(&buffer, &[first]).await;
    let held = b.queue().last_screen_view_by_session("s1").await;
    assert_eq!(held.expect("r").as_deref(), Some(first));
    b.add_all(&buffer, &[second]).await;
    let expected = first.replace(r#""duration":0,"tail""#, r#""duration":2250,"tail""#);
    assert_eq!(b.queued().await, vec![expected]);

    // A held event without a duration field gets one appended.
    let third = r#"{"name":"screen_view","project_id":"p1","session_id":"s1","created_at":"2024-06-01 00:00:04.000"}"#;
    b.add_all(&buffer, &[third]).await;
    assert_eq!(
        b.queued().await[1],
        second.replace(r#"Z"}"#, r#"Z","duration":750}"#)
    );
    // The Rust twin of the queue's duration surgery agrees.
    assert_eq!(
        spillway::event::with_duration(second, 750).expect("object"),
        b.queued().await[1]
    );
}

pub(super) async fn durations_are_the_same_across_micro_batch_boundaries(b: Backend) {
    let events: Vec<String> = (0..40)
        .map(|i| screen_view(&format!("v{i}"), &format!("s{}", i % 3), "", 1000 + i * 137))
        .collect();
    let mut results = Vec::new();
    for max_events in [1, 7, 100] {
        // A fresh queue per micro-batch size.
        let b = b.another().await;
        let buffer = b.buffer_with(BatchSettings {
            max_events,
            ..BatchSettings::default()
        });
        for event in &events {
            b.add_all(&buffer, &[event]).await;
        }
        results.push(b.queued().await);
    }
    assert_eq!(results[0].len(), 37);
    assert_eq!(results[0], results[1]);
    assert_eq!(results[0], results[2]);
}

/// A second from now: views held so far count as quiet since then.
fn later() -> Timestamp {
    Timestamp::from_millis(spillway::time::now().as_millis() + 1000)
}

/// A minute ago: no view held so far counts as quiet since then.
fn earlier() -> Timestamp {
    Timestamp::from_millis(spillway::time::now().as_millis() - 60_000)
}

pub(super) async fn the_held_views_of_quiet_sessions_are_released_unchanged(b: Backend) {
    let buffer = b.buffer();
    let quiet = screen_view("q", "s1", "u1", 1000);
    let other = screen_view("o", "s2", "u2", 1000);
    b.add_all(&buffer, &[&quiet, &other]).await;

    let q = b.queue();
    assert_eq!(q.held_count().await.expect("count"), 2);
    assert_eq!(
        q.sweep_idle(earlier(), 1000).await.expect("sweep"),
        0,
        "not quiet yet"
    );
    assert_eq!(
        q.sweep_idle(later(), 1).await.expect("sweep"),
        1,
        "at most `max`"
    );
    assert_eq!(q.sweep_idle(later(), 1000).await.expect("sweep"), 1);

    let mut queued = b.queued().await;
    queued.sort();
    let mut expected = vec![quiet, other];
    expected.sort();
    assert_eq!(queued, expected, "released as sent, duration untouched");
    assert_eq!(q.size().await.expect("size"), 2);
    assert_eq!(q.held_count().await.expect("count"), 0);
    assert_eq!(q.last_screen_view_by_session("s1").await.expect("r"), None);
    assert_eq!(
        q.last_screen_view_by_profile("p1", "u1").await.expect("r"),
        None
    );
    let oldest = q.oldest_queued_at().await.expect("oldest");
    assert_eq!(
        oldest.expect("one queued"),
        spillway::time::parse(&at(1000)).expect("time")
    );

    // The session goes on: its next view starts a new hold, nothing is released twice.
    b.add_all(&buffer, &[&screen_view("n", "s1", "u1", 5000)])
        .await;
    assert_eq!(b.queued().await.len(), 2);
}
