//! Model-based property test of the engine, on every backend of `common::backends()`: the
//! simulated one, level-zero (on the software driver, through the real loader), the C
//! plug-in "hostmem" and the Rust plug-in "tier", and CUDA where there is a GPU (each a
//! `#[test]` of its own; one that is not available prints `skipped: NAME: <reason>`).
//!
//! Random sequences of: create range, CPU write, CPU read, migrate to device k (random
//! `can_migrate_same_pagemap`, `source_peer_migrates`, coalescing, timeslice, fence timeout),
//! migrate through an explicit `allocate_devmem` + `migrate_to_devmem` (sometimes with a
//! mismatched page size or page count), reserve + release, evict, evict a stale allocation,
//! free — with faults injected at random (allocation, map, copy call, copy fence error) in
//! the middle of any of them.
//!
//! The machine: 4 devices, pagemap k on device k; pagemaps 0-2 share an owner, pagemap 3 has
//! another (its pages are never collected by the others; on sim its device cannot reach
//! theirs either). Device memory is small (256 KiB per pagemap) so allocations run out and
//! some ranges are too large for a device. Faults are injected by the testkit's wrappers
//! inside the checks' audit layer (sim: its built-in injection, the same wrappers).
//!
//! Checked after every step:
//! - every CPU read returns exactly the bytes of the reference model (the bytes last written);
//! - an operation fails if and only if an injected fault fired in it, or the model predicts
//!   the failure (bad slot, busy, foreign owner, too large, out of device memory); a
//!   migration that succeeds is `NotNeeded` exactly when the model says so;
//! - a failed operation changes no byte; a failed migration or eviction changes no page's
//!   location; a successful migration leaves every page of the range in one new allocation
//!   of the destination, with one copy call per (executor, operation) under `BySource`;
//! - accounting: every page on a device references a live allocation whose page count is the
//!   number of pages referencing it; each pagemap's used bytes equal the sizes of its live
//!   allocations; allocations minus releases equals the live allocations;
//! - the copy calls each pagemap accepted are exactly the calls the report lists.
//!
//! Checked at the end of every case (after reading every range back and freeing them all):
//! no allocation left, every device byte free (`used_bytes == 0`), every allocation released
//! exactly once, no deferred cleanup, every host frame back.
//!
//! Where the numbers come from: on every backend an audit layer around each pagemap and the
//! host memory (allocations, releases per allocation, bytes in use, accepted copy calls, host
//! granules in use). Where the backend keeps counters of its own they must agree with the
//! audit at every step: sim (`SimStats`, its host arena's free granules) and level-zero
//! (`ZeStats`, its host chunks' free granules); on level-zero each case also checks the
//! software driver's counters (`testing::SoftDriver`): no strict violation (a copy outside
//! every allocation, a handle used after destroy) and, once the world is dropped, no driver
//! object (allocation, event, pool, command list, queue) left. Level-zero cases run one at a
//! time for that (the driver's counters are process-wide).
//!
//! A second variant adds GPU faults (read, write, atomic, on any device) through an xe-svm
//! context that owns the pagemaps: a fault changes no byte, and the range it served lies
//! inside the faulting CPU range and lives where its report says, with a valid page table;
//! without an injected fault only a shortage of device memory may fail it; and every other
//! range's page table (in any VM) that was valid before stays valid unless its pages moved.
//! Half of its cases pack all slots into one 2 MiB block (small ranges of 4 KiB or 64 KiB
//! pages, some not 64 KiB aligned: several CPU ranges per block, each with SVM ranges of its
//! own), and it frees and re-creates ranges with the other page size without telling xe-svm
//! (its SVM ranges of the old CPU range must be found stale).
//!
//! Sizes: on sim 2,000 cases (engine) and 400 cases (with GPU faults) of up to 40 steps by
//! default (CI); level-zero 400 and 120, each plug-in 600 and 150, CUDA 300 and 100 (see
//! `other_cases`: a case opens its backend afresh). `DRM_PAGEMAP_LONG=1` runs 200,000 and
//! 50,000 cases of up to 80 steps on sim, 100 times the default elsewhere (use `--release`:
//! about 20,000 sim cases per 30 s there); `DRM_PAGEMAP_MODEL_CASES=n` sets every count.

mod common;

use drm_pagemap::sim::{SimBackend, SimConfig};
use drm_pagemap::{
    AddressSpace, AllocId, AllocState, Backend, BackendConfig, BackendError, BackendErrorKind,
    BusyReason, Coalesce, CopyCaps, CopyOp, CopyRequest, DeviceId, DevmemBacking, DevmemOps,
    Direction, DmaAddr, Error, Fence, FenceError, HostFrame, HostMemory, Machine, MigrateDetails,
    MigrateOutcome, PageLocation, PageSize, Pagemap, PagemapId, Pfn, RangeProblem, ReleaseMode,
    VaRange,
};
use drm_pagemap_level_zero::testing::{SoftCounters, SoftDriver};
use drm_pagemap_level_zero::{LevelZeroBackend, LevelZeroConfig};
use drm_pagemap_testkit::inject::{FaultInjector, FaultSite};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const DEVICES: usize = 4;
/// Owner group of each device: device 3 belongs to another owner.
const GROUPS: [u32; DEVICES] = [0, 0, 0, 1];
const DEVICE_CAPACITY: u64 = 256 << 10;
const HOST_CAPACITY: u64 = 4 << 20;
const SLOTS: usize = 4;
const BASE: u64 = 1 << 30;
const SLOT_STRIDE: u64 = 4 << 20;
/// Slot spacing of the packed layout: four slots in one 2 MiB block.
const PACKED_STRIDE: u64 = 512 << 10;
const MAX_4K_PAGES: usize = 16;
const MAX_64K_PAGES: usize = 5;
/// Cases (engine model, model with GPU faults) on each backend other than sim, by default
/// (CI; `DRM_PAGEMAP_LONG=1`: 100 times as many). Each case opens the backend afresh: on
/// level-zero that is a context, queues and copy-engine threads of the software driver
/// (about 50 ms a case in a debug build, 4 times sim's), the plug-ins cost half of sim.
fn other_cases(backend: &str) -> (u32, u32) {
    match backend {
        "level-zero" => (400, 120),
        "cuda" => (300, 100),
        _ => (600, 150),
    }
}

fn long() -> bool {
    std::env::var_os("DRM_PAGEMAP_LONG").is_some_and(|v| v != "0" && !v.is_empty())
}

// ---------------------------------------------------------------------------------------
// Audit layer: counts allocations and releases per backing, so a double release (which the
// sim would silently ignore) or a release of something never allocated is caught; and, on any
// backend, the backend-neutral accounting the checks use: per pagemap the allocations,
// releases, bytes allocated now and accepted copy calls, and the host granules in use.

#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
struct PagemapTally {
    allocations: u64,
    releases: u64,
    used_bytes: u64,
    copy_to_devmem_calls: u64,
    copy_to_ram_calls: u64,
}

#[derive(Default, Debug)]
struct AuditLog {
    /// (pagemap, cookie) -> (bytes, releases seen).
    live: Mutex<HashMap<(u8, u64), (u64, u32)>>,
    violations: Mutex<Vec<String>>,
    tallies: Mutex<[PagemapTally; DEVICES]>,
    /// 4 KiB granules of host frames allocated and not freed.
    host_granules: AtomicU64,
}

impl AuditLog {
    fn violations(&self) -> Vec<String> {
        self.violations.lock().unwrap().clone()
    }
    fn outstanding(&self) -> Vec<(u8, u64)> {
        let live = self.live.lock().unwrap();
        live.iter()
            .filter(|&(_, &(_, n))| n == 0)
            .map(|(&k, _)| k)
            .collect()
    }
    fn tally(&self, pm: u8) -> PagemapTally {
        self.tallies.lock().unwrap()[pm as usize]
    }
    fn with_tally(&self, pm: u8, f: impl FnOnce(&mut PagemapTally)) {
        f(&mut self.tallies.lock().unwrap()[pm as usize])
    }
    fn host_granules(&self) -> u64 {
        self.host_granules.load(Ordering::SeqCst)
    }
}

struct AuditedDevmem {
    pagemap: u8,
    inner: Arc<dyn DevmemOps>,
    log: Arc<AuditLog>,
}

impl DevmemOps for AuditedDevmem {
    fn allocate(&self, npages: usize, page_size: PageSize) -> Result<DevmemBacking, BackendError> {
        let b = self.inner.allocate(npages, page_size)?;
        let bytes = b.npages as u64 * b.page_size.bytes();
        let prev = self
            .log
            .live
            .lock()
            .unwrap()
            .insert((self.pagemap, b.cookie), (bytes, 0));
        if prev.is_some() {
            self.log.violations.lock().unwrap().push(format!(
                "pagemap {}: cookie {} handed out twice",
                self.pagemap, b.cookie
            ));
        }
        self.log.with_tally(self.pagemap, |t| {
            t.allocations += 1;
            t.used_bytes += bytes;
        });
        Ok(b)
    }
    fn populate_devmem_pfn(
        &self,
        backing: &DevmemBacking,
        out: &mut [Pfn],
    ) -> Result<(), BackendError> {
        self.inner.populate_devmem_pfn(backing, out)
    }
    fn copy_to_devmem(&self, req: &CopyRequest<'_>) -> Result<Fence, BackendError> {
        let f = self.inner.copy_to_devmem(req)?;
        self.log
            .with_tally(self.pagemap, |t| t.copy_to_devmem_calls += 1);
        Ok(f)
    }
    fn copy_to_ram(&self, req: &CopyRequest<'_>) -> Result<Fence, BackendError> {
        let f = self.inner.copy_to_ram(req)?;
        self.log
            .with_tally(self.pagemap, |t| t.copy_to_ram_calls += 1);
        Ok(f)
    }
    fn devmem_release(&self, backing: DevmemBacking) {
        {
            let mut live = self.log.live.lock().unwrap();
            match live.get_mut(&(self.pagemap, backing.cookie)) {
                Some((bytes, n)) => {
                    *n += 1;
                    if *n > 1 {
                        self.log.violations.lock().unwrap().push(format!(
                            "pagemap {}: allocation {} released {} times",
                            self.pagemap, backing.cookie, n
                        ));
                    } else {
                        let bytes = *bytes;
                        self.log.with_tally(self.pagemap, |t| {
                            t.releases += 1;
                            t.used_bytes -= bytes;
                        });
                    }
                }
                None => self.log.violations.lock().unwrap().push(format!(
                    "pagemap {}: release of unknown allocation {}",
                    self.pagemap, backing.cookie
                )),
            }
        }
        self.inner.devmem_release(backing)
    }
    fn capacity_bytes(&self) -> u64 {
        self.inner.capacity_bytes()
    }
    fn caps(&self) -> CopyCaps {
        self.inner.caps()
    }
}

/// Counts the host granules handed out and given back (any backend's host memory).
struct AuditedHost {
    inner: Arc<dyn HostMemory>,
    log: Arc<AuditLog>,
}

