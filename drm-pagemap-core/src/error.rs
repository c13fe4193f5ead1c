//! Typed errors. Every message names the range, the pagemap and the device involved.

use crate::options::OptionError;
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
    /// A fault injected on purpose: the fault injector of the `drm-pagemap-testkit` crate
    /// (tests, fuzzing, the `migrate` example's `--fail-copy`) fails operations with this
    /// kind. No production backend returns it; it is defined here because errors cross
    /// crates (a test tells an injected failure from a real one by this kind).
    Injected,
    /// The configuration asks for something the backend cannot provide (0 devices, a
    /// capacity its page frame numbers or addresses cannot reach); the message names the
    /// device or memory and the limit.
    BadConfig,
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

    /// Whether the same request may succeed later without changing it: only
    /// [`BackendErrorKind::OutOfMemory`] (memory is freed by releases and evictions). A lost
    /// device, a failed mapping or copy, an unsupported or unavailable operation, a bad
    /// configuration, an injected fault and a raw driver error are not: their cause is not
    /// known to go away by itself.
    pub fn is_transient(&self) -> bool {
        matches!(self.kind, BackendErrorKind::OutOfMemory)
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
            BackendErrorKind::BadConfig => "invalid configuration".into(),
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
    /// A range was named by `address`, which lies inside it but is not its start
    /// ([`crate::AddressSpace::free_range`] takes a range's first address). The error's range
    /// is the range holding `address`.
    NotStart {
        /// The address given.
        address: u64,
    },
}

impl fmt::Display for RangeProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            RangeProblem::Empty => "is empty",
            RangeProblem::Unaligned => "is not aligned to the page size",
            RangeProblem::Overflow => "wraps around the address space",
            RangeProblem::Overlapping => "overlaps an existing range",
            RangeProblem::NotMapped => "is not mapped (never created, or freed)",
            RangeProblem::OutOfRange => "runs past the end of its range",
            RangeProblem::NotStart { address } => {
                return write!(
                    f,
                    "holds {address:#x} but does not start there (name a range by its start \
                     address)"
                );
            }
        };
        f.write_str(text)
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
    /// The migration cannot proceed now; evicting the range and retrying may help. (For
    /// [`BusyReason::EvictIncomplete`], an eviction: `pagemap` is where the pages stayed.)
    #[error("range {range} {dir} {pagemap} on {device}: busy: {reason}", dir = busy_direction(*reason))]
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
    /// The engine could not allocate host memory for its own bookkeeping of `range` (the
    /// directory of a range's page table in [`crate::AddressSpace::create_range`], a chunk
    /// of page entries when pages are first written); nothing changed.
    #[error("range {range}: out of memory: {bytes} bytes for {what} could not be allocated")]
    OutOfMemory {
        /// The range of the request.
        range: VaRange,
        /// What needed the memory, e.g. "the page table's directory".
        what: &'static str,
        /// Bytes asked for.
        bytes: u64,
    },
    /// A backend operation failed; nothing changed.
    #[error("range {range}: {op} on {at} failed: {source}", at = Where(*pagemap, *device))]
    Backend {
        /// The range.
        range: VaRange,
        /// The operation.
        op: BackendOp,
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
        /// Which fence.
        what: FenceRole,
        /// The pagemap whose work the fence guards.
        pagemap: Option<PagemapId>,
        /// Its device.
        device: Option<DeviceId>,
        /// What happened.
        source: FenceError,
    },
    /// The configuration of a backend or a machine cannot work (0 devices, 0 pagemaps, a
    /// capacity past what the backend can address); nothing was opened.
    #[error("backend {backend}: invalid configuration: {reason}")]
    BadConfig {
        /// The backend's name.
        backend: String,
        /// What is wrong, naming the device or memory and the limit.
        reason: String,
    },
    /// A backend option was refused (a key the backend does not know, a value it cannot
    /// parse, a list of a newer version than this build reads); the error names the key.
    /// Nothing was opened.
    #[error("backend {backend}: {source}")]
    BadOption {
        /// The backend the option is for (as its key names it).
        backend: String,
        /// What is wrong, with the key ([`OptionError::key`]).
        source: OptionError,
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

fn busy_direction(reason: BusyReason) -> &'static str {
    match reason {
        BusyReason::EvictIncomplete => "from",
        _ => "to",
    }
}

