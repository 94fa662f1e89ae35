//! A client that lost the answer to a request sends it again, with the same event ids: the
//! queue takes each id in once within the re-send window (`batch.dedup_window_secs`).

use crate::helpers::*;

/// The same event sent again: same id, and here a different path, so the copies differ.
fn resent(event: &str) -> String {
    event.replacen(r#""path":"/"#, r#""path":"/again-"#, 1)
}

pub(super) async fn a_re_sent_event_is_queued_once_and_the_first_copy_wins(b: Backend) {
    let (a, c) = (click("a", "p1", 0), click("c", "p1", 20));
    let buffer = b.buffer();
    b.add_all(&buffer, &[&a]).await;
    // Again in a later micro-batch, and twice within one, next to a new event.
    b.add_all(&buffer, &[&resent(&a)]).await;
    b.add_all(&buffer, &[&resent(&a), &c, &resent(&c)]).await;
    assert_eq!(b.queued().await, vec![a, c]);
    assert_eq!(b.queue().size().await.expect("size"), 2);
}

pub(super) async fn a_re_sent_screen_view_neither_releases_nor_replaces_the_held_one(b: Backend) {
    let v1 = screen_view("v1", "s1", "u1", 1_000);
    let buffer = b.buffer();
    b.add_all(&buffer, &[&v1]).await;
    b.add_all(&buffer, &[&resent(&v1)]).await;
    assert!(
        b.queued().await.is_empty(),
        "the re-sent view released none"
    );
    let held = b.queue().last_screen_view_by_session("s1").await;
    assert_eq!(held.expect("read").as_deref(), Some(v1.as_str()));

    b.add_all(&buffer, &[&screen_view("v2", "s1", "u1", 4_000)])
        .await;
    let queued = b.queued().await;
    assert_eq!(queued.len(), 1);
    assert_eq!(label(&queued[0]), "v1");
    assert_eq!(
        field(&queued[0], "duration"),
        3_000,
        "measured from the first copy"
    );
}

pub(super) async fn a_re_sent_session_end_is_queued_once(b: Backend) {
    let (v1, end) = (
        screen_view("v1", "s1", "u1", 0),
        session_end("end", "s1", "u1", 500),
    );
    let buffer = b.buffer();
    b.add_all(&buffer, &[&v1, &end]).await;
    b.add_all(&buffer, &[&resent(&end)]).await;
    let labels: Vec<String> = b.queued().await.iter().map(|e| label(e)).collect();
    assert_eq!(labels, ["v1", "end"]);
}

pub(super) async fn events_without_an_id_are_never_dropped(b: Backend) {
    let event =
        r#"{"name":"click","project_id":"p1","created_at":"2024-06-01 00:00:00.000","path":"/a"}"#;
    let buffer = b.buffer();
    b.add_all(&buffer, &[event, event]).await;
    b.add_all(&buffer, &[event]).await;
    assert_eq!(b.queued().await.len(), 3);
}
