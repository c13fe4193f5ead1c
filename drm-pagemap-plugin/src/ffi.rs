//! What both sides of the boundary share: error conversion, the guard every `extern "C"`
//! entry runs in (a panic becomes [`DPP_E_PANICKED`], never an unwind across the boundary),
//! and slices from (pointer, count) pairs.

use crate::abi::*;
use drm_pagemap_core::{BackendError, BackendErrorKind, Direction, PageSize};
use std::cell::RefCell;
use std::ffi::{CStr, CString, c_char};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Mutex;

/// The `DPP_E_*` code of an error kind.
pub fn kind_code(kind: &BackendErrorKind) -> i32 {
    match kind {
        BackendErrorKind::OutOfMemory => DPP_E_OUT_OF_MEMORY,
        BackendErrorKind::DeviceLost => DPP_E_DEVICE_LOST,
        BackendErrorKind::MapFailed => DPP_E_MAP_FAILED,
        BackendErrorKind::CopyFailed => DPP_E_COPY_FAILED,
        BackendErrorKind::Unsupported => DPP_E_UNSUPPORTED,
        BackendErrorKind::Unavailable => DPP_E_UNAVAILABLE,
        BackendErrorKind::Injected => DPP_E_INJECTED,
        BackendErrorKind::BadConfig => DPP_E_BAD_CONFIG,
        BackendErrorKind::Driver { .. } => DPP_E_DRIVER,
    }
}

/// Driver entry-point names coming from the other side, made `'static` once each (at most
/// [`MAX_INTERNED`] distinct ones; later ones share one name).
fn intern(name: &str) -> &'static str {
    static NAMES: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());
    let mut names = NAMES.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(n) = names.iter().find(|n| **n == name) {
        return n;
    }
    if names.len() >= MAX_INTERNED {
        return "plug-in driver call";
    }
    let n: &'static str = Box::leak(name.to_owned().into_boxed_str());
    names.push(n);
    n
}

/// How many distinct driver entry-point names are kept.
const MAX_INTERNED: usize = 256;

/// A C string from the other side, copied; `None` for null.
///
/// # Safety
/// `p` is null or a NUL-terminated string valid for the call.
pub unsafe fn c_text(p: *const c_char) -> Option<String> {
    if p.is_null() {
        return None;
    }
    // SAFETY: non-null and NUL-terminated (the caller's guarantee).
    Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// The [`BackendError`] a failed call reported: `status` (the return code) and the details in
/// `err`; `what` names the call for messages (e.g. "plug-in tier: copy_to_devmem").
///
/// # Safety
/// `err`'s strings are null or valid NUL-terminated strings (as the ABI promises).
pub unsafe fn error_from_ffi(status: i32, err: &DppError, what: &str) -> BackendError {
    // SAFETY: the callee's strings, valid until its next call on this thread (this one).
    let message = unsafe { c_text(err.message) }.unwrap_or_default();
    let text = if message.is_empty() {
        format!("{what} failed (status {status})")
    } else {
        format!("{what}: {message}")
    };
    let kind = match status {
        DPP_E_OUT_OF_MEMORY => BackendErrorKind::OutOfMemory,
        DPP_E_DEVICE_LOST => BackendErrorKind::DeviceLost,
        DPP_E_MAP_FAILED => BackendErrorKind::MapFailed,
        DPP_E_COPY_FAILED => BackendErrorKind::CopyFailed,
        DPP_E_UNSUPPORTED => BackendErrorKind::Unsupported,
        DPP_E_UNAVAILABLE => BackendErrorKind::Unavailable,
        DPP_E_INJECTED => BackendErrorKind::Injected,
        DPP_E_BAD_CONFIG => BackendErrorKind::BadConfig,
        DPP_E_DRIVER => {
            // SAFETY: as above.
            let api = unsafe { c_text(err.api) }.unwrap_or_else(|| "plug-in driver call".into());
            BackendErrorKind::Driver {
                api: intern(&api),
                code: err.driver_code,
            }
        }
        // A panic, a broken argument, or a code this host does not know: the raw status
        // stays visible, with the entry that returned it.
        other => BackendErrorKind::Driver {
            api: match other {
                DPP_E_PANICKED => "plug-in entry (panicked)",
                DPP_E_INVALID_ARGUMENT => "plug-in entry (invalid argument)",
                _ => "plug-in entry",
            },
            code: other as i64,
        },
    };
    BackendError::new(kind, text)
}

thread_local! {
    /// The strings of the last error this side reported on this thread (valid until this
    /// thread's next call into this side, as the ABI promises).
    static LAST: RefCell<(CString, CString)> = RefCell::new((CString::default(), CString::default()));
}

/// A C string without interior NULs.
fn cstring(s: &str) -> CString {
    CString::new(s.replace('\0', " ")).unwrap_or_default()
}

/// Fills `err` (may be null) with `kind`, `message` and the driver details; returns `kind`.
///
/// # Safety
/// `err` is null or points to a writable [`DppError`].
pub unsafe fn fill_error(
    err: *mut DppError,
    kind: i32,
    message: &str,
    api: Option<&str>,
    driver_code: i64,
) -> i32 {
    if err.is_null() {
        return kind;
    }
    let (m, a) = LAST.with(|l| {
        let mut l = l.borrow_mut();
        l.0 = cstring(message);
        l.1 = cstring(api.unwrap_or(""));
        (l.0.as_ptr(), l.1.as_ptr())
    });
    // SAFETY: the caller guarantees a writable struct; the strings live in this thread's slot.
    unsafe {
        *err = DppError {
            kind,
            flags: 0,
            driver_code,
            api: if api.is_some() { a } else { std::ptr::null() },
            message: m,
        };
    }
    kind
}

/// Fills `err` from a [`BackendError`]; returns its code.
///
/// # Safety
/// As [`fill_error`].
pub unsafe fn fill_backend_error(err: *mut DppError, e: &BackendError) -> i32 {
    let (api, code) = match &e.kind {
        BackendErrorKind::Driver { api, code } => (Some(*api), *code),
        _ => (None, 0),
    };
    // SAFETY: forwarded.
    unsafe { fill_error(err, kind_code(&e.kind), &e.message, api, code) }
}

/// The text of a panic payload.
pub fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_owned()
    }
}

