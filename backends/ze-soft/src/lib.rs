//! # ze-soft: a software Level Zero driver
//!
//! A Level Zero driver whose "devices" are host memory and whose copy engines are threads. The
//! real loader (`libze_loader.so.1`, tested with Debian's 1.8.12) loads it as the only driver
//! when the process has `ZE_ENABLE_ALT_DRIVERS=/abs/path/libze_soft.so` before its first
//! `zeInit`. It exists to test Level Zero clients (the drm-pagemap `level-zero` backend)
//! without a GPU: copies really move bytes, every copy is checked against the allocations, and
//! failures can be injected.
//!
//! ## Using it
//! ```no_run
//! // Before the loader is opened and before zeInit:
//! let path = ze_soft::route_loader().expect("libze_soft.so built next to the executable");
//! // ... then dlopen("libze_loader.so.1") and call zeInit as usual.
//! # let _ = path;
//! ```
//! [`route_loader`] sets `ZE_ENABLE_ALT_DRIVERS` to [`library_path`] once per process (unless
//! it is already set); [`route_loader_with`] sets the driver's `ZE_SOFT_*` settings first (those
//! not already set). Cargo builds the cdylib whenever `ze-soft` is a (dev-)dependency, next to
//! the test and example executables (`target/<profile>/` and `target/<profile>/deps/`).
//!
//! The rlib exposes only [`library_path`], [`route_loader`], [`route_loader_with`] and the
//! [`control`] types. Never call driver internals through the rlib: the loader loads the
//! cdylib, a separate copy with its own state. Fault injection and counters go through the control entry `zexSoftControl`, reached
//! with `zeDriverGetExtensionFunctionAddress` (see [`control`]).
//!
//! ## What it implements (API 1.4, the version `zeDriverGetApiVersion` reports)
//! * All 46 `ze*/zet*/zes*Get*ProcAddrTable` getters the 1.8.12 loader requires; each checks the
//!   major version and fills only entries that exist in the requested version (the zet/zes and
//!   unused ze tables return SUCCESS with null entries).
//! * `zeInit`, `zeDriverGet` (one driver), `GetProperties`, `GetApiVersion`,
//!   `GetIpcProperties` (none), `GetExtensionProperties` (`ZEX_soft_control`),
//!   `GetExtensionFunctionAddress` (`zexSoftControl`).
//! * `zeDeviceGet` (root devices, no sub-devices), `GetProperties` (GPU, "ze-soft device N",
//!   distinct uuids), `GetComputeProperties` (minimal), `GetMemoryProperties` (one entry),
//!   `GetCommandQueueGroupProperties` (group 0: COMPUTE|COPY, 1 queue; group 1: COPY,
//!   `ZE_SOFT_COPY_ENGINES` queues; fill patterns up to 256 bytes), `GetP2PProperties`,
//!   `CanAccessPeer`, `GetStatus`.
//! * `zeContextCreate/Destroy/GetStatus`; `zeMemAllocHost/Device/Shared` (alignment honoured,
//!   device bytes counted against the device: beyond it `OUT_OF_DEVICE_MEMORY`), `zeMemFree`,
//!   `zeMemGetAllocProperties` (interior pointers resolve to their allocation; unknown memory is
//!   `ZE_MEMORY_TYPE_UNKNOWN`), `zeMemGetAddressRange`.
//! * Command lists (regular and immediate) with `AppendMemoryCopy`, `AppendMemoryFill`,
//!   `AppendBarrier`, `AppendSignalEvent`, `AppendWaitOnEvents`, `AppendEventReset`, `Close`,
//!   `Reset`, `Destroy`; command queues (`Create/Destroy/ExecuteCommandLists/Synchronize`);
//!   fences (`Create/Destroy/HostSynchronize/QueryStatus/Reset`); event pools and events
//!   (`HostSignal`, `HostSynchronize` with a ns timeout, `UINT64_MAX` = forever, 0 = poll,
//!   `QueryStatus`, `HostReset`). An event stays signalled until reset; wait events gate their
//!   command. (`zeCommandListHostSynchronize` is API 1.6, so it is not offered.)
//! * Engines: one thread per command queue and per immediate list, running commands in order;
//!   a command blocks (on condition variables, no spinning) until its wait events are
//!   signalled, runs, then signals its event. Destroying the queue or list stops and joins the
//!   thread, abandoning what it had not run.
//!
//! ## Environment (read once, at the first `zeInit`)
//! | Variable | Default | Meaning |
//! |---|---|---|
//! | `ZE_SOFT_DEVICES` | 2 | root devices (1..=64) |
//! | `ZE_SOFT_DEVICE_MEMORY` | 512M | bytes per device; suffixes K/M/G/T (binary) |
//! | `ZE_SOFT_PEER_GROUPS` | all one group | e.g. `0,1;2,3`; unlisted devices are alone |
//! | `ZE_SOFT_COPY_ENGINES` | 2 | queues in the COPY-only group (ordinal 1) |
//! | `ZE_SOFT_COPY_LATENCY_US` | 0 | sleep added to every command an engine runs |
//! | `ZE_SOFT_STRICT` | 1 | `0`: log range/context/peer violations and go on |
//!
//! Malformed values are reported on stderr and replaced by the default.
//!
//! ## Strictness
//! Each of these is an error result and increments the `strict_violations` counter, never a
//! silent success or a crash:
//! * a copy or fill touching memory outside every allocation of the list's context, or running
//!   past its allocation (`INVALID_ARGUMENT`; checked at append and again when the engine runs
//!   the command, so memory freed in between is caught);
//! * a device allocation of a device outside the list's device's peer group (`INVALID_ARGUMENT`);
//! * a command waiting on or signalling an event of another context (`INVALID_ARGUMENT`);
//! * `zeMemFree` of a pointer that is not an allocation's base (`INVALID_ARGUMENT`);
//! * a handle that was destroyed (`INVALID_NULL_HANDLE`), was never a handle
//!   (`INVALID_NULL_HANDLE`), or is of another kind (`INVALID_ARGUMENT`). Handles point to heap
//!   objects that start with a magic number; destroyed objects are poisoned and never freed, so
//!   a stale handle is always detected.
//!
//! With `ZE_SOFT_STRICT=0` the first three are logged and the command goes on; handle errors
//! always fail. Every C entry runs under `catch_unwind` (`ZE_RESULT_ERROR_UNKNOWN` on a panic).
//!
//! ## Handles and the loader
//! With one driver and no `ZE_ENABLE_LOADER_INTERCEPT`, the application holds the driver's own
//! handles; with `ZE_ENABLE_LOADER_INTERCEPT=1` the loader wraps them and unwraps them on every
//! call. The control entry ignores the driver handle's value (only null is refused), so it
//! works with either. The validation layer (`ZE_ENABLE_VALIDATION_LAYER=1
//! ZE_ENABLE_PARAMETER_VALIDATION=1`) finds nothing to reject on the copy path.

pub mod control;
mod driver;
mod path;

pub use path::{LIBRARY_FILE, library_path, route_loader, route_loader_with};
