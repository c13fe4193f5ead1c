//! Regression tests of issue 11 (defects an outside user found), one or more per defect, each
//! failing on the build before its fix:
//! - D1: every public `Duration` at 0, 1 ns and `Duration::MAX` (no panic, no range left
//!   locked), and a panic inside a migration, an eviction or a CPU fault (a backend's, or the
//!   caller's work) leaves every page readable and no lock held;
//! - D2: CPU reads racing each other's faults on one allocation never fail;
//! - D3: a migration that is not needed (or refused) allocates and clears nothing, and a CPU
//!   access completes within a stated bound while movers run continuously;
//! - D7: eviction does not honour the timeslice (as documented).
//!
//! The bad-input suite (`tests/bad_input.rs`), the model (`tests/model.rs`) and the stress
//! suite (`tests/stress.rs`) cover the classes these came from.

use drm_pagemap::sim::{SimBackend, SimConfig};
use drm_pagemap::{
    AddressSpace, Backend, BusyReason, Error, Fence, FenceError, HostFence, MigrateDetails,
    MigrateOutcome, PageLocation, PageSize, PagemapId, VaRange,
};
use drm_pagemap_testkit::inject::{FaultInjector, FaultSite};
use drm_pagemap_testkit::layout::{self, LayoutPage};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

const PS: u64 = 4096;
const BASE: u64 = 1 << 30;

/// The durations every public `Duration` parameter is tried with.
const EXTREMES: [Duration; 3] = [Duration::ZERO, Duration::from_nanos(1), Duration::MAX];

struct Machine {
    sim: SimBackend,
    mm: Arc<AddressSpace>,
    inj: Arc<FaultInjector>,
}

fn machine(devices: usize, capacity: u64, copy_latency: Duration) -> Machine {
    let inj = FaultInjector::new();
    let sim = SimBackend::new(SimConfig {
        devices,
        device_capacity: capacity,
        host_capacity: 4 * capacity,
        owner_groups: None,
        copy_latency,
        resident: false,
        faults: None,
        host_bytes: None,
    })
    .unwrap();
    let mm = Arc::new(AddressSpace::new(inj.wrap_host(sim.host_memory())));
    for p in sim.pagemap_per_device().unwrap() {
        mm.add_pagemap(inj.wrap_pagemap(&p)).unwrap();
    }
    Machine { sim, mm, inj }
}

/// Byte `i` of the pattern `tag` writes.
fn byte(tag: u8, i: usize) -> u8 {
    (i as u8).wrapping_mul(31) ^ tag ^ ((i >> 12) as u8)
}

fn fill(mm: &AddressSpace, r: VaRange, tag: u8) {
    let data: Vec<u8> = (0..r.len as usize).map(|i| byte(tag, i)).collect();
    mm.write(r.start, &data).unwrap();
}