impl Error {
    /// Whether this is [`Error::Busy`]: the migration was refused because of where pages
    /// are or what else runs on them, and nothing changed. The remedy depends on the
    /// [`BusyReason`] (see [`Error::busy_reason`]): evicting the range and retrying helps in
    /// every case; retrying alone only helps where [`Error::is_transient`] says so.
    pub fn is_busy(&self) -> bool {
        matches!(self, Error::Busy { .. })
    }

    /// The reason of an [`Error::Busy`], `None` for every other error.
    pub fn busy_reason(&self) -> Option<BusyReason> {
        match self {
            Error::Busy { reason, .. } => Some(*reason),
            _ => None,
        }
    }

    /// Whether the same call, repeated later with the same arguments and nothing else done
    /// by the caller, may succeed: the cause goes away by itself as other threads' work and
    /// the devices progress. Nothing changed when any error is returned, so such a retry is
    /// always safe. Exactly these are transient:
    /// - [`Error::Busy`] with [`BusyReason::PageLocked`] (another migration holds a page:
    ///   it commits or rolls back), [`BusyReason::EvictIncomplete`] (pages stayed locked by
    ///   migrations through every pass) or [`BusyReason::CpuAccess`] (a CPU access is
    ///   bringing the pages home: it finishes within its timeslice wait and copy);
    /// - [`Error::CpuAccessTimeout`] (a device's timeslice or a migration held the pages
    ///   past the deadline; both end by themselves);
    /// - [`Error::Backend`] whose source is out of memory ([`BackendError::is_transient`]):
    ///   memory comes back as allocations are released or evicted (evicting least recently
    ///   used allocations is the caller's faster way);
    /// - [`Error::OutOfMemory`] (host memory for the engine's tables comes back as ranges
    ///   are freed and other work finishes);
    /// - [`Error::Fence`] that timed out (the device is slow, not wrong; a later call waits
    ///   again) or whose fence failed with a transient backend error.
    ///
    /// Not transient: [`Error::Busy`] with [`BusyReason::Fragmentation`] or
    /// [`BusyReason::ForeignOwner`] (the pages stay where they are until someone evicts
    /// them: evict, then retry), every other backend or fence failure, and every argument
    /// or configuration error ([`Error::BadRange`], [`Error::PageSizeMismatch`],
    /// [`Error::UnknownPagemap`], [`Error::BadPagemap`], [`Error::NoSuchAllocation`],
    /// [`Error::AllocationNotReserved`], [`Error::TooLarge`], [`Error::BadConfig`],
    /// [`Error::BadOption`], [`Error::BackendUnavailable`]).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Busy { reason, .. } => {
                matches!(
                    reason,
                    BusyReason::PageLocked | BusyReason::EvictIncomplete | BusyReason::CpuAccess
                )
            }
            Error::CpuAccessTimeout { .. } => true,
            Error::Backend { source, .. } => source.is_transient(),
            Error::OutOfMemory { .. } => true,
            Error::Fence { source, .. } => match source {
                FenceError::Timeout(_) => true,
                FenceError::Failed(e) => e.is_transient(),
            },
            Error::BadRange { .. }
            | Error::PageSizeMismatch { .. }
            | Error::UnknownPagemap { .. }
            | Error::BadPagemap { .. }
            | Error::NoSuchAllocation { .. }
            | Error::AllocationNotReserved { .. }
            | Error::TooLarge { .. }
            | Error::BadConfig { .. }
            | Error::BadOption { .. }
            | Error::BackendUnavailable { .. } => false,
        }
    }
}

/// A backend operation, as errors name it (a C ABI carries the number).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendOp {
    /// [`crate::DevmemOps::allocate`].
    Allocate = 1,
    /// [`crate::DevmemOps::populate_devmem_pfn`].
    PopulateDevmemPfn = 2,
    /// [`crate::DevmemOps::copy_to_devmem`].
    CopyToDevmem = 3,
    /// [`crate::DevmemOps::copy_to_ram`].
    CopyToRam = 4,
    /// [`crate::PagemapOps::device_map`].
    DeviceMap = 5,
    /// [`crate::HostMemory::map_frames`].
    MapFrames = 6,
    /// [`crate::HostMemory::alloc_frames`].
    AllocFrames = 7,
    /// [`crate::HostMemory::read`], [`crate::HostMemory::write`], [`crate::HostMemory::zero`]:
    /// a CPU access to system pages.
    HostAccess = 8,
}

