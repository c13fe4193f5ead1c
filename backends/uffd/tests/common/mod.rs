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
