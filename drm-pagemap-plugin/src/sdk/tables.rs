//! The SDK's tables: a core [`Backend`] and what it makes (host memory, pagemaps, fences) as
//! the ABI's objects, one trampoline per entry, each in [`ffi::guard`].

use crate::abi::*;
use crate::fence;
use crate::ffi::{self, guard};
use drm_pagemap_core::{
    Backend, BackendError, CopyRequest, DeviceId, DevmemBacking, DmaAddr, HostFenceWait, HostFrame,
    HostMemory, OwnerId, Pagemap, PagemapId, PagemapSpec, Pfn,
};
use std::ffi::{CString, c_void};
use std::sync::Arc;

/// An exported backend.
struct SdkBackend {
    backend: Arc<dyn Backend>,
}

/// An exported pagemap (both its tables use this object).
struct SdkPagemap {
    pagemap: Pagemap,
    name: CString,
}

/// An exported host memory.
struct SdkHost {
    host: Arc<dyn HostMemory>,
}

static BACKEND_OPS: DppBackendOps = DppBackendOps {
    struct_size: size_of_table::<DppBackendOps>(),
    reserved: 0,
    destroy: Some(backend_destroy),
    device_count: Some(backend_device_count),
    device_info: Some(backend_device_info),
    host_memory: Some(backend_host_memory),
    create_pagemap: Some(backend_create_pagemap),
    can_access_peer: Some(backend_can_access_peer),
};

static PAGEMAP_OPS: DppPagemapOps = DppPagemapOps {
    struct_size: size_of_table::<DppPagemapOps>(),
    reserved: 0,
    destroy: Some(pagemap_destroy),
    device_map: Some(pagemap_device_map),
    device_unmap: Some(pagemap_device_unmap),
};

static DEVMEM_OPS: DppDevmemOps = DppDevmemOps {
    struct_size: size_of_table::<DppDevmemOps>(),
    reserved: 0,
    allocate: Some(devmem_allocate),
    populate_devmem_pfn: Some(devmem_populate),
    copy_to_devmem: Some(devmem_copy_to_devmem),
    copy_to_ram: Some(devmem_copy_to_ram),
    devmem_release: Some(devmem_release),
    devmem_release_many: Some(devmem_release_many),
    devmem_release_unused: Some(devmem_release_unused),
    capacity_bytes: Some(devmem_capacity),
    caps: Some(devmem_caps),
};

static HOST_OPS: DppHostMemoryOps = DppHostMemoryOps {
    struct_size: size_of_table::<DppHostMemoryOps>(),
    reserved: 0,
    destroy: Some(host_destroy),
    alloc_frames: Some(host_alloc_frames),
    free_frames: Some(host_free_frames),
    read: Some(host_read),
    write: Some(host_write),
    zero: Some(host_zero),
    map_frames: Some(host_map_frames),
    unmap_frames: Some(host_unmap_frames),
    capacity_bytes: Some(host_capacity),
};

/// A backend as an ABI object (the host destroys it).
pub fn export_backend(backend: Arc<dyn Backend>) -> DppBackend {
    DppBackend {
        obj: Box::into_raw(Box::new(SdkBackend { backend })).cast(),
        ops: &BACKEND_OPS,
    }
}

/// # Safety
/// `obj` is a live object of type `T` made by this module.
unsafe fn obj<'a, T>(obj: *mut c_void) -> &'a T {
    // SAFETY: the caller's guarantee.
    unsafe { &*obj.cast::<T>() }
}

/// Drops an object made with `Box::into_raw`.
///
/// # Safety
/// `p` is such an object, dropped once.
unsafe fn destroy<T>(p: *mut c_void) {
    if !p.is_null() {
        // SAFETY: the caller's guarantee.
        ffi::guard_value((), || drop(unsafe { Box::from_raw(p.cast::<T>()) }));
    }
}

unsafe extern "C" fn backend_destroy(o: *mut c_void) {
    // SAFETY: the host destroys its backend once (the ABI).
    unsafe { destroy::<SdkBackend>(o) }
}

unsafe extern "C" fn backend_device_count(o: *mut c_void) -> u32 {
    // SAFETY: a live backend (the ABI).
    ffi::guard_value(0, || {
        // SAFETY: a live object of this module (the ABI).
        u32::try_from(unsafe { obj::<SdkBackend>(o) }.backend.device_count()).unwrap_or(u32::MAX)
    })
}