impl BackendOp {
    /// The operation's name in messages (the trait method's, as upstream names it).
    pub const fn name(self) -> &'static str {
        match self {
            BackendOp::Allocate => "allocate",
            BackendOp::PopulateDevmemPfn => "populate_devmem_pfn",
            BackendOp::CopyToDevmem => "copy_to_devmem",
            BackendOp::CopyToRam => "copy_to_ram",
            BackendOp::DeviceMap => "device_map",
            BackendOp::MapFrames => "map_frames",
            BackendOp::AllocFrames => "host frame allocation",
            BackendOp::HostAccess => "host memory access",
        }
    }
}

impl fmt::Display for BackendOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl From<crate::CopyOp> for BackendOp {
    fn from(op: crate::CopyOp) -> BackendOp {
        match op {
            crate::CopyOp::ToDevmem => BackendOp::CopyToDevmem,
            crate::CopyOp::ToRam => BackendOp::CopyToRam,
        }
    }
}

/// Which fence an [`Error::Fence`] is about.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FenceRole {
    /// A copy call's fence.
    Copy = 1,
    /// The destination's pre-migrate fence (its clear).
    PreMigrate = 2,
}

impl fmt::Display for FenceRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FenceRole::Copy => "copy",
            FenceRole::PreMigrate => "pre-migrate",
        })
    }
}

