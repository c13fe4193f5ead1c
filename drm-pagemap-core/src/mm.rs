//! The address space: ranges of pages in packed, lazily allocated page tables (see
//! [`crate::table`]), the pagemaps it may use, CPU access.

use crate::alloc::{
    AllocId, AllocRecord, AllocState, AllocTable, AllocationInfo, Release, release_all,
};
use crate::backend::{HostMemory, Pagemap};
use crate::error::{Error, RangeProblem, Result};
use crate::page::{Kind, PageEntry, RmapEntry};
use crate::table::{NoMemory, PageTable, Stamps};
use crate::types::{DeviceId, HostFrame, OwnerId, PageSize, PagemapId, Pfn, VaRange};
use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

/// Where one page lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageLocation {
    /// Not populated (reads as zeros).
    Unpopulated,
    /// In system memory.
    System,
    /// In a pagemap's device memory, part of an allocation.
    Device {
        /// The pagemap.
        pagemap: PagemapId,
        /// The allocation.
        alloc: AllocId,
    },
}

/// What backs one page, as a device page table needs it (see [`AddressSpace::backing`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageBacking {
    /// Not populated.
    Unpopulated,
    /// A system page: this frame of the address space's host memory.
    System(HostFrame),
    /// A device page: page `pfn` of `pagemap`, part of allocation `alloc`.
    Device {
        /// The pagemap.
        pagemap: PagemapId,
        /// The allocation.
        alloc: AllocId,
        /// The page inside the pagemap's memory.
        pfn: Pfn,
    },
}

pub(crate) struct RangeRecord {
    pub va: VaRange,
    pub page_size: PageSize,
    /// One entry per page, in chunks allocated when first written.
    pub pages: PageTable,
    /// Per 2 MiB block of addresses the range overlaps: the address space's stamp when a
    /// page of that block last changed (see [`AddressSpace::generation`]); blocks never
    /// changed carry the range's creation stamp without storing it.
    pub stamps: Stamps,
    /// The first frame of the range's home extent ([`HostMemory::reserve_home`]), if it has
    /// one: page `i` asks for frame `home + i * granules` when it needs a system frame.
    pub home: Option<HostFrame>,
}

/// Blocks of addresses that carry one stamp each.
const STAMP_BLOCK_SHIFT: u32 = 21;

impl RangeRecord {
    /// The frame page `page` asks for (see [`RangeRecord::home`]).
    pub fn home_of(&self, page: usize) -> Option<HostFrame> {
        self.home
            .map(|h| HostFrame(h.0 + page as u64 * self.page_size.granules()))
    }

    /// The stamp blocks holding pages `first..first + count`.
    fn blocks(&self, first: usize, count: usize) -> std::ops::RangeInclusive<usize> {
        let ps = self.page_size.bytes();
        let base = self.va.start >> STAMP_BLOCK_SHIFT;
        let a = (self.va.start + first as u64 * ps) >> STAMP_BLOCK_SHIFT;
        let b = (self.va.start + (first + count.max(1) - 1) as u64 * ps) >> STAMP_BLOCK_SHIFT;
        (a - base) as usize..=(b - base) as usize
    }

    /// Allocates the page-table and stamp chunks of pages `first..first + count`, so that
    /// writing them (lock bits, a commit) allocates nothing. `range` names the request.
    pub(crate) fn reserve(&mut self, first: usize, count: usize, range: VaRange) -> Result<()> {
        let oom = |what| move |e: NoMemory| out_of_memory(range, what, e);
        self.pages
            .reserve(first, count)
            .map_err(oom("a chunk of page entries"))?;
        let blocks = self.blocks(first, count);
        self.stamps
            .reserve(blocks)
            .map_err(oom("a chunk of page-table stamps"))
    }
}

/// [`Error::OutOfMemory`] for `what` of `range`.
fn out_of_memory(range: VaRange, what: &'static str, e: NoMemory) -> Error {
    Error::OutOfMemory {
        range,
        what,
        bytes: e.bytes,
    }
}

/// Deferred cleanup of a transaction whose copies did not finish in time (see
/// [`crate::txn`]): its destination (a migration's allocation, the system frames of a copy
/// back to RAM) stays reserved, and mapped, until its fences signal.
pub(crate) struct Deferred {
    pub fences: Vec<crate::Fence>,
    pub unmap: crate::mapping::Mappings,
    /// The destination allocation of a migration, released once the fences signal.
    pub slot: Option<u32>,
    /// Host frames a copy back to RAM may still write, freed once the fences signal.
    pub frames: Vec<(HostFrame, PageSize)>,
    /// Copies and bytes still counted in flight, out of flight once the fences signal.
    pub in_flight: (u64, u64),
}

#[derive(Default)]
pub(crate) struct MmState {
    /// Bumped whenever a page entry changes; see [`RangeRecord::stamps`].
    pub stamp: u64,
    /// Threads in [`AddressSpace::wait_unlocked`] (a wake-up is a system call: skipped when
    /// nobody waits).
    pub waiters: usize,
    pub ranges: BTreeMap<u64, u32>,
    pub range_slots: Vec<Option<RangeRecord>>,
    pub free_range_slots: Vec<u32>,
    pub allocs: AllocTable,
    pub deferred: Vec<Deferred>,
    /// Pages CPU accesses are waiting for (see [`CpuClaim`]); mostly empty.
    pub cpu_claims: Vec<CpuClaim>,
    /// The id of the next claim.
    pub next_claim: u64,
}

/// Pages a CPU access waits for (a timeslice, a running migration, its own fault back to
/// RAM). While the claim stands no new migration may take them, so the access completes
/// within its wait plus the copies of its own pages, however busy other movers are.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CpuClaim {
    pub id: u64,
    pub slot: u32,
    pub first: usize,
    pub end: usize,
}

/// The pagemaps an address space may place pages in.
pub(crate) struct PagemapTable {
    pub maps: Vec<Option<Pagemap>>,
    pub owners: [Option<OwnerId>; PagemapId::MAX_PAGEMAPS],
}

