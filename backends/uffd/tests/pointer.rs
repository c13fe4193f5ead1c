//! Pointer ranges on the simulated backend: loads and stores through the pointer while the
//! engine migrates and evicts the same pages.

use drm_pagemap_core::{
    AddressSpace, Backend, MigrateDetails, PageLocation, PageSize, PagemapId, VaRange,
};
use drm_pagemap_sim::{SimBackend, SimConfig};
use drm_pagemap_testkit::inject::{FaultInjector, FaultSite};
use drm_pagemap_uffd::{MemfdMemory, PointerSpace, UffdConfig, UffdError};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

mod common;
use common::*;

/// Copy calls `mm` has issued so far (the statistics count a call when it is submitted).
fn copies_issued(mm: &AddressSpace) -> u64 {
    mm.stats().links.iter().map(|l| l.calls).sum()
}

/// Waits (at most 10 s) until `mm` has issued more than `issued` copy calls: a migration that
/// got that far has taken its pages out of the process's mapping, and its copy is running.
fn wait_for_a_copy(mm: &AddressSpace, issued: u64) {
    let end = Instant::now() + Duration::from_secs(10);
    while copies_issued(mm) <= issued {
        assert!(Instant::now() < end, "no copy was issued within 10 s");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn stores_survive_a_round_trip_through_a_device_and_fault_home() {
    if !available() {
        return;
    }
    watchdog(Duration::from_secs(60), || {
        let r = rig(2, UffdConfig::default());
        let pages = 64u64;
        let pr = r
            .space
            .create_range(pages * 4096, PageSize::Size4K)
            .unwrap();
        let words = pages * 512;
        for i in 0..words {
            pr.word(i).unwrap().store(i * 7 + 1, Ordering::Relaxed);
        }
        // The explicit API sees the pointer's stores: the same frames.
        let mut b = [0u8; 8];
        r.mm.read(pr.range().start + 8 * 100, &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), 701);
        let allocated = r.mem.allocated_bytes();
        assert!(allocated >= pages * 4096, "{allocated}");
        let d = MigrateDetails::default();
        r.mm.migrate(pr.range(), PagemapId(0), &d).unwrap();
        assert!(matches!(
            r.mm.location(pr.range().start).unwrap(),
            PageLocation::Device { .. }
        ));
        // Device-resident pages hold no host memory.
        assert!(
            r.mem.allocated_bytes() <= allocated - pages * 4096,
            "{} of {allocated} bytes still allocated",
            r.mem.allocated_bytes()
        );
        // Device to device, then loads through the pointer fault every page home.
        r.mm.migrate(pr.range(), PagemapId(1), &d).unwrap();
        let served = r.space.fault_stats().served;
        for i in 0..words {
            assert_eq!(
                pr.word(i).unwrap().load(Ordering::Relaxed),
                i * 7 + 1,
                "word {i}"
            );
        }
        // The handler counts a fault after waking its thread: give it a moment.
        let t = Instant::now();
        while r.space.fault_stats().served < served + pages && t.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(r.space.fault_stats().served >= served + pages);
        assert_eq!(
            r.mm.location(pr.range().start).unwrap(),
            PageLocation::System
        );
        assert_eq!(
            r.space.fault_stats().errors,
            0,
            "{:?}",
            r.space.last_fault_error()
        );
    });
}

#[test]
fn first_touch_reads_zero_and_populates() {
    if !available() {
        return;
    }
    watchdog(Duration::from_secs(30), || {
        let r = rig(1, UffdConfig::default());
        let pr = r.space.create_range(16 * 4096, PageSize::Size4K).unwrap();
        assert_eq!(
            r.mm.location(pr.range().start).unwrap(),
            PageLocation::Unpopulated
        );
        // Dirty the pool first: a fresh frame must still read zero through the pointer.
        let junk = r.space.create_range(16 * 4096, PageSize::Size4K).unwrap();
        for i in 0..16 * 512 {
            junk.word(i).unwrap().store(u64::MAX, Ordering::Relaxed);
        }
        drop(junk);
        for i in 0..16 * 512 {
            assert_eq!(pr.word(i).unwrap().load(Ordering::Relaxed), 0, "word {i}");
        }
        assert_eq!(
            r.mm.location(pr.range().start).unwrap(),
            PageLocation::System
        );
        // A store after a load lands (the page is mapped writable).
        pr.word(3).unwrap().store(5, Ordering::Relaxed);
        let mut b = [0u8; 8];
        r.mm.read(pr.range().start + 24, &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), 5);
    });
}