/// Reads `r` back (bounded: a locked page fails the test instead of hanging it).
fn check(mm: &AddressSpace, r: VaRange, tag: u8, what: &str) {
    let mut b = vec![0u8; r.len as usize];
    mm.read_timeout(r.start, &mut b, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{what}: read of {r}: {e}"));
    for (i, &x) in b.iter().enumerate() {
        assert_eq!(x, byte(tag, i), "{what}: byte {i} of {r}");
    }
}

/// Every page of `r` is unlocked: a migration of it gets through (or is not needed).
fn assert_unlocked(mm: &AddressSpace, r: VaRange, what: &str) {
    let d = MigrateDetails::default();
    let t = Instant::now();
    loop {
        match mm.migrate(r, PagemapId(0), &d) {
            Ok(_) => return,
            Err(Error::Busy {
                reason: BusyReason::PageLocked,
                ..
            }) if t.elapsed() < Duration::from_secs(10) => thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("{what}: pages of {r} stayed locked or broken: {e}"),
        }
    }
}

/// Frees `r` and checks that nothing is left: no allocation (once late fences signalled), no
/// deferred cleanup.
fn finish(m: &Machine, r: VaRange) {
    m.mm.free_range(r.start).unwrap();
    let t = Instant::now();
    while m.mm.deferred_cleanups() > 0 && t.elapsed() < Duration::from_secs(10) {
        thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        m.mm.deferred_cleanups(),
        0,
        "a deferred cleanup never finished"
    );
    assert!(m.mm.allocations().is_empty(), "{:?}", m.mm.allocations());
    for k in 0..m.mm.pagemaps().len() as u8 {
        let s = m.sim.stats(PagemapId(k)).unwrap();
        assert_eq!(s.allocations, s.releases, "pagemap {k}: {s:?}");
        assert_eq!(s.used_bytes, 0);
    }
}

// --- D1: durations ------------------------------------------------------------------------

#[test]
fn d1_every_timeslice_migrates_and_never_wedges_the_range() {
    for d in EXTREMES {
        let m = machine(2, 16 << 20, Duration::ZERO);
        let r = VaRange::new(BASE, 8 * PS);
        m.mm.create_range(r, PageSize::Size4K).unwrap();
        fill(&m.mm, r, 1);
        let details = MigrateDetails {
            timeslice: d,
            ..MigrateDetails::default()
        };
        // Used to panic on `Instant + Duration::MAX` with the pages locked.
        let rep = m.mm.migrate(r, PagemapId(1), &details).unwrap();
        assert_eq!(rep.outcome, MigrateOutcome::Migrated);
        let info = m.mm.allocation(rep.alloc.unwrap()).unwrap();
        if d == Duration::MAX {
            // "For ever": a CPU access waits; a bounded one gives up, nothing changed.
            let mut b = [0u8; 16];
            let e =
                m.mm.read_timeout(r.start, &mut b, Duration::from_millis(20))
                    .unwrap_err();
            assert!(matches!(e, Error::CpuAccessTimeout { .. }), "{e}");
            let e =
                m.mm.write_timeout(r.start, &[9; 16], Duration::from_millis(1))
                    .unwrap_err();
            assert!(matches!(e, Error::CpuAccessTimeout { .. }), "{e}");
            assert!(info.expires > Instant::now() + Duration::from_secs(3600 * 24 * 365));
            assert!(matches!(
                m.mm.location(r.start).unwrap(),
                PageLocation::Device { .. }
            ));
            // Eviction ignores the timeslice (memory pressure wins, like upstream).
            m.mm.evict_to_ram(rep.alloc.unwrap()).unwrap();
        }
        check(&m.mm, r, 1, &format!("timeslice {d:?}"));
        assert_unlocked(&m.mm, r, &format!("timeslice {d:?}"));
        finish(&m, r);
    }
}

#[test]
fn d1_every_fence_timeout_keeps_data_and_releases_everything() {
    for d in EXTREMES {
        let m = machine(2, 16 << 20, Duration::from_micros(200));
        let r = VaRange::new(BASE, 8 * PS);
        m.mm.create_range(r, PageSize::Size4K).unwrap();
        fill(&m.mm, r, 2);
        let details = MigrateDetails {
            fence_timeout: Some(d),
            ..MigrateDetails::default()
        };
        match m.mm.migrate(r, PagemapId(1), &details) {
            Ok(rep) => assert_eq!(rep.outcome, MigrateOutcome::Migrated),
            // 0 and 1 ns may run out before the copy (200 us) is done.
            Err(Error::Fence {
                source: FenceError::Timeout(t),
                ..
            }) => assert_eq!(t, d),
            Err(e) => panic!("fence timeout {d:?}: {e}"),
        }
        check(&m.mm, r, 2, &format!("fence timeout {d:?}"));
        // The same on the way back.
        m.mm.migrate(r, PagemapId(1), &MigrateDetails::default())
            .unwrap();
        m.mm.set_to_ram_fence_timeout(Some(d));
        let alloc = match m.mm.location(r.start).unwrap() {
            PageLocation::Device { alloc, .. } => alloc,
            other => panic!("{other:?}"),
        };
        match m.mm.evict_to_ram(alloc) {
            Ok(rep) => assert_eq!(rep.pages, 8),
            Err(Error::Fence {
                source: FenceError::Timeout(t),
                ..
            }) => assert_eq!(t, d),
            Err(e) => panic!("to-RAM fence timeout {d:?}: {e}"),
        }
        m.mm.set_to_ram_fence_timeout(None);
        check(&m.mm, r, 2, &format!("to-RAM fence timeout {d:?}"));
        assert_unlocked(&m.mm, r, &format!("fence timeout {d:?}"));
        finish(&m, r);
    }
}

#[test]
fn d1_fence_and_cpu_access_waits_take_every_duration() {
    let timeline = drm_pagemap::FenceTimeline::new();
    for d in EXTREMES {
        // A signalled fence: every wait returns at once.
        let done = Fence::signaled();
        assert_eq!(done.wait_timeout(d), Ok(()));
        assert_eq!(done.wait_for(Some(d)), Ok(()));
        // A pending one: 0 and 1 ns time out, MAX waits until it signals.
        let host: Arc<HostFence> = timeline.host_fence();
        let f = Fence::from_host(host.clone());
        if d == Duration::MAX {
            let signaller = thread::spawn(move || {
                thread::sleep(Duration::from_millis(20));
                host.signal();
            });
            assert_eq!(f.wait_timeout(d), Ok(()));
            signaller.join().unwrap();
            let arr = Fence::new(drm_pagemap::FenceArray::new(vec![f.clone(), done.clone()]));
            assert_eq!(arr.wait_for(Some(d)), Ok(()));
        } else {
            assert_eq!(f.wait_timeout(d), Err(FenceError::Timeout(d)));
            let arr = Fence::new(drm_pagemap::FenceArray::new(vec![f.clone(), done.clone()]));
            assert!(matches!(arr.wait_for(Some(d)), Err(FenceError::Timeout(_))));
            host.signal();
        }
    }
    // CPU accesses with a deadline: on system pages every limit succeeds.
    let m = machine(1, 4 << 20, Duration::ZERO);
    let r = VaRange::new(BASE, 2 * PS);
    m.mm.create_range(r, PageSize::Size4K).unwrap();
    for d in EXTREMES {
        m.mm.write_timeout(r.start + 5, &[7, 8, 9], d).unwrap();
        let mut b = [0u8; 3];
        m.mm.read_timeout(r.start + 5, &mut b, d).unwrap();
        assert_eq!(b, [7, 8, 9]);
    }
    finish(&m, r);
}

// --- D1: a panic between locking pages and the commit ------------------------------------

/// Runs `op`, which must panic; returns the panic's message.
fn must_panic(op: impl FnOnce()) -> String {
    // (The panic's message is printed by the default hook: swapping hooks would race with
    // the other tests of this file.)
    let r = catch_unwind(AssertUnwindSafe(op));
    match r {
        Ok(()) => panic!("the operation did not panic"),
        Err(p) => p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default(),
    }
}

#[test]
fn d1_a_panic_in_a_backend_during_a_migration_leaves_the_range_usable() {
    for site in [
        FaultSite::Alloc,
        FaultSite::Map,
        FaultSite::Copy,
        FaultSite::FenceError,
    ] {
        let m = machine(3, 16 << 20, Duration::ZERO);
        let r = VaRange::new(BASE, 8 * PS);
        m.mm.create_range(r, PageSize::Size4K).unwrap();
        fill(&m.mm, r, 3);
        // Half the pages on device 2, so the migration to 1 has a peer source and system
        // pages (two calls).
        m.mm.migrate(
            VaRange::new(r.start, 4 * PS),
            PagemapId(2),
            &MigrateDetails::default(),
        )
        .unwrap();
        let before = layout::of(&m.mm, r).unwrap();
        m.inj.set_panics(true);
        m.inj.fail_nth(site, 1);
        let msg = must_panic(|| {
            let _ = m.mm.migrate(r, PagemapId(1), &MigrateDetails::default());
        });
        m.inj.disarm();
        m.inj.set_panics(false);
        assert!(msg.contains("injected panic"), "{site:?}: {msg}");
        assert_eq!(
            layout::of(&m.mm, r).unwrap(),
            before,
            "{site:?}: pages moved"
        );
        check(&m.mm, r, 3, &format!("panic at {site:?}"));
        assert_unlocked(&m.mm, r, &format!("panic at {site:?}"));
        finish(&m, r);
    }
}

#[test]
fn d1_a_panic_in_the_callers_work_rolls_the_migration_back() {
    let m = machine(2, 16 << 20, Duration::from_micros(500));
    let r = VaRange::new(BASE, 8 * PS);
    m.mm.create_range(r, PageSize::Size4K).unwrap();
    fill(&m.mm, r, 4);
    let alloc =
        m.mm.allocate_devmem(PagemapId(1), 8, PageSize::Size4K, r)
            .unwrap();
    let msg = must_panic(|| {
        let _ =
            m.mm.migrate_to_devmem_with(alloc, r, &MigrateDetails::default(), &mut |_pfns| {
                panic!("the caller's page-table build failed")
            });
    });
    assert!(msg.contains("page-table build"), "{msg}");
    // Nothing moved; the reservation is released once the copies it received are done.
    assert!(
        layout::of(&m.mm, r)
            .unwrap()
            .iter()
            .all(|p| *p == LayoutPage::System)
    );
    check(&m.mm, r, 4, "panic in while_copying");
    assert_unlocked(&m.mm, r, "panic in while_copying");
    finish(&m, r);
}

#[test]
fn d1_a_panic_in_a_backend_on_the_way_back_leaves_the_pages_on_the_device() {
    for site in [
        FaultSite::Alloc,
        FaultSite::Map,
        FaultSite::Copy,
        FaultSite::FenceError,
    ] {
        for cpu in [false, true] {
            let m = machine(2, 16 << 20, Duration::ZERO);
            let r = VaRange::new(BASE, 8 * PS);
            m.mm.create_range(r, PageSize::Size4K).unwrap();
            fill(&m.mm, r, 5);
            let rep =
                m.mm.migrate(r, PagemapId(1), &MigrateDetails::default())
                    .unwrap();
            let before = layout::of(&m.mm, r).unwrap();
            m.inj.set_panics(true);
            m.inj.fail_nth(site, 1);
            let msg = must_panic(|| {
                if cpu {
                    let mut b = [0u8; 8];
                    let _ = m.mm.read(r.start + PS, &mut b);
                } else {
                    let _ = m.mm.evict_to_ram(rep.alloc.unwrap());
                }
            });
            m.inj.disarm();
            m.inj.set_panics(false);
            let what = format!(
                "panic at {site:?} ({})",
                if cpu { "CPU fault" } else { "eviction" }
            );
            assert!(msg.contains("injected panic"), "{what}: {msg}");
            assert_eq!(layout::of(&m.mm, r).unwrap(), before, "{what}: pages moved");
            check(&m.mm, r, 5, &what);
            assert_unlocked(&m.mm, r, &what);
            finish(&m, r);
        }
    }
}

// --- D2: CPU accesses racing each other's faults ------------------------------------------

#[test]
fn d2_concurrent_cpu_reads_of_one_allocation_never_fail() {
    const READERS: usize = 6;
    let m = machine(2, 16 << 20, Duration::ZERO);
    let r = VaRange::new(BASE, READERS as u64 * PS);
    m.mm.create_range(r, PageSize::Size4K).unwrap();
    fill(&m.mm, r, 6);
    let mm = m.mm.clone();
    let barrier = Arc::new(Barrier::new(READERS + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..READERS)
        .map(|t| {
            let (mm, barrier, stop) = (mm.clone(), barrier.clone(), stop.clone());
            thread::spawn(move || {
                let mut failures = Vec::new();
                loop {
                    barrier.wait();
                    if stop.load(Ordering::SeqCst) {
                        return failures;
                    }
                    // One byte of page t: every reader faults a page of the same allocation.
                    let at = t * PS as usize + 7 * t;
                    let mut b = [0u8];
                    match mm.read(BASE + at as u64, &mut b) {
                        Ok(()) if b[0] == byte(6, at) => {}
                        Ok(()) => failures.push(format!("reader {t}: wrong byte")),
                        Err(e) => failures.push(format!("reader {t}: {e}")),
                    }
                    barrier.wait();
                }
            })
        })
        .collect();
    // Two threads that only look at the address space keep its lock contended, so a
    // reader is often held between two lock acquisitions of its fault path (where the race
    // lies) while another reader's fault completes.
    let lookers: Vec<_> = (0..2)
        .map(|_| {
            let (mm, stop) = (mm.clone(), stop.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let _ = mm.location(BASE);
                }
            })
        })
        .collect();
    let rounds = 1000;
    for _ in 0..rounds {
        mm.migrate(r, PagemapId(1), &MigrateDetails::default())
            .unwrap();
        barrier.wait(); // go
        barrier.wait(); // all read
    }
    stop.store(true, Ordering::SeqCst);
    barrier.wait();
    for l in lookers {
        l.join().unwrap();
    }
    let failures: Vec<String> = readers
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} reads failed, first: {:?}",
        failures.len(),
        rounds * READERS,
        &failures[..failures.len().min(5)]
    );
    finish(&m, r);
}

