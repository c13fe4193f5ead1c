//! The gather/scatter kernel: compiled with NVRTC for the device at first use, or loaded
//! from the checked-in PTX (`kernels/pages.ptx`, generated from `kernels/pages.ll`) when
//! NVRTC is missing or its output does not load.

use crate::driver::{Attribute, Context, DriverResult, Function, Module, Stream, err, nvrtc};
use drm_pagemap_core::{BackendError, BackendErrorKind};
use std::ffi::{CString, c_void};
use std::sync::{Arc, Mutex};

/// The CUDA C source NVRTC compiles.
pub(crate) const KERNEL_SOURCE: &str = include_str!("../kernels/pages.cu");
/// The fallback PTX (ISA 6.0, sm_52: any driver since CUDA 9 JIT-compiles it).
pub(crate) const FALLBACK_PTX: &str = include_str!("../kernels/pages.ptx");

/// Gate word values (see `dpm_wait`): open, and open with the work after it cancelled.
#[cfg(feature = "internals")]
pub(crate) const GATE_OPEN: u32 = 1;
/// The pre-fence failed: the copy kernel behind the gate copies nothing.
pub(crate) const GATE_ABORT: u32 = 2;

/// Threads per block of the copy kernel (8 warps, one 4 KiB item each).
pub(crate) const BLOCK_THREADS: u32 = 256;
/// Threads of the ring's persistent kernel (`DPM_RING_THREADS` in `pages.cu`): one block,
/// 16 warps, so a 64 KiB copy has all sixteen 4 KiB items in flight at once.
pub(crate) const RING_THREADS: u32 = 512;
/// Entries a small call passes to the kernel by value (`DPM_SMALL` in `pages.cu`).
pub(crate) const SMALL_ENTRIES: usize = 64;

/// The page lists of a small call, passed by value (layout of `dpm_small_lists`).
#[repr(C)]
pub(crate) struct SmallLists {
    pub addrs: [u64; SMALL_ENTRIES],
    pub pfns: [u32; SMALL_ENTRIES],
}
const MAX_BLOCKS: u64 = 1 << 20;
/// The multiprocessor count assumed when the device does not report one (an H100's).
pub(crate) const FALLBACK_SM_COUNT: u32 = 132;

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
    // INVARIANT: the functions are kernels of `_module`, which this value keeps loaded (it
    // unloads when this value drops, functions and all), in the device's context.
    copy: Function,
    /// `dpm_copy_pages_bulk` (NVRTC builds for sm_90 and later: Hopper's bulk copies).
    bulk: Option<Function>,
    /// `dpm_copy_small` (NVRTC builds; the fallback PTX has none).
    small: Option<Function>,
    /// `dpm_ring`, the ring's persistent kernel (both sources have it; looked up only where
    /// the PTX defines it, as `small`).
    ring: Option<Function>,
    // Looked up whatever the features; launched only by the `internals` hooks.
    #[cfg_attr(not(feature = "internals"), allow(dead_code))]
    spin: Function,
    #[cfg_attr(not(feature = "internals"), allow(dead_code))]
    wait: Function,
    zero: Function,
    /// Kept loaded for the functions above.
    _module: Module,
    /// Most blocks of a zeroing launch: 8 per multiprocessor, 4 times over.
    zero_max_blocks: u64,
    /// "nvrtc (compute_90)" or "fallback ptx (why)".
    pub origin: String,
}

/// NVRTC output per architecture, compiled once per process.
fn nvrtc_ptx(ctx: &Context) -> Result<(String, String), String> {
    type Compiled = Result<(String, String), String>;
    static CACHE: Mutex<Vec<(i32, Compiled)>> = Mutex::new(Vec::new());
    let cc = ctx
        .attribute(Attribute::ComputeCapabilityMajor)
        .map_err(|e| e.to_string())?
        * 10
        + ctx
            .attribute(Attribute::ComputeCapabilityMinor)
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
    if !nvrtc::available() {
        return Err("NVRTC not found".into());
    }
    let major = ctx
        .attribute(Attribute::ComputeCapabilityMajor)
        .map_err(|e| e.to_string())?;
    let minor = ctx
        .attribute(Attribute::ComputeCapabilityMinor)
        .map_err(|e| e.to_string())?;
    let arch = format!("compute_{major}{minor}");
    let ptx = nvrtc::compile(KERNEL_SOURCE, "pages.cu", &arch)?;
    Ok((ptx, arch))
}

