//! RFC 3339 times as Docker writes and reads them (image `created`,
//! `lastUpdated`, the daemon's `since`/`until` filters), over `jiff`: the
//! one place gantry formats or parses a date. It never reads a time zone
//! database; every time is UTC or carries its own offset.

use jiff::Timestamp;

/// The current time as RFC 3339 in UTC with nanoseconds, like Docker writes.
pub fn now_rfc3339() -> String {
    format!("{:.9}", Timestamp::now())
}

/// Seconds since the epoch of an RFC 3339 time, if it parses.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    s.parse::<Timestamp>().ok().map(|t| t.as_second())
}

/// Formats a Unix time as RFC 3339 UTC with nanoseconds; a time outside
/// what RFC 3339 can say (years before 0 or after 9999) is clamped.
pub fn rfc3339(secs: i64, nanos: u32) -> String {
    let t = Timestamp::new(secs, nanos.min(999_999_999) as i32).unwrap_or(if secs < 0 {
        Timestamp::MIN
    } else {
        Timestamp::MAX
    });
    format!("{t:.9}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(rfc3339(1_700_000_000, 5), "2023-11-14T22:13:20.000000005Z");
        assert_eq!(now_rfc3339().len(), "1970-01-01T00:00:00.000000000Z".len());
    }

    #[test]
    fn parses_rfc3339_with_offsets_and_fractions() {
        assert_eq!(parse_rfc3339("1970-01-02T00:00:00Z"), Some(86400));
        assert_eq!(parse_rfc3339("2023-11-14T22:13:20.5+01:00"), Some(1_700_000_000 - 3600));
        assert_eq!(parse_rfc3339("2023-11-14T22:13:20.000000005Z"), Some(1_700_000_000));
        assert_eq!(parse_rfc3339(&rfc3339(1_700_000_000, 5)), Some(1_700_000_000));
        assert_eq!(parse_rfc3339("yesterday"), None);
        assert_eq!(parse_rfc3339("2023-11-14"), None);
    }
}
