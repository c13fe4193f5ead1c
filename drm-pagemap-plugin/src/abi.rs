//! The C ABI, version 1: `#[repr(C)]` tables that mirror the core's traits one to one.
//! `include/drm_pagemap_plugin.h` declares the same types for C; a test compiles a layout
//! check of every struct against these definitions.
//!
//! | Rust trait (drm-pagemap-core)          | Table                                   |
//! |----------------------------------------|-----------------------------------------|
//! | `Backend`                              | [`DppBackendOps`] on a [`DppBackend`]    |
//! | `HostMemory`                           | [`DppHostMemoryOps`] on a [`DppHostMemory`] |
//! | `PagemapOps`                           | [`DppPagemapOps`] on a [`DppPagemap`]    |
//! | `DevmemOps` (`CopyRequest`, `CopyCaps`)| [`DppDevmemOps`] ([`DppCopyRequest`], [`DppCopyCaps`]) |
//! | `FenceOps` (`NativeFence`, callbacks)  | [`DppFenceOps`] on a [`DppFence`]        |
//! | `BackendError` / `BackendErrorKind`    | [`DppError`] and the `DPP_E_*` codes     |
//! | `FenceContextSource`, `on_signal`, logs| [`DppHostServices`] (host to plug-in)    |
//!
//! Rules of every table: the first field is its `struct_size` (the plug-in table and the
//! host services also start with `abi_version`); a reader reads only the fields the size
//! covers (a field past it is "absent": null, or zero); tables only grow at the end; every
//! entry is `Option<fn>` so a null entry is seen. Handles are opaque `void*`. Entries return an
//! `i32` status ([`DPP_OK`] or an error code) and fill a caller-allocated [`DppError`] whose
//! strings belong to the callee and stay valid until the same thread's next call into it.

use drm_pagemap_core::NativeFence;
use std::ffi::{c_char, c_void};

/// The ABI version this crate defines.
pub const ABI_VERSION: u32 = 1;
/// The entry symbol of ABI version 1 (NUL-terminated, as `dlsym` wants it).
pub const ENTRY_SYMBOL_V1: &[u8] = b"drm_pagemap_plugin_v1\0";
/// The signature of the entry symbol: no arguments, a pointer to a static [`DppPluginV1`].
pub type EntryV1 = unsafe extern "C" fn() -> *const DppPluginV1;

/// Success.
pub const DPP_OK: i32 = 0;
/// A fence's status: not signalled yet (only from [`DppFenceOps::status`]).
pub const DPP_PENDING: i32 = 1;
/// A fence wait ran out of time (only from [`DppFenceOps::wait`]).
pub const DPP_TIMEOUT: i32 = 2;
/// `BackendErrorKind::OutOfMemory`.
pub const DPP_E_OUT_OF_MEMORY: i32 = 10;
/// `BackendErrorKind::DeviceLost`.
pub const DPP_E_DEVICE_LOST: i32 = 11;
/// `BackendErrorKind::MapFailed`.
pub const DPP_E_MAP_FAILED: i32 = 12;
/// `BackendErrorKind::CopyFailed`.
pub const DPP_E_COPY_FAILED: i32 = 13;
/// `BackendErrorKind::Unsupported`; also "this optional feature is absent".
pub const DPP_E_UNSUPPORTED: i32 = 14;
/// `BackendErrorKind::Unavailable`.
pub const DPP_E_UNAVAILABLE: i32 = 15;
/// `BackendErrorKind::Injected`.
pub const DPP_E_INJECTED: i32 = 16;
/// `BackendErrorKind::BadConfig`.
pub const DPP_E_BAD_CONFIG: i32 = 17;
/// `BackendErrorKind::Driver`: [`DppError::api`] and [`DppError::driver_code`] are set.
pub const DPP_E_DRIVER: i32 = 18;
/// The callee panicked (Rust) or hit an internal bug; the call did nothing the caller must
/// undo.
pub const DPP_E_PANICKED: i32 = 19;
/// An argument broke the ABI's rules (a null pointer, an unknown page size).
pub const DPP_E_INVALID_ARGUMENT: i32 = 20;

