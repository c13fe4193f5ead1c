//! Home extents of a frame pool ([`HostMemory::reserve_home`]): runs of frames taken out of
//! the pool's allocator for one range, handed out only to the page that asks for its own
//! frame, and tracked one bit per page so that a frame is never handed out twice (a frame
//! kept aside for a late copy while its page asks again gets another frame).
//!
//! A frame pool over an [`ExtentAllocator`] implements the placement calls of
//! [`HostMemory`] with [`HomeExtents`]: [`HomeExtents::reserve`] / [`HomeExtents::release`]
//! for `reserve_home` / `release_home`, [`HomeExtents::alloc_at`] for `alloc_frames_at` and
//! [`HomeExtents::free`] in `free_frames` (the simulated backend's memory and the CUDA
//! backend's pinned memory do).
//!
//! [`HostMemory::reserve_home`]: crate::HostMemory::reserve_home
//! [`HostMemory`]: crate::HostMemory

use crate::extent::ExtentAllocator;
use crate::types::{HostFrame, PageSize};
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

/// The home extents of one frame pool, by first frame (see the module docs). One lock per
/// pool call, never per page.
#[derive(Debug, Default)]
pub struct HomeExtents {
    map: Mutex<BTreeMap<u64, Home>>,
}

/// The locked table.
struct Locked<'a>(MutexGuard<'a, BTreeMap<u64, Home>>);

impl HomeExtents {
    fn lock(&self) -> Locked<'_> {
        Locked(self.map.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// `reserve_home`: takes an extent of `pages` pages of `page_size` out of `pool`;
    /// `None` without room (or for zero pages).
    pub fn reserve(
        &self,
        pool: &ExtentAllocator,
        page_size: PageSize,
        pages: u64,
    ) -> Option<HostFrame> {
        self.lock().reserve(pool, page_size, pages)
    }

    /// `release_home`: gives the extent at `first` back to `pool`, at once or, while some of
    /// its frames are handed out, with the last of them.
    pub fn release(&self, pool: &ExtentAllocator, first: HostFrame) {
        self.lock().release(pool, first)
    }

    /// `alloc_frames_at`: each entry of `frames` names the frame wanted; a free frame of a
    /// live extent is handed out (then `claimed` runs for it: a pool that backs its memory
    /// lazily backs it there), every other entry gets a frame from `rest` (called once, with
    /// the entries to fill). All or nothing: when `claimed` or `rest` fails, the frames
    /// handed out go back to their extents and the error is returned.
    pub fn alloc_at<E>(
        &self,
        page_size: PageSize,
        frames: &mut [HostFrame],
        mut claimed: impl FnMut(HostFrame) -> Result<(), E>,
        rest: impl FnOnce(&mut [HostFrame]) -> Result<(), E>,
    ) -> Result<(), E> {
        /// An entry still to be given a pool frame.
        const ANY: HostFrame = HostFrame(u64::MAX);
        let mut homes = self.lock();
        let mut need = 0;
        let mut failed = None;
        for f in frames.iter_mut() {
            if failed.is_none() && homes.claim(*f, page_size) {
                if let Err(e) = claimed(*f) {
                    homes.unclaim(*f, page_size);
                    *f = ANY;
                    failed = Some(e);
                }
            } else {
                *f = ANY;
                need += 1;
            }
        }
        let filled = match failed {
            Some(e) => Err(e),
            None if need == 0 => return Ok(()),
            None => {
                let mut more = vec![ANY; need];
                rest(&mut more).map(|()| more)
            }
        };
        match filled {
            Ok(more) => {
                for (f, m) in frames.iter_mut().filter(|f| **f == ANY).zip(more) {
                    *f = m;
                }
                Ok(())
            }
            Err(e) => {
                // All or nothing: the frames handed out above go back.
                for &f in frames.iter().filter(|&&f| f != ANY) {
                    homes.unclaim(f, page_size);
                }
                Err(e)
            }
        }
    }

    /// `free_frames`: frames of extents go back to them (an extent already given back
    /// returns to `pool` with its last frame); the others go back to `pool`.
    pub fn free(&self, pool: &ExtentAllocator, frames: &[HostFrame], page_size: PageSize) {
        let mut homes = self.lock();
        let mut home = [false; 64];
        let mut any_home = false;
        for chunk in frames.chunks(64) {
            for (h, &f) in home.iter_mut().zip(chunk) {
                *h = homes.unclaim(f, page_size);
                any_home |= *h;
            }
            pool.free_page_iter(
                chunk.iter().zip(home).filter(|(_, h)| !h).map(|(f, _)| f.0),
                page_size.granules(),
            );
        }
        if any_home {
            homes.sweep(pool);
        }
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
    fn reserve(&mut self, pool: &ExtentAllocator, ps: PageSize, pages: u64) -> Option<HostFrame> {
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
    fn release(&mut self, pool: &ExtentAllocator, first: HostFrame) {
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
    fn claim(&mut self, f: HostFrame, ps: PageSize) -> bool {
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
    fn unclaim(&mut self, f: HostFrame, ps: PageSize) -> bool {
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
    fn sweep(&mut self, pool: &ExtentAllocator) {
        while let Some((&first, h)) = self.0.iter().find(|(_, h)| h.released && h.held == 0) {
            let granules = h.pages * h.page;
            self.0.remove(&first);
            pool.free(first, granules);
        }
    }
}
