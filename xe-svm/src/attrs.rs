//! Memory attributes (what xe's madvise sets): where a range prefers to live, who may do
//! atomics on it, and how long a device keeps pages it just received. Kept per GPU VM as a
//! map of non-overlapping intervals; addresses no interval covers have the defaults.

use drm_pagemap_core::PagemapId;
use std::collections::BTreeMap;
use std::time::Duration;

/// Where a range's pages should live when a device faults on them (non-atomic access).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum PreferredLocation {
    /// No preference: the faulting device's own memory (the VM's local pagemap).
    #[default]
    Default,
    /// System memory: the device maps system pages.
    System,
    /// This pagemap (a peer's memory, or the device's own): the device maps its pages. A
    /// pagemap of another owner cannot be reached by the device and counts as system memory.
    Pagemap(PagemapId),
}

/// Who may perform atomic operations on a range.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum AtomicAccess {
    /// Devices do atomics in their own memory: an atomic fault migrates the range into the
    /// faulting device's memory whatever the preferred location.
    #[default]
    Device,
    /// Atomics are reserved for the CPU: an atomic device fault is refused.
    Cpu,
}

/// The attributes of a range.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Attributes {
    /// Where pages go on a non-atomic fault.
    pub preferred: PreferredLocation,
    /// Who may do atomics.
    pub atomic: AtomicAccess,
    /// How long pages a device received stay there before another device or the CPU may take
    /// them (upstream's timeslice). Bounds fault ping-pong between devices: at most one
    /// migration of a range per timeslice. An atomic fault that must retry doubles it
    /// (saturating). Any length is accepted: `Duration::ZERO` lets the pages go at once; one
    /// of [`crate::FOREVER`] or longer (`Duration::MAX`) keeps them on the device until they
    /// are evicted (LRU eviction, [`crate::GpuVm::evict_range`], the engine's
    /// `evict_to_ram`) or the range is freed: other devices' faults wait until then (and
    /// the engine's CPU access honours the timeslice as well).
    pub timeslice: Duration,
}

/// The attributes of one VM, as non-overlapping intervals `start -> (end, attributes)`.
#[derive(Debug, Default)]
pub(crate) struct AttrMap {
    map: BTreeMap<u64, (u64, Attributes)>,
}

/// The attributes at an address and the interval they hold for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct AttrSpan {
    pub start: u64,
    pub end: u64,
    pub attrs: Attributes,
}

impl AttrMap {
    /// Sets `attrs` on `[start, end)` (non-empty), splitting intervals it cuts.
    pub(crate) fn set(&mut self, start: u64, end: u64, attrs: Attributes) {
        if let Some((&ks, &(ke, a))) = self.map.range(..start).next_back()
            && ke > start
        {
            self.map.insert(ks, (start, a));
            if ke > end {
                self.map.insert(end, (ke, a));
            }
        }
        let inside: Vec<u64> = self.map.range(start..end).map(|(&k, _)| k).collect();
        for k in inside {
            if let Some((ke, a)) = self.map.remove(&k)
                && ke > end
            {
                self.map.insert(end, (ke, a));
            }
        }
        self.map.insert(start, (end, attrs));
    }

    /// The attributes at `addr`, with the interval they hold for.
    pub(crate) fn lookup(&self, addr: u64) -> AttrSpan {
        let mut lo = 0;
        if let Some((&ks, &(ke, a))) = self.map.range(..=addr).next_back() {
            if addr < ke {
                return AttrSpan {
                    start: ks,
                    end: ke,
                    attrs: a,
                };
            }
            lo = ke;
        }
        let hi = match addr.checked_add(1) {
            Some(next) => self.map.range(next..).next().map_or(u64::MAX, |(&k, _)| k),
            None => u64::MAX,
        };
        AttrSpan {
            start: lo,
            end: hi,
            attrs: Attributes::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(ms: u64) -> Attributes {
        Attributes {
            timeslice: Duration::from_millis(ms),
            ..Attributes::default()
        }
    }

    #[test]
    fn set_splits_and_lookup_reports_intervals() {
        let mut m = AttrMap::default();
        assert_eq!(m.lookup(5).start, 0);
        assert_eq!(m.lookup(5).end, u64::MAX);
        m.set(100, 200, ts(1));
        assert_eq!(
            m.lookup(150),
            AttrSpan {
                start: 100,
                end: 200,
                attrs: ts(1)
            }
        );
        let gap = m.lookup(50);
        assert_eq!(
            (gap.start, gap.end, gap.attrs),
            (0, 100, Attributes::default())
        );
        let after = m.lookup(200);
        assert_eq!((after.start, after.end), (200, u64::MAX));
        // Cut the middle out.
        m.set(120, 130, ts(2));
        assert_eq!(
            m.lookup(110),
            AttrSpan {
                start: 100,
                end: 120,
                attrs: ts(1)
            }
        );
        assert_eq!(
            m.lookup(125),
            AttrSpan {
                start: 120,
                end: 130,
                attrs: ts(2)
            }
        );
        assert_eq!(
            m.lookup(130),
            AttrSpan {
                start: 130,
                end: 200,
                attrs: ts(1)
            }
        );
        // Cover several intervals and overhang both ends.
        m.set(90, 210, ts(3));
        assert_eq!(
            m.lookup(95),
            AttrSpan {
                start: 90,
                end: 210,
                attrs: ts(3)
            }
        );
        assert_eq!(m.lookup(205).attrs, ts(3));
        assert_eq!(m.lookup(u64::MAX).attrs, Attributes::default());
        // Overlap the end of one interval only.
        m.set(200, 300, ts(4));
        assert_eq!(
            m.lookup(199),
            AttrSpan {
                start: 90,
                end: 200,
                attrs: ts(3)
            }
        );
        assert_eq!(
            m.lookup(250),
            AttrSpan {
                start: 200,
                end: 300,
                attrs: ts(4)
            }
        );
    }
}
