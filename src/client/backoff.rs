//! Reconnect backoff: the schedule of the Go client (cenkalti/backoff defaults:
//! 500 ms initial, ×1.5, ±50 % jitter, 60 s cap, never gives up), with the
//! randomness passed in so the schedule is testable.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BackoffConfig {
    pub initial: Duration,
    pub multiplier: f64,
    /// Relative jitter: the delay is drawn from `interval × [1 − j, 1 + j)`.
    pub jitter: f64,
    /// Upper bound for the interval and for every returned delay.
    pub max: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            initial: Duration::from_millis(500),
            multiplier: 1.5,
            jitter: 0.5,
            max: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Backoff {
    config: BackoffConfig,
    interval: Duration,
}

impl Backoff {
    pub fn new(config: BackoffConfig) -> Self {
        Backoff {
            interval: config.initial.min(config.max),
            config,
        }
    }

    /// The next delay; `random` is uniform in `[0, 1)` (clamped otherwise).
    ///
    /// Unlike cenkalti/backoff, the jittered delay is capped too (it lets the
    /// delay reach 1.5 × the cap): reconnecting sooner is the point of this client.
    pub fn next(&mut self, random: f64) -> Duration {
        let random = if random.is_finite() {
            random.clamp(0.0, 1.0)
        } else {
            0.5
        };
        let base = self.interval.as_secs_f64();
        let delta = base * self.config.jitter.clamp(0.0, 1.0);
        let delay = base - delta + random * 2.0 * delta;
        let max = self.config.max.as_secs_f64();
        self.interval = Duration::from_secs_f64((base * self.config.multiplier.max(1.0)).min(max));
        Duration::from_secs_f64(delay.clamp(0.0, max))
    }

    /// Back to the initial interval, after a successful exchange.
    pub fn reset(&mut self) {
        self.interval = self.config.initial.min(self.config.max);
    }

    /// The interval the next delay is drawn around.
    pub fn interval(&self) -> Duration {
        self.interval
    }
}

/// Uniform `[0, 1)` from the OS, for the jitter. Falls back to the midpoint,
/// which only loses the spreading of reconnects, never correctness.
pub fn os_random_unit() -> f64 {
    let mut b = [0u8; 8];
    match getrandom::fill(&mut b) {
        // 53 random bits: exactly representable as an f64 mantissa.
        Ok(()) => (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64,
        Err(_) => 0.5,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(d: Duration) -> u128 {
        d.as_millis()
    }

    #[test]
    fn go_schedule_at_the_midpoint() {
        let mut b = Backoff::new(BackoffConfig::default());
        let got: Vec<u128> = (0..6).map(|_| ms(b.next(0.5))).collect();
        assert_eq!(got, [500, 750, 1125, 1687, 2531, 3796]);
    }

    #[test]
    fn jitter_spans_plus_minus_half() {
        let mut low = Backoff::new(BackoffConfig::default());
        let mut high = Backoff::new(BackoffConfig::default());
        assert_eq!(ms(low.next(0.0)), 250);
        assert_eq!(ms(high.next(0.999_999)), 749);
        assert_eq!(ms(low.next(0.0)), 375);
        assert_eq!(ms(high.next(0.999_999)), 1124);
        // Out-of-range randomness is clamped, never panics.
        let mut b = Backoff::new(BackoffConfig::default());
        assert_eq!(ms(b.next(7.0)), 750);
        assert_eq!(ms(b.next(-1.0)), 375);
        assert_eq!(ms(b.next(f64::NAN)), 1125);
    }

    #[test]
    fn capped_at_sixty_seconds() {
        let mut b = Backoff::new(BackoffConfig::default());
        for _ in 0..30 {
            assert!(b.next(0.999) <= Duration::from_secs(60));
        }
        assert_eq!(b.interval(), Duration::from_secs(60));
        // At the cap the jitter still spreads clients below it.
        assert_eq!(b.next(0.0), Duration::from_secs(30));
        assert_eq!(b.next(0.999), Duration::from_secs(60));
    }

    #[test]
    fn reset_starts_over() {
        let mut b = Backoff::new(BackoffConfig::default());
        for _ in 0..5 {
            b.next(0.5);
        }
        b.reset();
        assert_eq!(b.interval(), Duration::from_millis(500));
        assert_eq!(ms(b.next(0.5)), 500);
    }

    #[test]
    fn os_randomness_is_in_range() {
        for _ in 0..100 {
            let r = os_random_unit();
            assert!((0.0..1.0).contains(&r), "{r}");
        }
    }
}