/// Flag of [`DppPluginV1::flags`]: the backend drives real GPUs (`auto` prefers it).
pub const DPP_PLUGIN_IS_GPU: u64 = 1;

/// [`DppConfig::flags`]: `devices` is set.
pub const DPP_CONFIG_HAS_DEVICES: u32 = 1;
/// [`DppConfig::flags`]: `device_capacity` is set.
pub const DPP_CONFIG_HAS_DEVICE_CAPACITY: u32 = 2;
/// [`DppConfig::flags`]: `host_capacity` is set.
pub const DPP_CONFIG_HAS_HOST_CAPACITY: u32 = 4;

/// `Direction::ToDevice`.
pub const DPP_DIR_TO_DEVICE: u32 = 0;
/// `Direction::FromDevice`.
pub const DPP_DIR_FROM_DEVICE: u32 = 1;

/// Log levels of [`DppHostServices::log`].
pub const DPP_LOG_ERROR: u32 = 1;
/// Warning.
pub const DPP_LOG_WARN: u32 = 2;
/// Information.
pub const DPP_LOG_INFO: u32 = 3;
/// Debugging detail.
pub const DPP_LOG_DEBUG: u32 = 4;

/// An error, filled by the callee into the caller's struct when an entry fails. `message`
/// and `api` (both may be null) belong to the callee and stay valid until the same thread's
/// next call into it; the caller copies what it keeps.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DppError {
    /// The `DPP_E_*` code (the same the entry returned).
    pub kind: i32,
    /// Zero (reserved).
    pub flags: u32,
    /// With [`DPP_E_DRIVER`]: the raw driver code (`CUresult`, `ze_result_t`).
    pub driver_code: i64,
    /// With [`DPP_E_DRIVER`]: the driver entry point, NUL-terminated.
    pub api: *const c_char,
    /// What failed, naming the device, pagemap or range; NUL-terminated UTF-8.
    pub message: *const c_char,
}

impl DppError {
    /// An empty error struct for a callee to fill.
    pub const fn empty() -> DppError {
        DppError {
            kind: DPP_OK,
            flags: 0,
            driver_code: 0,
            api: std::ptr::null(),
            message: std::ptr::null(),
        }
    }
}

/// The native handle of a fence: the core's `NativeFence` (`#[repr(C)]`:
/// `{ uint32_t kind; uint32_t flags; uint64_t domain; uint64_t handle; }`).
pub type DppNativeFence = NativeFence;

/// A completion callback: `status` is [`DPP_OK`] or an error code, `error` its details
/// (null on success; valid only during the call).
pub type DppFenceCallback =
    unsafe extern "C" fn(user: *mut c_void, status: i32, error: *const DppError);

/// The operations of a fence (`FenceOps`). Implemented by whichever side made the fence:
/// the plug-in for the fences of its copies, the host for the pre-fences it hands in.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DppFenceOps {
    /// `sizeof` this table as its implementer knows it.
    pub struct_size: u32,
    /// Zero (reserved).
    pub reserved: u32,
    /// Required. Another reference to the fence: returns the object to use (and release) for
    /// it. Any thread; does not block.
    pub retain: Option<unsafe extern "C" fn(obj: *mut c_void) -> *mut c_void>,
    /// Required. Drops one reference. Any thread; does not block.
    pub release: Option<unsafe extern "C" fn(obj: *mut c_void)>,
    /// Required. The fence's timeline (a context id from the host's allocator).
    pub context: Option<unsafe extern "C" fn(obj: *mut c_void) -> u64>,
    /// Required. Its position on the timeline.
    pub seqno: Option<unsafe extern "C" fn(obj: *mut c_void) -> u64>,
    /// Required. Polls: [`DPP_PENDING`], [`DPP_OK`] (signalled), or the error it signalled
    /// (then `error` is filled). Sticky once not pending. Does not block.
    pub status: Option<unsafe extern "C" fn(obj: *mut c_void, error: *mut DppError) -> i32>,
    /// Required. Blocks until signalled or `timeout_ns` passed (`UINT64_MAX`: no limit):
    /// [`DPP_OK`], [`DPP_TIMEOUT`], or the error it signalled.
    pub wait: Option<
        unsafe extern "C" fn(obj: *mut c_void, timeout_ns: u64, error: *mut DppError) -> i32,
    >,
    /// Optional (null: none). Fills `out` and returns [`DPP_OK`] when the fence has a native
    /// handle whose completion is its outcome; [`DPP_E_UNSUPPORTED`] when it has none. The
    /// handle is valid while a reference to the fence is held.
    pub native: Option<unsafe extern "C" fn(obj: *mut c_void, out: *mut DppNativeFence) -> i32>,
    /// Optional (null: none). Registers `cb(user, ...)` to run exactly once with the outcome,
    /// in the signalling thread (it must be short and not block), or right away when signalled
    /// already: returns [`DPP_OK`]. [`DPP_E_UNSUPPORTED`]: not registered (the caller polls).
    pub add_callback: Option<
        unsafe extern "C" fn(obj: *mut c_void, cb: DppFenceCallback, user: *mut c_void) -> i32,
    >,
    /// Optional (null: not a container). How many fences this one aggregates (0: it is a
    /// single fence).
    pub member_count: Option<unsafe extern "C" fn(obj: *mut c_void) -> usize>,
    /// Optional, with `member_count`. Fills `out` with a new reference to member `index`
    /// (the caller releases it).
    pub member_at:
        Option<unsafe extern "C" fn(obj: *mut c_void, index: usize, out: *mut DppFence) -> i32>,
}

