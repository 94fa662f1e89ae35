//! Events: parsing at the edge, and the fields the buffer routes by.
//!
//! An event is a JSON object. The buffer reads five fields (`name`, `project_id`, `profile_id`,
//! `session_id`, `created_at`) and may set a sixth (`duration`); every other byte of the object is
//! kept exactly as it was sent, so an empty array stays `[]` and numbers keep their spelling.
//! [`Event::parse`] checks everything once; nothing downstream re-validates.

use std::borrow::Cow;
use std::fmt;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::time::{self, Timestamp};

/// Why an event was rejected. Each variant names the field or position that was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EventError {
    /// The text is not valid JSON.
    #[error("invalid JSON: {0}")]
    Json(String),
    /// The JSON is valid but not an object.
    #[error("event must be a JSON object")]
    NotAnObject,
    /// A field the buffer reads is missing, empty or of the wrong type.
    #[error("field `{field}`: {problem}")]
    Field {
        /// The offending field.
        field: &'static str,
        /// What is wrong with it.
        problem: &'static str,
    },
}

impl EventError {
    /// A short, fixed code for metrics labels and dead-letter records.
    #[must_use]
    pub fn code(&self) -> &'static str {
        match self {
            EventError::Json(_) => "invalid_json",
            EventError::NotAnObject => "not_an_object",
            EventError::Field { field: "name", .. } => "bad_name",
            EventError::Field {
                field: "project_id",
                ..
            } => "bad_project_id",
            EventError::Field {
                field: "created_at",
                ..
            } => "bad_created_at",
            EventError::Field { .. } => "bad_field",
        }
    }
}

fn field_error(field: &'static str, problem: &'static str) -> EventError {
    EventError::Field { field, problem }
}

/// How the buffer treats an event. Decided by `name` and the presence of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// Queued as it is.
    Regular,
    /// A `screen_view` with a session: held until the session's next screen view or its end.
    ScreenView,
    /// A `session_end` with a session: releases the held screen view, then is queued itself.
    SessionEnd,
}

/// A validated event: its JSON text (as sent, plus `created_at` when it was missing) and the
/// fields the buffer routes by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    json: String,
    kind: EventKind,
    /// The client's `id` for the event, which a re-sent copy repeats.
    id: Option<String>,
    project_id: String,
    profile_id: Option<String>,
    session_id: Option<String>,
    created_at: Timestamp,
    /// Byte offset of the top-level `duration` value in `json`, so the queue can set it
    /// without scanning the text.
    duration_at: Option<usize>,
}

impl Event {
    /// Parses and validates one event. A missing or `null` `created_at` is set to now.
    ///
    /// # Errors
    /// Returns an [`EventError`] naming what was wrong.
    pub fn parse(json: &str) -> Result<Event, EventError> {
        Event::parse_at(json, time::now())
    }

    /// Like [`Event::parse`], with the time used for a missing `created_at` given.
    ///
    /// # Errors
    /// Returns an [`EventError`] naming what was wrong.
    pub fn parse_at(json: &str, now: Timestamp) -> Result<Event, EventError> {
        // Whitespace around the object is not part of it; the object itself is kept as sent.
        let json = json.trim();
        let fields = Fields::parse(json)?;
        let (name, project_id) = fields.name_and_project()?;
        let profile_id = fields.id("profile_id")?;
        let session_id = fields.id("session_id")?;
        let id = fields.id("id")?;
        if let Some(duration) = fields.get("duration") {
            let text = duration.get();
            if !is_non_negative_number(text) {
                return Err(field_error("duration", "must be a non-negative number"));
            }
        }
        let (created_at, json, duration_at) = match fields.get("created_at") {
            Some(raw) if raw.get() != "null" => {
                let duration_at = fields.get("duration").map(|d| fields.span(d).start);
                (parse_created_at(raw)?, json.to_owned(), duration_at)
            }
            missing => {
                let value = format!("\"{}\"", time::format_millis(now));
                let json = match missing {
                    Some(null) => replace_value(json, null, &value),
                    None => insert_field(json, "created_at", &value),
                };
                // The text moved: find the duration again (rare: only without created_at).
                let duration_at = Fields::parse(&json)
                    .ok()
                    .and_then(|f| f.get("duration").map(|d| f.span(d).start));
                (now, json, duration_at)
            }
        };
        let kind = match (name.as_ref(), &session_id) {
            ("screen_view", Some(_)) => EventKind::ScreenView,
            ("session_end", Some(_)) => EventKind::SessionEnd,
            _ => EventKind::Regular,
        };
        let project_id = project_id.into_owned();
        Ok(Event {
            json,
            kind,
            id,
            project_id,
            profile_id,
            session_id,
            created_at,
            duration_at,
        })
    }

