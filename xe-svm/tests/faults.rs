//! The fault handler on sim: ranges, targets, attributes, page tables, peer pushes, busy
//! retries, stale ranges.

mod common;

use common::*;
use drm_pagemap_core::{BusyReason, MigrateDetails, PageLocation, PageSize, PagemapId, VaRange};
use std::time::Duration;
use xe_svm::{
    Access, AtomicAccess, Attributes, FaultAction, Placement, PreferredLocation, SvmError, Target,
};

#[test]
fn fault_migrates_from_system_then_is_valid_then_goes_stale() {
    let rig = rig_default();
    let buf = VaRange::new(BASE, 4 * M2 / 2);
    create(&rig.mm, buf, PageSize::Size4K);
    fill(&rig.mm, buf, 1);
    let vm = &rig.vms[0];
    let r = vm.handle_gpu_fault(BASE + M2 + 100, Access::Write).unwrap();
    assert_eq!(r.range, VaRange::new(BASE + M2, M2));
    assert_eq!(r.page_size, PageSize::Size4K);
    assert_eq!(r.target, Target::Device(PagemapId(0)));
    assert_eq!(r.action, FaultAction::Migrated { pages: 512 });
    assert!(!r.busy_retry);
    check_page_table(&rig, vm, BASE + M2, Placement::Device(PagemapId(0)), None);
    assert!(vm.is_valid(BASE + M2));
    // Only the faulting range moved.
    let locs = rig.mm.locations(buf).unwrap();
    assert!(locs[..512].iter().all(|l| *l == PageLocation::System));
    assert!(locs[512..].iter().all(|l| matches!(
        l,
        PageLocation::Device {
            pagemap: PagemapId(0),
            ..
        }
    )));
    // One copy_to_devmem call by device 0, one command (the pages are contiguous).
    let s = rig.svm.stats(vm.device());
    let core = rig.mm.stats();
    assert_eq!(all_calls(&rig.mm), 1);
    let l = core.link(loc(None), loc(Some(0)));
    assert_eq!((l.calls, l.bytes), (1, M2));
    assert_eq!(s.total_commands(), 0, "the sim has no limit: nothing split");
    assert_eq!(s.to_device[2].count, 1);
    assert_eq!(s.to_device[2].bytes, M2);
    // Again: nothing to do.
    let r = vm.handle_gpu_fault(BASE + M2 + 5000, Access::Read).unwrap();
    assert_eq!(r.action, FaultAction::Valid);
    let s = rig.svm.stats(vm.device());
    assert_eq!(all_calls(&rig.mm), 1);
    assert_eq!(s.valid_faults, 1);
    assert_eq!(s.total_faults(), 2);
    // The CPU takes one page back: the table is stale, data intact, and the next fault
    // migrates again.
    check(&rig.mm, VaRange::new(BASE + M2, K4), 1);
    assert!(!vm.is_valid(BASE + M2));
    let r = vm.handle_gpu_fault(BASE + M2, Access::Read).unwrap();
    assert!(matches!(r.action, FaultAction::Migrated { .. }), "{r:?}");
    check_page_table(&rig, vm, BASE + M2, Placement::Device(PagemapId(0)), None);
    check(&rig.mm, buf, 1);
    assert!(rig.mm.allocations().is_empty(), "every allocation released");
    assert_eq!(rig.svm.memory(PagemapId(0)).unwrap().used, 0);
}

