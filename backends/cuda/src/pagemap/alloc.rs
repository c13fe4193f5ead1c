//! Allocation, release, clearing and settling of a pagemap's device pages: the
//! [`DevmemOps`] calls that hand pages out and take them back, the clears that keep free
//! pages zeroed (on free, on first mapping, or on allocation) and the settling of freed
//! pages until their clear is seen done.

use super::slots::acquire_slot;
use super::{CudaPagemap, Submit};
use crate::clean::{CleanMap, extents};
use crate::driver::{DriverResult, err};
use crate::fence::CudaFence;
use crate::kernel::Kernels;
use crate::settle::Cleared;
use drm_pagemap_core::{
    BackendError, BackendErrorKind, DevmemBacking, DevmemOps, Fence, FenceStatus, GRANULE,
    NativeFenceKind, PageSize, Pfn,
};
use std::sync::atomic::Ordering;

/// The page sizes, in the order releases group them.
const PAGE_SIZES: [PageSize; 3] = [PageSize::Size4K, PageSize::Size64K, PageSize::Size2M];
/// Clears of up to this many extents are one zeroing kernel each; more, one copy kernel from
/// the zeroed buffer over a page list.
const ZERO_EXTENTS_DIRECT: usize = 4;

/// The pages an allocation took: one run of touching pages, or a list of page starts.
enum Taken {
    /// `npages` pages of `g` granules from granule `first`.
    Run { first: u64, npages: usize, g: u64 },
    /// Pages of `g` granules at these starts.
    List { starts: Vec<u64>, g: u64 },
}

impl Taken {
    /// The granule past the last page.
    fn end(&self) -> u64 {
        match self {
            Taken::Run { first, npages, g } => first + *npages as u64 * g,
            Taken::List { starts, g } => starts.iter().max().map_or(0, |&s| s + g),
        }
    }

    /// Gives the pages back to `frames`.
    fn free(&self, frames: &drm_pagemap_core::ExtentAllocator) {
        match self {
            Taken::Run { first, npages, g } => frames.free(*first, *npages as u64 * g),
            Taken::List { starts, g } => frames.free_pages(starts, *g),
        }
    }

    /// Appends the starts of the pages `clean` says are dirty (a run is checked whole
    /// first: a clean run lists nothing).
    fn dirty_pages(&self, clean: &CleanMap, out: &mut Vec<u64>) {
        match self {
            Taken::Run { first, npages, g } => {
                if clean.any_dirty(*first, *npages as u64 * g) {
                    let starts: Vec<u64> = (0..*npages as u64).map(|i| first + i * g).collect();
                    clean.dirty_pages(&starts, *g, out);
                }
            }
            Taken::List { starts, g } => clean.dirty_pages(starts, *g, out),
        }
    }

    /// Records the allocation in `allocs`; returns its cookie.
    fn insert(&self, allocs: &mut crate::allocs::AllocTable) -> u64 {
        match self {
            Taken::Run { first, npages, g } => allocs.insert_run(*first, *npages, *g),
            Taken::List { starts, g } => allocs.insert(starts, *g),
        }
    }
}

