//! Deadlines from durations a caller gives. `Duration::MAX` is the natural "forever": no
//! arithmetic here can overflow, and a deadline past any instant the clock can reach means
//! "no deadline".

use std::time::{Duration, Instant};

/// The furthest a deadline is ever placed: 100 years is unreachable by any process and still
/// representable by every platform's `Instant`.
const FOREVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// `now + limit`, or `None` when that lies past any reachable instant (no deadline).
#[inline]
pub(crate) fn deadline(now: Instant, limit: Duration) -> Option<Instant> {
    if limit >= FOREVER {
        return None;
    }
    now.checked_add(limit)
}

/// `now + limit`, saturating at an instant no process reaches (for stamps that must be an
/// `Instant`, such as an allocation's timeslice expiry).
#[inline]
pub(crate) fn saturating_after(now: Instant, limit: Duration) -> Instant {
    now.checked_add(limit.min(FOREVER))
        .or_else(|| now.checked_add(Duration::from_secs(365 * 24 * 3600)))
        .unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extreme_durations_never_overflow() {
        let now = Instant::now();
        assert_eq!(deadline(now, Duration::ZERO), Some(now));
        assert_eq!(
            deadline(now, Duration::from_nanos(1)),
            now.checked_add(Duration::from_nanos(1))
        );
        assert_eq!(deadline(now, Duration::MAX), None);
        assert_eq!(deadline(now, FOREVER), None);
        assert_eq!(saturating_after(now, Duration::ZERO), now);
        let far = saturating_after(now, Duration::MAX);
        assert!(far > now + Duration::from_secs(50 * 365 * 24 * 3600));
        assert_eq!(
            saturating_after(now, Duration::from_secs(1)),
            now + Duration::from_secs(1)
        );
    }
}
