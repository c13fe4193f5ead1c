//! Gates: words of pinned, mapped host memory a stream waits on (`dpm_wait`). A host
//! pre-fence is waited for on the CPU by a helper thread, which then opens the gate (or
//! aborts the copy behind it), so a copy call never blocks on a fence of another kind.

use crate::driver::{Context, Event, check};
use crate::kernel::GATE_ABORT;
use cudarc::driver::sys;
use drm_pagemap_core::{BackendError, BackendErrorKind};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

/// Words per control page.
pub(crate) const GATES: usize = 1024;

/// One page of gate words (`cuMemHostAlloc(DEVICEMAP | PORTABLE)`), freed when the last
/// holder (the pagemap, a helper thread, a [`crate::Hold`]) lets go.
pub(crate) struct ControlPage {
    host: *mut AtomicU32,
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
        let mut p: *mut std::ffi::c_void = std::ptr::null_mut();
        let bytes = GATES * 4;
        // SAFETY: writes one pointer; freed in Drop.
        let r = unsafe {
            sys::cuMemHostAlloc(
                &mut p,
                bytes,
                sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE,
            )
        };
        check("cuMemHostAlloc", r, "control page")?;
        // SAFETY: fresh allocation of `bytes`.
        unsafe { std::ptr::write_bytes(p as *mut u8, 0, bytes) };
        let mut dev = 0u64;
        // SAFETY: `p` was allocated with DEVICEMAP.
        let r = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dev, p, 0) };
        if let Err(e) = check("cuMemHostGetDevicePointer", r, "control page") {
            // SAFETY: allocated above, unused.
            unsafe {
                sys::cuMemFreeHost(p);
            }
            return Err(e);
        }
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
    pub(crate) fn addr(&self, i: usize) -> u64 {
        self.dev + 4 * i as u64
    }
}

impl Drop for ControlPage {
    fn drop(&mut self) {
        let _ = self.ctx.bind();
        // SAFETY: no stream waits on the page any more: its owners are gone.
        unsafe {
            sys::cuMemFreeHost(self.host as *mut std::ffi::c_void);
        }
    }
}

/// Which gates are free; a used gate comes back once the event recorded after the work that
/// reads it has completed.
pub(crate) struct Gates {
    pub page: Arc<ControlPage>,
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

/// A stream held until [`Hold::release`] (or drop): see [`crate::CudaPagemap::hold`].
pub struct Hold {
    pub(crate) page: Arc<ControlPage>,
    pub(crate) gate: usize,
}

impl std::fmt::Debug for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hold")
            .field("gate", &self.gate)
            .finish_non_exhaustive()
    }
}

impl Hold {
    /// Lets the stream go on.
    pub fn release(self) {}
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.page.set(self.gate, crate::kernel::GATE_OPEN);
    }
}
