//! A pagemap: a device-memory arena on one GPU (one contiguous virtual range, backed lazily
//! through the virtual memory management API), split into 4 KiB granules; its copy stream;
//! its copies.

use crate::allocs::AllocTable;
use crate::clean::{CleanMap, extents};
use crate::device::CudaDevice;
use crate::driver::{Event, Stream, check, driver_error, err};
use crate::fence::CudaFence;
use crate::gate::{ControlPage, Gates, Hold};
use crate::host::PinnedHostMemory;
use crate::kernel::{GATE_ABORT, Kernels, SMALL_ENTRIES, SmallLists};
use crate::plan;
use crate::settle::{Cleared, Settling};
use cudarc::driver::sys;
use drm_pagemap_core::mem::ExtentAllocator;
use drm_pagemap_core::{
    BackendError, BackendErrorKind, CopyCaps, CopyRequest, Dependencies, DeviceId, DevmemBacking,
    DevmemOps, Direction, DmaAddr, Fence, FenceContext, FenceStatus, FenceTimeline, GRANULE,
    HostFenceWait, NativeFence, NativeFenceKind, NativeFenceKinds, NativeWait, PageSize,
    PagemapOps, Pfn, sort_dependencies,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Staging buffers kept per pagemap before a call waits for one to come free.
const MAX_SLOTS: usize = 8;
/// Staging buffers made with the pagemap, and their size (2 MiB: 174 762 entries a call).
const PRESET_SLOTS: usize = 4;
const SLOT_BYTES: usize = 2 << 20;
/// Bytes of device memory for page lists of large-page calls.
const LISTS_DEV_BYTES: usize = 1 << 20;
/// Bytes of the zeroed device buffer that scattered pages are cleared from (the largest page).
const ZERO_SRC_BYTES: usize = 2 << 20;
/// A call of at most [`SMALL_ENTRIES`] entries in at most this many runs copies its runs
/// touching system memory with one DMA each, whatever their length (unless DMA is off).
pub const LATENCY_DMA_RUNS: usize = 3;
/// The page sizes, in the order releases group them.
const PAGE_SIZES: [PageSize; 3] = [PageSize::Size4K, PageSize::Size64K, PageSize::Size2M];
/// Clears of up to this many extents are one zeroing kernel each; more, one copy kernel from
/// the zeroed buffer over a page list.
const ZERO_EXTENTS_DIRECT: usize = 4;

/// Virtual memory is backed in steps of this many bytes (rounded to the granularity).
const GROW_STEP: u64 = 64 << 20;

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
}

/// The device memory of one pagemap.
struct Arena {
    base: u64,
    reserved: u64,
    capacity: u64,
    vmm: bool,
    granularity: u64,
    /// Mapped prefix and the mapped segments (offset, size), for unmapping.
    mapped: Mutex<(u64, Vec<(u64, u64)>)>,
    /// Devices that must reach this memory (its own and its peers).
    access: Vec<i32>,
    ordinal: i32,
}