// --- D3: no allocation before the plan; CPU progress under contention ---------------------

#[test]
fn d3_migrations_that_move_nothing_allocate_and_clear_nothing() {
    let m = machine(2, 256 << 20, Duration::ZERO);
    let big = VaRange::new(BASE, 64 << 20);
    m.mm.create_range(big, PageSize::Size4K).unwrap();
    m.mm.write(big.start, &[1; 64]).unwrap();
    m.mm.migrate(big, PagemapId(0), &MigrateDetails::default())
        .unwrap();
    let small = VaRange::new(BASE + (1 << 28), PS);
    m.mm.create_range(small, PageSize::Size4K).unwrap();
    m.mm.write(small.start, &[2; 64]).unwrap();
    m.mm.migrate(small, PagemapId(0), &MigrateDetails::default())
        .unwrap();
    let allocs = m.sim.stats(PagemapId(0)).unwrap().allocations;
    // 40 migrations of a 64 MiB range that is already there: not needed, nothing allocated
    // (each used to allocate and queue a 64 MiB clear that later copies waited behind).
    for _ in 0..40 {
        let rep =
            m.mm.migrate(big, PagemapId(0), &MigrateDetails::default())
                .unwrap();
        assert_eq!(rep.outcome, MigrateOutcome::NotNeeded);
    }
    // Refused ones allocate nothing either: half the range elsewhere, the other half in the
    // destination (fragmentation), and a page locked by a CPU access's claim is covered by
    // the progress test below.
    m.mm.migrate(
        VaRange::new(big.start, 32 << 20),
        PagemapId(1),
        &MigrateDetails::default(),
    )
    .unwrap();
    for _ in 0..10 {
        let e =
            m.mm.migrate(big, PagemapId(0), &MigrateDetails::default())
                .unwrap_err();
        assert!(
            matches!(
                e,
                Error::Busy {
                    reason: BusyReason::Fragmentation,
                    ..
                }
            ),
            "{e}"
        );
    }
    assert_eq!(
        m.sim.stats(PagemapId(0)).unwrap().allocations,
        allocs,
        "a migration that moved nothing allocated device memory"
    );
    // A CPU fault of a page of that device is not delayed by clears of nothing.
    let t = Instant::now();
    let mut b = [0u8; 64];
    m.mm.read(small.start, &mut b).unwrap();
    assert_eq!(b, [2; 64]);
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "a 4 KiB CPU fault took {:?}",
        t.elapsed()
    );
    m.mm.free_range(small.start).unwrap();
    finish(&m, big);
}