fn load_ptx(
    ctx: &Arc<Context>,
    ptx: &str,
    origin: String,
    sm_count: u32,
) -> Result<Kernels, BackendError> {
    let text = CString::new(ptx)
        .map_err(|_| err(BackendErrorKind::Unsupported, "PTX contains a NUL byte"))?;
    ctx.bind()?;
    // Unloaded when it drops: also right here, if a lookup below fails.
    let module = Module::load_data(ctx, &text).about(&origin)?;
    let copy = module.function(c"dpm_copy_pages").about("dpm_copy_pages")?;
    let spin = module.function(c"dpm_spin").about("dpm_spin")?;
    let wait = module.function(c"dpm_wait").about("dpm_wait")?;
    let zero = module.function(c"dpm_zero").about("dpm_zero")?;
    // Optional (small calls take dpm_copy_pages without it); looked up only where the PTX
    // defines it, so that no failing driver call is made (tools report those).
    let small = if ptx.contains(".entry dpm_copy_small") {
        module.function(c"dpm_copy_small").ok()
    } else {
        None
    };
    let bulk = if ptx.contains(".entry dpm_copy_pages_bulk") {
        module.function(c"dpm_copy_pages_bulk").ok()
    } else {
        None
    };
    let ring = if ptx.contains(".entry dpm_ring") {
        module.function(c"dpm_ring").ok()
    } else {
        None
    };
    Ok(Kernels {
        copy,
        bulk,
        small,
        ring,
        spin,
        wait,
        zero,
        _module: module,
        zero_max_blocks: 4 * sm_count as u64 * 8,
        origin,
    })
}

