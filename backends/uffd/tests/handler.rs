//! One fault handler for the process, whatever the number of spaces (its own test binary
//! with one test: it counts the process's threads, which other tests would move).

use drm_pagemap_core::{AddressSpace, Backend, MigrateDetails, PageSize, PagemapId};
use drm_pagemap_sim::{SimBackend, SimConfig};
use drm_pagemap_uffd::{MemfdMemory, PointerSpace, UffdConfig, UffdError, handler_threads};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

struct Rig {
    _sim: SimBackend,
    mm: Arc<AddressSpace>,
    mem: Arc<MemfdMemory>,
}

fn rig() -> Rig {
    let mem = Arc::new(MemfdMemory::new(64 << 20).unwrap());
    let sim = SimBackend::new(SimConfig {
        devices: 2,
        device_capacity: 64 << 20,
        host_bytes: Some(mem.clone()),
        ..SimConfig::default()
    })
    .unwrap();
    let mm = Arc::new(AddressSpace::new(sim.host_memory()));
    for pm in sim.pagemap_per_device().unwrap() {
        mm.add_pagemap(pm).unwrap();
    }
    Rig { _sim: sim, mm, mem }
}

/// Threads of this process (`/proc/self/task`), and those named as the fault handler's.
fn threads() -> (usize, usize) {
    let mut all = 0;
    let mut handler = 0;
    for t in std::fs::read_dir("/proc/self/task").unwrap() {
        all += 1;
        let comm = std::fs::read_to_string(t.unwrap().path().join("comm")).unwrap_or_default();
        // `comm` keeps 15 bytes of the name "drm-pagemap-uffd".
        if comm.starts_with("drm-pagemap-uff") {
            handler += 1;
        }
    }
    (all, handler)
}

/// Waits (at most 5 s: helpers end after 200 ms idle) for the counts to be `want`. Also where
/// a thread was just joined: the kernel can still list it in `/proc/self/task` for a moment
/// after the join returned (its exit wakes the joiner before the task is unhashed); a leaked
/// thread never leaves.
fn settle(want: (usize, usize)) -> (usize, usize) {
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let now = threads();
        if now == want || Instant::now() > end {
            return now;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Faults every page of `pr` home from a device `rounds` times from 4 threads at once and
/// checks the values.
fn fault_storm(mm: &Arc<AddressSpace>, pr: &Arc<drm_pagemap_uffd::PointerRange>, rounds: u64) {
    let pages = pr.len() / 4096;
    for round in 0..rounds {
        for p in 0..pages {
            pr.word(p * 512)
                .unwrap()
                .store(p + round, Ordering::Relaxed);
        }
        mm.migrate(
            pr.range(),
            PagemapId((round % 2) as u8),
            &MigrateDetails::default(),
        )
        .unwrap();
        let loaders: Vec<_> = (0..4u64)
            .map(|t| {
                let pr = pr.clone();
                std::thread::spawn(move || {
                    for p in (t..pages).step_by(4) {
                        assert_eq!(pr.word(p * 512).unwrap().load(Ordering::Relaxed), p + round);
                    }
                })
            })
            .collect();
        for l in loaders {
            l.join().unwrap();
        }
    }
}

#[test]
fn one_handler_thread_serves_every_space() {
    let t = std::thread::spawn(|| {
        let (a, b) = (rig(), rig());
        let sa = PointerSpace::new(a.mm.clone(), a.mem.clone(), UffdConfig::default()).unwrap();
        let sb = PointerSpace::new(b.mm.clone(), b.mem.clone(), UffdConfig::default()).unwrap();
        // Spaces without ranges have no userfaultfd and no handler.
        let base = threads();
        assert_eq!(base.1, 0);
        assert_eq!(handler_threads(), 0);
        let ra = match sa.create_range(32 * 4096, PageSize::Size4K) {
            Ok(r) => Arc::new(r),
            Err(e @ (UffdError::Unavailable { .. } | UffdError::MissingFeature { .. })) => {
                println!("skipped: {e}");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        assert_eq!(settle((base.0 + 1, 1)), (base.0 + 1, 1));
        let rb = Arc::new(sb.create_range(32 * 4096, PageSize::Size4K).unwrap());
        assert_eq!(
            threads(),
            (base.0 + 1, 1),
            "a second space, no second thread"
        );
        // Faults in both spaces at once; a sampler records the pool's size meanwhile.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sampler = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut most = 0;
                while !stop.load(Ordering::Relaxed) {
                    most = most.max(handler_threads());
                    std::thread::sleep(Duration::from_micros(200));
                }
                most
            })
        };
        let storm_a = {
            let (mm, ra) = (a.mm.clone(), ra.clone());
            std::thread::spawn(move || fault_storm(&mm, &ra, 4))
        };
        fault_storm(&b.mm, &rb, 4);
        storm_a.join().unwrap();
        stop.store(true, Ordering::Relaxed);
        let most = sampler.join().unwrap();
        println!("handler threads during the faults: at most {most}");
        // 1 + 2 per space: the pool's bound (drm_pagemap_uffd crate doc).
        assert!((1..=5).contains(&most), "{most}");
        let (fa, fb) = (sa.fault_stats(), sb.fault_stats());
        assert!(fa.served >= 4 * 32 && fb.served >= 4 * 32, "{fa:?} {fb:?}");
        assert_eq!((fa.errors, fb.errors), (0, 0));
        // At rest: one handler thread for the two spaces (helpers that served concurrent
        // faults end after 200 ms idle).
        assert_eq!(settle((base.0 + 1, 1)), (base.0 + 1, 1));
        assert_eq!(handler_threads(), 1);
        // One space goes: the other is still served by the same one thread.
        drop(ra);
        drop(sa);
        assert_eq!(threads(), (base.0 + 1, 1));
        fault_storm(&b.mm, &rb, 1);
        assert_eq!(settle((base.0 + 1, 1)), (base.0 + 1, 1));
        // The last one goes: the handler ends (joined before the drop returns: the pool
        // counts no thread at once; `/proc` may list the joined one a moment longer).
        drop(rb);
        drop(sb);
        assert_eq!(handler_threads(), 0);
        assert_eq!(settle(base), base);
        // A new space (on an address space that had one) starts it again.
        let sa2 = PointerSpace::new(a.mm.clone(), a.mem.clone(), UffdConfig::default()).unwrap();
        let ra2 = Arc::new(sa2.create_range(8 * 4096, PageSize::Size4K).unwrap());
        fault_storm(&a.mm, &ra2, 1);
        assert_eq!(settle((base.0 + 1, 1)), (base.0 + 1, 1));
        drop(ra2);
        drop(sa2);
        assert_eq!(handler_threads(), 0);
        assert_eq!(settle(base), base);
    });
    // Watchdog: a hang of the handler would otherwise hang the run.
    let end = Instant::now() + Duration::from_secs(120);
    while !t.is_finished() {
        assert!(Instant::now() < end, "watchdog: not finished within 120 s");
        std::thread::sleep(Duration::from_millis(10));
    }
    t.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
}
