//! Process-wide counters (read by the control entry's `OP_READ_COUNTERS`).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::control::SoftCounters;

/// One counter.
#[derive(Default)]
pub(crate) struct Counter(AtomicU64);

impl Counter {
    const fn new() -> Self {
        Counter(AtomicU64::new(0))
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn sub(&self, n: u64) {
        // Saturating: an OP_RESET between a create and its destroy must not wrap.
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(n))
            });
    }
    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
    fn clear(&self) {
        self.0.store(0, Ordering::Relaxed);
    }
}

/// All counters.
pub(crate) struct Counters {
    pub strict_violations: Counter,
    pub appends: Counter,
    pub submissions: Counter,
    pub copies: Counter,
    pub bytes_copied: Counter,
    pub fills: Counter,
    pub live_allocations: Counter,
    pub live_device_bytes: Counter,
    pub live_events: Counter,
    pub live_event_pools: Counter,
    pub live_command_lists: Counter,
    pub live_queues: Counter,
    pub events_host_reset: Counter,
}

/// The process's counters.
pub(crate) static COUNTERS: Counters = Counters {
    strict_violations: Counter::new(),
    appends: Counter::new(),
    submissions: Counter::new(),
    copies: Counter::new(),
    bytes_copied: Counter::new(),
    fills: Counter::new(),
    live_allocations: Counter::new(),
    live_device_bytes: Counter::new(),
    live_events: Counter::new(),
    live_event_pools: Counter::new(),
    live_command_lists: Counter::new(),
    live_queues: Counter::new(),
    events_host_reset: Counter::new(),
};

impl Counters {
    /// A snapshot.
    pub fn read(&self) -> SoftCounters {
        SoftCounters {
            strict_violations: self.strict_violations.get(),
            appends: self.appends.get(),
            submissions: self.submissions.get(),
            copies: self.copies.get(),
            bytes_copied: self.bytes_copied.get(),
            fills: self.fills.get(),
            live_allocations: self.live_allocations.get(),
            live_device_bytes: self.live_device_bytes.get(),
            live_events: self.live_events.get(),
            live_event_pools: self.live_event_pools.get(),
            live_command_lists: self.live_command_lists.get(),
            live_queues: self.live_queues.get(),
            events_host_reset: self.events_host_reset.get(),
        }
    }

    /// Clears the event counters (the `live_*` gauges describe objects that still exist and are
    /// kept).
    pub fn reset(&self) {
        for c in [
            &self.strict_violations,
            &self.appends,
            &self.submissions,
            &self.copies,
            &self.bytes_copied,
            &self.fills,
            &self.events_host_reset,
        ] {
            c.clear();
        }
    }
}
