//! Copy benches of the CUDA backend against what a CUDA user would pick, same bytes, same
//! run, GPU time from events. One run prints every row with its ratio at the end.
//!
//! Rows (256 MiB moved per iteration):
//! - scattered 4 KiB / 64 KiB / 2 MiB pages host -> device: ours (one `copy_to_devmem`) vs
//!   one contiguous `cuMemcpyAsync`, a per-page `cuMemcpyAsync` loop, `cuMemcpyBatchAsync`
//!   (driver >= 13.0), `cuMemPrefetchAsync` of managed memory;
//! - the same device -> host (`copy_to_ram` into system pages, i.e. eviction);
//! - pagemap -> pagemap on one GPU (a source push) vs device -> device `cuMemcpyAsync`;
//! - a mixed layout (system + two pagemaps) to a third: by-source (3 calls, issued before
//!   any wait) vs consecutive (a call per change of source) vs the sum of the parts;
//! - the DMA/kernel crossover: runs of 64 KiB .. 64 MiB, host -> device and device -> device.
//!
//! "device" time: the stream is held by a spin kernel while the work is queued, so only GPU
//! execution is timed; "incl. issue": the GPU is idle when the timed region starts, so the
//! CPU time to build and queue the work counts too.
//! Without a GPU: one "skipped: <reason>" line, exit 0.
//!
//! With `DRM_PAGEMAP_BENCH_JSON=PATH` the rows are also written to PATH as JSON lines (a
//! `meta` record, then one `row` record per row: `group`, `row`, `bytes`, `device_s`,
//! `iters`, `issue_s`), the input of `drm-pagemap-plots` (BENCHMARKS.md's copy plots).

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use cudarc::driver::sys;
use drm_pagemap_core::*;
use drm_pagemap_cuda::{CudaBackend, CudaConfig, CudaPagemap, PinnedHostMemory};
use std::collections::BTreeMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The environment's `DRM_PAGEMAP_CUDA_*` settings (the library reads none itself).
fn env_config() -> CudaConfig {
    CudaConfig::from_env().expect("DRM_PAGEMAP_CUDA_* variables parse")
}

const MIB: u64 = 1 << 20;
const BYTES: u64 = 256 * MIB;
const GATE_NS: u64 = 40_000_000;

fn ck(api: &str, r: sys::CUresult) {
    assert_eq!(r, sys::CUresult::CUDA_SUCCESS, "{api} failed");
}

/// Measured means per row: seconds per iteration (device time), plus incl.-issue medians.
#[derive(Default)]
struct Results {
    device: BTreeMap<String, (f64, u64)>,
    e2e: BTreeMap<String, f64>,
    notes: BTreeMap<String, String>,
}

static RESULTS: Mutex<Option<Results>> = Mutex::new(None);

fn record(id: &str, secs: f64, iters: u64) {
    let mut g = RESULTS.lock().unwrap();
    let r = g.get_or_insert_with(Results::default);
    let e = r.device.entry(id.to_string()).or_insert((0.0, 0));
    e.0 += secs;
    e.1 += iters;
}

fn note(id: &str, text: String) {
    let mut g = RESULTS.lock().unwrap();
    g.get_or_insert_with(Results::default)
        .notes
        .insert(id.to_string(), text);
}

/// Timing events on the gate stream (pagemap 0's stream).
struct Timer {
    gate: Arc<CudaPagemap>,
    events: Mutex<Vec<(sys::CUevent, sys::CUevent)>>,
}

// SAFETY: event handles are usable from any thread; the bench is single-threaded anyway.
unsafe impl Send for Timer {}
// SAFETY: as above.
unsafe impl Sync for Timer {}

fn stream_of(pm: &CudaPagemap) -> sys::CUstream {
    pm.stream_handle() as sys::CUstream
}

fn new_event() -> sys::CUevent {
    let mut e = std::ptr::null_mut();
    // SAFETY: writes one handle (timing enabled).
    ck("cuEventCreate", unsafe { sys::cuEventCreate(&mut e, 0) });
    e
}

fn wait_fence(stream: sys::CUstream, f: &Fence) {
    if let Some(n) = f.native() {
        assert_eq!(n.kind, NativeFenceKind::CUDA_EVENT, "a CUDA fence");
        // SAFETY: the fence (and its event) lives until after this call.
        ck("cuStreamWaitEvent", unsafe {
            sys::cuStreamWaitEvent(stream, n.handle as usize as sys::CUevent, 0)
        });
    }
}

impl Timer {
    fn pair(&self, i: usize) -> (sys::CUevent, sys::CUevent) {
        let mut ev = self.events.lock().unwrap();
        while ev.len() <= i {
            ev.push((new_event(), new_event()));
        }
        ev[i]
    }

