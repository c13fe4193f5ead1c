//! Migration to device memory: collect -> classify -> plan -> map -> issue every call ->
//! wait once -> commit all pages, or roll back leaving every source page as it was.

use crate::alloc::{AllocId, AllocState, Release, release_all};
use crate::backend::{CopyRequest, Pagemap};
use crate::error::{BackendError, Error, RangeProblem, Result};
use crate::fence::Fence;
use crate::mm::{AddressSpace, Deferred, Span};
use crate::page::{Kind, PageEntry, RmapEntry, Summary};
use crate::plan::{Classified, Coalesce, Plan, PlanParams, Verdict, plan, plan_into};
use crate::types::{
    CopyOp, DeviceId, Direction, DmaAddr, HostFrame, PageSize, PagemapId, Pfn, VaRange,
};
use std::time::{Duration, Instant};

/// How a migration behaves (upstream `drm_pagemap_migrate_details`, plus our choices).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MigrateDetails {
    /// How long the new device pages stay before a CPU access may move them back.
    pub timeslice: Duration,
    /// The copy engine can copy pages already in the destination pagemap.
    pub can_migrate_same_pagemap: bool,
    /// Pages of a peer pagemap are pushed by their own device (`copy_to_ram` of the source)
    /// rather than read by the destination (`copy_to_devmem`).
    pub source_peer_migrates: bool,
    /// How pages are grouped into copy calls.
    pub coalesce: Coalesce,
    /// Longest wait for any fence; `None`: no limit. On timeout the migration fails with
    /// every source page intact; the destination is released once its copies signal.
    pub fence_timeout: Option<Duration>,
}

impl Default for MigrateDetails {
    fn default() -> Self {
        MigrateDetails {
            timeslice: Duration::ZERO,
            can_migrate_same_pagemap: false,
            source_peer_migrates: true,
            coalesce: Coalesce::BySource,
            fence_timeout: None,
        }
    }
}

/// One copy call that was issued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyCall {
    /// The pagemap whose device executed it.
    pub executor: PagemapId,
    /// That device.
    pub device: DeviceId,
    /// The operation.
    pub op: CopyOp,
    /// Pages it moved.
    pub pages: usize,
    /// Index (in the range) of its first page.
    pub first_page: usize,
}

/// What a migration did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MigrateOutcome {
    /// Pages moved; the allocation holds them.
    Migrated,
    /// Every page already lived in the destination; nothing was copied.
    NotNeeded,
}

/// Where the time of a migration went.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MigrateTiming {
    /// Collecting, classifying and coalescing.
    pub plan: Duration,
    /// Mapping pages for the executing devices.
    pub map: Duration,
    /// Issuing the copy calls.
    pub issue: Duration,
    /// Waiting for the copies (and the pre-migrate fence).
    pub wait: Duration,
    /// Committing the page table and freeing the old pages.
    pub commit: Duration,
}

/// The result of a successful migration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MigrateReport {
    /// Whether pages moved.
    pub outcome: MigrateOutcome,
    /// The allocation now holding the pages (`None` when not needed).
    pub alloc: Option<AllocId>,
    /// Pages in the range.
    pub pages: usize,
    /// The copy calls, in issue order.
    pub calls: Vec<CopyCall>,
    /// Where the time went.
    pub timing: MigrateTiming,
    /// The generation of the range right after the commit (see
    /// [`AddressSpace::generation`]); `None` when nothing moved. Every page of the range
    /// then lives in `alloc`, page `k` in the allocation's page `k`: a caller that knows
    /// this generation knows the backing without another snapshot.
    pub generation: Option<u64>,
}

/// Work a caller hands to [`AddressSpace::migrate_to_devmem_with`], run while the copies
/// are in flight. It gets the destination allocation's pfns (page `k` of the range goes to
/// `pfns[k]`).
pub type WhileCopying<'a> = &'a mut dyn FnMut(&[Pfn]);

/// Which memory a mapping record came from (to undo it through the same provider).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MapSource {
    Host,
    Pagemap(PagemapId),
}