unsafe extern "C" fn backend_device_info(
    o: *mut c_void,
    index: u32,
    out: *mut DppDeviceInfo,
) -> i32 {
    ffi::guard_value(DPP_E_PANICKED, || {
        // SAFETY: a live backend (the ABI).
        let b = unsafe { obj::<SdkBackend>(o) };
        match b.backend.device_info(index as usize) {
            Some(d) if !out.is_null() => {
                let name = d.name.as_str().as_bytes();
                let mut info = DppDeviceInfo {
                    id: d.id.0,
                    name_len: name.len().min(63) as u8,
                    name: [0; 63],
                    memory_bytes: d.memory_bytes,
                };
                info.name[..info.name_len as usize]
                    .copy_from_slice(&name[..info.name_len as usize]);
                // SAFETY: non-null, the host's writable struct.
                unsafe { *out = info };
                DPP_OK
            }
            _ => DPP_E_INVALID_ARGUMENT,
        }
    })
}

unsafe extern "C" fn backend_host_memory(
    o: *mut c_void,
    out: *mut DppHostMemory,
    err: *mut DppError,
) -> i32 {
    // SAFETY: the host's arguments (the ABI).
    unsafe {
        guard("host_memory", err, || {
            if out.is_null() {
                return Err(ffi::bad_argument("host_memory: `out` is null"));
            }
            let host = obj::<SdkBackend>(o).backend.host_memory();
            *out = DppHostMemory {
                obj: Box::into_raw(Box::new(SdkHost { host })).cast(),
                ops: &HOST_OPS,
            };
            Ok(())
        })
    }
}

unsafe extern "C" fn backend_create_pagemap(
    o: *mut c_void,
    spec: *const DppPagemapSpec,
    out: *mut DppPagemap,
    err: *mut DppError,
) -> i32 {
    // SAFETY: the host's arguments (the ABI).
    unsafe {
        guard("create_pagemap", err, || {
            if spec.is_null() || out.is_null() {
                return Err(ffi::bad_argument("create_pagemap: null spec or out"));
            }
            let s = *spec;
            let id = u8::try_from(s.id)
                .map_err(|_| ffi::bad_argument(&format!("pagemap id {}", s.id)))?;
            let spec = PagemapSpec {
                id: PagemapId(id),
                device: DeviceId(s.device),
                owner: (s.has_owner != 0).then_some(OwnerId(s.owner)),
                capacity_bytes: s.capacity_bytes,
            };
            let pagemap = obj::<SdkBackend>(o).backend.create_pagemap(&spec)?;
            let (owner, device) = (pagemap.owner().0, pagemap.device().0);
            let name = CString::new(pagemap.name().replace('\0', " ")).unwrap_or_default();
            let pm = Box::new(SdkPagemap { pagemap, name });
            let name_ptr = pm.name.as_ptr();
            *out = DppPagemap {
                obj: Box::into_raw(pm).cast(),
                pagemap_ops: &PAGEMAP_OPS,
                devmem_ops: &DEVMEM_OPS,
                owner,
                device,
                name: name_ptr,
            };
            Ok(())
        })
    }
}

unsafe extern "C" fn backend_can_access_peer(o: *mut c_void, a: u32, b: u32) -> i32 {
    // SAFETY: a live backend (the ABI).
    ffi::guard_value(0, || {
        i32::from(
            // SAFETY: a live object of this module (the ABI).
            unsafe { obj::<SdkBackend>(o) }
                .backend
                .can_access_peer(DeviceId(a), DeviceId(b)),
        )
    })
}

unsafe extern "C" fn pagemap_destroy(o: *mut c_void) {
    // SAFETY: the host destroys each pagemap once (the ABI).
    unsafe { destroy::<SdkPagemap>(o) }
}

unsafe extern "C" fn pagemap_device_map(
    o: *mut c_void,
    device: u32,
    pfns: *const u32,
    n: usize,
    page_size: u64,
    dir: u32,
    out: *mut u64,
    err: *mut DppError,
) -> i32 {
    // SAFETY: the host's arguments (the ABI); `Pfn` and `DmaAddr` are `repr(transparent)`.
    unsafe {
        guard("device_map", err, || {
            let pfns = ffi::slice(pfns.cast::<Pfn>(), n)
                .ok_or_else(|| ffi::bad_argument("device_map: pfns"))?;
            let out = ffi::slice_mut(out.cast::<DmaAddr>(), n)
                .ok_or_else(|| ffi::bad_argument("device_map: out"))?;
            obj::<SdkPagemap>(o).pagemap.ops().device_map(
                DeviceId(device),
                pfns,
                ffi::page_size(page_size)?,
                ffi::direction(dir),
                out,
            )
        })
    }
}

