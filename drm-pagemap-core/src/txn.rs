//! One transaction of page moves, in either direction: the lock -> map -> copy -> wait ->
//! commit or roll back that a migration to device memory ([`crate::migrate`]) and the way
//! back to RAM ([`crate::to_ram`]) both run.
//!
//! The caller locks the pages (a lock bit in each entry, set under the state lock together
//! with whatever it checks) and hands them to a [`Txn`], which from then on owns the failure
//! path. Inside [`Txn::run`] the caller maps pages for the executing devices
//! ([`Txn::map`], [`Txn::map_frames`]), issues its copy calls ([`Txn::issued`]), waits for
//! them ([`Txn::wait`]) and commits ([`Txn::commit`], then switches its page table). Every
//! other way out rolls back, exactly once:
//! - the pages are unlocked unchanged (their data is where it was, readable);
//! - every mapping made is undone through the provider that made it;
//! - the destination (a device allocation, or new system frames) is released, through
//!   [`crate::DevmemOps::devmem_release_unused`] when no copy call was made into it;
//! - or, while a copy may still write it (a wait ran out of time, or a copy still runs after
//!   the body failed or unwound and was waited for within the timeout), the destination and
//!   its mappings are parked as a [`Deferred`] cleanup until their fences signal.
//!
//! A panic of a backend or of the caller's work inside [`Txn::run`] rolls back the same way
//! and then continues to the caller; a panic while rolling back (an unmap) is finished by
//! the unwinding roll back without undoing anything twice.
//!
//! The transaction borrows its buffers from a [`crate::scratch::Scratch`] (kept between
//! transactions), so a small transaction makes no heap allocation of its own.

use crate::alloc::{AllocId, release_all, release_unused};
use crate::backend::Pagemap;
use crate::error::{BackendError, BackendOp, Error, FenceError, FenceRole, Result};
use crate::fence::Fence;
use crate::mapping::{MapRecord, MapSource, Mappings};
use crate::mm::{AddressSpace, Deferred, MmState, Span};
use crate::page::RmapEntry;
use crate::stats::Link;
use crate::types::{CopyOp, DeviceId, Direction, DmaAddr, HostFrame, PagemapId, Pfn, VaRange};
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::time::{Duration, Instant};

/// A fence of a transaction, with the pagemap and device it belongs to (named if it fails).
pub(crate) struct Issued {
    pub fence: Fence,
    pub pagemap: PagemapId,
    pub device: DeviceId,
    /// The link the copy is counted on ([`Link::NONE`]: not a copy).
    pub link: Link,
    /// Bytes the copy moves (0: not a copy).
    pub bytes: u64,
    /// When it was submitted (`None`: not a copy).
    pub at: Option<Instant>,
}

/// The pages a transaction locked.
#[derive(Clone, Copy)]
pub(crate) enum Locked<'a> {
    /// Every page of a span of one range (a migration).
    Span(Span),
    /// Pages of an allocation, wherever they are mapped (the way back to RAM).
    Pages(&'a [(u32, RmapEntry)]),
}

impl Locked<'_> {
    fn unlock(self, st: &mut MmState) {
        match self {
            Locked::Span(span) => st.set_locked(span, false),
            Locked::Pages(pages) => st.set_pages_locked(pages, false),
        }
    }
}

/// One transaction in progress, from the moment its pages are locked until it commits or
/// rolls back (see the module docs).
pub(crate) struct Txn<'a> {
    mm: &'a AddressSpace,
    /// The request, named in errors.
    range: VaRange,
    /// The pagemap the transaction is for (the destination of a migration, the owner on the
    /// way back to RAM): named when system memory fails, as system memory has none.
    pagemap: PagemapId,
    locked: Locked<'a>,
    maps: &'a mut Mappings,
    /// The copies issued, in issue order.
    copies: &'a mut Vec<Issued>,
    /// The new system frames the copies write (the way back to RAM).
    frames: &'a mut Vec<HostFrame>,
    /// The fence every copy is ordered after (a destination's pre-migrate fence): waited
    /// for after the copies, and parked with them after a timeout.
    pre_fence: Option<Issued>,
    /// Longest wait for any fence; `None`: no limit.
    timeout: Option<Duration>,
    /// The size of every page the transaction moves.
    page_size: crate::PageSize,
    /// The destination allocation (a migration), once there is one.
    alloc: Option<AllocId>,
    /// A copy call was made into the destination (also one that failed to submit: it may
    /// have written part of its pages).
    used: bool,
    /// A wait ran out of time: copies may still be running.
    timed_out: bool,
    /// The copies (from the first) the wait saw done (signalled, or with an error).
    waited: usize,
    /// The copies (from the first) counted as landed in the statistics.
    landed: usize,
    /// Committed or rolled back: nothing is left to undo.
    ended: bool,
}

