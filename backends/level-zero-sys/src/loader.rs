//! The Level Zero loader (`libze_loader.so.1`), opened at run time, and the entry points this
//! workspace calls, each resolved on its own: a missing one is [`LoaderError::MissingEntry`]
//! naming it when it is asked for, never a panic and never a failure to open.

use crate::bindings::*;
use libloading::Library;
use std::ffi::c_void;
use std::fmt;
use std::sync::Arc;

/// The file name the loader is opened by (the SONAME Debian's `libze1` installs).
pub const LOADER_NAME: &str = "libze_loader.so.1";

/// Why the loader or one of its entry points cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LoaderError {
    /// The library cannot be opened (not installed, or not loadable).
    #[error("Level Zero loader unavailable: {reason}")]
    Unavailable {
        /// What the dynamic linker said.
        reason: String,
    },
    /// The library has no such entry point (an older loader than the call needs).
    #[error("Level Zero loader has no entry point {name}")]
    MissingEntry {
        /// The entry point's C name.
        name: &'static str,
    },
}

/// A `ze_result_t` other than `ZE_RESULT_SUCCESS`, with the call that returned it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{call} returned {} ({:#x})", result_name(*.code), .code.0)]
pub struct ZeError {
    /// The entry point, e.g. `zeCommandListAppendMemoryCopy`.
    pub call: &'static str,
    /// The raw code.
    pub code: ze_result_t,
}

impl ZeError {
    /// The raw code as a number.
    pub fn raw(&self) -> u32 {
        self.code.0
    }

    /// Whether the device was lost (`ZE_RESULT_ERROR_DEVICE_LOST`).
    pub fn is_device_lost(&self) -> bool {
        self.code == ze_result_t::ZE_RESULT_ERROR_DEVICE_LOST
    }

    /// Whether device or host memory ran out (`ZE_RESULT_ERROR_OUT_OF_DEVICE_MEMORY`,
    /// `ZE_RESULT_ERROR_OUT_OF_HOST_MEMORY`).
    pub fn is_out_of_memory(&self) -> bool {
        self.code == ze_result_t::ZE_RESULT_ERROR_OUT_OF_DEVICE_MEMORY
            || self.code == ze_result_t::ZE_RESULT_ERROR_OUT_OF_HOST_MEMORY
    }
}

/// `Ok(())` for `ZE_RESULT_SUCCESS`, else the [`ZeError`] of `call`.
pub fn check(call: &'static str, code: ze_result_t) -> Result<(), ZeError> {
    if code == ze_result_t::ZE_RESULT_SUCCESS {
        Ok(())
    } else {
        Err(ZeError { call, code })
    }
}

/// The name of a result code (`"ZE_RESULT_ERROR_DEVICE_LOST"`), or `"unknown ze_result_t"`.
pub fn result_name(code: ze_result_t) -> &'static str {
    macro_rules! names {
        ($($n:ident),* $(,)?) => {
            $(if code == ze_result_t::$n { return stringify!($n); })*
        };
    }
    names!(
        ZE_RESULT_SUCCESS,
        ZE_RESULT_NOT_READY,
        ZE_RESULT_ERROR_DEVICE_LOST,
        ZE_RESULT_ERROR_OUT_OF_HOST_MEMORY,
        ZE_RESULT_ERROR_OUT_OF_DEVICE_MEMORY,
        ZE_RESULT_ERROR_DEVICE_REQUIRES_RESET,
        ZE_RESULT_ERROR_DEVICE_IN_LOW_POWER_STATE,
        ZE_RESULT_ERROR_INSUFFICIENT_PERMISSIONS,
        ZE_RESULT_ERROR_NOT_AVAILABLE,
        ZE_RESULT_ERROR_DEPENDENCY_UNAVAILABLE,
        ZE_RESULT_WARNING_DROPPED_DATA,
        ZE_RESULT_ERROR_UNINITIALIZED,
        ZE_RESULT_ERROR_UNSUPPORTED_VERSION,
        ZE_RESULT_ERROR_UNSUPPORTED_FEATURE,
        ZE_RESULT_ERROR_INVALID_ARGUMENT,
        ZE_RESULT_ERROR_INVALID_NULL_HANDLE,
        ZE_RESULT_ERROR_HANDLE_OBJECT_IN_USE,
        ZE_RESULT_ERROR_INVALID_NULL_POINTER,
        ZE_RESULT_ERROR_INVALID_SIZE,
        ZE_RESULT_ERROR_UNSUPPORTED_SIZE,
        ZE_RESULT_ERROR_UNSUPPORTED_ALIGNMENT,
        ZE_RESULT_ERROR_INVALID_SYNCHRONIZATION_OBJECT,
        ZE_RESULT_ERROR_INVALID_ENUMERATION,
        ZE_RESULT_ERROR_UNSUPPORTED_ENUMERATION,
        ZE_RESULT_ERROR_INVALID_FUNCTION_NAME,
        ZE_RESULT_ERROR_INVALID_COMMAND_LIST_TYPE,
        ZE_RESULT_ERROR_OVERLAPPING_REGIONS,
        ZE_RESULT_WARNING_ACTION_REQUIRED,
        ZE_RESULT_ERROR_UNKNOWN,
    );
    "unknown ze_result_t"
}