impl CudaPagemap {
    /// [`DevmemOps::allocate`]: pages of the arena (backed on the way), clean or cleared on
    /// the copy stream, with the clear they wait for as the pre-migrate fence.
    pub(super) fn alloc_backing(
        &self,
        npages: usize,
        page_size: PageSize,
    ) -> Result<DevmemBacking, BackendError> {
        let g = page_size.granules();
        let bytes = npages as u64 * page_size.bytes();
        // One run of touching pages when one fits (no list of page starts, which for a large
        // allocation is megabytes written fresh); else page by page. Pages still settling
        // (freed, clear running) are taken only when nothing else fits.
        let run = (npages > 0)
            .then_some(bytes / GRANULE)
            .and_then(|len| self.frames.alloc(len, g));
        let mut starts = Vec::new();
        let fits = run.is_some()
            || npages > 0
                && (self.frames.alloc_pages(npages, g, &mut starts) || {
                    let mut sub = self.submit.lock().unwrap_or_else(|p| p.into_inner());
                    self.take_settling(&mut sub) && {
                        drop(sub);
                        starts.clear();
                        self.frames.alloc_pages(npages, g, &mut starts)
                    }
                });
        let taken = match run {
            Some(first) => Taken::Run { first, npages, g },
            None => Taken::List { starts, g },
        };
        if !fits {
            return Err(err(
                BackendErrorKind::OutOfMemory,
                format!(
                    "cuda {}: {bytes} bytes requested, {} KiB free of {} MiB",
                    self.device.id,
                    self.frames.free_granules() * 4,
                    self.arena.capacity >> 20
                ),
            ));
        }
        let undo = |e: BackendError| {
            taken.free(&self.frames);
            Err(e)
        };
        let kernels = match self.device.kernels() {
            Ok(k) => k,
            Err(e) => return undo(e),
        };
        let end = taken.end() * GRANULE;
        let grown = self.arena.ensure(end, |off, size| {
            if self.clear_on_free {
                self.clear_fresh_segment(&kernels, off, size);
            }
        });
        if let Err(e) = grown {
            return undo(e);
        }
        // Pages cleared on free (or when first mapped) need nothing; the others are cleared
        // now, on the copy stream. The pre-migrate fence is the clear they wait for, while it
        // runs: that one, or a clear of the clear stream (fresh segments, settling pages
        // taken early).
        let pre = {
            let mut sub = self.submit.lock().unwrap_or_else(|p| p.into_inner());
            let mut dirty = Vec::new();
            taken.dirty_pages(&sub.clean, &mut dirty);
            if dirty.is_empty() {
                Ok(Self::pending_clear(&mut sub))
            } else {
                self.counters.alloc_clears.fetch_add(1, Ordering::Relaxed);
                self.device
                    .ctx
                    .bind()
                    .and_then(|()| self.clear_pages_locked(&mut sub, &kernels, &dirty, g, false))
                    .map(|f| Some(Fence::new(f)))
            }
        };
        let pre = match pre {
            Ok(p) => p,
            Err(e) => {
                // Nothing may still write these pages when someone else gets them.
                let _ = self.synchronize();
                return undo(e);
            }
        };
        let cookie = taken.insert(&mut self.allocs.lock().unwrap_or_else(|p| p.into_inner()));
        self.counters.allocations.fetch_add(1, Ordering::SeqCst);
        self.counters.used.fetch_add(bytes, Ordering::SeqCst);
        Ok(DevmemBacking {
            cookie,
            npages,
            page_size,
            pre_migrate_fence: pre,
        })
    }

    /// [`DevmemOps::populate_devmem_pfn`]: the pages of a live allocation.
    pub(super) fn backing_pfns(
        &self,
        backing: &DevmemBacking,
        out: &mut [Pfn],
    ) -> Result<(), BackendError> {
        let allocs = self.allocs.lock().unwrap_or_else(|p| p.into_inner());
        let n = allocs.len(backing.cookie).ok_or_else(|| {
            err(
                BackendErrorKind::Unsupported,
                format!(
                    "cuda {}: allocation {} is unknown",
                    self.device.id, backing.cookie
                ),
            )
        })?;
        if !allocs.pfns_into(backing.cookie, out) {
            return Err(err(
                BackendErrorKind::Unsupported,
                format!(
                    "cuda {}: {} pfns asked of a {n}-page allocation",
                    self.device.id,
                    out.len(),
                ),
            ));
        }
        Ok(())
    }

    /// [`DevmemOps::devmem_release_unused`].
    pub(super) fn release_untouched(&self, backing: DevmemBacking) {
        // No copy was issued into it: once the clear it was allocated with (its pre-migrate
        // fence) is done, its pages are as clean as allocation left them and go back
        // without another clear. A refused migration thus queues no clear.
        let cleared = backing
            .pre_migrate_fence
            .as_ref()
            .is_none_or(|f| matches!(f.status(), FenceStatus::Signaled));
        if !cleared {
            return self.devmem_release(backing);
        }
        let mut starts = Vec::new();
        let removed = self
            .allocs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove_into(backing.cookie, &mut starts);
        if !removed {
            return;
        }
        {
            let mut sub = self.submit.lock().unwrap_or_else(|p| p.into_inner());
            self.to_allocator(&mut sub.clean, &starts, backing.page_size.granules(), false);
        }
        let bytes = backing.npages as u64 * backing.page_size.bytes();
        self.counters.used.fetch_sub(bytes, Ordering::SeqCst);
        self.counters.releases.fetch_add(1, Ordering::SeqCst);
        self.counters.unused_releases.fetch_add(1, Ordering::SeqCst);
    }

