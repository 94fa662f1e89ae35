//! What only the embedded backend (SQLite queue and sink, no servers) has, each test saying
//! why: its own expiry of held views, its table layout, one process per data directory, and
//! what survives `kill -9`. The behaviours it shares with Redis + ClickHouse are tested once
//! for both in `conformance/`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use spillway::{BatchSettings, Buffer, QueueError, QueueSettings, SqliteQueue};

use crate::helpers::*;

// Embedded only: Redis expires held views itself (EX 3600); SQLite rows carry their expiry.
#[tokio::test]
async fn an_expired_held_view_is_neither_read_nor_released() {
    let env = EmbeddedEnv::new();
    let buffer = env.buffer();
    add_all(&buffer, &[&screen_view("a", "s1", "u1", 1000)]).await;
    // As if the hour had passed: Redis would have expired both keys.
    env.execute("UPDATE held_sessions SET expires_ms = 0", []);
    env.execute("UPDATE held_profiles SET expires_ms = 0", []);

    let q = &env.queue;
    assert_eq!(q.last_screen_view_by_session("s1").await.expect("r"), None);
    assert_eq!(
        q.last_screen_view_by_profile("p1", "u1").await.expect("r"),
        None
    );
    add_all(&buffer, &[&screen_view("b", "s1", "u1", 2000)]).await;
    assert_eq!(
        env.queued(),
        Vec::<String>::new(),
        "the expired view is gone"
    );
}

// Embedded only: the embedded sink's own table (text timestamps with milliseconds, the queued
// JSON kept); ClickHouse's shapes are tested in current_clickhouse.rs and the sink's unit tests.
#[tokio::test]
async fn rows_land_with_their_columns() {
    let env = EmbeddedEnv::new();
    let event = r#"{"id":"x1","name":"click","project_id":"p1","session_id":"s1","profile_id":42,"created_at":"2024-06-01T00:00:01.5Z","properties":{"a":"b","n":[]},"duration":0,"groups":[]}"#;
    add_all(&env.buffer(), &[event]).await;
    env.flusher(flush_settings(4000, 1000))
        .drain()
        .await
        .expect("drain");
    let row = env
        .sql()
        .query_row(
            "SELECT id, name, project_id, session_id, profile_id, created_at, duration, \
             properties, event FROM events",
            [],
            |r| {
                Ok((
                    (
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                    ),
                    (
                        r.get::<_, String>(3)?,
                        r.get::<_, String>(4)?,
                        r.get::<_, String>(5)?,
                    ),
                    (
                        r.get::<_, i64>(6)?,
                        r.get::<_, String>(7)?,
                        r.get::<_, String>(8)?,
                    ),
                ))
            },
        )
        .expect("one row");
    assert_eq!(row.0, ("x1".into(), "click".into(), "p1".into()));
    assert_eq!(
        row.1,
        ("s1".into(), "42".into(), "2024-06-01 00:00:01.500".into())
    );
    assert_eq!(row.2, (0, r#"{"a":"b","n":[]}"#.into(), event.into()));
}

// Embedded only: a Redis queue is shared by any number of processes.
#[tokio::test]
async fn a_second_open_of_the_data_directory_is_refused_until_the_first_closes() {
    let dir = fresh_dir();
    let (queue, sink) = open_embedded(&dir).expect("first open");
    let (buffer, batcher) = Buffer::start(
        queue.clone(),
        BatchSettings::default(),
        QueueSettings::default(),
    );
    add_all(&buffer, &[&click("a", "p1", 0)]).await;

    let Err(err) = SqliteQueue::open(&dir, QueueSettings::default()) else {
        panic!("a second open must be refused");
    };
    assert!(matches!(err, QueueError::InUse { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains(&dir.display().to_string()), "{message}");
    assert!(
        message.contains("in use by another spillway process"),
        "{message}"
    );

    drop(buffer);
    batcher.await.expect("the batcher stops");
    drop((queue, sink));
    let (queue, _sink) = open_embedded(&dir).expect("free once every handle is dropped");
    assert_eq!(
        queue.size().await.expect("size"),
        1,
        "and the event is still there"
    );
    drop(queue);
    let _ = std::fs::remove_dir_all(&dir);
}

// Embedded only: what the embedded queue acknowledged must survive its process; on Redis
// that is the server's persistence, not spillway's.
const CHILD_DIR: &str = "SPILLWAY_TEST_CHILD_DIR";

/// Run by the test below as a separate process: writes 500 events, says so, then waits to be
/// killed while holding the data directory.
#[tokio::test]
#[ignore = "the child process of a_killed_process_loses_nothing_and_frees_the_directory"]
async fn child_writes_then_waits_to_be_killed() {
    let Some(dir) = std::env::var_os(CHILD_DIR) else {
        return;
    };
    let (queue, _sink) = open_embedded(Path::new(&dir)).expect("the child opens the directory");
    let buffer = Buffer::start(queue, BatchSettings::default(), QueueSettings::default()).0;
    let events: Vec<String> = (0..500).map(|i| click(&format!("e{i}"), "p1", i)).collect();
    add_all(&buffer, &refs(&events)).await;
    println!("written");
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}

#[tokio::test]
async fn a_killed_process_loses_nothing_and_frees_the_directory() {
    let dir = fresh_dir();
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "embedded::child_writes_then_waits_to_be_killed",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env(CHILD_DIR, &dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("child starts");
    let stdout = child.stdout.take().expect("child stdout");
    let written = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|line| line == "written")
    });
    let written = tokio::time::timeout(Duration::from_secs(60), written).await;
    assert!(
        matches!(written, Ok(Ok(true))),
        "the child wrote its events"
    );

    let Err(err) = SqliteQueue::open(&dir, QueueSettings::default()) else {
        panic!("the child holds the directory");
    };
    assert!(matches!(err, QueueError::InUse { .. }), "{err:?}");

    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
    let (queue, _sink) =
        open_embedded(&dir).expect("the directory is free once its holder is dead");
    assert_eq!(
        queue.size().await.expect("size"),
        500,
        "every acknowledged event survived"
    );
    drop(queue);
    let _ = std::fs::remove_dir_all(&dir);
}