    /// Runs `iters` iterations: `reset` (untimed), then `op` between two events. Gated: the
    /// stream is held by a spin kernel while work is queued (re-armed before the queue can
    /// drain). `extra`: other streams the op uses (they wait for the start event); `op`
    /// returns fences the end event must wait for.
    fn run(
        &self,
        iters: u64,
        gated: bool,
        extra: &[sys::CUstream],
        reset: &mut dyn FnMut(),
        op: &mut dyn FnMut() -> Vec<Fence>,
    ) -> Duration {
        let s = stream_of(&self.gate);
        let mut pairs: Vec<(sys::CUevent, sys::CUevent)> = Vec::with_capacity(iters as usize);
        for i in 0..iters as usize {
            // Hold the stream whenever it has drained, so that no start event fires on an
            // idle GPU while the CPU is still queueing.
            let drained = match pairs.last() {
                None => true,
                // SAFETY: the event was recorded above.
                Some(&(_, b)) => (unsafe { sys::cuEventQuery(b) }) == sys::CUresult::CUDA_SUCCESS,
            };
            if gated && drained {
                self.gate.stall(GATE_NS).unwrap();
            }
            if !gated {
                // SAFETY: the stream lives as long as the pagemap.
                ck("cuStreamSynchronize", unsafe {
                    sys::cuStreamSynchronize(s)
                });
            }
            reset();
            let (a, b) = self.pair(i);
            // SAFETY: handles are alive; `s` is the gate stream.
            unsafe {
                ck("cuEventRecord", sys::cuEventRecord(a, s));
                for &x in extra {
                    ck("cuStreamWaitEvent", sys::cuStreamWaitEvent(x, a, 0));
                }
            }
            let fences = op();
            for f in &fences {
                wait_fence(s, f);
            }
            // SAFETY: as above.
            unsafe { ck("cuEventRecord", sys::cuEventRecord(b, s)) };
            pairs.push((a, b));
            if !gated {
                // SAFETY: as above.
                ck("cuEventSynchronize", unsafe { sys::cuEventSynchronize(b) });
            }
        }
        let mut total = 0.0f64;
        for (a, b) in pairs {
            let mut ms = 0f32;
            // SAFETY: both events were recorded on one stream.
            unsafe {
                ck("cuEventSynchronize", sys::cuEventSynchronize(b));
                ck(
                    "cuEventElapsedTime",
                    sys::cuEventElapsedTime_v2(&mut ms, a, b),
                );
            }
            total += ms as f64 / 1e3;
        }
        Duration::from_secs_f64(total)
    }
}

/// A benchmark row: a name, and how to run it.
struct Row<'a> {
    id: String,
    extra: Vec<sys::CUstream>,
    reset: Box<dyn FnMut() + 'a>,
    op: Box<dyn FnMut() -> Vec<Fence> + 'a>,
}

impl<'a> Row<'a> {
    fn new(id: impl Into<String>, op: impl FnMut() -> Vec<Fence> + 'a) -> Row<'a> {
        Row {
            id: id.into(),
            extra: Vec::new(),
            reset: Box::new(|| {}),
            op: Box::new(op),
        }
    }
    fn with_reset(mut self, reset: impl FnMut() + 'a) -> Self {
        self.reset = Box::new(reset);
        self
    }
    fn with_extra(mut self, s: Vec<sys::CUstream>) -> Self {
        self.extra = s;
        self
    }
}

fn bench_rows(c: &mut Criterion, timer: &Timer, group: &str, bytes: u64, rows: Vec<Row<'_>>) {
    let mut g = c.benchmark_group(group);
    g.throughput(Throughput::Bytes(bytes));
    g.sampling_mode(SamplingMode::Flat);
    for mut row in rows {
        let full = format!("{group}/{}", row.id);
        let extra = row.extra.clone();
        g.bench_function(BenchmarkId::from_parameter(&row.id), |b| {
            b.iter_custom(|iters| {
                let d = timer.run(iters, true, &extra, &mut *row.reset, &mut *row.op);
                record(&full, d.as_secs_f64(), iters);
                d
            })
        });
        // Incl. issue: 3 ungated iterations, median.
        let mut v: Vec<f64> = (0..3)
            .map(|_| {
                timer
                    .run(1, false, &extra, &mut *row.reset, &mut *row.op)
                    .as_secs_f64()
            })
            .collect();
        v.sort_by(f64::total_cmp);
        RESULTS
            .lock()
            .unwrap()
            .get_or_insert_with(Results::default)
            .e2e
            .insert(full, v[1]);
    }
    g.finish();
}

/// Deterministic shuffle.
fn shuffle<T>(v: &mut [T], seed: u64) {
    let mut x = seed | 1;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
}

struct Env {
    backend: Arc<CudaBackend>,
    host: Arc<PinnedHostMemory>,
    pms: Vec<Arc<CudaPagemap>>,
    timer: Timer,
    contig_host: u64,
    contig_dev: u64,
    contig_dev2: u64,
    managed: u64,
    batch_ok: bool,
}

impl Env {
    fn new() -> Env {
        let backend = Arc::new(
            CudaBackend::new(CudaConfig {
                devices: Some(1),
                host_capacity: 3 << 30,
                ..env_config()
            })
            .expect("open cuda"),
        );
        let mut pms = Vec::new();
        for k in 0..3u8 {
            backend
                .create_pagemap(&PagemapSpec {
                    id: PagemapId(k),
                    device: DeviceId(0),
                    owner: None,
                    capacity_bytes: 2 << 30,
                })
                .unwrap();
            pms.push(backend.cuda_pagemap(PagemapId(k)).unwrap());
        }
        let host = backend.pinned_host().clone();
        let mut contig_host: *mut c_void = std::ptr::null_mut();
        let (mut contig_dev, mut contig_dev2, mut managed) = (0u64, 0u64, 0u64);
        // The pagemap's stall loads the kernels and binds the context on this thread.
        pms[0].stall(1000).unwrap();
        pms[0].synchronize().unwrap();
        // SAFETY: plain allocations, freed at exit.
        unsafe {
            ck(
                "cuMemHostAlloc",
                sys::cuMemHostAlloc(
                    &mut contig_host,
                    BYTES as usize,
                    sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE,
                ),
            );
            std::ptr::write_bytes(contig_host as *mut u8, 7, BYTES as usize);
            ck(
                "cuMemAlloc",
                sys::cuMemAlloc_v2(&mut contig_dev, BYTES as usize),
            );
            ck(
                "cuMemAlloc",
                sys::cuMemAlloc_v2(&mut contig_dev2, BYTES as usize),
            );
            ck(
                "cuMemAllocManaged",
                sys::cuMemAllocManaged(
                    &mut managed,
                    BYTES as usize,
                    sys::CUmemAttach_flags::CU_MEM_ATTACH_GLOBAL as u32,
                ),
            );
            std::ptr::write_bytes(managed as *mut u8, 3, BYTES as usize);
        }
        let batch_ok = backend.driver_version() >= 13000;
        // How long the gate really holds the stream (events around a 10 ms stall).
        let (a, b) = (new_event(), new_event());
        let s = stream_of(&pms[0]);
        let mut ms = 0f32;
        // SAFETY: fresh events recorded on pagemap 0's stream.
        unsafe {
            ck("cuEventRecord", sys::cuEventRecord(a, s));
            pms[0].stall(10_000_000).unwrap();
            ck("cuEventRecord", sys::cuEventRecord(b, s));
            ck("cuEventSynchronize", sys::cuEventSynchronize(b));
            ck(
                "cuEventElapsedTime",
                sys::cuEventElapsedTime_v2(&mut ms, a, b),
            );
        }
        note(
            "stall",
            format!(
                "a 10 ms stall held the stream {ms:.2} ms (gate {} ms)",
                GATE_NS / 1_000_000
            ),
        );
        let gate = pms[0].clone();
        Env {
            backend,
            host,
            pms,
            timer: Timer {
                gate,
                events: Mutex::new(Vec::new()),
            },
            contig_host: contig_host as u64,
            contig_dev,
            contig_dev2,
            managed,
            batch_ok,
        }
    }

