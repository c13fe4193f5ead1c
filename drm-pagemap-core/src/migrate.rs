//! Migration to device memory: collect -> classify -> plan -> for each call, map its pages
//! and issue it (the device starts on the first call while the CPU maps the next) -> wait
//! once -> commit all pages, or roll back leaving every source page as it was (the
//! transaction of [`crate::txn`]; a failure to map a call after earlier calls were issued
//! waits for those as any failure does).

use crate::alloc::{AllocId, AllocState, Release, release_all, release_unused};
use crate::backend::{CopyRequest, Pagemap};
use crate::error::{Error, RangeProblem, Result};
use crate::fence::Fence;
use crate::mapping::MapSource;
use crate::mm::{AddressSpace, MmState, Span};
use crate::page::{Kind, PageEntry, RmapEntry, Summary};
use crate::plan::{Classified, Coalesce, Plan, PlanParams, PlannedCall, Verdict, plan, plan_into};
use crate::scratch::{Scratch, ScratchFor};
use crate::stats::{Link, Location};
use crate::txn::{Locked, Txn};
use crate::types::{CopyOp, DeviceId, Direction, HostFrame, PagemapId, Pfn, VaRange};
use std::num::NonZeroU32;
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
    /// Most pages one copy call moves: a planned call of more pages (one source's pages,
    /// [`Coalesce`]) is cut into pieces of this many pages of its page list (the last takes
    /// the rest), each a copy call of its own, mapped just before it is issued, so that the
    /// devices start on the first pieces while the CPU maps and issues the next. Pieces are
    /// issued in rounds: the first piece of every planned call in the plan's order, then
    /// the second, and so on. All pieces commit together or not at all, as the calls of one
    /// migration always do; the report lists every piece. Default:
    /// [`MigrateDetails::CALL_PAGES`]; `None`: each planned call is issued whole, one call
    /// per source whatever its size.
    pub max_call_pages: Option<NonZeroU32>,
}

impl MigrateDetails {
    /// The default [`MigrateDetails::max_call_pages`]: 16,384 pages (64 MiB of 4 KiB pages;
    /// migrations of 64 KiB or 2 MiB pages rarely reach it). Submitting a call costs
    /// microseconds, mapping and issuing 16,384 pages a few hundred; on the H200 the 1 GiB
    /// main job of 4 KiB pages ran 16 ms (median of 5) with it against 19 ms whole, and
    /// 4,096-page pieces were slower (21 ms).
    pub const CALL_PAGES: NonZeroU32 = NonZeroU32::new(16_384).expect("not zero");
}