unsafe extern "C" fn pagemap_device_unmap(
    o: *mut c_void,
    device: u32,
    addrs: *const u64,
    n: usize,
    page_size: u64,
    dir: u32,
) {
    ffi::guard_value((), || {
        // SAFETY: the host's arguments (the ABI); `DmaAddr` is `repr(transparent)`.
        let (Some(addrs), Ok(ps)) = (
            unsafe { ffi::slice(addrs.cast::<DmaAddr>(), n) },
            ffi::page_size(page_size),
        ) else {
            return;
        };
        // SAFETY: a live pagemap.
        unsafe { obj::<SdkPagemap>(o) }.pagemap.ops().device_unmap(
            DeviceId(device),
            addrs,
            ps,
            ffi::direction(dir),
        );
    })
}

/// A core backing from the host's descriptor (never with a fence: the host kept it).
fn backing_of(b: &DppDevmemBacking) -> Result<DevmemBacking, BackendError> {
    Ok(DevmemBacking {
        cookie: b.cookie,
        npages: usize::try_from(b.npages).map_err(|_| ffi::bad_argument("npages"))?,
        page_size: ffi::page_size(b.page_size)?,
        pre_migrate_fence: None,
    })
}

unsafe extern "C" fn devmem_allocate(
    o: *mut c_void,
    npages: u64,
    page_size: u64,
    out: *mut DppDevmemBacking,
    err: *mut DppError,
) -> i32 {
    // SAFETY: the host's arguments (the ABI).
    unsafe {
        guard("allocate", err, || {
            if out.is_null() {
                return Err(ffi::bad_argument("allocate: `out` is null"));
            }
            let n = usize::try_from(npages).map_err(|_| ffi::bad_argument("npages"))?;
            let b = obj::<SdkPagemap>(o)
                .pagemap
                .devmem()
                .allocate(n, ffi::page_size(page_size)?)?;
            *out = DppDevmemBacking {
                cookie: b.cookie,
                npages: b.npages as u64,
                page_size: b.page_size.bytes(),
                pre_migrate_fence: b
                    .pre_migrate_fence
                    .as_ref()
                    .map_or(DppFence::NONE, fence::export),
            };
            Ok(())
        })
    }
}

unsafe extern "C" fn devmem_populate(
    o: *mut c_void,
    backing: *const DppDevmemBacking,
    out: *mut u32,
    n: usize,
    err: *mut DppError,
) -> i32 {
    // SAFETY: the host's arguments (the ABI); `Pfn` is `repr(transparent)`.
    unsafe {
        guard("populate_devmem_pfn", err, || {
            let b = backing
                .as_ref()
                .ok_or_else(|| ffi::bad_argument("populate_devmem_pfn: backing"))?;
            let out = ffi::slice_mut(out.cast::<Pfn>(), n)
                .ok_or_else(|| ffi::bad_argument("populate_devmem_pfn: out"))?;
            obj::<SdkPagemap>(o)
                .pagemap
                .devmem()
                .populate_devmem_pfn(&backing_of(b)?, out)
        })
    }
}

/// Runs a copy entry.
///
/// # Safety
/// The host's arguments per the ABI.
unsafe fn copy(
    entry: &'static str,
    o: *mut c_void,
    req: *const DppCopyRequest,
    out: *mut DppFence,
    err: *mut DppError,
    to_ram: bool,
) -> i32 {
    // SAFETY: forwarded.
    unsafe {
        guard(entry, err, || {
            let r = req
                .as_ref()
                .ok_or_else(|| ffi::bad_argument("copy: request is null"))?;
            if out.is_null() {
                return Err(ffi::bad_argument("copy: `out` is null"));
            }
            let pages = ffi::slice(r.pages.cast::<Pfn>(), r.count)
                .ok_or_else(|| ffi::bad_argument("copy: pages"))?;
            let addrs = ffi::slice(r.addrs.cast::<DmaAddr>(), r.count)
                .ok_or_else(|| ffi::bad_argument("copy: addrs"))?;
            let pre = match r.pre_fence.as_ref() {
                Some(f) if !f.obj.is_null() => Some(fence::import_borrowed(
                    f,
                    Arc::from("host pre-fence"),
                    None,
                )?),
                _ => None,
            };
            let request = CopyRequest {
                page_size: ffi::page_size(r.page_size)?,
                pages,
                addrs,
                pre_fence: pre.as_ref(),
            };
            let devmem = obj::<SdkPagemap>(o).pagemap.devmem();
            let f = if to_ram {
                devmem.copy_to_ram(&request)?
            } else {
                devmem.copy_to_devmem(&request)?
            };
            *out = fence::export(&f);
            Ok(())
        })
    }
}

