//! The timeslice: a device keeps pages it received for the range's timeslice, which bounds
//! fault ping-pong between devices to one migration of a range per timeslice.
//!
//! The assertions are lower bounds on spacing (sleeps never end early) and the upper bounds
//! they imply, so a slow machine cannot make them fail.

mod common;

use common::*;
use drm_pagemap_core::{AllocId, PageLocation, PageSize, VaRange};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use xe_svm::{Access, Attributes, FaultAction};

const SLICE: Duration = Duration::from_millis(40);

/// The timeslice of the test that counts one wait per fault: each fault must come while the
/// previous one's pages are still inside their timeslice, so its length is the longest the
/// test thread may be held up between two faults (40 ms is a preemption a loaded 2-core
/// machine can give; this is not).
const COUNTED_SLICE: Duration = Duration::from_millis(250);

fn holder(rig: &Rig, va: u64) -> AllocId {
    match rig.mm.location(va).unwrap() {
        PageLocation::Device { alloc, .. } => alloc,
        other => panic!("not in device memory: {other:?}"),
    }
}

fn with_slice(rig: &Rig, buf: VaRange) {
    with_slice_of(rig, buf, SLICE);
}

fn with_slice_of(rig: &Rig, buf: VaRange, slice: Duration) {
    for vm in &rig.vms {
        vm.madvise(
            buf,
            Attributes {
                timeslice: slice,
                ..Attributes::default()
            },
        )
        .unwrap();
    }
}

#[test]
fn alternating_atomic_faults_migrate_at_most_once_per_timeslice() {
    let rig = rig(Opts {
        devices: 2,
        ..Opts::default()
    });
    let buf = VaRange::new(BASE, K64);
    create(&rig.mm, buf, PageSize::Size4K);
    fill(&rig.mm, buf, 1);
    with_slice_of(&rig, buf, COUNTED_SLICE);
    let mut expires: Vec<Instant> = Vec::new();
    for k in 0..6 {
        let vm = &rig.vms[k % 2];
        let r = vm.handle_gpu_fault(BASE, Access::Atomic).unwrap();
        assert!(
            matches!(r.action, FaultAction::Migrated { .. }),
            "fault {k}: {r:?}"
        );
        let info = rig.mm.allocation(holder(&rig, BASE)).unwrap();
        expires.push(info.expires);
    }
    for w in expires.windows(2) {
        assert!(
            w[1] >= w[0] + COUNTED_SLICE,
            "a device lost its pages within its timeslice"
        );
    }
    let waits: u64 = rig
        .vms
        .iter()
        .map(|v| rig.svm.stats(v.device()).timeslice_waits.count)
        .sum();
    assert_eq!(
        waits, 5,
        "every fault after the first waited for the other device"
    );
    check(&rig.mm, buf, 1);
}

#[test]
fn concurrent_ping_pong_is_bounded_by_the_timeslice() {
    let rig = Arc::new(rig(Opts {
        devices: 2,
        ..Opts::default()
    }));
    let buf = VaRange::new(BASE, M2);
    create(&rig.mm, buf, PageSize::Size4K);
    fill(&rig.mm, buf, 2);
    with_slice(&rig, buf);
    let log: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let start = Instant::now();
    let run = Duration::from_millis(400);
    let (r2, l2) = (rig.clone(), log.clone());
    watchdog(Duration::from_secs(120), move || {
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let (rig, log) = (r2.clone(), l2.clone());
                std::thread::spawn(move || {
                    let vm = &rig.vms[t % 2];
                    let mut n = 0;
                    while n < 3 || start.elapsed() < run {
                        n += 1;
                        let r = vm
                            .handle_gpu_fault(BASE + (t as u64) * K4, Access::Atomic)
                            .unwrap();
                        if matches!(r.action, FaultAction::Migrated { .. }) {
                            // The allocation that received the pages, while we still know it.
                            if let PageLocation::Device { alloc, .. } =
                                rig.mm.location(BASE).unwrap()
                                && let Some(info) = rig.mm.allocation(alloc)
                            {
                                log.lock().unwrap().push(info.expires);
                            }
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    });
    let elapsed = start.elapsed();
    let mut expires = log.lock().unwrap().clone();
    expires.sort();
    expires.dedup();
    for w in expires.windows(2) {
        assert!(w[1] >= w[0] + SLICE, "two migrations within one timeslice");
    }
    let migrations = rig.svm.total_stats().total_to_device();
    let bound = (elapsed.as_millis() / SLICE.as_millis()) as u64 + 2;
    assert!(
        migrations <= bound,
        "{migrations} migrations in {elapsed:?} (bound {bound})"
    );
    assert!(migrations >= 2, "the devices did take turns");
    check(&rig.mm, buf, 2);
}

#[test]
fn cpu_access_waits_for_the_timeslice_too() {
    let rig = rig(Opts {
        devices: 1,
        ..Opts::default()
    });
    let buf = VaRange::new(BASE, K4);
    create(&rig.mm, buf, PageSize::Size4K);
    fill(&rig.mm, buf, 3);
    with_slice(&rig, buf);
    let t = Instant::now();
    rig.vms[0].handle_gpu_fault(BASE, Access::Write).unwrap();
    let expires = rig.mm.allocation(holder(&rig, BASE)).unwrap().expires;
    check(&rig.mm, buf, 3);
    assert!(
        Instant::now() >= expires,
        "the CPU took the page back before the timeslice ended"
    );
    assert!(t.elapsed() >= SLICE);
}
