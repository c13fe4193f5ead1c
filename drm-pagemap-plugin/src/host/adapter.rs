//! A plug-in's tables as the core's traits: [`Backend`], [`HostMemory`], [`PagemapOps`] and
//! [`DevmemOps`]. Each object holds its backend's handle, so the plug-in's `destroy` of the
//! backend runs after the last pagemap, host memory and fence from it is gone.

use super::{Plugin, services};
use crate::abi::*;
use crate::fence;
use crate::ffi;
use drm_pagemap_core::{
    Backend, BackendConfig, BackendError, BackendErrorKind, CopyCaps, CopyRequest, DeviceId,
    DeviceInfo, DeviceName, DevmemBacking, DevmemOps, Direction, DmaAddr, Fence, HostFenceWait,
    HostFrame, HostMemory, NativeFenceKind, NativeFenceKinds, OwnerId, PageSize, Pagemap,
    PagemapOps, PagemapSpec, Pfn,
};
use std::any::Any;
use std::ffi::c_void;
use std::sync::Arc;

/// The plug-in's backend object; destroyed when the last holder goes.
struct BackendHandle {
    obj: *mut c_void,
    ops: DppBackendOps,
    _plugin: Arc<Plugin>,
}

// SAFETY: the ABI requires every backend entry to accept calls from any thread.
unsafe impl Send for BackendHandle {}
// SAFETY: as above.
unsafe impl Sync for BackendHandle {}

impl Drop for BackendHandle {
    fn drop(&mut self) {
        if let Some(d) = self.ops.destroy {
            // SAFETY: the last holder: destroyed once, nothing from it is alive.
            unsafe { d(self.obj) };
        }
    }
}

/// Reads an operations table (`struct_size` first) and checks its required entries.
///
/// # Safety
/// `ops` is null or points to a table of at least its `struct_size` bytes.
unsafe fn table<T: Copy>(
    ops: *const T,
    what: &str,
    required: impl Fn(&T) -> Option<&'static str>,
) -> Result<T, BackendError> {
    if ops.is_null() {
        return Err(unavailable(format!("{what}: the operations table is null")));
    }
    // SAFETY: readable (the caller's guarantee); `struct_size` is the first field.
    let size = unsafe { *ops.cast::<u32>() };
    // SAFETY: `size` bytes readable.
    let t = unsafe { read_table(ops, size) };
    match required(&t) {
        Some(e) => Err(unavailable(format!(
            "{what}: a required entry missing: `{e}`"
        ))),
        None => Ok(t),
    }
}

fn unavailable(message: String) -> BackendError {
    BackendError::new(BackendErrorKind::Unavailable, message)
}

