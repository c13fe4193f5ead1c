//! GPU tests of the ring of small copies (option `cuda.ring`). Each probes at run time:
//! without a driver or GPU the binary prints one "skipped: <reason>" line and every test
//! passes; where the pagemap has no ring (no 64-bit stream memory operations) likewise
//! "skipped: ring: <reason>". gpu-run.sh also runs them with the fallback PTX's kernel.
//!
//! They check real outcomes: bytes through the ring in both directions read back through the
//! stream path (calls of more than 64 entries never take the ring), the ring's counter,
//! submission order between ring and stream copies, fence timeouts, a drop while copies are
//! in flight, the kernel's idle stop and implicitly synchronising driver calls.

use cudarc::driver::sys;
use drm_pagemap_core::*;
use drm_pagemap_cuda::{CudaBackend, CudaConfig, CudaPagemap};
use std::io::Write;
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

const GIB: u64 = 1 << 30;
const RING_IDLE: Duration = Duration::from_millis(2);

fn env_config() -> CudaConfig {
    CudaConfig::from_env().expect("DRM_PAGEMAP_CUDA_* variables parse")
}

static SKIP: Once = Once::new();

fn skip(reason: &str) {
    SKIP.call_once(|| {
        let _ = writeln!(std::io::stdout(), "skipped: {reason}");
    });
}

/// Tests that time driver calls run alone.
static GPU: std::sync::RwLock<()> = std::sync::RwLock::new(());

struct Rig {
    backend: Arc<CudaBackend>,
    pm: Arc<CudaPagemap>,
}

/// A backend with the ring on and one pagemap, or `None` (skipped: no GPU, no ring).
fn rig() -> Option<Rig> {
    let cfg = CudaConfig {
        device_capacity: Some(4 * GIB),
        host_capacity: 2 * GIB,
        ring: true,
        ring_idle: RING_IDLE,
        ..env_config()
    };
    if let Err(reason) = drm_pagemap_cuda::probe_with(&cfg) {
        skip(&reason);
        return None;
    }
    let backend = Arc::new(CudaBackend::new(cfg).expect("open cuda"));
    backend
        .create_pagemap(&PagemapSpec {
            id: PagemapId(0),
            device: DeviceId(0),
            owner: None,
            capacity_bytes: GIB,
        })
        .expect("create pagemap");
    let pm = backend.cuda_pagemap(PagemapId(0)).unwrap();
    if let Err(why) = pm.ring_status() {
        skip(&format!("ring: {why}"));
        return None;
    }
    Some(Rig { backend, pm })
}