/// One address space (the user-space counterpart of an `mm`): ranges of pages, each page
/// unpopulated, in system memory, or in a pagemap's device memory. Thread-safe: share it
/// with `Arc`. Copies run without holding its lock; pages under migration are locked
/// individually (a bit in their entry) and CPU accesses to them wait.
pub struct AddressSpace {
    pub(crate) host: Arc<dyn HostMemory>,
    pub(crate) pagemaps: RwLock<PagemapTable>,
    pub(crate) state: Mutex<MmState>,
    pub(crate) unlocked: Condvar,
    /// Longest wait for a copy fence on the way back to RAM (eviction, CPU faults).
    pub(crate) to_ram_timeout: Mutex<Option<Duration>>,
    /// Statistics (see [`crate::stats`]).
    pub(crate) stats: Arc<crate::stats::Counters>,
    /// Gives back replaced pages, inline or in the background (see [`crate::reclaim`]).
    pub(crate) reclaim: crate::reclaim::Reclaimer,
    /// The process mapping kept in step with migrations, if a layer installed one.
    pub(crate) cpu_maps: std::sync::OnceLock<Arc<dyn crate::CpuMappings>>,
    /// Buffers kept for large migrations (see [`AddressSpace::keep_buffers`]).
    pub(crate) kept: crate::scratch::KeptBuffers,
}

impl std::fmt::Debug for AddressSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AddressSpace").finish_non_exhaustive()
    }
}

/// Where a span of bytes or pages lies.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Span {
    pub slot: u32,
    pub first: usize,
    pub count: usize,
    pub page_size: PageSize,
    pub range_start: u64,
}

impl MmState {
    /// The range slot holding `span`, and the pages it covers. `pages` demands page
    /// alignment of start and length.
    pub(crate) fn locate(&self, span: VaRange, pages: bool) -> Result<Span> {
        let bad = |problem| Error::BadRange {
            range: span,
            problem,
        };
        if span.len == 0 {
            return Err(bad(RangeProblem::Empty));
        }
        let end = span.checked_end().ok_or(bad(RangeProblem::Overflow))?;
        let (_, &slot) = self
            .ranges
            .range(..=span.start)
            .next_back()
            .ok_or(bad(RangeProblem::NotMapped))?;
        let rec = self.range(slot);
        if span.start >= rec.va.end() {
            return Err(bad(RangeProblem::NotMapped));
        }
        if end > rec.va.end() {
            return Err(bad(RangeProblem::OutOfRange));
        }
        let ps = rec.page_size.bytes();
        if pages && (!span.start.is_multiple_of(ps) || !span.len.is_multiple_of(ps)) {
            return Err(bad(RangeProblem::Unaligned));
        }
        let first = ((span.start - rec.va.start) / ps) as usize;
        let last = ((end - 1 - rec.va.start) / ps) as usize;
        Ok(Span {
            slot,
            first,
            count: last - first + 1,
            page_size: rec.page_size,
            range_start: rec.va.start,
        })
    }

    pub(crate) fn range(&self, slot: u32) -> &RangeRecord {
        self.range_slots[slot as usize]
            .as_ref()
            .expect("range slot in use")
    }

    pub(crate) fn range_mut(&mut self, slot: u32) -> &mut RangeRecord {
        self.range_slots[slot as usize]
            .as_mut()
            .expect("range slot in use")
    }

    pub(crate) fn location_of(&self, e: PageEntry) -> PageLocation {
        match e.kind() {
            Kind::Hole => PageLocation::Unpopulated,
            Kind::System => PageLocation::System,
            Kind::Device => PageLocation::Device {
                pagemap: e.pagemap(),
                alloc: self.allocs.id_of_slot(e.slot()),
            },
        }
    }

    /// The generation of `span`: the newest stamp of its blocks (stamps only grow).
    pub(crate) fn generation_of(&self, span: Span) -> u64 {
        let rec = self.range(span.slot);
        rec.stamps.max(rec.blocks(span.first, span.count))
    }

    /// Records that pages `first..first + count` of range `slot` are about to change (entry,
    /// lock bit): their blocks get a new stamp. Every write to a page entry goes with one.
    pub(crate) fn touch(&mut self, slot: u32, first: usize, count: usize) {
        self.stamp += 1;
        let stamp = self.stamp;
        let rec = self.range_slots[slot as usize]
            .as_mut()
            .expect("range slot in use");
        let blocks = rec.blocks(first, count);
        rec.stamps.fill(blocks, stamp);
    }

    /// Whether a waiting CPU access claims a page of `span`.
    pub(crate) fn claimed_by_cpu(&self, span: Span) -> bool {
        let end = span.first + span.count;
        self.cpu_claims
            .iter()
            .any(|c| c.slot == span.slot && c.first < end && span.first < c.end)
    }

    /// Sets or clears the lock bit of pages (their blocks are stamped). Locking writes the
    /// entries: [`RangeRecord::reserve`] their chunks first where an allocation failure must
    /// be an error.
    pub(crate) fn set_locked(&mut self, span: Span, locked: bool) {
        self.touch(span.slot, span.first, span.count);
        let pages = self
            .range_mut(span.slot)
            .pages
            .slices_mut(span.first, span.count);
        if locked {
            pages.for_each(|s| s.iter_mut().for_each(|p| *p = p.locked()));
        } else {
            pages.for_each(|s| s.iter_mut().for_each(|p| *p = p.unlocked()));
        }
    }

    /// Stamps the pages `picked` (an allocation's `(index, reverse-map entry)` pairs, see
    /// [`MmState::touch`]): once per run of one range, over the span from its lowest to its
    /// highest page.
    pub(crate) fn touch_pages(&mut self, picked: &[(u32, RmapEntry)]) {
        let mut run: Option<(u32, u32, u32)> = None;
        for &(_, r) in picked {
            let (slot, page) = (r.range_slot(), r.page());
            run = match run {
                Some((s, lo, hi)) if s == slot => Some((s, lo.min(page), hi.max(page))),
                Some((s, lo, hi)) => {
                    self.touch(s, lo as usize, (hi - lo + 1) as usize);
                    Some((slot, page, page))
                }
                None => Some((slot, page, page)),
            };
        }
        if let Some((s, lo, hi)) = run {
            self.touch(s, lo as usize, (hi - lo + 1) as usize);
        }
    }

