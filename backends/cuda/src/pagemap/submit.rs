//! Copy submission: a call is planned ([`plan`]), its pre-fence sorted (device waits,
//! host fences bridged through the core's fence worker, failures), then queued on the copy
//! stream under the submit lock, step by step: stream waits, one kernel launch for the
//! scattered entries (lists by value for small calls, else staged in pinned memory), one
//! DMA per long run, the event recorded after them; on failure, the stream is drained of
//! what was queued.

use super::slots::acquire_slot;
use super::{CudaPagemap, Submit};
use crate::driver::{DriverResult, Event, err, mem};
use crate::fence::CudaFence;
use crate::kernel::{Kernels, SMALL_ENTRIES, SmallLists};
use crate::plan;
use crate::ring::cuda::RING_MAX_BYTES;
use crate::ring::layout::{DescBody, RING_ENTRIES};
use drm_pagemap_core::{
    BackendError, BackendErrorKind, CopyOp, CopyRequest, Dependencies, Fence, FenceContext,
    GRANULE, NativeFence, NativeFenceKind, NativeWait, sort_dependencies,
};
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// A call of at most [`SMALL_ENTRIES`] entries in at most this many runs copies its runs
/// touching system memory with one DMA each, whatever their length (unless DMA is off).
pub(crate) const LATENCY_DMA_RUNS: usize = 3;

impl CudaPagemap {
    /// Sorts a copy's pre-fence (as [`DevmemOps::caps`] declares): CUDA events are waited for
    /// on the stream (those of this stream that carry their whole outcome need nothing),
    /// anything else is bridged from the host.
    fn sort_pre(&self, pre: Option<&Fence>, out: &mut Dependencies) {
        let own = self.timeline.context();
        sort_dependencies(
            pre,
            |f, n| {
                if n.kind != NativeFenceKind::CUDA_EVENT {
                    NativeWait::No
                } else if f.context() == own && n.is_complete() {
                    NativeWait::Ordered
                } else {
                    // A stream may wait on an event of any context of the process.
                    NativeWait::Device
                }
            },
            out,
        );
    }

    /// `DevmemOps::copy_to_devmem` (`to_own`) and `copy_to_ram`: plans the
    /// call, sorts its pre-fence, and queues it now (its device dependencies as stream
    /// waits) or, behind a host fence, from the fence worker.
    pub(super) fn copy(&self, req: &CopyRequest<'_>, to_own: bool) -> Result<Fence, BackendError> {
        let split = self.plan_copy(req)?;
        // The pre-fence: what has failed already fails the call's fence (nothing queued).
        let mut deps = Dependencies::default();
        self.sort_pre(req.pre_fence, &mut deps);
        if let Some(e) = deps.failed.take() {
            let e = BackendError::new(e.kind.clone(), format!("pre-fence failed: {}", e.message));
            return Ok(Fence::new(CudaFence::failed(
                self.timeline.context(),
                self.timeline.next_seqno(),
                self.device.id,
                e,
            )));
        }
        self.counters
            .pages
            .fetch_add(split.live_entries as u64, Ordering::Relaxed);
        // Earlier ring copies of this pagemap need no wait: the ring runs in order, and the
        // stream waits for every ring copy published before it queues anything.
        let ring_pre = self.take_ring_pre(&mut deps);
        if deps.host.is_empty()
            && deps.device.is_empty()
            && let Some(f) = self.try_ring(req, to_own, &split)
        {
            return Ok(f);
        }
        if !deps.host.is_empty() {
            return self.copy_deferred(req, to_own, split, deps, ring_pre);
        }
        let mut sub = self.submit.lock().unwrap_or_else(|p| p.into_inner());
        let ev = self.submit_locked(&mut sub, req, to_own, &split, &deps.device)?;
        Ok(Fence::new(CudaFence::new(
            self.timeline.context(),
            self.timeline.next_seqno(),
            self.device.id,
            ev,
            deps.device
                .into_iter()
                .map(|(f, _)| f)
                .chain(ring_pre)
                .collect(),
        )))
    }

