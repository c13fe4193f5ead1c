//! Test support (feature `testing`): the software driver's run-time control entry
//! (`zexSoftControl`, obtained through the loader with
//! `zeDriverGetExtensionFunctionAddress`) as a safe type: fault injection and counters.
//!
//! Only for a backend running on the workspace's software driver (`ze-soft`); on any other
//! driver [`SoftDriver::new`] says the extension is missing.

use crate::LevelZeroBackend;
use crate::ze::{Driver, discover};
use drm_pagemap_core::DeviceId;
use level_zero_sys::ze_result_t;
use std::ffi::CString;
pub use ze_soft::control::SoftCounters;
use ze_soft::control::{
    CONTROL_EXTENSION, OP_DEVICE_LOST, OP_FAIL_APPEND, OP_FAIL_SUBMIT, OP_HANG_EVENTS,
    OP_READ_COUNTERS, OP_RESET, SoftControl, SoftControlFn,
};

/// The software driver's control entry.
#[derive(Clone, Copy)]
pub struct SoftDriver {
    entry: SoftControlFn,
    driver: Driver,
}

impl std::fmt::Debug for SoftDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SoftDriver")
    }
}

impl SoftDriver {
    /// The control entry of the driver of `backend`'s device 0, or why there is none.
    pub fn new(backend: &LevelZeroBackend) -> Result<SoftDriver, String> {
        let driver = backend
            .driver_handle(DeviceId(0))
            .ok_or("the backend has no device")?;
        let name = CString::new(CONTROL_EXTENSION).expect("no NUL in the name");
        let f = discover::extension_function(backend.loader(), driver, &name)
            .map_err(|f| format!("{CONTROL_EXTENSION}: {f}"))?;
        if f.is_null() {
            return Err(format!(
                "{CONTROL_EXTENSION}: the driver returned no address"
            ));
        }
        // SAFETY: the software driver's control extension has the signature `SoftControlFn`
        // (the contract between it and this crate, defined by its `control` module).
        let entry = unsafe { std::mem::transmute::<*mut std::ffi::c_void, SoftControlFn>(f) };
        Ok(SoftDriver { entry, driver })
    }

    fn call(&self, mut req: SoftControl) -> Result<SoftControl, String> {
        // SAFETY: a driver handle of the loader and a valid request the driver fills.
        let r = unsafe { (self.entry)(self.driver.0, &mut req) };
        level_zero_sys::check("zexSoftControl", r).map_err(|e| e.to_string())?;
        Ok(req)
    }

    fn op(&self, op: u32, device: u32, count: u64, result: ze_result_t) -> Result<(), String> {
        self.call(SoftControl {
            op,
            device,
            count,
            result: result.0 as i32,
            ..SoftControl::default()
        })
        .map(drop)
    }

    /// Clears every injection and the counters (the live gauges stay).
    pub fn reset(&self) -> Result<(), String> {
        self.op(OP_RESET, 0, 0, ze_result_t::ZE_RESULT_SUCCESS)
    }

    /// The `nth` command-list append from now (1: the next) on `device` (`u32::MAX`: any)
    /// fails with `result`.
    pub fn fail_append(&self, device: u32, nth: u64, result: ze_result_t) -> Result<(), String> {
        self.op(OP_FAIL_APPEND, device, nth, result)
    }

    /// The `nth` submission from now (a regular list executed, or an append to an immediate
    /// list) on `device` (`u32::MAX`: any) fails with `result`.
    pub fn fail_submit(&self, device: u32, nth: u64, result: ze_result_t) -> Result<(), String> {
        self.op(OP_FAIL_SUBMIT, device, nth, result)
    }

    /// Device `device` is lost from now on.
    pub fn lose_device(&self, device: u32) -> Result<(), String> {
        self.op(OP_DEVICE_LOST, device, 0, ze_result_t::ZE_RESULT_SUCCESS)
    }

    /// The next `count` event signals by commands are dropped.
    pub fn hang_events(&self, count: u64) -> Result<(), String> {
        self.op(OP_HANG_EVENTS, 0, count, ze_result_t::ZE_RESULT_SUCCESS)
    }

    /// The driver's process-wide counters.
    pub fn counters(&self) -> Result<SoftCounters, String> {
        self.call(SoftControl {
            op: OP_READ_COUNTERS,
            ..SoftControl::default()
        })
        .map(|r| r.counters)
    }
}
