//! The run-time control entry `zexSoftControl`: `#[repr(C)]` types shared by the driver and its
//! clients (fault injection and counters).
//!
//! Obtain the entry with `zeDriverGetExtensionFunctionAddress(driver, "zexSoftControl", &mut ptr)`
//! (or `dlsym(lib, "zeSoftControl")`) and call it as [`SoftControlFn`]. The `driver` argument
//! only has to be non-null: under `ZE_ENABLE_LOADER_INTERCEPT=1` the caller holds the loader's
//! wrapped handle, which the driver cannot unwrap, and the driver is a process-wide singleton.

use level_zero_sys::{ze_driver_handle_t, ze_result_t};

/// The name under which `zeDriverGetExtensionFunctionAddress` returns the control entry.
pub const CONTROL_EXTENSION: &str = "zexSoftControl";
/// The name of the extension reported by `zeDriverGetExtensionProperties`.
pub const EXTENSION_NAME: &str = "ZEX_soft_control";
/// The C symbol the cdylib exports for the same entry.
pub const CONTROL_SYMBOL: &str = "zeSoftControl";

/// Clears every injection (pending append/submit failures, hanging events, lost devices: a lost
/// device is usable again) and every counter except the `live_*` gauges, which keep describing
/// the objects that still exist.
pub const OP_RESET: u32 = 0;
/// The `count`-th command-list append from now (1 = the next) on any list of device `device`
/// (`u32::MAX`: any device) fails with `result` and enqueues nothing.
pub const OP_FAIL_APPEND: u32 = 1;
/// The `count`-th submission from now (a `zeCommandQueueExecuteCommandLists`, or an append to an
/// immediate list, which is its own submission) on device `device` (`u32::MAX`: any device) fails
/// with `result` and submits nothing.
pub const OP_FAIL_SUBMIT: u32 = 2;
/// Device `device` is lost: every later call naming it returns `ZE_RESULT_ERROR_DEVICE_LOST`,
/// commands queued on it never complete and host waits on their events and fences return
/// `ZE_RESULT_ERROR_DEVICE_LOST`.
pub const OP_DEVICE_LOST: u32 = 3;
/// The next `count` event signals by commands (on any device) are dropped: those events never
/// signal (a host synchronize with a timeout returns `ZE_RESULT_NOT_READY`).
pub const OP_HANG_EVENTS: u32 = 4;
/// Fills [`SoftControl::counters`] with the process-wide totals.
pub const OP_READ_COUNTERS: u32 = 5;

/// Process-wide totals kept by the driver (`live_*` are current values, the rest are counts since
/// the start or the last [`OP_RESET`]).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SoftCounters {
    /// Strict-mode violations detected (bad ranges, foreign events, stale handles, non-peer copies).
    pub strict_violations: u64,
    /// Commands appended to any command list (successful appends only).
    pub appends: u64,
    /// Submissions: command lists executed on queues plus appends to immediate lists.
    pub submissions: u64,
    /// Memory copies executed by the engines.
    pub copies: u64,
    /// Bytes those copies moved.
    pub bytes_copied: u64,
    /// Memory fills executed by the engines.
    pub fills: u64,
    /// Allocations (host, device, shared) not yet freed.
    pub live_allocations: u64,
    /// Bytes of device memory allocated and not yet freed, all devices together.
    pub live_device_bytes: u64,
    /// Events created and not yet destroyed.
    pub live_events: u64,
    /// Event pools created and not yet destroyed.
    pub live_event_pools: u64,
    /// Command lists (regular and immediate) created and not yet destroyed.
    pub live_command_lists: u64,
    /// Command queues created and not yet destroyed.
    pub live_queues: u64,
    /// `zeEventHostReset` calls that succeeded.
    pub events_host_reset: u64,
}

/// One request to the control entry.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct SoftControl {
    /// One of the `OP_*` constants.
    pub op: u32,
    /// The device index the operation names (its position in `zeDeviceGet`'s order).
    pub device: u32,
    /// The operation's count (see each `OP_*`).
    pub count: u64,
    /// The `ze_result_t` an injected failure returns (as its raw value).
    pub result: i32,
    /// Filled by [`OP_READ_COUNTERS`].
    pub counters: SoftCounters,
}

/// The signature of the control entry.
///
/// Returns `ZE_RESULT_SUCCESS`, `ZE_RESULT_ERROR_INVALID_NULL_POINTER` (null `req`),
/// `ZE_RESULT_ERROR_INVALID_NULL_HANDLE` (null driver), `ZE_RESULT_ERROR_UNINITIALIZED` (before
/// `zeInit`), or `ZE_RESULT_ERROR_INVALID_ARGUMENT` (unknown op, device out of range).
pub type SoftControlFn =
    unsafe extern "C" fn(driver: ze_driver_handle_t, req: *mut SoftControl) -> ze_result_t;
