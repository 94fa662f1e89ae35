//! Any text into `Event::parse`: it must never panic, and an accepted event must keep its
//! text, parse again to the same event, and take a duration without breaking its JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spillway::event::with_duration;
use spillway::{Event, Timestamp};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let now = Timestamp::from_millis(1_717_200_000_000);
    let Ok(event) = Event::parse_at(text, now) else {
        return;
    };
    let again = Event::parse_at(event.json(), now).expect("an accepted event parses again");
    assert_eq!(again, event, "parsing is idempotent");
    let timed = with_duration(event.json(), 1234).expect("an accepted event is an object");
    let value: serde_json::Value = serde_json::from_str(&timed).expect("still JSON");
    assert_eq!(value["duration"], 1234);
    if let Some(at) = event.duration_at() {
        // The offset the queue uses points at the top-level duration's value.
        let rest = &event.json()[at..];
        assert!(rest.starts_with(|c: char| c.is_ascii_digit()), "{rest}");
    }
});