#[test]
fn two_mib_pages_round_trip() {
    if !available() {
        return;
    }
    watchdog(Duration::from_secs(60), || {
        let r = rig(1, UffdConfig::default());
        let pr = r.space.create_range(4 << 20, PageSize::Size2M).unwrap();
        assert_eq!(pr.range().start % (2 << 20), 0);
        let words = (4 << 20) / 8;
        for i in (0..words).step_by(61) {
            pr.word(i).unwrap().store(!i, Ordering::Relaxed);
        }
        r.mm.migrate(pr.range(), PagemapId(0), &MigrateDetails::default())
            .unwrap();
        for i in (0..words).step_by(61) {
            assert_eq!(pr.word(i).unwrap().load(Ordering::Relaxed), !i);
        }
    });
}

#[test]
fn many_threads_store_and_load_while_others_migrate_and_evict() {
    if !available() {
        return;
    }
    watchdog(Duration::from_secs(120), || {
        // Copies take 100 us: stores land while pages are in flight.
        let r = rig_with(3, UffdConfig::default(), Duration::from_micros(100));
        let pr = Arc::new(r.space.create_range(32 * 4096, PageSize::Size4K).unwrap());
        let stress = Stress {
            pagemaps: 3,
            rounds: 2000,
            want_moved: 20,
            want_evicted: 2,
            at_most: Duration::from_secs(30),
            evict_every: 4,
        };
        let (moved, evicted) = store_load_while_moving(&r.mm, &pr, &stress);
        let faults = r.space.fault_stats().served;
        println!("{moved} migrations, {evicted} evictions, {faults} faults served");
        assert!(
            moved >= 20 && evicted >= 2 && faults >= 10,
            "{moved} {evicted} {faults}"
        );
        assert_eq!(
            r.space.fault_stats().errors,
            0,
            "{:?}",
            r.space.last_fault_error()
        );
    });
}

#[test]
fn userfaultfd_unavailable_is_a_typed_error_and_the_explicit_api_works() {
    let r = rig(
        1,
        UffdConfig {
            inject_open_errno: Some(libc_eperm()),
            ..UffdConfig::default()
        },
    );
    let e = r.space.create_range(4096, PageSize::Size4K).unwrap_err();
    assert!(
        matches!(e, UffdError::Unavailable { step: "open", .. }),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains("explicit read/write API still works"),
        "{e}"
    );
    assert_eq!(r.space.range_count(), 0);
    let va = VaRange::new(1 << 40, 4 * 4096);
    r.mm.create_range(va, PageSize::Size4K).unwrap();
    r.mm.write(va.start, &[9u8; 100]).unwrap();
    r.mm.migrate(va, PagemapId(0), &MigrateDetails::default())
        .unwrap();
    let mut b = [0u8; 100];
    r.mm.read(va.start, &mut b).unwrap();
    assert_eq!(b, [9u8; 100]);
}

#[test]
fn a_range_that_could_exceed_the_map_count_is_refused() {
    if !available() {
        return;
    }
    // Page by page (a host memory that does not place frames): one mapping per page at
    // worst, counted at creation.
    let r = rig(
        1,
        UffdConfig {
            limits: drm_pagemap_uffd::limits::MapLimits {
                max_map_count: Some(drm_pagemap_uffd::limits::mappings_in_use() + 5000),
                headroom: 1000,
            },
            scattered: true,
            ..UffdConfig::default()
        },
    );
    let ok = r.space.create_range(1000 * 4096, PageSize::Size4K).unwrap();
    // The first range's worst case stays reserved: a second one of 3,500 pages no longer fits.
    let e = r
        .space
        .create_range(3500 * 4096, PageSize::Size4K)
        .unwrap_err();
    assert!(
        matches!(e, UffdError::MapCountLimit { pages: 3500, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("vm.max_map_count"), "{e}");
    drop(ok);
    // Freed: its reservation is back.
    r.space.create_range(3500 * 4096, PageSize::Size4K).unwrap();
}

#[test]
fn backends_without_support_say_why() {
    assert!(drm_pagemap_uffd::support("sim").is_ok());
    // The tests build this crate with feature `cuda`.
    assert!(drm_pagemap_uffd::support("cuda").is_ok());
    for b in ["level-zero", "tier"] {
        let e = drm_pagemap_uffd::support(b).unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("pointer ranges unsupported on backend {b}: ")),
            "{e}"
        );
    }
}

