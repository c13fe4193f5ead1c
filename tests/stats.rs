//! The address space's statistics (`AddressSpace::stats`) after known migrations, on every
//! backend of the suites (sim, level-zero on the software driver, plug-ins; CUDA when
//! present): bytes, pages and calls per link exactly, page sizes, histogram buckets, nothing
//! left in flight, memory in use, evictions and CPU faults, failures by kind (busy by reason,
//! out of memory, fence error, timeout, injected), and a reset that zeroes the counters but
//! not the gauges.

mod common;

use common::{Options, backends, build};
use drm_pagemap::{
    BusyReason, Histogram, Location, MigrateDetails, PageSize, PagemapId, StatsSnapshot, VaRange,
};
use drm_pagemap_testkit::inject::{FaultInjector, FaultSite};
use std::time::Duration;

const P4K: u64 = 4096;

fn no_flight(s: &StatsSnapshot, what: &str) {
    assert_eq!(s.copies_in_flight, 0, "{what}: copies in flight");
    assert_eq!(s.bytes_in_flight, 0, "{what}: bytes in flight");
}

fn link(s: &StatsSnapshot, from: Location, to: Location) -> (u64, u64, u64) {
    let l = s.link(from, to);
    (l.bytes, l.pages, l.calls)
}

#[test]
fn links_sizes_histograms_and_gauges_after_known_migrations() {
    for b in backends() {
        // s s 0 1 s . on three pagemaps: page 2 on pagemap 0, page 3 on pagemap 1.
        let rig = build("ss01s.", 3, PageSize::Size4K, Options::on(b));
        let mm = &rig.mm;
        let before = mm.stats();
        assert_eq!(
            before.host_frames_in_use, 3,
            "{b}: frames of the system pages"
        );
        assert_eq!(before.host_bytes_in_use, 3 * P4K, "{b}");
        mm.reset_stats();
        let s = mm.stats();
        assert!(s.links.is_empty(), "{b}: reset zeroes the links");
        assert_eq!(s.call_bytes.count(), 0, "{b}");
        assert_eq!(s.migrations, 0, "{b}");
        assert_eq!(s.host_frames_in_use, 3, "{b}: a reset keeps the gauges");

        // Everything to pagemap 2: the destination pulls the 3 system pages (one call), pagemap
        // 0 and pagemap 1 push their page each (source_peer_migrates, the default).
        let rep = mm
            .migrate(rig.range, PagemapId(2), &MigrateDetails::default())
            .expect("migrate");
        assert_eq!(rep.calls.len(), 3, "{b}");
        let s = mm.stats();
        let to2 = Location::Pagemap(2);
        assert_eq!(
            link(&s, Location::System, to2),
            (3 * P4K, 3, 1),
            "{b}: system -> 2"
        );
        assert_eq!(
            link(&s, Location::Pagemap(0), to2),
            (P4K, 1, 1),
            "{b}: 0 -> 2"
        );
        assert_eq!(
            link(&s, Location::Pagemap(1), to2),
            (P4K, 1, 1),
            "{b}: 1 -> 2"
        );
        assert_eq!(s.links.len(), 3, "{b}: no other link: {:?}", s.links);
        assert!(
            s.links.iter().all(|l| l.device_time_ns > 0),
            "{b}: device time of every landed call"
        );
        let ps = s.page_size(PageSize::Size4K);
        assert_eq!((ps.bytes, ps.pages, ps.calls), (5 * P4K, 5, 3), "{b}");
        assert_eq!(s.page_sizes.len(), 1, "{b}");
        // Call sizes: two calls of 4 KiB (bucket 12), one of 12 KiB (bucket 13).
        assert_eq!(s.call_bytes.buckets[12], 2, "{b}: {:?}", s.call_bytes);
        assert_eq!(s.call_bytes.buckets[13], 1, "{b}");
        assert_eq!(s.call_bytes.count(), 3, "{b}");
        assert_eq!(s.migrations, 1, "{b}");
        assert_eq!(s.migrate_latency_ns.count(), 1, "{b}");
        no_flight(&s, b);
        // Memory: the 3 system frames went back; pagemap 2 holds one 6-page allocation;
        // pagemaps 0 and 1 released theirs.
        assert_eq!(s.host_frames_in_use, 0, "{b}");
        let pm2 = s.pagemap(PagemapId(2)).expect("pagemap 2");
        assert_eq!(
            (pm2.used_bytes, pm2.allocations),
            (6 * P4K, 1),
            "{b}: {pm2:?}"
        );
        assert!(pm2.capacity_bytes >= 6 * P4K, "{b}");
        let pm0 = s.pagemap(PagemapId(0)).expect("pagemap 0");
        assert_eq!((pm0.used_bytes, pm0.allocations), (0, 0), "{b}");
        assert_eq!(s.failures.total(), 0, "{b}");

        // Migrating again: nothing to do.
        mm.migrate(rig.range, PagemapId(2), &MigrateDetails::default())
            .expect("again");
        assert_eq!(mm.stats().migrations_not_needed, 1, "{b}");

        // A CPU read brings the 5 data pages (and the hole's page) home by the CPU-fault
        // path, pagemap 2 -> system: one pass per allocation-sized window the range
        // overlaps (the range is not 24 KiB aligned: two), one copy call each.
        let mut buf = vec![0u8; rig.range.len as usize];
        mm.read(rig.range.start, &mut buf).expect("read");
        let s = mm.stats();
        assert_eq!(s.cpu_faults, 2, "{b}");
        assert_eq!(s.cpu_fault_pages, 6, "{b}");
        assert_eq!(
            link(&s, to2, Location::System),
            (6 * P4K, 6, 2),
            "{b}: 2 -> system"
        );
        assert_eq!(s.host_frames_in_use, 6, "{b}");
        assert_eq!(s.pagemap(PagemapId(2)).expect("pm").used_bytes, 0, "{b}");
        no_flight(&s, b);

        // An eviction: to pagemap 0, then evicted.
        let rep = mm
            .migrate(rig.range, PagemapId(0), &MigrateDetails::default())
            .expect("migrate");
        let alloc = rep.alloc.expect("moved");
        mm.evict_to_ram(alloc).expect("evict");
        let s = mm.stats();
        assert_eq!((s.evictions, s.evicted_pages), (1, 6), "{b}");
        assert_eq!(
            link(&s, Location::Pagemap(0), Location::System),
            (6 * P4K, 6, 1),
            "{b}"
        );
        assert_eq!(s.migrations, 2, "{b}");
        no_flight(&s, b);

        // Reset: counters zero, gauges stay.
        mm.reset_stats();
        let s = mm.stats();
        assert!(s.links.is_empty() && s.page_sizes.is_empty(), "{b}");
        assert_eq!(
            s.call_bytes.count() + s.migrate_latency_ns.count(),
            0,
            "{b}"
        );
        assert_eq!(
            (s.migrations, s.evictions, s.cpu_faults, s.failures.total()),
            (0, 0, 0, 0),
            "{b}"
        );
        assert_eq!(s.host_frames_in_use, 6, "{b}");
        rig.finish();
    }
}

