//! The retry delay schedule: delay = initial × multiplier^attempt, capped at
//! `max`, with optional jitter; and the delay tiers it needs.

use std::time::Duration;

/// Exponential backoff parameters, as a RetryPolicy's `backoff` holds them.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Backoff {
    /// Delay before the first retry.
    pub initial: Duration,
    /// Growth factor between consecutive retries (≥ 1).
    pub multiplier: f64,
    /// Upper bound of any single delay.
    pub max: Duration,
    /// Fraction of the delay (0..=1) that may be added at random, so that
    /// many failures at once do not retry in lockstep.
    pub jitter: f64,
}

/// Why a [`Backoff`] is unusable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BackoffError {
    #[error("backoff initial delay must be greater than zero")]
    ZeroInitial,
    #[error("backoff multiplier must be a finite number >= 1, got {0}")]
    Multiplier(f64),
    #[error("backoff max ({max:?}) must be >= initial ({initial:?})")]
    MaxBelowInitial { initial: Duration, max: Duration },
    #[error("backoff jitter must be between 0 and 1, got {0}")]
    Jitter(f64),
}

impl Backoff {
    /// Checks the parameters; every other method assumes a valid backoff.
    pub fn validate(&self) -> Result<(), BackoffError> {
        if self.initial.is_zero() {
            return Err(BackoffError::ZeroInitial);
        }
        if !self.multiplier.is_finite() || self.multiplier < 1.0 {
            return Err(BackoffError::Multiplier(self.multiplier));
        }
        if self.max < self.initial {
            return Err(BackoffError::MaxBelowInitial {
                initial: self.initial,
                max: self.max,
            });
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(BackoffError::Jitter(self.jitter));
        }
        Ok(())
    }

    /// The delay before retry number `attempt` (0-based), without jitter.
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = self.multiplier.powi(attempt.min(i32::MAX as u32) as i32);
        let secs = self.initial.as_secs_f64() * factor;
        if !secs.is_finite() || secs >= self.max.as_secs_f64() {
            self.max
        } else {
            // Round to whole milliseconds: tier names and queue TTLs are in ms.
            Duration::from_millis((secs * 1000.0).round() as u64)
        }
    }

    /// The delay before retry `attempt` with jitter applied; `unit` is a
    /// random number in `0..1` supplied by the caller (kept out of here so
    /// the schedule stays deterministic under test).
    pub fn jittered_delay(&self, attempt: u32, unit: f64) -> Duration {
        let base = self.delay(attempt);
        let extra = base.as_secs_f64() * self.jitter * unit.clamp(0.0, 1.0);
        base + Duration::from_millis((extra * 1000.0).round() as u64)
    }

    /// The distinct delays of the first `max_retries` retries, ascending: one
    /// delay queue per entry.
    pub fn tiers(&self, max_retries: u32) -> Vec<Duration> {
        let mut tiers: Vec<Duration> = (0..max_retries).map(|a| self.delay(a)).collect();
        tiers.sort();
        tiers.dedup();
        tiers
    }
}

/// The tier to use for a computed delay: the shortest tier not shorter than
/// `delay`, else the longest tier. `None` only when there are no tiers.
pub fn tier_for(tiers: &[Duration], delay: Duration) -> Option<Duration> {
    tiers
        .iter()
        .copied()
        .find(|t| *t >= delay)
        .or_else(|| tiers.last().copied())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Backoff {
        Backoff {
            initial: Duration::from_secs(1),
            multiplier: 2.0,
            max: Duration::from_secs(10),
            jitter: 0.0,
        }
    }

    #[test]
    fn delays_grow_and_cap() {
        let b = policy();
        let delays: Vec<u64> = (0..6).map(|a| b.delay(a).as_secs()).collect();
        assert_eq!(delays, vec![1, 2, 4, 8, 10, 10]);
    }

    #[test]
    fn tiers_are_distinct_and_sorted() {
        let b = policy();
        assert_eq!(
            b.tiers(6),
            [1, 2, 4, 8, 10].map(Duration::from_secs).to_vec()
        );
        assert!(b.tiers(0).is_empty());
    }

    #[test]
    fn tier_for_picks_shortest_not_shorter() {
        let tiers = policy().tiers(6);
        assert_eq!(
            tier_for(&tiers, Duration::from_millis(2500)),
            Some(Duration::from_secs(4))
        );
        assert_eq!(
            tier_for(&tiers, Duration::from_secs(4)),
            Some(Duration::from_secs(4))
        );
        assert_eq!(
            tier_for(&tiers, Duration::from_secs(60)),
            Some(Duration::from_secs(10))
        );
        assert_eq!(tier_for(&[], Duration::from_secs(1)), None);
    }

    #[test]
    fn jitter_adds_at_most_its_fraction() {
        let b = Backoff {
            jitter: 0.5,
            ..policy()
        };
        assert_eq!(b.jittered_delay(1, 0.0), Duration::from_secs(2));
        assert_eq!(b.jittered_delay(1, 1.0), Duration::from_secs(3));
    }

    #[test]
    fn huge_attempts_do_not_overflow() {
        assert_eq!(policy().delay(u32::MAX), Duration::from_secs(10));
    }

    #[test]
    fn invalid_backoffs_are_rejected() {
        let ok = policy();
        assert!(ok.validate().is_ok());
        let zero = Backoff {
            initial: Duration::ZERO,
            ..ok
        };
        assert_eq!(zero.validate(), Err(BackoffError::ZeroInitial));
        let shrink = Backoff {
            multiplier: 0.5,
            ..ok
        };
        assert_eq!(shrink.validate(), Err(BackoffError::Multiplier(0.5)));
        let low_max = Backoff {
            max: Duration::from_millis(10),
            ..ok
        };
        assert!(matches!(
            low_max.validate(),
            Err(BackoffError::MaxBelowInitial { .. })
        ));
        let jitter = Backoff { jitter: 2.0, ..ok };
        assert_eq!(jitter.validate(), Err(BackoffError::Jitter(2.0)));
    }
}
