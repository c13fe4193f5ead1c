//! # drm-pagemap-core
//!
//! The engine of drm-pagemap: it migrates ranges of pages between system memory and the
//! device memory of several devices, the way the Linux kernel's `drm_pagemap` does for
//! Intel Xe after "drm/pagemap: Support source interconnect migration", in user space.
//!
//! ## The contract
//! - **All pages or none.** [`AddressSpace::migrate`] collects every page of a range, lets
//!   each source device push its own pages (`copy_to_ram` of the source, with
//!   [`MigrateDetails::source_peer_migrates`]) while the destination pulls system pages
//!   (`copy_to_devmem`), orders every write after the destination's pre-migrate fence, and
//!   switches the page table only once every copy has landed without error.
//! - **Nothing is lost.** Any failure (allocation, mapping, copy, fence error or timeout)
//!   leaves every page's data where it was, readable, and releases the destination
//!   allocation exactly once.
//! - **Bad input changes nothing.** Every error a caller cannot rule out is a typed
//!   [`Error`] naming the range, the pagemap and the device; nothing here panics on input.
//! - **Release exactly once.** Each device page references its allocation; the allocation's
//!   `devmem_release` runs once, when its last page is gone.
//! - **One copy call per source.** With [`Coalesce::BySource`] (the default) a migration
//!   issues one call per distinct (executor, operation); all calls are issued before any
//!   wait, so devices copy concurrently. A call of more than
//!   [`MigrateDetails::max_call_pages`] pages is issued in pieces of that many (in rounds
//!   over the sources), so the devices start on the first pieces while the CPU maps the rest.
//! - **Back to RAM** ([`AddressSpace::evict_to_ram`], CPU access through
//!   [`AddressSpace::read`] / [`AddressSpace::write`]) is executed by the owning device.
//!   CPU access honours the allocation's timeslice; eviction does not (memory pressure
//!   wins, as upstream's `drm_pagemap_evict_to_ram`).
//! - **CPU access makes progress.** While a CPU access waits (a timeslice, a running
//!   migration, its own copy back), no new migration may take its pages
//!   ([`BusyReason::CpuAccess`]): it completes within the timeslice plus the copies of its
//!   own pages, however busy other movers are. [`AddressSpace::read_timeout`] bounds the
//!   wait.
//! - **Durations never overflow.** Every `Duration` a caller passes may be
//!   `Duration::MAX` ("for ever"); a deadline past any reachable instant is no deadline.
//! - **No lock outlives a panic.** A panic in a backend call or in the caller's work
//!   between locking pages and the commit rolls the operation back (pages unlocked and
//!   unchanged, the destination released once the copies already issued are done) and then
//!   continues to the caller.
//!
//! - **No environment.** Nothing here reads an environment variable except
//!   [`BackendConfig::from_env`], which binaries call; backends take their knobs from
//!   [`BackendConfig::options`] ([`options`]: a versioned `backend.key=value` list read with
//!   typed getters; an unknown key or a bad value is an [`OptionError`] naming the key).
//!
//! - **Counted, always.** Every address space keeps statistics ([`AddressSpace::stats`],
//!   [`stats`]): bytes, pages, calls and device time per link, per page size, histograms,
//!   what is in flight, memory in use, failures by kind. Relaxed atomics in fixed arrays:
//!   no lock or allocation on the hot path.
//! - **Traced, when asked.** Every phase of a migration (collect, plan, map, issue, wait,
//!   commit or rollback), eviction, the CPU-fault path and releases emit `tracing` spans and
//!   events (target `drm_pagemap`) with structured fields (range, pages, bytes, executor,
//!   op, pagemap, outcome); per-call spans are at `debug`/`trace` level. Without a
//!   subscriber each costs a check of the global level filter: no formatting, no
//!   allocation.
//!
//! - **Memory of its own, bounded.** A migration's buffers (about 40 bytes per page) stay
//!   with the thread up to 16,384 pages and are freed above that, unless the caller keeps a
//!   set for its large ranges ([`AddressSpace::keep_buffers`]).
//!
//! The core has no `unsafe` and no FFI: backends ([`HostMemory`], [`PagemapOps`],
//! [`DevmemOps`]) bring the hardware. Page state lives in packed arrays (one `u64` per page),
//! in chunks allocated when first written: a range costs memory for the pages it populates,
//! not for its size.

#![forbid(unsafe_code)]

mod alloc;
mod backend;
mod caps;
mod cpu_map;
mod error;
mod extent;
pub mod fence;
mod homes;
mod host_info;
mod mapping;
mod migrate;
mod mm;
pub mod options;
mod page;
mod plan;
mod reclaim;
mod scratch;
pub mod stats;
mod sync;
mod table;
mod time;
mod to_ram;
mod txn;
mod types;

pub use alloc::{AllocId, AllocState, AllocationInfo};
pub use backend::{
    Backend, BackendConfig, CopyRequest, DeviceInfo, DeviceName, DevmemBacking, DevmemOps,
    HostMemory, Pagemap, PagemapOps, PagemapSpec,
};
pub use caps::{CopyCaps, HostFenceWait, NativeFenceKinds};
pub use cpu_map::CpuMappings;
pub use error::{
    BackendError, BackendErrorKind, BackendOp, BusyReason, Error, FenceError, FenceRole,
    RangeProblem, Result,
};
pub use extent::ExtentAllocator;
pub use fence::{
    Dependencies, Fence, FenceArray, FenceCallback, FenceContext, FenceContextSource,
    FenceContexts, FenceOps, FenceStatus, FenceTimeline, HostFence, NativeFence, NativeFenceKind,
    NativeWait, sort_dependencies,
};
pub use homes::HomeExtents;
pub use host_info::available_memory;
pub use migrate::{
    CopyCall, MigrateDetails, MigrateOutcome, MigrateReport, MigrateTiming, WhileCopying,
};
pub use mm::{AddressSpace, PageBacking, PageLocation};
pub use options::{BackendOption, BackendOptions, OptionError, OptionReader};
pub use plan::{Classified, Coalesce, Plan, PlannedCall};
pub use reclaim::ReleaseMode;
pub use scratch::KeptBufferInfo;
pub use stats::{
    FailureKind, Failures, Histogram, LinkStats, Location, PageSizeStats, PagemapStats,
    StatsSnapshot,
};
pub use to_ram::EvictReport;
pub use types::{
    CopyOp, DeviceId, Direction, DmaAddr, GRANULE, HostFrame, OwnerId, PageSize, PagemapId, Pfn,
    VaRange,
};
