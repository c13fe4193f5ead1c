//! Pointer ranges on the CUDA backend: its host memory a memfd registered with
//! `cuMemHostRegister` (`cuda.host_memfd=1`), mapped at the range's addresses. CPU stores
//! through the pointer are migrated by GPU copies and come back intact; a GPU-resident page
//! loaded by the CPU faults home; the CPU-fault round trip is measured against the explicit
//! read.
//!
//! Each test probes at run time: without a CUDA driver and GPU, or without a usable
//! userfaultfd, the binary prints one `skipped: <reason>` line and every test passes.

use drm_pagemap_core::{
    AddressSpace, Backend, DeviceId, MigrateDetails, PageLocation, PageSize, PagemapId, PagemapSpec,
};
use drm_pagemap_cuda::{CudaBackend, CudaConfig};
use drm_pagemap_uffd::{CudaHostFile, PointerRange, PointerSpace, UffdConfig, UffdError};
use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Once, RwLock};
use std::time::{Duration, Instant};

const GIB: u64 = 1 << 30;

/// Prints the one skip line of this binary.
fn skip(reason: &str) {
    static SKIP: Once = Once::new();
    SKIP.call_once(|| {
        // Straight to stdout: the test harness captures print!, not the raw handle.
        let _ = writeln!(std::io::stdout(), "skipped: {reason}");
    });
}

/// The figures test runs alone (timings), the others share the GPU.
static GPU: RwLock<()> = RwLock::new(());

struct Rig {
    // Field order is drop order: the space (its handler) before the address space and the
    // backend.
    space: Arc<PointerSpace>,
    mm: Arc<AddressSpace>,
    backend: Arc<CudaBackend>,
}

fn config() -> CudaConfig {
    CudaConfig {
        host_memfd: true,
        host_capacity: GIB,
        device_capacity: Some(4 * GIB),
        // The environment's settings (`DRM_PAGEMAP_CUDA_KERNEL=ptx`, `_VMM=0`, ...), the one
        // place these tests read them.
        ..CudaConfig::from_env().expect("DRM_PAGEMAP_CUDA_* variables parse")
    }
}

/// A CUDA backend with memfd host memory, `pagemaps` pagemaps on device 0 and a pointer
/// space on it; `None` (after the skip line) without a GPU or a usable userfaultfd.
fn rig(pagemaps: u8) -> Option<Rig> {
    let cfg = config();
    if let Err(reason) = drm_pagemap_cuda::probe_with(&cfg) {
        skip(&reason);
        return None;
    }
    let backend = Arc::new(CudaBackend::new(cfg).expect("open cuda with cuda.host_memfd=1"));
    let mm = Arc::new(AddressSpace::new(backend.host_memory()));
    for k in 0..pagemaps {
        let pm = backend
            .create_pagemap(&PagemapSpec {
                id: PagemapId(k),
                device: DeviceId(0),
                owner: None,
                capacity_bytes: GIB,
            })
            .expect("create pagemap");
        mm.add_pagemap(pm).unwrap();
    }
    let file = CudaHostFile::new(backend.pinned_host().clone()).expect("memfd host memory");
    let space = PointerSpace::new(mm.clone(), file, UffdConfig::default()).unwrap();
    match space.create_range(4096, PageSize::Size4K) {
        Ok(_) => {}
        Err(e @ (UffdError::Unavailable { .. } | UffdError::MissingFeature { .. })) => {
            skip(&e.to_string());
            return None;
        }
        Err(e) => panic!("{e}"),
    }
    Some(Rig { space, mm, backend })
}

/// Runs `f` on a thread and fails the test if it has not finished within `limit` (a hang of
/// the fault handler would otherwise hang the run).
fn watchdog<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
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

fn on_pagemap(mm: &AddressSpace, va: u64) -> Option<PagemapId> {
    match mm.location(va).unwrap() {
        PageLocation::Device { pagemap, .. } => Some(pagemap),
        _ => None,
    }
}

