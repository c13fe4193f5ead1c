//! The gather/scatter kernel: compiled with NVRTC for the device at first use, or loaded
//! from the checked-in PTX (`kernels/pages.ptx`, generated from `kernels/pages.ll`) when
//! NVRTC is missing or its output does not load.

use crate::driver::{Context, Stream, check, err};
use cudarc::driver::sys;
use drm_pagemap_core::{BackendError, BackendErrorKind};
use std::ffi::{CString, c_void};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};

/// The CUDA C source NVRTC compiles.
pub const KERNEL_SOURCE: &str = include_str!("../kernels/pages.cu");
/// The fallback PTX (ISA 6.0, sm_52: any driver since CUDA 9 JIT-compiles it).
pub const FALLBACK_PTX: &str = include_str!("../kernels/pages.ptx");

/// Gate word values (see `dpm_wait`): open, and open with the work after it cancelled.
pub(crate) const GATE_OPEN: u32 = 1;
/// The pre-fence failed: the copy kernel behind the gate copies nothing.
pub(crate) const GATE_ABORT: u32 = 2;

/// Threads per block of the copy kernel (8 warps, one 4 KiB item each).
pub const BLOCK_THREADS: u32 = 256;
/// Entries a small call passes to the kernel by value (`DPM_SMALL` in `pages.cu`).
pub const SMALL_ENTRIES: usize = 64;

/// The page lists of a small call, passed by value (layout of `dpm_small_lists`).
#[repr(C)]
pub(crate) struct SmallLists {
    pub addrs: [u64; SMALL_ENTRIES],
    pub pfns: [u32; SMALL_ENTRIES],
}
const MAX_BLOCKS: u64 = 1 << 20;

/// Where the kernel comes from (option `cuda.kernel`: `auto`, `nvrtc`, `ptx`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum KernelSource {
    /// NVRTC when it works, else the checked-in PTX.
    #[default]
    Auto,
    /// NVRTC only (fails without it).
    Nvrtc,
    /// The checked-in PTX only.
    Fallback,
}

/// The loaded module of one device.
pub(crate) struct Kernels {
    ctx: Arc<Context>,
    module: sys::CUmodule,
    copy: sys::CUfunction,
    /// `dpm_copy_small` (NVRTC builds; the fallback PTX has none).
    small: sys::CUfunction,
    spin: sys::CUfunction,
    wait: sys::CUfunction,
    zero: sys::CUfunction,
    /// "nvrtc (compute_90)" or "fallback ptx (why)".
    pub origin: String,
}

// SAFETY: module and function handles may be used from any thread.
unsafe impl Send for Kernels {}
// SAFETY: as above.
unsafe impl Sync for Kernels {}

impl Drop for Kernels {
    fn drop(&mut self) {
        if self.ctx.bind().is_ok() {
            // SAFETY: the module is ours; streams using it were synchronised by their owners.
            unsafe {
                sys::cuModuleUnload(self.module);
            }
        }
    }
}

/// NVRTC output per architecture, compiled once per process.
fn nvrtc_ptx(ctx: &Context) -> Result<(String, String), String> {
    type Compiled = Result<(String, String), String>;
    static CACHE: Mutex<Vec<(i32, Compiled)>> = Mutex::new(Vec::new());
    let cc = ctx
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
        .map_err(|e| e.to_string())?
        * 10
        + ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)
            .map_err(|e| e.to_string())?;
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, r)) = cache.iter().find(|(c, _)| *c == cc) {
        return r.clone();
    }
    let r = nvrtc_compile(ctx);
    cache.push((cc, r.clone()));
    r
}

fn nvrtc_compile(ctx: &Context) -> Result<(String, String), String> {
    // SAFETY: only tries to dlopen the candidate library names.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err("NVRTC not found".into());
    }
    let major = ctx
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
        .map_err(|e| e.to_string())?;
    let minor = ctx
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)
        .map_err(|e| e.to_string())?;
    let arch = format!("compute_{major}{minor}");
    let opts = cudarc::nvrtc::CompileOptions {
        options: vec![format!("--gpu-architecture={arch}")],
        name: Some("pages.cu".into()),
        ..Default::default()
    };
    let compiled = std::panic::catch_unwind(AssertUnwindSafe(|| {
        cudarc::nvrtc::compile_ptx_with_opts(KERNEL_SOURCE, opts)
    }))
    .map_err(|_| "NVRTC panicked (missing symbol?)".to_string())?;
    let ptx = compiled.map_err(|e| format!("NVRTC failed: {e:?}"))?;
    Ok((ptx.to_src(), arch))
}

