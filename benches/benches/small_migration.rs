//! Instructions per small migration, to device memory and back, on the simulated backend
//! (zero copy latency): a deterministic measure of the engine's fixed cost per fault, meant
//! to run under `valgrind --tool=callgrind` (the machine's clock is too noisy for it).
//!
//! `small_migration <shape> <path> <rounds>`:
//! - `shape`: `16x4k` (a 64 KiB range of 16 pages of 4 KiB) or `1x64k` (one 64 KiB page);
//! - `path`: `fault` (the GPU fault path: `allocate_devmem` then `migrate_to_devmem`, back by
//!   `evict_to_ram`) or `fresh` (`migrate` into a new allocation, back by a CPU read: the
//!   CPU-fault path);
//! - `rounds`: round trips after 10 warm-up rounds.
//!
//! The measured calls run inside `to_device` and `to_ram` (never inlined), so their inclusive
//! costs (main thread; the sim's copy engines run on threads of their own) are what one
//! direction costs. Two runs with different `rounds` give the cost per round exactly (the
//! difference divided by the difference of rounds: one-time costs cancel):
//!
//! ```text
//! cargo bench -p drm-pagemap-benches --bench small_migration --no-run
//! valgrind --tool=callgrind --callgrind-out-file=cg.%p target/release/deps/small_migration-* 16x4k fault 1000
//! callgrind_annotate --inclusive=yes cg.<pid> | grep -E 'to_device|to_ram'
//! ```
//!
//! Run by `cargo bench` without arguments it does 1,000 rounds of each shape and path and
//! prints wall-clock microseconds per direction (informative only).

use drm_pagemap::sim::{SimBackend, SimConfig};
use drm_pagemap::{
    AddressSpace, AllocId, Backend, MigrateDetails, MigrateOutcome, PageSize, PagemapId, VaRange,
};
use std::hint::black_box;
use std::time::{Duration, Instant};

const BASE: u64 = 1 << 40;
const PM: PagemapId = PagemapId(0);

#[derive(Clone, Copy)]
enum Path {
    Fault,
    Fresh,
}

struct Setup {
    _sim: SimBackend,
    mm: AddressSpace,
    range: VaRange,
    pages: usize,
    ps: PageSize,
}

fn setup(pages: usize, ps: PageSize) -> Setup {
    let sim = SimBackend::new(SimConfig {
        devices: 1,
        device_capacity: 64 << 20,
        host_capacity: 64 << 20,
        copy_latency: Duration::ZERO,
        ..SimConfig::default()
    })
    .expect("sim");
    let mm = AddressSpace::new(sim.host_memory());
    for pm in sim.pagemap_per_device().expect("pagemaps") {
        mm.add_pagemap(pm).expect("add");
    }
    let range = VaRange::new(BASE, pages as u64 * ps.bytes());
    mm.create_range(range, ps).expect("range");
    mm.write(range.start, &vec![7u8; range.len as usize])
        .expect("write");
    Setup {
        _sim: sim,
        mm,
        range,
        pages,
        ps,
    }
}

/// One migration of the whole range to the device; returns its allocation.
#[inline(never)]
fn to_device(s: &Setup, path: Path, reserved: Option<AllocId>, d: &MigrateDetails) -> AllocId {
    let rep = match (path, reserved) {
        (Path::Fault, Some(alloc)) => s.mm.migrate_to_devmem(alloc, s.range, d),
        _ => s.mm.migrate(s.range, PM, d),
    }
    .expect("migrate");
    assert_eq!(rep.outcome, MigrateOutcome::Migrated);
    rep.alloc.expect("migrated")
}

/// Brings the range back to system memory.
#[inline(never)]
fn to_ram(s: &Setup, path: Path, alloc: AllocId, buf: &mut [u8]) {
    match path {
        Path::Fault => {
            let rep = s.mm.evict_to_ram(alloc).expect("evict");
            assert_eq!(rep.pages, s.pages);
        }
        Path::Fresh => s.mm.read(s.range.start, buf).expect("read"),
    }
}

/// `rounds` round trips (after 10 unmeasured ones); wall-clock nanoseconds per direction.
fn run(s: &Setup, path: Path, rounds: usize) -> (u128, u128) {
    let d = MigrateDetails::default();
    let mut buf = vec![0u8; s.range.len as usize];
    let (mut dev, mut ram) = (Duration::ZERO, Duration::ZERO);
    for i in 0..rounds + 10 {
        let reserved = match path {
            Path::Fault => Some(
                s.mm.allocate_devmem(PM, s.pages, s.ps, s.range)
                    .expect("allocate"),
            ),
            Path::Fresh => None,
        };
        let t0 = Instant::now();
        let alloc = to_device(s, path, reserved, &d);
        let t1 = Instant::now();
        to_ram(s, path, alloc, &mut buf);
        let t2 = Instant::now();
        if i >= 10 {
            dev += t1 - t0;
            ram += t2 - t1;
        }
    }
    s.mm.read(s.range.start, &mut buf).expect("read");
    black_box(&buf);
    assert!(buf.iter().all(|&b| b == 7), "the bytes came back");
    let n = rounds.max(1) as u128;
    (dev.as_nanos() / n, ram.as_nanos() / n)
}

fn shape(name: &str) -> Option<(usize, PageSize)> {
    match name {
        "16x4k" => Some((16, PageSize::Size4K)),
        "1x64k" => Some((1, PageSize::Size64K)),
        _ => None,
    }
}

fn path(name: &str) -> Option<Path> {
    match name {
        "fault" => Some(Path::Fault),
        "fresh" => Some(Path::Fresh),
        _ => None,
    }
}

fn main() {
    // `cargo bench` passes `--bench`; anything starting with `-` is not ours.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    if let [sh, p, rounds] = &args[..] {
        let (Some((pages, ps)), Some(p), Ok(rounds)) = (shape(sh), path(p), rounds.parse()) else {
            eprintln!("usage: small_migration <16x4k|1x64k> <fault|fresh> <rounds>");
            std::process::exit(2);
        };
        let s = setup(pages, ps);
        let (dev, ram) = run(&s, p, rounds);
        println!(
            "{sh} {}: {rounds} rounds, to device {dev} ns, to RAM {ram} ns",
            args[1]
        );
        return;
    }
    for sh in ["16x4k", "1x64k"] {
        for p in ["fault", "fresh"] {
            let (pages, ps) = shape(sh).expect("known");
            let s = setup(pages, ps);
            let (dev, ram) = run(&s, path(p).expect("known"), 1000);
            println!("{sh} {p}: to device {dev} ns, to RAM {ram} ns (wall clock, informative)");
        }
    }
}