impl Kernels {
    /// Loads the kernels into `ctx` from `source`, for a device of `sm_count` multiprocessors.
    pub(crate) fn load(
        ctx: &Arc<Context>,
        source: KernelSource,
        sm_count: u32,
    ) -> Result<Kernels, BackendError> {
        let why = if source == KernelSource::Fallback {
            "requested".to_string()
        } else {
            let tried = nvrtc_ptx(ctx).and_then(|(ptx, arch)| {
                load_ptx(ctx, &ptx, format!("nvrtc ({arch})"), sm_count)
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
        load_ptx(ctx, FALLBACK_PTX, format!("fallback ptx ({why})"), sm_count)
    }

    /// Queues the gather/scatter kernel on `stream`: `n_items` 4 KiB items; entry
    /// `item >> item_shift` has its own page at `own_base + pfns[e] * 4096` and the other
    /// side at `addrs[e]` (0: skipped). `to_own`: copy other -> own. `bulk`: with
    /// `dpm_copy_pages_bulk` where the module has it.
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
        bulk: bool,
    ) -> Result<(), BackendError> {
        let (f, name) = match &self.bulk {
            Some(b) if bulk => (b, "dpm_copy_pages_bulk"),
            _ => (&self.copy, "dpm_copy_pages"),
        };
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
        // SAFETY: `self` keeps the module loaded; the parameters match the kernel's signature
        // and outlive the call (the driver copies them); the caller vouches for the addresses.
        let r = unsafe { f.launch(blocks, BLOCK_THREADS, stream, &mut params) };
        r.about(name)
    }

    /// Whether the module has the bulk-copy kernel (`launch_copy` with `bulk`).
    #[cfg_attr(not(feature = "internals"), allow(dead_code))]
    pub(crate) fn has_bulk(&self) -> bool {
        self.bulk.is_some()
    }

    /// Whether small calls can pass their lists by value ([`Kernels::launch_copy_small`]).
    pub(crate) fn has_small(&self) -> bool {
        self.small.is_some()
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
        let Some(small) = &self.small else {
            return Ok(false);
        };
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
        // SAFETY: `self` keeps the module loaded; the parameters match the kernel's signature
        // (the struct by value, laid out as in pages.cu) and outlive the call (the driver
        // copies them); the caller vouches for the addresses.
        let r = unsafe { small.launch(blocks, BLOCK_THREADS, stream, &mut params) };
        r.about("dpm_copy_small").map(|()| true)
    }

    /// Whether the module has the ring's persistent kernel ([`Kernels::launch_ring`]).
    pub(crate) fn has_ring(&self) -> bool {
        self.ring.is_some()
    }

    /// Queues instance `epoch` of the ring's persistent kernel (one block of
    /// [`RING_THREADS`]) on `stream`, on the ring block at device address `ring`, with a lease
    /// of `lease_ns` nanoseconds. `Ok(false)`: this module has no ring kernel.
    ///
    /// # Safety
    /// `ring` must be a ring block (`ring::layout`) mapped for the device that stays valid
    /// until the instance has returned, and every address its descriptors name must be valid
    /// for the kernel's accesses until the descriptor is done.
    pub(crate) unsafe fn launch_ring(
        &self,
        stream: &Stream,
        ring: u64,
        epoch: u64,
        lease_ns: u64,
    ) -> Result<bool, BackendError> {
        let Some(f) = &self.ring else {
            return Ok(false);
        };
        let mut a_ring = ring;
        let mut a_epoch = epoch;
        let mut a_lease = lease_ns;
        let mut params: [*mut c_void; 3] = [
            &mut a_ring as *mut u64 as *mut c_void,
            &mut a_epoch as *mut u64 as *mut c_void,
            &mut a_lease as *mut u64 as *mut c_void,
        ];
        // SAFETY: `self` keeps the module loaded; three 64-bit parameters, matching the
        // kernel; the caller vouches for the block and the descriptors.
        let r = unsafe { f.launch(1, RING_THREADS, stream, &mut params) };
        r.about("dpm_ring").map(|()| true)
    }

    /// Queues a kernel that holds `stream` until the word at `flag` is non-zero (or
    /// `max_cycles` SM cycles pass; 0: no limit).
    ///
    /// # Safety
    /// `flag` must be the device address of a pinned, mapped host word that stays valid until
    /// the kernel has run.
    #[cfg_attr(not(feature = "internals"), allow(dead_code))]
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
        // SAFETY: `self` keeps the module loaded; two u64 parameters, matching the kernel;
        // the caller vouches for `flag`.
        let r = unsafe { self.wait.launch(1, 1, stream, &mut params) };
        r.about("dpm_wait")
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
            .clamp(1, self.zero_max_blocks) as u32;
        let mut a_dst = dst;
        let mut a_bytes = bytes;
        let mut params: [*mut c_void; 2] = [
            &mut a_dst as *mut u64 as *mut c_void,
            &mut a_bytes as *mut u64 as *mut c_void,
        ];
        // SAFETY: `self` keeps the module loaded; two u64 parameters, matching the kernel;
        // the caller vouches for the range.
        let r = unsafe { self.zero.launch(blocks, BLOCK_THREADS, stream, &mut params) };
        r.about("dpm_zero")
    }

    /// Queues a kernel that keeps `stream` busy for `ns` nanoseconds.
    #[cfg_attr(not(feature = "internals"), allow(dead_code))]
    pub(crate) fn launch_spin(&self, stream: &Stream, ns: u64) -> Result<(), BackendError> {
        let mut a_ns = ns;
        let mut params: [*mut c_void; 1] = [&mut a_ns as *mut u64 as *mut c_void];
        // SAFETY: `self` keeps the module loaded; one u64 parameter, matching the kernel; it
        // touches no memory.
        let r = unsafe { self.spin.launch(1, 1, stream, &mut params) };
        r.about("dpm_spin")
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
        assert!(KERNEL_SOURCE.contains(&format!("#define DPM_RING_THREADS {RING_THREADS}\n")));
        assert!(
            FALLBACK_PTX.contains(".entry dpm_ring"),
            "the fallback PTX has the ring kernel too (from pages.ll)"
        );
        assert!(
            FALLBACK_PTX.contains(&format!(".maxntid {RING_THREADS}, 1, 1")),
            "dpm_ring's block size"
        );
        assert!(
            !FALLBACK_PTX.contains("dpm_copy_small"),
            "the fallback PTX has no small-call kernel (loading treats it as optional)"
        );
    }
}
