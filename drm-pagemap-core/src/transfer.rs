//! One transfer of pages between memories, in either direction: the transaction that a
//! migration to device memory ([`crate::migrate`]) and the way back to RAM
//! ([`crate::to_ram`]) both run.
//!
//! The caller locks the pages (a lock bit in each entry, taken under the state lock together
//! with whatever it checks) and hands them to a [`Transfer`], which from then on owns the
//! failure path. Inside [`Transfer::run`] the caller maps the pages for the executing devices
//! ([`Transfer::map`]), issues its copy calls ([`Transfer::issued`]), waits for them
//! ([`Transfer::wait`]) and commits ([`Transfer::commit`], then switches its page table).
//! Every other way out rolls back, exactly once:
//! - the pages are unlocked unchanged (their data is where it was, readable);
//! - every mapping made is undone through the provider that made it;
//! - the destination (a device allocation, or the new system frames) is released, through
//!   [`crate::DevmemOps::devmem_release_unused`] when no copy call was ever made into it;
//! - or, while a copy may still write it (a wait ran out of time, or a copy is still running
//!   after the transfer unwound and waited for it within its timeout), the destination and
//!   its mappings are parked as a [`Deferred`] cleanup until its fences signal.
//!
//! A panic of a backend or of the caller's work inside [`Transfer::run`] rolls back the same
//! way and then continues to the caller; a panic while rolling back (an unmap) is finished by
//! the unwinding roll back without undoing anything twice.

use crate::alloc::{AllocId, release_all, release_unused};
use crate::backend::Pagemap;
use crate::error::{BackendError, BackendOp, Error, FenceError, FenceRole, Result};
use crate::fence::Fence;
use crate::mm::{AddressSpace, Deferred, MmState, Span};
use crate::page::RmapEntry;
use crate::types::{
    CopyOp, DeviceId, Direction, DmaAddr, HostFrame, PageSize, PagemapId, Pfn, VaRange,
};
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::time::Duration;

/// Which memory a mapping came from (to undo it through the same provider).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MapSource {
    Host,
    Pagemap(PagemapId),
}

/// One mapping call: `addrs[start..end]` of the transfer, made by `src` for `device`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MapRecord {
    src: MapSource,
    device: DeviceId,
    dir: Direction,
    start: usize,
    end: usize,
}

/// Pages to map for a device: from `src`, in direction `dir`, their addresses going to the
/// transfer's addresses from index `at` on.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MapRequest {
    pub src: MapSource,
    pub device: DeviceId,
    pub dir: Direction,
    pub at: usize,
}

/// The mappings of one transfer: every address, and the records to undo them.
pub(crate) struct Mappings {
    addrs: Vec<DmaAddr>,
    records: Vec<MapRecord>,
    /// Records before this one are undone already.
    unmapped: usize,
    page_size: PageSize,
}

impl Mappings {
    /// Mappings of pages of `page_size`, in buffers kept from an earlier transfer.
    fn reuse(
        page_size: PageSize,
        mut addrs: Vec<DmaAddr>,
        mut records: Vec<MapRecord>,
    ) -> Mappings {
        addrs.clear();
        records.clear();
        Mappings {
            addrs,
            records,
            unmapped: 0,
            page_size,
        }
    }