    fn stream(&self) -> sys::CUstream {
        stream_of(&self.pms[0])
    }
}

/// Scattered pages of one size: host frames and device pages of pagemaps 0 and 1, each
/// in a random order (no two neighbours contiguous, as far as chance allows).
struct Scatter {
    ps: PageSize,
    frames: Vec<HostFrame>,
    host_addrs: Vec<DmaAddr>,
    pfns0: Vec<Pfn>,
    pfns1: Vec<Pfn>,
    p1_addrs: Vec<DmaAddr>,
    backings: Vec<(usize, DevmemBacking)>,
}

impl Scatter {
    fn new(env: &Env, ps: PageSize) -> Scatter {
        let n = (BYTES / ps.bytes()) as usize;
        let mut frames = Vec::new();
        frames.resize(n, HostFrame(0));
        env.host.alloc_frames(ps, &mut frames).unwrap();
        shuffle(&mut frames, 0x1111);
        for (k, &f) in frames.iter().enumerate() {
            env.host
                .write(f, 0, &(k as u64).to_le_bytes())
                .expect("host memory");
        }
        let mut host_addrs = vec![DmaAddr::NONE; n];
        env.host
            .map_frames(
                DeviceId(0),
                &frames,
                ps,
                Direction::ToDevice,
                &mut host_addrs,
            )
            .unwrap();
        let mut backings = Vec::new();
        let mut pfns = |k: usize, seed: u64| {
            let a = env.pms[k].allocate(n, ps).unwrap();
            a.wait_ready().unwrap();
            let mut p = vec![Pfn(0); n];
            env.pms[k].populate_devmem_pfn(&a, &mut p).unwrap();
            shuffle(&mut p, seed);
            backings.push((k, a));
            p
        };
        let pfns0 = pfns(0, 0x2222);
        let pfns1 = pfns(1, 0x3333);
        let mut p1_addrs = vec![DmaAddr::NONE; n];
        env.pms[1]
            .device_map(
                DeviceId(0),
                &pfns1,
                ps,
                Direction::FromDevice,
                &mut p1_addrs,
            )
            .unwrap();
        Scatter {
            ps,
            frames,
            host_addrs,
            pfns0,
            pfns1,
            p1_addrs,
            backings,
        }
    }

    fn release(self, env: &Env) {
        env.host.free_frames(&self.frames, self.ps);
        for (k, b) in self.backings {
            env.pms[k].devmem_release(b);
        }
    }
}

fn memcpy(dst: u64, src: u64, bytes: u64, s: sys::CUstream) {
    // SAFETY: the benches pass valid, device-reachable ranges.
    ck("cuMemcpyAsync", unsafe {
        sys::cuMemcpyAsync(dst, src, bytes as usize, s)
    });
}

fn batch(
    dsts: &mut [u64],
    srcs: &mut [u64],
    sizes: &mut [usize],
    s: sys::CUstream,
) -> Result<(), String> {
    // SAFETY: zero is a valid bit pattern for this plain struct.
    let mut attr: sys::CUmemcpyAttributes = unsafe { std::mem::zeroed() };
    attr.srcAccessOrder = sys::CUmemcpySrcAccessOrder::CU_MEMCPY_SRC_ACCESS_ORDER_STREAM;
    let mut idx = 0usize;
    // SAFETY: three arrays of `count` entries and one attribute applying from entry 0.
    let r = unsafe {
        sys::cuMemcpyBatchAsync_v2(
            dsts.as_mut_ptr(),
            srcs.as_mut_ptr(),
            sizes.as_mut_ptr(),
            dsts.len(),
            &mut attr,
            &mut idx,
            1,
            s,
        )
    };
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(format!("{r:?}"))
    }
}