impl HostMemory for AuditedHost {
    fn alloc_frames(&self, page_size: PageSize, out: &mut [HostFrame]) -> Result<(), BackendError> {
        self.inner.alloc_frames(page_size, out)?;
        self.log
            .host_granules
            .fetch_add(out.len() as u64 * page_size.granules(), Ordering::SeqCst);
        Ok(())
    }
    fn free_frames(&self, frames: &[HostFrame], page_size: PageSize) {
        self.log
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
        self.inner.map_frames(device, frames, page_size, dir, out)
    }
    fn unmap_frames(
        &self,
        device: DeviceId,
        addrs: &[DmaAddr],
        page_size: PageSize,
        dir: Direction,
    ) {
        self.inner.unmap_frames(device, addrs, page_size, dir)
    }
    fn capacity_bytes(&self) -> u64 {
        self.inner.capacity_bytes()
    }
}

// ---------------------------------------------------------------------------------------
// Operations.

#[derive(Clone, Copy, Debug)]
struct Fault {
    site: FaultSite,
    nth: u64,
    /// The fault panics inside the backend instead of returning an error (engine steps
    /// only): the engine must roll back exactly as for an error.
    panic: bool,
}

/// An operation's result built from a panic that an injected fault raised inside it: an
/// injected backend error, so that every check of a failed operation applies.
trait FromInjectedPanic {
    fn from_panic(message: String) -> Self;
}

fn injected_panic_error(message: String) -> Error {
    Error::Backend {
        range: VaRange::new(0, 0),
        // The panic's message names the call that panicked.
        op: drm_pagemap::BackendOp::CopyToDevmem,
        pagemap: None,
        device: None,
        source: BackendError::new(BackendErrorKind::Injected, message),
    }
}

impl<X> FromInjectedPanic for Result<X, Error> {
    fn from_panic(message: String) -> Self {
        Err(injected_panic_error(message))
    }
}

impl<X, Y> FromInjectedPanic for (Result<X, Error>, Result<Y, Error>)
where
    Y: Default,
{
    fn from_panic(message: String) -> Self {
        // Only the allocation can panic (releases are not injected).
        (Err(injected_panic_error(message)), Ok(Y::default()))
    }
}

impl<X> FromInjectedPanic for Result<X, Box<xe_svm::SvmError>> {
    fn from_panic(message: String) -> Self {
        Err(Box::new(xe_svm::SvmError::Core(injected_panic_error(
            message,
        ))))
    }
}

/// Keeps the panics the model injects on purpose out of the test output (every other panic
/// is reported as usual).
fn quiet_injected_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let msg = info
                .payload()
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| info.payload().downcast_ref::<&str>().copied())
                .unwrap_or("");
            if !msg.starts_with("injected panic") {
                default(info);
            }
        }));
    });
}

#[derive(Clone, Debug)]
struct Flags {
    same: bool,
    spm: bool,
    consecutive: bool,
    timeslice: bool,
    timeout: bool,
}

impl Flags {
    fn details(&self) -> MigrateDetails {
        MigrateDetails {
            timeslice: if self.timeslice {
                Duration::from_micros(300)
            } else {
                Duration::ZERO
            },
            can_migrate_same_pagemap: self.same,
            source_peer_migrates: self.spm,
            coalesce: if self.consecutive {
                Coalesce::Consecutive
            } else {
                Coalesce::BySource
            },
            fence_timeout: self.timeout.then_some(Duration::from_secs(120)),
            // Calls cut into pieces of 2 pages in some flag sets, issued whole in others.
            max_call_pages: if self.spm && !self.consecutive {
                std::num::NonZeroU32::new(2)
            } else {
                None
            },
        }
    }
}

/// How an explicit reservation is misused.
#[derive(Clone, Copy, Debug)]
enum Misuse {
    None,
    WrongPageSize,
    WrongCount,
}

#[derive(Clone, Debug)]
enum Op {
    Create {
        slot: usize,
        pages: usize,
        big: bool,
    },
    Free {
        slot: usize,
    },
    /// Frees a slot and creates it again at once, and fills it (a runtime's munmap + mmap;
    /// xe-svm is not told: its SVM ranges of the old CPU range must be recognised as stale).
    /// `flip`: with the other page size than the live range's (else `big` says). Only in the
    /// GPU variant.
    Recreate {
        slot: usize,
        pages: usize,
        big: bool,
        flip: bool,
        seed: u8,
    },
    Write {
        slot: usize,
        at: u64,
        len: u64,
        seed: u8,
        fault: Option<Fault>,
    },
    Read {
        slot: usize,
        at: u64,
        len: u64,
        fault: Option<Fault>,
    },
    Migrate {
        slot: usize,
        first: usize,
        count: usize,
        to: u8,
        flags: Flags,
        fault: Option<Fault>,
    },
    Reserve {
        slot: usize,
        first: usize,
        count: usize,
        to: u8,
        flags: Flags,
        misuse: Misuse,
        fault: Option<Fault>,
    },
    ReserveRelease {
        to: u8,
        count: usize,
        fault: Option<Fault>,
    },
    /// A GPU page fault through xe-svm (only in the GPU variant of the test).
    GpuFault {
        slot: usize,
        at: u64,
        device: u8,
        access: u8,
        fault: Option<Fault>,
    },
    /// Migrates single pages of a slot (those whose bit is set in `mask`) to devices picked
    /// by `devs` (2 bits per page), then the whole range to `gather`: a mixed layout with
    /// sources that reappear, the case source-peer migration and coalescing are about.
    Scatter {
        slot: usize,
        mask: u16,
        devs: u32,
        gather: u8,
        flags: Flags,
        fault: Option<Fault>,
    },
    Evict {
        slot: usize,
        page: usize,
        fault: Option<Fault>,
    },
    EvictStale,
}

fn fault() -> impl Strategy<Value = Option<Fault>> {
    prop_oneof![
        2 => Just(None),
        1 => (
            prop_oneof![
                2 => Just(FaultSite::Alloc),
                3 => Just(FaultSite::Map),
                3 => Just(FaultSite::Copy),
                3 => Just(FaultSite::FenceError)
            ],
            1u64..3,
            prop_oneof![4 => Just(false), 1 => Just(true)]
        )
            .prop_map(|(site, nth, panic)| Some(Fault { site, nth, panic })),
    ]
}

fn flags() -> impl Strategy<Value = Flags> {
    (
        any::<bool>(),
        prop::bool::weighted(0.8),
        any::<bool>(),
        prop::bool::weighted(0.1),
        any::<bool>(),
    )
        .prop_map(|(same, spm, consecutive, timeslice, timeout)| Flags {
            same,
            spm,
            consecutive,
            timeslice,
            timeout,
        })
}

/// `usize::MAX` as a count means "to the end of the range".
const TO_END: usize = usize::MAX;

/// (first page, count): the whole range, a tail, a few pages, or anything.
fn page_span() -> impl Strategy<Value = (usize, usize)> {
    prop_oneof![
        2 => Just((0, TO_END)),
        1 => (any::<usize>(), Just(TO_END)),
        3 => (any::<usize>(), 0usize..3),
        2 => (any::<usize>(), any::<usize>()),
    ]
}

/// (offset, length) of a CPU access: the whole range, or a short random span.
fn byte_span() -> impl Strategy<Value = (u64, u64)> {
    prop_oneof![
        1 => Just((0, u64::MAX)),
        4 => (any::<u64>(), any::<u64>()),
    ]
}

fn gpu_fault_op() -> impl Strategy<Value = Op> {
    (
        0..SLOTS,
        any::<u64>(),
        0..DEVICES as u8,
        any::<u8>(),
        fault(),
    )
        .prop_map(|(slot, at, device, access, fault)| Op::GpuFault {
            slot,
            at,
            device,
            access,
            fault,
        })
}

fn recreate_op() -> impl Strategy<Value = Op> {
    (
        0..SLOTS,
        // 16 pages of 4 KiB from a 64 KiB boundary make a 64 KiB SVM range.
        prop_oneof![1 => 1..=4usize, 1 => Just(MAX_4K_PAGES)],
        any::<bool>(),
        prop::bool::weighted(0.75),
        any::<u8>(),
    )
        .prop_map(|(slot, pages, big, flip, seed)| Op::Recreate {
            slot,
            pages,
            big,
            flip,
            seed,
        })
}

fn op() -> impl Strategy<Value = Op> {
    let slot = 0..SLOTS;
    prop_oneof![
        2 => (slot.clone(), 1..=MAX_4K_PAGES, prop::bool::weighted(0.25))
            .prop_map(|(slot, pages, big)| Op::Create { slot, pages, big }),
        1 => slot.clone().prop_map(|slot| Op::Free { slot }),
        4 => (slot.clone(), byte_span(), any::<u8>(), fault())
            .prop_map(|(slot, (at, len), seed, fault)| Op::Write { slot, at, len, seed, fault }),
        3 => (slot.clone(), any::<u64>(), any::<u64>(), fault())
            .prop_map(|(slot, at, len, fault)| Op::Read { slot, at, len, fault }),
        5 => (slot.clone(), page_span(), 0..DEVICES as u8, flags(), fault())
            .prop_map(|(slot, (first, count), to, flags, fault)| Op::Migrate { slot, first, count, to, flags, fault }),
        1 => (
            slot.clone(),
            page_span(),
            0..DEVICES as u8,
            flags(),
            prop_oneof![4 => Just(Misuse::None), 1 => Just(Misuse::WrongPageSize), 1 => Just(Misuse::WrongCount)],
            fault()
        )
            .prop_map(|(slot, (first, count), to, flags, misuse, fault)| Op::Reserve {
                slot,
                first,
                count,
                to,
                flags,
                misuse,
                fault
            }),
        1 => (0..DEVICES as u8, 1usize..8, fault()).prop_map(|(to, count, fault)| Op::ReserveRelease { to, count, fault }),
        3 => (slot.clone(), any::<usize>(), fault()).prop_map(|(slot, page, fault)| Op::Evict { slot, page, fault }),
        1 => Just(Op::EvictStale),
        2 => (slot, any::<u16>(), any::<u32>(), 0..3u8, flags(), fault()).prop_map(
            |(slot, mask, devs, gather, flags, fault)| Op::Scatter { slot, mask, devs, gather, flags, fault }
        ),
    ]
}

// ---------------------------------------------------------------------------------------
// The world: the engine under test and the reference model.

#[derive(Clone, Debug)]
struct SlotModel {
    /// Where the range starts (see [`slot_base`]).
    base: u64,
    ps: PageSize,
    pages: usize,
    bytes: Vec<u8>,
}

impl SlotModel {
    fn range(&self) -> VaRange {
        VaRange::new(self.base, self.pages as u64 * self.ps.bytes())
    }
}

