//! Fences across the boundary, both ways: a core [`Fence`] handed to the other side
//! ([`export`]: a boxed handle and a static [`DppFenceOps`]), and a [`DppFence`] from the other
//! side used as a core [`Fence`] ([`import`]: its native handle and completion callback pass
//! through, so it takes part in dependencies like any other fence). The host uses both (plug-in
//! copy fences in, pre-fences out) and so does the SDK (the other way round).

use crate::abi::*;
use crate::ffi::{self, SendPtr};
use drm_pagemap_core::{
    BackendError, Fence, FenceCallback, FenceError, FenceOps, FenceStatus, NativeFence,
};
use std::any::Any;
use std::ffi::c_void;
use std::sync::Arc;
use std::time::Duration;

/// The operations of an exported fence.
pub static EXPORTED_OPS: DppFenceOps = DppFenceOps {
    struct_size: size_of_table::<DppFenceOps>(),
    reserved: 0,
    retain: Some(ex_retain),
    release: Some(ex_release),
    context: Some(ex_context),
    seqno: Some(ex_seqno),
    status: Some(ex_status),
    wait: Some(ex_wait),
    native: Some(ex_native),
    add_callback: Some(ex_add_callback),
    member_count: Some(ex_member_count),
    member_at: Some(ex_member_at),
};

/// A reference to `fence` for the other side (which releases it).
pub fn export(fence: &Fence) -> DppFence {
    DppFence {
        obj: Box::into_raw(Box::new(fence.clone())).cast(),
        ops: &EXPORTED_OPS,
    }
}

/// # Safety
/// `obj` is a live object made by [`export`].
unsafe fn fence_of<'a>(obj: *mut c_void) -> &'a Fence {
    // SAFETY: the caller's guarantee: `obj` is a `Box<Fence>` not yet released.
    unsafe { &*obj.cast::<Fence>() }
}

unsafe extern "C" fn ex_retain(obj: *mut c_void) -> *mut c_void {
    ffi::guard_value(std::ptr::null_mut(), || {
        // SAFETY: the ABI: `obj` is a live fence of ours.
        let f = unsafe { fence_of(obj) }.clone();
        Box::into_raw(Box::new(f)).cast()
    })
}

unsafe extern "C" fn ex_release(obj: *mut c_void) {
    if obj.is_null() {
        return;
    }
    ffi::guard_value((), || {
        // SAFETY: the ABI: the reference is released once; it was made by `Box::into_raw`.
        drop(unsafe { Box::from_raw(obj.cast::<Fence>()) });
    })
}

unsafe extern "C" fn ex_context(obj: *mut c_void) -> u64 {
    // SAFETY: the ABI: `obj` is a live fence of ours.
    ffi::guard_value(0, || unsafe { fence_of(obj) }.context())
}

unsafe extern "C" fn ex_seqno(obj: *mut c_void) -> u64 {
    // SAFETY: as above.
    ffi::guard_value(0, || unsafe { fence_of(obj) }.seqno())
}

unsafe extern "C" fn ex_status(obj: *mut c_void, err: *mut DppError) -> i32 {
    ffi::guard_value(DPP_E_PANICKED, || {
        // SAFETY: as above.
        match unsafe { fence_of(obj) }.status() {
            FenceStatus::Pending => DPP_PENDING,
            FenceStatus::Signaled => DPP_OK,
            // SAFETY: `err` is null or the caller's writable struct (the ABI).
            FenceStatus::Failed(e) => unsafe { ffi::fill_backend_error(err, &e) },
        }
    })
}

/// A timeout in nanoseconds (`u64::MAX`: none) as a duration.
fn timeout_of(ns: u64) -> Option<Duration> {
    (ns != u64::MAX).then(|| Duration::from_nanos(ns))
}

/// A timeout as nanoseconds for the ABI (`u64::MAX`: none; saturating).
fn timeout_ns(t: Option<Duration>) -> u64 {
    t.map_or(u64::MAX, |d| {
        u64::try_from(d.as_nanos())
            .unwrap_or(u64::MAX - 1)
            .min(u64::MAX - 1)
    })
}

