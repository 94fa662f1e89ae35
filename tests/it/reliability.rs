//! Nothing lost to expiry or drift: held views of quiet sessions are released, and the queue
//! counter is reconciled with the queue.

use redis::AsyncCommands;
use spillway::{HeldSettings, Queue, SqliteQueue, Timestamp};

use crate::helpers::*;

fn later() -> Timestamp {
    Timestamp::from_millis(spillway::time::now().as_millis() + 1000)
}

fn earlier() -> Timestamp {
    Timestamp::from_millis(spillway::time::now().as_millis() - 60_000)
}

#[tokio::test]
async fn redis_releases_the_held_views_of_quiet_sessions_unchanged() {
    let env = TestEnv::new().await;
    let buffer = env.buffer();
    let quiet = screen_view("q", "s1", "u1", 1000);
    let other = screen_view("o", "s2", "u2", 1000);
    env.add_all(&buffer, &[&quiet, &other]).await;

    assert_eq!(env.queue.held_count().await.expect("count"), 2);
    assert_eq!(
        env.queue.sweep_idle(earlier(), 1000).await.expect("sweep"),
        0,
        "not quiet yet"
    );
    assert_eq!(
        env.queue.sweep_idle(later(), 1).await.expect("sweep"),
        1,
        "at most `max`"
    );
    assert_eq!(env.queue.sweep_idle(later(), 1000).await.expect("sweep"), 1);

    let mut queued = env.queued().await;
    queued.sort();
    let mut expected = vec![quiet, other];
    expected.sort();
    assert_eq!(queued, expected, "released as sent, duration untouched");
    assert_eq!(env.queue.size().await.expect("size"), 2);
    assert_eq!(env.queue.held_count().await.expect("count"), 0);
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
        None
    );

    // The session goes on: its next view starts a new hold, nothing is released twice.
    env.add_all(&buffer, &[&screen_view("n", "s1", "u1", 5000)])
        .await;
    assert_eq!(env.queued().await.len(), 2);
}

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

#[tokio::test]
async fn embedded_releases_the_held_views_of_quiet_sessions_unchanged() {
    let dir =
        std::env::temp_dir().join(format!("spillway-sweep-{}", uuid::Uuid::new_v4().simple()));
    let queue = Queue::Embedded(SqliteQueue::open(&dir, HeldSettings::default()).expect("opens"));
    let buffer =
        spillway::Buffer::start(queue.clone(), Default::default(), HeldSettings::default()).0;
    let quiet = screen_view("q", "s1", "u1", 1000);
    let events = vec![parse(&quiet)];
    buffer
        .bulk_add(events)
        .await
        .expect("open")
        .written()
        .await
        .expect("written");

    assert_eq!(queue.held_count().await.expect("count"), 1);
    assert_eq!(queue.sweep_idle(earlier(), 1000).await.expect("sweep"), 0);
    assert_eq!(queue.sweep_idle(later(), 1000).await.expect("sweep"), 1);
    assert_eq!(queue.size().await.expect("size"), 1);
    assert_eq!(queue.held_count().await.expect("count"), 0);
    assert_eq!(
        queue
            .last_screen_view_by_profile("p1", "u1")
            .await
            .expect("read"),
        None
    );
    let oldest = queue
        .oldest_queued_at()
        .await
        .expect("oldest")
        .expect("one queued");
    assert_eq!(oldest, spillway::time::parse(&at(1000)).expect("time"));
    drop((buffer, queue));
    let _ = std::fs::remove_dir_all(dir);
}

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