fn prefetch(ptr: u64, to_device: bool, s: sys::CUstream) {
    let loc = sys::CUmemLocation {
        type_: if to_device {
            sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE
        } else {
            sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_HOST
        },
        id: 0,
    };
    // SAFETY: `ptr` is a managed allocation of BYTES.
    ck("cuMemPrefetchAsync", unsafe {
        sys::cuMemPrefetchAsync_v2(ptr, BYTES as usize, loc, 0, s)
    });
}

fn transfer_rows<'a>(env: &'a Env, sc: &'a Scatter, to_device: bool) -> Vec<Row<'a>> {
    let s = env.stream();
    let ps = sc.ps;
    let pm0 = &env.pms[0];
    let own: Vec<u64> = sc.pfns0.iter().map(|&p| pm0.pfn_addr(p)).collect();
    let other: Vec<u64> = sc.host_addrs.iter().map(|a| a.0).collect();
    let (mut dsts, mut srcs) = if to_device {
        (own.clone(), other.clone())
    } else {
        (other.clone(), own.clone())
    };
    let mut sizes = vec![ps.bytes() as usize; own.len()];
    let mut rows = vec![
        Row::new("ours", move || {
            let req = CopyRequest {
                page_size: ps,
                pages: &sc.pfns0,
                addrs: &sc.host_addrs,
                pre_fence: None,
            };
            let f = if to_device {
                pm0.copy_to_devmem(&req)
            } else {
                pm0.copy_to_ram(&req)
            };
            vec![f.unwrap()]
        }),
        Row::new("ours-bulk", move || {
            let req = CopyRequest {
                page_size: ps,
                pages: &sc.pfns0,
                addrs: &sc.host_addrs,
                pre_fence: None,
            };
            // Hopper's bulk copies for this call (option cuda.bulk); the plain kernel
            // where the module has none.
            pm0.set_bulk(true).expect("kernels");
            let f = if to_device {
                pm0.copy_to_devmem(&req)
            } else {
                pm0.copy_to_ram(&req)
            };
            pm0.set_bulk(false).expect("kernels");
            vec![f.unwrap()]
        }),
        Row::new("contiguous", move || {
            if to_device {
                memcpy(env.contig_dev, env.contig_host, BYTES, s);
            } else {
                memcpy(env.contig_host, env.contig_dev, BYTES, s);
            }
            Vec::new()
        }),
        Row::new("per-page-loop", move || {
            for (&d, &x) in own.iter().zip(&other) {
                if to_device {
                    memcpy(d, x, ps.bytes(), s);
                } else {
                    memcpy(x, d, ps.bytes(), s);
                }
            }
            Vec::new()
        }),
    ];
    if env.batch_ok {
        let id = format!("{}/batch", if to_device { "h2d" } else { "d2h" });
        rows.push(Row::new("batch", move || {
            if let Err(e) = batch(&mut dsts, &mut srcs, &mut sizes, s) {
                note(&id, format!("cuMemcpyBatchAsync failed: {e}"));
            }
            Vec::new()
        }));
    }
    let m = env.managed;
    rows.push(
        Row::new("managed-prefetch", move || {
            prefetch(m, to_device, s);
            Vec::new()
        })
        .with_reset(move || prefetch(m, !to_device, s)),
    );
    rows
}

fn check_data(env: &Env, sc: &Scatter) {
    // After the last h2d/d2h rows the frames hold what the device pages held: page k's first
    // word is k (written before the first copy to the device, copied both ways since).
    let mut b = [0u8; 8];
    for (k, &f) in sc.frames.iter().enumerate().step_by(997) {
        env.host.read(f, 0, &mut b).expect("host memory");
        assert_eq!(
            u64::from_le_bytes(b),
            k as u64,
            "{}: frame of page {k}",
            sc.ps
        );
    }
}

fn size_name(ps: PageSize) -> &'static str {
    match ps {
        PageSize::Size4K => "4k",
        PageSize::Size64K => "64k",
        PageSize::Size2M => "2m",
    }
}