/// A reference to a fence: an object and its operations. `obj == NULL` means "no fence".
/// Whoever receives one as an out-parameter owns that reference and releases it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DppFence {
    /// The fence object (opaque to the other side).
    pub obj: *mut c_void,
    /// Its operations (static, or alive while the object is).
    pub ops: *const DppFenceOps,
}

impl DppFence {
    /// No fence.
    pub const NONE: DppFence = DppFence {
        obj: std::ptr::null_mut(),
        ops: std::ptr::null(),
    };
}

/// What the host offers a plug-in; handed to `probe` and `open` and valid until the process
/// ends (a plug-in may keep the pointer). Every entry may be called from any thread.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DppHostServices {
    /// [`ABI_VERSION`].
    pub abi_version: u32,
    /// `sizeof` this table as the host knows it.
    pub struct_size: u32,
    /// The host's context argument for the entries below.
    pub host: *mut c_void,
    /// Reserves `count` consecutive fence context ids from the host's allocator and returns
    /// the first (never 0, never twice): the plug-in's fences share the host's id space.
    pub reserve_fence_contexts: Option<unsafe extern "C" fn(host: *mut c_void, count: u64) -> u64>,
    /// Logs `len` bytes of UTF-8 at `level` (`DPP_LOG_*`); the host copies them.
    pub log:
        Option<unsafe extern "C" fn(host: *mut c_void, level: u32, msg: *const c_char, len: usize)>,
    /// Creates a host fence on (`context`, `seqno`): `out_fence` gets a reference to it,
    /// `out_signal` a one-shot signal handle that [`DppHostServices::fence_signal`] consumes.
    pub fence_create: Option<
        unsafe extern "C" fn(
            host: *mut c_void,
            context: u64,
            seqno: u64,
            out_fence: *mut DppFence,
            out_signal: *mut *mut c_void,
        ) -> i32,
    >,
    /// Signals the fence of `signal` (success when `error` is null) and frees the handle.
    /// Runs the fence's callbacks in this thread.
    pub fence_signal: Option<
        unsafe extern "C" fn(host: *mut c_void, signal: *mut c_void, error: *const DppError),
    >,
    /// Runs `cb(user, ...)` exactly once on the host's fence worker thread once `fence`
    /// signalled (`on_signal`): where a plug-in submits work deferred behind a fence,
    /// without a thread of its own. Borrows `fence`.
    pub on_signal: Option<
        unsafe extern "C" fn(
            host: *mut c_void,
            fence: *const DppFence,
            cb: DppFenceCallback,
            user: *mut c_void,
        ) -> i32,
    >,
}

