//! Fence errors, hangs and submission failures on sim: the fault reports a typed error,
//! every page's data stays where it was, every allocation is released, and the next fault
//! works.

mod common;

use common::*;
use drm_pagemap_core::{
    Error as CoreError, FenceError, PageLocation, PageSize, PagemapId, VaRange,
};
use drm_pagemap_testkit::inject::{FaultInjector, FaultSite};
use std::time::Duration;
use xe_svm::{Access, FaultAction, Placement, SvmConfig, SvmError};

fn injected(svm: SvmConfig) -> (Rig, std::sync::Arc<FaultInjector>) {
    let inj = FaultInjector::new();
    let rig = rig(Opts {
        faults: Some(inj.clone()),
        svm,
        ..Opts::default()
    });
    (rig, inj)
}

fn released(rig: &Rig) {
    assert!(
        rig.mm.allocations().is_empty(),
        "{:?}",
        rig.mm.allocations()
    );
    for pm in 0..3u8 {
        assert_eq!(
            rig.svm.memory(PagemapId(pm)).unwrap().used,
            0,
            "pagemap {pm}"
        );
    }
}

#[test]
fn copy_fence_error_fails_the_fault_and_loses_nothing() {
    let (rig, inj) = injected(SvmConfig::default());
    // The injector forwards the sim's caps (and the context's wrapper the injector's).
    let caps = rig.mm.pagemap(PagemapId(0)).unwrap().devmem().caps();
    assert_eq!(caps.host_fences, drm_pagemap_core::HostFenceWait::InQueue);
    assert!(caps.in_order && caps.max_command_bytes.is_none());
    let buf = VaRange::new(BASE, M2);
    create(&rig.mm, buf, PageSize::Size4K);
    fill(&rig.mm, buf, 1);
    inj.fail_nth(FaultSite::FenceError, 1);
    let vm = &rig.vms[0];
    let e = vm.handle_gpu_fault(BASE, Access::Write).unwrap_err();
    match &e {
        SvmError::Migrate {
            source:
                CoreError::Fence {
                    source: FenceError::Failed(_),
                    ..
                },
            pagemap,
            ..
        } => assert_eq!(*pagemap, PagemapId(0)),
        other => panic!("{other}"),
    }
    assert!(e.to_string().contains("pagemap 0"), "{e}");
    let s = rig.svm.stats(vm.device());
    assert_eq!(s.fault_errors, 1);
    // The failed copy fence failed the migration: counted once, by the core.
    let f = rig.mm.stats().failures;
    assert_eq!((f.fence_error, f.injected, f.total()), (1, 1, 1), "{f:?}");
    assert_eq!(s.pre_fence_errors, 0);
    assert!(
        rig.mm
            .locations(buf)
            .unwrap()
            .iter()
            .all(|l| *l == PageLocation::System)
    );
    released(&rig);
    check(&rig.mm, buf, 1);
    // The page table built while the copies ran, for pages that never moved, is gone.
    assert!(vm.with_page_table(BASE, |_| ()).is_none());
    assert!(!vm.is_valid(BASE));
    // The next fault works.
    let r = vm.handle_gpu_fault(BASE, Access::Write).unwrap();
    assert_eq!(r.action, FaultAction::Migrated { pages: 512 });
    check_page_table(&rig, vm, BASE, Placement::Device(PagemapId(0)), None);
    check(&rig.mm, buf, 1);
}

#[test]
fn peer_push_fence_error_leaves_pages_on_the_peer() {
    let (rig, inj) = injected(SvmConfig::default());
    let buf = VaRange::new(BASE, M2);
    create(&rig.mm, buf, PageSize::Size4K);
    fill(&rig.mm, buf, 2);
    rig.vms[1].handle_gpu_fault(BASE, Access::Write).unwrap();
    inj.fail_nth(FaultSite::FenceError, 1);
    let e = rig.vms[2]
        .handle_gpu_fault(BASE, Access::Atomic)
        .unwrap_err();
    assert!(matches!(e, SvmError::Migrate { .. }), "{e}");
    // The source still holds every page; its page table still matches.
    assert!(rig.mm.locations(buf).unwrap().iter().all(|l| matches!(
        l,
        PageLocation::Device {
            pagemap: PagemapId(1),
            ..
        }
    )));
    assert!(rig.vms[1].is_valid(BASE));
    assert_eq!(
        rig.mm.allocations().len(),
        1,
        "only the source's allocation lives"
    );
    assert_eq!(rig.svm.memory(PagemapId(2)).unwrap().used, 0);
    assert_eq!(rig.mm.stats().failures.fence_error, 1);
    check(&rig.mm, buf, 2);
    released(&rig);
}

#[test]
fn copy_submission_and_allocation_failures_are_typed() {
    let (rig, inj) = injected(SvmConfig::default());
    let buf = VaRange::new(BASE, M2);
    create(&rig.mm, buf, PageSize::Size4K);
    fill(&rig.mm, buf, 3);
    let vm = &rig.vms[0];
    inj.fail_nth(FaultSite::Copy, 1);
    let e = vm.handle_gpu_fault(BASE, Access::Read).unwrap_err();
    assert!(
        matches!(
            &e,
            SvmError::Migrate {
                source: CoreError::Backend { .. },
                ..
            }
        ),
        "{e}"
    );
    released(&rig);
    inj.fail_nth(FaultSite::Alloc, 1);
    let e = vm.handle_gpu_fault(BASE, Access::Read).unwrap_err();
    assert!(
        matches!(
            &e,
            SvmError::Migrate {
                source: CoreError::Backend {
                    op: drm_pagemap_core::BackendOp::Allocate,
                    ..
                },
                ..
            }
        ),
        "{e}"
    );
    released(&rig);
    inj.fail_nth(FaultSite::Map, 1);
    assert!(vm.handle_gpu_fault(BASE, Access::Read).is_err());
    released(&rig);
    check(&rig.mm, buf, 3);
    assert_eq!(rig.svm.stats(vm.device()).fault_errors, 3);
    vm.handle_gpu_fault(BASE, Access::Read).unwrap();
    check(&rig.mm, buf, 3);
}