fn load_ptx(ctx: &Arc<Context>, ptx: &str, origin: String) -> Result<Kernels, BackendError> {
    let text = CString::new(ptx)
        .map_err(|_| err(BackendErrorKind::Unsupported, "PTX contains a NUL byte"))?;
    ctx.bind()?;
    let mut module = std::ptr::null_mut();
    // SAFETY: `text` is NUL-terminated PTX; the module is unloaded in Drop.
    let r = unsafe { sys::cuModuleLoadData(&mut module, text.as_ptr() as *const c_void) };
    check("cuModuleLoadData", r, &origin)?;
    let mut k = Kernels {
        ctx: ctx.clone(),
        module,
        copy: std::ptr::null_mut(),
        small: std::ptr::null_mut(),
        spin: std::ptr::null_mut(),
        wait: std::ptr::null_mut(),
        zero: std::ptr::null_mut(),
        origin,
    };
    // SAFETY: the names are NUL-terminated; the module is loaded.
    unsafe {
        check(
            "cuModuleGetFunction",
            sys::cuModuleGetFunction(&mut k.copy, module, c"dpm_copy_pages".as_ptr()),
            "dpm_copy_pages",
        )?;
        check(
            "cuModuleGetFunction",
            sys::cuModuleGetFunction(&mut k.spin, module, c"dpm_spin".as_ptr()),
            "dpm_spin",
        )?;
        check(
            "cuModuleGetFunction",
            sys::cuModuleGetFunction(&mut k.wait, module, c"dpm_wait".as_ptr()),
            "dpm_wait",
        )?;
        check(
            "cuModuleGetFunction",
            sys::cuModuleGetFunction(&mut k.zero, module, c"dpm_zero".as_ptr()),
            "dpm_zero",
        )?;
        // Optional (small calls take dpm_copy_pages without it); looked up only where the PTX
        // defines it, so that no failing driver call is made (tools report those).
        if ptx.contains(".entry dpm_copy_small")
            && sys::cuModuleGetFunction(&mut k.small, module, c"dpm_copy_small".as_ptr())
                != sys::CUresult::CUDA_SUCCESS
        {
            k.small = std::ptr::null_mut();
        }
    }
    Ok(k)
}

impl Kernels {
    /// Loads the kernels into `ctx` from `source`.
    pub(crate) fn load(ctx: &Arc<Context>, source: KernelSource) -> Result<Kernels, BackendError> {
        let why = if source == KernelSource::Fallback {
            "requested".to_string()
        } else {
            let tried = nvrtc_ptx(ctx).and_then(|(ptx, arch)| {
                load_ptx(ctx, &ptx, format!("nvrtc ({arch})"))
                    .map_err(|e| format!("NVRTC output did not load: {e}"))
            });
            match tried {
                Ok(k) => return Ok(k),
                Err(why) if source == KernelSource::Nvrtc => {
                    return Err(err(BackendErrorKind::Unsupported, why));
                }
                Err(why) => why,
            }
        };
        load_ptx(ctx, FALLBACK_PTX, format!("fallback ptx ({why})"))
    }

