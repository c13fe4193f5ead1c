//! GPU tests of the CUDA backend. Each probes at run time: without a driver or GPU the binary
//! prints one "skipped: <reason>" line and every test passes.
//!
//! They check real outcomes: bytes written in system pages, migrated into pagemaps (from
//! system memory and pushed pagemap -> pagemap on one GPU), in scattered layouts and every
//! page size, read back through the CPU path; fence errors; the pre-migrate fence ordering.

use drm_pagemap_core::*;
use drm_pagemap_cuda::{CudaBackend, CudaConfig, CudaPagemap, KernelSource};
use std::io::Write;
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

const GIB: u64 = 1 << 30;

/// The environment's settings (`DRM_PAGEMAP_CUDA_KERNEL=ptx`, `_VMM=0`, `_CLEAR_ON_FREE=0`:
/// gpu-run.sh runs this binary under each), the one place these tests read them.
fn env_config() -> CudaConfig {
    CudaConfig::from_env().expect("DRM_PAGEMAP_CUDA_* variables parse")
}

fn gpu() -> bool {
    static SKIP: Once = Once::new();
    match drm_pagemap_cuda::probe_with(&env_config()) {
        Ok(()) => true,
        Err(reason) => {
            // Straight to stdout: the test harness captures print!, not the raw handle.
            SKIP.call_once(|| {
                let _ = writeln!(std::io::stdout(), "skipped: {reason}");
            });
            false
        }
    }
}

/// Tests that hold a stream (or time one) run alone: while a stream is held, an allocation by
/// another test (an implicit synchronisation point of the device) would wait for it.
static GPU: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn shared() -> std::sync::RwLockReadGuard<'static, ()> {
    GPU.read().unwrap_or_else(|p| p.into_inner())
}

fn alone() -> std::sync::RwLockWriteGuard<'static, ()> {
    GPU.write().unwrap_or_else(|p| p.into_inner())
}

fn config() -> CudaConfig {
    CudaConfig {
        device_capacity: Some(4 * GIB),
        host_capacity: 4 * GIB,
        ..env_config()
    }
}

/// A backend, `n` pagemaps on device 0 (one owner), an address space using them.
struct Rig {
    backend: Arc<CudaBackend>,
    mm: AddressSpace,
    pms: Vec<Arc<CudaPagemap>>,
}

fn rig_with(cfg: CudaConfig, n: usize) -> Rig {
    let backend = Arc::new(CudaBackend::new(cfg).expect("open cuda"));
    let mm = AddressSpace::new(backend.host_memory());
    let mut pms = Vec::new();
    for k in 0..n {
        let pm = backend
            .create_pagemap(&PagemapSpec {
                id: PagemapId(k as u8),
                device: DeviceId(0),
                owner: None,
                capacity_bytes: GIB,
            })
            .expect("create pagemap");
        mm.add_pagemap(pm).unwrap();
        pms.push(backend.cuda_pagemap(PagemapId(k as u8)).unwrap());
    }
    Rig { backend, mm, pms }
}

fn rig(n: usize) -> Rig {
    rig_with(config(), n)
}

