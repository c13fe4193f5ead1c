//! Failures injected at every step of a migration, on mixed layouts: destination allocation,
//! `populate_devmem_pfn`, every mapping (host `map_frames` and `device_map`), every copy
//! submission, every copy fence signalling an error, and (sim-only) every copy fence hanging
//! past `fence_timeout`. After each: the right typed error naming the range and the pagemap,
//! the layout unchanged, every byte readable where it was, the destination released exactly
//! once (or, for a hang, held until its fences signal), and a retry without faults that
//! succeeds with the data intact.
//!
//! Each case first runs cleanly to count the operations of every kind, then fails each one
//! in turn, so "first, middle and last" are all covered whatever the layout issues.

mod common;

use common::{Calls, Gate, Options, backends, build, calls};
use drm_pagemap::{
    AllocState, Coalesce, CopyOp, Error, FenceError, MigrateDetails, PageBacking, PageSize,
    PagemapId,
};
use drm_pagemap_testkit::inject::{FaultInjector, FaultSite};
use std::time::Duration;

#[derive(Clone)]
struct Case {
    layout: &'static str,
    devices: usize,
    to: u8,
    details: MigrateDetails,
}

fn cases() -> Vec<Case> {
    let d = MigrateDetails::default();
    vec![
        Case {
            layout: "ss00s11s0",
            devices: 3,
            to: 2,
            details: d.clone(),
        },
        Case {
            layout: "1.s2s.21",
            devices: 3,
            to: 0,
            details: d.clone(),
        },
        Case {
            layout: "0s1.2s",
            devices: 3,
            to: 0,
            details: MigrateDetails {
                can_migrate_same_pagemap: true,
                ..d.clone()
            },
        },
        Case {
            layout: "ss00s11s0",
            devices: 3,
            to: 2,
            details: MigrateDetails {
                source_peer_migrates: false,
                ..d.clone()
            },
        },
        Case {
            layout: "ss00s11s0",
            devices: 3,
            to: 2,
            details: MigrateDetails {
                coalesce: Coalesce::Consecutive,
                ..d.clone()
            },
        },
        // Calls issued in pieces of 2 pages (5 + 3 calls, in rounds): a fault at any piece.
        Case {
            layout: "ss1s.ss11s1s",
            devices: 3,
            to: 0,
            details: MigrateDetails {
                max_call_pages: std::num::NonZeroU32::new(2),
                ..d
            },
        },
    ]
}

const SITES: [FaultSite; 4] = [
    FaultSite::Alloc,
    FaultSite::Map,
    FaultSite::Copy,
    FaultSite::FenceError,
];

/// What a clean migration of `case` does: its calls and how many operations of each site.
fn clean(b: &'static str, case: &Case) -> (Calls, Vec<(FaultSite, u64)>) {
    let inj = FaultInjector::new();
    let rig = build(
        case.layout,
        case.devices,
        PageSize::Size4K,
        Options::on(b).faults(&inj),
    );
    let all = [
        FaultSite::Alloc,
        FaultSite::Map,
        FaultSite::Copy,
        FaultSite::FenceError,
        FaultSite::FenceHang,
    ];
    let before: Vec<u64> = all.iter().map(|&s| inj.seen(s)).collect();
    let r = rig
        .migrate(case.to, &case.details)
        .expect("clean migration");
    let counts = all
        .iter()
        .zip(before)
        .map(|(&s, b0)| (s, inj.seen(s) - b0))
        .collect();
    let c = calls(&r.calls);
    rig.verify();
    rig.finish();
    (c, counts)
}

