//! Back to RAM: eviction of an allocation (whole, partly moved elsewhere, with faults, busy),
//! the CPU-fault path (inside and after the timeslice, its window, with faults), freeing a
//! range that holds device pages, and stale allocation handles.

mod common;

use common::{Event, Gate, Options, Provider, R, backends, build};
use drm_pagemap::{
    BusyReason, Direction, Error, FenceError, MigrateDetails, PageLocation, PageSize, PagemapId,
    VaRange,
};
use drm_pagemap_testkit::inject::{FaultInjector, FaultSite};
use std::time::{Duration, Instant};

fn releases_since(rig: &common::Rig, mark: usize) -> Vec<(u8, u64)> {
    rig.audit
        .since(mark)
        .into_iter()
        .filter_map(|e| match e {
            Event::Release { pagemap, cookie } => Some((pagemap, cookie)),
            _ => None,
        })
        .collect()
}

#[test]
fn evict_brings_every_page_home_and_releases_once() {
    for b in backends() {
        let rig = build("s1111s", 3, PageSize::Size4K, Options::on(b));
        let x = rig.alloc_of(1);
        let mark = rig.audit.mark();
        let rep = rig.mm.evict_to_ram(x).unwrap();
        assert_eq!(rep.pages, 4);
        assert!(rep.released);
        // Executed by the owning device, into system pages mapped for it.
        assert_eq!(rig.audit.copies_since(mark), vec![(1, R, 4)]);
        assert_eq!(
            rig.audit.maps_since(mark),
            vec![(
                Provider::Host,
                rig.pagemaps[1].device().0,
                Direction::FromDevice,
                4
            )]
        );
        rig.audit.assert_mappings_balanced_since(mark);
        assert_eq!(releases_since(&rig, mark).len(), 1);
        assert!(rig.mm.allocation(x).is_none());
        rig.assert_layout("ssssss");
        rig.verify();
        rig.finish();
    }
}

#[test]
fn evict_after_pages_moved_elsewhere_brings_only_the_rest() {
    for b in backends() {
        let rig = build("1111", 3, PageSize::Size4K, Options::on(b));
        let x = rig.alloc_of(0);
        rig.mm
            .migrate(rig.pages(1, 3), PagemapId(2), &MigrateDetails::default())
            .unwrap();
        let z = rig.alloc_of(1);
        rig.assert_layout("1221");
        assert_eq!(rig.mm.allocation(x).unwrap().live_pages, 2);
        let mark = rig.audit.mark();
        let rep = rig.mm.evict_to_ram(x).unwrap();
        assert_eq!(rep.pages, 2);
        assert_eq!(rig.audit.copies_since(mark), vec![(1, R, 2)]);
        rig.assert_layout("s22s");
        assert!(rig.mm.allocation(x).is_none());
        assert_eq!(releases_since(&rig, mark).len(), 1);
        assert_eq!(rig.mm.allocation(z).unwrap().live_pages, 2);
        rig.verify();
        rig.finish();
    }
}

#[test]
fn evict_with_a_fault_changes_nothing_and_a_retry_works() {
    for b in backends() {
        for site in [
            FaultSite::Copy,
            FaultSite::FenceError,
            FaultSite::Alloc,
            FaultSite::Map,
        ] {
            let inj = FaultInjector::new();
            let rig = build("s11s", 3, PageSize::Size4K, Options::on(b).faults(&inj));
            let x = rig.alloc_of(1);
            let host_free = rig.sim.as_ref().map(|s| s.arena_host().free_granules());
            let mark = rig.audit.mark();
            inj.fail_nth(site, 1);
            let err = rig.mm.evict_to_ram(x).unwrap_err();
            assert_eq!(inj.injected(), 1);
            match site {
                FaultSite::Copy => assert!(
                    matches!(
                        err,
                        Error::Backend {
                            op: drm_pagemap::BackendOp::CopyToRam,
                            pagemap: Some(PagemapId(1)),
                            ..
                        }
                    ),
                    "{err}"
                ),
                FaultSite::FenceError => assert!(
                    matches!(
                        err,
                        Error::Fence {
                            source: FenceError::Failed(_),
                            pagemap: Some(PagemapId(1)),
                            ..
                        }
                    ),
                    "{err}"
                ),
                FaultSite::Alloc => {
                    assert!(
                        matches!(
                            err,
                            Error::Backend {
                                op: drm_pagemap::BackendOp::AllocFrames,
                                ..
                            }
                        ),
                        "{err}"
                    )
                }
                _ => assert!(
                    matches!(
                        err,
                        Error::Backend {
                            op: drm_pagemap::BackendOp::MapFrames,
                            ..
                        }
                    ),
                    "{err}"
                ),
            }
            assert!(err.to_string().contains("pagemap 1"), "{err}");
            rig.assert_layout("s11s");
            assert_eq!(rig.mm.allocation(x).unwrap().live_pages, 2);
            assert!(releases_since(&rig, mark).is_empty());
            rig.audit.assert_mappings_balanced_since(mark);
            if let (Some(sim), Some(free)) = (&rig.sim, host_free) {
                // Sim-only: the system frames taken for the failed pass went back.
                assert_eq!(
                    sim.arena_host().free_granules(),
                    free,
                    "{site:?}: host frames leaked"
                );
            }
            let rep = rig.mm.evict_to_ram(x).unwrap();
            assert_eq!(rep.pages, 2);
            rig.assert_layout("ssss");
            rig.verify();
            rig.finish();
        }
    }
}