fn libc_eperm() -> i32 {
    1
}

#[test]
fn fault_round_trip_figures() {
    if !available() {
        return;
    }
    // Printed, not asserted: the CPU-fault round trip through the pointer against the
    // explicit read, 4 KiB and 2 MiB pages.
    let r = rig(1, UffdConfig::default());
    for (ps, len) in [(PageSize::Size4K, 4096u64), (PageSize::Size2M, 2 << 20)] {
        let pr = r.space.create_range(len, ps).unwrap();
        pr.word(0).unwrap().store(1, Ordering::Relaxed);
        let n = if len == 4096 { 200 } else { 20 };
        let d = MigrateDetails::default();
        let mut fault = Duration::ZERO;
        let mut explicit = Duration::ZERO;
        let mut buf = vec![0u8; len as usize];
        for _ in 0..n {
            r.mm.migrate(pr.range(), PagemapId(0), &d).unwrap();
            let t = Instant::now();
            assert_eq!(pr.word(0).unwrap().load(Ordering::Relaxed), 1);
            fault += t.elapsed();
            r.mm.migrate(pr.range(), PagemapId(0), &d).unwrap();
            let t = Instant::now();
            r.mm.read(pr.range().start, &mut buf).unwrap();
            explicit += t.elapsed();
        }
        println!(
            "round trip {len} B page: pointer fault {:?}, explicit read {:?} (mean of {n})",
            fault / n,
            explicit / n
        );
    }
}

/// `memcpy` into the pointer, a migration to a device, `memcpy` out: the bytes are intact.
fn memcpy_round_trip(len: u64) {
    let mem = Arc::new(MemfdMemory::new(len + (64 << 20)).unwrap());
    let sim = SimBackend::new(SimConfig {
        devices: 1,
        device_capacity: len + (64 << 20),
        host_bytes: Some(mem.clone()),
        ..SimConfig::default()
    })
    .unwrap();
    let mm = Arc::new(AddressSpace::new(sim.host_memory()));
    for pm in sim.pagemap_per_device().unwrap() {
        mm.add_pagemap(pm).unwrap();
    }
    let space = PointerSpace::new(mm.clone(), mem.clone(), UffdConfig::default()).unwrap();
    let pr = space.create_range(len, PageSize::Size2M).unwrap();
    let src: Vec<u8> = (0..len).map(|i| (i * 31 + i / 4096) as u8).collect();
    let t = Instant::now();
    // SAFETY: the range's mapping is `len` bytes from `as_ptr()` and lives while `pr` does;
    // `src` is a separate buffer of `len` bytes.
    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), pr.as_ptr(), len as usize) };
    let first_touch = t.elapsed();
    mm.migrate(pr.range(), PagemapId(0), &MigrateDetails::default())
        .unwrap();
    assert_eq!(
        mem.allocated_bytes(),
        0,
        "device-resident pages hold no host memory"
    );
    let mut dst = vec![0u8; len as usize];
    let t = Instant::now();
    // SAFETY: as above, the other way.
    unsafe { std::ptr::copy_nonoverlapping(pr.as_ptr(), dst.as_mut_ptr(), len as usize) };
    let home = t.elapsed();
    assert!(src == dst, "bytes differ after the round trip");
    println!(
        "memcpy of {} MiB through the pointer: in (first touch) {first_touch:?}, out (faulting \
         home from the device) {home:?}",
        len >> 20
    );
}

#[test]
fn memcpy_through_the_pointer_64_mib() {
    if !available() {
        return;
    }
    watchdog(Duration::from_secs(120), || memcpy_round_trip(64 << 20));
}

/// The 1 GiB `memcpy` (4 GiB of memory in all): `cargo test --release -- --ignored`.
#[test]
#[ignore = "1 GiB: run in release with --ignored"]
fn memcpy_through_the_pointer_1_gib() {
    if !available() {
        return;
    }
    watchdog(Duration::from_secs(600), || memcpy_round_trip(1 << 30));
}