fn pattern(seed: u64, i: u64) -> u64 {
    (i ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1
}

fn fill(pr: &PointerRange, seed: u64) {
    for i in 0..pr.len() / 8 {
        pr.word(i)
            .unwrap()
            .store(pattern(seed, i), Ordering::Relaxed);
    }
}

/// Checks every word through the pointer (loads that fault device pages home).
fn check(pr: &PointerRange, seed: u64) {
    for i in 0..pr.len() / 8 {
        let got = pr.word(i).unwrap().load(Ordering::Relaxed);
        assert_eq!(got, pattern(seed, i), "word {i} of {:?}", pr.range());
    }
}

/// CPU stores through the pointer; GPU copies take them to pagemap 0 and on to pagemap 1
/// (device to device) while the freed frames are reused with other bytes; loads through the
/// pointer fault every page home from pagemap 1 with the bytes intact. 4 KiB and 2 MiB pages.
#[test]
fn cpu_stores_travel_through_gpu_copies_and_fault_home_intact() {
    let _g = GPU.read().unwrap_or_else(|p| p.into_inner());
    let Some(r) = rig(2) else { return };
    watchdog(Duration::from_secs(120), move || {
        for (ps, len, seed) in [
            (PageSize::Size4K, 256 * 4096u64, 1u64),
            (PageSize::Size2M, 4 << 20, 2),
        ] {
            let pr = r.space.create_range(len, ps).unwrap();
            fill(&pr, seed);
            // The explicit API sees the pointer's stores: the same pinned frames.
            let mut b = [0u8; 8];
            r.mm.read(pr.range().start + 8 * 77, &mut b).unwrap();
            assert_eq!(u64::from_le_bytes(b), pattern(seed, 77));
            let d = MigrateDetails::default();
            r.mm.migrate(pr.range(), PagemapId(0), &d).unwrap();
            for p in (0..len).step_by(ps.bytes() as usize) {
                assert_eq!(on_pagemap(&r.mm, pr.range().start + p), Some(PagemapId(0)));
            }
            // The frames went back to the pool: a second range takes them and writes other
            // bytes, so only the GPU's copy can bring the first range's bytes back.
            let other = r.space.create_range(len, ps).unwrap();
            fill(&other, seed + 100);
            r.mm.migrate(pr.range(), PagemapId(1), &d).unwrap();
            for p in (0..len).step_by(ps.bytes() as usize) {
                assert_eq!(on_pagemap(&r.mm, pr.range().start + p), Some(PagemapId(1)));
            }
            let before = r.space.fault_stats();
            check(&pr, seed);
            let after = r.space.fault_stats();
            assert!(after.served > before.served, "{before:?} -> {after:?}");
            assert_eq!(after.sigbus, 0);
            for p in (0..len).step_by(ps.bytes() as usize) {
                assert_eq!(
                    r.mm.location(pr.range().start + p).unwrap(),
                    PageLocation::System
                );
            }
            check(&other, seed + 100);
            pr.free().unwrap();
            other.free().unwrap();
        }
    });
}

/// A page resident on the GPU, loaded by the CPU, faults home: the load returns the stored
/// value, the page is a system page afterwards, the handler served the fault. A store after
/// that reaches the GPU on the next migration. Pinned memory stays allocated in the memfd
/// while the pages live on the GPU (a registered page cannot be punched out).
#[test]
fn a_gpu_resident_page_loaded_by_the_cpu_faults_home() {
    let _g = GPU.read().unwrap_or_else(|p| p.into_inner());
    let Some(r) = rig(1) else { return };
    watchdog(Duration::from_secs(60), move || {
        let pages = 16u64;
        let pr = r
            .space
            .create_range(pages * 4096, PageSize::Size4K)
            .unwrap();
        fill(&pr, 7);
        let host = r.backend.pinned_host();
        let pinned = host.memfd_allocated_bytes().expect("memfd host memory");
        assert!(pinned >= pages * 4096, "{pinned}");
        let d = MigrateDetails::default();
        r.mm.migrate(pr.range(), PagemapId(0), &d).unwrap();
        let va = pr.range().start + 5 * 4096;
        assert_eq!(on_pagemap(&r.mm, va), Some(PagemapId(0)));
        assert_eq!(
            host.memfd_allocated_bytes(),
            Some(pinned),
            "registered memory stays while the pages live on the GPU"
        );
        let before = r.space.fault_stats();
        let w = 5 * 512 + 3;
        assert_eq!(pr.word(w).unwrap().load(Ordering::Relaxed), pattern(7, w));
        let after = r.space.fault_stats();
        assert!(after.served > before.served, "{before:?} -> {after:?}");
        assert_eq!(r.mm.location(va).unwrap(), PageLocation::System);
        // A store after the fault goes to the GPU with the next migration (of that page: the
        // others are still there, and a migration refuses to split their allocation) and back
        // through the explicit read.
        pr.word(w).unwrap().store(0xfeed_f00d, Ordering::Relaxed);
        r.mm.migrate(drm_pagemap_core::VaRange::new(va, 4096), PagemapId(0), &d)
            .unwrap();
        assert_eq!(on_pagemap(&r.mm, va), Some(PagemapId(0)));
        let mut b = [0u8; 8];
        r.mm.read(va + 3 * 8, &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), 0xfeed_f00d);
        pr.free().unwrap();
        assert_eq!(
            r.space.range_count(),
            0,
            "the probe's range and this one are freed"
        );
    });
}

