//! Peer access between devices (`cuDeviceCanAccessPeer`, `cuCtxEnablePeerAccess`).

use super::{Context, DriverError, result};
use cudarc::driver::sys;

/// Whether device `a` can access device `b`'s memory.
pub(crate) fn can_access(a: &Context, b: &Context) -> Result<bool, DriverError> {
    let mut v = 0;
    // SAFETY: writes one int; both are valid device handles.
    let r = unsafe { sys::cuDeviceCanAccessPeer(&mut v, a.raw_device(), b.raw_device()) };
    result("cuDeviceCanAccessPeer", r).map(|()| v != 0)
}

/// Enables access from the current context to `to`'s memory; access already enabled counts
/// as done.
pub(crate) fn enable_access(to: &Context) -> Result<(), DriverError> {
    // SAFETY: enables access from the current context to `to`'s context, which is retained.
    let r = unsafe { sys::cuCtxEnablePeerAccess(to.raw(), 0) };
    if r == sys::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED {
        return Ok(());
    }
    result("cuCtxEnablePeerAccess", r)
}
