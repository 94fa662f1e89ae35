//! Live visitors: a throttled heartbeat per visitor with a profile.

use redis::AsyncCommands;

use crate::helpers::*;

#[tokio::test]
async fn an_event_with_a_profile_makes_a_live_visitor() {
    let env = TestEnv::new().await;
    let buffer = env.buffer();
    env.add_all(&buffer, &[&screen_view("a", "s1", "u1", 0)])
        .await;
    let now = spillway::time::now();
    assert_eq!(
        env.queue
            .active_visitor_count("p1", now)
            .await
            .expect("count"),
        1
    );
    assert_eq!(
        env.queue
            .active_visitor_count("other", now)
            .await
            .expect("count"),
        0
    );
    let mut redis = env.redis.clone();
    let ttl: i64 = redis.ttl(env.key("live:visitor:p1:u1")).await.expect("TTL");
    assert!(
        (295..=300).contains(&ttl),
        "heartbeat key expires with the window: {ttl}"
    );
}

#[tokio::test]
async fn events_without_a_profile_are_not_visitors() {
    let env = TestEnv::new().await;
    let buffer = env.buffer();
    env.add_all(&buffer, &[&click("a", "p1", 0)]).await;
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
async fn heartbeats_are_throttled_within_a_process_and_across_processes() {
    let env = TestEnv::new().await;
    let first = env.buffer();
    env.add_all(&first, &[&screen_view("a", "s1", "u1", 0)])
        .await;
    let mut redis = env.redis.clone();
    let zset = env.key("live:visitors:p1");
    let score: f64 = redis.zscore(&zset, "u1").await.expect("ZSCORE");

    // Same process: the local throttle skips the heartbeat.
    env.add_all(&first, &[&screen_view("b", "s1", "u1", 10)])
        .await;
    // Another process (a second buffer): the script sees the fresh heartbeat key and skips.
    let second = env.buffer();
    env.add_all(&second, &[&screen_view("c", "s1", "u1", 20)])
        .await;
    let again: f64 = redis.zscore(&zset, "u1").await.expect("ZSCORE");
    assert_eq!(score, again, "no refresh within the refresh period");

    // Once the heartbeat key is older than the refresh period, the next event refreshes it.
    let _: () = redis
        .pexpire(env.key("live:visitor:p1:u1"), 200_000)
        .await
        .expect("PEXPIRE");
    let third = env.buffer();
    env.add_all(&third, &[&screen_view("d", "s1", "u1", 30)])
        .await;
    let refreshed: f64 = redis.zscore(&zset, "u1").await.expect("ZSCORE");
    assert!(refreshed > score, "{refreshed} > {score}");
}

#[tokio::test]
async fn visitors_older_than_the_window_are_trimmed_and_not_counted() {
    let env = TestEnv::new().await;
    let mut redis = env.redis.clone();
    let zset = env.key("live:visitors:p1");
    let now = spillway::time::now().as_millis();
    let _: () = redis.zadd(&zset, "old", now - 301_000).await.expect("ZADD");
    let _: () = redis.zadd(&zset, "new", now - 1_000).await.expect("ZADD");
    let count = env
        .queue
        .active_visitor_count("p1", spillway::Timestamp::from_millis(now))
        .await
        .expect("count");
    assert_eq!(count, 1);
    let left: usize = redis.zcard(&zset).await.expect("ZCARD");
    assert_eq!(left, 1, "the stale entry is trimmed");
}
