//! Deadlines for the injector's hanging fence, as the core computes them (its `time` module is
//! private): `Duration::MAX` means "for ever", and nothing here overflows.

use std::time::{Duration, Instant};

/// The furthest a deadline is ever placed (the core's bound: 100 years).
const FOREVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// `now + limit`, or `None` when that lies past any reachable instant (no deadline).
pub(crate) fn deadline(now: Instant, limit: Duration) -> Option<Instant> {
    if limit >= FOREVER {
        return None;
    }
    now.checked_add(limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extreme_durations_never_overflow() {
        let now = Instant::now();
        assert_eq!(deadline(now, Duration::ZERO), Some(now));
        assert_eq!(deadline(now, Duration::MAX), None);
        assert_eq!(deadline(now, FOREVER), None);
    }
}
