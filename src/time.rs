//! Timestamps: milliseconds since the Unix epoch, UTC, as OpenPanel's `created_at` means them.

use chrono::{DateTime, NaiveDateTime, Utc};

/// Milliseconds since the Unix epoch (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

impl Timestamp {
    /// Wraps a count of milliseconds since the epoch.
    #[must_use]
    pub const fn from_millis(millis: i64) -> Timestamp {
        Timestamp(millis)
    }

    /// Milliseconds since the epoch.
    #[must_use]
    pub const fn as_millis(self) -> i64 {
        self.0
    }
}

/// The current wall-clock time.
#[must_use]
pub fn now() -> Timestamp {
    Timestamp(Utc::now().timestamp_millis())
}

/// Parses `YYYY-MM-DD HH:MM:SS[.fff]` (UTC, OpenPanel's format) or ISO-8601 / RFC 3339 with `T`,
/// `Z` or an offset. A time without a zone is UTC.
#[must_use]
pub fn parse(text: &str) -> Option<Timestamp> {
    let text = text.trim();
    let naive = |sep: &str| {
        NaiveDateTime::parse_from_str(text, &format!("%Y-%m-%d{sep}%H:%M:%S%.f"))
            .ok()
            .map(|t| t.and_utc())
    };
    naive(" ")
        .or_else(|| naive("T"))
        .or_else(|| {
            DateTime::parse_from_rfc3339(text)
                .ok()
                .map(|t| t.with_timezone(&Utc))
        })
        .map(|t| Timestamp(t.timestamp_millis()))
}

/// Formats as `YYYY-MM-DD HH:MM:SS.mmm` (UTC), the text ClickHouse reads into `DateTime64(3)`.
#[must_use]
pub fn format_millis(ts: Timestamp) -> String {
    match DateTime::<Utc>::from_timestamp_millis(ts.0) {
        Some(t) => t.format("%Y-%m-%d %H:%M:%S%.3f").to_string(),
        None => "1970-01-01 00:00:00.000".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_openpanel_format() {
        let ts = parse("2024-06-01 00:00:00.006").expect("valid");
        assert_eq!(ts.as_millis(), 1_717_200_000_006);
        assert_eq!(format_millis(ts), "2024-06-01 00:00:00.006");
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(parse("2024-13-01 00:00:00"), None);
        assert_eq!(parse("soon"), None);
    }
}