#[test]
fn a_store_to_a_page_in_flight_waits_for_the_migration_and_lands() {
    if !available() {
        return;
    }
    watchdog(Duration::from_secs(60), || {
        // Copies take 50 ms: the store comes while the migration's copy runs (once the copy
        // is issued, not after a sleep that a busy machine could make outlast the start of
        // the migration: a store before it would land in system memory and travel with it).
        let r = rig_with(1, UffdConfig::default(), Duration::from_millis(50));
        let pr = Arc::new(r.space.create_range(4096, PageSize::Size4K).unwrap());
        pr.word(0).unwrap().store(1, Ordering::Relaxed);
        let issued = copies_issued(&r.mm);
        let storer = {
            let (pr, mm) = (pr.clone(), r.mm.clone());
            std::thread::spawn(move || {
                wait_for_a_copy(&mm, issued);
                pr.word(0).unwrap().store(2, Ordering::Relaxed);
                Instant::now()
            })
        };
        r.mm.migrate(pr.range(), PagemapId(0), &MigrateDetails::default())
            .unwrap();
        let migrated = Instant::now();
        let stored = storer.join().unwrap();
        // Taken out of the mapping before the copy: the store waited for the commit, then
        // brought the page home (another copy) and landed there.
        assert!(
            stored > migrated,
            "the store did not wait for the migration"
        );
        assert_eq!(pr.word(0).unwrap().load(Ordering::Relaxed), 2);
        assert_eq!(
            r.mm.location(pr.range().start).unwrap(),
            PageLocation::System
        );
    });
}

#[test]
fn a_store_during_a_migration_that_rolls_back_lands_in_system_memory() {
    if !available() {
        return;
    }
    watchdog(Duration::from_secs(60), || {
        let inj = FaultInjector::new();
        let r = rig_full(
            1,
            UffdConfig::default(),
            Duration::from_millis(50),
            Some(inj.clone()),
        );
        let pr = Arc::new(r.space.create_range(4096, PageSize::Size4K).unwrap());
        pr.word(0).unwrap().store(1, Ordering::Relaxed);
        pr.word(1).unwrap().store(7, Ordering::Relaxed);
        // The copy's fence signals an error: the migration rolls back.
        inj.fail_nth(FaultSite::FenceError, 1);
        let t0 = Instant::now();
        // The store comes while the copy runs (see the test above).
        let issued = copies_issued(&r.mm);
        let storer = {
            let (pr, mm) = (pr.clone(), r.mm.clone());
            std::thread::spawn(move || {
                wait_for_a_copy(&mm, issued);
                pr.word(0).unwrap().store(2, Ordering::Relaxed);
                Instant::now()
            })
        };
        let e =
            r.mm.migrate(pr.range(), PagemapId(0), &MigrateDetails::default());
        let done = Instant::now();
        assert!(
            e.is_err(),
            "the injected fence error must fail the migration"
        );
        let stored = storer.join().unwrap();
        // Issued while the copy ran, it waited for the copy's fence (50 ms) and the roll back.
        assert!(
            stored >= t0 + Duration::from_millis(45),
            "the store did not wait ({:?})",
            stored - t0
        );
        assert!(done >= t0 + Duration::from_millis(45));
        assert_eq!(
            r.mm.location(pr.range().start).unwrap(),
            PageLocation::System
        );
        assert_eq!(pr.word(0).unwrap().load(Ordering::Relaxed), 2);
        assert_eq!(pr.word(1).unwrap().load(Ordering::Relaxed), 7);
        let mut b = [0u8; 8];
        r.mm.read(pr.range().start, &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), 2);
    });
}

#[test]
fn user_mode_only_exactly_where_the_process_is_unprivileged() {
    if !available() {
        return;
    }
    let r = rig(1, UffdConfig::default());
    let pr = r.space.create_range(4096, PageSize::Size4K).unwrap();
    pr.word(0).unwrap().store(3, Ordering::Relaxed);
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let euid: u32 = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    let sysctl = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd")
        .map(|s| s.trim() == "1")
        .unwrap_or(false);
    println!(
        "euid {euid}, vm.unprivileged_userfaultfd={}, user mode only: {}",
        sysctl as u8,
        r.space.user_mode_only()
    );
    // Root (CAP_SYS_PTRACE) gets every fault; an unprivileged process without the sysctl
    // gets the user-mode-only descriptor (and the stores above were served through it).
    if euid == 0 || sysctl {
        assert!(!r.space.user_mode_only());
    } else {
        assert!(r.space.user_mode_only());
    }
    assert_eq!(pr.word(0).unwrap().load(Ordering::Relaxed), 3);
}

