//! System pages: host allocations (`zeMemAllocHost`) of one context, shared by its devices,
//! carved into 4 KiB frames. Backed lazily in chunks of [`CHUNK_BYTES`]; a host allocation
//! has one address for the CPU and every device of the context, so `map_frames` is
//! arithmetic.

use crate::CHUNK_BYTES;
use crate::ze::objects::Context;
use drm_pagemap_core::{
    BackendError, BackendErrorKind, DeviceId, Direction, DmaAddr, ExtentAllocator, GRANULE,
    HostFrame, HostMemory, PageSize,
};
use std::sync::{Arc, Mutex, OnceLock};

struct Chunk {
    // INVARIANT: a `zeMemAllocHost` allocation of `CHUNK_BYTES` bytes aligned to
    // `CHUNK_BYTES`, freed only by the owner's Drop.
    ptr: *mut u8,
}

// SAFETY: host memory of a context may be accessed from any thread; accesses follow the
// core's memory access contract (no CPU access to a frame with a copy in flight).
unsafe impl Send for Chunk {}
// SAFETY: as above.
unsafe impl Sync for Chunk {}

/// The host memory of address spaces on the Level Zero backend.
pub struct ZeHostMemory {
    ctx: Arc<Context>,
    chunks: Box<[OnceLock<Chunk>]>,
    grow: Mutex<()>,
    frames: ExtentAllocator,
    capacity: u64,
    /// Which devices (by id) belong to the context.
    reach: Vec<bool>,
}

impl std::fmt::Debug for ZeHostMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZeHostMemory")
            .field("capacity", &self.capacity)
            .field("backed_bytes", &self.backed_bytes())
            .finish_non_exhaustive()
    }
}

impl ZeHostMemory {
    /// Host memory of `capacity` bytes (rounded up to whole chunks) in `ctx`, reachable by
    /// the devices whose entry in `reach` is true. Out of memory when the chunk table does
    /// not fit.
    pub(crate) fn new(
        ctx: Arc<Context>,
        capacity: u64,
        reach: Vec<bool>,
    ) -> Result<ZeHostMemory, BackendError> {
        let n = capacity.div_ceil(CHUNK_BYTES).max(1);
        let mut chunks = Vec::new();
        usize::try_from(n)
            .ok()
            .and_then(|n| chunks.try_reserve_exact(n).ok())
            .ok_or_else(|| {
                BackendError::new(
                    BackendErrorKind::OutOfMemory,
                    format!(
                        "level-zero host memory of {capacity} bytes: its chunk table does not fit"
                    ),
                )
            })?;
        chunks.extend((0..n).map(|_| OnceLock::new()));
        Ok(ZeHostMemory {
            ctx,
            chunks: chunks.into_boxed_slice(),
            grow: Mutex::new(()),
            frames: ExtentAllocator::new(n * CHUNK_BYTES / GRANULE),
            capacity: n * CHUNK_BYTES,
            reach,
        })
    }

    /// Bytes allocated from the driver so far.
    pub fn backed_bytes(&self) -> u64 {
        self.chunks.iter().filter(|c| c.get().is_some()).count() as u64 * CHUNK_BYTES
    }

    /// Granules not handed out.
    pub fn free_granules(&self) -> u64 {
        self.frames.free_granules()
    }

    fn back(&self, idx: usize) -> Result<(), BackendError> {
        if self.chunks[idx].get().is_some() {
            return Ok(());
        }
        let _g = self.grow.lock().unwrap_or_else(|p| p.into_inner());
        if self.chunks[idx].get().is_some() {
            return Ok(());
        }
        let ptr = self
            .ctx
            .alloc_host(CHUNK_BYTES as usize, CHUNK_BYTES as usize)
            .map_err(|f| {
                f.about(format_args!(
                    "host memory chunk {idx} ({} MiB)",
                    CHUNK_BYTES >> 20
                ))
            })?;
        let _ = self.chunks[idx].set(Chunk { ptr });
        Ok(())
    }

    /// The host pointer of `frame` (its chunk is backed: it was handed out).
    fn ptr(&self, frame: HostFrame) -> *mut u8 {
        let byte = frame.0 * GRANULE;
        let c = self.chunks[(byte / CHUNK_BYTES) as usize]
            .get()
            .expect("a frame handed out lies in a backed chunk");
        // SAFETY: the offset stays inside the chunk (frames never straddle chunks).
        unsafe { c.ptr.add((byte % CHUNK_BYTES) as usize) }
    }

    /// The address of `frame` (the same for the CPU and every device of the context).
    pub fn frame_addr(&self, frame: HostFrame) -> u64 {
        self.ptr(frame) as u64
    }

    fn check_span(&self, frame: HostFrame, offset: usize, len: usize, page: u64) {
        let start = frame.0.saturating_mul(GRANULE);
        let in_chunk = start % CHUNK_BYTES + offset as u64 + len as u64;
        assert!(
            (offset + len) as u64 <= page && start < self.capacity && in_chunk <= CHUNK_BYTES,
            "host memory access out of bounds: frame {}, offset {offset}, {len} bytes",
            frame.0
        );
    }
}

impl Drop for ZeHostMemory {
    fn drop(&mut self) {
        for c in self.chunks.iter_mut() {
            if let Some(c) = c.take() {
                // SAFETY: an allocation of this context (INVARIANT); no copy is in flight
                // once the address spaces and pagemaps using it are gone.
                let _ = unsafe { self.ctx.free(c.ptr as u64) };
            }
        }
    }
}

impl HostMemory for ZeHostMemory {
    fn alloc_frames(&self, page_size: PageSize, out: &mut [HostFrame]) -> Result<(), BackendError> {
        let count = out.len();
        let fits =
            self.frames
                .alloc_frames_backed(page_size, CHUNK_BYTES / GRANULE, out, |idx| self.back(idx))?;
        if !fits {
            return Err(BackendError::new(
                BackendErrorKind::OutOfMemory,
                format!(
                    "level-zero host memory: {count} pages of {page_size} requested, {} KiB free of {} MiB",
                    self.frames.free_granules() * 4,
                    self.capacity >> 20
                ),
            ));
        }
        Ok(())
    }

    fn free_frames(&self, frames: &[HostFrame], page_size: PageSize) {
        self.frames
            .free_page_iter(frames.iter().map(|f| f.0), page_size.granules());
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
        if !self.reach.get(device.0 as usize).copied().unwrap_or(false) {
            return Err(BackendError::new(
                BackendErrorKind::MapFailed,
                format!(
                    "level-zero host memory: {device} is not a device of the host memory's \
                     context ({} devices, host memory belongs to the first driver)",
                    self.reach.len()
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
