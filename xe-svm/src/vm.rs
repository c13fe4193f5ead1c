//! A GPU VM: one device's view of the address space, cut into SVM ranges, and its fault
//! handler.
//!
//! # The fault handler
//! [`GpuVm::handle_gpu_fault`] finds or creates the SVM range holding the address (cut from
//! the CPU range holding it; see [`crate::CHUNK_SIZES`] and the chunking rules of the range
//! module: a range whose CPU range is gone or was re-created with another page size is
//! dropped and cut again, ranges of live neighbouring CPU ranges are never touched), then:
//! 1. **Target.** An atomic access needs the faulting device's own memory (refused when the
//!    range's atomic attribute is [`AtomicAccess::Cpu`]). Otherwise the preferred location:
//!    the device's own memory by default, a pagemap (a peer's memory), or system memory.
//! 2. **Already there?** If every page lives in the target and the page table still matches
//!    the pages, nothing is done (a *valid* fault; the allocation becomes most recently used).
//! 3. **Place.** System target: the pages are made system-resident (device pages come back
//!    through their device, holes get zeroed pages). Device target: wait until no page is
//!    held by another device's unexpired timeslice, allocate device memory (evicting
//!    least-recently-used allocations until it fits; the allocation's clear is the
//!    pre-migrate fence) and migrate with `source_peer_migrates`. On Busy, the context's
//!    migrate lock is taken for write, the range is evicted to system memory and the
//!    migration retried once. An atomic fault makes up to three such
//!    attempts, doubling the timeslice; a non-atomic fault that cannot get device memory
//!    (full, busy) is served from system memory instead.
//! 4. **Page table.** Per page, the address by which the device reaches it: its own memory,
//!    a peer's (same owner), or system memory. If pages moved meanwhile the handler looks
//!    again (bounded), so the table it leaves matches the pages it saw last. After a
//!    migration the table is built while the copies run, for the backing the migration
//!    leaves once it commits (every page in the new allocation, in order; the engine's
//!    [`drm_pagemap_core::AddressSpace::migrate_to_devmem_with`]), and stamped with the
//!    generation the commit reports; a migration that does not commit unmaps it again.
//!
//! # Locks
//! Order: an SVM range's lock (one fault at a time per range of a VM), then the context's
//! migrate lock, then the lock of the 2 MiB block of addresses the range lies in (one fault
//! at a time per block across every VM), then the engine's. A fault holds the migrate lock
//! for read and the block lock from its first look at the pages to its page table, so the
//! timeslice check, the migration and the table see the same pages; the evict-and-retry
//! path lets both go and takes the migrate lock for write, then the block lock again. The
//! VM's range map is only locked briefly and never while waiting for a range's lock. Nothing
//! that holds a later lock waits for an earlier one; waits for memory (LRU eviction,
//! migrations in flight) and for page locks are bounded in the engine and here.

use crate::attrs::{AtomicAccess, AttrMap, Attributes, PreferredLocation};
use crate::error::SvmError;
use crate::range::{FewAllocs, MapCtx, PageTable, Placement, SvmRange, choose_chunk};
use crate::stats::{Bucket, Counters};
use crate::svm::SvmInner;
use drm_pagemap_core::{
    AddressSpace, DeviceId, Error as CoreError, OwnerId, PageBacking, PageSize, PagemapId,
    PagemapOps, RangeProblem, VaRange,
};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

/// How a device accesses memory in a fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    /// A read.
    Read,
    /// A write.
    Write,
    /// An atomic operation: needs the faulting device's own memory.
    Atomic,
}

impl Access {
    fn writes(self) -> bool {
        !matches!(self, Access::Read)
    }
}

/// Where a fault wanted the pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// A pagemap's device memory.
    Device(PagemapId),
    /// System memory.
    System,
}

/// What a fault did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FaultAction {
    /// The range was resident in the target with a valid page table: nothing.
    Valid,
    /// The pages were in the target already; the page table was (re)built.
    Mapped,
    /// The pages were migrated into the target's device memory (`pages` copied; holes are
    /// not copied, they read as zeros from the cleared memory).
    Migrated {
        /// Pages copied.
        pages: usize,
    },
    /// The pages were made system-resident (the target is system memory).
    ToSystem,
    /// Device memory could not be had (full, busy): the pages were made system-resident and
    /// mapped from there.
    FellBack,
}