/// The function type inside a `ze_pfn*_t` typedef (`Option<unsafe extern "C" fn ...>`).
pub trait EntryType {
    /// The bare function pointer type.
    type Fn: Copy;
}

impl<F: Copy> EntryType for Option<F> {
    type Fn = F;
}

macro_rules! entry_points {
    ($( $field:ident : $ty:ident = $name:literal ),* $(,)?) => {
        /// Every entry point the workspace calls, each `None` where the loader lacks it.
        #[derive(Clone, Copy)]
        #[allow(non_snake_case)]
        pub struct Entries {
            $(
                #[doc = concat!("`", $name, "`.")]
                pub $field: $ty,
            )*
        }

        impl Entries {
            /// Every entry `None` (a loader that has none of them).
            pub const NONE: Entries = Entries { $( $field: None, )* };

            /// The C names of every entry, in declaration order.
            pub const NAMES: &'static [&'static str] = &[$( $name, )*];

            fn resolve(lib: &Library) -> Entries {
                Entries {
                    $(
                        // SAFETY: the symbol's type is the typedef the API headers give for
                        // this entry point (the bindings are generated from those headers);
                        // the pointer is copied out and used only while `lib` stays loaded
                        // (the `Loader` keeps it in an `Arc`).
                        $field: unsafe {
                            lib.get::<<$ty as EntryType>::Fn>(concat!($name, "\0").as_bytes())
                                .ok()
                                .map(|s| *s)
                        },
                    )*
                }
            }

            /// How many entries are present.
            pub fn present(&self) -> usize {
                0 $( + self.$field.is_some() as usize )*
            }
        }

        impl Loader {
            $(
                #[doc = concat!("`", $name, "`, or [`LoaderError::MissingEntry`] when the loader lacks it.")]
                #[allow(non_snake_case)]
                pub fn $field(&self) -> Result<<$ty as EntryType>::Fn, LoaderError> {
                    self.entries.$field.ok_or(LoaderError::MissingEntry { name: $name })
                }
            )*
        }
    };
}

