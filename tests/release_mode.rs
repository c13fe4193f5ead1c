//! `ReleaseMode::Background`: a migration returns once its page table has switched, and the
//! pages it replaced are given back by the address space's reclaimer thread; allocations
//! never fail for memory the queue still holds; the queue is bounded; dropping the address
//! space runs what is queued; a panicking release does not stop the reclaimer. Each test
//! also shows the inline mode behaving differently where that is the point.

use drm_pagemap::sim::{SimBackend, SimConfig};
use drm_pagemap::{
    AddressSpace, Backend, BackendError, CopyCaps, CopyRequest, DeviceId, DevmemBacking, DevmemOps,
    Direction, DmaAddr, Fence, HostFrame, HostMemory, MigrateDetails, PageLocation, PageSize,
    PagemapId, Pfn, ReleaseMode, VaRange,
};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

const PAGE: u64 = 4096;
const BASE: u64 = 1 << 40;

/// Device memory whose releases can be held at a gate, made slow or made to panic, and
/// which records the thread each release ran on.
struct GatedRelease {
    inner: Arc<dyn DevmemOps>,
    /// Releases still to hold at the gate (each blocks until the gate opens).
    hold_next: AtomicU64,
    gate: Mutex<bool>,
    opened: Condvar,
    /// A release is waiting at the gate.
    waiting: AtomicBool,
    /// Each release sleeps this long first.
    delay: Mutex<Duration>,
    /// Releases still to make panic (before releasing anything).
    panic_next: AtomicU64,
    /// The name of the thread each release ran on.
    threads: Mutex<Vec<String>>,
    released: AtomicU64,
}

impl GatedRelease {
    fn new(inner: Arc<dyn DevmemOps>) -> Arc<GatedRelease> {
        Arc::new(GatedRelease {
            inner,
            hold_next: AtomicU64::new(0),
            gate: Mutex::new(false),
            opened: Condvar::new(),
            waiting: AtomicBool::new(false),
            delay: Mutex::new(Duration::ZERO),
            panic_next: AtomicU64::new(0),
            threads: Mutex::new(Vec::new()),
            released: AtomicU64::new(0),
        })
    }

    fn open(&self) {
        *self.gate.lock().unwrap() = true;
        self.opened.notify_all();
    }

    fn before_release(&self, n: usize) {
        let name = std::thread::current().name().unwrap_or("?").to_string();
        self.threads.lock().unwrap().push(name);
        let d = *self.delay.lock().unwrap();
        if !d.is_zero() {
            std::thread::sleep(d);
        }
        if self
            .hold_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |h| h.checked_sub(1))
            .is_ok()
        {
            self.waiting.store(true, Ordering::SeqCst);
            let mut open = self.gate.lock().unwrap();
            while !*open {
                open = self.opened.wait(open).unwrap();
            }
            self.waiting.store(false, Ordering::SeqCst);
        }
        if self
            .panic_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |h| h.checked_sub(1))
            .is_ok()
        {
            panic!("release panics on purpose");
        }
        self.released.fetch_add(n as u64, Ordering::SeqCst);
    }
}

impl DevmemOps for GatedRelease {
    fn allocate(&self, npages: usize, page_size: PageSize) -> Result<DevmemBacking, BackendError> {
        self.inner.allocate(npages, page_size)
    }
    fn populate_devmem_pfn(&self, b: &DevmemBacking, out: &mut [Pfn]) -> Result<(), BackendError> {
        self.inner.populate_devmem_pfn(b, out)
    }
    fn copy_to_devmem(&self, req: &CopyRequest<'_>) -> Result<Fence, BackendError> {
        self.inner.copy_to_devmem(req)
    }
    fn copy_to_ram(&self, req: &CopyRequest<'_>) -> Result<Fence, BackendError> {
        self.inner.copy_to_ram(req)
    }
    fn devmem_release(&self, backing: DevmemBacking) {
        self.before_release(1);
        self.inner.devmem_release(backing)
    }
    fn devmem_release_many(&self, backings: &[DevmemBacking]) {
        self.before_release(backings.len());
        self.inner.devmem_release_many(backings)
    }
    fn devmem_release_unused(&self, backing: DevmemBacking) {
        self.inner.devmem_release_unused(backing)
    }
    fn capacity_bytes(&self) -> u64 {
        self.inner.capacity_bytes()
    }
    fn caps(&self) -> CopyCaps {
        self.inner.caps()
    }
}

