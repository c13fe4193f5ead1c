//! The device memory of one pagemap: one contiguous virtual range, reserved whole and backed
//! lazily in [`GROW_STEP`]s through the virtual memory management API (or, without it, one
//! `cuMemAlloc` of the whole capacity).

use crate::device::CudaDevice;
use crate::driver::{DriverResult, err, mem, vmm};
use drm_pagemap_core::{BackendError, BackendErrorKind, GRANULE};
use std::sync::Mutex;

/// Virtual memory is backed in steps of this many bytes (rounded to the granularity).
const GROW_STEP: u64 = 64 << 20;

/// The device memory of one pagemap.
pub(super) struct Arena {
    // INVARIANT: `[base, base + reserved)` is a reservation of `vmm::address_reserve` (with
    // `vmm`) or a `mem::alloc` allocation (without), freed only by Drop; with `vmm`, the
    // segments in `mapped.1` are exactly the mapped parts of it, `[0, mapped.0)` in all.
    pub(super) base: u64,
    reserved: u64,
    pub(super) capacity: u64,
    vmm: bool,
    granularity: u64,
    /// Mapped prefix and the mapped segments (offset, size), for unmapping.
    mapped: Mutex<(u64, Vec<(u64, u64)>)>,
    /// Devices that must reach this memory (its own and its peers).
    access: Vec<i32>,
    ordinal: i32,
}

impl Arena {
    pub(super) fn new(
        dev: &CudaDevice,
        capacity: u64,
        peers: &[i32],
    ) -> Result<Arena, BackendError> {
        dev.ctx.bind()?;
        let mut access = vec![dev.ordinal];
        access.extend(peers.iter().copied().filter(|&p| p != dev.ordinal));
        if dev.vmm {
            let g = vmm::granularity(dev.ordinal).about("pagemap arena")?;
            let g = g.max(GRANULE);
            let reserved = capacity.div_ceil(g) * g;
            // Freed in Drop.
            let base = vmm::address_reserve(reserved as usize, g as usize)
                .about(format_args!("{} MiB of address space", reserved >> 20))?;
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
            // Freed in Drop.
            let base = match mem::alloc(capacity as usize) {
                Ok(b) => b,
                Err(e) if e.is_out_of_memory() => {
                    return Err(err(
                        BackendErrorKind::OutOfMemory,
                        format!(
                            "cuda device {}: a {} MiB pagemap does not fit",
                            dev.ordinal,
                            capacity >> 20
                        ),
                    ));
                }
                Err(e) => return Err(e.about("pagemap arena")),
            };
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
    pub(super) fn ensure(
        &self,
        end: u64,
        fresh: impl FnOnce(u64, u64),
    ) -> Result<(), BackendError> {
        let mut m = self.mapped.lock().unwrap_or_else(|p| p.into_inner());
        if end <= m.0 {
            return Ok(());
        }
        let step = GROW_STEP.div_ceil(self.granularity) * self.granularity;
        let target = (end.div_ceil(step) * step).min(self.reserved);
        let size = target - m.0;
        let at = self.base + m.0;
        // Released right after mapping (the mapping keeps the memory alive).
        let handle = match vmm::create(size as usize, self.ordinal) {
            Ok(h) => h,
            Err(e) if e.is_out_of_memory() => {
                return Err(err(
                    BackendErrorKind::OutOfMemory,
                    format!(
                        "cuda device {}: no device memory for another {} MiB",
                        self.ordinal,
                        size >> 20
                    ),
                ));
            }
            Err(e) => return Err(e.about(format_args!("{} MiB", size >> 20))),
        };
        // SAFETY: maps the whole handle at a reserved (INVARIANT), unmapped (past the mapped
        // prefix), aligned (steps of the granularity) address.
        let mapped = unsafe { vmm::map(at, size as usize, &handle) };
        // The mapping (if made) holds the memory; the handle is not used again.
        let _ = vmm::release(handle);
        mapped.about("pagemap arena")?;
        // SAFETY: the range was just mapped; the access list names devices of this process.
        let access = unsafe { vmm::set_access(at, size as usize, &self.access) };
        if let Err(e) = access.about("pagemap arena") {
            // SAFETY: unmaps what was mapped above (nobody has seen it).
            let _ = unsafe { vmm::unmap(at, size as usize) };
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
        if self.vmm {
            let m = self.mapped.get_mut().unwrap_or_else(|p| p.into_inner());
            for &(off, size) in &m.1 {
                // SAFETY: every segment was mapped by `ensure` (INVARIANT); no work is queued.
                let _ = unsafe { vmm::unmap(self.base + off, size as usize) };
            }
            // SAFETY: the reservation of `new`, with nothing mapped in it any more.
            let _ = unsafe { vmm::address_free(self.base, self.reserved as usize) };
        } else {
            // SAFETY: the allocation of `new`; no work is queued.
            let _ = unsafe { mem::free(self.base) };
        }
    }
}