fn transfers(c: &mut Criterion, env: &Env) {
    for ps in [PageSize::Size4K, PageSize::Size64K, PageSize::Size2M] {
        let sc = Scatter::new(env, ps);
        bench_rows(
            c,
            &env.timer,
            &format!("h2d-{}", size_name(ps)),
            BYTES,
            transfer_rows(env, &sc, true),
        );
        // Restore: the batch/per-page rows copied the same bytes; ours runs last below.
        bench_rows(
            c,
            &env.timer,
            &format!("d2h-{}", size_name(ps)),
            BYTES,
            transfer_rows(env, &sc, false),
        );
        // One more round trip through ours, then check the bytes.
        let req = CopyRequest {
            page_size: ps,
            pages: &sc.pfns0,
            addrs: &sc.host_addrs,
            pre_fence: None,
        };
        for (k, &f) in sc.frames.iter().enumerate() {
            env.host
                .write(f, 0, &(k as u64).to_le_bytes())
                .expect("host memory");
        }
        env.pms[0].copy_to_devmem(&req).unwrap().wait().unwrap();
        for &f in &sc.frames {
            env.host.write(f, 0, &[0xff; 8]).expect("host memory");
        }
        env.pms[0].copy_to_ram(&req).unwrap().wait().unwrap();
        check_data(env, &sc);
        // Pagemap -> pagemap: pagemap 0 pushes into pagemap 1's scattered pages.
        let s = env.stream();
        let (pm0, contig_dev, contig_dev2) = (&env.pms[0], env.contig_dev, env.contig_dev2);
        let sc_ref = &sc;
        let rows = vec![
            Row::new("ours-push", move || {
                let req = CopyRequest {
                    page_size: ps,
                    pages: &sc_ref.pfns0,
                    addrs: &sc_ref.p1_addrs,
                    pre_fence: None,
                };
                vec![pm0.copy_to_ram(&req).unwrap()]
            }),
            Row::new("ours-push-bulk", move || {
                let req = CopyRequest {
                    page_size: ps,
                    pages: &sc_ref.pfns0,
                    addrs: &sc_ref.p1_addrs,
                    pre_fence: None,
                };
                pm0.set_bulk(true).expect("kernels");
                let f = pm0.copy_to_ram(&req);
                pm0.set_bulk(false).expect("kernels");
                vec![f.unwrap()]
            }),
            Row::new("d2d-contiguous", move || {
                memcpy(contig_dev2, contig_dev, BYTES, s);
                Vec::new()
            }),
        ];
        bench_rows(
            c,
            &env.timer,
            &format!("p2p-{}", size_name(ps)),
            BYTES,
            rows,
        );
        // Check: pagemap 1 now holds pagemap 0's pages; bring them home and compare.
        for &f in &sc.frames {
            env.host.write(f, 0, &[0xff; 8]).expect("host memory");
        }
        let back = CopyRequest {
            page_size: ps,
            pages: &sc.pfns1,
            addrs: &sc.host_addrs,
            pre_fence: None,
        };
        env.pms[1].copy_to_ram(&back).unwrap().wait().unwrap();
        check_data(env, &sc);
        sc.release(env);
    }
}

/// A mixed layout of 4 KiB pages: runs of 1..=8 pages from system memory, pagemap 0 or
/// pagemap 1, migrating into pagemap 2.
fn mixed(c: &mut Criterion, env: &Env) {
    let ps = PageSize::Size4K;
    let n = (BYTES / ps.bytes()) as usize;
    let mut src = vec![0u8; n]; // 0: system, 1: pagemap 0, 2: pagemap 1
    let mut x = 0x9e37_79b9u64;
    let mut i = 0;
    let mut last = 3u8;
    while i < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let run = (x % 8 + 1) as usize;
        let mut s = ((x >> 8) % 3) as u8;
        if s == last {
            s = (s + 1) % 3;
        }
        last = s;
        for v in src.iter_mut().skip(i).take(run) {
            *v = s;
        }
        i += run;
    }
    let count = |k: u8| src.iter().filter(|&&s| s == k).count();
    let (ns, n0, n1) = (count(0), count(1), count(2));
    // Destination: one allocation of pagemap 2, pages in range order.
    let dst = env.pms[2].allocate(n, ps).unwrap();
    dst.wait_ready().unwrap();
    let mut dpfns = vec![Pfn(0); n];
    env.pms[2].populate_devmem_pfn(&dst, &mut dpfns).unwrap();
    let mut d_addrs = vec![DmaAddr::NONE; n];
    env.pms[2]
        .device_map(DeviceId(0), &dpfns, ps, Direction::FromDevice, &mut d_addrs)
        .unwrap();
    // Sources in range order: frames for system pages, one allocation per pagemap.
    let mut frames = Vec::new();
    frames.resize(ns, HostFrame(0));
    env.host.alloc_frames(ps, &mut frames).unwrap();
    let mut f_addrs = vec![DmaAddr::NONE; ns];
    env.host
        .map_frames(DeviceId(0), &frames, ps, Direction::ToDevice, &mut f_addrs)
        .unwrap();
    let mut src_allocs = Vec::new();
    let mut src_pfns = Vec::new();
    for (k, cnt) in [(0usize, n0), (1, n1)] {
        let a = env.pms[k].allocate(cnt, ps).unwrap();
        a.wait_ready().unwrap();
        let mut p = vec![Pfn(0); cnt];
        env.pms[k].populate_devmem_pfn(&a, &mut p).unwrap();
        src_allocs.push((k, a));
        src_pfns.push(p);
    }
    // Per source: (executor pages, other-side addresses) in range order, and the runs.
    struct Part {
        pages: Vec<Pfn>,
        addrs: Vec<DmaAddr>,
        runs: Vec<(usize, usize, usize)>, // (range index of first page, start in part, len)
    }
    let mut parts: Vec<Part> = (0..3)
        .map(|_| Part {
            pages: Vec::new(),
            addrs: Vec::new(),
            runs: Vec::new(),
        })
        .collect();
    let mut cursor = [0usize; 3];
    for (i, &s) in src.iter().enumerate() {
        let p = &mut parts[s as usize];
        let c = &mut cursor[s as usize];
        match s {
            0 => {
                p.pages.push(dpfns[i]);
                p.addrs.push(f_addrs[*c]);
            }
            k => {
                p.pages.push(src_pfns[k as usize - 1][*c]);
                p.addrs.push(d_addrs[i]);
            }
        }
        match p.runs.last_mut() {
            Some(r) if r.0 + r.2 == i => r.2 += 1,
            _ => p.runs.push((i, *c, 1)),
        }
        *c += 1;
    }
    let execs = [env.pms[2].clone(), env.pms[0].clone(), env.pms[1].clone()];
    let issue = |k: usize, lo: usize, hi: usize| -> Fence {
        let req = CopyRequest {
            page_size: ps,
            pages: &parts[k].pages[lo..hi],
            addrs: &parts[k].addrs[lo..hi],
            pre_fence: None,
        };
        if k == 0 {
            execs[0].copy_to_devmem(&req).unwrap()
        } else {
            execs[k].copy_to_ram(&req).unwrap()
        }
    };
    let streams: Vec<sys::CUstream> = vec![stream_of(&env.pms[1]), stream_of(&env.pms[2])];
    // Consecutive: calls in range order, one per run.
    let mut order: Vec<(usize, usize, usize)> = Vec::new(); // (range index, part, start)
    for (k, p) in parts.iter().enumerate() {
        for &(ri, st, len) in &p.runs {
            order.push((ri, k, st * 1_000_000 + len));
        }
    }
    order.sort();
    let calls_consecutive = order.len();
    let s = env.stream();
    let (cd, cd2, ch) = (env.contig_dev, env.contig_dev2, env.contig_host);
    let rows = vec![
        Row::new("by-source", || {
            (0..3).map(|k| issue(k, 0, parts[k].pages.len())).collect()
        })
        .with_extra(streams.clone()),
        Row::new("consecutive", || {
            let mut fences: Vec<Fence> = order
                .iter()
                .map(|&(_, k, sl)| {
                    let (st, len) = (sl / 1_000_000, sl % 1_000_000);
                    issue(k, st, st + len)
                })
                .collect();
            // The last fence of each stream covers the earlier ones.
            let mut last: [Option<Fence>; 3] = [None, None, None];
            for (f, &(_, k, _)) in fences.drain(..).zip(&order) {
                last[k] = Some(f);
            }
            last.into_iter().flatten().collect()
        })
        .with_extra(streams.clone()),
        Row::new("part-system", || vec![issue(0, 0, parts[0].pages.len())])
            .with_extra(streams.clone()),
        Row::new("part-pagemap0", || vec![issue(1, 0, parts[1].pages.len())])
            .with_extra(streams.clone()),
        Row::new("part-pagemap1", || vec![issue(2, 0, parts[2].pages.len())])
            .with_extra(streams.clone()),
        Row::new("raw-system-h2d", move || {
            memcpy(cd, ch, ns as u64 * ps.bytes(), s);
            Vec::new()
        }),
        Row::new("raw-pagemap0-d2d", move || {
            memcpy(cd2, cd, n0 as u64 * ps.bytes(), s);
            Vec::new()
        }),
        Row::new("raw-pagemap1-d2d", move || {
            memcpy(cd2, cd, n1 as u64 * ps.bytes(), s);
            Vec::new()
        }),
    ];
    note(
        "mixed",
        format!(
            "{n} pages of 4 KiB: {ns} system, {n0} in pagemap 0, {n1} in pagemap 1; {} runs (consecutive issues one call per run, by-source 3)",
            calls_consecutive
        ),
    );
    bench_rows(c, &env.timer, "mixed-4k", BYTES, rows);
    env.host.free_frames(&frames, ps);
    env.pms[2].devmem_release(dst);
    for (k, a) in src_allocs {
        env.pms[k].devmem_release(a);
    }
}