/// The bound a CPU access meets while movers run continuously: the timeslice the movers
/// give their pages, plus one migration already running on those pages and the copy back
/// (50 us each here, 64 pages), plus scheduling on a loaded 2-core machine. Without the
/// claim a waiting access puts on its pages, the movers renew the timeslice for ever.
const PROGRESS_TIMESLICE: Duration = Duration::from_millis(20);
const PROGRESS_BOUND: Duration = Duration::from_millis(150);

#[test]
fn d3_cpu_access_completes_within_its_bound_while_movers_never_stop() {
    cpu_access_under_contention(false);
}

#[test]
fn d3_cpu_access_completes_within_its_bound_while_movers_and_an_evictor_never_stop() {
    cpu_access_under_contention(true);
}

/// Two movers migrate one 64-page range back and forth without pause (each migration gives
/// the pages a timeslice of `PROGRESS_TIMESLICE`), with `evictor` a third thread evicts it
/// every 2 ms, and single-byte CPU reads of it must each finish within `PROGRESS_BOUND`.
fn cpu_access_under_contention(evictor: bool) {
    let m = machine(3, 64 << 20, Duration::from_micros(50));
    let r = VaRange::new(BASE, 64 * PS);
    m.mm.create_range(r, PageSize::Size4K).unwrap();
    fill(&m.mm, r, 7);
    let mm = m.mm.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let mut movers = Vec::new();
    for to in [1u8, 2] {
        let (mm, stop) = (mm.clone(), stop.clone());
        movers.push(thread::spawn(move || {
            let d = MigrateDetails {
                timeslice: PROGRESS_TIMESLICE,
                ..MigrateDetails::default()
            };
            let mut moved = 0u64;
            while !stop.load(Ordering::Relaxed) {
                match mm.migrate(r, PagemapId(to), &d) {
                    Ok(_) => moved += 1,
                    Err(Error::Busy { .. }) => thread::yield_now(),
                    Err(e) => panic!("mover to {to}: {e}"),
                }
            }
            moved
        }));
    }
    if evictor {
        let (mm, stop) = (mm.clone(), stop.clone());
        movers.push(thread::spawn(move || {
            let mut evicted = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if let Ok(PageLocation::Device { alloc, .. }) = mm.location(r.start + 9 * PS) {
                    match mm.evict_to_ram(alloc) {
                        Ok(_) => evicted += 1,
                        Err(Error::Busy { .. } | Error::NoSuchAllocation { .. }) => {}
                        Err(e) => panic!("evictor: {e}"),
                    }
                }
                thread::sleep(Duration::from_millis(2));
            }
            evicted
        }));
    }
    let mut worst = Duration::ZERO;
    let reads = 150;
    let t0 = Instant::now();
    for k in 0..reads {
        let at = (k * 977 % 64) as u64 * PS + (k as u64 % 4000);
        let mut b = [0u8];
        let t = Instant::now();
        // Bounded, so that a starved read fails the test instead of hanging it.
        m.mm.read_timeout(r.start + at, &mut b, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("read {k}: {e}"));
        worst = worst.max(t.elapsed());
        assert_eq!(b[0], byte(7, at as usize));
        thread::sleep(Duration::from_millis(1));
    }
    let total = t0.elapsed();
    stop.store(true, Ordering::SeqCst);
    let done: Vec<u64> = movers.into_iter().map(|h| h.join().unwrap()).collect();
    eprintln!(
        "{reads} single-byte reads in {total:?} while movers ran ({} and {} migrations, {} evictions): worst {worst:?} (bound {PROGRESS_BOUND:?})",
        done[0],
        done[1],
        done.get(2).copied().unwrap_or(0)
    );
    assert!(done[0] + done[1] > 10, "the movers did not run: {done:?}");
    assert!(
        worst <= PROGRESS_BOUND,
        "a CPU read took {worst:?} (bound {PROGRESS_BOUND:?}) while movers ran"
    );
    check(&m.mm, r, 7, "after contention");
    finish(&m, r);
}

