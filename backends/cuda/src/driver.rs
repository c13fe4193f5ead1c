//! Thin, safe-to-call wrappers over the CUDA driver API (cudarc's `sys` layer): error
//! conversion that keeps the `CUresult`, the probe that never panics, contexts, streams and
//! a pool of events.

use cudarc::driver::sys;
use drm_pagemap_core::{BackendError, BackendErrorKind};
use std::ffi::CStr;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, OnceLock};

/// The oldest driver this backend accepts (CUDA 11.4: every entry point we call exists).
pub(crate) const MIN_DRIVER: i32 = 11040;

/// The symbolic name of a `CUresult` (`CUDA_ERROR_ILLEGAL_ADDRESS`).
pub(crate) fn error_name(r: sys::CUresult) -> String {
    let mut p: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: cuGetErrorName only writes a pointer to a static string; the library is loaded
    // (every caller runs after a successful probe).
    let ok = unsafe { sys::cuGetErrorName(r, &mut p) } == sys::CUresult::CUDA_SUCCESS;
    if ok && !p.is_null() {
        // SAFETY: the driver returns a NUL-terminated static string.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    } else {
        format!("CUresult {}", r as u32)
    }
}

/// A driver error of `api` with `r`, keeping the raw code.
pub(crate) fn driver_error(
    api: &'static str,
    r: sys::CUresult,
    what: impl std::fmt::Display,
) -> BackendError {
    BackendError::driver(api, r as u32 as i64, format!("{} ({what})", error_name(r)))
}

/// `Ok` for `CUDA_SUCCESS`, else the driver error of `api`.
pub(crate) fn check(
    api: &'static str,
    r: sys::CUresult,
    what: impl std::fmt::Display,
) -> Result<(), BackendError> {
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(driver_error(api, r, what))
    }
}

/// Whether the driver library is loadable, `cuInit` works and there is a device. Cached: the
/// answer does not change within a process. Never panics (cudarc panics when libcuda is
/// missing, so the library is looked for first; a panic anyway is caught).
pub(crate) fn probe() -> Result<ProbeInfo, String> {
    static PROBE: OnceLock<Result<ProbeInfo, String>> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            std::panic::catch_unwind(AssertUnwindSafe(probe_uncached)).unwrap_or_else(|p| {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                Err(format!("the CUDA driver could not be loaded: {msg}"))
            })
        })
        .clone()
}

/// What the probe found.
#[derive(Clone, Debug)]
pub(crate) struct ProbeInfo {
    pub driver_version: i32,
    pub devices: i32,
}

fn probe_uncached() -> Result<ProbeInfo, String> {
    // SAFETY: only tries to dlopen the candidate library names.
    if !unsafe { sys::is_culib_present() } {
        return Err("no NVIDIA driver: libcuda.so could not be loaded".into());
    }
    // SAFETY: the library is present; cuInit takes flags 0.
    let r = unsafe { sys::cuInit(0) };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(format!("cuInit failed: {}", error_name(r)));
    }
    let mut version = 0;
    // SAFETY: writes one int.
    let r = unsafe { sys::cuDriverGetVersion(&mut version) };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(format!("cuDriverGetVersion failed: {}", error_name(r)));
    }
    if version < MIN_DRIVER {
        return Err(format!(
            "driver supports CUDA {}.{}, this backend needs {}.{} or newer",
            version / 1000,
            version % 1000 / 10,
            MIN_DRIVER / 1000,
            MIN_DRIVER % 1000 / 10
        ));
    }
    let mut n = 0;
    // SAFETY: writes one int.
    let r = unsafe { sys::cuDeviceGetCount(&mut n) };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(format!("cuDeviceGetCount failed: {}", error_name(r)));
    }
    if n == 0 {
        return Err("no CUDA device".into());
    }
    Ok(ProbeInfo {
        driver_version: version,
        devices: n,
    })
}

/// One device's primary context, retained for the life of this value.
pub(crate) struct Context {
    pub dev: sys::CUdevice,
    pub ctx: sys::CUcontext,
}

