//! A pagemap's device memory: device allocations (`zeMemAllocDevice`) of at most
//! [`CHUNK_BYTES`] each, aligned to [`CHUNK_BYTES`], made when a page first lands in them.

use crate::CHUNK_BYTES;
use crate::ze::Device;
use crate::ze::objects::Context;
use drm_pagemap_core::{BackendError, DeviceId, GRANULE, Pfn};
use std::sync::{Arc, Mutex, OnceLock};

pub(crate) struct Arena {
    ctx: Arc<Context>,
    device: Device,
    id: DeviceId,
    // INVARIANT: each set entry is a device allocation of this context of `chunk_len(i)`
    // bytes, freed only by Drop (after the pagemap's engine has drained).
    chunks: Box<[OnceLock<u64>]>,
    grow: Mutex<()>,
    /// Bytes (a multiple of 4 KiB).
    pub capacity: u64,
}

impl Arena {
    pub(crate) fn new(ctx: Arc<Context>, device: Device, id: DeviceId, capacity: u64) -> Arena {
        let capacity = capacity / GRANULE * GRANULE;
        let n = capacity.div_ceil(CHUNK_BYTES) as usize;
        Arena {
            ctx,
            device,
            id,
            chunks: (0..n).map(|_| OnceLock::new()).collect(),
            grow: Mutex::new(()),
            capacity,
        }
    }

    fn chunk_len(&self, idx: usize) -> u64 {
        (self.capacity - idx as u64 * CHUNK_BYTES).min(CHUNK_BYTES)
    }

    /// Granules in the arena.
    pub(crate) fn granules(&self) -> u64 {
        self.capacity / GRANULE
    }

    /// Makes sure the chunk holding granule `start` is allocated: out of memory (the driver's
    /// `ZE_RESULT_ERROR_OUT_OF_DEVICE_MEMORY` kept) when the device has no room.
    pub(crate) fn back(&self, start: u64) -> Result<(), BackendError> {
        let idx = (start * GRANULE / CHUNK_BYTES) as usize;
        if self.chunks[idx].get().is_some() {
            return Ok(());
        }
        let _g = self.grow.lock().unwrap_or_else(|p| p.into_inner());
        if self.chunks[idx].get().is_some() {
            return Ok(());
        }
        let len = self.chunk_len(idx);
        let p = self
            .ctx
            .alloc_device(self.device, len as usize, CHUNK_BYTES as usize)
            .map_err(|f| {
                f.about(format_args!(
                    "{}: device memory chunk {idx} ({len} bytes) of a {}-byte pagemap",
                    self.id, self.capacity
                ))
            })?;
        let _ = self.chunks[idx].set(p);
        Ok(())
    }

    /// The device address of granule `pfn` if its chunk is allocated.
    pub(crate) fn addr(&self, pfn: Pfn) -> Option<u64> {
        let byte = pfn.0 as u64 * GRANULE;
        let base = *self.chunks.get((byte / CHUNK_BYTES) as usize)?.get()?;
        Some(base + byte % CHUNK_BYTES)
    }

    /// Device memory allocated from the driver.
    pub(crate) fn backed_bytes(&self) -> u64 {
        (0..self.chunks.len())
            .filter(|&i| self.chunks[i].get().is_some())
            .map(|i| self.chunk_len(i))
            .sum()
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        for c in self.chunks.iter_mut() {
            if let Some(p) = c.take() {
                // SAFETY: an allocation of this context (INVARIANT); the engine drained before
                // (the pagemap drops it first), so no command uses it.
                let _ = unsafe { self.ctx.free(p) };
            }
        }
    }
}
