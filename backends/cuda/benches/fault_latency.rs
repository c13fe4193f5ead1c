//! Latency of what a GPU fault asks of the backend, from a standing start: allocate device
//! pages, copy system pages into them (the allocation's pre-migrate fence as the copy's
//! pre-fence), wait for the copy's fence. CPU wall time per step, medians and p90 over many
//! faults; the pages are freed between faults (untimed), as an eviction would.
//!
//! Baseline in the same run: one `cuMemcpyAsync` of the same bytes from contiguous pinned
//! memory into a device buffer, its event recorded and polled the same way (the floor for
//! moving those bytes when nothing else has to happen). Both clear policies are measured:
//! pages cleared when freed (the default) and cleared by every allocation.
//!
//! `cargo bench -p drm-pagemap-cuda --bench fault_latency [-- --iters N] [--json PATH]`.
//! `--json PATH` also writes each distribution as a JSON line (`kind` `fault` or `floor`,
//! `case` like `64 KiB, 16x4K`, `series` the clear policy or the floor's API, `samples`,
//! `min_us`, `p50_us`, `p90_us`, `p99_us`, `mean_us`), the input of `drm-pagemap-plots`.
//! Without a GPU: one "skipped: <reason>" line, exit 0.

use clap::Parser;
use cudarc::driver::sys;
use drm_pagemap_core::*;
use drm_pagemap_cuda::{CudaBackend, CudaConfig, KernelSource};
use std::ffi::c_void;
use std::time::{Duration, Instant};

/// The environment's `DRM_PAGEMAP_CUDA_*` settings (the library reads none itself).
fn env_config() -> CudaConfig {
    CudaConfig::from_env().expect("DRM_PAGEMAP_CUDA_* variables parse")
}

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const LIMIT: Option<Duration> = Some(Duration::from_secs(5));

