//! xe-svm on the Level Zero backend: the software driver (`ze-soft`) through the real loader,
//! three devices that are peers, 128 MiB of device memory each. Devices take turns faulting
//! on a buffer (every page table placed where the fault wanted it, every byte read back by the
//! CPU), three devices fault at once, and a device whose memory runs out in the driver
//! (`ZE_RESULT_ERROR_OUT_OF_DEVICE_MEMORY`, not an SVM capacity) gets room by LRU eviction.
//! Without a loader every test prints one `skipped: level-zero: <reason>` line.

mod common;

use common::{BASE, M2, check, create, fill, watchdog};
use drm_pagemap_core::{
    AddressSpace, Backend, BackendError, DeviceId, PageSize, Pagemap, PagemapId, PagemapSpec,
    VaRange,
};
use drm_pagemap_level_zero::{LevelZeroBackend, LevelZeroConfig};
use std::sync::{Arc, Mutex, MutexGuard, Once, OnceLock};
use std::time::Duration;
use xe_svm::{Access, FaultAction, GpuVm, Placement, Svm, SvmConfig};

/// Device memory of each software device (two 64 MiB chunks of the backend).
const DEVICE_MEMORY: u64 = 128 << 20;

/// Whether `DRM_PAGEMAP_LEVEL_ZERO_REAL=1` asks for the loader's own drivers (an Intel GPU's).
fn real() -> bool {
    std::env::var_os("DRM_PAGEMAP_LEVEL_ZERO_REAL").is_some_and(|v| v == "1")
}

/// The lock that keeps the other tests out, and the backend on the software driver (one test
/// at a time: the out-of-memory test fills a device), or `None` after printing the skip line
/// once. The guard comes first: bound as `let Some((_guard, b))`, it is dropped after the
/// backend, whose pagemaps hold the driver's device memory until the backend goes (dropped
/// the other way round, the next test could start allocating while a full device 0 was not
/// given back yet, and its faults fell back to system memory).
fn backend() -> Option<(MutexGuard<'static, ()>, LevelZeroBackend)> {
    static LOCK: Mutex<()> = Mutex::new(());
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    static SKIPPED: Once = Once::new();
    let guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let memory = DEVICE_MEMORY.to_string();
    let ready = READY.get_or_init(|| {
        if !real() {
            ze_soft::route_loader_with(&[
                ("ZE_SOFT_DEVICES", "3"),
                ("ZE_SOFT_DEVICE_MEMORY", &memory),
            ])?;
        }
        drm_pagemap_level_zero::probe()
    });
    if let Err(reason) = ready {
        SKIPPED.call_once(|| println!("skipped: level-zero: {reason}"));
        return None;
    }
    let b = LevelZeroBackend::new(LevelZeroConfig {
        devices: Some(3),
        device_capacity: Some(DEVICE_MEMORY),
        ..LevelZeroConfig::default()
    })
    .expect("the probe found the driver");
    Some((guard, b))
}

fn pagemap(b: &LevelZeroBackend, id: u8, device: u32) -> Result<Pagemap, BackendError> {
    b.create_pagemap(&PagemapSpec {
        id: PagemapId(id),
        device: DeviceId(device),
        owner: None,
        capacity_bytes: DEVICE_MEMORY,
    })
}

fn svm_over(b: &LevelZeroBackend, devices: &[u32]) -> (Arc<AddressSpace>, Svm, Vec<GpuVm>) {
    let mm = Arc::new(AddressSpace::new(b.host_memory()));
    // On a machine with fewer devices (real hardware), pagemaps share them.
    let n = b.devices().len() as u32;
    let pms = devices
        .iter()
        .enumerate()
        .map(|(k, &d)| pagemap(b, k as u8, d % n).expect("pagemap"))
        .collect();
    let svm = Svm::new(
        mm.clone(),
        pms,
        SvmConfig {
            capacity: None,
            fence_timeout: Some(Duration::from_secs(30)),
        },
    )
    .expect("svm context");
    let vms = (0..devices.len() as u8)
        .map(|k| svm.vm(PagemapId(k)).expect("gpu vm"))
        .collect();
    (mm, svm, vms)
}

/// Every entry of the page table of the SVM range at `va` is mapped, placed as `want`, and
/// distinct.
fn check_placed(vm: &GpuVm, va: u64, want: Placement) {
    vm.with_page_table(va, |pt| {
        let mut seen = std::collections::HashSet::new();
        for (i, pte) in pt.ptes.iter().enumerate() {
            assert_eq!(pte.placement, want, "page {i} of {}", pt.range);
            assert!(!pte.addr.is_none(), "page {i} of {} unmapped", pt.range);
            assert!(seen.insert(pte.addr), "page {i}: address used twice");
        }
    })
    .expect("the range has a page table");
}