/// Mappings made for one migration: every address, and the records to undo them.
#[derive(Default)]
pub(crate) struct Mappings {
    pub addrs: Vec<DmaAddr>,
    pub records: Vec<(MapSource, DeviceId, Direction, usize, usize)>,
    pub page_size: Option<PageSize>,
}

/// Buffers one migration uses, kept per thread between migrations so that a small
/// migration makes no heap allocation of its own (a lookup in the thread's cache instead).
#[derive(Default)]
struct Scratch {
    snapshot: Vec<PageEntry>,
    src_pfns: Vec<Pfn>,
    plan: Plan,
    pages: Vec<Pfn>,
    addrs: Vec<DmaAddr>,
    records: Vec<(MapSource, DeviceId, Direction, usize, usize)>,
    frames: Vec<HostFrame>,
    pfns: Vec<Pfn>,
    fences: Vec<(usize, Fence)>,
}

/// Buffers of more entries than this are not kept (a huge migration would pin its memory).
const SCRATCH_KEEP: usize = 1 << 14;

thread_local! {
    static SCRATCH: std::cell::Cell<Option<Box<Scratch>>> = const { std::cell::Cell::new(None) };
}

impl Scratch {
    /// The thread's buffers (fresh ones if another migration of this thread holds them).
    fn take() -> Box<Scratch> {
        SCRATCH.with(|c| c.take()).unwrap_or_default()
    }

    /// Empties the buffers (dropping the fences) and gives them back to the thread, unless
    /// they grew too large to keep.
    fn put_back(mut self: Box<Scratch>) {
        let big = [
            self.snapshot.capacity(),
            self.src_pfns.capacity(),
            self.plan.order.capacity(),
            self.pages.capacity(),
            self.addrs.capacity(),
            self.frames.capacity(),
            self.pfns.capacity(),
        ]
        .into_iter()
        .any(|c| c > SCRATCH_KEEP);
        if big || self.records.capacity() > SCRATCH_KEEP || self.fences.capacity() > 1024 {
            return;
        }
        self.snapshot.clear();
        self.src_pfns.clear();
        self.plan.calls.clear();
        self.plan.order.clear();
        self.pages.clear();
        self.addrs.clear();
        self.records.clear();
        self.frames.clear();
        self.pfns.clear();
        self.fences.clear();
        SCRATCH.with(|c| c.set(Some(self)));
    }
}

impl AddressSpace {
    /// Migrates `range` to `to`'s device memory: allocates the destination, then
    /// [`AddressSpace::migrate_to_devmem`].
    pub fn migrate(
        &self,
        range: VaRange,
        to: PagemapId,
        details: &MigrateDetails,
    ) -> Result<MigrateReport> {
        self.migrate_traced(range, to, details, &mut Vec::new())
    }

    /// [`AddressSpace::migrate`], recording every copy call issued in `trace` (also when the
    /// migration then fails).
    pub fn migrate_traced(
        &self,
        range: VaRange,
        to: PagemapId,
        details: &MigrateDetails,
        trace: &mut Vec<CopyCall>,
    ) -> Result<MigrateReport> {
        self.pagemap_for(range, to)?;
        let span = self.lock().locate(range, true)?;
        let alloc = self.allocate_devmem(to, span.count, span.page_size, range)?;
        self.migrate_into(alloc, range, details, Some(trace), None)
    }

    /// Migrates `range` into the pages of `alloc` (reserved with
    /// [`AddressSpace::allocate_devmem`]; consumed in every outcome: it holds the pages after
    /// a migration, and is released otherwise). All pages or none.
    pub fn migrate_to_devmem(
        &self,
        alloc: AllocId,
        range: VaRange,
        details: &MigrateDetails,
    ) -> Result<MigrateReport> {
        self.migrate_into(alloc, range, details, None, None)
    }

    /// [`AddressSpace::migrate_to_devmem`], running `while_copying` once every copy is
    /// issued and before the wait for them: work that depends on where the pages are going
    /// (a device page table built from the destination's pfns) overlaps the copies instead
    /// of following them. It runs only when every copy was issued; whether the migration
    /// then commits is the returned result (on success, [`MigrateReport::generation`] is
    /// the generation of the backing it prepared for).
    pub fn migrate_to_devmem_with(
        &self,
        alloc: AllocId,
        range: VaRange,
        details: &MigrateDetails,
        while_copying: WhileCopying<'_>,
    ) -> Result<MigrateReport> {
        self.migrate_into(alloc, range, details, None, Some(while_copying))
    }