fn ck(api: &str, r: sys::CUresult) {
    assert_eq!(r, sys::CUresult::CUDA_SUCCESS, "{api} failed");
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Per-step timings of one case (microseconds).
#[derive(Default)]
struct Steps {
    alloc: Vec<f64>,
    submit: Vec<f64>,
    wait: Vec<f64>,
    total: Vec<f64>,
    cleared: u64,
}

/// One distribution as a JSON line of the results file (microseconds).
fn record(kind: &str, case: &str, series: &str, v: &mut [f64]) -> serde_json::Value {
    let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
    serde_json::json!({
        "bench": "fault_latency",
        "kind": kind,
        "case": case,
        "series": series,
        "samples": v.len(),
        "min_us": pct(v, 0.0),
        "p50_us": pct(v, 0.5),
        "p90_us": pct(v, 0.9),
        "p99_us": pct(v, 0.99),
        "mean_us": mean,
    })
}

/// `64 KiB, 16x4K`: the range and its pages, as `svm-multi-device latency` names its cases.
fn case_label(bytes: u64, n: usize, ps: PageSize) -> String {
    let range = if bytes >= MIB {
        format!("{} MiB", bytes / MIB)
    } else {
        format!("{} KiB", bytes / KIB)
    };
    let page = match ps {
        PageSize::Size4K => "4K",
        PageSize::Size64K => "64K",
        PageSize::Size2M => "2M",
    };
    format!("{range}, {n}x{page}")
}

/// Multiprocessors of device 0 (the ring's kernel holds one of them).
fn sm_count() -> i32 {
    let mut n = 0;
    // SAFETY: writes one int; the driver was initialised by the probe.
    let r = unsafe {
        sys::cuDeviceGetAttribute(
            &mut n,
            sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            0,
        )
    };
    ck("cuDeviceGetAttribute", r);
    n
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// `iters` faults of `n` pages of `ps` from system memory into a pagemap of `backend`;
/// `dma`: runs of any length go to DMA (else the default crossover).
fn faults(backend: &CudaBackend, id: u8, n: usize, ps: PageSize, iters: usize, dma: bool) -> Steps {
    backend
        .create_pagemap(&PagemapSpec {
            id: PagemapId(id),
            device: DeviceId(0),
            owner: None,
            capacity_bytes: 256 * MIB,
        })
        .unwrap();
    let pm = backend.cuda_pagemap(PagemapId(id)).unwrap();
    if dma {
        pm.set_dma_min(ps.bytes(), pm.dma_min().1);
    }
    let host = backend.pinned_host();
    let mut frames = Vec::new();
    frames.resize(n, HostFrame(0));
    host.alloc_frames(ps, &mut frames).unwrap();
    for (k, &f) in frames.iter().enumerate() {
        host.write(f, 0, &(k as u64 + 1).to_le_bytes())
            .expect("host memory");
    }
    let mut addrs = vec![DmaAddr::NONE; n];
    host.map_frames(DeviceId(0), &frames, ps, Direction::ToDevice, &mut addrs)
        .unwrap();
    let mut pfns = vec![Pfn(0); n];
    let mut s = Steps::default();
    let before = pm.stats().allocations_cleared;
    for i in 0..iters + 10 {
        let t0 = Instant::now();
        let a = pm.allocate(n, ps).unwrap();
        let t1 = Instant::now();
        pm.populate_devmem_pfn(&a, &mut pfns).unwrap();
        let f = pm
            .copy_to_devmem(&CopyRequest {
                page_size: ps,
                pages: &pfns,
                addrs: &addrs,
                pre_fence: a.pre_migrate_fence.as_ref(),
            })
            .unwrap();
        let t2 = Instant::now();
        f.wait_for(LIMIT).unwrap();
        let t3 = Instant::now();
        if i >= 10 {
            s.alloc.push(us(t1 - t0));
            s.submit.push(us(t2 - t1));
            s.wait.push(us(t3 - t2));
            s.total.push(us(t3 - t0));
        }
        // Check a word of the last page, then free (untimed, like an eviction).
        let mut one = [0u8; 8];
        let mut back = Vec::new();
        back.resize(1, HostFrame(0));
        host.alloc_frames(ps, &mut back).unwrap();
        let mut ba = [DmaAddr::NONE];
        host.map_frames(DeviceId(0), &back, ps, Direction::FromDevice, &mut ba)
            .unwrap();
        pm.copy_to_ram(&CopyRequest {
            page_size: ps,
            pages: &pfns[n - 1..],
            addrs: &ba,
            pre_fence: None,
        })
        .unwrap()
        .wait()
        .unwrap();
        host.read(back[0], 0, &mut one).expect("host memory");
        assert_eq!(u64::from_le_bytes(one), n as u64, "fault {i}: data arrived");
        host.free_frames(&back, ps);
        pm.devmem_release(a);
    }
    s.cleared = pm.stats().allocations_cleared - before;
    host.free_frames(&frames, ps);
    s
}

/// Medians (microseconds) of the engine's steps for `iters` migrations of a range of `n`
/// pages of `ps` from system memory into a pagemap of `backend` (evicted in between,
/// untimed): allocate_devmem, then migrate_to_devmem's plan / map / issue / wait / commit,
/// the total, and what the total has besides those. `settle`: wait for the copy stream
/// after each eviction (the clear of the freed pages has run before the next fault).
fn engine_steps(
    backend: &CudaBackend,
    id: u8,
    n: usize,
    ps: PageSize,
    iters: usize,
    settle: bool,
) -> [f64; 8] {
    let mm = AddressSpace::new(backend.host_memory());
    let pm = backend
        .create_pagemap(&PagemapSpec {
            id: PagemapId(id),
            device: DeviceId(0),
            owner: None,
            capacity_bytes: 256 * MIB,
        })
        .unwrap();
    mm.add_pagemap(pm).unwrap();
    let range = VaRange::new(1 << 40, n as u64 * ps.bytes());
    mm.create_range(range, ps).unwrap();
    mm.write(range.start, &vec![7u8; range.len as usize])
        .unwrap();
    let details = MigrateDetails {
        fence_timeout: LIMIT,
        ..MigrateDetails::default()
    };
    let mut cols: [Vec<f64>; 8] = Default::default();
    for i in 0..iters + 10 {
        let t0 = Instant::now();
        let alloc = mm.allocate_devmem(PagemapId(id), n, ps, range).unwrap();
        let t1 = Instant::now();
        let rep = mm.migrate_to_devmem(alloc, range, &details).unwrap();
        let t2 = Instant::now();
        assert_eq!(rep.outcome, MigrateOutcome::Migrated);
        if i >= 10 {
            let t = &rep.timing;
            let steps = [t.plan, t.map, t.issue, t.wait, t.commit];
            let total = us(t2 - t0);
            cols[0].push(us(t1 - t0));
            for (c, d) in cols[1..6].iter_mut().zip(steps) {
                c.push(us(d));
            }
            cols[6].push(total);
            cols[7].push(us(t2 - t1) - steps.iter().map(|&d| us(d)).sum::<f64>());
        }
        mm.evict_to_ram(alloc).unwrap();
        if settle {
            backend
                .cuda_pagemap(PagemapId(id))
                .unwrap()
                .synchronize()
                .unwrap();
        }
    }
    let mut one = [0.0; 8];
    for (o, c) in one.iter_mut().zip(cols.iter_mut()) {
        *o = pct(c, 0.5);
    }
    one
}

/// `iters` empty kernel launches on a pagemap's stream through the backend (`stall(0)`, a
/// fence recorded behind it, polled until it signals); microseconds.
fn launch_floor(backend: &CudaBackend, id: u8, iters: usize) -> Vec<f64> {
    backend
        .create_pagemap(&PagemapSpec {
            id: PagemapId(id),
            device: DeviceId(0),
            owner: None,
            capacity_bytes: 2 * MIB,
        })
        .unwrap();
    let pm = backend.cuda_pagemap(PagemapId(id)).unwrap();
    let mut out = Vec::with_capacity(iters);
    for i in 0..iters + 10 {
        let t0 = Instant::now();
        pm.stall(0).unwrap();
        pm.fence().unwrap().wait_for(LIMIT).unwrap();
        if i >= 10 {
            out.push(us(t0.elapsed()));
        }
    }
    out
}

/// `iters` contiguous `cuMemcpyAsync`s of `bytes` host -> device on a fresh stream, each
/// followed by an event polled until it completes; microseconds.
/// `typed`: `cuMemcpyHtoDAsync` (direction given) instead of the unified `cuMemcpyAsync`.
fn memcpy_floor(bytes: u64, iters: usize, typed: bool) -> Vec<f64> {
    let (mut hostp, mut dev): (*mut c_void, u64) = (std::ptr::null_mut(), 0);
    let (mut stream, mut ev) = (std::ptr::null_mut(), std::ptr::null_mut());
    let (mut cudev, mut ctx) = (0, std::ptr::null_mut());
    let mut out = Vec::with_capacity(iters);
    // SAFETY: device 0's primary context (the backend retains it too), made current; plain
    // allocations of `bytes`, freed below; the copies stay inside them.
    unsafe {
        ck("cuDeviceGet", sys::cuDeviceGet(&mut cudev, 0));
        ck(
            "cuDevicePrimaryCtxRetain",
            sys::cuDevicePrimaryCtxRetain(&mut ctx, cudev),
        );
        ck("cuCtxSetCurrent", sys::cuCtxSetCurrent(ctx));
        ck(
            "cuMemHostAlloc",
            sys::cuMemHostAlloc(
                &mut hostp,
                bytes as usize,
                sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE,
            ),
        );
        std::ptr::write_bytes(hostp as *mut u8, 1, bytes as usize);
        ck("cuMemAlloc", sys::cuMemAlloc_v2(&mut dev, bytes as usize));
        ck(
            "cuStreamCreate",
            sys::cuStreamCreate(
                &mut stream,
                sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32,
            ),
        );
        ck(
            "cuEventCreate",
            sys::cuEventCreate(&mut ev, sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32),
        );
        for i in 0..iters + 10 {
            let t0 = Instant::now();
            if typed {
                ck(
                    "cuMemcpyHtoDAsync",
                    sys::cuMemcpyHtoDAsync_v2(dev, hostp, bytes as usize, stream),
                );
            } else {
                ck(
                    "cuMemcpyAsync",
                    sys::cuMemcpyAsync(dev, hostp as u64, bytes as usize, stream),
                );
            }
            ck("cuEventRecord", sys::cuEventRecord(ev, stream));
            loop {
                match sys::cuEventQuery(ev) {
                    sys::CUresult::CUDA_SUCCESS => break,
                    sys::CUresult::CUDA_ERROR_NOT_READY => std::thread::yield_now(),
                    r => ck("cuEventQuery", r),
                }
            }
            if i >= 10 {
                out.push(us(t0.elapsed()));
            }
        }
        sys::cuEventDestroy_v2(ev);
        sys::cuStreamDestroy_v2(stream);
        sys::cuMemFree_v2(dev);
        sys::cuMemFreeHost(hostp);
        sys::cuDevicePrimaryCtxRelease_v2(cudev);
    }
    out
}

/// Fault latency at the backend level (allocate -> copy_to_devmem -> fence) against one
/// cuMemcpyAsync of the same bytes.
#[derive(Debug, Parser)]
#[command(name = "fault_latency")]
struct Args {
    /// Faults per case.
    #[arg(long, value_name = "N", default_value = "300", value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    iters: u64,
    /// Also write each distribution as a JSON line to this file (the plots' input).
    #[arg(long, value_name = "PATH")]
    json: Option<std::path::PathBuf>,
    /// Passed by `cargo bench`; nothing changes.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() {
    let args = Args::parse();
    if let Err(reason) = drm_pagemap_cuda::probe_with(&env_config()) {
        println!("skipped: {reason}");
        return;
    }
    let iters = args.iters as usize;
    let json_path = args.json.clone();
    let mut records: Vec<serde_json::Value> = Vec::new();
    let cases = [
        (64 * KIB, PageSize::Size4K),
        (64 * KIB, PageSize::Size64K),
        (2 * MIB, PageSize::Size4K),
        (2 * MIB, PageSize::Size2M),
    ];
    let open = |clear_on_free, kernel| {
        CudaBackend::new(CudaConfig {
            devices: Some(1),
            host_capacity: 256 * MIB,
            clear_on_free,
            kernel,
            ..env_config()
        })
        .expect("open cuda")
    };
    let on_free = open(true, KernelSource::Auto);
    let on_alloc = open(false, KernelSource::Auto);
    // The fallback PTX has no small-call kernel: its calls read their lists from a staging
    // buffer in system memory.
    let lists = open(true, KernelSource::Fallback);
    // Small copies through the ring (option cuda.ring): a persistent kernel, one block.
    let ring = CudaBackend::new(CudaConfig {
        devices: Some(1),
        host_capacity: 256 * MIB,
        ring: true,
        ..env_config()
    })
    .expect("open cuda");
    println!(
        "fault latency, backend level (allocate -> copy_to_devmem -> fence), {iters} faults each, \
         medians (p90) in microseconds"
    );
    println!(
        "{:<16} {:<14} {:>13} {:>13} {:>13} {:>15} {:>14} {:>8} {:>9}",
        "case",
        "clear",
        "allocate",
        "copy submit",
        "copy wait",
        "total",
        "cuMemcpy+event",
        "ratio",
        "cleared"
    );
    let mut id = 0u8;
    let t = Instant::now();
    let mut x = t;
    for _ in 0..100_000 {
        x = std::hint::black_box(Instant::now());
    }
    println!(
        "one clock read (Instant::now): {:.0} ns",
        (x - t).as_secs_f64() * 1e9 / 100_000.0
    );
    let mut launch = launch_floor(&on_free, 99, iters);
    for &(bytes, ps) in &cases {
        let n = (bytes / ps.bytes()) as usize;
        let mut floor = memcpy_floor(bytes, iters, false);
        let floor_med = pct(&mut floor, 0.5);
        let mut typed = memcpy_floor(bytes, iters, true);
        records.push(record(
            "floor",
            &case_label(bytes, n, ps),
            "cuMemcpyAsync + event",
            &mut floor,
        ));
        println!(
            "{:<16} cuMemcpyAsync + event {:.1} us, cuMemcpyHtoDAsync + event {:.1} us",
            format!("{} bytes", bytes),
            floor_med,
            pct(&mut typed, 0.5)
        );
        let runs = [
            ("on free", &on_free, false),
            ("on allocate", &on_alloc, false),
            ("free, staged", &lists, false),
            ("free, DMA", &on_free, true),
            ("free, ring", &ring, false),
        ];
        for (label, backend, dma) in runs {
            if dma && n == 1 && ps == PageSize::Size2M {
                continue; // one 2 MiB run goes to DMA anyway
            }
            if label == "free, ring" && (n > 64 || bytes > MIB) {
                continue; // calls the ring does not take
            }
            let mut s = faults(backend, id, n, ps, iters, dma);
            if label == "free, ring" {
                let pm = backend.cuda_pagemap(PagemapId(id)).unwrap();
                match pm.ring_status() {
                    Ok(()) => {
                        println!(
                            "  (ring: {} of {} copies through the ring; it holds 1 of {} SMs while running)",
                            pm.stats().ring_copies,
                            pm.stats().copy_to_devmem_calls + pm.stats().copy_to_ram_calls,
                            sm_count()
                        );
                        // Where the kernel's time goes (its %globaltimer phase clocks).
                        if let Some([slot, copy, done, n]) = pm.ring_clocks()
                            && n > 0
                        {
                            let us = |ns: u64| ns as f64 / n as f64 / 1e3;
                            println!(
                                "  (ring kernel, mean of {n} copies: head seen -> slot loaded {:.2} us, -> bytes copied and visible {:.2} us, -> done written {:.2} us)",
                                us(slot),
                                us(copy),
                                us(done)
                            );
                        }
                    }
                    Err(why) => println!("  (no ring: {why}; the row is the stream path)"),
                }
            }
            id += 1;
            let total = pct(&mut s.total, 0.5);
            records.push(record(
                "fault",
                &case_label(bytes, n, ps),
                label,
                &mut s.total,
            ));
            println!(
                "{:<16} {:<14} {:>13.1} {:>13.1} {:>13.1} {:>7.1} ({:>5.1}) {:>14.1} {:>8.2} {:>9}",
                format!("{} x{}", ps, n),
                label,
                pct(&mut s.alloc, 0.5),
                pct(&mut s.submit, 0.5),
                pct(&mut s.wait, 0.5),
                total,
                pct(&mut s.total, 0.9),
                floor_med,
                total / floor_med,
                s.cleared
            );
        }
    }
    if let Some(path) = &json_path {
        let text: String = records.iter().map(|r| format!("{r}\n")).collect();
        match std::fs::write(path, text) {
            Ok(()) => println!(
                "results: {} distributions written to {}",
                records.len(),
                path.display()
            ),
            Err(e) => {
                eprintln!("error: writing {}: {e}", path.display());
                std::process::exit(1);
            }
        }
    }
    println!(
        "empty kernel launch + fence through the backend: {:.1} us median ({:.1} p90)",
        pct(&mut launch, 0.5),
        pct(&mut launch, 0.9)
    );
    println!(
        "\nthe engine on this backend (allocate_devmem + migrate_to_devmem from system memory, \
         evicted in between), medians in microseconds"
    );
    println!(
        "{:<16} {:>9} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7}",
        "case", "allocate", "plan", "map", "issue", "wait", "commit", "rest", "total"
    );
    for &(bytes, ps) in &cases {
        let n = (bytes / ps.bytes()) as usize;
        let rows = [
            ("", &on_free, false),
            (" settled", &on_free, true),
            (" ring", &ring, false),
        ];
        for (label, backend, settle) in rows {
            if label == " ring" && (n > 64 || bytes > MIB) {
                continue;
            }
            let m = engine_steps(backend, id, n, ps, iters, settle);
            id += 1;
            println!(
                "{:<16} {:>9.1} {:>7.1} {:>7.1} {:>7.1} {:>7.1} {:>7.1} {:>7.1} {:>7.1}",
                format!("{} x{}{}", ps, n, label),
                m[0],
                m[1],
                m[2],
                m[3],
                m[4],
                m[5],
                m[7],
                m[6]
            );
        }
    }
}