#[test]
fn failures_by_kind() {
    for b in backends() {
        let inj = FaultInjector::new();
        let rig = build("ssss", 2, PageSize::Size4K, Options::on(b).faults(&inj));
        let mm = &rig.mm;
        mm.reset_stats();
        let d = MigrateDetails::default();

        // A copy submission fails (injected): a backend failure, injected.
        inj.fail_nth(FaultSite::Copy, 1);
        mm.migrate(rig.range, PagemapId(0), &d).expect_err("copy");
        let f = mm.stats().failures;
        assert_eq!((f.backend, f.injected, f.total()), (1, 1, 1), "{b}: {f:?}");
        no_flight(&mm.stats(), b);

        // A copy's fence signals an error (injected): a fence error, injected.
        inj.fail_nth(FaultSite::FenceError, 1);
        mm.migrate(rig.range, PagemapId(0), &d).expect_err("fence");
        let f = mm.stats().failures;
        assert_eq!(
            (f.fence_error, f.injected, f.total()),
            (1, 2, 2),
            "{b}: {f:?}"
        );
        let s = mm.stats();
        no_flight(&s, b);
        // The failed fence's call was issued: it counts on its link.
        assert_eq!(
            link(&s, Location::System, Location::Pagemap(0)),
            (4 * P4K, 4, 1),
            "{b}: the failed submission is not counted"
        );

        // Busy, by reason: pages 0..2 on pagemap 0, then the whole range to 0 without
        // can_migrate_same_pagemap.
        let half = VaRange::new(rig.range.start, 2 * P4K);
        mm.migrate(half, PagemapId(0), &d).expect("half");
        match mm.migrate(rig.range, PagemapId(0), &d) {
            Err(drm_pagemap::Error::Busy {
                reason: BusyReason::Fragmentation,
                ..
            }) => {}
            other => panic!("{b}: {other:?}"),
        }
        let f = mm.stats().failures;
        assert_eq!(
            (f.busy_fragmentation, f.busy(), f.total()),
            (1, 1, 3),
            "{b}"
        );

        // A refused request (unknown pagemap) is "other".
        mm.migrate(rig.range, PagemapId(9), &d)
            .expect_err("unknown");
        assert_eq!(mm.stats().failures.other, 1, "{b}");
        assert_eq!(mm.stats().failures.total(), 4, "{b}");
        rig.finish();
    }
}