/// The content of page `i` of a test range: 64-bit words that name the page and the word.
fn pattern(seed: u64, page: u64, bytes: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(bytes as usize);
    for w in 0..bytes / 8 {
        let x = (seed << 48) ^ (page << 24) ^ w ^ 0x5a5a_0000_0000_0000;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v
}

fn fill(mm: &AddressSpace, base: u64, pages: u64, ps: PageSize, seed: u64) {
    for i in 0..pages {
        mm.write(base + i * ps.bytes(), &pattern(seed, i, ps.bytes()))
            .unwrap();
    }
}

fn verify(mm: &AddressSpace, base: u64, pages: u64, ps: PageSize, seed: u64) {
    let mut buf = vec![0u8; ps.bytes() as usize];
    for i in 0..pages {
        mm.read(base + i * ps.bytes(), &mut buf).unwrap();
        assert!(
            buf == pattern(seed, i, ps.bytes()),
            "page {i} of {pages} ({ps}) differs"
        );
    }
}

/// One character per page of `range`: `s` system, `.` unpopulated, `k` in pagemap k (the
/// layout notation without its `x*n` runs; this crate does not use drm-pagemap-testkit).
fn layout(mm: &AddressSpace, range: VaRange) -> String {
    mm.locations(range)
        .unwrap()
        .into_iter()
        .map(|l| match l {
            PageLocation::Unpopulated => '.',
            PageLocation::System => 's',
            PageLocation::Device { pagemap, .. } => char::from_digit(pagemap.0.into(), 36).unwrap(),
        })
        .collect()
}

fn sizes() -> [PageSize; 3] {
    [PageSize::Size4K, PageSize::Size64K, PageSize::Size2M]
}

#[test]
fn system_pages_migrate_to_a_pagemap_and_read_back() {
    if !gpu() {
        return;
    }
    let _gpu = shared();
    let r = rig(1);
    for (k, ps) in sizes().into_iter().enumerate() {
        let n = if ps == PageSize::Size2M { 8 } else { 64 };
        let base = (k as u64 + 1) << 36;
        let range = VaRange::new(base, n * ps.bytes());
        r.mm.create_range(range, ps).unwrap();
        fill(&r.mm, base, n, ps, 1 + k as u64);
        let rep =
            r.mm.migrate(range, PagemapId(0), &MigrateDetails::default())
                .unwrap();
        assert_eq!(rep.outcome, MigrateOutcome::Migrated);
        assert_eq!(layout(&r.mm, range), "0".repeat(n as usize));
        verify(&r.mm, base, n, ps, 1 + k as u64);
        assert_eq!(
            layout(&r.mm, range),
            "s".repeat(n as usize),
            "the CPU path brought every page home"
        );
    }
    assert!(r.mm.allocations().is_empty());
    let st = r.pms[0].stats();
    assert_eq!(st.allocations, st.releases);
    assert!(st.kernel_launches + st.dma_copies > 0);
}

/// `cuda.host_memfd=1`: the host memory is a memfd registered with `cuMemHostRegister`.
/// Pages written in it migrate to a pagemap (the kernel for 4 KiB pages, DMA for 2 MiB ones),
/// on to a second pagemap, and read back intact; the registered chunks stay allocated in the
/// file while the pages live on the GPU (pinned memory is never punched out).
#[test]
fn memfd_host_memory_round_trips_through_two_pagemaps() {
    if !gpu() {
        return;
    }
    let _gpu = shared();
    let r = rig_with(
        CudaConfig {
            host_memfd: true,
            // Both paths: runs of 4 KiB pages to the kernel, 2 MiB pages to DMA.
            dma_min_host: 2 << 20,
            ..config()
        },
        2,
    );
    let host = r.backend.pinned_host();
    assert!(host.memfd().is_some());
    let d = MigrateDetails::default();
    for (k, ps) in sizes().into_iter().enumerate() {
        let n = if ps == PageSize::Size2M { 8 } else { 64 };
        let base = (k as u64 + 20) << 36;
        let range = VaRange::new(base, n * ps.bytes());
        r.mm.create_range(range, ps).unwrap();
        fill(&r.mm, base, n, ps, 30 + k as u64);
        let backed = host.backed_bytes();
        assert!(backed > 0);
        let in_file = host.memfd_allocated_bytes().unwrap();
        assert!(
            in_file >= backed,
            "{in_file} bytes in the file, {backed} registered"
        );
        r.mm.migrate(range, PagemapId(0), &d).unwrap();
        assert_eq!(layout(&r.mm, range), "0".repeat(n as usize));
        assert_eq!(
            host.memfd_allocated_bytes(),
            Some(in_file),
            "nothing punched"
        );
        r.mm.migrate(range, PagemapId(1), &d).unwrap();
        assert_eq!(layout(&r.mm, range), "1".repeat(n as usize));
        verify(&r.mm, base, n, ps, 30 + k as u64);
        assert_eq!(layout(&r.mm, range), "s".repeat(n as usize));
    }
    assert!(r.mm.allocations().is_empty());
    let st = r.pms[0].stats();
    assert!(st.kernel_launches > 0 && st.dma_copies > 0, "{st:?}");
}

#[test]
fn mixed_layout_is_pushed_by_its_sources_and_reads_back() {
    if !gpu() {
        return;
    }
    let _gpu = shared();
    let r = rig(3);
    let d = MigrateDetails::default();
    for (k, ps) in sizes().into_iter().enumerate() {
        // Layout ss00s11s0 repeated, then everything to pagemap 2.
        let unit = [(2u64, 0u8), (3, 0), (5, 1), (6, 1), (8, 0)];
        let reps = if ps == PageSize::Size2M { 2 } else { 12 };
        let n = 9 * reps;
        let base = (k as u64 + 10) << 36;
        let range = VaRange::new(base, n * ps.bytes());
        r.mm.create_range(range, ps).unwrap();
        fill(&r.mm, base, n, ps, 7 + k as u64);
        for rep in 0..reps {
            for (i, pm) in unit {
                let va = base + (rep * 9 + i) * ps.bytes();
                r.mm.migrate(VaRange::new(va, ps.bytes()), PagemapId(pm), &d)
                    .unwrap();
            }
        }
        assert_eq!(
            layout(&r.mm, VaRange::new(base, 9 * ps.bytes())),
            "ss00s11s0"
        );
        let rep = r.mm.migrate(range, PagemapId(2), &d).unwrap();
        let calls: Vec<_> = rep.calls.iter().map(|c| (c.executor.0, c.op)).collect();
        assert_eq!(
            calls,
            vec![
                (2, CopyOp::ToDevmem),
                (0, CopyOp::ToRam),
                (1, CopyOp::ToRam)
            ],
            "one call per source"
        );
        assert_eq!(layout(&r.mm, range), "2".repeat(n as usize));
        verify(&r.mm, base, n, ps, 7 + k as u64);
    }
    assert!(r.mm.allocations().is_empty());
    for pm in &r.pms {
        let st = pm.stats();
        assert_eq!(st.allocations, st.releases);
    }
    assert!(r.pms[0].stats().copy_to_ram_calls > 0 && r.pms[1].stats().copy_to_ram_calls > 0);
}

/// Scattered physical layouts at the backend level: host frames and device pages in random
/// order, with runs of every length, so both the kernel and DMA take part.
fn scattered_round_trip(r: &Rig, ps: PageSize, pages: usize, seed: u64, dma_min: u64) {
    let host = r.backend.pinned_host();
    let src_pm = &r.pms[0];
    let dst_pm = &r.pms[1];
    src_pm.set_dma_min(dma_min, dma_min);
    dst_pm.set_dma_min(dma_min, dma_min);
    let mut rng = seed | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    // Frames: allocate 2x, keep a shuffled selection made of runs of random length.
    let mut frames = Vec::new();
    frames.resize(pages * 2, HostFrame(0));
    host.alloc_frames(ps, &mut frames).unwrap();
    let mut chosen = Vec::new();
    let mut i = 0;
    while chosen.len() < pages && i < frames.len() {
        let run = (next() % 40 + 1) as usize;
        chosen.extend(frames[i..(i + run).min(frames.len())].iter().copied());
        i += run + (next() % 3) as usize;
    }
    chosen.truncate(pages);
    assert_eq!(chosen.len(), pages);
    for (k, &f) in chosen.iter().enumerate() {
        host.write(f, 0, &pattern(seed, k as u64, ps.bytes()))
            .expect("host memory");
    }
    // Device pages: one allocation, used in an order of runs reversed in blocks.
    let a = src_pm.allocate(pages, ps).unwrap();
    let mut pfns = vec![Pfn(0); pages];
    src_pm.populate_devmem_pfn(&a, &mut pfns).unwrap();
    let mut order: Vec<Pfn> = Vec::with_capacity(pages);
    for block in pfns.chunks(17) {
        if next() % 2 == 0 {
            order.extend(block.iter().rev());
        } else {
            order.extend(block.iter());
        }
    }
    let mut addrs = vec![DmaAddr::NONE; pages];
    host.map_frames(DeviceId(0), &chosen, ps, Direction::ToDevice, &mut addrs)
        .unwrap();
    let f = src_pm
        .copy_to_devmem(&CopyRequest {
            page_size: ps,
            pages: &order,
            addrs: &addrs,
            pre_fence: a.pre_migrate_fence.as_ref(),
        })
        .unwrap();
    f.wait().unwrap();
    // Push pagemap 0 -> pagemap 1 (source push on one GPU), scattered destination.
    let b = dst_pm.allocate(pages, ps).unwrap();
    let mut dpfns = vec![Pfn(0); pages];
    dst_pm.populate_devmem_pfn(&b, &mut dpfns).unwrap();
    dpfns.reverse();
    let mut daddrs = vec![DmaAddr::NONE; pages];
    dst_pm
        .device_map(DeviceId(0), &dpfns, ps, Direction::FromDevice, &mut daddrs)
        .unwrap();
    let f = src_pm
        .copy_to_ram(&CopyRequest {
            page_size: ps,
            pages: &order,
            addrs: &daddrs,
            pre_fence: b.pre_migrate_fence.as_ref(),
        })
        .unwrap();
    f.wait().unwrap();
    // Back to fresh host frames, in yet another order, through the destination.
    let mut back = Vec::new();
    back.resize(pages, HostFrame(0));
    host.alloc_frames(ps, &mut back).unwrap();
    for &f in &back {
        host.zero(f, ps).expect("host memory");
    }
    let mut baddrs = vec![DmaAddr::NONE; pages];
    host.map_frames(DeviceId(0), &back, ps, Direction::FromDevice, &mut baddrs)
        .unwrap();
    let f = dst_pm
        .copy_to_ram(&CopyRequest {
            page_size: ps,
            pages: &dpfns,
            addrs: &baddrs,
            pre_fence: None,
        })
        .unwrap();
    f.wait().unwrap();
    let mut buf = vec![0u8; ps.bytes() as usize];
    for (k, &f) in back.iter().enumerate() {
        host.read(f, 0, &mut buf).expect("host memory");
        assert!(
            buf == pattern(seed, k as u64, ps.bytes()),
            "{ps}: page {k} of {pages} differs"
        );
    }
    host.free_frames(&frames, ps);
    host.free_frames(&back, ps);
    src_pm.devmem_release(a);
    dst_pm.devmem_release(b);
}

#[test]
fn scattered_layouts_every_page_size_kernel_and_dma() {
    if !gpu() {
        return;
    }
    let _gpu = shared();
    let r = rig(2);
    let mut trips = 0;
    for (k, ps) in sizes().into_iter().enumerate() {
        let pages = match ps {
            PageSize::Size4K => 3000,
            PageSize::Size64K => 400,
            PageSize::Size2M => 40,
        };
        // Crossover below two pages: long runs go to DMA, the rest to the kernel.
        scattered_round_trip(&r, ps, pages, 0x1234 + k as u64, 2 * ps.bytes());
        // Everything through the kernel.
        scattered_round_trip(&r, ps, pages, 0x5678 + k as u64, u64::MAX);
        // Everything through DMA.
        scattered_round_trip(&r, ps, pages, 0x9abc + k as u64, 0);
        trips += 3;
        // Everything through the kernel with Hopper's bulk copies, where the module has them.
        let bulk = r.pms[0].set_bulk(true).unwrap() && r.pms[1].set_bulk(true).unwrap();
        if bulk {
            scattered_round_trip(&r, ps, pages, 0xdef0 + k as u64, u64::MAX);
            trips += 1;
        } else if k == 0 {
            println!("(no bulk-copy kernel in this module: sm_90 NVRTC builds only)");
        }
        r.pms[0].set_bulk(false).unwrap();
        r.pms[1].set_bulk(false).unwrap();
    }
    let s0 = r.pms[0].stats();
    assert!(s0.kernel_launches > 0 && s0.dma_copies > 0, "{s0:?}");
    // One kernel launch per call at most: 3 calls per round trip.
    let s1 = r.pms[1].stats();
    assert!(
        s0.kernel_launches + s1.kernel_launches <= 3 * trips,
        "{s0:?} {s1:?}"
    );
}

#[test]
fn holes_are_skipped_and_new_pages_read_as_zero() {
    if !gpu() {
        return;
    }
    let _gpu = shared();
    let r = rig(1);
    let ps = PageSize::Size64K;
    let base = 1 << 40;
    let n = 32;
    let range = VaRange::new(base, n * ps.bytes());
    r.mm.create_range(range, ps).unwrap();
    // Only even pages written: odd ones are holes.
    for i in (0..n).step_by(2) {
        r.mm.write(base + i * ps.bytes(), &pattern(3, i, ps.bytes()))
            .unwrap();
    }
    r.mm.migrate(range, PagemapId(0), &MigrateDetails::default())
        .unwrap();
    let mut buf = vec![0u8; ps.bytes() as usize];
    for i in 0..n {
        r.mm.read(base + i * ps.bytes(), &mut buf).unwrap();
        if i % 2 == 0 {
            assert!(buf == pattern(3, i, ps.bytes()), "page {i}");
        } else {
            assert!(buf.iter().all(|&b| b == 0), "hole {i} reads as zeros");
        }
    }
    // A fresh allocation reads as zeros once its pre-migrate fence signalled, even where
    // the memory held data before.
    let pm = &r.pms[0];
    let a = pm.allocate(n as usize, ps).unwrap();
    a.wait_ready().unwrap();
    let mut pfns = vec![Pfn(0); n as usize];
    pm.populate_devmem_pfn(&a, &mut pfns).unwrap();
    let host = r.backend.pinned_host();
    let mut frames = Vec::new();
    frames.resize(n as usize, HostFrame(0));
    host.alloc_frames(ps, &mut frames).unwrap();
    for &f in &frames {
        host.write(f, 0, &vec![0xee; ps.bytes() as usize])
            .expect("host memory");
    }
    let mut addrs = vec![DmaAddr::NONE; n as usize];
    host.map_frames(DeviceId(0), &frames, ps, Direction::FromDevice, &mut addrs)
        .unwrap();
    pm.copy_to_ram(&CopyRequest {
        page_size: ps,
        pages: &pfns,
        addrs: &addrs,
        pre_fence: None,
    })
    .unwrap()
    .wait()
    .unwrap();
    for &f in &frames {
        host.read(f, 0, &mut buf).expect("host memory");
        assert!(buf.iter().all(|&b| b == 0));
    }
    host.free_frames(&frames, ps);
    pm.devmem_release(a);
}

#[test]
fn pre_migrate_fence_orders_a_source_push_after_the_clear() {
    if !gpu() {
        return;
    }
    let _gpu = alone();
    // Pages cleared on allocation: the clear is queued on the destination's copy stream,
    // where the hold below keeps it.
    let r = rig_with(
        CudaConfig {
            clear_on_free: false,
            ..config()
        },
        2,
    );
    let ps = PageSize::Size4K;
    let n = 256usize;
    let (src, dst) = (&r.pms[0], &r.pms[1]);
    let host = r.backend.pinned_host();
    // Data in the source pagemap.
    let a = src.allocate(n, ps).unwrap();
    let mut spfns = vec![Pfn(0); n];
    src.populate_devmem_pfn(&a, &mut spfns).unwrap();
    let (frames, addrs) = pattern_frames(&r, n, ps, 9);
    src.copy_to_devmem(&CopyRequest {
        page_size: ps,
        pages: &spfns,
        addrs: &addrs,
        pre_fence: a.pre_migrate_fence.as_ref(),
    })
    .unwrap()
    .wait()
    .unwrap();
    // The destination's clear is held back on its stream; the push runs on the source's
    // stream and must wait for it on the device. (Back the destination's memory first:
    // mapping device memory is an implicit synchronisation point of the device, which would
    // wait for the hold.)
    let warm = dst.allocate(n, ps).unwrap();
    warm.wait_ready().unwrap();
    dst.devmem_release(warm);
    let hold = dst.hold().unwrap();
    let b = dst.allocate(n, ps).unwrap();
    let clear = b
        .pre_migrate_fence
        .clone()
        .expect("the allocation's clear is queued behind the hold");
    assert_eq!(
        clear.native().map(|n| n.kind),
        Some(NativeFenceKind::CUDA_EVENT)
    );
    assert!(!clear.is_signaled(), "the clear waits behind the stall");
    let mut dpfns = vec![Pfn(0); n];
    dst.populate_devmem_pfn(&b, &mut dpfns).unwrap();
    let mut daddrs = vec![DmaAddr::NONE; n];
    dst.device_map(DeviceId(0), &dpfns, ps, Direction::FromDevice, &mut daddrs)
        .unwrap();
    let waits_before = src.stats().stream_waits;
    let t = Instant::now();
    let push = src
        .copy_to_ram(&CopyRequest {
            page_size: ps,
            pages: &spfns,
            addrs: &daddrs,
            pre_fence: Some(&clear),
        })
        .unwrap();
    assert!(
        t.elapsed() < Duration::from_millis(100),
        "a CUDA pre-fence is not waited on the CPU"
    );
    assert_eq!(src.stats().stream_waits, waits_before + 1);
    std::thread::sleep(Duration::from_millis(20));
    assert!(!push.is_signaled(), "the push waits for the clear");
    assert!(!clear.is_signaled());
    hold.release();
    push.wait().unwrap();
    assert!(clear.is_signaled());
    // Read the destination back: the pushed data, not the clear's zeros.
    for &f in &frames {
        host.zero(f, ps).expect("host memory");
    }
    let mut baddrs = vec![DmaAddr::NONE; n];
    host.map_frames(DeviceId(0), &frames, ps, Direction::FromDevice, &mut baddrs)
        .unwrap();
    dst.copy_to_ram(&CopyRequest {
        page_size: ps,
        pages: &dpfns,
        addrs: &baddrs,
        pre_fence: None,
    })
    .unwrap()
    .wait()
    .unwrap();
    let mut buf = vec![0u8; ps.bytes() as usize];
    for (k, &f) in frames.iter().enumerate() {
        host.read(f, 0, &mut buf).expect("host memory");
        assert!(
            buf == pattern(9, k as u64, ps.bytes()),
            "page {k}: the clear overwrote the push"
        );
    }
    host.free_frames(&frames, ps);
    src.devmem_release(a);
    dst.devmem_release(b);
}

/// `n` fresh host frames holding pattern `seed`, mapped for device 0 to read; the caller
/// frees them.
fn pattern_frames(r: &Rig, n: usize, ps: PageSize, seed: u64) -> (Vec<HostFrame>, Vec<DmaAddr>) {
    let host = r.backend.pinned_host();
    let mut frames = Vec::new();
    frames.resize(n, HostFrame(0));
    host.alloc_frames(ps, &mut frames).unwrap();
    for (k, &f) in frames.iter().enumerate() {
        host.write(f, 0, &pattern(seed, k as u64, ps.bytes()))
            .expect("host memory");
    }
    let mut addrs = vec![DmaAddr::NONE; n];
    host.map_frames(DeviceId(0), &frames, ps, Direction::ToDevice, &mut addrs)
        .unwrap();
    (frames, addrs)
}

/// Writes pattern `seed` into the pages `pfns` of `pm` from fresh host frames (waited).
fn write_pages(r: &Rig, pm: &CudaPagemap, pfns: &[Pfn], ps: PageSize, seed: u64) {
    let host = r.backend.pinned_host();
    let frames = through_host(r, pm, pfns, ps, true, |k, f| {
        host.write(f, 0, &pattern(seed, k as u64, ps.bytes()))
            .expect("host memory")
    });
    host.free_frames(&frames, ps);
}

/// Copies between the pages `pfns` of `pm` and fresh host frames, one call, waited:
/// `to_devmem` frames -> pages (after `fill(k, frame)` wrote each), else pages -> frames.
/// Returns the frames (the caller frees them).
fn through_host(
    r: &Rig,
    pm: &CudaPagemap,
    pfns: &[Pfn],
    ps: PageSize,
    to_devmem: bool,
    fill: impl Fn(usize, HostFrame),
) -> Vec<HostFrame> {
    let host = r.backend.pinned_host();
    let mut frames = Vec::new();
    frames.resize(pfns.len(), HostFrame(0));
    host.alloc_frames(ps, &mut frames).unwrap();
    for (k, &f) in frames.iter().enumerate() {
        fill(k, f);
    }
    let dir = if to_devmem {
        Direction::ToDevice
    } else {
        Direction::FromDevice
    };
    let mut addrs = vec![DmaAddr::NONE; pfns.len()];
    host.map_frames(DeviceId(0), &frames, ps, dir, &mut addrs)
        .unwrap();
    let req = CopyRequest {
        page_size: ps,
        pages: pfns,
        addrs: &addrs,
        pre_fence: None,
    };
    let f = if to_devmem {
        pm.copy_to_devmem(&req)
    } else {
        pm.copy_to_ram(&req)
    };
    f.unwrap().wait().unwrap();
    frames
}

/// One pagemap, with pages cleared when freed (`true`) or on allocation.
fn rig_clearing(on_free: bool) -> Rig {
    rig_with(
        CudaConfig {
            clear_on_free: on_free,
            ..config()
        },
        1,
    )
}

/// Allocates `n` pages of `ps` one allocation each; their pfns.
fn single_pages(pm: &CudaPagemap, n: usize, ps: PageSize) -> (Vec<DevmemBacking>, Vec<Pfn>) {
    let mut backs = Vec::new();
    let mut pfns = Vec::new();
    for _ in 0..n {
        let a = pm.allocate(1, ps).unwrap();
        let mut p = [Pfn(0)];
        pm.populate_devmem_pfn(&a, &mut p).unwrap();
        a.wait_ready().unwrap();
        backs.push(a);
        pfns.push(p[0]);
    }
    (backs, pfns)
}

#[test]
fn pages_are_cleared_when_freed_and_reallocated_without_a_clear() {
    if !gpu() {
        return;
    }
    let _gpu = shared();
    let r = rig_clearing(true);
    let pm = &r.pms[0];
    // Map the memory the test uses first (a fresh segment's clear would count below).
    let warm = pm.allocate(128, PageSize::Size2M).unwrap();
    pm.devmem_release(warm);
    pm.synchronize().unwrap();
    // A small pagemap that single pages fill, so that an allocation gets scattered pages.
    let cap = 32u64 << 20;
    r.backend
        .create_pagemap(&PagemapSpec {
            id: PagemapId(9),
            device: DeviceId(0),
            owner: None,
            capacity_bytes: cap,
        })
        .unwrap();
    let small = r.backend.cuda_pagemap(PagemapId(9)).unwrap();
    for ps in sizes() {
        // Contiguous: written, freed (one zeroing kernel); the pages settle while their clear
        // runs, so the next allocation gets others; once the clear has run they come back,
        // with no clear of their own.
        let n = 16;
        let bytes = n as u64 * ps.bytes();
        let a = pm.allocate(n, ps).unwrap();
        a.wait_ready().unwrap();
        let mut pfns = vec![Pfn(0); n];
        pm.populate_devmem_pfn(&a, &mut pfns).unwrap();
        write_pages(&r, pm, &pfns, ps, 21);
        let s0 = pm.stats();
        pm.devmem_release(a);
        let s1 = pm.stats();
        assert_eq!(s1.clear_launches, s0.clear_launches + 1, "{ps}");
        assert_eq!(
            s1.settling_bytes, bytes,
            "{ps}: freed pages wait for their clear"
        );
        let b = pm.allocate(n, ps).unwrap();
        b.wait_ready().unwrap();
        let mut bp = vec![Pfn(0); n];
        pm.populate_devmem_pfn(&b, &mut bp).unwrap();
        assert!(
            bp.iter().all(|p| !pfns.contains(p)),
            "{ps}: settling pages are not handed out while others fit"
        );
        pm.synchronize().unwrap();
        assert_eq!(pm.stats().settling_bytes, 0, "{ps}: settled by synchronize");
        let c = pm.allocate(n, ps).unwrap();
        let s2 = pm.stats();
        assert_eq!(s2.allocations_cleared, s0.allocations_cleared, "{ps}");
        assert_eq!(
            s2.clear_launches,
            s0.clear_launches + 1,
            "{ps}: nothing queued"
        );
        assert!(c.pre_migrate_fence.is_none(), "{ps}: nothing to wait for");
        let mut cp = vec![Pfn(0); n];
        pm.populate_devmem_pfn(&c, &mut cp).unwrap();
        // First fit: the lowest free pages, which include the settled ones (the 4 KiB
        // round's pages sit below this round's first allocation).
        assert!(
            cp.iter().filter(|p| pfns.contains(p)).count() >= n / 2,
            "{ps}: the settled pages are handed out again: {cp:?} vs {pfns:?}"
        );
        for (k, x) in read_back(&r, pm, &cp, ps).iter().enumerate() {
            assert!(x.iter().all(|&v| v == 0), "{ps}: page {k} reads as zeros");
        }
        pm.devmem_release_many(&[b, c]);
        pm.synchronize().unwrap();

        // Scattered: fill the small pagemap with single pages, free every other one, and
        // allocate them as one allocation (page by page, no run fits).
        let total = (cap / ps.bytes()) as usize;
        let (singles, spfns) = single_pages(&small, total, ps);
        write_pages(&r, &small, &spfns, ps, 22);
        let mut freed = Vec::new();
        let mut kept = Vec::new();
        for (k, b) in singles.into_iter().enumerate() {
            if k % 2 == 0 {
                freed.push(spfns[k]);
                small.devmem_release(b);
            } else {
                kept.push((spfns[k], b));
            }
        }
        let s0 = small.stats();
        let c = small.allocate(total / 2, ps).unwrap();
        assert_eq!(
            small.stats().allocations_cleared,
            s0.allocations_cleared,
            "{ps}"
        );
        c.wait_ready().unwrap();
        let mut cp = vec![Pfn(0); total / 2];
        small.populate_devmem_pfn(&c, &mut cp).unwrap();
        let mut sorted = cp.clone();
        sorted.sort();
        assert_eq!(sorted, freed, "{ps}: the freed pages, scattered");
        for (k, x) in read_back(&r, &small, &cp, ps).iter().enumerate() {
            assert!(
                x.iter().all(|&v| v == 0),
                "{ps}: scattered page {k} reads as zeros"
            );
        }
        // Freed as one allocation of scattered pages: one page-list clear.
        write_pages(&r, &small, &cp, ps, 24);
        let s1 = small.stats();
        small.devmem_release(c);
        assert_eq!(small.stats().clear_launches, s1.clear_launches + 1, "{ps}");
        let d = small.allocate(total / 2, ps).unwrap();
        assert_eq!(
            small.stats().allocations_cleared,
            s1.allocations_cleared,
            "{ps}"
        );
        d.wait_ready().unwrap();
        let mut dp = vec![Pfn(0); total / 2];
        small.populate_devmem_pfn(&d, &mut dp).unwrap();
        for (k, x) in read_back(&r, &small, &dp, ps).iter().enumerate() {
            assert!(
                x.iter().all(|&v| v == 0),
                "{ps}: page {k} cleared by the list"
            );
        }
        // The pages kept still hold their data.
        let kp: Vec<Pfn> = kept.iter().map(|(p, _)| *p).collect();
        for (k, x) in read_back(&r, &small, &kp, ps).iter().enumerate() {
            assert!(
                *x == pattern(22, 2 * k as u64 + 1, ps.bytes()),
                "{ps}: kept {k}"
            );
        }
        small.devmem_release(d);
        for (_, b) in kept {
            small.devmem_release(b);
        }
    }
}

#[test]
fn releasing_many_allocations_queues_one_clear() {
    if !gpu() {
        return;
    }
    let _gpu = shared();
    let r = rig_clearing(true);
    let pm = &r.pms[0];
    let warm = pm.allocate(64, PageSize::Size2M).unwrap();
    pm.devmem_release(warm);
    pm.synchronize().unwrap();
    // Single pages of two sizes, written, then released in one call.
    let (mut backs, p4) = single_pages(pm, 40, PageSize::Size4K);
    write_pages(&r, pm, &p4, PageSize::Size4K, 31);
    let (b64, p64) = single_pages(pm, 9, PageSize::Size64K);
    write_pages(&r, pm, &p64, PageSize::Size64K, 32);
    backs.extend(b64);
    let s0 = pm.stats();
    pm.devmem_release_many(&backs);
    let s1 = pm.stats();
    assert_eq!(s1.releases, s0.releases + 49);
    assert_eq!(
        s1.clear_launches,
        s0.clear_launches + 2,
        "one clear per page size"
    );
    assert_eq!(s1.used_bytes, 0);
    // The second release may find the first one's clear done already and settle it.
    assert!(s1.settling_bytes >= 9 * 65536 && s1.settling_bytes <= 40 * 4096 + 9 * 65536);
    // Settled, allocated again: the same pages, clean, nothing queued, zeros.
    pm.synchronize().unwrap();
    assert_eq!(pm.stats().settling_bytes, 0);
    for (ps, n, was) in [(PageSize::Size4K, 40, &p4), (PageSize::Size64K, 9, &p64)] {
        let a = pm.allocate(n, ps).unwrap();
        a.wait_ready().unwrap();
        let mut pfns = vec![Pfn(0); n];
        pm.populate_devmem_pfn(&a, &mut pfns).unwrap();
        let mut sorted = pfns.clone();
        sorted.sort();
        assert_eq!(&sorted, was, "{ps}: the released pages");
        for (k, x) in read_back(&r, pm, &pfns, ps).iter().enumerate() {
            assert!(x.iter().all(|&v| v == 0), "{ps}: page {k} reads as zeros");
        }
        pm.devmem_release(a);
    }
    assert_eq!(pm.stats().allocations_cleared, s1.allocations_cleared);
}

#[test]
fn without_clear_on_free_every_allocation_clears_its_pages() {
    if !gpu() {
        return;
    }
    let _gpu = shared();
    let r = rig_clearing(false);
    let pm = &r.pms[0];
    let ps = PageSize::Size64K;
    let n = 16;
    let a = pm.allocate(n, ps).unwrap();
    a.wait_ready().unwrap();
    let mut pfns = vec![Pfn(0); n];
    pm.populate_devmem_pfn(&a, &mut pfns).unwrap();
    write_pages(&r, pm, &pfns, ps, 23);
    let s0 = pm.stats();
    pm.devmem_release(a);
    assert_eq!(
        pm.stats().clear_launches,
        s0.clear_launches,
        "no clear on free"
    );
    let b = pm.allocate(n, ps).unwrap();
    assert_eq!(pm.stats().allocations_cleared, s0.allocations_cleared + 1);
    assert!(
        b.pre_migrate_fence.is_some(),
        "the clear is the pre-migrate fence"
    );
    b.wait_ready().unwrap();
    let mut bp = vec![Pfn(0); n];
    pm.populate_devmem_pfn(&b, &mut bp).unwrap();
    for (k, x) in read_back(&r, pm, &bp, ps).iter().enumerate() {
        assert!(x.iter().all(|&v| v == 0), "page {k} reads as zeros");
    }
    pm.devmem_release(b);
}

/// Reads `pfns` of `pm` back into fresh host frames; returns their bytes.
fn read_back(r: &Rig, pm: &CudaPagemap, pfns: &[Pfn], ps: PageSize) -> Vec<Vec<u8>> {
    let host = r.backend.pinned_host();
    let frames = through_host(r, pm, pfns, ps, false, |_, _| {});
    let out = frames
        .iter()
        .map(|&f| {
            let mut b = vec![0u8; ps.bytes() as usize];
            host.read(f, 0, &mut b).expect("host memory");
            b
        })
        .collect();
    host.free_frames(&frames, ps);
    out
}

/// Fresh device pages of `pm` (cleared), and host frames holding pattern 5; then a copy of
/// those frames into those pages with `pre` as its pre-fence, issued but not waited for.
struct Small {
    a: DevmemBacking,
    pfns: Vec<Pfn>,
    frames: Vec<HostFrame>,
    fence: Fence,
    issue: Duration,
}

fn small_copy(r: &Rig, pm: &CudaPagemap, pre: Option<&Fence>) -> Small {
    let ps = PageSize::Size4K;
    let n = 8;
    let a = pm.allocate(n, ps).unwrap();
    a.wait_ready().unwrap();
    let mut pfns = vec![Pfn(0); n];
    pm.populate_devmem_pfn(&a, &mut pfns).unwrap();
    pfns.reverse(); // scattered: the kernel path
    let (frames, addrs) = pattern_frames(r, n, ps, 5);
    let t = Instant::now();
    let fence = pm
        .copy_to_devmem(&CopyRequest {
            page_size: ps,
            pages: &pfns,
            addrs: &addrs,
            pre_fence: pre,
        })
        .unwrap();
    Small {
        a,
        pfns,
        frames,
        fence,
        issue: t.elapsed(),
    }
}

impl Small {
    fn finish(self, r: &Rig, pm: &CudaPagemap, want_data: bool) {
        let ps = PageSize::Size4K;
        let got = read_back(r, pm, &self.pfns, ps);
        for (k, b) in got.iter().enumerate() {
            if want_data {
                assert!(
                    *b == pattern(5, k as u64, ps.bytes()),
                    "page {k} holds the data"
                );
            } else {
                assert!(
                    b.iter().all(|&x| x == 0),
                    "page {k} untouched (still cleared)"
                );
            }
        }
        r.backend.pinned_host().free_frames(&self.frames, ps);
        pm.devmem_release(self.a);
    }
}

#[test]
fn host_pre_fences_are_waited_on_the_cpu_and_their_errors_cancel_the_copy() {
    if !gpu() {
        return;
    }
    let _gpu = alone();
    let r = rig(2);
    let pm = r.pms[0].clone();
    // A host fence signalled later from another thread: the call returns at once, the
    // shared fence worker queues the copy once the fence signals, and it lands.
    let hf = HostFence::new(FenceContext::new(), 1);
    let h2 = hf.clone();
    let cpu_before = pm.stats().cpu_waits;
    let c = small_copy(&r, &pm, Some(&Fence::from_host(hf)));
    assert!(
        c.issue < Duration::from_millis(40),
        "issue does not block: {:?}",
        c.issue
    );
    assert_eq!(pm.stats().cpu_waits, cpu_before + 1);
    std::thread::sleep(Duration::from_millis(30));
    assert!(!c.fence.is_signaled(), "held by the host fence");
    assert_eq!(
        c.fence.wait_timeout(Duration::from_millis(10)),
        Err(FenceError::Timeout(Duration::from_millis(10)))
    );
    h2.signal();
    c.fence.wait().unwrap();
    c.finish(&r, &pm, true);
    // A host fence that fails later: the copy is never queued, its fence fails, and the
    // destination keeps its cleared pages.
    let bad = HostFence::new(FenceContext::new(), 1);
    let b2 = bad.clone();
    let c = small_copy(&r, &pm, Some(&Fence::from_host(bad)));
    std::thread::sleep(Duration::from_millis(10));
    b2.signal_error(BackendError::new(
        BackendErrorKind::Injected,
        "clear failed on purpose",
    ));
    match c.fence.wait() {
        Err(FenceError::Failed(e)) => assert_eq!(e.kind, BackendErrorKind::Injected, "{e}"),
        other => panic!("expected a failed fence, got {other:?}"),
    }
    c.finish(&r, &pm, false);
    // A host fence that failed before the call: nothing is queued at all.
    let failed = HostFence::new(FenceContext::new(), 1);
    failed.signal_error(BackendError::new(
        BackendErrorKind::Injected,
        "failed before",
    ));
    let kernels_before = pm.stats().kernel_launches;
    let c = small_copy(&r, &pm, Some(&Fence::from_host(failed)));
    match c.fence.wait() {
        Err(FenceError::Failed(e)) => {
            assert_eq!(e.kind, BackendErrorKind::Injected);
            assert!(e.message.contains("pre-fence failed"), "{e}");
        }
        other => panic!("expected a failed fence, got {other:?}"),
    }
    assert_eq!(pm.stats().kernel_launches, kernels_before);
    c.finish(&r, &pm, false);
    // A container of a CUDA fence (of another pagemap's stream, held back) and a signalled
    // host fence: one stream wait, no CPU wait.
    let other = &r.pms[1];
    let hold = other.hold().unwrap();
    let cf = other.fence().unwrap();
    let arr = Fence::new(FenceArray::new(vec![cf, Fence::signaled()]));
    let (sw, cw) = (pm.stats().stream_waits, pm.stats().cpu_waits);
    let c = small_copy(&r, &pm, Some(&arr));
    assert_eq!(pm.stats().stream_waits, sw + 1);
    assert_eq!(pm.stats().cpu_waits, cw);
    std::thread::sleep(Duration::from_millis(20));
    assert!(!c.fence.is_signaled());
    drop(hold);
    c.fence.wait().unwrap();
    c.finish(&r, &pm, true);
}

#[test]
fn stall_holds_the_stream_for_about_its_time() {
    if !gpu() {
        return;
    }
    let _gpu = alone();
    let r = rig(1);
    let pm = &r.pms[0];
    pm.stall(1000).unwrap();
    pm.synchronize().unwrap();
    let mut lines = Vec::new();
    for ms in [5u64, 50] {
        let t = Instant::now();
        pm.stall(ms * 1_000_000).unwrap();
        let f = pm.fence().unwrap();
        let pending = !f.is_signaled();
        f.wait().unwrap();
        let took = t.elapsed();
        lines.push(format!(
            "stall {ms} ms: {:.1} ms (pending after issue: {pending})",
            took.as_secs_f64() * 1e3
        ));
        assert!(
            took >= Duration::from_millis(ms),
            "{}",
            lines.last().unwrap()
        );
    }
    let _ = writeln!(std::io::stdout(), "{}", lines.join("; "));
}

#[test]
fn fence_wait_times_out_then_signals_and_stays_signalled() {
    if !gpu() {
        return;
    }
    let _gpu = alone();
    let r = rig(1);
    let pm = &r.pms[0];
    let hold = pm.hold().unwrap();
    let f = pm.fence().unwrap();
    assert_eq!(f.status(), FenceStatus::Pending);
    let t = Instant::now();
    assert_eq!(
        f.wait_timeout(Duration::from_millis(20)),
        Err(FenceError::Timeout(Duration::from_millis(20)))
    );
    assert!(t.elapsed() >= Duration::from_millis(20) && t.elapsed() < Duration::from_millis(250));
    assert_eq!(f.status(), FenceStatus::Pending);
    hold.release();
    f.wait().unwrap();
    assert_eq!(f.status(), FenceStatus::Signaled);
    assert_eq!(f.wait_timeout(Duration::ZERO), Ok(()));
    // Fences of one stream are ordered.
    let g = pm.fence().unwrap();
    assert_eq!(g.is_later(&f), Some(true));
}

/// Runs in a child process (a device fault poisons the whole context): a copy from an
/// address nothing is mapped at makes the fence fail with the driver's code.
#[test]
fn device_fault_fails_the_fence_with_its_curesult() {
    if !gpu() {
        return;
    }
    let _gpu = shared();
    const CHILD: &str = "DRM_PAGEMAP_CUDA_FAULT_CHILD";
    if std::env::var_os(CHILD).is_some() {
        let r = rig(1);
        let pm = &r.pms[0];
        let ps = PageSize::Size4K;
        let a = pm.allocate(4, ps).unwrap();
        let mut pfns = vec![Pfn(0); 4];
        pm.populate_devmem_pfn(&a, &mut pfns).unwrap();
        pfns.reverse(); // scattered: the kernel path
        let bogus: Vec<DmaAddr> = (0..4)
            .map(|i| DmaAddr(0x1000_0000_0000 + i * 0x10_0000))
            .collect();
        let f = pm
            .copy_to_devmem(&CopyRequest {
                page_size: ps,
                pages: &pfns,
                addrs: &bogus,
                pre_fence: a.pre_migrate_fence.as_ref(),
            })
            .unwrap();
        match f.wait() {
            Err(FenceError::Failed(BackendError {
                kind: BackendErrorKind::Driver { api, code },
                ..
            })) => {
                println!("CHILD-RESULT driver {api} {code}");
                assert!(matches!(f.status(), FenceStatus::Failed(_)), "sticky");
            }
            other => println!("CHILD-RESULT other {other:?}"),
        }
        std::process::exit(0);
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "device_fault_fails_the_fence_with_its_curesult",
            "--nocapture",
            "--include-ignored",
        ])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("CHILD-RESULT"))
        .unwrap_or_else(|| {
            panic!(
                "child said nothing: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    assert!(line.contains("CHILD-RESULT driver cuEvent"), "{line}");
    let code: i64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert_ne!(code, 0);
    let _ = writeln!(std::io::stdout(), "device fault reported as {line}");
}

#[test]
fn nvrtc_compiles_the_kernel_source_where_nvrtc_exists() {
    if !gpu() {
        return;
    }
    let _gpu = shared();
    let r = rig_with(
        CudaConfig {
            kernel: KernelSource::Nvrtc,
            ..config()
        },
        1,
    );
    match r.pms[0].kernel_origin() {
        Ok(origin) => {
            assert!(origin.starts_with("nvrtc"), "{origin}");
            assert!(r.pms[0].has_small_kernel().unwrap());
        }
        // A machine without NVRTC runs the fallback PTX (tested elsewhere); a source that
        // does not compile is a failure.
        Err(e) if e.message.contains("NVRTC not found") => {
            let _ = writeln!(std::io::stdout(), "skipped: {e}");
        }
        Err(e) => panic!("kernels/pages.cu does not build with NVRTC: {e}"),
    }
}

#[test]
fn a_copy_right_after_a_release_goes_to_dma_and_waits_for_no_clear() {
    if !gpu() {
        return;
    }
    let _gpu = alone();
    let r = rig_clearing(true);
    let pm = &r.pms[0];
    let ps = PageSize::Size4K;
    // 16 contiguous pages (one run, far below the 2 MiB crossover): one DMA, no kernel.
    let n = 16;
    // Map the arena and take the host frames first: both are implicit synchronisation
    // points of the device, which would wait for the hold below.
    let warm = pm.allocate(512, ps).unwrap();
    pm.devmem_release(warm);
    pm.synchronize().unwrap();
    let host = r.backend.pinned_host();
    let (frames, addrs) = pattern_frames(&r, n, ps, 41);
    let a = pm.allocate(n, ps).unwrap();
    a.wait_ready().unwrap();
    let mut apfns = vec![Pfn(0); n];
    pm.populate_devmem_pfn(&a, &mut apfns).unwrap();
    // An eviction frees `a`; its clear cannot run (held). A fault right after gets other
    // pages, with nothing to wait for, and its copy completes while the clear is held.
    let hold = pm.hold_clears().unwrap();
    pm.devmem_release(a);
    assert_eq!(pm.stats().settling_bytes, n as u64 * ps.bytes());
    let b = pm.allocate(n, ps).unwrap();
    assert!(
        b.pre_migrate_fence.as_ref().is_none_or(Fence::is_signaled),
        "clean pages of settled memory need no fence"
    );
    let mut pfns = vec![Pfn(0); n];
    pm.populate_devmem_pfn(&b, &mut pfns).unwrap();
    assert!(
        pfns.iter().all(|p| !apfns.contains(p)),
        "not the settling pages"
    );
    let s0 = pm.stats();
    let copy = pm
        .copy_to_devmem(&CopyRequest {
            page_size: ps,
            pages: &pfns,
            addrs: &addrs,
            pre_fence: b.pre_migrate_fence.as_ref(),
        })
        .unwrap();
    copy.wait_timeout(Duration::from_secs(5))
        .expect("the copy does not wait for the held clear");
    let s1 = pm.stats();
    assert_eq!(s1.dma_copies, s0.dma_copies + 1, "{s1:?}");
    assert_eq!(s1.kernel_launches, s0.kernel_launches, "{s1:?}");
    assert_eq!(s1.stream_waits, s0.stream_waits, "{s1:?}");
    assert_eq!(s1.settling_bytes, n as u64 * ps.bytes(), "still held");
    hold.release();
    pm.synchronize().unwrap();
    assert_eq!(pm.stats().settling_bytes, 0);
    for (k, x) in read_back(&r, pm, &pfns, ps).iter().enumerate() {
        assert!(*x == pattern(41, k as u64, ps.bytes()), "page {k}");
    }
    // The evicted pages come back cleared.
    let c = pm.allocate(n, ps).unwrap();
    c.wait_ready().unwrap();
    let mut cp = vec![Pfn(0); n];
    pm.populate_devmem_pfn(&c, &mut cp).unwrap();
    assert_eq!(cp, apfns);
    for (k, x) in read_back(&r, pm, &cp, ps).iter().enumerate() {
        assert!(x.iter().all(|&v| v == 0), "evicted page {k} reads as zeros");
    }
    host.free_frames(&frames, ps);
    pm.devmem_release_many(&[b, c]);
}

#[test]
fn settling_pages_are_taken_when_nothing_else_fits_with_their_clear_as_the_fence() {
    if !gpu() {
        return;
    }
    let _gpu = alone();
    let r = rig_clearing(true);
    let ps = PageSize::Size4K;
    // A pagemap of 2 MiB, filled by one allocation.
    r.backend
        .create_pagemap(&PagemapSpec {
            id: PagemapId(9),
            device: DeviceId(0),
            owner: None,
            capacity_bytes: 2 << 20,
        })
        .unwrap();
    let pm = r.backend.cuda_pagemap(PagemapId(9)).unwrap();
    let n = 512;
    let a = pm.allocate(n, ps).unwrap();
    a.wait_ready().unwrap();
    let mut pfns = vec![Pfn(0); n];
    pm.populate_devmem_pfn(&a, &mut pfns).unwrap();
    write_pages(&r, &pm, &pfns, ps, 51);
    // Host frames for half the pages, taken before the hold.
    let half = n / 2;
    let host = r.backend.pinned_host();
    let (frames, addrs) = pattern_frames(&r, half, ps, 52);
    let hold = pm.hold_clears().unwrap();
    pm.devmem_release(a);
    // Nothing else is free: the allocation takes the settling pages, ordered after their
    // clear (still held).
    let s0 = pm.stats();
    let b = pm.allocate(n, ps).unwrap();
    let s1 = pm.stats();
    assert_eq!(s1.settling_taken, s0.settling_taken + 1);
    assert_eq!(s1.settling_bytes, 0);
    assert_eq!(
        s1.allocations_cleared, s0.allocations_cleared,
        "no clear of its own"
    );
    let clear = b
        .pre_migrate_fence
        .clone()
        .expect("the held clear is the pre-migrate fence");
    assert_eq!(
        clear.native().map(|n| n.kind),
        Some(NativeFenceKind::CUDA_EVENT)
    );
    assert!(!clear.is_signaled());
    let mut bp = vec![Pfn(0); n];
    pm.populate_devmem_pfn(&b, &mut bp).unwrap();
    assert_eq!(bp, pfns, "the whole pagemap again");
    // Half the pages get new data; the copy waits for the clear on the device.
    let copy = pm
        .copy_to_devmem(&CopyRequest {
            page_size: ps,
            pages: &bp[..half],
            addrs: &addrs,
            pre_fence: Some(&clear),
        })
        .unwrap();
    assert_eq!(pm.stats().stream_waits, s1.stream_waits + 1);
    std::thread::sleep(Duration::from_millis(20));
    assert!(!copy.is_signaled(), "the copy waits for the clear");
    hold.release();
    copy.wait().unwrap();
    let got = read_back(&r, &pm, &bp, ps);
    for (k, x) in got.iter().enumerate() {
        if k < half {
            assert!(
                *x == pattern(52, k as u64, ps.bytes()),
                "page {k}: the new data"
            );
        } else {
            assert!(
                x.iter().all(|&v| v == 0),
                "page {k}: cleared, not the old data"
            );
        }
    }
    host.free_frames(&frames, ps);
    pm.devmem_release(b);
}

#[test]
fn small_calls_copy_every_page_size_with_either_kernel() {
    if !gpu() {
        return;
    }
    let _gpu = shared();
    // Calls of up to 64 kernel entries pass their lists by value (NVRTC kernels); the
    // fallback PTX stages them; 65 entries stage them either way.
    for source in [KernelSource::Auto, KernelSource::Fallback] {
        let r = rig_with(
            CudaConfig {
                kernel: source,
                ..config()
            },
            2,
        );
        let origin = r.pms[0].kernel_origin().unwrap();
        assert_eq!(
            r.pms[0].has_small_kernel().unwrap(),
            origin.starts_with("nvrtc"),
            "{origin}"
        );
        for ps in sizes() {
            for (k, pages) in [1usize, 7, 64, 65].into_iter().enumerate() {
                if ps == PageSize::Size2M && pages > 7 {
                    continue;
                }
                let before = r.pms[0].stats().kernel_launches;
                scattered_round_trip(&r, ps, pages, 0x5100 + k as u64, u64::MAX);
                assert!(
                    r.pms[0].stats().kernel_launches >= before + 2,
                    "{ps} x{pages}"
                );
            }
        }
    }
}

#[test]
fn fallback_ptx_and_nvrtc_kernels_copy_the_same_bytes() {
    if !gpu() {
        return;
    }
    let _gpu = shared();
    let r = rig_with(
        CudaConfig {
            kernel: KernelSource::Fallback,
            ..config()
        },
        2,
    );
    let origin = r.pms[0].kernel_origin().unwrap();
    assert!(origin.starts_with("fallback ptx"), "{origin}");
    scattered_round_trip(&r, PageSize::Size4K, 1000, 0x4242, u64::MAX);
    scattered_round_trip(&r, PageSize::Size2M, 6, 0x4343, u64::MAX);
    let auto = rig(2);
    let origin_auto = auto.pms[0].kernel_origin().unwrap();
    scattered_round_trip(&auto, PageSize::Size64K, 100, 0x4444, u64::MAX);
    let _ = writeln!(
        std::io::stdout(),
        "kernel: forced {origin}; auto {origin_auto}"
    );
}

#[test]
fn eviction_of_a_whole_allocation_keeps_every_byte() {
    if !gpu() {
        return;
    }
    let _gpu = shared();
    let r = rig(2);
    let ps = PageSize::Size4K;
    let n = 4096u64;
    let base = 3 << 40;
    let range = VaRange::new(base, n * ps.bytes());
    r.mm.create_range(range, ps).unwrap();
    fill(&r.mm, base, n, ps, 11);
    let rep =
        r.mm.migrate(range, PagemapId(1), &MigrateDetails::default())
            .unwrap();
    let ev = r.mm.evict_to_ram(rep.alloc.unwrap()).unwrap();
    assert_eq!(ev.pages, n as usize);
    assert!(ev.released);
    assert_eq!(layout(&r.mm, range), "s".repeat(n as usize));
    verify(&r.mm, base, n, ps, 11);
    // Device -> device and back again, many times, through different pagemaps.
    for round in 0..4u8 {
        r.mm.migrate(range, PagemapId(round % 2), &MigrateDetails::default())
            .unwrap();
    }
    verify(&r.mm, base, n, ps, 11);
    assert!(r.mm.allocations().is_empty());
}

#[test]
fn mapping_for_a_device_that_does_not_exist_fails() {
    if !gpu() {
        return;
    }
    let _gpu = shared();
    let r = rig(1);
    let mut out = [DmaAddr::NONE; 1];
    let e = r.pms[0]
        .device_map(
            DeviceId(99),
            &[Pfn(0)],
            PageSize::Size4K,
            Direction::ToDevice,
            &mut out,
        )
        .unwrap_err();
    assert_eq!(e.kind, BackendErrorKind::MapFailed);
    let e = r
        .backend
        .pinned_host()
        .map_frames(
            DeviceId(99),
            &[HostFrame(0)],
            PageSize::Size4K,
            Direction::ToDevice,
            &mut out,
        )
        .unwrap_err();
    assert_eq!(e.kind, BackendErrorKind::MapFailed);
    // A pfn past the pagemap is refused before anything is queued.
    let e = r.pms[0]
        .copy_to_devmem(&CopyRequest {
            page_size: PageSize::Size4K,
            pages: &[Pfn(u32::MAX - 1)],
            addrs: &[DmaAddr(0x1000)],
            pre_fence: None,
        })
        .unwrap_err();
    assert_eq!(e.kind, BackendErrorKind::CopyFailed);
    let info = r.backend.devices();
    let _ = writeln!(
        std::io::stdout(),
        "device 0: {} ({} MiB offered), driver {}",
        info[0].name,
        info[0].memory_bytes >> 20,
        r.backend.driver_version()
    );
}

#[test]
fn a_refused_or_unneeded_migration_queues_no_clear() {
    if !gpu() {
        return;
    }
    let _gpu = shared();
    let r = rig_clearing(true);
    let pm = &r.pms[0];
    let base = 9u64 << 36;
    let range = VaRange::new(base, 16 * 4096);
    r.mm.create_range(range, PageSize::Size4K).unwrap();
    fill(&r.mm, base, 16, PageSize::Size4K, 41);
    r.mm.migrate(range, PagemapId(0), &MigrateDetails::default())
        .unwrap();
    pm.synchronize().unwrap();
    // migrate(): classified before anything is allocated.
    let s0 = pm.stats();
    let rep =
        r.mm.migrate(range, PagemapId(0), &MigrateDetails::default())
            .unwrap();
    assert_eq!(rep.outcome, MigrateOutcome::NotNeeded);
    let s1 = pm.stats();
    assert_eq!(s1.allocations, s0.allocations, "nothing allocated");
    assert_eq!(s1.clear_launches, s0.clear_launches, "nothing cleared");
    // The explicit path: a reservation the migration then does not use goes back unused,
    // without a clear.
    let alloc =
        r.mm.allocate_devmem(PagemapId(0), 16, PageSize::Size4K, range)
            .unwrap();
    pm.synchronize().unwrap();
    let s2 = pm.stats();
    let rep =
        r.mm.migrate_to_devmem(alloc, range, &MigrateDetails::default())
            .unwrap();
    assert_eq!(rep.outcome, MigrateOutcome::NotNeeded);
    let s3 = pm.stats();
    assert_eq!(s3.releases, s2.releases + 1);
    assert_eq!(s3.unused_releases, s2.unused_releases + 1);
    assert_eq!(
        s3.clear_launches, s2.clear_launches,
        "an unused reservation was cleared"
    );
    assert_eq!(s3.settling_bytes, s2.settling_bytes);
    // Its pages come back clean: the next allocation clears nothing and reads zeros.
    let a = pm.allocate(16, PageSize::Size4K).unwrap();
    a.wait_ready().unwrap();
    let mut pfns = vec![Pfn(0); 16];
    pm.populate_devmem_pfn(&a, &mut pfns).unwrap();
    for (k, x) in read_back(&r, pm, &pfns, PageSize::Size4K)
        .iter()
        .enumerate()
    {
        assert!(x.iter().all(|&v| v == 0), "page {k} reads as zeros");
    }
    assert_eq!(pm.stats().allocations_cleared, s3.allocations_cleared);
    pm.devmem_release(a);
    verify(&r.mm, base, 16, PageSize::Size4K, 41);
    r.mm.free_range(base).unwrap();
}

/// Threads of this process now.
fn threads() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:").map(|v| v.trim().parse().ok()))
        })
        .flatten()
        .unwrap_or(0)
}