    /// [`DevmemOps::devmem_release_many`]: one clear per page size for them all.
    pub(super) fn release_backings(&self, backings: &[DevmemBacking]) {
        // Page starts of every allocation, by page size: one clear per size for them all.
        let mut by_size: [Vec<u64>; 3] = Default::default();
        let (mut bytes, mut count) = (0u64, 0u64);
        {
            let mut allocs = self.allocs.lock().unwrap_or_else(|p| p.into_inner());
            for b in backings {
                let k = PAGE_SIZES
                    .iter()
                    .position(|&p| p == b.page_size)
                    .expect("one of the page sizes");
                if allocs.remove_into(b.cookie, &mut by_size[k]) {
                    bytes += b.npages as u64 * b.page_size.bytes();
                    count += 1;
                }
            }
        }
        for (starts, ps) in by_size.into_iter().zip(PAGE_SIZES) {
            if !starts.is_empty() {
                self.free_cleared(starts, ps.granules());
            }
        }
        self.counters.used.fetch_sub(bytes, Ordering::SeqCst);
        self.counters.releases.fetch_add(count, Ordering::SeqCst);
    }

    /// Gives pages (starts in granules, `g` each) back, cleared on the way when clearing on
    /// free: the clear runs on the clear stream and the pages wait in `settling` until it is
    /// seen done (batches whose clears are done by now go to the allocator first), so that
    /// the next allocations get pages nobody has to wait for. Without a clear they go to the
    /// allocator at once, marked dirty. The core releases only what no copy still reads or
    /// writes.
    fn free_cleared(&self, starts: Vec<u64>, g: u64) {
        let kernels = if self.clear_on_free {
            self.device.kernels().ok()
        } else {
            None
        };
        let mut sub = self.submit.lock().unwrap_or_else(|p| p.into_inner());
        self.reap_settled(&mut sub);
        let cleared = kernels.and_then(|k| {
            self.device
                .ctx
                .bind()
                .and_then(|()| self.clear_pages_locked(&mut sub, &k, &starts, g, true))
                .ok()
        });
        match cleared {
            Some(f) => sub.settling.push(starts, g, Fence::new(f)),
            None => self.to_allocator(&mut sub.clean, &starts, g, true),
        }
    }

    /// Gives pages (starts in granules, `g` each) to the allocator, recording whether they may
    /// hold old data. The caller holds the submit lock (`clean` is under it).
    fn to_allocator(&self, clean: &mut CleanMap, starts: &[u64], g: u64, dirty: bool) {
        clean.set_pages(starts, g, dirty);
        self.frames.free_pages(starts, g);
    }

    /// Hands settling pages whose clear is done to the allocator (those whose clear failed
    /// marked dirty). The caller holds the submit lock.
    pub(super) fn reap_settled(&self, sub: &mut Submit) {
        let Submit {
            settling, clean, ..
        } = sub;
        settling.reap_done(
            |f| match f.status() {
                FenceStatus::Pending => Cleared::Pending,
                FenceStatus::Signaled => Cleared::Clean,
                FenceStatus::Failed(_) => Cleared::Failed,
            },
            |starts, g, ok| self.to_allocator(clean, starts, g, !ok),
        );
    }

    /// Nothing else fits: hands every settling page to the allocator, done or not; the newest
    /// of their clears becomes a clear that allocations of clean pages are ordered after.
    /// Returns whether any page was handed over.
    fn take_settling(&self, sub: &mut Submit) -> bool {
        let Submit {
            settling, clean, ..
        } = sub;
        let newest = settling.take_all(|starts, g| self.to_allocator(clean, starts, g, false));
        let Some(f) = newest else {
            return false;
        };
        self.counters.settling_taken.fetch_add(1, Ordering::Relaxed);
        Self::note_clear(sub, f);
        true
    }

    /// `f`, a clear of the clear stream, now guards pages the allocator has: keep the newer
    /// of it and the one kept (a later clear of the stream orders after every earlier one).
    fn note_clear(sub: &mut Submit, f: Fence) {
        if sub
            .unsettled_clear
            .as_ref()
            .is_none_or(|old| old.seqno() < f.seqno())
        {
            sub.unsettled_clear = Some(f);
        }
    }

    /// The clear of the clear stream that allocations of clean pages are ordered after, while
    /// it has not signalled (forgotten once it has: later allocations then need no fence).
    fn pending_clear(sub: &mut Submit) -> Option<Fence> {
        match &sub.unsettled_clear {
            Some(f) if f.is_signaled() => {
                sub.unsettled_clear = None;
                None
            }
            other => other.clone(),
        }
    }