/// One backend option, `key=value` (full key, e.g. `tier.path`); UTF-8 with lengths.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DppOption {
    /// The key.
    pub key: *const c_char,
    /// Its length in bytes.
    pub key_len: usize,
    /// The value.
    pub value: *const c_char,
    /// Its length in bytes.
    pub value_len: usize,
}

/// `BackendConfig`: what to open the backend with. Borrowed for the call.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DppConfig {
    /// `sizeof` this struct as the host knows it.
    pub struct_size: u32,
    /// `DPP_CONFIG_HAS_*`: which of the sizes below are set.
    pub flags: u32,
    /// Number of devices.
    pub devices: u64,
    /// Bytes of device memory per device.
    pub device_capacity: u64,
    /// Bytes of host memory for system pages.
    pub host_capacity: u64,
    /// The options (every backend's: a plug-in reads the keys under its name).
    pub options: *const DppOption,
    /// How many.
    pub option_count: usize,
    /// The options list's version (`BackendOptions::version`).
    pub options_version: u32,
    /// Zero (reserved).
    pub reserved: u32,
}

/// The plug-in's table, ABI version 1: what `drm_pagemap_plugin_v1()` returns. Static: it
/// lives as long as the library. The host checks `abi_version`, `struct_size` and the required
/// entries before it calls anything.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DppPluginV1 {
    /// 1.
    pub abi_version: u32,
    /// `sizeof(dpp_plugin_v1)` as the plug-in was built.
    pub struct_size: u32,
    /// Required. The backend's name (`[a-z0-9_-]+`, the prefix of its option keys).
    pub name: *const c_char,
    /// Optional. One line for listings.
    pub description: *const c_char,
    /// `DPP_PLUGIN_*` flags.
    pub flags: u64,
    /// Required. Whether the backend can be used here ([`DPP_OK`]) or why not (an error with a
    /// message). Must not open anything lasting. May block briefly (a driver query).
    pub probe:
        Option<unsafe extern "C" fn(host: *const DppHostServices, error: *mut DppError) -> i32>,
    /// Required. Opens the backend: fills `out`, which the host destroys with
    /// [`DppBackendOps::destroy`] once no object from it is alive.
    pub open: Option<
        unsafe extern "C" fn(
            host: *const DppHostServices,
            config: *const DppConfig,
            out: *mut DppBackend,
            error: *mut DppError,
        ) -> i32,
    >,
}

// SAFETY: the plug-in table is immutable static data (C strings and function pointers) that
// any thread may read.
unsafe impl Sync for DppPluginV1 {}
// SAFETY: as above: the table and the strings it points to are never written.
unsafe impl Send for DppPluginV1 {}
// SAFETY: the fence operations table is immutable (function pointers only).
unsafe impl Sync for DppFenceOps {}
// SAFETY: the host services table is immutable; its `host` argument is only ever passed back
// to the host's own entries, which are thread-safe.
unsafe impl Sync for DppHostServices {}
// SAFETY: as above: the host's entries accept calls from any thread.
unsafe impl Send for DppHostServices {}

/// `DeviceInfo`: one device.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DppDeviceInfo {
    /// Its id.
    pub id: u32,
    /// Bytes of `name` used.
    pub name_len: u8,
    /// Its name, UTF-8, not NUL-terminated.
    pub name: [u8; 63],
    /// Bytes of device memory.
    pub memory_bytes: u64,
}

/// An opened backend: object and operations.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DppBackend {
    /// The backend object.
    pub obj: *mut c_void,
    /// Its operations.
    pub ops: *const DppBackendOps,
}

