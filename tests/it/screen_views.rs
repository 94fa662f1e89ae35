//! Screen views are held per session; the next one releases the previous with its duration;
//! `session_end` releases the held one unchanged, then itself.

use redis::AsyncCommands;
use spillway::BatchSettings;

use crate::helpers::*;

#[tokio::test]
async fn first_screen_view_of_a_session_is_held_not_queued() {
    let env = TestEnv::new().await;
    let buffer = env.buffer();
    let view = screen_view("a", "s1", "u1", 1000);
    env.add_all(&buffer, &[&view]).await;

    assert_eq!(env.queue.size().await.expect("size"), 0);
    let held = env
        .queue
        .last_screen_view_by_session("s1")
        .await
        .expect("read");
    assert_eq!(
        held.as_deref(),
        Some(view.as_str()),
        "held with identical text"
    );
}

#[tokio::test]
async fn next_screen_view_queues_the_previous_with_its_duration() {
    let env = TestEnv::new().await;
    let buffer = env.buffer();
    let views = [
        screen_view("a", "s1", "u1", 1000),
        screen_view("b", "s1", "u1", 3500),
        screen_view("c", "s1", "u1", 4000),
    ];
    env.add_all(&buffer, &[&views[0], &views[1], &views[2]])
        .await;

    let queued = env.queued().await;
    assert_eq!(queued.len(), 2);
    assert_eq!(label(&queued[0]), "a");
    assert_eq!(field(&queued[0], "duration"), 2500);
    assert_eq!(label(&queued[1]), "b");
    assert_eq!(field(&queued[1], "duration"), 500);
    let held = env
        .queue
        .last_screen_view_by_session("s1")
        .await
        .expect("read");
    assert_eq!(
        held.as_deref(),
        Some(views[2].as_str()),
        "the newest is held"
    );
}

#[tokio::test]
async fn an_earlier_timestamp_gives_duration_zero() {
    let env = TestEnv::new().await;
    let buffer = env.buffer();
    let a = screen_view("a", "s1", "u1", 5000);
    let b = screen_view("b", "s1", "u1", 1000);
    env.add_all(&buffer, &[&a, &b]).await;
    assert_eq!(field(&env.queued().await[0], "duration"), 0);
}

#[tokio::test]
async fn session_end_releases_the_held_view_unchanged_then_itself() {
    let env = TestEnv::new().await;
    let buffer = env.buffer();
    let view = screen_view("a", "s1", "u1", 1000);
    let end = session_end("e", "s1", "u1", 9000);
    env.add_all(&buffer, &[&view, &end]).await;

    assert_eq!(
        env.queued().await,
        vec![view, end],
        "queue +2, texts unchanged"
    );
    assert_eq!(env.queue.size().await.expect("size"), 2);
    assert_eq!(
        env.queue
            .last_screen_view_by_session("s1")
            .await
            .expect("read"),
        None
    );
    assert_eq!(
        env.queue
            .last_screen_view_by_profile("p1", "u1")
            .await
            .expect("read"),
        None,
        "session_end forgets the profile's view"
    );
}

#[tokio::test]
async fn session_end_with_nothing_held_queues_only_itself() {
    let env = TestEnv::new().await;
    let buffer = env.buffer();
    let end = session_end("e", "s1", "u1", 9000);
    env.add_all(&buffer, &[&end]).await;
    assert_eq!(env.queued().await, vec![end]);
}

#[tokio::test]
async fn last_screen_view_by_profile_is_the_newest_of_any_session() {
    let env = TestEnv::new().await;
    let buffer = env.buffer();
    let in_s1 = screen_view("a", "s1", "u1", 1000);
    let in_s2 = screen_view("b", "s2", "u1", 2000);
    env.add_all(&buffer, &[&in_s1, &in_s2]).await;

    let q = &env.queue;
    assert_eq!(
        q.last_screen_view_by_session("s1")
            .await
            .expect("r")
            .as_deref(),
        Some(in_s1.as_str())
    );
    assert_eq!(
        q.last_screen_view_by_session("s2")
            .await
            .expect("r")
            .as_deref(),
        Some(in_s2.as_str())
    );
    assert_eq!(
        q.last_screen_view_by_profile("p1", "u1")
            .await
            .expect("r")
            .as_deref(),
        Some(in_s2.as_str())
    );
    assert_eq!(
        q.size().await.expect("size"),
        0,
        "each session keeps its own view"
    );
}

#[tokio::test]
async fn unknown_session_or_profile_has_no_view() {
    let env = TestEnv::new().await;
    assert_eq!(
        env.queue
            .last_screen_view_by_session("nope")
            .await
            .expect("r"),
        None
    );
    assert_eq!(
        env.queue
            .last_screen_view_by_profile("p1", "nope")
            .await
            .expect("r"),
        None
    );
}

#[tokio::test]
async fn interleaved_sessions_are_independent() {
    let env = TestEnv::new().await;
    let buffer = env.buffer();
    let events = [
        screen_view("a1", "sa", "ua", 1000),
        screen_view("b1", "sb", "ub", 1100),
        screen_view("a2", "sa", "ua", 1300),
        screen_view("b2", "sb", "ub", 2100),
    ];
    let refs: Vec<&str> = events.iter().map(String::as_str).collect();
    env.add_all(&buffer, &refs).await;

    let queued = env.queued().await;
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
    let env = TestEnv::new().await;
    let buffer = env.buffer();
    let view = r#"{"id":"a","name":"screen_view","project_id":"p1","session_id":"","created_at":"2024-06-01 00:00:00.000"}"#;
    env.add_all(&buffer, &[view]).await;
    assert_eq!(env.queued().await, vec![view.to_owned()]);
}

