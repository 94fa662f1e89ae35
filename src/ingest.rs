//! Ingest: request bodies into events.
//!
//! A body is one JSON event, a JSON array of events, or NDJSON (one event per line), optionally
//! gzip-compressed. Valid items are accepted even when others in the same body are not; each
//! rejected item is reported with its position. Only a body that cannot be read at all (empty,
//! malformed, too large) is refused as a whole.

use std::io::Read;

use serde_json::value::RawValue;

use crate::event::Event;
use crate::time::Timestamp;

/// How the body is framed, from its `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    /// `application/json`: one object or an array of objects.
    Json,
    /// `application/x-ndjson` (or `application/jsonl`): one object per line.
    Ndjson,
}

impl BodyFormat {
    /// The format for a `Content-Type` header value; JSON when absent.
    #[must_use]
    pub fn from_content_type(content_type: Option<&str>) -> Option<BodyFormat> {
        let Some(value) = content_type else {
            return Some(BodyFormat::Json);
        };
        let media = value
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match media.as_str() {
            "application/json" | "text/json" | "" => Some(BodyFormat::Json),
            "application/x-ndjson"
            | "application/ndjson"
            | "application/jsonl"
            | "application/x-jsonlines"
            | "text/plain" => Some(BodyFormat::Ndjson),
            _ => None,
        }
    }
}

/// Bounds on one request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest body after decompression, bytes.
    pub max_body_bytes: usize,
    /// Most events (valid or not) in one body.
    pub max_events: usize,
}

/// Why a whole body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IngestError {
    /// Nothing to read.
    #[error("empty body")]
    Empty,
    /// Larger than the limit (after decompression).
    #[error("body exceeds {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// More events than the limit.
    #[error("more than {limit} events in one request")]
    TooManyEvents {
        /// The limit.
        limit: usize,
    },
    /// Not gzip, though `Content-Encoding: gzip` said so, or not UTF-8.
    #[error("cannot decode body: {0}")]
    Encoding(String),
    /// A JSON body that is not valid JSON; the message has line and column.
    #[error("malformed JSON: {0}")]
    Malformed(String),
    /// Every item was invalid; the message names the first one.
    #[error("no valid event: {0}")]
    NothingValid(String),
}

impl IngestError {
    /// A short, fixed code for metrics labels.
    #[must_use]
    pub fn code(&self) -> &'static str {
        match self {
            IngestError::Empty => "empty_body",
            IngestError::TooLarge { .. } => "too_large",
            IngestError::TooManyEvents { .. } => "too_many_events",
            IngestError::Encoding(_) => "bad_encoding",
            IngestError::Malformed(_) => "malformed_json",
            IngestError::NothingValid(_) => "nothing_valid",
        }
    }
}

/// One item that was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Rejection {
    /// Position in the request: array index, or line index (0-based) for NDJSON.
    pub index: usize,
    /// What was wrong.
    pub error: String,
    /// Reason code, for metrics.
    #[serde(skip)]
    pub code: &'static str,
}

/// A body split into valid events and rejections.
#[derive(Debug, Default)]
pub struct ParsedBody {
    /// The valid events, in request order.
    pub events: Vec<Event>,
    /// The items that were not.
    pub rejected: Vec<Rejection>,
}

/// Decompresses a gzip body, refusing to inflate past the limit.
///
/// # Errors
/// [`IngestError::TooLarge`] or [`IngestError::Encoding`].
pub fn gunzip(body: &[u8], limit: usize) -> Result<Vec<u8>, IngestError> {
    let mut out = Vec::with_capacity(body.len().saturating_mul(4).min(limit));
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    flate2::read::GzDecoder::new(body)
        .take(cap)
        .read_to_end(&mut out)
        .map_err(|e| IngestError::Encoding(format!("invalid gzip: {e}")))?;
    if out.len() > limit {
        return Err(IngestError::TooLarge { limit });
    }
    Ok(out)
}