    /// Queues the clear of a freshly mapped arena segment `(offset, bytes)` on the clear
    /// stream and marks it clean; on failure it stays dirty (allocations clear their pages
    /// themselves).
    fn clear_fresh_segment(&self, kernels: &Kernels, off: u64, size: u64) {
        let mut sub = self.submit.lock().unwrap_or_else(|p| p.into_inner());
        let queued = self.device.ctx.bind().and_then(|()| {
            // SAFETY: the segment was just mapped and nobody else can reach it yet.
            unsafe { kernels.launch_zero(&self.clear_stream, self.arena.base + off, size)? };
            self.counters.clears.fetch_add(1, Ordering::Relaxed);
            self.record_clear()
        });
        if let Ok(f) = queued {
            sub.clean.set(off / GRANULE, size / GRANULE, false);
            Self::note_clear(&mut sub, Fence::new(f));
        }
    }

    /// Queues the clear of the pages at `starts` (granules, `g` each; the caller's, no copy
    /// in flight on them) on the clear stream (`on_clear_stream`: pages being freed) or on
    /// the copy stream (pages being allocated: the clear then orders the copies after it
    /// without a wait, and itself waits for the pending clear of the clear stream, if any)
    /// and records its fence: one zeroing kernel per extent when they are few, else one copy
    /// kernel from the zeroed buffer over a page list. The caller has bound the context.
    fn clear_pages_locked(
        &self,
        sub: &mut Submit,
        kernels: &Kernels,
        starts: &[u64],
        g: u64,
        on_clear_stream: bool,
    ) -> Result<CudaFence, BackendError> {
        let stream = if on_clear_stream {
            &self.clear_stream
        } else {
            if let Some(f) = Self::pending_clear(sub)
                && let Some(n) = f.native()
                && n.kind == NativeFenceKind::CUDA_EVENT
            {
                // SAFETY: the handle is a `CUevent` of this process (kind checked), alive
                // while the call runs (`f`, which owns the event, is held).
                let r = unsafe { self.stream.wait_native_event(n.handle) };
                r.about("pending clear")?;
                self.counters.stream_waits.fetch_add(1, Ordering::Relaxed);
            }
            &self.stream
        };
        let ext = extents(starts, g);
        let mut slot_used = None;
        if ext.len() <= ZERO_EXTENTS_DIRECT {
            for &(s, len) in &ext {
                // SAFETY: the extent lies in the mapped arena and belongs to the caller;
                // 4 KiB aligned. A kernel, not cuMemsetD32Async: a memset is an implicit
                // synchronisation point between the device's streams, which would order this
                // clear after the gates of every other stream.
                unsafe {
                    kernels.launch_zero(stream, self.arena.base + s * GRANULE, len * GRANULE)?
                };
                self.counters.clears.fetch_add(1, Ordering::Relaxed);
            }
        } else {
            let n = starts.len();
            let pfn_off = (n * 8).next_multiple_of(16);
            let si = acquire_slot(sub, pfn_off + n * 4)?;
            let slot = &sub.slots[si];
            for (k, &st) in starts.iter().enumerate() {
                // SAFETY: the slot holds `pfn_off + n * 4` bytes and the device no longer
                // reads it (acquire_slot checked its event); writes are aligned.
                unsafe {
                    (slot.host as *mut u64).add(k).write(sub.zero_src);
                    (slot.host.add(pfn_off) as *mut u32).add(k).write(st as u32);
                }
            }
            let shift = g.trailing_zeros();
            // SAFETY: the lists cover `n` entries; every page is in the mapped arena and
            // belongs to the caller; the zeroed buffer holds the largest page.
            unsafe {
                kernels.launch_copy(
                    stream,
                    slot.dev + pfn_off as u64,
                    slot.dev,
                    (n as u64) << shift,
                    self.arena.base,
                    shift,
                    true,
                    0,
                    false,
                )?
            };
            self.counters.clears.fetch_add(1, Ordering::Relaxed);
            slot_used = Some(si);
        }
        let f = if on_clear_stream {
            self.record_clear()?
        } else {
            self.record(Vec::new())?
        };
        if let Some(si) = slot_used {
            sub.slots[si].busy = f.event().cloned();
        }
        Ok(f)
    }
}
