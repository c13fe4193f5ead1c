//! The Rust SDK: implement [`Plugin`] for a type whose `open` returns a backend built on the
//! core's traits, and [`export_plugin!`](crate::export_plugin) turns it into the entry symbol
//! `drm_pagemap_plugin_v1`. Every trampoline runs in [`crate::ffi::guard`]: a panic becomes
//! [`DPP_E_PANICKED`] with its message, never an unwind into the host.
//!
//! When the host opens (or probes) the plug-in, the SDK first installs the host's fence
//! context allocator as this copy of the core's global one, so the plug-in's fences never
//! reuse an id of the host's.

mod tables;

use crate::abi::*;
use crate::ffi;
use drm_pagemap_core::{
    Backend, BackendConfig, BackendError, BackendErrorKind, BackendOptions, FenceContextSource,
    FenceContexts,
};
use std::ffi::CStr;
use std::sync::{Arc, OnceLock};

pub use tables::export_backend;

/// A backend shipped as a plug-in.
pub trait Plugin: 'static {
    /// The backend's name (`[a-z0-9_-]+`): the registry lists it by this name and its option
    /// keys start with it (`tier.path`).
    const NAME: &'static CStr;
    /// One line for listings.
    const DESCRIPTION: &'static CStr;
    /// Whether it drives real GPUs (`auto` prefers it when available).
    const IS_GPU: bool = false;

    /// Whether the backend can be used here; `Err` says why not. Opens nothing lasting.
    fn probe(host: &Host) -> Result<(), BackendError>;

    /// Opens the backend. `config.options` holds every option the host was given: read the
    /// keys under [`Plugin::NAME`] (`config.options.reader(name)`, then `finish()`).
    fn open(host: &Host, config: &BackendConfig) -> Result<Arc<dyn Backend>, BackendError>;
}

/// The host's services as the plug-in sees them.
#[derive(Clone, Copy, Debug)]
pub struct Host {
    services: DppHostServices,
}

/// The services the host handed in (the last `probe` or `open`).
static HOST: OnceLock<Host> = OnceLock::new();

impl Host {
    /// The services the host handed to this plug-in, once it has been probed or opened.
    pub fn get() -> Option<&'static Host> {
        HOST.get()
    }

    /// Logs `msg` at `level` (`DPP_LOG_*`) through the host.
    pub fn log(&self, level: u32, msg: &str) {
        if let Some(log) = self.services.log {
            // SAFETY: a host entry with its own context argument; `msg` is valid for the call.
            unsafe { log(self.services.host, level, msg.as_ptr().cast(), msg.len()) };
        }
    }

    /// Reserves fence context ids from the host's allocator.
    fn reserve(&self, count: u64) -> u64 {
        match self.services.reserve_fence_contexts {
            // SAFETY: a host entry with its own context argument.
            Some(r) => unsafe { r(self.services.host, count) },
            None => 0,
        }
    }
}

/// The host's allocator as a [`FenceContextSource`].
struct HostContexts(Host);

impl FenceContextSource for HostContexts {
    fn reserve(&self, count: u64) -> u64 {
        self.0.reserve(count)
    }
}

/// Takes in the host's services: checks their version and size, remembers them, and installs
/// the host's fence context allocator (first time only).
///
/// # Safety
/// `services` is null or points to a host services table valid for the process's life.
unsafe fn adopt(services: *const DppHostServices) -> Result<&'static Host, BackendError> {
    if services.is_null() {
        return Err(ffi::bad_argument("host services are null"));
    }
    // SAFETY: non-null and readable: the first two fields exist in every version.
    let (version, size) = unsafe { ((*services).abi_version, (*services).struct_size) };
    if version != ABI_VERSION {
        return Err(BackendError::new(
            BackendErrorKind::Unavailable,
            format!("host services of ABI version {version} (this plug-in supports {ABI_VERSION})"),
        ));
    }
    // SAFETY: `size` bytes readable (the host's promise).
    let table: DppHostServices = unsafe { read_table(services, size) };
    if table.reserve_fence_contexts.is_none() {
        return Err(ffi::bad_argument(
            "host services lack `reserve_fence_contexts`",
        ));
    }
    let host = HOST.get_or_init(|| {
        let h = Host { services: table };
        // Before any fence of this copy of the core takes an id. A second host table (the same
        // host again) finds it installed: nothing to do.
        let _ =
            FenceContexts::install_global(FenceContexts::from_source(Arc::new(HostContexts(h))));
        h
    });
    Ok(host)
}