    /// Maps `frames` (system memory) or `pfns` (of `pm`, the pagemap of `req.src`) into
    /// `addrs[req.at..]`; recorded only when it succeeded.
    fn map(
        &mut self,
        mm: &AddressSpace,
        pm: Option<&Pagemap>,
        req: MapRequest,
        frames: &[HostFrame],
        pfns: &[Pfn],
    ) -> std::result::Result<(), BackendError> {
        let n = frames.len() + pfns.len();
        let (at, ps) = (req.at, self.page_size);
        let out = &mut self.addrs[at..at + n];
        let res = match pm {
            None => mm.host.map_frames(req.device, frames, ps, req.dir, out),
            Some(pm) => pm.ops().device_map(req.device, pfns, ps, req.dir, out),
        };
        match res {
            Ok(()) => {
                self.records.push(MapRecord {
                    src: req.src,
                    device: req.device,
                    dir: req.dir,
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

    /// Undoes every mapping not undone yet. A record counts as undone once its call
    /// starts: one whose unmap panics is not tried again.
    pub(crate) fn unmap(&mut self, mm: &AddressSpace) {
        while let Some(&r) = self.records.get(self.unmapped) {
            self.unmapped += 1;
            let addrs = &self.addrs[r.start..r.end];
            match r.src {
                MapSource::Host => mm.host.unmap_frames(r.device, addrs, self.page_size, r.dir),
                MapSource::Pagemap(id) => {
                    if let Some(pm) = mm.pagemap(id) {
                        pm.ops()
                            .device_unmap(r.device, addrs, self.page_size, r.dir)
                    }
                }
            }
        }
    }
}

/// A fence of a transfer, with the pagemap and device it belongs to (named if it fails).
pub(crate) struct Issued {
    fence: Fence,
    pagemap: PagemapId,
    device: DeviceId,
}

/// The pages a transfer locked.
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

/// Buffers of more entries than this are not kept between transfers or migrations (a huge
/// one would pin its memory).
pub(crate) const SCRATCH_KEEP: usize = 1 << 14;

/// The buffers of a transfer, kept per thread between transfers so that a small one makes
/// no heap allocation of its own (a lookup in the thread's cache instead).
#[derive(Default)]
struct Buffers {
    addrs: Vec<DmaAddr>,
    records: Vec<MapRecord>,
    copies: Vec<Issued>,
}

thread_local! {
    static BUFFERS: std::cell::Cell<Option<Buffers>> = const { std::cell::Cell::new(None) };
}

impl Buffers {
    /// The thread's buffers (fresh ones while another transfer of this thread holds them).
    fn take() -> Buffers {
        BUFFERS.with(|c| c.take()).unwrap_or_default()
    }

    /// Empties the buffers (dropping the fences) and gives them back to the thread, unless
    /// they grew too large to keep.
    fn put_back(mut self) {
        if self.addrs.capacity() > SCRATCH_KEEP
            || self.records.capacity() > SCRATCH_KEEP
            || self.copies.capacity() > 1024
        {
            return;
        }
        self.copies.clear();
        BUFFERS.with(|c| c.set(Some(self)));
    }
}

/// One transfer in progress, from the moment its pages are locked until it commits or
/// rolls back (see the module docs).
pub(crate) struct Transfer<'a> {
    mm: &'a AddressSpace,
    /// The request, named in errors.
    range: VaRange,
    /// The pagemap the transfer is for (the destination of a migration, the owner on the
    /// way back to RAM): named when system memory fails, as system memory has none.
    pagemap: PagemapId,
    locked: Locked<'a>,
    maps: Mappings,
    /// The copies issued, in issue order.
    copies: Vec<Issued>,
    /// The fence every copy is ordered after (a destination's pre-migrate fence): waited
    /// for after the copies, and parked with them after a timeout.
    pre_fence: Option<Issued>,
    /// Longest wait for any fence; `None`: no limit.
    timeout: Option<Duration>,
    /// The destination allocation (a migration), once there is one.
    alloc: Option<AllocId>,
    /// The new system frames the copies write (the way back to RAM).
    frames: Vec<HostFrame>,
    /// A copy call was made into the destination (also one that failed to submit: it may
    /// have written part of its pages).
    used: bool,
    /// A wait ran out of time: copies may still be running.
    timed_out: bool,
    /// Committed or rolled back: nothing is left to undo.
    ended: bool,
}

impl<'a> Transfer<'a> {
    /// Takes over the `locked` pages (of `page_size`) of `mm`.
    pub(crate) fn new(
        mm: &'a AddressSpace,
        range: VaRange,
        pagemap: PagemapId,
        locked: Locked<'a>,
        page_size: PageSize,
        timeout: Option<Duration>,
    ) -> Transfer<'a> {
        let Buffers {
            addrs,
            records,
            copies,
        } = Buffers::take();
        Transfer {
            mm,
            range,
            pagemap,
            locked,
            maps: Mappings::reuse(page_size, addrs, records),
            copies,
            pre_fence: None,
            timeout,
            alloc: None,
            frames: Vec::new(),
            used: false,
            timed_out: false,
            ended: false,
        }
    }

    /// Runs `body` (map, issue, wait, commit). Whatever way it ends without committing (an
    /// error, a result that needs no move, a panic) the transfer rolls back; a panic then
    /// continues to the caller.
    pub(crate) fn run<T>(&mut self, body: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        let ran = catch_unwind(AssertUnwindSafe(|| {
            let r = body(self);
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

    /// The destination allocation: released by a roll back (after its pre-migrate fence
    /// too, when a wait timed out).
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
        });
    }

    /// The new system frames the copies will write: freed by a roll back.
    pub(crate) fn adopt_frames(&mut self, frames: Vec<HostFrame>) {
        self.frames = frames;
    }

    /// The destination's pre-migrate fence, if it has one.
    pub(crate) fn pre_fence(&self) -> Option<&Fence> {
        self.pre_fence.as_ref().map(|p| &p.fence)
    }

    /// Room for `n` addresses (unmapped until [`Transfer::map`] fills them).
    pub(crate) fn prepare_addrs(&mut self, n: usize) {
        self.maps.addrs.resize(n, DmaAddr::NONE);
    }

    /// The mapped addresses `at`.
    pub(crate) fn addrs(&self, at: std::ops::Range<usize>) -> &[DmaAddr] {
        &self.maps.addrs[at]
    }

    /// Maps `frames` (from system memory) or `pfns` (from the pagemap `req.src`) for
    /// `req.device`, their addresses at `req.at..`.
    pub(crate) fn map(
        &mut self,
        req: MapRequest,
        frames: &[HostFrame],
        pfns: &[Pfn],
    ) -> Result<()> {
        let pm = match req.src {
            MapSource::Host => None,
            MapSource::Pagemap(id) => Some(self.mm.pagemap_for(self.range, id)?),
        };
        let r = self.maps.map(self.mm, pm.as_ref(), req, frames, pfns);
        r.map_err(|source| self.map_error(req, source))
    }

    /// Maps the transfer's own frames (see [`Transfer::adopt_frames`]) for `device`, their
    /// addresses from 0 on.
    pub(crate) fn map_frames(&mut self, device: DeviceId, dir: Direction) -> Result<()> {
        let req = MapRequest {
            src: MapSource::Host,
            device,
            dir,
            at: 0,
        };
        let r = self.maps.map(self.mm, None, req, &self.frames, &[]);
        r.map_err(|source| self.map_error(req, source))
    }

    fn map_error(&self, req: MapRequest, source: BackendError) -> Error {
        let (op, pagemap) = match req.src {
            MapSource::Host => (BackendOp::MapFrames, self.pagemap),
            MapSource::Pagemap(id) => (BackendOp::DeviceMap, id),
        };
        self.backend_error(op, pagemap, req.device, source)
    }

    /// [`Error::Backend`] for `op` of the transfer's range.
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

    /// Records a copy call `op` that `pagemap`'s `device` was asked to execute: its fence,
    /// or the error it returned. The destination counts as written either way.
    pub(crate) fn issued(
        &mut self,
        op: CopyOp,
        pagemap: PagemapId,
        device: DeviceId,
        result: std::result::Result<Fence, BackendError>,
    ) -> Result<()> {
        self.used = true;
        match result {
            Ok(fence) => {
                self.copies.push(Issued {
                    fence,
                    pagemap,
                    device,
                });
                Ok(())
            }
            Err(source) => Err(self.backend_error(op.into(), pagemap, device, source)),
        }
    }

    /// Waits for every copy issued, then (when all went well) for the pre-migrate fence:
    /// each for at most the transfer's timeout. Fails with `failure` when given (an error
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
        for c in &self.copies {
            if let Err(source) = c.fence.wait_for(self.timeout) {
                let timeout = matches!(source, FenceError::Timeout(_));
                self.timed_out |= timeout;
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

    /// Ends the transfer before the caller switches its page table: the mappings are
    /// undone and nothing will be rolled back any more. Returns the frames the copies
    /// filled, now the caller's.
    pub(crate) fn commit(&mut self) -> Vec<HostFrame> {
        self.maps.unmap(self.mm);
        self.ended = true;
        std::mem::take(&mut self.frames)
    }

    /// Rolls back (see the module docs); nothing once the transfer ended. Resumable: after
    /// a panic in an unmap, a second call finishes the rest.
    fn roll_back(&mut self) {
        if self.ended {
            return;
        }
        if !self.timed_out {
            // Copies issued may still write the destination: wait for them as the
            // transfer would have (within its timeout; a wait that panics again counts as
            // not done).
            for c in &self.copies {
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
            .any(|f| !f.fence.is_signaled());
        let parked = running.then(|| self.park());
        if parked.is_none() {
            self.maps.unmap(self.mm);
        }
        let rel = {
            let mut st = self.mm.lock();
            self.locked.unlock(&mut st);
            let rel = match parked {
                Some(d) => {
                    st.deferred.push(d);
                    None
                }
                None => self.alloc.and_then(|a| st.allocs.remove(a.slot)),
            };
            self.mm.notify_unlocked(&st);
            rel
        };
        self.ended = true;
        if !self.frames.is_empty() {
            self.mm.host.free_frames(&self.frames, self.maps.page_size);
            self.frames.clear();
        }
        if self.used {
            release_all(rel.into_iter().collect());
        } else {
            release_unused(rel);
        }
    }

    /// The cleanup of a destination copies may still write: its mappings, allocation and
    /// frames go once every copy (and after a timeout the pre-migrate fence) signalled.
    fn park(&mut self) -> Deferred {
        let pre = self.pre_fence.take().filter(|_| self.timed_out);
        let fences = self.copies.drain(..).chain(pre).map(|c| c.fence);
        let ps = self.maps.page_size;
        let empty = Mappings::reuse(ps, Vec::new(), Vec::new());
        let mut maps = std::mem::replace(&mut self.maps, empty);
        let slot = self.alloc.take().map(|a| a.slot);
        let frames = std::mem::take(&mut self.frames);
        Deferred {
            fences: fences.collect(),
            cleanup: Box::new(move |mm: &AddressSpace| {
                maps.unmap(mm);
                let rel = slot.and_then(|s| mm.lock().allocs.remove(s));
                release_all(rel.into_iter().collect());
                if !frames.is_empty() {
                    mm.host.free_frames(&frames, ps);
                }
            }),
        }
    }
}

impl Drop for Transfer<'_> {
    /// Keeps the buffers for the thread's next transfer (a parked transfer gave its
    /// mappings to its cleanup: empty ones then).
    fn drop(&mut self) {
        Buffers {
            addrs: std::mem::take(&mut self.maps.addrs),
            records: std::mem::take(&mut self.maps.records),
            copies: std::mem::take(&mut self.copies),
        }
        .put_back();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alloc::AllocState;
    use crate::backend::{CopyRequest, DevmemBacking, DevmemOps, PagemapOps};
    use crate::error::BackendErrorKind;
    use crate::fence::{FenceTimeline, HostFence};
    use crate::types::OwnerId;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    const PM: PagemapId = PagemapId(1);
    const DEV: DeviceId = DeviceId(0);
    const PS: PageSize = PageSize::Size4K;

    /// A device whose copies the tests issue by hand; logs unmaps and releases in order.
    #[derive(Default)]
    struct Dev {
        next: AtomicU64,
        /// The pre-migrate fence of every allocation.
        pre: Mutex<Option<Fence>>,
        log: Mutex<Vec<String>>,
        /// The next `device_unmap` panics (after logging).
        unmap_panics: AtomicBool,
    }

    impl Dev {
        fn log(&self, s: String) {
            self.log.lock().unwrap().push(s);
        }
    }

    impl DevmemOps for Dev {
        fn allocate(
            &self,
            npages: usize,
            page_size: PageSize,
        ) -> std::result::Result<DevmemBacking, BackendError> {
            Ok(DevmemBacking {
                cookie: self.next.fetch_add(1, Ordering::SeqCst),
                npages,
                page_size,
                pre_migrate_fence: self.pre.lock().unwrap().clone(),
            })
        }
        fn populate_devmem_pfn(
            &self,
            _: &DevmemBacking,
            out: &mut [Pfn],
        ) -> std::result::Result<(), BackendError> {
            for (i, p) in out.iter_mut().enumerate() {
                *p = Pfn(i as u32);
            }
            Ok(())
        }
        fn copy_to_devmem(&self, _: &CopyRequest<'_>) -> std::result::Result<Fence, BackendError> {
            unreachable!("the tests issue by hand")
        }
        fn copy_to_ram(&self, _: &CopyRequest<'_>) -> std::result::Result<Fence, BackendError> {
            unreachable!("the tests issue by hand")
        }
        fn devmem_release(&self, b: DevmemBacking) {
            self.log(format!("release {}", b.cookie));
        }
        fn devmem_release_unused(&self, b: DevmemBacking) {
            self.log(format!("unused {}", b.cookie));
        }
        fn capacity_bytes(&self) -> u64 {
            1 << 30
        }
    }

    impl PagemapOps for Dev {
        fn device_map(
            &self,
            _: DeviceId,
            pfns: &[Pfn],
            _: PageSize,
            _: Direction,
            out: &mut [DmaAddr],
        ) -> std::result::Result<(), BackendError> {
            for (o, p) in out.iter_mut().zip(pfns) {
                *o = DmaAddr(u64::from(p.0) << 12);
            }
            Ok(())
        }
        fn device_unmap(&self, _: DeviceId, addrs: &[DmaAddr], _: PageSize, _: Direction) {
            self.log(format!("unmap {}", addrs.len()));
            if self.unmap_panics.swap(false, Ordering::SeqCst) {
                panic!("device_unmap panicked");
            }
        }
    }

    /// System memory for these tests (the arena-backed one lives in drm-pagemap-testkit,
    /// which the core's unit tests cannot use): frames from a counter, bytes in a map.
    #[derive(Default)]
    struct TestHost {
        frames: Mutex<(u64, std::collections::HashMap<u64, Vec<u8>>)>,
    }

    impl TestHost {
        /// Frames handed out and not freed.
        fn live(&self) -> usize {
            self.frames.lock().unwrap().1.len()
        }
    }

    impl crate::HostMemory for TestHost {
        fn alloc_frames(
            &self,
            page_size: PageSize,
            out: &mut [HostFrame],
        ) -> std::result::Result<(), BackendError> {
            let mut f = self.frames.lock().unwrap();
            for o in out.iter_mut() {
                f.0 += page_size.granules();
                let id = f.0;
                f.1.insert(id, vec![0; page_size.bytes() as usize]);
                *o = HostFrame(id);
            }
            Ok(())
        }
        fn free_frames(&self, frames: &[HostFrame], _: PageSize) {
            let mut f = self.frames.lock().unwrap();
            for fr in frames {
                assert!(f.1.remove(&fr.0).is_some(), "frame {} freed twice", fr.0);
            }
        }
        fn read(&self, frame: HostFrame, offset: usize, buf: &mut [u8]) {
            let f = self.frames.lock().unwrap();
            let len = buf.len();
            buf.copy_from_slice(&f.1[&frame.0][offset..offset + len]);
        }
        fn write(&self, frame: HostFrame, offset: usize, data: &[u8]) {
            let mut f = self.frames.lock().unwrap();
            let page = f.1.get_mut(&frame.0).expect("a live frame");
            page[offset..offset + data.len()].copy_from_slice(data);
        }
        fn zero(&self, frame: HostFrame, _: PageSize) {
            let mut f = self.frames.lock().unwrap();
            f.1.get_mut(&frame.0).expect("a live frame").fill(0);
        }
        fn map_frames(
            &self,
            _: DeviceId,
            frames: &[HostFrame],
            _: PageSize,
            _: Direction,
            out: &mut [DmaAddr],
        ) -> std::result::Result<(), BackendError> {
            for (o, f) in out.iter_mut().zip(frames) {
                *o = DmaAddr(f.0 << 12);
            }
            Ok(())
        }
        fn unmap_frames(&self, _: DeviceId, _: &[DmaAddr], _: PageSize, _: Direction) {}
        fn capacity_bytes(&self) -> u64 {
            1 << 30
        }
    }

    struct Rig {
        mm: AddressSpace,
        dev: Arc<Dev>,
        host: Arc<TestHost>,
        range: VaRange,
    }

    /// Four system pages and a device.
    fn rig() -> Rig {
        let host = Arc::new(TestHost::default());
        let mm = AddressSpace::new(host.clone());
        let dev = Arc::new(Dev::default());
        let pm = Pagemap::new(PM, OwnerId(0), DEV, "fake", dev.clone(), dev.clone());
        mm.add_pagemap(pm).unwrap();
        let range = VaRange::new(1 << 30, 4 * PS.bytes());
        mm.create_range(range, PS).unwrap();
        mm.write(range.start, &[7; 4 * 4096]).unwrap();
        Rig {
            mm,
            dev,
            host,
            range,
        }
    }

    impl Rig {
        /// Locks the pages, as a migration's collect does, and gives them to a transfer
        /// into a new allocation.
        fn transfer(&self, timeout: Option<Duration>) -> (Transfer<'_>, AllocId) {
            let span = {
                let mut st = self.mm.lock();
                let span = st.locate(self.range, true).unwrap();
                st.set_locked(span, true);
                span
            };
            let (alloc, (_, pre)) = self
                .mm
                .allocate_as(PM, 4, PS, self.range, AllocState::Migrating)
                .unwrap();
            let locked = Locked::Span(span);
            let mut tr = Transfer::new(&self.mm, self.range, PM, locked, PS, timeout);
            tr.adopt_allocation(alloc, pre, DEV);
            tr.prepare_addrs(4);
            (tr, alloc)
        }

        fn locked(&self) -> bool {
            let st = self.mm.lock();
            let span = st.locate(self.range, true).unwrap();
            let pages = &st.range(span.slot).pages;
            pages.summary(span.first, span.count).any_locked()
        }

        fn log(&self) -> Vec<String> {
            std::mem::take(&mut *self.dev.log.lock().unwrap())
        }
    }

    /// Maps `n` device pages at `at` (a peer's pages read by the destination).
    fn map(tr: &mut Transfer<'_>, at: usize, n: usize) -> Result<()> {
        let req = MapRequest {
            src: MapSource::Pagemap(PM),
            device: DEV,
            dir: Direction::ToDevice,
            at,
        };
        let pfns: Vec<Pfn> = (at..at + n).map(|i| Pfn(i as u32)).collect();
        tr.map(req, &[], &pfns)
    }

    fn pending() -> (Arc<HostFence>, Fence) {
        let f = FenceTimeline::new().host_fence();
        (f.clone(), Fence::from_host(f))
    }

    /// A copy that finishes once someone waits for it (however long a panic takes to
    /// report, it is still running when the roll back starts).
    #[derive(Debug, Default)]
    struct DoneWhenWaited(AtomicBool);

    impl crate::fence::FenceOps for DoneWhenWaited {
        fn context(&self) -> u64 {
            0
        }
        fn seqno(&self) -> u64 {
            1
        }
        fn status(&self) -> crate::fence::FenceStatus {
            match self.0.load(Ordering::SeqCst) {
                true => crate::fence::FenceStatus::Signaled,
                false => crate::fence::FenceStatus::Pending,
            }
        }
        fn wait(&self, _: Option<Duration>) -> std::result::Result<(), FenceError> {
            self.0.store(true, Ordering::SeqCst);
            Ok(())
        }
    }

    fn quiet<T>(f: impl FnOnce() -> T) -> std::thread::Result<T> {
        catch_unwind(AssertUnwindSafe(f))
    }

    #[test]
    fn an_error_before_any_copy_unmaps_unlocks_and_releases_unused() {
        let rig = rig();
        let (mut tr, alloc) = rig.transfer(None);
        let r: Result<()> = tr.run(|tr| {
            map(tr, 0, 2)?;
            Err(Error::NoSuchAllocation { alloc })
        });
        assert!(matches!(r, Err(Error::NoSuchAllocation { .. })));
        assert!(!rig.locked());
        assert!(rig.mm.allocation(alloc).is_none());
        assert_eq!(rig.log(), ["unmap 2", "unused 0"]);
        // Nothing is undone twice: the transfer ended.
        tr.roll_back();
        assert!(rig.log().is_empty());
    }

    #[test]
    fn a_copy_that_failed_to_submit_counts_as_written() {
        let rig = rig();
        let (mut tr, alloc) = rig.transfer(None);
        let r = tr.run(|tr| {
            map(tr, 0, 4)?;
            let e = BackendError::new(BackendErrorKind::CopyFailed, "no");
            tr.issued(CopyOp::ToDevmem, PM, DEV, Err(e))
        });
        assert!(matches!(
            r,
            Err(Error::Backend {
                op: BackendOp::CopyToDevmem,
                pagemap: Some(PM),
                ..
            })
        ));
        assert!(!rig.locked());
        assert!(rig.mm.allocation(alloc).is_none());
        assert_eq!(rig.log(), ["unmap 4", "release 0"]);
    }

    #[test]
    fn a_timed_out_copy_parks_the_destination_until_its_fence_signals() {
        let rig = rig();
        let (mut tr, alloc) = rig.transfer(Some(Duration::from_millis(10)));
        let (late, fence) = pending();
        let r = tr.run(|tr| {
            map(tr, 0, 4)?;
            tr.issued(CopyOp::ToDevmem, PM, DEV, Ok(fence))?;
            tr.wait(None)
        });
        assert!(matches!(
            r,
            Err(Error::Fence {
                what: FenceRole::Copy,
                source: FenceError::Timeout(_),
                ..
            })
        ));
        // The sources are unlocked unchanged; the destination and its mapping wait.
        assert!(!rig.locked());
        assert!(rig.mm.allocation(alloc).is_some());
        assert_eq!(rig.mm.deferred_cleanups(), 1);
        assert!(rig.log().is_empty());
        late.signal();
        assert_eq!(rig.mm.deferred_cleanups(), 0);
        assert!(rig.mm.allocation(alloc).is_none());
        assert_eq!(rig.log(), ["unmap 4", "release 0"]);
    }

    #[test]
    fn a_timed_out_pre_migrate_fence_is_parked_with_the_copies() {
        let rig = rig();
        let (late, pre) = pending();
        *rig.dev.pre.lock().unwrap() = Some(pre);
        let (mut tr, alloc) = rig.transfer(Some(Duration::from_millis(10)));
        let r = tr.run(|tr| {
            map(tr, 0, 4)?;
            tr.issued(CopyOp::ToDevmem, PM, DEV, Ok(Fence::signaled()))?;
            tr.wait(None)
        });
        assert!(matches!(
            r,
            Err(Error::Fence {
                what: FenceRole::PreMigrate,
                source: FenceError::Timeout(_),
                ..
            })
        ));
        assert!(!rig.locked());
        assert_eq!(rig.mm.deferred_cleanups(), 1);
        late.signal();
        assert_eq!(rig.mm.deferred_cleanups(), 0);
        assert!(rig.mm.allocation(alloc).is_none());
        assert_eq!(rig.log(), ["unmap 4", "release 0"]);
    }

    #[test]
    fn a_panic_waits_for_the_copies_issued_then_releases() {
        let rig = rig();
        let (mut tr, alloc) = rig.transfer(None);
        let fence = Fence::new(DoneWhenWaited::default());
        let r = quiet(|| {
            tr.run(|tr| -> Result<()> {
                map(tr, 0, 4)?;
                tr.issued(CopyOp::ToDevmem, PM, DEV, Ok(fence))?;
                panic!("the caller's work panicked")
            })
        });
        assert!(r.is_err(), "the panic continues");
        assert!(!rig.locked());
        // Waited for, then released: nothing was parked.
        assert!(rig.mm.allocation(alloc).is_none());
        assert_eq!(rig.log(), ["unmap 4", "release 0"]);
        assert_eq!(rig.mm.deferred_cleanups(), 0);
    }

    #[test]
    fn a_panic_with_a_copy_still_running_parks_it() {
        let rig = rig();
        let (mut tr, alloc) = rig.transfer(Some(Duration::from_millis(10)));
        let (late, fence) = pending();
        let r = quiet(|| {
            tr.run(|tr| -> Result<()> {
                map(tr, 0, 4)?;
                tr.issued(CopyOp::ToDevmem, PM, DEV, Ok(fence))?;
                panic!("the caller's work panicked")
            })
        });
        assert!(r.is_err());
        assert!(!rig.locked());
        assert_eq!(rig.mm.deferred_cleanups(), 1);
        assert!(rig.log().is_empty());
        late.signal();
        assert_eq!(rig.mm.deferred_cleanups(), 0);
        assert!(rig.mm.allocation(alloc).is_none());
        assert_eq!(rig.log(), ["unmap 4", "release 0"]);
    }

    #[test]
    fn a_panicking_unmap_is_finished_by_the_unwinding_roll_back_without_repeats() {
        let rig = rig();
        let (mut tr, alloc) = rig.transfer(None);
        rig.dev.unmap_panics.store(true, Ordering::SeqCst);
        let r = quiet(|| {
            tr.run(|tr| -> Result<()> {
                map(tr, 0, 1)?;
                map(tr, 1, 3)?;
                Err(Error::NoSuchAllocation { alloc })
            })
        });
        assert!(r.is_err(), "the unmap's panic continues");
        assert!(!rig.locked());
        assert!(rig.mm.allocation(alloc).is_none());
        assert_eq!(rig.log(), ["unmap 1", "unmap 3", "unused 0"]);
    }

    #[test]
    fn the_way_back_parks_frames_a_timed_out_copy_may_still_write() {
        let rig = rig();
        let live = rig.host.live();
        let (mut tr, alloc) = rig.transfer(Some(Duration::from_millis(10)));
        let (late, fence) = pending();
        let r = tr.run(|tr| {
            let mut frames = vec![HostFrame(0); 4];
            rig.mm.host.alloc_frames(PS, &mut frames).unwrap();
            tr.adopt_frames(frames);
            tr.map_frames(DEV, Direction::FromDevice)?;
            tr.issued(CopyOp::ToRam, PM, DEV, Ok(fence))?;
            tr.wait(None)
        });
        assert!(r.is_err());
        assert_eq!(rig.mm.deferred_cleanups(), 1);
        assert!(rig.host.live() > live, "the frames are kept");
        late.signal();
        assert_eq!(rig.mm.deferred_cleanups(), 0);
        assert_eq!(rig.host.live(), live);
        assert!(rig.mm.allocation(alloc).is_none());
    }

    #[test]
    fn a_committed_transfer_undoes_nothing() {
        let rig = rig();
        let (mut tr, alloc) = rig.transfer(None);
        let r = quiet(|| {
            tr.run(|tr| -> Result<()> {
                map(tr, 0, 4)?;
                tr.issued(CopyOp::ToDevmem, PM, DEV, Ok(Fence::signaled()))?;
                tr.wait(None)?;
                tr.commit();
                panic!("the page-table switch panicked")
            })
        });
        assert!(r.is_err());
        // The commit unmapped; the pages and the allocation are the commit's to change.
        assert_eq!(rig.log(), ["unmap 4"]);
        assert!(rig.locked());
        assert!(rig.mm.allocation(alloc).is_some());
    }
}