impl<'a> Txn<'a> {
    /// Takes over the `locked` pages (of `page_size`) of `mm`, for the request `range` and
    /// `pagemap` (see [`Txn`]'s fields); its buffers (emptied here) come from a [`crate::scratch::Scratch`].
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub(crate) fn new(
        mm: &'a AddressSpace,
        range: VaRange,
        pagemap: PagemapId,
        locked: Locked<'a>,
        page_size: crate::PageSize,
        maps: &'a mut Mappings,
        copies: &'a mut Vec<Issued>,
        frames: &'a mut Vec<HostFrame>,
        timeout: Option<Duration>,
    ) -> Txn<'a> {
        // Kept buffers come back empty (see `AddressSpace::put_scratch`).
        debug_assert!(copies.is_empty() && frames.is_empty() && maps.records.is_empty());
        maps.page_size = Some(page_size);
        maps.unmapped = 0;
        Txn {
            mm,
            range,
            pagemap,
            locked,
            maps,
            copies,
            frames,
            pre_fence: None,
            timeout,
            page_size,
            alloc: None,
            used: false,
            timed_out: false,
            waited: 0,
            landed: 0,
            ended: false,
        }
    }

    /// Runs `body` (map, issue, wait, commit). Whatever way it ends without committing (an
    /// error, a result that needs no move, a panic) the transaction rolls back; a panic then
    /// continues to the caller.
    #[inline(always)]
    pub(crate) fn run<T>(mut self, body: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        let ran = catch_unwind(AssertUnwindSafe(|| {
            let r = body(&mut self);
            self.roll_back();
            r
        }));
        match ran {
            Ok(r) => r,
            Err(panic) => {
                self.roll_back();
                resume_unwind(panic)
            }
        }
    }

    /// The destination allocation of a migration: released by a roll back (after its
    /// pre-migrate fence too, when a wait timed out). `device`: the destination's device.
    #[inline]
    pub(crate) fn adopt_allocation(
        &mut self,
        alloc: AllocId,
        pre_fence: Option<Fence>,
        device: DeviceId,
    ) {
        self.alloc = Some(alloc);
        self.pre_fence = pre_fence.map(|fence| Issued {
            fence,
            pagemap: self.pagemap,
            device,
            link: Link::NONE,
            bytes: 0,
            at: None,
        });
    }

    /// The destination's pre-migrate fence, if it has one.
    #[inline]
    pub(crate) fn pre_fence(&self) -> Option<&Fence> {
        self.pre_fence.as_ref().map(|p| &p.fence)
    }

    /// Room for addresses up to position `n` (unmapped until a map fills them; never
    /// shrinks).
    #[inline]
    pub(crate) fn grow_addrs(&mut self, n: usize) {
        if self.maps.addrs.len() < n {
            self.maps.addrs.resize(n, DmaAddr::NONE);
        }
    }

    /// The mapped addresses `at`.
    #[inline]
    pub(crate) fn addrs(&self, at: std::ops::Range<usize>) -> &[DmaAddr] {
        &self.maps.addrs[at]
    }

    /// The new system frames (see [`Txn::alloc_frames`]).
    pub(crate) fn frames(&self) -> &[HostFrame] {
        self.frames
    }

    /// Maps `frames` (from system memory, `src` [`MapSource::Host`]) or `pfns` (from the
    /// pagemap `src`) for `device` in direction `dir`, their addresses at `at..`; recorded
    /// (to be undone) only when it succeeded.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn map(
        &mut self,
        src: MapSource,
        device: DeviceId,
        dir: Direction,
        frames: &[HostFrame],
        pfns: &[Pfn],
        at: usize,
    ) -> Result<()> {
        let r = match src {
            MapSource::Host => {
                map_into(self.mm, self.maps, None, src, device, dir, frames, &[], at)
            }
            MapSource::Pagemap(id) => {
                let pm = self.mm.pagemap_for(self.range, id)?;
                map_into(
                    self.mm,
                    self.maps,
                    Some(&pm),
                    src,
                    device,
                    dir,
                    &[],
                    pfns,
                    at,
                )
            }
        };
        r.map_err(|source| self.map_error(src, device, source))
    }

    /// New system frames for `n` pages, the destination of the copies (freed by a roll
    /// back). `device`: the device the transaction's pagemap is on (named if this fails).
    /// `wishes`: empty, or the frame each page asks for ([`HostMemory::alloc_frames_at`]).
    ///
    /// [`HostMemory::alloc_frames_at`]: crate::HostMemory::alloc_frames_at
    pub(crate) fn alloc_frames(
        &mut self,
        n: usize,
        device: DeviceId,
        wishes: &[HostFrame],
    ) -> Result<()> {
        let ps = self.page_size();
        // The frames become the transaction's only once allocated: a failure, or a panic of
        // the host memory, leaves it none to free.
        let mut frames = std::mem::take(self.frames);
        frames.resize(n, HostFrame(0));
        // Each page asks for its own frame where it has one (`wishes`); frames that
        // background releases still hold are waited for, once.
        let alloc = |frames: &mut [HostFrame]| {
            if wishes.len() == n {
                frames.copy_from_slice(wishes);
                self.mm.host.alloc_frames_at(ps, frames)
            } else {
                self.mm.host.alloc_frames(ps, frames)
            }
        };
        let mut r = alloc(&mut frames);
        if r.as_ref().is_err_and(crate::reclaim::out_of_memory) && self.mm.reclaim.drain() {
            r = alloc(&mut frames);
        }
        if let Err(source) = r {
            frames.clear();
            *self.frames = frames;
            return Err(self.backend_error(BackendOp::AllocFrames, self.pagemap, device, source));
        }
        self.mm.stats.host_frames(n as i64, ps);
        *self.frames = frames;
        Ok(())
    }

    /// Maps the transaction's new frames (see [`Txn::alloc_frames`]) for `device`, their
    /// addresses from 0 on.
    pub(crate) fn map_frames(&mut self, device: DeviceId, dir: Direction) -> Result<()> {
        let src = MapSource::Host;
        self.maps.addrs.resize(self.frames.len(), DmaAddr::NONE);
        let r = map_into(
            self.mm,
            self.maps,
            None,
            src,
            device,
            dir,
            self.frames,
            &[],
            0,
        );
        r.map_err(|source| self.map_error(src, device, source))
    }

    fn map_error(&self, src: MapSource, device: DeviceId, source: BackendError) -> Error {
        let (op, pagemap) = match src {
            MapSource::Host => (BackendOp::MapFrames, self.pagemap),
            MapSource::Pagemap(id) => (BackendOp::DeviceMap, id),
        };
        self.backend_error(op, pagemap, device, source)
    }

    fn page_size(&self) -> crate::PageSize {
        self.page_size
    }

    /// [`Error::Backend`] for `op` of the transaction's range.
    pub(crate) fn backend_error(
        &self,
        op: BackendOp,
        pagemap: PagemapId,
        device: DeviceId,
        source: BackendError,
    ) -> Error {
        Error::Backend {
            range: self.range,
            op,
            pagemap: Some(pagemap),
            device: Some(device),
            source,
        }
    }

    /// Records a copy call `op` of `pages` pages on `link` that `pagemap`'s `device` was
    /// asked to execute at `at`: its fence, or the error it returned. The destination counts
    /// as written either way; a submitted call is counted in the statistics.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    pub(crate) fn issued(
        &mut self,
        op: CopyOp,
        pagemap: PagemapId,
        device: DeviceId,
        link: Link,
        pages: usize,
        at: Instant,
        result: std::result::Result<Fence, BackendError>,
    ) -> Result<()> {
        self.used = true;
        match result {
            Ok(fence) => {
                let bytes = self.mm.stats.issued(link, self.page_size, pages);
                tracing::trace!(
                    target: "drm_pagemap",
                    range = %self.range,
                    executor = pagemap.0,
                    device = device.0,
                    op = ?op,
                    pages,
                    bytes,
                    "copy issued"
                );
                self.copies.push(Issued {
                    fence,
                    pagemap,
                    device,
                    link,
                    bytes,
                    at: Some(at),
                });
                Ok(())
            }
            Err(source) => {
                tracing::debug!(
                    target: "drm_pagemap",
                    range = %self.range,
                    executor = pagemap.0,
                    device = device.0,
                    op = ?op,
                    pages,
                    error = %source,
                    "copy submission failed"
                );
                Err(self.backend_error(op.into(), pagemap, device, source))
            }
        }
    }

    /// Waits for every copy issued, then (when all went well) for the pre-migrate fence:
    /// each for at most the transaction's timeout. Fails with `failure` when given (an error
    /// of the issue; the copies issued are still waited for), else with the first fence
    /// error. Stops at a timeout: copies may then still be running.
    pub(crate) fn wait(&mut self, mut failure: Option<Error>) -> Result<()> {
        let range = self.range;
        let fence_error = |what, f: &Issued, source| Error::Fence {
            range,
            what,
            pagemap: Some(f.pagemap),
            device: Some(f.device),
            source,
        };
        let _span = tracing::debug_span!(
            target: "drm_pagemap",
            "wait",
            range = %range,
            copies = self.copies.len()
        )
        .entered();
        for c in self.copies.iter() {
            let waited = c.fence.wait_for(self.timeout);
            if !matches!(waited, Err(FenceError::Timeout(_))) {
                // Done (signalled, or with an error): see [`Txn::landed`].
                self.waited += 1;
            }
            if let Err(source) = waited {
                let timeout = matches!(source, FenceError::Timeout(_));
                self.timed_out |= timeout;
                tracing::debug!(
                    target: "drm_pagemap",
                    range = %range,
                    pagemap = c.pagemap.0,
                    error = %source,
                    "copy fence failed"
                );
                failure.get_or_insert(fence_error(FenceRole::Copy, c, source));
                if timeout {
                    break;
                }
            }
        }
        if failure.is_none()
            && let Some(pre) = &self.pre_fence
            && let Err(source) = pre.fence.wait_for(self.timeout)
        {
            self.timed_out |= matches!(source, FenceError::Timeout(_));
            failure = Some(fence_error(FenceRole::PreMigrate, pre, source));
        }
        failure.map_or(Ok(()), Err)
    }

    /// Counts the copies the wait saw done as landed in the statistics, `end` (the caller's
    /// instant right after [`Txn::wait`]) as the moment their fences were seen signalled;
    /// `known`: an issue instant whose time to `end` the caller knows already. The caller
    /// calls it after every wait, whatever its result; a copy not seen done stays in flight
    /// until the roll back counts it (or parks it).
    #[inline]
    pub(crate) fn landed(&mut self, end: Instant, known: Option<(Instant, Duration)>) {
        let done = self.copies.get(self.landed..self.waited).unwrap_or(&[]);
        let mut bytes = 0;
        for c in done {
            if let Some(at) = c.at {
                let took = match known {
                    Some((k, d)) if k == at => d,
                    _ => end.saturating_duration_since(at),
                };
                self.mm.stats.device_time(c.link, took);
            }
            bytes += c.bytes;
        }
        self.mm.stats.landed_many(done.len() as u64, bytes);
        self.landed = self.waited;
    }

    /// Ends the transaction before the caller switches its page table: the mappings are
    /// undone and nothing will be rolled back any more.
    #[inline]
    pub(crate) fn commit(&mut self) {
        self.mm.unmap(self.maps);
        self.ended = true;
    }

    /// Rolls back (see the module docs); nothing once the transaction ended. Resumable:
    /// after a panic in an unmap, a second call finishes the rest.
    #[inline(always)]
    fn roll_back(&mut self) {
        if !self.ended {
            self.roll_back_now();
        }
    }

    #[cold]
    #[inline(never)]
    fn roll_back_now(&mut self) {
        if !self.timed_out {
            // Copies issued may still write the destination (the body failed or unwound
            // between issuing and waiting): wait for them as the transaction would have
            // (within its timeout; a wait that panics again counts as not done).
            for c in self.copies.iter() {
                if !c.fence.is_signaled() {
                    let wait = AssertUnwindSafe(|| c.fence.wait_for(self.timeout));
                    let _ = catch_unwind(wait);
                }
            }
        }
        // After a timeout the clear behind the pre-migrate fence may still run too.
        let pre = self.pre_fence.as_ref().filter(|_| self.timed_out);
        let running = self
            .copies
            .iter()
            .chain(pre)
            .any(|c| !c.fence.is_signaled());
        // The copies not yet counted as landed: landed now, or parked with the cleanup.
        let rest = self.copies.get(self.landed..).unwrap_or(&[]);
        let flying = (rest.len() as u64, rest.iter().map(|c| c.bytes).sum::<u64>());
        self.landed = self.copies.len();
        tracing::debug!(
            target: "drm_pagemap",
            range = %self.range,
            pagemap = self.pagemap.0,
            copies = self.copies.len(),
            parked = running,
            outcome = "rollback",
            "transaction rolled back"
        );
        let parked = if running {
            let mut d = self.park();
            d.in_flight = flying;
            Some(d)
        } else {
            self.mm.stats.landed_many(flying.0, flying.1);
            self.mm.unmap(self.maps);
            if !self.frames.is_empty() {
                let frames = std::mem::take(self.frames);
                self.mm.host.free_frames(&frames, self.page_size());
                self.mm
                    .stats
                    .host_frames(-(frames.len() as i64), self.page_size());
            }
            None
        };
        let rel = {
            let mut st = self.mm.lock();
            self.locked.unlock(&mut st);
            let rel = match parked {
                Some(d) => {
                    st.deferred.push(d);
                    None
                }
                None => self.alloc.take().and_then(|a| st.allocs.remove(a.slot)),
            };
            self.mm.notify_unlocked(&st);
            rel
        };
        self.ended = true;
        if self.used {
            release_all(rel.into_iter().collect());
        } else {
            release_unused(rel);
        }
    }

    /// The cleanup of a destination copies may still write: its mappings, allocation and
    /// frames go once every copy (and after a timeout the pre-migrate fence) signalled.
    fn park(&mut self) -> Deferred {
        let ps = self.page_size();
        let pre = self.pre_fence.take().filter(|_| self.timed_out);
        let fences = self.copies.drain(..).chain(pre).map(|c| c.fence).collect();
        Deferred {
            fences,
            unmap: std::mem::take(self.maps),
            slot: self.alloc.take().map(|a| a.slot),
            frames: self.frames.drain(..).map(|f| (f, ps)).collect(),
            in_flight: (0, 0),
        }
    }
}

