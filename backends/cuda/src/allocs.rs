//! Which pages each live allocation of a pagemap holds, by cookie.
//!
//! Allocations are mostly one run of touching pages: such an allocation is kept as its first
//! page and page count (no list on the heap); scattered ones keep their list. Entries live in
//! a slab, so a release (thousands at a time when a migration commits) touches one slot, not
//! a hash table's buckets and a list elsewhere. A cookie is the slot and the slot's
//! generation: never the same twice for one pagemap, and a stale cookie finds nothing. No
//! driver calls here.

use drm_pagemap_core::Pfn;

/// The pages of one allocation (page starts in granules).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Pages {
    /// `n` touching pages from `first`, each `granules` long.
    Run { first: u64, n: u32, granules: u32 },
    /// Any pages.
    List(Box<[u64]>),
}

impl Pages {
    fn len(&self) -> usize {
        match self {
            Pages::Run { n, .. } => *n as usize,
            Pages::List(l) => l.len(),
        }
    }

    /// The page starts, in allocation order.
    fn starts(&self) -> impl Iterator<Item = u64> + '_ {
        let (run, list) = match self {
            Pages::Run { first, n, granules } => (
                Some((0..*n as u64).map(move |k| first + k * *granules as u64)),
                None,
            ),
            Pages::List(l) => (None, Some(l.iter().copied())),
        };
        run.into_iter().flatten().chain(list.into_iter().flatten())
    }
}

/// One slot: its generation (bumped when it is reused) and the allocation in it, if any.
#[derive(Debug, Default)]
struct Slot {
    generation: u32,
    pages: Option<Pages>,
}

/// The live allocations of one pagemap.
#[derive(Debug, Default)]
pub(crate) struct AllocTable {
    slots: Vec<Slot>,
    free: Vec<u32>,
}

fn cookie(slot: u32, generation: u32) -> u64 {
    ((generation as u64) << 32) | slot as u64
}

impl AllocTable {
    /// Records an allocation of the pages at `starts` (granules, `granules` each); returns
    /// its cookie.
    pub(crate) fn insert(&mut self, starts: &[u64], granules: u64) -> u64 {
        let touching = starts.windows(2).all(|w| w[1] == w[0] + granules);
        let pages = match starts.first() {
            Some(&first) if touching && granules <= u32::MAX as u64 => Pages::Run {
                first,
                n: starts.len() as u32,
                granules: granules as u32,
            },
            _ => Pages::List(starts.into()),
        };
        self.insert_pages(pages)
    }

    /// Records an allocation of `n` touching pages of `granules` each from granule `first`
    /// (no list of starts); returns its cookie.
    pub(crate) fn insert_run(&mut self, first: u64, n: usize, granules: u64) -> u64 {
        let pages = match (u32::try_from(n), u32::try_from(granules)) {
            (Ok(n), Ok(granules)) => Pages::Run { first, n, granules },
            _ => Pages::List((0..n as u64).map(|i| first + i * granules).collect()),
        };
        self.insert_pages(pages)
    }

    fn insert_pages(&mut self, pages: Pages) -> u64 {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(Slot::default());
                (self.slots.len() - 1) as u32
            }
        };
        let e = &mut self.slots[slot as usize];
        e.pages = Some(pages);
        cookie(slot, e.generation)
    }

    fn slot(&self, cookie: u64) -> Option<&Pages> {
        let e = self.slots.get((cookie & u32::MAX as u64) as usize)?;
        (e.generation == (cookie >> 32) as u32)
            .then_some(e.pages.as_ref())
            .flatten()
    }

    /// The number of pages of allocation `cookie`, if it is live.
    pub(crate) fn len(&self, cookie: u64) -> Option<usize> {
        self.slot(cookie).map(Pages::len)
    }

    /// Writes the pages of allocation `cookie` to `out` (which holds exactly as many
    /// entries); false if it is not live or the length differs.
    pub(crate) fn pfns_into(&self, cookie: u64, out: &mut [Pfn]) -> bool {
        match self.slot(cookie) {
            Some(p) if p.len() == out.len() => {
                for (o, s) in out.iter_mut().zip(p.starts()) {
                    *o = Pfn(s as u32);
                }
                true
            }
            _ => false,
        }
    }

    /// Forgets allocation `cookie`, appending its page starts to `out`; false if it was not
    /// live.
    pub(crate) fn remove_into(&mut self, cookie: u64, out: &mut Vec<u64>) -> bool {
        let slot = (cookie & u32::MAX as u64) as u32;
        let Some(e) = self.slots.get_mut(slot as usize) else {
            return false;
        };
        if e.generation != (cookie >> 32) as u32 {
            return false;
        }
        let Some(pages) = e.pages.take() else {
            return false;
        };
        e.generation = e.generation.wrapping_add(1);
        self.free.push(slot);
        out.extend(pages.starts());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_and_lists_round_trip_in_allocation_order() {
        let mut t = AllocTable::default();
        let run = t.insert(&[32, 48, 64], 16);
        let list = t.insert(&[7, 3, 9], 1);
        assert_eq!(t.len(run), Some(3));
        let mut out = [Pfn(0); 3];
        assert!(t.pfns_into(run, &mut out));
        assert_eq!(out, [Pfn(32), Pfn(48), Pfn(64)]);
        assert!(t.pfns_into(list, &mut out));
        assert_eq!(out, [Pfn(7), Pfn(3), Pfn(9)]);
        assert!(!t.pfns_into(list, &mut [Pfn(0); 2]), "wrong length");
        let mut freed = Vec::new();
        assert!(t.remove_into(run, &mut freed));
        assert!(t.remove_into(list, &mut freed));
        assert_eq!(freed, vec![32, 48, 64, 7, 3, 9]);
    }

    #[test]
    fn a_run_recorded_without_a_list_reads_as_its_pages() {
        let mut t = AllocTable::default();
        let run = t.insert_run(32, 3, 16);
        let same = t.insert(&[32, 48, 64], 16);
        assert_eq!(t.slot(run), t.slot(same));
        let mut out = [Pfn(0); 3];
        assert!(t.pfns_into(run, &mut out));
        assert_eq!(out, [Pfn(32), Pfn(48), Pfn(64)]);
        let mut freed = Vec::new();
        assert!(t.remove_into(run, &mut freed));
        assert_eq!(freed, vec![32, 48, 64]);
    }

    #[test]
    fn a_cookie_is_never_reused_and_a_stale_one_finds_nothing() {
        let mut t = AllocTable::default();
        let a = t.insert(&[0], 1);
        let mut freed = Vec::new();
        assert!(t.remove_into(a, &mut freed));
        assert!(!t.remove_into(a, &mut freed), "released once");
        let b = t.insert(&[5], 1);
        assert_ne!(a, b, "the slot is reused under a new generation");
        assert_eq!(t.len(a), None);
        assert!(!t.pfns_into(a, &mut [Pfn(0); 1]));
        assert_eq!(t.len(b), Some(1));
        assert!(!t.remove_into(u64::MAX, &mut freed), "unknown slot");
        assert_eq!(freed, vec![0]);
    }
}
