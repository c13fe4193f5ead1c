//! The DMA mappings a transaction makes (see [`crate::txn`]): every address, and the records
//! needed to undo them through the provider that made them. Plain data: undoing them
//! ([`crate::AddressSpace`]'s `unmap`) lives with the transaction, so that the address space
//! can keep mappings parked in its deferred cleanups without depending on the transaction.

use crate::types::{DeviceId, Direction, DmaAddr, PageSize, PagemapId};

/// Which memory a mapping came from (to undo it through the same provider).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MapSource {
    /// System memory (the address space's host memory).
    Host,
    /// A pagemap's device memory.
    Pagemap(PagemapId),
}

/// One mapping call: `addrs[start..end]`, made by `src` for `device` in direction `dir`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MapRecord {
    pub src: MapSource,
    pub device: DeviceId,
    pub dir: Direction,
    pub start: usize,
    pub end: usize,
}

/// The mappings of one transaction: every address, and the records to undo them.
#[derive(Default)]
pub(crate) struct Mappings {
    pub addrs: Vec<DmaAddr>,
    pub records: Vec<MapRecord>,
    /// Records before this one are undone already (a record counts as undone once its
    /// unmap call starts, so one whose unmap panicked is not tried again).
    pub unmapped: usize,
    /// The size of every page mapped; `None` until the transaction knows it.
    pub page_size: Option<PageSize>,
}