/// `Backend`. Entries may be called from any thread at once.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DppBackendOps {
    /// `sizeof` this table.
    pub struct_size: u32,
    /// Zero (reserved).
    pub reserved: u32,
    /// Required. Frees the backend; called once, after every pagemap, host memory and fence
    /// from it is gone.
    pub destroy: Option<unsafe extern "C" fn(obj: *mut c_void)>,
    /// Required. How many devices.
    pub device_count: Option<unsafe extern "C" fn(obj: *mut c_void) -> u32>,
    /// Required. Fills device `index`: [`DPP_OK`], or [`DPP_E_INVALID_ARGUMENT`] past the end.
    pub device_info:
        Option<unsafe extern "C" fn(obj: *mut c_void, index: u32, out: *mut DppDeviceInfo) -> i32>,
    /// Required. The host memory system pages live in; called once, the host keeps it.
    pub host_memory: Option<
        unsafe extern "C" fn(
            obj: *mut c_void,
            out: *mut DppHostMemory,
            error: *mut DppError,
        ) -> i32,
    >,
    /// Required. Creates a pagemap.
    pub create_pagemap: Option<
        unsafe extern "C" fn(
            obj: *mut c_void,
            spec: *const DppPagemapSpec,
            out: *mut DppPagemap,
            error: *mut DppError,
        ) -> i32,
    >,
    /// Optional (null: never). 1 when `a`'s copy engine can write `b`'s memory directly.
    pub can_access_peer: Option<unsafe extern "C" fn(obj: *mut c_void, a: u32, b: u32) -> i32>,
}

/// `PagemapSpec`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DppPagemapSpec {
    /// The pagemap id (0..=255).
    pub id: u32,
    /// The device.
    pub device: u32,
    /// The owner, when `has_owner` is 1; else the backend picks.
    pub owner: u32,
    /// 1 when `owner` is set.
    pub has_owner: u32,
    /// Bytes it may hand out.
    pub capacity_bytes: u64,
}

/// A pagemap made by [`DppBackendOps::create_pagemap`]: one object with two tables.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DppPagemap {
    /// The pagemap object, passed to both tables.
    pub obj: *mut c_void,
    /// `PagemapOps`.
    pub pagemap_ops: *const DppPagemapOps,
    /// `DevmemOps`.
    pub devmem_ops: *const DppDevmemOps,
    /// Its owner (the backend's choice when the spec had none).
    pub owner: u32,
    /// Its device.
    pub device: u32,
    /// A name for messages, NUL-terminated; valid while the object lives (may be null).
    pub name: *const c_char,
}

/// `PagemapOps`, plus the pagemap's lifetime. Entries may be called from any thread at once.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DppPagemapOps {
    /// `sizeof` this table.
    pub struct_size: u32,
    /// Zero (reserved).
    pub reserved: u32,
    /// Required. Frees the pagemap object, once, when the host no longer uses it (its
    /// allocations were all released before).
    pub destroy: Option<unsafe extern "C" fn(obj: *mut c_void)>,
    /// Required. `device_map`: fills `out[0..n]` with the addresses by which `device`
    /// reaches `pfns[0..n]` (pages of `page_size` bytes; `dir` a `DPP_DIR_*`). All or nothing.
    pub device_map: Option<
        unsafe extern "C" fn(
            obj: *mut c_void,
            device: u32,
            pfns: *const u32,
            n: usize,
            page_size: u64,
            dir: u32,
            out: *mut u64,
            error: *mut DppError,
        ) -> i32,
    >,
    /// Required. `device_unmap`: undoes it; 0 entries are skipped. Cannot fail.
    pub device_unmap: Option<
        unsafe extern "C" fn(
            obj: *mut c_void,
            device: u32,
            addrs: *const u64,
            n: usize,
            page_size: u64,
            dir: u32,
        ),
    >,
}

/// `DevmemBacking`: one device-memory allocation.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DppDevmemBacking {
    /// The backend's identification of the allocation.
    pub cookie: u64,
    /// Number of pages.
    pub npages: u64,
    /// Bytes per page.
    pub page_size: u64,
    /// From `allocate`: the fence to wait for before writing the pages (the host takes the
    /// reference), or `obj == NULL` when they are ready. In release calls: always none.
    pub pre_migrate_fence: DppFence,
}

/// `CopyRequest`: `count` pages of the executor's device and, for each, the other side's
/// address (0: skip the entry). Borrowed for the call.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DppCopyRequest {
    /// Bytes per page.
    pub page_size: u64,
    /// The executor's pages.
    pub pages: *const u32,
    /// The other side's addresses.
    pub addrs: *const u64,
    /// Entries in both arrays.
    pub count: usize,
    /// No destination byte may be written before this fence signals (null: none). Borrowed:
    /// `retain` it to keep it past the call.
    pub pre_fence: *const DppFence,
}

