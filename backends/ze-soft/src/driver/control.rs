//! The driver side of the control extension: injections and the `zexSoftControl` entry.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use level_zero_sys::{_ze_result_t, ze_driver_handle_t, ze_result_t};

use super::counters::COUNTERS;
use super::device::{device_by_index, state};
use super::{ZeResult, code, guard};
use crate::control::*;

/// A pending "the n-th call from now fails" injection.
#[derive(Clone, Copy)]
struct FailNth {
    device: u32,
    remaining: u64,
    result: ze_result_t,
}

/// All injections.
pub(crate) struct Inject {
    fail_append: Mutex<Option<FailNth>>,
    fail_submit: Mutex<Option<FailNth>>,
    hang: AtomicU64,
}

/// The process's injections.
pub(crate) static INJECT: Inject = Inject {
    fail_append: Mutex::new(None),
    fail_submit: Mutex::new(None),
    hang: AtomicU64::new(0),
};

fn tick(slot: &Mutex<Option<FailNth>>, device: u32) -> ZeResult {
    let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
    let Some(f) = slot.as_mut() else {
        return Ok(());
    };
    if f.device != u32::MAX && f.device != device {
        return Ok(());
    }
    f.remaining = f.remaining.saturating_sub(1);
    if f.remaining == 0 {
        let result = f.result;
        *slot = None;
        return Err(result);
    }
    Ok(())
}

impl Inject {
    /// Called by every append on a list of `device`.
    pub fn on_append(&self, device: u32) -> ZeResult {
        tick(&self.fail_append, device)
    }
    /// Called by every submission on `device`.
    pub fn on_submit(&self, device: u32) -> ZeResult {
        tick(&self.fail_submit, device)
    }
    /// Whether the next command signal is dropped.
    pub fn take_hang(&self) -> bool {
        self.hang
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
    }
    fn reset(&self) {
        *self.fail_append.lock().unwrap_or_else(|e| e.into_inner()) = None;
        *self.fail_submit.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.hang.store(0, Ordering::Release);
    }
}

fn fail_nth(req: &SoftControl) -> ZeResult<Option<FailNth>> {
    if req.device != u32::MAX {
        device_by_index(req.device)?;
    }
    if req.count == 0 {
        return Ok(None);
    }
    let result = _ze_result_t(req.result as u32);
    if result == code::SUCCESS {
        return Err(code::INVALID_ARGUMENT);
    }
    Ok(Some(FailNth {
        device: req.device,
        remaining: req.count,
        result,
    }))
}

fn apply(req: &mut SoftControl) -> ZeResult {
    let s = state()?;
    match req.op {
        OP_RESET => {
            INJECT.reset();
            COUNTERS.reset();
            for d in &s.devices {
                d.obj.lost.store(false, Ordering::Release);
            }
        }
        OP_FAIL_APPEND => {
            *INJECT.fail_append.lock().unwrap_or_else(|e| e.into_inner()) = fail_nth(req)?
        }
        OP_FAIL_SUBMIT => {
            *INJECT.fail_submit.lock().unwrap_or_else(|e| e.into_inner()) = fail_nth(req)?
        }
        OP_DEVICE_LOST => device_by_index(req.device)?
            .obj
            .lost
            .store(true, Ordering::Release),
        OP_HANG_EVENTS => INJECT.hang.store(req.count, Ordering::Release),
        OP_READ_COUNTERS => req.counters = COUNTERS.read(),
        _ => return Err(code::INVALID_ARGUMENT),
    }
    Ok(())
}

/// The control entry (`zexSoftControl`, also exported as the C symbol `zeSoftControl`).
///
/// # Safety
/// `req` is null or points to a valid, writable [`SoftControl`].
#[unsafe(export_name = "zeSoftControl")]
pub unsafe extern "C" fn ze_soft_control(
    driver: ze_driver_handle_t,
    req: *mut SoftControl,
) -> ze_result_t {
    guard(|| {
        if driver.0.is_null() {
            return Err(code::INVALID_NULL_HANDLE);
        }
        if req.is_null() {
            return Err(code::INVALID_NULL_POINTER);
        }
        // SAFETY: non-null, valid per the caller's contract.
        apply(unsafe { &mut *req })
    })
}
