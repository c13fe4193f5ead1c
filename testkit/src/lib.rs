//! # drm-pagemap-testkit
//!
//! **Test tooling, not for production.** What the tests, the fuzz drivers, the examples and
//! the simulated backend use to drive and observe the engine ([`drm_pagemap_core`]); none of
//! it is part of the engine's API, and a production backend or application needs none of it.
//!
//! - [`inject`]: a [`FaultInjector`](inject::FaultInjector) that wraps any backend's
//!   pagemaps and host memory and fails the Nth allocation, map or copy call, or makes the Nth
//!   copy fence signal an error or never signal. Its errors are
//!   [`BackendErrorKind::Injected`], which the core defines so that they cross crates like
//!   any backend error.
//! - [`layout`]: the one-character-per-page notation of the `migrate` example and the tests
//!   (`s*1000,1*500,.,2*7`): parsing, formatting, and the layout of a range of an
//!   [`AddressSpace`](drm_pagemap_core::AddressSpace) ([`layout::of`]).
//! - [`mem`]: memory of real bytes made of atomic words ([`AtomicArena`](mem::AtomicArena)),
//!   the address encoding of the simulator ([`mem::arena_addr`]) and a [`HostMemory`] over
//!   an arena ([`ArenaHostMemory`](mem::ArenaHostMemory)): what the simulated backend is
//!   built from.
//!
//! - [`bytes`]: host memory over any byte store ([`FrameBytes`](bytes::FrameBytes)), so the
//!   simulated backend can run on memory a process maps (memfd frames of `drm-pagemap-uffd`).
//!
//! The contract is a test's: wrappers change outcomes only where armed, and every failure
//! they cause is a typed error or (with
//! [`FaultInjector::set_panics`](inject::FaultInjector::set_panics)) a panic, never undefined
//! behaviour. Nothing here uses `unsafe`.

#![forbid(unsafe_code)]

pub mod bytes;
pub mod fence;
pub mod inject;
pub mod layout;
pub mod mem;
mod time;

// `mem` and `inject` were the core's modules: their `crate::` paths (kept so the move merges
// cleanly) name these core items.
use drm_pagemap_core::{
    BackendError, BackendErrorKind, DeviceId, Direction, DmaAddr, HostFrame, HostMemory, PageSize,
};