    /// [`MmState::set_locked`] for the pages `picked` (entries written before: no
    /// allocation).
    pub(crate) fn set_pages_locked(&mut self, picked: &[(u32, RmapEntry)], locked: bool) {
        self.touch_pages(picked);
        for &(_, r) in picked {
            let p = self
                .range_mut(r.range_slot())
                .pages
                .entry_mut(r.page() as usize);
            *p = if locked { p.locked() } else { p.unlocked() };
        }
    }
}

/// The longest a waiter sleeps before it looks again (guards against a missed wake-up).
const WAIT_SLICE: Duration = Duration::from_millis(50);

/// A CPU access's claim on its pages (see [`CpuClaim`]), withdrawn when the access ends,
/// whichever way (also on a panic).
struct ClaimGuard<'a> {
    mm: &'a AddressSpace,
    id: Option<u64>,
}

impl ClaimGuard<'_> {
    /// Claims the pages of `span` (or moves the claim there).
    fn register(&mut self, st: &mut MmState, span: Span) {
        let claim = |id| CpuClaim {
            id,
            slot: span.slot,
            first: span.first,
            end: span.first + span.count,
        };
        match self.id {
            Some(id) => {
                if let Some(c) = st.cpu_claims.iter_mut().find(|c| c.id == id) {
                    *c = claim(id);
                }
            }
            None => {
                let id = st.next_claim;
                st.next_claim += 1;
                st.cpu_claims.push(claim(id));
                self.id = Some(id);
            }
        }
    }

    /// Withdraws the claim, with the state lock held.
    fn release(&mut self, st: &mut MmState) {
        if let Some(id) = self.id.take() {
            st.cpu_claims.retain(|c| c.id != id);
        }
    }
}

impl Drop for ClaimGuard<'_> {
    fn drop(&mut self) {
        if self.id.is_some() {
            let mut st = self.mm.lock();
            self.release(&mut st);
        }
    }
}

/// What a scan for CPU access found.
enum CpuScan {
    Ready,
    Locked,
    Device(PageEntry, usize),
}

impl AddressSpace {
    /// An address space whose system pages live in `host`.
    pub fn new(host: Arc<dyn HostMemory>) -> AddressSpace {
        AddressSpace {
            host,
            pagemaps: RwLock::new(PagemapTable {
                maps: vec![None; PagemapId::MAX_PAGEMAPS],
                owners: [None; PagemapId::MAX_PAGEMAPS],
            }),
            state: Mutex::new(MmState::default()),
            unlocked: Condvar::new(),
            to_ram_timeout: Mutex::new(None),
            stats: Arc::default(),
            reclaim: crate::reclaim::Reclaimer::default(),
            cpu_maps: std::sync::OnceLock::new(),
            kept: crate::scratch::KeptBuffers::default(),
        }
    }

    /// Sets how the pages a migration or a copy back to RAM replaced are given back (see
    /// [`ReleaseMode`]; [`ReleaseMode::Inline`] by default). Takes effect for the calls that
    /// commit after it.
    ///
    /// [`ReleaseMode`]: crate::ReleaseMode
    /// [`ReleaseMode::Inline`]: crate::ReleaseMode::Inline
    pub fn set_release_mode(&self, mode: crate::ReleaseMode) {
        self.reclaim.set_mode(mode);
    }

    /// How replaced pages are given back (see [`AddressSpace::set_release_mode`]).
    pub fn release_mode(&self) -> crate::ReleaseMode {
        self.reclaim.mode()
    }

    /// Waits until every release queued so far in [`crate::ReleaseMode::Background`] has
    /// run (their memory is free when this returns). Returns whether any was waiting.
    pub fn flush_releases(&self) -> bool {
        self.reclaim.drain()
    }

    /// Releases queued and not yet run in [`crate::ReleaseMode::Background`]: how many
    /// calls' worth, and the bytes of pages they hold.
    pub fn pending_releases(&self) -> (u64, u64) {
        self.reclaim.pending()
    }

    /// Installs the layer that maps ranges of this address space into the process (see
    /// [`crate::CpuMappings`]). Once per address space: a second call returns the hook it was
    /// given back as the error.
    pub fn set_cpu_mappings(
        &self,
        hook: Arc<dyn crate::CpuMappings>,
    ) -> std::result::Result<(), Arc<dyn crate::CpuMappings>> {
        self.cpu_maps.set(hook)
    }

    /// Makes the page holding `va` a system page (an unpopulated page gets a zeroed frame; a
    /// device page comes home through the CPU-fault path, honouring its timeslice; a page
    /// under migration is waited for) and runs `f` with its page address, frame and size
    /// under the state lock: the page cannot move until `f` returns. What a CPU-fault handler
    /// of a mapped range calls to map the page again. `f` must not call into the address
    /// space.
    pub fn with_cpu_page<R>(
        &self,
        va: u64,
        f: impl FnOnce(u64, HostFrame, PageSize) -> R,
    ) -> Result<R> {
        let probe = VaRange::new(va, 1);
        let mut out = None;
        let mut f = Some(f);
        self.cpu_access(probe, None, |st, span| {
            let ps = span.page_size;
            let page_va = span.range_start + span.first as u64 * ps.bytes();
            let page = VaRange::new(page_va, ps.bytes());
            let span = st.locate(page, true)?;
            self.populate_holes(st, span, page, VaRange::new(page_va, 0))?;
            let e = st
                .range(span.slot)
                .pages
                .slices(span.first, 1)
                .next()
                .map(|s| s[0]);
            if let (Some(e), Some(f)) = (e, f.take()) {
                out = Some(f(page_va, e.frame(), ps));
            }
            Ok(())
        })?;
        out.ok_or(Error::BadRange {
            range: probe,
            problem: RangeProblem::NotMapped,
        })
    }

