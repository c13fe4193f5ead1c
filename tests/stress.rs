//! Concurrency stress: many threads fault (CPU reads and writes of device pages), migrate,
//! evict and read overlapping ranges of one address space at the same time, for a fixed
//! time and at least a minimum number of operations per thread.
//!
//! Data design: every page is cut into 16 slots of 256 bytes; worker `t` owns slot `t` of
//! every page and is its only writer. A slot holds a self-checking stamp (owner, range, page,
//! sequence number, and 240 bytes derived from them), so every read can check
//! - its own slots exactly (the last sequence number it wrote, read-your-writes);
//! - everyone's slots for shape (no torn, shifted or foreign bytes) and for progress
//!   (a sequence number it saw once never goes back: no stale copy resurrected);
//!
//! and at the end every slot of every page holds its owner's last stamp.
//!
//! A deadlock fails the test through a watchdog: if no worker makes progress for 60 s the
//! test panics with what each worker was doing (the limit is generous: the machine may be
//! loaded; it only has to be finite). Wall-clock speed never decides pass or fail: the run
//! lasts `max(duration, min operations)`.
//!
//! Sizes: 10 workers + 1 range-churn thread (+ 1 fault-arming thread in the fault variant),
//! 3 s per variant by default; `DRM_PAGEMAP_LONG=1` runs 60 s per variant,
//! `DRM_PAGEMAP_STRESS_SECS=n` sets it.

mod common;

use drm_pagemap::sim::{SimBackend, SimConfig};
use drm_pagemap::{
    AddressSpace, Backend, BackendConfig, BackendErrorKind, BusyReason, Coalesce, Error,
    FenceError, Machine, MigrateDetails, PageLocation, PageSize, PagemapId, VaRange,
};
use drm_pagemap_testkit::inject::{FaultInjector, FaultSite};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const WORKERS: usize = 10;
const SLOT: usize = 256;
const DEVICES: usize = 3;
const MIN_OPS_PER_WORKER: u64 = 150;
/// No worker progressed for this long: a deadlock.
const STALL_LIMIT: Duration = Duration::from_secs(60);

/// The shared ranges: (start, pages, page size).
const RANGES: [(u64, usize, PageSize); 3] = [
    (1 << 30, 48, PageSize::Size4K),
    ((1 << 30) + (1 << 24), 32, PageSize::Size4K),
    ((1 << 30) + (2 << 24), 4, PageSize::Size64K),
];

fn secs() -> u64 {
    if let Some(s) = std::env::var("DRM_PAGEMAP_STRESS_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return s;
    }
    let long = std::env::var_os("DRM_PAGEMAP_LONG").is_some_and(|v| v != "0" && !v.is_empty());
    if long { 60 } else { 3 }
}

/// xorshift64*: small, seedable, good enough to pick operations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// The bytes of worker `t`'s slot in (range, page) at sequence `seq` (0: never written,
/// all zeros).
fn stamp(t: usize, range: usize, page: usize, seq: u64) -> [u8; SLOT] {
    let mut s = [0u8; SLOT];
    if seq == 0 {
        return s;
    }
    s[..8].copy_from_slice(&seq.to_le_bytes());
    s[8] = t as u8;
    s[9] = range as u8;
    s[10..12].copy_from_slice(&(page as u16).to_le_bytes());
    let mut x = seq
        ^ ((t as u64) << 48)
        ^ ((range as u64) << 40)
        ^ ((page as u64) << 24)
        ^ 0x9E37_79B9_7F4A_7C15;
    for b in &mut s[12..] {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *b = (x >> 56) as u8;
    }
    s
}

/// The sequence number a slot holds, if it is a well-formed stamp of its place.
fn decode(bytes: &[u8], t: usize, range: usize, page: usize) -> Result<u64, String> {
    let seq = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    if stamp(t, range, page, seq)[..] == *bytes {
        Ok(seq)
    } else {
        Err(format!(
            "slot of worker {t} in range {range} page {page} is not a stamp of its own (seq {seq}, owner byte {}, range byte {}): torn, shifted or foreign bytes",
            bytes[8], bytes[9]
        ))
    }
}

