//! System pages: pinned, device-mapped, portable host memory (`cuMemHostAlloc` with
//! `DEVICEMAP | PORTABLE`, not write-combined, so CPU reads stay fast), carved into 4 KiB
//! frames. Backed lazily in chunks; with unified addressing a frame's device address is its
//! host address, the same for every GPU, so `map_frames` is arithmetic.
//!
//! With `cuda.host_memfd` the memory is instead one memfd mapped shared ([`HostFile`]), each
//! chunk pinned by `cuMemHostRegister(DEVICEMAP | PORTABLE)` when first needed: frame `f` is
//! the file's bytes at `f * 4096`, so a pointer range can map a frame at its own address and
//! the CPU's loads and stores reach the pages the GPUs copy.

use crate::driver::{Context, DriverResult, err, mem};
use crate::memfd::HostFile;
use drm_pagemap_core::{
    BackendError, BackendErrorKind, DeviceId, Direction, DmaAddr, ExtentAllocator, GRANULE,
    HostFrame, HostMemory, PageSize,
};
use std::sync::{Arc, Mutex, OnceLock};

/// Bytes of one lazily allocated chunk (a multiple of the largest page size).
pub(crate) const HOST_CHUNK: u64 = 64 << 20;

struct Chunk {
    // INVARIANT: `host` is a `mem::host_alloc` allocation of `HOST_CHUNK` bytes (or, when the
    // memory is a memfd, `HOST_CHUNK` bytes of its mapping registered with
    // `mem::host_register`) whose device address is `dev == host` (unified addressing), freed
    // (unregistered) only by the owner's Drop.
    host: *mut u8,
    dev: u64,
}

// SAFETY: pinned host memory may be accessed from any thread; accesses follow the core's
// memory access contract (no CPU access to a frame with a copy in flight).
unsafe impl Send for Chunk {}
// SAFETY: as above.
unsafe impl Sync for Chunk {}

/// The host memory of an address space on the CUDA backend.
///
/// Frames are never given back to the system while the memory lives: pinned memory cannot
/// be released page by page (`cuMemHostAlloc` chunks are freed whole; a registered memfd's
/// pages cannot be punched out while registered, the pin keeps them). So a page resident on
/// a device keeps its host memory on CUDA: the frame returns to this pool's allocator, not to
/// the system, and the chunk stays pinned (the cost: up to the peak of system-resident
/// bytes, rounded up to 64 MiB chunks, stays pinned).
pub struct PinnedHostMemory {
    // Field order is drop order: Drop frees (unregisters) the chunks, then `file` unmaps.
    ctx: Arc<Context>,
    chunks: Box<[OnceLock<Chunk>]>,
    grow: Mutex<()>,
    frames: ExtentAllocator,
    /// Home extents of pointer ranges (`HostMemory::reserve_home`): a page of such a range
    /// comes home into its own frame, so the range is one mapping of the memfd.
    homes: drm_pagemap_core::HomeExtents,
    capacity: u64,
    devices: u32,
    /// The memfd the chunks are registered from (`cuda.host_memfd`), else `None`.
    file: Option<HostFile>,
}

impl std::fmt::Debug for PinnedHostMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedHostMemory")
            .field("capacity", &self.capacity)
            .field("backed_bytes", &self.backed_bytes())
            .finish_non_exhaustive()
    }
}