    fn migrate_into(
        &self,
        alloc: AllocId,
        range: VaRange,
        details: &MigrateDetails,
        trace: Option<&mut Vec<CopyCall>>,
        while_copying: Option<WhileCopying<'_>>,
    ) -> Result<MigrateReport> {
        self.reap_deferred();
        let mut sc = Scratch::take();
        let r = self.migrate_with(alloc, range, details, trace, while_copying, &mut sc);
        sc.put_back();
        r
    }

    fn migrate_with(
        &self,
        alloc: AllocId,
        range: VaRange,
        details: &MigrateDetails,
        trace: Option<&mut Vec<CopyCall>>,
        while_copying: Option<WhileCopying<'_>>,
        sc: &mut Scratch,
    ) -> Result<MigrateReport> {
        let t0 = Instant::now();
        let mut timing = MigrateTiming::default();
        // Collect: validate, snapshot and lock the pages. A refused request still consumes
        // the allocation; it is released after the lock is dropped.
        let Scratch {
            snapshot,
            src_pfns,
            plan: planned,
            pages,
            addrs,
            records,
            frames,
            pfns,
            fences,
        } = sc;
        let collected = (|| {
            let mut st = self.lock();
            let Some(rec) = st.allocs.get(alloc) else {
                return Err(Box::new((None, Error::NoSuchAllocation { alloc })));
            };
            if rec.state != AllocState::Reserved {
                let e = Error::AllocationNotReserved {
                    range,
                    alloc,
                    pagemap: rec.pagemap,
                    state: rec.state,
                };
                return Err(Box::new((None, e)));
            }
            let dest_id = rec.pagemap;
            let fail = |st: &mut crate::mm::MmState, e: Error| {
                Err(Box::new((st.allocs.remove(alloc.slot), e)))
            };
            let span = match st.locate(range, true) {
                Ok(s) => s,
                Err(e) => return fail(&mut st, e),
            };
            let rec = st.allocs.get(alloc).expect("checked above");
            if rec.page_size != span.page_size {
                let e = Error::PageSizeMismatch {
                    range,
                    expected: span.page_size,
                    given: rec.page_size,
                };
                return fail(&mut st, e);
            }
            if rec.pfns.len() != span.count {
                let e = Error::BadRange {
                    range,
                    problem: RangeProblem::OutOfRange,
                };
                return fail(&mut st, e);
            }
            let Some(dest) = self.pagemap(dest_id) else {
                return fail(
                    &mut st,
                    Error::UnknownPagemap {
                        range,
                        pagemap: dest_id,
                    },
                );
            };
            let pages = &st.range(span.slot).pages[span.first..span.first + span.count];
            let summary = Summary::of(pages);
            if summary.any_locked() {
                let e = Error::Busy {
                    range,
                    pagemap: dest_id,
                    device: dest.device(),
                    reason: crate::BusyReason::PageLocked,
                };
                return fail(&mut st, e);
            }
            snapshot.extend_from_slice(pages);
            // Source pfns of device pages (only those are read); none without device pages.
            if summary.any_device() {
                src_pfns.resize(span.count, Pfn(0));
                for (o, e) in src_pfns.iter_mut().zip(snapshot.iter()) {
                    if e.kind() == Kind::Device {
                        *o = st.allocs.by_slot(e.slot()).pfns[e.index() as usize];
                    }
                }
            }
            let rec = st.allocs.get_mut(alloc).expect("checked above");
            rec.state = AllocState::Migrating;
            let dst_pfns = rec.pfns.clone();
            let pre_fence = rec
                .backing
                .as_ref()
                .and_then(|b| b.pre_migrate_fence.clone());
            st.set_locked(span, true);
            Ok((span, dest, dst_pfns, pre_fence))
        })();
        let (span, dest, dst_pfns, pre_fence) = match collected {
            Ok(c) => c,
            Err(refused) => {
                let (release, e) = *refused;
                release_all(release.into_iter().collect());
                return Err(e);
            }
        };
        let (snapshot, src_pfns): (&[PageEntry], &[Pfn]) = (snapshot, src_pfns);
        let job = Job {
            mm: self,
            range,
            span,
            alloc,
            dest: &dest,
            snapshot,
            src_pfns,
            dst_pfns: &dst_pfns,
        };
        // Classify and coalesce.
        let verdict = self.classify_into(snapshot, dest.id(), details, planned);
        let t = Instant::now();
        timing.plan = t - t0;
        match verdict {
            Verdict::NotNeeded => {
                job.roll_back(None);
                return Ok(MigrateReport {
                    outcome: MigrateOutcome::NotNeeded,
                    alloc: None,
                    pages: span.count,
                    calls: Vec::new(),
                    timing,
                    generation: None,
                });
            }
            Verdict::Busy(reason, _) => {
                job.roll_back(None);
                return Err(Error::Busy {
                    range,
                    pagemap: dest.id(),
                    device: dest.device(),
                    reason,
                });
            }
            Verdict::Plan => {}
        }
        let plan = &*planned;
        // Map.
        let mut maps = Mappings {
            addrs: std::mem::take(addrs),
            records: std::mem::take(records),
            page_size: Some(span.page_size),
        };
        pages.resize(plan.order.len(), Pfn(0));
        maps.addrs.resize(plan.order.len(), DmaAddr::NONE);
        if let Err(e) = job.map_all(plan, pages, &mut maps, frames, pfns) {
            self.unmap(&maps);
            job.roll_back(None);
            return Err(e);
        }
        let t1 = Instant::now();
        timing.map = t1 - t;
        // Issue every call before waiting for any.
        let mut calls: Vec<CopyCall> = Vec::with_capacity(plan.calls.len());
        let mut failure: Option<Error> = None;
        for (ci, call) in plan.calls.iter().enumerate() {
            // The destination executes most calls: no lookup for it.
            let looked_up;
            let exec = if call.executor == dest.id() {
                &dest
            } else {
                match self.pagemap_for(range, call.executor) {
                    Ok(p) => {
                        looked_up = p;
                        &looked_up
                    }
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            };
            let (s, e) = (call.start as usize, call.end as usize);
            let req = CopyRequest {
                page_size: span.page_size,
                pages: &pages[s..e],
                addrs: &maps.addrs[s..e],
                pre_fence: pre_fence.as_ref(),
            };
            let issued = match call.op {
                CopyOp::ToDevmem => exec.devmem().copy_to_devmem(&req),
                CopyOp::ToRam => exec.devmem().copy_to_ram(&req),
            };
            match issued {
                Ok(f) => {
                    calls.push(CopyCall {
                        executor: call.executor,
                        device: exec.device(),
                        op: call.op,
                        pages: call.pages(),
                        first_page: call.first_page as usize,
                    });
                    fences.push((ci, f));
                }
                Err(source) => {
                    failure = Some(Error::Backend {
                        range,
                        op: call.op.name(),
                        pagemap: Some(call.executor),
                        device: Some(exec.device()),
                        source,
                    });
                    break;
                }
            }
        }
        if let Some(trace) = trace {
            trace.extend_from_slice(&calls);
        }
        if failure.is_none()
            && let Some(work) = while_copying
        {
            work(&dst_pfns);
        }
        let t2 = Instant::now();
        timing.issue = t2 - t1;
        // Wait once for everything issued, then for the pre-migrate fence (it orders the
        // clear of pages no call wrote, such as holes, and carries its error).
        let mut timed_out = false;
        for (k, (_, f)) in fences.iter().enumerate() {
            if let Err(source) = f.wait_for(details.fence_timeout) {
                timed_out |= matches!(source, crate::FenceError::Timeout(_));
                let call = calls[k];
                failure.get_or_insert(Error::Fence {
                    range,
                    what: "copy",
                    pagemap: Some(call.executor),
                    device: Some(call.device),
                    source,
                });
                if timed_out {
                    break;
                }
            }
        }
        if failure.is_none()
            && let Some(pf) = &pre_fence
            && let Err(source) = pf.wait_for(details.fence_timeout)
        {
            timed_out |= matches!(source, crate::FenceError::Timeout(_));
            failure = Some(Error::Fence {
                range,
                what: "pre-migrate",
                pagemap: Some(dest.id()),
                device: Some(dest.device()),
                source,
            });
        }
        let t3 = Instant::now();
        timing.wait = t3 - t2;
        if let Some(err) = failure {
            if timed_out {
                // Copies (or the clear behind the pre-migrate fence) may still be writing
                // into the destination: keep it (and its mappings) until their fences
                // signal. The sources are untouched.
                let deferred = Deferred {
                    fences: fences
                        .drain(..)
                        .map(|(_, f)| f)
                        .chain(pre_fence.clone())
                        .collect(),
                    unmap: maps,
                    slot: Some(alloc.slot),
                    frames: Vec::new(),
                };
                job.roll_back(Some(deferred));
            } else {
                self.unmap(&maps);
                job.roll_back(None);
            }
            return Err(err);
        }
        self.unmap(&maps);
        *addrs = maps.addrs;
        *records = maps.records;
        // Commit.
        let generation = job.commit(t3 + details.timeslice, frames);
        timing.commit = t3.elapsed();
        Ok(MigrateReport {
            outcome: MigrateOutcome::Migrated,
            alloc: Some(alloc),
            pages: span.count,
            calls,
            timing,
            generation: Some(generation),
        })
    }

    /// Plans the migration of `range` to `to` without performing it: collects the pages'
    /// state, classifies every page and coalesces the copy calls exactly as
    /// [`AddressSpace::migrate`] would, and returns what it would do. Nothing changes.
    pub fn plan(
        &self,
        range: VaRange,
        to: PagemapId,
        details: &MigrateDetails,
    ) -> Result<Classified> {
        let dest = self.pagemap_for(range, to)?;
        let snapshot = {
            let st = self.lock();
            let span = st.locate(range, true)?;
            st.range(span.slot).pages[span.first..span.first + span.count].to_vec()
        };
        if snapshot.iter().any(|p| p.is_locked()) {
            return Err(Error::Busy {
                range,
                pagemap: to,
                device: dest.device(),
                reason: crate::BusyReason::PageLocked,
            });
        }
        Ok(self.classify(&snapshot, to, details))
    }

    /// Classifies `snapshot` (unlocked entries) for a migration to `dest`.
    fn classify(
        &self,
        snapshot: &[PageEntry],
        dest: PagemapId,
        details: &MigrateDetails,
    ) -> Classified {
        let t = self.pagemaps.read().unwrap_or_else(|p| p.into_inner());
        plan(
            snapshot,
            &PlanParams {
                dest,
                owners: &t.owners,
                source_peer_migrates: details.source_peer_migrates,
                can_migrate_same_pagemap: details.can_migrate_same_pagemap,
                coalesce: details.coalesce,
            },
        )
    }

    /// [`AddressSpace::classify`] into `out`, reusing its buffers.
    fn classify_into(
        &self,
        snapshot: &[PageEntry],
        dest: PagemapId,
        details: &MigrateDetails,
        out: &mut Plan,
    ) -> Verdict {
        let t = self.pagemaps.read().unwrap_or_else(|p| p.into_inner());
        plan_into(
            snapshot,
            &PlanParams {
                dest,
                owners: &t.owners,
                source_peer_migrates: details.source_peer_migrates,
                can_migrate_same_pagemap: details.can_migrate_same_pagemap,
                coalesce: details.coalesce,
            },
            out,
        )
    }

    pub(crate) fn unmap(&self, maps: &Mappings) {
        let Some(ps) = maps.page_size else { return };
        for &(src, dev, dir, s, e) in &maps.records {
            let addrs = &maps.addrs[s..e];
            match src {
                MapSource::Host => self.host.unmap_frames(dev, addrs, ps, dir),
                MapSource::Pagemap(id) => {
                    if let Some(pm) = self.pagemap(id) {
                        pm.ops().device_unmap(dev, addrs, ps, dir)
                    }
                }
            }
        }
    }

    /// Finishes deferred cleanups whose fences have all signalled.
    pub(crate) fn reap_deferred(&self) {
        let ready: Vec<Deferred> = {
            let mut st = self.lock();
            if st.deferred.is_empty() {
                return;
            }
            let (ready, pending) = std::mem::take(&mut st.deferred)
                .into_iter()
                .partition(|d| d.fences.iter().all(Fence::is_signaled));
            st.deferred = pending;
            ready
        };
        for d in ready {
            self.unmap(&d.unmap);
            let rel = d.slot.and_then(|s| self.lock().allocs.remove(s));
            release_all(rel.into_iter().collect());
            self.free_frames(&d.frames);
        }
    }

    /// Cleanups waiting for late fences: destinations of timed-out migrations, and system
    /// frames of timed-out copies back to RAM.
    pub fn deferred_cleanups(&self) -> usize {
        self.reap_deferred();
        self.lock().deferred.len()
    }
}

/// One migration in progress, between collect and commit.
struct Job<'a> {
    mm: &'a AddressSpace,
    range: VaRange,
    span: Span,
    alloc: AllocId,
    dest: &'a Pagemap,
    snapshot: &'a [PageEntry],
    src_pfns: &'a [Pfn],
    dst_pfns: &'a [Pfn],
}

