//! A pagemap: a device-memory arena on one GPU (one contiguous virtual range, backed lazily
//! through the virtual memory management API), split into 4 KiB granules; its copy stream;
//! its copies. Laid out by concern, as a wgpu-hal backend is:
//!
//! - this file: the types (the pagemap, its counters, its submission state), construction
//!   and teardown, fences recorded on its streams, and the core's [`PagemapOps`] and
//!   [`DevmemOps`] implementations, which delegate to
//! - [`arena`]: the device memory (reserved, backed lazily);
//! - [`alloc`]: allocation, release, clearing and settling of pages;
//! - [`submit`]: copy submission (planning, pre-fences, stream waits, kernel launches, DMA,
//!   the event, failure recovery), with [`slots`], the pinned staging buffers;
//! - [`map`]: mapping pages for a device;
//! - `hooks` (feature `internals`): test and bench hooks.

mod alloc;
mod arena;
#[cfg(feature = "internals")]
mod hooks;
mod map;
mod slots;
mod submit;

use crate::allocs::AllocTable;
use crate::clean::CleanMap;
use crate::device::CudaDevice;
use crate::driver::{DriverResult, Stream, err, mem};
use crate::fence::CudaFence;
use crate::gate::{ControlPage, Gates};
use crate::host::PinnedHostMemory;
use crate::ring::cuda::RingPath;
use crate::settle::Settling;
use arena::Arena;
use drm_pagemap_core::{
    BackendError, BackendErrorKind, CopyCaps, CopyRequest, DeviceId, DevmemBacking, DevmemOps,
    Direction, DmaAddr, ExtentAllocator, Fence, FenceTimeline, GRANULE, HostFenceWait,
    NativeFenceKind, NativeFenceKinds, PageSize, PagemapOps, Pfn,
};
use slots::{PRESET_SLOTS, SLOT_BYTES, Slot, new_slot};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Bytes of device memory for page lists of large-page calls.
const LISTS_DEV_BYTES: usize = 1 << 20;

/// Bytes of the zeroed device buffer that scattered pages are cleared from (the largest page).
const ZERO_SRC_BYTES: usize = 2 << 20;

/// Counters of one pagemap, for tests and tables.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CudaStats {
    /// Successful `allocate` calls.
    pub allocations: u64,
    /// Allocations released (`devmem_release`, also through the calls below).
    pub releases: u64,
    /// Of those, released unused (`devmem_release_unused`: no copy was issued into them)
    /// and given back without a clear.
    pub unused_releases: u64,
    /// `copy_to_devmem` calls.
    pub copy_to_devmem_calls: u64,
    /// `copy_to_ram` calls.
    pub copy_to_ram_calls: u64,
    /// Gather/scatter kernel launches.
    pub kernel_launches: u64,
    /// DMA copies (`cuMemcpyAsync`).
    pub dma_copies: u64,
    /// Pages copied by this pagemap's calls.
    pub pages_copied: u64,
    /// Pre-fences turned into stream dependencies (`cuStreamWaitEvent`).
    pub stream_waits: u64,
    /// Pre-fences waited for on the CPU.
    pub cpu_waits: u64,
    /// Bytes allocated now.
    pub used_bytes: u64,
    /// Clears queued (on free, on first mapping, or on allocation): zeroing kernel launches.
    pub clear_launches: u64,
    /// Allocations that had to clear some of their pages themselves (pages never cleared
    /// on free); the others found clean pages and queued nothing.
    pub allocations_cleared: u64,
    /// Bytes freed whose clear has not been seen done yet (not allocatable until it has,
    /// unless nothing else fits).
    pub settling_bytes: u64,
    /// Allocations that took settling pages before their clear was seen done (nothing else
    /// fitted): their pre-migrate fence is that clear.
    pub settling_taken: u64,
    /// Copies that went through the ring (option `cuda.ring`) rather than the stream.
    pub ring_copies: u64,
}

#[derive(Default)]
struct Counters {
    allocations: AtomicU64,
    releases: AtomicU64,
    unused_releases: AtomicU64,
    to_devmem: AtomicU64,
    to_ram: AtomicU64,
    kernels: AtomicU64,
    dmas: AtomicU64,
    pages: AtomicU64,
    stream_waits: AtomicU64,
    cpu_waits: AtomicU64,
    used: AtomicU64,
    clears: AtomicU64,
    alloc_clears: AtomicU64,
    settling_taken: AtomicU64,
    ring: AtomicU64,
}

