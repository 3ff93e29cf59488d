//! Per-client-IP token buckets, with the semantics of Go's `rate.Limiter.Wait`
//! as the upstream server uses it: a request takes a token, waiting for one if
//! needed, and is refused only when that wait would pass the call's deadline.
//! Pure: `now` is passed in and the caller does the sleeping.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateConfig {
    /// Tokens per second; 0 disables limiting.
    pub rate: f64,
    /// Bucket size.
    pub burst: u32,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// What the caller must do with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Go ahead now.
    Now,
    /// A token is reserved; go ahead after this wait.
    After(Duration),
    /// The wait would pass the deadline: refuse (`ResourceExhausted`).
    Refused,
}

pub struct IpRateLimiter {
    cfg: RateConfig,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl IpRateLimiter {
    pub fn new(cfg: RateConfig) -> Self {
        IpRateLimiter {
            cfg,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    pub fn enabled(&self) -> bool {
        self.cfg.rate > 0.0
    }

    /// Takes a token for `ip`. `max_wait` is the time left before the call's
    /// deadline (`None`: no deadline, wait as long as needed).
    pub fn admit(&self, ip: IpAddr, now: Instant, max_wait: Option<Duration>) -> Admission {
        if !self.enabled() {
            return Admission::Now;
        }
        let burst = f64::from(self.cfg.burst.max(1));
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let b = buckets.entry(ip).or_insert(Bucket {
            tokens: burst,
            last: now,
        });
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        let tokens = (b.tokens + elapsed * self.cfg.rate).min(burst) - 1.0;
        let wait = if tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-tokens / self.cfg.rate)
        };
        if max_wait.is_some_and(|m| wait > m) {
            // Not reserved: the refused request costs nothing, as in Go.
            return Admission::Refused;
        }
        b.tokens = tokens;
        b.last = now;
        if wait.is_zero() {
            Admission::Now
        } else {
            Admission::After(wait)
        }
    }

    /// Drops buckets that have refilled completely (they equal a fresh one).
    pub fn gc(&self, now: Instant) -> usize {
        let burst = f64::from(self.cfg.burst.max(1));
        let rate = self.cfg.rate;
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let before = buckets.len();
        buckets.retain(|_, b| {
            b.tokens + now.saturating_duration_since(b.last).as_secs_f64() * rate < burst
        });
        before - buckets.len()
    }

    pub fn len(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(1, 2, 3, 4));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(5, 6, 7, 8));

    #[test]
    fn burst_then_wait_or_refuse_by_deadline() {
        let l = IpRateLimiter::new(RateConfig {
            rate: 1.0,
            burst: 60,
        });
        let t = Instant::now();
        let dl = Some(Duration::from_millis(500));
        for _ in 0..60 {
            assert_eq!(l.admit(A, t, dl), Admission::Now);
        }
        assert_eq!(l.admit(A, t, dl), Admission::Refused);
        // Another IP has its own bucket.
        assert_eq!(l.admit(B, t, dl), Admission::Now);
        // Without a deadline the request waits for the next token.
        assert_eq!(
            l.admit(A, t, None),
            Admission::After(Duration::from_secs(1))
        );
        // Tokens come back at the configured rate: the reservation above left the
        // bucket at -1, so three seconds later two requests pass.
        let later = t + Duration::from_secs(3);
        assert_eq!(l.admit(A, later, dl), Admission::Now);
        assert_eq!(l.admit(A, later, dl), Admission::Now);
        assert_eq!(l.admit(A, later, dl), Admission::Refused);
    }

    #[test]
    fn disabled_admits_everything_and_gc_drops_full_buckets() {
        let off = IpRateLimiter::new(RateConfig {
            rate: 0.0,
            burst: 1,
        });
        for _ in 0..1000 {
            assert_eq!(
                off.admit(A, Instant::now(), Some(Duration::ZERO)),
                Admission::Now
            );
        }
        let l = IpRateLimiter::new(RateConfig {
            rate: 10.0,
            burst: 5,
        });
        let t = Instant::now();
        l.admit(A, t, None);
        l.admit(B, t, None);
        assert_eq!(l.gc(t), 0);
        assert_eq!(l.gc(t + Duration::from_secs(1)), 2);
        assert!(l.is_empty());
    }
}
