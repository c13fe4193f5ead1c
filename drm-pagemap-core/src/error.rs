//! Typed errors. Every message names the range, the pagemap and the device involved.

use crate::types::{DeviceId, PageSize, PagemapId, VaRange};
use std::fmt;

/// What went wrong inside a backend, with the raw driver code where there is one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendErrorKind {
    /// The device (or host) has no memory left for the request.
    OutOfMemory,
    /// The device stopped answering or was removed.
    DeviceLost,
    /// A page could not be mapped for a device.
    MapFailed,
    /// A copy could not be submitted or failed.
    CopyFailed,
    /// The operation is not supported by this backend or this device pair.
    Unsupported,
    /// The backend is not usable on this machine.
    Unavailable,
    /// A fault injected on purpose (tests, `--fail-copy`).
    Injected,
    /// A raw driver error: the API that returned it and its code (`CUresult`, `ze_result_t`).
    Driver {
        /// The driver entry point, e.g. `cuMemcpyAsync`.
        api: &'static str,
        /// The raw return code.
        code: i64,
    },
}

/// An error reported by a backend operation.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind_text}: {message}", kind_text = self.kind_text())]
pub struct BackendError {
    /// The class of failure.
    pub kind: BackendErrorKind,
    /// A human-readable description naming what failed.
    pub message: String,
}

impl BackendError {
    /// An error of `kind` with `message`.
    pub fn new(kind: BackendErrorKind, message: impl Into<String>) -> BackendError {
        BackendError {
            kind,
            message: message.into(),
        }
    }

    /// A raw driver failure of `api` with `code`.
    pub fn driver(api: &'static str, code: i64, message: impl Into<String>) -> BackendError {
        BackendError::new(BackendErrorKind::Driver { api, code }, message)
    }

    fn kind_text(&self) -> String {
        match &self.kind {
            BackendErrorKind::OutOfMemory => "out of memory".into(),
            BackendErrorKind::DeviceLost => "device lost".into(),
            BackendErrorKind::MapFailed => "mapping failed".into(),
            BackendErrorKind::CopyFailed => "copy failed".into(),
            BackendErrorKind::Unsupported => "unsupported".into(),
            BackendErrorKind::Unavailable => "unavailable".into(),
            BackendErrorKind::Injected => "injected fault".into(),
            BackendErrorKind::Driver { api, code } => format!("{api} returned {code}"),
        }
    }
}

/// Why a fence did not signal successfully.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FenceError {
    /// The wait ran out of time before the fence signalled.
    #[error("fence timed out after {0:?}")]
    Timeout(std::time::Duration),
    /// The fence signalled with an error: the work it guards failed.
    #[error("fence signalled an error: {0}")]
    Failed(BackendError),
}

/// Why a migration refused with [`Error::Busy`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BusyReason {
    /// Some pages already live in the destination pagemap and the copy engine cannot copy
    /// pagemap-local pages (`can_migrate_same_pagemap` is off): evict and retry.
    Fragmentation,
    /// A page belongs to a pagemap with another owner: nothing was collected.
    ForeignOwner,
    /// A page is being migrated by someone else right now.
    PageLocked,
    /// The pages of an allocation could not all be moved back after several tries.
    EvictIncomplete,
    /// A CPU access is waiting for these pages (a timeslice, its fault back to system
    /// memory): no migration takes them until it is done.
    CpuAccess,
}

impl fmt::Display for BusyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BusyReason::Fragmentation => {
                "some pages are already in the destination pagemap (fragmentation)"
            }
            BusyReason::ForeignOwner => "a page belongs to a pagemap of another owner",
            BusyReason::PageLocked => "a page is being migrated concurrently",
            BusyReason::EvictIncomplete => "pages of the allocation stayed busy",
            BusyReason::CpuAccess => "a CPU access is bringing these pages to system memory",
        })
    }
}

/// Why a range argument was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeProblem {
    /// The range has no bytes.
    Empty,
    /// Start or length is not a multiple of the page size.
    Unaligned,
    /// The range wraps around the end of the address space.
    Overflow,
    /// The range overlaps a range that exists already.
    Overlapping,
    /// No range of the address space holds these addresses (never created, or freed).
    NotMapped,
    /// The addresses run past the end of the range that holds their start.
    OutOfRange,
}

impl fmt::Display for RangeProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RangeProblem::Empty => "is empty",
            RangeProblem::Unaligned => "is not aligned to the page size",
            RangeProblem::Overflow => "wraps around the address space",
            RangeProblem::Overlapping => "overlaps an existing range",
            RangeProblem::NotMapped => "is not mapped (never created, or freed)",
            RangeProblem::OutOfRange => "runs past the end of its range",
        })
    }
}