/// The outcome of one fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultReport {
    /// The SVM range the fault was served for.
    pub range: VaRange,
    /// Its page size.
    pub page_size: PageSize,
    /// Where the pages were wanted.
    pub target: Target,
    /// What was done.
    pub action: FaultAction,
    /// Whether a Busy migration was retried after evicting the range.
    pub busy_retry: bool,
    /// Time from the fault to the page table.
    pub elapsed: Duration,
}

/// The longest sleep of a wait for another device's timeslice before the pages are looked at
/// again.
const TIMESLICE_POLL: Duration = Duration::from_millis(50);

/// How many times one fault looks again after the pages moved under it.
const MAX_ROUNDS: usize = 4;

/// How one migration of a fault places its range.
struct Placing<'a, 'b> {
    /// The destination pagemap.
    pm: PagemapId,
    /// How long the device keeps the pages.
    timeslice: Duration,
    /// `st.scratch` holds the backing as seen under the locks held now.
    fresh: bool,
    /// Mapping for the device's page table.
    cx: &'a MapCtx<'b>,
    /// The page table allows device writes.
    writes: bool,
}

/// The context's migrate lock (read, or write on the evict-and-retry path) and the lock of
/// the range's 2 MiB block, held for a whole fault: the pages the fault looks at, the
/// timeslice check and the migration all see the same state. Fields drop in order: the block
/// lock before the migrate lock.
struct Locks<'a> {
    svm: &'a SvmInner,
    va: VaRange,
    block: Option<MutexGuard<'a, ()>>,
    read: Option<RwLockReadGuard<'a, ()>>,
    write: Option<RwLockWriteGuard<'a, ()>>,
}

impl<'a> Locks<'a> {
    fn read(svm: &'a SvmInner, va: VaRange) -> Locks<'a> {
        let read = svm.migrate_lock.read().unwrap_or_else(|p| p.into_inner());
        let block = svm.block_lock(va);
        Locks {
            svm,
            va,
            block: Some(block),
            read: Some(read),
            write: None,
        }
    }

    /// Trades the read side for the write side (both locks are let go in between).
    fn upgrade(&mut self) {
        if self.write.is_some() {
            return;
        }
        self.block = None;
        self.read = None;
        self.write = Some(
            self.svm
                .migrate_lock
                .write()
                .unwrap_or_else(|p| p.into_inner()),
        );
        self.block = Some(self.svm.block_lock(self.va));
    }
}

struct VmInner {
    svm: Arc<SvmInner>,
    device: DeviceId,
    local: PagemapId,
    owner: OwnerId,
    stats: Arc<Counters>,
    ranges: Mutex<BTreeMap<u64, Arc<SvmRange>>>,
    attrs: RwLock<AttrMap>,
}

/// A GPU VM: one device's mirror of the address space, with SVM ranges and their page tables.
/// Thread-safe; cheap to clone (clones share the VM).
#[derive(Clone)]
pub struct GpuVm {
    inner: Arc<VmInner>,
}

impl std::fmt::Debug for GpuVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuVm")
            .field("device", &self.inner.device)
            .field("local", &self.inner.local)
            .finish_non_exhaustive()
    }
}

/// Whether the CPU range `r` was cut from is still in the address space, with the same page
/// size. `cpu_ranges` is sorted by start.
fn cpu_range_live(cpu_ranges: &[(VaRange, PageSize)], r: &SvmRange) -> bool {
    cpu_ranges
        .binary_search_by_key(&r.cpu.start, |(c, _)| c.start)
        .is_ok_and(|i| cpu_ranges[i] == (r.cpu, r.page_size))
}

/// Whether `cpu` is exactly one range of the address space (whatever its page size): it lies
/// inside one range, and the bytes just before and just after it are not in that range.
/// O(log ranges), no allocation.
fn cpu_range_is(mm: &AddressSpace, cpu: VaRange) -> bool {
    // `generation` of a span succeeds when the span lies inside one range.
    let inside = |start: u64, len: u64| mm.generation(VaRange::new(start, len)).is_ok();
    inside(cpu.start, cpu.len)
        && cpu.start.checked_sub(1).is_none_or(|b| !inside(b, 2))
        && !inside(cpu.end() - 1, 2)
}

