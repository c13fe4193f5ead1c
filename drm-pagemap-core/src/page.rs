//! The packed page-table entry: one `u64` per page, no heap object per page.
//!
//! ```text
//! 63..62 kind: 0 unpopulated, 1 system, 2 device
//! 61     locked (a migration owns the page)
//! system: 47..0  host frame (4 KiB granules)
//! device: 60..53 pagemap id, 52..32 allocation slot, 31..0 page index inside the allocation
//! ```

use crate::types::{HostFrame, PagemapId};

/// Largest allocation slot an entry can name.
pub(crate) const MAX_ALLOC_SLOTS: u32 = 1 << 21;

/// One page's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub(crate) struct PageEntry(pub(crate) u64);

/// What kind of page an entry describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Hole,
    System,
    Device,
}

const KIND_SHIFT: u32 = 62;
const LOCKED: u64 = 1 << 61;
const FRAME_MASK: u64 = (1 << 48) - 1;

impl PageEntry {
    pub(crate) const HOLE: PageEntry = PageEntry(0);

    pub(crate) const fn system(frame: HostFrame) -> PageEntry {
        PageEntry((1 << KIND_SHIFT) | (frame.0 & FRAME_MASK))
    }

    pub(crate) const fn device(pagemap: PagemapId, slot: u32, index: u32) -> PageEntry {
        PageEntry(
            (2 << KIND_SHIFT)
                | ((pagemap.0 as u64) << 53)
                | (((slot & (MAX_ALLOC_SLOTS - 1)) as u64) << 32)
                | index as u64,
        )
    }

    #[inline]
    pub(crate) const fn kind(self) -> Kind {
        match self.0 >> KIND_SHIFT {
            0 => Kind::Hole,
            1 => Kind::System,
            _ => Kind::Device,
        }
    }

    #[inline]
    pub(crate) const fn is_locked(self) -> bool {
        self.0 & LOCKED != 0
    }

    #[inline]
    pub(crate) const fn locked(self) -> PageEntry {
        PageEntry(self.0 | LOCKED)
    }

    #[inline]
    pub(crate) const fn unlocked(self) -> PageEntry {
        PageEntry(self.0 & !LOCKED)
    }

    #[inline]
    pub(crate) const fn frame(self) -> HostFrame {
        HostFrame(self.0 & FRAME_MASK)
    }

    #[inline]
    pub(crate) const fn pagemap(self) -> PagemapId {
        PagemapId((self.0 >> 53) as u8)
    }

    #[inline]
    pub(crate) const fn slot(self) -> u32 {
        ((self.0 >> 32) as u32) & (MAX_ALLOC_SLOTS - 1)
    }

    #[inline]
    pub(crate) const fn index(self) -> u32 {
        self.0 as u32
    }
}

/// What a set of entries holds, from the OR of all of them (one branch-free pass the
/// compiler vectorises, instead of a search that stops early per page).
#[derive(Clone, Copy)]
pub(crate) struct Summary(u64);

impl Summary {
    /// The summary of no entries (also of any number of holes).
    pub(crate) const NONE: Summary = Summary(0);

    pub(crate) fn of(entries: &[PageEntry]) -> Summary {
        Summary(entries.iter().fold(0, |a, e| a | e.0))
    }

    /// The summary of both sets.
    #[inline]
    pub(crate) const fn union(self, other: Summary) -> Summary {
        Summary(self.0 | other.0)
    }

    /// Some entry is locked.
    pub(crate) const fn any_locked(self) -> bool {
        self.0 & LOCKED != 0
    }

    /// Some entry is a device page (the only kind with the top bit set).
    pub(crate) const fn any_device(self) -> bool {
        self.0 >> 63 != 0
    }
}

/// The length of the prefix of `entries` whose bits under `mask` equal `class`.
#[inline]
pub(crate) fn same_prefix(entries: &[PageEntry], mask: u64, class: u64) -> usize {
    let mut chunks = entries.chunks_exact(16);
    let mut done = 0;
    for c in &mut chunks {
        // Branch-free over the chunk: vectorised.
        if c.iter().fold(0, |a, e| a | ((e.0 & mask) ^ class)) != 0 {
            break;
        }
        done += 16;
    }
    done + entries[done..]
        .iter()
        .position(|e| e.0 & mask != class)
        .unwrap_or(entries.len() - done)
}

/// Reverse-map entry of an allocation page: which range slot and page index uses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RmapEntry(pub(crate) u64);

impl RmapEntry {
    pub(crate) const EMPTY: RmapEntry = RmapEntry(u64::MAX);

    pub(crate) const fn new(range_slot: u32, page: u32) -> RmapEntry {
        RmapEntry(((range_slot as u64) << 32) | page as u64)
    }

    pub(crate) const fn is_empty(self) -> bool {
        self.0 == u64::MAX
    }

    pub(crate) const fn range_slot(self) -> u32 {
        (self.0 >> 32) as u32
    }

    pub(crate) const fn page(self) -> u32 {
        self.0 as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip() {
        let s = PageEntry::system(HostFrame(0xABCDE));
        assert_eq!(s.kind(), Kind::System);
        assert_eq!(s.frame(), HostFrame(0xABCDE));
        assert!(!s.is_locked());
        assert!(s.locked().is_locked());
        assert_eq!(s.locked().unlocked(), s);
        let d = PageEntry::device(PagemapId(200), MAX_ALLOC_SLOTS - 1, u32::MAX);
        assert_eq!(d.kind(), Kind::Device);
        assert_eq!(d.pagemap(), PagemapId(200));
        assert_eq!(d.slot(), MAX_ALLOC_SLOTS - 1);
        assert_eq!(d.index(), u32::MAX);
        assert_eq!(d.locked().pagemap(), PagemapId(200));
        assert_eq!(d.locked().slot(), MAX_ALLOC_SLOTS - 1);
        assert_eq!(PageEntry::HOLE.kind(), Kind::Hole);
        let r = RmapEntry::new(7, 9);
        assert_eq!((r.range_slot(), r.page()), (7, 9));
        assert!(RmapEntry::EMPTY.is_empty());
    }

    #[test]
    fn summaries_and_prefixes() {
        let s = PageEntry::system(HostFrame(3));
        let d = PageEntry::device(PagemapId(4), 1, 2);
        let v = vec![s; 40];
        assert!(!Summary::of(&v).any_device() && !Summary::of(&v).any_locked());
        let mut w = v.clone();
        w[33] = d.locked();
        assert!(Summary::of(&w).any_device() && Summary::of(&w).any_locked());
        let kind = 0b11 << 62;
        for n in [0, 1, 15, 16, 17, 33, 39] {
            let mut w = v.clone();
            w[n] = d;
            assert_eq!(same_prefix(&w, kind, s.0 & kind), n);
        }
        assert_eq!(same_prefix(&v, kind, s.0 & kind), 40);
        assert_eq!(same_prefix(&[], kind, 0), 0);
    }
}