/// Runs a fallible entry: `Ok` is [`DPP_OK`], an error fills `err` and returns its code, a
/// panic fills `err` with "panicked in ENTRY: ..." and returns [`DPP_E_PANICKED`].
///
/// # Safety
/// `err` is null or points to a writable [`DppError`].
pub unsafe fn guard(
    entry: &str,
    err: *mut DppError,
    f: impl FnOnce() -> Result<(), BackendError>,
) -> i32 {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => DPP_OK,
        // SAFETY: forwarded.
        Ok(Err(e)) => unsafe { fill_backend_error(err, &e) },
        Err(p) => {
            let msg = format!("panicked in {entry}: {}", panic_text(p.as_ref()));
            // SAFETY: forwarded.
            unsafe { fill_error(err, DPP_E_PANICKED, &msg, None, 0) }
        }
    }
}

/// Runs an entry that returns a value; a panic returns `fallback`.
pub fn guard_value<T>(fallback: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(fallback)
}

/// A slice from a (pointer, count) pair of the other side; `None` when the pointer is null
/// and the count is not 0.
///
/// # Safety
/// A non-null `p` points to `n` valid, initialised `T` that stay unchanged during the borrow.
pub unsafe fn slice<'a, T>(p: *const T, n: usize) -> Option<&'a [T]> {
    if n == 0 {
        return Some(&[]);
    }
    if p.is_null() {
        return None;
    }
    // SAFETY: the caller's guarantee.
    Some(unsafe { std::slice::from_raw_parts(p, n) })
}

/// A mutable slice from a (pointer, count) pair; `None` when the pointer is null and the
/// count is not 0.
///
/// # Safety
/// A non-null `p` points to `n` writable `T` that nothing else accesses during the borrow.
pub unsafe fn slice_mut<'a, T>(p: *mut T, n: usize) -> Option<&'a mut [T]> {
    if n == 0 {
        return Some(&mut []);
    }
    if p.is_null() {
        return None;
    }
    // SAFETY: the caller's guarantee.
    Some(unsafe { std::slice::from_raw_parts_mut(p, n) })
}

/// The error of an argument that broke the ABI's rules.
pub fn bad_argument(what: &str) -> BackendError {
    BackendError::new(
        BackendErrorKind::Driver {
            api: "plug-in ABI",
            code: DPP_E_INVALID_ARGUMENT as i64,
        },
        format!("invalid argument: {what}"),
    )
}

/// A page size from its byte count.
pub fn page_size(bytes: u64) -> Result<PageSize, BackendError> {
    PageSize::from_bytes(bytes).ok_or_else(|| bad_argument(&format!("page size {bytes} bytes")))
}

/// A direction from its code.
pub fn direction(code: u32) -> Direction {
    if code == DPP_DIR_FROM_DEVICE {
        Direction::FromDevice
    } else {
        Direction::ToDevice
    }
}

/// The code of a direction.
pub fn direction_code(d: Direction) -> u32 {
    match d {
        Direction::ToDevice => DPP_DIR_TO_DEVICE,
        Direction::FromDevice => DPP_DIR_FROM_DEVICE,
    }
}

/// A raw pointer that may cross threads (the ABI promises its objects are thread-safe).
#[derive(Clone, Copy, Debug)]
pub struct SendPtr(pub *mut std::ffi::c_void);

impl SendPtr {
    /// The pointer (a method, so a closure captures the whole `SendPtr`, not its field).
    pub fn get(self) -> *mut std::ffi::c_void {
        self.0
    }
}
// SAFETY: the objects behind these pointers are thread-safe by the ABI's contract (every
// entry may be called from any thread).
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}