    /// Moves the pending fences of this pagemap's ring out of `deps.host`: they are ordered
    /// already (see [`Self::copy`]); the copy's fence keeps them to learn of a failure.
    fn take_ring_pre(&self, deps: &mut Dependencies) -> Vec<Fence> {
        let Some(ring) = &self.ring else {
            return Vec::new();
        };
        let own = ring.engine().context();
        if deps.host.iter().all(|f| f.context() != own) {
            return Vec::new();
        }
        let (mine, rest) = std::mem::take(&mut deps.host)
            .into_iter()
            .partition(|f| f.context() == own);
        deps.host = rest;
        mine
    }

    /// The ring path (option `cuda.ring`): a copy of at most [`RING_ENTRIES`] entries and
    /// [`RING_MAX_BYTES`], with nothing to wait for, while the copy stream is idle (so that
    /// it runs after every copy issued before it), is published to the ring. `None`: it
    /// takes the stream (no ring, the call does not qualify, the ring is full or closed).
    fn try_ring(&self, req: &CopyRequest<'_>, to_own: bool, split: &plan::Split) -> Option<Fence> {
        let ring = self.ring.as_ref()?;
        let n = req.pages.len();
        if n == 0
            || n > RING_ENTRIES
            || split.live_entries as u64 * req.page_size.bytes() > RING_MAX_BYTES
            || !self.stream.query().unwrap_or(false)
        {
            return None;
        }
        let mut body = DescBody::EMPTY;
        body.own_base = self.arena.base;
        body.n_entries = n as u32;
        body.item_shift = req.page_size.granules().trailing_zeros();
        body.to_own = to_own as u32;
        for i in 0..n {
            body.addrs[i] = req.addrs[i].0;
            body.pfns[i] = req.pages[i].0;
        }
        match ring.engine().submit(&body) {
            Ok(seq) => {
                self.counters.ring.fetch_add(1, Ordering::Relaxed);
                Some(ring.fence(seq, self.device.id))
            }
            Err(why) => {
                tracing::trace!(target: "drm_pagemap::cuda", pagemap = self.pagemap,
                    reason = ?why, "ring refused a copy: stream path");
                None
            }
        }
    }

    /// Splits a call into DMA runs and kernel entries (the crossover by where each run's
    /// other side lies, and 0 for system memory in a small call of few runs); refuses a call
    /// whose lists differ in length or that names a pfn past the arena.
    fn plan_copy(&self, req: &CopyRequest<'_>) -> Result<plan::Split, BackendError> {
        let n = req.pages.len();
        if n != req.addrs.len() {
            return Err(err(
                BackendErrorKind::CopyFailed,
                format!(
                    "cuda {}: {} pages but {} addresses",
                    self.device.id,
                    n,
                    req.addrs.len()
                ),
            ));
        }
        let ps = req.page_size;
        let (mut dma_host, dma_dev) = self.dma_min();
        // A small call of a few runs is latency-bound: a DMA per run touching system memory
        // starts sooner than a kernel launch (measured by the fault_latency bench).
        if dma_host != u64::MAX
            && n <= SMALL_ENTRIES
            && plan::count_runs(req.pages, req.addrs, ps, LATENCY_DMA_RUNS + 1) <= LATENCY_DMA_RUNS
        {
            dma_host = 0;
        }
        let host = &self.host;
        let split = plan::split(req.pages, req.addrs, ps, dma_host.min(dma_dev), |a| {
            if host.contains(a) { dma_host } else { dma_dev }
        });
        if split.pfn_end > self.arena.capacity / GRANULE {
            return Err(err(
                BackendErrorKind::CopyFailed,
                format!(
                    "cuda {}: pfn {} past the pagemap's {} granules",
                    self.device.id,
                    split.pfn_end,
                    self.arena.capacity / GRANULE
                ),
            ));
        }
        Ok(split)
    }