/// Submission state of the copy stream (under one lock, so seqnos follow stream order).
struct Submit {
    // INVARIANT: `slots` own their pinned buffers (see `Slot`); `lists_dev` (`lists_cap`
    // bytes) and `zero_src` (`ZERO_SRC_BYTES`, zeroed before the pagemap exists) are
    // `mem::alloc` allocations of the pagemap's context, freed only by the pagemap's Drop
    // once its streams are synchronised; work reading them is queued only under this lock.
    slots: Vec<Slot>,
    gates: Gates,
    /// Device memory the page lists of large-page calls are copied to before the kernel
    /// runs (one buffer: the stream orders its uses), and its size.
    lists_dev: u64,
    lists_cap: usize,
    /// [`ZERO_SRC_BYTES`] of zeroed device memory (scattered clears copy from it).
    zero_src: u64,
    /// Which free granules may hold old data.
    clean: CleanMap,
    /// Pages cleared on free whose clear (on the clear stream) has not been seen done; the
    /// allocator does not have them yet.
    settling: Settling<Fence>,
    /// The newest clear on the clear stream that pages the allocator has may still wait for
    /// (a freshly mapped segment, or settling pages taken before their clear was seen done),
    /// until it is seen signalled: the pre-migrate fence of allocations of clean pages.
    unsettled_clear: Option<Fence>,
}

// SAFETY: the raw pointers are pinned host buffers owned by this struct (INVARIANT), which
// any thread may write once the device is done with them.
unsafe impl Send for Submit {}

/// A pagemap of the CUDA backend. Reached through [`drm_pagemap_core::Pagemap`]; the
/// concrete type offers its counters and a few diagnostics, and, with the cargo feature
/// `internals`, hooks for tests and benches.
pub struct CudaPagemap {
    // Field order is drop order: the stream (synchronised), then the arena, then the device
    // (whose context both need).
    submit: Mutex<Submit>,
    stream: Stream,
    /// Clears of freed pages and fresh segments run here, beside the copies: a fault right
    /// after an eviction does not queue its copy behind the eviction's clear.
    clear_stream: Stream,
    arena: Arena,
    device: Arc<CudaDevice>,
    /// Devices whose copies may read and write this memory directly (its owner group).
    group: Vec<DeviceId>,
    host: Arc<PinnedHostMemory>,
    frames: ExtentAllocator,
    timeline: FenceTimeline,
    /// Fence context of the clear stream (its fences are not ordered by the copy stream).
    clear_timeline: FenceTimeline,
    /// This pagemap, for helper threads that queue deferred copies.
    me: std::sync::OnceLock<std::sync::Weak<CudaPagemap>>,
    allocs: Mutex<AllocTable>,
    dma_min_host: AtomicU64,
    dma_min_device: AtomicU64,
    /// Staged kernel copies use `dpm_copy_pages_bulk` where the module has it (option
    /// `cuda.bulk`).
    bulk: std::sync::atomic::AtomicBool,
    clear_on_free: bool,
    counters: Counters,
    /// The pagemap's id (for `tracing` fields).
    pagemap: u8,
    /// The ring of small copies (option `cuda.ring`), or why there is none.
    ring: Option<RingPath>,
    ring_why: Option<String>,
}

impl std::fmt::Debug for CudaPagemap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaPagemap")
            .field("device", &self.device.id)
            .field("base", &format_args!("{:#x}", self.arena.base))
            .field("capacity", &self.arena.capacity)
            .finish_non_exhaustive()
    }
}

