//! Gates: words of pinned, mapped host memory a stream waits on (`dpm_wait`), opened (or
//! aborted) from the CPU. They hold a stream for tests (`CudaPagemap::hold`, feature
//! `internals`). Every pagemap makes its control page, whatever the features, and its
//! teardown opens, aborted, any gate still closed.

use crate::driver::{Context, DriverResult, Event, mem};
use crate::kernel::GATE_ABORT;
use drm_pagemap_core::{BackendError, BackendErrorKind};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

/// Words per control page.
pub(crate) const GATES: usize = 1024;

/// One page of gate words (`cuMemHostAlloc(DEVICEMAP | PORTABLE)`), freed when the last
/// holder (the pagemap, a `Hold`) lets go.
pub(crate) struct ControlPage {
    // INVARIANT: `host` is a `mem::host_alloc` allocation of `GATES` words (zeroed when made),
    // mapped at `dev` for every device, freed only by Drop; the words are only accessed
    // atomically by the CPU.
    host: *mut AtomicU32,
    #[cfg_attr(not(feature = "internals"), allow(dead_code))]
    dev: u64,
    ctx: Arc<Context>,
}

// SAFETY: the page is pinned host memory; the words are only touched atomically.
unsafe impl Send for ControlPage {}
// SAFETY: as above.
unsafe impl Sync for ControlPage {}

impl ControlPage {
    pub(crate) fn new(ctx: &Arc<Context>) -> Result<ControlPage, BackendError> {
        ctx.bind()?;
        let bytes = GATES * 4;
        // Freed in Drop.
        let p = mem::host_alloc(bytes).about("control page")?;
        // SAFETY: fresh allocation of `bytes`.
        unsafe { std::ptr::write_bytes(p as *mut u8, 0, bytes) };
        // SAFETY: `p` was just allocated by `host_alloc`.
        let dev = unsafe { mem::host_device_pointer(p) };
        let dev = match dev.about("control page") {
            Ok(d) => d,
            Err(e) => {
                // SAFETY: allocated above, unused.
                let _ = unsafe { mem::free_host(p) };
                return Err(e);
            }
        };
        Ok(ControlPage {
            host: p as *mut AtomicU32,
            dev,
            ctx: ctx.clone(),
        })
    }

    /// Writes gate `i` (visible to the device once written; the store is sequentially
    /// consistent, which also drains the CPU's write buffers).
    pub(crate) fn set(&self, i: usize, v: u32) {
        assert!(i < GATES);
        // SAFETY: in bounds of the page; the words are only accessed atomically by the CPU.
        unsafe { &*self.host.add(i) }.store(v, Ordering::SeqCst);
    }

    /// The device address of gate `i`.
    #[cfg_attr(not(feature = "internals"), allow(dead_code))]
    pub(crate) fn addr(&self, i: usize) -> u64 {
        self.dev + 4 * i as u64
    }
}

impl Drop for ControlPage {
    fn drop(&mut self) {
        let _ = self.ctx.bind();
        // SAFETY: allocated by `host_alloc` (INVARIANT); no stream waits on the page any
        // more: its owners are gone.
        let _ = unsafe { mem::free_host(self.host as *mut std::ffi::c_void) };
    }
}

/// Which gates are free; a used gate comes back once the event recorded after the work that
/// reads it has completed.
pub(crate) struct Gates {
    pub page: Arc<ControlPage>,
    #[cfg_attr(not(feature = "internals"), allow(dead_code))]
    free: Vec<usize>,
    busy: Vec<(usize, Option<Arc<Event>>)>,
}

impl Gates {
    pub(crate) fn new(page: ControlPage) -> Gates {
        Gates {
            page: Arc::new(page),
            free: (0..GATES).rev().collect(),
            busy: Vec::new(),
        }
    }

    /// A closed gate.
    #[cfg_attr(not(feature = "internals"), allow(dead_code))]
    pub(crate) fn take(&mut self) -> Result<usize, BackendError> {
        if self.free.is_empty() {
            let free = &mut self.free;
            self.busy.retain(|(i, e)| match e {
                Some(e) if e.query().unwrap_or(false) => {
                    free.push(*i);
                    false
                }
                _ => true,
            });
        }
        let i = self.free.pop().ok_or_else(|| {
            BackendError::new(
                BackendErrorKind::CopyFailed,
                format!("cuda: {GATES} copies already wait for host fences"),
            )
        })?;
        self.page.set(i, 0);
        self.busy.push((i, None));
        Ok(i)
    }

    /// Gate `i` may be reused once `event` has completed.
    #[cfg_attr(not(feature = "internals"), allow(dead_code))]
    pub(crate) fn retire_after(&mut self, i: usize, event: Arc<Event>) {
        if let Some(b) = self.busy.iter_mut().find(|(g, _)| *g == i) {
            b.1 = Some(event);
        }
    }

    /// Opens every gate in use with ABORT (teardown: nothing may stay blocked).
    pub(crate) fn abort_all(&self) {
        for &(i, _) in &self.busy {
            self.page.set(i, GATE_ABORT);
        }
    }
}

/// A stream held until [`Hold::release`] (or drop): see [`crate::CudaPagemap::hold`]
/// (feature `internals`).
#[cfg(feature = "internals")]
pub struct Hold {
    pub(crate) page: Arc<ControlPage>,
    pub(crate) gate: usize,
}

#[cfg(feature = "internals")]
impl std::fmt::Debug for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hold")
            .field("gate", &self.gate)
            .finish_non_exhaustive()
    }
}

#[cfg(feature = "internals")]
impl Hold {
    /// Lets the stream go on.
    pub fn release(self) {}
}

#[cfg(feature = "internals")]
impl Drop for Hold {
    fn drop(&mut self) {
        self.page.set(self.gate, crate::kernel::GATE_OPEN);
    }
}