/// The core config the host described.
///
/// # Safety
/// `config` is null or points to a config of at least its `struct_size` bytes whose option
/// strings are valid for the call.
unsafe fn config_of(config: *const DppConfig) -> Result<BackendConfig, BackendError> {
    if config.is_null() {
        return Ok(BackendConfig::default());
    }
    // SAFETY: non-null; the size field comes first.
    let size = unsafe { (*config).struct_size };
    // SAFETY: `size` bytes readable.
    let c: DppConfig = unsafe { read_table(config, size) };
    let mut out = BackendConfig {
        devices: (c.flags & DPP_CONFIG_HAS_DEVICES != 0)
            .then(|| usize::try_from(c.devices).unwrap_or(usize::MAX)),
        device_capacity: (c.flags & DPP_CONFIG_HAS_DEVICE_CAPACITY != 0)
            .then_some(c.device_capacity),
        host_capacity: (c.flags & DPP_CONFIG_HAS_HOST_CAPACITY != 0).then_some(c.host_capacity),
        options: BackendOptions::with_version(c.options_version.max(1))
            .map_err(|e| BackendError::new(BackendErrorKind::BadConfig, e.to_string()))?,
    };
    // SAFETY: the host's array of `option_count` options, valid for the call.
    let opts = unsafe { ffi::slice(c.options, c.option_count) }
        .ok_or_else(|| ffi::bad_argument("options are null"))?;
    for o in opts {
        // SAFETY: each string is `len` bytes, valid for the call.
        let key = unsafe { ffi::slice(o.key.cast::<u8>(), o.key_len) };
        // SAFETY: as above.
        let value = unsafe { ffi::slice(o.value.cast::<u8>(), o.value_len) };
        let (Some(k), Some(v)) = (key, value) else {
            return Err(ffi::bad_argument("an option string is null"));
        };
        out.options
            .set(String::from_utf8_lossy(k), String::from_utf8_lossy(v))
            .map_err(|e| BackendError::new(BackendErrorKind::BadConfig, e.to_string()))?;
    }
    Ok(out)
}

/// `probe` of plug-in `P`.
///
/// # Safety
/// Called by the host per the ABI.
pub unsafe extern "C" fn probe<P: Plugin>(
    services: *const DppHostServices,
    err: *mut DppError,
) -> i32 {
    // SAFETY: the host's arguments, per the ABI.
    unsafe {
        ffi::guard("probe", err, || {
            let host = adopt(services)?;
            P::probe(host)
        })
    }
}

/// `open` of plug-in `P`.
///
/// # Safety
/// Called by the host per the ABI.
pub unsafe extern "C" fn open<P: Plugin>(
    services: *const DppHostServices,
    config: *const DppConfig,
    out: *mut DppBackend,
    err: *mut DppError,
) -> i32 {
    // SAFETY: the host's arguments, per the ABI.
    unsafe {
        ffi::guard("open", err, || {
            if out.is_null() {
                return Err(ffi::bad_argument("open: `out` is null"));
            }
            let host = adopt(services)?;
            let config = config_of(config)?;
            let backend = P::open(host, &config)?;
            *out = export_backend(backend);
            Ok(())
        })
    }
}

/// The table `drm_pagemap_plugin_v1` returns for plug-in `P`.
pub const fn plugin_table<P: Plugin>() -> DppPluginV1 {
    DppPluginV1 {
        abi_version: ABI_VERSION,
        struct_size: size_of_table::<DppPluginV1>(),
        name: P::NAME.as_ptr(),
        description: P::DESCRIPTION.as_ptr(),
        flags: if P::IS_GPU { DPP_PLUGIN_IS_GPU } else { 0 },
        probe: Some(probe::<P>),
        open: Some(open::<P>),
    }
}

