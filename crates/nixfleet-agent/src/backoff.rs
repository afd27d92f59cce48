//! When to check in next. Pure: the random draw is an argument.

use std::time::Duration;

/// The first retry after an error comes after about this long.
pub const BACKOFF_BASE: Duration = Duration::from_secs(2);

/// Delay before retry number `failures` (1 = the first failure): exponential from
/// [`BACKOFF_BASE`], capped at `cap`, with "equal jitter" (between half and all of it) so
/// that agents do not come back in lock-step after a control-plane restart. `random` is
/// uniform in [0, 1).
pub fn retry_delay(failures: u32, cap: Duration, random: f64) -> Duration {
    let exponent = failures.saturating_sub(1).min(20);
    let full = BACKOFF_BASE.saturating_mul(1 << exponent).min(cap);
    let half = full / 2;
    half + half.mul_f64(random.clamp(0.0, 1.0))
}

/// Delay before the next check-in after a successful one: the control plane's
/// `nextCheckinSecs` (at least 1 s, at most `cap`), give or take 10 %.
pub fn checkin_delay(next_checkin_secs: u32, cap: Duration, random: f64) -> Duration {
    let base = Duration::from_secs(u64::from(next_checkin_secs.max(1))).min(cap);
    let spread = base / 5;
    base - spread / 2 + spread.mul_f64(random.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP: Duration = Duration::from_secs(60);

    #[test]
    fn retries_start_at_a_few_seconds_and_grow_to_the_cap() {
        assert!(retry_delay(1, CAP, 0.0) >= Duration::from_secs(1));
        assert!(retry_delay(1, CAP, 0.999) <= Duration::from_secs(2));
        assert!(retry_delay(3, CAP, 0.999) <= Duration::from_secs(8));
        assert!(retry_delay(3, CAP, 0.0) >= Duration::from_secs(4));
        for failures in [10, 100, u32::MAX] {
            assert!(retry_delay(failures, CAP, 0.999) <= CAP);
            assert!(retry_delay(failures, CAP, 0.0) >= CAP / 2);
        }
    }

    #[test]
    fn checkins_honour_the_control_plane_with_jitter_and_the_cap() {
        let d = checkin_delay(30, CAP, 0.5);
        assert_eq!(d, Duration::from_secs(30));
        assert!(checkin_delay(30, CAP, 0.0) >= Duration::from_secs(27));
        assert!(checkin_delay(30, CAP, 0.999) <= Duration::from_secs(33));
        assert!(checkin_delay(3600, CAP, 0.999) <= CAP + CAP / 10);
        assert!(checkin_delay(0, CAP, 0.0) > Duration::ZERO);
    }
}
