//! The number of mappings a process may have (`vm.max_map_count`) and how many it has.
//!
//! A coalesced pointer range (one with a home extent of the frame file) is one mapping. A
//! range mapped page by page maps each run of frames that are contiguous in the memfd as one
//! mapping, so one whose frames are scattered needs up to one mapping per page. Rather than
//! fail a fault later (which could only kill the faulting thread), a range is refused at
//! creation when its worst case does not fit: [`crate::UffdError::MapCountLimit`].

/// Where the map-count check gets its numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapLimits {
    /// The limit; `None`: read `/proc/sys/vm/max_map_count` (65,530 where unreadable, the
    /// usual default).
    pub max_map_count: Option<u64>,
    /// Mappings kept free for the rest of the process.
    pub headroom: u64,
}

impl Default for MapLimits {
    fn default() -> Self {
        MapLimits {
            max_map_count: None,
            headroom: 4096,
        }
    }
}

/// The usual default of `vm.max_map_count`.
pub const DEFAULT_MAX_MAP_COUNT: u64 = 65_530;

impl MapLimits {
    /// The limit in force.
    pub fn limit(&self) -> u64 {
        self.max_map_count.unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/vm/max_map_count")
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(DEFAULT_MAX_MAP_COUNT)
        })
    }
}

/// Mappings this process has now (lines of `/proc/self/maps`; 0 where unreadable).
pub fn mappings_in_use() -> u64 {
    std::fs::read("/proc/self/maps")
        .map(|b| b.iter().filter(|&&c| c == b'\n').count() as u64)
        .unwrap_or(0)
}

/// Mappings of this process that overlap `[start, start + len)` (0 where `/proc/self/maps`
/// is unreadable).
pub fn mappings_within(start: u64, len: u64) -> u64 {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return 0;
    };
    maps.lines()
        .filter_map(|l| {
            let (a, b) = l.split_whitespace().next()?.split_once('-')?;
            Some((
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
            ))
        })
        .filter(|&(a, b)| a < start + len && b > start)
        .count() as u64
}
