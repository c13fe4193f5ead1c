//! The only module that calls Level Zero: thin wrappers over the loader's entry points that
//! take and return this crate's handle types, check every `ze_result_t` and carry the safety
//! reasoning of each raw call.
//!
//! - this file: the call macro, handle types, and the error conversion that keeps every
//!   `ze_result_t` ([`Failure::about`]);
//! - [`discover`]: `zeInit`, drivers, devices, their properties and queue groups, peers;
//! - [`objects`]: contexts, memory, command queues and lists, event pools and events.

pub(crate) mod discover;
pub(crate) mod objects;

use drm_pagemap_core::{BackendError, BackendErrorKind};
use level_zero_sys::{LoaderError, ZeError, ze_result_t};
use std::fmt;

/// Calls entry point `$name` of `$ze` (a `Loader`) with the arguments: `Ok(())` on success,
/// else a [`Failure`] keeping the code. Expands to a raw call: the caller writes the
/// `unsafe` block and its SAFETY comment.
macro_rules! ze_call {
    ($ze:expr, $name:ident ( $($arg:expr),* $(,)? )) => {
        match $ze.$name() {
            Err(e) => Err($crate::ze::Failure::Missing(e)),
            Ok(f) => level_zero_sys::check(stringify!($name), f($($arg),*))
                .map_err($crate::ze::Failure::Call),
        }
    };
}
pub(crate) use ze_call;

/// Why a call failed: the entry point is missing, or it returned an error code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The loader lacks the entry point.
    Missing(LoaderError),
    /// The call returned an error.
    Call(ZeError),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Missing(e) => e.fmt(f),
            Failure::Call(e) => e.fmt(f),
        }
    }
}

impl Failure {
    /// The error of a failure while doing `what` (which names the device, pagemap or range):
    /// device lost and out of device or host memory keep their kinds
    /// ([`BackendErrorKind::DeviceLost`], [`BackendErrorKind::OutOfMemory`]); any other code
    /// is [`BackendErrorKind::Driver`] with the call and the code; a missing entry point is
    /// [`BackendErrorKind::Unsupported`]. The message always names the call and the raw
    /// `ze_result_t` (see [`crate::ze_result_of`]).
    pub(crate) fn about(&self, what: impl fmt::Display) -> BackendError {
        match self {
            Failure::Missing(e) => BackendError::new(
                BackendErrorKind::Unsupported,
                format!("level-zero {what}: {e}"),
            ),
            Failure::Call(e) => {
                let kind = if e.is_device_lost() {
                    BackendErrorKind::DeviceLost
                } else if e.is_out_of_memory() {
                    BackendErrorKind::OutOfMemory
                } else {
                    BackendErrorKind::Driver {
                        api: e.call,
                        code: i64::from(e.raw()),
                    }
                };
                BackendError::new(kind, format!("level-zero {what}: {e}"))
            }
        }
    }

    /// The raw code, if the call ran.
    pub(crate) fn code(&self) -> Option<ze_result_t> {
        match self {
            Failure::Missing(_) => None,
            Failure::Call(e) => Some(e.code),
        }
    }
}

/// A Level Zero handle as a value that may cross threads.
macro_rules! handle {
    ($(#[$m:meta])* $name:ident, $raw:ty) => {
        $(#[$m])*
        #[repr(transparent)]
        #[derive(Clone, Copy, Debug)]
        pub(crate) struct $name(pub(crate) $raw);

        // SAFETY: a Level Zero handle is an opaque pointer that every API call accepts from
        // any thread; the objects that are not thread-safe (command lists) are only used
        // under their owner's lock.
        unsafe impl Send for $name {}
        // SAFETY: as above; sharing the value shares no Rust data.
        unsafe impl Sync for $name {}

        impl $name {
            /// The handle as an integer (for `NativeFence` and messages).
            #[allow(dead_code)]
            pub(crate) fn as_u64(self) -> u64 {
                self.0.0 as u64
            }
        }
    };
}

handle!(
    /// `ze_driver_handle_t`.
    Driver,
    level_zero_sys::ze_driver_handle_t
);
handle!(
    /// `ze_device_handle_t`.
    Device,
    level_zero_sys::ze_device_handle_t
);
handle!(
    /// `ze_context_handle_t`.
    ContextHandle,
    level_zero_sys::ze_context_handle_t
);
handle!(
    /// `ze_command_list_handle_t`.
    List,
    level_zero_sys::ze_command_list_handle_t
);
handle!(
    /// `ze_command_queue_handle_t`.
    Queue,
    level_zero_sys::ze_command_queue_handle_t
);
handle!(
    /// `ze_event_pool_handle_t`.
    PoolHandle,
    level_zero_sys::ze_event_pool_handle_t
);
handle!(
    /// `ze_event_handle_t`.
    EventHandle,
    level_zero_sys::ze_event_handle_t
);
