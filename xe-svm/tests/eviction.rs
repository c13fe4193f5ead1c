//! Device-memory accounting and least-recently-used eviction on sim, including a workload
//! that oversubscribes device memory 2x.

mod common;

use common::*;
use drm_pagemap_core::{PageLocation, PageSize, PagemapId, VaRange};
use std::sync::Arc;
use std::time::Duration;
use xe_svm::{Access, FaultAction, Placement, SvmConfig, SvmError};

fn on_device(rig: &Rig, range: VaRange, pm: u8) -> bool {
    rig.mm
        .locations(range)
        .unwrap()
        .iter()
        .all(|l| matches!(l, PageLocation::Device { pagemap, .. } if pagemap.0 == pm))
}

fn in_system(rig: &Rig, range: VaRange) -> bool {
    rig.mm
        .locations(range)
        .unwrap()
        .iter()
        .all(|l| *l == PageLocation::System)
}

#[test]
fn least_recently_used_allocation_is_evicted_first() {
    let rig = rig(Opts {
        svm: SvmConfig {
            capacity: Some(2 * M2),
            ..SvmConfig::default()
        },
        ..Opts::default()
    });
    let buf = VaRange::new(BASE, 4 * M2);
    create(&rig.mm, buf, PageSize::Size4K);
    fill(&rig.mm, buf, 1);
    let vm = &rig.vms[0];
    let r = |i: u64| VaRange::new(BASE + i * M2, M2);
    vm.handle_gpu_fault(r(0).start, Access::Write).unwrap();
    vm.handle_gpu_fault(r(1).start, Access::Write).unwrap();
    assert_eq!(rig.svm.memory(PagemapId(0)).unwrap().used, 2 * M2);
    // Range 2 needs room: range 0 is the least recently used.
    vm.handle_gpu_fault(r(2).start, Access::Write).unwrap();
    assert!(in_system(&rig, r(0)), "LRU victim evicted");
    assert!(on_device(&rig, r(1), 0) && on_device(&rig, r(2), 0));
    // Touch range 1 (a valid fault), then range 3 evicts range 2, not range 1.
    assert_eq!(
        vm.handle_gpu_fault(r(1).start, Access::Read)
            .unwrap()
            .action,
        FaultAction::Valid
    );
    vm.handle_gpu_fault(r(3).start, Access::Write).unwrap();
    assert!(in_system(&rig, r(2)));
    assert!(on_device(&rig, r(1), 0) && on_device(&rig, r(3), 0));
    let s = rig.svm.stats(vm.device());
    assert_eq!(s.lru_evictions.count, 2);
    assert_eq!(s.lru_evictions.bytes, 2 * M2);
    let m = rig.svm.memory(PagemapId(0)).unwrap();
    assert_eq!(m.capacity, 2 * M2);
    assert_eq!(m.peak, 2 * M2, "never above capacity");
    assert_eq!(m.used, 2 * M2);
    assert_eq!(rig.svm.lru(PagemapId(0)).len(), 2);
    // The evicted ranges' tables are stale; data everywhere intact.
    assert!(!vm.is_valid(r(0).start));
    check(&rig.mm, buf, 1);
    assert_eq!(rig.svm.memory(PagemapId(0)).unwrap().used, 0);
}

#[test]
fn range_larger_than_capacity_falls_back_or_fails_typed() {
    let rig = rig(Opts {
        svm: SvmConfig {
            capacity: Some(M2 / 2),
            ..SvmConfig::default()
        },
        ..Opts::default()
    });
    let buf = VaRange::new(BASE, M2);
    create(&rig.mm, buf, PageSize::Size4K);
    fill(&rig.mm, buf, 2);
    let vm = &rig.vms[1];
    let r = vm.handle_gpu_fault(BASE, Access::Write).unwrap();
    assert_eq!(r.action, FaultAction::FellBack);
    check_page_table(&rig, vm, BASE, Placement::System, Some(2));
    assert_eq!(rig.svm.stats(vm.device()).fallbacks, 1);
    let e = vm.handle_gpu_fault(BASE, Access::Atomic).unwrap_err();
    assert!(matches!(e, SvmError::Migrate { .. }), "{e}");
    assert!(e.to_string().contains("pagemap 1"), "{e}");
    check(&rig.mm, buf, 2);
}

