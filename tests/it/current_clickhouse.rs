//! The sink on the current ClickHouse engine (chdb): OpenPanel's table with `Map`,
//! `DateTime64(3)` and `LowCardinality`. Chunk tokens deduplicating a retried insert are tested
//! on chdb by `conformance::redis::flush`, from the source the embedded backend shares.

use spillway::SchemaVariant;

use crate::helpers::*;

// Redis + current ClickHouse only: the embedded sink has its own table (embedded.rs).
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