#[test]
fn cpu_fault_with_a_copy_fault_leaves_the_page_on_the_device() {
    for b in backends() {
        let inj = FaultInjector::new();
        let rig = build("s11s", 3, PageSize::Size4K, Options::on(b).faults(&inj));
        inj.fail_nth(FaultSite::Copy, 1);
        let mut buf = vec![0u8; 4096];
        let err = rig.mm.read(rig.va(1), &mut buf).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Backend {
                    op: drm_pagemap::BackendOp::CopyToRam,
                    ..
                }
            ),
            "{err}"
        );
        rig.assert_layout("s11s");
        // A later access succeeds and finds the data.
        rig.verify();
        rig.assert_layout("ssss");
        rig.finish();
    }
}

#[test]
fn cpu_write_inside_the_timeslice_waits_for_it() {
    for b in backends() {
        let mut rig = build("ssss", 3, PageSize::Size4K, Options::on(b));
        let details = MigrateDetails {
            timeslice: Duration::from_millis(1500),
            ..MigrateDetails::default()
        };
        let r = rig.migrate(2, &details).unwrap();
        let expires = rig.mm.allocation(r.alloc.unwrap()).unwrap().expires;
        let data = common::pattern(1, 2, PageSize::Size4K);
        std::thread::scope(|s| {
            let rig = &rig;
            let writer = s.spawn(|| {
                rig.mm.write(rig.va(1), &data).unwrap();
                Instant::now()
            });
            while Instant::now() + Duration::from_millis(400) < expires {
                assert!(matches!(
                    rig.location(1),
                    PageLocation::Device {
                        pagemap: PagemapId(2),
                        ..
                    }
                ));
                assert!(
                    !writer.is_finished(),
                    "{b}: the write did not wait for the timeslice"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            assert!(writer.join().unwrap() >= expires);
        });
        rig.expect[1] = Some(2);
        rig.assert_layout("ssss");
        rig.verify();
        rig.finish();
    }
}

#[test]
fn cpu_fault_after_the_timeslice_moves_pages_home() {
    for b in backends() {
        let rig = build("ssss", 3, PageSize::Size4K, Options::on(b));
        let details = MigrateDetails {
            timeslice: Duration::from_millis(50),
            ..MigrateDetails::default()
        };
        let r = rig.migrate(1, &details).unwrap();
        let expires = rig.mm.allocation(r.alloc.unwrap()).unwrap().expires;
        while Instant::now() <= expires {
            std::thread::sleep(Duration::from_millis(10));
        }
        let mark = rig.audit.mark();
        rig.verify_page(3);
        // The whole allocation-sized window came home in one call by the owning device.
        assert_eq!(rig.audit.copies_since(mark), vec![(1, R, 4)]);
        rig.assert_layout("ssss");
        rig.verify();
        rig.finish();
    }
}

#[test]
fn cpu_fault_window_is_the_allocation_sized_block_around_the_fault() {
    for b in backends() {
        // Y (pagemap 2) holds pages 0-1, X (pagemap 1) pages 2-5. Windows are 4-page blocks
        // for X and 2-page blocks for Y.
        let rig = build("221111ssssss", 3, PageSize::Size4K, Options::on(b));
        let (x, y) = (rig.alloc_of(2), rig.alloc_of(0));
        assert_ne!(x, y);
        let mark = rig.audit.mark();
        rig.verify_page(2);
        // Window [0, 4): X's pages 2 and 3 only; Y's pages there stay.
        assert_eq!(rig.audit.copies_since(mark), vec![(1, R, 2)]);
        rig.assert_layout("22ss11ssssss");
        assert_eq!(rig.mm.allocation(x).unwrap().live_pages, 2);
        let mark = rig.audit.mark();
        rig.verify_page(5);
        // Window [4, 8): the rest of X, which is then released.
        assert_eq!(rig.audit.copies_since(mark), vec![(1, R, 2)]);
        rig.assert_layout("22ssssssssss");
        assert!(rig.mm.allocation(x).is_none());
        assert_eq!(releases_since(&rig, mark).len(), 1);
        assert_eq!(rig.mm.allocation(y).unwrap().live_pages, 2);
        rig.verify();
        rig.finish();
    }
}

#[test]
fn free_range_releases_every_allocation_once() {
    for b in backends() {
        let rig = build("1111s22.", 3, PageSize::Size4K, Options::on(b));
        rig.mm
            .migrate(rig.pages(0, 2), PagemapId(2), &MigrateDetails::default())
            .unwrap();
        rig.assert_layout("2211s22.");
        let live: Vec<_> = [0, 2, 5].iter().map(|&i| rig.alloc_of(i)).collect();
        // A second range with device pages of its own, which must not be touched.
        let other = VaRange::new(rig.range.end() + (1 << 30), 4 * 4096);
        rig.mm.create_range(other, PageSize::Size4K).unwrap();
        let data = common::pattern(99, 7, PageSize::Size4K);
        for i in 0..4 {
            rig.mm.write(other.start + i * 4096, &data).unwrap();
        }
        let o = rig
            .mm
            .migrate(other, PagemapId(1), &MigrateDetails::default())
            .unwrap();
        let mark = rig.audit.mark();
        rig.mm.free_range(rig.range.start).unwrap();
        // Three allocations lost their last pages: each released exactly once, no copies.
        assert_eq!(releases_since(&rig, mark).len(), 3);
        assert!(rig.audit.copies_since(mark).is_empty());
        for a in &live {
            assert!(rig.mm.allocation(*a).is_none());
        }
        assert_eq!(rig.mm.allocations().len(), 1);
        assert_eq!(rig.mm.allocation(o.alloc.unwrap()).unwrap().live_pages, 4);
        assert!(matches!(
            rig.mm.free_range(rig.range.start),
            Err(Error::BadRange { .. })
        ));
        let mut buf = vec![0u8; 4096];
        for i in 0..4 {
            rig.mm.read(other.start + i * 4096, &mut buf).unwrap();
            assert_eq!(buf, data);
        }
        rig.mm.free_range(other.start).unwrap();
        assert!(rig.mm.allocations().is_empty());
        rig.audit.assert_all_released_once();
        rig.audit.assert_mappings_balanced_since(0);
        if let Some(sim) = &rig.sim {
            // Sim-only: every system frame and every byte of device memory went back.
            let host = sim.arena_host();
            assert_eq!(host.free_granules(), host.arena().len() / 4096);
            for k in 0..3 {
                assert_eq!(rig.sim_stats(k).used_bytes, 0);
            }
        }
    }
}

#[test]
fn stale_and_double_handles_are_refused() {
    for b in backends() {
        let rig = build("1111", 3, PageSize::Size4K, Options::on(b));
        let x = rig.alloc_of(0);
        rig.mm.evict_to_ram(x).unwrap();
        let gone = Error::NoSuchAllocation { alloc: x };
        assert_eq!(rig.mm.evict_to_ram(x).unwrap_err(), gone);
        assert_eq!(rig.mm.release_devmem(x).unwrap_err(), gone);
        assert_eq!(
            rig.mm
                .migrate_to_devmem(x, rig.range, &MigrateDetails::default())
                .unwrap_err(),
            gone
        );
        // A new allocation may reuse the slot: the old handle still names nothing.
        let y = rig
            .mm
            .allocate_devmem(PagemapId(1), 4, PageSize::Size4K, rig.range)
            .unwrap();
        assert_ne!(x, y);
        assert_eq!(rig.mm.evict_to_ram(x).unwrap_err(), gone);
        assert!(rig.mm.allocation(y).is_some());
        rig.mm.release_devmem(y).unwrap();
        assert_eq!(
            rig.mm.release_devmem(y).unwrap_err(),
            Error::NoSuchAllocation { alloc: y }
        );
        assert!(rig.mm.allocation(x).is_none() && rig.mm.allocation(y).is_none());
        rig.assert_layout("ssss");
        rig.verify();
        rig.finish();
    }
}

#[test]
fn release_devmem_of_a_live_allocation_evicts_it() {
    for b in backends() {
        let rig = build("s11", 3, PageSize::Size4K, Options::on(b));
        let x = rig.alloc_of(1);
        let mark = rig.audit.mark();
        // Regression: release_devmem used to call the eviction while holding the address
        // space's lock, and deadlocked.
        let mm = rig.mm.clone();
        common::within("release_devmem of a live allocation", move || {
            mm.release_devmem(x)
        })
        .unwrap();
        assert_eq!(rig.audit.copies_since(mark), vec![(1, R, 2)]);
        assert!(rig.mm.allocation(x).is_none());
        assert_eq!(releases_since(&rig, mark).len(), 1);
        rig.assert_layout("sss");
        rig.verify();
        rig.finish();
    }
}

#[test]
fn evict_while_a_migration_holds_the_pages_is_busy() {
    for b in backends() {
        let rig = build("1111", 3, PageSize::Size4K, Options::on(b));
        let x = rig.alloc_of(0);
        let gate = Gate::new();
        let mark = rig.audit.mark();
        rig.audit.hold_copies(Some(&gate));
        std::thread::scope(|s| {
            let t = s.spawn(|| {
                rig.mm
                    .migrate(rig.range, PagemapId(2), &MigrateDetails::default())
            });
            rig.audit.wait_for_copy(mark, 1);
            rig.audit.hold_copies(None);
            let err = rig.mm.evict_to_ram(x).unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::Busy {
                        reason: BusyReason::EvictIncomplete,
                        ..
                    }
                ),
                "{err}"
            );
            // Nothing moved meanwhile.
            assert_eq!(rig.audit.copies_since(mark), vec![(1, R, 4)]);
            gate.open();
            t.join().unwrap().unwrap();
        });
        assert!(rig.mm.allocation(x).is_none());
        rig.assert_layout("2222");
        rig.verify();
        rig.finish();
    }
}

