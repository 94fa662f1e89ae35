//! Same input, same output as the reference: the golden trace, and a 100k-event mix checked
//! against a model of the reference's semantics.

use std::collections::{BTreeSet, HashMap};

use redis::AsyncCommands;
use spillway::workload::{Workload, WorkloadSettings};
use spillway::{FlushSettings, SchemaVariant};

use crate::helpers::*;

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden");

fn golden(file: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(format!("{GOLDEN}/{file}"))
        .expect("golden file")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect()
}

/// Imports events through the buffer with default settings and drains them.
async fn import_and_drain(env: &TestEnv, lines: &[String]) {
    let buffer = env.buffer();
    let events = lines.iter().map(|l| parse(l)).collect();
    buffer
        .bulk_add(events)
        .await
        .expect("open")
        .written()
        .await
        .expect("written");
    let flusher = env
        .flusher(SchemaVariant::Legacy, FlushSettings::default())
        .await;
    flusher.drain().await.expect("drain");
}

/// `(id, duration)` of every row in this test's events table, sorted by id as text.
async fn landed(env: &TestEnv) -> Vec<(String, u64)> {
    let mut rows: Vec<(String, u64)> = env
        .rows(&format!("SELECT id, duration FROM {}.events", env.database))
        .await
        .into_iter()
        .map(|r| {
            let duration = r["duration"]
                .as_str()
                .expect("UInt64 as string")
                .parse()
                .expect("number");
            (r["id"].as_str().expect("id").to_owned(), duration)
        })
        .collect();
    rows.sort();
    rows
}

/// Asserts two sorted row lists are equal, reporting the first differences rather than all rows.
fn assert_same_rows(got: &[(String, u64)], want: &[(String, u64)]) {
    let differences: Vec<_> = got
        .iter()
        .zip(want)
        .filter(|(g, w)| g != w)
        .take(5)
        .collect();
    assert!(
        differences.is_empty() && got.len() == want.len(),
        "{} rows landed, {} expected; first differences (got, expected): {differences:?}",
        got.len(),
        want.len()
    );
}

#[tokio::test]
async fn the_golden_trace_lands_the_reference_rows_and_holds_the_reference_views() {
    let env = TestEnv::new().await;
    let trace: Vec<String> = std::fs::read_to_string(format!("{GOLDEN}/trace.ndjson"))
        .expect("trace")
        .lines()
        .map(str::to_owned)
        .collect();
    import_and_drain(&env, &trace).await;

    let expected: Vec<(String, u64)> = golden("expected-rows.ndjson")
        .iter()
        .map(|r| {
            (
                r["id"].as_str().expect("id").to_owned(),
                r["duration"].as_u64().expect("ms"),
            )
        })
        .collect();
    assert_same_rows(&landed(&env).await, &expected);

    let expected_rows = golden("expected-rows.ndjson");
    let mut names = env
        .rows(&format!(
            "SELECT id, name, project_id, session_id, profile_id FROM {}.events",
            env.database
        ))
        .await;
    names.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    for (got, want) in names.iter().zip(&expected_rows) {
        for column in ["id", "name", "project_id", "session_id", "profile_id"] {
            assert_eq!(got[column], want[column], "{column} of {}", want["id"]);
        }
    }

    let mut redis = env.redis.clone();
    let keys: Vec<String> = redis
        .keys(format!("{}event_buffer:last_screen_view:*", env.prefix))
        .await
        .expect("KEYS");
    let mut held = BTreeSet::new();
    for key in keys {
        let value: String = redis.get(&key).await.expect("GET");
        let value: serde_json::Value = serde_json::from_str(&value).expect("held json");
        held.insert((
            key.trim_start_matches(&env.prefix).to_owned(),
            value["event"]["id"].as_str().expect("id").to_owned(),
            value["ts"].as_i64().expect("ts"),
        ));
    }
    let expected_held: BTreeSet<_> = golden("expected-held.ndjson")
        .iter()
        .map(|h| {
            (
                h["key"].as_str().expect("key").to_owned(),
                h["event_id"].as_str().expect("id").to_owned(),
                h["ts"].as_i64().expect("ts"),
            )
        })
        .collect();
    assert_eq!(held, expected_held);
}

/// The reference's semantics in a few lines: which events land, and with what duration.
fn reference_model(lines: &[String]) -> HashMap<String, u64> {
    let mut rows = HashMap::new();
    let mut held: HashMap<String, (String, i64)> = HashMap::new();
    for line in lines {
        let event = parse(line);
        let id = field(line, "id").as_str().expect("id").to_owned();
        let ts = event.created_at().as_millis();
        match (event.kind(), event.session_id()) {
            (spillway::EventKind::ScreenView, Some(session)) => {
                if let Some((prev, prev_ts)) = held.insert(session.to_owned(), (id, ts)) {
                    rows.insert(prev, u64::try_from((ts - prev_ts).max(0)).expect("ms"));
                }
            }
            (spillway::EventKind::SessionEnd, Some(session)) => {
                if let Some((prev, _)) = held.remove(session) {
                    rows.insert(prev, 0);
                }
                rows.insert(id, 0);
            }
            _ => {
                rows.insert(id, 0);
            }
        }
    }
    rows
}

#[tokio::test]
async fn a_100k_event_mix_lands_exactly_once_with_the_reference_durations() {
    let env = TestEnv::new().await;
    let lines: Vec<String> = Workload::new(WorkloadSettings::default())
        .take(100_000)
        .collect();
    import_and_drain(&env, &lines).await;

    let model = reference_model(&lines);
    let counts = env
        .sql(&format!(
            "SELECT count(), uniqExact(id) FROM {}.events",
            env.database
        ))
        .await;
    assert_eq!(
        counts.trim(),
        format!("{0}\t{0}", model.len()),
        "every queued event exactly once"
    );
    let landed: HashMap<String, u64> = landed(&env).await.into_iter().collect();
    let wrong: Vec<_> = model
        .iter()
        .filter(|(id, d)| landed.get(*id) != Some(d))
        .take(5)
        .collect();
    assert!(
        wrong.is_empty(),
        "durations differ from the reference: {wrong:?}"
    );
}