entry_points! {
    zeInit: ze_pfnInit_t = "zeInit",
    zeDriverGet: ze_pfnDriverGet_t = "zeDriverGet",
    zeDriverGetProperties: ze_pfnDriverGetProperties_t = "zeDriverGetProperties",
    zeDriverGetApiVersion: ze_pfnDriverGetApiVersion_t = "zeDriverGetApiVersion",
    zeDriverGetExtensionFunctionAddress: ze_pfnDriverGetExtensionFunctionAddress_t =
        "zeDriverGetExtensionFunctionAddress",
    zeDeviceGet: ze_pfnDeviceGet_t = "zeDeviceGet",
    zeDeviceGetProperties: ze_pfnDeviceGetProperties_t = "zeDeviceGetProperties",
    zeDeviceGetMemoryProperties: ze_pfnDeviceGetMemoryProperties_t =
        "zeDeviceGetMemoryProperties",
    zeDeviceGetCommandQueueGroupProperties: ze_pfnDeviceGetCommandQueueGroupProperties_t =
        "zeDeviceGetCommandQueueGroupProperties",
    zeDeviceCanAccessPeer: ze_pfnDeviceCanAccessPeer_t = "zeDeviceCanAccessPeer",
    zeContextCreate: ze_pfnContextCreate_t = "zeContextCreate",
    zeContextDestroy: ze_pfnContextDestroy_t = "zeContextDestroy",
    zeMemAllocHost: ze_pfnMemAllocHost_t = "zeMemAllocHost",
    zeMemAllocDevice: ze_pfnMemAllocDevice_t = "zeMemAllocDevice",
    zeMemFree: ze_pfnMemFree_t = "zeMemFree",
    zeMemGetAllocProperties: ze_pfnMemGetAllocProperties_t = "zeMemGetAllocProperties",
    zeCommandQueueCreate: ze_pfnCommandQueueCreate_t = "zeCommandQueueCreate",
    zeCommandQueueDestroy: ze_pfnCommandQueueDestroy_t = "zeCommandQueueDestroy",
    zeCommandQueueExecuteCommandLists: ze_pfnCommandQueueExecuteCommandLists_t =
        "zeCommandQueueExecuteCommandLists",
    zeCommandQueueSynchronize: ze_pfnCommandQueueSynchronize_t = "zeCommandQueueSynchronize",
    zeCommandListCreate: ze_pfnCommandListCreate_t = "zeCommandListCreate",
    zeCommandListCreateImmediate: ze_pfnCommandListCreateImmediate_t =
        "zeCommandListCreateImmediate",
    zeCommandListClose: ze_pfnCommandListClose_t = "zeCommandListClose",
    zeCommandListReset: ze_pfnCommandListReset_t = "zeCommandListReset",
    zeCommandListDestroy: ze_pfnCommandListDestroy_t = "zeCommandListDestroy",
    zeCommandListAppendMemoryCopy: ze_pfnCommandListAppendMemoryCopy_t =
        "zeCommandListAppendMemoryCopy",
    zeCommandListAppendMemoryFill: ze_pfnCommandListAppendMemoryFill_t =
        "zeCommandListAppendMemoryFill",
    zeCommandListAppendBarrier: ze_pfnCommandListAppendBarrier_t = "zeCommandListAppendBarrier",
    zeCommandListAppendWaitOnEvents: ze_pfnCommandListAppendWaitOnEvents_t =
        "zeCommandListAppendWaitOnEvents",
    zeCommandListAppendSignalEvent: ze_pfnCommandListAppendSignalEvent_t =
        "zeCommandListAppendSignalEvent",
    zeEventPoolCreate: ze_pfnEventPoolCreate_t = "zeEventPoolCreate",
    zeEventPoolDestroy: ze_pfnEventPoolDestroy_t = "zeEventPoolDestroy",
    zeEventCreate: ze_pfnEventCreate_t = "zeEventCreate",
    zeEventDestroy: ze_pfnEventDestroy_t = "zeEventDestroy",
    zeEventHostSignal: ze_pfnEventHostSignal_t = "zeEventHostSignal",
    zeEventHostSynchronize: ze_pfnEventHostSynchronize_t = "zeEventHostSynchronize",
    zeEventQueryStatus: ze_pfnEventQueryStatus_t = "zeEventQueryStatus",
    zeEventHostReset: ze_pfnEventHostReset_t = "zeEventHostReset",
}

/// The opened loader: the library (shared, never unloaded while a clone lives) and its entry
/// points. Cheap to clone.
#[derive(Clone)]
pub struct Loader {
    lib: Arc<Library>,
    entries: Entries,
}

impl fmt::Debug for Loader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Loader")
            .field("entries_present", &self.entries.present())
            .field("entries_known", &Entries::NAMES.len())
            .finish()
    }
}

impl Loader {
    /// Opens [`LOADER_NAME`] through the dynamic linker's search path.
    pub fn open() -> Result<Loader, LoaderError> {
        Loader::open_named(LOADER_NAME)
    }

    /// Opens the library `name` (a file name searched as the dynamic linker does, or a
    /// path) as the loader and resolves its entry points.
    pub fn open_named(name: &str) -> Result<Loader, LoaderError> {
        // SAFETY: loading the Level Zero loader runs its initialisers, which only set up its
        // own state (it reads its environment and loads drivers later, in `zeInit`).
        let lib = unsafe { Library::new(name) }.map_err(|e| LoaderError::Unavailable {
            reason: format!("{name}: {e}"),
        })?;
        let entries = Entries::resolve(&lib);
        Ok(Loader {
            lib: Arc::new(lib),
            entries,
        })
    }

    /// Every entry point as resolved (`None` where missing).
    pub fn entries(&self) -> &Entries {
        &self.entries
    }

    /// The same loader with other entries (tests: a loader lacking some entry point).
    pub fn with_entries(&self, entries: Entries) -> Loader {
        Loader {
            lib: self.lib.clone(),
            entries,
        }
    }