#[tokio::test]
async fn screen_view_without_profile_sets_no_profile_key() {
    let env = TestEnv::new().await;
    let buffer = env.buffer();
    let view = screen_view("a", "s1", "", 1000);
    env.add_all(&buffer, &[&view]).await;
    let mut redis = env.redis.clone();
    let keys: Vec<String> = redis
        .keys(format!(
            "{}event_buffer:last_screen_view:profile:*",
            env.prefix
        ))
        .await
        .expect("KEYS");
    assert!(keys.is_empty(), "{keys:?}");
}

#[tokio::test]
async fn held_event_text_survives_exactly_with_only_duration_changed() {
    let env = TestEnv::new().await;
    let buffer = env.buffer();
    // Empty containers, number spellings, escapes and a nested "duration" the scripts must not touch.
    let first = r#"{"name":"screen_view","groups":[],"extra":{},"revenue":1.50,"big":12345678901234567890,"project_id":"p1","session_id":"s1","properties":{"duration":"7","q":"say \"hi\" \\ \u00e9 ✓"},"created_at":"2024-06-01 00:00:01.000","duration":0,"tail":[{"duration":3}]}"#;
    let second = r#"{"name":"screen_view","project_id":"p1","session_id":"s1","created_at":"2024-06-01T00:00:03.250Z"}"#;
    env.add_all(&buffer, &[first]).await;
    assert_eq!(
        env.queue
            .last_screen_view_by_session("s1")
            .await
            .expect("r")
            .as_deref(),
        Some(first)
    );
    env.add_all(&buffer, &[second]).await;
    let expected = first.replace(r#""duration":0,"tail""#, r#""duration":2250,"tail""#);
    assert_eq!(env.queued().await, vec![expected]);

    // A held event without a duration field gets one appended.
    let third = r#"{"name":"screen_view","project_id":"p1","session_id":"s1","created_at":"2024-06-01 00:00:04.000"}"#;
    env.add_all(&buffer, &[third]).await;
    assert_eq!(
        env.queued().await[1],
        second.replace(r#"Z"}"#, r#"Z","duration":750}"#)
    );
    // The Rust twin of the script's duration surgery agrees.
    assert_eq!(
        spillway::event::with_duration(second, 750).expect("object"),
        env.queued().await[1]
    );
}

#[tokio::test]
async fn durations_are_the_same_across_micro_batch_boundaries() {
    let events: Vec<String> = (0..40)
        .map(|i| screen_view(&format!("v{i}"), &format!("s{}", i % 3), "", 1000 + i * 137))
        .collect();
    let refs: Vec<&str> = events.iter().map(String::as_str).collect();
    let mut results = Vec::new();
    for max_events in [1, 7, 100] {
        let env = TestEnv::new().await;
        let buffer = env.buffer_with(BatchSettings {
            max_events,
            ..BatchSettings::default()
        });
        for event in &refs {
            env.add_all(&buffer, &[event]).await;
        }
        results.push(env.queued().await);
    }
    assert_eq!(results[0].len(), 37);
    assert_eq!(results[0], results[1]);
    assert_eq!(results[0], results[2]);
}

#[tokio::test]
async fn noscript_after_script_flush_loses_no_event() {
    let env = TestEnv::new().await;
    let buffer = env.buffer();
    let a = screen_view("a", "s1", "u1", 1000);
    env.add_all(&buffer, &[&a]).await;
    let mut redis = env.redis.clone();
    redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async::<()>(&mut redis)
        .await
        .expect("SCRIPT FLUSH");
    let b = screen_view("b", "s1", "u1", 2000);
    let c = click("c", "p1", 2500);
    env.add_all(&buffer, &[&b, &c]).await;
    let queued = env.queued().await;
    assert_eq!(queued.len(), 2, "{queued:?}");
    assert_eq!(label(&queued[0]), "a");
    assert_eq!(field(&queued[0], "duration"), 1000);
    assert_eq!(queued[1], c);
}

#[tokio::test]
async fn a_view_held_by_openpanel_itself_is_released_with_its_text_intact() {
    let env = TestEnv::new().await;
    let buffer = env.buffer();
    // The seed's own layout, as OpenPanel's TypeScript writes it (JSON.stringify({event, ts})).
    let held = screen_view("a", "s1", "u1", 1000);
    let mut redis = env.redis.clone();
    let value = format!(r#"{{"event":{held},"ts":1717200001000}}"#);
    let _: () = redis
        .set(env.key("event_buffer:last_screen_view:session:s1"), value)
        .await
        .expect("SET");
    assert_eq!(
        env.queue
            .last_screen_view_by_session("s1")
            .await
            .expect("read")
            .as_deref(),
        Some(held.as_str())
    );
    env.add_all(&buffer, &[&screen_view("b", "s1", "u1", 4000)])
        .await;
    assert_eq!(
        env.queued().await,
        vec![held.replace(r#""duration":0"#, r#""duration":3000"#)]
    );
}
