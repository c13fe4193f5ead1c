//! A migration's report says where its time went: the phases (plan, allocate, map, issue,
//! wait, commit) follow one another inside the call, the allocation of a fresh destination
//! is the `allocate` phase, and the latency statistics count their sum.

mod common;

use common::{Options, build};
use drm_pagemap::{MigrateDetails, MigrateTiming, PageSize, PagemapId};
use std::time::{Duration, Instant};

const SLOW: Duration = Duration::from_millis(200);

fn sum(t: &MigrateTiming) -> Duration {
    t.plan + t.allocate + t.map + t.issue + t.wait + t.commit
}

#[test]
fn a_fresh_destinations_allocation_is_the_allocate_phase() {
    let rig = build("s*8,1*8", 2, PageSize::Size4K, Options::on("sim"));
    rig.audit.slow_allocations(SLOW);
    // Counted from here: building the layout migrated pages to pagemap 1.
    rig.mm.reset_stats();
    let t = Instant::now();
    let r = rig.migrate(0, &MigrateDetails::default()).unwrap();
    let elapsed = t.elapsed();
    let tm = r.timing;
    assert!(tm.allocate >= SLOW, "{tm:?}");
    // The phases are disjoint parts of the call.
    assert!(sum(&tm) <= elapsed, "{tm:?} in {elapsed:?}");
    // The latency histogram counted the sum, allocation included.
    let hist = rig.mm.stats().migrate_latency_ns;
    assert_eq!(hist.count(), 1);
    assert!(
        hist.quantile_floor(1.0).unwrap() >= SLOW.as_nanos() as u64 / 2,
        "{hist:?}"
    );
    rig.verify();
    rig.finish();
}

#[test]
fn a_reserved_destination_was_allocated_before_the_call() {
    let rig = build("s*8,1*8", 2, PageSize::Size4K, Options::on("sim"));
    rig.audit.slow_allocations(SLOW);
    let alloc = rig
        .mm
        .allocate_devmem(PagemapId(0), 16, PageSize::Size4K, rig.range)
        .unwrap();
    rig.audit.slow_allocations(Duration::ZERO);
    let t = Instant::now();
    let r = rig
        .mm
        .migrate_to_devmem(alloc, rig.range, &MigrateDetails::default())
        .unwrap();
    let elapsed = t.elapsed();
    assert!(r.timing.allocate < SLOW, "{:?}", r.timing);
    assert!(sum(&r.timing) <= elapsed, "{:?} in {elapsed:?}", r.timing);
    rig.verify();
    rig.finish();
}
