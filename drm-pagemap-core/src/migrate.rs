//! Migration to device memory: collect -> classify -> plan -> map -> issue every call ->
//! wait once -> commit all pages, or roll back leaving every source page as it was.

use crate::alloc::{AllocId, AllocState, Release, release_all, release_unused};
use crate::backend::{CopyRequest, Pagemap};
use crate::error::{BackendError, Error, RangeProblem, Result};
use crate::fence::Fence;
use crate::mm::{AddressSpace, Deferred, MmState, Span};
use crate::page::{Kind, PageEntry, RmapEntry, Summary};
use crate::plan::{Classified, Coalesce, Plan, PlanParams, Verdict, plan, plan_into};
use crate::types::{
    CopyOp, DeviceId, Direction, DmaAddr, HostFrame, PageSize, PagemapId, Pfn, VaRange,
};
use std::sync::Arc;
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

/// Where a migration's pages go.
#[derive(Clone, Copy)]
enum Target {
    /// An allocation the caller reserved; consumed in every outcome.
    Reserved(AllocId),
    /// A new allocation of this pagemap, made only once the plan says pages will move: a
    /// migration that is not needed or refused allocates (and so clears) nothing.
    Fresh(PagemapId),
}

/// The destination allocation of a migration in progress (its state is `Migrating`).
struct Destination {
    alloc: AllocId,
    pfns: Arc<[Pfn]>,
    pre_fence: Option<Fence>,
}

/// What collecting gave: the pages (locked), the destination pagemap, and the destination
/// allocation when the caller reserved one.
struct Collected {
    span: Span,
    dest: Pagemap,
    reserved: Option<Destination>,
}

/// A refused request: what to release (a reserved allocation is consumed), and why.
type Refused = Box<(Option<Release>, Error)>;

/// What must be undone when a migration unwinds (a backend or the caller's work panicked)
/// between locking its pages and switching the page table.
#[derive(Default)]
struct InFlight {
    /// The destination allocation, once there is one.
    alloc: Option<AllocId>,
    /// The mappings made so far.
    maps: Mappings,
    /// The page table has switched: nothing is left to undo.
    committed: bool,
}