struct Rig {
    // Field order is drop order: the address space (and its reclaimer) first.
    mm: Arc<AddressSpace>,
    gates: Vec<Arc<GatedRelease>>,
    _sim: SimBackend,
    range: VaRange,
}

/// Two simulated devices of `device_pages` pages each, system memory of `host_pages`, a
/// range of `pages` 4 KiB pages written with a pattern, every pagemap's releases gated.
fn rig(pages: u64, device_pages: u64, host_pages: u64, mode: ReleaseMode) -> Rig {
    let sim = SimBackend::new(SimConfig {
        devices: 2,
        device_capacity: device_pages * PAGE,
        host_capacity: host_pages * PAGE,
        ..SimConfig::default()
    })
    .unwrap();
    let mm = Arc::new(AddressSpace::new(sim.host_memory()));
    mm.set_release_mode(mode);
    assert_eq!(mm.release_mode(), mode);
    let mut gates = Vec::new();
    for pm in sim.pagemap_per_device().unwrap() {
        let g = GatedRelease::new(pm.devmem().clone());
        mm.add_pagemap(pm.with_ops(pm.ops().clone(), g.clone()))
            .unwrap();
        gates.push(g);
    }
    let range = VaRange::new(BASE, pages * PAGE);
    mm.create_range(range, PageSize::Size4K).unwrap();
    mm.write(BASE, &pattern(range, 1)).unwrap();
    Rig {
        mm,
        gates,
        _sim: sim,
        range,
    }
}

fn pattern(range: VaRange, seed: u8) -> Vec<u8> {
    (0..range.len)
        .map(|i| (i as u8).wrapping_mul(31) ^ ((i >> 12) as u8) ^ seed)
        .collect()
}

fn check(r: &Rig, seed: u8) {
    let mut buf = vec![0u8; r.range.len as usize];
    r.mm.read(r.range.start, &mut buf).unwrap();
    assert!(buf == pattern(r.range, seed), "bytes differ");
}

fn on(r: &Rig, k: u8) -> bool {
    matches!(r.mm.location(r.range.start).unwrap(),
        PageLocation::Device { pagemap, .. } if pagemap == PagemapId(k))
}

