//! One GPU fault on one SVM range ([`Fault`]), its steps in the order they run, and what a
//! fault reports ([`FaultReport`]).
//!
//! # The steps
//! [`crate::GpuVm::handle_gpu_fault`] finds or creates the SVM range holding the address (cut
//! from the CPU range holding it; see [`crate::CHUNK_SIZES`] and the chunking rules of the
//! range module: a range whose CPU range is gone or was re-created with another page size is
//! dropped and cut again, ranges of live neighbouring CPU ranges are never touched), locks it
//! and runs a [`Fault`] on it:
//! 1. **Target** ([`Fault::serve`]). An atomic access needs the faulting device's own memory
//!    (refused when the range's atomic attribute is [`AtomicAccess::Cpu`]). Otherwise the
//!    preferred location: the device's own memory by default, a pagemap (a peer's memory), or
//!    system memory. The context's locks for the range are taken ([`Locks`]).
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
//!    a peer's (same owner), or system memory. If pages moved meanwhile the fault looks
//!    again (bounded), so the table it leaves matches the pages it saw last. After a
//!    migration the table is built while the copies run, for the backing the migration
//!    leaves once it commits (every page in the new allocation, in order; the engine's
//!    [`drm_pagemap_core::AddressSpace::migrate_to_devmem_with`]), and stamped with the
//!    generation the commit reports; a migration that does not commit unmaps it again.
//!
//! The moves themselves (allocate with LRU eviction, migrate, evict, make system-resident)
//! are the context's ([`crate::context`]); the lock order is documented there.

use crate::attrs::{AtomicAccess, Attributes, PreferredLocation};
use crate::context::{Locks, Span, VmDevice};
use crate::error::SvmError;
use crate::range::{FewAllocs, MapCtx, Placement, RangeState, SvmRange};
use drm_pagemap_core::{
    AddressSpace, Error as CoreError, PageBacking, PageSize, PagemapId, VaRange,
};
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

/// How many times one fault looks again after the pages moved under it (and how many times
/// the VM cuts a range again for one fault).
pub(crate) const MAX_ROUNDS: usize = 4;

/// One fault on one SVM range, under the range's lock and the context's locks for it.
pub(crate) struct Fault<'a> {
    /// The faulting VM's seat in the context.
    dev: &'a VmDevice,
    range: &'a SvmRange,
    /// The range's state; `st.scratch` holds the backing as last looked at.
    st: &'a mut RangeState,
    /// Where the pages are wanted.
    target: Target,
    /// The target must be the device's own memory (an atomic access).
    need_dev: bool,
    /// How long the device keeps pages it migrates in (the range's attribute).
    timeslice: Duration,
    /// The page table allows device writes.
    writes: bool,
    /// Mapping for the device's page table.
    cx: MapCtx<'a>,
    locks: Locks<'a>,
    /// When the fault started.
    t0: Instant,
    /// What placing the pages did, if they were placed.
    action: Option<FaultAction>,
    /// A Busy migration was retried after evicting the range.
    busy_retry: bool,
}

impl<'a> Fault<'a> {
    /// Serves a fault of `dev` with `access` (started at `t0`) on `range` (locked: `st`),
    /// whose attributes are `attrs`. Step 1: where the fault wants the range's pages (an
    /// error for an atomic access the attributes refuse, or an unknown preferred pagemap);
    /// then the context's locks for the range are taken and the other steps run
    /// ([`Fault::run`]). `None`: the range no longer lies in the CPU range it was cut from
    /// (freed, or re-created with another page size): the VM drops it and cuts it again.
    ///
    /// `serve` and `run` are inlined into the VM's fault entry, so the fault's state stays
    /// in registers as it did when this was one function (out of line, a valid fault cost
    /// about 50 more instructions, ~10 ns).
    #[inline]
    pub(crate) fn serve(
        dev: &'a VmDevice,
        range: &'a SvmRange,
        st: &'a mut RangeState,
        access: Access,
        attrs: &Attributes,
        t0: Instant,
    ) -> Result<Option<FaultReport>, SvmError> {
        let (target, need_dev) = target(dev, range.va, access, attrs)?;
        Fault {
            dev,
            range,
            st,
            target,
            need_dev,
            timeslice: attrs.timeslice,
            writes: access.writes(),
            cx: dev.map_ctx(range),
            locks: Locks::read(&dev.svm, range.va),
            t0,
            action: None,
            busy_retry: false,
        }
        .run()
    }