/// Exports plug-in type `$ty` (implementing [`Plugin`]) as the entry symbol
/// `drm_pagemap_plugin_v1` of the `cdylib` it is compiled into. Use it once per library.
///
/// ```ignore
/// drm_pagemap_plugin::export_plugin!(MyPlugin);
/// ```
#[macro_export]
macro_rules! export_plugin {
    ($ty:ty) => {
        /// The plug-in's entry: its ABI version 1 table.
        #[unsafe(no_mangle)]
        pub extern "C" fn drm_pagemap_plugin_v1() -> *const $crate::abi::DppPluginV1 {
            static TABLE: $crate::abi::DppPluginV1 = $crate::sdk::plugin_table::<$ty>();
            &TABLE
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::c_void;
    use std::sync::atomic::{AtomicU64, Ordering};

    struct Panicky;

    impl Plugin for Panicky {
        const NAME: &'static CStr = c"panicky";
        const DESCRIPTION: &'static CStr = c"panics everywhere";
        fn probe(_: &Host) -> Result<(), BackendError> {
            panic!("boom in probe")
        }
        fn open(_: &Host, _: &BackendConfig) -> Result<Arc<dyn Backend>, BackendError> {
            panic!("boom in open")
        }
    }

    unsafe extern "C" fn reserve(_: *mut c_void, count: u64) -> u64 {
        static NEXT: AtomicU64 = AtomicU64::new(1 << 40);
        NEXT.fetch_add(count, Ordering::Relaxed)
    }

    fn services() -> DppHostServices {
        DppHostServices {
            abi_version: ABI_VERSION,
            struct_size: size_of_table::<DppHostServices>(),
            host: std::ptr::null_mut(),
            reserve_fence_contexts: Some(reserve),
            log: None,
            fence_create: None,
            fence_signal: None,
            on_signal: None,
        }
    }

    fn message(e: &DppError) -> String {
        // SAFETY: filled by this crate's own guard just before.
        unsafe { ffi::c_text(e.message) }.unwrap_or_default()
    }

    #[test]
    fn a_panic_in_probe_or_open_is_a_status_with_its_message() {
        let s = services();
        let mut err = DppError::empty();
        // SAFETY: valid services and error struct.
        let st = unsafe { probe::<Panicky>(&s, &mut err) };
        assert_eq!(st, DPP_E_PANICKED);
        assert_eq!(message(&err), "panicked in probe: boom in probe");
        let mut out = DppBackend {
            obj: std::ptr::null_mut(),
            ops: std::ptr::null(),
        };
        // SAFETY: as above; a null config is the default config.
        let st = unsafe { open::<Panicky>(&s, std::ptr::null(), &mut out, &mut err) };
        assert_eq!(st, DPP_E_PANICKED);
        assert_eq!(message(&err), "panicked in open: boom in open");
        assert!(out.obj.is_null(), "nothing was handed out");
        // The host's allocator is this copy's global one now.
        assert!(FenceContexts::global().next() >= 1 << 40);
    }

    #[test]
    fn bad_host_services_are_refused_before_the_plugin_runs() {
        let mut err = DppError::empty();
        // SAFETY: null services are refused by the SDK itself.
        let st = unsafe { probe::<Panicky>(std::ptr::null(), &mut err) };
        assert_eq!(st, DPP_E_DRIVER);
        assert!(message(&err).contains("host services are null"));
        let mut s = services();
        s.abi_version = 9;
        // SAFETY: valid memory; the version is refused.
        let st = unsafe { probe::<Panicky>(&s, &mut err) };
        assert_eq!(st, DPP_E_UNAVAILABLE);
        assert!(message(&err).contains("ABI version 9"));
    }

    #[test]
    fn the_table_describes_the_plugin() {
        let t = plugin_table::<Panicky>();
        assert_eq!(
            (t.abi_version, t.struct_size as usize),
            (1, std::mem::size_of::<DppPluginV1>())
        );
        // SAFETY: a static C string.
        assert_eq!(unsafe { CStr::from_ptr(t.name) }, c"panicky");
        assert!(t.probe.is_some() && t.open.is_some() && t.flags == 0);
    }
}