/// Runs `f` on a thread; fails the test unless it finishes within `limit`.
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let t = std::thread::spawn(f);
    let end = Instant::now() + limit;
    while !t.is_finished() {
        assert!(Instant::now() < end, "not finished within {limit:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
    t.join().unwrap()
}

/// Waits (bounded) until `cond` holds.
fn eventually(what: &str, cond: impl Fn() -> bool) {
    let end = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < end, "{what}: not within 10 s");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn background_release_returns_before_the_old_pages_are_given_back() {
    let r = rig(64, 256, 1024, ReleaseMode::background());
    let d = MigrateDetails::default();
    r.mm.migrate(r.range, PagemapId(1), &d).unwrap();
    // Hold pagemap 1's release at the gate: the migration to pagemap 0 returns anyway.
    r.gates[1].hold_next.store(1, Ordering::SeqCst);
    let mm = r.mm.clone();
    let range = r.range;
    within(Duration::from_secs(10), move || {
        mm.migrate(range, PagemapId(0), &MigrateDetails::default())
            .unwrap()
    });
    assert!(on(&r, 0));
    check(&r, 1);
    eventually("the reclaimer reaches the gate", || {
        r.gates[1].waiting.load(Ordering::SeqCst)
    });
    let (jobs, bytes) = r.mm.pending_releases();
    assert!(
        jobs >= 1 && bytes >= 64 * PAGE,
        "{jobs} jobs, {bytes} bytes"
    );
    assert_eq!(r.gates[1].released.load(Ordering::SeqCst), 0);
    assert_eq!(
        r.gates[1].threads.lock().unwrap().as_slice(),
        ["drm-pagemap-reclaim"]
    );
    r.gates[1].open();
    // The reclaimer may finish before the flush starts (then there is nothing to wait for):
    // what counts is that the release has run when the flush returns.
    r.mm.flush_releases();
    assert_eq!(r.gates[1].released.load(Ordering::SeqCst), 1);
    assert_eq!(r.mm.pending_releases(), (0, 0));
    assert!(!r.mm.flush_releases(), "nothing left to wait for");
}

#[test]
fn inline_release_runs_before_the_migration_returns() {
    let r = rig(64, 256, 1024, ReleaseMode::Inline);
    let d = MigrateDetails::default();
    r.mm.migrate(r.range, PagemapId(1), &d).unwrap();
    r.gates[1].hold_next.store(1, Ordering::SeqCst);
    let mm = r.mm.clone();
    let range = r.range;
    let t = std::thread::spawn(move || {
        mm.migrate(range, PagemapId(0), &MigrateDetails::default())
            .unwrap()
    });
    eventually("the release reaches the gate", || {
        r.gates[1].waiting.load(Ordering::SeqCst)
    });
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        !t.is_finished(),
        "inline: the migration waits for its release"
    );
    r.gates[1].open();
    t.join().unwrap();
    assert_eq!(r.gates[1].released.load(Ordering::SeqCst), 1);
    assert_ne!(
        r.gates[1].threads.lock().unwrap()[0],
        "drm-pagemap-reclaim",
        "released on the caller's thread"
    );
    check(&r, 1);
}

/// Each device holds the range exactly once and system memory barely more: a ping-pong
/// between the devices and back to RAM needs the memory the queue still holds (releases
/// are slow), so each allocation waits for the queue and succeeds.
#[test]
fn allocations_wait_for_queued_releases_instead_of_failing() {
    let pages = 64;
    let r = rig(pages, pages, pages + 8, ReleaseMode::background());
    for g in &r.gates {
        *g.delay.lock().unwrap() = Duration::from_millis(20);
    }
    let d = MigrateDetails::default();
    for round in 0..6 {
        let k = (round % 2) as u8;
        r.mm.migrate(r.range, PagemapId(k), &d)
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert!(on(&r, k));
        if round == 3 {
            // Back to system memory: frames the queued releases hold are waited for too.
            let alloc = r.mm.allocations()[0].id;
            r.mm.evict_to_ram(alloc).unwrap();
        }
    }
    check(&r, 1);
    r.mm.flush_releases();
    let released: u64 = r
        .gates
        .iter()
        .map(|g| g.released.load(Ordering::SeqCst))
        .sum();
    assert!(released >= 5, "{released}");
}

/// A release the next allocation needs is held at the gate: that allocation (not the
/// queue's bound) waits for it, and goes on once it ran.
#[test]
fn an_allocation_waits_for_a_held_release_it_needs() {
    let pages = 64;
    let r = rig(pages, pages, 4 * pages, ReleaseMode::background());
    let d = MigrateDetails::default();
    r.mm.migrate(r.range, PagemapId(0), &d).unwrap();
    r.mm.migrate(r.range, PagemapId(1), &d).unwrap();
    // Pagemap 1's release (after the next migration) is held: moving back to pagemap 1
    // needs that memory, so that migration waits for the gate.
    r.gates[1].hold_next.store(1, Ordering::SeqCst);
    r.mm.migrate(r.range, PagemapId(0), &d).unwrap();
    let mm = r.mm.clone();
    let range = r.range;
    let t = std::thread::spawn(move || mm.migrate(range, PagemapId(1), &MigrateDetails::default()));
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !t.is_finished(),
        "the allocation waits for the queued release"
    );
    r.gates[1].open();
    t.join().unwrap().unwrap();
    assert!(on(&r, 1));
    check(&r, 1);
}

