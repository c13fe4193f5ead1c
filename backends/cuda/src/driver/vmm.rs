//! Virtual memory management (`cuMemGetAllocationGranularity`, `cuMemAddressReserve`,
//! `cuMemAddressFree`, `cuMemCreate`, `cuMemMap`, `cuMemRelease`, `cuMemSetAccess`,
//! `cuMemUnmap`): pinned device memory of one device, mapped into reserved address space.

use super::{DriverError, result};
use cudarc::driver::sys;

/// The description of pinned device memory on device `ordinal`.
fn alloc_prop(ordinal: i32) -> sys::CUmemAllocationProp {
    // SAFETY: an all-zero CUmemAllocationProp is valid (plain integers and a null pointer).
    let mut prop: sys::CUmemAllocationProp = unsafe { std::mem::zeroed() };
    prop.type_ = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location = sys::CUmemLocation {
        type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
        id: ordinal,
    };
    prop
}

/// The minimum granularity of physical allocations on device `ordinal`.
pub(crate) fn granularity(ordinal: i32) -> Result<u64, DriverError> {
    let prop = alloc_prop(ordinal);
    let mut g = 0usize;
    let min = sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_MINIMUM;
    // SAFETY: writes one size; `prop` is a valid description.
    let r = unsafe { sys::cuMemGetAllocationGranularity(&mut g, &prop, min) };
    result("cuMemGetAllocationGranularity", r).map(|()| g as u64)
}

/// Reserves `bytes` of address space aligned to `align` (no memory behind it yet).
pub(crate) fn address_reserve(bytes: usize, align: usize) -> Result<u64, DriverError> {
    let mut base = 0u64;
    // SAFETY: reserves address space only; the caller frees it.
    let r = unsafe { sys::cuMemAddressReserve(&mut base, bytes, align, 0, 0) };
    result("cuMemAddressReserve", r).map(|()| base)
}

/// Frees a reservation from [`address_reserve`].
///
/// # Safety
/// `[base, base + bytes)` must be a whole reservation of [`address_reserve`], not freed yet,
/// with nothing mapped in it any more.
pub(crate) unsafe fn address_free(base: u64, bytes: usize) -> Result<(), DriverError> {
    // SAFETY: the caller vouches for the range.
    let r = unsafe { sys::cuMemAddressFree(base, bytes) };
    result("cuMemAddressFree", r)
}

/// A physical allocation of device memory, not mapped by this handle (a mapping keeps the
/// memory alive on its own once the handle is released).
pub(crate) struct Allocation {
    // INVARIANT: a handle from `cuMemCreate`, released only by `release` (which consumes it).
    raw: sys::CUmemGenericAllocationHandle,
}

/// Creates `bytes` of pinned device memory on device `ordinal` (`cuMemCreate`).
pub(crate) fn create(bytes: usize, ordinal: i32) -> Result<Allocation, DriverError> {
    let prop = alloc_prop(ordinal);
    let mut raw = 0;
    // SAFETY: creates a physical allocation; the handle is released by `release`.
    let r = unsafe { sys::cuMemCreate(&mut raw, bytes, &prop, 0) };
    result("cuMemCreate", r).map(|()| Allocation { raw })
}

/// Maps the whole of `a` (`bytes`) at `at` (`cuMemMap`).
///
/// # Safety
/// `[at, at + bytes)` must lie in a reservation of the caller, be unmapped and aligned to
/// the granularity; `bytes` must be the size of `a`.
pub(crate) unsafe fn map(at: u64, bytes: usize, a: &Allocation) -> Result<(), DriverError> {
    // SAFETY: the caller vouches for the range; the handle is alive.
    let r = unsafe { sys::cuMemMap(at, bytes, 0, a.raw, 0) };
    result("cuMemMap", r)
}

/// Releases the handle (`cuMemRelease`); a mapping made of it keeps the memory.
pub(crate) fn release(a: Allocation) -> Result<(), DriverError> {
    // SAFETY: the handle is ours and not used again (consumed).
    let r = unsafe { sys::cuMemRelease(a.raw) };
    result("cuMemRelease", r)
}

/// Lets the devices `ordinals` read and write `[at, at + bytes)` (`cuMemSetAccess`).
///
/// # Safety
/// The range must be mapped (by [`map`]) and belong to the caller.
pub(crate) unsafe fn set_access(
    at: u64,
    bytes: usize,
    ordinals: &[i32],
) -> Result<(), DriverError> {
    let descs: Vec<sys::CUmemAccessDesc> = ordinals
        .iter()
        .map(|&d| sys::CUmemAccessDesc {
            location: sys::CUmemLocation {
                type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
                id: d,
            },
            flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
        })
        .collect();
    // SAFETY: the caller vouches for the range; `descs` describes devices of this process.
    let r = unsafe { sys::cuMemSetAccess(at, bytes, descs.as_ptr(), descs.len()) };
    result("cuMemSetAccess", r)
}

/// Unmaps `[at, at + bytes)` (`cuMemUnmap`).
///
/// # Safety
/// The range must be mapped by the caller (by [`map`]), and no queued work may use it any
/// more.
pub(crate) unsafe fn unmap(at: u64, bytes: usize) -> Result<(), DriverError> {
    // SAFETY: the caller vouches for the range.
    let r = unsafe { sys::cuMemUnmap(at, bytes) };
    result("cuMemUnmap", r)
}
