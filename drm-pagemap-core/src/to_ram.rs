//! Back to system memory: eviction of an allocation and the CPU-fault path. Always executed
//! by the device that owns the pages (`copy_to_ram` of the allocation's pagemap), never with a
//! pre-migrate fence. All pages of one pass or none (the transaction of [`crate::txn`]).

use crate::alloc::{AllocId, AllocState, Release, release_all};
use crate::backend::CopyRequest;
use crate::error::{BusyReason, Error, Result};
use crate::mm::AddressSpace;
use crate::page::{PageEntry, RmapEntry};
use crate::scratch::{Scratch, ScratchFor};
use crate::stats::{Link, Location};
use crate::txn::{Locked, Txn};
use crate::types::{CopyOp, Direction, HostFrame, Pfn, VaRange};
use std::time::Instant;

/// What an eviction did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EvictReport {
    /// Pages copied back to system memory.
    pub pages: usize,
    /// Whether the allocation was released (it always is on success).
    pub released: bool,
}

/// Which pages of an allocation one pass moves.
#[derive(Clone, Copy)]
struct Window {
    range_slot: u32,
    first: u32,
    end: u32,
}

/// One pass's outcome.
struct Pass {
    moved: usize,
    busy: usize,
    gone: bool,
}

const EVICT_TRIES: usize = 3;

