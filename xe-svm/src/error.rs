//! The errors of the SVM layer. Every message names the range or address, the pagemap and the
//! device involved. Whatever the error, every page's data stays readable where it was.

use drm_pagemap_core::{BusyReason, DeviceId, Error as CoreError, PagemapId, VaRange};

/// Everything the SVM layer reports.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SvmError {
    /// The address lies in no range of the address space (never created, or freed).
    #[error("{device}: address {address:#x} is not in any range of the address space")]
    NotMirrored {
        /// The faulting device.
        device: DeviceId,
        /// The address.
        address: u64,
    },
    /// The pagemap was not given to this SVM context.
    #[error("{pagemap} is not a pagemap of this SVM context")]
    UnknownPagemap {
        /// The pagemap asked for.
        pagemap: PagemapId,
    },
    /// An atomic access to a range whose atomic attribute reserves atomics for the CPU.
    #[error(
        "range {range}: atomic access by {device} refused: the range's atomic attribute is Cpu"
    )]
    AtomicDenied {
        /// The SVM range.
        range: VaRange,
        /// The faulting device.
        device: DeviceId,
    },
    /// No room could be made in the pagemap: nothing was left to evict.
    #[error(
        "range {range}: no room in {pagemap} on {device}: {needed} bytes needed, {used} of {capacity} in use, nothing left to evict"
    )]
    OutOfDeviceMemory {
        /// The SVM range.
        range: VaRange,
        /// The pagemap.
        pagemap: PagemapId,
        /// Its device.
        device: DeviceId,
        /// Bytes the range needs.
        needed: u64,
        /// Bytes in use.
        used: u64,
        /// The pagemap's capacity.
        capacity: u64,
    },
    /// Migrating the range into device memory failed; the pages are where they were.
    #[error("range {range}: migration to {pagemap} for {device} failed: {source}")]
    Migrate {
        /// The SVM range.
        range: VaRange,
        /// The destination pagemap.
        pagemap: PagemapId,
        /// The faulting device.
        device: DeviceId,
        /// What the engine reported.
        source: CoreError,
    },
    /// Moving the range's pages to system memory failed; the pages are where they were.
    #[error("range {range}: moving pages to system memory for {device} failed: {source}")]
    ToSystem {
        /// The SVM range.
        range: VaRange,
        /// The faulting device.
        device: DeviceId,
        /// What the engine reported.
        source: CoreError,
    },
    /// The device's page table for the range could not be built.
    #[error("range {range}: page table of {device}: {source}")]
    PageTable {
        /// The SVM range.
        range: VaRange,
        /// The faulting device.
        device: DeviceId,
        /// What failed (a mapping, a snapshot).
        source: CoreError,
    },
    /// The range's pages kept moving (other devices, the CPU) while the fault was served;
    /// nothing is wrong with the data: fault again.
    #[error("range {range}: pages kept moving while {device} faulted; retry")]
    Unstable {
        /// The SVM range.
        range: VaRange,
        /// The faulting device.
        device: DeviceId,
    },
    /// An argument the engine refused (a bad range for `madvise`, a pagemap already added).
    #[error(transparent)]
    Core(#[from] CoreError),
}

impl SvmError {
    /// Whether serving the fault from system memory instead is a sound answer to this error
    /// (device memory is full, or the range stayed busy).
    pub(crate) fn allows_fallback(&self) -> bool {
        match self {
            SvmError::OutOfDeviceMemory { .. } => true,
            SvmError::Migrate { source, .. } => {
                matches!(source, CoreError::Busy { .. } | CoreError::TooLarge { .. })
            }
            _ => false,
        }
    }

    /// Whether this is a Busy migration (evict and retry helps).
    pub(crate) fn is_busy(&self) -> bool {
        self.busy_reason().is_some()
    }

    /// The reason of a Busy migration.
    pub fn busy_reason(&self) -> Option<BusyReason> {
        match self {
            SvmError::Migrate {
                source: CoreError::Busy { reason, .. },
                ..
            } => Some(*reason),
            _ => None,
        }
    }
}