/// Splits a body into events and rejections.
///
/// # Errors
/// [`IngestError`] when the body as a whole cannot be used.
pub fn parse_body(
    body: &[u8],
    format: BodyFormat,
    limits: Limits,
    now: Timestamp,
) -> Result<ParsedBody, IngestError> {
    if body.len() > limits.max_body_bytes {
        return Err(IngestError::TooLarge {
            limit: limits.max_body_bytes,
        });
    }
    let text =
        std::str::from_utf8(body).map_err(|e| IngestError::Encoding(format!("not UTF-8: {e}")))?;
    if text.trim().is_empty() {
        return Err(IngestError::Empty);
    }
    let items: Vec<(usize, &str)> = match format {
        BodyFormat::Json => json_items(text)?,
        BodyFormat::Ndjson => text
            .lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .collect(),
    };
    if items.len() > limits.max_events {
        return Err(IngestError::TooManyEvents {
            limit: limits.max_events,
        });
    }
    let mut parsed = ParsedBody::default();
    for (index, item) in items {
        match Event::parse_at(item, now) {
            Ok(event) => parsed.events.push(event),
            Err(err) => parsed.rejected.push(Rejection {
                index,
                code: err.code(),
                error: match format {
                    BodyFormat::Json => format!("item {index}: {err}"),
                    BodyFormat::Ndjson => format!("line {}: {err}", index + 1),
                },
            }),
        }
    }
    if parsed.events.is_empty() {
        let first = parsed
            .rejected
            .first()
            .map_or_else(String::new, |r| r.error.clone());
        return Err(IngestError::NothingValid(first));
    }
    Ok(parsed)
}

/// The items of a JSON body: the object itself, or each element of an array.
fn json_items(text: &str) -> Result<Vec<(usize, &str)>, IngestError> {
    if text.trim_start().starts_with('[') {
        let items: Vec<&RawValue> =
            serde_json::from_str(text).map_err(|e| IngestError::Malformed(e.to_string()))?;
        Ok(items.into_iter().map(RawValue::get).enumerate().collect())
    } else {
        let item: &RawValue =
            serde_json::from_str(text).map_err(|e| IngestError::Malformed(e.to_string()))?;
        Ok(vec![(0, item.get())])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_body_bytes: 1 << 20,
        max_events: 3,
    };
    const NOW: Timestamp = Timestamp::from_millis(0);
    const OK: &str = r#"{"name":"a","project_id":"p"}"#;

    fn parse(body: &str, format: BodyFormat) -> Result<ParsedBody, IngestError> {
        parse_body(body.as_bytes(), format, LIMITS, NOW)
    }

    #[test]
    fn accepts_an_object_an_array_and_ndjson() {
        assert_eq!(parse(OK, BodyFormat::Json).expect("object").events.len(), 1);
        let array = format!("[{OK},{OK}]");
        assert_eq!(
            parse(&array, BodyFormat::Json).expect("array").events.len(),
            2
        );
        let lines = format!("{OK}\n\n{OK}\n");
        assert_eq!(
            parse(&lines, BodyFormat::Ndjson)
                .expect("ndjson")
                .events
                .len(),
            2
        );
    }

    #[test]
    fn reports_each_invalid_item_with_its_position() {
        let array = format!(r#"[{OK},{{"name":""}},{OK}]"#);
        let parsed = parse(&array, BodyFormat::Json).expect("partly valid");
        assert_eq!(parsed.events.len(), 2);
        assert_eq!(
            parsed.rejected,
            vec![Rejection {
                index: 1,
                code: "bad_name",
                error: "item 1: field `name`: must be a non-empty string".into()
            }]
        );
        let lines = format!("{OK}\nnot json\n");
        let parsed = parse(&lines, BodyFormat::Ndjson).expect("partly valid");
        assert!(parsed.rejected[0].error.starts_with("line 2: invalid JSON"));
    }

    #[test]
    fn refuses_unusable_bodies() {
        assert_eq!(
            parse("  ", BodyFormat::Json).unwrap_err(),
            IngestError::Empty
        );
        let err = parse("[{\"a\":1},", BodyFormat::Json).unwrap_err();
        assert!(err.to_string().contains("line 1 column"), "{err}");
        let four = format!("[{OK},{OK},{OK},{OK}]");
        assert_eq!(
            parse(&four, BodyFormat::Json).unwrap_err(),
            IngestError::TooManyEvents { limit: 3 }
        );
        let err = parse(r#"[{"name":"x"}]"#, BodyFormat::Json).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no valid event: item 0: field `project_id`: must be a non-empty string"
        );
    }

    #[test]
    fn gunzip_stops_at_the_limit() {
        use std::io::Write;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(&[b' '; 10_000]).expect("write");
        let gz = encoder.finish().expect("finish");
        assert_eq!(gunzip(&gz, 10_000).expect("fits").len(), 10_000);
        assert_eq!(
            gunzip(&gz, 9_999).unwrap_err(),
            IngestError::TooLarge { limit: 9_999 }
        );
        assert!(matches!(
            gunzip(b"plain", 100),
            Err(IngestError::Encoding(_))
        ));
    }
}