fn slot_va(range: usize, page: usize, t: usize) -> u64 {
    let (start, _, ps) = RANGES[range];
    start + page as u64 * ps.bytes() + (t * SLOT) as u64
}

/// Progress reporting for the watchdog.
struct Progress {
    ops: Vec<AtomicU64>,
    doing: Vec<Mutex<&'static str>>,
}

impl Progress {
    fn new(n: usize) -> Progress {
        Progress {
            ops: (0..n).map(|_| AtomicU64::new(0)).collect(),
            doing: (0..n).map(|_| Mutex::new("starting")).collect(),
        }
    }
    fn set(&self, i: usize, what: &'static str) {
        *self.doing[i].lock().unwrap() = what;
    }
    fn tick(&self, i: usize) {
        self.ops[i].fetch_add(1, Ordering::Relaxed);
    }
    fn total(&self) -> u64 {
        self.ops.iter().map(|o| o.load(Ordering::Relaxed)).sum()
    }
    fn report(&self) -> String {
        (0..self.ops.len())
            .map(|i| {
                format!(
                    "thread {i}: {} ops, now {}",
                    self.ops[i].load(Ordering::Relaxed),
                    self.doing[i].lock().unwrap()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Counts a thread as finished when dropped, also when it panics (the panic then surfaces
/// at `join`, not as a suspected deadlock).
struct Done(Arc<AtomicUsize>);

impl Drop for Done {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// Waits for `done` to reach `threads`; fails when the total progress stalls for `limit`.
fn watchdog(
    progress: &Progress,
    done: &AtomicUsize,
    threads: usize,
    limit: Duration,
) -> Result<(), String> {
    let mut last = progress.total();
    let mut since = Instant::now();
    while done.load(Ordering::SeqCst) < threads {
        thread::sleep(Duration::from_millis(20));
        let now = progress.total();
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() > limit {
            return Err(format!(
                "deadlock suspected: no thread progressed for {limit:?}\n{}",
                progress.report()
            ));
        }
    }
    Ok(())
}

#[derive(Default)]
struct Counts {
    writes: AtomicU64,
    reads: AtomicU64,
    migrations: AtomicU64,
    busy: AtomicU64,
    evictions: AtomicU64,
    failed_injected: AtomicU64,
    churns: AtomicU64,
    gpu_faults: AtomicU64,
    /// The longest CPU read or write, in microseconds.
    worst_cpu_us: AtomicU64,
}

/// The longest any CPU access may take, however busy the movers are: the longest timeslice
/// the workers give (1 ms), the copies of its pages, and a generous allowance for 12 threads
/// on a loaded 2-core machine. A CPU access claims its pages while it waits, so movers
/// cannot renew the timeslice under it (issue 11, D3); the watchdog only catches stops.
const CPU_ACCESS_BOUND: Duration = Duration::from_secs(5);

struct Shared {
    mm: Arc<AddressSpace>,
    /// GPU VMs (one per device) of an xe-svm context, in the GPU variant.
    vms: Vec<xe_svm::GpuVm>,
    stop: AtomicBool,
    faults: bool,
    counts: Counts,
    errors: Mutex<Vec<String>>,
    progress: Progress,
}

impl Shared {
    /// Records how long a CPU access that started at `t0` took.
    fn cpu_took(&self, t0: Instant) {
        let us = t0.elapsed().as_micros() as u64;
        self.counts.worst_cpu_us.fetch_max(us, Ordering::Relaxed);
    }

    fn fail(&self, msg: String) {
        let mut e = self.errors.lock().unwrap();
        if e.len() < 20 {
            e.push(msg);
        }
    }
}

fn injected(e: &Error) -> bool {
    match e {
        Error::Backend { source, .. } => source.kind == BackendErrorKind::Injected,
        Error::Fence {
            source: FenceError::Failed(b),
            ..
        } => b.kind == BackendErrorKind::Injected,
        _ => false,
    }
}

/// Errors a racing GPU fault may legitimately meet: the engine's, wrapped, or the SVM
/// layer's own "pages kept moving" and "no room".
fn tolerated_svm(sh: &Shared, e: &xe_svm::SvmError) -> bool {
    use xe_svm::SvmError as S;
    match e {
        S::Unstable { .. } | S::OutOfDeviceMemory { .. } => true,
        S::Migrate { source, .. }
        | S::ToSystem { source, .. }
        | S::PageTable { source, .. }
        | S::Core(source) => tolerated(sh, source),
        _ => false,
    }
}

/// Errors a racing operation may legitimately meet.
fn tolerated(sh: &Shared, e: &Error) -> bool {
    if sh.faults && injected(e) {
        sh.counts.failed_injected.fetch_add(1, Ordering::Relaxed);
        return true;
    }
    match e {
        Error::Busy { reason, .. } => {
            sh.counts.busy.fetch_add(1, Ordering::Relaxed);
            matches!(
                reason,
                BusyReason::PageLocked
                    | BusyReason::Fragmentation
                    | BusyReason::EvictIncomplete
                    | BusyReason::CpuAccess
            )
        }
        Error::NoSuchAllocation { .. } => true, // evicted or released by someone else first
        _ => false,
    }
}

/// Errors a CPU read or write may meet: only injected faults. A CPU access names no
/// allocation and is never refused as busy, whatever other threads release meanwhile
/// (issue 11, D2: it used to fail with `NoSuchAllocation` when a racing fault, migration
/// or eviction took its allocation's last pages).
fn tolerated_cpu(sh: &Shared, e: &Error) -> bool {
    if sh.faults && injected(e) {
        sh.counts.failed_injected.fetch_add(1, Ordering::Relaxed);
        return true;
    }
    false
}

fn worker(sh: &Shared, t: usize, seed: u64) -> Vec<Vec<u64>> {
    let mut rng = Rng(seed | 1);
    // mine[range][page]: the last sequence number I wrote (and saw succeed).
    let mut mine: Vec<Vec<u64>> = RANGES.iter().map(|r| vec![0; r.1]).collect();
    // seen[range][page][owner]: the highest sequence number I read from each owner.
    let mut seen: Vec<Vec<[u64; WORKERS]>> =
        RANGES.iter().map(|r| vec![[0; WORKERS]; r.1]).collect();
    let start = Instant::now();
    let mut ops = 0u64;
    let dur = Duration::from_secs(secs());
    while !(sh.stop.load(Ordering::Relaxed)
        || (start.elapsed() >= dur && ops >= MIN_OPS_PER_WORKER))
    {
        let r = rng.below(RANGES.len() as u64) as usize;
        let (rstart, pages, ps) = RANGES[r];
        let page = rng.below(pages as u64) as usize;
        match rng.below(100) {
            0..=29 => {
                sh.progress.set(t, "write own slot");
                let seq = mine[r][page] + 1;
                let t0 = Instant::now();
                let wrote = sh.mm.write(slot_va(r, page, t), &stamp(t, r, page, seq));
                sh.cpu_took(t0);
                match wrote {
                    Ok(()) => {
                        mine[r][page] = seq;
                        sh.counts.writes.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) if tolerated_cpu(sh, &e) => {}
                    Err(e) => sh.fail(format!("worker {t}: write: {e}")),
                }
            }
            30..=44 => {
                sh.progress.set(t, "read own slot");
                let mut b = [0u8; SLOT];
                let t0 = Instant::now();
                let read = sh.mm.read(slot_va(r, page, t), &mut b);
                sh.cpu_took(t0);
                match read {
                    Ok(()) => {
                        sh.counts.reads.fetch_add(1, Ordering::Relaxed);
                        match decode(&b, t, r, page) {
                            Ok(s) if s == mine[r][page] => {}
                            Ok(s) => sh.fail(format!(
                                "worker {t}: range {r} page {page}: my slot holds seq {s}, I last wrote {}",
                                mine[r][page]
                            )),
                            Err(e) => sh.fail(format!("worker {t}: {e}")),
                        }
                    }
                    Err(e) if tolerated_cpu(sh, &e) => {}
                    Err(e) => sh.fail(format!("worker {t}: read: {e}")),
                }
            }
            45..=54 => {
                sh.progress.set(t, "read pages");
                let n = (1 + rng.below(4) as usize).min(pages - page);
                let mut b = vec![0u8; n * ps.bytes() as usize];
                let t0 = Instant::now();
                let read = sh.mm.read(rstart + page as u64 * ps.bytes(), &mut b);
                sh.cpu_took(t0);
                match read {
                    Ok(()) => {
                        sh.counts.reads.fetch_add(1, Ordering::Relaxed);
                        for p in 0..n {
                            let pb = &b[p * ps.bytes() as usize..];
                            for o in 0..WORKERS {
                                let slot = &pb[o * SLOT..(o + 1) * SLOT];
                                match decode(slot, o, r, page + p) {
                                    Ok(s) => {
                                        let was = &mut seen[r][page + p][o];
                                        if o == t && s != mine[r][page + p] {
                                            sh.fail(format!("worker {t}: range {r} page {}: my slot holds {s}, I wrote {}", page + p, mine[r][page + p]));
                                        }
                                        if s < *was {
                                            sh.fail(format!(
                                                "worker {t}: range {r} page {}: worker {o}'s slot went back from {} to {s} (stale data)",
                                                page + p,
                                                *was
                                            ));
                                        }
                                        *was = s.max(*was);
                                    }
                                    Err(e) => sh.fail(format!("worker {t}: {e}")),
                                }
                            }
                            // The rest of the page was never written: zeros.
                            if pb[WORKERS * SLOT..ps.bytes() as usize]
                                .iter()
                                .any(|&x| x != 0)
                            {
                                sh.fail(format!("worker {t}: range {r} page {}: bytes past the slots are not zero", page + p));
                            }
                        }
                    }
                    Err(e) if tolerated_cpu(sh, &e) => {}
                    Err(e) => sh.fail(format!("worker {t}: read pages: {e}")),
                }
            }
            55..=84 => {
                sh.progress.set(t, "migrate");
                let n = (1 + rng.below(16) as usize).min(pages - page);
                let range = VaRange::new(rstart + page as u64 * ps.bytes(), n as u64 * ps.bytes());
                let to = PagemapId(rng.below(DEVICES as u64) as u8);
                let d = MigrateDetails {
                    timeslice: if rng.chance(5) {
                        Duration::from_millis(1)
                    } else {
                        Duration::ZERO
                    },
                    can_migrate_same_pagemap: rng.chance(50),
                    source_peer_migrates: rng.chance(80),
                    coalesce: if rng.chance(50) {
                        Coalesce::BySource
                    } else {
                        Coalesce::Consecutive
                    },
                    fence_timeout: None,
                    ..MigrateDetails::default()
                };
                match sh.mm.migrate(range, to, &d) {
                    Ok(_) => {
                        sh.counts.migrations.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) if tolerated(sh, &e) => {}
                    Err(e) => sh.fail(format!("worker {t}: migrate {range} to {to}: {e}")),
                }
            }
            85..=94 if !sh.vms.is_empty() && rng.chance(50) => {
                sh.progress.set(t, "GPU fault");
                let vm = &sh.vms[rng.below(sh.vms.len() as u64) as usize];
                let access = match rng.below(3) {
                    0 => xe_svm::Access::Read,
                    1 => xe_svm::Access::Write,
                    _ => xe_svm::Access::Atomic,
                };
                let va = slot_va(r, page, rng.below(WORKERS as u64) as usize);
                match vm.handle_gpu_fault(va, access) {
                    Ok(_) => {
                        sh.counts.gpu_faults.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) if tolerated_svm(sh, &e) => {}
                    Err(e) => sh.fail(format!(
                        "worker {t}: GPU fault at {va:#x} ({access:?}): {e}"
                    )),
                }
            }
            85..=94 => {
                sh.progress.set(t, "evict");
                // Either the allocation under a page, or any allocation of the address space
                // (possibly of the churn thread's range, being freed right now).
                let alloc = if rng.chance(70) {
                    match sh.mm.location(rstart + page as u64 * ps.bytes()) {
                        Ok(PageLocation::Device { alloc, .. }) => Some(alloc),
                        _ => None,
                    }
                } else {
                    let all = sh.mm.allocations();
                    (!all.is_empty()).then(|| all[rng.below(all.len() as u64) as usize].id)
                };
                if let Some(a) = alloc {
                    match sh.mm.evict_to_ram(a) {
                        Ok(_) => {
                            sh.counts.evictions.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) if tolerated(sh, &e) => {}
                        Err(e) => sh.fail(format!("worker {t}: evict {a}: {e}")),
                    }
                }
            }
            _ => {
                sh.progress.set(t, "layout");
                let range = VaRange::new(rstart, pages as u64 * ps.bytes());
                if let Err(e) = sh.mm.locations(range) {
                    sh.fail(format!("worker {t}: locations: {e}"));
                }
            }
        }
        ops += 1;
        sh.progress.tick(t);
    }
    sh.progress.set(t, "done");
    mine
}

/// Creates, fills, migrates and frees a private range over and over, while the workers evict
/// its allocations.
fn churn(sh: &Shared, idx: usize) {
    let base = 3u64 << 30;
    let mut rng = Rng(0xC0FFEE);
    let start = Instant::now();
    let dur = Duration::from_secs(secs());
    let mut rounds = 0u64;
    while !(sh.stop.load(Ordering::Relaxed) || (start.elapsed() >= dur && rounds >= 20)) {
        sh.progress.set(idx, "churn: create");
        let pages = 1 + rng.below(16);
        let r = VaRange::new(base, pages * 4096);
        if let Err(e) = sh.mm.create_range(r, PageSize::Size4K) {
            sh.fail(format!("churn: create: {e}"));
            return;
        }
        sh.progress.set(idx, "churn: write");
        let fill: Vec<u8> = (0..r.len).map(|i| (i as u8) ^ (rounds as u8)).collect();
        let wrote = match sh.mm.write(base, &fill) {
            Ok(()) => true,
            Err(e) if tolerated_cpu(sh, &e) => false,
            Err(e) => {
                sh.fail(format!("churn: write: {e}"));
                false
            }
        };
        sh.progress.set(idx, "churn: migrate");
        for _ in 0..3 {
            let to = PagemapId(rng.below(DEVICES as u64) as u8);
            match sh.mm.migrate(r, to, &MigrateDetails::default()) {
                Ok(_) => {}
                Err(e) if tolerated(sh, &e) => {}
                Err(e) => sh.fail(format!("churn: migrate: {e}")),
            }
        }
        if wrote && rng.chance(50) {
            sh.progress.set(idx, "churn: read back");
            let mut b = vec![0u8; r.len as usize];
            match sh.mm.read(base, &mut b) {
                Ok(()) if b == fill => {}
                Ok(()) => sh.fail("churn: read back differs from what was written".into()),
                Err(e) if tolerated_cpu(sh, &e) => {}
                Err(e) => sh.fail(format!("churn: read: {e}")),
            }
        }
        sh.progress.set(idx, "churn: free");
        if let Err(e) = sh.mm.free_range(base) {
            sh.fail(format!("churn: free: {e}"));
            return;
        }
        rounds += 1;
        sh.counts.churns.fetch_add(1, Ordering::Relaxed);
        sh.progress.tick(idx);
    }
    sh.progress.set(idx, "done");
}

/// Arms one random fault (the nth operation from now at a random site fails), then pauses.
fn arm_random_fault(inj: &FaultInjector, rng: &mut Rng) {
    let site = match rng.below(4) {
        0 => FaultSite::Alloc,
        1 => FaultSite::Map,
        2 => FaultSite::Copy,
        _ => FaultSite::FenceError,
    };
    inj.fail_nth(site, 1 + rng.below(20));
    thread::sleep(Duration::from_millis(2));
}

/// Where a run's devices come from: the simulated backend (small device memories, so that
/// memory runs out; its own counters check for leaks), or any registered backend through the
/// test rig (its audit checks that every allocation is released once and every mapping
/// undone).
enum Devices {
    Sim {
        sim: SimBackend,
        host_free: u64,
    },
    Rig(common::Rig),
    /// Any backend under an xe-svm context (the context adds the pagemaps itself): the
    /// address space's own checks only.
    Svm(&'static str),
}

fn run(faults: bool, gpu: bool) {
    run_on("sim", faults, gpu);
}

/// One stress run on backend `b`; `gpu` (the xe-svm variant) on sim only.
fn run_on(b: &'static str, faults: bool, gpu: bool) {
    let inj = FaultInjector::new();
    if b != "sim" && gpu {
        let cfg = BackendConfig {
            devices: Some(DEVICES),
            // A GPU backend as the environment configures it (gpu-run.sh's variables).
            ..BackendConfig::from_env()
        };
        let backend: Arc<dyn Backend> =
            Arc::from(drm_pagemap::open_backend(b, &cfg).expect("open backend"));
        // 16 MiB per pagemap, as on sim.
        let m = Machine::build(backend.clone(), DEVICES, &[], Some(16 << 20)).expect("pagemaps");
        let (host, pagemaps) = if faults {
            (
                inj.wrap_host(backend.host_memory()),
                m.pagemaps.iter().map(|p| inj.wrap_pagemap(p)).collect(),
            )
        } else {
            (backend.host_memory(), m.pagemaps.clone())
        };
        let mm = Arc::new(AddressSpace::new(host));
        let svm = xe_svm::Svm::new(mm.clone(), pagemaps, xe_svm::SvmConfig::default())
            .expect("svm context");
        let vms = (0..DEVICES as u8)
            .map(|k| svm.vm(PagemapId(k)).expect("gpu vm"))
            .collect();
        return drive(mm, vms, Some(svm), Devices::Svm(b), faults, &inj);
    }
    if b != "sim" {
        let mut opts = common::Options::on(b);
        if faults {
            opts = opts.faults(&inj);
        }
        let rig = common::machine(DEVICES, &opts);
        return drive(
            rig.mm.clone(),
            Vec::new(),
            None,
            Devices::Rig(rig),
            faults,
            &inj,
        );
    }
    let sim = SimBackend::new(SimConfig {
        devices: DEVICES,
        device_capacity: 16 << 20,
        host_capacity: 64 << 20,
        owner_groups: None,
        copy_latency: Duration::from_micros(50),
        resident: false,
        faults: faults.then(|| inj.clone()),
        host_bytes: None,
    })
    .unwrap();
    let mm = Arc::new(AddressSpace::new(sim.host_memory()));
    let mut vms = Vec::new();
    let svm = if gpu {
        let svm = xe_svm::Svm::new(
            mm.clone(),
            sim.pagemap_per_device().unwrap(),
            xe_svm::SvmConfig::default(),
        )
        .expect("svm context");
        vms = (0..DEVICES as u8)
            .map(|k| svm.vm(PagemapId(k)).expect("gpu vm"))
            .collect();
        Some(svm)
    } else {
        for pm in sim.pagemap_per_device().unwrap() {
            mm.add_pagemap(pm).unwrap();
        }
        None
    };
    let host_free = sim.arena_host().free_granules();
    drive(mm, vms, svm, Devices::Sim { sim, host_free }, faults, &inj);
}

/// Creates the ranges, runs the workers, the churn thread and (with `faults`) the fault
/// armer, then checks every slot and that nothing leaked.
fn drive(
    mm: Arc<AddressSpace>,
    vms: Vec<xe_svm::GpuVm>,
    svm: Option<xe_svm::Svm>,
    devices: Devices,
    faults: bool,
    inj: &Arc<FaultInjector>,
) {
    let gpu = svm.is_some();
    for &(start, pages, ps) in &RANGES {
        mm.create_range(VaRange::new(start, pages as u64 * ps.bytes()), ps)
            .unwrap();
    }
    let threads = WORKERS + 1 + faults as usize;
    let sh = Arc::new(Shared {
        mm,
        vms,
        stop: AtomicBool::new(false),
        faults,
        counts: Counts::default(),
        errors: Mutex::new(Vec::new()),
        progress: Progress::new(threads),
    });
    let done = Arc::new(AtomicUsize::new(0));
    let seed = std::env::var("DRM_PAGEMAP_STRESS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0x5EED, |d| d.as_nanos() as u64)
        });
    let t0 = Instant::now();
    let mut workers = Vec::new();
    for t in 0..WORKERS {
        let (sh, done) = (sh.clone(), done.clone());
        workers.push(thread::spawn(move || {
            let _done = Done(done);
            worker(&sh, t, seed.wrapping_add(t as u64 * 0x9E37_79B9))
        }));
    }
    let mut others = Vec::new();
    {
        let (sh, done) = (sh.clone(), done.clone());
        others.push(thread::spawn(move || {
            let _done = Done(done);
            churn(&sh, WORKERS);
        }));
    }
    if faults {
        let (sh, done, inj) = (sh.clone(), done.clone(), inj.clone());
        others.push(thread::spawn(move || {
            // Arms faults until every other thread is done. Its own progress does not count
            // for the watchdog: it must not hide a stalled engine.
            sh.progress.set(WORKERS + 1, "arming faults");
            let mut rng = Rng(seed ^ 0xBAD5EED);
            while done.load(Ordering::SeqCst) < WORKERS + 1 && !sh.stop.load(Ordering::SeqCst) {
                arm_random_fault(&inj, &mut rng);
            }
            sh.progress.set(WORKERS + 1, "done");
            inj.disarm();
            drop(Done(done));
        }));
    }
    if let Err(e) = watchdog(&sh.progress, &done, threads, STALL_LIMIT) {
        sh.stop.store(true, Ordering::SeqCst);
        panic!("{e}");
    }
    let mine: Vec<Vec<Vec<u64>>> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    for o in others {
        o.join().unwrap();
    }
    let elapsed = t0.elapsed();
    inj.disarm();
    let c = &sh.counts;
    let backend = match &devices {
        Devices::Sim { .. } => "sim",
        Devices::Rig(r) => r.backend_name,
        Devices::Svm(b) => b,
    };
    eprintln!(
        "stress on {backend} ({}{}): {threads} threads, {elapsed:.1?}, {} operations: {} writes, {} reads, {} migrations, {} busy, {} evictions, {} GPU faults, {} failures by {} injected faults, {} range churns, worst CPU access {} us (seed {seed})",
        if faults { "with faults" } else { "no faults" },
        if gpu {
            ", GPU faults through xe-svm"
        } else {
            ""
        },
        sh.progress.total(),
        c.writes.load(Ordering::Relaxed),
        c.reads.load(Ordering::Relaxed),
        c.migrations.load(Ordering::Relaxed),
        c.busy.load(Ordering::Relaxed),
        c.evictions.load(Ordering::Relaxed),
        c.gpu_faults.load(Ordering::Relaxed),
        c.failed_injected.load(Ordering::Relaxed),
        inj.injected(),
        c.churns.load(Ordering::Relaxed),
        c.worst_cpu_us.load(Ordering::Relaxed),
    );
    let worst = Duration::from_micros(c.worst_cpu_us.load(Ordering::Relaxed));
    assert!(
        worst <= CPU_ACCESS_BOUND,
        "a CPU access took {worst:?} (bound {CPU_ACCESS_BOUND:?})"
    );
    let errors = sh.errors.lock().unwrap().clone();
    assert!(
        errors.is_empty(),
        "{} problems, first ones:\n{}",
        errors.len(),
        errors.join("\n")
    );
    // Every slot holds its owner's last stamp.
    for (r, &(start, pages, ps)) in RANGES.iter().enumerate() {
        let mut b = vec![0u8; pages * ps.bytes() as usize];
        sh.mm.read(start, &mut b).unwrap();
        for page in 0..pages {
            let pb = &b[page * ps.bytes() as usize..];
            for (t, m) in mine.iter().enumerate() {
                let want = stamp(t, r, page, m[r][page]);
                assert!(
                    pb[t * SLOT..(t + 1) * SLOT] == want[..],
                    "range {r} page {page}: worker {t}'s slot lost its last write (seq {}): {:?}",
                    m[r][page],
                    decode(&pb[t * SLOT..(t + 1) * SLOT], t, r, page)
                );
            }
        }
    }
    // Nothing left on a device, nothing leaked.
    for &(start, _, _) in &RANGES {
        sh.mm.free_range(start).unwrap();
    }
    assert!(
        sh.mm.allocations().is_empty(),
        "allocations left: {:?}",
        sh.mm.allocations()
    );
    assert_eq!(sh.mm.deferred_cleanups(), 0);
    match &devices {
        Devices::Sim { sim, host_free } => {
            for k in 0..DEVICES as u8 {
                let s = sim.stats(PagemapId(k)).unwrap();
                assert_eq!(s.used_bytes, 0, "pagemap {k}: device bytes still in use");
                assert_eq!(
                    s.allocations, s.releases,
                    "pagemap {k}: allocations and releases differ"
                );
            }
            assert_eq!(
                sim.arena_host().free_granules(),
                *host_free,
                "host frames leaked"
            );
        }
        Devices::Rig(rig) => {
            rig.audit.assert_all_released_once();
            rig.audit.assert_mappings_balanced_since(0);
        }
        Devices::Svm(_) => {
            if let Some(svm) = &svm {
                for k in 0..DEVICES as u8 {
                    let used = svm.memory(PagemapId(k)).expect("pagemap").used;
                    assert_eq!(used, 0, "pagemap {k}: xe-svm still accounts {used} bytes");
                }
            }
        }
    }
    // Every backend here declares no command limit and bridges host fences itself (sim: its
    // engine thread; CUDA: the fence worker): xe-svm handed each call on whole and never
    // waited for a pre-fence on a faulting thread.
    if let Some(svm) = &svm {
        let s = svm.total_stats();
        assert_eq!(
            (s.total_limited_calls(), s.total_commands()),
            (0, 0),
            "the policy split a call"
        );
        assert_eq!(
            s.cpu_fence_waits.count, 0,
            "a pre-fence was waited on the CPU"
        );
    }
    // The run did what it claims: every kind of operation happened.
    assert!(
        c.migrations.load(Ordering::Relaxed) > 0
            && c.evictions.load(Ordering::Relaxed) > 0
            && c.writes.load(Ordering::Relaxed) > 0
    );
    if faults {
        assert!(inj.injected() > 0, "no fault was injected");
    }
    if gpu {
        assert!(
            c.gpu_faults.load(Ordering::Relaxed) > 0,
            "no GPU fault succeeded"
        );
    }
    drop(svm);
}

#[test]
fn threads_fault_migrate_evict_and_read() {
    run(false, false);
}

#[test]
fn threads_with_injected_faults() {
    run(true, false);
}

#[test]
fn threads_on_the_gpu_backends_with_and_without_faults() {
    // Every registered backend other than sim that is available here (CUDA on a GPU
    // machine; elsewhere `backends()` prints why it is skipped and this runs nothing).
    for b in common::backends().into_iter().filter(|&b| b != "sim") {
        run_on(b, false, false);
        run_on(b, true, false);
    }
}

#[test]
fn threads_with_gpu_faults_on_the_gpu_backends() {
    // As above, through an xe-svm context: GPU faults of every device race the workers.
    for b in common::backends().into_iter().filter(|&b| b != "sim") {
        run_on(b, false, true);
        run_on(b, true, true);
    }
}

#[test]
fn threads_with_gpu_faults_through_xe_svm() {
    run(false, true);
}

#[test]
fn the_watchdog_reports_a_stuck_thread() {
    // A worker that never progresses (stuck on a fence that never signals) must be reported,
    // with what it was doing.
    let progress = Progress::new(2);
    let done = AtomicUsize::new(1);
    progress.set(1, "waiting for a fence that never signals");
    let r = watchdog(&progress, &done, 2, Duration::from_millis(200));
    let e = r.expect_err("a stuck thread went unnoticed");
    assert!(
        e.contains("deadlock suspected") && e.contains("never signals"),
        "{e}"
    );
}

#[test]
fn stamps_detect_torn_and_foreign_bytes() {
    let s = stamp(3, 1, 7, 42);
    assert_eq!(decode(&s, 3, 1, 7), Ok(42));
    assert_eq!(decode(&[0u8; SLOT], 3, 1, 7), Ok(0));
    assert!(decode(&s, 4, 1, 7).is_err(), "another owner's stamp");
    assert!(decode(&s, 3, 1, 8).is_err(), "another page's stamp");
    let mut torn = s;
    torn[200] ^= 1;
    assert!(decode(&torn, 3, 1, 7).is_err(), "a torn stamp");
    let mut mixed = stamp(3, 1, 7, 43);
    mixed[128..].copy_from_slice(&s[128..]);
    assert!(decode(&mixed, 3, 1, 7).is_err(), "half of an older stamp");
}

#[test]
fn threads_with_gpu_faults_and_injected_faults() {
    run(true, true);
}
