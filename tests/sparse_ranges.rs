//! Issue 11, D5: a range's page table costs memory for the pages written, not for the size
//! of the range. A range of `u32::MAX` pages of 4 KiB (a 16 TiB heap mirrored as one range,
//! which runtimes do) used to ask for a 32 GiB page table up front and abort the process;
//! 1 TiB of address space cost 2 GiB before a page was touched.
//!
//! One test in this binary, so that nothing else runs while it measures the process's memory
//! (`VmRSS` and `VmSize` of `/proc/self/status`, Linux only; skipped elsewhere).

use drm_pagemap::sim::{SimBackend, SimConfig};
use drm_pagemap::{
    AddressSpace, Backend, MigrateDetails, MigrateOutcome, PageBacking, PageLocation, PageSize,
    PagemapId, VaRange,
};

const PS: u64 = 4096;
const MIB: u64 = 1 << 20;

/// A field of `/proc/self/status` in bytes (its lines read `VmRSS:   1234 kB`).
fn status(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line[field.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Resident and virtual size of the process.
fn memory() -> Option<(u64, u64)> {
    Some((status("VmRSS:")?, status("VmSize:")?))
}

/// The byte pattern written to page `page` of a range.
fn pattern(tag: u8, page: u64) -> Vec<u8> {
    (0..PS as usize)
        .map(|i| (i as u8).wrapping_mul(13) ^ tag ^ (page as u8).wrapping_mul(101))
        .collect()
}

/// Writes, migrates, evicts and reads a few scattered pages of the range of `pages` pages at
/// `start` (pages at both ends, at chunk boundaries of the page table, in the middle), then
/// frees it; checks that the memory of the process stays small throughout.
fn exercise(mm: &AddressSpace, start: u64, pages: u64, tag: u8, base: (u64, u64)) {
    let range = VaRange::new(start, pages * PS);
    mm.create_range(range, PageSize::Size4K)
        .expect("a range of this size is created");
    let va = |p: u64| start + p * PS;
    let chunk = 1u64 << 14;
    let scattered = [
        0,
        1,
        chunk - 1,
        chunk,
        pages / 3,
        pages / 2,
        pages - chunk - 1,
        pages - 2,
        pages - 1,
    ];
    let g0 = mm.generation(range).unwrap();
    for &p in &scattered {
        mm.write(va(p), &pattern(tag, p)).unwrap();
    }
    assert!(
        mm.generation(range).unwrap() > g0,
        "writes change the generation"
    );
    // Migrations of spans crossing chunk boundaries of the page table (holes included),
    // to two devices, and one back.
    let spans = [
        (chunk - 2, 4u64, 0u8),
        (pages / 2 - 1, 3, 1),
        (pages - 4, 4, 0),
    ];
    for &(first, n, to) in &spans {
        let r = VaRange::new(va(first), n * PS);
        let rep = mm
            .migrate(r, PagemapId(to), &MigrateDetails::default())
            .unwrap();
        assert_eq!(rep.outcome, MigrateOutcome::Migrated);
        let mut backing = Vec::new();
        mm.backing(r, &mut backing).unwrap();
        assert_eq!(backing.len(), n as usize);
        assert!(
            backing
                .iter()
                .all(|b| matches!(b, PageBacking::Device { pagemap, .. } if pagemap.0 == to))
        );
    }
    let moved = mm.location(va(pages - 1)).unwrap();
    let PageLocation::Device { alloc, .. } = moved else {
        panic!("page {} is on a device: {moved:?}", pages - 1)
    };
    mm.evict_to_ram(alloc).unwrap();
    assert_eq!(mm.location(va(pages - 1)).unwrap(), PageLocation::System);
    // Every page reads back (device pages through the CPU-fault path), holes as zeros.
    for &p in &scattered {
        let mut buf = vec![0u8; PS as usize];
        mm.read(va(p), &mut buf).unwrap();
        assert_eq!(buf, pattern(tag, p), "page {p}");
    }
    let mut buf = vec![1u8; PS as usize];
    mm.read(va(pages / 4 + 5), &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0), "a hole reads as zeros");
    assert_eq!(
        mm.location(va(pages / 4 + 5)).unwrap(),
        PageLocation::Unpopulated
    );
    assert_eq!(
        mm.locations(VaRange::new(va(chunk - 3), 6 * PS)).unwrap(),
        vec![
            PageLocation::Unpopulated,
            PageLocation::System,
            PageLocation::System,
            PageLocation::System,
            PageLocation::System,
            PageLocation::Unpopulated,
        ],
        "the pages around the first chunk boundary after the CPU faults"
    );
    // Plans and generations over the whole range look at the written chunks only.
    assert!(mm.generation(range).unwrap() > g0);
    let (rss, vm) = memory().unwrap();
    let (rss_grew, vm_grew) = (rss.saturating_sub(base.0), vm.saturating_sub(base.1));
    eprintln!(
        "{} pages: resident +{} KiB, virtual +{} KiB",
        pages,
        rss_grew >> 10,
        vm_grew >> 10
    );
    assert!(
        rss_grew < 64 * MIB,
        "a range of {pages} pages with a few written made the process {} MiB larger",
        rss_grew / MIB
    );
    assert!(
        vm_grew < 256 * MIB,
        "a range of {pages} pages reserved {} MiB of address space",
        vm_grew / MIB
    );
    mm.free_range(start).unwrap();
    assert!(mm.ranges().is_empty());
    assert!(mm.allocations().is_empty(), "every allocation released");
}

#[test]
fn huge_ranges_cost_memory_for_the_pages_written_only() {
    if memory().is_none() {
        eprintln!("skipped: no /proc/self/status on this system");
        return;
    }
    let sim = SimBackend::new(SimConfig {
        devices: 2,
        device_capacity: 64 * MIB,
        host_capacity: 64 * MIB,
        ..SimConfig::default()
    })
    .unwrap();
    let mm = AddressSpace::new(sim.host_memory());
    for pm in sim.pagemap_per_device().unwrap() {
        mm.add_pagemap(pm).unwrap();
    }
    // A small range through the same paths first: one-time allocations (thread caches,
    // the sim's lazily backed memory) happen before the baseline.
    exercise(&mm, 1 << 40, 1 << 16, 7, memory().unwrap());
    let base = memory().unwrap();
    // u32::MAX pages of 4 KiB: a 16 TiB heap.
    exercise(&mm, 1 << 44, u32::MAX as u64, 1, base);
    // 1 TiB.
    exercise(&mm, 1 << 45, 1 << 28, 2, base);
    let (rss, _) = memory().unwrap();
    assert!(rss.saturating_sub(base.0) < 64 * MIB, "memory came back");
}
