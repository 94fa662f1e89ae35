//! Same input, same output as the reference: the golden trace, and a 100k-event mix checked
//! against a model of the reference's semantics.

use std::collections::{BTreeSet, HashMap};

use spillway::workload::{Workload, WorkloadSettings};
use spillway::{EventKind, FlushSettings};

use crate::helpers::*;

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden");

fn golden(file: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(format!("{GOLDEN}/{file}"))
        .expect("golden file")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect()
}

fn text(value: &serde_json::Value) -> String {
    value.as_str().expect("a string").to_owned()
}

pub(super) async fn the_golden_trace_lands_the_reference_rows_and_holds_the_reference_views(
    b: Backend,
) {
    add_the_golden_trace_and_drain(&b).await;
    assert_the_reference_rows_landed(&b).await;
    assert_eq!(b.held_keys().await, expected_held());
}

/// Adds the golden trace through one buffer and drains it into the sink.
pub(crate) async fn add_the_golden_trace_and_drain(b: &Backend) {
    let trace = std::fs::read_to_string(format!("{GOLDEN}/trace.ndjson")).expect("trace");
    let trace: Vec<&str> = trace.lines().collect();
    b.add_all(&b.buffer(), &trace).await;
    b.flusher(FlushSettings::default())
        .await
        .drain()
        .await
        .expect("drain");
}

/// The rows the reference produced from the golden trace, durations included, are the rows
/// that landed.
pub(crate) async fn assert_the_reference_rows_landed(b: &Backend) {
    let expected: Vec<LandedRow> = golden("expected-rows.ndjson")
        .iter()
        .map(|r| LandedRow {
            id: text(&r["id"]),
            name: text(&r["name"]),
            project_id: text(&r["project_id"]),
            session_id: text(&r["session_id"]),
            profile_id: text(&r["profile_id"]),
            duration: r["duration"].as_u64().expect("ms"),
        })
        .collect();
    let landed = b.landed_rows().await;
    let differences: Vec<_> = landed
        .iter()
        .zip(&expected)
        .filter(|(got, want)| got != want)
        .take(5)
        .collect();
    assert!(
        differences.is_empty() && landed.len() == expected.len(),
        "{} rows landed, {} expected; first differences (got, expected): {differences:?}",
        landed.len(),
        expected.len()
    );
}

/// The screen views the reference held at the end of the golden trace, as `(key in
/// OpenPanel's layout, event id, ts)`.
pub(crate) fn expected_held() -> BTreeSet<(String, String, i64)> {
    golden("expected-held.ndjson")
        .iter()
        .map(|h| {
            (
                text(&h["key"]),
                text(&h["event_id"]),
                h["ts"].as_i64().expect("ts"),
            )
        })
        .collect()
}

/// An event's id, read without building the whole JSON value.
#[derive(serde::Deserialize)]
struct Id<'a> {
    id: &'a str,
}

/// The reference's semantics in a few lines: which events land, and with what duration (by
/// event id).
pub(crate) fn reference_model(lines: &[String]) -> HashMap<String, u64> {
    let mut rows = HashMap::new();
    let mut held: HashMap<String, (String, i64)> = HashMap::new();
    for line in lines {
        let event = parse(line);
        let id = serde_json::from_str::<Id>(line).expect("id").id.to_owned();
        let ts = event.created_at().as_millis();
        match (event.kind(), event.session_id()) {
            (EventKind::ScreenView, Some(session)) => {
                if let Some((prev, prev_ts)) = held.insert(session.to_owned(), (id, ts)) {
                    rows.insert(prev, u64::try_from((ts - prev_ts).max(0)).expect("ms"));
                }
            }
            (EventKind::SessionEnd, Some(session)) => {
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

pub(super) async fn a_100k_event_mix_lands_exactly_once_with_the_reference_durations(b: Backend) {
    let lines: Vec<String> = Workload::new(WorkloadSettings::default())
        .take(100_000)
        .collect();
    b.add_all(&b.buffer(), &refs(&lines)).await;
    b.flusher(FlushSettings::default())
        .await
        .drain()
        .await
        .expect("drain");
    assert_landed_once_with_the_reference_durations(&b, &lines).await;
}

/// Every event of `lines` the reference lands is in the sink exactly once, with the reference's
/// duration.
pub(crate) async fn assert_landed_once_with_the_reference_durations(b: &Backend, lines: &[String]) {
    let model = reference_model(lines);
    let rows = u64::try_from(model.len()).expect("rows");
    assert_eq!(
        b.landed_count_and_unique().await,
        (rows, rows),
        "every queued event exactly once"
    );
    let landed: HashMap<String, u64> = b
        .landed_rows()
        .await
        .into_iter()
        .map(|r| (r.id, r.duration))
        .collect();
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