    /// The address of any exported symbol `name` (one this crate does not list), or
    /// [`LoaderError::MissingEntry`]. The caller casts it to the right function type.
    pub fn symbol(&self, name: &'static str) -> Result<*mut c_void, LoaderError> {
        let mut c = Vec::with_capacity(name.len() + 1);
        c.extend_from_slice(name.as_bytes());
        c.push(0);
        // SAFETY: the symbol is read as a plain pointer, never called here.
        let sym = unsafe { self.lib.get::<*mut c_void>(&c[..]) };
        match sym {
            Ok(s) if !s.is_null() => Ok(*s),
            _ => Err(LoaderError::MissingEntry { name }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_library_that_is_not_there_is_unavailable() {
        let e = Loader::open_named("libze_loader_that_does_not_exist.so.9").unwrap_err();
        match &e {
            LoaderError::Unavailable { reason } => {
                assert!(
                    reason.contains("libze_loader_that_does_not_exist"),
                    "{reason}"
                )
            }
            other => panic!("{other:?}"),
        }
        assert!(e.to_string().starts_with("Level Zero loader unavailable: "));
    }

    #[test]
    fn missing_entry_points_are_named_errors() {
        let loader = match Loader::open() {
            Ok(l) => l,
            Err(e) => {
                // Without a loader, any library shows the mechanism: libc has none of them.
                println!("skipped: level-zero: {e}");
                let l = Loader::open_named("libc.so.6").expect("libc");
                assert_eq!(l.entries().present(), 0);
                assert_eq!(
                    l.zeInit().unwrap_err(),
                    LoaderError::MissingEntry { name: "zeInit" }
                );
                return;
            }
        };
        // The installed loader (1.8.12) has every entry this crate lists.
        assert_eq!(loader.entries().present(), Entries::NAMES.len());
        assert!(loader.zeInit().is_ok());
        let e = loader.symbol("zeMadeUpEntryPoint").unwrap_err();
        assert_eq!(
            e,
            LoaderError::MissingEntry {
                name: "zeMadeUpEntryPoint"
            }
        );
        assert_eq!(
            e.to_string(),
            "Level Zero loader has no entry point zeMadeUpEntryPoint"
        );
        assert!(loader.symbol("zeInit").is_ok());
        // A loader lacking one entry: asking for it is an error naming it, the others work.
        let mut entries = *loader.entries();
        entries.zeCommandListAppendMemoryFill = None;
        let partial = loader.with_entries(entries);
        assert_eq!(
            partial.zeCommandListAppendMemoryFill().unwrap_err(),
            LoaderError::MissingEntry {
                name: "zeCommandListAppendMemoryFill"
            }
        );
        assert!(partial.zeCommandListAppendMemoryCopy().is_ok());
        let none = loader.with_entries(Entries::NONE);
        for name in Entries::NAMES {
            assert!(loader.symbol(name).is_ok(), "{name}");
        }
        assert!(matches!(
            none.zeEventHostReset(),
            Err(LoaderError::MissingEntry {
                name: "zeEventHostReset"
            })
        ));
    }

    #[test]
    fn results_keep_their_code_and_call() {
        assert_eq!(check("zeInit", ze_result_t::ZE_RESULT_SUCCESS), Ok(()));
        let e = check("zeInit", ze_result_t::ZE_RESULT_ERROR_UNINITIALIZED).unwrap_err();
        assert_eq!(e.raw(), 0x7800_0001);
        assert_eq!(
            e.to_string(),
            "zeInit returned ZE_RESULT_ERROR_UNINITIALIZED (0x78000001)"
        );
        let lost = ZeError {
            call: "zeEventHostSynchronize",
            code: ze_result_t::ZE_RESULT_ERROR_DEVICE_LOST,
        };
        assert!(lost.is_device_lost() && !lost.is_out_of_memory());
        for c in [
            ze_result_t::ZE_RESULT_ERROR_OUT_OF_DEVICE_MEMORY,
            ze_result_t::ZE_RESULT_ERROR_OUT_OF_HOST_MEMORY,
        ] {
            assert!(
                ZeError {
                    call: "zeMemAllocDevice",
                    code: c
                }
                .is_out_of_memory()
            );
        }
        assert_eq!(result_name(ze_result_t(0x1234_5678)), "unknown ze_result_t");
    }
}