/// Checks the error of a migration that failed at `site`, operation `n`.
fn check_error(
    err: &Error,
    site: FaultSite,
    n: u64,
    case: &Case,
    want: &[(u8, CopyOp, usize)],
    range: drm_pagemap::VaRange,
) {
    let to = PagemapId(case.to);
    match site {
        FaultSite::Alloc => {
            assert!(
                matches!(err, Error::Backend { op: drm_pagemap::BackendOp::Allocate, pagemap: Some(p), .. } if *p == to),
                "{err}"
            );
            common::assert_names(err, range, &[&to.to_string()]);
        }
        FaultSite::Map => match err {
            Error::Backend {
                op: drm_pagemap::BackendOp::MapFrames,
                pagemap: Some(p),
                device: Some(d),
                ..
            } if *p == to => common::assert_names(err, range, &[&d.to_string(), &to.to_string()]),
            Error::Backend {
                op: drm_pagemap::BackendOp::DeviceMap,
                pagemap: Some(p),
                ..
            } => common::assert_names(err, range, &[&p.to_string()]),
            other => panic!("map failure reported as {other}"),
        },
        FaultSite::Copy => {
            let (exec, op, _) = want[n as usize - 1];
            match err {
                Error::Backend {
                    op: o,
                    pagemap: Some(p),
                    ..
                } => {
                    assert_eq!(*o, drm_pagemap::BackendOp::from(op));
                    assert_eq!(*p, PagemapId(exec));
                }
                other => panic!("copy failure reported as {other}"),
            }
            common::assert_names(err, range, &[&PagemapId(exec).to_string()]);
        }
        FaultSite::FenceError | FaultSite::FenceHang => {
            let (exec, _, _) = want[n as usize - 1];
            match err {
                Error::Fence {
                    what: drm_pagemap::FenceRole::Copy,
                    pagemap: Some(p),
                    source,
                    ..
                } => {
                    assert_eq!(*p, PagemapId(exec), "{err}");
                    if site == FaultSite::FenceHang {
                        assert!(matches!(source, FenceError::Timeout(_)), "{err}");
                    } else {
                        assert!(matches!(source, FenceError::Failed(_)), "{err}");
                    }
                }
                other => panic!("fence failure reported as {other}"),
            }
            common::assert_names(err, range, &[&PagemapId(exec).to_string()]);
        }
    }
}

/// Fails operation `n` of `site` in a migration of `case`; checks everything; retries.
fn inject(b: &'static str, case: &Case, site: FaultSite, n: u64, want: &[(u8, CopyOp, usize)]) {
    let hang = site == FaultSite::FenceHang;
    let mut details = case.details.clone();
    if hang {
        details.fence_timeout = Some(Duration::from_millis(150));
    }
    let ctx = format!("{b}: {} to {} failing {site:?} #{n}", case.layout, case.to);
    // Two rigs: on the first the data is read back right after the failure; on the second
    // the migration is retried first.
    for retry in [false, true] {
        let inj = FaultInjector::new();
        let rig = build(
            case.layout,
            case.devices,
            PageSize::Size4K,
            Options::on(b).faults(&inj),
        );
        let allocs_before = rig.mm.allocations();
        let mark = rig.audit.mark();
        inj.fail_nth(site, n);
        let (r, trace) = rig.migrate_traced(case.to, &details);
        let err = r.expect_err(&ctx);
        assert_eq!(inj.injected(), 1, "{ctx}: the fault fired");
        check_error(&err, site, n, case, want, rig.range);
        // Calls issued before the failure: copies fail at submission, so only the earlier
        // ones; fence failures come after every call was issued; a call is issued once its
        // own pages are mapped, so a mapping failure leaves a proper prefix of the calls
        // issued (none when the first mapping fails); earlier steps issue none.
        let issued = match site {
            FaultSite::Copy => want[..n as usize - 1].to_vec(),
            FaultSite::FenceError | FaultSite::FenceHang => want.to_vec(),
            FaultSite::Map if n > 1 => {
                let got = calls(&trace);
                assert!(
                    got.len() < want.len() && want.starts_with(&got),
                    "{ctx}: calls issued {got:?}, planned {want:?}"
                );
                got
            }
            _ => Vec::new(),
        };
        assert_eq!(calls(&trace), issued, "{ctx}: calls issued");
        rig.assert_layout(case.layout);
        // The allocations holding pages are unchanged (a hung destination stays reserved).
        let (held, deferred): (Vec<_>, Vec<_>) = rig
            .mm
            .allocations()
            .into_iter()
            .partition(|a| a.state != AllocState::Migrating);
        assert_eq!(held, allocs_before, "{ctx}: allocations holding pages");
        assert_eq!(
            deferred.len(),
            usize::from(hang),
            "{ctx}: deferred destinations"
        );
        let made = rig.audit.allocs_since(mark).len();
        assert_eq!(
            made,
            usize::from(site != FaultSite::Alloc),
            "{ctx}: destination allocations"
        );
        if hang {
            // The copy may still land in the destination: it stays reserved (and mapped)
            // until its fences signal, which a hung fence never does.
            assert_eq!(rig.mm.deferred_cleanups(), 1, "{ctx}");
            rig.audit.assert_not_released_since(mark);
        } else {
            assert_eq!(rig.mm.deferred_cleanups(), 0, "{ctx}");
            rig.audit.assert_released_once_since(mark);
            rig.audit.assert_mappings_balanced_since(mark);
        }
        if retry {
            let r = rig
                .migrate(case.to, &case.details)
                .unwrap_or_else(|e| panic!("{ctx}: retry: {e}"));
            assert_eq!(calls(&r.calls), want, "{ctx}: retry calls");
            rig.assert_layout(&format!("{}*{}", case.to, rig.npages()));
        }
        // The sources were unlocked and every byte reads back.
        rig.verify();
        if hang {
            rig.mm.free_range(rig.range.start).unwrap();
            let left = rig.mm.allocations();
            assert_eq!(
                left.len(),
                1,
                "{ctx}: only the deferred destination is left"
            );
            assert_eq!(left[0].state, AllocState::Migrating);
            assert_eq!(left[0].pagemap, PagemapId(case.to));
        } else {
            rig.finish();
        }
    }
}