impl Default for MigrateDetails {
    fn default() -> Self {
        MigrateDetails {
            timeslice: Duration::ZERO,
            can_migrate_same_pagemap: false,
            source_peer_migrates: true,
            coalesce: Coalesce::BySource,
            fence_timeout: None,
            max_call_pages: Some(MigrateDetails::CALL_PAGES),
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
    /// After the plan, before the first call is mapped: the pages taken out of a process
    /// mapping (where a layer keeps one) and the destination allocated (a fresh one: zero
    /// for a reserved allocation, apart from the former).
    pub allocate: Duration,
    /// Mapping pages for the executing devices (summed over the calls: each call is mapped
    /// just before it is issued).
    pub map: Duration,
    /// Issuing the copy calls (summed over the calls).
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

/// Where a migration's pages go.
#[derive(Clone, Copy, Debug)]
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
    /// Some page is a device page (its source pfn is looked up before a call reads it).
    any_device: bool,
}

/// A refused request: what to release (a reserved allocation is consumed), and why.
type Refused = Box<(Option<Release>, Error)>;

/// A migration's request, handed to its transaction's body.
struct Run<'r, 'w> {
    span: Span,
    dest: &'r Pagemap,
    /// The allocation the caller reserved, and its pfns.
    reserved: Option<(AllocId, Arc<[Pfn]>)>,
    range: VaRange,
    details: &'r MigrateDetails,
    trace: Option<&'r mut Vec<CopyCall>>,
    while_copying: Option<WhileCopying<'w>>,
    t0: Instant,
    /// Some page is a device page.
    any_device: bool,
}

/// The buffers a migration uses besides its transaction's (the thread's, or the address
/// space's kept set: see [`Scratch`]).
struct Buffers<'a> {
    snapshot: &'a [PageEntry],
    /// The source pfns of the device pages, filled before the first call that reads one.
    src_pfns: &'a mut Vec<Pfn>,
    plan: &'a mut Plan,
    pages: &'a mut Vec<Pfn>,
    frames: &'a mut Vec<HostFrame>,
    pfns: &'a mut Vec<Pfn>,
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
        let fits = || {
            let pm = self.pagemap_for(range, to)?;
            // A range the pagemap can never hold is refused before anything else is looked
            // at.
            let span = self.lock().locate(range, true)?;
            crate::mm::check_fits(&pm, span.count, span.page_size, range)
        };
        fits().map_err(|e| self.count_failure(e))?;
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
        let span = tracing::debug_span!(
            target: "drm_pagemap",
            "migrate",
            range = %range,
            target = ?target,
            pages = tracing::field::Empty,
            bytes = tracing::field::Empty,
            calls = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        let _entered = span.enter();
        let mut sc = self.take_scratch(ScratchFor::Range(range));
        let r = self.migrate_with(target, range, details, trace, while_copying, &mut sc);
        self.put_scratch(sc);
        match &r {
            Ok(rep) => {
                if !span.is_disabled() {
                    let ps = self
                        .lock()
                        .locate(range, true)
                        .map_or(0, |s| s.page_size.bytes());
                    span.record("pages", rep.pages);
                    span.record("bytes", rep.pages as u64 * ps);
                    span.record("calls", rep.calls.len());
                    span.record(
                        "outcome",
                        match rep.outcome {
                            MigrateOutcome::Migrated => "migrated",
                            MigrateOutcome::NotNeeded => "not_needed",
                        },
                    );
                }
            }
            Err(e) => {
                self.stats.failed(e);
                span.record("outcome", "failed");
                tracing::debug!(target: "drm_pagemap", error = %e, "migration failed");
            }
        }
        r
    }

    /// Collects and locks the pages, then runs the migration as a transaction
    /// ([`crate::txn`]): whatever happens after the pages are locked (an error, or a panic of
    /// a backend or of the caller's work), they are committed or rolled back, never left
    /// locked.
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
        let traced = crate::stats::trace_on();
        let collecting =
            traced.then(|| tracing::trace_span!(target: "drm_pagemap", "collect").entered());
        let collected = self.collect(target, range, &mut sc.snapshot);
        drop(collecting);
        let collected = match collected {
            Ok(c) => c,
            Err(refused) => {
                // A refused request consumed its reservation, which no copy ever touched.
                let (release, e) = *refused;
                release_unused(release);
                return Err(e);
            }
        };
        let Collected {
            span,
            dest,
            reserved,
            any_device,
        } = collected;
        let Scratch {
            snapshot,
            src_pfns,
            plan,
            pages,
            frames,
            pfns,
            maps,
            copies,
            new_frames,
            ..
        } = sc;
        let mut txn = Txn::new(
            self,
            range,
            dest.id(),
            Locked::Span(span),
            span.page_size,
            maps,
            copies,
            new_frames,
            details.fence_timeout,
        );
        let reserved = reserved.map(|d| {
            txn.adopt_allocation(d.alloc, d.pre_fence, dest.device());
            (d.alloc, d.pfns)
        });
        let bufs = Buffers {
            snapshot,
            src_pfns,
            plan,
            pages,
            frames,
            pfns,
        };
        let run = Run {
            span,
            dest: &dest,
            reserved,
            range,
            details,
            trace,
            while_copying,
            t0,
            any_device,
        };
        txn.run(|txn| self.run_collected(txn, run, bufs))
    }