#[test]
fn nothing_to_evict_is_out_of_device_memory() {
    // Capacity for one 2 MiB range; the pagemap is full of memory the fault handler did not
    // allocate (a direct engine migration), so there is nothing it may evict.
    let rig = rig(Opts {
        svm: SvmConfig {
            capacity: Some(M2),
            ..SvmConfig::default()
        },
        ..Opts::default()
    });
    let buf = VaRange::new(BASE, 2 * M2);
    create(&rig.mm, buf, PageSize::Size4K);
    fill(&rig.mm, buf, 3);
    rig.mm
        .migrate(
            VaRange::new(BASE + M2, M2),
            PagemapId(0),
            &drm_pagemap_core::MigrateDetails::default(),
        )
        .unwrap();
    let e = rig.vms[0]
        .handle_gpu_fault(BASE, Access::Atomic)
        .unwrap_err();
    assert!(
        matches!(e, SvmError::OutOfDeviceMemory { needed, capacity, .. } if needed == M2 && capacity == M2),
        "{e}"
    );
    assert!(e.to_string().contains("pagemap 0 on device 0"), "{e}");
    check(&rig.mm, buf, 3);
}

/// One step of a deterministic pseudo-random sequence.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn twice_oversubscribed_workload_keeps_correct_data() {
    // Two devices with 4 MiB each; a 16 MiB buffer (8 ranges), touched by both: 2x the
    // device memory of the whole machine.
    let cap = 4 * M2 / 2;
    let rig = rig(Opts {
        devices: 2,
        svm: SvmConfig {
            capacity: Some(cap),
            ..SvmConfig::default()
        },
        ..Opts::default()
    });
    let buf = VaRange::new(BASE, 8 * M2);
    create(&rig.mm, buf, PageSize::Size4K);
    fill(&rig.mm, buf, 4);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut version = [4u8; 8];
    for step in 0..200 {
        let i = next(&mut seed) % 8;
        let d = (next(&mut seed) % 2) as usize;
        let range = VaRange::new(BASE + i * M2, M2);
        let access = match next(&mut seed) % 3 {
            0 => Access::Read,
            1 => Access::Write,
            _ => Access::Atomic,
        };
        let r = rig.vms[d]
            .handle_gpu_fault(range.start + next(&mut seed) % M2, access)
            .unwrap();
        assert_ne!(
            r.action,
            FaultAction::FellBack,
            "step {step}: eviction always makes room"
        );
        check_page_table(
            &rig,
            &rig.vms[d],
            range.start,
            Placement::Device(PagemapId(d as u8)),
            None,
        );
        for pm in 0..2u8 {
            let m = rig.svm.memory(PagemapId(pm)).unwrap();
            assert!(m.used <= cap && m.peak <= cap, "step {step}: {m:?}");
        }
        // Now and then the CPU rewrites a range (bringing it home) or checks one.
        match next(&mut seed) % 8 {
            0 => {
                version[i as usize] = version[i as usize].wrapping_add(1);
                fill(&rig.mm, range, version[i as usize]);
            }
            1 => check(&rig.mm, range, version[i as usize]),
            _ => {}
        }
    }
    let s = rig.svm.total_stats();
    assert!(s.lru_evictions.count > 20, "{s}");
    for i in 0..8 {
        check(
            &rig.mm,
            VaRange::new(BASE + i * M2, M2),
            version[i as usize],
        );
    }
    assert!(rig.mm.allocations().is_empty());
    for pm in 0..2u8 {
        assert_eq!(rig.svm.memory(PagemapId(pm)).unwrap().used, 0);
    }
}

#[test]
fn oversubscribed_concurrent_faults_keep_running() {
    let cap = 3 * M2;
    let rig = Arc::new(rig(Opts {
        devices: 2,
        svm: SvmConfig {
            capacity: Some(cap),
            ..SvmConfig::default()
        },
        ..Opts::default()
    }));
    let buf = VaRange::new(BASE, 12 * M2);
    create(&rig.mm, buf, PageSize::Size4K);
    fill(&rig.mm, buf, 5);
    let r2 = rig.clone();
    watchdog(Duration::from_secs(240), move || {
        let threads: Vec<_> = (0..6u64)
            .map(|t| {
                let rig = r2.clone();
                std::thread::spawn(move || {
                    let mut seed = 0x2545_f491_4f6c_dd1d ^ (t + 1).wrapping_mul(0x9e37_79b9);
                    let mut fallbacks = 0;
                    for _ in 0..60 {
                        let i = next(&mut seed) % 12;
                        let vm = &rig.vms[(t % 2) as usize];
                        let access = if next(&mut seed).is_multiple_of(2) {
                            Access::Read
                        } else {
                            Access::Write
                        };
                        let r = vm.handle_gpu_fault(BASE + i * M2, access).unwrap();
                        fallbacks += (r.action == FaultAction::FellBack) as u32;
                    }
                    fallbacks
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    });
    for pm in 0..2u8 {
        let m = rig.svm.memory(PagemapId(pm)).unwrap();
        assert!(m.peak <= cap, "{m:?}");
    }
    assert!(rig.svm.total_stats().lru_evictions.count > 0);
    check(&rig.mm, buf, 5);
    assert!(rig.mm.allocations().is_empty());
}