    /// A copy whose pre-fence includes fences the stream cannot wait for: it is queued from
    /// the core's shared fence worker once they have signalled (no thread of its own). The
    /// stream never waits for the host (a stream held by the host would make every
    /// implicitly synchronising driver call of the process, such as an allocation, wait for
    /// that host fence too).
    fn copy_deferred(
        &self,
        req: &CopyRequest<'_>,
        to_own: bool,
        split: plan::Split,
        deps: Dependencies,
        ring_pre: Vec<Fence>,
    ) -> Result<Fence, BackendError> {
        let me = self
            .me
            .get()
            .and_then(std::sync::Weak::upgrade)
            .ok_or_else(|| {
                err(
                    BackendErrorKind::DeviceLost,
                    "cuda: pagemap is being dropped",
                )
            })?;
        self.counters.cpu_waits.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            target: "drm_pagemap::cuda",
            pagemap = self.pagemap,
            device = self.device.id.0,
            op = ?if to_own { CopyOp::ToDevmem } else { CopyOp::ToRam },
            pages = req.pages.len(),
            host_fences = deps.host.len(),
            "copy deferred behind host fences"
        );
        let all: Vec<Fence> = deps
            .device
            .iter()
            .map(|(f, _)| f.clone())
            .chain(deps.host.iter().cloned())
            .chain(ring_pre)
            .collect();
        let fence = Arc::new(CudaFence::deferred(
            FenceContext::new(),
            1,
            self.device.id,
            all,
        ));
        let (page_size, pages, addrs) = (req.page_size, req.pages.to_vec(), req.addrs.to_vec());
        let theirs = fence.clone();
        let device_waits = deps.device.clone();
        deps.when_host_signaled(Box::new(move |outcome| {
            if let Err(e) = outcome {
                let e = match e {
                    drm_pagemap_core::FenceError::Failed(b) => b,
                    other => err(BackendErrorKind::CopyFailed, other.to_string()),
                };
                theirs.fail(BackendError::new(
                    e.kind.clone(),
                    format!("pre-fence failed: {}", e.message),
                ));
                return;
            }
            let req = CopyRequest {
                page_size,
                pages: &pages,
                addrs: &addrs,
                pre_fence: None,
            };
            let queued = {
                let mut sub = me.submit.lock().unwrap_or_else(|p| p.into_inner());
                me.submit_locked(&mut sub, &req, to_own, &split, &device_waits)
            };
            match queued {
                Ok(ev) => theirs.queued(ev),
                Err(e) => theirs.fail(e),
            }
        }));
        Ok(Fence::from_arc(fence))
    }

    /// Queues the copy on the stream and records its event: [`Self::queue_copy`], then
    /// [`Self::record_submission`], draining the stream if that failed after queuing work.
    fn submit_locked(
        &self,
        sub: &mut Submit,
        req: &CopyRequest<'_>,
        to_own: bool,
        split: &plan::Split,
        device_waits: &[(Fence, NativeFence)],
    ) -> Result<Arc<Event>, BackendError> {
        // Lazy fields: nothing is computed or formatted unless a subscriber wants the span.
        let span = tracing::debug_span!(
            target: "drm_pagemap::cuda",
            "submit",
            pagemap = self.pagemap,
            device = self.device.id.0,
            op = ?if to_own { CopyOp::ToDevmem } else { CopyOp::ToRam },
            pages = req.pages.len(),
            bytes = split.live_entries as u64 * req.page_size.bytes(),
            runs = split.dma.len(),
            kernel_entries = split.kernel_entries,
            waits = device_waits.len(),
            outcome = tracing::field::Empty,
        );
        let _in = span.enter();
        let r = self.submit_in_span(sub, req, to_own, split, device_waits);
        match &r {
            Ok(_) => {
                span.record("outcome", "queued");
            }
            Err(e) => {
                span.record("outcome", "failed");
                tracing::debug!(target: "drm_pagemap::cuda", error = %e, "submission failed");
            }
        }
        r
    }

    /// [`Self::submit_locked`] inside its span.
    fn submit_in_span(
        &self,
        sub: &mut Submit,
        req: &CopyRequest<'_>,
        to_own: bool,
        split: &plan::Split,
        device_waits: &[(Fence, NativeFence)],
    ) -> Result<Arc<Event>, BackendError> {
        let kernels = if split.kernel_entries > 0 {
            Some(self.device.kernels()?)
        } else {
            None
        };
        self.device.ctx.bind()?;
        // In submission order: after every ring copy published before (nothing is queued
        // when the wait cannot be).
        if let Some(ring) = &self.ring {
            ring.order_stream(&self.stream)?;
        }
        let mut issued = 0usize;
        let queued = self.queue_copy(
            sub,
            req,
            to_own,
            split,
            device_waits,
            kernels.as_deref(),
            &mut issued,
        );
        self.record_submission(sub, queued, issued)
    }

    /// Queues everything of one call (the context is bound): the stream waits for
    /// `device_waits`, one kernel launch for the scattered entries, one DMA per long run.
    /// Counts in `issued` the launches and copies queued (the waits are not counted). `Ok`:
    /// the staging slot the kernel reads, if any.
    #[allow(clippy::too_many_arguments)]
    fn queue_copy(
        &self,
        sub: &mut Submit,
        req: &CopyRequest<'_>,
        to_own: bool,
        split: &plan::Split,
        device_waits: &[(Fence, NativeFence)],
        kernels: Option<&Kernels>,
        issued: &mut usize,
    ) -> Result<Option<usize>, BackendError> {
        self.wait_on_stream(device_waits)?;
        let mut slot_used = None;
        if let Some(k) = kernels {
            let segs = plan::kernel_segments(split, req.pages.len());
            let entries: usize = segs.iter().map(|&(s, e)| e - s).sum();
            if entries <= SMALL_ENTRIES && k.has_small() {
                self.launch_small(k, req, &segs, entries, to_own)?;
            } else {
                slot_used = Some(self.launch_staged(sub, k, req, &segs, entries, to_own)?);
            }
            *issued += 1;
            self.counters.kernels.fetch_add(1, Ordering::Relaxed);
        }
        self.queue_dma_runs(req, split, to_own, issued)?;
        Ok(slot_used)
    }

    /// Step 1: the copy stream waits for each device dependency (`cuStreamWaitEvent`).
    fn wait_on_stream(&self, device_waits: &[(Fence, NativeFence)]) -> Result<(), BackendError> {
        for (_fence, n) in device_waits {
            // SAFETY: the handle is a `CUevent` of this process (sorted by kind), kept alive
            // by its fence, which the caller holds; a stream may wait on an event of any
            // context.
            let r = unsafe { self.stream.wait_native_event(n.handle) };
            r.about("pre-fence")?;
            self.counters.stream_waits.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Step 2, small calls: the kernel entries (`segs`, `entries` of them, at most
    /// [`SMALL_ENTRIES`]) passed by value to `dpm_copy_small`: no staging buffer, nothing
    /// read across the bus first. The kernels have the small-call kernel.
    fn launch_small(
        &self,
        k: &Kernels,
        req: &CopyRequest<'_>,
        segs: &[(usize, usize)],
        entries: usize,
        to_own: bool,
    ) -> Result<(), BackendError> {
        let mut lists = SmallLists {
            addrs: [0; SMALL_ENTRIES],
            pfns: [0; SMALL_ENTRIES],
        };
        let mut at = 0usize;
        for &(s, e) in segs {
            for i in s..e {
                lists.addrs[at] = req.addrs[i].0;
                lists.pfns[at] = req.pages[i].0;
                at += 1;
            }
        }
        let shift = req.page_size.granules().trailing_zeros();
        // SAFETY: own pages are inside the mapped arena (pfn_end checked; allocated pages are
        // backed); other addresses were mapped for this device by the core.
        unsafe {
            k.launch_copy_small(
                &self.stream,
                &lists,
                (entries as u64) << shift,
                self.arena.base,
                shift,
                to_own,
            )?
        };
        Ok(())
    }

    /// Step 2, other calls: the kernel entries' lists staged in a pinned slot (copied on to
    /// device memory for large pages), then one `dpm_copy_pages` launch. Returns the slot,
    /// which stays busy until the call's event.
    fn launch_staged(
        &self,
        sub: &mut Submit,
        k: &Kernels,
        req: &CopyRequest<'_>,
        segs: &[(usize, usize)],
        entries: usize,
        to_own: bool,
    ) -> Result<usize, BackendError> {
        let bytes = entries * 12 + 16;
        let si = acquire_slot(sub, bytes)?;
        let slot = &sub.slots[si];
        let pfn_off = (entries * 8).next_multiple_of(16);
        let mut at = 0usize;
        for &(s, e) in segs {
            let m = e - s;
            // SAFETY: the slot holds at least `bytes`; the device no longer reads it
            // (acquire_slot checked its event); the source slices have `m` entries.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    req.addrs[s..e].as_ptr() as *const u8,
                    slot.host.add(at * 8),
                    m * 8,
                );
                std::ptr::copy_nonoverlapping(
                    req.pages[s..e].as_ptr() as *const u8,
                    slot.host.add(pfn_off + at * 4),
                    m * 4,
                );
            }
            at += m;
        }
        let shift = req.page_size.granules().trailing_zeros();
        // Large pages: hundreds of warps read each entry; give them device memory rather
        // than host memory across the bus (the copy is tiny). Large calls of small pages
        // gain nothing from it on the H200 (measured: BENCHMARKS.md, bulk copies).
        let mut lists = slot.dev;
        if shift >= 9 && bytes <= sub.lists_cap {
            // SAFETY: both buffers hold `bytes`; the stream orders this copy after the
            // previous kernel that read the device buffer.
            let r = unsafe { mem::copy_async(sub.lists_dev, slot.dev, bytes, &self.stream) };
            r.about("page lists")?;
            lists = sub.lists_dev;
        }
        // SAFETY: the lists cover `entries` entries; own pages are inside the mapped arena
        // (pfn_end checked; allocated pages are backed); other addresses were mapped for this
        // device by the core.
        unsafe {
            k.launch_copy(
                &self.stream,
                lists + pfn_off as u64,
                lists,
                (entries as u64) << shift,
                self.arena.base,
                shift,
                to_own,
                0,
                self.bulk.load(Ordering::Relaxed),
            )?;
        }
        Ok(si)
    }

    /// Step 3: one `cuMemcpyAsync` per DMA run (unified addressing: the driver infers the
    /// direction), each counted in `issued`; a run whose system-memory side crosses from one
    /// host chunk into the next is one copy per chunk (the driver refuses a copy spanning
    /// two registrations, even back to back).
    fn queue_dma_runs(
        &self,
        req: &CopyRequest<'_>,
        split: &plan::Split,
        to_own: bool,
        issued: &mut usize,
    ) -> Result<(), BackendError> {
        let b = req.page_size.bytes();
        for &(s, len) in &split.dma {
            let own = self.pfn_addr(req.pages[s]);
            let other = req.addrs[s].0;
            let total = len as u64 * b;
            let mut done = 0u64;
            while done < total {
                // The piece up to the end of the other side's host chunk, if it is host
                // memory (device arenas are one reservation: no limit).
                let at = other + done;
                let piece = match self.host.chunk_end(at) {
                    Some(end) => (end - at).min(total - done),
                    None => total - done,
                };
                let (dst, src) = if to_own {
                    (own + done, at)
                } else {
                    (at, own + done)
                };
                // SAFETY: both ranges are valid device-reachable memory of `piece` bytes
                // inside the run's `len` pages, the host side inside one chunk (unified
                // addressing: the driver infers the direction).
                let r = unsafe { mem::copy_async(dst, src, piece as usize, &self.stream) };
                r.about(format_args!("{piece} bytes"))?;
                *issued += 1;
                self.counters.dmas.fetch_add(1, Ordering::Relaxed);
                done += piece;
            }
        }
        Ok(())
    }

    /// Step 4: records the call's event after what `queued` queued, and marks the staging
    /// slot busy until it; on failure (of queuing or of the record), waits for the work
    /// already queued (`issued` launches and copies) to finish, so that the caller may
    /// release any memory it names.
    fn record_submission(
        &self,
        sub: &mut Submit,
        queued: Result<Option<usize>, BackendError>,
        issued: usize,
    ) -> Result<Arc<Event>, BackendError> {
        let recorded = queued.and_then(|slot| {
            let ev = Arc::new(self.device.events.get()?);
            ev.record(&self.stream)?;
            Ok((slot, ev))
        });
        match recorded {
            Ok((slot, ev)) => {
                if let Some(si) = slot {
                    sub.slots[si].busy = Some(ev.clone());
                }
                Ok(ev)
            }
            Err(e) => {
                // Queued work must finish before the caller releases any memory.
                if issued > 0 {
                    let _ = self.stream.synchronize();
                }
                Err(e)
            }
        }
    }
}