#[test]
fn chunk_sizes_follow_the_mirrored_allocation() {
    let rig = rig_default();
    let vm = &rig.vms[1];
    // 1 MiB + 64 KiB at a 2 MiB boundary: 64 KiB ranges.
    let a = VaRange::new(BASE, (1 << 20) + K64);
    create(&rig.mm, a, PageSize::Size4K);
    // 12 KiB: 4 KiB ranges.
    let b = VaRange::new(BASE + 4 * M2, 3 * K4);
    create(&rig.mm, b, PageSize::Size4K);
    // 2 MiB pages: 2 MiB ranges.
    let c = VaRange::new(BASE + 8 * M2, 2 * M2);
    create(&rig.mm, c, PageSize::Size2M);
    // 64 KiB pages in 128 KiB: 64 KiB ranges.
    let d = VaRange::new(BASE + 12 * M2, 2 * K64);
    create(&rig.mm, d, PageSize::Size64K);
    for (addr, want) in [
        (a.start + K64 + 7, VaRange::new(a.start + K64, K64)),
        (b.start + 2 * K4 + 1, VaRange::new(b.start + 2 * K4, K4)),
        (c.start + M2 + 3, VaRange::new(c.start + M2, M2)),
        (d.start + K64, VaRange::new(d.start + K64, K64)),
    ] {
        let r = vm.handle_gpu_fault(addr, Access::Read).unwrap();
        assert_eq!(r.range, want);
        assert_eq!(
            r.action,
            FaultAction::Migrated { pages: 0 },
            "unpopulated: nothing copied"
        );
    }
    let sizes: Vec<u64> = vm.svm_ranges().iter().map(|(r, _)| r.len).collect();
    assert_eq!(sizes, vec![K64, K4, M2, K64]);
    // Unpopulated pages read as zeros from cleared device memory.
    let mut z = vec![1u8; K4 as usize];
    rig.mm.read(c.start + M2, &mut z).unwrap();
    assert!(z.iter().all(|&x| x == 0));
    let s = rig.svm.stats(vm.device());
    assert_eq!(s.faults[0].count, 1);
    assert_eq!(s.faults[1].count, 2);
    assert_eq!(s.faults[2].count, 1);
}

