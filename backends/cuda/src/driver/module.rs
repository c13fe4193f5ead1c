//! Modules and kernel launches (`cuModuleLoadData`, `cuModuleGetFunction`, `cuModuleUnload`,
//! `cuLaunchKernel`).

use super::{Context, DriverError, Stream, result};
use cudarc::driver::sys;
use std::ffi::{CStr, c_void};
use std::sync::Arc;

/// A module loaded into one context, unloaded on drop.
pub(crate) struct Module {
    // INVARIANT: `raw` was loaded by `cuModuleLoadData` into `ctx` and is unloaded only by
    // Drop: it (and every function looked up in it) is valid while `self` lives.
    raw: sys::CUmodule,
    ctx: Arc<Context>,
}

// SAFETY: module handles may be used from any thread.
unsafe impl Send for Module {}
// SAFETY: as above.
unsafe impl Sync for Module {}

impl Module {
    /// Loads the NUL-terminated PTX `text` into the current context, which must be `ctx`
    /// (`cuModuleLoadData`; the driver JIT-compiles it for the device).
    pub(crate) fn load_data(ctx: &Arc<Context>, text: &CStr) -> Result<Module, DriverError> {
        let mut raw = std::ptr::null_mut();
        // SAFETY: `text` is NUL-terminated; the module is unloaded in Drop.
        let r = unsafe { sys::cuModuleLoadData(&mut raw, text.as_ptr() as *const c_void) };
        result("cuModuleLoadData", r).map(|()| Module {
            raw,
            ctx: ctx.clone(),
        })
    }

    /// The kernel `name` of this module (`cuModuleGetFunction`).
    pub(crate) fn function(&self, name: &CStr) -> Result<Function, DriverError> {
        let mut f = std::ptr::null_mut();
        // SAFETY: the name is NUL-terminated; the module is loaded.
        let r = unsafe { sys::cuModuleGetFunction(&mut f, self.raw, name.as_ptr()) };
        result("cuModuleGetFunction", r).map(|()| Function { raw: f })
    }
}

impl Drop for Module {
    fn drop(&mut self) {
        if self.ctx.bind().is_ok() {
            // SAFETY: the module is ours; streams using it were synchronised by their owners.
            unsafe {
                sys::cuModuleUnload(self.raw);
            }
        }
    }
}

/// A kernel of a [`Module`].
#[derive(Clone, Copy)]
pub(crate) struct Function {
    // INVARIANT: a function handle of a loaded module, valid while that module is loaded
    // (its owner keeps the two together).
    raw: sys::CUfunction,
}

// SAFETY: function handles may be used from any thread.
unsafe impl Send for Function {}
// SAFETY: as above.
unsafe impl Sync for Function {}

impl Function {
    /// Queues the kernel on `stream` with `grid` blocks of `block` threads (one dimension
    /// each, no dynamic shared memory) and the kernel parameters `params` (`cuLaunchKernel`;
    /// the driver copies the values before it returns).
    ///
    /// # Safety
    /// The module of this function must still be loaded, in `stream`'s context; `params`
    /// must have one pointer per kernel parameter, in order, each to a live value of that
    /// parameter's type; every memory access the kernel makes with these parameters must be
    /// valid until the work completes.
    #[inline]
    pub(crate) unsafe fn launch(
        &self,
        grid: u32,
        block: u32,
        stream: &Stream,
        params: &mut [*mut c_void],
    ) -> Result<(), DriverError> {
        // SAFETY: the caller vouches for the function, the parameters and the accesses; the
        // stream is alive.
        let r = unsafe {
            sys::cuLaunchKernel(
                self.raw,
                grid,
                1,
                1,
                block,
                1,
                1,
                0,
                stream.raw(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        };
        result("cuLaunchKernel", r)
    }
}