#[test]
fn a_fault_whose_copy_home_fails_is_retried_and_the_load_completes() {
    if !available() {
        return;
    }
    watchdog(Duration::from_secs(60), || {
        let inj = FaultInjector::new();
        let r = rig_full(1, UffdConfig::default(), Duration::ZERO, Some(inj.clone()));
        let pr = r.space.create_range(4096, PageSize::Size4K).unwrap();
        pr.word(7).unwrap().store(42, Ordering::Relaxed);
        r.mm.migrate(pr.range(), PagemapId(0), &MigrateDetails::default())
            .unwrap();
        // The next copy (the page's way home) fails: the handler cannot give the faulting
        // thread an error, so it retries; the load completes once a copy succeeds.
        inj.fail_nth(FaultSite::Copy, 1);
        assert_eq!(pr.word(7).unwrap().load(Ordering::Relaxed), 42);
        assert_eq!(inj.injected(), 1);
        assert_eq!(r.space.fault_stats().errors, 1);
        let e = r.space.last_fault_error().unwrap();
        assert!(e.contains("fault at"), "{e}");
        assert_eq!(
            r.mm.location(pr.range().start).unwrap(),
            PageLocation::System
        );
    });
}

#[test]
fn ranges_of_2_mib_or_more_start_on_a_2_mib_boundary() {
    if !available() {
        return;
    }
    watchdog(Duration::from_secs(30), || {
        let r = rig(1, UffdConfig::default());
        // Several, so that one lucky kernel placement cannot pass the test alone; a small range
        // in between shifts the next free address off any boundary.
        let mut keep = Vec::new();
        for len in [2 << 20, 6 << 20, 2 << 20, 10 << 20] {
            keep.push(r.space.create_range(3 * 4096, PageSize::Size4K).unwrap());
            let pr = r.space.create_range(len, PageSize::Size4K).unwrap();
            assert_eq!(
                pr.range().start % (2 << 20),
                0,
                "{len} bytes at {:#x}",
                pr.range().start
            );
            keep.push(pr);
        }
        // Smaller ones keep their page size's alignment.
        let small = r.space.create_range(16 << 10, PageSize::Size4K).unwrap();
        assert_eq!(small.range().start % 4096, 0);
    });
}

#[test]
fn a_slow_fault_of_one_space_does_not_hold_up_another_space() {
    if !available() {
        return;
    }
    watchdog(Duration::from_secs(60), || {
        // Space `slow`: its device's copies take a second. Space `fast`: no latency. One
        // handler serves both.
        let slow = rig_with(1, UffdConfig::default(), Duration::from_secs(1));
        let fast = rig(1, UffdConfig::default());
        let ps = Arc::new(slow.space.create_range(4096, PageSize::Size4K).unwrap());
        let pf = fast.space.create_range(4096, PageSize::Size4K).unwrap();
        ps.word(0).unwrap().store(1, Ordering::Relaxed);
        pf.word(0).unwrap().store(2, Ordering::Relaxed);
        let d = MigrateDetails::default();
        slow.mm.migrate(ps.range(), PagemapId(0), &d).unwrap();
        fast.mm.migrate(pf.range(), PagemapId(0), &d).unwrap();
        let t0 = Instant::now();
        let slow_load = {
            let ps = ps.clone();
            std::thread::spawn(move || {
                assert_eq!(ps.word(0).unwrap().load(Ordering::Relaxed), 1);
                Instant::now()
            })
        };
        // The slow fault is in service (its copy home takes a second) when this one comes.
        std::thread::sleep(Duration::from_millis(100));
        let t = Instant::now();
        assert_eq!(pf.word(0).unwrap().load(Ordering::Relaxed), 2);
        let fast_done = Instant::now();
        let slow_done = slow_load.join().unwrap();
        println!(
            "fast space's fault: {:?} while the slow one's took {:?}",
            fast_done - t,
            slow_done - t0
        );
        assert!(slow_done - t0 >= Duration::from_millis(900));
        assert!(
            fast_done < slow_done && fast_done - t < Duration::from_millis(500),
            "the fast space's fault waited {:?} behind the slow one's",
            fast_done - t
        );
    });
}