unsafe extern "C" fn ex_wait(obj: *mut c_void, timeout: u64, err: *mut DppError) -> i32 {
    ffi::guard_value(DPP_E_PANICKED, || {
        // SAFETY: as above.
        match unsafe { fence_of(obj) }.wait_for(timeout_of(timeout)) {
            Ok(()) => DPP_OK,
            Err(FenceError::Timeout(_)) => DPP_TIMEOUT,
            // SAFETY: `err` per the ABI.
            Err(FenceError::Failed(e)) => unsafe { ffi::fill_backend_error(err, &e) },
        }
    })
}

unsafe extern "C" fn ex_native(obj: *mut c_void, out: *mut DppNativeFence) -> i32 {
    ffi::guard_value(DPP_E_PANICKED, || {
        // SAFETY: as above.
        match unsafe { fence_of(obj) }.native() {
            Some(n) if !out.is_null() => {
                // SAFETY: non-null, the caller's writable struct.
                unsafe { *out = n };
                DPP_OK
            }
            _ => DPP_E_UNSUPPORTED,
        }
    })
}

/// Calls a foreign completion callback with an outcome.
fn call_foreign(cb: DppFenceCallback, user: SendPtr, outcome: Result<(), FenceError>) {
    let (status, err) = match outcome {
        Ok(()) => (DPP_OK, None),
        Err(FenceError::Failed(e)) => (ffi::kind_code(&e.kind), Some(e)),
        Err(FenceError::Timeout(_)) => (DPP_TIMEOUT, None),
    };
    let mut raw = DppError::empty();
    if let Some(e) = &err {
        // SAFETY: `raw` is a local writable struct.
        unsafe { ffi::fill_backend_error(&mut raw, e) };
    }
    let p: *const DppError = if err.is_some() {
        &raw
    } else {
        std::ptr::null()
    };
    // SAFETY: the other side registered `cb` with `user` for exactly this one call.
    unsafe { cb(user.get(), status, p) };
}

unsafe extern "C" fn ex_add_callback(
    obj: *mut c_void,
    cb: DppFenceCallback,
    user: *mut c_void,
) -> i32 {
    ffi::guard_value(DPP_E_PANICKED, || {
        let user = SendPtr(user);
        // SAFETY: as above.
        unsafe { fence_of(obj) }.add_callback(Box::new(move |o| call_foreign(cb, user, o)));
        DPP_OK
    })
}

unsafe extern "C" fn ex_member_count(obj: *mut c_void) -> usize {
    // SAFETY: as above.
    ffi::guard_value(0, || {
        // SAFETY: a live object of this module (the ABI).
        unsafe { fence_of(obj) }.members().map_or(0, <[Fence]>::len)
    })
}

unsafe extern "C" fn ex_member_at(obj: *mut c_void, index: usize, out: *mut DppFence) -> i32 {
    ffi::guard_value(DPP_E_PANICKED, || {
        // SAFETY: as above.
        match unsafe { fence_of(obj) }
            .members()
            .and_then(|m| m.get(index))
        {
            Some(m) if !out.is_null() => {
                // SAFETY: non-null, the caller's writable struct.
                unsafe { *out = export(m) };
                DPP_OK
            }
            _ => DPP_E_INVALID_ARGUMENT,
        }
    })
}

/// Runs `f(user, ...)`'s registered Rust callback: the `user` of [`import`]ed fences'
/// callbacks is a `Box<FenceCallback>`.
unsafe extern "C" fn callback_trampoline(user: *mut c_void, status: i32, err: *const DppError) {
    if user.is_null() {
        return;
    }
    // SAFETY: `user` is the `Box<FenceCallback>` registered in `add_callback` below, passed
    // back exactly once by the ABI's contract.
    let cb = unsafe { Box::from_raw(user.cast::<FenceCallback>()) };
    let outcome = match status {
        DPP_OK => Ok(()),
        s => {
            let e = if err.is_null() {
                DppError::empty()
            } else {
                // SAFETY: non-null: valid during this call (the ABI).
                unsafe { *err }
            };
            // SAFETY: the strings of `e` are valid during this call.
            Err(FenceError::Failed(unsafe {
                ffi::error_from_ffi(s, &e, "fence")
            }))
        }
    };
    ffi::guard_value((), move || cb(outcome));
}