    /// The event's JSON text.
    #[must_use]
    pub fn json(&self) -> &str {
        &self.json
    }

    /// Consumes the event, returning its JSON text.
    #[must_use]
    pub fn into_json(self) -> String {
        self.json
    }

    /// How the buffer treats this event.
    #[must_use]
    pub fn kind(&self) -> EventKind {
        self.kind
    }

    /// The client's id for the event, when it has a non-empty one.
    #[must_use]
    pub fn id(&self) -> Option<&str> {
        self.id.as_deref()
    }

    /// The project the event belongs to.
    #[must_use]
    pub fn project_id(&self) -> &str {
        &self.project_id
    }

    /// The visitor's profile, when it has a non-empty one.
    #[must_use]
    pub fn profile_id(&self) -> Option<&str> {
        self.profile_id.as_deref()
    }

    /// The session, when it has a non-empty one.
    #[must_use]
    pub fn session_id(&self) -> Option<&str> {
        self.session_id.as_deref()
    }

    /// When the event happened.
    #[must_use]
    pub fn created_at(&self) -> Timestamp {
        self.created_at
    }

    /// Byte offset of the top-level `duration` value in [`Event::json`], if it has one.
    #[must_use]
    pub fn duration_at(&self) -> Option<usize> {
        self.duration_at
    }

    /// The value a held screen view is stored as: `{"ts":<created_at ms>,"at":<1-based offset
    /// of duration in the event, 0 if none>,"event":<json>}`. Readers of the seed's
    /// `{"event","ts"}` layout (OpenPanel's `JSON.parse`, its Lua `cjson.decode`) read it the
    /// same; the leading numbers let `enqueue.lua` release the view without scanning it.
    #[must_use]
    pub fn held_value(&self) -> String {
        let at = self.duration_at.map_or(0, |offset| offset + 1);
        format!(
            "{{\"ts\":{},\"at\":{at},\"event\":{}}}",
            self.created_at.as_millis(),
            self.json
        )
    }
}

/// The top-level fields of a JSON object, in order, with each value's text exactly as written.
pub(crate) struct Fields<'a> {
    source: &'a str,
    entries: Vec<(Cow<'a, str>, &'a RawValue)>,
}

impl<'a> Fields<'a> {
    /// Splits a JSON object into its top-level fields without decoding the values.
    pub(crate) fn parse(json: &'a str) -> Result<Fields<'a>, EventError> {
        if !json.trim_start().starts_with('{') {
            // Reject arrays and scalars before serde gets a chance to read an array as a map.
            return match serde_json::from_str::<&RawValue>(json) {
                Ok(_) => Err(EventError::NotAnObject),
                Err(e) => Err(EventError::Json(e.to_string())),
            };
        }
        let mut de = serde_json::Deserializer::from_str(json);
        let entries = de
            .deserialize_map(FieldsVisitor)
            .and_then(|entries| de.end().map(|()| entries))
            .map_err(|e| EventError::Json(e.to_string()))?;
        Ok(Fields {
            source: json,
            entries,
        })
    }

    /// The whole JSON text the fields were read from.
    pub(crate) fn source(&self) -> &'a str {
        self.source
    }

    /// The fields in the order they were written.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&str, &'a RawValue)> {
        self.entries.iter().map(|(k, v)| (k.as_ref(), *v))
    }

    /// The raw value of a top-level field; the last one wins when a key repeats, as in
    /// JavaScript's `JSON.parse`.
    pub(crate) fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.entries
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| *v)
    }

    /// `name` and `project_id`, which every event must have.
    fn name_and_project(&self) -> Result<(Cow<'a, str>, Cow<'a, str>), EventError> {
        let name = self
            .string("name")?
            .filter(|s| !s.is_empty())
            .ok_or(field_error("name", "must be a non-empty string"))?;
        let project_id = self
            .string("project_id")?
            .filter(|s| !s.is_empty())
            .ok_or(field_error("project_id", "must be a non-empty string"))?;
        Ok((name, project_id))
    }

    /// A field that must be a string when present; `null` counts as absent.
    fn string(&self, field: &'static str) -> Result<Option<Cow<'a, str>>, EventError> {
        match self.get(field) {
            None => Ok(None),
            Some(raw) if raw.get() == "null" => Ok(None),
            Some(raw) => serde_json::from_str::<Cow<'a, str>>(raw.get())
                .map(Some)
                .map_err(|_| field_error(field, "must be a string")),
        }
    }

    /// An identifier: a string or a number; empty, `null` or absent means none.
    fn id(&self, field: &'static str) -> Result<Option<String>, EventError> {
        let value = match self.get(field) {
            Some(raw)
                if raw
                    .get()
                    .starts_with(|c: char| c == '-' || c.is_ascii_digit()) =>
            {
                Some(raw.get().to_owned())
            }
            _ => self
                .string(field)
                .map_err(|_| field_error(field, "must be a string or a number"))?
                .map(Cow::into_owned),
        };
        Ok(value.filter(|s| !s.is_empty()))
    }

    /// Byte range of a raw value inside the source text.
    fn span(&self, raw: &RawValue) -> std::ops::Range<usize> {
        span_in(self.source, raw)
    }
}

