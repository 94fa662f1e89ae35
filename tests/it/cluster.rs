//! spillway on Redis Cluster (`scripts/cluster.sh`: 3 masters, 3 replicas): the queue in
//! shards, each script's keys in one slot, flushers leasing shards, and the reference's
//! semantics unchanged.

use std::collections::HashMap;

use spillway::workload::{Workload, WorkloadSettings};
use spillway::FlushSettings;

use crate::conformance::golden::{
    add_the_golden_trace_and_drain, assert_the_reference_rows_landed, expected_held,
    reference_model,
};
use crate::helpers::*;

#[tokio::test]
async fn the_golden_trace_lands_the_reference_rows_and_holds_the_reference_views() {
    let b = Backend::cluster(16).await;
    add_the_golden_trace_and_drain(&b).await;
    assert_the_reference_rows_landed(&b).await;

    // The held views, read the way callers read them: by session, and by project + profile.
    let queue = b.queue();
    let mut sessions = 0;
    for (key, event_id, _) in expected_held() {
        let name = key.trim_start_matches("event_buffer:last_screen_view:");
        let held = match name.split_once(':') {
            Some(("session", session)) => {
                sessions += 1;
                queue.last_screen_view_by_session(session).await
            }
            Some(("profile", rest)) => {
                let (project, profile) = rest.split_once(':').expect("project:profile");
                queue.last_screen_view_by_profile(project, profile).await
            }
            _ => panic!("unexpected held key {key}"),
        };
        let held = held
            .expect("read")
            .unwrap_or_else(|| panic!("{key}: nothing held"));
        assert_eq!(field(&held, "id"), event_id.as_str(), "{key}");
    }
    assert_eq!(queue.held_count().await.expect("held count"), sessions);
}

#[tokio::test]
async fn two_flushers_share_the_shards_and_land_100k_events_once_with_the_reference_durations() {
    let b = Backend::cluster(16).await;
    let lines: Vec<String> = Workload::new(WorkloadSettings::default())
        .take(100_000)
        .collect();
    b.add_all(&b.buffer(), &refs(&lines)).await;
    let (first, second) = (
        b.flusher(FlushSettings::default()).await,
        b.flusher(FlushSettings::default()).await,
    );
    let (first, second) = tokio::join!(first.drain(), second.drain());
    let (first, second) = (first.expect("drain"), second.expect("drain"));
    assert!(
        first.batches > 0 && second.batches > 0,
        "both flushers took batches: {first:?} {second:?}"
    );

    let model = reference_model(&lines);
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
    assert!(wrong.is_empty(), "durations differ: {wrong:?}");
    assert_eq!(b.queue().size().await.expect("size"), 0);
}

#[tokio::test]
async fn a_profiles_last_screen_view_is_the_newest_of_its_sessions_in_any_shard() {
    let b = Backend::cluster(16).await;
    // Sessions spread over the shards; the profile's newest view is in one of them.
    let views: Vec<String> = (0..12)
        .map(|i| screen_view(&format!("v{i}"), &format!("s{i}"), "u1", 1_000 * i))
        .collect();
    b.add_all(&b.buffer(), &refs(&views)).await;
    let newest = b.queue().last_screen_view_by_profile("p1", "u1").await;
    assert_eq!(
        newest.expect("read").map(|e| label(&e)).as_deref(),
        Some("v11")
    );
    let by_session = b.queue().last_screen_view_by_session("s3").await;
    assert_eq!(
        by_session.expect("read").map(|e| label(&e)).as_deref(),
        Some("v3")
    );
}

#[tokio::test]
async fn visitors_quiet_sessions_counters_and_dead_letters_work_across_slots() {
    let b = Backend::cluster(4).await;
    let events = [
        screen_view("v1", "s1", "u1", 0),
        screen_view("v2", "s2", "u2", 10),
        click("c", "p1", 20),
    ];
    b.add_all(&b.buffer(), &refs(&events)).await;
    let queue = b.queue();
    let now = spillway::time::now();
    assert_eq!(
        queue.active_visitor_count("p1", now).await.expect("count"),
        2
    );
    // A cutoff in the future: every held view counts as quiet, and is released unchanged.
    let later = spillway::Timestamp::from_millis(now.as_millis() + 1);
    assert_eq!(queue.sweep_idle(later, 100).await.expect("sweep"), 2);
    assert_eq!(queue.held_count().await.expect("held"), 0);
    assert_eq!(queue.size().await.expect("size"), 3);
    assert_eq!(queue.reconcile().await.expect("reconcile"), 0);
    let stats = queue.stats().await.expect("stats");
    assert_eq!(
        (stats.queued, stats.in_flight, stats.dead_letter),
        (3, 0, 0)
    );
    assert_eq!(queue.replay_dead_letters(10).await.expect("replay"), 0);
    assert!(queue.dead_letters().await.expect("list").is_empty());
}