/// Maps `frames` (system memory, `pm` `None`) or `pfns` (of `pm`) for `device` into
/// `maps.addrs[at..]` (room made by the caller); recorded (to be undone) only when it
/// succeeded.
#[allow(clippy::too_many_arguments)]
#[inline]
fn map_into(
    mm: &AddressSpace,
    maps: &mut Mappings,
    pm: Option<&Pagemap>,
    src: MapSource,
    device: DeviceId,
    dir: Direction,
    frames: &[HostFrame],
    pfns: &[Pfn],
    at: usize,
) -> std::result::Result<(), BackendError> {
    let Some(ps) = maps.page_size else {
        unreachable!("a transaction sets its page size when it begins")
    };
    let n = frames.len() + pfns.len();
    let out = &mut maps.addrs[at..at + n];
    let res = match pm {
        None => mm.host.map_frames(device, frames, ps, dir, out),
        Some(pm) => pm.ops().device_map(device, pfns, ps, dir, out),
    };
    match res {
        Ok(()) => {
            maps.records.push(MapRecord {
                src,
                device,
                dir,
                start: at,
                end: at + n,
            });
            Ok(())
        }
        Err(e) => {
            out.fill(DmaAddr::NONE);
            Err(e)
        }
    }
}

impl AddressSpace {
    /// Undoes every mapping of `maps` not undone yet (see [`Mappings::unmapped`]).
    pub(crate) fn unmap(&self, maps: &mut Mappings) {
        let Some(ps) = maps.page_size else { return };
        while let Some(&r) = maps.records.get(maps.unmapped) {
            maps.unmapped += 1;
            let addrs = &maps.addrs[r.start..r.end];
            match r.src {
                MapSource::Host => self.host.unmap_frames(r.device, addrs, ps, r.dir),
                MapSource::Pagemap(id) => {
                    if let Some(pm) = self.pagemap(id) {
                        pm.ops().device_unmap(r.device, addrs, ps, r.dir)
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
        for mut d in ready {
            self.stats.landed_many(d.in_flight.0, d.in_flight.1);
            self.unmap(&mut d.unmap);
            let rel = d.slot.and_then(|s| self.lock().allocs.remove(s));
            release_all(rel.into_iter().collect());
            if !d.frames.is_empty() {
                self.free_frames(&d.frames);
            }
        }
    }

    /// Cleanups waiting for late fences: destinations of timed-out migrations, and system
    /// frames of timed-out copies back to RAM.
    pub fn deferred_cleanups(&self) -> usize {
        self.reap_deferred();
        self.lock().deferred.len()
    }
}
