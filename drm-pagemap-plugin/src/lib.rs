//! # drm-pagemap-plugin
//!
//! Out-of-tree backends for drm-pagemap, as shared objects an already-built runtime loads:
//! the versioned C ABI ([`abi`], declared for C in `include/drm_pagemap_plugin.h`), a Rust
//! SDK that exports a backend written against the core's traits ([`sdk`],
//! [`export_plugin!`]), and the host side that loads one (`host`, feature `host`; the
//! `drm-pagemap` facade re-exports it as `drm_pagemap::plugins`).
//!
//! ## The contract
//! - **One entry symbol per ABI version.** Version 1 is `drm_pagemap_plugin_v1`: no
//!   arguments, returns a static [`abi::DppPluginV1`] whose first fields are `abi_version` (1)
//!   and `struct_size`. A host that knows later versions probes their symbols first. On a
//!   mismatch (another version, a table too small, a required entry null) the host rejects the
//!   plug-in before calling anything else in it.
//! - **Tables mirror the core's traits one to one** (`Backend`, `HostMemory`, `PagemapOps`,
//!   `DevmemOps` with `CopyRequest` and `CopyCaps`, `FenceOps` with `NativeFence` and
//!   completion callbacks, `BackendError`); each starts with its `struct_size`, grows only at
//!   its end, and is read only as far as that size covers.
//! - **Fences cross by native handle and callback**, in both directions: a plug-in's fence
//!   is a core `Fence` on the host (its native handle and callbacks pass through, so it
//!   takes part in dependencies like any other), and a pre-fence is a core `Fence` in the
//!   plug-in.
//! - **The host services table** gives the plug-in fence context ids from the host's
//!   allocator (the SDK installs it before any fence is made, so ids never collide with the
//!   host's), host fences it can signal, `on_signal` on the host's fence worker, and a log:
//!   a plug-in never relies on the statics of its own copy of the core for anything shared.
//! - **Opaque handles, caller-allocated buffers, integer status codes**; strings belong to
//!   whoever made them (an error message stays valid until the same thread's next call into
//!   its maker). Arrays of `Pfn`, `HostFrame` and `DmaAddr` cross as `uint32_t*` / `uint64_t*`
//!   without copies (the core's types are `repr(transparent)`).
//! - **Nothing unwinds across the boundary**: every `extern "C"` entry on both sides runs in
//!   `catch_unwind`; a panic is the status `DPP_E_PANICKED` with its message.
//! - **Never unloaded** while anything from it may run: the host keeps every plug-in it
//!   accepted loaded for the process's life, and destroys a backend only after the last
//!   pagemap, host memory and fence from it.
//!
//! Unsafe code lives here (and in plug-ins), never in the core.

pub mod abi;
pub mod fence;
pub mod ffi;
#[cfg(feature = "host")]
pub mod host;
pub mod sdk;

/// The core crate, for plug-ins written with the SDK (one version with the SDK's).
pub use drm_pagemap_core as core;
