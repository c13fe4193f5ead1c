//! Shared set-up for the xe-svm tests on the simulated backend.
#![allow(dead_code)]

use drm_pagemap_core::{AddressSpace, Backend, DmaAddr, PageSize, PagemapId, VaRange};
use drm_pagemap_sim::{HOST_MEM, SimBackend, SimConfig};
use drm_pagemap_testkit::inject::FaultInjector;
use drm_pagemap_testkit::mem::arena_addr;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;
use xe_svm::{GpuVm, Placement, Svm, SvmConfig};

pub const K4: u64 = 4 << 10;
pub const K64: u64 = 64 << 10;
pub const M2: u64 = 2 << 20;
/// Where test buffers start (2 MiB aligned).
pub const BASE: u64 = 1 << 32;

pub struct Rig {
    pub sim: Arc<SimBackend>,
    pub mm: Arc<AddressSpace>,
    pub svm: Svm,
    pub vms: Vec<GpuVm>,
}

pub struct Opts {
    pub devices: usize,
    pub device_capacity: u64,
    pub owner_groups: Option<Vec<u32>>,
    pub faults: Option<Arc<FaultInjector>>,
    pub copy_latency: Duration,
    pub svm: SvmConfig,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            devices: 3,
            device_capacity: 256 << 20,
            owner_groups: None,
            faults: None,
            copy_latency: Duration::ZERO,
            svm: SvmConfig::default(),
        }
    }
}

pub fn rig(o: Opts) -> Rig {
    let sim = Arc::new(
        SimBackend::new(SimConfig {
            devices: o.devices,
            device_capacity: o.device_capacity,
            host_capacity: 1 << 30,
            owner_groups: o.owner_groups,
            copy_latency: o.copy_latency,
            resident: false,
            faults: o.faults,
            host_bytes: None,
        })
        .unwrap(),
    );
    let mm = Arc::new(AddressSpace::new(sim.host_memory()));
    let svm = Svm::new(mm.clone(), sim.pagemap_per_device().unwrap(), o.svm).unwrap();
    let vms = (0..o.devices)
        .map(|d| svm.vm(PagemapId(d as u8)).unwrap())
        .collect();
    Rig { sim, mm, svm, vms }
}

pub fn rig_default() -> Rig {
    rig(Opts::default())
}

/// The byte pattern of address `va` with `seed`.
pub fn byte(va: u64, seed: u8) -> u8 {
    ((va >> 12) as u8).wrapping_mul(31) ^ (va as u8) ^ seed
}

pub fn pattern(range: VaRange, seed: u8) -> Vec<u8> {
    (range.start..range.end())
        .map(|va| byte(va, seed))
        .collect()
}

pub fn fill(mm: &AddressSpace, range: VaRange, seed: u8) {
    mm.write(range.start, &pattern(range, seed)).unwrap();
}

/// Reads `range` through the CPU path and compares it with the pattern.
pub fn check(mm: &AddressSpace, range: VaRange, seed: u8) {
    let mut got = vec![0u8; range.len as usize];
    mm.read(range.start, &mut got).unwrap();
    let want = pattern(range, seed);
    if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
        panic!(
            "data lost at {:#x}: got {:#x}, want {:#x}",
            range.start + i as u64,
            got[i],
            want[i]
        );
    }
}

pub fn create(mm: &AddressSpace, range: VaRange, ps: PageSize) {
    mm.create_range(range, ps).unwrap();
}

/// The memory id an address names in the sim's encoding.
pub fn mem_of(addr: DmaAddr) -> u16 {
    arena_addr::decode(addr).0
}

/// Checks the VM's page table for the SVM range at `va`: every entry placed as `want`,
/// system entries point at host memory holding the page's bytes (`seed` pattern), device
/// entries all in one device memory, distinct addresses.
pub fn check_page_table(rig: &Rig, vm: &GpuVm, va: u64, want: Placement, seed: Option<u8>) {
    let host = rig.sim.arena_host().clone();
    vm.with_page_table(va, |pt| {
        let ps = pt.page_size.bytes();
        let mut seen = std::collections::HashSet::new();
        for (i, pte) in pt.ptes.iter().enumerate() {
            assert_eq!(pte.placement, want, "page {i} of {}", pt.range);
            assert!(!pte.addr.is_none(), "page {i} unmapped");
            assert!(seen.insert(pte.addr), "page {i}: address used twice");
            match want {
                Placement::System => {
                    assert_eq!(mem_of(pte.addr), HOST_MEM);
                    if let Some(seed) = seed {
                        let page_va = pt.range.start + i as u64 * ps;
                        let mut b = vec![0u8; ps as usize];
                        host.arena().read(arena_addr::decode(pte.addr).1, &mut b);
                        assert_eq!(
                            b,
                            pattern(VaRange::new(page_va, ps), seed),
                            "page {i} bytes"
                        );
                    }
                }
                _ => assert_ne!(
                    mem_of(pte.addr),
                    HOST_MEM,
                    "page {i} is not in device memory"
                ),
            }
        }
        let mems: std::collections::HashSet<u16> = pt.ptes.iter().map(|p| mem_of(p.addr)).collect();
        assert_eq!(mems.len(), 1, "entries span several memories");
    })
    .expect("the range has a page table");
}

/// Runs `f` on another thread and fails if it does not finish within `limit` (a deadlock).
pub fn watchdog<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let h = std::thread::spawn(move || {
        let r = f();
        let _ = tx.send(());
        r
    });
    match rx.recv_timeout(limit) {
        Ok(()) => h.join().unwrap(),
        Err(mpsc::RecvTimeoutError::Disconnected) => match h.join() {
            Ok(v) => v,
            Err(p) => std::panic::resume_unwind(p),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("no progress within {limit:?}: deadlock"),
    }
}

/// Polls `cond` until it holds (statistics learnt from completion callbacks, which may run
/// on the core's fence worker just after the waiter saw the fence signal); fails after 10 s.
pub fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let t = std::time::Instant::now();
    while !cond() {
        assert!(t.elapsed() < Duration::from_secs(10), "never: {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Where copies read or wrote, as the core's statistics name it.
pub fn loc(pagemap: Option<u8>) -> drm_pagemap_core::stats::Location {
    match pagemap {
        None => drm_pagemap_core::stats::Location::System,
        Some(p) => drm_pagemap_core::stats::Location::Pagemap(p),
    }
}

/// Copy calls the core counted from `from` to `to` (`None`: system memory).
pub fn link_calls(mm: &AddressSpace, from: Option<u8>, to: Option<u8>) -> u64 {
    mm.stats().link(loc(from), loc(to)).calls
}

/// Copy calls the core counted in all.
pub fn all_calls(mm: &AddressSpace) -> u64 {
    mm.stats().links.iter().map(|l| l.calls).sum()
}