fn every_step(b: &'static str, sites: &[FaultSite]) {
    for case in cases() {
        let (want, counts) = clean(b, &case);
        assert!(!want.is_empty());
        for &site in sites {
            let count = counts.iter().find(|(s, _)| *s == site).unwrap().1;
            assert!(count > 0, "{b}: {} has no {site:?} step", case.layout);
            for n in 1..=count {
                inject(b, &case, site, n, &want);
            }
        }
    }
}

/// Waits (within `common::DEADLOCK`) until `rig` has no deferred cleanup left: a deferred
/// destination is released once the copies or clear still writing it are done, which run on
/// the devices' engine threads and may still be running when a test's gate opens.
fn wait_for_deferred_release(rig: &common::Rig) {
    let t0 = std::time::Instant::now();
    while rig.mm.deferred_cleanups() != 0 {
        assert!(
            t0.elapsed() < common::DEADLOCK,
            "the deferred destination was never released"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn allocation_failure() {
    for b in backends() {
        every_step(b, &[SITES[0]]);
    }
}

#[test]
fn every_mapping_fails_in_turn() {
    for b in backends() {
        every_step(b, &[SITES[1]]);
    }
}

#[test]
fn every_copy_submission_fails_in_turn() {
    for b in backends() {
        every_step(b, &[SITES[2]]);
    }
}

#[test]
fn every_copy_fence_signals_an_error_in_turn() {
    for b in backends() {
        every_step(b, &[SITES[3]]);
    }
}

#[test]
fn sim_only_every_copy_fence_hangs_in_turn() {
    // Sim-only: a hung fence costs the timeout each time; the engine logic is generic.
    every_step("sim", &[FaultSite::FenceHang]);
}

#[test]
fn populate_failure() {
    for b in backends() {
        for case in cases() {
            let (want, _) = clean(b, &case);
            let rig = build(case.layout, case.devices, PageSize::Size4K, Options::on(b));
            let mark = rig.audit.mark();
            rig.audit.fail_populate(1);
            let (r, trace) = rig.migrate_traced(case.to, &case.details);
            let err = r.unwrap_err();
            assert!(
                matches!(&err, Error::Backend { op: drm_pagemap::BackendOp::PopulateDevmemPfn, pagemap: Some(p), .. } if *p == PagemapId(case.to)),
                "{err}"
            );
            common::assert_names(&err, rig.range, &[&PagemapId(case.to).to_string()]);
            assert!(trace.is_empty());
            assert_eq!(rig.audit.allocs_since(mark).len(), 1);
            rig.audit.assert_released_once_since(mark);
            assert!(rig.audit.maps_since(mark).is_empty());
            rig.assert_layout(case.layout);
            let r = rig.migrate(case.to, &case.details).unwrap();
            assert_eq!(calls(&r.calls), want);
            rig.verify();
            rig.finish();
        }
    }
}

#[test]
fn late_copy_fence_releases_the_destination_once_it_signals() {
    for b in backends() {
        // A copy fence that signals only after the timeout: the migration fails, the
        // destination is held, and released exactly once when the fence finally signals.
        let rig = build("s1.2s0", 3, PageSize::Size4K, Options::on(b));
        let gate = Gate::new();
        let mark = rig.audit.mark();
        rig.audit.hold_copies(Some(&gate));
        let details = MigrateDetails {
            fence_timeout: Some(Duration::from_millis(100)),
            can_migrate_same_pagemap: true,
            ..MigrateDetails::default()
        };
        let err = rig.migrate(0, &details).unwrap_err();
        rig.audit.hold_copies(None);
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
        rig.assert_layout("s1.2s0");
        assert_eq!(rig.mm.deferred_cleanups(), 1);
        rig.audit.assert_not_released_since(mark);
        gate.open();
        // The copy fences are the gate and the backend's copies, which run on the devices'
        // engine threads: on a busy machine one can still be running when the gate opens,
        // and the destination is released when it is done.
        wait_for_deferred_release(&rig);
        rig.audit.assert_released_once_since(mark);
        rig.audit.assert_mappings_balanced_since(mark);
        // Nothing changed, and a retry works.
        let r = rig.migrate(0, &details).unwrap();
        assert_eq!(
            calls(&r.calls),
            vec![
                (0, common::D, 2),
                (1, common::R, 1),
                (2, common::R, 1),
                (0, common::R, 1)
            ]
        );
        rig.verify();
        rig.finish();
    }
}

#[test]
fn pre_migrate_fence_that_is_late_fails_the_migration_cleanly() {
    for b in backends() {
        // The destination's pre-migrate fence signals only after the timeout: copies wait
        // for it, so their fences time out; the destination is held until they signal.
        let rig = build("s11s", 3, PageSize::Size4K, Options::on(b));
        let gate = Gate::new();
        let mark = rig.audit.mark();
        rig.audit.hold_pre_fence(Some(&gate));
        let details = MigrateDetails {
            fence_timeout: Some(Duration::from_millis(100)),
            ..MigrateDetails::default()
        };
        let err = rig.migrate(0, &details).unwrap_err();
        rig.audit.hold_pre_fence(None);
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
        rig.assert_layout("s11s");
        rig.audit.assert_not_released_since(mark);
        gate.open();
        // The held copies now run and signal; the destination goes exactly once.
        wait_for_deferred_release(&rig);
        rig.audit.assert_released_once_since(mark);
        let r = rig.migrate(0, &MigrateDetails::default()).unwrap();
        assert_eq!(calls(&r.calls), vec![(0, common::D, 2), (1, common::R, 2)]);
        rig.verify();
        rig.finish();
    }
}

#[test]
fn pre_migrate_fence_error_fails_the_migration_cleanly() {
    for b in backends() {
        // A clear that fails: every copy ordered after it fails, and so does the migration.
        let rig = build("s1.s", 3, PageSize::Size4K, Options::on(b));
        let gate = Gate::new();
        let mark = rig.audit.mark();
        rig.audit.hold_pre_fence(Some(&gate));
        let failing = gate.clone();
        let opener = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            failing.fail();
        });
        let err = rig.migrate(0, &MigrateDetails::default()).unwrap_err();
        opener.join().unwrap();
        rig.audit.hold_pre_fence(None);
        assert!(matches!(err, Error::Fence { .. }), "{err}");
        common::assert_names(&err, rig.range, &["pagemap"]);
        rig.assert_layout("s1.s");
        assert_eq!(rig.mm.deferred_cleanups(), 0);
        rig.audit.assert_released_once_since(mark);
        rig.audit.assert_mappings_balanced_since(mark);
        let r = rig.migrate(0, &MigrateDetails::default()).unwrap();
        assert_eq!(calls(&r.calls), vec![(0, common::D, 2), (1, common::R, 1)]);
        rig.verify();
        rig.finish();
    }
}

#[test]
fn holes_only_with_failing_pre_migrate_fence() {
    for b in backends() {
        // No copy at all: the engine's own wait for the pre-migrate fence carries its error.
        let rig = build("....", 3, PageSize::Size4K, Options::on(b));
        let gate = Gate::new();
        let mark = rig.audit.mark();
        rig.audit.hold_pre_fence(Some(&gate));
        gate.fail();
        let err = rig.migrate(0, &MigrateDetails::default()).unwrap_err();
        rig.audit.hold_pre_fence(None);
        assert!(
            matches!(
                err,
                Error::Fence {
                    what: drm_pagemap::FenceRole::PreMigrate,
                    pagemap: Some(PagemapId(0)),
                    ..
                }
            ),
            "{err}"
        );
        rig.assert_layout("....");
        rig.audit.assert_released_once_since(mark);
        rig.verify();
        rig.finish();
    }
}

#[test]
fn late_pre_migrate_fence_keeps_the_destination_until_it_signals() {
    for b in backends() {
        // Holes only: no copy is issued, so the clear behind the pre-migrate fence is the
        // only work that may still write into the destination when the wait times out. The
        // allocation must stay held until that fence signals, then be released once.
        let rig = build("....", 3, PageSize::Size4K, Options::on(b));
        let gate = Gate::new();
        let mark = rig.audit.mark();
        rig.audit.hold_pre_fence(Some(&gate));
        let details = MigrateDetails {
            fence_timeout: Some(Duration::from_millis(50)),
            ..MigrateDetails::default()
        };
        let err = rig.migrate(0, &details).unwrap_err();
        rig.audit.hold_pre_fence(None);
        assert!(
            matches!(
                err,
                Error::Fence {
                    what: drm_pagemap::FenceRole::PreMigrate,
                    source: FenceError::Timeout(_),
                    ..
                }
            ),
            "{err}"
        );
        rig.assert_layout("....");
        assert_eq!(
            rig.mm.deferred_cleanups(),
            1,
            "destination released under a running clear"
        );
        rig.audit.assert_not_released_since(mark);
        gate.open();
        // The pre-migrate fence is the gate and the backend's clear, which runs on the
        // device's engine thread: on a busy machine it can still be running when the gate
        // opens, and the destination is released when the engine finishes it.
        wait_for_deferred_release(&rig);
        rig.audit.assert_released_once_since(mark);
        rig.verify();
        rig.finish();
    }
}

#[test]
fn sim_only_out_of_device_memory_then_evict_and_retry() {
    // Sim-only (device capacity): pagemap 1 holds 16 pages, 8 of them in use. Migrating the
    // 16-page range there fails to allocate; nothing changes; evicting the 8 pages and
    // retrying (what xe does on -EBUSY / -ENOMEM) succeeds.
    let mut opts = Options::on("sim");
    opts.device_capacity = Some(16 * 4096);
    let rig = build("1*8,s*8", 3, PageSize::Size4K, opts);
    let x = rig.alloc_of(0);
    let details = MigrateDetails {
        can_migrate_same_pagemap: true,
        ..MigrateDetails::default()
    };
    let mark = rig.audit.mark();
    let err = rig.migrate(1, &details).unwrap_err();
    match &err {
        Error::Backend {
            op: drm_pagemap::BackendOp::Allocate,
            pagemap: Some(PagemapId(1)),
            source,
            ..
        } => assert_eq!(source.kind, drm_pagemap::BackendErrorKind::OutOfMemory),
        other => panic!("{other}"),
    }
    common::assert_names(&err, rig.range, &["pagemap 1"]);
    assert!(rig.audit.allocs_since(mark).is_empty());
    rig.assert_layout("1*8,s*8");
    rig.mm.evict_to_ram(x).unwrap();
    let r = rig.migrate(1, &details).unwrap();
    assert_eq!(calls(&r.calls), vec![(1, common::D, 16)]);
    rig.verify();
    rig.finish();
}

#[test]
fn work_while_copying_runs_between_the_last_issue_and_the_wait() {
    for b in backends() {
        let rig = build("s1.2s0", 3, PageSize::Size4K, Options::on(b));
        let (ps, n) = (
            rig.page_size,
            (rig.range.len / rig.page_size.bytes()) as usize,
        );
        let details = MigrateDetails {
            can_migrate_same_pagemap: true,
            fence_timeout: Some(Duration::from_secs(10)),
            ..MigrateDetails::default()
        };
        // The copies are held: the work sees every call issued and the pages not committed,
        // then lets the copies go (a wait before the work would time out instead).
        let gate = Gate::new();
        rig.audit.hold_copies(Some(&gate));
        let mark = rig.audit.mark();
        let before = rig.mm.generation(rig.range).unwrap();
        let alloc = rig
            .mm
            .allocate_devmem(PagemapId(0), n, ps, rig.range)
            .unwrap();
        let mut seen = None;
        let rep = rig
            .mm
            .migrate_to_devmem_with(alloc, rig.range, &details, &mut |pfns| {
                let copies = rig
                    .audit
                    .since(mark)
                    .iter()
                    .filter(|e| matches!(e, common::Event::Copy { .. }))
                    .count();
                let generation = rig.mm.generation(rig.range).unwrap();
                seen = Some((pfns.to_vec(), copies, generation));
                gate.open();
            })
            .unwrap();
        rig.audit.hold_copies(None);
        let (pfns, copies_then, generation_then) = seen.expect("the work ran");
        assert_eq!(copies_then, rep.calls.len(), "{b}: every call issued first");
        assert_eq!(pfns.len(), n, "{b}: a pfn per page");
        // Collecting locked the pages (a new generation); the commit came after the work.
        assert!(generation_then > before, "{b}");
        let after = rep.generation.expect("pages moved");
        assert!(after > generation_then, "{b}: committed after the work");
        // The report's generation names the backing: every page in the allocation, in order.
        assert_eq!(rig.mm.generation(rig.range).unwrap(), after, "{b}");
        let mut backing = Vec::new();
        assert_eq!(
            rig.mm
                .backing_with_generation(rig.range, &mut backing)
                .unwrap(),
            after
        );
        let want: Vec<PageBacking> = pfns
            .iter()
            .map(|&pfn| PageBacking::Device {
                pagemap: PagemapId(0),
                alloc,
                pfn,
            })
            .collect();
        assert_eq!(backing, want, "{b}");
        rig.verify();

        // A submission that fails: the work does not run, nothing moves.
        let inj = FaultInjector::new();
        let rig = build("s1.2s0", 3, ps, Options::on(b).faults(&inj));
        let alloc = rig
            .mm
            .allocate_devmem(PagemapId(0), n, ps, rig.range)
            .unwrap();
        inj.fail_nth(FaultSite::Copy, 2);
        let mut ran = false;
        let err = rig
            .mm
            .migrate_to_devmem_with(alloc, rig.range, &details, &mut |_| ran = true)
            .unwrap_err();
        assert!(matches!(err, Error::Backend { .. }), "{b}: {err}");
        assert!(
            !ran,
            "{b}: no work for a migration that could not issue its copies"
        );
        rig.assert_layout("s1.2s0");
        rig.verify();
        rig.finish();
    }
}
