//! Devices and their primary contexts (`cuDevice*`, `cuDevicePrimaryCtx*`, `cuCtxSetCurrent`).

use super::check;
use cudarc::driver::sys;
use drm_pagemap_core::BackendError;
use std::ffi::CStr;

/// One device's primary context, retained for the life of this value.
pub(crate) struct Context {
    // INVARIANT: `dev` is a device handle from `cuDeviceGet`; `ctx` is its primary context,
    // retained by `retain` and released by Drop (so it is valid while `self` lives).
    dev: sys::CUdevice,
    ctx: sys::CUcontext,
}

// SAFETY: a CUcontext is a handle the driver lets any thread use (made current per call).
unsafe impl Send for Context {}
// SAFETY: as above; the driver synchronises internally.
unsafe impl Sync for Context {}

/// The device attributes this crate asks about (`CUdevice_attribute`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Attribute {
    ComputeCapabilityMajor,
    ComputeCapabilityMinor,
    VirtualAddressManagementSupported,
    UnifiedAddressing,
    MultiprocessorCount,
    /// 64-bit stream memory operations (`cuStreamWaitValue64`).
    StreamMemOps64,
}

impl Attribute {
    fn raw(self) -> sys::CUdevice_attribute {
        use sys::CUdevice_attribute as A;
        match self {
            Attribute::ComputeCapabilityMajor => A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
            Attribute::ComputeCapabilityMinor => A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
            Attribute::VirtualAddressManagementSupported => {
                A::CU_DEVICE_ATTRIBUTE_VIRTUAL_ADDRESS_MANAGEMENT_SUPPORTED
            }
            Attribute::UnifiedAddressing => A::CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING,
            Attribute::MultiprocessorCount => A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            Attribute::StreamMemOps64 => A::CU_DEVICE_ATTRIBUTE_CAN_USE_64_BIT_STREAM_MEM_OPS,
        }
    }
}

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
    pub(crate) fn attribute(&self, a: Attribute) -> Result<i32, BackendError> {
        let a = a.raw();
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

    /// The raw `CUcontext` as an integer (a native fence's domain).
    pub(crate) fn handle(&self) -> u64 {
        self.ctx as usize as u64
    }

    /// The raw device handle (for the driver module's other wrappers).
    pub(super) fn raw_device(&self) -> sys::CUdevice {
        self.dev
    }

    /// The raw context handle (for the driver module's other wrappers).
    pub(super) fn raw(&self) -> sys::CUcontext {
        self.ctx
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