/// A CPU mapping layer that is not this crate's.
struct Foreign;
impl drm_pagemap_core::CpuMappings for Foreign {
    fn take_out(&self, _: VaRange) {}
}

#[test]
fn one_pointer_space_per_address_space() {
    let Rig {
        _sim,
        mm,
        mem,
        space,
    } = rig(1, UffdConfig::default());
    let e = PointerSpace::new(mm.clone(), mem.clone(), UffdConfig::default()).unwrap_err();
    assert!(matches!(e, UffdError::AlreadyAttached { .. }), "{e}");
    assert!(e.to_string().contains("a live PointerSpace"), "{e}");
    assert!(Arc::ptr_eq(&PointerSpace::attached(&mm).unwrap(), &space));
    // Once the first is dropped, a new one attaches (the engine keeps the layer the first
    // installed; the new space takes it over) and its ranges work.
    drop(space);
    assert!(PointerSpace::attached(&mm).is_none());
    let second = PointerSpace::new(mm.clone(), mem.clone(), UffdConfig::default()).unwrap();
    assert!(Arc::ptr_eq(&PointerSpace::attached(&mm).unwrap(), &second));
    match second.create_range(4 * 4096, PageSize::Size4K) {
        Ok(pr) => {
            pr.word(9).unwrap().store(99, Ordering::Relaxed);
            mm.migrate(pr.range(), PagemapId(0), &MigrateDetails::default())
                .unwrap();
            assert_eq!(pr.word(9).unwrap().load(Ordering::Relaxed), 99);
            assert!(second.fault_stats().served >= 1);
        }
        Err(e @ (UffdError::Unavailable { .. } | UffdError::MissingFeature { .. })) => {
            println!("skipped: {e}")
        }
        Err(e) => panic!("{e}"),
    }
    // An address space with somebody else's layer is refused too, naming that.
    let other = Arc::new(AddressSpace::new(_sim.host_memory()));
    other
        .set_cpu_mappings(Arc::new(Foreign))
        .unwrap_or_else(|_| panic!("fresh"));
    let e = PointerSpace::new(other.clone(), mem, UffdConfig::default()).unwrap_err();
    assert!(e.to_string().contains("not drm-pagemap-uffd's"), "{e}");
    assert!(PointerSpace::attached(&other).is_none());
}

#[test]
fn a_range_of_more_4_kib_pages_than_the_map_count_is_one_mapping() {
    if !available() {
        return;
    }
    watchdog(Duration::from_secs(120), || {
        // 70,000 pages of 4 KiB against the usual limit of 65,530 mappings.
        let pages = 70_000u64;
        let mem = Arc::new(MemfdMemory::new(pages * 4096 + (64 << 20)).unwrap());
        let sim = SimBackend::new(SimConfig {
            devices: 1,
            device_capacity: 64 << 20,
            host_bytes: Some(mem.clone()),
            ..SimConfig::default()
        })
        .unwrap();
        let mm = Arc::new(AddressSpace::new(sim.host_memory()));
        for pm in sim.pagemap_per_device().unwrap() {
            mm.add_pagemap(pm).unwrap();
        }
        let limits = drm_pagemap_uffd::limits::MapLimits {
            max_map_count: Some(drm_pagemap_uffd::limits::DEFAULT_MAX_MAP_COUNT),
            ..Default::default()
        };
        let config = UffdConfig {
            limits,
            ..UffdConfig::default()
        };
        let space = PointerSpace::new(mm.clone(), mem.clone(), config).unwrap();
        let pr = space.create_range(pages * 4096, PageSize::Size4K).unwrap();
        assert!(pr.coalesced());
        let span = pr.range();
        // Scattered 4 KiB runs: every 7th page stored, every 14th through the device.
        for p in (0..pages).step_by(7) {
            pr.word(p * 512 + 1).unwrap().store(p, Ordering::Relaxed);
        }
        for p in (0..pages).step_by(14).take(1000) {
            mm.migrate(
                VaRange::new(span.start + p * 4096, 4096),
                PagemapId(0),
                &MigrateDetails::default(),
            )
            .unwrap();
        }
        for p in (0..pages).step_by(7) {
            assert_eq!(pr.word(p * 512 + 1).unwrap().load(Ordering::Relaxed), p);
        }
        assert_eq!(
            drm_pagemap_uffd::limits::mappings_within(span.start, span.len),
            1
        );
        assert_eq!(space.fault_stats().errors, 0);
        // Page by page, the same range is refused: its worst case does not fit.
        drop(pr);
        drop(space);
        let scattered = UffdConfig {
            limits,
            scattered: true,
            ..UffdConfig::default()
        };
        let space = PointerSpace::new(mm.clone(), mem.clone(), scattered).unwrap();
        let e = space
            .create_range(pages * 4096, PageSize::Size4K)
            .unwrap_err();
        assert!(matches!(e, UffdError::MapCountLimit { .. }), "{e}");
        // Where the host memory has no room for the extent, a range maps page by page.
        drop(space);
        let space = PointerSpace::new(mm, mem, UffdConfig::default()).unwrap();
        let big = space.create_range(512 << 20, PageSize::Size2M).unwrap();
        assert!(!big.coalesced());
        big.word(0).unwrap().store(3, Ordering::Relaxed);
        assert_eq!(big.word(0).unwrap().load(Ordering::Relaxed), 3);
    });
}

