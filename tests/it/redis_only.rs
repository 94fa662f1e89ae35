//! Behaviours only the Redis backend has, each test saying why: the embedded backend is tested
//! for the same behaviours in `conformance/`, and for its own in `embedded.rs`.

use redis::AsyncCommands;

use crate::helpers::*;

// Redis only: scripts are called by SHA and must be reloaded after SCRIPT FLUSH or a restart.
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

// Redis only: OpenPanel shares the Redis and writes held views in its own layout.
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

// Redis only: the size counter (OpenPanel's `total_count`) has no SQLite twin; the embedded
// queue counts its table.
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

// Redis only: something other than spillway can write to its queue, bytes that are not text.
#[tokio::test]
async fn an_entry_that_is_not_utf8_is_dead_lettered_and_does_not_stop_flushing() {
    let env = TestEnv::new().await;
    let mut redis = env.redis.clone();
    let _: () = redis
        .rpush(
            env.key("event_buffer:queue"),
            b"garbage \xff\xfe".as_slice(),
        )
        .await
        .expect("RPUSH");
    // At the head of the queue it does not break the queue's readers either.
    assert_eq!(env.queue.oldest_queued_at().await.expect("oldest"), None);
    let buffer = env.buffer();
    env.add_all(&buffer, &[&click("a", "p1", 0), &click("b", "p1", 1)])
        .await;
    let flusher = env
        .flusher(spillway::SchemaVariant::Legacy, flush_settings(4000, 1000))
        .await;

    let report = flusher.drain().await.expect("drain");
    assert_eq!((report.rows, report.dead_lettered), (2, 1));
    let dead = env.queue.dead_letters().await.expect("dead letters");
    assert_eq!(dead.len(), 1);
    assert_eq!(field(&dead[0], "code"), "not_utf8");
    assert_eq!(field(&dead[0], "entry"), "garbage \u{fffd}\u{fffd}");
    let stats = env.queue.stats().await.expect("stats");
    assert_eq!((stats.queued, stats.in_flight), (0, 0));
}
