//! The host services table every plug-in gets: fence context ids from this process's
//! allocator, host fences a plug-in can signal, `on_signal` on this process's fence worker,
//! and a log.

use crate::abi::*;
use crate::fence;
use crate::ffi::{self, SendPtr};
use drm_pagemap_core::{BackendError, FenceContexts, FenceError, HostFence};
use std::collections::VecDeque;
use std::ffi::{c_char, c_void};
use std::sync::{Arc, Mutex};

static SERVICES: DppHostServices = DppHostServices {
    abi_version: ABI_VERSION,
    struct_size: size_of_table::<DppHostServices>(),
    host: std::ptr::null_mut(),
    reserve_fence_contexts: Some(reserve_fence_contexts),
    log: Some(log),
    fence_create: Some(fence_create),
    fence_signal: Some(fence_signal),
    on_signal: Some(on_signal),
};

/// The table handed to every plug-in (static: valid for the process's life).
pub(crate) fn services() -> *const DppHostServices {
    &SERVICES
}

unsafe extern "C" fn reserve_fence_contexts(_host: *mut c_void, count: u64) -> u64 {
    ffi::guard_value(0, || FenceContexts::global().reserve(count.max(1)))
}

/// One message a plug-in logged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogRecord {
    /// `DPP_LOG_*`.
    pub level: u32,
    /// The text.
    pub message: String,
}

/// How many records are kept (the oldest go first).
const LOG_KEPT: usize = 512;

static LOG: Mutex<VecDeque<LogRecord>> = Mutex::new(VecDeque::new());

/// The last messages plug-ins logged (at most 512), oldest first.
pub fn log_records() -> Vec<LogRecord> {
    LOG.lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .cloned()
        .collect()
}

unsafe extern "C" fn log(_host: *mut c_void, level: u32, msg: *const c_char, len: usize) {
    ffi::guard_value((), || {
        // SAFETY: `len` bytes at `msg`, valid for the call (the ABI).
        let Some(bytes) = (unsafe { ffi::slice(msg.cast::<u8>(), len) }) else {
            return;
        };
        let mut log = LOG.lock().unwrap_or_else(|p| p.into_inner());
        if log.len() >= LOG_KEPT {
            log.pop_front();
        }
        log.push_back(LogRecord {
            level,
            message: String::from_utf8_lossy(bytes).into_owned(),
        });
    })
}

unsafe extern "C" fn fence_create(
    _host: *mut c_void,
    context: u64,
    seqno: u64,
    out_fence: *mut DppFence,
    out_signal: *mut *mut c_void,
) -> i32 {
    ffi::guard_value(DPP_E_PANICKED, || {
        if out_fence.is_null() || out_signal.is_null() {
            return DPP_E_INVALID_ARGUMENT;
        }
        let f = HostFence::new(context, seqno);
        // SAFETY: non-null writable out-parameters (the ABI).
        unsafe {
            *out_fence = fence::export(&drm_pagemap_core::Fence::from_host(f.clone()));
            *out_signal = Box::into_raw(Box::new(f)).cast();
        }
        DPP_OK
    })
}

unsafe extern "C" fn fence_signal(_host: *mut c_void, signal: *mut c_void, err: *const DppError) {
    if signal.is_null() {
        return;
    }
    // SAFETY: a handle made by `fence_create`, consumed once (the ABI).
    let f = unsafe { Box::from_raw(signal.cast::<Arc<HostFence>>()) };
    ffi::guard_value((), move || {
        // SAFETY: null or the plug-in's error, valid for the call.
        match unsafe { err.as_ref() } {
            None => f.signal(),
            // SAFETY: its strings are valid for the call.
            Some(e) => f.signal_error(unsafe { ffi::error_from_ffi(e.kind, e, "plug-in copy") }),
        }
    })
}

unsafe extern "C" fn on_signal(
    _host: *mut c_void,
    fence: *const DppFence,
    cb: DppFenceCallback,
    user: *mut c_void,
) -> i32 {
    ffi::guard_value(DPP_E_PANICKED, || {
        // SAFETY: null or a borrowed fence of the plug-in (the ABI).
        let Some(raw) = (unsafe { fence.as_ref() }) else {
            return DPP_E_INVALID_ARGUMENT;
        };
        // SAFETY: as above; a new reference is taken.
        let f = match unsafe { fence::import_borrowed(raw, Arc::from("plug-in fence"), None) } {
            Ok(f) => f,
            Err(_) => return DPP_E_INVALID_ARGUMENT,
        };
        let user = SendPtr(user);
        f.on_signal(Box::new(move |outcome: Result<(), FenceError>| {
            let (status, e): (i32, Option<BackendError>) = match outcome {
                Ok(()) => (DPP_OK, None),
                Err(FenceError::Failed(e)) => (ffi::kind_code(&e.kind), Some(e)),
                Err(FenceError::Timeout(_)) => (DPP_TIMEOUT, None),
            };
            let mut raw = DppError::empty();
            if let Some(e) = &e {
                // SAFETY: a local writable struct.
                unsafe { ffi::fill_backend_error(&mut raw, e) };
            }
            let p: *const DppError = if e.is_some() { &raw } else { std::ptr::null() };
            // SAFETY: the plug-in's callback with its `user`, called exactly once.
            unsafe { cb(user.get(), status, p) };
        }));
        DPP_OK
    })
}
