//! The sink on the current ClickHouse engine (chdb): OpenPanel's table with `Map`,
//! `DateTime64(3)` and `LowCardinality`, and chunk tokens deduplicating a retried insert.

use redis::AsyncCommands;
use spillway::{FlushOutcome, SchemaVariant};

use crate::helpers::*;

#[tokio::test]
async fn rows_fit_openpanels_current_table() {
    let env = TestEnv::current().await;
    let buffer = env.buffer();
    let event = r#"{"id":"00000000-0000-0000-0000-000000000001","name":"click","project_id":"p1","created_at":"2024-06-01T00:00:00.006Z","properties":{"plan":"free","n":3,"nested":{"a":1}},"groups":[],"country":"DE","longitude":null,"unknown_field":"skipped","duration":0}"#;
    env.add_all(&buffer, &[event]).await;
    let flusher = env
        .flusher(SchemaVariant::Current, flush_settings(4000, 1000))
        .await;
    assert_eq!(flusher.drain().await.expect("drain").rows, 1);

    let rows = env
        .rows(&format!(
            "SELECT name, properties, toUnixTimestamp64Milli(created_at) AS ms, groups, country, longitude FROM {}.events",
            env.database
        ))
        .await;
    assert_eq!(
        rows,
        vec![serde_json::json!({
            "name": "click",
            "properties": {"plan": "free", "n": "3", "nested": "{\"a\":1}"},
            "ms": 1_717_200_000_006_i64,
            "groups": [],
            "country": "DE",
            "longitude": null,
        })]
    );
}

#[tokio::test]
async fn a_chunk_inserted_again_after_a_crash_is_deduplicated_by_its_token() {
    let env = TestEnv::current().await;
    let flusher = env
        .flusher(SchemaVariant::Current, flush_settings(4000, 2))
        .await;
    let entries: Vec<String> = (0..3).map(|i| click(&format!("e{i}"), "p1", i)).collect();
    let mut redis = env.redis.clone();
    let abandon = |mut redis: redis::aio::MultiplexedConnection| {
        let entries = entries.clone();
        let (list, meta) = (
            env.key("event_buffer:inflight"),
            env.key("event_buffer:inflight:meta"),
        );
        async move {
            let _: () = redis.rpush(&list, &entries).await.expect("RPUSH");
            let _: () = redis
                .hset_multiple(&meta, &[("batch_id", "b1"), ("chunks_done", "0")])
                .await
                .expect("HSET");
        }
    };
    // The batch is flushed, then reappears as if the flusher had died after its inserts but
    // before recording them: the same chunks are inserted again with the same tokens.
    abandon(redis.clone()).await;
    assert!(matches!(
        flusher.flush_once().await.expect("flush"),
        FlushOutcome::Flushed(_)
    ));
    abandon(redis.clone()).await;
    assert!(matches!(
        flusher.flush_once().await.expect("flush"),
        FlushOutcome::Flushed(_)
    ));

    let count = env
        .sql(&format!(
            "SELECT count(), uniqExact(id) FROM {}.events",
            env.database
        ))
        .await;
    assert_eq!(
        count.trim(),
        "3\t3",
        "the repeated inserts were deduplicated"
    );
    let _: () = redis.del(env.key("unused")).await.expect("DEL");
}
