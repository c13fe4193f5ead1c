//! The harness shared by the engine's scenario and data-integrity suites.
//!
//! - [`build`] opens a backend, creates a range, writes a distinct pattern into every page the
//!   layout populates (holes stay unpopulated) and migrates pages until the layout reads as
//!   asked.
//! - Every pagemap and the host memory are wrapped by an [`Audit`] (outermost) and, when the
//!   options carry one, by a [`FaultInjector`] (inside the audit). The audit records every
//!   allocation, release, mapping, unmapping and copy call, so "released exactly once" and
//!   "every mapping undone" are checked on any backend, not only on sim. It can also hold copy
//!   fences or pre-migrate fences behind a [`Gate`], fail `populate_devmem_pfn`, and refuse
//!   `copy_to_ram`.
//! - [`backends`] lists the backends every backend-generic scenario runs on: always "sim",
//!   plus "cuda" and "level-zero" when the registry reports them available; otherwise it
//!   prints one line `skipped: NAME: <reason>` per test binary. Level Zero runs on the
//!   workspace's software driver through the real loader ([`route_level_zero`], called first).
//!
//! Checks that only the simulated backend can make (its statistics, copy latency) go through
//! [`Rig::sim`] and are labelled "sim-only" where they are used.

#![allow(dead_code)]

#[cfg(feature = "plugins")]
pub mod plugins;

use drm_pagemap::sim::{SimBackend, SimConfig, SimStats};
use drm_pagemap::{
    AddressSpace, Backend, BackendConfig, BackendError, BackendErrorKind, CopyCall, CopyCaps,
    CopyOp, CopyRequest, DeviceId, DevmemBacking, DevmemOps, Direction, DmaAddr, Error, Fence,
    FenceArray, FenceContext, HostFence, HostFrame, HostMemory, Machine, MigrateDetails,
    MigrateReport, PageLocation, PageSize, Pagemap, PagemapId, PagemapOps, Pfn, VaRange,
};
use drm_pagemap_testkit::inject::FaultInjector;
use drm_pagemap_testkit::layout::{self, LayoutPage};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

/// Where every range of the suites starts (1 GiB: aligned for every page size).
pub const BASE: u64 = 1 << 30;

/// Longest a test waits for something that must happen (deadlock detection only).
pub const DEADLOCK: Duration = Duration::from_secs(60);

static SKIP_CUDA: Once = Once::new();
static SKIP_LEVEL_ZERO: Once = Once::new();

/// The software Level Zero driver's settings for these suites (a value already set in the
/// environment wins): 4 devices, all peers, 1 GiB of device memory each.
pub const ZE_SOFT_SETTINGS: &[(&str, &str)] =
    &[("ZE_SOFT_DEVICES", "4"), ("ZE_SOFT_DEVICE_MEMORY", "1G")];

/// Points the Level Zero loader at the software driver (`ze_soft::route_loader_with`, the
/// settings above first) unless `DRM_PAGEMAP_LEVEL_ZERO_REAL=1` asks for the drivers the loader
/// finds itself (an Intel GPU's). Must run before anything probes level-zero: the loader
/// runs `zeInit` once per process. Idempotent.
pub fn route_level_zero() -> Result<(), String> {
    if level_zero_is_real() {
        return Ok(());
    }
    ze_soft::route_loader_with(ZE_SOFT_SETTINGS).map(drop)
}

/// Whether `DRM_PAGEMAP_LEVEL_ZERO_REAL=1` asks for the loader's own drivers (real hardware)
/// instead of the software driver.
pub fn level_zero_is_real() -> bool {
    std::env::var_os("DRM_PAGEMAP_LEVEL_ZERO_REAL").is_some_and(|v| v == "1")
}

/// The backends a backend-generic scenario runs on: "sim" always, "cuda" and "level-zero"
/// when available (level-zero on the software driver, see [`route_level_zero`]); each one
/// missing prints one `skipped: NAME: <reason>` line per test binary.
pub fn backends() -> Vec<&'static str> {
    let routed = route_level_zero();
    let mut out = vec!["sim"];
    let list = drm_pagemap::backends();
    for (name, once) in [("cuda", &SKIP_CUDA), ("level-zero", &SKIP_LEVEL_ZERO)] {
        let status = list.iter().find(|b| b.name == name);
        let why = match (status, &routed) {
            (None, _) => Err("not registered in this build".to_string()),
            (Some(_), Err(e)) if name == "level-zero" => Err(e.clone()),
            (Some(b), _) => b.available.clone(),
        };
        match why {
            Ok(()) => out.push(name),
            Err(reason) => once.call_once(|| say_skipped(name, &reason)),
        }
    }
    // The test plug-ins: the C one (built with `cc`) and the Rust tier (a workspace member).
    #[cfg(feature = "plugins")]
    out.extend(plugins::load_all());
    out
}

/// With `ZE_ENABLE_VALIDATION_LAYER=1` (CI's validation run), the loader's validation layer is
/// really in this process (checked while a level-zero backend is open: the loader and its
/// layers are unloaded when the last user closes it): a run that asks for it cannot pass
/// without it. The 1.8.12 layer
/// prints nothing when it rejects a call, it returns the error (e.g.
/// `ZE_RESULT_ERROR_INVALID_ENUMERATION`), which the backend turns into a failed operation.
fn assert_validation_layer_loaded() {
    if std::env::var_os("ZE_ENABLE_VALIDATION_LAYER").is_some_and(|v| v == "1") {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
        assert!(
            maps.contains("libze_validation_layer"),
            "ZE_ENABLE_VALIDATION_LAYER=1 but the validation layer is not loaded"
        );
    }
}

/// Prints the skip line straight to stderr (the test harness captures `eprintln!` of
/// passing tests; this line is meant to be seen).
fn say_skipped(name: &str, reason: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "skipped: {name}: {reason}");
}