    /// The source pfns of the device pages of `snapshot` into `out` (one per entry; other
    /// entries are left zero). The pages are locked, so their allocations stay.
    fn look_up_source_pfns(&self, snapshot: &[PageEntry], out: &mut Vec<Pfn>) {
        out.clear();
        out.resize(snapshot.len(), Pfn(0));
        let st = self.lock();
        source_pfns(&st.allocs, snapshot, out);
    }

    /// Validates the request, snapshots the pages and locks them. Refused when a page is
    /// locked by another migration or held by a waiting CPU access.
    fn collect(
        &self,
        target: Target,
        range: VaRange,
        snapshot: &mut Vec<PageEntry>,
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
            any_device: summary.any_device(),
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

    /// Everything after the pages are locked: classify, allocate (when the caller did not),
    /// map, issue, wait, commit. Any way out before the commit rolls `txn` back.
    fn run_collected(
        &self,
        txn: &mut Txn<'_>,
        run: Run<'_, '_>,
        bufs: Buffers<'_>,
    ) -> Result<MigrateReport> {
        let Run {
            span,
            dest,
            reserved,
            range,
            details,
            trace,
            while_copying,
            t0,
            any_device,
        } = run;
        let Buffers {
            snapshot,
            src_pfns,
            plan: planned,
            pages,
            frames,
            pfns,
        } = bufs;
        let mut timing = MigrateTiming::default();
        // Classify and coalesce.
        let traced = crate::stats::trace_on();
        let planning =
            traced.then(|| tracing::trace_span!(target: "drm_pagemap", "plan").entered());
        let verdict = self.classify_into(snapshot, dest.id(), details, planned);
        drop(planning);
        timing.plan = t0.elapsed();
        match verdict {
            Verdict::NotNeeded => {
                self.stats.not_needed();
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
                return Err(Error::Busy {
                    range,
                    pagemap: dest.id(),
                    device: dest.device(),
                    reason,
                });
            }
            Verdict::Plan => {}
        }
        let allocating = Instant::now();
        // Pages will move: take them out of a process mapping first (they are locked), so
        // that no CPU store through it lands while (or after) they are copied.
        if let Some(hook) = self.cpu_maps.get() {
            let ps = span.page_size.bytes();
            hook.take_out(VaRange::new(
                span.range_start + span.first as u64 * ps,
                span.count as u64 * ps,
            ));
        }
        // Pages will move: now the destination is needed.
        let (alloc, dst_pfns) = match reserved {
            Some(d) => d,
            None => {
                let d = self.allocate_destination(dest, span, range)?;
                txn.adopt_allocation(d.alloc, d.pre_fence, dest.device());
                (d.alloc, d.pfns)
            }
        };
        let plan = &*planned;
        // Map and issue call by call, so that the first copy starts while the CPU maps the
        // next call's pages; no call is waited for before all are issued.
        let issuing = traced.then(|| {
            tracing::trace_span!(
                target: "drm_pagemap",
                "issue",
                pagemap = dest.id().0,
                calls = plan.calls.len()
            )
            .entered()
        });
        let t1 = Instant::now();
        timing.allocate = t1 - allocating;
        // The pages of one call at a time (the backend takes them during the call): as many
        // entries as the largest call, not one per page of the migration.
        let longest = pieces_longest(plan, details.max_call_pages);
        pages.clear();
        pages.resize(longest, Pfn(0));
        let to = Location::of(dest.id());
        let pieces = Pieces::new(plan, details.max_call_pages);
        let mut calls: Vec<CopyCall> = Vec::with_capacity(pieces.len());
        let mut failure: Option<Error> = None;
        // When the first call was issued (its device time is known without a subtraction).
        let mut first_at = None;
        // The source pfns of device pages are looked up before the first call that reads
        // one, not before the first copy: a first call of system pages starts without them.
        let mut src_ready = !any_device;
        // The job of every call: `src_pfns` is the one field that changes (once filled).
        let base = Job {
            mm: self,
            range,
            span,
            dest,
            snapshot,
            src_pfns: &[],
            dst_pfns: &dst_pfns,
        };
        for piece in pieces {
            let call = &piece;
            if !src_ready && reads_device_pages(call, plan, snapshot) {
                self.look_up_source_pfns(snapshot, src_pfns);
                src_ready = true;
            }
            let job = Job { src_pfns, ..base };
            // The mapped addresses reach as far as this call's pages (written as calls are
            // mapped, rather than all before the first call).
            txn.grow_addrs(call.end as usize);
            let mapping = traced.then(|| {
                tracing::trace_span!(target: "drm_pagemap", "map", executor = call.executor.0)
                    .entered()
            });
            let t = Instant::now();
            let mapped = job.map_call(txn, plan, call, pages, frames, pfns);
            let at = Instant::now();
            timing.map += at - t;
            drop(mapping);
            if let Err(e) = mapped {
                failure = Some(e);
                break;
            }
            // The destination executes most calls: no lookup for it.
            let looked_up;
            let exec = if call.executor == dest.id() {
                dest
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
            // The link: a push comes from its executor; a pull from its first page's
            // source (see `crate::stats` on calls reading several sources).
            let from = match call.op {
                CopyOp::ToRam => Location::of(call.executor),
                CopyOp::ToDevmem => match job.source_of(plan.order[s]) {
                    MapSource::Host => Location::System,
                    MapSource::Pagemap(p) => Location::of(p),
                },
            };
            first_at.get_or_insert(at);
            let issued = {
                let req = CopyRequest {
                    page_size: span.page_size,
                    pages: &pages[..e - s],
                    addrs: txn.addrs(s..e),
                    pre_fence: txn.pre_fence(),
                };
                match call.op {
                    CopyOp::ToDevmem => exec.devmem().copy_to_devmem(&req),
                    CopyOp::ToRam => exec.devmem().copy_to_ram(&req),
                }
            };
            let device = exec.device();
            let link = Link::new(from, to);
            if let Err(e) = txn.issued(
                call.op,
                call.executor,
                device,
                link,
                call.pages(),
                at,
                issued,
            ) {
                failure = Some(e);
                break;
            }
            calls.push(CopyCall {
                executor: call.executor,
                device,
                op: call.op,
                pages: call.pages(),
                first_page: call.first_page as usize,
            });
        }
        if let Some(trace) = trace {
            trace.extend_from_slice(&calls);
        }
        let job = Job { src_pfns, ..base };
        if failure.is_none()
            && let Some(work) = while_copying
        {
            work(&dst_pfns);
        }
        drop(issuing);
        let t2 = Instant::now();
        timing.issue = (t2 - t1).saturating_sub(timing.map);
        // Wait once for everything issued, then for the pre-migrate fence (it orders the
        // clear of pages no call wrote, such as holes, and carries its error). On a
        // failure the transaction rolls back: the sources are untouched.
        // While the device copies, prepare what the commit would otherwise compute under
        // the lock (large migrations; nothing of it changes any state).
        let prep = (failure.is_none() && span.count >= COMMIT_PREP_MIN)
            .then(|| job.prepare_commit(frames));
        let waited = txn.wait(failure);
        let t3 = Instant::now();
        timing.wait = t3 - t2;
        txn.landed(t3, first_at.map(|at| (at, t3 - at)));
        waited?;
        // Commit. A timeslice past any reachable instant saturates ("for ever").
        let committing =
            traced.then(|| tracing::trace_span!(target: "drm_pagemap", "commit").entered());
        txn.commit();
        let expires = crate::time::saturating_after(t3, details.timeslice);
        let generation = job.commit(alloc, expires, frames, prep);
        drop(committing);
        timing.commit = t3.elapsed();
        // The latency: the sum of the phases (no further clock reading or subtraction).
        self.stats.migrated(
            timing.plan + timing.allocate + timing.map + timing.issue + timing.wait + timing.commit,
        );
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
}

/// Fills `out[i]` with the pfn of `snapshot[i]` where that is a device page (other entries
/// are left as they are). A run of pages that are consecutive pages of one allocation is one
/// lookup of the allocation and one slice copy.
fn source_pfns(allocs: &crate::alloc::AllocTable, snapshot: &[PageEntry], out: &mut [Pfn]) {
    let n = snapshot.len().min(out.len());
    let mut i = 0;
    while i < n {
        let e = snapshot[i];
        if e.kind() != Kind::Device {
            i += 1;
            continue;
        }
        let (slot, first) = (e.slot(), e.index() as usize);
        let mut j = i + 1;
        while j < n {
            let f = snapshot[j];
            if f.kind() != Kind::Device || f.slot() != slot || f.index() as usize != first + (j - i)
            {
                break;
            }
            j += 1;
        }
        let pfns = &allocs.by_slot(slot).pfns;
        out[i..j].copy_from_slice(&pfns[first..first + (j - i)]);
        i = j;
    }
}

/// The copy calls a plan is issued as: each planned call whole, or (with
/// [`MigrateDetails::max_call_pages`]) cut into pieces of at most that many pages of its page
/// list, issued in rounds: the first piece of every planned call (in the plan's order), then
/// the second of every call that has one, and so on, so that every executor's engine starts
/// early and one source's pieces do not queue ahead of the others.
struct Pieces<'p> {
    plan: &'p Plan,
    max: u32,
    /// The round (the piece of each call it issues) and the next call to look at in it.
    round: u32,
    call: usize,
    /// Pieces not yet yielded.
    left: usize,
}

impl<'p> Pieces<'p> {
    fn new(plan: &'p Plan, max: Option<NonZeroU32>) -> Pieces<'p> {
        let max = max.map_or(u32::MAX, NonZeroU32::get);
        let left = plan
            .calls
            .iter()
            .map(|c| (c.end - c.start).div_ceil(max) as usize)
            .sum();
        Pieces {
            plan,
            max,
            round: 0,
            call: 0,
            left,
        }
    }
}

impl Iterator for Pieces<'_> {
    type Item = PlannedCall;

    fn next(&mut self) -> Option<PlannedCall> {
        while self.left > 0 {
            let Some(c) = self.plan.calls.get(self.call) else {
                self.round += 1;
                self.call = 0;
                continue;
            };
            self.call += 1;
            // Rounds past the first exist only when `max` is below some call's length, so
            // `round * max` stays below that length (no overflow).
            let start = c.start + self.round * self.max;
            if start >= c.end {
                continue;
            }
            let end = c.end.min(start.saturating_add(self.max));
            self.left -= 1;
            return Some(PlannedCall {
                first_page: self.plan.order[start as usize],
                start,
                end,
                ..*c
            });
        }
        None
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl ExactSizeIterator for Pieces<'_> {}

/// Whether `call` reads device pages (their source pfns): a push, or a pull of a peer's
/// pages.
fn reads_device_pages(call: &PlannedCall, plan: &Plan, snapshot: &[PageEntry]) -> bool {
    call.op == CopyOp::ToRam
        || plan.order[call.start as usize..call.end as usize]
            .iter()
            .any(|&i| snapshot[i as usize].kind() == Kind::Device)
}

/// The most pages any call of `plan` cut as [`Pieces`] cuts it moves.
fn pieces_longest(plan: &Plan, max: Option<NonZeroU32>) -> usize {
    let max = max.map_or(u32::MAX, NonZeroU32::get);
    plan.calls
        .iter()
        .map(|c| (c.end - c.start).min(max) as usize)
        .max()
        .unwrap_or(0)
}

/// Migrations of at least this many pages prepare their commit while the copies run
/// ([`Job::prepare_commit`]); smaller ones compute it under the lock (a few pages' worth).
const COMMIT_PREP_MIN: usize = 4096;

/// What a large migration's commit needs, computed while the copies run: the new
/// allocation's reverse map and the runs of source pages by allocation.
struct CommitPrep {
    /// The destination allocation's reverse map after the commit.
    rmap: Vec<RmapEntry>,
    /// Runs of device pages of one source allocation: (allocation slot, first snapshot
    /// index, pages).
    runs: Vec<(u32, usize, usize)>,
}

/// One migration in progress, between collect and commit.
#[derive(Clone, Copy)]
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
    /// Fills `pages` (from its start: the call's pages), and the mappings of `txn`, for
    /// `call` of `plan`.
    fn map_call(
        &self,
        txn: &mut Txn<'_>,
        plan: &Plan,
        call: &PlannedCall,
        pages: &mut [Pfn],
        frames: &mut Vec<HostFrame>,
        pfns: &mut Vec<Pfn>,
    ) -> Result<()> {
        let (s, e) = (call.start as usize, call.end as usize);
        let idx = &plan.order[s..e];
        match call.op {
            CopyOp::ToRam => {
                // The executor pushes its own pages into the destination's pages,
                // mapped for the executor's device.
                let exec = self.mm.pagemap_for(self.range, call.executor)?;
                pfns.clear();
                for (k, &i) in idx.iter().enumerate() {
                    pages[k] = self.src_pfns[i as usize];
                    pfns.push(self.dst_pfns[i as usize]);
                }
                txn.map(
                    MapSource::Pagemap(self.dest.id()),
                    exec.device(),
                    Direction::FromDevice,
                    &[],
                    pfns,
                    s,
                )?;
            }
            CopyOp::ToDevmem => {
                // The destination reads every source: group by provider, map per group.
                for (p, &i) in pages.iter_mut().zip(idx) {
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
                    txn.map(
                        src,
                        self.dest.device(),
                        Direction::ToDevice,
                        frames,
                        pfns,
                        s + k,
                    )?;
                    k = j;
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

    /// The system frames the commit frees (into `frames`, cleared first), the destination's
    /// reverse map and the runs of source pages by allocation: what [`Job::commit`] needs
    /// that depends only on the locked pages' snapshot.
    fn prepare_commit(&self, frames: &mut Vec<HostFrame>) -> CommitPrep {
        let span = self.span;
        frames.clear();
        frames.extend(
            self.snapshot
                .iter()
                .filter(|e| e.kind() == Kind::System)
                .map(|e| e.frame()),
        );
        let rmap = (0..span.count)
            .map(|k| RmapEntry::new(span.slot, (span.first + k) as u32))
            .collect();
        let mut runs = Vec::new();
        let snap = self.snapshot;
        let mut i = 0;
        while i < snap.len() {
            if snap[i].kind() != Kind::Device {
                i += 1;
                continue;
            }
            let slot = snap[i].slot();
            let start = i;
            while i < snap.len() && snap[i].kind() == Kind::Device && snap[i].slot() == slot {
                i += 1;
            }
            runs.push((slot, start, i - start));
        }
        CommitPrep { rmap, runs }
    }

    /// Switches every page to the destination, frees the old pages, unlocks.
    /// `frames`: scratch space (cleared first, or filled by `prep`).
    /// Commits; returns the range's generation right after.
    fn commit(
        &self,
        alloc: AllocId,
        expires: Instant,
        frames: &mut Vec<HostFrame>,
        prep: Option<CommitPrep>,
    ) -> u64 {
        let mut releases: Vec<Release> = Vec::new();
        let span = self.span;
        if let Some(prep) = prep {
            // Room for a release per source run, before the lock (each run's allocation may
            // go altogether; growing the list under the lock would copy it there).
            releases.reserve(prep.runs.len());
            let (generation, old_rmap) = self.commit_prepared(alloc, expires, prep, &mut releases);
            drop(old_rmap);
            self.give_back(frames, releases);
            return generation;
        }
        frames.clear();
        let generation = {
            let mut guard = self.mm.lock();
            // A small migration (under `COMMIT_PREP_MIN` pages): its reverse map is built
            // here.
            let rmap = self.go_live(&mut guard, alloc, expires);
            rmap.clear();
            rmap.extend(
                (0..span.count).map(|k| RmapEntry::new(span.slot, (span.first + k) as u32)),
            );
            let st = &mut *guard;
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
            self.switch_table(st, alloc.slot)
        };
        self.give_back(frames, releases);
        generation
    }

    /// [`Job::commit`] with its work prepared: under the lock, the reverse map swapped in,
    /// the sources' runs put back (the reverse-map entries of an allocation that goes
    /// altogether are not cleared one by one), the page table switched. Returns the
    /// generation and the allocation's old reverse map (to drop after the lock).
    fn commit_prepared(
        &self,
        alloc: AllocId,
        expires: Instant,
        prep: CommitPrep,
        releases: &mut Vec<Release>,
    ) -> (u64, Vec<RmapEntry>) {
        let CommitPrep { mut rmap, runs } = prep;
        let mut guard = self.mm.lock();
        std::mem::swap(self.go_live(&mut guard, alloc, expires), &mut rmap);
        let st = &mut *guard;
        let allocs = &mut st.allocs;
        for (src, start, n) in runs {
            let a = allocs.by_slot_mut(src);
            if !(a.live as usize == n && a.state == AllocState::Live) {
                for e in &self.snapshot[start..start + n] {
                    a.rmap[e.index() as usize] = RmapEntry::EMPTY;
                }
            }
            allocs.put_pages(src, n as u32, releases);
        }
        (self.switch_table(st, alloc.slot), rmap)
    }

    /// Under the lock: the destination allocation goes live with the span's pages (their
    /// LRU stamp refreshed); returns its reverse map to fill (empty until now: see
    /// `AllocRecord::rmap`).
    fn go_live<'s>(
        &self,
        st: &'s mut MmState,
        alloc: AllocId,
        expires: Instant,
    ) -> &'s mut Vec<RmapEntry> {
        let span = self.span;
        st.touch(span.slot, span.first, span.count);
        let rec = st
            .allocs
            .get_mut(alloc)
            .expect("allocation of a running migration");
        rec.state = AllocState::Live;
        rec.live = span.count as u32;
        rec.expires = expires;
        &mut rec.rmap
    }

    /// Under the lock: every page of the span becomes page `k` of allocation slot `slot` of
    /// the destination; waiters are woken; returns the range's generation.
    fn switch_table(&self, st: &mut MmState, slot: u32) -> u64 {
        let span = self.span;
        let dest = self.dest.id();
        let table = &mut st.range_slots[span.slot as usize]
            .as_mut()
            .expect("range slot in use")
            .pages;
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
    }

    /// Gives back the old pages (`frames`, the system frames; `releases`, the allocations
    /// whose last pages went): now or in the background ([`crate::ReleaseMode`]).
    fn give_back(&self, frames: &mut Vec<HostFrame>, releases: Vec<Release>) {
        let span = self.span;
        if self.mm.reclaim.is_background() {
            // The scratch buffer goes with the job (the next migration makes another).
            let host = (!frames.is_empty())
                .then(|| (self.mm.host.clone(), std::mem::take(frames), span.page_size));
            let job = crate::reclaim::Job::new(host, releases, self.mm.stats.clone());
            self.mm.reclaim.release(job);
        } else {
            if !frames.is_empty() {
                self.mm.host.free_frames(frames, span.page_size);
                self.mm
                    .stats
                    .host_frames(-(frames.len() as i64), span.page_size);
            }
            release_all(releases);
        }
    }
}