impl AddressSpace {
    /// Migrates `range` to `to`'s device memory. The pages are collected and classified
    /// first; the destination is allocated only when pages will move, so a migration that
    /// is not needed, or refused Busy, allocates and clears nothing.
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
        let pm = self.pagemap_for(range, to)?;
        // A range the pagemap can never hold is refused before anything else is looked at.
        let span = self.lock().locate(range, true)?;
        crate::mm::check_fits(&pm, span.count, span.page_size, range)?;
        self.migrate_into(Target::Fresh(to), range, details, Some(trace), None)
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
        self.migrate_into(Target::Reserved(alloc), range, details, None, None)
    }

    /// [`AddressSpace::migrate_to_devmem`], running `while_copying` once every copy is
    /// issued and before the wait for them: work that depends on where the pages are going
    /// (a device page table built from the destination's pfns) overlaps the copies instead
    /// of following them. It runs only when every copy was issued; whether the migration
    /// then commits is the returned result (on success, [`MigrateReport::generation`] is
    /// the generation of the backing it prepared for). If it panics, the migration is
    /// rolled back (pages unlocked and unchanged, the destination released once the copies
    /// issued are done) and the panic continues to the caller.
    pub fn migrate_to_devmem_with(
        &self,
        alloc: AllocId,
        range: VaRange,
        details: &MigrateDetails,
        while_copying: WhileCopying<'_>,
    ) -> Result<MigrateReport> {
        self.migrate_into(
            Target::Reserved(alloc),
            range,
            details,
            None,
            Some(while_copying),
        )
    }

    fn migrate_into(
        &self,
        target: Target,
        range: VaRange,
        details: &MigrateDetails,
        trace: Option<&mut Vec<CopyCall>>,
        while_copying: Option<WhileCopying<'_>>,
    ) -> Result<MigrateReport> {
        self.reap_deferred();
        let mut sc = Scratch::take();
        let r = self.migrate_with(target, range, details, trace, while_copying, &mut sc);
        sc.put_back();
        r
    }

    /// Collects and locks the pages, then runs the migration; whatever happens after the
    /// pages are locked (an error, or a panic of a backend or of the caller's work), they
    /// are committed or rolled back, never left locked.
    fn migrate_with(
        &self,
        target: Target,
        range: VaRange,
        details: &MigrateDetails,
        trace: Option<&mut Vec<CopyCall>>,
        while_copying: Option<WhileCopying<'_>>,
        sc: &mut Scratch,
    ) -> Result<MigrateReport> {
        let t0 = Instant::now();
        let collected = match self.collect(target, range, &mut sc.snapshot, &mut sc.src_pfns) {
            Ok(c) => c,
            Err(refused) => {
                // A refused request consumed its reservation, which no copy ever touched.
                let (release, e) = *refused;
                release_unused(release);
                return Err(e);
            }
        };
        let span = collected.span;
        let mut flight = InFlight {
            alloc: collected.reserved.as_ref().map(|d| d.alloc),
            maps: Mappings {
                addrs: std::mem::take(&mut sc.addrs),
                records: std::mem::take(&mut sc.records),
                page_size: Some(span.page_size),
            },
            committed: false,
        };
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.run_collected(
                collected,
                range,
                details,
                trace,
                while_copying,
                sc,
                &mut flight,
                t0,
            )
        }));
        match run {
            Ok(r) => {
                sc.addrs = std::mem::take(&mut flight.maps.addrs);
                sc.records = std::mem::take(&mut flight.maps.records);
                r
            }
            Err(panic) => {
                self.unwind_migration(span, &mut flight, &mut sc.fences, details.fence_timeout);
                std::panic::resume_unwind(panic)
            }
        }
    }

    /// Validates the request, snapshots the pages and locks them. Refused when a page is
    /// locked by another migration or held by a waiting CPU access.
    fn collect(
        &self,
        target: Target,
        range: VaRange,
        snapshot: &mut Vec<PageEntry>,
        src_pfns: &mut Vec<Pfn>,
    ) -> std::result::Result<Collected, Refused> {
        let mut st = self.lock();
        let (dest_id, reserved) = match target {
            Target::Reserved(alloc) => {
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
                (rec.pagemap, Some(alloc))
            }
            Target::Fresh(pagemap) => (pagemap, None),
        };
        // A refused request still consumes a reserved allocation; it is released after the
        // lock is dropped.
        let fail = |st: &mut MmState, e: Error| -> Refused {
            Box::new((reserved.and_then(|a| st.allocs.remove(a.slot)), e))
        };
        let span = match st.locate(range, true) {
            Ok(s) => s,
            Err(e) => return Err(fail(&mut st, e)),
        };
        if let Some(alloc) = reserved {
            let rec = st.allocs.get(alloc).expect("checked above");
            if rec.page_size != span.page_size {
                let e = Error::PageSizeMismatch {
                    range,
                    expected: span.page_size,
                    given: rec.page_size,
                };
                return Err(fail(&mut st, e));
            }
            if rec.pfns.len() != span.count {
                let e = Error::BadRange {
                    range,
                    problem: RangeProblem::OutOfRange,
                };
                return Err(fail(&mut st, e));
            }
        }
        let Some(dest) = self.pagemap(dest_id) else {
            let e = Error::UnknownPagemap {
                range,
                pagemap: dest_id,
            };
            return Err(fail(&mut st, e));
        };
        let summary = st.range(span.slot).pages.summary(span.first, span.count);
        let held = if summary.any_locked() {
            Some(crate::BusyReason::PageLocked)
        } else if st.claimed_by_cpu(span) {
            Some(crate::BusyReason::CpuAccess)
        } else {
            None
        };
        if let Some(reason) = held {
            let e = Error::Busy {
                range,
                pagemap: dest_id,
                device: dest.device(),
                reason,
            };
            return Err(fail(&mut st, e));
        }
        // Locking writes every entry: allocate the span's chunks now (the commit or roll
        // back that follows writes the same entries and allocates nothing).
        if let Err(e) = st
            .range_mut(span.slot)
            .reserve(span.first, span.count, range)
        {
            return Err(fail(&mut st, e));
        }
        st.range(span.slot)
            .pages
            .copy_into(span.first, span.count, snapshot);
        // Source pfns of device pages (only those are read); none without device pages.
        if summary.any_device() {
            src_pfns.resize(span.count, Pfn(0));
            for (o, e) in src_pfns.iter_mut().zip(snapshot.iter()) {
                if e.kind() == Kind::Device {
                    *o = st.allocs.by_slot(e.slot()).pfns[e.index() as usize];
                }
            }
        }
        let reserved = reserved.map(|alloc| {
            let rec = st.allocs.get_mut(alloc).expect("checked above");
            rec.state = AllocState::Migrating;
            Destination {
                alloc,
                pfns: rec.pfns.clone(),
                pre_fence: rec
                    .backing
                    .as_ref()
                    .and_then(|b| b.pre_migrate_fence.clone()),
            }
        });
        st.set_locked(span, true);
        Ok(Collected {
            span,
            dest,
            reserved,
        })
    }

    /// A new destination allocation for a migration whose pages are locked and will move.
    fn allocate_destination(
        &self,
        dest: &Pagemap,
        span: Span,
        range: VaRange,
    ) -> Result<Destination> {
        let (alloc, (pfns, pre_fence)) = self.allocate_as(
            dest.id(),
            span.count,
            span.page_size,
            range,
            AllocState::Migrating,
        )?;
        Ok(Destination {
            alloc,
            pfns,
            pre_fence,
        })
    }

    /// Rolls back a migration that unwound: its pages are unlocked unchanged; its
    /// destination is released, or parked until the copies already issued are done.
    fn unwind_migration(
        &self,
        span: Span,
        flight: &mut InFlight,
        fences: &mut Vec<(usize, Fence)>,
        fence_timeout: Option<Duration>,
    ) {
        if flight.committed {
            return;
        }
        let maps = std::mem::take(&mut flight.maps);
        // Copies issued may still write the destination: wait for them as an error would
        // (as long as the migration's fence timeout allows; a wait that panics again counts
        // as not done), then park it if some are still running; otherwise it goes now.
        let used = !fences.is_empty();
        for (_, f) in fences.iter() {
            if !f.is_signaled() {
                let wait = std::panic::AssertUnwindSafe(|| f.wait_for(fence_timeout));
                let _ = std::panic::catch_unwind(wait);
            }
        }
        let running = fences.iter().any(|(_, f)| !f.is_signaled());
        let deferred = match flight.alloc {
            Some(alloc) if running => Some(Deferred {
                fences: fences.drain(..).map(|(_, f)| f).collect(),
                unmap: maps,
                slot: Some(alloc.slot),
                frames: Vec::new(),
            }),
            _ => {
                self.unmap(&maps);
                None
            }
        };
        roll_back(self, span, flight.alloc, deferred, used);
    }

    /// Everything after the pages are locked: classify, allocate (when the caller did not),
    /// map, issue, wait, commit or roll back.
    #[allow(clippy::too_many_arguments)]
    fn run_collected(
        &self,
        collected: Collected,
        range: VaRange,
        details: &MigrateDetails,
        trace: Option<&mut Vec<CopyCall>>,
        while_copying: Option<WhileCopying<'_>>,
        sc: &mut Scratch,
        flight: &mut InFlight,
        t0: Instant,
    ) -> Result<MigrateReport> {
        let Collected {
            span,
            dest,
            reserved,
        } = collected;
        let mut timing = MigrateTiming::default();
        let Scratch {
            snapshot,
            src_pfns,
            plan: planned,
            pages,
            addrs: _,
            records: _,
            frames,
            pfns,
            fences,
        } = sc;
        let (snapshot, src_pfns): (&[PageEntry], &[Pfn]) = (snapshot, src_pfns);
        // Classify and coalesce.
        let verdict = self.classify_into(snapshot, dest.id(), details, planned);
        timing.plan = t0.elapsed();
        match verdict {
            Verdict::NotNeeded => {
                roll_back(self, span, flight.alloc, None, false);
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
                roll_back(self, span, flight.alloc, None, false);
                return Err(Error::Busy {
                    range,
                    pagemap: dest.id(),
                    device: dest.device(),
                    reason,
                });
            }
            Verdict::Plan => {}
        }
        // Pages will move: now the destination is needed.
        let destination = match reserved {
            Some(d) => d,
            None => match self.allocate_destination(&dest, span, range) {
                Ok(d) => {
                    flight.alloc = Some(d.alloc);
                    d
                }
                Err(e) => {
                    roll_back(self, span, None, None, false);
                    return Err(e);
                }
            },
        };
        let Destination {
            alloc,
            pfns: dst_pfns,
            pre_fence,
        } = destination;
        let job = Job {
            mm: self,
            range,
            span,
            dest: &dest,
            snapshot,
            src_pfns,
            dst_pfns: &dst_pfns,
        };
        let plan = &*planned;
        // Map.
        let t = Instant::now();
        let maps = &mut flight.maps;
        pages.resize(plan.order.len(), Pfn(0));
        maps.addrs.resize(plan.order.len(), DmaAddr::NONE);
        if let Err(e) = job.map_all(plan, pages, maps, frames, pfns) {
            self.unmap(maps);
            maps.records.clear();
            roll_back(self, span, Some(alloc), None, false);
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
                        op: call.op.into(),
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
                    what: crate::FenceRole::Copy,
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
                what: crate::FenceRole::PreMigrate,
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
                    unmap: std::mem::take(maps),
                    slot: Some(alloc.slot),
                    frames: Vec::new(),
                };
                roll_back(self, span, Some(alloc), Some(deferred), true);
            } else {
                self.unmap(maps);
                maps.records.clear();
                // A call that failed to submit may have written part of its pages.
                roll_back(self, span, Some(alloc), None, true);
            }
            return Err(err);
        }
        self.unmap(maps);
        maps.records.clear();
        // Commit. A timeslice past any reachable instant saturates ("for ever").
        flight.committed = true;
        let expires = crate::time::saturating_after(t3, details.timeslice);
        let generation = job.commit(alloc, expires, frames);
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
            let mut v = Vec::new();
            st.range(span.slot)
                .pages
                .copy_into(span.first, span.count, &mut v);
            v
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
                        MapSource::Host => crate::BackendOp::MapFrames,
                        MapSource::Pagemap(_) => crate::BackendOp::DeviceMap,
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

    /// Switches every page to the destination, frees the old pages, unlocks.
    /// `frames`: scratch space (cleared first).
    /// Commits; returns the range's generation right after.
    fn commit(&self, alloc: AllocId, expires: Instant, frames: &mut Vec<HostFrame>) -> u64 {
        let mut releases: Vec<Release> = Vec::new();
        let span = self.span;
        frames.clear();
        let generation = {
            let mut guard = self.mm.lock();
            let slot = alloc.slot;
            let dest = self.dest.id();
            {
                let rec = guard
                    .allocs
                    .get_mut(alloc)
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
            let table = &mut st.range_slots[span.slot as usize]
                .as_mut()
                .expect("range slot in use")
                .pages;
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
            // One slice per chunk (allocated when the pages were locked).
            let mut k = 0u32;
            for pages in table.slices_mut(span.first, span.count) {
                for (j, new) in pages.iter_mut().enumerate() {
                    *new = PageEntry::device(dest, slot, k + j as u32);
                }
                k += pages.len() as u32;
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

/// Unlocks the pages of `span` (unchanged) and releases the destination `alloc`, or parks it
/// in `deferred` until its fences signal. `used`: a copy was issued into it (else it goes
/// back through [`crate::DevmemOps::devmem_release_unused`]).
fn roll_back(
    mm: &AddressSpace,
    span: Span,
    alloc: Option<AllocId>,
    deferred: Option<Deferred>,
    used: bool,
) {
    let rel = {
        let mut st = mm.lock();
        st.set_locked(span, false);
        let rel = match deferred {
            Some(d) => {
                st.deferred.push(d);
                None
            }
            None => alloc.and_then(|a| st.allocs.remove(a.slot)),
        };
        mm.notify_unlocked(&st);
        rel
    };
    if used {
        release_all(rel.into_iter().collect());
    } else {
        release_unused(rel);
    }
}