/// A wrapper that only observes its fence (as a timing or accounting layer, or a fault
/// injector that is not firing): it delegates the native handle, members and callbacks.
#[derive(Debug)]
struct Observe(Fence);

impl FenceOps for Observe {
    fn context(&self) -> u64 {
        self.0.context()
    }
    fn seqno(&self) -> u64 {
        self.0.seqno()
    }
    fn status(&self) -> FenceStatus {
        self.0.status()
    }
    fn wait(&self, timeout: Option<Duration>) -> Result<(), FenceError> {
        self.0.wait_for(timeout)
    }
    fn native(&self) -> Option<NativeFence> {
        self.0.native()
    }
    fn members(&self) -> Option<&[Fence]> {
        self.0.members()
    }
    fn add_callback(&self, cb: FenceCallback) -> Result<(), FenceCallback> {
        self.0.add_callback(cb);
        Ok(())
    }
}

#[test]
fn a_device_fence_behind_two_wrappers_is_a_stream_wait_not_a_cpu_wait() {
    if !gpu() {
        return;
    }
    let _gpu = alone();
    let r = rig(2);
    let (pm, other) = (r.pms[0].clone(), &r.pms[1]);
    // Warm: the fence worker and the kernels exist before counting threads.
    Fence::signaled().on_signal(Box::new(|_| {}));
    small_copy(&r, &pm, None).finish(&r, &pm, true);
    let hold = other.hold().unwrap();
    let cf = other.fence().unwrap();
    let wrapped = Fence::new(Observe(Fence::new(Observe(cf))));
    let pre = Fence::new(FenceArray::new(vec![wrapped, Fence::signaled()]));
    let (sw, cw, t0) = (pm.stats().stream_waits, pm.stats().cpu_waits, threads());
    let c = small_copy(&r, &pm, Some(&pre));
    assert_eq!(pm.stats().stream_waits, sw + 1, "one stream wait");
    assert_eq!(pm.stats().cpu_waits, cw, "no CPU wait");
    assert!(threads() <= t0, "no helper thread: {} -> {}", t0, threads());
    std::thread::sleep(Duration::from_millis(20));
    assert!(!c.fence.is_signaled(), "ordered after the held stream");
    drop(hold);
    c.fence.wait().unwrap();
    c.finish(&r, &pm, true);
}

