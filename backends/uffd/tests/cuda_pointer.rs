//! Pointer ranges on the CUDA backend: its host memory a memfd registered with
//! `cuMemHostRegister` (`cuda.host_memfd=1`), mapped at the range's addresses. CPU stores
//! through the pointer are migrated by GPU copies and come back intact; a GPU-resident page
//! loaded by the CPU faults home; the CPU-fault round trip is measured against the explicit
//! read and against CUDA managed memory's CPU-fault migration; many threads load and store
//! through the pointer while the GPU pagemaps push the pages to each other and evict them.
//!
//! Each test probes at run time: without a CUDA driver and GPU, or without a usable
//! userfaultfd, the binary prints one `skipped: <reason>` line and every test passes.

use cudarc::driver::sys;
use drm_pagemap_core::{
    AddressSpace, Backend, DeviceId, MigrateDetails, PageLocation, PageSize, PagemapId,
    PagemapSpec, VaRange,
};
use drm_pagemap_cuda::{CudaBackend, CudaConfig};
use drm_pagemap_uffd::{CudaHostFile, PointerRange, PointerSpace, UffdConfig, UffdError};
use std::io::Write;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Once, RwLock};
use std::time::{Duration, Instant};

mod common;
use common::watchdog;

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

/// CUDA managed memory (`cuMemAllocManaged`) on GPU 0: the baseline of the figures test.
/// Its pages are prefetched to the GPU, then read by the CPU, which faults them back (the
/// driver's CPU-fault migration).
struct Managed {
    ptr: u64,
    len: usize,
}

/// Panics with the call's name on a driver error (the baseline has no recovery).
fn ck(call: &str, r: sys::CUresult) {
    assert_eq!(r, sys::CUresult::CUDA_SUCCESS, "{call}");
}

impl Managed {
    /// `len` bytes of managed memory on GPU 0's primary context (the one the backend uses),
    /// made current on this thread.
    fn new(len: usize) -> Managed {
        let mut ptr = 0u64;
        // SAFETY: plain driver calls with valid out-pointers; the backend already
        // initialised the driver (cuInit is idempotent); the primary context is retained
        // for the process by the backend and here once more (never released: a test).
        unsafe {
            ck("cuInit", sys::cuInit(0));
            let mut dev = 0;
            ck("cuDeviceGet", sys::cuDeviceGet(&mut dev, 0));
            let mut ctx = std::ptr::null_mut();
            ck(
                "cuDevicePrimaryCtxRetain",
                sys::cuDevicePrimaryCtxRetain(&mut ctx, dev),
            );
            ck("cuCtxSetCurrent", sys::cuCtxSetCurrent(ctx));
            ck(
                "cuMemAllocManaged",
                sys::cuMemAllocManaged(
                    &mut ptr,
                    len,
                    sys::CUmemAttach_flags::CU_MEM_ATTACH_GLOBAL as u32,
                ),
            );
        }
        Managed { ptr, len }
    }

    /// The memory as bytes (the CPU reaches managed memory through its address).
    fn bytes(&self) -> &[u8] {
        // SAFETY: a managed allocation of `len` bytes, alive while `self` is; no kernel
        // writes it (prefetches are synchronised before the CPU reads).
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }

    /// The memory as bytes to write.
    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as `bytes`, and `&mut self` makes this the only slice.
        unsafe { std::slice::from_raw_parts_mut(self.ptr as *mut u8, self.len) }
    }

    /// Moves every page to GPU 0 and waits.
    fn to_gpu(&self) {
        let loc = sys::CUmemLocation {
            type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
            id: 0,
        };
        // SAFETY: the allocation is managed and `len` bytes long; the null stream is the
        // current context's, synchronised before returning.
        unsafe {
            ck(
                "cuMemPrefetchAsync",
                sys::cuMemPrefetchAsync_v2(self.ptr, self.len, loc, 0, std::ptr::null_mut()),
            );
            ck(
                "cuStreamSynchronize",
                sys::cuStreamSynchronize(std::ptr::null_mut()),
            );
        }
    }
}

impl Drop for Managed {
    fn drop(&mut self) {
        // SAFETY: allocated by cuMemAllocManaged, freed once; nothing uses it any more.
        let _ = unsafe { sys::cuMemFree_v2(self.ptr) };
    }
}