/// How pages are filled with their pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fill {
    /// Every byte of the page.
    Full,
    /// One 8-byte stamp at the start and one at the end of the page (large ranges).
    Stamp,
}

/// How to build a rig.
#[derive(Clone)]
pub struct Options {
    /// The backend ("sim", "cuda", "level-zero").
    pub backend: &'static str,
    /// Pagemaps that get an owner of their own.
    pub foreign: Vec<usize>,
    /// Faults, wrapped around every pagemap and the host memory (generic wrappers).
    pub faults: Option<Arc<FaultInjector>>,
    /// Sim-only: extra time each copy (and clear) takes.
    pub copy_latency: Duration,
    /// Migrate every device page of the layout on its own (one allocation per page).
    pub split_runs: bool,
    /// How pages are filled.
    pub fill: Fill,
    /// The pre-migrate fence of `dest`'s allocations signals only after a second clear,
    /// executed by `helper`'s device `delay` after the first one.
    pub slow_clear: Option<SlowClearSpec>,
    /// Bytes of device memory per device (sim, the plug-ins, level-zero) and at most that
    /// per pagemap (every backend).
    pub device_capacity: Option<u64>,
    /// Bytes of host memory (sim, the plug-ins, level-zero: rounded up to its chunks).
    pub host_capacity: Option<u64>,
}

/// See [`Options::slow_clear`].
#[derive(Clone, Copy, Debug)]
pub struct SlowClearSpec {
    /// The pagemap whose allocations get the slow clear.
    pub dest: usize,
    /// The pagemap whose device executes it (another device than every copy of the test).
    pub helper: usize,
    /// How long after the allocation the clear starts.
    pub delay: Duration,
}

impl Options {
    /// Defaults on `backend`.
    pub fn on(backend: &'static str) -> Options {
        Options {
            backend,
            foreign: Vec::new(),
            faults: None,
            copy_latency: Duration::ZERO,
            split_runs: false,
            fill: Fill::Full,
            slow_clear: None,
            device_capacity: None,
            host_capacity: None,
        }
    }

    /// With pagemap `k` of another owner.
    pub fn foreign(mut self, k: usize) -> Options {
        self.foreign.push(k);
        self
    }

    /// With a fault injector.
    pub fn faults(mut self, inj: &Arc<FaultInjector>) -> Options {
        self.faults = Some(inj.clone());
        self
    }

    /// Sim-only: with copy latency.
    pub fn copy_latency(mut self, d: Duration) -> Options {
        self.copy_latency = d;
        self
    }

    /// One allocation per device page.
    pub fn split_runs(mut self) -> Options {
        self.split_runs = true;
        self
    }

    /// Stamps instead of full pages.
    pub fn stamps(mut self) -> Options {
        self.fill = Fill::Stamp;
        self
    }

    /// With `bytes` of device memory per device (and at most that per pagemap).
    pub fn device_capacity(mut self, bytes: u64) -> Options {
        self.device_capacity = Some(bytes);
        self
    }

    /// With `bytes` of host memory.
    pub fn host_capacity(mut self, bytes: u64) -> Options {
        self.host_capacity = Some(bytes);
        self
    }

    /// With a slow second clear of `dest`'s allocations.
    pub fn slow_clear(mut self, spec: SlowClearSpec) -> Options {
        self.slow_clear = Some(spec);
        self
    }
}

// ---------------------------------------------------------------------------------------
// Patterns

fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Word `k` of page `page` in generation `generation`: never zero, distinct per page,
/// generation and position.
pub fn word(page: u64, generation: u32, k: u64) -> u64 {
    mix((page << 24) ^ ((generation as u64) << 56) ^ k ^ (k << 40)) | 1
}

/// The full content of a page.
pub fn pattern(page: u64, generation: u32, page_size: PageSize) -> Vec<u8> {
    let words = page_size.bytes() / 8;
    let mut out = Vec::with_capacity(page_size.bytes() as usize);
    for k in 0..words {
        out.extend_from_slice(&word(page, generation, k).to_le_bytes());
    }
    out
}

// ---------------------------------------------------------------------------------------
// The audit: a recording wrapper around any backend's pagemaps and host memory.

/// Who provides a mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Provider {
    /// System memory (`map_frames`).
    Host,
    /// A pagemap (`device_map`).
    Pagemap(u8),
}

/// One recorded backend operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A successful `allocate`.
    Alloc {
        /// Pagemap.
        pagemap: u8,
        /// Pages.
        npages: usize,
        /// Bytes (pages times the page size).
        bytes: u64,
        /// The backend's cookie.
        cookie: u64,
    },
    /// A `devmem_release`.
    Release {
        /// Pagemap.
        pagemap: u8,
        /// The backend's cookie.
        cookie: u64,
    },
    /// A successful mapping.
    Map {
        /// Who maps.
        by: Provider,
        /// For which device.
        device: u32,
        /// Direction.
        dir: Direction,
        /// Entries.
        n: usize,
    },
    /// An unmapping.
    Unmap {
        /// Who unmaps.
        by: Provider,
        /// For which device.
        device: u32,
        /// Direction.
        dir: Direction,
        /// Entries with an address.
        n: usize,
    },
    /// A copy call that was accepted by the backend.
    Copy {
        /// Executing pagemap.
        executor: u8,
        /// Operation.
        op: CopyOp,
        /// Entries.
        pages: usize,
        /// Entries with an address (the others are skipped).
        addressed: usize,
        /// Whether a pre-migrate fence came with it.
        pre_fence: bool,
    },
}

/// A fence a test opens by hand.
#[derive(Clone, Debug)]
pub struct Gate(Arc<HostFence>);

impl Default for Gate {
    fn default() -> Self {
        Gate::new()
    }
}

impl Gate {
    /// A closed gate.
    pub fn new() -> Gate {
        Gate(HostFence::new(FenceContext::new(), 1))
    }

