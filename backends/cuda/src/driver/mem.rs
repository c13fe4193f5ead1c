//! Linear device memory, pinned host memory and stream-ordered copies and sets
//! (`cuMemAlloc`, `cuMemFree`, `cuMemHostAlloc`, `cuMemHostRegister`, `cuMemHostUnregister`,
//! `cuMemHostGetDevicePointer`, `cuMemFreeHost`, `cuMemcpyAsync`, `cuMemsetD32Async`). Device addresses are `u64` (a `CUdeviceptr`), pinned
//! host memory a raw pointer: their owners free them explicitly, in the order they choose.

use super::{DriverError, Stream, result};
use cudarc::driver::sys;
use std::ffi::c_void;

/// Allocates `bytes` of device memory in the current context (`cuMemAlloc`).
pub(crate) fn alloc(bytes: usize) -> Result<u64, DriverError> {
    let mut p = 0u64;
    // SAFETY: writes one pointer; the caller owns (and frees) the memory.
    let r = unsafe { sys::cuMemAlloc_v2(&mut p, bytes) };
    result("cuMemAlloc", r).map(|()| p)
}

/// Frees device memory from [`alloc`] (`cuMemFree`).
///
/// # Safety
/// `ptr` must come from [`alloc`], not be freed yet, and no queued work may still use it.
pub(crate) unsafe fn free(ptr: u64) -> Result<(), DriverError> {
    // SAFETY: the caller vouches for `ptr`.
    let r = unsafe { sys::cuMemFree_v2(ptr) };
    result("cuMemFree", r)
}

/// Allocates `bytes` of pinned host memory that every device reaches and every context may
/// use (`cuMemHostAlloc(DEVICEMAP | PORTABLE)`; cached, not write-combined).
pub(crate) fn host_alloc(bytes: usize) -> Result<*mut c_void, DriverError> {
    let mut p: *mut c_void = std::ptr::null_mut();
    let flags = sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE;
    // SAFETY: writes one pointer; the caller owns (and frees) the memory.
    let r = unsafe { sys::cuMemHostAlloc(&mut p, bytes, flags) };
    result("cuMemHostAlloc", r).map(|()| p)
}

/// Pins the existing mapping `[p, p + bytes)` of this process and maps it for every device
/// and context (`cuMemHostRegister(DEVICEMAP | PORTABLE)`): the pages are faulted in and
/// stay resident (they cannot be given back, e.g. punched out of a file, while registered).
///
/// # Safety
/// `[p, p + bytes)` must be a readable and writable mapping of this process, page aligned,
/// not registered already, that stays mapped until [`host_unregister`] has returned.
pub(crate) unsafe fn host_register(p: *mut c_void, bytes: usize) -> Result<(), DriverError> {
    let flags = sys::CU_MEMHOSTREGISTER_DEVICEMAP | sys::CU_MEMHOSTREGISTER_PORTABLE;
    // SAFETY: the caller vouches for the mapping; the driver only pins and maps its pages.
    let r = unsafe { sys::cuMemHostRegister_v2(p, bytes, flags) };
    result("cuMemHostRegister", r)
}

/// Unpins and unmaps from the devices a range registered with [`host_register`]
/// (`cuMemHostUnregister`); the mapping itself stays, the caller unmaps it.
///
/// # Safety
/// `p` must be the start of a range registered with [`host_register`] and not unregistered
/// yet, and no queued work may still use it.
pub(crate) unsafe fn host_unregister(p: *mut c_void) -> Result<(), DriverError> {
    // SAFETY: the caller vouches for `p`.
    let r = unsafe { sys::cuMemHostUnregister(p) };
    result("cuMemHostUnregister", r)
}

/// The device address of pinned host memory from [`host_alloc`], or of a range registered
/// with [`host_register`] (`cuMemHostGetDevicePointer`).
///
/// # Safety
/// `p` must come from [`host_alloc`] (not freed yet) or lie in a range registered with
/// [`host_register`] (not unregistered yet).
pub(crate) unsafe fn host_device_pointer(p: *mut c_void) -> Result<u64, DriverError> {
    let mut dev = 0u64;
    // SAFETY: writes one pointer; `p` is DEVICEMAP memory (allocated or registered: the
    // caller vouches).
    let r = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dev, p, 0) };
    result("cuMemHostGetDevicePointer", r).map(|()| dev)
}

/// Frees pinned host memory from [`host_alloc`] (`cuMemFreeHost`).
///
/// # Safety
/// `p` must come from [`host_alloc`], not be freed yet, and neither the CPU nor queued work
/// may use it any more.
pub(crate) unsafe fn free_host(p: *mut c_void) -> Result<(), DriverError> {
    // SAFETY: the caller vouches for `p`.
    let r = unsafe { sys::cuMemFreeHost(p) };
    result("cuMemFreeHost", r)
}

/// Queues a copy of `bytes` from `src` to `dst` on `stream` (`cuMemcpyAsync`; with unified
/// addressing the driver infers the direction and the peer).
///
/// # Safety
/// Both ranges must be memory the stream's work may read (`src`) and write (`dst`) until
/// the copy has run.
#[inline]
pub(crate) unsafe fn copy_async(
    dst: u64,
    src: u64,
    bytes: usize,
    stream: &Stream,
) -> Result<(), DriverError> {
    // SAFETY: the stream is alive; the caller vouches for the ranges.
    let r = unsafe { sys::cuMemcpyAsync(dst, src, bytes, stream.raw()) };
    result("cuMemcpyAsync", r)
}

/// Queues setting `count` 32-bit words at `dst` to `value` on `stream` (`cuMemsetD32Async`).
///
/// # Safety
/// `[dst, dst + 4 * count)` must be device memory the stream's work may write until the set
/// has run.
pub(crate) unsafe fn set_d32_async(
    dst: u64,
    value: u32,
    count: usize,
    stream: &Stream,
) -> Result<(), DriverError> {
    // SAFETY: the stream is alive; the caller vouches for the range.
    let r = unsafe { sys::cuMemsetD32Async(dst, value, count, stream.raw()) };
    result("cuMemsetD32Async", r)
}