#[test]
fn evict_succeeds_when_a_racing_migration_takes_the_last_pages() {
    for b in backends() {
        // X holds pages 0-3. A migration M holds pages 0-1 (its copy fence waits on gate
        // G1); the eviction E brings pages 2-3 home (its copy waits on gate G2), then finds
        // 0-1 locked. When M commits, X loses its last pages and is released by M. E was
        // given a valid handle: like upstream ("return 0 once detached") it succeeds.
        let rig = build("1111", 3, PageSize::Size4K, Options::on(b));
        let x = rig.alloc_of(0);
        let (g1, g2) = (Gate::new(), Gate::new());
        std::thread::scope(|s| {
            let mark = rig.audit.mark();
            rig.audit.hold_copies(Some(&g1));
            let m = s.spawn(|| {
                rig.mm
                    .migrate(rig.pages(0, 2), PagemapId(2), &MigrateDetails::default())
            });
            rig.audit.wait_for_copy(mark, 1);
            let mark = rig.audit.mark();
            rig.audit.hold_copies(Some(&g2));
            let e = s.spawn(|| rig.mm.evict_to_ram(x));
            rig.audit.wait_for_copy(mark, 1);
            rig.audit.hold_copies(None);
            g2.open();
            g1.open();
            m.join().unwrap().expect("the migration completes");
            match e.join().unwrap() {
                Ok(rep) => {
                    assert!(rep.released);
                    assert_eq!(rep.pages, 2);
                }
                // Only if M could not run for the whole of E's retries (a loaded machine).
                Err(Error::Busy {
                    reason: BusyReason::EvictIncomplete,
                    ..
                }) => eprintln!("{b}: the migration did not commit during the eviction's retries"),
                Err(other) => panic!("{b}: eviction of a live allocation failed: {other}"),
            }
        });
        assert!(rig.mm.allocation(x).is_none());
        rig.assert_layout("22ss");
        rig.verify();
        rig.finish();
    }
}

