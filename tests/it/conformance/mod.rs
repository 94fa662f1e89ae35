//! The behaviours both backends must show, written once and run against each, so the two
//! cannot drift apart. A behaviour is an `async fn name(b: Backend)` in the file of its
//! capability; [`conformance!`] turns it into `conformance::redis::<file>::name` (Redis +
//! ClickHouse) and `conformance::embedded::<file>::name` (SQLite), so
//! `cargo test conformance::embedded::` runs the embedded half. Whatever a body needs beyond
//! the public API is a [`Backend`](crate::helpers::Backend) operation in `helpers.rs`,
//! implemented once per backend. Tests of one backend only are in `redis_only.rs` and
//! `embedded.rs`, each saying why.

mod buffer;
mod flush;
pub(crate) mod golden;
mod resend;
mod screen_views;
mod visitors;

/// For each `file { name, ... }`, one `#[tokio::test]` per backend that calls `file::name` with
/// a fresh backend. `name with ctor` builds the Redis half with `Backend::ctor` instead of
/// `Backend::redis` (Redis and ClickHouse 18.16).
macro_rules! conformance {
    (@redis) => { crate::helpers::Backend::redis() };
    (@redis $ctor:ident) => { crate::helpers::Backend::$ctor() };
    ($($file:ident { $($name:ident $(with $redis:ident)?),* $(,)? })*) => {
        mod redis {
            $(mod $file {
                $(#[tokio::test]
                async fn $name() {
                    super::super::$file::$name(conformance!(@redis $($redis)?).await).await;
                })*
            })*
        }

        mod embedded {
            $(mod $file {
                $(#[tokio::test]
                async fn $name() {
                    super::super::$file::$name(crate::helpers::Backend::embedded().await).await;
                })*
            })*
        }
    };
}

conformance! {
    screen_views {
        first_screen_view_of_a_session_is_held_not_queued,
        next_screen_view_queues_the_previous_with_its_duration,
        an_earlier_timestamp_gives_duration_zero,
        session_end_releases_the_held_view_unchanged_then_itself,
        session_end_with_nothing_held_queues_only_itself,
        last_screen_view_by_profile_is_the_newest_of_any_session,
        unknown_session_or_profile_has_no_view,
        interleaved_sessions_are_independent,
        screen_view_without_session_is_a_regular_event,
        screen_view_without_profile_sets_no_profile_key,
        held_event_text_survives_exactly_with_only_duration_changed,
        durations_are_the_same_across_micro_batch_boundaries,
        the_held_views_of_quiet_sessions_are_released_unchanged,
    }
    buffer {
        a_regular_event_goes_straight_to_the_queue,
        buffer_size_counts_queued_events_not_held_views,
        a_full_micro_batch_is_written_without_waiting_for_the_timer,
        a_partial_micro_batch_is_written_when_the_timer_fires,
        flush_writes_a_partial_micro_batch_at_once,
        order_of_arrival_is_kept_across_micro_batches,
    }
    visitors {
        an_event_with_a_profile_makes_a_live_visitor,
        events_without_a_profile_are_not_visitors,
        heartbeats_are_throttled_within_a_buffer_and_across_buffers,
        visitors_older_than_the_window_are_trimmed_and_not_counted,
    }
    flush {
        flush_inserts_queued_events_and_empties_the_queue,
        rows_are_sorted_by_created_at_and_inserted_in_chunks,
        four_events_with_chunk_size_two_make_exactly_two_inserts,
        batch_size_bounds_one_flush,
        a_failed_insert_leaves_the_events_in_flight_and_the_next_flush_lands_them_once,
        an_abandoned_batch_resumes_after_its_last_recorded_chunk,
        // ClickHouse 18.16 has no insert_deduplication_token: the current engine (chdb) does.
        a_chunk_inserted_again_after_a_crash_is_deduplicated_by_its_token with redis_current,
        two_flushers_racing_insert_every_event_exactly_once,
        a_flush_publishes_one_notification_per_project,
        corrupt_entries_are_dead_lettered_while_valid_ones_land,
    }
    resend {
        a_re_sent_event_is_queued_once_and_the_first_copy_wins,
        a_re_sent_screen_view_neither_releases_nor_replaces_the_held_one,
        a_re_sent_session_end_is_queued_once,
        events_without_an_id_are_never_dropped,
    }
    golden {
        the_golden_trace_lands_the_reference_rows_and_holds_the_reference_views,
        a_100k_event_mix_lands_exactly_once_with_the_reference_durations,
    }
}
