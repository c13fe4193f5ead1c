//! Small value types shared by every part of the engine: page sizes, identifiers, addresses.

use std::fmt;

/// Size of the base granule every frame number counts in: 4 KiB.
pub const GRANULE: u64 = 4096;

/// The page size of a range. Every page of one range has the same size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PageSize {
    /// 4 KiB pages (the default).
    #[default]
    Size4K,
    /// 64 KiB pages.
    Size64K,
    /// 2 MiB pages.
    Size2M,
}

impl PageSize {
    /// The size in bytes.
    pub const fn bytes(self) -> u64 {
        match self {
            PageSize::Size4K => 4 << 10,
            PageSize::Size64K => 64 << 10,
            PageSize::Size2M => 2 << 20,
        }
    }

    /// How many 4 KiB granules one page spans.
    pub const fn granules(self) -> u64 {
        self.bytes() / GRANULE
    }

    /// The page size with this many bytes, if it is one we support.
    pub const fn from_bytes(bytes: u64) -> Option<PageSize> {
        match bytes {
            4096 => Some(PageSize::Size4K),
            65536 => Some(PageSize::Size64K),
            2097152 => Some(PageSize::Size2M),
            _ => None,
        }
    }
}

impl fmt::Display for PageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PageSize::Size4K => f.write_str("4 KiB"),
            PageSize::Size64K => f.write_str("64 KiB"),
            PageSize::Size2M => f.write_str("2 MiB"),
        }
    }
}

/// A device of a backend (a GPU, or a simulated one), numbered by the backend from 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(pub u32);

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "device {}", self.0)
    }
}

/// A pagemap (one device-memory provider). At most [`PagemapId::MAX_PAGEMAPS`] per address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PagemapId(pub u8);

impl PagemapId {
    /// How many distinct pagemap ids exist.
    pub const MAX_PAGEMAPS: usize = 256;
}

impl fmt::Display for PagemapId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pagemap {}", self.0)
    }
}

/// The owner of a pagemap. Pages of pagemaps with one owner may migrate between each other
/// directly (they share a fast interconnect); another owner's pages are never collected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OwnerId(pub u32);

impl fmt::Display for OwnerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "owner {}", self.0)
    }
}

/// A device page frame number: the index, in 4 KiB granules, of a page inside its pagemap's
/// device memory. A page of size `s` at pfn `p` covers granules `p .. p + s/4KiB`.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Pfn(pub u32);

/// A host frame number: the index, in 4 KiB granules, of a system page inside the host memory
/// of an address space.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct HostFrame(pub u64);

/// An address by which one device reaches a page: produced by the backend
/// ([`crate::PagemapOps::device_map`], [`crate::HostMemory::map_frames`]), consumed by the
/// same backend's copy operations. The core never interprets it; `0` means "nothing mapped".
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct DmaAddr(pub u64);

impl DmaAddr {
    /// The "nothing mapped here" address: copy operations skip such entries.
    pub const NONE: DmaAddr = DmaAddr(0);

    /// Whether this entry maps nothing.
    pub const fn is_none(self) -> bool {
        self.0 == 0
    }
}

/// Direction of a mapping, seen from the device the mapping is made for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// The device reads through the mapping (data flows to the device).
    ToDevice,
    /// The device writes through the mapping (data flows from the device).
    FromDevice,
}

/// A range of virtual addresses `[start, start + len)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VaRange {
    /// First byte.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
}

impl VaRange {
    /// The range `[start, start + len)`.
    pub const fn new(start: u64, len: u64) -> VaRange {
        VaRange { start, len }
    }

    /// One past the last byte, or `None` if that overflows.
    pub const fn checked_end(&self) -> Option<u64> {
        self.start.checked_add(self.len)
    }

    /// One past the last byte (saturating).
    pub const fn end(&self) -> u64 {
        self.start.saturating_add(self.len)
    }

    /// Whether the two ranges share a byte.
    pub const fn overlaps(&self, other: &VaRange) -> bool {
        self.start < other.end() && other.start < self.end()
    }

    /// Whether `other` lies wholly inside this range.
    pub const fn contains_range(&self, other: &VaRange) -> bool {
        other.start >= self.start && other.end() <= self.end()
    }
}

impl fmt::Display for VaRange {
    /// `[start, end)` in hex; the true end also where it lies past `u64::MAX` (a range that
    /// wraps shows an end of 17 hex digits, not a saturated one that would look empty).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let end = self.start as u128 + self.len as u128;
        write!(f, "[{:#x}, {:#x})", self.start, end)
    }
}

/// Which copy operation a copy call uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CopyOp {
    /// `copy_to_devmem`: the executor writes into its own device pages.
    ToDevmem,
    /// `copy_to_ram`: the executor reads its own device pages and writes elsewhere.
    ToRam,
}

impl CopyOp {
    /// The upstream name of the operation.
    pub const fn name(self) -> &'static str {
        match self {
            CopyOp::ToDevmem => "copy_to_devmem",
            CopyOp::ToRam => "copy_to_ram",
        }
    }
}

impl fmt::Display for CopyOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_shows_its_true_end_also_past_the_address_space() {
        assert_eq!(VaRange::new(0x1000, 0x1000).to_string(), "[0x1000, 0x2000)");
        assert_eq!(VaRange::new(7, 0).to_string(), "[0x7, 0x7)");
        // Regression: the end saturated, so a wrapping range looked empty.
        assert_eq!(
            VaRange::new(u64::MAX, 2).to_string(),
            "[0xffffffffffffffff, 0x10000000000000001)"
        );
        assert_eq!(
            VaRange::new(u64::MAX, u64::MAX).to_string(),
            "[0xffffffffffffffff, 0x1fffffffffffffffe)"
        );
    }
}