fn pattern(seed: u64, page: u64, bytes: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(bytes as usize);
    for w in 0..bytes / 8 {
        let x = (seed << 48) ^ (page << 24) ^ w ^ 0x3c3c_0000_0000_0000;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v
}

/// `n` host frames holding pattern `seed` (or zeros for `None`), mapped for device 0 (an
/// address computation on CUDA: the same address serves either direction).
fn frames(r: &Rig, n: usize, ps: PageSize, seed: Option<u64>) -> (Vec<HostFrame>, Vec<DmaAddr>) {
    let host = r.backend.pinned_host();
    let mut frames = vec![HostFrame(0); n];
    host.alloc_frames(ps, &mut frames).unwrap();
    for (k, &f) in frames.iter().enumerate() {
        let bytes = match seed {
            Some(s) => pattern(s, k as u64, ps.bytes()),
            None => vec![0; ps.bytes() as usize],
        };
        host.write(f, 0, &bytes).expect("host memory");
    }
    let mut addrs = vec![DmaAddr::NONE; n];
    host.map_frames(DeviceId(0), &frames, ps, Direction::ToDevice, &mut addrs)
        .unwrap();
    (frames, addrs)
}

/// `n` scattered device pages (one allocation, pfns reversed).
fn pages(r: &Rig, n: usize, ps: PageSize) -> (DevmemBacking, Vec<Pfn>) {
    let a = r.pm.allocate(n, ps).unwrap();
    a.wait_ready().unwrap();
    let mut pfns = vec![Pfn(0); n];
    r.pm.populate_devmem_pfn(&a, &mut pfns).unwrap();
    pfns.reverse();
    (a, pfns)
}

fn copy(
    r: &Rig,
    to_own: bool,
    pfns: &[Pfn],
    addrs: &[DmaAddr],
    ps: PageSize,
    pre: Option<&Fence>,
) -> Fence {
    let req = CopyRequest {
        page_size: ps,
        pages: pfns,
        addrs,
        pre_fence: pre,
    };
    if to_own {
        r.pm.copy_to_devmem(&req).unwrap()
    } else {
        r.pm.copy_to_ram(&req).unwrap()
    }
}

/// The call padded to 65 entries with holes: never the ring.
fn stream_copy(
    r: &Rig,
    to_own: bool,
    pfns: &[Pfn],
    addrs: &[DmaAddr],
    ps: PageSize,
    pre: Option<&Fence>,
) -> Fence {
    let mut p = pfns.to_vec();
    let mut a = addrs.to_vec();
    p.resize(65, pfns[0]);
    a.resize(65, DmaAddr::NONE);
    copy(r, to_own, &p, &a, ps, pre)
}

fn read(r: &Rig, f: HostFrame, ps: PageSize) -> Vec<u8> {
    let mut b = vec![0u8; ps.bytes() as usize];
    r.backend
        .pinned_host()
        .read(f, 0, &mut b)
        .expect("host memory");
    b
}

/// The pages' bytes through the stream path.
fn read_back(r: &Rig, pfns: &[Pfn], ps: PageSize) -> Vec<Vec<u8>> {
    let (fr, addrs) = frames(r, pfns.len(), ps, None);
    let before = r.pm.stats().ring_copies;
    stream_copy(r, false, pfns, &addrs, ps, None)
        .wait()
        .unwrap();
    assert_eq!(
        r.pm.stats().ring_copies,
        before,
        "the read-back took the stream"
    );
    let out = fr.iter().map(|&f| read(r, f, ps)).collect();
    r.backend.pinned_host().free_frames(&fr, ps);
    out
}

#[test]
fn ring_copies_round_trip_1_to_64_entries_both_directions() {
    let _g = GPU.read().unwrap_or_else(|p| p.into_inner());
    let Some(r) = rig() else { return };
    let mut seed = 1;
    for (ps, max) in [(PageSize::Size4K, 64), (PageSize::Size64K, 16)] {
        for n in [1, 2, 3, 7, 16, 33, 64].into_iter().filter(|&n| n <= max) {
            seed += 1;
            let (a, pfns) = pages(&r, n, ps);
            let (src, addrs) = frames(&r, n, ps, Some(seed));
            let before = r.pm.stats().ring_copies;
            copy(&r, true, &pfns, &addrs, ps, None).wait().unwrap();
            assert_eq!(
                r.pm.stats().ring_copies,
                before + 1,
                "{ps} x{n}: took the ring"
            );
            for (k, b) in read_back(&r, &pfns, ps).iter().enumerate() {
                assert!(
                    *b == pattern(seed, k as u64, ps.bytes()),
                    "{ps} x{n}: page {k} to device"
                );
            }
            // And back out through the ring into zeroed frames.
            let (dst, daddrs) = frames(&r, n, ps, None);
            copy(&r, false, &pfns, &daddrs, ps, None).wait().unwrap();
            assert_eq!(
                r.pm.stats().ring_copies,
                before + 2,
                "{ps} x{n}: back through the ring"
            );
            for (k, &f) in dst.iter().enumerate() {
                assert!(
                    read(&r, f, ps) == pattern(seed, k as u64, ps.bytes()),
                    "{ps} x{n}: page {k} to ram"
                );
            }
            let host = r.backend.pinned_host();
            host.free_frames(&src, ps);
            host.free_frames(&dst, ps);
            r.pm.devmem_release(a);
        }
    }
    println!("ring copies: {}", r.pm.stats().ring_copies);
}

#[test]
fn many_threads_submitting_keep_each_threads_order() {
    let _g = GPU.read().unwrap_or_else(|p| p.into_inner());
    let Some(r) = rig() else { return };
    let r = Arc::new(r);
    let ps = PageSize::Size4K;
    let threads = 8;
    let rounds = 150u64;
    let hs: Vec<_> = (0..threads)
        .map(|t| {
            let r = r.clone();
            std::thread::spawn(move || {
                let (a, pfns) = pages(&r, 16, ps);
                // Each round's source: its own frames; the pages end with the last round's.
                let mut keep = Vec::new();
                let mut last = None;
                for k in 0..rounds {
                    let seed = (t as u64) << 16 | k;
                    let (fr, addrs) = frames(&r, 16, ps, Some(seed));
                    last = Some(copy(&r, true, &pfns, &addrs, ps, None));
                    keep.push(fr);
                }
                last.unwrap().wait().unwrap();
                (a, pfns, keep, (t as u64) << 16 | (rounds - 1))
            })
        })
        .collect();
    let host = r.backend.pinned_host();
    // Every thread done before any read-back (which checks that it took the stream: no
    // other thread may submit meanwhile).
    let done: Vec<_> = hs.into_iter().map(|h| h.join().unwrap()).collect();
    for (a, pfns, keep, seed) in done {
        for (k, b) in read_back(&r, &pfns, ps).iter().enumerate() {
            assert!(
                *b == pattern(seed, k as u64, ps.bytes()),
                "page {k}: the last round's bytes"
            );
        }
        for fr in keep {
            host.free_frames(&fr, ps);
        }
        r.pm.devmem_release(a);
    }
    let s = r.pm.stats();
    println!(
        "ring copies {} of {} calls",
        s.ring_copies,
        s.copy_to_devmem_calls + s.copy_to_ram_calls
    );
    assert!(s.ring_copies > 0);
}

#[test]
fn a_stream_copy_after_a_ring_copy_runs_after_it() {
    let _g = GPU.read().unwrap_or_else(|p| p.into_inner());
    let Some(r) = rig() else { return };
    let ps = PageSize::Size64K;
    for round in 0..20u64 {
        let (a, pfns) = pages(&r, 16, ps);
        let (src, addrs) = frames(&r, 16, ps, Some(100 + round));
        let (dst, daddrs) = frames(&r, 16, ps, None);
        let before = r.pm.stats();
        let ring = copy(&r, true, &pfns, &addrs, ps, None);
        // Issued at once, not waited: in submission order on the device; the second with
        // the first as its pre-fence on odd rounds (ordered, not a CPU wait).
        let pre = (round % 2 == 1).then_some(&ring);
        let back = stream_copy(&r, false, &pfns, &daddrs, ps, pre);
        back.wait().unwrap();
        let after = r.pm.stats();
        assert_eq!(after.ring_copies, before.ring_copies + 1);
        assert_eq!(
            after.cpu_waits, before.cpu_waits,
            "no host wait for an own ring fence"
        );
        assert_eq!(ring.status(), FenceStatus::Signaled);
        for (k, &f) in dst.iter().enumerate() {
            assert!(
                read(&r, f, ps) == pattern(100 + round, k as u64, ps.bytes()),
                "round {round} page {k}"
            );
        }
        let host = r.backend.pinned_host();
        host.free_frames(&src, ps);
        host.free_frames(&dst, ps);
        r.pm.devmem_release(a);
    }
    // A pagemap fence covers ring copies too.
    let (a, pfns) = pages(&r, 16, ps);
    let (src, addrs) = frames(&r, 16, ps, Some(7));
    let ring = copy(&r, true, &pfns, &addrs, ps, None);
    r.pm.fence().unwrap().wait().unwrap();
    assert_eq!(ring.status(), FenceStatus::Signaled);
    r.backend.pinned_host().free_frames(&src, ps);
    r.pm.devmem_release(a);
}

#[test]
fn ring_fence_wait_times_out_then_signals_and_stays_signalled() {
    let _g = GPU.read().unwrap_or_else(|p| p.into_inner());
    let Some(r) = rig() else { return };
    let ps = PageSize::Size64K;
    let (a, pfns) = pages(&r, 16, ps);
    let (src, addrs) = frames(&r, 16, ps, Some(9));
    // 1 MiB from system memory by one block: tens of microseconds, so a zero wait right
    // after the call finds it pending (tried a few times against preemption).
    let mut timed_out = 0;
    for _ in 0..5 {
        let f = copy(&r, true, &pfns, &addrs, ps, None);
        if f.wait_timeout(Duration::ZERO) == Err(FenceError::Timeout(Duration::ZERO)) {
            timed_out += 1;
        }
        assert_eq!(f.wait_timeout(Duration::from_secs(5)), Ok(()));
        assert_eq!(f.status(), FenceStatus::Signaled);
        assert_eq!(f.wait(), Ok(()));
        assert!(f.native().is_none(), "no native handle");
    }
    assert!(timed_out > 0, "a zero wait never found the copy pending");
    assert_eq!(r.pm.stats().ring_copies, 5);
    r.backend.pinned_host().free_frames(&src, ps);
    r.pm.devmem_release(a);
}

#[test]
fn dropping_the_backend_while_ring_copies_run_is_bounded_and_settles_every_fence() {
    let _g = GPU.read().unwrap_or_else(|p| p.into_inner());
    let Some(r) = rig() else { return };
    let ps = PageSize::Size64K;
    let (a, pfns) = pages(&r, 16, ps);
    let (_src, addrs) = frames(&r, 16, ps, Some(11));
    let fences: Vec<Fence> = (0..48)
        .map(|_| copy(&r, true, &pfns, &addrs, ps, None))
        .collect();
    let pending = fences
        .iter()
        .filter(|f| f.status() == FenceStatus::Pending)
        .count();
    let ring_copies = r.pm.stats().ring_copies;
    let t = Instant::now();
    drop(a);
    drop(r);
    let took = t.elapsed();
    println!("dropped with {pending} of 48 pending ({ring_copies} through the ring) in {took:?}");
    assert!(took < Duration::from_secs(10), "bounded");
    for f in &fences {
        assert!(
            f.status() != FenceStatus::Pending,
            "settled: {:?}",
            f.status()
        );
    }
}

fn ck(what: &str, r: sys::CUresult) {
    assert_eq!(r, sys::CUresult::CUDA_SUCCESS, "{what}");
}

#[test]
fn the_idle_kernel_stops_and_implicitly_synchronising_calls_complete() {
    let _g = GPU.write().unwrap_or_else(|p| p.into_inner());
    let Some(r) = rig() else { return };
    let ps = PageSize::Size4K;
    let (a, pfns) = pages(&r, 16, ps);
    let (src, addrs) = frames(&r, 16, ps, Some(13));
    copy(&r, true, &pfns, &addrs, ps, None).wait().unwrap();
    let (epoch, running) = r.pm.ring_instance().unwrap();
    assert!(epoch >= 1 && running, "an instance runs after a ring copy");
    // Right after a copy the kernel still runs: these calls wait for it to be stopped.
    let t = Instant::now();
    let mut p = 0u64;
    // SAFETY: the test's own allocation in the device's primary context (current: the
    // backend bound it on this thread), freed right away.
    unsafe {
        ck("cuMemAlloc", sys::cuMemAlloc_v2(&mut p, 1 << 20));
        ck("cuMemFree", sys::cuMemFree_v2(p));
        ck("cuCtxSynchronize", sys::cuCtxSynchronize());
    }
    let took = t.elapsed();
    println!("cuMemAlloc + cuMemFree + cuCtxSynchronize right after a ring copy: {took:?}");
    assert!(
        took < Duration::from_secs(1),
        "bounded by the idle stop: {took:?}"
    );
    let t = Instant::now();
    while r.pm.ring_instance().unwrap().1 {
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "the keeper stops the idle kernel"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
    println!("stopped {:?} later (idle stop {RING_IDLE:?})", t.elapsed());
    // The next copy starts a new instance.
    let (src2, addrs2) = frames(&r, 16, ps, Some(14));
    copy(&r, true, &pfns, &addrs2, ps, None).wait().unwrap();
    assert_eq!(r.pm.ring_instance().unwrap().0, epoch + 1, "relaunched");
    for (k, b) in read_back(&r, &pfns, ps).iter().enumerate() {
        assert!(*b == pattern(14, k as u64, ps.bytes()), "page {k}");
    }
    let host = r.backend.pinned_host();
    host.free_frames(&src, ps);
    host.free_frames(&src2, ps);
    r.pm.devmem_release(a);
}

#[test]
fn without_the_option_no_copy_takes_the_ring() {
    let _g = GPU.read().unwrap_or_else(|p| p.into_inner());
    let cfg = CudaConfig {
        device_capacity: Some(4 * GIB),
        host_capacity: GIB,
        ..env_config()
    };
    if let Err(reason) = drm_pagemap_cuda::probe_with(&cfg) {
        skip(&reason);
        return;
    }
    let backend = CudaBackend::new(cfg).unwrap();
    backend
        .create_pagemap(&PagemapSpec {
            id: PagemapId(0),
            device: DeviceId(0),
            owner: None,
            capacity_bytes: GIB,
        })
        .unwrap();
    let pm = backend.cuda_pagemap(PagemapId(0)).unwrap();
    let why = pm.ring_status().unwrap_err();
    assert!(why.contains("cuda.ring"), "{why}");
    assert_eq!(pm.ring_instance(), None);
}