// --- D7: what the docs say about the timeslice --------------------------------------------

#[test]
fn d7_cpu_access_waits_for_the_timeslice_and_eviction_does_not() {
    let m = machine(2, 16 << 20, Duration::ZERO);
    let r = VaRange::new(BASE, 4 * PS);
    m.mm.create_range(r, PageSize::Size4K).unwrap();
    fill(&m.mm, r, 8);
    let slice = Duration::from_millis(150);
    let details = MigrateDetails {
        timeslice: slice,
        ..MigrateDetails::default()
    };
    // CPU access: waits until the timeslice has expired, then brings the pages home.
    let t = Instant::now();
    m.mm.migrate(r, PagemapId(1), &details).unwrap();
    let mut b = [0u8; 4];
    m.mm.read(r.start, &mut b).unwrap();
    assert!(
        t.elapsed() >= slice,
        "the CPU read came back after {:?}, inside the {slice:?} timeslice",
        t.elapsed()
    );
    assert_eq!(m.mm.location(r.start).unwrap(), PageLocation::System);
    // Eviction: does not wait for it (memory pressure wins).
    let rep = m.mm.migrate(r, PagemapId(1), &details).unwrap();
    let t = Instant::now();
    m.mm.evict_to_ram(rep.alloc.unwrap()).unwrap();
    assert!(
        t.elapsed() < slice,
        "eviction waited {:?} for the timeslice",
        t.elapsed()
    );
    assert!(
        m.mm.allocation(rep.alloc.unwrap()).is_none(),
        "the allocation was not released"
    );
    check(&m.mm, r, 8, "after eviction inside the timeslice");
    finish(&m, r);
}

