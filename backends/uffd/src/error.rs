//! [`UffdError`]: why a pointer range (or its memory) could not be made.

use drm_pagemap_core::VaRange;
use std::io;

/// Why a pointer range, its space or its memory could not be made. The explicit
/// `AddressSpace::read` / `write` API keeps working in every case.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UffdError {
    /// userfaultfd cannot be used here: an unprivileged process without
    /// `vm.unprivileged_userfaultfd=1` (and no access to `/dev/userfaultfd`), a kernel
    /// without it, a container whose seccomp filter refuses the call.
    #[error(
        "userfaultfd unavailable ({step}): {source}; pointer ranges need it, the explicit read/write API still works"
    )]
    Unavailable {
        /// The step that failed (`open`, `UFFDIO_API`).
        step: &'static str,
        /// The system's error.
        source: io::Error,
    },
    /// The kernel's userfaultfd lacks the shmem fault modes this crate uses.
    #[error(
        "userfaultfd lacks {missing} (kernel features {features:#x}): pointer ranges need missing and minor faults on shmem (Linux 5.14 or later)"
    )]
    MissingFeature {
        /// The features missing, by name.
        missing: &'static str,
        /// What the kernel offered.
        features: u64,
    },
    /// The memfd memory could not be made.
    #[error("memfd memory of {capacity} bytes: {op} failed: {source}")]
    Memfd {
        /// The call that failed.
        op: &'static str,
        /// The capacity asked for.
        capacity: u64,
        /// The system's error.
        source: io::Error,
    },
    /// Mapping or registering the range failed.
    #[error("pointer range of {len} bytes: {op} failed: {source}")]
    Map {
        /// The call that failed.
        op: &'static str,
        /// The range's length.
        len: u64,
        /// The system's error.
        source: io::Error,
    },
    /// The range could fragment into more mappings than the process may have.
    #[error(
        "pointer range of {pages} pages could need {pages} mappings (one per page, scattered \
         frames); the process has {in_use} and pointer ranges reserve {reserved}, \
         vm.max_map_count is {limit} (headroom kept: {headroom}): use larger pages, a smaller \
         range, or raise vm.max_map_count"
    )]
    MapCountLimit {
        /// Pages of the range asked for.
        pages: u64,
        /// Mappings the process has now.
        in_use: u64,
        /// Mappings the live pointer ranges may still need.
        reserved: u64,
        /// The limit.
        limit: u64,
        /// Mappings left for the rest of the process.
        headroom: u64,
    },
    /// A bad length or page size.
    #[error("pointer range of {len} bytes with {page_size}-byte pages: {problem}")]
    BadRange {
        /// The length asked for.
        len: u64,
        /// The page size asked for.
        page_size: u64,
        /// What is wrong.
        problem: &'static str,
    },
    /// The address space already has a process mapping layer: a live [`crate::PointerSpace`]
    /// (one per address space) or somebody else's.
    #[error("the address space already has {holder}: one PointerSpace per address space")]
    AlreadyAttached {
        /// Who holds it.
        holder: &'static str,
    },
    /// The engine refused the range.
    #[error("pointer range {range}: the engine refused it: {source}")]
    Engine {
        /// The range.
        range: VaRange,
        /// The engine's error.
        source: drm_pagemap_core::Error,
    },
    /// The backend cannot give pointer ranges.
    #[error("pointer ranges unsupported on backend {backend}: {reason}")]
    Unsupported {
        /// The backend's name.
        backend: String,
        /// Why.
        reason: &'static str,
    },
}