/// One row of the figures test: mean times per round.
struct FigureRow {
    len: u64,
    rounds: u32,
    /// The load of one word through the pointer (faults the page home).
    fault: Duration,
    /// `AddressSpace::read` of the whole window.
    explicit: Duration,
    /// A `memcpy` of the whole window out of the pointer (faults included).
    pointer_copy: Duration,
    /// The load of the window's last word of managed memory prefetched to the GPU.
    managed_load: Duration,
    /// A `memcpy` of the whole window out of managed memory prefetched to the GPU.
    managed_copy: Duration,
}

/// The CPU-fault round trip through the pointer against the explicit read and against CUDA
/// managed memory's CPU-fault migration on the same GPU, for a 4 KiB and a 2 MiB window (a
/// range of one page of that size; managed memory of the same size), printed as a table.
/// Asserts the bytes.
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
            let mut managed = Managed::new(len as usize);
            for (i, b) in managed.bytes_mut().iter_mut().enumerate() {
                *b = (i % 251) as u8;
            }
            let d = MigrateDetails::default();
            let last = len / 8 - 1;
            let mut row = FigureRow {
                len,
                rounds: n,
                fault: Duration::ZERO,
                explicit: Duration::ZERO,
                pointer_copy: Duration::ZERO,
                managed_load: Duration::ZERO,
                managed_copy: Duration::ZERO,
            };
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
                r.mm.migrate(pr.range(), PagemapId(0), &d).unwrap();
                buf.fill(0);
                let t = Instant::now();
                // SAFETY: the range's mapping is `len` bytes from `as_ptr()` and lives while
                // `pr` does; `buf` is a separate buffer of `len` bytes.
                unsafe {
                    std::ptr::copy_nonoverlapping(pr.as_ptr(), buf.as_mut_ptr(), len as usize)
                };
                let pc = t.elapsed();
                assert_eq!(buf[(last * 8) as usize..], pattern(3, last).to_le_bytes());
                managed.to_gpu();
                let t = Instant::now();
                // SAFETY: the managed allocation is `len` bytes; a volatile load so that the
                // access is not elided.
                let m = unsafe { std::ptr::read_volatile((managed.ptr + last * 8) as *const u64) };
                let ml = t.elapsed();
                assert_eq!(m.to_le_bytes()[0], ((last * 8) % 251) as u8);
                managed.to_gpu();
                let t = Instant::now();
                buf.copy_from_slice(managed.bytes());
                let mc = t.elapsed();
                assert_eq!(buf[4095], (4095 % 251) as u8);
                if i > 0 {
                    row.fault += f;
                    row.explicit += e;
                    row.pointer_copy += pc;
                    row.managed_load += ml;
                    row.managed_copy += mc;
                }
            }
            for t in [
                &mut row.fault,
                &mut row.explicit,
                &mut row.pointer_copy,
                &mut row.managed_load,
                &mut row.managed_copy,
            ] {
                *t /= n;
            }
            rows.push(row);
            pr.free().unwrap();
        }
        rows
    });
    let mut out = std::io::stdout();
    let _ = writeln!(
        out,
        "cuda CPU-fault round trip (device -> system), mean per round:\n\
         | window | pointer load (uffd fault) | explicit read | memcpy through the pointer | \
         managed memory: one load | managed memory: memcpy | rounds |\n\
         |---|---|---|---|---|---|---|"
    );
    let cell = |len: u64, t: Duration| {
        format!(
            "{:.1} us ({:.2} GB/s)",
            t.as_secs_f64() * 1e6,
            len as f64 / t.as_secs_f64() / 1e9
        )
    };
    for row in rows {
        let len = row.len;
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} |",
            if len == 4096 { "4 KiB" } else { "2 MiB" },
            cell(len, row.fault),
            cell(len, row.explicit),
            cell(len, row.pointer_copy),
            cell(len, row.managed_load),
            cell(len, row.managed_copy),
            row.rounds,
        );
    }
}

/// Many threads store and load through the pointer while other threads migrate the range
/// (whole and halves) between three GPU pagemaps (pagemap to pagemap: the sources push) and
/// evict it: every writer's last store of every word it owns is what the pointer and the
/// explicit read return at the end (an exact model, `common::store_load_while_moving`), no
/// fault fails, and a watchdog bounds the run.
#[test]
fn threads_through_the_pointer_while_gpu_pagemaps_push_and_evict() {
    let _g = GPU.read().unwrap_or_else(|p| p.into_inner());
    let Some(r) = rig(3) else { return };
    watchdog(Duration::from_secs(180), move || {
        let pr = Arc::new(r.space.create_range(64 * 4096, PageSize::Size4K).unwrap());
        let stress = common::Stress {
            pagemaps: 3,
            rounds: 1000,
            want_moved: 200,
            want_evicted: 10,
            at_most: Duration::from_secs(60),
            evict_every: 5,
        };
        let (moved, evicted) = common::store_load_while_moving(&r.mm, &pr, &stress);
        let stats = r.space.fault_stats();
        let _ = writeln!(
            std::io::stdout(),
            "{moved} migrations, {evicted} evictions, {} faults served",
            stats.served
        );
        assert!(
            moved >= 20 && evicted >= 2 && stats.served >= 10,
            "{moved} {evicted} {stats:?}"
        );
        assert_eq!(stats.errors, 0, "{:?}", r.space.last_fault_error());
        assert_eq!(stats.sigbus, 0);
    });
}