#[test]
fn sim_only_a_copy_back_that_never_signals_times_out_and_loses_nothing() {
    // Sim-only (the hang is injected behind the sim's copy fence). The way back to RAM waits
    // at most the address space's timeout: eviction and a CPU read both fail with a fence
    // timeout, the pages stay on the device (readable once it answers), and the frames the
    // hung copy may still write stay parked rather than being reused.
    let inj = FaultInjector::new();
    let rig = build("1111", 3, PageSize::Size4K, Options::on("sim").faults(&inj));
    let alloc = rig.alloc_of(0);
    rig.mm
        .set_to_ram_fence_timeout(Some(Duration::from_millis(50)));

    inj.fail_nth(FaultSite::FenceHang, 1);
    let mm = rig.mm.clone();
    let err = common::within("evict with a hung copy fence", move || {
        mm.evict_to_ram(alloc)
    })
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Fence {
                source: FenceError::Timeout(_),
                pagemap: Some(PagemapId(1)),
                ..
            }
        ),
        "{err}"
    );
    rig.assert_layout("1111");
    assert_eq!(
        rig.mm.deferred_cleanups(),
        1,
        "the hung copy's frames are parked"
    );

    inj.fail_nth(FaultSite::FenceHang, 1);
    let mut buf = [0u8; 8];
    let err = rig.mm.read(rig.va(2), &mut buf).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Fence {
                source: FenceError::Timeout(_),
                ..
            }
        ),
        "{err}"
    );
    rig.assert_layout("1111");
    assert_eq!(rig.mm.deferred_cleanups(), 2);

    // The device answers again: every byte comes home intact.
    rig.verify();
    rig.assert_layout("ssss");
    assert!(
        rig.mm.allocations().is_empty(),
        "the allocation left with its last page"
    );
}