/// Whether `e` says the range no longer lies in one CPU range of its page size (the CPU
/// range was freed or re-created under a fault).
fn cpu_range_changed(e: &SvmError) -> bool {
    match e {
        SvmError::Migrate { source, .. }
        | SvmError::ToSystem { source, .. }
        | SvmError::PageTable { source, .. } => matches!(
            source,
            CoreError::BadRange { .. } | CoreError::PageSizeMismatch { .. }
        ),
        _ => false,
    }
}

fn resident(backing: &[PageBacking], target: Target) -> bool {
    match target {
        Target::System => backing.iter().all(|b| matches!(b, PageBacking::System(_))),
        Target::Device(pm) => backing
            .iter()
            .all(|b| matches!(b, PageBacking::Device { pagemap, .. } if *pagemap == pm)),
    }
}

impl GpuVm {
    pub(crate) fn new(
        svm: Arc<SvmInner>,
        local: PagemapId,
        device: DeviceId,
        owner: OwnerId,
    ) -> GpuVm {
        let stats = svm.counters(device);
        GpuVm {
            inner: Arc::new(VmInner {
                svm,
                device,
                local,
                owner,
                stats,
                ranges: Mutex::new(BTreeMap::new()),
                attrs: RwLock::new(AttrMap::default()),
            }),
        }
    }

    /// The VM's device.
    pub fn device(&self) -> DeviceId {
        self.inner.device
    }

    /// The device's own memory.
    pub fn local_pagemap(&self) -> PagemapId {
        self.inner.local
    }

    fn ranges(&self) -> MutexGuard<'_, BTreeMap<u64, Arc<SvmRange>>> {
        self.inner.ranges.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn attrs_at(&self, addr: u64) -> crate::attrs::AttrSpan {
        self.inner
            .attrs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .lookup(addr)
    }

    /// Sets the attributes of `range` (madvise). SVM ranges overlapping it are dropped, so
    /// the next fault cuts and places them under the new attributes.
    pub fn madvise(&self, range: VaRange, attrs: Attributes) -> Result<(), SvmError> {
        let end = range.checked_end().ok_or(CoreError::BadRange {
            range,
            problem: RangeProblem::Overflow,
        })?;
        if range.len == 0 {
            return Err(CoreError::BadRange {
                range,
                problem: RangeProblem::Empty,
            }
            .into());
        }
        if let PreferredLocation::Pagemap(id) = attrs.preferred
            && self.inner.svm.info(id).is_none()
        {
            return Err(SvmError::UnknownPagemap { pagemap: id });
        }
        self.inner
            .attrs
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .set(range.start, end, attrs);
        self.invalidate(range);
        Ok(())
    }

    /// The attributes at `address`.
    pub fn attributes(&self, address: u64) -> Attributes {
        self.attrs_at(address).attrs
    }

    /// Drops every SVM range overlapping `range` with its page table (for a runtime that
    /// unmaps CPU memory, or wants ranges cut again). The pages stay where they are.
    pub fn invalidate(&self, range: VaRange) {
        let gone: Vec<Arc<SvmRange>> = {
            let mut map = self.ranges();
            let keys: Vec<u64> = map
                .range(..range.end())
                .rev()
                .take_while(|(_, r)| r.va.end() > range.start)
                .map(|(&k, _)| k)
                .collect();
            keys.iter().filter_map(|k| map.remove(k)).collect()
        };
        for r in gone {
            let mut st = r.lock();
            st.dropped = true;
            let ops = |id| self.inner.svm.ops_of(id);
            st.unmap(&self.map_ctx(&r, &ops));
        }
    }

    /// The SVM ranges of the VM, in address order.
    pub fn svm_ranges(&self) -> Vec<(VaRange, PageSize)> {
        self.ranges()
            .values()
            .map(|r| (r.va, r.page_size))
            .collect()
    }

