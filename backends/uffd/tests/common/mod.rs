//! What the sim-backed pointer tests share: the rig (memfd system memory, the simulated
//! backend, an address space and its pointer space), a watchdog and the userfaultfd probe.
#![allow(dead_code)]

use drm_pagemap_core::{AddressSpace, Backend, PageSize};
use drm_pagemap_sim::{SimBackend, SimConfig};
use drm_pagemap_testkit::inject::FaultInjector;
use drm_pagemap_uffd::{MemfdMemory, PointerSpace, UffdConfig, UffdError};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Rig {
    pub _sim: SimBackend,
    pub mm: Arc<AddressSpace>,
    pub mem: Arc<MemfdMemory>,
    pub space: Arc<PointerSpace>,
}

pub fn rig(devices: usize, config: UffdConfig) -> Rig {
    rig_with(devices, config, Duration::ZERO)
}

pub fn rig_with(devices: usize, config: UffdConfig, copy_latency: Duration) -> Rig {
    rig_full(devices, config, copy_latency, None)
}

pub fn rig_full(
    devices: usize,
    config: UffdConfig,
    copy_latency: Duration,
    faults: Option<Arc<FaultInjector>>,
) -> Rig {
    let mem = Arc::new(MemfdMemory::new(256 << 20).unwrap());
    let sim = SimBackend::new(SimConfig {
        devices,
        device_capacity: 256 << 20,
        host_bytes: Some(mem.clone()),
        copy_latency,
        faults,
        ..SimConfig::default()
    })
    .unwrap();
    let mm = Arc::new(AddressSpace::new(sim.host_memory()));
    for pm in sim.pagemap_per_device().unwrap() {
        mm.add_pagemap(pm).unwrap();
    }
    let space = PointerSpace::new(mm.clone(), mem.clone(), config).unwrap();
    Rig {
        _sim: sim,
        mm,
        mem,
        space,
    }
}

/// Runs `f` on a thread and fails the test if it has not finished within `limit` (a hang
/// of the fault handler would otherwise hang the test run); a panic of `f` is the test's.
pub fn watchdog<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let t = std::thread::spawn(f);
    let end = Instant::now() + limit;
    while !t.is_finished() {
        assert!(
            Instant::now() < end,
            "watchdog: not finished within {limit:?} (deadlock?)"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    t.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// Skips (one line) where this machine has no usable userfaultfd.
pub fn available() -> bool {
    let r = rig(1, UffdConfig::default());
    match r.space.create_range(4096, PageSize::Size4K) {
        Ok(_) => true,
        Err(e @ (UffdError::Unavailable { .. } | UffdError::MissingFeature { .. })) => {
            println!("skipped: {e}");
            false
        }
        Err(e) => panic!("{e}"),
    }
}

/// How [`store_load_while_moving`] runs.
pub struct Stress {
    /// Pagemaps the movers migrate between (ids `0..pagemaps`).
    pub pagemaps: u64,
    /// Rounds every writer does at least.
    pub rounds: u64,
    /// The writers go on past `rounds` until the movers have migrated this often ...
    pub want_moved: u64,
    /// ... and evicted this often ...
    pub want_evicted: u64,
    /// ... or this long has passed.
    pub at_most: Duration,
    /// A mover evicts what it migrated every this many migrations.
    pub evict_every: u64,
}

/// 4 writer threads store through `pr`'s pointer and load each store back while 2 mover
/// threads migrate the range (whole and halves) between pagemaps and evict it. Writer `w`
/// owns words `w + 4 * slot` (8 slots) of every page: each round it stores `(w, round + 1)`
/// into one slot of each page. At the end every word must hold its writer's last store,
/// through the pointer and through `AddressSpace::read` (an exact model). Returns the
/// migrations and evictions done.
pub fn store_load_while_moving(
    mm: &Arc<AddressSpace>,
    pr: &Arc<drm_pagemap_uffd::PointerRange>,
    s: &Stress,
) -> (u64, u64) {
    use drm_pagemap_core::{MigrateDetails, PagemapId, VaRange};
    use std::sync::Barrier;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let writers = 4u64;
    let pages = pr.len() / 4096;
    let (moved, evicted) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Barrier::new(writers as usize + 2));
    let writer_threads: Vec<_> = (0..writers)
        .map(|w| {
            let (pr, start) = (pr.clone(), start.clone());
            let (moved, evicted) = (moved.clone(), evicted.clone());
            let (rounds, want_moved, want_evicted, at_most) =
                (s.rounds, s.want_moved, s.want_evicted, s.at_most);
            std::thread::spawn(move || {
                start.wait();
                let t0 = Instant::now();
                let mut round = 0u64;
                while round < rounds
                    || ((moved.load(Ordering::Relaxed) < want_moved
                        || evicted.load(Ordering::Relaxed) < want_evicted)
                        && t0.elapsed() < at_most)
                {
                    for p in 0..pages {
                        let i = p * 512 + w + writers * (round % 8);
                        let v = (w << 32) | (round + 1);
                        pr.word(i).unwrap().store(v, Ordering::Relaxed);
                        assert_eq!(pr.word(i).unwrap().load(Ordering::Relaxed), v);
                    }
                    round += 1;
                }
                round
            })
        })
        .collect();
    let movers: Vec<_> = (0..2u64)
        .map(|m| {
            let (mm, pr, start, stop) = (mm.clone(), pr.clone(), start.clone(), stop.clone());
            let (moved, evicted) = (moved.clone(), evicted.clone());
            let (pagemaps, evict_every) = (s.pagemaps, s.evict_every);
            std::thread::spawn(move || {
                start.wait();
                let d = MigrateDetails::default();
                let mut k = m;
                while !stop.load(Ordering::Relaxed) {
                    let half = pr.len() / 2;
                    let target = match k % 3 {
                        0 => pr.range(),
                        1 => VaRange::new(pr.range().start, half),
                        _ => VaRange::new(pr.range().start + half, half),
                    };
                    if let Ok(rep) = mm.migrate(target, PagemapId((k % pagemaps) as u8), &d)
                        && let Some(a) = rep.alloc
                    {
                        moved.fetch_add(1, Ordering::Relaxed);
                        if k % evict_every == 1 && mm.evict_to_ram(a).is_ok() {
                            evicted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    k += 1;
                }
            })
        })
        .collect();
    let done: Vec<u64> = writer_threads
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    stop.store(true, Ordering::Relaxed);
    for t in movers {
        t.join().unwrap();
    }
    // The model: every writer's last store of each of its 8 slots per page.
    for w in 0..writers {
        for slot in 0..8u64 {
            let last = (0..done[w as usize]).rev().find(|r| r % 8 == slot).unwrap();
            for p in 0..pages {
                let i = p * 512 + w + writers * slot;
                let want = (w << 32) | (last + 1);
                assert_eq!(
                    pr.word(i).unwrap().load(Ordering::Relaxed),
                    want,
                    "page {p} word {i}"
                );
                let mut b = [0u8; 8];
                mm.read(pr.range().start + i * 8, &mut b).unwrap();
                assert_eq!(u64::from_le_bytes(b), want, "page {p} word {i} (explicit)");
            }
        }
    }
    (
        moved.load(Ordering::Relaxed),
        evicted.load(Ordering::Relaxed),
    )
}