#[test]
fn out_of_memory_and_timeout_on_sim() {
    // Out of memory: a device of 16 pages, two allocations of 12.
    let opts = Options {
        device_capacity: Some(16 * P4K),
        ..Options::on("sim")
    };
    let rig = build("ssss", 1, PageSize::Size4K, opts);
    let mm = &rig.mm;
    let a = mm
        .allocate_devmem(PagemapId(0), 12, PageSize::Size4K, rig.range)
        .expect("first");
    mm.allocate_devmem(PagemapId(0), 12, PageSize::Size4K, rig.range)
        .expect_err("no room");
    let s = mm.stats();
    assert_eq!(s.failures.out_of_memory, 1, "{:?}", s.failures);
    let pm = s.pagemap(PagemapId(0)).expect("pm");
    assert_eq!((pm.used_bytes, pm.allocations), (12 * P4K, 1));
    assert_eq!(pm.capacity_bytes, 16 * P4K);
    mm.release_devmem(a).expect("release");
    assert_eq!(mm.stats().pagemap(PagemapId(0)).expect("pm").used_bytes, 0);
    rig.finish();

    // A fence that hangs past the timeout: a timeout; the copy stays in flight (parked)
    // until its fence signals.
    let inj = FaultInjector::new();
    let rig = build("ssss", 1, PageSize::Size4K, Options::on("sim").faults(&inj));
    let mm = &rig.mm;
    inj.fail_nth(FaultSite::FenceHang, 1);
    let d = MigrateDetails {
        fence_timeout: Some(Duration::from_millis(20)),
        ..MigrateDetails::default()
    };
    mm.migrate(rig.range, PagemapId(0), &d)
        .expect_err("timeout");
    let s = mm.stats();
    assert_eq!(s.failures.timeout, 1, "{:?}", s.failures);
    assert_eq!(s.copies_in_flight, 1, "the hung copy is still in flight");
    assert_eq!(s.bytes_in_flight, 4 * P4K);
    // A reset zeroes the links but keeps the gauge (in flight: submitted minus landed).
    mm.reset_stats();
    let s = mm.stats();
    assert!(s.links.is_empty(), "{:?}", s.links);
    assert_eq!((s.copies_in_flight, s.bytes_in_flight), (1, 4 * P4K));
}

#[test]
fn the_snapshot_serializes() {
    let rig = build("s0", 1, PageSize::Size4K, Options::on("sim"));
    let s = rig.mm.stats();
    let v = serde_json::to_value(&s).expect("json");
    let links = v["links"].as_array().expect("links");
    assert_eq!(links.len(), 1);
    assert_eq!(links[0]["from"], "system");
    assert_eq!(links[0]["to"]["pagemap"], 0);
    assert_eq!(links[0]["bytes"], 4096);
    assert_eq!(v["call_bytes"]["buckets"][12], 1);
    assert_eq!(Histogram::bucket_of(4096), 12);
    assert!(v["failures"]["busy_page_locked"].is_u64());
    rig.finish();
}