impl CudaPagemap {
    pub(crate) fn new(
        device: Arc<CudaDevice>,
        group: Vec<DeviceId>,
        peer_ordinals: &[i32],
        host: Arc<PinnedHostMemory>,
        capacity: u64,
        config: &crate::CudaConfig,
        pagemap: drm_pagemap_core::PagemapId,
    ) -> Result<CudaPagemap, BackendError> {
        let capacity = capacity / PageSize::Size2M.bytes() * PageSize::Size2M.bytes();
        if capacity == 0 || capacity / GRANULE > u32::MAX as u64 {
            return Err(err(
                BackendErrorKind::Unsupported,
                format!("cuda: a pagemap of {capacity} bytes (2 MiB to 16 TiB allowed)"),
            ));
        }
        let arena = Arena::new(&device, capacity, peer_ordinals)?;
        let stream = Stream::new(&device.ctx)?;
        let clear_stream = Stream::new(&device.ctx)?;
        let gates = Gates::new(ControlPage::new(&device.ctx)?);
        // Freed in Drop.
        let lists_dev = mem::alloc(LISTS_DEV_BYTES).about("page-list buffer")?;
        // Freed in Drop (or right below on failure).
        let zero_src = match mem::alloc(ZERO_SRC_BYTES).about("zeroed buffer") {
            Ok(z) => z,
            Err(e) => {
                // SAFETY: allocated above, unused.
                let _ = unsafe { mem::free(lists_dev) };
                return Err(e);
            }
        };
        // Clears on both streams read the buffer: it is zeroed before the pagemap exists.
        // SAFETY: the buffer holds ZERO_SRC_BYTES; the stream lives.
        let r = unsafe { mem::set_d32_async(zero_src, 0, ZERO_SRC_BYTES / 4, &stream) };
        // (The stream is synchronised whether or not the set was queued.)
        if let Err(e) = r.about("zeroed buffer").and(stream.synchronize()) {
            // SAFETY: allocated above; nothing was queued that reads them.
            unsafe {
                let _ = mem::free(zero_src);
                let _ = mem::free(lists_dev);
            }
            return Err(e);
        }
        let mut slots = Vec::with_capacity(PRESET_SLOTS);
        for _ in 0..PRESET_SLOTS {
            match new_slot(SLOT_BYTES) {
                Ok(slot) => slots.push(slot),
                Err(e) => {
                    // SAFETY: all allocated above; the stream was synchronised and nothing
                    // was queued that reads them (the slots are fresh, unused).
                    unsafe {
                        for s in slots.drain(..) {
                            let _ = mem::free_host(s.host as *mut std::ffi::c_void);
                        }
                        let _ = mem::free(zero_src);
                        let _ = mem::free(lists_dev);
                    }
                    return Err(e);
                }
            }
        }
        let granules = capacity / GRANULE;
        let (ring, ring_why) = if config.ring {
            match RingPath::new(&device, pagemap.0, config.ring_idle) {
                Ok(r) => (Some(r), None),
                Err(why) => {
                    tracing::info!(target: "drm_pagemap::cuda", pagemap = pagemap.0,
                        device = device.id.0, %why, "no ring: small copies take the stream");
                    (None, Some(why))
                }
            }
        } else {
            (None, Some("off (option cuda.ring)".to_string()))
        };
        Ok(CudaPagemap {
            ring,
            ring_why,
            frames: ExtentAllocator::new(capacity / GRANULE),
            device,
            group,
            host,
            arena,
            stream,
            clear_stream,
            timeline: FenceTimeline::new(),
            clear_timeline: FenceTimeline::new(),
            me: std::sync::OnceLock::new(),
            submit: Mutex::new(Submit {
                slots,
                gates,
                lists_dev,
                lists_cap: LISTS_DEV_BYTES,
                zero_src,
                clean: CleanMap::new(granules),
                settling: Settling::default(),
                unsettled_clear: None,
            }),
            allocs: Mutex::new(AllocTable::default()),
            dma_min_host: AtomicU64::new(config.dma_min_host),
            dma_min_device: AtomicU64::new(config.dma_min_device),
            bulk: std::sync::atomic::AtomicBool::new(config.bulk),

            clear_on_free: config.clear_on_free,
            counters: Counters::default(),
            pagemap: pagemap.0,
        })
    }

    /// Lets helper threads reach this pagemap (called once it is in its `Arc`).
    pub(crate) fn set_self(self: &Arc<Self>) {
        let _ = self.me.set(Arc::downgrade(self));
    }