#[test]
fn hanging_copy_fence_times_out_and_is_cleaned_up_later() {
    let (rig, inj) = injected(SvmConfig {
        fence_timeout: Some(Duration::from_millis(100)),
        ..SvmConfig::default()
    });
    let buf = VaRange::new(BASE, K64);
    create(&rig.mm, buf, PageSize::Size4K);
    fill(&rig.mm, buf, 4);
    inj.fail_nth(FaultSite::FenceHang, 1);
    let e = rig.vms[0]
        .handle_gpu_fault(BASE, Access::Write)
        .unwrap_err();
    assert!(
        matches!(
            &e,
            SvmError::Migrate {
                source: CoreError::Fence {
                    source: FenceError::Timeout(_),
                    ..
                },
                ..
            }
        ),
        "{e}"
    );
    check(&rig.mm, buf, 4);
    // The hanging fence never signals: its destination stays reserved (not reused while a
    // copy might still write it), and the next fault uses fresh memory.
    assert_eq!(rig.mm.deferred_cleanups(), 1);
    rig.vms[0].handle_gpu_fault(BASE, Access::Write).unwrap();
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
fn sim_clear_fences_are_bridged_never_cpu_waits() {
    // The sim's clears are host fences (no native handle), and the sim declares that its
    // engine waits for host fences itself (`HostFenceWait::InQueue`): a pending clear is
    // passed on with the call, never waited on the faulting thread. Nothing is learnt.
    let rig = rig(Opts {
        copy_latency: Duration::from_millis(2),
        ..Opts::default()
    });
    let buf = VaRange::new(BASE, 4 * M2);
    create(&rig.mm, buf, PageSize::Size4K);
    fill(&rig.mm, buf, 5);
    for i in 0..4 {
        for vm in &rig.vms {
            vm.handle_gpu_fault(BASE + i * M2, Access::Write).unwrap();
        }
    }
    let s = rig.svm.total_stats();
    assert_eq!(s.cpu_fence_waits.count, 0, "{s}");
    assert_eq!(
        s.fence_dependencies, 0,
        "the sim waits on no native fence: {s}"
    );
    assert!(
        s.bridged_fences > 0,
        "pending 2 ms clears were passed on: {s}"
    );
    let calls: u64 = rig.mm.stats().links.iter().map(|l| l.calls).sum();
    assert!(s.bridged_fences <= calls, "{s}");
    assert_eq!(s.total_commands(), 0, "no splitting: {s}");
    assert_eq!(s.ordering_repairs, 0);
    check(&rig.mm, buf, 5);
}

#[test]
fn failed_lru_eviction_is_typed_and_the_victim_stays_a_candidate() {
    let (rig, inj) = injected(SvmConfig {
        capacity: Some(M2),
        ..SvmConfig::default()
    });
    let buf = VaRange::new(BASE, 2 * M2);
    create(&rig.mm, buf, PageSize::Size4K);
    fill(&rig.mm, buf, 6);
    let vm = &rig.vms[0];
    vm.handle_gpu_fault(BASE, Access::Write).unwrap();
    // Room for the second range needs the first evicted; that eviction's copy fails.
    inj.fail_nth(FaultSite::FenceError, 1);
    let e = vm.handle_gpu_fault(BASE + M2, Access::Atomic).unwrap_err();
    assert!(
        matches!(
            &e,
            SvmError::ToSystem {
                source: CoreError::Fence { .. },
                ..
            }
        ),
        "{e}"
    );
    assert!(
        rig.mm
            .locations(VaRange::new(BASE, M2))
            .unwrap()
            .iter()
            .all(|l| matches!(
                l,
                PageLocation::Device {
                    pagemap: PagemapId(0),
                    ..
                }
            ))
    );
    assert_eq!(rig.svm.lru(PagemapId(0)).len(), 1, "still evictable");
    // Next time the eviction works.
    let r = vm.handle_gpu_fault(BASE + M2, Access::Atomic).unwrap();
    assert!(matches!(r.action, FaultAction::Migrated { .. }));
    assert_eq!(rig.svm.stats(vm.device()).lru_evictions.count, 1);
    check(&rig.mm, buf, 6);
    released(&rig);
}

#[test]
fn a_panicking_allocation_gives_its_accounting_back() {
    // The backend panics inside `allocate` (after the accounting took the bytes): the panic
    // reaches the caller, and the bytes come back with it, so the next fault fits.
    let (rig, inj) = injected(SvmConfig {
        capacity: Some(M2),
        ..SvmConfig::default()
    });
    let buf = VaRange::new(BASE, M2);
    create(&rig.mm, buf, PageSize::Size4K);
    fill(&rig.mm, buf, 7);
    inj.set_panics(true);
    inj.fail_nth(FaultSite::Alloc, 1);
    let vm = rig.vms[0].clone();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        vm.handle_gpu_fault(BASE, Access::Write).map_err(Box::new)
    }));
    assert!(r.is_err(), "the injected panic reached the caller");
    inj.set_panics(false);
    assert_eq!(rig.svm.memory(PagemapId(0)).unwrap().used, 0);
    let r = rig.vms[0].handle_gpu_fault(BASE, Access::Write).unwrap();
    assert_eq!(r.action, FaultAction::Migrated { pages: 512 });
    check(&rig.mm, buf, 7);
}