/// A fence of the other side, as a core fence. Holds one reference (released on drop) and
/// `keep` (what must outlive the reference: the plug-in's backend, its library).
pub struct Imported {
    raw: DppFence,
    ops: DppFenceOps,
    context: u64,
    seqno: u64,
    members: Option<Vec<Fence>>,
    what: Arc<str>,
    _keep: Option<Arc<dyn Any + Send + Sync>>,
}

impl std::fmt::Debug for Imported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Imported({}, ctx {}, seq {})",
            self.what, self.context, self.seqno
        )
    }
}

// SAFETY: the ABI requires every fence entry to be callable from any thread, and the object
// to stay valid while a reference is held (this one).
unsafe impl Send for Imported {}
// SAFETY: as above.
unsafe impl Sync for Imported {}

impl Drop for Imported {
    fn drop(&mut self) {
        if let Some(release) = self.ops.release {
            // SAFETY: our one reference, released once.
            unsafe { release(self.raw.obj) };
        }
    }
}

/// Takes over `raw` (an owned reference) as a core fence; `what` names its maker in
/// messages. A fence whose table lacks a required entry is refused (its reference is then
/// released if it can be, else leaked).
///
/// # Safety
/// `raw.ops` is null or points to a fence table of at least its `struct_size` bytes that lives
/// as long as `keep`; `raw.obj` is a reference the caller owns.
pub unsafe fn import(
    raw: DppFence,
    what: Arc<str>,
    keep: Option<Arc<dyn Any + Send + Sync>>,
) -> Result<Fence, BackendError> {
    if raw.obj.is_null() || raw.ops.is_null() {
        return Err(ffi::bad_argument(&format!("{what}: a null fence")));
    }
    // SAFETY: `ops` non-null and readable (the caller's guarantee); the first field is the size.
    let size = unsafe { *raw.ops.cast::<u32>() };
    // SAFETY: as above, `size` bytes readable.
    let ops: DppFenceOps = unsafe { read_table(raw.ops, size) };
    let missing = [
        ("retain", ops.retain.is_none()),
        ("release", ops.release.is_none()),
        ("context", ops.context.is_none()),
        ("seqno", ops.seqno.is_none()),
        ("status", ops.status.is_none()),
        ("wait", ops.wait.is_none()),
    ]
    .into_iter()
    .find(|(_, m)| *m);
    if let Some((name, _)) = missing {
        if let Some(release) = ops.release {
            // SAFETY: the reference we were given, released once.
            unsafe { release(raw.obj) };
        }
        return Err(ffi::bad_argument(&format!(
            "{what}: fence table lacks required entry `{name}`"
        )));
    }
    // SAFETY: checked present above; `obj` is live.
    let (context, seqno) = unsafe {
        (
            ops.context.unwrap_unchecked()(raw.obj),
            ops.seqno.unwrap_unchecked()(raw.obj),
        )
    };
    let mut fence = Imported {
        raw,
        ops,
        context,
        seqno,
        members: None,
        what: what.clone(),
        _keep: keep.clone(),
    };
    if let (Some(count), Some(at)) = (ops.member_count, ops.member_at) {
        // SAFETY: a present entry on a live object.
        let n = unsafe { count(raw.obj) };
        if n > 0 {
            let mut members = Vec::with_capacity(n);
            for i in 0..n {
                let mut m = DppFence::NONE;
                // SAFETY: a present entry; `m` is writable.
                if unsafe { at(raw.obj, i, &mut m) } == DPP_OK {
                    // SAFETY: the member reference was just made for us, by the same side.
                    members.push(unsafe { import(m, what.clone(), keep.clone()) }?);
                }
            }
            fence.members = Some(members);
        }
    }
    Ok(Fence::new(fence))
}

