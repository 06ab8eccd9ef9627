//! Wall-clock time and its one text form on the wire: RFC 3339, UTC, milliseconds.

use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::{OffsetDateTime, UtcOffset};

pub fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

/// `2026-11-24T10:00:00.123Z`: fixed width, so timestamps also sort as strings.
pub fn rfc3339(t: OffsetDateTime) -> String {
    let fmt =
        format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    t.to_offset(UtcOffset::UTC)
        .format(&fmt)
        .unwrap_or_else(|_| "1970-01-01T00:00:00.000Z".to_string())
}

pub fn now_rfc3339() -> String {
    rfc3339(now())
}

/// Accepts any RFC 3339 time (any offset); `None` if it is not one.
pub fn parse_rfc3339(s: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(s, &Rfc3339).ok()
}

/// The wall clock as a `SystemTime` (file times).
pub fn system_now() -> std::time::SystemTime {
    std::time::SystemTime::now()
}

pub fn unix_ms(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

pub fn from_unix_ms(ms: i64) -> Option<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_millis_and_round_trips() {
        let t = parse_rfc3339("2026-11-24T11:00:00.123456+01:00").unwrap();
        assert_eq!(rfc3339(t), "2026-11-24T10:00:00.123Z");
        let ms = unix_ms(t);
        assert_eq!(
            rfc3339(from_unix_ms(ms).unwrap()),
            "2026-11-24T10:00:00.123Z"
        );
        assert!(parse_rfc3339("yesterday").is_none());
    }
}
