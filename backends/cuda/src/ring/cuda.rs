//! The CUDA side of the ring: its block in pinned host memory, the launcher of `dpm_ring`
//! on a stream of its own, and [`RingPath`], what a pagemap keeps of its ring.

use super::engine::{Engine, Launcher, RingConfig};
use super::fence::RingFence;
use super::layout::{RING_BYTES, RingBlock};
use super::proto::Ring;
use crate::device::CudaDevice;
use crate::driver::{Attribute, Context, DriverResult, Stream, err, mem};
use crate::kernel::Kernels;
use drm_pagemap_core::{BackendError, BackendErrorKind, Fence};
use std::sync::Arc;
use std::time::Duration;

/// Copies of at most this many bytes (entries with an address, times the page size) may
/// take the ring: one block copies them, so a larger copy is faster as a full launch.
pub(crate) const RING_MAX_BYTES: u64 = 1 << 20;
/// An instance returns after this long even while busy (its lease): the bound on how long an
/// implicitly synchronising call of the application waits while copies keep coming.
pub(crate) const RING_LEASE: Duration = Duration::from_millis(20);
/// How long dropping a pagemap waits for its ring's kernel to return before leaking the ring.
pub(crate) const RING_STOP_WAIT: Duration = Duration::from_secs(2);

/// A ring block in pinned, device-mapped, portable host memory (`cuMemHostAlloc`; page
/// aligned, so 64-byte aligned).
struct PinnedBlock {
    // INVARIANT: `host` is a `mem::host_alloc` allocation of RING_BYTES, zeroed when made,
    // mapped at `dev`; freed only by Drop (and never while an instance may run: the engine
    // leaks the block otherwise).
    host: *mut u8,
    dev: u64,
    ctx: Arc<Context>,
}

// SAFETY: pinned host memory; shared accesses follow the ring protocol (atomics on the CPU).
unsafe impl Send for PinnedBlock {}
// SAFETY: as above.
unsafe impl Sync for PinnedBlock {}

impl PinnedBlock {
    fn new(ctx: &Arc<Context>) -> Result<PinnedBlock, BackendError> {
        ctx.bind()?;
        // Freed in Drop (or below on failure).
        let p = mem::host_alloc(RING_BYTES).about("ring block")?;
        // SAFETY: a fresh allocation of RING_BYTES.
        unsafe { std::ptr::write_bytes(p as *mut u8, 0, RING_BYTES) };
        // SAFETY: `p` was just allocated by `host_alloc`.
        let dev = match unsafe { mem::host_device_pointer(p) }.about("ring block") {
            Ok(d) => d,
            Err(e) => {
                // SAFETY: allocated above, unused.
                let _ = unsafe { mem::free_host(p) };
                return Err(e);
            }
        };
        Ok(PinnedBlock {
            host: p as *mut u8,
            dev,
            ctx: ctx.clone(),
        })
    }
}

impl Drop for PinnedBlock {
    fn drop(&mut self) {
        let _ = self.ctx.bind();
        // SAFETY: allocated by `host_alloc` (INVARIANT); no instance runs any more.
        let _ = unsafe { mem::free_host(self.host as *mut std::ffi::c_void) };
    }
}

// SAFETY: RING_BYTES zeroed bytes at `host` (page aligned), the same bytes at `dev` for the
// device, until Drop.
unsafe impl RingBlock for PinnedBlock {
    fn host(&self) -> *mut u8 {
        self.host
    }
    fn device(&self) -> u64 {
        self.dev
    }
}

/// Launches `dpm_ring` instances on the ring's own non-blocking stream (so they run one
/// after the other, and beside the pagemap's copy stream).
struct CudaLauncher {
    // Field order is drop order: the stream (synchronised: every instance has returned when
    // the engine drops it) before the module.
    stream: Stream,
    kernels: Arc<Kernels>,
    ctx: Arc<Context>,
}

