//! Staging buffers: pinned, device-mapped host memory the CPU writes a call's page lists
//! into for the gather/scatter kernel to read (cached: the CPU fills them with plain copies;
//! write-combined memory measured slower for that).

use super::Submit;
use crate::driver::{DriverResult, Event, mem};
use drm_pagemap_core::BackendError;
use std::sync::Arc;

/// Staging buffers kept per pagemap before a call waits for one to come free.
const MAX_SLOTS: usize = 8;
/// Staging buffers made with the pagemap, and their size (2 MiB: 174 762 entries a call).
pub(super) const PRESET_SLOTS: usize = 4;
pub(super) const SLOT_BYTES: usize = 2 << 20;

/// A pinned, device-mapped buffer for one call's page lists.
pub(super) struct Slot {
    // INVARIANT: `host` is a `mem::host_alloc` allocation of `cap` bytes mapped at `dev`,
    // freed only by the pagemap's Drop once its streams are synchronised; the CPU writes it
    // only while `busy` is `None` or completed (the device no longer reads it).
    pub(super) host: *mut u8,
    pub(super) dev: u64,
    pub(super) cap: usize,
    /// The event after the last work that reads the buffer.
    pub(super) busy: Option<Arc<Event>>,
}

impl Slot {
    fn is_free(&self) -> bool {
        self.busy
            .as_ref()
            .is_none_or(|e| e.query().unwrap_or(false))
    }
}

/// A free staging slot of at least `bytes`: a free one; else, below [`MAX_SLOTS`], a new
/// one; else the first big enough, once the device is done with it. (Pinning memory is an
/// implicit synchronisation point of the device, so slots are made ahead: see
/// `CudaPagemap::new`.)
pub(super) fn acquire_slot(sub: &mut Submit, bytes: usize) -> Result<usize, BackendError> {
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
pub(super) fn new_slot(cap: usize) -> Result<Slot, BackendError> {
    // Freed when the pagemap drops.
    let p = mem::host_alloc(cap).about("staging buffer")?;
    // SAFETY: `p` was just allocated by `host_alloc`.
    let dev = unsafe { mem::host_device_pointer(p) };
    let dev = match dev {
        Ok(d) => d,
        Err(e) => {
            // SAFETY: allocated above, unused.
            let _ = unsafe { mem::free_host(p) };
            return Err(e.about("staging buffer"));
        }
    };
    Ok(Slot {
        host: p as *mut u8,
        dev,
        cap,
        busy: None,
    })
}
