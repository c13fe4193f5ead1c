//! Allocations (host memory standing in for host, device and shared memory), the allocation
//! table used by the strict checks, and the `zeMem*` entries.

use std::alloc::Layout;
use std::collections::BTreeMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, RwLock, RwLockReadGuard};

use level_zero_sys::*;

use super::counters::COUNTERS;
use super::device::{Context, Device, live_device};
use super::handles::{Handle, resolve};
use super::{ZeResult, code, guard, violation, write_out};

/// What an allocation is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MemKind {
    Host,
    Device,
    Shared,
}

/// One allocation.
#[derive(Clone, Copy)]
pub(crate) struct Alloc {
    pub size: usize,
    pub layout: Layout,
    pub kind: MemKind,
    pub device: Option<&'static Handle<Device>>,
    pub context: u64,
    pub id: u64,
}

/// The allocation table: base address to allocation.
pub(crate) type Table = BTreeMap<usize, Alloc>;
static TABLE: LazyLock<RwLock<Table>> = LazyLock::new(Default::default);
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// The table, read-locked (engines hold it while they copy, so a free waits for the copy).
pub(crate) fn table() -> RwLockReadGuard<'static, Table> {
    TABLE.read().unwrap_or_else(|e| e.into_inner())
}

/// The allocation containing `addr`, with its base.
pub(crate) fn find(table: &Table, addr: usize) -> Option<(usize, Alloc)> {
    let (&base, alloc) = table.range(..=addr).next_back()?;
    (addr - base < alloc.size.max(1)).then_some((base, *alloc))
}

/// Checks that `[addr, addr + len)` lies inside one allocation of context `ctx` and that a
/// device allocation belongs to `dev` or one of its peers. `Err` describes the problem.
pub(crate) fn check_range(
    table: &Table,
    ctx: u64,
    dev: &Device,
    addr: usize,
    len: usize,
) -> Result<(), String> {
    let Some((base, alloc)) = find(table, addr) else {
        return Err(format!("{addr:#x} is in no allocation"));
    };
    if alloc.context != ctx {
        return Err(format!("{addr:#x} belongs to another context"));
    }
    let end = addr
        .checked_add(len)
        .ok_or_else(|| format!("{addr:#x} + {len} overflows"))?;
    if end > base + alloc.size {
        return Err(format!(
            "[{addr:#x}, {end:#x}) runs past its allocation [{base:#x}, {:#x})",
            base + alloc.size
        ));
    }
    if let Some(owner) = alloc.device.filter(|_| alloc.kind == MemKind::Device)
        && !dev.is_peer(&owner.obj)
    {
        return Err(format!(
            "{addr:#x} is memory of device {}, not a peer of device {}",
            owner.obj.index, dev.index
        ));
    }
    Ok(())
}

fn allocate(
    ctx: ze_context_handle_t,
    size: usize,
    align: usize,
    kind: MemKind,
    device: Option<&'static Handle<Device>>,
    out: *mut *mut c_void,
) -> ZeResult {
    let ctx = resolve!(Context, ctx)?;
    if out.is_null() {
        return Err(code::INVALID_NULL_POINTER);
    }
    if size == 0 {
        return Err(code::UNSUPPORTED_SIZE);
    }
    if align != 0 && !align.is_power_of_two() {
        return Err(code::UNSUPPORTED_ALIGNMENT);
    }
    let counted = device.filter(|_| kind == MemKind::Device);
    let layout = Layout::from_size_align(size, align.max(64)).map_err(|_| {
        // Larger than any memory: a device allocation is out of device memory.
        if counted.is_some() {
            code::OUT_OF_DEVICE_MEMORY
        } else {
            code::UNSUPPORTED_SIZE
        }
    })?;
    if let Some(dev) = counted {
        let size = size as u64;
        dev.obj
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(size).filter(|&n| n <= dev.obj.total)
            })
            .map_err(|_| code::OUT_OF_DEVICE_MEMORY)?;
    }
    // SAFETY: `layout` has a non-zero size.
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
    if ptr.is_null() {
        if let Some(dev) = counted {
            dev.obj.used.fetch_sub(size as u64, Ordering::AcqRel);
            return Err(code::OUT_OF_DEVICE_MEMORY);
        }
        return Err(code::OUT_OF_HOST_MEMORY);
    }
    let alloc = Alloc {
        size,
        layout,
        kind,
        device,
        context: ctx.obj.id,
        id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
    };
    TABLE
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .insert(ptr as usize, alloc);
    COUNTERS.live_allocations.add(1);
    if counted.is_some() {
        COUNTERS.live_device_bytes.add(size as u64);
    }
    // SAFETY: checked non-null above.
    unsafe { write_out(out, ptr.cast()) }
}

/// `zeMemAllocHost`.
pub(crate) unsafe extern "C" fn mem_alloc_host(
    ctx: ze_context_handle_t,
    desc: *const ze_host_mem_alloc_desc_t,
    size: usize,
    align: usize,
    out: *mut *mut c_void,
) -> ze_result_t {
    guard(|| {
        if desc.is_null() {
            return Err(code::INVALID_NULL_POINTER);
        }
        allocate(ctx, size, align, MemKind::Host, None, out)
    })
}