    /// Sets the longest wait for a copy fence on the way back to RAM (eviction and the
    /// CPU-fault path); `None` (the default): no limit. On timeout the operation fails with
    /// [`crate::FenceError::Timeout`], every page stays where it was (readable once the
    /// device answers), and the system frames the copy may still write are kept aside until
    /// its fence signals.
    pub fn set_to_ram_fence_timeout(&self, timeout: Option<Duration>) {
        *self
            .to_ram_timeout
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = timeout;
    }

    pub(crate) fn to_ram_fence_timeout(&self) -> Option<Duration> {
        *self
            .to_ram_timeout
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The host memory of the address space.
    pub fn host(&self) -> &Arc<dyn HostMemory> {
        &self.host
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, MmState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn wait_unlocked<'a>(&self, g: MutexGuard<'a, MmState>) -> MutexGuard<'a, MmState> {
        // A timeout guards against a missed wake-up; callers re-check their condition.
        self.wait_unlocked_for(g, WAIT_SLICE)
    }

    /// Waits until pages change (unlock, commit, eviction, a range freed) or `limit` passes.
    pub(crate) fn wait_unlocked_for<'a>(
        &self,
        mut g: MutexGuard<'a, MmState>,
        limit: Duration,
    ) -> MutexGuard<'a, MmState> {
        g.waiters += 1;
        let mut g = self
            .unlocked
            .wait_timeout(g, limit)
            .unwrap_or_else(|p| p.into_inner())
            .0;
        g.waiters -= 1;
        g
    }

    /// Wakes the threads waiting for pages to unlock (or a range to go), if any. Called with
    /// the state lock held (`st`), so no waiter can be missed.
    pub(crate) fn notify_unlocked(&self, st: &MmState) {
        if st.waiters > 0 {
            self.unlocked.notify_all();
        }
    }

    /// Makes `pagemap` usable by this address space. Its id must be new.
    pub fn add_pagemap(&self, pagemap: Pagemap) -> Result<()> {
        let mut t = self.pagemaps.write().unwrap_or_else(|p| p.into_inner());
        let i = pagemap.id().0 as usize;
        if t.maps[i].is_some() {
            return Err(Error::BadPagemap {
                pagemap: pagemap.id(),
                reason: "a pagemap with this id exists already",
            });
        }
        t.owners[i] = Some(pagemap.owner());
        t.maps[i] = Some(pagemap);
        Ok(())
    }

    /// The pagemap with `id`, if added.
    pub fn pagemap(&self, id: PagemapId) -> Option<Pagemap> {
        self.pagemaps.read().unwrap_or_else(|p| p.into_inner()).maps[id.0 as usize].clone()
    }

    /// Every pagemap added, by id.
    pub fn pagemaps(&self) -> Vec<Pagemap> {
        let t = self.pagemaps.read().unwrap_or_else(|p| p.into_inner());
        t.maps.iter().flatten().cloned().collect()
    }

    pub(crate) fn pagemap_for(&self, range: VaRange, id: PagemapId) -> Result<Pagemap> {
        self.pagemap(id)
            .ok_or(Error::UnknownPagemap { range, pagemap: id })
    }

    /// Creates a range of unpopulated pages of `page_size` at `range`.
    pub fn create_range(&self, range: VaRange, page_size: PageSize) -> Result<()> {
        self.create_range_inner(range, page_size, None)
    }

    /// [`AddressSpace::create_range`] for a range with a home extent of the host memory
    /// (`home`, from [`HostMemory::reserve_home`] for the range's page count and page size):
    /// whenever a page of it needs a system frame (first touch, coming back from a device) it
    /// asks for its own frame of the extent ([`HostMemory::alloc_frames_at`]). The extent
    /// stays the caller's: it gives it back after [`AddressSpace::free_range`].
    pub fn create_range_homed(
        &self,
        range: VaRange,
        page_size: PageSize,
        home: HostFrame,
    ) -> Result<()> {
        self.create_range_inner(range, page_size, Some(home))
    }

    fn create_range_inner(
        &self,
        range: VaRange,
        page_size: PageSize,
        home: Option<HostFrame>,
    ) -> Result<()> {
        let bad = |problem| Error::BadRange { range, problem };
        if range.len == 0 {
            return Err(bad(RangeProblem::Empty));
        }
        if range.checked_end().is_none() {
            return Err(bad(RangeProblem::Overflow));
        }
        let ps = page_size.bytes();
        if !range.start.is_multiple_of(ps) || !range.len.is_multiple_of(ps) {
            return Err(bad(RangeProblem::Unaligned));
        }
        let npages = range.len / ps;
        if npages > u32::MAX as u64 {
            return Err(bad(RangeProblem::Overflow));
        }
        let mut st = self.lock();
        let before = st.ranges.range(..range.end()).next_back().map(|(_, &s)| s);
        if let Some(s) = before
            && st.range(s).va.overlaps(&range)
        {
            return Err(bad(RangeProblem::Overlapping));
        }
        // Only the directories of the page table and of the stamps are allocated here (a
        // few MiB for the largest range); chunks follow as pages are written.
        let blocks = (range.end() - 1) >> STAMP_BLOCK_SHIFT;
        let blocks = (blocks - (range.start >> STAMP_BLOCK_SHIFT) + 1) as usize;
        let oom = |what| move |e: NoMemory| out_of_memory(range, what, e);
        let pages = PageTable::new(npages as usize).map_err(oom("the page table's directory"))?;
        let stamps =
            Stamps::new(blocks, st.stamp + 1).map_err(oom("the page-table stamps' directory"))?;
        st.range_slots.try_reserve(1).map_err(|_| {
            out_of_memory(
                range,
                "the range list",
                NoMemory {
                    bytes: size_of::<Option<RangeRecord>>() as u64,
                },
            )
        })?;
        st.stamp += 1;
        let rec = RangeRecord {
            va: range,
            page_size,
            pages,
            stamps,
            home,
        };
        let slot = match st.free_range_slots.pop() {
            Some(s) => {
                st.range_slots[s as usize] = Some(rec);
                s
            }
            None => {
                st.range_slots.push(Some(rec));
                st.range_slots.len() as u32 - 1
            }
        };
        st.ranges.insert(range.start, slot);
        Ok(())
    }

    /// Frees the range that starts at `start`: its system pages return to host memory, its
    /// device pages drop their allocation references (an allocation is released when its last
    /// page goes). Waits for migrations running on its pages. An address inside a range that
    /// is not its start is refused with [`RangeProblem::NotStart`] naming that range.
    pub fn free_range(&self, start: u64) -> Result<()> {
        let mut releases = Vec::new();
        let mut frames: Vec<(HostFrame, PageSize)> = Vec::new();
        {
            let mut st = self.lock();
            let slot = loop {
                let Some(&slot) = st.ranges.get(&start) else {
                    // Inside a range: say which (its start is what to pass).
                    let holder = st.ranges.range(..start).next_back();
                    return Err(match holder.map(|(_, &s)| st.range(s).va) {
                        Some(va) if start < va.end() => Error::BadRange {
                            range: va,
                            problem: RangeProblem::NotStart { address: start },
                        },
                        _ => Error::BadRange {
                            range: VaRange::new(start, 0),
                            problem: RangeProblem::NotMapped,
                        },
                    });
                };
                if st.range(slot).pages.summary_all().any_locked() {
                    st = self.wait_unlocked(st);
                    continue;
                }
                break slot;
            };
            st.ranges.remove(&start);
            let rec = st.range_slots[slot as usize]
                .take()
                .expect("range slot in use");
            st.free_range_slots.push(slot);
            let mut run: Option<(u32, u32)> = None;
            // Only chunks ever written can hold anything but holes.
            for e in rec.pages.written().flat_map(|(_, s)| s) {
                match e.kind() {
                    Kind::Hole => {}
                    Kind::System => frames.push((e.frame(), rec.page_size)),
                    Kind::Device => {
                        let a = st.allocs.by_slot_mut(e.slot());
                        a.rmap[e.index() as usize] = RmapEntry::EMPTY;
                        run = flush_run(&mut st.allocs, run, e.slot(), &mut releases);
                    }
                }
            }
            if let Some((s, n)) = run {
                st.allocs.put_pages(s, n, &mut releases);
            }
            self.notify_unlocked(&st);
        }
        self.free_frames(&frames);
        release_all(releases);
        Ok(())
    }

    pub(crate) fn free_frames(&self, frames: &[(HostFrame, PageSize)]) {
        let mut i = 0;
        while i < frames.len() {
            let ps = frames[i].1;
            let mut j = i;
            while j < frames.len() && frames[j].1 == ps {
                j += 1;
            }
            let list: Vec<HostFrame> = frames[i..j].iter().map(|f| f.0).collect();
            self.host.free_frames(&list, ps);
            self.stats.host_frames(-(list.len() as i64), ps);
            i = j;
        }
    }

    /// The ranges of the address space and their page sizes.
    pub fn ranges(&self) -> Vec<(VaRange, PageSize)> {
        let st = self.lock();
        st.ranges
            .values()
            .map(|&s| (st.range(s).va, st.range(s).page_size))
            .collect()
    }

    /// Where the page holding `va` lives.
    pub fn location(&self, va: u64) -> Result<PageLocation> {
        let st = self.lock();
        let span = st.locate(VaRange::new(va, 1), false)?;
        let e = st.range(span.slot).pages.get(span.first).unlocked();
        Ok(st.location_of(e))
    }

    /// Where every page of `range` (page aligned) lives, in order.
    pub fn locations(&self, range: VaRange) -> Result<Vec<PageLocation>> {
        let st = self.lock();
        let span = st.locate(range, true)?;
        let pages = st.range(span.slot).pages.slices(span.first, span.count);
        Ok(pages
            .flat_map(|s| s.iter())
            .map(|e| st.location_of(e.unlocked()))
            .collect())
    }

    /// A snapshot of one allocation, if it exists.
    pub fn allocation(&self, id: AllocId) -> Option<AllocationInfo> {
        self.lock().allocs.info(id)
    }

    /// Snapshots of every allocation that exists.
    pub fn allocations(&self) -> Vec<AllocationInfo> {
        self.lock().allocs.all()
    }

    /// How many allocations were released so far.
    pub fn released_allocations(&self) -> u64 {
        self.lock().allocs.released()
    }

    /// Reserves `npages` pages of `page_size` in `pagemap`'s device memory for a later
    /// [`AddressSpace::migrate_to_devmem`]. `range` only names the request in errors. 0 pages
    /// is an empty request ([`RangeProblem::Empty`], for the 0 bytes at `range.start`); more
    /// than the pagemap can ever hold is [`Error::TooLarge`].
    pub fn allocate_devmem(
        &self,
        pagemap: PagemapId,
        npages: usize,
        page_size: PageSize,
        range: VaRange,
    ) -> Result<AllocId> {
        self.allocate_as(pagemap, npages, page_size, range, AllocState::Reserved)
            .map(|(id, _)| id)
            .map_err(|e| self.count_failure(e))
    }

    /// Allocates device memory and enters it in the table in `state` (one step: nobody
    /// sees it in between); also returns its record's pfns and pre-migrate fence.
    pub(crate) fn allocate_as(
        &self,
        pagemap: PagemapId,
        npages: usize,
        page_size: PageSize,
        range: VaRange,
        state: AllocState,
    ) -> Result<(AllocId, NewAllocation)> {
        let pm = self.pagemap_for(range, pagemap)?;
        check_fits(&pm, npages, page_size, range)?;
        let backend_err = |op, source| Error::Backend {
            range,
            op,
            pagemap: Some(pagemap),
            device: Some(pm.device()),
            source,
        };
        // Device memory that background releases still hold is waited for, once.
        let backing = match pm.devmem().allocate(npages, page_size) {
            Err(e) if crate::reclaim::out_of_memory(&e) && self.reclaim.drain() => {
                pm.devmem().allocate(npages, page_size)
            }
            r => r,
        }
        .map_err(|e| backend_err(crate::BackendOp::Allocate, e))?;
        let mut pfns: Arc<[Pfn]> = std::iter::repeat_n(Pfn(0), npages).collect();
        let out = Arc::get_mut(&mut pfns).expect("not shared yet");
        if let Err(e) = pm.devmem().populate_devmem_pfn(&backing, out) {
            pm.devmem().devmem_release(backing);
            return Err(backend_err(crate::BackendOp::PopulateDevmemPfn, e));
        }
        let pre_fence = backing.pre_migrate_fence.clone();
        let rec = AllocRecord {
            generation: 0,
            state,
            pagemap,
            page_size,
            pfns: pfns.clone(),
            // Filled when the allocation goes live (see `AllocRecord::rmap`).
            rmap: Vec::new(),
            live: 0,
            expires: Instant::now(),
            backing: Some(backing),
            devmem: pm.devmem().clone(),
        };
        let mut st = self.lock();
        let limit = st.allocs.limit;
        match st.allocs.insert(rec) {
            Ok(id) => Ok((id, (pfns, pre_fence))),
            Err(rec) => {
                drop(st);
                if let Some(b) = rec.backing {
                    rec.devmem.devmem_release(b);
                }
                Err(backend_err(
                    crate::BackendOp::Allocate,
                    crate::BackendError::new(
                        crate::BackendErrorKind::OutOfMemory,
                        format!("the address space tracks at most {limit} live allocations"),
                    ),
                ))
            }
        }
    }

    /// Releases an allocation reserved with [`AddressSpace::allocate_devmem`] that was never
    /// migrated into. Live allocations leave through eviction instead.
    pub fn release_devmem(&self, id: AllocId) -> Result<()> {
        let rel = {
            let mut st = self.lock();
            match st.allocs.get(id).map(|r| r.state) {
                Some(AllocState::Reserved) => st.allocs.remove(id.slot),
                Some(_) => {
                    // Eviction takes the lock itself.
                    drop(st);
                    return self.evict_to_ram(id).map(|_| ());
                }
                None => return Err(Error::NoSuchAllocation { alloc: id }),
            }
        };
        crate::alloc::release_unused(rel);
        Ok(())
    }

    /// Reads `buf.len()` bytes at `va` (inside one range). Device pages are first migrated
    /// back to system memory by their device (the CPU-fault path), once their allocation's
    /// timeslice has expired; unpopulated pages read as zeros. Waits as long as that takes
    /// (see [`AddressSpace::read_timeout`] for a bounded wait).
    ///
    /// An empty `buf` reads nothing and succeeds at any `va`, mapped or not (as a 0-byte
    /// `std::io::Read::read` or `memcpy`): it names no byte, so no range is looked up, no
    /// page moves and nothing waits. Use [`AddressSpace::location`] to ask whether an
    /// address is mapped.
    pub fn read(&self, va: u64, buf: &mut [u8]) -> Result<()> {
        self.read_until(va, buf, None)
    }

    /// [`AddressSpace::read`], giving up with [`Error::CpuAccessTimeout`] (nothing read,
    /// nothing changed but pages already brought home) when the pages are still held by a
    /// device's timeslice or a running migration after `limit`. `Duration::MAX`: no limit.
    pub fn read_timeout(&self, va: u64, buf: &mut [u8], limit: Duration) -> Result<()> {
        self.read_until(va, buf, crate::time::deadline(Instant::now(), limit))
    }

    fn read_until(&self, va: u64, buf: &mut [u8], deadline: Option<Instant>) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let range = VaRange::new(va, buf.len() as u64);
        self.cpu_access(range, deadline, |st, span| {
            self.copy_out(st, span, va, buf)
                .map_err(|source| host_access_error(range, source))
        })
    }

    /// Writes `data` at `va` (inside one range), populating system pages as needed. Device
    /// pages are first migrated back, as for [`AddressSpace::read`]. An empty `data` writes
    /// nothing and succeeds at any `va`, mapped or not, as an empty read does.
    pub fn write(&self, va: u64, data: &[u8]) -> Result<()> {
        self.write_until(va, data, None)
    }

    /// [`AddressSpace::write`] with a bounded wait, as [`AddressSpace::read_timeout`]: on
    /// [`Error::CpuAccessTimeout`] nothing was written.
    pub fn write_timeout(&self, va: u64, data: &[u8], limit: Duration) -> Result<()> {
        self.write_until(va, data, crate::time::deadline(Instant::now(), limit))
    }

    fn write_until(&self, va: u64, data: &[u8], deadline: Option<Instant>) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let range = VaRange::new(va, data.len() as u64);
        self.cpu_access(range, deadline, |st, span| {
            self.populate_holes(st, span, range, range)?;
            self.copy_in(st, span, va, data)
                .map_err(|source| host_access_error(range, source))
        })
    }

    /// Makes every page of `range` a system page, as a device that maps system memory needs
    /// them: device pages are first migrated back by their device (as for
    /// [`AddressSpace::read`], honouring the timeslice), unpopulated pages get zeroed frames.
    /// Data already in system memory is untouched.
    pub fn populate(&self, range: VaRange) -> Result<()> {
        let written = VaRange::new(range.start, 0);
        self.cpu_access(range, None, |st, span| {
            self.populate_holes(st, span, range, written)
        })
    }

    /// The backing of every page of `range` (page aligned), in order, into `out` (cleared
    /// first): the frames and device pages a device page table maps. Waits while a migration
    /// runs on any page of the range, so the snapshot never shows a page in flight; it stays
    /// true until the next migration, eviction or CPU access touches those pages.
    pub fn backing(&self, range: VaRange, out: &mut Vec<PageBacking>) -> Result<()> {
        self.backing_with_generation(range, out).map(|_| ())
    }

    /// The generation of `range` (any byte range inside one range of the address space): a
    /// number that stays the same while no page of `range` changes (location, backing, or a
    /// migration locking it), and never comes back once it changed. It may also change when
    /// only pages near `range` (in the same 2 MiB block of addresses) changed. O(1): a
    /// caller that kept [`AddressSpace::backing_with_generation`]'s snapshot knows it is
    /// still true when the generation is the same, without looking at every page.
    pub fn generation(&self, range: VaRange) -> Result<u64> {
        let st = self.lock();
        let span = st.locate(range, false)?;
        Ok(st.generation_of(span))
    }

    /// [`AddressSpace::backing`], also returning the generation of `range` at the time of the
    /// snapshot (see [`AddressSpace::generation`]).
    pub fn backing_with_generation(
        &self,
        range: VaRange,
        out: &mut Vec<PageBacking>,
    ) -> Result<u64> {
        out.clear();
        let mut st = self.lock();
        loop {
            let span = st.locate(range, true)?;
            let table = &st.range(span.slot).pages;
            if table.summary(span.first, span.count).any_locked() {
                st = self.wait_unlocked(st);
                continue;
            }
            let generation = st.generation_of(span);
            // Neighbouring pages mostly share an allocation: look it up once per run.
            let allocs = &st.allocs;
            let mut run: Option<(u32, AllocId, &[Pfn])> = None;
            let mut back = |&e: &PageEntry| match e.kind() {
                Kind::Hole => PageBacking::Unpopulated,
                Kind::System => PageBacking::System(e.frame()),
                Kind::Device => {
                    let slot = e.slot();
                    let (alloc, pfns) = match run {
                        Some((s, id, pfns)) if s == slot => (id, pfns),
                        _ => {
                            let pfns = &allocs.by_slot(slot).pfns[..];
                            let id = allocs.id_of_slot(slot);
                            run = Some((slot, id, pfns));
                            (id, pfns)
                        }
                    };
                    PageBacking::Device {
                        pagemap: e.pagemap(),
                        alloc,
                        pfn: pfns[e.index() as usize],
                    }
                }
            };
            out.reserve(span.count);
            for s in table.slices(span.first, span.count) {
                out.extend(s.iter().map(&mut back));
            }
            return Ok(generation);
        }
    }

    /// Runs `access` with every page of `range` in system memory (or a hole), under the
    /// state lock. Device pages come home through the CPU-fault path once their timeslice
    /// has expired. While the access has to wait it claims its pages: no new migration
    /// takes them, so it waits at most for the migrations already running on them, their
    /// timeslice, and its own copies back. `deadline`: give up with
    /// [`Error::CpuAccessTimeout`] once it passes.
    fn cpu_access<F>(&self, range: VaRange, deadline: Option<Instant>, access: F) -> Result<()>
    where
        F: FnOnce(&mut MmState, Span) -> Result<()>,
    {
        self.cpu_access_inner(range, deadline, access)
            .map_err(|e| self.count_failure(e))
    }

    fn cpu_access_inner<F>(
        &self,
        range: VaRange,
        deadline: Option<Instant>,
        access: F,
    ) -> Result<()>
    where
        F: FnOnce(&mut MmState, Span) -> Result<()>,
    {
        // Declared before the state guard so that it drops after it (its drop locks).
        let mut claim = ClaimGuard { mm: self, id: None };
        let started = Instant::now();
        let mut st = self.lock();
        loop {
            let span = st.locate(range, false)?;
            let scan = scan_for_cpu(&st, span);
            if let CpuScan::Ready = scan {
                claim.release(&mut st);
                return access(&mut st, span);
            }
            claim.register(&mut st, span);
            let now = Instant::now();
            let timed_out = || Error::CpuAccessTimeout {
                range,
                waited: now.saturating_duration_since(started),
            };
            match scan {
                CpuScan::Ready => unreachable!("handled above"),
                CpuScan::Locked => {
                    if deadline.is_some_and(|d| now >= d) {
                        return Err(timed_out());
                    }
                    let limit = deadline.map_or(WAIT_SLICE, |d| (d - now).min(WAIT_SLICE));
                    st = self.wait_unlocked_for(st, limit);
                }
                CpuScan::Device(e, page) => {
                    let alloc = st.allocs.id_of_slot(e.slot());
                    let expires = st.allocs.by_slot(e.slot()).expires;
                    if now < expires {
                        // The device keeps pages it just received for its timeslice. Woken
                        // early when pages change (an eviction may bring them home first).
                        if deadline.is_some_and(|d| now >= d) {
                            return Err(timed_out());
                        }
                        let until = deadline.map_or(expires, |d| d.min(expires));
                        self.stats.timeslice_wait();
                        tracing::trace!(
                            target: "drm_pagemap",
                            range = %range,
                            alloc = %alloc,
                            "cpu access waits for a timeslice"
                        );
                        st = self.wait_unlocked_for(st, until - now);
                        continue;
                    }
                    drop(st);
                    let fault_va = span.range_start + page as u64 * span.page_size.bytes();
                    self.cpu_fault(alloc, fault_va, range)?;
                    st = self.lock();
                }
            }
        }
    }

    /// Gives the holes of `span` zeroed system frames; bytes inside `written` are left for the
    /// caller to write.
    fn populate_holes(
        &self,
        st: &mut MmState,
        span: Span,
        range: VaRange,
        written: VaRange,
    ) -> Result<()> {
        let rec = st.range(span.slot);
        let holes: usize = rec
            .pages
            .slices(span.first, span.count)
            .map(|s| s.iter().filter(|e| e.kind() == Kind::Hole).count())
            .sum();
        if holes == 0 {
            return Ok(());
        }
        // The entries written below need their chunks: allocated (or refused) first.
        st.range_mut(span.slot)
            .reserve(span.first, span.count, range)?;
        let mut frames = vec![HostFrame(0); holes];
        let rec = st.range(span.slot);
        // Each hole asks for its own frame of the range's home extent, if it has one;
        // frames that background releases still hold are waited for, once (the reclaimer
        // never takes the state lock this holds).
        let alloc = |frames: &mut [HostFrame]| {
            if rec.home.is_some() {
                frames.fill(HostFrame(0));
                let mut wish = frames.iter_mut();
                for (i, e) in rec
                    .pages
                    .slices(span.first, span.count)
                    .flatten()
                    .enumerate()
                {
                    if e.kind() == Kind::Hole
                        && let (Some(w), Some(h)) = (wish.next(), rec.home_of(span.first + i))
                    {
                        *w = h;
                    }
                }
                self.host.alloc_frames_at(span.page_size, frames)
            } else {
                self.host.alloc_frames(span.page_size, frames)
            }
        };
        let mut placed = alloc(&mut frames);
        if placed.as_ref().is_err_and(crate::reclaim::out_of_memory) && self.reclaim.drain() {
            placed = alloc(&mut frames);
        }
        placed.map_err(|source| Error::Backend {
            range,
            op: crate::BackendOp::AllocFrames,
            pagemap: None,
            device: None,
            source,
        })?;
        let ps = span.page_size;
        // Fresh frames may hold old bytes: clear what the write will not cover, before any
        // entry changes (a failed clear gives the frames back and changes no page).
        let rec = st.range(span.slot);
        let mut next = frames.iter();
        let mut page_va = rec.va.start + span.first as u64 * ps.bytes();
        for e in rec.pages.slices(span.first, span.count).flatten() {
            if e.kind() == Kind::Hole {
                let &f = next.next().expect("one frame per hole");
                let not_covered = page_va < written.start || page_va + ps.bytes() > written.end();
                if not_covered && let Err(source) = self.host.zero(f, ps) {
                    self.host.free_frames(&frames, ps);
                    return Err(host_access_error(range, source));
                }
            }
            page_va += ps.bytes();
        }
        self.stats.host_frames(frames.len() as i64, ps);
        st.touch(span.slot, span.first, span.count);
        let rec = st.range_mut(span.slot);
        let mut next = frames.into_iter();
        for s in rec.pages.slices_mut(span.first, span.count) {
            for e in s {
                if e.kind() == Kind::Hole {
                    *e = PageEntry::system(next.next().expect("one frame per hole"));
                }
            }
        }
        Ok(())
    }

    fn copy_out(
        &self,
        st: &MmState,
        span: Span,
        va: u64,
        buf: &mut [u8],
    ) -> std::result::Result<(), crate::BackendError> {
        let rec = st.range(span.slot);
        let ps = span.page_size.bytes();
        let mut done = 0usize;
        let mut page_va = rec.va.start + span.first as u64 * ps;
        for e in rec.pages.slices(span.first, span.count).flatten() {
            let at = va + done as u64;
            let off = (at - page_va) as usize;
            let n = (ps as usize - off).min(buf.len() - done);
            let dst = &mut buf[done..done + n];
            match e.kind() {
                Kind::System => self.host.read(e.frame(), off, dst)?,
                _ => dst.fill(0),
            }
            done += n;
            page_va += ps;
        }
        Ok(())
    }

    /// Writes `data` page by page; on an error of the host memory the pages before the failing
    /// one hold their new bytes (as a `write(2)` that failed part way).
    fn copy_in(
        &self,
        st: &MmState,
        span: Span,
        va: u64,
        data: &[u8],
    ) -> std::result::Result<(), crate::BackendError> {
        let rec = st.range(span.slot);
        let ps = span.page_size.bytes();
        let mut done = 0usize;
        let mut page_va = rec.va.start + span.first as u64 * ps;
        for e in rec.pages.slices(span.first, span.count).flatten() {
            let at = va + done as u64;
            let off = (at - page_va) as usize;
            let n = (ps as usize - off).min(data.len() - done);
            self.host.write(e.frame(), off, &data[done..done + n])?;
            done += n;
            page_va += ps;
        }
        Ok(())
    }

    /// The device of a pagemap (for messages).
    pub(crate) fn device_of(&self, id: PagemapId) -> Option<DeviceId> {
        self.pagemap(id).map(|p| p.device())
    }
}