impl Arena {
    fn new(dev: &CudaDevice, capacity: u64, peers: &[i32]) -> Result<Arena, BackendError> {
        dev.ctx.bind()?;
        let mut access = vec![dev.ordinal];
        access.extend(peers.iter().copied().filter(|&p| p != dev.ordinal));
        if dev.vmm {
            let prop = alloc_prop(dev.ordinal);
            let mut g = 0usize;
            let min = sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_MINIMUM;
            // SAFETY: writes one size; `prop` is a valid description.
            let r = unsafe { sys::cuMemGetAllocationGranularity(&mut g, &prop, min) };
            check("cuMemGetAllocationGranularity", r, "pagemap arena")?;
            let g = (g as u64).max(GRANULE);
            let reserved = capacity.div_ceil(g) * g;
            let mut base = 0u64;
            // SAFETY: reserves address space only; freed in Drop.
            let r =
                unsafe { sys::cuMemAddressReserve(&mut base, reserved as usize, g as usize, 0, 0) };
            check(
                "cuMemAddressReserve",
                r,
                format_args!("{} MiB of address space", reserved >> 20),
            )?;
            Ok(Arena {
                base,
                reserved,
                capacity,
                vmm: true,
                granularity: g,
                mapped: Mutex::new((0, Vec::new())),
                access,
                ordinal: dev.ordinal,
            })
        } else {
            let mut base = 0u64;
            // SAFETY: writes one pointer; freed in Drop.
            let r = unsafe { sys::cuMemAlloc_v2(&mut base, capacity as usize) };
            if r == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
                return Err(err(
                    BackendErrorKind::OutOfMemory,
                    format!(
                        "cuda device {}: a {} MiB pagemap does not fit",
                        dev.ordinal,
                        capacity >> 20
                    ),
                ));
            }
            check("cuMemAlloc", r, "pagemap arena")?;
            Ok(Arena {
                base,
                reserved: capacity,
                capacity,
                vmm: false,
                granularity: GRANULE,
                mapped: Mutex::new((capacity, Vec::new())),
                access,
                ordinal: dev.ordinal,
            })
        }
    }

    /// Makes sure bytes `[0, end)` are backed by device memory. `fresh(offset, bytes)` runs
    /// on a segment this call maps, before any other caller can see it mapped (it queues
    /// the segment's clear; its failure only leaves the segment dirty).
    fn ensure(&self, end: u64, fresh: impl FnOnce(u64, u64)) -> Result<(), BackendError> {
        let mut m = self.mapped.lock().unwrap_or_else(|p| p.into_inner());
        if end <= m.0 {
            return Ok(());
        }
        let step = GROW_STEP.div_ceil(self.granularity) * self.granularity;
        let target = (end.div_ceil(step) * step).min(self.reserved);
        let size = target - m.0;
        let at = self.base + m.0;
        let prop = alloc_prop(self.ordinal);
        let mut handle = 0;
        // SAFETY: creates a physical allocation; released right after mapping (the mapping
        // keeps it alive).
        let r = unsafe { sys::cuMemCreate(&mut handle, size as usize, &prop, 0) };
        if r == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            return Err(err(
                BackendErrorKind::OutOfMemory,
                format!(
                    "cuda device {}: no device memory for another {} MiB",
                    self.ordinal,
                    size >> 20
                ),
            ));
        }
        check("cuMemCreate", r, format_args!("{} MiB", size >> 20))?;
        // SAFETY: maps the whole handle at a reserved, unmapped, aligned address.
        let r = unsafe { sys::cuMemMap(at, size as usize, 0, handle, 0) };
        // SAFETY: the mapping (if made) holds the memory; the handle is not used again.
        unsafe {
            sys::cuMemRelease(handle);
        }
        check("cuMemMap", r, "pagemap arena")?;
        let descs: Vec<sys::CUmemAccessDesc> = self
            .access
            .iter()
            .map(|&d| sys::CUmemAccessDesc {
                location: sys::CUmemLocation {
                    type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
                    id: d,
                },
                flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
            })
            .collect();
        // SAFETY: the range was just mapped; `descs` describes devices of this process.
        let r = unsafe { sys::cuMemSetAccess(at, size as usize, descs.as_ptr(), descs.len()) };
        if let Err(e) = check("cuMemSetAccess", r, "pagemap arena") {
            // SAFETY: unmaps what was mapped above.
            unsafe {
                sys::cuMemUnmap(at, size as usize);
            }
            return Err(e);
        }
        let from = m.0;
        m.1.push((from, size));
        m.0 = target;
        fresh(from, size);
        Ok(())
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // The owner has bound the context and synchronised its stream.
        // SAFETY: every segment was mapped by `ensure`; the reservation by `new`.
        unsafe {
            if self.vmm {
                let m = self.mapped.get_mut().unwrap_or_else(|p| p.into_inner());
                for &(off, size) in &m.1 {
                    sys::cuMemUnmap(self.base + off, size as usize);
                }
                sys::cuMemAddressFree(self.base, self.reserved as usize);
            } else {
                sys::cuMemFree_v2(self.base);
            }
        }
    }
}

fn alloc_prop(ordinal: i32) -> sys::CUmemAllocationProp {
    // SAFETY: an all-zero CUmemAllocationProp is valid (plain integers and a null pointer).
    let mut prop: sys::CUmemAllocationProp = unsafe { std::mem::zeroed() };
    prop.type_ = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location = sys::CUmemLocation {
        type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
        id: ordinal,
    };
    prop
}