impl PinnedHostMemory {
    /// Host memory of `capacity` bytes (rounded up to whole chunks; at most
    /// [`crate::MAX_HOST_CAPACITY`], checked by the config), allocated through `ctx`
    /// (portable: every context of the process reaches it) for `devices` devices. Out of
    /// memory when the chunk table does not fit. With `memfd`, the memory is one memfd of the
    /// whole capacity (sparse) mapped shared, its chunks registered as needed; making it can
    /// fail ([`BackendErrorKind::OutOfMemory`] naming the call).
    pub(crate) fn new(
        ctx: Arc<Context>,
        capacity: u64,
        devices: u32,
        memfd: bool,
    ) -> Result<PinnedHostMemory, BackendError> {
        let n = capacity.div_ceil(HOST_CHUNK).max(1);
        let mut chunks = Vec::new();
        usize::try_from(n)
            .ok()
            .and_then(|n| chunks.try_reserve_exact(n).ok())
            .ok_or_else(|| {
                err(
                    BackendErrorKind::OutOfMemory,
                    format!("cuda host memory of {capacity} bytes: its chunk table does not fit"),
                )
            })?;
        chunks.extend((0..n).map(|_| OnceLock::new()));
        let file = match memfd {
            false => None,
            true => Some(HostFile::new(n * HOST_CHUNK).map_err(|e| {
                err(
                    BackendErrorKind::OutOfMemory,
                    format!(
                        "cuda host memory (cuda.host_memfd) of {} bytes: memfd or its mapping: {e}",
                        n * HOST_CHUNK
                    ),
                )
            })?),
        };
        Ok(PinnedHostMemory {
            ctx,
            chunks: chunks.into_boxed_slice(),
            grow: Mutex::new(()),
            frames: ExtentAllocator::new(n * HOST_CHUNK / GRANULE),
            homes: Default::default(),
            capacity: n * HOST_CHUNK,
            devices,
            file,
        })
    }

