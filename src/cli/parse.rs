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

/// Whole milliseconds from 0 (never waits) to 1000.
pub fn gather(s: &str) -> Result<Duration, String> {
    match s.parse::<u64>() {
        Ok(ms) if ms <= 1000 => Ok(Duration::from_millis(ms)),
        _ => Err(format!(
            "{s:?}: the gathering wait must be a whole number of milliseconds from 0 to 1000"
        )),
    }
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

/// `--to-datetime` as kafka-consumer-groups takes it: `YYYY-MM-DDTHH:mm:SS.sss`
/// (UTC when no zone is given), an RFC 3339 time, or a date.
pub fn datetime(s: &str) -> Result<DateTime<Utc>, String> {
    for format in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%dT%H:%M",
    ] {
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(s, format) {
            return Ok(t.and_utc());
        }
    }
    time(s)
}

/// An ISO 8601 duration as Kafka's `--by-duration` takes it: `P30D`,
/// `PT1H30M`, `P1DT12H`, `PT0.5S`.
pub fn iso_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not an ISO 8601 duration such as P30D, PT12H or P1DT2H30M");
    let rest = s.strip_prefix('P').ok_or_else(bad)?;
    let (days_part, time_part) = match rest.split_once('T') {
        Some((d, t)) => (d, Some(t)),
        None => (rest, None),
    };
    let mut seconds = 0.0f64;
    let mut any = false;
    let mut take = |part: &str, units: &[(char, f64)]| -> Result<(), String> {
        let mut number = String::new();
        for c in part.chars() {
            if c.is_ascii_digit() || c == '.' {
                number.push(c);
                continue;
            }
            let unit = units.iter().find(|(u, _)| *u == c).ok_or_else(bad)?;
            let value: f64 = number.parse().map_err(|_| bad())?;
            seconds += value * unit.1;
            number.clear();
            any = true;
        }
        if number.is_empty() {
            Ok(())
        } else {
            Err(bad())
        }
    };
    take(days_part, &[('W', 7.0 * 86_400.0), ('D', 86_400.0)])?;
    if let Some(time_part) = time_part {
        if time_part.is_empty() {
            return Err(bad());
        }
        take(time_part, &[('H', 3600.0), ('M', 60.0), ('S', 1.0)])?;
    }
    if !any || !seconds.is_finite() || seconds > 100.0 * 365.0 * 86_400.0 {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// `topic` or `topic:0,1,5` (kafka-consumer-groups' `--topic`).
pub fn topic_partitions(s: &str) -> Result<(String, Option<Vec<i32>>), String> {
    match s.split_once(':') {
        None if !s.is_empty() => Ok((s.to_string(), None)),
        Some((topic, list)) if !topic.is_empty() => {
            Ok((topic.to_string(), Some(partition_list(list)?)))
        }
        _ => Err(format!("{s:?}: give a topic, or topic:partition,partition")),
    }
}

/// `0,3,5`: partition numbers.
pub fn partition_list(s: &str) -> Result<Vec<i32>, String> {
    s.split(',')
        .map(|p| {
            p.trim()
                .parse::<i32>()
                .ok()
                .filter(|p| *p >= 0)
                .ok_or_else(|| format!("{p:?} is not a partition number (0 or more)"))
        })
        .collect()
}

/// `0:100,3:250` (partition:offset pairs), or one offset for every partition.
pub fn partition_offsets(s: &str) -> Result<PartitionOffsetsArg, String> {
    if let Ok(offset) = s.trim().parse::<i64>() {
        return if offset >= 0 {
            Ok(PartitionOffsetsArg::All(offset))
        } else {
            Err(format!("{s:?}: offsets are 0 or more"))
        };
    }
    let mut listed = std::collections::BTreeMap::new();
    for pair in s.split(',') {
        let (p, o) = pair
            .split_once(':')
            .ok_or_else(|| format!("{pair:?} is not partition:offset (such as 3:250)"))?;
        let p: i32 = p
            .trim()
            .parse()
            .ok()
            .filter(|p| *p >= 0)
            .ok_or_else(|| format!("{p:?} is not a partition number"))?;
        let o: i64 = o
            .trim()
            .parse()
            .ok()
            .filter(|o| *o >= 0)
            .ok_or_else(|| format!("{o:?} is not an offset (0 or more)"))?;
        if listed.insert(p, o).is_some() {
            return Err(format!("partition {p} is given twice"));
        }
    }
    Ok(PartitionOffsetsArg::PerPartition(listed))
}

/// What `--from-offset` / `--to-offset` say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartitionOffsetsArg {
    All(i64),
    PerPartition(std::collections::BTreeMap<i32, i64>),
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
        assert_eq!(iso_duration("P30D"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(iso_duration("PT1H30M"), Ok(Duration::from_secs(5400)));
        assert_eq!(iso_duration("P1DT2H"), Ok(Duration::from_secs(93_600)));
        assert_eq!(iso_duration("PT0.5S"), Ok(Duration::from_millis(500)));
        for bad in ["30D", "P", "PT", "P1X", "P1H", "PT1D", "P1.2.3D"] {
            assert!(iso_duration(bad).is_err(), "{bad}");
        }
        assert_eq!(
            datetime("2026-11-01T10:00:00.000").unwrap().to_rfc3339(),
            "2026-11-01T10:00:00+00:00"
        );
        assert_eq!(
            topic_partitions("t:0,2"),
            Ok(("t".into(), Some(vec![0, 2])))
        );
        assert!(topic_partitions("t:x").is_err() && topic_partitions(":1").is_err());
        assert_eq!(partition_offsets("7"), Ok(PartitionOffsetsArg::All(7)));
        assert_eq!(
            partition_offsets("0:10,3:5"),
            Ok(PartitionOffsetsArg::PerPartition([(0, 10), (3, 5)].into()))
        );
        assert!(partition_offsets("0:10,0:5").is_err() && partition_offsets("-1").is_err());
    }
}