/// A pinned, device-mapped buffer for one call's page lists (cached: the CPU fills it with
/// plain copies; write-combined memory measured slower for that).
struct Slot {
    host: *mut u8,
    dev: u64,
    cap: usize,
    busy: Option<Arc<Event>>,
}

impl Slot {
    fn is_free(&self) -> bool {
        self.busy
            .as_ref()
            .is_none_or(|e| e.query().unwrap_or(false))
    }
}

/// Submission state of the copy stream (under one lock, so seqnos follow stream order).
struct Submit {
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

// SAFETY: the raw pointers are pinned host buffers owned by this struct.
unsafe impl Send for Submit {}

/// A pagemap of the CUDA backend. Reached through [`drm_pagemap_core::Pagemap`]; the
/// concrete type offers a few extras for tests and benches.
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
    clear_on_free: bool,
    counters: Counters,
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
        let mut lists_dev = 0u64;
        // SAFETY: writes one pointer; freed in Drop.
        let r = unsafe { sys::cuMemAlloc_v2(&mut lists_dev, LISTS_DEV_BYTES) };
        check("cuMemAlloc", r, "page-list buffer")?;
        let mut zero_src = 0u64;
        // SAFETY: writes one pointer; freed in Drop (or right below on failure).
        let r = unsafe { sys::cuMemAlloc_v2(&mut zero_src, ZERO_SRC_BYTES) };
        if let Err(e) = check("cuMemAlloc", r, "zeroed buffer") {
            // SAFETY: allocated above, unused.
            unsafe { sys::cuMemFree_v2(lists_dev) };
            return Err(e);
        }
        // Clears on both streams read the buffer: it is zeroed before the pagemap exists.
        // SAFETY: the buffer holds ZERO_SRC_BYTES; the stream lives.
        let r = unsafe { sys::cuMemsetD32Async(zero_src, 0, ZERO_SRC_BYTES / 4, stream.raw) };
        if let Err(e) = check("cuMemsetD32Async", r, "zeroed buffer").and(stream.synchronize()) {
            // SAFETY: allocated above; nothing was queued that reads them.
            unsafe {
                sys::cuMemFree_v2(zero_src);
                sys::cuMemFree_v2(lists_dev);
            }
            return Err(e);
        }
        let slots = (0..PRESET_SLOTS)
            .map(|_| new_slot(SLOT_BYTES))
            .collect::<Result<Vec<_>, _>>()?;
        let granules = capacity / GRANULE;
        Ok(CudaPagemap {
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
            clear_on_free: config.clear_on_free,
            counters: Counters::default(),
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

    /// The raw `CUstream` of this pagemap's copies (benches record timing events on it).
    pub fn stream_handle(&self) -> usize {
        self.stream.raw as usize
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

    /// Runs with the DMA crossover set to `host` bytes (runs touching system memory) and
    /// `device` bytes (device-to-device runs): a run at least that long is one DMA copy.
    /// Besides, a call of at most [`LATENCY_DMA_RUNS`] runs copies its system-memory runs
    /// by DMA whatever their length; `host == u64::MAX` turns DMA off for those as well.
    pub fn set_dma_min(&self, host: u64, device: u64) {
        self.dma_min_host.store(host, Ordering::SeqCst);
        self.dma_min_device.store(device, Ordering::SeqCst);
    }

    /// The DMA crossover `(host, device)` in bytes.
    pub fn dma_min(&self) -> (u64, u64) {
        (
            self.dma_min_host.load(Ordering::SeqCst),
            self.dma_min_device.load(Ordering::SeqCst),
        )
    }

    /// Keeps the copy stream busy for `ns` nanoseconds of GPU time (tests widen race windows
    /// with it; benches queue work behind it so only device time is measured).
    pub fn stall(&self, ns: u64) -> Result<(), BackendError> {
        let k = self.device.kernels()?;
        let _g = self.submit.lock().unwrap_or_else(|p| p.into_inner());
        self.device.ctx.bind()?;
        k.launch_spin(&self.stream, ns)
    }

    /// Holds the copy stream until the returned [`Hold`] is released or dropped: work queued
    /// meanwhile waits on the device (tests use it to order things deterministically).
    ///
    /// While the stream is held, driver calls that synchronise the device implicitly (memory
    /// allocations: a new pagemap, arena growth, more pinned host memory) wait for the
    /// release, in every thread of the process: release it from a thread that makes none.
    pub fn hold(&self) -> Result<Hold, BackendError> {
        self.hold_stream(&self.stream)
    }

    /// Holds the clear stream (clears of freed pages and of fresh segments) like
    /// [`CudaPagemap::hold`] holds the copy stream.
    pub fn hold_clears(&self) -> Result<Hold, BackendError> {
        self.hold_stream(&self.clear_stream)
    }

    fn hold_stream(&self, stream: &Stream) -> Result<Hold, BackendError> {
        let k = self.device.kernels()?;
        let mut sub = self.submit.lock().unwrap_or_else(|p| p.into_inner());
        self.device.ctx.bind()?;
        let g = sub.gates.take()?;
        // SAFETY: the gate word lives in the control page, kept alive by the Hold.
        let launched = unsafe { k.launch_wait(stream, sub.gates.page.addr(g), 0) };
        if let Err(e) = launched {
            sub.gates.page.set(g, GATE_ABORT);
            return Err(e);
        }
        let ev = Arc::new(self.device.events.get()?);
        ev.record(stream)?;
        sub.gates.retire_after(g, ev);
        Ok(Hold {
            page: sub.gates.page.clone(),
            gate: g,
        })
    }

    /// Blocks until every copy and clear queued on this pagemap's streams has run; freed
    /// pages whose clear has run go back to the allocator.
    pub fn synchronize(&self) -> Result<(), BackendError> {
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
    fn reap_settled(&self, sub: &mut Submit) {
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
                // SAFETY: both handles are alive (`f`, which owns the event, is held while
                // the call runs); the handle is a `CUevent` of this process.
                let r = unsafe {
                    sys::cuStreamWaitEvent(self.stream.raw, n.handle as usize as sys::CUevent, 0)
                };
                check("cuStreamWaitEvent", r, "pending clear")?;
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

    fn in_group(&self, d: DeviceId) -> bool {
        self.group.contains(&d)
    }

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

    fn copy(&self, req: &CopyRequest<'_>, to_own: bool) -> Result<Fence, BackendError> {
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
        if !deps.host.is_empty() {
            return self.copy_deferred(req, to_own, split, deps);
        }
        let mut sub = self.submit.lock().unwrap_or_else(|p| p.into_inner());
        let ev = self.submit_locked(&mut sub, req, to_own, &split, &deps.device)?;
        Ok(Fence::new(CudaFence::new(
            self.timeline.context(),
            self.timeline.next_seqno(),
            self.device.id,
            ev,
            deps.device.into_iter().map(|(f, _)| f).collect(),
        )))
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
        let all: Vec<Fence> = deps
            .device
            .iter()
            .map(|(f, _)| f.clone())
            .chain(deps.host.iter().cloned())
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

    /// Queues the copy on the stream (stream waits for `cuda_waits`, one kernel launch for
    /// the scattered entries, one DMA per long run) and records its event.
    fn submit_locked(
        &self,
        sub: &mut Submit,
        req: &CopyRequest<'_>,
        to_own: bool,
        split: &plan::Split,
        device_waits: &[(Fence, NativeFence)],
    ) -> Result<Arc<Event>, BackendError> {
        let n = req.pages.len();
        let ps = req.page_size;
        let kernels = if split.kernel_entries > 0 {
            Some(self.device.kernels()?)
        } else {
            None
        };
        self.device.ctx.bind()?;
        let mut issued = 0usize;
        let result = (|| -> Result<Option<usize>, BackendError> {
            for (_fence, n) in device_waits {
                // SAFETY: the stream is alive; the handle is a `CUevent` of this process
                // (sorted by kind), kept alive by its fence, which the caller holds; a stream
                // may wait on an event of any context.
                let r = unsafe {
                    sys::cuStreamWaitEvent(self.stream.raw, n.handle as usize as sys::CUevent, 0)
                };
                check("cuStreamWaitEvent", r, "pre-fence")?;
                self.counters.stream_waits.fetch_add(1, Ordering::Relaxed);
            }
            let mut slot_used = None;
            let segs = if kernels.is_some() {
                plan::kernel_segments(split, n)
            } else {
                Vec::new()
            };
            let entries: usize = segs.iter().map(|&(s, e)| e - s).sum();
            let small = match &kernels {
                Some(k) if entries <= SMALL_ENTRIES && k.has_small() => Some(k),
                _ => None,
            };
            if let Some(k) = small {
                // Lists by value: no staging buffer, nothing read across the bus first.
                let mut lists = SmallLists {
                    addrs: [0; SMALL_ENTRIES],
                    pfns: [0; SMALL_ENTRIES],
                };
                let mut at = 0usize;
                for &(s, e) in &segs {
                    for i in s..e {
                        lists.addrs[at] = req.addrs[i].0;
                        lists.pfns[at] = req.pages[i].0;
                        at += 1;
                    }
                }
                let shift = ps.granules().trailing_zeros();
                // SAFETY: own pages are inside the mapped arena (pfn_end checked; allocated
                // pages are backed); other addresses were mapped for this device by the core.
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
                issued += 1;
                self.counters.kernels.fetch_add(1, Ordering::Relaxed);
            } else if let Some(k) = &kernels {
                let bytes = entries * 12 + 16;
                let si = acquire_slot(sub, bytes)?;
                let slot = &sub.slots[si];
                let pfn_off = (entries * 8).next_multiple_of(16);
                let mut at = 0usize;
                for &(s, e) in &segs {
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
                let shift = ps.granules().trailing_zeros();
                // Large pages: hundreds of warps read each entry; give them device memory
                // rather than host memory across the bus (the copy is tiny).
                let mut lists = slot.dev;
                if shift >= 9 && bytes <= sub.lists_cap {
                    // SAFETY: both buffers hold `bytes`; the stream orders this copy after
                    // the previous kernel that read the device buffer.
                    let r = unsafe {
                        sys::cuMemcpyAsync(sub.lists_dev, slot.dev, bytes, self.stream.raw)
                    };
                    check("cuMemcpyAsync", r, "page lists")?;
                    lists = sub.lists_dev;
                }
                // SAFETY: the lists cover `entries` entries; own pages are inside the mapped
                // arena (pfn_end checked; allocated pages are backed); other addresses were
                // mapped for this device by the core.
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
                    )?;
                }
                issued += 1;
                self.counters.kernels.fetch_add(1, Ordering::Relaxed);
                slot_used = Some(si);
            }
            let b = ps.bytes();
            for &(s, len) in &split.dma {
                let own = self.pfn_addr(req.pages[s]);
                let other = req.addrs[s].0;
                let (dst, src) = if to_own { (own, other) } else { (other, own) };
                // SAFETY: both ranges are valid device-reachable memory of `len` pages
                // (unified addressing: the driver infers the direction).
                let r = unsafe {
                    sys::cuMemcpyAsync(dst, src, (len as u64 * b) as usize, self.stream.raw)
                };
                check("cuMemcpyAsync", r, format_args!("{} bytes", len as u64 * b))?;
                issued += 1;
                self.counters.dmas.fetch_add(1, Ordering::Relaxed);
            }
            Ok(slot_used)
        })();
        let recorded = result.and_then(|slot| {
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

/// A free staging slot of at least `bytes`: a free one; else, below [`MAX_SLOTS`], a new
/// one; else the first big enough, once the device is done with it. (Pinning memory is an
/// implicit synchronisation point of the device, so slots are made ahead: see `new`.)
fn acquire_slot(sub: &mut Submit, bytes: usize) -> Result<usize, BackendError> {
    if let Some(i) = sub.slots.iter().position(|s| s.cap >= bytes && s.is_free()) {
        sub.slots[i].busy = None;
        return Ok(i);
    }
    if sub.slots.len() >= MAX_SLOTS
        && let Some(i) = sub.slots.iter().position(|s| s.cap >= bytes)
    {
        if let Some(e) = sub.slots[i].busy.take() {
            e.synchronize()?;
        }
        return Ok(i);
    }
    sub.slots
        .push(new_slot(bytes.next_power_of_two().max(SLOT_BYTES))?);
    Ok(sub.slots.len() - 1)
}

/// A pinned, mapped staging buffer of `cap` bytes.
fn new_slot(cap: usize) -> Result<Slot, BackendError> {
    let mut p: *mut std::ffi::c_void = std::ptr::null_mut();
    let flags = sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE;
    // SAFETY: writes one pointer; freed when the pagemap drops.
    let r = unsafe { sys::cuMemHostAlloc(&mut p, cap, flags) };
    check("cuMemHostAlloc", r, "staging buffer")?;
    let mut dev = 0u64;
    // SAFETY: `p` was allocated with DEVICEMAP.
    let r = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dev, p, 0) };
    if r != sys::CUresult::CUDA_SUCCESS {
        // SAFETY: allocated above, unused.
        unsafe {
            sys::cuMemFreeHost(p);
        }
        return Err(driver_error(
            "cuMemHostGetDevicePointer",
            r,
            "staging buffer",
        ));
    }
    Ok(Slot {
        host: p as *mut u8,
        dev,
        cap,
        busy: None,
    })
}

impl Drop for CudaPagemap {
    fn drop(&mut self) {
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
        // SAFETY: the streams are synchronised: no copy or clear reads the buffers any more.
        unsafe {
            sys::cuMemFree_v2(sub.lists_dev);
            sys::cuMemFree_v2(sub.zero_src);
        }
        for s in sub.slots.drain(..) {
            // SAFETY: the stream is synchronised: no kernel reads the buffer any more.
            unsafe {
                sys::cuMemFreeHost(s.host as *mut std::ffi::c_void);
            }
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
        if !self.in_group(device) {
            return Err(err(
                BackendErrorKind::MapFailed,
                format!("cuda: {device} has no peer access to {}", self.device.id),
            ));
        }
        for (o, &p) in out.iter_mut().zip(pfns) {
            *o = DmaAddr(self.pfn_addr(p));
        }
        Ok(())
    }

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
        let g = page_size.granules();
        let bytes = npages as u64 * page_size.bytes();
        let mut starts = Vec::with_capacity(npages);
        // Pages still settling (freed, clear running) are taken only when nothing else fits.
        let fits = npages > 0
            && (self.frames.alloc_pages(npages, g, &mut starts) || {
                let mut sub = self.submit.lock().unwrap_or_else(|p| p.into_inner());
                self.take_settling(&mut sub) && {
                    drop(sub);
                    starts.clear();
                    self.frames.alloc_pages(npages, g, &mut starts)
                }
            });
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
            self.frames.free_pages(&starts, g);
            Err(e)
        };
        let kernels = match self.device.kernels() {
            Ok(k) => k,
            Err(e) => return undo(e),
        };
        let end = starts.iter().max().map_or(0, |&s| (s + g) * GRANULE);
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
            sub.clean.dirty_pages(&starts, g, &mut dirty);
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
        let cookie = self
            .allocs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(&starts, g);
        self.counters.allocations.fetch_add(1, Ordering::SeqCst);
        self.counters.used.fetch_add(bytes, Ordering::SeqCst);
        Ok(DevmemBacking {
            cookie,
            npages,
            page_size,
            pre_migrate_fence: pre,
        })
    }

    fn populate_devmem_pfn(
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

    fn copy_to_devmem(&self, req: &CopyRequest<'_>) -> Result<Fence, BackendError> {
        self.counters.to_devmem.fetch_add(1, Ordering::Relaxed);
        self.copy(req, true)
    }

    fn copy_to_ram(&self, req: &CopyRequest<'_>) -> Result<Fence, BackendError> {
        self.counters.to_ram.fetch_add(1, Ordering::Relaxed);
        self.copy(req, false)
    }

    fn devmem_release(&self, backing: DevmemBacking) {
        self.devmem_release_many(vec![backing]);
    }

    fn devmem_release_unused(&self, backing: DevmemBacking) {
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

    fn devmem_release_many(&self, backings: Vec<DevmemBacking>) {
        // Page starts of every allocation, by page size: one clear per size for them all.
        let mut by_size: [Vec<u64>; 3] = Default::default();
        let (mut bytes, mut count) = (0u64, 0u64);
        {
            let mut allocs = self.allocs.lock().unwrap_or_else(|p| p.into_inner());
            for b in &backings {
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