    /// Queues the gather/scatter kernel on `stream`: `n_items` 4 KiB items; entry
    /// `item >> item_shift` has its own page at `own_base + pfns[e] * 4096` and the other
    /// side at `addrs[e]` (0: skipped). `to_own`: copy other -> own.
    ///
    /// # Safety
    /// `pfns` and `addrs` must be device-readable arrays covering every entry, and every
    /// address they name must be valid for the kernel's accesses until the work completes.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn launch_copy(
        &self,
        stream: &Stream,
        pfns: u64,
        addrs: u64,
        n_items: u64,
        own_base: u64,
        item_shift: u32,
        to_own: bool,
        abort: u64,
    ) -> Result<(), BackendError> {
        let warps_per_block = (BLOCK_THREADS / 32) as u64;
        let blocks = n_items.div_ceil(warps_per_block).clamp(1, MAX_BLOCKS) as u32;
        let mut a_pfns = pfns;
        let mut a_addrs = addrs;
        let mut a_n = n_items;
        let mut a_base = own_base;
        let mut a_shift = item_shift;
        let mut a_to_own = to_own as u32;
        let mut a_abort = abort;
        let mut params: [*mut c_void; 7] = [
            &mut a_pfns as *mut u64 as *mut c_void,
            &mut a_addrs as *mut u64 as *mut c_void,
            &mut a_n as *mut u64 as *mut c_void,
            &mut a_base as *mut u64 as *mut c_void,
            &mut a_shift as *mut u32 as *mut c_void,
            &mut a_to_own as *mut u32 as *mut c_void,
            &mut a_abort as *mut u64 as *mut c_void,
        ];
        // SAFETY: the parameters match the kernel's signature and outlive the call (the
        // driver copies them); the caller vouches for the addresses.
        let r = unsafe {
            sys::cuLaunchKernel(
                self.copy,
                blocks,
                1,
                1,
                BLOCK_THREADS,
                1,
                1,
                0,
                stream.raw,
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        };
        check("cuLaunchKernel", r, "dpm_copy_pages")
    }

    /// Whether small calls can pass their lists by value ([`Kernels::launch_copy_small`]).
    pub(crate) fn has_small(&self) -> bool {
        !self.small.is_null()
    }

    /// Queues the copy of a small call whose lists are `lists` (entries `0..n_items >>
    /// item_shift`), as [`Kernels::launch_copy`] with the lists by value. `Ok(false)`: this
    /// module has no small-call kernel (nothing queued).
    ///
    /// # Safety
    /// Every address the used entries name must be valid for the kernel's accesses until the
    /// work completes.
    pub(crate) unsafe fn launch_copy_small(
        &self,
        stream: &Stream,
        lists: &SmallLists,
        n_items: u64,
        own_base: u64,
        item_shift: u32,
        to_own: bool,
    ) -> Result<bool, BackendError> {
        if self.small.is_null() {
            return Ok(false);
        }
        let warps_per_block = (BLOCK_THREADS / 32) as u64;
        let blocks = n_items.div_ceil(warps_per_block).clamp(1, MAX_BLOCKS) as u32;
        let mut a_n = n_items;
        let mut a_base = own_base;
        let mut a_shift = item_shift;
        let mut a_to_own = to_own as u32;
        let mut params: [*mut c_void; 5] = [
            lists as *const SmallLists as *mut c_void,
            &mut a_n as *mut u64 as *mut c_void,
            &mut a_base as *mut u64 as *mut c_void,
            &mut a_shift as *mut u32 as *mut c_void,
            &mut a_to_own as *mut u32 as *mut c_void,
        ];
        // SAFETY: the parameters match the kernel's signature (the struct by value, laid out
        // as in pages.cu) and outlive the call (the driver copies them); the caller vouches
        // for the addresses.
        let r = unsafe {
            sys::cuLaunchKernel(
                self.small,
                blocks,
                1,
                1,
                BLOCK_THREADS,
                1,
                1,
                0,
                stream.raw,
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        };
        check("cuLaunchKernel", r, "dpm_copy_small").map(|()| true)
    }

    /// Queues a kernel that holds `stream` until the word at `flag` is non-zero (or
    /// `max_cycles` SM cycles pass; 0: no limit).
    ///
    /// # Safety
    /// `flag` must be the device address of a pinned, mapped host word that stays valid until
    /// the kernel has run.
    pub(crate) unsafe fn launch_wait(
        &self,
        stream: &Stream,
        flag: u64,
        max_cycles: u64,
    ) -> Result<(), BackendError> {
        let mut a_flag = flag;
        let mut a_max = max_cycles;
        let mut params: [*mut c_void; 2] = [
            &mut a_flag as *mut u64 as *mut c_void,
            &mut a_max as *mut u64 as *mut c_void,
        ];
        // SAFETY: two u64 parameters, matching the kernel; the caller vouches for `flag`.
        let r = unsafe {
            sys::cuLaunchKernel(
                self.wait,
                1,
                1,
                1,
                1,
                1,
                1,
                0,
                stream.raw,
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        };
        check("cuLaunchKernel", r, "dpm_wait")
    }

    /// Queues a kernel that zeroes `bytes` (a multiple of 16) at device address `dst`.
    ///
    /// # Safety
    /// `[dst, dst + bytes)` must be device memory the stream's work may write.
    pub(crate) unsafe fn launch_zero(
        &self,
        stream: &Stream,
        dst: u64,
        bytes: u64,
    ) -> Result<(), BackendError> {
        let blocks = (bytes / 16)
            .div_ceil(BLOCK_THREADS as u64)
            .clamp(1, 4 * 132 * 8) as u32;
        let mut a_dst = dst;
        let mut a_bytes = bytes;
        let mut params: [*mut c_void; 2] = [
            &mut a_dst as *mut u64 as *mut c_void,
            &mut a_bytes as *mut u64 as *mut c_void,
        ];
        // SAFETY: two u64 parameters, matching the kernel; the caller vouches for the range.
        let r = unsafe {
            sys::cuLaunchKernel(
                self.zero,
                blocks,
                1,
                1,
                BLOCK_THREADS,
                1,
                1,
                0,
                stream.raw,
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        };
        check("cuLaunchKernel", r, "dpm_zero")
    }

    /// Queues a kernel that keeps `stream` busy for `ns` nanoseconds.
    pub(crate) fn launch_spin(&self, stream: &Stream, ns: u64) -> Result<(), BackendError> {
        let mut a_ns = ns;
        let mut params: [*mut c_void; 1] = [&mut a_ns as *mut u64 as *mut c_void];
        // SAFETY: one u64 parameter, matching the kernel; it touches no memory.
        let r = unsafe {
            sys::cuLaunchKernel(
                self.spin,
                1,
                1,
                1,
                1,
                1,
                1,
                0,
                stream.raw,
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        };
        check("cuLaunchKernel", r, "dpm_spin")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_lists_match_the_kernel_source() {
        assert!(KERNEL_SOURCE.contains(&format!("#define DPM_SMALL {SMALL_ENTRIES}\n")));
        assert_eq!(std::mem::size_of::<SmallLists>(), SMALL_ENTRIES * 12);
        assert_eq!(std::mem::align_of::<SmallLists>(), 8);
        assert!(
            !FALLBACK_PTX.contains("dpm_copy_small"),
            "the fallback PTX has no small-call kernel (loading treats it as optional)"
        );
    }
}