/// Runs of `run` bytes (4 KiB pages, contiguous inside a run, runs in random order on both
/// sides): kernel only vs one DMA per run.
fn crossover(c: &mut Criterion, env: &Env) {
    let ps = PageSize::Size4K;
    let n = (BYTES / ps.bytes()) as usize;
    let mut frames = Vec::new();
    frames.resize(n, HostFrame(0));
    env.host.alloc_frames(ps, &mut frames).unwrap();
    let mut h_addrs = vec![DmaAddr::NONE; n];
    env.host
        .map_frames(DeviceId(0), &frames, ps, Direction::ToDevice, &mut h_addrs)
        .unwrap();
    let a0 = env.pms[0].allocate(n, ps).unwrap();
    let a1 = env.pms[1].allocate(n, ps).unwrap();
    a0.wait_ready().unwrap();
    a1.wait_ready().unwrap();
    let mut p0 = vec![Pfn(0); n];
    let mut p1 = vec![Pfn(0); n];
    env.pms[0].populate_devmem_pfn(&a0, &mut p0).unwrap();
    env.pms[1].populate_devmem_pfn(&a1, &mut p1).unwrap();
    let mut d1 = vec![DmaAddr::NONE; n];
    env.pms[1]
        .device_map(DeviceId(0), &p1, ps, Direction::FromDevice, &mut d1)
        .unwrap();
    for run_kib in [64u64, 256, 1024, 2048, 4096, 16384, 65536] {
        let per = (run_kib * 1024 / ps.bytes()) as usize;
        let runs = n / per;
        let mut ord_a: Vec<usize> = (0..runs).collect();
        let mut ord_b: Vec<usize> = (0..runs).collect();
        shuffle(&mut ord_a, 0x77 + run_kib);
        shuffle(&mut ord_b, 0x99 + run_kib);
        let expand = |ord: &[usize], src: &[Pfn]| -> Vec<Pfn> {
            ord.iter()
                .flat_map(|&r| src[r * per..(r + 1) * per].iter().copied())
                .collect()
        };
        let expand_a = |ord: &[usize], src: &[DmaAddr]| -> Vec<DmaAddr> {
            ord.iter()
                .flat_map(|&r| src[r * per..(r + 1) * per].iter().copied())
                .collect()
        };
        let own = expand(&ord_a, &p0);
        let host = expand_a(&ord_b, &h_addrs);
        let dev = expand_a(&ord_b, &d1);
        let pm0 = &env.pms[0];
        let mk = |name: &str, addrs: &[DmaAddr], dma: bool, to_dev: bool| {
            let (own, addrs) = (own.clone(), addrs.to_vec());
            Row::new(name.to_string(), move || {
                let (h, d) = pm0.dma_min();
                if dma {
                    pm0.set_dma_min(0, 0);
                } else {
                    pm0.set_dma_min(u64::MAX, u64::MAX);
                }
                let req = CopyRequest {
                    page_size: ps,
                    pages: &own,
                    addrs: &addrs,
                    pre_fence: None,
                };
                let f = if to_dev {
                    pm0.copy_to_devmem(&req)
                } else {
                    pm0.copy_to_ram(&req)
                };
                pm0.set_dma_min(h, d);
                vec![f.unwrap()]
            })
        };
        let rows = vec![
            mk("h2d-kernel", &host, false, true),
            mk("h2d-dma", &host, true, true),
            mk("d2d-kernel", &dev, false, false),
            mk("d2d-dma", &dev, true, false),
        ];
        bench_rows(c, &env.timer, &format!("crossover-{run_kib}k"), BYTES, rows);
    }
    env.host.free_frames(&frames, ps);
    env.pms[0].devmem_release(a0);
    env.pms[1].devmem_release(a1);
}

