//! A simulated device: its memory arena and its copy engine (an in-order worker thread).

use drm_pagemap_core::{
    BackendError, BackendErrorKind, DeviceId, DmaAddr, ExtentAllocator, Fence, FenceTimeline,
    GRANULE, HostFence,
};
use drm_pagemap_testkit::bytes::{FrameBytes, copy_bytes};
use drm_pagemap_testkit::mem::{AtomicArena, arena_addr};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Every memory a sim address can name, by memory id (`arenas[id - 1]`).
#[derive(Debug)]
pub(crate) struct Memories {
    arenas: Vec<Arc<dyn FrameBytes>>,
}

impl Memories {
    pub(crate) fn new(arenas: Vec<Arc<dyn FrameBytes>>) -> Memories {
        Memories { arenas }
    }

    /// The arena and offset an address names, checked to hold `len` bytes.
    pub(crate) fn resolve(
        &self,
        addr: DmaAddr,
        len: u64,
    ) -> Result<(&dyn FrameBytes, u64), BackendError> {
        let (mem, off) = arena_addr::decode(addr);
        let arena = mem
            .checked_sub(1)
            .and_then(|i| self.arenas.get(i as usize))
            .ok_or_else(|| {
                BackendError::new(
                    BackendErrorKind::CopyFailed,
                    format!("sim: address {:#x} names no memory", addr.0),
                )
            })?;
        if off + len > arena.len() {
            return Err(BackendError::new(
                BackendErrorKind::CopyFailed,
                format!("sim: address {:#x} + {len} runs past memory {mem}", addr.0),
            ));
        }
        Ok((&**arena, off))
    }
}

/// Work for a copy engine.
pub(crate) enum Work {
    /// Copy `bytes` from each `(src, dst)` pair.
    Copy {
        pairs: Vec<(DmaAddr, DmaAddr)>,
        bytes: u64,
    },
    /// Zero each `(offset, len)` of the device's own arena.
    Clear { extents: Vec<(u64, u64)> },
}

pub(crate) struct Job {
    pub work: Work,
    pub after: Option<Fence>,
    pub done: Arc<HostFence>,
}

/// Counters of one pagemap, for tests and tables.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Successful `allocate` calls.
    pub allocations: u64,
    /// Allocations released (`devmem_release`, also through the calls below).
    pub releases: u64,
    /// Of those, `devmem_release_unused` calls: allocations no copy was ever issued into.
    pub unused_releases: u64,
    /// `copy_to_devmem` calls.
    pub copy_to_devmem_calls: u64,
    /// `copy_to_ram` calls.
    pub copy_to_ram_calls: u64,
    /// Pages copied by this pagemap's calls.
    pub pages_copied: u64,
    /// Bytes allocated now.
    pub used_bytes: u64,
}

/// One simulated device.
pub(crate) struct SimDevice {
    pub id: DeviceId,
    pub mem_id: u16,
    pub arena: Arc<AtomicArena>,
    pub frames: ExtentAllocator,
    pub timeline: FenceTimeline,
    queue: Mutex<Option<Sender<Job>>>,
}

impl SimDevice {
    pub(crate) fn new(
        id: DeviceId,
        mem_id: u16,
        capacity: u64,
    ) -> Result<Arc<SimDevice>, BackendError> {
        let arena = Arc::new(AtomicArena::try_new(capacity).map_err(|e| {
            BackendError::new(e.kind, format!("sim {id}: device memory: {}", e.message))
        })?);
        let frames = ExtentAllocator::new(arena.len() / GRANULE);
        Ok(Arc::new(SimDevice {
            id,
            mem_id,
            arena,
            frames,
            timeline: FenceTimeline::new(),
            queue: Mutex::new(None),
        }))
    }

    /// Starts the copy engine.
    pub(crate) fn start(&self, memories: Arc<Memories>, latency: Duration) {
        let (tx, rx) = channel();
        let own = self.arena.clone();
        std::thread::Builder::new()
            .name(format!("sim-copy-{}", self.id.0))
            .spawn(move || engine(rx, memories, own, latency))
            .expect("spawn a sim copy engine thread");
        *self.queue.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
    }

    /// Queues work behind everything queued before; returns its fence.
    pub(crate) fn submit(&self, work: Work, after: Option<Fence>) -> Result<Fence, BackendError> {
        let done = self.timeline.host_fence();
        let job = Job {
            work,
            after,
            done: done.clone(),
        };
        let q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let sent = q.as_ref().map(|tx| tx.send(job).is_ok()).unwrap_or(false);
        if !sent {
            return Err(BackendError::new(
                BackendErrorKind::DeviceLost,
                format!("sim {}: copy engine stopped", self.id),
            ));
        }
        Ok(Fence::from_host(done))
    }
}

impl Drop for SimDevice {
    fn drop(&mut self) {
        // Dropping the sender stops the engine once its queue is empty.
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

fn engine(rx: Receiver<Job>, memories: Arc<Memories>, own: Arc<AtomicArena>, latency: Duration) {
    for job in rx {
        let result = run(&job, &memories, &own, latency);
        job.done.complete(result);
    }
}

fn run(
    job: &Job,
    memories: &Memories,
    own: &AtomicArena,
    latency: Duration,
) -> Result<(), BackendError> {
    if let Some(f) = &job.after {
        f.wait().map_err(|e| {
            BackendError::new(
                BackendErrorKind::CopyFailed,
                format!("sim: input fence failed: {e}"),
            )
        })?;
    }
    if !latency.is_zero() {
        std::thread::sleep(latency);
    }
    match &job.work {
        Work::Copy { pairs, bytes } => {
            for &(src, dst) in pairs {
                let (sa, so) = memories.resolve(src, *bytes)?;
                let (da, d_off) = memories.resolve(dst, *bytes)?;
                copy_bytes(sa, so, da, d_off, *bytes);
            }
        }
        Work::Clear { extents } => {
            for &(off, len) in extents {
                own.zero(off, len);
            }
        }
    }
    Ok(())
}