#[test]
fn a_full_queue_releases_inline() {
    // One byte: one job at a time.
    let r = rig(
        64,
        256,
        1024,
        ReleaseMode::Background {
            max_pending_bytes: 1,
        },
    );
    let d = MigrateDetails::default();
    r.mm.migrate(r.range, PagemapId(1), &d).unwrap();
    // The system frames' release is done: the queue is empty.
    r.mm.flush_releases();
    r.gates[1].hold_next.store(1, Ordering::SeqCst);
    r.mm.migrate(r.range, PagemapId(0), &d).unwrap();
    eventually("the first release waits at the gate", || {
        r.gates[1].waiting.load(Ordering::SeqCst)
    });
    // The queue holds one job: the next release runs on this thread.
    r.mm.migrate(r.range, PagemapId(1), &d).unwrap();
    assert_eq!(r.gates[0].released.load(Ordering::SeqCst), 1);
    assert_ne!(
        r.gates[0].threads.lock().unwrap()[0],
        "drm-pagemap-reclaim",
        "over the bound: inline"
    );
    r.gates[1].open();
    r.mm.flush_releases();
    assert_eq!(r.gates[1].released.load(Ordering::SeqCst), 1);
    check(&r, 1);
}

#[test]
fn dropping_the_address_space_runs_the_queued_releases() {
    let r = rig(64, 256, 1024, ReleaseMode::background());
    let d = MigrateDetails::default();
    r.mm.migrate(r.range, PagemapId(1), &d).unwrap();
    // Pagemap 1's first release waits at the gate: everything after it queues behind it.
    r.gates[1].hold_next.store(1, Ordering::SeqCst);
    for k in [0u8, 1, 0] {
        r.mm.migrate(r.range, PagemapId(k), &d).unwrap();
    }
    check(&r, 1);
    let Rig { mm, gates, .. } = r;
    eventually("the reclaimer waits at the gate", || {
        gates[1].waiting.load(Ordering::SeqCst)
    });
    assert!(mm.pending_releases().0 >= 2, "releases still queued");
    // The gate opens a little later, while the drop waits for the queue.
    let gate = gates[1].clone();
    let opener = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        gate.open();
    });
    drop(mm);
    opener.join().unwrap();
    let released: u64 = gates
        .iter()
        .map(|g| g.released.load(Ordering::SeqCst))
        .sum();
    // Pagemap 1, 0 and 1 once each for the moves, and pagemap 0's allocation holding the
    // range when the address space went.
    assert_eq!(released, 4, "every release ran before the drop returned");
}

#[test]
fn a_panicking_release_does_not_stop_the_reclaimer() {
    let r = rig(64, 256, 1024, ReleaseMode::background());
    let d = MigrateDetails::default();
    r.mm.migrate(r.range, PagemapId(1), &d).unwrap();
    r.gates[1].panic_next.store(1, Ordering::SeqCst);
    r.mm.migrate(r.range, PagemapId(0), &d).unwrap();
    r.mm.migrate(r.range, PagemapId(1), &d).unwrap();
    r.mm.migrate(r.range, PagemapId(0), &d).unwrap();
    r.mm.flush_releases();
    // The first release of pagemap 1 panicked; pagemap 0's and the second of pagemap 1 ran.
    assert_eq!(r.gates[1].released.load(Ordering::SeqCst), 1);
    assert_eq!(r.gates[0].released.load(Ordering::SeqCst), 1);
    assert_eq!(r.mm.pending_releases(), (0, 0));
    check(&r, 1);
}