/// Where a range of pages `ps` in `slot` starts. Spread out: each slot in 2 MiB blocks of
/// its own. Packed (some cases of the GPU variant): every slot in one 2 MiB block, 512 KiB
/// apart (a slot holds at most 320 KiB), odd slots of 4 KiB pages 12 KiB past a 64 KiB
/// boundary, so several small, some unaligned CPU ranges share a block and each gets 4 KiB or
/// 64 KiB SVM ranges of its own.
fn slot_base(slot: usize, ps: PageSize, packed: bool) -> u64 {
    if !packed {
        return BASE + slot as u64 * SLOT_STRIDE;
    }
    let unaligned = if ps == PageSize::Size4K && slot % 2 == 1 {
        3 * 4096
    } else {
        0
    };
    BASE + slot as u64 * PACKED_STRIDE + unaligned
}

/// A deliberately wrong reference model, to show the checks can fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mutation {
    None,
    /// The model forgets writes that landed on pages that were in device memory: what an
    /// engine that loses a write on the CPU-fault path would look like.
    LoseWritesToDevicePages,
    /// The end of the case forgets to free the ranges: what a leaked allocation looks like.
    LeakAtEnd,
}

#[derive(Default)]
struct Totals {
    cases: AtomicU64,
    steps: AtomicU64,
    faults: [AtomicU64; 4],
    failed_ops: AtomicU64,
    migrations: AtomicU64,
    not_needed: AtomicU64,
    evictions: AtomicU64,
    reads_checked: AtomicU64,
    bytes_checked: AtomicU64,
    max_layout_devices: AtomicU64,
    reappearing_sources: AtomicU64,
    gpu_faults: AtomicU64,
    gpu_migrations: AtomicU64,
    /// Other slots' page tables found still valid after a GPU fault.
    neighbours_checked: AtomicU64,
    /// Cases run with every slot in one 2 MiB block.
    packed_cases: AtomicU64,
    /// Injected faults that panicked inside the backend (and were rolled back).
    panics: AtomicU64,
}

thread_local! {
    /// Per test thread, so the two model tests running side by side report their own figures.
    static TOTALS: &'static Totals = Box::leak(Box::default());
}

fn totals() -> &'static Totals {
    TOTALS.with(|t| *t)
}

fn site_index(s: FaultSite) -> usize {
    match s {
        FaultSite::Alloc => 0,
        FaultSite::Map => 1,
        FaultSite::Copy => 2,
        _ => 3,
    }
}

type Check = Result<(), String>;

macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

// ---------------------------------------------------------------------------------------
// The backend under test.

/// The backend a world runs on: its pagemaps and host memory (faults injected inside, the
/// audit goes around them), and what the backend can say about itself beyond the traits
/// (sim and level-zero: their own counters, checked against the audit; plug-ins: the audit
/// only).
struct Bed {
    name: &'static str,
    /// Keeps the backend open while the world lives.
    _backend: Arc<dyn Backend>,
    /// Sim-only: its statistics and host arena.
    sim: Option<Arc<SimBackend>>,
    /// Level Zero: its pagemaps' statistics and host memory.
    ze: Option<Arc<LevelZeroBackend>>,
    /// Pagemap k on device k, pagemap 3 of another owner; faults injected.
    pagemaps: Vec<Pagemap>,
    /// Faults injected.
    host: Arc<dyn HostMemory>,
}

impl Bed {
    fn open(name: &'static str, inj: &Arc<FaultInjector>) -> Bed {
        if name == "sim" {
            let sim = Arc::new(
                SimBackend::new(SimConfig {
                    devices: DEVICES,
                    device_capacity: DEVICE_CAPACITY,
                    host_capacity: HOST_CAPACITY,
                    owner_groups: Some(GROUPS.to_vec()),
                    copy_latency: Duration::ZERO,
                    resident: false,
                    faults: Some(inj.clone()),
                    host_bytes: None,
                })
                .expect("sim backend"),
            );
            return Bed {
                name,
                _backend: sim.clone(),
                pagemaps: sim.pagemap_per_device().expect("pagemaps"),
                host: sim.host_memory(),
                sim: Some(sim),
                ze: None,
            };
        }
        let (backend, ze): (Arc<dyn Backend>, _) = if name == "level-zero" {
            common::route_level_zero().expect("route the Level Zero loader");
            let ze = Arc::new(
                LevelZeroBackend::new(LevelZeroConfig {
                    devices: Some(DEVICES),
                    host_capacity: HOST_CAPACITY,
                    ..LevelZeroConfig::default()
                })
                .expect("level-zero backend"),
            );
            (ze.clone(), Some(ze))
        } else {
            let mut cfg = BackendConfig {
                devices: Some(DEVICES),
                device_capacity: Some(DEVICE_CAPACITY),
                host_capacity: Some(HOST_CAPACITY),
                // A GPU backend as the environment configures it (gpu-run.sh's variables).
                ..BackendConfig::from_env()
            };
            if name == "tier" {
                cfg = cfg
                    .with_option(
                        "tier.path",
                        common::plugins::tier_dir().display().to_string(),
                    )
                    .expect("tier option");
            }
            let b = drm_pagemap::open_backend(name, &cfg)
                .unwrap_or_else(|e| panic!("open backend {name}: {e}"));
            (Arc::from(b), None)
        };
        // Owner groups as on sim: pagemap 3 of another owner.
        let foreign: Vec<usize> = (0..DEVICES).filter(|&k| GROUPS[k] != GROUPS[0]).collect();
        let m = Machine::build(backend.clone(), DEVICES, &foreign, Some(DEVICE_CAPACITY))
            .unwrap_or_else(|e| panic!("pagemaps on {name}: {e}"));
        assert!(
            m.pagemaps
                .iter()
                .all(|p| p.devmem().capacity_bytes() == DEVICE_CAPACITY),
            "{name}: every pagemap offers {DEVICE_CAPACITY} bytes"
        );
        Bed {
            name,
            pagemaps: m.pagemaps.iter().map(|p| inj.wrap_pagemap(p)).collect(),
            host: inj.wrap_host(backend.host_memory()),
            _backend: backend,
            sim: None,
            ze,
        }
    }

    /// The backend's own counters of pagemap `pm`, where it keeps them (sim, level-zero).
    fn stats(&self, pm: u8) -> Option<PagemapTally> {
        if let Some(sim) = &self.sim {
            let s = sim.stats(PagemapId(pm)).expect("stats");
            return Some(PagemapTally {
                allocations: s.allocations,
                releases: s.releases,
                used_bytes: s.used_bytes,
                copy_to_devmem_calls: s.copy_to_devmem_calls,
                copy_to_ram_calls: s.copy_to_ram_calls,
            });
        }
        let s = self.ze.as_ref()?.ze_pagemap(PagemapId(pm))?.stats();
        Some(PagemapTally {
            allocations: s.allocations,
            releases: s.releases,
            used_bytes: s.used_bytes,
            copy_to_devmem_calls: s.copy_to_devmem_calls,
            copy_to_ram_calls: s.copy_to_ram_calls,
        })
    }

    /// Free host granules by the backend's own count (sim's arena, level-zero's chunks).
    fn host_free_granules(&self) -> Option<u64> {
        if let Some(sim) = &self.sim {
            return Some(sim.arena_host().free_granules());
        }
        Some(self.ze.as_ref()?.ze_host().free_granules())
    }
}

/// The software Level Zero driver's counters, read through a backend of its own (opened
/// once; its objects are part of every baseline).
fn soft_counters() -> Result<SoftCounters, String> {
    static PROBE: std::sync::OnceLock<Result<(LevelZeroBackend, SoftDriver), String>> =
        std::sync::OnceLock::new();
    let probe = PROBE.get_or_init(|| {
        common::route_level_zero()?;
        let b = LevelZeroBackend::new(LevelZeroConfig {
            devices: Some(1),
            ..LevelZeroConfig::default()
        })
        .map_err(|e| e.to_string())?;
        let d = SoftDriver::new(&b)?;
        Ok((b, d))
    });
    let (_, d) = probe.as_ref().map_err(Clone::clone)?;
    d.counters()
}

/// Level Zero cases run one at a time: the driver's counters are process-wide.
static ZE_CASES: Mutex<()> = Mutex::new(());

/// Runs one case on `backend`; on level-zero also checks the software driver: no strict
/// violation (a copy outside every allocation, a handle used after destroy, ...) and, once
/// the world is dropped, every driver object it made destroyed again.
fn run_case_on(backend: &'static str, f: impl FnOnce() -> Check) -> Check {
    if backend != "level-zero" {
        return f();
    }
    let _one = ZE_CASES.lock().unwrap_or_else(|p| p.into_inner());
    let before = soft_counters()?;
    f()?;
    let after = soft_counters()?;
    ensure!(
        after.strict_violations == before.strict_violations,
        "the software driver counted {} strict violations",
        after.strict_violations - before.strict_violations
    );
    let live = |c: &SoftCounters| {
        [
            ("allocations", c.live_allocations),
            ("device bytes", c.live_device_bytes),
            ("events", c.live_events),
            ("event pools", c.live_event_pools),
            ("command lists", c.live_command_lists),
            ("queues", c.live_queues),
        ]
    };
    ensure!(
        live(&after) == live(&before),
        "driver objects left after the world was dropped: {:?}, before: {:?}",
        live(&after),
        live(&before)
    );
    Ok(())
}

struct World {
    bed: Bed,
    mm: Arc<AddressSpace>,
    /// With GPU faults: the xe-svm context (it owns the pagemaps' registration) and one GPU
    /// VM per device.
    svm: Option<(xe_svm::Svm, Vec<xe_svm::GpuVm>)>,
    inj: Arc<FaultInjector>,
    audit: Arc<AuditLog>,
    slots: [Option<SlotModel>; SLOTS],
    stale: Vec<AllocId>,
    /// The backend's own count of free host granules at the start (sim, level-zero).
    host_free: Option<u64>,
    mutation: Mutation,
    /// Every slot in one 2 MiB block (see [`slot_base`]).
    packed: bool,
    /// SVM ranges GPU faults served since their slot was created: (device, slot, range).
    served: BTreeSet<(u8, usize, u64, u64)>,
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

fn out_of_memory(e: &Error) -> bool {
    matches!(e, Error::Backend { op: drm_pagemap::BackendOp::Allocate, source, .. } if source.kind == BackendErrorKind::OutOfMemory)
}

impl World {
    fn new(mutation: Mutation) -> World {
        World::build(mutation, false, false)
    }

    fn build(mutation: Mutation, gpu: bool, packed: bool) -> World {
        World::build_on("sim", mutation, gpu, packed)
    }

    fn build_on(backend: &'static str, mutation: Mutation, gpu: bool, packed: bool) -> World {
        let inj = FaultInjector::new();
        let bed = Bed::open(backend, &inj);
        let audit = Arc::new(AuditLog::default());
        let host: Arc<dyn HostMemory> = Arc::new(AuditedHost {
            inner: bed.host.clone(),
            log: audit.clone(),
        });
        let mm = Arc::new(AddressSpace::new(host));
        let mut audited = Vec::new();
        for pm in &bed.pagemaps {
            let dm = Arc::new(AuditedDevmem {
                pagemap: pm.id().0,
                inner: pm.devmem().clone(),
                log: audit.clone(),
            });
            audited.push(pm.with_ops(pm.ops().clone(), dm));
        }
        let svm = if gpu {
            let svm = xe_svm::Svm::new(mm.clone(), audited, xe_svm::SvmConfig::default())
                .expect("svm context");
            let vms = (0..DEVICES as u8)
                .map(|k| svm.vm(PagemapId(k)).expect("gpu vm"))
                .collect();
            Some((svm, vms))
        } else {
            for pm in audited {
                mm.add_pagemap(pm).expect("add pagemap");
            }
            None
        };
        let host_free = bed.host_free_granules();
        World {
            bed,
            mm,
            svm,
            inj,
            audit,
            slots: Default::default(),
            stale: Vec::new(),
            host_free,
            mutation,
            packed,
            served: BTreeSet::new(),
        }
    }