#[test]
fn devices_take_turns_and_every_byte_survives() {
    let Some((_guard, b)) = backend() else { return };
    let (mm, svm, vms) = svm_over(&b, &[0, 1, 2]);
    let buf = VaRange::new(BASE, 8 * M2);
    create(&mm, buf, PageSize::Size4K);
    fill(&mm, buf, 3);
    for round in 0..2 {
        for (k, vm) in vms.iter().enumerate() {
            let access = [Access::Write, Access::Atomic, Access::Read][k];
            for r in 0..8 {
                let va = BASE + r * M2;
                let rep = vm.handle_gpu_fault(va + 4096 * r, access).expect("fault");
                assert!(
                    matches!(
                        rep.action,
                        FaultAction::Migrated { .. } | FaultAction::Mapped
                    ),
                    "round {round}, device {k}, range {r}: {:?}",
                    rep.action
                );
                check_placed(vm, va, Placement::Device(PagemapId(k as u8)));
            }
        }
    }
    let s = mm.stats();
    assert!(
        s.links
            .iter()
            .any(|l| l.from != drm_pagemap_core::stats::Location::System && l.calls > 0),
        "devices pushed their own pages: {s:?}"
    );
    check(&mm, buf, 3);
    assert!(
        mm.allocations().is_empty(),
        "the CPU read brought every page home"
    );
    drop((vms, svm));
    mm.free_range(buf.start).expect("free");
}

#[test]
fn three_devices_fault_at_once() {
    let Some((_guard, b)) = backend() else { return };
    let (mm, svm, vms) = svm_over(&b, &[0, 1, 2]);
    let buf = VaRange::new(BASE, 12 * M2);
    create(&mm, buf, PageSize::Size4K);
    fill(&mm, buf, 9);
    let vms: Vec<Arc<GpuVm>> = vms.into_iter().map(Arc::new).collect();
    watchdog(Duration::from_secs(60), move || {
        let threads: Vec<_> = (0..3)
            .map(|k| {
                let vm = vms[k].clone();
                std::thread::spawn(move || {
                    for step in 0..24u64 {
                        let r = (step * 5 + k as u64) % 12;
                        let rep = vm
                            .handle_gpu_fault(BASE + r * M2, Access::Write)
                            .expect("fault");
                        assert_ne!(rep.action, FaultAction::FellBack, "device {k} step {step}");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("fault thread");
        }
    });
    check(&mm, buf, 9);
    assert_eq!(svm.total_stats().fault_errors, 0);
    drop(svm);
    mm.free_range(buf.start).expect("free");
}

#[test]
fn out_of_device_memory_in_the_driver_evicts_and_retries() {
    if real() {
        println!("skipped: level-zero: needs the software driver's 128 MiB devices");
        return;
    }
    let Some((_guard, b)) = backend() else { return };
    // Two pagemaps of the whole of device 0: their chunks exhaust the device before either
    // pagemap is full, so the allocations that fail are the driver's
    // (ZE_RESULT_ERROR_OUT_OF_DEVICE_MEMORY): xe-svm evicts the least recently used range of
    // the pagemap and retries.
    let (mm, svm, vms) = svm_over(&b, &[0, 0]);
    let ranges = 40u64; // 80 MiB per pagemap: more than its share, less than its capacity.
    let buf = VaRange::new(BASE, 2 * ranges * M2);
    create(&mm, buf, PageSize::Size4K);
    fill(&mm, buf, 5);
    for r in 0..2 * ranges {
        let k = (r % 2) as usize;
        let rep = vms[k]
            .handle_gpu_fault(BASE + r * M2, Access::Write)
            .expect("fault");
        assert!(
            matches!(rep.action, FaultAction::Migrated { .. }),
            "range {r} on pagemap {k}: {:?}",
            rep.action
        );
        check_placed(
            &vms[k],
            BASE + r * M2,
            Placement::Device(PagemapId(k as u8)),
        );
    }
    let s = svm.total_stats();
    assert!(s.lru_evictions.count > 0, "nothing was evicted: {s}");
    assert_eq!(s.fallbacks, 0, "{s}");
    for k in 0..2u8 {
        let m = svm.memory(PagemapId(k)).expect("usage");
        assert!(m.peak <= DEVICE_MEMORY, "{m:?}");
        assert!(m.used < ranges * M2, "pagemap {k} kept every range: {m:?}");
    }
    check(&mm, buf, 5);
    drop((vms, svm));
    mm.free_range(buf.start).expect("free");
    assert!(mm.allocations().is_empty());
}