/// System memory whose frees take 150 ms (long enough that a free queued by one call is
/// still pending when the next call needs its frames, however slow the machine).
struct SlowFree(Arc<dyn HostMemory>);

impl HostMemory for SlowFree {
    fn alloc_frames(&self, ps: PageSize, out: &mut [HostFrame]) -> Result<(), BackendError> {
        self.0.alloc_frames(ps, out)
    }
    fn free_frames(&self, frames: &[HostFrame], ps: PageSize) {
        std::thread::sleep(Duration::from_millis(150));
        self.0.free_frames(frames, ps)
    }
    fn read(&self, f: HostFrame, offset: usize, buf: &mut [u8]) -> Result<(), BackendError> {
        self.0.read(f, offset, buf)
    }
    fn write(&self, f: HostFrame, offset: usize, data: &[u8]) -> Result<(), BackendError> {
        self.0.write(f, offset, data)
    }
    fn zero(&self, f: HostFrame, ps: PageSize) -> Result<(), BackendError> {
        self.0.zero(f, ps)
    }
    fn map_frames(
        &self,
        device: DeviceId,
        frames: &[HostFrame],
        ps: PageSize,
        dir: Direction,
        out: &mut [DmaAddr],
    ) -> Result<(), BackendError> {
        self.0.map_frames(device, frames, ps, dir, out)
    }
    fn unmap_frames(&self, device: DeviceId, addrs: &[DmaAddr], ps: PageSize, dir: Direction) {
        self.0.unmap_frames(device, addrs, ps, dir)
    }
    fn capacity_bytes(&self) -> u64 {
        self.0.capacity_bytes()
    }
}

/// System memory holds the range once (plus a little): the copy back to RAM right after the
/// move to a device needs the frames whose (slow) free is still queued, waits for it and
/// succeeds.
#[test]
fn host_frames_are_waited_for_too() {
    // The simulated system memory comes in 2 MiB chunks: 400 pages leave 112 frames spare.
    let pages = 400u64;
    let sim = SimBackend::new(SimConfig {
        devices: 1,
        device_capacity: 4 * pages * PAGE,
        host_capacity: (pages + 8) * PAGE,
        ..SimConfig::default()
    })
    .unwrap();
    assert!(
        sim.host_memory().capacity_bytes() < 2 * pages * PAGE,
        "system memory holds the range once: {}",
        sim.host_memory().capacity_bytes()
    );
    let mm = AddressSpace::new(Arc::new(SlowFree(sim.host_memory())));
    mm.set_release_mode(ReleaseMode::background());
    for pm in sim.pagemap_per_device().unwrap() {
        mm.add_pagemap(pm).unwrap();
    }
    let range = VaRange::new(BASE, pages * PAGE);
    mm.create_range(range, PageSize::Size4K).unwrap();
    mm.write(BASE, &pattern(range, 5)).unwrap();
    for _ in 0..3 {
        let rep = mm
            .migrate(range, PagemapId(0), &MigrateDetails::default())
            .unwrap();
        assert!(mm.pending_releases().0 >= 1, "the frames' free is queued");
        mm.evict_to_ram(rep.alloc.unwrap()).unwrap();
    }
    let mut buf = vec![0u8; range.len as usize];
    mm.read(BASE, &mut buf).unwrap();
    assert!(buf == pattern(range, 5));
    // A first write into another range needs the frames a queued free holds.
    mm.migrate(range, PagemapId(0), &MigrateDetails::default())
        .unwrap();
    assert!(mm.pending_releases().0 >= 1, "the frames' free is queued");
    let other = VaRange::new(BASE + range.len, range.len);
    mm.create_range(other, PageSize::Size4K).unwrap();
    mm.write(other.start, &pattern(other, 6)).unwrap();
    mm.read(other.start, &mut buf).unwrap();
    assert!(buf == pattern(other, 6));
}