    /// An address in `slot`'s part of the address space, outside every other slot's.
    fn slot_addr(&self, slot: usize) -> u64 {
        slot_base(slot, PageSize::Size64K, self.packed)
    }

    /// Every location of every live slot.
    fn snapshot(&self) -> Result<BTreeMap<usize, Vec<PageLocation>>, String> {
        let mut out = BTreeMap::new();
        for (i, s) in self.slots.iter().enumerate() {
            if let Some(s) = s {
                let l = self
                    .mm
                    .locations(s.range())
                    .map_err(|e| format!("locations of slot {i}: {e}"))?;
                ensure!(
                    l.len() == s.pages,
                    "slot {i}: {} locations for {} pages",
                    l.len(),
                    s.pages
                );
                out.insert(i, l);
            }
        }
        Ok(out)
    }

    /// Runs `f` with `fault` armed; returns its result and whether the fault fired in it.
    fn with_fault<T: FromInjectedPanic>(
        &self,
        fault: Option<Fault>,
        f: impl FnOnce() -> T,
    ) -> (T, bool) {
        let before = self.inj.injected();
        let panics = fault.is_some_and(|fl| fl.panic);
        if let Some(fl) = fault {
            self.inj.set_panics(panics);
            self.inj.fail_nth(fl.site, fl.nth);
        }
        let r = if panics {
            quiet_injected_panics();
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
                Ok(r) => r,
                Err(p) => {
                    let msg = p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    assert!(
                        msg.starts_with("injected panic"),
                        "a panic that was not injected: {msg}"
                    );
                    totals().panics.fetch_add(1, Ordering::Relaxed);
                    // A migration that unwound parks its destination while copies it had
                    // issued still run past its fence timeout; they finish (the model injects
                    // no hangs), and then nothing may be left.
                    let t = std::time::Instant::now();
                    while self.mm.deferred_cleanups() > 0
                        && t.elapsed() < std::time::Duration::from_secs(10)
                    {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                    T::from_panic(msg)
                }
            }
        } else {
            f()
        };
        self.inj.disarm();
        self.inj.set_panics(false);
        let fired = self.inj.injected() > before;
        if fired && let Some(fl) = fault {
            totals().faults[site_index(fl.site)].fetch_add(1, Ordering::Relaxed);
        }
        (r, fired)
    }

    fn used(&self, pm: u8) -> u64 {
        self.audit.tally(pm).used_bytes
    }

    /// The accounting invariants that hold between operations.
    fn check_invariants(&self) -> Check {
        // Releases queued in the background are part of the step.
        self.mm.flush_releases();
        let snap = self.snapshot()?;
        let allocs = self.mm.allocations();
        let mut refs: HashMap<AllocId, usize> = HashMap::new();
        let mut devices = 0u64;
        for locs in snap.values() {
            for l in locs {
                if let PageLocation::Device { pagemap, alloc } = *l {
                    *refs.entry(alloc).or_default() += 1;
                    let info = self.mm.allocation(alloc).ok_or(format!(
                        "a page references allocation {alloc} which does not exist"
                    ))?;
                    ensure!(
                        info.pagemap == pagemap,
                        "allocation {alloc} is in {} but a page says {pagemap}",
                        info.pagemap
                    );
                    devices |= 1 << pagemap.0;
                }
            }
        }
        totals()
            .max_layout_devices
            .fetch_max(devices.count_ones() as u64, Ordering::Relaxed);
        for a in &allocs {
            ensure!(
                a.state == AllocState::Live,
                "allocation {} left in state {:?} between operations",
                a.id,
                a.state
            );
            let n = refs.get(&a.id).copied().unwrap_or(0);
            ensure!(
                n > 0,
                "allocation {} is live with no page referencing it (leak)",
                a.id
            );
            ensure!(
                a.live_pages == n,
                "allocation {}: {} live pages counted, {n} pages reference it",
                a.id,
                a.live_pages
            );
        }
        ensure!(
            refs.len() == allocs.len(),
            "{} allocations referenced, {} listed",
            refs.len(),
            allocs.len()
        );
        for pm in 0..DEVICES as u8 {
            let st = self.audit.tally(pm);
            // Where the backend keeps its own counters (sim, level-zero), they agree with
            // the audit's.
            if let Some(own) = self.bed.stats(pm) {
                ensure!(
                    (own.allocations, own.releases, own.used_bytes)
                        == (st.allocations, st.releases, st.used_bytes),
                    "pagemap {pm}: {} counts {own:?}, the audit {st:?}",
                    self.bed.name
                );
            }
            let mine: Vec<_> = allocs
                .iter()
                .filter(|a| a.pagemap == PagemapId(pm))
                .collect();
            let bytes: u64 = mine
                .iter()
                .map(|a| a.npages as u64 * a.page_size.bytes())
                .sum();
            ensure!(
                st.used_bytes == bytes,
                "pagemap {pm}: {} bytes used, live allocations hold {bytes}",
                st.used_bytes
            );
            ensure!(
                st.allocations - st.releases == mine.len() as u64,
                "pagemap {pm}: {} allocations, {} releases, {} live",
                st.allocations,
                st.releases,
                mine.len()
            );
        }
        ensure!(
            self.mm.deferred_cleanups() == 0,
            "a deferred cleanup without a timed-out fence"
        );
        let v = self.audit.violations();
        ensure!(v.is_empty(), "release audit: {v:?}");
        Ok(())
    }

    fn step(&mut self, op: &Op) -> Check {
        match *op {
            Op::Create { slot, pages, big } => self.create(slot, pages, big),
            Op::Free { slot } => self.free(slot),
            Op::Recreate {
                slot,
                pages,
                big,
                flip,
                seed,
            } => {
                let big = match &self.slots[slot] {
                    Some(s) if flip => s.ps == PageSize::Size4K,
                    _ => big,
                };
                self.free(slot)?;
                self.create(slot, pages, big)?;
                self.write(slot, 0, u64::MAX, seed, None)
            }
            Op::Write {
                slot,
                at,
                len,
                seed,
                fault,
            } => self.write(slot, at, len, seed, fault),
            Op::Read {
                slot,
                at,
                len,
                fault,
            } => self.read(slot, at, len, fault),
            Op::Migrate {
                slot,
                first,
                count,
                to,
                ref flags,
                fault,
            } => self.migrate(slot, first, count, to, flags, Misuse::None, false, fault),
            Op::Reserve {
                slot,
                first,
                count,
                to,
                ref flags,
                misuse,
                fault,
            } => self.migrate(slot, first, count, to, flags, misuse, true, fault),
            Op::ReserveRelease { to, count, fault } => self.reserve_release(to, count, fault),
            Op::Evict { slot, page, fault } => self.evict(slot, page, fault),
            Op::EvictStale => self.evict_stale(),
            Op::GpuFault {
                slot,
                at,
                device,
                access,
                fault,
            } => self.gpu_fault(slot, at, device, access, fault),
            Op::Scatter {
                slot,
                mask,
                devs,
                gather,
                ref flags,
                fault,
            } => {
                let Some(pages) = self.slots[slot].as_ref().map(|s| s.pages) else {
                    return Ok(());
                };
                for i in (0..pages.min(16)).filter(|i| mask >> i & 1 == 1) {
                    // The two devices other than `gather`, so the gather is not refused as fragmented.
                    let to = ((gather as u32 + 1 + (devs >> i & 1)) % 3) as u8;
                    let flags = Flags {
                        same: true,
                        spm: true,
                        consecutive: false,
                        timeslice: false,
                        timeout: false,
                    };
                    self.migrate(slot, i, 0, to, &flags, Misuse::None, false, None)?;
                }
                self.migrate(slot, 0, TO_END, gather, flags, Misuse::None, false, fault)
            }
        }
    }

    fn create(&mut self, slot: usize, pages: usize, big: bool) -> Check {
        let (ps, pages) = if big {
            (PageSize::Size64K, 1 + (pages - 1) % MAX_64K_PAGES)
        } else {
            (PageSize::Size4K, pages)
        };
        let range = VaRange::new(slot_base(slot, ps, self.packed), pages as u64 * ps.bytes());
        let r = self.mm.create_range(range, ps);
        match (&self.slots[slot], r) {
            (None, Ok(())) => {
                self.slots[slot] = Some(SlotModel {
                    base: range.start,
                    ps,
                    pages,
                    bytes: vec![0; range.len as usize],
                });
                let l = self.mm.locations(range).map_err(|e| e.to_string())?;
                ensure!(
                    l.iter().all(|l| *l == PageLocation::Unpopulated),
                    "a new range is not all holes: {l:?}"
                );
                Ok(())
            }
            (
                Some(_),
                Err(Error::BadRange {
                    problem: RangeProblem::Overlapping,
                    ..
                }),
            ) => Ok(()),
            (s, r) => Err(format!("create slot {slot} (live: {}): {r:?}", s.is_some())),
        }
    }

    fn free(&mut self, slot: usize) -> Check {
        let start = self.slots[slot]
            .as_ref()
            .map_or(self.slot_addr(slot), |s| s.base);
        let r = self.mm.free_range(start);
        match (&self.slots[slot], r) {
            (Some(_), Ok(())) => {
                self.slots[slot] = None;
                // Their CPU range is gone: SVM ranges cut from it are stale now.
                self.served.retain(|&(_, sl, _, _)| sl != slot);
                Ok(())
            }
            (
                None,
                Err(Error::BadRange {
                    problem: RangeProblem::NotMapped,
                    ..
                }),
            ) => Ok(()),
            (s, r) => Err(format!("free slot {slot} (live: {}): {r:?}", s.is_some())),
        }
    }

    /// Resolves random (at, len) into a byte span of the slot, at most 3 pages long.
    fn span(s: &SlotModel, at: u64, len: u64) -> (u64, u64) {
        let size = s.bytes.len() as u64;
        if (at, len) == (0, u64::MAX) {
            return (0, size); // the whole range
        }
        let off = at % size;
        let max = (size - off).min(3 * s.ps.bytes());
        (off, 1 + len % max)
    }