/// A new allocation's pfns and pre-migrate fence.
pub(crate) type NewAllocation = (Arc<[Pfn]>, Option<crate::Fence>);

/// Refuses an allocation of `npages` pages of `page_size` that `pm` can never hold.
pub(crate) fn check_fits(
    pm: &Pagemap,
    npages: usize,
    page_size: PageSize,
    range: VaRange,
) -> Result<()> {
    // Saturating: an absurd page count is "too large", not an arithmetic overflow.
    if npages == 0 {
        return Err(Error::BadRange {
            range: VaRange::new(range.start, 0),
            problem: RangeProblem::Empty,
        });
    }
    let bytes = (npages as u64).saturating_mul(page_size.bytes());
    let capacity = pm.devmem().capacity_bytes();
    if bytes > capacity || npages > u32::MAX as usize {
        return Err(Error::TooLarge {
            range,
            pagemap: pm.id(),
            device: pm.device(),
            bytes,
            capacity,
        });
    }
    Ok(())
}

fn scan_for_cpu(st: &MmState, span: Span) -> CpuScan {
    let pages = st.range(span.slot).pages.slices(span.first, span.count);
    let mut device = None;
    for (i, e) in pages.flatten().enumerate() {
        if e.is_locked() {
            return CpuScan::Locked;
        }
        if device.is_none() && e.kind() == Kind::Device {
            device = Some((*e, span.first + i));
        }
    }
    match device {
        Some((e, i)) => CpuScan::Device(e, i),
        None => CpuScan::Ready,
    }
}

/// Counts page references per allocation in runs, so a commit touches each allocation's
/// counter once per run rather than once per page.
fn flush_run(
    allocs: &mut AllocTable,
    run: Option<(u32, u32)>,
    slot: u32,
    releases: &mut Vec<Release>,
) -> Option<(u32, u32)> {
    match run {
        Some((s, n)) if s == slot => Some((s, n + 1)),
        Some((s, n)) => {
            allocs.put_pages(s, n, releases);
            Some((slot, 1))
        }
        None => Some((slot, 1)),
    }
}

/// A CPU access to `range` that the host memory refused.
fn host_access_error(range: VaRange, source: crate::BackendError) -> Error {
    Error::Backend {
        range,
        op: crate::BackendOp::HostAccess,
        pagemap: None,
        device: None,
        source,
    }
}
