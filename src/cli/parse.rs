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

pub fn smtp_final_reply_timeout(s: &str) -> Result<Duration, String> {
    bounded_duration(
        s,
        0.1..=3600.0,
        SECONDS,
        "the final-reply timeout must be between 0.1 and 3600 seconds",
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

/// A duration with a unit: `90s`, `15m`, `24h`, `7d` (a bare number is
/// seconds).
pub fn span(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let seconds_per = match unit {
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86_400.0,
        _ => {
            return Err(format!(
                "{s:?}: the unit must be s, m, h or d (such as 24h)"
            ))
        }
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration such as 90s, 15m, 24h or 7d"))?;
    if !(value.is_finite() && value >= 0.0) {
        return Err(format!(
            "{s:?} is not a duration such as 90s, 15m, 24h or 7d"
        ));
    }
    let seconds = value * seconds_per;
    if seconds > 100.0 * 365.0 * 86_400.0 {
        return Err(format!("{s:?} is longer than 100 years"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// How long the mail worker keeps retrying: 1 second to 30 days.
pub fn retry_for(s: &str) -> Result<Duration, String> {
    let d = span(s)?;
    if d < Duration::from_secs(1) || d > Duration::from_secs(30 * 86_400) {
        return Err("the retry budget must be between 1s and 30d".into());
    }
    Ok(d)
}

/// A static member id: 1 to 200 of A-Z a-z 0-9 . _ -
pub fn instance_id(s: &str) -> Result<String, String> {
    let valid = !s.is_empty()
        && s.len() <= 200
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if valid {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?}: an instance id is 1 to 200 of A-Z a-z 0-9 . _ -"
        ))
    }
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
        assert_eq!(span("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(span("90"), Ok(Duration::from_secs(90)));
        assert_eq!(span("1.5m"), Ok(Duration::from_secs(90)));
        assert!(span("3 weeks").is_err() && span("-1s").is_err() && span("1e300d").is_err());
        assert!(retry_for("0s").is_err() && retry_for("31d").is_err());
    }
}
