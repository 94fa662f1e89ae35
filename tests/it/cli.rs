//! The `spillway` command line: import, drain, schema, and clear errors.

use std::process::{Command, Output};

use spillway::SchemaVariant;

use crate::helpers::*;

fn spillway(env: &TestEnv, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_spillway"))
        .args(args)
        .env("REDIS_URL", &env.redis_url)
        .env("SPILLWAY_KEY_PREFIX", &env.prefix)
        .env("CLICKHOUSE_URL", &env.clickhouse_url)
        .env("CLICKHOUSE_DATABASE", &env.database)
        .env_remove("CLICKHOUSE_TABLE")
        .output()
        .expect("spillway runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn import_reports_rejected_lines_and_drain_lands_the_rest() {
    let env = TestEnv::new().await;
    env.create_table(SchemaVariant::Legacy, "events").await;
    let file = std::env::temp_dir().join(format!("{}import.ndjson", env.prefix.replace(':', "_")));
    let lines = [
        click("a", "p1", 0),
        r#"{"project_id":"p1"}"#.to_owned(),
        String::new(),
        "{broken".to_owned(),
        screen_view("v1", "s1", "u1", 10),
        screen_view("v2", "s1", "u1", 30),
    ];
    std::fs::write(&file, lines.join("\n")).expect("write");

    let out = spillway(&env, &["import", file.to_str().expect("utf-8 path")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("accepted 3, rejected 2"),
        "{}",
        text(&out.stdout)
    );
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("line 2: field `name`: must be a non-empty string"),
        "{stderr}"
    );
    assert!(stderr.contains("line 4: invalid JSON"), "{stderr}");

    let out = spillway(&env, &["drain"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("inserted 2 rows"),
        "{}",
        text(&out.stdout)
    );
    let _ = std::fs::remove_file(file);
}

#[tokio::test]
async fn an_unreachable_server_is_one_clear_error_line_not_a_panic() {
    let env = TestEnv::new().await;
    let out = Command::new(env!("CARGO_BIN_EXE_spillway"))
        .args(["import", "--redis-url", "redis://127.0.0.1:1", "-"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with("error: cannot reach Redis at redis://127.0.0.1:1"),
        "{stderr}"
    );
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");

    let out = Command::new(env!("CARGO_BIN_EXE_spillway"))
        .args(["drain", "--clickhouse-url", "http://127.0.0.1:1"])
        .env("REDIS_URL", &env.redis_url)
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with("error: cannot use ClickHouse at http://127.0.0.1:1"),
        "{stderr}"
    );
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
}

#[tokio::test]
async fn a_missing_table_says_how_to_create_it() {
    let env = TestEnv::new().await;
    env.sql(&format!("CREATE DATABASE IF NOT EXISTS {}", env.database))
        .await;
    let out = spillway(&env, &["drain"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("does not exist; create it with the DDL from `spillway schema`"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn schema_prints_both_variants() {
    let out = Command::new(env!("CARGO_BIN_EXE_spillway"))
        .args(["schema"])
        .output()
        .expect("runs");
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("properties Map(String, String)"),
        "{stdout}"
    );
    assert!(stdout.contains("created_at DateTime64(3)"), "{stdout}");
    assert!(stdout.contains("properties String"), "{stdout}");
    assert!(stdout.contains("created_at DateTime,"), "{stdout}");
}

#[tokio::test]
async fn dead_letter_list_replay_and_purge() {
    use redis::AsyncCommands;
    let env = TestEnv::new().await;
    env.create_table(SchemaVariant::Legacy, "events").await;
    let mut redis = env.redis.clone();
    let _: () = redis
        .rpush(env.key("event_buffer:queue"), "{not json")
        .await
        .expect("RPUSH");
    let out = spillway(&env, &["drain"]);
    assert!(
        text(&out.stdout).contains("(1 dead-lettered)"),
        "{}",
        text(&out.stdout)
    );

    let out = spillway(&env, &["dead-letter", "list"]);
    let listed = text(&out.stdout);
    assert_eq!(listed.lines().count(), 1, "{listed}");
    assert_eq!(field(listed.trim(), "entry"), "{not json");

    let out = spillway(&env, &["dead-letter", "replay"]);
    assert_eq!(
        text(&out.stdout).trim(),
        "queued 1 dead-lettered entries again"
    );
    assert_eq!(env.queued().await, vec!["{not json".to_owned()]);
    assert!(env.queue.dead_letters().await.expect("read").is_empty());

    let out = spillway(&env, &["drain"]);
    assert!(
        text(&out.stdout).contains("(1 dead-lettered)"),
        "still invalid"
    );
    let out = spillway(&env, &["dead-letter", "purge"]);
    assert_eq!(text(&out.stdout).trim(), "deleted 1 dead-letter records");
    assert_eq!(env.queue.stats().await.expect("stats").dead_letter, 0);
}

#[tokio::test]
async fn every_process_of_a_queue_must_have_its_shard_count_and_replicas() {
    let env = TestEnv::new().await;
    env.create_table(SchemaVariant::Legacy, "events").await;
    // The first process records the count; one with another count refuses to start.
    let out = spillway(&env, &["drain", "--redis-shards", "4"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = spillway(&env, &["drain", "--redis-shards", "3"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("the queue has 4 shards") && stderr.contains("configured for 3"),
        "{stderr}"
    );
    // The test Redis has no replica: waiting for one can never succeed.
    let out = spillway(
        &env,
        &["drain", "--redis-shards", "4", "--redis-wait-replicas", "1"],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("redis.wait_replicas is 1, but the master of")
            && stderr.contains("has 0 replicas"),
        "{stderr}"
    );
}