/// The first of `entries` that is absent.
fn first_missing(entries: &[(&'static str, bool)]) -> Option<&'static str> {
    entries
        .iter()
        .find(|(_, present)| !present)
        .map(|(n, _)| *n)
}

/// Opens the plug-in's backend with `config`.
pub(super) fn open(
    plugin: Arc<Plugin>,
    open: unsafe extern "C" fn(
        *const DppHostServices,
        *const DppConfig,
        *mut DppBackend,
        *mut DppError,
    ) -> i32,
    config: &BackendConfig,
) -> Result<Box<dyn Backend>, BackendError> {
    let what: Arc<str> = Arc::from(format!("plug-in {}", plugin.name()));
    let options: Vec<(String, String)> = config
        .options
        .iter()
        .map(|o| (o.key.clone(), o.value.clone()))
        .collect();
    let raw_opts: Vec<DppOption> = options
        .iter()
        .map(|(k, v)| DppOption {
            key: k.as_ptr().cast(),
            key_len: k.len(),
            value: v.as_ptr().cast(),
            value_len: v.len(),
        })
        .collect();
    let mut flags = 0;
    if config.devices.is_some() {
        flags |= DPP_CONFIG_HAS_DEVICES;
    }
    if config.device_capacity.is_some() {
        flags |= DPP_CONFIG_HAS_DEVICE_CAPACITY;
    }
    if config.host_capacity.is_some() {
        flags |= DPP_CONFIG_HAS_HOST_CAPACITY;
    }
    let c = DppConfig {
        struct_size: size_of_table::<DppConfig>(),
        flags,
        devices: config.devices.unwrap_or(0) as u64,
        device_capacity: config.device_capacity.unwrap_or(0),
        host_capacity: config.host_capacity.unwrap_or(0),
        options: raw_opts.as_ptr(),
        option_count: raw_opts.len(),
        options_version: config.options.version(),
        reserved: 0,
    };
    let mut out = DppBackend {
        obj: std::ptr::null_mut(),
        ops: std::ptr::null(),
    };
    let mut err = DppError::empty();
    // SAFETY: a checked entry; every pointer is valid for the call.
    let s = unsafe { open(services::services(), &c, &mut out, &mut err) };
    if s != DPP_OK {
        // SAFETY: the plug-in's error, valid now.
        return Err(unsafe { ffi::error_from_ffi(s, &err, &format!("{what}: open")) });
    }
    // SAFETY: the plug-in's table (the ABI).
    let ops = unsafe {
        table(out.ops, &format!("{what}: backend"), |t: &DppBackendOps| {
            first_missing(&[
                ("destroy", t.destroy.is_some()),
                ("device_count", t.device_count.is_some()),
                ("device_info", t.device_info.is_some()),
                ("host_memory", t.host_memory.is_some()),
                ("create_pagemap", t.create_pagemap.is_some()),
            ])
        })
    }?;
    let handle = Arc::new(BackendHandle {
        obj: out.obj,
        ops,
        _plugin: plugin.clone(),
    });
    let mut hm = DppHostMemory {
        obj: std::ptr::null_mut(),
        ops: std::ptr::null(),
    };
    // SAFETY: a checked entry on the live backend.
    let s = unsafe { handle.ops.host_memory.unwrap_unchecked()(handle.obj, &mut hm, &mut err) };
    if s != DPP_OK {
        // SAFETY: the plug-in's error, valid now.
        return Err(unsafe { ffi::error_from_ffi(s, &err, &format!("{what}: host_memory")) });
    }
    // SAFETY: the plug-in's table (the ABI).
    let hops = unsafe {
        table(
            hm.ops,
            &format!("{what}: host memory"),
            |t: &DppHostMemoryOps| {
                first_missing(&[
                    ("destroy", t.destroy.is_some()),
                    ("alloc_frames", t.alloc_frames.is_some()),
                    ("free_frames", t.free_frames.is_some()),
                    ("read", t.read.is_some()),
                    ("write", t.write.is_some()),
                    ("zero", t.zero.is_some()),
                    ("map_frames", t.map_frames.is_some()),
                    ("unmap_frames", t.unmap_frames.is_some()),
                    ("capacity_bytes", t.capacity_bytes.is_some()),
                ])
            },
        )
    }?;
    let host = Arc::new(PluginHost {
        obj: hm.obj,
        ops: hops,
        what: what.clone(),
        _backend: handle.clone(),
    });
    Ok(Box::new(PluginBackend {
        name: plugin.name(),
        handle,
        host,
        what,
    }))
}

/// A plug-in's backend as a core [`Backend`].
pub struct PluginBackend {
    name: &'static str,
    handle: Arc<BackendHandle>,
    host: Arc<PluginHost>,
    what: Arc<str>,
}

impl Backend for PluginBackend {
    fn name(&self) -> &str {
        self.name
    }

    fn device_count(&self) -> usize {
        let f = self.handle.ops.device_count;
        // SAFETY: a checked entry on the live backend.
        f.map_or(0, |f| unsafe { f(self.handle.obj) } as usize)
    }

    fn device_info(&self, index: usize) -> Option<DeviceInfo> {
        let f = self.handle.ops.device_info?;
        let mut out = DppDeviceInfo {
            id: 0,
            name_len: 0,
            name: [0; 63],
            memory_bytes: 0,
        };
        let index = u32::try_from(index).ok()?;
        // SAFETY: a checked entry on the live backend; `out` is writable.
        if unsafe { f(self.handle.obj, index, &mut out) } != DPP_OK {
            return None;
        }
        let len = (out.name_len as usize).min(63);
        Some(DeviceInfo {
            id: DeviceId(out.id),
            name: DeviceName::new(&String::from_utf8_lossy(&out.name[..len])),
            memory_bytes: out.memory_bytes,
        })
    }

    fn host_memory(&self) -> Arc<dyn HostMemory> {
        self.host.clone()
    }

    fn create_pagemap(&self, spec: &PagemapSpec) -> Result<Pagemap, BackendError> {
        let s = DppPagemapSpec {
            id: u32::from(spec.id.0),
            device: spec.device.0,
            owner: spec.owner.map_or(0, |o| o.0),
            has_owner: u32::from(spec.owner.is_some()),
            capacity_bytes: spec.capacity_bytes,
        };
        let mut out = DppPagemap {
            obj: std::ptr::null_mut(),
            pagemap_ops: std::ptr::null(),
            devmem_ops: std::ptr::null(),
            owner: 0,
            device: 0,
            name: std::ptr::null(),
        };
        let mut err = DppError::empty();
        // SAFETY: a checked entry on the live backend; every pointer is valid for the call.
        let st = unsafe {
            self.handle.ops.create_pagemap.unwrap_unchecked()(
                self.handle.obj,
                &s,
                &mut out,
                &mut err,
            )
        };
        if st != DPP_OK {
            // SAFETY: the plug-in's error, valid now.
            return Err(unsafe {
                ffi::error_from_ffi(
                    st,
                    &err,
                    &format!("{}: create_pagemap of {}", self.what, spec.id),
                )
            });
        }
        let what = format!("{}: {}", self.what, spec.id);
        // SAFETY: the plug-in's table (the ABI).
        let pops = unsafe {
            table(out.pagemap_ops, &what, |t: &DppPagemapOps| {
                first_missing(&[
                    ("destroy", t.destroy.is_some()),
                    ("device_map", t.device_map.is_some()),
                    ("device_unmap", t.device_unmap.is_some()),
                ])
            })
        }?;
        // SAFETY: as above. On a failure the pagemap is destroyed (its table has `destroy`).
        let dops = unsafe {
            table(out.devmem_ops, &what, |t: &DppDevmemOps| {
                first_missing(&[
                    ("allocate", t.allocate.is_some()),
                    ("populate_devmem_pfn", t.populate_devmem_pfn.is_some()),
                    ("copy_to_devmem", t.copy_to_devmem.is_some()),
                    ("copy_to_ram", t.copy_to_ram.is_some()),
                    ("devmem_release", t.devmem_release.is_some()),
                    ("capacity_bytes", t.capacity_bytes.is_some()),
                ])
            })
        };
        let dops = match dops {
            Ok(d) => d,
            Err(e) => {
                // SAFETY: checked present; the object is destroyed once, unused.
                unsafe { pops.destroy.unwrap_unchecked()(out.obj) };
                return Err(e);
            }
        };
        // SAFETY: null or the plug-in's string, valid while the object lives (now).
        let name = unsafe { ffi::c_text(out.name) }
            .unwrap_or_else(|| format!("{} {}", self.name, spec.id));
        let caps = match dops.caps {
            None => CopyCaps::CONSERVATIVE,
            Some(f) => {
                let mut c = DppCopyCaps::default();
                // SAFETY: a present entry on the live pagemap; `c` is writable.
                unsafe { f(out.obj, &mut c) };
                caps_of(&c)
            }
        };
        let pm = Arc::new(PluginPagemap {
            obj: out.obj,
            pops,
            dops,
            caps,
            what: Arc::from(what),
            backend: self.handle.clone(),
            plugin: self.name,
            pagemap: spec.id.0,
            device: out.device,
        });
        Ok(Pagemap::new(
            spec.id,
            OwnerId(out.owner),
            DeviceId(out.device),
            name,
            pm.clone(),
            pm,
        ))
    }

    fn can_access_peer(&self, a: DeviceId, b: DeviceId) -> bool {
        match self.handle.ops.can_access_peer {
            // SAFETY: a present entry on the live backend.
            Some(f) => (unsafe { f(self.handle.obj, a.0, b.0) }) != 0,
            None => false,
        }
    }
}

/// The core caps from the ABI's.
fn caps_of(c: &DppCopyCaps) -> CopyCaps {
    let kinds = c.native_kinds[..(c.native_kind_count as usize).min(NativeFenceKinds::CAPACITY)]
        .iter()
        .fold(NativeFenceKinds::NONE, |k, n| k.with(NativeFenceKind(*n)));
    CopyCaps {
        max_command_bytes: (c.max_command_bytes != 0).then_some(c.max_command_bytes),
        native_fence_kinds: kinds,
        host_fences: match c.host_fences {
            1 => HostFenceWait::InQueue,
            2 => HostFenceWait::Deferred,
            _ => HostFenceWait::Blocking,
        },
        in_order: c.in_order != 0,
        batch_bytes_hint: (c.batch_bytes_hint != 0).then_some(c.batch_bytes_hint),
    }
}

/// A plug-in's host memory as a core [`HostMemory`].
struct PluginHost {
    obj: *mut c_void,
    ops: DppHostMemoryOps,
    what: Arc<str>,
    _backend: Arc<BackendHandle>,
}

// SAFETY: the ABI requires every host memory entry to accept calls from any thread.
unsafe impl Send for PluginHost {}
// SAFETY: as above.
unsafe impl Sync for PluginHost {}

impl Drop for PluginHost {
    fn drop(&mut self) {
        // SAFETY: checked present; destroyed once, by its last holder.
        unsafe { self.ops.destroy.unwrap_unchecked()(self.obj) };
    }
}

impl PluginHost {
    /// An infallible trait entry failed: the plug-in broke its contract. The trait has no way
    /// to report it, so it is loud: the core rolls the operation back and the panic reaches
    /// the caller with the plug-in's message.
    /// The plug-in's failure of `entry` as a typed error naming the plug-in.
    fn error_of(&self, entry: &str, status: i32, err: &DppError) -> BackendError {
        // SAFETY: the plug-in's error, valid now.
        unsafe { ffi::error_from_ffi(status, err, &format!("{}: {entry}", self.what)) }
    }
}

impl HostMemory for PluginHost {
    fn alloc_frames(&self, page_size: PageSize, out: &mut [HostFrame]) -> Result<(), BackendError> {
        let mut err = DppError::empty();
        // SAFETY: a checked entry; `HostFrame` is `repr(transparent)` over `u64`.
        let s = unsafe {
            self.ops.alloc_frames.unwrap_unchecked()(
                self.obj,
                page_size.bytes(),
                out.as_mut_ptr().cast(),
                out.len(),
                &mut err,
            )
        };
        if s == DPP_OK {
            Ok(())
        } else {
            // SAFETY: the plug-in's error, valid now.
            Err(unsafe { ffi::error_from_ffi(s, &err, &format!("{}: alloc_frames", self.what)) })
        }
    }

    fn free_frames(&self, frames: &[HostFrame], page_size: PageSize) {
        // SAFETY: a checked entry; `HostFrame` is `repr(transparent)` over `u64`.
        unsafe {
            self.ops.free_frames.unwrap_unchecked()(
                self.obj,
                frames.as_ptr().cast(),
                frames.len(),
                page_size.bytes(),
            )
        };
    }

    fn read(&self, frame: HostFrame, offset: usize, buf: &mut [u8]) -> Result<(), BackendError> {
        let mut err = DppError::empty();
        // SAFETY: a checked entry; `buf` is writable for its length.
        let s = unsafe {
            self.ops.read.unwrap_unchecked()(
                self.obj,
                frame.0,
                offset,
                buf.as_mut_ptr(),
                buf.len(),
                &mut err,
            )
        };
        if s != DPP_OK {
            return Err(self.error_of("read", s, &err));
        }
        Ok(())
    }

    fn write(&self, frame: HostFrame, offset: usize, data: &[u8]) -> Result<(), BackendError> {
        let mut err = DppError::empty();
        // SAFETY: a checked entry; `data` is readable for its length.
        let s = unsafe {
            self.ops.write.unwrap_unchecked()(
                self.obj,
                frame.0,
                offset,
                data.as_ptr(),
                data.len(),
                &mut err,
            )
        };
        if s != DPP_OK {
            return Err(self.error_of("write", s, &err));
        }
        Ok(())
    }

    fn zero(&self, frame: HostFrame, page_size: PageSize) -> Result<(), BackendError> {
        let mut err = DppError::empty();
        // SAFETY: a checked entry.
        let s = unsafe {
            self.ops.zero.unwrap_unchecked()(self.obj, frame.0, page_size.bytes(), &mut err)
        };
        if s != DPP_OK {
            return Err(self.error_of("zero", s, &err));
        }
        Ok(())
    }

    fn map_frames(
        &self,
        device: DeviceId,
        frames: &[HostFrame],
        page_size: PageSize,
        dir: Direction,
        out: &mut [DmaAddr],
    ) -> Result<(), BackendError> {
        if frames.len() != out.len() {
            return Err(ffi::bad_argument(
                "map_frames: frames and out differ in length",
            ));
        }
        let mut err = DppError::empty();
        // SAFETY: a checked entry; both slices are `repr(transparent)` over `u64`, `n` long.
        let s = unsafe {
            self.ops.map_frames.unwrap_unchecked()(
                self.obj,
                device.0,
                frames.as_ptr().cast(),
                frames.len(),
                page_size.bytes(),
                ffi::direction_code(dir),
                out.as_mut_ptr().cast(),
                &mut err,
            )
        };
        if s == DPP_OK {
            Ok(())
        } else {
            // SAFETY: the plug-in's error, valid now.
            Err(unsafe {
                ffi::error_from_ffi(s, &err, &format!("{}: map_frames for {device}", self.what))
            })
        }
    }

    fn unmap_frames(
        &self,
        device: DeviceId,
        addrs: &[DmaAddr],
        page_size: PageSize,
        dir: Direction,
    ) {
        // SAFETY: a checked entry; `DmaAddr` is `repr(transparent)` over `u64`.
        unsafe {
            self.ops.unmap_frames.unwrap_unchecked()(
                self.obj,
                device.0,
                addrs.as_ptr().cast(),
                addrs.len(),
                page_size.bytes(),
                ffi::direction_code(dir),
            )
        };
    }

    fn capacity_bytes(&self) -> u64 {
        // SAFETY: a checked entry.
        unsafe { self.ops.capacity_bytes.unwrap_unchecked()(self.obj) }
    }
}

/// A plug-in's pagemap as the core's [`PagemapOps`] and [`DevmemOps`].
struct PluginPagemap {
    obj: *mut c_void,
    pops: DppPagemapOps,
    dops: DppDevmemOps,
    caps: CopyCaps,
    what: Arc<str>,
    backend: Arc<BackendHandle>,
    /// The plug-in's name, the pagemap's id and its device's (for `tracing` fields).
    plugin: &'static str,
    pagemap: u8,
    device: u32,
}

/// The `tracing` target of the host's calls into plug-ins.
const TARGET: &str = "drm_pagemap::plugin";

// SAFETY: the ABI requires every pagemap entry to accept calls from any thread.
unsafe impl Send for PluginPagemap {}
// SAFETY: as above.
unsafe impl Sync for PluginPagemap {}

impl Drop for PluginPagemap {
    fn drop(&mut self) {
        // SAFETY: checked present; destroyed once, by its last holder.
        unsafe { self.pops.destroy.unwrap_unchecked()(self.obj) };
    }
}

impl PluginPagemap {
    fn error(&self, status: i32, err: &DppError, entry: &str) -> BackendError {
        // SAFETY: the plug-in's error, valid now.
        unsafe { ffi::error_from_ffi(status, err, &format!("{}: {entry}", self.what)) }
    }

    /// What imported fences keep alive: the backend (and so the library).
    fn keep(&self) -> Option<Arc<dyn Any + Send + Sync>> {
        Some(self.backend.clone())
    }

    fn raw_backing(b: &DevmemBacking) -> DppDevmemBacking {
        DppDevmemBacking {
            cookie: b.cookie,
            npages: b.npages as u64,
            page_size: b.page_size.bytes(),
            pre_migrate_fence: DppFence::NONE,
        }
    }

    /// A copy call into the plug-in inside a `debug` span `submit` (target
    /// `drm_pagemap::plugin`: plugin, pagemap, device, op, pages, bytes, outcome `queued`
    /// or `failed`).
    fn copy(&self, req: &CopyRequest<'_>, to_ram: bool) -> Result<Fence, BackendError> {
        // Lazy fields: nothing is computed or formatted unless a subscriber wants the span.
        let span = tracing::debug_span!(
            target: TARGET,
            "submit",
            plugin = self.plugin,
            pagemap = self.pagemap,
            device = self.device,
            op = if to_ram { "copy_to_ram" } else { "copy_to_devmem" },
            pages = req.pages.len(),
            bytes = req.addrs.iter().filter(|a| !a.is_none()).count() as u64
                * req.page_size.bytes(),
            outcome = tracing::field::Empty,
        );
        let _in = span.enter();
        let r = self.copy_untraced(req, to_ram);
        match &r {
            Ok(_) => {
                span.record("outcome", "queued");
            }
            Err(e) => {
                span.record("outcome", "failed");
                tracing::debug!(target: TARGET, error = %e, "copy refused");
            }
        }
        r
    }

    fn copy_untraced(&self, req: &CopyRequest<'_>, to_ram: bool) -> Result<Fence, BackendError> {
        let entry = if to_ram {
            "copy_to_ram"
        } else {
            "copy_to_devmem"
        };
        if req.pages.len() != req.addrs.len() {
            return Err(ffi::bad_argument(&format!(
                "{entry}: pages and addrs differ in length"
            )));
        }
        let pre = req.pre_fence.map(fence::export);
        let r = DppCopyRequest {
            page_size: req.page_size.bytes(),
            pages: req.pages.as_ptr().cast(),
            addrs: req.addrs.as_ptr().cast(),
            count: req.pages.len(),
            pre_fence: pre
                .as_ref()
                .map_or(std::ptr::null(), |p| p as *const DppFence),
        };
        let mut out = DppFence::NONE;
        let mut err = DppError::empty();
        let f = if to_ram {
            self.dops.copy_to_ram
        } else {
            self.dops.copy_to_devmem
        };
        // SAFETY: a checked entry; every pointer is valid for the call.
        let s = unsafe { f.unwrap_unchecked()(self.obj, &r, &mut out, &mut err) };
        if let Some(p) = pre {
            // SAFETY: our exported reference, released once (the plug-in retained its own).
            unsafe { fence::EXPORTED_OPS.release.unwrap_unchecked()(p.obj) };
        }
        if s != DPP_OK {
            return Err(self.error(s, &err, entry));
        }
        // SAFETY: the plug-in's new reference (the ABI).
        unsafe { fence::import(out, self.what.clone(), self.keep()) }
    }
}

impl PluginPagemap {
    fn allocate_untraced(
        &self,
        npages: usize,
        page_size: PageSize,
    ) -> Result<DevmemBacking, BackendError> {
        let mut out = DppDevmemBacking {
            cookie: 0,
            npages: 0,
            page_size: 0,
            pre_migrate_fence: DppFence::NONE,
        };
        let mut err = DppError::empty();
        // SAFETY: a checked entry; `out` is writable.
        let s = unsafe {
            self.dops.allocate.unwrap_unchecked()(
                self.obj,
                npages as u64,
                page_size.bytes(),
                &mut out,
                &mut err,
            )
        };
        if s != DPP_OK {
            return Err(self.error(s, &err, "allocate"));
        }
        let pre_migrate_fence = if out.pre_migrate_fence.obj.is_null() {
            None
        } else {
            // SAFETY: the plug-in's new reference (the ABI).
            match unsafe { fence::import(out.pre_migrate_fence, self.what.clone(), self.keep()) } {
                Ok(f) => Some(f),
                Err(e) => {
                    let raw = DppDevmemBacking {
                        pre_migrate_fence: DppFence::NONE,
                        ..out
                    };
                    // SAFETY: a checked entry: the allocation is given back, unused.
                    unsafe { self.dops.devmem_release.unwrap_unchecked()(self.obj, &raw) };
                    return Err(e);
                }
            }
        };
        Ok(DevmemBacking {
            cookie: out.cookie,
            npages,
            page_size,
            pre_migrate_fence,
        })
    }
}

impl PagemapOps for PluginPagemap {
    fn device_map(
        &self,
        device: DeviceId,
        pfns: &[Pfn],
        page_size: PageSize,
        dir: Direction,
        out: &mut [DmaAddr],
    ) -> Result<(), BackendError> {
        if pfns.len() != out.len() {
            return Err(ffi::bad_argument(
                "device_map: pfns and out differ in length",
            ));
        }
        let mut err = DppError::empty();
        // SAFETY: a checked entry; `Pfn` / `DmaAddr` are `repr(transparent)`, `n` long.
        let s = unsafe {
            self.pops.device_map.unwrap_unchecked()(
                self.obj,
                device.0,
                pfns.as_ptr().cast(),
                pfns.len(),
                page_size.bytes(),
                ffi::direction_code(dir),
                out.as_mut_ptr().cast(),
                &mut err,
            )
        };
        if s == DPP_OK {
            Ok(())
        } else {
            Err(self.error(s, &err, "device_map"))
        }
    }

    fn device_unmap(
        &self,
        device: DeviceId,
        addrs: &[DmaAddr],
        page_size: PageSize,
        dir: Direction,
    ) {
        // SAFETY: a checked entry; `DmaAddr` is `repr(transparent)`.
        unsafe {
            self.pops.device_unmap.unwrap_unchecked()(
                self.obj,
                device.0,
                addrs.as_ptr().cast(),
                addrs.len(),
                page_size.bytes(),
                ffi::direction_code(dir),
            )
        };
    }
}

impl DevmemOps for PluginPagemap {
    fn allocate(&self, npages: usize, page_size: PageSize) -> Result<DevmemBacking, BackendError> {
        let r = self.allocate_untraced(npages, page_size);
        tracing::debug!(
            target: TARGET,
            plugin = self.plugin,
            pagemap = self.pagemap,
            device = self.device,
            op = "allocate",
            pages = npages,
            bytes = npages as u64 * page_size.bytes(),
            outcome = if r.is_ok() { "allocated" } else { "failed" },
            error = r.as_ref().err().map(tracing::field::display),
            "allocate"
        );
        r
    }

    fn populate_devmem_pfn(
        &self,
        backing: &DevmemBacking,
        out: &mut [Pfn],
    ) -> Result<(), BackendError> {
        let raw = Self::raw_backing(backing);
        let mut err = DppError::empty();
        // SAFETY: a checked entry; `Pfn` is `repr(transparent)`; `out` is writable.
        let s = unsafe {
            self.dops.populate_devmem_pfn.unwrap_unchecked()(
                self.obj,
                &raw,
                out.as_mut_ptr().cast(),
                out.len(),
                &mut err,
            )
        };
        if s == DPP_OK {
            Ok(())
        } else {
            Err(self.error(s, &err, "populate_devmem_pfn"))
        }
    }

    fn copy_to_devmem(&self, req: &CopyRequest<'_>) -> Result<Fence, BackendError> {
        self.copy(req, false)
    }

    fn copy_to_ram(&self, req: &CopyRequest<'_>) -> Result<Fence, BackendError> {
        self.copy(req, true)
    }

    fn devmem_release(&self, backing: DevmemBacking) {
        let raw = Self::raw_backing(&backing);
        // SAFETY: a checked entry.
        unsafe { self.dops.devmem_release.unwrap_unchecked()(self.obj, &raw) };
    }

    fn devmem_release_many(&self, backings: &[DevmemBacking]) {
        match self.dops.devmem_release_many {
            Some(f) => {
                let raw: Vec<DppDevmemBacking> = backings.iter().map(Self::raw_backing).collect();
                // SAFETY: a present entry; the array is valid for the call.
                unsafe { f(self.obj, raw.as_ptr(), raw.len()) };
            }
            None => {
                for b in backings {
                    self.devmem_release(b.clone());
                }
            }
        }
    }

    fn devmem_release_unused(&self, backing: DevmemBacking) {
        match self.dops.devmem_release_unused {
            Some(f) => {
                let raw = Self::raw_backing(&backing);
                // SAFETY: a present entry.
                unsafe { f(self.obj, &raw) };
            }
            None => self.devmem_release(backing),
        }
    }

    fn capacity_bytes(&self) -> u64 {
        // SAFETY: a checked entry.
        unsafe { self.dops.capacity_bytes.unwrap_unchecked()(self.obj) }
    }

    fn caps(&self) -> CopyCaps {
        self.caps
    }
}
