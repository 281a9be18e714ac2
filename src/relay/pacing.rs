//! How long the relay's run loop pauses after each step, and whether a
//! writer's wake-up may cut the pause short: back to back while there is
//! work; idle, a pause that doubles from [`MIN_IDLE_PAUSE`] up to the
//! configured maximum (writers that do not wake it); after errors, a
//! backoff up to 5 s.

use std::time::Duration;

use super::StepOutcome;

/// The shortest pause of an idle relay between peeks.
pub const MIN_IDLE_PAUSE: Duration = Duration::from_micros(500);

/// The first pause after a failed step, doubled up to [`MAX_ERROR_PAUSE`].
const FIRST_ERROR_PAUSE: Duration = Duration::from_millis(100);
const MAX_ERROR_PAUSE: Duration = Duration::from_secs(5);

/// What the run loop does after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Pause {
    pub length: Duration,
    /// A writer's wake-up ends the pause (only when idle or caught up: a
    /// standby or a failing relay has nothing to move at once).
    pub wakeable: bool,
}

/// Above this rate of records (estimated over the last woken batches), a
/// woken relay gathers: see [`Gathering`].
pub const GATHER_ABOVE_PER_SECOND: f64 = 400.0;

/// A busy relay's batches carry several writers' rows: once records come
/// faster than [`GATHER_ABOVE_PER_SECOND`], a woken relay starts its next
/// batch no sooner than `window` after the last one began. Each batch costs
/// the same five statements and one commit whatever it holds, so at 500
/// orders a second (about 1.4 orders a batch without it) this is most of
/// the relay's cost per order; the price is up to `window` more latency,
/// only at rates where writers come faster than batches complete.
/// Slower traffic (each order its own batch at 200/s) never waits.
#[derive(Debug)]
pub(super) struct Gathering {
    window: Duration,
    last_start: Option<std::time::Instant>,
    /// Moving averages of records per woken batch and of the time between
    /// batch starts (their ratio is the rate: averaging `records / gap`
    /// instead would let one short gap read as a burst).
    records: f64,
    gap_secs: f64,
}

impl Gathering {
    /// `window` zero: never gathers.
    pub fn new(window: Duration) -> Gathering {
        Gathering {
            window,
            last_start: None,
            records: 0.0,
            gap_secs: f64::INFINITY,
        }
    }

    /// How long a woken relay waits before its batch, at `now`.
    pub fn wait(&self, now: std::time::Instant) -> Duration {
        match self.last_start {
            Some(last) if self.records / self.gap_secs >= GATHER_ABOVE_PER_SECOND => {
                (last + self.window).saturating_duration_since(now)
            }
            _ => Duration::ZERO,
        }
    }

    /// A woken batch that began at `started` moved `records`.
    pub fn moved(&mut self, started: std::time::Instant, records: usize) {
        const WEIGHT: f64 = 0.2;
        if let Some(last) = self.last_start {
            let gap = started.duration_since(last).as_secs_f64();
            if self.gap_secs.is_finite() {
                self.gap_secs += WEIGHT * (gap - self.gap_secs);
                self.records += WEIGHT * (records as f64 - self.records);
            } else {
                (self.gap_secs, self.records) = (gap, records as f64);
            }
        }
        self.last_start = (!self.window.is_zero()).then_some(started);
    }
}

/// The run loop's pacing state.
#[derive(Debug)]
pub(super) struct Pacing {
    idle_poll_max: Duration,
    standby_poll: Duration,
    idle_pause: Duration,
    error_pause: Duration,
}

impl Pacing {
    pub fn new(idle_poll_max: Duration, standby_poll: Duration) -> Pacing {
        Pacing {
            idle_poll_max,
            standby_poll,
            idle_pause: MIN_IDLE_PAUSE,
            error_pause: FIRST_ERROR_PAUSE,
        }
    }

    /// The pause after a step that ended with `outcome`; `woken`: the step
    /// followed a wake-up rather than a poll.
    pub fn after(&mut self, outcome: Result<&StepOutcome, ()>, woken: bool) -> Pause {
        // The first pause after a batch. Writers that woke the relay will
        // wake it again: between their wake-ups it polls at the slow end.
        // Rows found by polling come from writers that do not wake it: poll
        // fast again, as they may write more at once.
        let after_batch = if woken {
            self.idle_poll_max
        } else {
            MIN_IDLE_PAUSE
        };
        let (length, wakeable) = match outcome {
            // Caught up with the snapshot the batch was cut at: rows
            // committed since come with a wake-up (one that came during the
            // batch is kept) or are found by the next poll.
            Ok(StepOutcome::Moved {
                drain_continues: false,
                ..
            }) => {
                self.idle_pause = (after_batch * 2).min(self.idle_poll_max);
                self.error_pause = FIRST_ERROR_PAUSE;
                (after_batch, true)
            }
            Ok(StepOutcome::Moved { .. })
            | Ok(StepOutcome::BecameLeader { .. })
            | Ok(StepOutcome::LostLeadership) => {
                self.idle_pause = after_batch;
                self.error_pause = FIRST_ERROR_PAUSE;
                (Duration::ZERO, false)
            }
            Ok(StepOutcome::Idle) => {
                let pause = self.idle_pause;
                self.idle_pause = (self.idle_pause * 2).min(self.idle_poll_max);
                self.error_pause = FIRST_ERROR_PAUSE;
                (pause, true)
            }
            Ok(StepOutcome::Standby) => (self.standby_poll, false),
            Err(()) => {
                let pause = self.error_pause;
                self.error_pause = (self.error_pause * 2).min(MAX_ERROR_PAUSE);
                (pause, false)
            }
        };
        Pause { length, wakeable }
    }