#[test]
fn d3_a_reservation_a_migration_does_not_use_goes_back_unused() {
    let m = machine(2, 16 << 20, Duration::ZERO);
    let r = VaRange::new(BASE, 8 * PS);
    m.mm.create_range(r, PageSize::Size4K).unwrap();
    fill(&m.mm, r, 9);
    m.mm.migrate(r, PagemapId(0), &MigrateDetails::default())
        .unwrap();
    let s0 = m.sim.stats(PagemapId(0)).unwrap();
    // Not needed, refused (a reservation of the wrong size), released unused: no copy
    // touched any of them.
    let a =
        m.mm.allocate_devmem(PagemapId(0), 8, PageSize::Size4K, r)
            .unwrap();
    let rep =
        m.mm.migrate_to_devmem(a, r, &MigrateDetails::default())
            .unwrap();
    assert_eq!(rep.outcome, MigrateOutcome::NotNeeded);
    let b =
        m.mm.allocate_devmem(PagemapId(0), 7, PageSize::Size4K, r)
            .unwrap();
    assert!(
        m.mm.migrate_to_devmem(b, r, &MigrateDetails::default())
            .is_err()
    );
    let c =
        m.mm.allocate_devmem(PagemapId(0), 3, PageSize::Size4K, r)
            .unwrap();
    m.mm.release_devmem(c).unwrap();
    let s1 = m.sim.stats(PagemapId(0)).unwrap();
    assert_eq!(s1.releases, s0.releases + 3);
    assert_eq!(s1.unused_releases, s0.unused_releases + 3);
    // A migration that copied goes back through the ordinary release.
    m.mm.migrate(r, PagemapId(1), &MigrateDetails::default())
        .unwrap();
    let s2 = m.sim.stats(PagemapId(0)).unwrap();
    assert_eq!(s2.releases, s1.releases + 1);
    assert_eq!(s2.unused_releases, s1.unused_releases);
    check(&m.mm, r, 9, "after unused reservations");
    finish(&m, r);
}

#[test]
fn d1_a_sim_copy_latency_of_any_length_is_taken() {
    for d in EXTREMES {
        let m = machine(2, 16 << 20, d);
        let r = VaRange::new(BASE, 4 * PS);
        m.mm.create_range(r, PageSize::Size4K).unwrap();
        fill(&m.mm, r, 10);
        let details = MigrateDetails {
            fence_timeout: Some(Duration::from_millis(50)),
            ..MigrateDetails::default()
        };
        match m.mm.migrate(r, PagemapId(1), &details) {
            Ok(_) => assert_ne!(d, Duration::MAX, "a copy that never ends completed"),
            Err(Error::Fence {
                source: FenceError::Timeout(_),
                ..
            }) => assert_eq!(d, Duration::MAX, "a copy of {d:?} timed out"),
            Err(e) => panic!("copy latency {d:?}: {e}"),
        }
        // The system pages were never touched: readable at once.
        check(&m.mm, r, 10, &format!("copy latency {d:?}"));
        if d != Duration::MAX {
            finish(&m, r);
        } else {
            // The copy never ends: its destination stays parked, nothing else is held.
            assert_eq!(m.mm.deferred_cleanups(), 1);
            m.mm.free_range(r.start).unwrap();
        }
    }
}