/// Reads an entry taken from the queue: its fields and its time. Entries are written by
/// [`Event::parse`] (or by OpenPanel), so they carry `created_at`; one that does not, or that is
/// not a valid event at all, is reported for the dead-letter list.
pub(crate) fn read_queued(json: &str) -> Result<(Fields<'_>, Timestamp), EventError> {
    let fields = Fields::parse(json)?;
    fields.name_and_project()?;
    let created_at = match fields.get("created_at") {
        Some(raw) if raw.get() != "null" => parse_created_at(raw)?,
        _ => return Err(field_error("created_at", "missing")),
    };
    Ok((fields, created_at))
}

/// Byte range of `raw` inside `source`, which it was borrowed from.
fn span_in(source: &str, raw: &RawValue) -> std::ops::Range<usize> {
    let start = raw.get().as_ptr() as usize - source.as_ptr() as usize;
    start..start + raw.get().len()
}

struct FieldsVisitor;

impl<'de> Visitor<'de> for FieldsVisitor {
    type Value = Vec<(Cow<'de, str>, &'de RawValue)>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(32));
        while let Some(entry) = map.next_entry::<Cow<'de, str>, &'de RawValue>()? {
            entries.push(entry);
        }
        Ok(entries)
    }
}

fn parse_created_at(raw: &RawValue) -> Result<Timestamp, EventError> {
    let text = raw.get();
    if is_non_negative_number(text) {
        // A bare number is epoch milliseconds, as JavaScript's `new Date(n)` reads it.
        return text
            .parse::<f64>()
            .ok()
            .filter(|ms| ms.is_finite() && *ms < 1e15)
            .map(|ms| Timestamp::from_millis(ms as i64))
            .ok_or(field_error("created_at", "epoch milliseconds out of range"));
    }
    let text: Cow<'_, str> = serde_json::from_str(text)
        .map_err(|_| field_error("created_at", "must be a date string or epoch milliseconds"))?;
    time::parse(&text).ok_or(field_error(
        "created_at",
        "expected `YYYY-MM-DD HH:MM:SS[.fff]` (UTC) or ISO-8601",
    ))
}

fn is_non_negative_number(text: &str) -> bool {
    text.starts_with(|c: char| c.is_ascii_digit()) && text.parse::<f64>().is_ok()
}

/// Returns `json` with the value `raw` (borrowed from `json`) replaced by `value`.
fn replace_value(json: &str, raw: &RawValue, value: &str) -> String {
    let span = span_in(json, raw);
    let mut out = String::with_capacity(json.len() + value.len());
    out.push_str(&json[..span.start]);
    out.push_str(value);
    out.push_str(&json[span.end..]);
    out
}

/// Returns the object `json` with `"key":value` appended as its last field.
fn insert_field(json: &str, key: &str, value: &str) -> String {
    let body = json.trim_end();
    // A parsed object always ends with `}`.
    let body = body.strip_suffix('}').unwrap_or(body);
    let empty = body.trim_end().ends_with('{');
    let mut out = String::with_capacity(json.len() + key.len() + value.len() + 4);
    out.push_str(body.trim_end());
    if !empty {
        out.push(',');
    }
    out.push('"');
    out.push_str(key);
    out.push_str("\":");
    out.push_str(value);
    out.push('}');
    out
}