/// `CopyCaps` (see the core's `caps` module): `max_command_bytes` and `batch_bytes_hint` are
/// 0 for "none".
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DppCopyCaps {
    /// The most bytes one command may move; 0: no limit.
    pub max_command_bytes: u64,
    /// How many of `native_kinds` are used (at most 4).
    pub native_kind_count: u32,
    /// The native fence kinds the queue waits on by itself.
    pub native_kinds: [u32; 4],
    /// `HostFenceWait`: 0 blocking, 1 in queue, 2 deferred.
    pub host_fences: u32,
    /// 1 when calls run in submission order.
    pub in_order: u32,
    /// Bytes per call from which the per-call cost is amortised; 0: no preference.
    pub batch_bytes_hint: u64,
}

/// `DevmemOps`. Entries may be called from any thread at once; none blocks on the device
/// except where noted (copies are asynchronous: they return a fence).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DppDevmemOps {
    /// `sizeof` this table.
    pub struct_size: u32,
    /// Zero (reserved).
    pub reserved: u32,
    /// Required. Allocates `npages` pages of `page_size`; they read as zeros once the
    /// backing's pre-migrate fence signalled.
    pub allocate: Option<
        unsafe extern "C" fn(
            obj: *mut c_void,
            npages: u64,
            page_size: u64,
            out: *mut DppDevmemBacking,
            error: *mut DppError,
        ) -> i32,
    >,
    /// Required. Writes the allocation's pfns, in address order, into `out[0..n]`
    /// (`n == backing->npages`).
    pub populate_devmem_pfn: Option<
        unsafe extern "C" fn(
            obj: *mut c_void,
            backing: *const DppDevmemBacking,
            out: *mut u32,
            n: usize,
            error: *mut DppError,
        ) -> i32,
    >,
    /// Required. Copies into this device's pages; `out` gets the fence of the copy. Must not
    /// write before the pre-fence signalled; a failed pre-fence fails the returned fence.
    pub copy_to_devmem: Option<
        unsafe extern "C" fn(
            obj: *mut c_void,
            req: *const DppCopyRequest,
            out: *mut DppFence,
            error: *mut DppError,
        ) -> i32,
    >,
    /// Required. Copies this device's pages out to the addresses; as `copy_to_devmem`.
    pub copy_to_ram: Option<
        unsafe extern "C" fn(
            obj: *mut c_void,
            req: *const DppCopyRequest,
            out: *mut DppFence,
            error: *mut DppError,
        ) -> i32,
    >,
    /// Required. Frees an allocation, exactly once, when no page uses it.
    pub devmem_release:
        Option<unsafe extern "C" fn(obj: *mut c_void, backing: *const DppDevmemBacking)>,
    /// Optional (null: `devmem_release` each). Frees `n` allocations at once.
    pub devmem_release_many:
        Option<unsafe extern "C" fn(obj: *mut c_void, backings: *const DppDevmemBacking, n: usize)>,
    /// Optional (null: `devmem_release`). Frees an allocation no copy was issued into.
    pub devmem_release_unused:
        Option<unsafe extern "C" fn(obj: *mut c_void, backing: *const DppDevmemBacking)>,
    /// Required. Total bytes this pagemap can allocate.
    pub capacity_bytes: Option<unsafe extern "C" fn(obj: *mut c_void) -> u64>,
    /// Optional (null: conservative caps). Fills the pagemap's copy capabilities; constant.
    pub caps: Option<unsafe extern "C" fn(obj: *mut c_void, out: *mut DppCopyCaps)>,
}

/// The host memory of a backend: object and operations.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DppHostMemory {
    /// The host memory object.
    pub obj: *mut c_void,
    /// Its operations.
    pub ops: *const DppHostMemoryOps,
}

