//! Streams (`cuStream*`).

use super::{Context, DriverError, check, result};
use cudarc::driver::sys;
use drm_pagemap_core::BackendError;
use std::sync::Arc;

/// A non-blocking stream of one context.
pub(crate) struct Stream {
    // INVARIANT: `raw` was created by `cuStreamCreate` in `ctx` and is destroyed only by
    // Drop, so it is a live stream while `self` lives; `ctx` keeps its context retained.
    raw: sys::CUstream,
    ctx: Arc<Context>,
}

// SAFETY: stream handles may be used from any thread.
unsafe impl Send for Stream {}
// SAFETY: as above; the driver synchronises internally.
unsafe impl Sync for Stream {}

impl Stream {
    pub(crate) fn new(ctx: &Arc<Context>) -> Result<Stream, BackendError> {
        ctx.bind()?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: writes one handle; destroyed in Drop.
        let r = unsafe {
            sys::cuStreamCreate(&mut raw, sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32)
        };
        check("cuStreamCreate", r, "copy stream")?;
        Ok(Stream {
            raw,
            ctx: ctx.clone(),
        })
    }

    /// Blocks until everything queued so far has run.
    pub(crate) fn synchronize(&self) -> Result<(), BackendError> {
        self.ctx.bind()?;
        // SAFETY: the stream lives while `self` does.
        let r = unsafe { sys::cuStreamSynchronize(self.raw) };
        check("cuStreamSynchronize", r, "copy stream")
    }

    /// Makes work queued on the stream from now on wait for the event whose raw handle is
    /// `event` (a native fence's handle; `cuStreamWaitEvent`). A stream may wait on an event
    /// of any context of the process.
    ///
    /// # Safety
    /// `event` must be a `CUevent` of this process that stays alive during the call.
    #[inline]
    pub(crate) unsafe fn wait_native_event(&self, event: u64) -> Result<(), DriverError> {
        // SAFETY: the stream lives while `self` does; the caller vouches for the event.
        let r = unsafe { sys::cuStreamWaitEvent(self.raw, event as usize as sys::CUevent, 0) };
        result("cuStreamWaitEvent", r)
    }

    /// Whether everything queued so far has run (`cuStreamQuery`): `Ok(false)` while work is
    /// pending; `Err` for a failure of the stream's work (a sticky context error).
    pub(crate) fn query(&self) -> Result<bool, BackendError> {
        self.ctx.bind()?;
        // SAFETY: the stream lives while `self` does.
        let r = unsafe { sys::cuStreamQuery(self.raw) };
        if r == sys::CUresult::CUDA_ERROR_NOT_READY {
            return Ok(false);
        }
        check("cuStreamQuery", r, "stream").map(|()| true)
    }

    /// Makes work queued on the stream from now on wait until the 64-bit word at device
    /// address `addr` is at least `value` (`cuStreamWaitValue64_v2`, `GEQ`; CUDA 11.7 or newer). The device must
    /// support 64-bit stream memory operations.
    ///
    /// # Safety
    /// `addr` must be a device-readable, 8-byte aligned word (pinned, mapped host memory or
    /// device memory) that stays valid until the wait has been satisfied.
    pub(crate) unsafe fn wait_value64(&self, addr: u64, value: u64) -> Result<(), DriverError> {
        // SAFETY: the stream lives while `self` does; the caller vouches for the word.
        let r = unsafe {
            sys::cuStreamWaitValue64_v2(
                self.raw,
                addr,
                value,
                sys::CUstreamWaitValue_flags::CU_STREAM_WAIT_VALUE_GEQ as u32,
            )
        };
        result("cuStreamWaitValue64", r)
    }

    /// The raw `CUstream` as an integer (benches record timing events on it).
    #[cfg_attr(not(feature = "internals"), allow(dead_code))]
    pub(crate) fn handle(&self) -> usize {
        self.raw as usize
    }

    /// The raw handle (for the driver module's other wrappers).
    pub(super) fn raw(&self) -> sys::CUstream {
        self.raw
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // SAFETY: the handle is ours; pending work completes before the driver frees it.
        unsafe {
            if self.ctx.bind().is_ok() {
                sys::cuStreamSynchronize(self.raw);
            }
            sys::cuStreamDestroy_v2(self.raw);
        }
    }
}