    /// The memfd whose bytes at `f * 4096` are frame `f`, when the memory was made with
    /// `cuda.host_memfd` ([`crate::CudaConfig::host_memfd`]); `None` otherwise. A mapping
    /// of it (`MAP_SHARED`) reaches the same pinned pages the GPUs copy: what a pointer
    /// range maps at its addresses. Frames stay allocated in it while the memory lives.
    pub fn memfd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.file.as_ref().map(|f| f.fd())
    }

    /// Bytes of memory the memfd holds (`None` without `cuda.host_memfd`): every registered
    /// chunk, whole (registration pins it).
    pub fn memfd_allocated_bytes(&self) -> Option<u64> {
        self.file.as_ref().map(|f| f.allocated_bytes())
    }

    /// Bytes pinned so far.
    pub fn backed_bytes(&self) -> u64 {
        self.chunks.iter().filter(|c| c.get().is_some()).count() as u64 * HOST_CHUNK
    }

    /// Granules not handed out.
    pub fn free_granules(&self) -> u64 {
        self.frames.free_granules()
    }

    /// Whether `addr` (a device address) lies in this host memory.
    pub fn contains(&self, addr: u64) -> bool {
        self.chunks
            .iter()
            .filter_map(|c| c.get())
            .any(|c| addr >= c.dev && addr < c.dev + HOST_CHUNK)
    }

    /// One past the last device address of the chunk holding `addr`, if one does: a copy
    /// must not cross it (each chunk is its own allocation or registration to the driver,
    /// even where two lie back to back, as a memfd's chunks always do).
    pub(crate) fn chunk_end(&self, addr: u64) -> Option<u64> {
        self.chunks
            .iter()
            .filter_map(|c| c.get())
            .find(|c| addr >= c.dev && addr < c.dev + HOST_CHUNK)
            .map(|c| c.dev + HOST_CHUNK)
    }

    fn back(&self, idx: usize) -> Result<(), BackendError> {
        if self.chunks[idx].get().is_some() {
            return Ok(());
        }
        let _g = self.grow.lock().unwrap_or_else(|p| p.into_inner());
        if self.chunks[idx].get().is_some() {
            return Ok(());
        }
        self.ctx.bind()?;
        if let Some(file) = &self.file {
            return self.register(idx, file);
        }
        // Freed in Drop.
        let p = match mem::host_alloc(HOST_CHUNK as usize) {
            Ok(p) => p,
            Err(e) if e.is_out_of_memory() => {
                return Err(err(
                    BackendErrorKind::OutOfMemory,
                    format!(
                        "cuda host memory: pinning another {} MiB failed",
                        HOST_CHUNK >> 20
                    ),
                ));
            }
            Err(e) => return Err(e.about("pinned host chunk")),
        };
        // SAFETY: `p` was just allocated by `host_alloc`.
        let dev = unsafe { mem::host_device_pointer(p) };
        let dev = match dev.about("pinned host chunk") {
            Ok(d) => d,
            Err(e) => {
                // SAFETY: allocated above, not shared yet.
                let _ = unsafe { mem::free_host(p) };
                return Err(e);
            }
        };
        if dev != p as u64 {
            // Unified addressing gives one address for the host and every device; a portable
            // mapping that differs would be per-context, which this backend does not track.
            // SAFETY: allocated above, not shared yet.
            let _ = unsafe { mem::free_host(p) };
            return Err(err(
                BackendErrorKind::Unsupported,
                "cuda host memory: device pointer differs from host pointer (no unified addressing)",
            ));
        }
        let _ = self.chunks[idx].set(Chunk {
            host: p as *mut u8,
            dev,
        });
        Ok(())
    }

    /// Registers chunk `idx` of the memfd mapping with the driver (the caller holds `grow`).
    fn register(&self, idx: usize, file: &HostFile) -> Result<(), BackendError> {
        // SAFETY: chunk `idx` lies inside the mapping (the file covers every chunk).
        let p = unsafe { file.base().add(idx * HOST_CHUNK as usize) };
        let what = || format!("cuda host memory (memfd) chunk {idx}");
        // SAFETY: a page-aligned, read-write shared mapping owned by `file`, which outlives
        // the registration (Drop unregisters every chunk before the mapping goes); chunk
        // `idx` is not registered yet (its OnceLock is empty under `grow`).
        match unsafe { mem::host_register(p.cast(), HOST_CHUNK as usize) } {
            Ok(()) => {}
            Err(e) if e.is_out_of_memory() => {
                return Err(err(
                    BackendErrorKind::OutOfMemory,
                    format!(
                        "{}: pinning another {} MiB failed",
                        what(),
                        HOST_CHUNK >> 20
                    ),
                ));
            }
            Err(e) => return Err(e.about(what())),
        }
        // SAFETY: `p` starts a range just registered.
        let dev = unsafe { mem::host_device_pointer(p.cast()) }.about(what());
        let undo = || {
            // SAFETY: registered above, not shared yet.
            let _ = unsafe { mem::host_unregister(p.cast()) };
        };
        let dev = match dev {
            Ok(d) if d == p as u64 => d,
            Ok(_) => {
                undo();
                return Err(err(
                    BackendErrorKind::Unsupported,
                    format!(
                        "{}: device pointer differs from host pointer (no unified addressing)",
                        what()
                    ),
                ));
            }
            Err(e) => {
                undo();
                return Err(e);
            }
        };
        let _ = self.chunks[idx].set(Chunk { host: p, dev });
        Ok(())
    }

    /// The host pointer of `frame` (its chunk must be backed).
    fn ptr(&self, frame: HostFrame) -> *mut u8 {
        let byte = frame.0 * GRANULE;
        let c = self.chunks[(byte / HOST_CHUNK) as usize]
            .get()
            .expect("a frame handed out lies in a backed chunk");
        // SAFETY: the offset stays inside the chunk (frames never straddle chunks).
        unsafe { c.host.add((byte % HOST_CHUNK) as usize) }
    }

    /// The device (and host) address of `frame`.
    pub fn frame_addr(&self, frame: HostFrame) -> u64 {
        self.ptr(frame) as u64
    }

    fn check_span(&self, frame: HostFrame, offset: usize, len: usize, page: u64) {
        let start = frame.0 * GRANULE;
        let in_chunk = start % HOST_CHUNK + offset as u64 + len as u64;
        assert!(
            (offset + len) as u64 <= page && start < self.capacity && in_chunk <= HOST_CHUNK,
            "host memory access out of bounds: frame {}, offset {offset}, {len} bytes",
            frame.0
        );
    }
}

impl Drop for PinnedHostMemory {
    fn drop(&mut self) {
        let _ = self.ctx.bind();
        let registered = self.file.is_some();
        for c in self.chunks.iter_mut() {
            if let Some(c) = c.take() {
                if registered {
                    // SAFETY: registered by `register` (INVARIANT); no copy is in flight once
                    // the address spaces and pagemaps using it are gone. The mapping goes
                    // after this (field `file`).
                    let _ = unsafe { mem::host_unregister(c.host as *mut std::ffi::c_void) };
                    continue;
                }
                // SAFETY: allocated by `host_alloc` (INVARIANT); no copy is in flight once the
                // address spaces and pagemaps using it are gone.
                let _ = unsafe { mem::free_host(c.host as *mut std::ffi::c_void) };
            }
        }
    }
}

