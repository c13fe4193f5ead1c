//! The driver itself: process-wide state, the C entry points and the tables the loader fills.
//! Nothing here is reachable through the rlib: the loader loads the cdylib.

pub(crate) mod cmdlist;
pub(crate) mod config;
pub(crate) mod control;
pub(crate) mod counters;
pub(crate) mod ddi;
pub(crate) mod device;
pub(crate) mod engine;
pub(crate) mod events;
pub(crate) mod handles;
pub(crate) mod memory;
pub(crate) mod queue;

use std::panic::{AssertUnwindSafe, catch_unwind};

use level_zero_sys::{_ze_result_t, ze_result_t};

/// The driver's `Result`: the error is the `ze_result_t` the entry returns.
pub(crate) type ZeResult<T = ()> = Result<T, ze_result_t>;

/// Shorthands for the result codes used here.
pub(crate) mod code {
    use level_zero_sys::_ze_result_t as R;
    pub const SUCCESS: R = R::ZE_RESULT_SUCCESS;
    pub const NOT_READY: R = R::ZE_RESULT_NOT_READY;
    pub const DEVICE_LOST: R = R::ZE_RESULT_ERROR_DEVICE_LOST;
    pub const OUT_OF_HOST_MEMORY: R = R::ZE_RESULT_ERROR_OUT_OF_HOST_MEMORY;
    pub const OUT_OF_DEVICE_MEMORY: R = R::ZE_RESULT_ERROR_OUT_OF_DEVICE_MEMORY;
    pub const UNINITIALIZED: R = R::ZE_RESULT_ERROR_UNINITIALIZED;
    pub const UNSUPPORTED_VERSION: R = R::ZE_RESULT_ERROR_UNSUPPORTED_VERSION;
    pub const INVALID_ARGUMENT: R = R::ZE_RESULT_ERROR_INVALID_ARGUMENT;
    pub const INVALID_NULL_HANDLE: R = R::ZE_RESULT_ERROR_INVALID_NULL_HANDLE;
    pub const INVALID_NULL_POINTER: R = R::ZE_RESULT_ERROR_INVALID_NULL_POINTER;
    pub const INVALID_SIZE: R = R::ZE_RESULT_ERROR_INVALID_SIZE;
    pub const UNSUPPORTED_SIZE: R = R::ZE_RESULT_ERROR_UNSUPPORTED_SIZE;
    pub const UNSUPPORTED_ALIGNMENT: R = R::ZE_RESULT_ERROR_UNSUPPORTED_ALIGNMENT;
    pub const INVALID_COMMAND_LIST_TYPE: R = R::ZE_RESULT_ERROR_INVALID_COMMAND_LIST_TYPE;
    pub const UNKNOWN: R = R::ZE_RESULT_ERROR_UNKNOWN;
}

/// Runs an entry's body, turning `Err` into its code and a panic into `ZE_RESULT_ERROR_UNKNOWN`.
pub(crate) fn guard(body: impl FnOnce() -> ZeResult) -> ze_result_t {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => _ze_result_t::ZE_RESULT_SUCCESS,
        Ok(Err(code)) => code,
        Err(_) => _ze_result_t::ZE_RESULT_ERROR_UNKNOWN,
    }
}

/// A strict-mode violation: counted always; in strict mode the caller fails with `code`, with
/// `ZE_SOFT_STRICT=0` it is logged and the caller goes on (`Ok`).
pub(crate) fn violation(code: ze_result_t, what: std::fmt::Arguments<'_>) -> ZeResult {
    counters::COUNTERS.strict_violations.add(1);
    let strict = device::state().map(|s| s.config.strict).unwrap_or(true);
    if strict {
        Err(code)
    } else {
        eprintln!("ze-soft: strict violation (ZE_SOFT_STRICT=0, going on): {what}");
        Ok(())
    }
}

/// A violation that fails in both modes (a call cannot go on with what it was given).
pub(crate) fn hard_violation(code: ze_result_t) -> ze_result_t {
    counters::COUNTERS.strict_violations.add(1);
    code
}

/// Writes `value` through an out-pointer, or fails with `INVALID_NULL_POINTER`.
///
/// # Safety
/// `out` is null or valid for a write of `T`.
pub(crate) unsafe fn write_out<T>(out: *mut T, value: T) -> ZeResult {
    if out.is_null() {
        return Err(code::INVALID_NULL_POINTER);
    }
    // SAFETY: non-null and valid for writes per the caller's contract.
    unsafe { out.write(value) };
    Ok(())
}