impl Job<'_> {
    /// Fills `pages` and `maps` for every call of `plan`.
    fn map_all(
        &self,
        plan: &Plan,
        pages: &mut [Pfn],
        maps: &mut Mappings,
        frames: &mut Vec<HostFrame>,
        pfns: &mut Vec<Pfn>,
    ) -> Result<()> {
        for call in &plan.calls {
            let (s, e) = (call.start as usize, call.end as usize);
            let idx = &plan.order[s..e];
            match call.op {
                CopyOp::ToRam => {
                    // The executor pushes its own pages into the destination's pages,
                    // mapped for the executor's device.
                    let exec = self.mm.pagemap_for(self.range, call.executor)?;
                    pfns.clear();
                    for (k, &i) in idx.iter().enumerate() {
                        pages[s + k] = self.src_pfns[i as usize];
                        pfns.push(self.dst_pfns[i as usize]);
                    }
                    self.map(
                        MapSource::Pagemap(self.dest.id()),
                        exec.device(),
                        Direction::FromDevice,
                        &[],
                        pfns,
                        s,
                        maps,
                    )?;
                }
                CopyOp::ToDevmem => {
                    // The destination reads every source: group by provider, map per group.
                    for (p, &i) in pages[s..e].iter_mut().zip(idx) {
                        *p = self.dst_pfns[i as usize];
                    }
                    let mut k = 0;
                    while k < idx.len() {
                        let src = self.source_of(idx[k]);
                        frames.clear();
                        pfns.clear();
                        // Holes are in no call: a page that is not a device page is a
                        // system page.
                        match src {
                            MapSource::Host => {
                                frames.reserve(idx.len() - k);
                                for &i in &idx[k..] {
                                    let e = self.snapshot[i as usize];
                                    if e.kind() == Kind::Device {
                                        break;
                                    }
                                    frames.push(e.frame());
                                }
                            }
                            MapSource::Pagemap(pm) => {
                                for &i in &idx[k..] {
                                    let e = self.snapshot[i as usize];
                                    if e.kind() != Kind::Device || e.pagemap() != pm {
                                        break;
                                    }
                                    pfns.push(self.src_pfns[i as usize]);
                                }
                            }
                        }
                        let j = k + frames.len() + pfns.len();
                        self.map(
                            src,
                            self.dest.device(),
                            Direction::ToDevice,
                            frames,
                            pfns,
                            s + k,
                            maps,
                        )?;
                        k = j;
                    }
                }
            }
        }
        Ok(())
    }

    fn source_of(&self, i: u32) -> MapSource {
        let e = self.snapshot[i as usize];
        match e.kind() {
            Kind::Device => MapSource::Pagemap(e.pagemap()),
            _ => MapSource::Host,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn map(
        &self,
        src: MapSource,
        device: DeviceId,
        dir: Direction,
        frames: &[HostFrame],
        pfns: &[Pfn],
        at: usize,
        maps: &mut Mappings,
    ) -> Result<()> {
        let ps = self.span.page_size;
        let n = frames.len() + pfns.len();
        let out = &mut maps.addrs[at..at + n];
        let res: std::result::Result<(), BackendError> = match src {
            MapSource::Host => self.mm.host.map_frames(device, frames, ps, dir, out),
            MapSource::Pagemap(id) => {
                let pm = self.mm.pagemap_for(self.range, id)?;
                pm.ops().device_map(device, pfns, ps, dir, out)
            }
        };
        match res {
            Ok(()) => {
                maps.records.push((src, device, dir, at, at + n));
                Ok(())
            }
            Err(source) => {
                out.fill(DmaAddr::NONE);
                Err(Error::Backend {
                    range: self.range,
                    op: match src {
                        MapSource::Host => "map_frames",
                        MapSource::Pagemap(_) => "device_map",
                    },
                    // System memory has no pagemap: name the destination.
                    pagemap: match src {
                        MapSource::Host => Some(self.dest.id()),
                        MapSource::Pagemap(id) => Some(id),
                    },
                    device: Some(device),
                    source,
                })
            }
        }
    }

    /// Unlocks the pages (unchanged) and releases the destination, or parks it.
    fn roll_back(&self, deferred: Option<Deferred>) {
        let rel = {
            let mut st = self.mm.lock();
            st.set_locked(self.span, false);
            let rel = match deferred {
                Some(d) => {
                    st.deferred.push(d);
                    None
                }
                None => st.allocs.remove(self.alloc.slot),
            };
            self.mm.notify_unlocked(&st);
            rel
        };
        release_all(rel.into_iter().collect());
    }

    /// Switches every page to the destination, frees the old pages, unlocks.
    /// `frames`: scratch space (cleared first).
    /// Commits; returns the range's generation right after.
    fn commit(&self, expires: Instant, frames: &mut Vec<HostFrame>) -> u64 {
        let mut releases: Vec<Release> = Vec::new();
        let span = self.span;
        frames.clear();
        let generation = {
            let mut guard = self.mm.lock();
            let slot = self.alloc.slot;
            let dest = self.dest.id();
            {
                let rec = guard
                    .allocs
                    .get_mut(self.alloc)
                    .expect("allocation of a running migration");
                rec.state = AllocState::Live;
                rec.live = span.count as u32;
                rec.expires = expires;
                for (k, r) in rec.rmap.iter_mut().enumerate() {
                    *r = RmapEntry::new(span.slot, (span.first + k) as u32);
                }
            }
            guard.touch(span.slot, span.first, span.count);
            let st = &mut *guard;
            let pages = &mut st.range_slots[span.slot as usize]
                .as_mut()
                .expect("range slot in use")
                .pages[span.first..span.first + span.count];
            let allocs = &mut st.allocs;
            // Separate simple loops (the compiler vectorises them) rather than one loop
            // that branches on every page's kind.
            frames.extend(
                self.snapshot
                    .iter()
                    .filter(|e| e.kind() == Kind::System)
                    .map(|e| e.frame()),
            );
            if Summary::of(self.snapshot).any_device() {
                // A run of neighbouring pages of one source allocation at a time: one lookup
                // of the allocation, its reverse-map entries cleared, its pages given back.
                let snap = self.snapshot;
                let mut i = 0;
                while i < snap.len() {
                    if snap[i].kind() != Kind::Device {
                        i += 1;
                        continue;
                    }
                    let slot = snap[i].slot();
                    let rmap = &mut allocs.by_slot_mut(slot).rmap;
                    let start = i;
                    while i < snap.len() && snap[i].kind() == Kind::Device && snap[i].slot() == slot
                    {
                        rmap[snap[i].index() as usize] = RmapEntry::EMPTY;
                        i += 1;
                    }
                    allocs.put_pages(slot, (i - start) as u32, &mut releases);
                }
            }
            for (k, new) in pages.iter_mut().enumerate() {
                *new = PageEntry::device(dest, slot, k as u32);
            }
            self.mm.notify_unlocked(st);
            st.generation_of(span)
        };
        if !frames.is_empty() {
            self.mm.host.free_frames(frames, span.page_size);
        }
        release_all(releases);
        generation
    }
}