    /// Steps 2 to 4, under the locks.
    #[inline]
    fn run(&mut self) -> Result<Option<FaultReport>, SvmError> {
        // Step 2, without a look at every page: the pages have not changed since the page
        // table was built (same generation), and they were all in the target then.
        if self.built_unchanged() {
            return Ok(Some(self.finish(FaultAction::Valid, None)));
        }
        // The generation moved: the CPU range may have been freed and created again. A range
        // cut from one that is gone is not served (a new range cut in its block would drop
        // it, and it may no longer be the chunk the CPU range calls for).
        if !cpu_range_is(&self.dev.svm.mm, self.range.cpu) {
            return Ok(None);
        }
        for round in 0..MAX_ROUNDS {
            let Some(generation) = self.look()? else {
                return Ok(None);
            };
            // Step 2, from the pages as they are.
            let at_target = resident(&self.st.scratch, self.target);
            if round == 0 && at_target && self.table_matches() {
                // The page table still matches (only a neighbour's generation moved).
                self.st.generation = generation;
                return Ok(Some(self.finish(FaultAction::Valid, None)));
            }
            // Step 4 for pages the device may use where they are.
            if at_target || (round > 0 && !self.need_dev && self.reachable()) {
                match self.page_table(generation) {
                    Ok(built) => {
                        let action = self.action.unwrap_or(FaultAction::Mapped);
                        return Ok(Some(self.finish(action, Some(built))));
                    }
                    Err(source) if round + 1 == MAX_ROUNDS => {
                        return Err(self.page_table_error(source));
                    }
                    // The pages moved somewhere the device cannot reach: place them again.
                    Err(_) => {}
                }
            }
            // Step 3 (and step 4 while a migration's copies run).
            match self.place() {
                Ok(Some(action)) => {
                    // The page table was built while the copies ran, for the backing the
                    // migration committed: no second look at the pages.
                    return Ok(Some(self.finish(action, None)));
                }
                // Look at the pages again and map them where they are.
                Ok(None) => {}
                // The CPU range went or was re-created while the pages were placed.
                Err(e) if cpu_range_changed(&e) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
        Err(SvmError::Unstable {
            range: self.range.va,
            device: self.dev.device,
        })
    }

    /// The fault's report, made once its page table is done (at `built`, or now); the
    /// allocations holding the pages in the target become most recently used.
    #[inline]
    fn finish(&self, action: FaultAction, built: Option<Instant>) -> FaultReport {
        if let Target::Device(pm) = self.target {
            self.touch_built(pm);
        }
        let now = built.unwrap_or_else(Instant::now);
        FaultReport {
            range: self.range.va,
            page_size: self.range.page_size,
            target: self.target,
            action,
            busy_retry: self.busy_retry,
            elapsed: now - self.t0,
        }
    }

    /// The range as this fault moves it.
    fn span(&self) -> Span<'a> {
        self.dev.span(self.range.va, self.range.page_size)
    }

    fn page_table_error(&self, source: CoreError) -> SvmError {
        SvmError::PageTable {
            range: self.range.va,
            device: self.dev.device,
            source,
        }
    }

    /// Step 2's check without a look at the pages: the page table is mapped (writable if need
    /// be) for pages all in the target, and their generation has not moved since.
    fn built_unchanged(&self) -> bool {
        let home = match self.target {
            Target::System => Placement::System,
            Target::Device(pm) => Placement::Device(pm),
        };
        let st = &*self.st;
        st.mapped
            && (st.writable || !self.writes)
            && st.home == Some(home)
            && self
                .dev
                .svm
                .mm
                .generation(self.range.va)
                .is_ok_and(|g| g == st.generation)
    }

    /// Step 2's check against the pages just looked at: the page table is mapped (writable if
    /// need be) for this very backing.
    fn table_matches(&self) -> bool {
        let st = &*self.st;
        st.mapped && st.scratch == st.backing && (st.writable || !self.writes)
    }

    /// Looks at the pages (into `st.scratch`): their generation, or `None` when the range no
    /// longer lies in one CPU range of its page size.
    fn look(&mut self) -> Result<Option<u64>, SvmError> {
        let range = self.range;
        let generation = match self
            .dev
            .svm
            .mm
            .backing_with_generation(range.va, &mut self.st.scratch)
        {
            Ok(g) => g,
            Err(CoreError::BadRange { .. } | CoreError::PageSizeMismatch { .. }) => {
                return Ok(None);
            }
            Err(source) => return Err(self.page_table_error(source)),
        };
        if self.st.scratch.len() as u64 != range.va.len / range.page_size.bytes() {
            // The CPU range was re-created (same extent) with another page size.
            return Ok(None);
        }
        Ok(Some(generation))
    }

    /// Step 4: builds the page table from the pages as last looked at. Returns when it was
    /// done.
    fn page_table(&mut self, generation: u64) -> Result<Instant, CoreError> {
        let t = Instant::now();
        self.st.build(&self.cx, self.writes, generation)?;
        let built = Instant::now();
        self.dev.stats.page_tables.add(self.range.va.len, built - t);
        tracing::trace!(target: "xe_svm", range = %self.range.va, "page table built");
        Ok(built)
    }

    /// Step 3: puts the range's pages in the target, starting from the backing looked at
    /// last (under the locks still held). Returns what was done when the page table for the
    /// new placement is built already (a migration builds it while its copies run); `None`
    /// when it is still to build (what was done is then kept for the report).
    fn place(&mut self) -> Result<Option<FaultAction>, SvmError> {
        let pm = match self.target {
            Target::System => return self.make_system_resident(FaultAction::ToSystem),
            Target::Device(pm) => pm,
        };
        let attempts = if self.need_dev { 3 } else { 1 };
        let mut timeslice = self.timeslice;
        let mut last = None;
        for attempt in 0..attempts {
            // The first attempt starts from the backing the caller just looked at.
            let fresh = attempt == 0;
            match self.migrate(pm, timeslice, fresh) {
                Ok((pages, built)) => {
                    let action = FaultAction::Migrated { pages };
                    self.action = Some(action);
                    return Ok(built.then_some(action));
                }
                Err(e) if e.is_busy() || e.allows_fallback() => {
                    last = Some(e);
                    timeslice = timeslice.saturating_mul(2);
                }
                Err(e) => return Err(e),
            }
        }
        let e = last.expect("an attempt failed");
        if !self.need_dev && e.allows_fallback() {
            return self.make_system_resident(FaultAction::FellBack);
        }
        Err(e)
    }

    /// Makes the pages system-resident, done as `action`.
    fn make_system_resident(
        &mut self,
        action: FaultAction,
    ) -> Result<Option<FaultAction>, SvmError> {
        self.dev.svm.to_system(self.span(), &self.st.scratch)?;
        self.action = Some(action);
        Ok(None)
    }

    /// One migration attempt into `pm` under the read lock; on Busy, the write lock is taken
    /// instead, the range evicted and the migration retried once. `fresh`: `st.scratch` holds
    /// the backing as seen under the locks held now. Returns the pages copied and whether
    /// the page table for them is built.
    fn migrate(
        &mut self,
        pm: PagemapId,
        timeslice: Duration,
        fresh: bool,
    ) -> Result<(usize, bool), SvmError> {
        self.wait_timeslices(pm, fresh)?;
        match self.migrate_building(pm, timeslice) {
            Err(e) if e.is_busy() => {}
            other => return other,
        }
        self.busy_retry = true;
        self.dev.stats.busy_retries.inc();
        self.locks.upgrade();
        self.wait_timeslices(pm, false)?;
        self.dev
            .svm
            .evict_range(self.span(), &mut self.st.scratch)?;
        self.migrate_building(pm, timeslice)
    }

    /// Migrates the range into `pm`, building the device's page table for the pages' new
    /// home while the copies run (the backing a committed migration leaves is known from its
    /// allocation). Returns the pages copied and whether the page table is built; a page
    /// table built for a migration that did not commit is unmapped again.
    fn migrate_building(
        &mut self,
        pm: PagemapId,
        timeslice: Duration,
    ) -> Result<(usize, bool), SvmError> {
        let (dev, span, writes) = (self.dev, self.span(), self.writes);
        let (st, cx) = (&mut *self.st, &self.cx);
        let mut built: Option<Duration> = None;
        let r = dev
            .svm
            .migrate_range(span, pm, timeslice, &mut |alloc, pfns| {
                let t = Instant::now();
                if st.build_for(cx, writes, pm, alloc, pfns).is_ok() {
                    built = Some(t.elapsed());
                }
            });
        match (r, built) {
            (Ok((pages, Some(generation))), Some(took)) => {
                st.generation = generation;
                dev.stats.page_tables.add(span.va.len, took);
                tracing::trace!(
                    target: "xe_svm",
                    range = %span.va,
                    "page table built while copying"
                );
                #[cfg(debug_assertions)]
                if let Some(same) = st.backing_matches(cx) {
                    debug_assert!(same, "{}: page table built for another backing", span.va);
                }
                Ok((pages, true))
            }
            (r, took) => {
                if took.is_some() {
                    // Built for pages that did not move.
                    st.unmap(cx);
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
    fn wait_timeslices(&mut self, pm: PagemapId, fresh: bool) -> Result<(), SvmError> {
        let mm = &self.dev.svm.mm;
        let mut waited = Duration::ZERO;
        let mut look = !fresh;
        loop {
            if look {
                mm.backing(self.range.va, &mut self.st.scratch)
                    .map_err(|source| SvmError::PageTable {
                        range: self.range.va,
                        device: self.dev.device,
                        source,
                    })?;
            }
            look = true;
            // The clock is read only when a page of another pagemap is met.
            let mut now: Option<Instant> = None;
            let mut until: Option<Instant> = None;
            let mut seen = FewAllocs::default();
            for b in &self.st.scratch {
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
            self.dev.stats.timeslice_waits.add(0, waited);
        }
        Ok(())
    }

    /// Whether the device can map every page where it is (system memory, or a pagemap of
    /// its owner).
    fn reachable(&self) -> bool {
        let dev = self.dev;
        self.st.scratch.iter().all(|b| match *b {
            PageBacking::Unpopulated => false,
            PageBacking::System(_) => true,
            PageBacking::Device { pagemap, .. } => {
                pagemap == dev.local || {
                    match dev.svm.info(pagemap) {
                        Some(i) => i.owner == dev.owner,
                        None => dev
                            .svm
                            .mm
                            .pagemap(pagemap)
                            .is_some_and(|p| p.owner() == dev.owner),
                    }
                }
            }
        })
    }

    /// Marks the allocations holding the range's pages in `pm`, as the page table was built
    /// from them (`st.backing`), as most recently used: without a look at every page when
    /// they all live in `pm`.
    fn touch_built(&self, pm: PagemapId) {
        let Some(info) = self.dev.svm.info(pm) else {
            return;
        };
        let st = &*self.st;
        if st.home == Some(Placement::Device(pm)) {
            info.account.touch(st.allocs.iter());
        } else {
            let mut few = FewAllocs::default();
            for b in &st.backing {
                if let PageBacking::Device { pagemap, alloc, .. } = *b
                    && pagemap == pm
                {
                    few.add(alloc);
                }
            }
            info.account.touch(few.iter());
        }
    }
}

/// Step 1: where a fault of `dev` with `access` under `attrs` wants the pages of `va`, and
/// whether it must be the device's own memory.
fn target(
    dev: &VmDevice,
    va: VaRange,
    access: Access,
    attrs: &Attributes,
) -> Result<(Target, bool), SvmError> {
    if access == Access::Atomic {
        if attrs.atomic == AtomicAccess::Cpu {
            return Err(SvmError::AtomicDenied {
                range: va,
                device: dev.device,
            });
        }
        return Ok((Target::Device(dev.local), true));
    }
    let t = match attrs.preferred {
        PreferredLocation::Default => Target::Device(dev.local),
        PreferredLocation::System => Target::System,
        PreferredLocation::Pagemap(id) => match dev.svm.info(id) {
            Some(i) if i.owner == dev.owner => Target::Device(id),
            Some(_) => Target::System,
            None => return Err(SvmError::UnknownPagemap { pagemap: id }),
        },
    };
    Ok((t, false))
}

/// Whether every page of `backing` lives in `target`.
fn resident(backing: &[PageBacking], target: Target) -> bool {
    match target {
        Target::System => backing.iter().all(|b| matches!(b, PageBacking::System(_))),
        Target::Device(pm) => backing
            .iter()
            .all(|b| matches!(b, PageBacking::Device { pagemap, .. } if *pagemap == pm)),
    }
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
