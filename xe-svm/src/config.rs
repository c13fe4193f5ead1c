//! How an SVM context behaves ([`SvmConfig`]), and the user durations cut to what the engine
//! takes ([`FOREVER`]).

use std::time::Duration;

/// How an SVM context behaves.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SvmConfig {
    /// Most bytes of device memory each pagemap may hold at once; `None`: the pagemap's own
    /// capacity. When a fault needs more, least-recently-used allocations are evicted.
    pub capacity: Option<u64>,
    /// Longest wait for any fence (copies, pre-migrate fences); `None`: no limit. Any length
    /// is accepted: `Some(Duration::ZERO)` times out every wait for a fence that has not
    /// signalled yet (the fault fails with a typed error or is served from system memory,
    /// no data is lost), and a timeout of [`FOREVER`] or longer (`Duration::MAX`) is the same
    /// as `None`.
    pub fence_timeout: Option<Duration>,
}

/// About a century: later than any instant a process reaches. User durations at least this
/// long mean "no limit" — a fence timeout this long is no timeout, a timeslice this long keeps
/// the pages until they are evicted — and are cut to it before they meet an `Instant`, so no
/// deadline arithmetic can overflow (`Duration::MAX` is the natural "forever").
pub const FOREVER: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// A fence timeout as waits take it: `None` (no deadline) for one of [`FOREVER`] or longer.
pub(crate) fn fence_limit(timeout: Option<Duration>) -> Option<Duration> {
    timeout.filter(|t| *t < FOREVER)
}

/// A timeslice as the engine takes it: at most [`FOREVER`].
pub(crate) fn timeslice_limit(timeslice: Duration) -> Duration {
    timeslice.min(FOREVER)
}