    /// Locations may only move device -> system outside `touched` pages; inside, `inside`
    /// says what is allowed.
    fn check_cpu_locations(
        before: &BTreeMap<usize, Vec<PageLocation>>,
        after: &BTreeMap<usize, Vec<PageLocation>>,
        touched: Option<(usize, usize, usize)>,
        write: bool,
    ) -> Check {
        ensure!(
            before.len() == after.len(),
            "CPU access changed the set of ranges"
        );
        for (slot, b) in before {
            let a = &after[slot];
            for (p, (lb, la)) in b.iter().zip(a).enumerate() {
                let inside = touched.is_some_and(|(s, f, e)| s == *slot && p >= f && p < e);
                let ok = if inside {
                    match (lb, la) {
                        (_, PageLocation::System) => true,
                        (PageLocation::Unpopulated, PageLocation::Unpopulated) => !write,
                        _ => false,
                    }
                } else {
                    lb == la
                        || (matches!(lb, PageLocation::Device { .. })
                            && *la == PageLocation::System)
                };
                ensure!(
                    ok,
                    "slot {slot} page {p}: {lb:?} -> {la:?} after a CPU {} (touched {touched:?})",
                    if write { "write" } else { "read" }
                );
            }
        }
        Ok(())
    }

    fn write(&mut self, slot: usize, at: u64, len: u64, seed: u8, fault: Option<Fault>) -> Check {
        let Some(s) = self.slots[slot].clone() else {
            let r = self.mm.write(self.slot_addr(slot) + at % 4096, &[seed]);
            ensure!(
                matches!(
                    r,
                    Err(Error::BadRange {
                        problem: RangeProblem::NotMapped,
                        ..
                    })
                ),
                "write to freed slot {slot}: {r:?}"
            );
            return Ok(());
        };
        let (off, n) = Self::span(&s, at, len);
        let data: Vec<u8> = (0..n)
            .map(|i| seed.wrapping_add((i as u8).wrapping_mul(31)) ^ (i >> 8) as u8)
            .collect();
        let before = self.snapshot()?;
        let va = s.base + off;
        let (r, fired) = self.with_fault(fault, || self.mm.write(va, &data));
        let after = self.snapshot()?;
        let ps = s.ps.bytes();
        let (f, e) = ((off / ps) as usize, (off + n).div_ceil(ps) as usize);
        match r {
            Ok(()) => {
                ensure!(
                    !fired,
                    "write succeeded although an injected fault fired in it"
                );
                let was_device = before[&slot][f..e]
                    .iter()
                    .any(|l| matches!(l, PageLocation::Device { .. }));
                if !(self.mutation == Mutation::LoseWritesToDevicePages && was_device) {
                    let m = self.slots[slot].as_mut().expect("live");
                    m.bytes[off as usize..(off + n) as usize].copy_from_slice(&data);
                }
                Self::check_cpu_locations(&before, &after, Some((slot, f, e)), true)
            }
            Err(err) => {
                totals().failed_ops.fetch_add(1, Ordering::Relaxed);
                ensure!(
                    fired && injected(&err),
                    "write failed without an injected fault: {err}"
                );
                Self::check_cpu_locations(&before, &after, None, true)
            }
        }
    }

    fn read(&mut self, slot: usize, at: u64, len: u64, fault: Option<Fault>) -> Check {
        let Some(s) = self.slots[slot].clone() else {
            let mut b = [0u8; 1];
            let r = self.mm.read(self.slot_addr(slot) + at % 4096, &mut b);
            ensure!(
                matches!(
                    r,
                    Err(Error::BadRange {
                        problem: RangeProblem::NotMapped,
                        ..
                    })
                ),
                "read of freed slot {slot}: {r:?}"
            );
            return Ok(());
        };
        let (off, n) = Self::span(&s, at, len);
        let before = self.snapshot()?;
        let mut buf = vec![0xA5u8; n as usize];
        let (r, fired) = self.with_fault(fault, || self.mm.read(s.base + off, &mut buf));
        let after = self.snapshot()?;
        let ps = s.ps.bytes();
        let (f, e) = ((off / ps) as usize, (off + n).div_ceil(ps) as usize);
        match r {
            Ok(()) => {
                ensure!(
                    !fired,
                    "read succeeded although an injected fault fired in it"
                );
                let want = &s.bytes[off as usize..(off + n) as usize];
                if buf != want {
                    let i = buf.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
                    return Err(format!(
                        "read mismatch: slot {slot} byte {} reads {:#x}, model says {:#x}",
                        off as usize + i,
                        buf[i],
                        want[i]
                    ));
                }
                totals().reads_checked.fetch_add(1, Ordering::Relaxed);
                totals().bytes_checked.fetch_add(n, Ordering::Relaxed);
                Self::check_cpu_locations(&before, &after, Some((slot, f, e)), false)
            }
            Err(err) => {
                totals().failed_ops.fetch_add(1, Ordering::Relaxed);
                ensure!(
                    fired && injected(&err),
                    "read failed without an injected fault: {err}"
                );
                Self::check_cpu_locations(&before, &after, None, false)
            }
        }
    }