// SAFETY: a CUcontext is a handle the driver lets any thread use (made current per call).
unsafe impl Send for Context {}
// SAFETY: as above; the driver synchronises internally.
unsafe impl Sync for Context {}

impl Context {
    /// Retains the primary context of device `ordinal`.
    pub(crate) fn retain(ordinal: i32) -> Result<Context, BackendError> {
        let mut dev = 0;
        // SAFETY: writes one handle.
        let r = unsafe { sys::cuDeviceGet(&mut dev, ordinal) };
        check("cuDeviceGet", r, format_args!("device {ordinal}"))?;
        let mut ctx = std::ptr::null_mut();
        // SAFETY: writes one handle; released in Drop.
        let r = unsafe { sys::cuDevicePrimaryCtxRetain(&mut ctx, dev) };
        check(
            "cuDevicePrimaryCtxRetain",
            r,
            format_args!("device {ordinal}"),
        )?;
        Ok(Context { dev, ctx })
    }

    /// Makes the context current on the calling thread.
    pub(crate) fn bind(&self) -> Result<(), BackendError> {
        // SAFETY: the context is retained while `self` lives.
        let r = unsafe { sys::cuCtxSetCurrent(self.ctx) };
        check("cuCtxSetCurrent", r, "bind context")
    }

    /// An integer attribute of the device.
    pub(crate) fn attribute(&self, a: sys::CUdevice_attribute) -> Result<i32, BackendError> {
        let mut v = 0;
        // SAFETY: writes one int.
        let r = unsafe { sys::cuDeviceGetAttribute(&mut v, a, self.dev) };
        check("cuDeviceGetAttribute", r, format_args!("{a:?}"))?;
        Ok(v)
    }

    /// The device's name.
    pub(crate) fn name(&self) -> String {
        let mut buf = [0 as std::ffi::c_char; 256];
        // SAFETY: the driver writes at most `len` bytes, NUL-terminated.
        let r = unsafe { sys::cuDeviceGetName(buf.as_mut_ptr(), buf.len() as i32, self.dev) };
        if r != sys::CUresult::CUDA_SUCCESS {
            return format!("CUDA device {}", self.dev);
        }
        // SAFETY: NUL-terminated within the buffer.
        unsafe { CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    }

    /// Total device memory in bytes.
    pub(crate) fn total_mem(&self) -> Result<u64, BackendError> {
        let mut b = 0usize;
        // SAFETY: writes one size.
        let r = unsafe { sys::cuDeviceTotalMem_v2(&mut b, self.dev) };
        check("cuDeviceTotalMem", r, "total memory")?;
        Ok(b as u64)
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: balances the retain in `Context::retain`.
        unsafe {
            sys::cuDevicePrimaryCtxRelease_v2(self.dev);
        }
    }
}

/// A non-blocking stream of one context.
pub(crate) struct Stream {
    pub raw: sys::CUstream,
    pub ctx: Arc<Context>,
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

/// Events of one context without timing, recycled (creating one costs a driver call).
pub(crate) struct EventPool {
    ctx: Arc<Context>,
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
    pub raw: sys::CUevent,
    pool: Arc<EventPool>,
}

// SAFETY: event handles may be used from any thread.
unsafe impl Send for Event {}
// SAFETY: as above; the driver synchronises internally.
unsafe impl Sync for Event {}

impl Event {
    /// The context the event was created in (its native-fence domain).
    pub(crate) fn context_handle(&self) -> u64 {
        self.pool.ctx.ctx as usize as u64
    }

    /// Records the event on `stream` (which must belong to the event's context).
    pub(crate) fn record(&self, stream: &Stream) -> Result<(), BackendError> {
        // SAFETY: both handles are alive.
        let r = unsafe { sys::cuEventRecord(self.raw, stream.raw) };
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

/// A `BackendError` of kind `kind`.
pub(crate) fn err(kind: BackendErrorKind, msg: impl Into<String>) -> BackendError {
    BackendError::new(kind, msg)
}