    /// Counters of this pagemap.
    pub fn stats(&self) -> CudaStats {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::SeqCst);
        let settling = self
            .submit
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .settling
            .granules();
        CudaStats {
            allocations: l(&c.allocations),
            releases: l(&c.releases),
            unused_releases: l(&c.unused_releases),
            copy_to_devmem_calls: l(&c.to_devmem),
            copy_to_ram_calls: l(&c.to_ram),
            kernel_launches: l(&c.kernels),
            dma_copies: l(&c.dmas),
            pages_copied: l(&c.pages),
            stream_waits: l(&c.stream_waits),
            cpu_waits: l(&c.cpu_waits),
            used_bytes: l(&c.used),
            clear_launches: l(&c.clears),
            allocations_cleared: l(&c.alloc_clears),
            settling_bytes: settling * GRANULE,
            settling_taken: l(&c.settling_taken),
            ring_copies: l(&c.ring),
        }
    }

    /// The device.
    pub fn device_id(&self) -> DeviceId {
        self.device.id
    }

    /// The device address of granule 0.
    pub fn base(&self) -> u64 {
        self.arena.base
    }

    /// The device address of `pfn`.
    pub fn pfn_addr(&self, pfn: Pfn) -> u64 {
        self.arena.base + pfn.0 as u64 * GRANULE
    }

    /// Where the gather/scatter kernel of this device came from ("nvrtc (compute_90)",
    /// "fallback ptx (...)"); loads it if needed.
    pub fn kernel_origin(&self) -> Result<String, BackendError> {
        self.device.kernels().map(|k| k.origin.clone())
    }

    /// Whether small calls pass their lists to the kernel by value (the NVRTC kernels do;
    /// the fallback PTX has no such kernel); loads the kernels if needed.
    pub fn has_small_kernel(&self) -> Result<bool, BackendError> {
        self.device.kernels().map(|k| k.has_small())
    }

    /// Whether small copies may take the ring (option `cuda.ring`); `Err`: why not ("off
    /// (option cuda.ring)", no ring kernel in the loaded module, no 64-bit stream memory
    /// operations).
    pub fn ring_status(&self) -> Result<(), String> {
        match &self.ring {
            Some(_) => Ok(()),
            None => Err(self.ring_why.clone().unwrap_or_default()),
        }
    }

    /// The DMA crossover `(host, device)` in bytes.
    pub fn dma_min(&self) -> (u64, u64) {
        (
            self.dma_min_host.load(Ordering::SeqCst),
            self.dma_min_device.load(Ordering::SeqCst),
        )
    }

    /// Blocks until every copy and clear queued on this pagemap's streams has run; freed
    /// pages whose clear has run go back to the allocator.
    pub fn synchronize(&self) -> Result<(), BackendError> {
        if let Some(r) = &self.ring {
            r.fence(r.engine().published(), self.device.id)
                .wait()
                .map_err(|e| match e {
                    drm_pagemap_core::FenceError::Failed(e) => e,
                    other => err(BackendErrorKind::CopyFailed, other.to_string()),
                })?;
        }
        self.stream.synchronize()?;
        self.clear_stream.synchronize()?;
        let mut sub = self.submit.lock().unwrap_or_else(|p| p.into_inner());
        self.reap_settled(&mut sub);
        Ok(())
    }

    /// A fence recorded on the copy stream now (signals when everything queued before it ran).
    pub fn fence(&self) -> Result<Fence, BackendError> {
        let _g = self.submit.lock().unwrap_or_else(|p| p.into_inner());
        self.device.ctx.bind()?;
        if let Some(r) = &self.ring {
            r.order_stream(&self.stream)?;
        }
        self.record(Vec::new()).map(Fence::new)
    }

    fn record(&self, deps: Vec<Fence>) -> Result<CudaFence, BackendError> {
        self.record_on(&self.stream, &self.timeline, deps)
    }

    /// A fence of the clear stream (its own context: copies are not ordered by it).
    fn record_clear(&self) -> Result<CudaFence, BackendError> {
        self.record_on(&self.clear_stream, &self.clear_timeline, Vec::new())
    }

    fn record_on(
        &self,
        stream: &Stream,
        timeline: &FenceTimeline,
        deps: Vec<Fence>,
    ) -> Result<CudaFence, BackendError> {
        let ev = Arc::new(self.device.events.get()?);
        ev.record(stream)?;
        Ok(CudaFence::new(
            timeline.context(),
            timeline.next_seqno(),
            self.device.id,
            ev,
            deps,
        ))
    }
}

