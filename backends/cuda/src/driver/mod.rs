//! The only module that calls the CUDA driver (cudarc's `sys` layer, and NVRTC): thin
//! wrappers that take and return this crate's handle types, check every `CUresult` and
//! carry the safety reasoning of each raw call, grouped by C prefix as cudarc's own `result`
//! layer is:
//!
//! - this file: error conversion that keeps the `CUresult` ([`DriverError`], [`check`]),
//!   the probe that never panics;
//! - [`context`]: `cuDevice*`, `cuDevicePrimaryCtx*`, `cuCtxSetCurrent` ([`Context`]);
//! - [`stream`]: `cuStream*` ([`Stream`]);
//! - [`event`]: `cuEvent*` ([`EventPool`], [`Event`]);
//! - [`mem`]: `cuMemAlloc`/`cuMemFree`, pinned host memory, `cuMemcpyAsync`, `cuMemset*`;
//! - [`vmm`]: virtual memory management (`cuMemAddressReserve`, `cuMemCreate`, `cuMemMap`, ...);
//! - [`module`]: `cuModule*`, `cuLaunchKernel` ([`Module`], [`Function`]);
//! - [`nvrtc`]: compiling CUDA C to PTX;
//! - [`peer`]: `cuDeviceCanAccessPeer`, `cuCtxEnablePeerAccess`.
//!
//! A wrapper is a safe function when nothing its caller passes can make the call unsound;
//! otherwise it is an `unsafe fn` whose `# Safety` section says what the caller vouches for.
//! Calls whose failure needs no special handling return `Result<_, DriverError>`, which
//! [`DriverResult::about`] turns into the crate's [`BackendError`] (kind
//! [`BackendErrorKind::Driver`], keeping the API name and the raw code).

pub(crate) mod context;
pub(crate) mod event;
pub(crate) mod mem;
pub(crate) mod module;
pub(crate) mod nvrtc;
pub(crate) mod peer;
pub(crate) mod stream;
pub(crate) mod vmm;

pub(crate) use context::{Attribute, Context};
pub(crate) use event::{Event, EventPool};
pub(crate) use module::{Function, Module};
pub(crate) use stream::Stream;

use cudarc::driver::sys;
use drm_pagemap_core::{BackendError, BackendErrorKind};
use std::ffi::CStr;
use std::panic::AssertUnwindSafe;
use std::sync::OnceLock;

/// The oldest driver this backend accepts (CUDA 11.4: every entry point we call exists).
pub(crate) const MIN_DRIVER: i32 = 11040;

/// The symbolic name of a `CUresult` (`CUDA_ERROR_ILLEGAL_ADDRESS`).
fn error_name(r: sys::CUresult) -> String {
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
fn driver_error(api: &'static str, r: sys::CUresult, what: impl std::fmt::Display) -> BackendError {
    BackendError::driver(api, r as u32 as i64, format!("{} ({what})", error_name(r)))
}

/// `Ok` for `CUDA_SUCCESS`, else the driver error of `api`.
fn check(
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

/// A failed driver call: the entry point (as errors name it, without `_v2`) and its
/// `CUresult`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DriverError {
    api: &'static str,
    code: sys::CUresult,
}

impl DriverError {
    /// Whether the driver ran out of memory (`CUDA_ERROR_OUT_OF_MEMORY`).
    pub(crate) fn is_out_of_memory(&self) -> bool {
        self.code == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY
    }

    /// The backend error of this failure, naming what the call was for (as [`check`]).
    pub(crate) fn about(self, what: impl std::fmt::Display) -> BackendError {
        driver_error(self.api, self.code, what)
    }
}

/// `Ok` for `CUDA_SUCCESS`, else the [`DriverError`] of `api`.
#[inline]
fn result(api: &'static str, r: sys::CUresult) -> Result<(), DriverError> {
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(DriverError { api, code: r })
    }
}

/// Turning a wrapper's result into the crate's error.
pub(crate) trait DriverResult<T> {
    /// The error as a [`BackendError`] naming `what` the call was for (formatted only on
    /// failure).
    fn about(self, what: impl std::fmt::Display) -> Result<T, BackendError>;
}

impl<T> DriverResult<T> for Result<T, DriverError> {
    #[inline]
    fn about(self, what: impl std::fmt::Display) -> Result<T, BackendError> {
        self.map_err(|e| e.about(what))
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

/// A `BackendError` of kind `kind`.
pub(crate) fn err(kind: BackendErrorKind, msg: impl Into<String>) -> BackendError {
    BackendError::new(kind, msg)
}
