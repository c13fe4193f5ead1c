//! # xe-svm
//!
//! The layer a GPU runtime talks to, modelled on Intel Xe's shared virtual memory (SVM) over
//! `drm_pagemap`: per device a GPU VM that mirrors the CPU's address space, cut into SVM
//! ranges of 2 MiB, 64 KiB or 4 KiB; a GPU fault handler that places a range where it should
//! live and builds the device's page table for it; madvise-like attributes; the copy path's
//! fence policy; device-memory accounting with least-recently-used eviction; and statistics
//! cheap enough to stay on. Backend-neutral: it runs over any [`drm_pagemap_core::Backend`]
//! (the simulated one, CUDA).
//!
//! ## The contract
//! - **Faults** ([`GpuVm::handle_gpu_fault`]): on success the VM's page table for the SVM
//!   range holding the address maps every page for the faulting device, at the place the
//!   attributes and the access ask for (atomic: the device's own memory; otherwise the
//!   preferred location, or system memory when device memory cannot be had). A range already
//!   resident with a valid page table costs no migration. On error (typed [`SvmError`]) every
//!   page's data is readable where it was; nothing is lost.
//! - **Migrations** allocate device memory whose clear is the pre-migrate fence and let peer
//!   devices push their own pages (`source_peer_migrates`). A Busy migration is retried once
//!   after evicting the range, under a context-wide lock taken for write (faults take it for
//!   read), so racing migrations cannot keep invalidating each other.
//! - **Timeslice**: pages a device received stay there for the range's timeslice before
//!   another device (or the CPU) takes them: fault ping-pong costs at most one migration of a
//!   range per timeslice.
//! - **Copies** (every copy the engine makes through the context's pagemaps) follow the
//!   core's copy-submission contract: each backend declares its
//!   [`drm_pagemap_core::CopyCaps`] (`DevmemOps::caps`, read once by [`Svm::new`]) and the
//!   copy policy follows them instead of guessing. A pre-migrate fence that already failed
//!   fails the call before anything is issued. Pending parts whose native handle
//!   ([`drm_pagemap_core::NativeFence`]) is of a kind the backend declares are device
//!   dependencies, host fences are bridged by backends that say they bridge them (sim: its
//!   engine thread; CUDA: the core's fence worker): the backend gets the pre-fence as it is
//!   and the faulting thread never waits for it (sorted with
//!   [`drm_pagemap_core::sort_dependencies`]). Only for a backend that would block on host
//!   fences in the call anyway ([`drm_pagemap_core::HostFenceWait::Blocking`], the default)
//!   are they waited first, bounded by the fence timeout. Calls are split only for a
//!   backend's declared `max_command_bytes` (the first piece waits for the pre-fence, later
//!   pieces run behind it on an in-order queue, or each waits for it); a backend without a
//!   limit (sim, CUDA) gets the core's call untouched, so nothing the backend plans (a CUDA
//!   gather launch) is re-planned. The fence returned is the backend's own. Fence errors
//!   propagate. See [`copy`].
//! - **Device memory** of each pagemap is accounted against a capacity ([`SvmConfig`]); a
//!   fault that does not fit evicts least-recently-used allocations to system memory until it
//!   does, so a workload that oversubscribes device memory keeps running with correct data.
//! - **Statistics** ([`Stats`]) and the accounting observe, they do not decorate: the
//!   accounting sees each allocation and release, the statistics each copy call issued and,
//!   when its completion is first observed (an observing wrapper of the backend's fence that
//!   delegates its native handle), completed. Faults, migrations, evictions,
//!   bytes, commands and microseconds by direction and size bucket, fence dependencies,
//!   bridged and CPU-waited fences; relaxed atomics only.
//!
//! ```
//! use drm_pagemap_core::{AddressSpace, Backend, PageSize, VaRange};
//! use drm_pagemap_sim::{SimBackend, SimConfig};
//! use std::sync::Arc;
//! use xe_svm::{Access, FaultAction, Placement, Svm, SvmConfig};
//!
//! let sim = SimBackend::new(SimConfig { devices: 2, device_capacity: 64 << 20, ..SimConfig::default() })?;
//! let mm = Arc::new(AddressSpace::new(sim.host_memory()));
//! let svm = Svm::new(mm.clone(), sim.pagemap_per_device()?, SvmConfig::default())?;
//! let gpu0 = svm.vm(drm_pagemap_core::PagemapId(0))?;
//! let buf = VaRange::new(1 << 30, 4 << 20);
//! mm.create_range(buf, PageSize::Size4K)?;
//! mm.write(buf.start, b"shared")?;
//! let fault = gpu0.handle_gpu_fault(buf.start, Access::Write)?;
//! assert_eq!(fault.range.len, 2 << 20); // a 2 MiB SVM range
//! assert!(matches!(fault.action, FaultAction::Migrated { .. }));
//! let local = gpu0.with_page_table(buf.start, |pt| pt.ptes.iter().all(|p| p.placement == Placement::Device(gpu0.local_pagemap())));
//! assert_eq!(local, Some(true));
//! let mut back = [0u8; 6];
//! mm.read(buf.start, &mut back)?; // the CPU fault brings the page home
//! assert_eq!(&back, b"shared");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ## Modules
//! Each depends only on those listed before it (no import cycle):
//! - `accounting`, `attrs`, `config`, `error`, `range`, `stats`: leaves. Device-memory
//!   accounting of one pagemap ([`MemoryUsage`]); the attributes by address interval;
//!   [`SvmConfig`] and [`FOREVER`]; [`SvmError`]; SVM ranges, their chunking and page tables
//!   ([`PageTable`]); the counters behind [`Stats`].
//! - `fences` (stats), [`copy`] (accounting, fences, stats): the copy path's fence policy
//!   and its observers, installed around every pagemap of the context.
//! - `context` (accounting, config, copy, error, range, stats): the shared context (the
//!   address space, the pagemaps, the migrate and block locks, the statistics) and the moves
//!   every VM shares: migrate a range in with room made by LRU eviction, evict a range, make
//!   it system-resident. The lock order is documented there.
//! - `fault` (attrs, context, error, range): one fault on one SVM range, its steps (target,
//!   already there?, place, page table) read top to bottom; [`Access`], [`Target`],
//!   [`FaultAction`], [`FaultReport`].
//! - `vm` (attrs, context, error, fault, range, stats): [`GpuVm`]: one device's SVM ranges
//!   and attributes, and the entry of its fault handler.
//! - `svm` (accounting, config, context, error, stats, vm): [`Svm`], the public handle of a
//!   context.

#![forbid(unsafe_code)]

mod accounting;
mod attrs;
mod config;
mod context;
pub mod copy;
mod error;
mod fault;
mod fences;
mod range;
mod stats;
mod svm;
mod vm;

pub use accounting::MemoryUsage;
pub use attrs::{AtomicAccess, Attributes, PreferredLocation};
pub use config::{FOREVER, SvmConfig};
pub use error::SvmError;
pub use fault::{Access, FaultAction, FaultReport, Target};
pub use range::{CHUNK_SIZES, PageTable, Placement, Pte};
pub use stats::{Bucket, CommandTally, Stats, Tally};
pub use svm::Svm;
pub use vm::GpuVm;