fn gbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

fn summary(env: &Env) {
    let g = RESULTS.lock().unwrap();
    let Some(r) = g.as_ref() else { return };
    let dev = |id: &str| r.device.get(id).map(|&(s, n)| s / n.max(1) as f64);
    let e2e = |id: &str| r.e2e.get(id).copied();
    let d0 = &env.backend.devices()[0];
    let k = env.pms[0].kernel_origin().unwrap_or_else(|e| e.to_string());
    println!();
    println!(
        "== drm-pagemap-cuda copy benches: {} | driver {} | kernel {k}",
        d0.name,
        env.backend.driver_version()
    );
    println!(
        "== crossover now: host {} KiB, device {} KiB | 256 MiB per row | device = GPU execution (gated), incl. issue = from an idle GPU",
        env.pms[0].dma_min().0 >> 10,
        env.pms[0].dma_min().1 >> 10
    );
    println!(
        "{:<34} {:>10} {:>9} {:>10} {:>9}  ratio (device / incl. issue)",
        "row", "device", "GB/s", "incl.issue", "GB/s"
    );
    let line = |id: &str, base: Option<&str>, bytes: u64| {
        let (Some(t), te) = (dev(id), e2e(id)) else {
            println!("{id:<34} {:>10}", "n/a");
            return;
        };
        let ratio = base
            .and_then(|b| Some((b, dev(b)?, e2e(b))))
            .map(|(b, tb, teb)| {
                let r2 = match (te, teb) {
                    (Some(x), Some(y)) => format!("{:.3}", y / x),
                    _ => "-".into(),
                };
                format!(
                    "{:.3} / {r2} of {}",
                    tb / t,
                    b.rsplit('/').next().unwrap_or(b)
                )
            })
            .unwrap_or_default();
        println!(
            "{id:<34} {:>8.3}ms {:>9.1} {:>8.3}ms {:>9.1}  {ratio}",
            t * 1e3,
            gbps(bytes, t),
            te.unwrap_or(f64::NAN) * 1e3,
            te.map_or(f64::NAN, |x| gbps(bytes, x)),
        );
    };
    for dir in ["h2d", "d2h"] {
        for s in ["4k", "64k", "2m"] {
            let grp = format!("{dir}-{s}");
            line(&format!("{grp}/ours"), None, BYTES);
            for b in ["contiguous", "per-page-loop", "batch", "managed-prefetch"] {
                let id = format!("{grp}/{b}");
                if r.device.contains_key(&id) {
                    // Ratio of ours against each baseline: baseline time / our time.
                    let (Some(t), Some(tb)) = (dev(&format!("{grp}/ours")), dev(&id)) else {
                        continue;
                    };
                    let e = match (e2e(&format!("{grp}/ours")), e2e(&id)) {
                        (Some(x), Some(y)) => format!("{:.3}", y / x),
                        _ => "-".into(),
                    };
                    println!(
                        "  vs {:<30} {:>8.3}ms {:>9.1} {:>8.3}ms {:>9.1}  ours = {:.3} / {e} x this",
                        b,
                        tb * 1e3,
                        gbps(BYTES, tb),
                        e2e(&id).unwrap_or(f64::NAN) * 1e3,
                        e2e(&id).map_or(f64::NAN, |x| gbps(BYTES, x)),
                        tb / t
                    );
                }
            }
        }
    }
    for s in ["4k", "64k", "2m"] {
        let grp = format!("p2p-{s}");
        line(&format!("{grp}/d2d-contiguous"), None, BYTES);
        line(
            &format!("{grp}/ours-push"),
            Some(&format!("{grp}/d2d-contiguous")),
            BYTES,
        );
    }
    if let Some(n) = r.notes.get("mixed") {
        println!("mixed: {n}");
    }
    let m = |x: &str| format!("mixed-4k/{x}");
    let sum = |ids: &[&str], f: &dyn Fn(&str) -> Option<f64>| {
        ids.iter().map(|i| f(&m(i))).sum::<Option<f64>>()
    };
    line(&m("by-source"), None, BYTES);
    line(&m("consecutive"), Some(&m("by-source")), BYTES);
    let raw = ["raw-system-h2d", "raw-pagemap0-d2d", "raw-pagemap1-d2d"];
    let ours = ["part-system", "part-pagemap0", "part-pagemap1"];
    for (name, ids) in [
        ("sum of raw contiguous parts", &raw),
        ("sum of our parts alone", &ours),
    ] {
        if let (Some(t), Some(b)) = (sum(ids, &dev), dev(&m("by-source"))) {
            let e = match (sum(ids, &e2e), e2e(&m("by-source"))) {
                (Some(x), Some(y)) => format!("{:.3}", x / y),
                _ => "-".into(),
            };
            println!(
                "  {name:<32} {:>8.3}ms {:>9.1}  by-source = {:.3} / {e} x this",
                t * 1e3,
                gbps(BYTES, t),
                t / b
            );
        }
    }
    println!("crossover (4 KiB pages in runs; kernel vs one DMA per run):");
    for run in [64u64, 256, 1024, 2048, 4096, 16384, 65536] {
        let grp = format!("crossover-{run}k");
        let pair = |a: &str, b: &str| match (dev(&format!("{grp}/{a}")), dev(&format!("{grp}/{b}")))
        {
            (Some(x), Some(y)) => format!(
                "kernel {:>7.1} GB/s, dma {:>7.1} GB/s (dma/kernel time {:.3})",
                gbps(BYTES, x),
                gbps(BYTES, y),
                y / x
            ),
            _ => "n/a".into(),
        };
        println!(
            "  run {:>6} KiB  h2d: {}  d2d: {}",
            run,
            pair("h2d-kernel", "h2d-dma"),
            pair("d2d-kernel", "d2d-dma")
        );
    }
    for (id, n) in &r.notes {
        if id != "mixed" {
            println!("note {id}: {n}");
        }
    }
    // Targets.
    let tgt = |what: &str, ours: &str, base: &str, want: f64| {
        if let (Some(t), Some(tb)) = (dev(ours), dev(base)) {
            let ratio = tb / t;
            let e = match (e2e(ours), e2e(base)) {
                (Some(x), Some(y)) => format!("{:.3}", y / x),
                _ => "-".into(),
            };
            println!(
                "TARGET {what:<44} {:.3} (incl. issue {e}) want >= {want:.2}  {}",
                ratio,
                if ratio >= want { "MET" } else { "MISSED" }
            );
        }
    };
    tgt(
        "scattered 4 KiB h2d vs contiguous",
        "h2d-4k/ours",
        "h2d-4k/contiguous",
        0.90,
    );
    tgt(
        "scattered 4 KiB d2h vs contiguous",
        "d2h-4k/ours",
        "d2h-4k/contiguous",
        0.90,
    );
    for s in ["4k", "64k", "2m"] {
        tgt(
            &format!("pagemap->pagemap {s} vs d2d"),
            &format!("p2p-{s}/ours-push"),
            &format!("p2p-{s}/d2d-contiguous"),
            0.80,
        );
    }
    tgt(
        "mixed by-source vs consecutive",
        &m("by-source"),
        &m("consecutive"),
        1.0,
    );
}