/// Formats an optional pagemap / device for messages.
struct Where(Option<PagemapId>, Option<DeviceId>);

impl fmt::Display for Where {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.0, self.1) {
            (Some(p), Some(d)) => write!(f, "{p} on {d}"),
            (Some(p), None) => write!(f, "{p}"),
            (None, Some(d)) => write!(f, "{d}"),
            (None, None) => f.write_str("system memory"),
        }
    }
}

/// Every error the engine reports.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A range argument was malformed or does not match the address space.
    #[error("range {range} {problem}")]
    BadRange {
        /// The range given.
        range: VaRange,
        /// What is wrong with it.
        problem: RangeProblem,
    },
    /// The page size does not match the range's.
    #[error("range {range}: page size {given} does not match the range's page size {expected}")]
    PageSizeMismatch {
        /// The range.
        range: VaRange,
        /// The range's page size.
        expected: PageSize,
        /// The page size asked for.
        given: PageSize,
    },
    /// No pagemap with this id is known to the address space.
    #[error("range {range}: unknown {pagemap}")]
    UnknownPagemap {
        /// The range of the request.
        range: VaRange,
        /// The id asked for.
        pagemap: PagemapId,
    },
    /// A pagemap could not be added.
    #[error("{pagemap}: {reason}")]
    BadPagemap {
        /// The pagemap.
        pagemap: PagemapId,
        /// Why it was refused.
        reason: &'static str,
    },
    /// The migration cannot proceed now; evicting the range and retrying may help.
    #[error("range {range} to {pagemap} on {device}: busy: {reason}")]
    Busy {
        /// The range.
        range: VaRange,
        /// The destination pagemap.
        pagemap: PagemapId,
        /// Its device.
        device: DeviceId,
        /// Why.
        reason: BusyReason,
    },
    /// A CPU access with a deadline ([`crate::AddressSpace::read_timeout`]) found its pages
    /// still held (by a device's timeslice or a running migration) when the deadline
    /// passed; nothing was read or written.
    #[error(
        "range {range}: CPU access gave up after {waited:?}: pages still held by a device's timeslice or a migration"
    )]
    CpuAccessTimeout {
        /// The bytes accessed.
        range: VaRange,
        /// How long the access waited.
        waited: std::time::Duration,
    },
    /// The allocation does not exist (never created, or already released).
    #[error("allocation {alloc} does not exist (never created, or already released)")]
    NoSuchAllocation {
        /// The allocation handle.
        alloc: crate::AllocId,
    },
    /// The allocation exists but cannot be migrated into: only a reserved allocation (from
    /// `allocate_devmem`, never used) can receive a migration.
    #[error(
        "range {range}: allocation {alloc} of {pagemap} is {state:?}, not reserved: it cannot receive a migration"
    )]
    AllocationNotReserved {
        /// The range of the request.
        range: VaRange,
        /// The allocation handle.
        alloc: crate::AllocId,
        /// Its pagemap.
        pagemap: PagemapId,
        /// Its state.
        state: crate::AllocState,
    },
    /// A device-memory allocation larger than the pagemap can ever hold.
    #[error(
        "range {range}: {bytes} bytes do not fit in {pagemap} on {device} (capacity {capacity} bytes)"
    )]
    TooLarge {
        /// The range.
        range: VaRange,
        /// The pagemap.
        pagemap: PagemapId,
        /// Its device.
        device: DeviceId,
        /// Bytes requested.
        bytes: u64,
        /// The pagemap's capacity.
        capacity: u64,
    },
    /// A backend operation failed; nothing changed.
    #[error("range {range}: {op} on {at} failed: {source}", at = Where(*pagemap, *device))]
    Backend {
        /// The range.
        range: VaRange,
        /// The operation, e.g. `copy_to_ram`.
        op: &'static str,
        /// The pagemap involved (`None` for system memory).
        pagemap: Option<PagemapId>,
        /// The device involved.
        device: Option<DeviceId>,
        /// The backend's error.
        source: BackendError,
    },
    /// A fence failed or timed out; nothing changed.
    #[error("range {range}: {what} fence of {at}: {source}", at = Where(*pagemap, *device))]
    Fence {
        /// The range.
        range: VaRange,
        /// Which fence: "pre-migrate", "copy".
        what: &'static str,
        /// The pagemap whose work the fence guards.
        pagemap: Option<PagemapId>,
        /// Its device.
        device: Option<DeviceId>,
        /// What happened.
        source: FenceError,
    },
    /// A pagemap's registration was refused by the registry of backends.
    #[error("backend {name} unavailable: {reason}")]
    BackendUnavailable {
        /// The backend's name.
        name: String,
        /// Why it cannot be used.
        reason: String,
    },
}

/// Result with the engine's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