unsafe extern "C" fn devmem_copy_to_devmem(
    o: *mut c_void,
    req: *const DppCopyRequest,
    out: *mut DppFence,
    err: *mut DppError,
) -> i32 {
    // SAFETY: the host's arguments.
    unsafe { copy("copy_to_devmem", o, req, out, err, false) }
}

unsafe extern "C" fn devmem_copy_to_ram(
    o: *mut c_void,
    req: *const DppCopyRequest,
    out: *mut DppFence,
    err: *mut DppError,
) -> i32 {
    // SAFETY: the host's arguments.
    unsafe { copy("copy_to_ram", o, req, out, err, true) }
}

unsafe extern "C" fn devmem_release(o: *mut c_void, backing: *const DppDevmemBacking) {
    ffi::guard_value((), || {
        // SAFETY: the host's arguments (the ABI).
        if let Some(Ok(b)) = unsafe { backing.as_ref() }.map(backing_of) {
            // SAFETY: a live pagemap.
            unsafe { obj::<SdkPagemap>(o) }
                .pagemap
                .devmem()
                .devmem_release(b);
        }
    })
}

unsafe extern "C" fn devmem_release_unused(o: *mut c_void, backing: *const DppDevmemBacking) {
    ffi::guard_value((), || {
        // SAFETY: the host's arguments (the ABI).
        if let Some(Ok(b)) = unsafe { backing.as_ref() }.map(backing_of) {
            // SAFETY: a live pagemap.
            unsafe { obj::<SdkPagemap>(o) }
                .pagemap
                .devmem()
                .devmem_release_unused(b);
        }
    })
}

unsafe extern "C" fn devmem_release_many(
    o: *mut c_void,
    backings: *const DppDevmemBacking,
    n: usize,
) {
    ffi::guard_value((), || {
        // SAFETY: the host's array (the ABI).
        let Some(raw) = (unsafe { ffi::slice(backings, n) }) else {
            return;
        };
        let list: Vec<DevmemBacking> = raw.iter().filter_map(|b| backing_of(b).ok()).collect();
        // SAFETY: a live pagemap.
        unsafe { obj::<SdkPagemap>(o) }
            .pagemap
            .devmem()
            .devmem_release_many(&list);
    })
}

unsafe extern "C" fn devmem_capacity(o: *mut c_void) -> u64 {
    // SAFETY: a live pagemap.
    ffi::guard_value(0, || {
        // SAFETY: a live object of this module (the ABI).
        unsafe { obj::<SdkPagemap>(o) }
            .pagemap
            .devmem()
            .capacity_bytes()
    })
}

unsafe extern "C" fn devmem_caps(o: *mut c_void, out: *mut DppCopyCaps) {
    ffi::guard_value((), || {
        if out.is_null() {
            return;
        }
        // SAFETY: a live pagemap.
        let c = unsafe { obj::<SdkPagemap>(o) }.pagemap.devmem().caps();
        let mut kinds = [0u32; 4];
        for (k, n) in kinds.iter_mut().zip(c.native_fence_kinds.as_slice()) {
            *k = n.0;
        }
        // SAFETY: non-null, the host's writable struct.
        unsafe {
            *out = DppCopyCaps {
                max_command_bytes: c.max_command_bytes.unwrap_or(0),
                native_kind_count: c.native_fence_kinds.len() as u32,
                native_kinds: kinds,
                host_fences: match c.host_fences {
                    HostFenceWait::Blocking => 0,
                    HostFenceWait::InQueue => 1,
                    HostFenceWait::Deferred => 2,
                },
                in_order: u32::from(c.in_order),
                batch_bytes_hint: c.batch_bytes_hint.unwrap_or(0),
            }
        };
    })
}

unsafe extern "C" fn host_destroy(o: *mut c_void) {
    // SAFETY: the host destroys its host memory once (the ABI).
    unsafe { destroy::<SdkHost>(o) }
}