    /// The fence.
    pub fn fence(&self) -> Fence {
        Fence::from_host(self.0.clone())
    }

    /// Opens it.
    pub fn open(&self) {
        self.0.signal();
    }

    /// Opens it with an error.
    pub fn fail(&self) {
        self.0.signal_error(BackendError::new(
            BackendErrorKind::Injected,
            "gate failed on purpose",
        ));
    }
}

/// Records every backend operation of a rig; can hold fences and fail operations.
#[derive(Default)]
pub struct Audit {
    events: Mutex<Vec<Event>>,
    copy_gate: Mutex<Option<Fence>>,
    pre_gate: Mutex<Option<Fence>>,
    /// `populate_devmem_pfn` call number (1-based, absolute) that fails; 0: none.
    populate_fail_at: AtomicU64,
    populate_seen: AtomicU64,
    refuse_to_ram: AtomicBool,
    /// 4 KiB granules of host frames allocated and not freed.
    host_granules: AtomicU64,
    /// How long each device allocation sleeps first.
    alloc_delay: Mutex<Duration>,
}

impl Audit {
    fn push(&self, e: Event) {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(e);
    }

    /// Everything recorded so far.
    pub fn events(&self) -> Vec<Event> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// How many events are recorded (a mark for [`Audit::since`]).
    pub fn mark(&self) -> usize {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Events recorded after `mark`.
    pub fn since(&self, mark: usize) -> Vec<Event> {
        self.events.lock().unwrap_or_else(|p| p.into_inner())[mark..].to_vec()
    }

    /// Copy fences returned from now on signal only once `gate` opens too (`None`: normal).
    pub fn hold_copies(&self, gate: Option<&Gate>) {
        *self.copy_gate.lock().unwrap_or_else(|p| p.into_inner()) = gate.map(Gate::fence);
    }

    /// Allocations made from now on carry a pre-migrate fence that also waits for `gate`.
    pub fn hold_pre_fence(&self, gate: Option<&Gate>) {
        *self.pre_gate.lock().unwrap_or_else(|p| p.into_inner()) = gate.map(Gate::fence);
    }

    /// Makes the `n`th `populate_devmem_pfn` from now (1 = next) fail.
    pub fn fail_populate(&self, n: u64) {
        let seen = self.populate_seen.load(Ordering::SeqCst);
        self.populate_fail_at.store(seen + n, Ordering::SeqCst);
    }

    /// Device allocations from now on sleep `d` first (`Duration::ZERO`: normal).
    pub fn slow_allocations(&self, d: Duration) {
        *self.alloc_delay.lock().unwrap_or_else(|p| p.into_inner()) = d;
    }

    /// Makes every `copy_to_ram` fail as unsupported (or stops doing so).
    pub fn refuse_to_ram(&self, on: bool) {
        self.refuse_to_ram.store(on, Ordering::SeqCst);
    }

    /// Waits until a copy by `executor` was accepted after `mark`.
    pub fn wait_for_copy(&self, mark: usize, executor: u8) {
        let t0 = Instant::now();
        loop {
            if self
                .since(mark)
                .iter()
                .any(|e| matches!(e, Event::Copy { executor: x, .. } if *x == executor))
            {
                return;
            }
            assert!(
                t0.elapsed() < DEADLOCK,
                "no copy by pagemap {executor} within {DEADLOCK:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Allocations (pagemap, cookie) made after `mark`.
    pub fn allocs_since(&self, mark: usize) -> Vec<(u8, u64)> {
        self.since(mark)
            .iter()
            .filter_map(|e| match e {
                Event::Alloc {
                    pagemap, cookie, ..
                } => Some((*pagemap, *cookie)),
                _ => None,
            })
            .collect()
    }

    /// Host granules (4 KiB) allocated through the host memory and not freed.
    pub fn host_granules(&self) -> u64 {
        self.host_granules.load(Ordering::SeqCst)
    }

    /// Allocations of pagemap `k` minus its releases, over the whole history.
    pub fn balance(&self, k: u8) -> u64 {
        let mut n = 0u64;
        for e in self.events() {
            match e {
                Event::Alloc { pagemap, .. } if pagemap == k => n += 1,
                Event::Release { pagemap, .. } if pagemap == k => n -= 1,
                _ => {}
            }
        }
        n
    }

    /// Bytes of the allocations of pagemap `k` not released (yet).
    pub fn used_bytes(&self, k: u8) -> u64 {
        let mut live: HashMap<u64, u64> = HashMap::new();
        for e in self.events() {
            match e {
                Event::Alloc {
                    pagemap,
                    bytes,
                    cookie,
                    ..
                } if pagemap == k => {
                    live.insert(cookie, bytes);
                }
                Event::Release { pagemap, cookie } if pagemap == k => {
                    live.remove(&cookie);
                }
                _ => {}
            }
        }
        live.values().sum()
    }

    /// How often each allocation (pagemap, cookie) was released, over the whole history.
    pub fn release_counts(&self) -> HashMap<(u8, u64), usize> {
        let mut m = HashMap::new();
        for e in self.events() {
            if let Event::Release { pagemap, cookie } = e {
                *m.entry((pagemap, cookie)).or_insert(0) += 1;
            }
        }
        m
    }

    /// Asserts that each allocation made after `mark` was released exactly once.
    pub fn assert_released_once_since(&self, mark: usize) {
        let counts = self.release_counts();
        for a in self.allocs_since(mark) {
            assert_eq!(
                counts.get(&a).copied().unwrap_or(0),
                1,
                "allocation {a:?} released once"
            );
        }
    }

    /// Asserts that no allocation made after `mark` was released (yet).
    pub fn assert_not_released_since(&self, mark: usize) {
        let counts = self.release_counts();
        for a in self.allocs_since(mark) {
            assert_eq!(
                counts.get(&a).copied().unwrap_or(0),
                0,
                "allocation {a:?} still held"
            );
        }
    }

    /// Asserts every allocation ever made was released exactly once, and nothing else was.
    pub fn assert_all_released_once(&self) {
        let counts = self.release_counts();
        // A set: stress runs make hundreds of thousands of allocations.
        let allocs: std::collections::HashSet<(u8, u64)> =
            self.allocs_since(0).into_iter().collect();
        for a in &allocs {
            assert_eq!(
                counts.get(a).copied().unwrap_or(0),
                1,
                "allocation {a:?} released exactly once"
            );
        }
        for k in counts.keys() {
            assert!(
                allocs.contains(k),
                "release of {k:?}, which was never allocated"
            );
        }
    }

    /// Asserts every address mapped after `mark` was unmapped again, per (provider, device).
    pub fn assert_mappings_balanced_since(&self, mark: usize) {
        let mut bal: HashMap<(Provider, u32), i64> = HashMap::new();
        for e in self.since(mark) {
            match e {
                Event::Map { by, device, n, .. } => {
                    *bal.entry((by, device)).or_insert(0) += n as i64
                }
                Event::Unmap { by, device, n, .. } => {
                    *bal.entry((by, device)).or_insert(0) -= n as i64
                }
                _ => {}
            }
        }
        for (k, v) in bal {
            assert_eq!(v, 0, "mappings of {k:?} left over");
        }
    }

    /// The copy events after `mark`, as (executor, op, pages).
    pub fn copies_since(&self, mark: usize) -> Vec<(u8, CopyOp, usize)> {
        self.since(mark)
            .iter()
            .filter_map(|e| match e {
                Event::Copy {
                    executor,
                    op,
                    pages,
                    ..
                } => Some((*executor, *op, *pages)),
                _ => None,
            })
            .collect()
    }

    /// The map events after `mark`, as (provider, device, direction, entries).
    pub fn maps_since(&self, mark: usize) -> Vec<(Provider, u32, Direction, usize)> {
        self.since(mark)
            .iter()
            .filter_map(|e| match e {
                Event::Map { by, device, dir, n } => Some((*by, *device, *dir, *n)),
                _ => None,
            })
            .collect()
    }
}

struct AuditPagemap {
    id: u8,
    ops: Arc<dyn PagemapOps>,
    devmem: Arc<dyn DevmemOps>,
    audit: Arc<Audit>,
}

fn gated(f: Fence, gate: Option<Fence>) -> Fence {
    match gate {
        Some(g) => Fence::new(FenceArray::new(vec![f, g])),
        None => f,
    }
}

impl PagemapOps for AuditPagemap {
    fn device_map(
        &self,
        device: DeviceId,
        pfns: &[Pfn],
        page_size: PageSize,
        dir: Direction,
        out: &mut [DmaAddr],
    ) -> Result<(), BackendError> {
        self.ops.device_map(device, pfns, page_size, dir, out)?;
        self.audit.push(Event::Map {
            by: Provider::Pagemap(self.id),
            device: device.0,
            dir,
            n: out.iter().filter(|a| !a.is_none()).count(),
        });
        Ok(())
    }

    fn device_unmap(
        &self,
        device: DeviceId,
        addrs: &[DmaAddr],
        page_size: PageSize,
        dir: Direction,
    ) {
        self.audit.push(Event::Unmap {
            by: Provider::Pagemap(self.id),
            device: device.0,
            dir,
            n: addrs.iter().filter(|a| !a.is_none()).count(),
        });
        self.ops.device_unmap(device, addrs, page_size, dir)
    }
}

impl AuditPagemap {
    fn copy(&self, req: &CopyRequest<'_>, op: CopyOp) -> Result<Fence, BackendError> {
        if op == CopyOp::ToRam && self.audit.refuse_to_ram.load(Ordering::SeqCst) {
            return Err(BackendError::new(
                BackendErrorKind::Unsupported,
                format!("pagemap {} has no copy_to_ram (test)", self.id),
            ));
        }
        let f = match op {
            CopyOp::ToDevmem => self.devmem.copy_to_devmem(req)?,
            CopyOp::ToRam => self.devmem.copy_to_ram(req)?,
        };
        self.audit.push(Event::Copy {
            executor: self.id,
            op,
            pages: req.pages.len(),
            addressed: req.addrs.iter().filter(|a| !a.is_none()).count(),
            pre_fence: req.pre_fence.is_some(),
        });
        let gate = self
            .audit
            .copy_gate
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        Ok(gated(f, gate))
    }
}

impl DevmemOps for AuditPagemap {
    fn allocate(&self, npages: usize, page_size: PageSize) -> Result<DevmemBacking, BackendError> {
        let delay = *self
            .audit
            .alloc_delay
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        let mut b = self.devmem.allocate(npages, page_size)?;
        self.audit.push(Event::Alloc {
            pagemap: self.id,
            npages,
            bytes: npages as u64 * page_size.bytes(),
            cookie: b.cookie,
        });
        let gate = self
            .audit
            .pre_gate
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(g) = gate {
            b.pre_migrate_fence = Some(match b.pre_migrate_fence.take() {
                Some(f) => gated(f, Some(g)),
                None => g,
            });
        }
        Ok(b)
    }

    fn populate_devmem_pfn(
        &self,
        backing: &DevmemBacking,
        out: &mut [Pfn],
    ) -> Result<(), BackendError> {
        let n = self.audit.populate_seen.fetch_add(1, Ordering::SeqCst) + 1;
        if self.audit.populate_fail_at.load(Ordering::SeqCst) == n {
            return Err(BackendError::new(
                BackendErrorKind::Injected,
                format!("populate_devmem_pfn #{n} failed on purpose"),
            ));
        }
        self.devmem.populate_devmem_pfn(backing, out)
    }

    fn copy_to_devmem(&self, req: &CopyRequest<'_>) -> Result<Fence, BackendError> {
        self.copy(req, CopyOp::ToDevmem)
    }

    fn copy_to_ram(&self, req: &CopyRequest<'_>) -> Result<Fence, BackendError> {
        self.copy(req, CopyOp::ToRam)
    }

    fn devmem_release(&self, backing: DevmemBacking) {
        self.audit.push(Event::Release {
            pagemap: self.id,
            cookie: backing.cookie,
        });
        self.devmem.devmem_release(backing)
    }

    fn capacity_bytes(&self) -> u64 {
        self.devmem.capacity_bytes()
    }

    fn caps(&self) -> CopyCaps {
        self.devmem.caps()
    }
}

struct AuditHost {
    inner: Arc<dyn HostMemory>,
    audit: Arc<Audit>,
}

impl HostMemory for AuditHost {
    fn alloc_frames(&self, page_size: PageSize, out: &mut [HostFrame]) -> Result<(), BackendError> {
        self.inner.alloc_frames(page_size, out)?;
        self.audit
            .host_granules
            .fetch_add(out.len() as u64 * page_size.granules(), Ordering::SeqCst);
        Ok(())
    }
    fn free_frames(&self, frames: &[HostFrame], page_size: PageSize) {
        self.audit
            .host_granules
            .fetch_sub(frames.len() as u64 * page_size.granules(), Ordering::SeqCst);
        self.inner.free_frames(frames, page_size)
    }
    fn read(&self, frame: HostFrame, offset: usize, buf: &mut [u8]) -> Result<(), BackendError> {
        self.inner.read(frame, offset, buf)
    }
    fn write(&self, frame: HostFrame, offset: usize, data: &[u8]) -> Result<(), BackendError> {
        self.inner.write(frame, offset, data)
    }
    fn zero(&self, frame: HostFrame, page_size: PageSize) -> Result<(), BackendError> {
        self.inner.zero(frame, page_size)
    }
    fn map_frames(
        &self,
        device: DeviceId,
        frames: &[HostFrame],
        page_size: PageSize,
        dir: Direction,
        out: &mut [DmaAddr],
    ) -> Result<(), BackendError> {
        self.inner.map_frames(device, frames, page_size, dir, out)?;
        self.audit.push(Event::Map {
            by: Provider::Host,
            device: device.0,
            dir,
            n: frames.len(),
        });
        Ok(())
    }
    fn unmap_frames(
        &self,
        device: DeviceId,
        addrs: &[DmaAddr],
        page_size: PageSize,
        dir: Direction,
    ) {
        self.audit.push(Event::Unmap {
            by: Provider::Host,
            device: device.0,
            dir,
            n: addrs.iter().filter(|a| !a.is_none()).count(),
        });
        self.inner.unmap_frames(device, addrs, page_size, dir)
    }
    fn capacity_bytes(&self) -> u64 {
        self.inner.capacity_bytes()
    }
}

// ---------------------------------------------------------------------------------------
// A slow clear: the pre-migrate fence of a pagemap's allocations signals only after a second
// clear of their pages, executed later by another device. A copy that does not wait for the
// pre-migrate fence lands before that clear and is wiped by it.

struct SlowClear {
    dest_ops: Arc<dyn PagemapOps>,
    dest: Arc<dyn DevmemOps>,
    helper: Pagemap,
    delay: Duration,
}

impl SlowClear {
    fn second_clear(&self, b: &mut DevmemBacking) -> Result<(), BackendError> {
        let n = b.npages;
        let ps = b.page_size;
        let mut pfns = vec![Pfn(0); n];
        self.dest.populate_devmem_pfn(b, &mut pfns)?;
        // One zeroed page of the helper is the source of the clear.
        let zero = self.helper.devmem().allocate(1, ps)?;
        let mut zpfn = [Pfn(0)];
        if let Err(e) = self.helper.devmem().populate_devmem_pfn(&zero, &mut zpfn) {
            self.helper.devmem().devmem_release(zero);
            return Err(e);
        }
        let hdev = self.helper.device();
        let mut addrs = vec![DmaAddr::NONE; n];
        if let Err(e) = self
            .dest_ops
            .device_map(hdev, &pfns, ps, Direction::FromDevice, &mut addrs)
        {
            self.helper.devmem().devmem_release(zero);
            return Err(e);
        }
        let first = b.pre_migrate_fence.take();
        let gate = HostFence::new(FenceContext::new(), 1);
        b.pre_migrate_fence = Some(Fence::from_host(gate.clone()));
        let helper = self.helper.clone();
        let dest_ops = self.dest_ops.clone();
        let delay = self.delay;
        std::thread::spawn(move || {
            let mut result = Ok(());
            if let Some(f) = first
                && let Err(e) = f.wait()
            {
                result = Err(BackendError::new(
                    BackendErrorKind::CopyFailed,
                    e.to_string(),
                ));
            }
            if let Some(f) = &zero.pre_migrate_fence {
                let _ = f.wait();
            }
            std::thread::sleep(delay);
            if result.is_ok() {
                let pages = vec![zpfn[0]; n];
                let req = CopyRequest {
                    page_size: ps,
                    pages: &pages,
                    addrs: &addrs,
                    pre_fence: None,
                };
                result = helper.devmem().copy_to_ram(&req).and_then(|f| {
                    f.wait()
                        .map_err(|e| BackendError::new(BackendErrorKind::CopyFailed, e.to_string()))
                });
            }
            dest_ops.device_unmap(hdev, &addrs, ps, Direction::FromDevice);
            helper.devmem().devmem_release(zero);
            gate.complete(result);
        });
        Ok(())
    }
}

impl DevmemOps for SlowClear {
    fn allocate(&self, npages: usize, page_size: PageSize) -> Result<DevmemBacking, BackendError> {
        let mut b = self.dest.allocate(npages, page_size)?;
        if let Err(e) = self.second_clear(&mut b) {
            self.dest.devmem_release(b);
            return Err(e);
        }
        Ok(b)
    }
    fn populate_devmem_pfn(
        &self,
        backing: &DevmemBacking,
        out: &mut [Pfn],
    ) -> Result<(), BackendError> {
        self.dest.populate_devmem_pfn(backing, out)
    }
    fn copy_to_devmem(&self, req: &CopyRequest<'_>) -> Result<Fence, BackendError> {
        self.dest.copy_to_devmem(req)
    }
    fn copy_to_ram(&self, req: &CopyRequest<'_>) -> Result<Fence, BackendError> {
        self.dest.copy_to_ram(req)
    }
    fn devmem_release(&self, backing: DevmemBacking) {
        self.dest.devmem_release(backing)
    }
    fn capacity_bytes(&self) -> u64 {
        self.dest.capacity_bytes()
    }
    fn caps(&self) -> CopyCaps {
        self.dest.caps()
    }
}

// ---------------------------------------------------------------------------------------
// The rig.

/// A backend, an address space on it, one range with a known content.
pub struct Rig {
    /// The backend's name.
    pub backend_name: &'static str,
    /// The backend.
    pub backend: Arc<dyn Backend>,
    /// Sim-only: the simulated backend, for its statistics.
    pub sim: Option<Arc<SimBackend>>,
    /// The address space (host and pagemaps audited, and fault-injected when asked).
    pub mm: Arc<AddressSpace>,
    /// The raw pagemaps, by id.
    pub pagemaps: Vec<Pagemap>,
    /// The audit.
    pub audit: Arc<Audit>,
    /// The injector, if any.
    pub faults: Option<Arc<FaultInjector>>,
    /// The range.
    pub range: VaRange,
    /// Its page size.
    pub page_size: PageSize,
    /// How pages are filled.
    pub fill: Fill,
    /// The generation each page holds (`None`: never written, reads as zeros).
    pub expect: Vec<Option<u32>>,
}

impl std::fmt::Debug for Rig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rig")
            .field("backend", &self.backend_name)
            .field("range", &self.range)
            .finish_non_exhaustive()
    }
}

/// Opens `opts.backend` with `devices` devices, as `opts` configures it (capacities, sim's
/// copy latency); returns the backend and, on sim, the simulated backend for its statistics.
pub fn open(devices: usize, opts: &Options) -> (Arc<dyn Backend>, Option<Arc<SimBackend>>) {
    if opts.backend == "sim" {
        let defaults = SimConfig::default();
        let sim = Arc::new(
            SimBackend::new(SimConfig {
                devices,
                copy_latency: opts.copy_latency,
                device_capacity: opts.device_capacity.unwrap_or(defaults.device_capacity),
                host_capacity: opts.host_capacity.unwrap_or(defaults.host_capacity),
                ..defaults
            })
            .expect("sim backend"),
        );
        return (sim.clone(), Some(sim));
    }
    if opts.backend == "level-zero" {
        route_level_zero().expect("route the Level Zero loader");
    }
    #[allow(unused_mut)]
    let mut cfg = BackendConfig {
        devices: Some(devices),
        host_capacity: opts.host_capacity,
        // A GPU backend as the environment configures it (gpu-run.sh's variables).
        ..BackendConfig::from_env()
    };
    if opts.backend == "level-zero"
        && let Some(cap) = opts.device_capacity
    {
        cfg = cfg
            .with_option("level-zero.device_capacity", cap.to_string())
            .expect("level-zero option");
    }
    #[cfg(feature = "plugins")]
    if plugins::load_all().contains(&opts.backend) {
        // The plug-ins' arenas: as large as the sim's defaults (reserved, not touched).
        cfg.device_capacity = Some(opts.device_capacity.unwrap_or(4 << 30));
        cfg.host_capacity = Some(opts.host_capacity.unwrap_or(8 << 30));
        if opts.backend == "tier" {
            cfg = cfg
                .with_option("tier.path", plugins::tier_dir().display().to_string())
                .expect("tier option");
        }
    }
    let b = drm_pagemap::open_backend(opts.backend, &cfg).expect("open backend");
    if opts.backend == "level-zero" {
        assert_validation_layer_loaded();
    }
    (Arc::from(b), None)
}

/// Opens a rig without a range: `devices` pagemaps on `opts.backend`.
pub fn machine(devices: usize, opts: &Options) -> Rig {
    let (backend, sim) = open(devices, opts);
    // Machine::with_backend creates the pagemaps (owners, device sharing); the rig builds its
    // own address space over them so it can wrap them generically.
    let m = Machine::build(
        backend.clone(),
        devices,
        &opts.foreign,
        opts.device_capacity,
    )
    .expect("pagemaps");
    let audit = Arc::new(Audit::default());
    let mut host = backend.host_memory();
    if let Some(inj) = &opts.faults {
        host = inj.wrap_host(host);
    }
    let host: Arc<dyn HostMemory> = Arc::new(AuditHost {
        inner: host,
        audit: audit.clone(),
    });
    let mm = Arc::new(AddressSpace::new(host));
    for (k, raw) in m.pagemaps.iter().enumerate() {
        let mut pm = raw.clone();
        if let Some(inj) = &opts.faults {
            pm = inj.wrap_pagemap(&pm);
        }
        if let Some(sc) = opts.slow_clear
            && sc.dest == k
        {
            let slow = SlowClear {
                dest_ops: pm.ops().clone(),
                dest: pm.devmem().clone(),
                helper: m.pagemaps[sc.helper].clone(),
                delay: sc.delay,
            };
            pm = pm.with_ops(pm.ops().clone(), Arc::new(slow));
        }
        let a = Arc::new(AuditPagemap {
            id: k as u8,
            ops: pm.ops().clone(),
            devmem: pm.devmem().clone(),
            audit: audit.clone(),
        });
        mm.add_pagemap(pm.with_ops(a.clone(), a))
            .expect("add pagemap");
    }
    Rig {
        backend_name: opts.backend,
        backend,
        sim,
        mm,
        pagemaps: m.pagemaps.clone(),
        audit,
        faults: opts.faults.clone(),
        range: VaRange::new(BASE, 0),
        page_size: PageSize::Size4K,
        fill: opts.fill,
        expect: Vec::new(),
    }
}

/// Builds `layout` (see [`drm_pagemap_testkit::layout`]) on `devices` pagemaps with
/// `page_size` pages: writes generation 1 into every populated page, migrates the device pages
/// to their pagemaps, and asserts the layout came out as asked.
pub fn build(layout_text: &str, devices: usize, page_size: PageSize, opts: Options) -> Rig {
    let want = layout::parse(layout_text).expect("layout");
    let mut rig = machine(devices, &opts);
    let ps = page_size.bytes();
    rig.page_size = page_size;
    rig.range = VaRange::new(BASE, want.len() as u64 * ps);
    rig.expect = vec![None; want.len()];
    rig.mm
        .create_range(rig.range, page_size)
        .expect("create range");
    for (i, p) in want.iter().enumerate() {
        if *p != LayoutPage::Hole {
            rig.write_page(i, 1);
        }
    }
    let details = MigrateDetails::default();
    let mut i = 0;
    while i < want.len() {
        let LayoutPage::Device(k) = want[i] else {
            i += 1;
            continue;
        };
        let mut j = i + 1;
        if !opts.split_runs {
            while j < want.len() && want[j] == want[i] {
                j += 1;
            }
        }
        let sub = VaRange::new(rig.va(i), (j - i) as u64 * ps);
        rig.mm
            .migrate(sub, PagemapId(k), &details)
            .unwrap_or_else(|e| {
                panic!("building {layout_text}: migrating pages {i}..{j} to {k}: {e}")
            });
        i = j;
    }
    assert_eq!(rig.layout(), want, "built layout on {}", rig.backend_name);
    rig
}

/// The calls of a report as (executor, op, pages).
pub fn calls(c: &[CopyCall]) -> Calls {
    c.iter().map(|c| (c.executor.0, c.op, c.pages)).collect()
}

/// Who copies a page of `layout` kind `page` in a migration to `to` (`None`: nobody, a
/// hole), as the engine's contract states it.
pub fn key_of(page: LayoutPage, to: u8, details: &MigrateDetails) -> Option<(u8, CopyOp)> {
    match page {
        LayoutPage::Hole => None,
        LayoutPage::System => Some((to, D)),
        LayoutPage::Device(k) if details.source_peer_migrates => Some((k, R)),
        LayoutPage::Device(_) => Some((to, D)),
    }
}

/// Checks each call's first page: a page of the call's key; with by-source coalescing, the
/// first page of that key in the layout.
pub fn check_first_pages(layout: &[LayoutPage], to: u8, details: &MigrateDetails, c: &[CopyCall]) {
    for call in c {
        let key = Some((call.executor.0, call.op));
        assert_eq!(
            key_of(layout[call.first_page], to, details),
            key,
            "call {call:?} starts at a page of another source"
        );
    }
    if details.coalesce == drm_pagemap::Coalesce::BySource {
        // A source's calls (one, or its pieces of at most `max_call_pages`) start at its
        // first page, then where the pages of the calls before them end.
        let mut done: std::collections::HashMap<(u8, CopyOp), usize> = Default::default();
        for call in c {
            let key = (call.executor.0, call.op);
            let before = done.entry(key).or_default();
            let first = layout
                .iter()
                .enumerate()
                .filter(|&(_, &p)| key_of(p, to, details) == Some(key))
                .nth(*before)
                .map(|(i, _)| i);
            assert_eq!(
                first,
                Some(call.first_page),
                "call {call:?}: its source's page {before}"
            );
            *before += call.pages;
        }
    }
}

/// Shorthand for `copy_to_devmem` in call summaries.
pub const D: CopyOp = CopyOp::ToDevmem;
/// Shorthand for `copy_to_ram` in call summaries.
pub const R: CopyOp = CopyOp::ToRam;

/// Copy calls summarised as (executor, op, pages).
pub type Calls = Vec<(u8, CopyOp, usize)>;

impl Rig {
    /// The address of page `i`.
    pub fn va(&self, i: usize) -> u64 {
        self.range.start + i as u64 * self.page_size.bytes()
    }

    /// Pages `[first, end)` as a range.
    pub fn pages(&self, first: usize, end: usize) -> VaRange {
        VaRange::new(
            self.va(first),
            (end - first) as u64 * self.page_size.bytes(),
        )
    }

    /// Number of pages.
    pub fn npages(&self) -> usize {
        self.expect.len()
    }

    /// Writes generation `generation` of page `i` through the CPU path.
    pub fn write_page(&mut self, i: usize, generation: u32) {
        let ps = self.page_size.bytes();
        match self.fill {
            Fill::Full => {
                let data = pattern(i as u64, generation, self.page_size);
                self.mm.write(self.va(i), &data).expect("write page");
            }
            Fill::Stamp => {
                let first = word(i as u64, generation, 0).to_le_bytes();
                let last = word(i as u64, generation, ps / 8 - 1).to_le_bytes();
                self.mm.write(self.va(i), &first).expect("write stamp");
                self.mm
                    .write(self.va(i) + ps - 8, &last)
                    .expect("write stamp");
            }
        }
        self.expect[i] = Some(generation);
    }

    /// The layout now.
    pub fn layout(&self) -> Vec<LayoutPage> {
        layout::of(&self.mm, self.range).expect("layout")
    }

    /// The layout now, one character per page.
    pub fn layout_str(&self) -> String {
        self.layout().iter().map(|p| p.to_char()).collect()
    }

    /// Asserts the layout equals `text` (layout syntax).
    pub fn assert_layout(&self, text: &str) {
        let want = layout::parse(text).expect("layout");
        assert_eq!(
            self.layout_str(),
            want.iter().map(|p| p.to_char()).collect::<String>(),
            "layout on {}",
            self.backend_name
        );
    }

    /// Migrates the whole range to pagemap `to`.
    pub fn migrate(&self, to: u8, details: &MigrateDetails) -> Result<MigrateReport, Error> {
        self.mm.migrate(self.range, PagemapId(to), details)
    }

    /// Migrates the whole range, returning the result and the calls issued (also on failure).
    pub fn migrate_traced(
        &self,
        to: u8,
        details: &MigrateDetails,
    ) -> (Result<MigrateReport, Error>, Vec<CopyCall>) {
        let mut trace = Vec::new();
        let r = self
            .mm
            .migrate_traced(self.range, PagemapId(to), details, &mut trace);
        (r, trace)
    }

    /// Reads page `i` through the CPU path and compares it with what it should hold.
    pub fn verify_page(&self, i: usize) {
        let ps = self.page_size.bytes();
        let g = self.expect[i];
        match self.fill {
            Fill::Full => {
                let mut buf = vec![0u8; ps as usize];
                self.mm.read(self.va(i), &mut buf).expect("read page");
                match g {
                    Some(g) => {
                        if buf != pattern(i as u64, g, self.page_size) {
                            let want = pattern(i as u64, g, self.page_size);
                            let at = buf.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
                            panic!(
                                "{}: page {i} differs at byte {at} (want generation {g}, byte {:#x}, got {:#x})",
                                self.backend_name, want[at], buf[at]
                            );
                        }
                    }
                    None => assert!(
                        buf.iter().all(|&b| b == 0),
                        "{}: page {i} (never written) does not read as zeros",
                        self.backend_name
                    ),
                }
            }
            Fill::Stamp => {
                let mut a = [0u8; 8];
                let mut b = [0u8; 8];
                self.mm.read(self.va(i), &mut a).expect("read stamp");
                let (wa, wb) = match g {
                    Some(g) => (word(i as u64, g, 0), word(i as u64, g, ps / 8 - 1)),
                    None => (0, 0),
                };
                assert_eq!(
                    u64::from_le_bytes(a),
                    wa,
                    "{}: first stamp of page {i}",
                    self.backend_name
                );
                if g.is_some() {
                    self.mm
                        .read(self.va(i) + ps - 8, &mut b)
                        .expect("read stamp");
                    assert_eq!(
                        u64::from_le_bytes(b),
                        wb,
                        "{}: last stamp of page {i}",
                        self.backend_name
                    );
                }
            }
        }
    }

    /// Reads every page through the CPU path (device pages come home) and checks its bytes;
    /// never-written pages read as zeros.
    pub fn verify(&self) {
        for i in 0..self.npages() {
            self.verify_page(i);
        }
    }

    /// Where page `i` lives.
    pub fn location(&self, i: usize) -> PageLocation {
        self.mm.location(self.va(i)).expect("location")
    }

    /// The allocation holding page `i`.
    pub fn alloc_of(&self, i: usize) -> drm_pagemap::AllocId {
        match self.location(i) {
            PageLocation::Device { alloc, .. } => alloc,
            other => panic!("page {i} is not on a device: {other:?}"),
        }
    }

    /// Sim-only: the statistics of pagemap `k`.
    pub fn sim_stats(&self, k: u8) -> SimStats {
        self.sim
            .as_ref()
            .expect("sim-only check on another backend")
            .stats(PagemapId(k))
            .expect("pagemap of this sim")
    }

    /// Frees the range and checks that nothing is left: no allocation in the address space,
    /// every allocation the backend made released exactly once (the audit; on sim also its
    /// own counters), every mapping undone.
    pub fn finish(self) {
        self.mm.free_range(self.range.start).expect("free range");
        assert!(
            self.mm.allocations().is_empty(),
            "{}: allocations left after free_range: {:?}",
            self.backend_name,
            self.mm.allocations()
        );
        assert_eq!(self.mm.deferred_cleanups(), 0);
        self.audit.assert_all_released_once();
        self.audit.assert_mappings_balanced_since(0);
        if let Some(sim) = &self.sim {
            // Sim-only: the backend's own counters agree.
            for k in 0..self.pagemaps.len() {
                let s = sim.stats(PagemapId(k as u8)).expect("stats");
                assert_eq!(
                    s.allocations, s.releases,
                    "sim pagemap {k}: allocations vs releases"
                );
                assert_eq!(s.used_bytes, 0, "sim pagemap {k}: bytes still in use");
            }
            // Sim-only: every system frame went back to the pool.
            let host = sim.arena_host();
            assert_eq!(
                host.free_granules(),
                host.arena().len() / 4096,
                "system frames leaked"
            );
        }
    }
}

/// Runs `f` on a thread of its own and returns its result; panics if it does not return
/// within [`DEADLOCK`] (the thread is left behind, the test fails instead of hanging).
pub fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(DEADLOCK) {
        Ok(v) => v,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what}: no return within {DEADLOCK:?} (deadlock)")
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => panic!("{what} panicked"),
    }
}

/// Asserts that `err`'s message names `range` and every `needles`.
pub fn assert_names(err: &Error, range: VaRange, needles: &[&str]) {
    let msg = err.to_string();
    assert!(
        msg.contains(&range.to_string()),
        "message {msg:?} does not name range {range}"
    );
    for n in needles {
        assert!(msg.contains(n), "message {msg:?} does not name {n:?}");
    }
}