/// Result with the engine's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AllocId, AllocState};
    use std::time::Duration;

    /// Every variant of [`Error`] (with every busy reason and fence outcome), with whether it
    /// is busy and whether it is transient.
    fn table() -> Vec<(Error, bool, bool)> {
        let range = VaRange::new(1 << 30, 4096);
        let pagemap = PagemapId(1);
        let device = DeviceId(1);
        let backend = |kind| BackendError::new(kind, "what failed");
        let busy = |reason| Error::Busy {
            range,
            pagemap,
            device,
            reason,
        };
        let alloc = AllocId {
            slot: 3,
            generation: 1,
        };
        let mut t = vec![
            (busy(BusyReason::PageLocked), true, true),
            (busy(BusyReason::EvictIncomplete), true, true),
            (busy(BusyReason::Fragmentation), true, false),
            (busy(BusyReason::ForeignOwner), true, false),
            (busy(BusyReason::CpuAccess), true, true),
            (
                Error::CpuAccessTimeout {
                    range,
                    waited: Duration::from_millis(3),
                },
                false,
                true,
            ),
            (
                Error::BadRange {
                    range,
                    problem: RangeProblem::Empty,
                },
                false,
                false,
            ),
            (
                Error::PageSizeMismatch {
                    range,
                    expected: PageSize::Size4K,
                    given: PageSize::Size2M,
                },
                false,
                false,
            ),
            (Error::UnknownPagemap { range, pagemap }, false, false),
            (
                Error::BadPagemap {
                    pagemap,
                    reason: "exists",
                },
                false,
                false,
            ),
            (Error::NoSuchAllocation { alloc }, false, false),
            (
                Error::AllocationNotReserved {
                    range,
                    alloc,
                    pagemap,
                    state: AllocState::Live,
                },
                false,
                false,
            ),
            (
                Error::TooLarge {
                    range,
                    pagemap,
                    device,
                    bytes: 1 << 40,
                    capacity: 1 << 30,
                },
                false,
                false,
            ),
            (
                Error::OutOfMemory {
                    range,
                    what: "the page table's directory",
                    bytes: 4 << 20,
                },
                false,
                true,
            ),
            (
                Error::BadConfig {
                    backend: "sim".into(),
                    reason: "0 devices".into(),
                },
                false,
                false,
            ),
            (
                Error::BadOption {
                    backend: "cuda".into(),
                    source: OptionError::UnknownKey {
                        key: "cuda.vmmm".into(),
                        known: "cuda knows: vmm".into(),
                    },
                },
                false,
                false,
            ),
            (
                Error::BackendUnavailable {
                    name: "cuda".into(),
                    reason: "no driver".into(),
                },
                false,
                false,
            ),
            (
                Error::Fence {
                    range,
                    what: FenceRole::Copy,
                    pagemap: Some(pagemap),
                    device: Some(device),
                    source: FenceError::Timeout(Duration::from_millis(5)),
                },
                false,
                true,
            ),
        ];
        for kind in [
            BackendErrorKind::OutOfMemory,
            BackendErrorKind::DeviceLost,
            BackendErrorKind::MapFailed,
            BackendErrorKind::CopyFailed,
            BackendErrorKind::Unsupported,
            BackendErrorKind::Unavailable,
            BackendErrorKind::Injected,
            BackendErrorKind::BadConfig,
            BackendErrorKind::Driver {
                api: "cuMemcpyAsync",
                code: 700,
            },
        ] {
            let transient = kind == BackendErrorKind::OutOfMemory;
            t.push((
                Error::Backend {
                    range,
                    op: BackendOp::Allocate,
                    pagemap: Some(pagemap),
                    device: Some(device),
                    source: backend(kind.clone()),
                },
                false,
                transient,
            ));
            t.push((
                Error::Fence {
                    range,
                    what: FenceRole::Copy,
                    pagemap: None,
                    device: None,
                    source: FenceError::Failed(backend(kind)),
                },
                false,
                transient,
            ));
        }
        t
    }

    /// Which variant `e` is: exhaustive, so a new variant must be added to [`table`].
    fn variant(e: &Error) -> usize {
        match e {
            Error::BadRange { .. } => 0,
            Error::PageSizeMismatch { .. } => 1,
            Error::UnknownPagemap { .. } => 2,
            Error::BadPagemap { .. } => 3,
            Error::Busy { .. } => 4,
            Error::NoSuchAllocation { .. } => 5,
            Error::AllocationNotReserved { .. } => 6,
            Error::TooLarge { .. } => 7,
            Error::Backend { .. } => 8,
            Error::Fence { .. } => 9,
            Error::BadConfig { .. } => 10,
            Error::BackendUnavailable { .. } => 11,
            Error::CpuAccessTimeout { .. } => 12,
            Error::BadOption { .. } => 13,
            Error::OutOfMemory { .. } => 14,
        }
    }

    #[test]
    fn retry_helpers_classify_every_variant() {
        let t = table();
        let mut seen = [false; 15];
        for (e, busy, transient) in &t {
            seen[variant(e)] = true;
            assert_eq!(e.is_busy(), *busy, "is_busy of {e}");
            assert_eq!(e.is_transient(), *transient, "is_transient of {e}");
            assert_eq!(e.busy_reason().is_some(), *busy, "busy_reason of {e}");
        }
        assert!(
            seen.iter().all(|&s| s),
            "a variant is missing from the table"
        );
        assert_eq!(
            t[0].0.busy_reason(),
            Some(BusyReason::PageLocked),
            "the reason comes back"
        );
    }

    #[test]
    fn messages_name_what_is_wrong() {
        let inside = Error::BadRange {
            range: VaRange::new(0x4000_0000, 0x8000),
            problem: RangeProblem::NotStart {
                address: 0x4000_1000,
            },
        };
        assert_eq!(
            inside.to_string(),
            "range [0x40000000, 0x40008000) holds 0x40001000 but does not start there (name a \
             range by its start address)"
        );
        let evict = Error::Busy {
            range: VaRange::new(0x4000_0000, 0x1000),
            pagemap: PagemapId(2),
            device: DeviceId(1),
            reason: BusyReason::EvictIncomplete,
        };
        assert!(
            evict.to_string().contains("from pagemap 2 on device 1"),
            "{evict}"
        );
        let config = Error::BadConfig {
            backend: "sim".into(),
            reason: "0 devices requested (1 to 64 allowed)".into(),
        };
        assert_eq!(
            config.to_string(),
            "backend sim: invalid configuration: 0 devices requested (1 to 64 allowed)"
        );
    }
}
