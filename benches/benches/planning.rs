//! Planning throughput: collect + classify + coalesce of a 1 M-page range whose pages sit in
//! system memory, in two peer pagemaps and in holes, migrated to a third pagemap. Measured
//! for our by-source coalescing next to the seed's consecutive order, with the number of copy
//! calls each issues.
//!
//! `cargo bench -p drm-pagemap-benches --bench planning`

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use drm_pagemap::Classified;
use drm_pagemap::sim::{SimBackend, SimConfig};
use drm_pagemap::{AddressSpace, Backend, Coalesce, MigrateDetails, PageSize, PagemapId, VaRange};
use std::hint::black_box;

const PAGES: u64 = 1 << 20;
const PS: u64 = 4096;
const BASE: u64 = 1 << 40;

/// Source of page `i`: runs of 7 pages cycling over system, pagemap 1, pagemap 2, holes,
/// so sources change often (the seed's worst case) and every source recurs.
fn source(i: u64) -> u8 {
    ((i / 7) % 4) as u8
}

fn setup() -> (SimBackend, AddressSpace) {
    let sim = SimBackend::new(SimConfig {
        devices: 3,
        device_capacity: 8 << 30,
        host_capacity: 8 << 30,
        ..SimConfig::default()
    })
    .expect("sim");
    let mm = AddressSpace::new(sim.host_memory());
    for pm in sim.pagemap_per_device().expect("pagemaps") {
        mm.add_pagemap(pm).expect("add");
    }
    let range = VaRange::new(BASE, PAGES * PS);
    mm.create_range(range, PageSize::Size4K).expect("range");
    let mut i = 0;
    while i < PAGES {
        let run = 7.min(PAGES - i);
        let r = VaRange::new(BASE + i * PS, run * PS);
        match source(i) {
            0 => {
                for k in 0..run {
                    mm.write(r.start + k * PS, &[1]).expect("write");
                }
            }
            1 | 2 => {
                mm.migrate(r, PagemapId(source(i)), &MigrateDetails::default())
                    .expect("place");
            }
            _ => {}
        }
        i += run;
    }
    (sim, mm)
}

fn planning(c: &mut Criterion) {
    let (_sim, mm) = setup();
    let range = VaRange::new(BASE, PAGES * PS);
    let mut g = c.benchmark_group("plan_1M_pages");
    g.throughput(Throughput::Elements(PAGES));
    g.sample_size(20);
    for (name, coalesce) in [
        ("by-source", Coalesce::BySource),
        ("consecutive", Coalesce::Consecutive),
    ] {
        let details = MigrateDetails {
            coalesce,
            ..MigrateDetails::default()
        };
        let calls = match mm.plan(range, PagemapId(0), &details).expect("plan") {
            Classified::Plan(p) => p.calls.len(),
            other => panic!("unexpected {other:?}"),
        };
        eprintln!("plan_1M_pages/{name}: {calls} copy calls");
        g.bench_with_input(BenchmarkId::from_parameter(name), &details, |b, d| {
            b.iter(|| black_box(mm.plan(range, PagemapId(0), d).expect("plan")))
        });
    }
    g.finish();
}

criterion_group!(benches, planning);
criterion_main!(benches);
