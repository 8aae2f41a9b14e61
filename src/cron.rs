//! Cron schedules with Airflow semantics.
//!
//! Each tick `T` of a schedule is a run whose data interval is
//! `[previous tick, T)`: it loads the objects written (by their DMS name)
//! before `T`. Ticks are computed in the pipeline's IANA time zone, so
//! `0 2 * * *` in `Europe/London` stays at 02:00 local time across DST
//! changes (a tick that falls in the spring-forward gap runs at the first
//! valid instant after it).
//!
//! Pure time arithmetic (a leaf module): `schedule` decides and runs what is
//! due from it, `config` parses schedules with it, `pipeline` takes an
//! [`Interval`].

use chrono::{DateTime, Utc};
use chrono_tz::Tz;

/// Most missed ticks one `run` catches up (older ones coalesce into the first).
pub const MAX_CATCHUP_TICKS: usize = 1000;

/// A data interval `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interval {
    /// Inclusive start.
    pub start: DateTime<Utc>,
    /// Exclusive end: the tick that triggers the run.
    pub end: DateTime<Utc>,
}

/// A cron expression read in a time zone.
#[derive(Debug, Clone)]
pub struct Schedule {
    cron: croner::Cron,
    tz: Tz,
    expr: String,
}

impl Schedule {
    /// Parses a 5-field (or 6-field, with seconds) cron expression.
    pub fn parse(expr: &str, tz: Tz) -> Result<Self, String> {
        let cron = expr.parse::<croner::Cron>().map_err(|err| {
            format!("{expr:?} is not a cron expression ({err}); e.g. \"*/15 * * * *\"")
        })?;
        Ok(Schedule {
            cron,
            tz,
            expr: expr.to_string(),
        })
    }

    /// The expression as written.
    pub fn expr(&self) -> &str {
        &self.expr
    }

    /// The time zone.
    pub fn tz(&self) -> Tz {
        self.tz
    }

    /// The first tick strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&t.with_timezone(&self.tz), false)
            .ok()
            .map(|local| local.with_timezone(&Utc))
    }

    /// The last tick at or before `t`.
    pub fn latest_at_or_before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_previous_occurrence(&t.with_timezone(&self.tz), true)
            .ok()
            .map(|local| local.with_timezone(&Utc))
    }

    fn previous_before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_previous_occurrence(&t.with_timezone(&self.tz), false)
            .ok()
            .map(|local| local.with_timezone(&Utc))
    }

    /// The runs due at `now` when the last scheduled run ended at `last`.
    ///
    /// Never run before: the latest tick only (no history since the epoch).
    /// With `catchup`, one interval per missed tick, oldest first; without,
    /// one interval from `last` to the latest tick.
    pub fn due(
        &self,
        last: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
        catchup: bool,
    ) -> Vec<Interval> {
        let Some(latest) = self.latest_at_or_before(now) else {
            return Vec::new();
        };
        let Some(last) = last else {
            let start = self.previous_before(latest).unwrap_or(latest);
            return vec![Interval { start, end: latest }];
        };
        if latest <= last {
            return Vec::new();
        }
        if !catchup {
            return vec![Interval {
                start: last,
                end: latest,
            }];
        }
        let mut ticks = Vec::new();
        let mut t = last;
        while let Some(next) = self.next_after(t) {
            if next > latest {
                break;
            }
            ticks.push(next);
            t = next;
        }
        let skip = ticks.len().saturating_sub(MAX_CATCHUP_TICKS);
        // Ticks beyond the catch-up limit coalesce into the first kept interval.
        let mut start = last;
        let mut intervals = Vec::with_capacity(ticks.len() - skip);
        for (i, end) in ticks.into_iter().enumerate() {
            if i >= skip {
                intervals.push(Interval { start, end });
                start = end;
            }
        }
        intervals
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn five_and_six_fields() {
        let s = Schedule::parse("*/15 * * * *", Tz::UTC).unwrap();
        assert_eq!(
            s.next_after(utc("2024-05-01T10:07:00Z")),
            Some(utc("2024-05-01T10:15:00Z"))
        );
        let s = Schedule::parse("*/10 * * * * *", Tz::UTC).unwrap();
        assert_eq!(
            s.next_after(utc("2024-05-01T10:07:03Z")),
            Some(utc("2024-05-01T10:07:10Z"))
        );
        assert!(Schedule::parse("every day", Tz::UTC).is_err());
    }

    #[test]
    fn daily_local_time_across_dst() {
        let s = Schedule::parse("30 1 * * *", chrono_tz::Europe::London).unwrap();
        // 2026-03-29 01:30 London does not exist (clocks jump 01:00 -> 02:00): runs at 02:00 BST = 01:00 UTC.
        assert_eq!(
            s.next_after(utc("2026-03-28T12:00:00Z")),
            Some(utc("2026-03-29T01:00:00Z"))
        );
        // The day after (BST): 01:30 local = 00:30 UTC.
        assert_eq!(
            s.next_after(utc("2026-03-29T12:00:00Z")),
            Some(utc("2026-03-30T00:30:00Z"))
        );
        // The day before: 01:30 GMT = 01:30 UTC.
        assert_eq!(
            s.next_after(utc("2026-03-27T12:00:00Z")),
            Some(utc("2026-03-28T01:30:00Z"))
        );
    }

    #[test]
    fn due_runs_with_and_without_catchup() {
        let s = Schedule::parse("0 * * * *", Tz::UTC).unwrap();
        let now = utc("2024-05-01T13:20:00Z");
        assert_eq!(
            s.due(None, now, true),
            vec![Interval {
                start: utc("2024-05-01T12:00:00Z"),
                end: utc("2024-05-01T13:00:00Z")
            }]
        );
        let last = Some(utc("2024-05-01T10:00:00Z"));
        let caught: Vec<_> = s.due(last, now, true).iter().map(|i| i.end).collect();
        assert_eq!(
            caught,
            vec![
                utc("2024-05-01T11:00:00Z"),
                utc("2024-05-01T12:00:00Z"),
                utc("2024-05-01T13:00:00Z")
            ]
        );
        assert_eq!(s.due(last, now, true)[0].start, utc("2024-05-01T10:00:00Z"));
        assert_eq!(
            s.due(last, now, false),
            vec![Interval {
                start: utc("2024-05-01T10:00:00Z"),
                end: utc("2024-05-01T13:00:00Z")
            }]
        );
        assert!(
            s.due(Some(utc("2024-05-01T13:00:00Z")), now, true)
                .is_empty()
        );
    }
}