/// `zeMemAllocDevice`: counted against the device's memory.
pub(crate) unsafe extern "C" fn mem_alloc_device(
    ctx: ze_context_handle_t,
    desc: *const ze_device_mem_alloc_desc_t,
    size: usize,
    align: usize,
    dev: ze_device_handle_t,
    out: *mut *mut c_void,
) -> ze_result_t {
    guard(|| {
        let dev = live_device(dev)?;
        if desc.is_null() {
            return Err(code::INVALID_NULL_POINTER);
        }
        allocate(ctx, size, align, MemKind::Device, Some(dev), out)
    })
}

/// `zeMemAllocShared` (host memory; the device, when given, is recorded).
pub(crate) unsafe extern "C" fn mem_alloc_shared(
    ctx: ze_context_handle_t,
    desc: *const ze_device_mem_alloc_desc_t,
    host_desc: *const ze_host_mem_alloc_desc_t,
    size: usize,
    align: usize,
    dev: ze_device_handle_t,
    out: *mut *mut c_void,
) -> ze_result_t {
    guard(|| {
        let dev = if dev.0.is_null() {
            None
        } else {
            Some(live_device(dev)?)
        };
        if desc.is_null() || host_desc.is_null() {
            return Err(code::INVALID_NULL_POINTER);
        }
        allocate(ctx, size, align, MemKind::Shared, dev, out)
    })
}

/// `zeMemFree`: only an allocation's base address of this context.
pub(crate) unsafe extern "C" fn mem_free(
    ctx: ze_context_handle_t,
    ptr: *mut c_void,
) -> ze_result_t {
    guard(|| {
        let ctx = resolve!(Context, ctx)?;
        if ptr.is_null() {
            return Err(code::INVALID_NULL_POINTER);
        }
        let mut table = TABLE.write().unwrap_or_else(|e| e.into_inner());
        let addr = ptr as usize;
        match table.get(&addr) {
            Some(a) if a.context == ctx.obj.id => {}
            Some(_) => {
                drop(table);
                violation(
                    code::INVALID_ARGUMENT,
                    format_args!("zeMemFree({addr:#x}) of another context"),
                )?;
                return Err(code::INVALID_ARGUMENT);
            }
            None => {
                drop(table);
                violation(
                    code::INVALID_ARGUMENT,
                    format_args!("zeMemFree({addr:#x}): not an allocation"),
                )?;
                return Err(code::INVALID_ARGUMENT);
            }
        }
        let alloc = table.remove(&addr).ok_or(code::INVALID_ARGUMENT)?;
        drop(table);
        // SAFETY: `addr` was returned by `alloc_zeroed(alloc.layout)` and is removed from the
        // table under its write lock, so no engine is copying from or to it and it is freed once.
        unsafe { std::alloc::dealloc(ptr.cast(), alloc.layout) };
        COUNTERS.live_allocations.sub(1);
        if alloc.kind == MemKind::Device
            && let Some(dev) = alloc.device
        {
            dev.obj.used.fetch_sub(alloc.size as u64, Ordering::AcqRel);
            COUNTERS.live_device_bytes.sub(alloc.size as u64);
        }
        Ok(())
    })
}

/// `zeMemGetAllocProperties`: interior pointers resolve to their allocation; unknown memory is
/// `ZE_MEMORY_TYPE_UNKNOWN` (success, as the spec says).
pub(crate) unsafe extern "C" fn mem_get_alloc_properties(
    ctx: ze_context_handle_t,
    ptr: *const c_void,
    out: *mut ze_memory_allocation_properties_t,
    dev_out: *mut ze_device_handle_t,
) -> ze_result_t {
    guard(|| {
        let ctx = resolve!(Context, ctx)?;
        if out.is_null() {
            return Err(code::INVALID_NULL_POINTER);
        }
        let found = find(&table(), ptr as usize).filter(|(_, a)| a.context == ctx.obj.id);
        // SAFETY: non-null application pointer to a properties struct.
        let p = unsafe { &mut *out };
        let (ty, id, device) = match found {
            None => (_ze_memory_type_t::ZE_MEMORY_TYPE_UNKNOWN, 0, None),
            Some((_, a)) => (
                match a.kind {
                    MemKind::Host => _ze_memory_type_t::ZE_MEMORY_TYPE_HOST,
                    MemKind::Device => _ze_memory_type_t::ZE_MEMORY_TYPE_DEVICE,
                    MemKind::Shared => _ze_memory_type_t::ZE_MEMORY_TYPE_SHARED,
                },
                a.id,
                a.device,
            ),
        };
        p.type_ = ty;
        p.id = id;
        p.pageSize = 4096;
        if !dev_out.is_null() {
            let h = device.map_or(std::ptr::null_mut(), |d| d.raw());
            // SAFETY: non-null application out-pointer.
            unsafe { dev_out.write(ze_device_handle_t(h)) };
        }
        Ok(())
    })
}

/// `zeMemGetAddressRange`.
pub(crate) unsafe extern "C" fn mem_get_address_range(
    ctx: ze_context_handle_t,
    ptr: *const c_void,
    base_out: *mut *mut c_void,
    size_out: *mut usize,
) -> ze_result_t {
    guard(|| {
        let ctx = resolve!(Context, ctx)?;
        let Some((base, a)) = find(&table(), ptr as usize).filter(|(_, a)| a.context == ctx.obj.id)
        else {
            return Err(code::INVALID_ARGUMENT);
        };
        if !base_out.is_null() {
            // SAFETY: non-null application out-pointer.
            unsafe { base_out.write(base as *mut c_void) };
        }
        if !size_out.is_null() {
            // SAFETY: non-null application out-pointer.
            unsafe { size_out.write(a.size) };
        }
        Ok(())
    })
}