fn main() {
    if let Err(reason) = drm_pagemap_cuda::probe_with(&env_config()) {
        println!("skipped: {reason}");
        return;
    }
    let env = Env::new();
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1200))
        .configure_from_args();
    let only = std::env::var("DRM_PAGEMAP_CUDA_BENCH").unwrap_or_default();
    let want = |s: &str| only.is_empty() || only.split(',').any(|x| x == s);
    if want("transfers") {
        transfers(&mut c, &env);
    }
    if want("mixed") {
        mixed(&mut c, &env);
    }
    if want("crossover") {
        crossover(&mut c, &env);
    }
    c.final_summary();
    summary(&env);
    if let Some(path) = std::env::var_os("DRM_PAGEMAP_BENCH_JSON").filter(|p| !p.is_empty()) {
        let path = std::path::PathBuf::from(path);
        match write_json(&env, &path) {
            Ok(n) => println!("results: {n} rows written to {}", path.display()),
            Err(e) => {
                eprintln!("error: writing {}: {e}", path.display());
                std::process::exit(1);
            }
        }
    }
}

/// Writes the rows measured as JSON lines (see the crate doc above); returns the row count.
fn write_json(env: &Env, path: &std::path::Path) -> std::io::Result<usize> {
    use std::io::Write;
    let g = RESULTS.lock().unwrap();
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    let d0 = &env.backend.devices()[0];
    let meta = serde_json::json!({
        "bench": "cuda_copy",
        "kind": "meta",
        "gpu": d0.name.to_string(),
        "driver": env.backend.driver_version().to_string(),
        "kernel": env.pms[0].kernel_origin().unwrap_or_else(|e| e.to_string()),
    });
    writeln!(out, "{meta}")?;
    let mut n = 0;
    if let Some(r) = g.as_ref() {
        for (id, &(secs, iters)) in &r.device {
            let (group, row) = id.split_once('/').unwrap_or((id.as_str(), ""));
            let rec = serde_json::json!({
                "bench": "cuda_copy",
                "kind": "row",
                "group": group,
                "row": row,
                "bytes": BYTES,
                "device_s": secs / iters.max(1) as f64,
                "iters": iters,
                "issue_s": r.e2e.get(id),
            });
            writeln!(out, "{rec}")?;
            n += 1;
        }
    }
    out.flush()?;
    Ok(n)
}