    /// A wake-up ended the pause: the next idle pauses start short again.
    pub fn woken(&mut self) {
        self.idle_pause = MIN_IDLE_PAUSE;
    }
}

/// Sleeps `pause`, honestly below a millisecond too: tokio's timer has a
/// millisecond's resolution (a "0.5 ms" sleep took about 2 ms), so short
/// pauses sleep on a blocking thread, whose timer is precise.
pub(super) async fn precise_sleep(pause: Duration) {
    if pause >= Duration::from_millis(2) {
        tokio::time::sleep(pause).await;
    } else {
        let _ = tokio::task::spawn_blocking(move || std::thread::sleep(pause)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_millis(5);
    const STANDBY: Duration = Duration::from_millis(250);

    fn moved(drain_continues: bool) -> StepOutcome {
        StepOutcome::Moved {
            appended: 1,
            parked: 0,
            drain_continues,
        }
    }

    fn pause(length: Duration, wakeable: bool) -> Pause {
        Pause { length, wakeable }
    }

    #[test]
    fn a_busy_relay_gathers_and_a_slow_one_never_waits() {
        let start = std::time::Instant::now();
        let ms = |n: u64| start + Duration::from_millis(n);
        // 200 records a second, one a batch: never a wait.
        let mut slow = Gathering::new(Duration::from_millis(10));
        for n in 0..20 {
            assert_eq!(slow.wait(ms(n * 5)), Duration::ZERO);
            slow.moved(ms(n * 5), 1);
        }
        // 500 a second, one every 2 ms: once the rate is known, the next
        // batch waits until 10 ms after the last one began...
        let mut busy = Gathering::new(Duration::from_millis(10));
        for n in 0..20 {
            busy.moved(ms(n * 2), 1);
        }
        assert_eq!(busy.wait(ms(39)), Duration::from_millis(9));
        // ...and, gathering five a batch, stays at that rate.
        for n in 0..20 {
            busy.moved(ms(40 + n * 10), 5);
        }
        assert_eq!(busy.wait(ms(232)), Duration::from_millis(8));
        // When the rate falls (one record every 10 ms), it stops waiting.
        for n in 0..20 {
            busy.moved(ms(240 + n * 10), 1);
        }
        assert_eq!(busy.wait(ms(432)), Duration::ZERO);
        // A window of zero never waits.
        let mut off = Gathering::new(Duration::ZERO);
        for n in 0..20 {
            off.moved(ms(n), 5);
        }
        assert_eq!(off.wait(ms(20)), Duration::ZERO);
    }

    #[test]
    fn an_idle_relay_doubles_its_pause_up_to_the_maximum_and_a_wake_up_resets_it() {
        let mut pacing = Pacing::new(MAX, STANDBY);
        let idle = StepOutcome::Idle;
        let lengths: Vec<Duration> = (0..6)
            .map(|_| pacing.after(Ok(&idle), false).length)
            .collect();
        let us = Duration::from_micros;
        assert_eq!(
            lengths,
            [us(500), us(1000), us(2000), us(4000), MAX, MAX],
            "doubling from the minimum, capped"
        );
        assert!(pacing.after(Ok(&idle), false).wakeable);
        pacing.woken();
        assert_eq!(pacing.after(Ok(&idle), true).length, MIN_IDLE_PAUSE);
    }

    #[test]
    fn a_drain_runs_back_to_back_and_its_last_batch_pauses_by_what_found_it() {
        let mut pacing = Pacing::new(MAX, STANDBY);
        assert_eq!(
            pacing.after(Ok(&moved(true)), false),
            pause(Duration::ZERO, false)
        );
        // Found by polling: writers that do not wake the relay, poll fast.
        assert_eq!(
            pacing.after(Ok(&moved(false)), false),
            pause(MIN_IDLE_PAUSE, true)
        );
        // After a wake-up: the writers wake it again; poll at the slow end.
        assert_eq!(pacing.after(Ok(&moved(false)), true), pause(MAX, true));
        assert_eq!(
            pacing.after(Ok(&StepOutcome::BecameLeader { epoch: 2 }), false),
            pause(Duration::ZERO, false)
        );
    }

    #[test]
    fn failures_back_off_to_five_seconds_and_a_good_step_resets_the_backoff() {
        let mut pacing = Pacing::new(MAX, STANDBY);
        let lengths: Vec<u64> = (0..8)
            .map(|_| pacing.after(Err(()), false).length.as_millis() as u64)
            .collect();
        assert_eq!(lengths, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert!(!pacing.after(Err(()), false).wakeable);
        pacing.after(Ok(&StepOutcome::Idle), false);
        assert_eq!(pacing.after(Err(()), false).length, FIRST_ERROR_PAUSE);
        assert_eq!(
            pacing.after(Ok(&StepOutcome::Standby), false),
            pause(STANDBY, false)
        );
    }
}
