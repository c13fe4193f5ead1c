//! NVRTC: CUDA C to PTX at run time (cudarc's `nvrtc`, loaded dynamically).

use std::panic::AssertUnwindSafe;

/// Whether the NVRTC library can be loaded (call before [`compile`]: cudarc panics on a
/// missing library).
pub(crate) fn available() -> bool {
    // SAFETY: only tries to dlopen the candidate library names.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Compiles `source` (file name `name`, for messages) for `arch` (`compute_90`) to PTX.
/// `Err` says why not: NVRTC panicking (a missing symbol), or the compiler's log.
pub(crate) fn compile(source: &str, name: &str, arch: &str) -> Result<String, String> {
    let opts = cudarc::nvrtc::CompileOptions {
        options: vec![format!("--gpu-architecture={arch}")],
        name: Some(name.into()),
        ..Default::default()
    };
    let compiled = std::panic::catch_unwind(AssertUnwindSafe(|| {
        cudarc::nvrtc::compile_ptx_with_opts(source, opts)
    }))
    .map_err(|_| "NVRTC panicked (missing symbol?)".to_string())?;
    let ptx = compiled.map_err(|e| format!("NVRTC failed: {e:?}"))?;
    Ok(ptx.to_src())
}
