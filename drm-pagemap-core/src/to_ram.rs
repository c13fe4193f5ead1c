//! Back to system memory: eviction of an allocation and the CPU-fault path. Always executed
//! by the device that owns the pages (`copy_to_ram` of the allocation's pagemap), never with a
//! pre-migrate fence. All pages of one pass or none.

use crate::alloc::{AllocId, AllocState, Release, release_all};
use crate::backend::CopyRequest;
use crate::error::{BusyReason, Error, Result};
use crate::migrate::{MapSource, Mappings};
use crate::mm::{AddressSpace, Deferred, MmState};
use crate::page::{PageEntry, RmapEntry};
use crate::types::{Direction, DmaAddr, HostFrame, PageSize, PagemapId, Pfn, VaRange};

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

/// A copy back to RAM between locking its pages and committing: what to undo if it fails.
#[derive(Default)]
struct ToRamFlight {
    /// The new system frames.
    frames: Vec<HostFrame>,
    /// Their mapping for the owning device, while it stands.
    mapped: Option<(crate::DeviceId, Vec<DmaAddr>)>,
    /// The copy's fence, from issue until it is known to be done (while it is here, the
    /// copy may still write the frames: it timed out, or the wait unwound).
    fence: Option<crate::Fence>,
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
            r => r.map(|_| ()),
        }
    }

    fn to_ram_pass(&self, alloc: AllocId, window: Option<Window>, range: VaRange) -> Result<Pass> {
        // Collect and lock the pages of `alloc` (inside `window`).
        let (pm_id, ps, picked, pages) = {
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
            let mut picked: Vec<(u32, RmapEntry)> = Vec::with_capacity(rec.rmap.len());
            let mut pages: Vec<Pfn> = Vec::with_capacity(rec.rmap.len());
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
            touch_picked(&mut st, &picked);
            for &(_, r) in &picked {
                let p = st
                    .range_mut(r.range_slot())
                    .pages
                    .entry_mut(r.page() as usize);
                *p = p.locked();
            }
            if picked.is_empty() {
                return Ok(Pass {
                    moved: 0,
                    busy,
                    gone: false,
                });
            }
            (pm_id, ps, picked, pages)
        };
        let n = picked.len();
        // From here the picked pages carry their lock bit: every exit commits or unlocks
        // them, also when the backend panics (then the frames a copy may still write are
        // parked until its fence signals, and the panic continues).
        let mut flight = ToRamFlight::default();
        let copied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.copy_back(pm_id, ps, &pages, range, &mut flight)
        }));
        let failure = match copied {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(Ok(e)),
            Err(panic) => Some(Err(panic)),
        };
        if let Some(failure) = failure {
            self.abandon_copy_back(&mut flight, ps);
            let mut st = self.lock();
            touch_picked(&mut st, &picked);
            for &(_, r) in &picked {
                let p = st
                    .range_mut(r.range_slot())
                    .pages
                    .entry_mut(r.page() as usize);
                *p = p.unlocked();
            }
            self.notify_unlocked(&st);
            drop(st);
            match failure {
                Ok(e) => return Err(e),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        let frames = std::mem::take(&mut flight.frames);
        // Commit: the pages become system pages; the allocation loses them.
        let mut releases: Vec<Release> = Vec::new();
        let gone = {
            let mut st = self.lock();
            touch_picked(&mut st, &picked);
            let st = &mut *st;
            let rmap = &mut st.allocs.get_mut(alloc).expect("live").rmap;
            for (&(j, r), &f) in picked.iter().zip(&frames) {
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
        release_all(releases);
        Ok(Pass {
            moved: n,
            busy: 0,
            gone,
        })
    }

    /// Copies `pages` of `alloc` back into new system frames (kept in `flight`, which also
    /// records what to undo if this fails or unwinds).
    fn copy_back(
        &self,
        pm_id: PagemapId,
        ps: PageSize,
        pages: &[Pfn],
        range: VaRange,
        flight: &mut ToRamFlight,
    ) -> Result<()> {
        let pm = self.pagemap_for(range, pm_id)?;
        let dev = pm.device();
        let backend = |op, source| Error::Backend {
            range,
            op,
            pagemap: Some(pm_id),
            device: Some(dev),
            source,
        };
        let n = pages.len();
        // Destination frames, mapped for the owning device.
        let mut frames: Vec<HostFrame> = vec![HostFrame(0); n];
        self.host
            .alloc_frames(ps, &mut frames)
            .map_err(|e| backend(crate::BackendOp::AllocFrames, e))?;
        flight.frames = frames;
        let mut addrs = vec![DmaAddr::NONE; n];
        self.host
            .map_frames(dev, &flight.frames, ps, Direction::FromDevice, &mut addrs)
            .map_err(|e| backend(crate::BackendOp::MapFrames, e))?;
        flight.mapped = Some((dev, addrs));
        let addrs = &flight.mapped.as_ref().expect("just mapped").1;
        let req = CopyRequest {
            page_size: ps,
            pages,
            addrs,
            pre_fence: None,
        };
        let fence = pm
            .devmem()
            .copy_to_ram(&req)
            .map_err(|e| backend(crate::BackendOp::CopyToRam, e))?;
        let fence = flight.fence.insert(fence);
        if let Err(source) = fence.wait_for(self.to_ram_fence_timeout()) {
            if !matches!(source, crate::FenceError::Timeout(_)) {
                // The copy ended (with an error): nothing writes the frames any more.
                flight.fence = None;
            }
            return Err(Error::Fence {
                range,
                what: crate::FenceRole::Copy,
                pagemap: Some(pm_id),
                device: Some(dev),
                source,
            });
        }
        flight.fence = None;
        if let Some((dev, addrs)) = flight.mapped.take() {
            self.host
                .unmap_frames(dev, &addrs, ps, Direction::FromDevice);
        }
        Ok(())
    }

    /// Undoes a copy back to RAM that failed or unwound: the frames (and their mapping) are
    /// freed, or parked until the copy's fence signals when it may still write them (it
    /// timed out, or the backend panicked after issuing it, and the fence has not signalled).
    fn abandon_copy_back(&self, flight: &mut ToRamFlight, ps: PageSize) {
        let frames = std::mem::take(&mut flight.frames);
        let mapped = flight.mapped.take();
        match flight.fence.take() {
            Some(late) if !late.is_signaled() => {
                let unmap = match mapped {
                    Some((dev, addrs)) => {
                        let n = addrs.len();
                        Mappings {
                            addrs,
                            records: vec![(MapSource::Host, dev, Direction::FromDevice, 0, n)],
                            page_size: Some(ps),
                        }
                    }
                    None => Mappings::default(),
                };
                let deferred = Deferred {
                    fences: vec![late],
                    unmap,
                    slot: None,
                    frames: frames.iter().map(|&f| (f, ps)).collect(),
                };
                self.lock().deferred.push(deferred);
            }
            _ => {
                if let Some((dev, addrs)) = mapped {
                    self.host
                        .unmap_frames(dev, &addrs, ps, Direction::FromDevice);
                }
                if !frames.is_empty() {
                    self.host.free_frames(&frames, ps);
                }
            }
        }
    }
}

/// Stamps the pages of `picked` (see [`MmState::touch`]): once per run of one range, over
/// the span from its lowest to its highest page.
fn touch_picked(st: &mut MmState, picked: &[(u32, RmapEntry)]) {
    let mut run: Option<(u32, u32, u32)> = None;
    for &(_, r) in picked {
        let (slot, page) = (r.range_slot(), r.page());
        run = match run {
            Some((s, lo, hi)) if s == slot => Some((s, lo.min(page), hi.max(page))),
            Some((s, lo, hi)) => {
                st.touch(s, lo as usize, (hi - lo + 1) as usize);
                Some((slot, page, page))
            }
            None => Some((slot, page, page)),
        };
    }
    if let Some((s, lo, hi)) = run {
        st.touch(s, lo as usize, (hi - lo + 1) as usize);
    }
}
