//! Postgres snapshots (`pg_snapshot`, `xmin:xmax:xip,…`) parsed, so the
//! relay can reason about which transactions a drain must pick up.

use anyhow::Context;

/// A pg_snapshot (`xmin:xmax:xip,…`) parsed, to reason about it in Rust.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub text: String,
    pub xmin: u64,
    pub xmax: u64,
    pub in_progress: Vec<u64>,
}

impl Snapshot {
    pub fn parse(text: &str) -> anyhow::Result<Snapshot> {
        let mut parts = text.splitn(3, ':');
        let mut number = |what: &str| -> anyhow::Result<u64> {
            parts
                .next()
                .with_context(|| format!("snapshot {text:?} lacks {what}"))?
                .parse::<u64>()
                .with_context(|| format!("snapshot {text:?} has a bad {what}"))
        };
        let xmin = number("xmin")?;
        let xmax = number("xmax")?;
        let in_progress = match parts.next() {
            None | Some("") => Vec::new(),
            Some(list) => list
                .split(',')
                .map(|x| {
                    x.parse::<u64>()
                        .with_context(|| format!("snapshot {text:?}"))
                })
                .collect::<anyhow::Result<_>>()?,
        };
        Ok(Snapshot {
            text: text.to_string(),
            xmin,
            xmax,
            in_progress,
        })
    }

    /// Transactions in progress when the snapshot was taken, as xid8 text.
    pub fn in_progress_ids(&self) -> Vec<String> {
        self.in_progress.iter().map(u64::to_string).collect()
    }

    /// Was transaction `xid` complete (committed or aborted) when this
    /// snapshot was taken? Postgres' `pg_visible_in_snapshot`.
    pub fn sees(&self, xid: u64) -> bool {
        xid < self.xmin || (xid < self.xmax && !self.in_progress.contains(&xid))
    }

    /// Transactions in progress in `self` that `later` sees complete: the
    /// late commits a drain from `self` to `later` must pick up, as xid8 text.
    pub fn completed_by(&self, later: &Snapshot) -> Vec<String> {
        self.in_progress
            .iter()
            .filter(|xid| later.sees(**xid))
            .map(u64::to_string)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_snapshots() {
        let s = Snapshot::parse("10:20:12,15").unwrap();
        assert_eq!(
            (s.xmin, s.xmax, s.in_progress.clone()),
            (10, 20, vec![12, 15])
        );
        let empty = Snapshot::parse("727:727:").unwrap();
        assert!(empty.in_progress.is_empty());
        assert!(Snapshot::parse("x:1:").is_err());
        assert!(s.sees(9) && s.sees(13) && !s.sees(12) && !s.sees(20));
        let later = Snapshot::parse("15:30:15,22").unwrap();
        assert_eq!(s.completed_by(&later), vec!["12".to_string()]);
        assert!(Snapshot::parse("1").is_err());
    }
}