#[test]
fn a_page_whose_home_frame_is_held_comes_back_elsewhere_and_later_home() {
    if !available() {
        return;
    }
    watchdog(Duration::from_secs(60), || {
        // Copies take 200 ms; the way back to RAM gives up after 50 ms at first, keeping
        // the home frame aside for the late copy.
        let r = rig_with(1, UffdConfig::default(), Duration::from_millis(200));
        let pr = Arc::new(r.space.create_range(4 * 4096, PageSize::Size4K).unwrap());
        assert!(pr.coalesced());
        let span = pr.range();
        for p in 0..4 {
            pr.word(p * 512).unwrap().store(10 + p, Ordering::Relaxed);
        }
        let page1 = VaRange::new(span.start + 4096, 4096);
        r.mm.migrate(page1, PagemapId(0), &MigrateDetails::default())
            .unwrap();
        r.mm.set_to_ram_fence_timeout(Some(Duration::from_millis(50)));
        // The limit is lifted as soon as the fault's first attempt has timed out (its 200 ms
        // copy holds the home frame for about 150 ms more), not after a fixed 120 ms: on a
        // busy machine that could come before the first attempt (no timeout at all) or so late
        // that the retry after it found the home frame free again.
        let lifter = {
            let (mm, space) = (r.mm.clone(), r.space.clone());
            std::thread::spawn(move || {
                let end = Instant::now() + Duration::from_secs(10);
                while space.fault_stats().errors == 0 {
                    assert!(Instant::now() < end, "the fault never timed out");
                    std::thread::sleep(Duration::from_millis(1));
                }
                mm.set_to_ram_fence_timeout(None);
            })
        };
        // The fault's first attempts time out (retried); one after the lift succeeds, while
        // the home frame is still held by the first attempt's copy: another frame.
        assert_eq!(pr.word(512).unwrap().load(Ordering::Relaxed), 11);
        lifter.join().unwrap();
        let stats = r.space.fault_stats();
        assert!(stats.errors >= 1 && stats.sigbus == 0, "{stats:?}");
        let within = drm_pagemap_uffd::limits::mappings_within(span.start, span.len);
        assert_eq!(within, 3, "page 1 mapped over itself alone");
        for p in 0..4 {
            assert_eq!(pr.word(p * 512).unwrap().load(Ordering::Relaxed), 10 + p);
        }
        // Once the late copy is over its frame is free again: the page's next way home
        // lands in it and the range is one mapping again.
        std::thread::sleep(Duration::from_millis(300));
        let mut one = false;
        for _ in 0..5 {
            r.mm.migrate(page1, PagemapId(0), &MigrateDetails::default())
                .unwrap();
            assert_eq!(pr.word(512).unwrap().load(Ordering::Relaxed), 11);
            if drm_pagemap_uffd::limits::mappings_within(span.start, span.len) == 1 {
                one = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(one, "page 1 never came back to its home frame");
        for p in 0..4 {
            assert_eq!(pr.word(p * 512).unwrap().load(Ordering::Relaxed), 10 + p);
        }
    });
}