/// The `migrate` tool's pointer workload on CUDA: 128 MiB of 4 KiB pages filled through the
/// pointer, laid out in runs of 16 pages over system memory and pagemaps 1 and 2, migrated
/// to pagemap 0 with background release, loaded back through the pointer. The memory is as
/// tight as the tool's (host 2.5x the range, each pagemap the range plus 64 MiB). A monitor
/// prints the pointer space's last fault error while a fault is retried (a fault the engine
/// cannot serve would otherwise end the process with SIGBUS and no word).
#[test]
fn the_migrate_tools_pointer_workload_on_cuda() {
    let _g = GPU.write().unwrap_or_else(|p| p.into_inner());
    let bytes = 128u64 << 20;
    let cfg = CudaConfig {
        host_capacity: 2 * bytes + (64 << 20),
        device_capacity: None,
        ..config()
    };
    if let Err(reason) = drm_pagemap_cuda::probe_with(&cfg) {
        skip(&reason);
        return;
    }
    let backend = Arc::new(CudaBackend::new(cfg).expect("open cuda"));
    let mm = Arc::new(AddressSpace::new(backend.host_memory()));
    for k in 0..3u8 {
        let pm = backend
            .create_pagemap(&PagemapSpec {
                id: PagemapId(k),
                device: DeviceId(0),
                owner: None,
                capacity_bytes: bytes + (64 << 20),
            })
            .expect("create pagemap");
        mm.add_pagemap(pm).unwrap();
    }
    let file = CudaHostFile::new(backend.pinned_host().clone()).unwrap();
    let space = PointerSpace::new(
        mm.clone(),
        file,
        UffdConfig {
            fault_retry: Some(Duration::from_secs(20)),
            ..UffdConfig::default()
        },
    )
    .unwrap();
    let pr = match space.create_range(bytes, PageSize::Size4K) {
        Ok(pr) => pr,
        Err(e @ (UffdError::Unavailable { .. } | UffdError::MissingFeature { .. })) => {
            skip(&e.to_string());
            return;
        }
        Err(e) => panic!("{e}"),
    };
    // The memfd host memory places frames: the range is one mapping of its home extent.
    assert!(
        pr.coalesced(),
        "a CUDA pointer range over the memfd is coalesced"
    );
    let done = Arc::new(AtomicBool::new(false));
    let monitor = {
        let (space, done) = (space.clone(), done.clone());
        std::thread::spawn(move || {
            let mut last = None;
            while !done.load(Ordering::Relaxed) {
                let e = space.last_fault_error();
                if e.is_some() && e != last {
                    let _ = writeln!(
                        std::io::stdout(),
                        "fault error: {e:?} ({:?})",
                        space.fault_stats()
                    );
                    last = e;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let step = |what: &str| {
        let _ = writeln!(std::io::stdout(), "step: {what}");
    };
    step("fill");
    fill(&pr, 9);
    let d = MigrateDetails::default();
    let run = 16 * 4096u64;
    step("layout");
    for (i, start) in (0..bytes).step_by(run as usize).enumerate() {
        let k = (i % 3) as u8;
        if k != 0 {
            mm.migrate(
                VaRange::new(pr.range().start + start, run),
                PagemapId(k),
                &d,
            )
            .unwrap();
        }
    }
    step("migrate");
    mm.set_release_mode(drm_pagemap_core::ReleaseMode::background());
    mm.migrate(pr.range(), PagemapId(0), &d).unwrap();
    mm.flush_releases();
    step("check");
    check(&pr, 9);
    done.store(true, Ordering::Relaxed);
    monitor.join().unwrap();
    let stats = space.fault_stats();
    assert_eq!(stats.errors, 0, "{:?}", space.last_fault_error());
    assert_eq!(stats.sigbus, 0);
    pr.free().unwrap();
}
