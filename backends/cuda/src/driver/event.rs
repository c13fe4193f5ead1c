//! Events (`cuEvent*`), pooled per context.

use super::{Context, Stream, check, driver_error};
use cudarc::driver::sys;
use drm_pagemap_core::BackendError;
use std::sync::{Arc, Mutex};

/// Events of one context without timing, recycled (creating one costs a driver call).
pub(crate) struct EventPool {
    ctx: Arc<Context>,
    // INVARIANT: every entry is a `CUevent` created by `get` in `ctx`, not referenced by any
    // `Event`; Drop destroys them.
    free: Mutex<Vec<usize>>,
}

impl EventPool {
    pub(crate) fn new(ctx: &Arc<Context>) -> Arc<EventPool> {
        Arc::new(EventPool {
            ctx: ctx.clone(),
            free: Mutex::new(Vec::new()),
        })
    }

    /// A free event (recorded by the caller).
    pub(crate) fn get(self: &Arc<Self>) -> Result<Event, BackendError> {
        let reused = self.free.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let raw = match reused {
            Some(e) => e as sys::CUevent,
            None => {
                self.ctx.bind()?;
                let mut e = std::ptr::null_mut();
                // SAFETY: writes one handle; destroyed when the pool drops.
                let r = unsafe {
                    sys::cuEventCreate(&mut e, sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32)
                };
                check("cuEventCreate", r, "fence event")?;
                e
            }
        };
        Ok(Event {
            raw,
            pool: self.clone(),
        })
    }
}

impl Drop for EventPool {
    fn drop(&mut self) {
        let free = std::mem::take(&mut *self.free.lock().unwrap_or_else(|p| p.into_inner()));
        for e in free {
            // SAFETY: pooled events are ours and no longer referenced.
            unsafe {
                sys::cuEventDestroy_v2(e as sys::CUevent);
            }
        }
    }
}

/// One event, returned to its pool on drop (keep it in an `Arc` while a fence, a staging
/// buffer or a stream wait may still look at it).
pub(crate) struct Event {
    // INVARIANT: `raw` is an event of the pool's context, owned by this value until Drop
    // hands it back to the pool (which keeps it alive until the pool drops).
    raw: sys::CUevent,
    pool: Arc<EventPool>,
}

// SAFETY: event handles may be used from any thread.
unsafe impl Send for Event {}
// SAFETY: as above; the driver synchronises internally.
unsafe impl Sync for Event {}

impl Event {
    /// The context the event was created in (its native-fence domain).
    pub(crate) fn context_handle(&self) -> u64 {
        self.pool.ctx.handle()
    }

    /// The raw `CUevent` as an integer (its native-fence handle): valid while `self` lives.
    pub(crate) fn handle(&self) -> u64 {
        self.raw as usize as u64
    }

    /// Records the event on `stream` (which must belong to the event's context).
    pub(crate) fn record(&self, stream: &Stream) -> Result<(), BackendError> {
        // SAFETY: both handles are alive.
        let r = unsafe { sys::cuEventRecord(self.raw, stream.raw()) };
        check("cuEventRecord", r, "fence event")
    }

    /// `Ok(true)` once the work before the event has run, `Ok(false)` while pending.
    pub(crate) fn query(&self) -> Result<bool, BackendError> {
        // SAFETY: the handle is alive.
        match unsafe { sys::cuEventQuery(self.raw) } {
            sys::CUresult::CUDA_SUCCESS => Ok(true),
            sys::CUresult::CUDA_ERROR_NOT_READY => Ok(false),
            r => Err(driver_error("cuEventQuery", r, "copy fence")),
        }
    }

    /// Blocks until the event has completed.
    pub(crate) fn synchronize(&self) -> Result<(), BackendError> {
        self.pool.ctx.bind()?;
        // SAFETY: the handle is alive.
        let r = unsafe { sys::cuEventSynchronize(self.raw) };
        check("cuEventSynchronize", r, "copy fence")
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        self.pool
            .free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(self.raw as usize);
    }
}