unsafe extern "C" fn host_alloc_frames(
    o: *mut c_void,
    page_size: u64,
    out: *mut u64,
    n: usize,
    err: *mut DppError,
) -> i32 {
    // SAFETY: the host's arguments; `HostFrame` is `repr(transparent)`.
    unsafe {
        guard("alloc_frames", err, || {
            let out = ffi::slice_mut(out.cast::<HostFrame>(), n)
                .ok_or_else(|| ffi::bad_argument("alloc_frames: out"))?;
            obj::<SdkHost>(o)
                .host
                .alloc_frames(ffi::page_size(page_size)?, out)
        })
    }
}

unsafe extern "C" fn host_free_frames(
    o: *mut c_void,
    frames: *const u64,
    n: usize,
    page_size: u64,
) {
    ffi::guard_value((), || {
        // SAFETY: the host's arguments; `HostFrame` is `repr(transparent)`.
        let (Some(f), Ok(ps)) = (
            unsafe { ffi::slice(frames.cast::<HostFrame>(), n) },
            ffi::page_size(page_size),
        ) else {
            return;
        };
        // SAFETY: a live host memory.
        unsafe { obj::<SdkHost>(o) }.host.free_frames(f, ps);
    })
}

unsafe extern "C" fn host_read(
    o: *mut c_void,
    frame: u64,
    offset: usize,
    buf: *mut u8,
    len: usize,
    err: *mut DppError,
) -> i32 {
    // SAFETY: the host's arguments.
    unsafe {
        guard("read", err, || {
            let buf = ffi::slice_mut(buf, len).ok_or_else(|| ffi::bad_argument("read: buf"))?;
            obj::<SdkHost>(o).host.read(HostFrame(frame), offset, buf)
        })
    }
}

unsafe extern "C" fn host_write(
    o: *mut c_void,
    frame: u64,
    offset: usize,
    data: *const u8,
    len: usize,
    err: *mut DppError,
) -> i32 {
    // SAFETY: the host's arguments.
    unsafe {
        guard("write", err, || {
            let data = ffi::slice(data, len).ok_or_else(|| ffi::bad_argument("write: data"))?;
            obj::<SdkHost>(o).host.write(HostFrame(frame), offset, data)
        })
    }
}

unsafe extern "C" fn host_zero(
    o: *mut c_void,
    frame: u64,
    page_size: u64,
    err: *mut DppError,
) -> i32 {
    // SAFETY: the host's arguments.
    unsafe {
        guard("zero", err, || {
            obj::<SdkHost>(o)
                .host
                .zero(HostFrame(frame), ffi::page_size(page_size)?)
        })
    }
}

unsafe extern "C" fn host_map_frames(
    o: *mut c_void,
    device: u32,
    frames: *const u64,
    n: usize,
    page_size: u64,
    dir: u32,
    out: *mut u64,
    err: *mut DppError,
) -> i32 {
    // SAFETY: the host's arguments; `HostFrame`, `DmaAddr` are `repr(transparent)`.
    unsafe {
        guard("map_frames", err, || {
            let frames = ffi::slice(frames.cast::<HostFrame>(), n)
                .ok_or_else(|| ffi::bad_argument("map_frames: frames"))?;
            let out = ffi::slice_mut(out.cast::<DmaAddr>(), n)
                .ok_or_else(|| ffi::bad_argument("map_frames: out"))?;
            obj::<SdkHost>(o).host.map_frames(
                DeviceId(device),
                frames,
                ffi::page_size(page_size)?,
                ffi::direction(dir),
                out,
            )
        })
    }
}

unsafe extern "C" fn host_unmap_frames(
    o: *mut c_void,
    device: u32,
    addrs: *const u64,
    n: usize,
    page_size: u64,
    dir: u32,
) {
    ffi::guard_value((), || {
        // SAFETY: the host's arguments; `DmaAddr` is `repr(transparent)`.
        let (Some(a), Ok(ps)) = (
            unsafe { ffi::slice(addrs.cast::<DmaAddr>(), n) },
            ffi::page_size(page_size),
        ) else {
            return;
        };
        // SAFETY: a live host memory.
        unsafe { obj::<SdkHost>(o) }.host.unmap_frames(
            DeviceId(device),
            a,
            ps,
            ffi::direction(dir),
        );
    })
}

unsafe extern "C" fn host_capacity(o: *mut c_void) -> u64 {
    // SAFETY: a live host memory.
    ffi::guard_value(0, || unsafe { obj::<SdkHost>(o) }.host.capacity_bytes())
}
