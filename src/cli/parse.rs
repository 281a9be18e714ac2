//! Value parsers for flags: bounded durations and times. Each error says
//! what was expected; clap prints it with the flag's name and the usage.

use std::ops::RangeInclusive;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};

/// Parses a number of `unit_name`s (each `unit` seconds) within `range`
/// (and above 0) as a duration; `out_of_range` is the error when it is not.
fn bounded_duration(
    s: &str,
    range: RangeInclusive<f64>,
    (unit, unit_name): (f64, &str),
    out_of_range: &str,
) -> Result<Duration, String> {
    let value: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of {unit_name}"))?;
    if !(value > 0.0 && range.contains(&value)) {
        return Err(out_of_range.to_string());
    }
    Ok(Duration::from_secs_f64(value * unit))
}

const SECONDS: (f64, &str) = (1.0, "seconds");

pub fn lease(s: &str) -> Result<Duration, String> {
    bounded_duration(
        s,
        0.1..=3600.0,
        SECONDS,
        "the lease must be between 0.1 and 3600 seconds",
    )
}

pub fn smtp_timeout(s: &str) -> Result<Duration, String> {
    bounded_duration(
        s,
        0.1..=600.0,
        SECONDS,
        "the SMTP timeout must be between 0.1 and 600 seconds",
    )
}

pub fn session_timeout(s: &str) -> Result<Duration, String> {
    bounded_duration(
        s,
        0.3..=1800.0,
        SECONDS,
        "the session timeout must be between 0.3 and 1800 seconds",
    )
}

pub fn retention_days(s: &str) -> Result<Duration, String> {
    bounded_duration(
        s,
        0.0..=36_500.0,
        (86_400.0, "days"),
        "retention must be more than 0 and at most 36500 days",
    )
}

/// An RFC 3339 time (`2026-11-01T00:00:00Z`), or a date (`2026-11-01`,
/// midnight UTC).
pub fn time(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(day) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(day.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc());
    }
    Err(format!(
        "{s:?} is not an RFC 3339 time such as 2026-11-01T00:00:00Z or a date such as 2026-11-01"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_bounded_and_times_take_dates() {
        assert_eq!(lease("1.5"), Ok(Duration::from_millis(1500)));
        assert!(lease("0").is_err() && lease("1e30").is_err() && lease("x").is_err());
        assert_eq!(retention_days("1"), Ok(Duration::from_secs(86_400)));
        assert_eq!(
            time("2026-11-01").unwrap().to_rfc3339(),
            "2026-11-01T00:00:00+00:00"
        );
        assert_eq!(
            time("2026-11-01T02:00:00+02:00").unwrap().to_rfc3339(),
            "2026-11-01T00:00:00+00:00"
        );
        assert!(time("yesterday").unwrap_err().contains("RFC 3339"));
    }
}