impl Launcher for CudaLauncher {
    fn launch(&self, ring: &Arc<Ring>, epoch: u64, lease: Duration) -> Result<(), BackendError> {
        self.ctx.bind()?;
        let lease_ns = u64::try_from(lease.as_nanos()).unwrap_or(u64::MAX);
        // SAFETY: the block is mapped for the device and outlives every instance (the engine
        // frees it only once `idle` said every instance returned, else leaks it); the
        // descriptors name own pages inside the mapped arena and other pages mapped for this
        // device by the core, valid until their fences signal.
        let launched = unsafe {
            self.kernels
                .launch_ring(&self.stream, ring.device_addr(), epoch, lease_ns)?
        };
        if launched {
            Ok(())
        } else {
            Err(err(BackendErrorKind::Unsupported, "no dpm_ring kernel"))
        }
    }

    fn idle(&self) -> Result<bool, BackendError> {
        self.stream.query()
    }
}

/// What a pagemap keeps of its ring (option `cuda.ring`).
pub(crate) struct RingPath {
    engine: Arc<Engine>,
}

impl RingPath {
    /// The ring of a pagemap on `device`, or why there is none: the loaded module has no
    /// `dpm_ring` (both sources define it), the driver predates CUDA 11.7, or the device has
    /// no 64-bit stream memory operations (the copy stream orders itself after ring copies
    /// with `cuStreamWaitValue64`).
    pub(crate) fn new(
        device: &CudaDevice,
        pagemap: u8,
        idle_stop: Duration,
    ) -> Result<RingPath, String> {
        // cuStreamWaitValue64_v2 exists from CUDA 11.7 on (the backend accepts 11.4).
        let version = crate::driver::probe().map_or(0, |p| p.driver_version);
        if version < 11070 {
            return Err(format!(
                "driver {version} predates CUDA 11.7 (cuStreamWaitValue64_v2)"
            ));
        }
        let kernels = device.kernels().map_err(|e| e.to_string())?;
        if !kernels.has_ring() {
            return Err(format!("kernels from {} have no dpm_ring", kernels.origin));
        }
        let ops = device
            .ctx
            .attribute(Attribute::StreamMemOps64)
            .map_err(|e| e.to_string())?;
        if ops == 0 {
            return Err("no 64-bit stream memory operations (cuStreamWaitValue64)".into());
        }
        let block = PinnedBlock::new(&device.ctx).map_err(|e| e.to_string())?;
        let stream = Stream::new(&device.ctx).map_err(|e| e.to_string())?;
        let launcher = CudaLauncher {
            stream,
            kernels,
            ctx: device.ctx.clone(),
        };
        let engine = Engine::start(
            Ring::new(Box::new(block)),
            Box::new(launcher),
            RingConfig {
                idle_stop,
                lease: RING_LEASE,
                stop_wait: RING_STOP_WAIT,
            },
            format!("cuda {} pagemap {pagemap} ring", device.id.0),
        )
        .map_err(|e| e.to_string())?;
        Ok(RingPath { engine })
    }

    /// The engine.
    pub(crate) fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// The fence of ring seq `seq` of device `device`.
    pub(crate) fn fence(&self, seq: u64, device: drm_pagemap_core::DeviceId) -> Fence {
        Fence::new(RingFence::new(self.engine.clone(), seq, device))
    }

    /// Makes `stream` wait until every ring copy published so far is done (nothing is
    /// queued when they are). `Ok(Some(seq))`: it waits for seq `seq`.
    pub(crate) fn order_stream(&self, stream: &Stream) -> Result<Option<u64>, BackendError> {
        let head = self.engine.published();
        if self.engine.outcome(head).is_some() {
            return Ok(None);
        }
        // SAFETY: the `done` word lies in the ring's pinned block, mapped for the device,
        // which outlives the wait: the pagemap shuts the ring down (satisfying every wait,
        // by completion or by abandoning the ring) before it synchronises its streams, and
        // an abandoned block is leaked, never freed.
        let r = unsafe { stream.wait_value64(self.engine.ring().done_device_addr(), head) };
        r.about(format_args!(
            "{}: order after seq {head}",
            self.engine.what()
        ))?;
        Ok(Some(head))
    }
}
