//! Every Duration a user hands to xe-svm, at 0, 1 ns and `Duration::MAX` (issue 11, D1): the
//! range's timeslice (`madvise`, doubled by atomic retries) and the context's fence timeout
//! (copy-policy fence waits, the engine's copy waits, LRU eviction under the accounting). No
//! value panics; `Duration::MAX` means "no limit" (a timeslice that never ends, a fence wait
//! without deadline). Each case runs under a watchdog so a hang fails instead of blocking.

mod common;

use common::*;
use drm_pagemap_core::{
    Error as CoreError, MigrateDetails, PageLocation, PageSize, PagemapId, VaRange,
};
use std::sync::Arc;
use std::time::{Duration, Instant};
use xe_svm::{Access, Attributes, FaultAction, SvmConfig, SvmError};

const DURATIONS: [Duration; 3] = [Duration::ZERO, Duration::from_nanos(1), Duration::MAX];
const LIMIT: Duration = Duration::from_secs(60);

fn slice(d: Duration) -> Attributes {
    Attributes {
        timeslice: d,
        ..Attributes::default()
    }
}

/// A device keeps pages for a timeslice of any length; `Duration::MAX` keeps them until they
/// are evicted (eviction does not honour timeslices), shorter ones let the other device take
/// them at once.
#[test]
fn madvise_timeslice_of_any_length() {
    for d in DURATIONS {
        let rig = Arc::new(rig(Opts {
            devices: 2,
            ..Opts::default()
        }));
        let r = rig.clone();
        watchdog(LIMIT, move || {
            let rig = r;
            let buf = VaRange::new(BASE, M2);
            create(&rig.mm, buf, PageSize::Size4K);
            fill(&rig.mm, buf, 1);
            for vm in &rig.vms {
                vm.madvise(buf, slice(d)).unwrap();
                assert_eq!(vm.attributes(buf.start).timeslice, d);
            }
            let vm0 = &rig.vms[0];
            let f = vm0.handle_gpu_fault(buf.start, Access::Write).unwrap();
            assert_eq!(f.action, FaultAction::Migrated { pages: 512 }, "{d:?}");
            let f = vm0.handle_gpu_fault(buf.start, Access::Atomic).unwrap();
            assert_eq!(f.action, FaultAction::Valid, "{d:?}");
            let PageLocation::Device { alloc, .. } = rig.mm.location(buf.start).unwrap() else {
                panic!("{d:?}: not in device memory");
            };
            let expires = rig.mm.allocation(alloc).unwrap().expires;
            if d == Duration::MAX {
                // Held for good: far past any time this test could reach.
                let year = Duration::from_secs(365 * 24 * 3600);
                assert!(expires > Instant::now() + year, "{d:?}");
                assert_eq!(vm0.evict_range(buf).unwrap(), 512);
            } else {
                let f = rig.vms[1]
                    .handle_gpu_fault(buf.start, Access::Atomic)
                    .unwrap();
                assert_eq!(f.action, FaultAction::Migrated { pages: 512 }, "{d:?}");
                assert!(vm0.handle_gpu_fault(buf.start, Access::Read).is_ok());
            }
            check(&rig.mm, buf, 1);
        });
    }
}

/// An atomic fault doubles the timeslice on every retry: from `Duration::MAX` too. Retries
/// come from a Busy migration (fragmentation: evict and retry) and from device memory that
/// cannot hold the range (three attempts, then a typed error).
#[test]
fn atomic_retries_double_a_timeslice_of_any_length() {
    for d in DURATIONS {
        let r = Arc::new(rig(Opts {
            devices: 2,
            ..Opts::default()
        }));
        watchdog(LIMIT, move || {
            let rig = r;
            let buf = VaRange::new(BASE, M2);
            create(&rig.mm, buf, PageSize::Size4K);
            fill(&rig.mm, buf, 2);
            rig.vms[0].madvise(buf, slice(d)).unwrap();
            rig.mm
                .migrate(
                    VaRange::new(BASE + 3 * K64, 2 * K64),
                    PagemapId(0),
                    &MigrateDetails::default(),
                )
                .unwrap();
            let f = rig.vms[0]
                .handle_gpu_fault(buf.start, Access::Atomic)
                .unwrap();
            assert!(f.busy_retry, "{d:?}: {f:?}");
            assert_eq!(f.action, FaultAction::Migrated { pages: 512 }, "{d:?}");
            rig.vms[0].evict_range(buf).unwrap();
            check(&rig.mm, buf, 2);
        });
        let r = Arc::new(rig(Opts {
            devices: 1,
            svm: SvmConfig {
                capacity: Some(K64),
                ..SvmConfig::default()
            },
            ..Opts::default()
        }));
        watchdog(LIMIT, move || {
            let rig = r;
            let buf = VaRange::new(BASE, M2);
            create(&rig.mm, buf, PageSize::Size4K);
            fill(&rig.mm, buf, 3);
            rig.vms[0].madvise(buf, slice(d)).unwrap();
            let e = rig.vms[0]
                .handle_gpu_fault(buf.start, Access::Atomic)
                .unwrap_err();
            assert!(
                matches!(
                    e,
                    SvmError::OutOfDeviceMemory { .. }
                        | SvmError::Migrate {
                            source: CoreError::TooLarge { .. },
                            ..
                        }
                ),
                "{d:?}: {e}"
            );
            check(&rig.mm, buf, 3);
        });
    }
}