impl Drop for CudaPagemap {
    fn drop(&mut self) {
        // The ring's kernel first (bounded; a stuck one is abandoned, its memory leaked and
        // every wait for it satisfied), so that the streams' waits on it end.
        if let Some(r) = &self.ring {
            r.engine().shutdown();
        }
        // Nothing may stay blocked on a gate whose fence never signals.
        self.submit
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .gates
            .abort_all();
        let _ = self.stream.synchronize();
        let _ = self.clear_stream.synchronize();
        let _ = self.device.ctx.bind();
        let sub = self.submit.get_mut().unwrap_or_else(|p| p.into_inner());
        // SAFETY: allocated by `new` (INVARIANT); the streams are synchronised: no copy or
        // clear reads the buffers any more.
        unsafe {
            let _ = mem::free(sub.lists_dev);
            let _ = mem::free(sub.zero_src);
        }
        for s in sub.slots.drain(..) {
            // SAFETY: allocated by `host_alloc` (INVARIANT of `Slot`); the stream is
            // synchronised: no kernel reads the buffer any more.
            let _ = unsafe { mem::free_host(s.host as *mut std::ffi::c_void) };
        }
        // The arena drops after this (fields drop in order): the context is bound.
    }
}

impl PagemapOps for CudaPagemap {
    fn device_map(
        &self,
        device: DeviceId,
        pfns: &[Pfn],
        _page_size: PageSize,
        _dir: Direction,
        out: &mut [DmaAddr],
    ) -> Result<(), BackendError> {
        self.map_pfns(device, pfns, out)
    }

    /// Nothing to undo: mapping is an address computation.
    fn device_unmap(
        &self,
        _device: DeviceId,
        _addrs: &[DmaAddr],
        _page_size: PageSize,
        _dir: Direction,
    ) {
    }
}

impl DevmemOps for CudaPagemap {
    fn allocate(&self, npages: usize, page_size: PageSize) -> Result<DevmemBacking, BackendError> {
        self.alloc_backing(npages, page_size)
    }

    fn populate_devmem_pfn(
        &self,
        backing: &DevmemBacking,
        out: &mut [Pfn],
    ) -> Result<(), BackendError> {
        self.backing_pfns(backing, out)
    }

    fn copy_to_devmem(&self, req: &CopyRequest<'_>) -> Result<Fence, BackendError> {
        self.counters.to_devmem.fetch_add(1, Ordering::Relaxed);
        self.copy(req, true)
    }

    fn copy_to_ram(&self, req: &CopyRequest<'_>) -> Result<Fence, BackendError> {
        self.counters.to_ram.fetch_add(1, Ordering::Relaxed);
        self.copy(req, false)
    }

    fn devmem_release(&self, backing: DevmemBacking) {
        self.release_backings(std::slice::from_ref(&backing));
    }

    fn devmem_release_unused(&self, backing: DevmemBacking) {
        self.release_untouched(backing)
    }

    fn devmem_release_many(&self, backings: &[DevmemBacking]) {
        self.release_backings(backings)
    }

    fn capacity_bytes(&self) -> u64 {
        self.arena.capacity
    }

    /// No command limit: each call is planned here (one gather/scatter launch for the
    /// scattered entries, one DMA per long run), so it must arrive whole. The stream waits on
    /// CUDA events ([`NativeFenceKind::CUDA_EVENT`], of any context of the process); any other
    /// pending pre-fence defers the call, queued from the core's fence worker once it has
    /// signalled ([`HostFenceWait::Deferred`]: the call never blocks, the stream never waits
    /// for the host). One stream runs the pagemap's copies in submission order.
    fn caps(&self) -> CopyCaps {
        CopyCaps {
            max_command_bytes: None,
            native_fence_kinds: NativeFenceKinds::one(NativeFenceKind::CUDA_EVENT),
            host_fences: HostFenceWait::Deferred,
            in_order: true,
            batch_bytes_hint: None,
        }
    }
}