impl HostMemory for PinnedHostMemory {
    fn alloc_frames(&self, page_size: PageSize, out: &mut [HostFrame]) -> Result<(), BackendError> {
        let count = out.len();
        let fits =
            self.frames
                .alloc_frames_backed(page_size, HOST_CHUNK / GRANULE, out, |idx| self.back(idx))?;
        if !fits {
            return Err(err(
                BackendErrorKind::OutOfMemory,
                format!(
                    "cuda host memory: {count} pages of {page_size} requested, {} KiB free of {} MiB",
                    self.frames.free_granules() * 4,
                    self.capacity >> 20
                ),
            ));
        }
        Ok(())
    }

    fn free_frames(&self, frames: &[HostFrame], page_size: PageSize) {
        // Back to the allocator (or to their home extent) only: the memory stays pinned
        // (and, with a memfd, is not punched out: a registered page cannot be), see the
        // type's docs.
        self.homes.free(&self.frames, frames, page_size);
    }

    fn alloc_frames_at(
        &self,
        page_size: PageSize,
        frames: &mut [HostFrame],
    ) -> Result<(), BackendError> {
        let chunk = HOST_CHUNK / GRANULE;
        self.homes.alloc_at(
            page_size,
            frames,
            // A home frame's chunk is backed (pinned) when the frame is first handed out.
            |f| self.back((f.0 / chunk) as usize),
            |rest| self.alloc_frames(page_size, rest),
        )
    }

    /// Home extents only for memory a range can map (the memfd): `cuMemHostAlloc` chunks
    /// lie apart, so a range there maps page by page whatever the frames.
    fn reserve_home(&self, page_size: PageSize, pages: u64) -> Option<HostFrame> {
        self.file.as_ref()?;
        self.homes.reserve(&self.frames, page_size, pages)
    }

    fn release_home(&self, first: HostFrame, _page_size: PageSize, _pages: u64) {
        self.homes.release(&self.frames, first)
    }

    fn read(&self, frame: HostFrame, offset: usize, buf: &mut [u8]) -> Result<(), BackendError> {
        self.check_span(frame, offset, buf.len(), PageSize::Size2M.bytes());
        // SAFETY: in bounds of a backed chunk (checked); no device writes this page now (core
        // contract).
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr(frame).add(offset), buf.as_mut_ptr(), buf.len())
        }
        Ok(())
    }

    fn write(&self, frame: HostFrame, offset: usize, data: &[u8]) -> Result<(), BackendError> {
        self.check_span(frame, offset, data.len(), PageSize::Size2M.bytes());
        // SAFETY: as in `read`.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr(frame).add(offset), data.len())
        }
        Ok(())
    }

    fn zero(&self, frame: HostFrame, page_size: PageSize) -> Result<(), BackendError> {
        self.check_span(frame, 0, page_size.bytes() as usize, page_size.bytes());
        // SAFETY: as in `read`.
        unsafe { std::ptr::write_bytes(self.ptr(frame), 0, page_size.bytes() as usize) }
        Ok(())
    }

    fn map_frames(
        &self,
        device: DeviceId,
        frames: &[HostFrame],
        _page_size: PageSize,
        _dir: Direction,
        out: &mut [DmaAddr],
    ) -> Result<(), BackendError> {
        if device.0 >= self.devices {
            return Err(err(
                BackendErrorKind::MapFailed,
                format!(
                    "cuda host memory: {device} does not exist ({} devices)",
                    self.devices
                ),
            ));
        }
        for (o, &f) in out.iter_mut().zip(frames) {
            *o = DmaAddr(self.ptr(f) as u64);
        }
        Ok(())
    }

    fn unmap_frames(
        &self,
        _device: DeviceId,
        _addrs: &[DmaAddr],
        _page_size: PageSize,
        _dir: Direction,
    ) {
    }

    fn capacity_bytes(&self) -> u64 {
        self.capacity
    }
}