/// The fence timeout of the context, with copies that take a while: every fence wait of the
/// copy policy and of the engine's migrations sees it. Zero and 1 ns may time a wait out
/// (a typed error, or a fault served from system memory), never lose data; `Duration::MAX`
/// is no deadline: every fault succeeds. Also runs LRU eviction under the accounting
/// (capacity of one range, two ranges faulted in turn on both devices).
#[test]
fn fence_timeout_of_any_length() {
    for d in DURATIONS {
        let r = Arc::new(rig(Opts {
            devices: 2,
            copy_latency: Duration::from_millis(2),
            svm: SvmConfig {
                capacity: Some(M2),
                fence_timeout: Some(d),
            },
            ..Opts::default()
        }));
        watchdog(LIMIT, move || {
            let rig = r;
            let bufs = [VaRange::new(BASE, M2), VaRange::new(BASE + 2 * M2, M2)];
            for (i, b) in bufs.iter().enumerate() {
                create(&rig.mm, *b, PageSize::Size4K);
                fill(&rig.mm, *b, 10 + i as u8);
            }
            let mut served = 0;
            for round in 0..2 {
                for vm in &rig.vms {
                    for (i, b) in bufs.iter().enumerate() {
                        let access = if round == 0 {
                            Access::Write
                        } else {
                            Access::Atomic
                        };
                        match vm.handle_gpu_fault(b.start, access) {
                            Ok(_) => served += 1,
                            Err(e) => {
                                assert!(
                                    d < Duration::from_millis(1),
                                    "{d:?}: fault on buffer {i} failed: {e}"
                                );
                                // The copy (or pre-migrate) fence timed out. Never "no
                                // room": the memory of a migration that timed out comes back
                                // once its copies finish.
                                assert!(
                                    matches!(
                                        e,
                                        SvmError::Migrate {
                                            source: CoreError::Fence { .. }
                                                | CoreError::Backend { .. },
                                            ..
                                        }
                                    ),
                                    "{d:?}: fault on buffer {i}: {e}"
                                );
                            }
                        }
                    }
                }
            }
            if d == Duration::MAX {
                assert_eq!(served, 8, "no deadline: every fault served");
                let evictions: u64 = rig
                    .vms
                    .iter()
                    .map(|v| rig.svm.stats(v.device()).lru_evictions.count)
                    .sum();
                assert!(evictions > 0, "the capacity made faults evict");
            }
            for (i, b) in bufs.iter().enumerate() {
                check(&rig.mm, *b, 10 + i as u8);
            }
            if d < Duration::from_millis(1) {
                // Once every copy has finished (2 ms each), nothing stays held.
                let t = Instant::now();
                while rig.mm.deferred_cleanups() > 0 && t.elapsed() < Duration::from_secs(10) {
                    std::thread::sleep(Duration::from_millis(5));
                }
                assert_eq!(rig.mm.deferred_cleanups(), 0);
                for vm in &rig.vms {
                    let used = rig.svm.memory(vm.local_pagemap()).unwrap().used;
                    assert_eq!(used, 0, "{d:?}: device memory left held");
                }
            }
        });
    }
}

/// Another device's fault waits for a `Duration::MAX` timeslice only until the pages are
/// evicted from under it, not for ever.
#[test]
fn a_timeslice_without_end_is_ended_by_eviction() {
    let rig = Arc::new(rig(Opts {
        devices: 2,
        ..Opts::default()
    }));
    let buf = VaRange::new(BASE, M2);
    create(&rig.mm, buf, PageSize::Size4K);
    fill(&rig.mm, buf, 4);
    rig.vms[0].madvise(buf, slice(Duration::MAX)).unwrap();
    rig.vms[0]
        .handle_gpu_fault(buf.start, Access::Write)
        .unwrap();
    let PageLocation::Device { alloc, .. } = rig.mm.location(buf.start).unwrap() else {
        panic!("not in device memory");
    };
    let r = rig.clone();
    let waiter = std::thread::spawn(move || {
        r.vms[1]
            .handle_gpu_fault(BASE, Access::Atomic)
            .map_err(|e| e.to_string())
    });
    std::thread::sleep(Duration::from_millis(100));
    assert!(!waiter.is_finished(), "the timeslice was not honoured");
    let t = Instant::now();
    rig.mm.evict_to_ram(alloc).unwrap();
    let f = watchdog(LIMIT, move || waiter.join().unwrap()).unwrap();
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(f.action, FaultAction::Migrated { pages: 512 });
    let waits = rig.svm.stats(rig.vms[1].device()).timeslice_waits;
    assert_eq!(waits.count, 1);
    assert!(waits.micros >= 100_000, "{waits:?}");
    rig.vms[1].evict_range(buf).unwrap();
    check(&rig.mm, buf, 4);
}
