//! Home extents of a frame pool ([`HostMemory::reserve_home`]): runs of frames taken out of
//! the pool's allocator for one range, handed out only to the page that asks for its own
//! frame, and tracked one bit per page so that a frame is never handed out twice (a frame
//! kept aside for a late copy while its page asks again gets another frame).
//!
//! [`HostMemory::reserve_home`]: drm_pagemap_core::HostMemory::reserve_home

use drm_pagemap_core::{ExtentAllocator, HostFrame, PageSize};
use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

#[derive(Debug)]
struct Home {
    pages: u64,
    /// Granules per page.
    page: u64,
    /// One bit per page: its frame is handed out.
    used: Vec<u64>,
    held: u64,
    /// Given back while frames were held: the extent returns to the pool with the last one.
    released: bool,
}

impl Home {
    /// The page index of `f` in this extent starting at `first`, if `f` is one of its page
    /// frames of size `page`.
    fn index(&self, first: u64, f: u64, page: u64) -> Option<u64> {
        let off = f.checked_sub(first)?;
        (page == self.page && off % page == 0 && off / page < self.pages).then_some(off / page)
    }

    fn bit(&self, i: u64) -> bool {
        self.used[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    fn set(&mut self, i: u64, on: bool) {
        let w = &mut self.used[(i / 64) as usize];
        if on {
            *w |= 1 << (i % 64);
        } else {
            *w &= !(1 << (i % 64));
        }
    }
}

/// The home extents of one pool, by first frame.
#[derive(Debug, Default)]
pub(crate) struct Homes {
    map: Mutex<BTreeMap<u64, Home>>,
}

/// The locked table (one lock per pool call, never per page).
pub(crate) struct Locked<'a>(MutexGuard<'a, BTreeMap<u64, Home>>);

impl Homes {
    pub(crate) fn lock(&self) -> Locked<'_> {
        Locked(self.map.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl Locked<'_> {
    fn find(&mut self, f: u64) -> Option<(u64, &mut Home)> {
        self.0
            .range_mut(..=f)
            .next_back()
            .map(|(&first, h)| (first, h))
    }

    /// Takes an extent of `pages` pages of `ps` from `pool`; `None` without room.
    pub(crate) fn reserve(
        &mut self,
        pool: &ExtentAllocator,
        ps: PageSize,
        pages: u64,
    ) -> Option<HostFrame> {
        let page = ps.granules();
        let granules = pages.checked_mul(page).filter(|&g| g > 0)?;
        let mut used = Vec::new();
        used.try_reserve_exact(pages.div_ceil(64) as usize).ok()?;
        used.resize(pages.div_ceil(64) as usize, 0);
        let first = pool.alloc(granules, page)?;
        self.0.insert(
            first,
            Home {
                pages,
                page,
                used,
                held: 0,
                released: false,
            },
        );
        Some(HostFrame(first))
    }

    /// Gives an extent back to `pool` (once its last frame is freed, if some are held).
    pub(crate) fn release(&mut self, pool: &ExtentAllocator, first: HostFrame) {
        let Some(h) = self.0.get_mut(&first.0) else {
            return;
        };
        if h.held == 0 {
            let granules = h.pages * h.page;
            self.0.remove(&first.0);
            pool.free(first.0, granules);
        } else {
            h.released = true;
        }
    }

    /// Hands out `f` (a page frame of `ps`) if it is a free frame of a live extent.
    pub(crate) fn claim(&mut self, f: HostFrame, ps: PageSize) -> bool {
        let Some((first, h)) = self.find(f.0) else {
            return false;
        };
        match h.index(first, f.0, ps.granules()) {
            Some(i) if !h.released && !h.bit(i) => {
                h.set(i, true);
                h.held += 1;
                true
            }
            _ => false,
        }
    }

    /// Takes back `f` if it is a handed-out frame of an extent; `false` for a pool frame.
    pub(crate) fn unclaim(&mut self, f: HostFrame, ps: PageSize) -> bool {
        let Some((first, h)) = self.find(f.0) else {
            return false;
        };
        match h.index(first, f.0, ps.granules()) {
            Some(i) if h.bit(i) => {
                h.set(i, false);
                h.held -= 1;
                true
            }
            _ => false,
        }
    }

    /// Returns to `pool` the extents given back whose last frame was just freed.
    pub(crate) fn sweep(&mut self, pool: &ExtentAllocator) {
        while let Some((&first, h)) = self.0.iter().find(|(_, h)| h.released && h.held == 0) {
            let granules = h.pages * h.page;
            self.0.remove(&first);
            pool.free(first, granules);
        }
    }
}