impl AddressSpace {
    /// Moves every page of `alloc` back to system memory and releases it (upstream
    /// `drm_pagemap_evict_to_ram`). Pages locked by a running migration are waited for; after
    /// three passes that leave pages behind: Busy. If a concurrent migration takes its last
    /// pages meanwhile (releasing it), the eviction succeeded. The allocation's timeslice
    /// does not hold an eviction back (memory pressure wins, as upstream): only CPU access
    /// waits for it.
    pub fn evict_to_ram(&self, alloc: AllocId) -> Result<EvictReport> {
        let span = tracing::debug_span!(
            target: "drm_pagemap",
            "evict",
            alloc = %alloc,
            pages = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        let _entered = span.enter();
        let r = self.evict_inner(alloc);
        match &r {
            Ok(rep) => {
                self.stats.evicted(rep.pages);
                span.record("pages", rep.pages);
                span.record("outcome", "evicted");
            }
            Err(e) => {
                self.stats.failed(e);
                span.record("outcome", "failed");
                tracing::debug!(target: "drm_pagemap", error = %e, "eviction failed");
            }
        }
        r
    }

    fn evict_inner(&self, alloc: AllocId) -> Result<EvictReport> {
        self.reap_deferred();
        let mut moved = 0;
        for attempt in 0..EVICT_TRIES {
            let pass = match self.to_ram_pass(alloc, None, VaRange::new(0, 0)) {
                // It existed when the first pass ran: a concurrent migration took its last
                // pages and released it. Emptied and released is what was asked (upstream
                // returns 0 once the allocation is detached).
                Err(Error::NoSuchAllocation { .. }) if attempt > 0 => {
                    return Ok(EvictReport {
                        pages: moved,
                        released: true,
                    });
                }
                other => other?,
            };
            moved += pass.moved;
            if pass.gone {
                return Ok(EvictReport {
                    pages: moved,
                    released: true,
                });
            }
            if pass.busy > 0 {
                drop(self.wait_unlocked(self.lock()));
            }
        }
        let (pagemap, range) = {
            let st = self.lock();
            let Some(rec) = st.allocs.get(alloc) else {
                // Gone after all: a concurrent migration took its last pages.
                return Ok(EvictReport {
                    pages: moved,
                    released: true,
                });
            };
            // The span of virtual addresses its remaining pages occupy.
            let mut span: Option<(u64, u64)> = None;
            for r in rec.rmap.iter().filter(|r| !r.is_empty()) {
                let range = st.range(r.range_slot());
                let ps = range.page_size.bytes();
                let va = range.va.start + r.page() as u64 * ps;
                span = Some(match span {
                    None => (va, va + ps),
                    Some((a, b)) => (a.min(va), b.max(va + ps)),
                });
            }
            let (a, b) = span.unwrap_or((0, 0));
            (rec.pagemap, VaRange::new(a, b - a))
        };
        Err(Error::Busy {
            range,
            pagemap,
            device: self.device_of(pagemap).unwrap_or(crate::DeviceId(u32::MAX)),
            reason: BusyReason::EvictIncomplete,
        })
    }

    /// The CPU touched `fault_va`, a page of `alloc`: move that allocation's pages inside the
    /// allocation-sized window around it (clamped to the range) back to system memory.
    pub(crate) fn cpu_fault(&self, alloc: AllocId, fault_va: u64, access: VaRange) -> Result<()> {
        let _span = tracing::debug_span!(
            target: "drm_pagemap",
            "cpu_fault",
            range = %access,
            fault_va,
            alloc = %alloc,
        )
        .entered();
        let window = {
            let st = self.lock();
            let Some(rec) = st.allocs.get(alloc) else {
                return Ok(()); // Released meanwhile: the caller re-scans.
            };
            let span = st.locate(VaRange::new(fault_va, 1), false)?;
            let range = st.range(span.slot);
            let ps = range.page_size.bytes();
            let size = rec.pfns.len() as u64 * ps;
            let start = (fault_va - fault_va % size).max(range.va.start);
            let end = (fault_va - fault_va % size)
                .saturating_add(size)
                .min(range.va.end());
            Window {
                range_slot: span.slot,
                first: ((start - range.va.start) / ps) as u32,
                end: ((end - range.va.start) / ps) as u32,
            }
        };
        match self.to_ram_pass(alloc, Some(window), access) {
            // Another thread's CPU fault, migration or eviction took the allocation's last
            // pages since the caller looked: its pages are elsewhere now, so the caller
            // re-scans (the access never named this allocation).
            Err(Error::NoSuchAllocation { alloc: gone }) if gone == alloc => Ok(()),
            Ok(pass) => {
                if pass.moved > 0 {
                    self.stats.cpu_fault(pass.moved);
                }
                tracing::trace!(target: "drm_pagemap", pages = pass.moved, "cpu fault done");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn to_ram_pass(&self, alloc: AllocId, window: Option<Window>, range: VaRange) -> Result<Pass> {
        let mut sc = self.take_scratch(ScratchFor::Alloc(alloc));
        let r = self.to_ram_pass_with(alloc, window, range, &mut sc);
        self.put_scratch(sc);
        r
    }

    /// [`AddressSpace::to_ram_pass`] in the buffers `sc` (see [`Scratch`]): collects and
    /// locks the pages, then copies them back as a transaction ([`crate::txn`]): whatever
    /// happens after the pages are locked (an error, a timeout, a panic of the backend), they
    /// are committed or unlocked unchanged, and the new frames a copy may still write are
    /// parked until its fence signals.
    fn to_ram_pass_with(
        &self,
        alloc: AllocId,
        window: Option<Window>,
        range: VaRange,
        sc: &mut Scratch,
    ) -> Result<Pass> {
        let Scratch {
            picked,
            pages,
            maps,
            copies,
            new_frames,
            wishes,
            ..
        } = sc;
        // Collect and lock the pages of `alloc` (inside `window`).
        let (pm_id, ps) = {
            let mut st = self.lock();
            let Some(rec) = st.allocs.get(alloc) else {
                return Err(Error::NoSuchAllocation { alloc });
            };
            if rec.state == AllocState::Reserved || (rec.state == AllocState::Live && rec.live == 0)
            {
                let unused = rec.state == AllocState::Reserved;
                let rel = st.allocs.remove(alloc.slot);
                drop(st);
                if unused {
                    crate::alloc::release_unused(rel);
                } else {
                    release_all(rel.into_iter().collect());
                }
                return Ok(Pass {
                    moved: 0,
                    busy: 0,
                    gone: true,
                });
            }
            if rec.state == AllocState::Migrating {
                return Ok(Pass {
                    moved: 0,
                    busy: rec.pfns.len(),
                    gone: false,
                });
            }
            let (pm_id, ps) = (rec.pagemap, rec.page_size);
            picked.clear();
            pages.clear();
            // Room for every page before the walk (no growth under the lock, and no more than
            // the allocation's pages, so kept buffers stay kept: see `crate::scratch`).
            picked.reserve_exact(rec.rmap.len());
            pages.reserve_exact(rec.rmap.len());
            let mut busy = 0;
            for (j, r) in rec.rmap.iter().enumerate() {
                if r.is_empty() {
                    continue;
                }
                if let Some(w) = window
                    && (r.range_slot() != w.range_slot || r.page() < w.first || r.page() >= w.end)
                {
                    continue;
                }
                if st
                    .range(r.range_slot())
                    .pages
                    .get(r.page() as usize)
                    .is_locked()
                {
                    busy += 1;
                    continue;
                }
                picked.push((j as u32, *r));
                pages.push(rec.pfns[j]);
            }
            st.set_pages_locked(picked, true);
            // Pages of ranges with a home extent ask for their own frames (any frame for the
            // others: a wish outside every extent).
            wishes.clear();
            if picked
                .iter()
                .any(|(_, r)| st.range(r.range_slot()).home.is_some())
            {
                wishes.extend(picked.iter().map(|(_, r)| {
                    st.range(r.range_slot())
                        .home_of(r.page() as usize)
                        .unwrap_or(HostFrame(u64::MAX))
                }));
            }
            if picked.is_empty() {
                return Ok(Pass {
                    moved: 0,
                    busy,
                    gone: false,
                });
            }
            (pm_id, ps)
        };
        let picked: &[(u32, RmapEntry)] = picked;
        let pages: &[Pfn] = pages;
        let n = picked.len();
        // From here the picked pages carry their lock bit: the transaction commits or
        // unlocks them, also when the backend panics.
        let txn = Txn::new(
            self,
            range,
            pm_id,
            Locked::Pages(picked),
            ps,
            maps,
            copies,
            new_frames,
            self.to_ram_fence_timeout(),
        );
        txn.run(|txn| {
            let pm = self.pagemap_for(range, pm_id)?;
            let dev = pm.device();
            // Destination frames, mapped for the owning device.
            txn.alloc_frames(n, dev, wishes)?;
            txn.map_frames(dev, Direction::FromDevice)?;
            let at = Instant::now();
            let issued = {
                let req = CopyRequest {
                    page_size: ps,
                    pages,
                    addrs: txn.addrs(0..n),
                    pre_fence: None,
                };
                pm.devmem().copy_to_ram(&req)
            };
            let link = Link::new(Location::of(pm_id), Location::System);
            txn.issued(CopyOp::ToRam, pm_id, dev, link, n, at, issued)?;
            let waited = txn.wait(None);
            txn.landed(Instant::now(), None);
            waited?;
            txn.commit();
            // The pages become system pages; the allocation loses them.
            let mut releases: Vec<Release> = Vec::new();
            let gone = {
                let mut st = self.lock();
                st.touch_pages(picked);
                let st = &mut *st;
                let rmap = &mut st.allocs.get_mut(alloc).expect("live").rmap;
                for (&(j, r), &f) in picked.iter().zip(txn.frames()) {
                    *st.range_slots[r.range_slot() as usize]
                        .as_mut()
                        .expect("range slot in use")
                        .pages
                        .entry_mut(r.page() as usize) = PageEntry::system(f);
                    rmap[j as usize] = RmapEntry::EMPTY;
                }
                st.allocs.put_pages(alloc.slot, n as u32, &mut releases);
                self.notify_unlocked(st);
                st.allocs.get(alloc).is_none()
            };
            self.reclaim
                .release(crate::reclaim::Job::new(None, releases, self.stats.clone()));
            Ok(Pass {
                moved: n,
                busy: 0,
                gone,
            })
        })
    }
}