#[test]
fn a_thousand_copies_behind_a_host_fence_need_no_thread_each() {
    if !gpu() {
        return;
    }
    let _gpu = alone();
    let r = rig(1);
    let pm = r.pms[0].clone();
    let ps = PageSize::Size4K;
    let n = 1000;
    let a = pm.allocate(n, ps).unwrap();
    a.wait_ready().unwrap();
    let mut pfns = vec![Pfn(0); n];
    pm.populate_devmem_pfn(&a, &mut pfns).unwrap();
    let (frames, addrs) = pattern_frames(&r, n, ps, 77);
    Fence::signaled().on_signal(Box::new(|_| {}));
    let gate = HostFence::new(FenceContext::new(), 1);
    let pre = Fence::from_host(gate.clone());
    let t0 = threads();
    let cw = pm.stats().cpu_waits;
    let fences: Vec<Fence> = (0..n)
        .map(|k| {
            pm.copy_to_devmem(&CopyRequest {
                page_size: ps,
                pages: &pfns[k..k + 1],
                addrs: &addrs[k..k + 1],
                pre_fence: Some(&pre),
            })
            .unwrap()
        })
        .collect();
    let grown = threads().saturating_sub(t0);
    assert!(grown <= 1, "{n} deferred copies started {grown} threads");
    assert_eq!(pm.stats().cpu_waits, cw + n as u64);
    assert!(fences.iter().all(|f| !f.is_signaled()), "held by the gate");
    gate.signal();
    for f in &fences {
        f.wait_timeout(Duration::from_secs(30)).unwrap();
    }
    for (k, b) in read_back(&r, &pm, &pfns, ps).iter().enumerate() {
        assert!(
            *b == pattern(77, k as u64, ps.bytes()),
            "page {k} holds the data"
        );
    }
    eprintln!("{n} copies behind one host fence: {grown} thread(s) started");
    r.backend.pinned_host().free_frames(&frames, ps);
    pm.devmem_release(a);
}