    /// Calls `f` with the page table of the SVM range holding `address`, if it has one.
    pub fn with_page_table<R>(
        &self,
        address: u64,
        f: impl FnOnce(&PageTable<'_>) -> R,
    ) -> Option<R> {
        let range = self.lookup(address)?;
        let st = range.lock();
        if st.dropped || !st.mapped {
            return None;
        }
        Some(f(&PageTable {
            range: range.va,
            page_size: range.page_size,
            writable: st.writable,
            ptes: &st.ptes,
        }))
    }

    /// Whether the page table of the SVM range holding `address` still matches where its
    /// pages are (it goes stale when another device, the CPU or an eviction moves them).
    pub fn is_valid(&self, address: u64) -> bool {
        let Some(range) = self.lookup(address) else {
            return false;
        };
        let mut st = range.lock();
        if st.dropped || !st.mapped {
            return false;
        }
        let mm = &self.inner.svm.mm;
        if mm.generation(range.va).is_ok_and(|g| g == st.generation) {
            return true;
        }
        let mut now = std::mem::take(&mut st.scratch);
        let ok = mm.backing(range.va, &mut now).is_ok() && now == st.backing;
        st.scratch = now;
        ok
    }

    /// Moves every device page of `range` (page aligned, inside one range of the address
    /// space) back to system memory, evicting whole the allocations holding them. Runs under
    /// the migrate lock taken for write. Returns the pages moved.
    pub fn evict_range(&self, range: VaRange) -> Result<usize, SvmError> {
        let svm = &self.inner.svm;
        let ps = svm
            .mm
            .ranges()
            .into_iter()
            .find(|(r, _)| r.contains_range(&range))
            .map(|(_, ps)| ps)
            .ok_or(CoreError::BadRange {
                range,
                problem: RangeProblem::NotMapped,
            })?;
        let _w = svm.migrate_lock.write().unwrap_or_else(|p| p.into_inner());
        svm.evict_range(
            range,
            ps,
            self.inner.device,
            &self.inner.stats,
            &mut Vec::new(),
        )
    }

    fn lookup(&self, address: u64) -> Option<Arc<SvmRange>> {
        let map = self.ranges();
        let (_, r) = map.range(..=address).next_back()?;
        (r.va.end() > address).then(|| r.clone())
    }

    fn map_ctx<'a>(
        &'a self,
        r: &SvmRange,
        ops: &'a dyn Fn(PagemapId) -> Option<Arc<dyn PagemapOps>>,
    ) -> MapCtx<'a> {
        MapCtx {
            mm: &self.inner.svm.mm,
            ops,
            device: self.inner.device,
            va: r.va,
            page_size: r.page_size,
        }
    }

    /// Finds the SVM range holding `address`, or cuts a new one.
    fn find_or_create(&self, address: u64) -> Result<Arc<SvmRange>, SvmError> {
        if let Some(r) = self.lookup(address) {
            return Ok(r);
        }
        let not_mirrored = SvmError::NotMirrored {
            device: self.inner.device,
            address,
        };
        // Sorted by start: the CPU ranges do not overlap.
        let cpu_ranges = self.inner.svm.mm.ranges();
        let i = cpu_ranges.partition_point(|(r, _)| r.start <= address);
        let (cpu, ps) = i
            .checked_sub(1)
            .map(|i| cpu_ranges[i])
            .filter(|(r, _)| address < r.end())
            .ok_or(not_mirrored)?;
        let span = self.attrs_at(address);
        let (lo, hi) = (cpu.start.max(span.start), cpu.end().min(span.end));
        let (range, stale) = {
            let mut map = self.ranges();
            if let Some((_, r)) = map.range(..=address).next_back()
                && r.va.end() > address
            {
                return Ok(r.clone());
            }
            // Ranges cut from a CPU range that is gone (freed, or re-created with another
            // extent or page size) cannot stay in the way of the new one (every range lies in
            // one 2 MiB block). Ranges of the other live CPU ranges in the block stay: they
            // never overlap the new one, which lies inside its own CPU range.
            let block = address - address % PageSize::Size2M.bytes();
            let block_end = block.saturating_add(PageSize::Size2M.bytes());
            let stale_keys: Vec<u64> = map
                .range(..block_end)
                .rev()
                .take_while(|(_, r)| r.va.end() > block)
                .filter(|(_, r)| !cpu_range_live(&cpu_ranges, r))
                .map(|(&k, _)| k)
                .collect();
            let stale: Vec<Arc<SvmRange>> =
                stale_keys.iter().filter_map(|k| map.remove(k)).collect();
            let va = choose_chunk(address, ps, lo, hi, &map);
            let range = Arc::new(SvmRange::new(va, ps, cpu));
            map.insert(va.start, range.clone());
            (range, stale)
        };
        for r in stale {
            let mut st = r.lock();
            st.dropped = true;
            let ops = |id| self.inner.svm.ops_of(id);
            st.unmap(&self.map_ctx(&r, &ops));
        }
        Ok(range)
    }

    /// Removes `range` from the VM (it no longer matches the address space).
    fn drop_range(&self, range: &Arc<SvmRange>, st: &mut crate::range::RangeState) {
        {
            let mut map = self.ranges();
            if map
                .get(&range.va.start)
                .is_some_and(|r| Arc::ptr_eq(r, range))
            {
                map.remove(&range.va.start);
            }
        }
        st.dropped = true;
        let ops = |id| self.inner.svm.ops_of(id);
        st.unmap(&self.map_ctx(range, &ops));
    }

    /// Serves a device fault at `address`: places the SVM range holding it where the
    /// attributes and `access` want it and builds the device's page table for it. See the
    /// module documentation for the steps. On error every page's data is where it was.
    pub fn handle_gpu_fault(&self, address: u64, access: Access) -> Result<FaultReport, SvmError> {
        let t0 = Instant::now();
        let r = self.fault(address, access, t0);
        let stats = &self.inner.stats;
        match &r {
            Ok(rep) => {
                stats.faults[Bucket::of(rep.range.len).index()].add(rep.range.len, rep.elapsed);
                match rep.action {
                    FaultAction::Valid => stats.valid_faults.inc(),
                    FaultAction::FellBack => stats.fallbacks.inc(),
                    _ => {}
                }
            }
            Err(_) => stats.fault_errors.inc(),
        }
        r
    }

    fn fault(&self, address: u64, access: Access, t0: Instant) -> Result<FaultReport, SvmError> {
        for _ in 0..MAX_ROUNDS {
            let range = self.find_or_create(address)?;
            let mut st = range.lock();
            if st.dropped {
                continue;
            }
            match self.fault_range(&range, &mut st, access, t0)? {
                Some(rep) => return Ok(rep),
                None => self.drop_range(&range, &mut st),
            }
        }
        Err(SvmError::Unstable {
            range: VaRange::new(address - address % 4096, 4096),
            device: self.inner.device,
        })
    }

    /// Where a fault with `access` under `attrs` wants the pages, and whether it must be the
    /// device's own memory.
    fn pick(
        &self,
        va: VaRange,
        access: Access,
        attrs: &Attributes,
    ) -> Result<(Target, bool), SvmError> {
        if access == Access::Atomic {
            if attrs.atomic == AtomicAccess::Cpu {
                return Err(SvmError::AtomicDenied {
                    range: va,
                    device: self.inner.device,
                });
            }
            return Ok((Target::Device(self.inner.local), true));
        }
        let t = match attrs.preferred {
            PreferredLocation::Default => Target::Device(self.inner.local),
            PreferredLocation::System => Target::System,
            PreferredLocation::Pagemap(id) => match self.inner.svm.info(id) {
                Some(i) if i.owner == self.inner.owner => Target::Device(id),
                Some(_) => Target::System,
                None => return Err(SvmError::UnknownPagemap { pagemap: id }),
            },
        };
        Ok((t, false))
    }

    /// Whether the device can map every page where it is (system memory, or a pagemap of
    /// its owner).
    fn reachable(&self, backing: &[PageBacking]) -> bool {
        backing.iter().all(|b| match *b {
            PageBacking::Unpopulated => false,
            PageBacking::System(_) => true,
            PageBacking::Device { pagemap, .. } => {
                pagemap == self.inner.local || {
                    match self.inner.svm.info(pagemap) {
                        Some(i) => i.owner == self.inner.owner,
                        None => self
                            .inner
                            .svm
                            .mm
                            .pagemap(pagemap)
                            .is_some_and(|p| p.owner() == self.inner.owner),
                    }
                }
            }
        })
    }

    /// [`GpuVm::touch`] for the backing the page table was built from (`st.backing`):
    /// without a look at every page when they all live in `pm`.
    fn touch_built(&self, st: &crate::range::RangeState, pm: PagemapId) {
        if st.home == Some(Placement::Device(pm)) {
            if let Some(info) = self.inner.svm.info(pm) {
                info.account.touch(st.allocs.iter());
            }
        } else {
            self.touch(&st.backing, pm);
        }
    }

    /// Marks the allocations holding the range's pages in `pm` as most recently used.
    fn touch(&self, backing: &[PageBacking], pm: PagemapId) {
        let Some(info) = self.inner.svm.info(pm) else {
            return;
        };
        let mut few = FewAllocs::default();
        for b in backing {
            if let PageBacking::Device { pagemap, alloc, .. } = *b
                && pagemap == pm
            {
                few.add(alloc);
            }
        }
        info.account.touch(few.iter());
    }

    fn fault_range(
        &self,
        range: &Arc<SvmRange>,
        st: &mut crate::range::RangeState,
        access: Access,
        t0: Instant,
    ) -> Result<Option<FaultReport>, SvmError> {
        let svm = &self.inner.svm;
        let device = self.inner.device;
        let attrs = self.attrs_at(range.va.start).attrs;
        let (target, need_dev) = self.pick(range.va, access, &attrs)?;
        let writes = access.writes();
        let ops = |id| svm.ops_of(id);
        let cx = self.map_ctx(range, &ops);
        let report_at = |action, busy_retry, now: Instant| FaultReport {
            range: range.va,
            page_size: range.page_size,
            target,
            action,
            busy_retry,
            elapsed: now - t0,
        };
        let report = |action, busy_retry| report_at(action, busy_retry, Instant::now());
        let mut action = None;
        let mut busy_retry = false;
        let mut locks = Locks::read(svm, range.va);
        let home = match target {
            Target::System => Placement::System,
            Target::Device(pm) => Placement::Device(pm),
        };
        // A valid fault without a look at every page: the pages have not changed since the
        // page table was built (same generation), and they were all in the target then.
        if st.mapped
            && (st.writable || !writes)
            && st.home == Some(home)
            && svm
                .mm
                .generation(range.va)
                .is_ok_and(|g| g == st.generation)
        {
            if let Target::Device(pm) = target {
                self.touch_built(st, pm);
            }
            return Ok(Some(report(FaultAction::Valid, false)));
        }
        // The generation moved: the CPU range may have been freed and created again. A range
        // cut from one that is gone is not served (a new range cut in its block would drop
        // it, and it may no longer be the chunk the CPU range calls for).
        if !cpu_range_is(&svm.mm, range.cpu) {
            return Ok(None);
        }
        for round in 0..MAX_ROUNDS {
            let generation = match svm.mm.backing_with_generation(range.va, &mut st.scratch) {
                Ok(g) => g,
                Err(CoreError::BadRange { .. } | CoreError::PageSizeMismatch { .. }) => {
                    return Ok(None);
                }
                Err(source) => {
                    return Err(SvmError::PageTable {
                        range: range.va,
                        device,
                        source,
                    });
                }
            };
            if st.scratch.len() as u64 != range.va.len / range.page_size.bytes() {
                // The CPU range was re-created (same extent) with another page size.
                return Ok(None);
            }
            let at_target = resident(&st.scratch, target);
            if round == 0
                && at_target
                && st.mapped
                && st.scratch == st.backing
                && (st.writable || !writes)
            {
                // The page table still matches (only a neighbour's generation moved).
                st.generation = generation;
                if let Target::Device(pm) = target {
                    self.touch_built(st, pm);
                }
                return Ok(Some(report(FaultAction::Valid, false)));
            }
            let usable = at_target || (round > 0 && !need_dev && self.reachable(&st.scratch));
            if usable {
                let t = Instant::now();
                match st.build(&cx, writes, generation) {
                    Ok(()) => {
                        let built = Instant::now();
                        self.inner.stats.page_tables.add(range.va.len, built - t);
                        if let Target::Device(pm) = target {
                            self.touch_built(st, pm);
                        }
                        return Ok(Some(report_at(
                            action.unwrap_or(FaultAction::Mapped),
                            busy_retry,
                            built,
                        )));
                    }
                    Err(source) if round + 1 == MAX_ROUNDS => {
                        return Err(SvmError::PageTable {
                            range: range.va,
                            device,
                            source,
                        });
                    }
                    // The pages moved somewhere the device cannot reach: place them again.
                    Err(_) => {}
                }
            }
            // `st.scratch` is the backing as seen under the locks still held.
            let (a, retried, built) =
                match self.place(range, st, target, need_dev, &attrs, &mut locks, &cx, writes) {
                    Ok(done) => done,
                    // The CPU range went or was re-created while the pages were placed.
                    Err(e) if cpu_range_changed(&e) => return Ok(None),
                    Err(e) => return Err(e),
                };
            action = Some(a);
            busy_retry |= retried;
            if built {
                // The page table was built while the copies ran, for the backing the
                // migration committed: no second look at the pages.
                if let Target::Device(pm) = target {
                    self.touch_built(st, pm);
                }
                return Ok(Some(report(a, busy_retry)));
            }
        }
        Err(SvmError::Unstable {
            range: range.va,
            device,
        })
    }

    /// Puts the range's pages in `target` (step 3 of the module documentation). Returns
    /// what was done, whether a Busy retry happened, and whether the page table for the
    /// new placement is built already (a migration builds it while its copies run).
    #[allow(clippy::too_many_arguments)]
    fn place(
        &self,
        range: &SvmRange,
        st: &mut crate::range::RangeState,
        target: Target,
        need_dev: bool,
        attrs: &Attributes,
        locks: &mut Locks<'_>,
        cx: &MapCtx<'_>,
        writes: bool,
    ) -> Result<(FaultAction, bool, bool), SvmError> {
        let svm = &self.inner.svm;
        let (va, ps, device, stats) = (
            range.va,
            range.page_size,
            self.inner.device,
            &*self.inner.stats,
        );
        let pm = match target {
            Target::System => {
                svm.to_system(va, ps, device, stats, &st.scratch)?;
                return Ok((FaultAction::ToSystem, false, false));
            }
            Target::Device(pm) => pm,
        };
        let attempts = if need_dev { 3 } else { 1 };
        let mut timeslice = attrs.timeslice;
        let mut busy_retry = false;
        let mut last = None;
        for attempt in 0..attempts {
            // The first attempt starts from the backing the caller just looked at.
            let fresh = attempt == 0;
            let how = Placing {
                pm,
                timeslice,
                fresh,
                cx,
                writes,
            };
            match self.migrate(range, st, &how, &mut busy_retry, locks) {
                Ok((pages, built)) => {
                    return Ok((FaultAction::Migrated { pages }, busy_retry, built));
                }
                Err(e) if e.is_busy() || e.allows_fallback() => {
                    last = Some(e);
                    timeslice = timeslice.saturating_mul(2);
                }
                Err(e) => return Err(e),
            }
        }
        let e = last.expect("an attempt failed");
        if !need_dev && e.allows_fallback() {
            svm.to_system(va, ps, device, stats, &st.scratch)?;
            return Ok((FaultAction::FellBack, busy_retry, false));
        }
        Err(e)
    }

    /// One migration attempt into `how.pm` under the read lock; on Busy, the write lock is
    /// taken instead, the range evicted and the migration retried once. Returns the pages
    /// copied and whether the page table for them is built.
    fn migrate(
        &self,
        range: &SvmRange,
        st: &mut crate::range::RangeState,
        how: &Placing<'_, '_>,
        busy_retry: &mut bool,
        locks: &mut Locks<'_>,
    ) -> Result<(usize, bool), SvmError> {
        let svm = &self.inner.svm;
        let (va, ps, device, stats) = (
            range.va,
            range.page_size,
            self.inner.device,
            &*self.inner.stats,
        );
        self.wait_timeslices(range, st, how.pm, how.fresh)?;
        match self.migrate_building(range, st, how) {
            Err(e) if e.is_busy() => {}
            other => return other,
        }
        *busy_retry = true;
        stats.busy_retries.inc();
        locks.upgrade();
        self.wait_timeslices(range, st, how.pm, false)?;
        svm.evict_range(va, ps, device, stats, &mut st.scratch)?;
        self.migrate_building(range, st, how)
    }

    /// Migrates the range into `how.pm`, building the device's page table for the pages'
    /// new home while the copies run (the backing a committed migration leaves is known
    /// from its allocation). Returns the pages copied and whether the page table is built;
    /// a page table built for a migration that did not commit is unmapped again.
    fn migrate_building(
        &self,
        range: &SvmRange,
        st: &mut crate::range::RangeState,
        how: &Placing<'_, '_>,
    ) -> Result<(usize, bool), SvmError> {
        let stats = &*self.inner.stats;
        let mut built: Option<Duration> = None;
        let r = self.inner.svm.migrate_range(
            range.va,
            range.page_size,
            how.pm,
            how.timeslice,
            self.inner.device,
            stats,
            &mut |alloc, pfns| {
                let t = Instant::now();
                if st
                    .build_for(how.cx, how.writes, how.pm, alloc, pfns)
                    .is_ok()
                {
                    built = Some(t.elapsed());
                }
            },
        );
        match (r, built) {
            (Ok((pages, Some(generation))), Some(took)) => {
                st.generation = generation;
                stats.page_tables.add(range.va.len, took);
                #[cfg(debug_assertions)]
                if let Some(same) = st.backing_matches(how.cx) {
                    debug_assert!(same, "{}: page table built for another backing", range.va);
                }
                Ok((pages, true))
            }
            (r, took) => {
                if took.is_some() {
                    // Built for pages that did not move.
                    st.unmap(how.cx);
                }
                r.map(|(pages, _)| (pages, false))
            }
        }
    }

    /// Sleeps until no page of the range is held by another pagemap's allocation whose
    /// timeslice has not expired (the bound on ping-pong between devices), or the pages left
    /// that allocation (evicted, freed). A timeslice of [`crate::FOREVER`] or more
    /// (`Duration::MAX`) is only ended that way.
    /// `fresh`: `st.scratch` already holds the current backing.
    fn wait_timeslices(
        &self,
        range: &SvmRange,
        st: &mut crate::range::RangeState,
        pm: PagemapId,
        fresh: bool,
    ) -> Result<(), SvmError> {
        let mm = &self.inner.svm.mm;
        let mut waited = Duration::ZERO;
        let mut look = !fresh;
        loop {
            if look {
                mm.backing(range.va, &mut st.scratch)
                    .map_err(|source| SvmError::PageTable {
                        range: range.va,
                        device: self.inner.device,
                        source,
                    })?;
            }
            look = true;
            // The clock is read only when a page of another pagemap is met.
            let mut now: Option<Instant> = None;
            let mut until: Option<Instant> = None;
            let mut seen = FewAllocs::default();
            for b in &st.scratch {
                if let PageBacking::Device { pagemap, alloc, .. } = *b
                    && pagemap != pm
                    && seen.add(alloc)
                    && let Some(info) = mm.allocation(alloc)
                    && info.expires > *now.get_or_insert_with(Instant::now)
                {
                    until = Some(until.map_or(info.expires, |u| u.max(info.expires)));
                }
            }
            let (Some(until), Some(now)) = (until, now) else {
                break;
            };
            // Timeslices reach the engine cut to `FOREVER`, so `until` is a real instant. Sleep
            // in slices and look again: pages evicted (or freed) meanwhile end a long wait.
            let d = until.saturating_duration_since(now).min(TIMESLICE_POLL);
            std::thread::sleep(d);
            waited = waited.saturating_add(d);
        }
        if !waited.is_zero() {
            self.inner.stats.timeslice_waits.add(0, waited);
        }
        Ok(())
    }
}
