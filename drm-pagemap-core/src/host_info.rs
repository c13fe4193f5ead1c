//! What the system says about its memory.

/// The memory the system says is available for new allocations without swapping (Linux:
/// `MemAvailable` of `/proc/meminfo`); `None` where that cannot be read. What
/// [`crate::AddressSpace::keep_buffers`] checks its buffers against (and the simulated
/// backend its resident device memory).
pub fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line
        .trim_start_matches("MemAvailable:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}
