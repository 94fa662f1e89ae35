//! Any request body into the ingest parser, as JSON and as NDJSON, plain and as (possibly
//! broken) gzip: it must never panic, never accept more than the limit, and report every item
//! either accepted or rejected.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spillway::ingest::{gunzip, parse_body, BodyFormat, Limits};
use spillway::Timestamp;

const LIMITS: Limits = Limits {
    max_body_bytes: 64 * 1024,
    max_events: 50,
};

fuzz_target!(|data: &[u8]| {
    let now = Timestamp::from_millis(0);
    for format in [BodyFormat::Json, BodyFormat::Ndjson] {
        if let Ok(parsed) = parse_body(data, format, LIMITS, now) {
            let items = parsed.events.len() + parsed.rejected.len();
            assert!(items <= LIMITS.max_events);
            assert!(
                !parsed.events.is_empty(),
                "a body with nothing valid is refused whole"
            );
        }
    }
    if let Ok(inflated) = gunzip(data, LIMITS.max_body_bytes) {
        assert!(inflated.len() <= LIMITS.max_body_bytes);
    }
});
