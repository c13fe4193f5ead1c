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

use clap::{Parser, ValueEnum};
use drm_pagemap::sim::{SimBackend, SimConfig};
use drm_pagemap::{
    AddressSpace, AllocId, Backend, MigrateDetails, MigrateOutcome, PageSize, PagemapId, VaRange,
};
use std::hint::black_box;
use std::time::{Duration, Instant};

const BASE: u64 = 1 << 40;
const PM: PagemapId = PagemapId(0);

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Path {
    /// The GPU fault path: allocate_devmem + migrate_to_devmem, back by evict_to_ram.
    Fault,
    /// migrate into a new allocation, back by a CPU read (the CPU-fault path).
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

/// The range: 16 pages of 4 KiB or one page of 64 KiB.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Shape {
    /// A 64 KiB range of 16 pages of 4 KiB.
    #[value(name = "16x4k")]
    Pages16x4k,
    /// One 64 KiB page.
    #[value(name = "1x64k")]
    Page1x64k,
}

impl Shape {
    fn pages(self) -> (usize, PageSize) {
        match self {
            Shape::Pages16x4k => (16, PageSize::Size4K),
            Shape::Page1x64k => (1, PageSize::Size64K),
        }
    }
}

/// Instructions per small migration on the simulated backend (run under callgrind); without
/// arguments, wall-clock microseconds of every shape and path (informative).
#[derive(Debug, Parser)]
#[command(name = "small_migration")]
struct Args {
    /// The range's pages.
    #[arg(value_enum, requires_all = ["path", "rounds"])]
    shape: Option<Shape>,
    /// The path there and back.
    #[arg(value_enum, requires = "rounds")]
    path: Option<Path>,
    /// Round trips after 10 warm-up rounds.
    rounds: Option<usize>,
    /// Passed by `cargo bench`; nothing changes.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() {
    let args = Args::parse();
    if let (Some(sh), Some(p), Some(rounds)) = (args.shape, args.path, args.rounds) {
        let (pages, ps) = sh.pages();
        let s = setup(pages, ps);
        let (dev, ram) = run(&s, p, rounds);
        println!(
            "{} {}: {rounds} rounds, to device {dev} ns, to RAM {ram} ns",
            name(sh),
            name(p)
        );
        return;
    }
    for sh in Shape::value_variants() {
        for p in Path::value_variants() {
            let (pages, ps) = sh.pages();
            let s = setup(pages, ps);
            let (dev, ram) = run(&s, *p, 1000);
            println!(
                "{} {}: to device {dev} ns, to RAM {ram} ns (wall clock, informative)",
                name(*sh),
                name(*p)
            );
        }
    }
}

/// The command-line name of a value.
fn name(v: impl ValueEnum) -> String {
    v.to_possible_value()
        .map_or_else(String::new, |p| p.get_name().to_string())
}