/// `HostMemory`. Entries may be called from any thread at once. `read`, `write` and `zero`
/// cannot fail in the trait: a failure there is a plug-in bug, which the host reports loudly.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DppHostMemoryOps {
    /// `sizeof` this table.
    pub struct_size: u32,
    /// Zero (reserved).
    pub reserved: u32,
    /// Required. Frees the object, once, when the host no longer uses it.
    pub destroy: Option<unsafe extern "C" fn(obj: *mut c_void)>,
    /// Required. Allocates `n` frames of `page_size` into `out` (4 KiB frame numbers). All or
    /// nothing.
    pub alloc_frames: Option<
        unsafe extern "C" fn(
            obj: *mut c_void,
            page_size: u64,
            out: *mut u64,
            n: usize,
            error: *mut DppError,
        ) -> i32,
    >,
    /// Required. Returns frames to the pool.
    pub free_frames: Option<
        unsafe extern "C" fn(obj: *mut c_void, frames: *const u64, n: usize, page_size: u64),
    >,
    /// Required. Copies `len` bytes out of `frame` from `offset` (inside the page).
    pub read: Option<
        unsafe extern "C" fn(
            obj: *mut c_void,
            frame: u64,
            offset: usize,
            buf: *mut u8,
            len: usize,
            error: *mut DppError,
        ) -> i32,
    >,
    /// Required. Copies `len` bytes into `frame` at `offset` (inside the page).
    pub write: Option<
        unsafe extern "C" fn(
            obj: *mut c_void,
            frame: u64,
            offset: usize,
            data: *const u8,
            len: usize,
            error: *mut DppError,
        ) -> i32,
    >,
    /// Required. Zeroes a whole page.
    pub zero: Option<
        unsafe extern "C" fn(
            obj: *mut c_void,
            frame: u64,
            page_size: u64,
            error: *mut DppError,
        ) -> i32,
    >,
    /// Required. The addresses by which `device` reaches `frames[0..n]`, into `out`.
    pub map_frames: Option<
        unsafe extern "C" fn(
            obj: *mut c_void,
            device: u32,
            frames: *const u64,
            n: usize,
            page_size: u64,
            dir: u32,
            out: *mut u64,
            error: *mut DppError,
        ) -> i32,
    >,
    /// Required. Undoes `map_frames`; 0 entries are skipped.
    pub unmap_frames: Option<
        unsafe extern "C" fn(
            obj: *mut c_void,
            device: u32,
            addrs: *const u64,
            n: usize,
            page_size: u64,
            dir: u32,
        ),
    >,
    /// Required. Bytes of frames the pool can hand out in total.
    pub capacity_bytes: Option<unsafe extern "C" fn(obj: *mut c_void) -> u64>,
}

// SAFETY: the operation tables hold function pointers only; they are immutable.
unsafe impl Sync for DppBackendOps {}
// SAFETY: as above.
unsafe impl Sync for DppPagemapOps {}
// SAFETY: as above.
unsafe impl Sync for DppDevmemOps {}
// SAFETY: as above.
unsafe impl Sync for DppHostMemoryOps {}

/// Reads a table of type `T` whose producer says it is `struct_size` bytes long: the fields
/// the size covers are copied, the rest read as zero (absent entries). This is how both sides
/// read each other's tables, so a table may grow at its end without breaking older readers.
///
/// # Safety
/// `ptr` must point to at least `struct_size` readable bytes, and `T` must be a table of this
/// module (all fields integers, raw pointers or `Option<fn>`: zero is a valid value).
pub unsafe fn read_table<T: Copy>(ptr: *const T, struct_size: u32) -> T {
    let n = (struct_size as usize).min(std::mem::size_of::<T>());
    let mut out = std::mem::MaybeUninit::<T>::zeroed();
    // SAFETY: the caller guarantees `n <= struct_size` readable bytes at `ptr`; `out` has
    // `size_of::<T>() >= n` bytes; the two do not overlap.
    unsafe { std::ptr::copy_nonoverlapping(ptr.cast::<u8>(), out.as_mut_ptr().cast::<u8>(), n) };
    // SAFETY: every byte is initialised (zeroed, then partly overwritten) and zero is valid
    // for every field of the tables this is used on (the caller's guarantee).
    unsafe { out.assume_init() }
}

/// The `struct_size` of `T` as a table writes it.
pub const fn size_of_table<T>() -> u32 {
    std::mem::size_of::<T>() as u32
}