#[test]
fn fault_outside_every_range_is_refused() {
    let rig = rig_default();
    let e = rig.vms[0].handle_gpu_fault(BASE, Access::Read).unwrap_err();
    assert!(
        matches!(e, SvmError::NotMirrored { address: BASE, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("device 0"), "{e}");
    assert_eq!(rig.svm.stats(rig.vms[0].device()).fault_errors, 1);
}

#[test]
fn system_preference_maps_system_pages() {
    let rig = rig_default();
    let buf = VaRange::new(BASE, M2);
    create(&rig.mm, buf, PageSize::Size4K);
    fill(&rig.mm, VaRange::new(BASE, M2 / 2), 2);
    let vm = &rig.vms[0];
    vm.madvise(
        buf,
        Attributes {
            preferred: PreferredLocation::System,
            ..Attributes::default()
        },
    )
    .unwrap();
    let r = vm.handle_gpu_fault(BASE + 10, Access::Write).unwrap();
    assert_eq!(r.target, Target::System);
    assert_eq!(r.action, FaultAction::ToSystem);
    // Every page is a system page now (holes got zeroed pages) and the table points at the
    // bytes of each.
    check_page_table(&rig, vm, BASE, Placement::System, None);
    vm.with_page_table(BASE, |pt| assert!(pt.writable)).unwrap();
    let host = rig.sim.arena_host().clone();
    vm.with_page_table(BASE, |pt| {
        for (i, p) in pt.ptes.iter().enumerate() {
            let mut b = vec![0u8; 4096];
            host.arena().read(
                drm_pagemap_testkit::mem::arena_addr::decode(p.addr).1,
                &mut b,
            );
            let va = BASE + i as u64 * K4;
            if va < BASE + M2 / 2 {
                assert_eq!(b, pattern(VaRange::new(va, K4), 2), "page {i}");
            } else {
                assert!(b.iter().all(|&x| x == 0), "page {i} should be zeros");
            }
        }
    })
    .unwrap();
    assert_eq!(all_calls(&rig.mm), 0);
    // Device pages come home when the preference is system.
    let other = &rig.vms[2];
    other.handle_gpu_fault(BASE, Access::Write).unwrap();
    let r = vm.handle_gpu_fault(BASE, Access::Read).unwrap();
    assert_eq!(r.action, FaultAction::ToSystem);
    check_page_table(&rig, vm, BASE, Placement::System, None);
    assert_eq!(rig.svm.stats(vm.device()).to_system[2].bytes, M2);
    // An atomic fault still needs the device's own memory.
    let r = vm.handle_gpu_fault(BASE, Access::Atomic).unwrap();
    assert_eq!(r.target, Target::Device(PagemapId(0)));
    check_page_table(&rig, vm, BASE, Placement::Device(PagemapId(0)), None);
    check(&rig.mm, VaRange::new(BASE, M2 / 2), 2);
}

#[test]
fn peer_preference_maps_the_peer_and_sources_push_their_own_pages() {
    let rig = rig_default();
    let buf = VaRange::new(BASE, M2);
    create(&rig.mm, buf, PageSize::Size4K);
    fill(&rig.mm, buf, 3);
    let vm0 = &rig.vms[0];
    vm0.madvise(
        buf,
        Attributes {
            preferred: PreferredLocation::Pagemap(PagemapId(1)),
            ..Attributes::default()
        },
    )
    .unwrap();
    let r = vm0.handle_gpu_fault(BASE, Access::Read).unwrap();
    assert_eq!(r.target, Target::Device(PagemapId(1)));
    // Device 1 pulled the system pages into its memory; device 0 maps them remotely.
    check_page_table(&rig, vm0, BASE, Placement::Device(PagemapId(1)), None);
    assert_eq!(link_calls(&rig.mm, None, Some(1)), 1);
    assert_eq!(all_calls(&rig.mm), 1, "device 0 copied nothing");
    // Device 2 faults: device 1 pushes its own pages (copy_to_ram), device 2 copies nothing.
    let vm2 = &rig.vms[2];
    let r = vm2.handle_gpu_fault(BASE, Access::Write).unwrap();
    assert_eq!(r.action, FaultAction::Migrated { pages: 512 });
    assert_eq!(link_calls(&rig.mm, Some(1), Some(2)), 1, "the push");
    assert_eq!(all_calls(&rig.mm), 2, "device 2 copied nothing else");
    check_page_table(&rig, vm2, BASE, Placement::Device(PagemapId(2)), None);
    // vm0's table is stale now; its next fault brings the pages back to pagemap 1.
    assert!(!vm0.is_valid(BASE));
    let r = vm0.handle_gpu_fault(BASE, Access::Read).unwrap();
    assert_eq!(r.action, FaultAction::Migrated { pages: 512 });
    check_page_table(&rig, vm0, BASE, Placement::Device(PagemapId(1)), None);
    check(&rig.mm, buf, 3);
}

#[test]
fn mixed_sources_one_call_per_executor() {
    let rig = rig_default();
    let buf = VaRange::new(BASE, M2);
    create(&rig.mm, buf, PageSize::Size4K);
    fill(&rig.mm, buf, 4);
    // A 64 KiB piece on device 1, another on device 2 (direct engine migrations through the
    // context's pagemaps), the rest in system memory.
    let d = MigrateDetails::default();
    rig.mm
        .migrate(VaRange::new(BASE + K64, K64), PagemapId(1), &d)
        .unwrap();
    rig.mm
        .migrate(VaRange::new(BASE + 8 * K64, K64), PagemapId(2), &d)
        .unwrap();
    rig.svm.reset_stats();
    let r = rig.vms[0].handle_gpu_fault(BASE, Access::Write).unwrap();
    assert_eq!(r.action, FaultAction::Migrated { pages: 512 });
    let calls = |from, to| link_calls(&rig.mm, from, to);
    assert_eq!(
        calls(None, Some(0)),
        1,
        "device 0 pulls the system pages once"
    );
    assert_eq!(calls(Some(1), Some(0)), 1, "device 1 pushes its pages");
    assert_eq!(calls(Some(2), Some(0)), 1, "device 2 pushes its pages");
    assert_eq!(all_calls(&rig.mm), 3);
    check_page_table(
        &rig,
        &rig.vms[0],
        BASE,
        Placement::Device(PagemapId(0)),
        None,
    );
    check(&rig.mm, buf, 4);
}

#[test]
fn foreign_owner_preference_counts_as_system_and_foreign_pages_are_evicted_first() {
    let rig = rig(Opts {
        owner_groups: Some(vec![0, 0, 1]),
        ..Opts::default()
    });
    let buf = VaRange::new(BASE, M2);
    create(&rig.mm, buf, PageSize::Size4K);
    fill(&rig.mm, buf, 5);
    let vm0 = &rig.vms[0];
    vm0.madvise(
        buf,
        Attributes {
            preferred: PreferredLocation::Pagemap(PagemapId(2)),
            ..Attributes::default()
        },
    )
    .unwrap();
    let r = vm0.handle_gpu_fault(BASE, Access::Read).unwrap();
    assert_eq!(r.target, Target::System, "device 0 cannot reach pagemap 2");
    // Pages in pagemap 2 (another owner) are never collected: the migration is Busy, the
    // range is evicted and the migration retried once under the write lock.
    rig.vms[2].handle_gpu_fault(BASE, Access::Write).unwrap();
    let r = vm0.handle_gpu_fault(BASE, Access::Atomic).unwrap();
    assert!(r.busy_retry);
    assert_eq!(r.action, FaultAction::Migrated { pages: 512 });
    let s = rig.svm.stats(vm0.device());
    assert_eq!(s.busy_retries, 1);
    assert_eq!(s.to_system[2].bytes, M2);
    check_page_table(&rig, vm0, BASE, Placement::Device(PagemapId(0)), None);
    check(&rig.mm, buf, 5);
}

#[test]
fn fragmentation_is_evicted_and_retried() {
    let rig = rig_default();
    let buf = VaRange::new(BASE, M2);
    create(&rig.mm, buf, PageSize::Size4K);
    fill(&rig.mm, buf, 6);
    // Some pages already in pagemap 0 from another allocation: the engine says Busy
    // (fragmentation).
    rig.mm
        .migrate(
            VaRange::new(BASE + 3 * K64, 2 * K64),
            PagemapId(0),
            &MigrateDetails::default(),
        )
        .unwrap();
    let r = rig.vms[0].handle_gpu_fault(BASE, Access::Read).unwrap();
    assert!(r.busy_retry);
    assert_eq!(r.action, FaultAction::Migrated { pages: 512 });
    assert_eq!(rig.svm.stats(rig.vms[0].device()).busy_retries, 1);
    assert_eq!(
        rig.mm.allocations().len(),
        1,
        "the fragment's allocation was released"
    );
    check(&rig.mm, buf, 6);
}

#[test]
fn atomic_attribute_cpu_refuses_device_atomics() {
    let rig = rig_default();
    let buf = VaRange::new(BASE, M2);
    create(&rig.mm, buf, PageSize::Size4K);
    fill(&rig.mm, buf, 7);
    let vm = &rig.vms[0];
    vm.madvise(
        buf,
        Attributes {
            atomic: AtomicAccess::Cpu,
            ..Attributes::default()
        },
    )
    .unwrap();
    let e = vm.handle_gpu_fault(BASE, Access::Atomic).unwrap_err();
    assert!(matches!(e, SvmError::AtomicDenied { .. }), "{e}");
    assert!(e.to_string().contains("device 0"), "{e}");
    assert!(
        rig.mm
            .locations(buf)
            .unwrap()
            .iter()
            .all(|l| *l == PageLocation::System)
    );
    // Plain accesses still work.
    vm.handle_gpu_fault(BASE, Access::Write).unwrap();
    check(&rig.mm, buf, 7);
}

#[test]
fn madvise_recuts_ranges_and_validates_arguments() {
    let rig = rig_default();
    let buf = VaRange::new(BASE, 2 * M2);
    create(&rig.mm, buf, PageSize::Size4K);
    fill(&rig.mm, buf, 8);
    let vm = &rig.vms[0];
    assert_eq!(
        vm.handle_gpu_fault(BASE, Access::Read).unwrap().range.len,
        M2
    );
    // Attributes on 64 KiB inside: the 2 MiB range is dropped, ranges are cut inside the
    // attribute intervals.
    let small = VaRange::new(BASE + 4 * K64, K64);
    let a = Attributes {
        timeslice: Duration::from_millis(1),
        ..Attributes::default()
    };
    vm.madvise(small, a).unwrap();
    assert!(vm.svm_ranges().is_empty());
    assert_eq!(vm.attributes(small.start), a);
    assert_eq!(vm.attributes(BASE), Attributes::default());
    assert_eq!(
        vm.handle_gpu_fault(small.start + 1, Access::Read)
            .unwrap()
            .range,
        small
    );
    assert_eq!(
        vm.handle_gpu_fault(BASE, Access::Read).unwrap().range,
        VaRange::new(BASE, K64)
    );
    assert!(vm.madvise(VaRange::new(BASE, 0), a).is_err());
    assert!(vm.madvise(VaRange::new(u64::MAX - 1, 5), a).is_err());
    let bad = Attributes {
        preferred: PreferredLocation::Pagemap(PagemapId(9)),
        ..a
    };
    assert_eq!(
        vm.madvise(buf, bad).unwrap_err(),
        SvmError::UnknownPagemap {
            pagemap: PagemapId(9)
        }
    );
    check(&rig.mm, buf, 8);
}

#[test]
fn ranges_outliving_their_cpu_range_are_recut() {
    let rig = rig_default();
    let vm = &rig.vms[1];
    let first = VaRange::new(BASE, M2);
    create(&rig.mm, first, PageSize::Size4K);
    fill(&rig.mm, first, 9);
    vm.handle_gpu_fault(BASE, Access::Write).unwrap();
    rig.mm.free_range(BASE).unwrap();
    assert!(rig.mm.allocations().is_empty());
    assert_eq!(rig.svm.memory(PagemapId(1)).unwrap().used, 0);
    // A smaller range with bigger pages at the same place.
    let second = VaRange::new(BASE + K64, K64);
    create(&rig.mm, second, PageSize::Size64K);
    fill(&rig.mm, second, 10);
    let r = vm.handle_gpu_fault(BASE + K64, Access::Read).unwrap();
    assert_eq!(r.range, second);
    assert_eq!(r.page_size, PageSize::Size64K);
    check_page_table(
        &rig,
        vm,
        second.start,
        Placement::Device(PagemapId(1)),
        None,
    );
    // The first address is in no range any more.
    assert!(matches!(
        vm.handle_gpu_fault(BASE, Access::Read),
        Err(SvmError::NotMirrored { .. })
    ));
    check(&rig.mm, second, 10);
    // invalidate drops the table; the next fault rebuilds it without copying.
    vm.invalidate(second);
    assert!(vm.with_page_table(second.start, |_| ()).is_none());
    let r = vm.handle_gpu_fault(second.start, Access::Read).unwrap();
    assert!(
        matches!(r.action, FaultAction::Migrated { .. } | FaultAction::Mapped),
        "{r:?}"
    );
}

#[test]
fn read_mapping_is_upgraded_by_a_write_fault() {
    let rig = rig_default();
    let buf = VaRange::new(BASE, K64);
    create(&rig.mm, buf, PageSize::Size4K);
    let vm = &rig.vms[0];
    vm.handle_gpu_fault(BASE, Access::Read).unwrap();
    assert_eq!(vm.with_page_table(BASE, |pt| pt.writable), Some(false));
    let r = vm.handle_gpu_fault(BASE, Access::Write).unwrap();
    assert_eq!(r.action, FaultAction::Mapped);
    assert_eq!(vm.with_page_table(BASE, |pt| pt.writable), Some(true));
    assert_eq!(
        vm.handle_gpu_fault(BASE, Access::Read).unwrap().action,
        FaultAction::Valid
    );
}

#[test]
fn racing_direct_migration_does_not_lose_data() {
    // A page locked by a running migration (slow copies) makes a second VM's migration
    // Busy; with the write lock it waits for the first to finish and then succeeds.
    let rig = rig(Opts {
        copy_latency: Duration::from_millis(30),
        ..Opts::default()
    });
    let buf = VaRange::new(BASE, M2);
    create(&rig.mm, buf, PageSize::Size4K);
    fill(&rig.mm, buf, 11);
    let mm = rig.mm.clone();
    let t = std::thread::spawn(move || mm.migrate(buf, PagemapId(2), &MigrateDetails::default()));
    let r = rig.vms[0].handle_gpu_fault(BASE, Access::Atomic).unwrap();
    assert_eq!(r.target, Target::Device(PagemapId(0)));
    let direct = t.join().unwrap();
    if let Err(e) = &direct {
        assert!(
            matches!(
                e,
                drm_pagemap_core::Error::Busy {
                    reason: BusyReason::PageLocked,
                    ..
                }
            ),
            "{e}"
        );
    }
    check(&rig.mm, buf, 11);
}