/// The backend's host memory without `cuda.host_memfd` cannot be a frame file: a typed
/// error naming the option.
#[test]
fn host_memory_without_the_option_is_refused() {
    let _g = GPU.read().unwrap_or_else(|p| p.into_inner());
    let cfg = CudaConfig {
        host_memfd: false,
        ..config()
    };
    if let Err(reason) = drm_pagemap_cuda::probe_with(&cfg) {
        skip(&reason);
        return;
    }
    let backend = CudaBackend::new(cfg).expect("open cuda");
    assert!(backend.pinned_host().memfd().is_none());
    let e = CudaHostFile::new(backend.pinned_host().clone()).unwrap_err();
    assert!(
        matches!(e, UffdError::Unsupported { .. }) && e.to_string().contains("cuda.host_memfd"),
        "{e}"
    );
}

/// The CPU-fault round trip through the pointer against the explicit read, for a 4 KiB and
/// a 2 MiB window (a range of one page of that size), printed as a table. Asserts the bytes.
#[test]
fn fault_round_trip_figures() {
    let _g = GPU.write().unwrap_or_else(|p| p.into_inner());
    let Some(r) = rig(1) else { return };
    let rows = watchdog(Duration::from_secs(300), move || {
        let mut rows = Vec::new();
        for (ps, len, n) in [
            (PageSize::Size4K, 4096u64, 200u32),
            (PageSize::Size2M, 2 << 20, 20),
        ] {
            let pr = r.space.create_range(len, ps).unwrap();
            fill(&pr, 3);
            let d = MigrateDetails::default();
            let last = len / 8 - 1;
            let (mut fault, mut explicit) = (Duration::ZERO, Duration::ZERO);
            let mut buf = vec![0u8; len as usize];
            // One warm-up round (first faults, kernel loading), not counted.
            for i in 0..=n {
                r.mm.migrate(pr.range(), PagemapId(0), &d).unwrap();
                assert_eq!(on_pagemap(&r.mm, pr.range().start), Some(PagemapId(0)));
                let t = Instant::now();
                let v = pr.word(last).unwrap().load(Ordering::Relaxed);
                let f = t.elapsed();
                assert_eq!(v, pattern(3, last));
                r.mm.migrate(pr.range(), PagemapId(0), &d).unwrap();
                let t = Instant::now();
                r.mm.read(pr.range().start, &mut buf).unwrap();
                let e = t.elapsed();
                assert_eq!(buf[..8], pattern(3, 0).to_le_bytes());
                if i > 0 {
                    fault += f;
                    explicit += e;
                }
            }
            rows.push((len, n, fault / n, explicit / n));
            pr.free().unwrap();
        }
        rows
    });
    let mut out = std::io::stdout();
    let _ = writeln!(
        out,
        "cuda CPU-fault round trip (device -> system), mean per round:\n\
         | window | pointer load (uffd fault) | explicit read | rounds |\n\
         |---|---|---|---|"
    );
    for (len, n, fault, explicit) in rows {
        let _ = writeln!(
            out,
            "| {} | {:.1} us ({:.2} GB/s) | {:.1} us ({:.2} GB/s) | {n} |",
            if len == 4096 { "4 KiB" } else { "2 MiB" },
            fault.as_secs_f64() * 1e6,
            len as f64 / fault.as_secs_f64() / 1e9,
            explicit.as_secs_f64() * 1e6,
            len as f64 / explicit.as_secs_f64() / 1e9,
        );
    }
}