    /// What the model predicts for a migration of `locs` to `to`, once allocated.
    fn predict_plan(
        locs: &[PageLocation],
        to: u8,
        same: bool,
    ) -> Result<MigrateOutcome, BusyReason> {
        let mut own = 0;
        for l in locs {
            if let PageLocation::Device { pagemap, .. } = l {
                if GROUPS[pagemap.0 as usize] != GROUPS[to as usize] {
                    return Err(BusyReason::ForeignOwner);
                }
                own += (pagemap.0 == to) as usize;
            }
        }
        if own == locs.len() {
            Ok(MigrateOutcome::NotNeeded)
        } else if own > 0 && !same {
            Err(BusyReason::Fragmentation)
        } else {
            Ok(MigrateOutcome::Migrated)
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn migrate(
        &mut self,
        slot: usize,
        first: usize,
        count: usize,
        to: u8,
        flags: &Flags,
        misuse: Misuse,
        reserve: bool,
        fault: Option<Fault>,
    ) -> Check {
        let details = flags.details();
        let Some(s) = self.slots[slot].clone() else {
            let range = VaRange::new(self.slot_addr(slot), 4096);
            let r = self.mm.migrate(range, PagemapId(to), &details);
            ensure!(
                matches!(
                    r,
                    Err(Error::BadRange {
                        problem: RangeProblem::NotMapped,
                        ..
                    })
                ),
                "migrate of freed slot {slot}: {r:?}"
            );
            return Ok(());
        };
        let first = first % s.pages;
        let count = if count == TO_END {
            s.pages - first
        } else {
            1 + count % (s.pages - first)
        };
        let ps = s.ps.bytes();
        let range = VaRange::new(s.base + first as u64 * ps, count as u64 * ps);
        let before = self.snapshot()?;
        let locs = &before[&slot][first..first + count];
        let need = count as u64 * ps;
        let used = self.used(to);
        let stats0: Vec<_> = (0..DEVICES as u8)
            .map(|k| (self.audit.tally(k), self.bed.stats(k)))
            .collect();
        let mut reserved = None;
        let (r, fired) = self.with_fault(fault, || {
            if !reserve {
                return self.mm.migrate(range, PagemapId(to), &details);
            }
            let (n, p) = match misuse {
                Misuse::None => (count, s.ps),
                Misuse::WrongCount => (count + 1, s.ps),
                Misuse::WrongPageSize => (
                    count,
                    if s.ps == PageSize::Size4K {
                        PageSize::Size64K
                    } else {
                        PageSize::Size4K
                    },
                ),
            };
            let id = self.mm.allocate_devmem(PagemapId(to), n, p, range)?;
            reserved = Some(id);
            self.mm.migrate_to_devmem(id, range, &details)
        });
        let after = self.snapshot()?;
        let res_bytes = match misuse {
            Misuse::WrongCount if reserve => need + ps,
            Misuse::WrongPageSize if reserve => {
                count as u64
                    * if s.ps == PageSize::Size4K {
                        64 << 10
                    } else {
                        4 << 10
                    }
            }
            _ => need,
        };
        let fragmented = s.ps != PageSize::Size4K || (reserve && !matches!(misuse, Misuse::None));
        match r {
            Ok(rep) => {
                ensure!(
                    !fired,
                    "migration succeeded although an injected fault fired in it"
                );
                ensure!(
                    res_bytes <= DEVICE_CAPACITY,
                    "a {res_bytes}-byte allocation succeeded on a {DEVICE_CAPACITY}-byte device"
                );
                ensure!(
                    !reserve || matches!(misuse, Misuse::None),
                    "migrate_to_devmem accepted a reservation misused with {misuse:?}"
                );
                let want = Self::predict_plan(locs, to, flags.same);
                ensure!(
                    want == Ok(rep.outcome),
                    "migration outcome {:?}, model says {want:?}",
                    rep.outcome
                );
                ensure!(
                    rep.pages == count,
                    "report counts {} pages for {count}",
                    rep.pages
                );
                match rep.outcome {
                    MigrateOutcome::NotNeeded => {
                        totals().not_needed.fetch_add(1, Ordering::Relaxed);
                        ensure!(
                            before == after,
                            "a migration that was not needed moved pages"
                        );
                        ensure!(
                            rep.alloc.is_none() && rep.calls.is_empty(),
                            "not needed yet {rep:?}"
                        );
                    }
                    MigrateOutcome::Migrated => {
                        totals().migrations.fetch_add(1, Ordering::Relaxed);
                        let id = rep.alloc.ok_or("a migration without its allocation")?;
                        if let Some(r) = reserved {
                            ensure!(
                                r == id,
                                "migrate_to_devmem used {id}, not the reservation {r}"
                            );
                        }
                        for (sl, b) in &before {
                            for (p, (lb, la)) in b.iter().zip(&after[sl]).enumerate() {
                                let inside = *sl == slot && p >= first && p < first + count;
                                if inside {
                                    ensure!(
                                        *la == PageLocation::Device {
                                            pagemap: PagemapId(to),
                                            alloc: id
                                        },
                                        "slot {sl} page {p} is {la:?} after migrating to {to}"
                                    );
                                } else {
                                    ensure!(
                                        lb == la,
                                        "slot {sl} page {p} outside the range moved: {lb:?} -> {la:?}"
                                    );
                                }
                            }
                        }
                        self.check_calls(locs, to, flags, &rep.calls, &stats0)?;
                    }
                }
                Ok(())
            }
            Err(err) => {
                totals().failed_ops.fetch_add(1, Ordering::Relaxed);
                ensure!(before == after, "failed migration ({err}) moved pages");
                ensure!(!err.to_string().is_empty(), "empty error message");
                if fired {
                    ensure!(
                        injected(&err),
                        "an injected fault fired but the error is {err}"
                    );
                } else if res_bytes > DEVICE_CAPACITY {
                    ensure!(
                        matches!(err, Error::TooLarge { .. }),
                        "expected TooLarge, got {err}"
                    );
                } else if out_of_memory(&err) {
                    ensure!(
                        used + res_bytes > DEVICE_CAPACITY || fragmented,
                        "out of memory with {used} of {DEVICE_CAPACITY} used, {res_bytes} asked"
                    );
                } else if reserve && matches!(misuse, Misuse::WrongPageSize) {
                    ensure!(
                        matches!(err, Error::PageSizeMismatch { .. }),
                        "expected PageSizeMismatch, got {err}"
                    );
                } else if reserve && matches!(misuse, Misuse::WrongCount) {
                    ensure!(
                        matches!(
                            err,
                            Error::BadRange {
                                problem: RangeProblem::OutOfRange,
                                ..
                            }
                        ),
                        "expected a page-count mismatch error, got {err}"
                    );
                } else {
                    match (Self::predict_plan(locs, to, flags.same), &err) {
                        (Err(want), Error::Busy { reason, .. }) if want == *reason => {}
                        (want, _) => {
                            return Err(format!(
                                "migration failed with {err}, model says {want:?}"
                            ));
                        }
                    }
                }
                if let Some(id) = reserved {
                    ensure!(
                        self.mm.allocation(id).is_none(),
                        "a failed migrate_to_devmem did not consume reservation {id}"
                    );
                    self.stale.push(id);
                }
                Ok(())
            }
        }
    }

    /// With `BySource`, one call per distinct (executor, op), carrying every non-hole page;
    /// the calls each pagemap accepted (the audit; on sim and level-zero also the backend's
    /// own call counters) moved by exactly the calls reported.
    fn check_calls(
        &self,
        locs: &[PageLocation],
        to: u8,
        flags: &Flags,
        calls: &[drm_pagemap::CopyCall],
        stats0: &[(PagemapTally, Option<PagemapTally>)],
    ) -> Check {
        let moved = locs
            .iter()
            .filter(|l| **l != PageLocation::Unpopulated)
            .count();
        let total: usize = calls.iter().map(|c| c.pages).sum();
        ensure!(
            total == moved,
            "copy calls carry {total} pages, {moved} had data"
        );
        let key = |l: &PageLocation| match l {
            PageLocation::Unpopulated => None,
            PageLocation::System => Some((to, CopyOp::ToDevmem)),
            PageLocation::Device { pagemap, .. } if flags.spm => Some((pagemap.0, CopyOp::ToRam)),
            PageLocation::Device { .. } => Some((to, CopyOp::ToDevmem)),
        };
        let data: Vec<(u8, CopyOp)> = locs.iter().filter_map(key).collect();
        let runs = 1 + data.windows(2).filter(|w| w[0] != w[1]).count();
        if !flags.consecutive {
            let mut keys: Vec<(u8, CopyOp)> = Vec::new();
            let mut counts: Vec<usize> = Vec::new();
            for k in locs.iter().filter_map(key) {
                match keys.iter().position(|&x| x == k) {
                    Some(i) => counts[i] += 1,
                    None => {
                        keys.push(k);
                        counts.push(1);
                    }
                }
            }
            // One call per source in first-page order, cut into pieces of at most
            // `max_call_pages` pages (the last piece of a source takes the rest), issued in
            // rounds: every source's first piece in that order, then every second piece, ...
            let piece = flags
                .details()
                .max_call_pages
                .map_or(usize::MAX, |n| n.get() as usize);
            let mut expected: Vec<(u8, CopyOp, usize)> = Vec::new();
            let mut left = counts.clone();
            while left.iter().any(|&n| n > 0) {
                for (&k, n) in keys.iter().zip(left.iter_mut()) {
                    if *n > 0 {
                        let p = (*n).min(piece);
                        expected.push((k.0, k.1, p));
                        *n -= p;
                    }
                }
            }
            let got: Vec<(u8, CopyOp, usize)> = calls
                .iter()
                .map(|c| (c.executor.0, c.op, c.pages))
                .collect();
            ensure!(
                got == expected,
                "BySource issued {got:?}, expected one call per source in first-page order, \
                 in pieces of at most {piece} pages: {expected:?}"
            );
            if !data.is_empty() && runs > keys.len() {
                totals().reappearing_sources.fetch_add(1, Ordering::Relaxed);
            }
        }
        // The backends of the suites declare no command limit, so under xe-svm too each of
        // the engine's calls reaches the backend whole: the counters count exactly the
        // report's calls.
        for k in 0..DEVICES as u8 {
            let d = calls
                .iter()
                .filter(|c| c.executor.0 == k && c.op == CopyOp::ToDevmem)
                .count() as u64;
            let r = calls
                .iter()
                .filter(|c| c.executor.0 == k && c.op == CopyOp::ToRam)
                .count() as u64;
            let (audit0, own0) = &stats0[k as usize];
            let now = self.audit.tally(k);
            ensure!(
                now.copy_to_devmem_calls - audit0.copy_to_devmem_calls == d
                    && now.copy_to_ram_calls - audit0.copy_to_ram_calls == r,
                "pagemap {k}: it accepted other copy calls than the report lists"
            );
            if let (Some(own0), Some(own)) = (own0, self.bed.stats(k)) {
                ensure!(
                    own.copy_to_devmem_calls - own0.copy_to_devmem_calls == d
                        && own.copy_to_ram_calls - own0.copy_to_ram_calls == r,
                    "pagemap {k}: {} saw other copy calls than the report lists",
                    self.bed.name
                );
            }
        }
        Ok(())
    }

    fn reserve_release(&mut self, to: u8, count: usize, fault: Option<Fault>) -> Check {
        let range = VaRange::new(BASE - (1 << 20), 4096);
        let ((r, rel), fired) = self.with_fault(fault, || {
            match self
                .mm
                .allocate_devmem(PagemapId(to), count, PageSize::Size4K, range)
            {
                Ok(id) => {
                    let mid = self.mm.allocation(id).map(|a| a.state);
                    (Ok((id, mid)), self.mm.release_devmem(id))
                }
                Err(e) => (Err(e), Ok(())),
            }
        });
        match r {
            Ok((id, state)) => {
                ensure!(
                    !fired,
                    "a reservation succeeded although its allocation fault fired"
                );
                ensure!(
                    state == Some(AllocState::Reserved),
                    "a fresh reservation is {state:?}"
                );
                ensure!(rel.is_ok(), "release_devmem of a reservation: {rel:?}");
                ensure!(
                    self.mm.allocation(id).is_none(),
                    "released reservation {id} still listed"
                );
                let again = self.mm.release_devmem(id);
                ensure!(
                    matches!(again, Err(Error::NoSuchAllocation { .. })),
                    "second release_devmem: {again:?}"
                );
                self.stale.push(id);
            }
            Err(e) => {
                let ok = (fired && injected(&e)) || out_of_memory(&e);
                ensure!(ok, "reservation failed: {e}");
            }
        }
        Ok(())
    }

    fn evict(&mut self, slot: usize, page: usize, fault: Option<Fault>) -> Check {
        let Some(s) = &self.slots[slot] else {
            return Ok(());
        };
        let page = page % s.pages;
        let before = self.snapshot()?;
        let PageLocation::Device { alloc, .. } = before[&slot][page] else {
            return Ok(());
        };
        let refs = before
            .values()
            .flatten()
            .filter(|l| matches!(l, PageLocation::Device { alloc: a, .. } if *a == alloc))
            .count();
        let (r, fired) = self.with_fault(fault, || self.mm.evict_to_ram(alloc));
        let after = self.snapshot()?;
        match r {
            Ok(rep) => {
                ensure!(
                    !fired,
                    "eviction succeeded although an injected fault fired in it"
                );
                totals().evictions.fetch_add(1, Ordering::Relaxed);
                ensure!(
                    rep.pages == refs && rep.released,
                    "eviction of {refs} pages reports {rep:?}"
                );
                ensure!(
                    self.mm.allocation(alloc).is_none(),
                    "evicted allocation {alloc} still exists"
                );
                for (sl, b) in &before {
                    for (p, (lb, la)) in b.iter().zip(&after[sl]).enumerate() {
                        let mine =
                            matches!(lb, PageLocation::Device { alloc: a, .. } if *a == alloc);
                        let ok = if mine {
                            *la == PageLocation::System
                        } else {
                            lb == la
                        };
                        ensure!(
                            ok,
                            "slot {sl} page {p}: {lb:?} -> {la:?} after evicting {alloc}"
                        );
                    }
                }
                self.stale.push(alloc);
                Ok(())
            }
            Err(err) => {
                totals().failed_ops.fetch_add(1, Ordering::Relaxed);
                ensure!(
                    fired && injected(&err),
                    "eviction failed without an injected fault: {err}"
                );
                ensure!(before == after, "failed eviction ({err}) moved pages");
                Ok(())
            }
        }
    }

    /// A GPU fault changes no byte; on success the SVM range it served lives where the report
    /// says (every page in the target's memory, or in system memory when served from there).
    fn gpu_fault(
        &mut self,
        slot: usize,
        at: u64,
        device: u8,
        access: u8,
        fault: Option<Fault>,
    ) -> Check {
        let Some((_, vms)) = &self.svm else {
            return Ok(());
        };
        let vm = vms[device as usize % DEVICES].clone();
        let access = match access % 4 {
            0 | 1 => xe_svm::Access::Read,
            2 => xe_svm::Access::Write,
            _ => xe_svm::Access::Atomic,
        };
        let Some(s) = self.slots[slot].clone() else {
            let r = vm.handle_gpu_fault(self.slot_addr(slot) + at % 4096, access);
            ensure!(
                matches!(r, Err(xe_svm::SvmError::NotMirrored { .. })),
                "GPU fault on freed slot {slot}: {r:?}"
            );
            return Ok(());
        };
        let va = s.base + at % s.bytes.len() as u64;
        // The other slots' SVM ranges whose page tables are valid now (in every VM): the
        // fault must leave them valid unless it moved their pages (LRU eviction).
        let neighbours: Vec<(u8, usize, VaRange)> = self
            .served
            .iter()
            .filter(|&&(d, sl, start, _)| sl != slot && vms[d as usize].is_valid(start))
            .map(|&(d, sl, start, len)| (d, sl, VaRange::new(start, len)))
            .collect();
        let before = self.snapshot()?;
        // Engine steps check panics; a GPU fault's layer keeps its own state, so its faults
        // return errors only.
        let fault = fault.map(|f| Fault { panic: false, ..f });
        let (r, fired) =
            self.with_fault(fault, || vm.handle_gpu_fault(va, access).map_err(Box::new));
        totals().gpu_faults.fetch_add(1, Ordering::Relaxed);
        let after = self.snapshot()?;
        for (d, sl, range) in neighbours {
            if before[&sl] == after[&sl] {
                ensure!(
                    vms[d as usize].is_valid(range.start),
                    "a GPU fault at {va:#x} (slot {slot}, device {device}: {r:?}) invalidated \
                     device {d}'s page table of {range} (slot {sl}), whose pages did not move"
                );
                totals().neighbours_checked.fetch_add(1, Ordering::Relaxed);
            }
        }
        match r {
            Ok(rep) => {
                ensure!(
                    rep.range.start <= va && va < rep.range.end(),
                    "fault at {va:#x} served {}",
                    rep.range
                );
                let locs = self
                    .mm
                    .locations(rep.range)
                    .map_err(|e| format!("locations of the served range: {e}"))?;
                let want_system = matches!(
                    rep.action,
                    xe_svm::FaultAction::ToSystem | xe_svm::FaultAction::FellBack
                );
                for (i, l) in locs.iter().enumerate() {
                    let ok = match (want_system, rep.target, l) {
                        (true, _, PageLocation::System) => true,
                        (false, xe_svm::Target::System, PageLocation::System) => true,
                        (
                            false,
                            xe_svm::Target::Device(pm),
                            PageLocation::Device { pagemap, .. },
                        ) => *pagemap == pm,
                        _ => false,
                    };
                    ensure!(
                        ok,
                        "after a {:?} GPU fault ({:?}, target {:?}) page {i} of {} is {l:?}",
                        access,
                        rep.action,
                        rep.target,
                        rep.range
                    );
                }
                if matches!(rep.action, xe_svm::FaultAction::Migrated { .. }) {
                    totals().gpu_migrations.fetch_add(1, Ordering::Relaxed);
                }
                ensure!(
                    s.range().contains_range(&rep.range),
                    "fault at {va:#x} served {}, not inside the CPU range {}",
                    rep.range,
                    s.range()
                );
                self.served
                    .insert((device % DEVICES as u8, slot, rep.range.start, rep.range.len));
                let valid = vm.is_valid(va);
                ensure!(
                    valid,
                    "the page table is not valid right after the fault at {va:#x}"
                );
            }
            Err(e) => {
                totals().failed_ops.fetch_add(1, Ordering::Relaxed);
                ensure!(!e.to_string().is_empty(), "empty message");
                // Without an injected fault, only a shortage of device memory (an atomic
                // fault must have it) fails a fault on a live range; never its geometry.
                let memory = match &*e {
                    xe_svm::SvmError::OutOfDeviceMemory { .. } => true,
                    xe_svm::SvmError::Migrate { source, .. } => {
                        matches!(source, Error::Busy { .. } | Error::TooLarge { .. })
                            || out_of_memory(source)
                    }
                    _ => false,
                };
                ensure!(
                    fired || memory,
                    "a {access:?} GPU fault at {va:#x} (slot {slot}) failed without an injected \
                     fault: {e}"
                );
            }
        }
        Ok(())
    }

    fn evict_stale(&mut self) -> Check {
        let Some(&id) = self.stale.last() else {
            return Ok(());
        };
        ensure!(
            self.mm.allocation(id).is_none(),
            "stale handle {id} names a live allocation"
        );
        let before = self.snapshot()?;
        let r = self.mm.evict_to_ram(id);
        ensure!(
            matches!(r, Err(Error::NoSuchAllocation { alloc }) if alloc == id),
            "evict of stale {id}: {r:?}"
        );
        let r = self.mm.release_devmem(id);
        ensure!(
            matches!(r, Err(Error::NoSuchAllocation { .. })),
            "release_devmem of stale {id}: {r:?}"
        );
        ensure!(before == self.snapshot()?, "a stale handle moved pages");
        Ok(())
    }

    /// Reads every range back whole, frees everything, checks nothing is left.
    fn finish(&mut self) -> Check {
        self.inj.disarm();
        for slot in 0..SLOTS {
            let Some(s) = self.slots[slot].clone() else {
                continue;
            };
            let mut buf = vec![0x5Au8; s.bytes.len()];
            self.mm
                .read(s.base, &mut buf)
                .map_err(|e| format!("final read: {e}"))?;
            if buf != s.bytes {
                let i = buf
                    .iter()
                    .zip(&s.bytes)
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                return Err(format!(
                    "read mismatch at the end: slot {slot} byte {i} reads {:#x}, model says {:#x}",
                    buf[i], s.bytes[i]
                ));
            }
            totals()
                .bytes_checked
                .fetch_add(buf.len() as u64, Ordering::Relaxed);
            if self.mutation != Mutation::LeakAtEnd {
                self.mm
                    .free_range(s.base)
                    .map_err(|e| format!("final free: {e}"))?;
                self.slots[slot] = None;
            }
        }
        // Releases the final reads queued in the background are part of the end.
        self.mm.flush_releases();
        // The final reads moved every page home, so nothing may be on a device even when
        // ranges are kept; freeing must then return every host frame too.
        ensure!(
            self.mm.allocations().is_empty(),
            "allocations left: {:?}",
            self.mm.allocations()
        );
        ensure!(self.mm.deferred_cleanups() == 0, "deferred cleanups left");
        let mut allocated = 0;
        for pm in 0..DEVICES as u8 {
            // The audit's counts on every backend; the backend's own where it keeps them.
            let own = self.bed.stats(pm);
            for (who, st) in [("audit", Some(self.audit.tally(pm))), (self.bed.name, own)] {
                let Some(st) = st else { continue };
                ensure!(
                    st.used_bytes == 0,
                    "pagemap {pm}: {} device bytes still in use ({who})",
                    st.used_bytes
                );
                ensure!(
                    st.allocations == st.releases,
                    "pagemap {pm}: {} allocations, {} releases ({who})",
                    st.allocations,
                    st.releases
                );
            }
            allocated += self.audit.tally(pm).allocations;
        }
        ensure!(
            self.mm.released_allocations() == allocated,
            "{} allocations made, the address space released {}",
            allocated,
            self.mm.released_allocations()
        );
        let v = self.audit.violations();
        ensure!(v.is_empty(), "release audit: {v:?}");
        let o = self.audit.outstanding();
        ensure!(o.is_empty(), "never released: {o:?}");
        let held = self.audit.host_granules();
        ensure!(
            held == 0,
            "host frames leaked: {held} granules allocated and not freed"
        );
        if let (Some(start), Some(free)) = (self.host_free, self.bed.host_free_granules()) {
            ensure!(
                free == start,
                "host frames leaked: {free} of {start} granules free ({})",
                self.bed.name
            );
        }
        Ok(())
    }
}

fn run_case(ops: &[Op], mutation: Mutation) -> Check {
    run_case_with("sim", ops, mutation)
}

fn run_case_with(backend: &'static str, ops: &[Op], mutation: Mutation) -> Check {
    run_case_on(backend, || {
        run_world(World::build_on(backend, mutation, false, false), ops)
    })
}

fn run_world(mut w: World, ops: &[Op]) -> Check {
    for (i, op) in ops.iter().enumerate() {
        w.step(op).map_err(|e| format!("step {i} {op:?}: {e}"))?;
        w.check_invariants()
            .map_err(|e| format!("after step {i} {op:?}: {e}"))?;
        totals().steps.fetch_add(1, Ordering::Relaxed);
    }
    w.finish().map_err(|e| format!("end of case: {e}"))?;
    totals().cases.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Runs `cases` random sequences on `backend` (GPU faults included when `gpu`); prints the
/// figures.
fn run_model(name: &str, backend: &'static str, gpu: bool, cases: u32) {
    run_model_with(name, backend, gpu, cases, ReleaseMode::Inline)
}

/// [`run_model`] with the address space giving back replaced pages as `release` says (the
/// checks after each step wait for queued releases first).
fn run_model_with(name: &str, backend: &'static str, gpu: bool, cases: u32, release: ReleaseMode) {
    let cases: u32 = std::env::var("DRM_PAGEMAP_MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    let max_ops = if long() { 80 } else { 40 };
    let mut runner = TestRunner::new(Config {
        cases,
        max_shrink_iters: 2_000,
        // The minimal failing sequence is printed; nothing is written next to the sources.
        failure_persistence: None,
        ..Config::default()
    });
    let t = std::time::Instant::now();
    // Every case starts by creating a few ranges, most of them filled with data, so the
    // random steps have pages to work on.
    let creates = prop::collection::vec(
        (
            0..SLOTS,
            1..=MAX_4K_PAGES,
            prop::bool::weighted(0.25),
            prop::option::weighted(0.75, any::<u8>()),
        )
            .prop_map(|(slot, pages, big, fill)| {
                let mut v = vec![Op::Create { slot, pages, big }];
                if let Some(seed) = fill {
                    v.push(Op::Write {
                        slot,
                        at: 0,
                        len: u64::MAX,
                        seed,
                        fault: None,
                    });
                }
                v
            }),
        1..=SLOTS,
    );
    let steps = if gpu {
        prop_oneof![6 => op(), 2 => gpu_fault_op(), 1 => recreate_op()].boxed()
    } else {
        op().boxed()
    };
    // With GPU faults, half the cases pack every slot into one 2 MiB block.
    let packed = if gpu {
        prop::bool::weighted(0.5).boxed()
    } else {
        Just(false).boxed()
    };
    let sequences =
        (creates, prop::collection::vec(steps, 1..max_ops), packed).prop_map(|(c, ops, packed)| {
            let mut all: Vec<Op> = c.into_iter().flatten().collect();
            all.extend(ops);
            (all, packed)
        });
    let result = runner.run(&sequences, |(ops, packed)| {
        totals()
            .packed_cases
            .fetch_add(packed as u64, Ordering::Relaxed);
        run_case_on(backend, || {
            let w = World::build_on(backend, Mutation::None, gpu, packed);
            w.mm.set_release_mode(release);
            run_world(w, &ops)
        })
        .map_err(TestCaseError::fail)
    });
    if let Err(e) = result {
        match e {
            TestError::Fail(why, (ops, packed)) => panic!(
                "model test failed on {backend}: {why}\nminimal sequence ({} steps, packed: {packed}):\n{ops:#?}",
                ops.len()
            ),
            TestError::Abort(why) => panic!("model test aborted on {backend}: {why}"),
        }
    }
    let f: Vec<u64> = totals()
        .faults
        .iter()
        .map(|a| a.load(Ordering::Relaxed))
        .collect();
    eprintln!(
        "{name}: {} cases, {} steps in {:.1?}; faults injected: alloc {} map {} copy {} fence-error {}; \
         {} operations failed as predicted; {} migrations ({} not needed), {} evictions; \
         {} reads checked, {} bytes compared; up to {} devices in one layout; \
         {} BySource migrations with a source that reappears; {} GPU faults ({} migrated); \
         {} cases packed into one 2 MiB block, {} neighbouring page tables checked after a GPU fault; \
         {} injected faults panicked",
        totals().cases.load(Ordering::Relaxed),
        totals().steps.load(Ordering::Relaxed),
        t.elapsed(),
        f[0],
        f[1],
        f[2],
        f[3],
        totals().failed_ops.load(Ordering::Relaxed),
        totals().migrations.load(Ordering::Relaxed),
        totals().not_needed.load(Ordering::Relaxed),
        totals().evictions.load(Ordering::Relaxed),
        totals().reads_checked.load(Ordering::Relaxed),
        totals().bytes_checked.load(Ordering::Relaxed),
        totals().max_layout_devices.load(Ordering::Relaxed),
        totals().reappearing_sources.load(Ordering::Relaxed),
        totals().gpu_faults.load(Ordering::Relaxed),
        totals().gpu_migrations.load(Ordering::Relaxed),
        totals().packed_cases.load(Ordering::Relaxed),
        totals().neighbours_checked.load(Ordering::Relaxed),
        totals().panics.load(Ordering::Relaxed),
    );
    // The run exercised what it claims to: every kind of fault fired somewhere.
    for (site, n) in ["alloc", "map", "copy", "fence error"].iter().zip(&f) {
        assert!(*n > 0, "{name}: no {site} fault fired in {cases} cases");
    }
    assert!(
        totals().migrations.load(Ordering::Relaxed) > 0
            && totals().evictions.load(Ordering::Relaxed) > 0
    );
    assert!(
        totals().reappearing_sources.load(Ordering::Relaxed) > 0,
        "no migration had a source that reappears"
    );
    assert!(
        totals().panics.load(Ordering::Relaxed) > 0,
        "no injected fault panicked"
    );
    if gpu {
        assert!(
            totals().gpu_migrations.load(Ordering::Relaxed) > 0,
            "no GPU fault migrated anything"
        );
        assert!(
            totals().neighbours_checked.load(Ordering::Relaxed) > 0,
            "no GPU fault had a neighbour with a valid page table"
        );
    }
}

#[test]
fn engine_matches_the_reference_model() {
    run_model("model", "sim", false, if long() { 200_000 } else { 2_000 });
}

#[test]
fn engine_matches_the_reference_model_with_background_release() {
    run_model_with(
        "model, background release",
        "sim",
        false,
        if long() { 50_000 } else { 500 },
        ReleaseMode::background(),
    );
}

#[test]
fn engine_and_gpu_faults_match_the_reference_model_with_background_release() {
    run_model_with(
        "model+xe-svm, background release",
        "sim",
        true,
        if long() { 10_000 } else { 100 },
        ReleaseMode::background(),
    );
}

#[test]
fn engine_and_gpu_faults_match_the_reference_model() {
    run_model(
        "model+xe-svm",
        "sim",
        true,
        if long() { 50_000 } else { 400 },
    );
}

/// The same model on another backend of `common::backends()` (skipped, with the line that
/// function prints, where it is not available), with fewer cases: each case opens the
/// backend afresh (level-zero: a context, queues and threads of the software driver).
fn model_on(backend: &'static str, gpu: bool) {
    if !common::backends().contains(&backend) {
        return;
    }
    let (engine, with_gpu) = other_cases(backend);
    let (name, cases) = if gpu {
        ("model+xe-svm", with_gpu)
    } else {
        ("model", engine)
    };
    let cases = if long() { cases * 100 } else { cases };
    run_model(&format!("{name} on {backend}"), backend, gpu, cases);
}

#[test]
fn engine_matches_the_reference_model_on_level_zero() {
    model_on("level-zero", false);
}

#[test]
fn engine_and_gpu_faults_match_the_reference_model_on_level_zero() {
    model_on("level-zero", true);
}

#[test]
fn engine_matches_the_reference_model_on_the_c_plugin() {
    model_on("hostmem", false);
}

#[test]
fn engine_and_gpu_faults_match_the_reference_model_on_the_c_plugin() {
    model_on("hostmem", true);
}

#[test]
fn engine_matches_the_reference_model_on_the_tier_plugin() {
    model_on("tier", false);
}

#[test]
fn engine_and_gpu_faults_match_the_reference_model_on_the_tier_plugin() {
    model_on("tier", true);
}

#[test]
fn engine_matches_the_reference_model_on_cuda() {
    model_on("cuda", false);
}

#[test]
fn engine_and_gpu_faults_match_the_reference_model_on_cuda() {
    model_on("cuda", true);
}

// ---------------------------------------------------------------------------------------
// The checks can fail: a wrong model, a leak and a double release are each caught.

fn flags0() -> Flags {
    Flags {
        same: false,
        spm: true,
        consecutive: false,
        timeslice: false,
        timeout: false,
    }
}

/// Write, move to device 1, write again (CPU-fault path), read back.
fn lost_write_sequence() -> Vec<Op> {
    vec![
        Op::Create {
            slot: 0,
            pages: 4,
            big: false,
        },
        Op::Write {
            slot: 0,
            at: 0,
            len: 4 * 4096 - 1,
            seed: 1,
            fault: None,
        },
        Op::Migrate {
            slot: 0,
            first: 0,
            count: 3,
            to: 1,
            flags: flags0(),
            fault: None,
        },
        Op::Write {
            slot: 0,
            at: 100,
            len: 99,
            seed: 77,
            fault: None,
        },
        Op::Read {
            slot: 0,
            at: 0,
            len: 4096 - 1,
            fault: None,
        },
    ]
}

#[test]
fn a_lost_write_is_detected() {
    let ops = lost_write_sequence();
    assert_eq!(run_case(&ops, Mutation::None), Ok(()));
    let r = run_case(&ops, Mutation::LoseWritesToDevicePages);
    assert!(matches!(&r, Err(e) if e.contains("read mismatch")), "{r:?}");
}

/// The planted bugs are caught on every backend of `common::backends()` too: the model's
/// checks do not depend on sim internals.
#[test]
fn planted_bugs_are_detected_on_every_backend() {
    for b in common::backends() {
        let ops = lost_write_sequence();
        assert_eq!(run_case_with(b, &ops, Mutation::None), Ok(()), "{b}");
        let r = run_case_with(b, &ops, Mutation::LoseWritesToDevicePages);
        assert!(
            matches!(&r, Err(e) if e.contains("read mismatch")),
            "{b}: {r:?}"
        );
        let r = run_case_on(b, || leak_at_end(b));
        assert!(
            matches!(&r, Err(e) if e.contains("allocations left")),
            "{b}: {r:?}"
        );
    }
}

/// The backend's own counters are read where it keeps them (sim, level-zero) and checked
/// against the audit; elsewhere the audit alone counts.
#[test]
fn the_backend_counters_are_read_where_kept() {
    for b in common::backends() {
        run_case_on(b, || {
            let w = World::build_on(b, Mutation::None, false, false);
            let own = matches!(b, "sim" | "level-zero");
            ensure!(
                (0..DEVICES as u8).all(|k| w.bed.stats(k).is_some() == own),
                "{b}: pagemap counters"
            );
            ensure!(w.host_free.is_some() == own, "{b}: host counters");
            Ok(())
        })
        .unwrap();
    }
}

/// On level-zero, a world whose backend is never closed leaves the software driver's objects
/// behind, and the per-case driver check says so.
#[test]
fn the_driver_check_catches_a_backend_left_open() {
    if !common::backends().contains(&"level-zero") {
        return;
    }
    let ops = lost_write_sequence();
    let r = run_case_on("level-zero", || {
        let w = World::build_on("level-zero", Mutation::None, false, false);
        // Leaked on purpose (once per process): its objects stay live.
        let w: &'static mut World = Box::leak(Box::new(w));
        for op in &ops {
            w.step(op)?;
        }
        w.finish()
    });
    assert!(
        matches!(&r, Err(e) if e.contains("driver objects left")),
        "{r:?}"
    );
}

/// A case whose end keeps a range on device 0, neither read back nor freed: the end-of-case
/// check must fail.
fn leak_at_end(backend: &'static str) -> Check {
    let ops = vec![
        Op::Create {
            slot: 2,
            pages: 2,
            big: false,
        },
        Op::Write {
            slot: 2,
            at: 5,
            len: 10,
            seed: 9,
            fault: None,
        },
        Op::Migrate {
            slot: 2,
            first: 0,
            count: 2,
            to: 0,
            flags: flags0(),
            fault: None,
        },
    ];
    let mut w = World::build_on(backend, Mutation::LeakAtEnd, false, false);
    for op in &ops {
        w.step(op).unwrap();
    }
    // Skip the final reads too: the pages stay on the device.
    w.slots = Default::default();
    w.finish()
}

#[test]
fn a_leaked_allocation_is_detected() {
    let r = leak_at_end("sim");
    assert!(
        matches!(&r, Err(e) if e.contains("allocations left")),
        "{r:?}"
    );
}

#[test]
fn the_release_audit_catches_a_double_release() {
    let sim = SimBackend::new(SimConfig::default()).unwrap();
    let pm = &sim.pagemap_per_device().unwrap()[0];
    let log = Arc::new(AuditLog::default());
    let a = AuditedDevmem {
        pagemap: 0,
        inner: pm.devmem().clone(),
        log: log.clone(),
    };
    let b = a.allocate(2, PageSize::Size4K).unwrap();
    let copy = DevmemBacking {
        cookie: b.cookie,
        npages: b.npages,
        page_size: b.page_size,
        pre_migrate_fence: None,
    };
    a.devmem_release(b);
    assert!(log.violations().is_empty());
    a.devmem_release(copy);
    assert_eq!(log.violations().len(), 1, "{:?}", log.violations());
}

#[test]
fn a_fault_that_fires_is_reported_as_a_failure() {
    // The fault plumbing of the model: an armed copy fault fails the migration, and the
    // model accepts exactly that.
    let ops = vec![
        Op::Create {
            slot: 1,
            pages: 3,
            big: false,
        },
        Op::Write {
            slot: 1,
            at: 0,
            len: 3 * 4096 - 1,
            seed: 3,
            fault: None,
        },
        Op::Migrate {
            slot: 1,
            first: 0,
            count: 3,
            to: 2,
            flags: flags0(),
            fault: Some(Fault {
                site: FaultSite::Copy,
                nth: 1,
                panic: false,
            }),
        },
        Op::Read {
            slot: 1,
            at: 0,
            len: 3 * 4096 - 1,
            fault: None,
        },
    ];
    let before = totals().faults[site_index(FaultSite::Copy)].load(Ordering::Relaxed);
    assert_eq!(run_case(&ops, Mutation::None), Ok(()));
    assert!(totals().faults[site_index(FaultSite::Copy)].load(Ordering::Relaxed) > before);
}

#[test]
fn a_source_that_reappears_costs_no_extra_call() {
    // Layout s0s migrated to pagemap 1: one copy_to_devmem by 1 for both system pages and
    // one copy_to_ram by 0 (BySource), checked by the model's call check.
    let ops = vec![
        Op::Create {
            slot: 0,
            pages: 3,
            big: false,
        },
        Op::Write {
            slot: 0,
            at: 0,
            len: 3 * 4096 - 1,
            seed: 5,
            fault: None,
        },
        Op::Migrate {
            slot: 0,
            first: 1,
            count: 0,
            to: 0,
            flags: flags0(),
            fault: None,
        },
        Op::Migrate {
            slot: 0,
            first: 0,
            count: 2,
            to: 1,
            flags: flags0(),
            fault: None,
        },
    ];
    let mut w = World::new(Mutation::None);
    for op in &ops {
        w.step(op).unwrap();
    }
    // Sim-only: the backend's own counters (the audit's agree on every backend).
    let s = w.bed.stats(1).unwrap();
    assert_eq!((s.copy_to_devmem_calls, s.copy_to_ram_calls), (1, 0));
    assert_eq!(w.bed.stats(0).unwrap().copy_to_ram_calls, 1);
    assert_eq!(w.audit.tally(1).copy_to_devmem_calls, 1);
    assert_eq!(w.audit.tally(0).copy_to_ram_calls, 1);
    w.finish().unwrap();
}