/// A borrowed fence of the other side (a pre-fence): retained, then imported.
///
/// # Safety
/// As [`import`], except that `raw` is borrowed (a new reference is taken).
pub unsafe fn import_borrowed(
    raw: &DppFence,
    what: Arc<str>,
    keep: Option<Arc<dyn Any + Send + Sync>>,
) -> Result<Fence, BackendError> {
    if raw.obj.is_null() || raw.ops.is_null() {
        return Err(ffi::bad_argument(&format!("{what}: a null fence")));
    }
    // SAFETY: readable table (the caller's guarantee).
    let size = unsafe { *raw.ops.cast::<u32>() };
    // SAFETY: as above.
    let ops: DppFenceOps = unsafe { read_table(raw.ops, size) };
    let Some(retain) = ops.retain else {
        return Err(ffi::bad_argument(&format!(
            "{what}: fence table lacks required entry `retain`"
        )));
    };
    // SAFETY: a live borrowed object.
    let obj = unsafe { retain(raw.obj) };
    // SAFETY: `obj` is our new reference on the same table.
    unsafe { import(DppFence { obj, ops: raw.ops }, what, keep) }
}

impl Imported {
    fn error(&self, status: i32, err: &DppError) -> BackendError {
        // SAFETY: the strings of a struct the other side just filled, valid now.
        unsafe { ffi::error_from_ffi(status, err, &format!("{} fence", self.what)) }
    }
}

impl FenceOps for Imported {
    fn context(&self) -> u64 {
        self.context
    }

    fn seqno(&self) -> u64 {
        self.seqno
    }

    fn status(&self) -> FenceStatus {
        let mut err = DppError::empty();
        // SAFETY: checked present at import; the object is live (our reference).
        let s = unsafe { self.ops.status.unwrap_unchecked()(self.raw.obj, &mut err) };
        match s {
            DPP_PENDING => FenceStatus::Pending,
            DPP_OK => FenceStatus::Signaled,
            s => FenceStatus::Failed(self.error(s, &err)),
        }
    }

    fn wait(&self, timeout: Option<Duration>) -> Result<(), FenceError> {
        let mut err = DppError::empty();
        // SAFETY: as above.
        let s = unsafe {
            self.ops.wait.unwrap_unchecked()(self.raw.obj, timeout_ns(timeout), &mut err)
        };
        match s {
            DPP_OK => Ok(()),
            DPP_TIMEOUT => Err(FenceError::Timeout(timeout.unwrap_or_default())),
            s => Err(FenceError::Failed(self.error(s, &err))),
        }
    }

    fn native(&self) -> Option<NativeFence> {
        let native = self.ops.native?;
        let mut out = NativeFence {
            kind: drm_pagemap_core::NativeFenceKind(0),
            flags: 0,
            domain: 0,
            handle: 0,
        };
        // SAFETY: a present entry on a live object; `out` is writable.
        (unsafe { native(self.raw.obj, &mut out) } == DPP_OK).then_some(out)
    }

    fn members(&self) -> Option<&[Fence]> {
        self.members.as_deref()
    }

    fn add_callback(&self, cb: FenceCallback) -> Result<(), FenceCallback> {
        let Some(add) = self.ops.add_callback else {
            return Err(cb);
        };
        let user = Box::into_raw(Box::new(cb));
        // SAFETY: a present entry on a live object; `user` is handed over with the trampoline.
        let s = unsafe { add(self.raw.obj, callback_trampoline, user.cast()) };
        if s == DPP_OK {
            Ok(())
        } else {
            // Not registered: the box is still ours.
            // SAFETY: made by `Box::into_raw` above and not passed on (the ABI: not registered).
            Err(*unsafe { Box::from_raw(user) })
        }
    }
}