/// Returns the event JSON with its top-level `duration` set to `millis`, every other byte
/// unchanged. The twin of `set_duration` in `queue/lua/enqueue.lua`.
///
/// # Errors
/// Fails only when `json` is not a JSON object.
pub fn with_duration(json: &str, millis: u64) -> Result<String, EventError> {
    let fields = Fields::parse(json)?;
    let value = millis.to_string();
    Ok(match fields.get("duration") {
        Some(raw) => {
            let span = fields.span(raw);
            let mut out = String::with_capacity(json.len() + value.len());
            out.push_str(&json[..span.start]);
            out.push_str(&value);
            out.push_str(&json[span.end..]);
            out
        }
        None => insert_field(json, "duration", &value),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Timestamp = Timestamp::from_millis(1_717_200_000_000);

    fn parse(json: &str) -> Result<Event, EventError> {
        Event::parse_at(json, NOW)
    }

    #[test]
    fn keeps_the_text_as_sent() {
        let json = r#"{"name":"click","project_id":"p","created_at":"2024-06-01 00:00:00.006","groups":[],"n":1.50}"#;
        let event = parse(json).expect("valid");
        assert_eq!(event.json(), json);
        assert_eq!(event.kind(), EventKind::Regular);
    }

    #[test]
    fn names_the_field_that_is_wrong() {
        let err = parse(r#"{"project_id":"p"}"#).expect_err("no name");
        assert_eq!(err.to_string(), "field `name`: must be a non-empty string");
        let err = parse(r#"{"name":"x","project_id":""}"#).expect_err("empty project");
        assert_eq!(
            err.to_string(),
            "field `project_id`: must be a non-empty string"
        );
        let err = parse(r#"{"name":"x","project_id":"p","created_at":"yesterday"}"#)
            .expect_err("bad date");
        assert!(err.to_string().starts_with("field `created_at`"), "{err}");
        let err = parse(r#"{"name":"x","project_id":"p","duration":"5"}"#).expect_err("dur");
        assert_eq!(err.code(), "bad_field");
        assert_eq!(parse("[1]").expect_err("array"), EventError::NotAnObject);
        assert!(matches!(parse("{\"name\":"), Err(EventError::Json(_))));
    }

    #[test]
    fn accepts_every_created_at_format() {
        let cases = [
            ("2024-06-01 00:00:01.500", 1_717_200_001_500),
            ("2024-06-01 00:00:01", 1_717_200_001_000),
            ("2024-06-01T00:00:01.5Z", 1_717_200_001_500),
            ("2024-06-01T02:00:01+02:00", 1_717_200_001_000),
            ("2024-06-01T00:00:01", 1_717_200_001_000),
        ];
        for (text, millis) in cases {
            let json = format!(r#"{{"name":"x","project_id":"p","created_at":"{text}"}}"#);
            let event = parse(&json).expect(text);
            assert_eq!(event.created_at().as_millis(), millis, "{text}");
        }
        let event =
            parse(r#"{"name":"x","project_id":"p","created_at":1717200001500}"#).expect("epoch ms");
        assert_eq!(event.created_at().as_millis(), 1_717_200_001_500);
    }

    #[test]
    fn missing_created_at_means_now_and_is_written_into_the_event() {
        let event = parse(r#"{"name":"x","project_id":"p"}"#).expect("valid");
        assert_eq!(event.created_at(), NOW);
        assert_eq!(
            event.json(),
            r#"{"name":"x","project_id":"p","created_at":"2024-06-01 00:00:00.000"}"#
        );
        let event = parse(r#"{"name":"x","created_at":null,"project_id":"p"}"#).expect("null");
        assert_eq!(
            event.json(),
            r#"{"name":"x","created_at":"2024-06-01 00:00:00.000","project_id":"p"}"#
        );
    }

    #[test]
    fn screen_views_and_session_ends_need_a_session() {
        let sv = parse(r#"{"name":"screen_view","project_id":"p","session_id":"s"}"#);
        assert_eq!(sv.expect("valid").kind(), EventKind::ScreenView);
        let sv = parse(r#"{"name":"screen_view","project_id":"p","session_id":""}"#);
        assert_eq!(sv.expect("valid").kind(), EventKind::Regular);
        let end = parse(r#"{"name":"session_end","project_id":"p","session_id":"s"}"#);
        assert_eq!(end.expect("valid").kind(), EventKind::SessionEnd);
    }

    #[test]
    fn with_duration_changes_only_the_top_level_duration() {
        let json = r#"{"a":{"duration":1},"duration":0,"b":[]}"#;
        assert_eq!(
            with_duration(json, 250).expect("object"),
            r#"{"a":{"duration":1},"duration":250,"b":[]}"#
        );
        assert_eq!(
            with_duration(r#"{"a":"}"}"#, 7).expect("object"),
            r#"{"a":"}","duration":7}"#
        );
        assert_eq!(
            with_duration("{ }", 7).expect("object"),
            r#"{"duration":7}"#
        );
    }
}
