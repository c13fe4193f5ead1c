//! The ring's lifecycle with CPU consumers: real bytes copied between buffers of this
//! process by the consumer of the protocol's steps.

use super::engine::{Engine, Launcher, Refused, RingConfig};
use super::fence::RingFence;
use super::layout::{DescBody, HeapBlock, RING_BYTES, RING_SLOTS, RingBlock};
use super::proto::{Ring, cpu_consumer};
use drm_pagemap_core::{
    BackendError, BackendErrorKind, DeviceId, Fence, FenceError, FenceOps, FenceStatus,
};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const PAGE: usize = 4096;

/// What the test consumers copy between: an "arena" of own pages and host pages, both
/// plain memory of this process; a gate that holds copies; flags that break things.
#[derive(Default)]
struct Knobs {
    /// While set, copies wait.
    hold: AtomicBool,
    /// The next launch fails.
    fail_launch: AtomicBool,
    /// The consumer ignores everything (a stuck kernel) while set.
    stuck: AtomicBool,
    /// `idle` reports a device error.
    device_error: AtomicBool,
}

struct CpuLauncher {
    knobs: Arc<Knobs>,
    prev: Mutex<Option<JoinHandle<()>>>,
    running: Arc<AtomicUsize>,
    launches: Arc<AtomicU64>,
}

impl Launcher for CpuLauncher {
    fn launch(&self, ring: &Arc<Ring>, epoch: u64, lease: Duration) -> Result<(), BackendError> {
        if self.knobs.fail_launch.swap(false, Ordering::SeqCst) {
            return Err(BackendError::driver(
                "cuLaunchKernel",
                701,
                "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES (test)",
            ));
        }
        self.launches.fetch_add(1, Ordering::SeqCst);
        self.running.fetch_add(1, Ordering::SeqCst);
        let prev = self.prev.lock().unwrap().take();
        let (ring, knobs, running) = (ring.clone(), self.knobs.clone(), self.running.clone());
        let h = std::thread::spawn(move || {
            // Stream order: after every earlier instance.
            if let Some(p) = prev {
                p.join().unwrap();
            }
            while knobs.stuck.load(Ordering::SeqCst) {
                std::thread::yield_now();
            }
            cpu_consumer(&ring, epoch, Some(lease), |b| {
                while knobs.hold.load(Ordering::SeqCst) {
                    std::thread::yield_now();
                }
                copy(b);
            });
            running.fetch_sub(1, Ordering::SeqCst);
        });
        *self.prev.lock().unwrap() = Some(h);
        Ok(())
    }

    fn idle(&self) -> Result<bool, BackendError> {
        if self.knobs.device_error.load(Ordering::SeqCst) {
            return Err(BackendError::driver(
                "cuStreamQuery",
                700,
                "CUDA_ERROR_ILLEGAL_ADDRESS (test)",
            ));
        }
        Ok(self.running.load(Ordering::SeqCst) == 0)
    }
}

/// The kernel's copy on the CPU: entries' pages of `4096 << item_shift` bytes.
fn copy(b: &DescBody) {
    let len = PAGE << b.item_shift;
    for e in 0..b.n_entries as usize {
        if b.addrs[e] == 0 {
            continue;
        }
        let own = (b.own_base + b.pfns[e] as u64 * PAGE as u64) as *mut u8;
        let other = b.addrs[e] as *mut u8;
        let (src, dst) = if b.to_own != 0 {
            (other, own)
        } else {
            (own, other)
        };
        // SAFETY: tests name pages of buffers they keep alive until the copy's fence
        // signals, and never the same page on both sides.
        unsafe { std::ptr::copy_nonoverlapping(src, dst, len) };
    }
}

/// A heap block that counts its drops.
struct CountingBlock(HeapBlock, Arc<AtomicUsize>);

impl Drop for CountingBlock {
    fn drop(&mut self) {
        self.1.fetch_add(1, Ordering::SeqCst);
    }
}

// SAFETY: forwards to the heap block.
unsafe impl RingBlock for CountingBlock {
    fn host(&self) -> *mut u8 {
        self.0.host()
    }
    fn device(&self) -> u64 {
        self.0.device()
    }
}

struct Rig {
    engine: Arc<Engine>,
    knobs: Arc<Knobs>,
    launches: Arc<AtomicU64>,
    running: Arc<AtomicUsize>,
    freed: Arc<AtomicUsize>,
}

fn rig(cfg: RingConfig) -> Rig {
    let knobs = Arc::new(Knobs::default());
    let launches = Arc::new(AtomicU64::new(0));
    let running = Arc::new(AtomicUsize::new(0));
    let freed = Arc::new(AtomicUsize::new(0));
    let launcher = CpuLauncher {
        knobs: knobs.clone(),
        prev: Mutex::new(None),
        running: running.clone(),
        launches: launches.clone(),
    };
    let block = CountingBlock(HeapBlock::new(), freed.clone());
    let engine = Engine::start(
        Ring::new(Box::new(block)),
        Box::new(launcher),
        cfg,
        "test ring".into(),
    )
    .unwrap();
    Rig {
        engine,
        knobs,
        launches,
        running,
        freed,
    }
}

const CFG: RingConfig = RingConfig {
    idle_stop: Duration::from_millis(5),
    lease: Duration::from_secs(10),
    stop_wait: Duration::from_secs(5),
};

/// Own pages and host pages, as plain memory.
struct Pages {
    own: Vec<u8>,
    host: Vec<u8>,
}

impl Pages {
    fn new(n: usize) -> Pages {
        Pages {
            own: vec![0; n * PAGE],
            host: vec![0; n * PAGE],
        }
    }
    /// A descriptor copying host pages `pages` to the own pages of the same indices.
    fn to_own(&self, pages: &[usize]) -> DescBody {
        let mut b = DescBody::EMPTY;
        b.own_base = self.own.as_ptr() as u64;
        b.to_own = 1;
        b.n_entries = pages.len() as u32;
        for (e, &p) in pages.iter().enumerate() {
            b.addrs[e] = self.host.as_ptr() as u64 + (p * PAGE) as u64;
            b.pfns[e] = p as u32;
        }
        b
    }
}

fn fence(r: &Rig, seq: u64) -> Fence {
    Fence::new(RingFence::new(r.engine.clone(), seq, DeviceId(0)))
}

fn submit(r: &Rig, b: &DescBody) -> Fence {
    loop {
        match r.engine.submit(b) {
            Ok(seq) => return fence(r, seq),
            Err(Refused::Full) => std::thread::yield_now(),
            Err(e) => panic!("refused: {e:?}"),
        }
    }
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_micros(200));
    }
    t.elapsed()
}

#[test]
fn many_submitters_wrap_the_ring_many_times_and_every_byte_lands() {
    let r = Arc::new(rig(CFG));
    let threads = 8;
    let per = 400; // 3200 copies: the 64 slots wrap 50 times
    let pages_per_thread = 16;
    let mut pages = Pages::new(threads * pages_per_thread);
    for (i, b) in pages.host.iter_mut().enumerate() {
        *b = (i as u64)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(7) as u8;
    }
    let pages = Arc::new(pages);
    let hs: Vec<_> = (0..threads)
        .map(|t| {
            let (r, pages) = (r.clone(), pages.clone());
            std::thread::spawn(move || {
                let mut fences = Vec::new();
                for k in 0..per {
                    let n = 1 + k % pages_per_thread;
                    let mine: Vec<usize> = (0..n)
                        .map(|i| t * pages_per_thread + (i + k) % pages_per_thread)
                        .collect();
                    fences.push(submit(&r, &pages.to_own(&mine)));
                }
                fences
            })
        })
        .collect();
    let fences: Vec<Fence> = hs.into_iter().flat_map(|h| h.join().unwrap()).collect();
    assert_eq!(fences.len(), threads * per);
    for f in &fences {
        assert_eq!(f.wait_timeout(Duration::from_secs(10)), Ok(()));
    }
    assert_eq!(pages.own, pages.host, "every page copied");
    let ring = r.engine.ring();
    assert_eq!(
        (ring.head(), ring.done()),
        ((threads * per) as u64, (threads * per) as u64)
    );
    let mut seqs: Vec<u64> = fences.iter().map(|f| f.seqno()).collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), threads * per, "one seq per copy");
    assert!(r.engine.shutdown());
}

#[test]
fn a_full_ring_refuses_until_a_slot_is_done() {
    let r = rig(CFG);
    let pages = Pages::new(1);
    r.knobs.hold.store(true, Ordering::SeqCst);
    let mut fences = Vec::new();
    for _ in 0..RING_SLOTS {
        let seq = r.engine.submit(&pages.to_own(&[0])).expect("a free slot");
        fences.push(fence(&r, seq));
    }
    assert_eq!(r.engine.submit(&pages.to_own(&[0])), Err(Refused::Full));
    assert_eq!(
        r.engine.published(),
        RING_SLOTS as u64,
        "nothing overwritten"
    );
    r.knobs.hold.store(false, Ordering::SeqCst);
    for f in &fences {
        assert_eq!(f.wait(), Ok(()));
    }
    let seq = r.engine.submit(&pages.to_own(&[0])).expect("room again");
    assert_eq!(seq, RING_SLOTS as u64 + 1);
    assert_eq!(fence(&r, seq).wait(), Ok(()));
    assert!(r.engine.shutdown());
}

#[test]
fn fence_wait_times_out_then_signals_and_stays_signalled() {
    let r = rig(CFG);
    let mut pages = Pages::new(2);
    pages.host[..PAGE].fill(7);
    r.knobs.hold.store(true, Ordering::SeqCst);
    let f = submit(&r, &pages.to_own(&[0]));
    let t = Instant::now();
    assert_eq!(
        f.wait_timeout(Duration::from_millis(20)),
        Err(FenceError::Timeout(Duration::from_millis(20)))
    );
    assert!(t.elapsed() >= Duration::from_millis(20));
    assert_eq!(f.status(), FenceStatus::Pending);
    assert_eq!(pages.own[0], 0, "not copied while held");
    r.knobs.hold.store(false, Ordering::SeqCst);
    assert_eq!(f.wait(), Ok(()));
    assert_eq!(f.status(), FenceStatus::Signaled);
    assert_eq!(f.wait_timeout(Duration::ZERO), Ok(()));
    assert!(pages.own[..PAGE].iter().all(|&b| b == 7));
    assert!(r.engine.native_none());
    assert!(r.engine.shutdown());
}

impl Engine {
    /// The ring's fences have no native handle.
    fn native_none(self: &Arc<Self>) -> bool {
        RingFence::new(self.clone(), 1, DeviceId(0))
            .native()
            .is_none()
    }
}

#[test]
fn an_idle_consumer_is_stopped_by_the_keeper_and_relaunched_on_demand() {
    let r = rig(CFG);
    let mut pages = Pages::new(1);
    pages.host.fill(3);
    let f = submit(&r, &pages.to_own(&[0]));
    assert_eq!(f.wait(), Ok(()));
    assert_eq!(r.engine.epoch(), 1);
    // Nobody calls in: the keeper alone stops the instance (a bounded wait for an
    // implicitly synchronising call).
    let took = wait_until("idle stop", Duration::from_secs(2), || {
        r.running.load(Ordering::SeqCst) == 0
    });
    eprintln!("idle stop after {took:?} (idle_stop {:?})", CFG.idle_stop);
    let h = r.engine.ring().header();
    assert_eq!(h.exited.load(Ordering::SeqCst), 1);
    assert_eq!(h.stop.load(Ordering::SeqCst), 1);
    wait_until("keeper sees it", Duration::from_secs(2), || {
        !r.engine.running()
    });
    pages.host.fill(4);
    let f = submit(&r, &pages.to_own(&[0]));
    assert_eq!(f.wait(), Ok(()));
    assert_eq!(r.engine.epoch(), 2, "a new instance");
    assert_eq!(h.alive.load(Ordering::SeqCst), 2);
    assert!(pages.own.iter().all(|&b| b == 4));
    assert_eq!(r.launches.load(Ordering::SeqCst), 2);
    assert!(r.engine.shutdown());
    assert_eq!(r.running.load(Ordering::SeqCst), 0);
}

#[test]
fn an_expired_lease_while_busy_loses_no_copy() {
    let r = Arc::new(rig(RingConfig {
        lease: Duration::from_millis(2),
        ..CFG
    }));
    let pages = Arc::new(Pages::new(4));
    let t0 = Instant::now();
    let hs: Vec<_> = (0..2)
        .map(|_| {
            let (r, pages) = (r.clone(), pages.clone());
            std::thread::spawn(move || {
                let mut fs = Vec::new();
                while t0.elapsed() < Duration::from_millis(60) {
                    fs.push(submit(&r, &pages.to_own(&[0, 1, 2, 3])));
                }
                fs
            })
        })
        .collect();
    let fences: Vec<Fence> = hs.into_iter().flat_map(|h| h.join().unwrap()).collect();
    for f in &fences {
        assert_eq!(f.wait_timeout(Duration::from_secs(10)), Ok(()));
    }
    assert!(
        r.launches.load(Ordering::SeqCst) > 1,
        "leases ran out and instances were relaunched"
    );
    assert_eq!(r.engine.ring().done(), fences.len() as u64);
    assert!(r.engine.shutdown());
}

#[test]
fn stop_while_busy_drains_what_was_published() {
    let r = rig(CFG);
    let mut pages = Pages::new(8);
    pages.host.fill(9);
    r.knobs.hold.store(true, Ordering::SeqCst);
    let fences: Vec<Fence> = (0..8).map(|i| submit(&r, &pages.to_own(&[i]))).collect();
    let release = {
        let k = r.knobs.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            k.hold.store(false, Ordering::SeqCst);
        })
    };
    assert!(r.engine.shutdown(), "the instance returned");
    release.join().unwrap();
    for f in &fences {
        assert_eq!(f.status(), FenceStatus::Signaled);
    }
    assert_eq!(pages.own, pages.host);
    assert_eq!(r.engine.submit(&pages.to_own(&[0])), Err(Refused::Closed));
    let engine = r.engine;
    drop(fences);
    drop(engine);
    assert_eq!(r.freed.load(Ordering::SeqCst), 1, "the block is freed");
}

#[test]
fn a_failed_relaunch_fails_only_the_stranded_copies() {
    let r = rig(RingConfig {
        lease: Duration::from_millis(30),
        ..CFG
    });
    let pages = Pages::new(3);
    r.knobs.hold.store(true, Ordering::SeqCst);
    let first = submit(&r, &pages.to_own(&[0]));
    // Held inside the first copy until the lease is over: the instance then returns
    // with the next two published but not taken.
    let rest: Vec<Fence> = (1..3).map(|i| submit(&r, &pages.to_own(&[i]))).collect();
    r.knobs.fail_launch.store(true, Ordering::SeqCst);
    // Well past the 30 ms lease, counted from when the instance started (which may be a
    // while after the submission on a busy machine: 40 ms here once let the instance go on
    // to the next copies, and the test fail).
    std::thread::sleep(Duration::from_millis(150));
    r.knobs.hold.store(false, Ordering::SeqCst);
    assert_eq!(first.wait(), Ok(()));
    for f in &rest {
        let e = match f.wait_timeout(Duration::from_secs(5)) {
            Err(FenceError::Failed(e)) => e,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            e.kind,
            BackendErrorKind::Driver {
                api: "cuLaunchKernel",
                code: 701
            },
            "{e}"
        );
        assert!(
            e.message.contains("test ring") && e.message.contains("launch failed"),
            "{e}"
        );
    }
    assert_eq!(r.engine.submit(&pages.to_own(&[0])), Err(Refused::Closed));
    assert!(r.engine.shutdown());
}

#[test]
fn a_failed_first_launch_publishes_nothing() {
    let r = rig(CFG);
    let pages = Pages::new(1);
    r.knobs.fail_launch.store(true, Ordering::SeqCst);
    match r.engine.submit(&pages.to_own(&[0])) {
        Err(Refused::Launch(e)) => assert!(e.message.contains("launch failed"), "{e}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(r.engine.published(), 0);
    assert_eq!(r.engine.submit(&pages.to_own(&[0])), Err(Refused::Closed));
    assert!(r.engine.shutdown());
}

#[test]
fn a_device_error_fails_the_pending_fences_with_its_code() {
    let r = rig(CFG);
    let pages = Pages::new(1);
    r.knobs.hold.store(true, Ordering::SeqCst);
    let f = submit(&r, &pages.to_own(&[0]));
    r.knobs.device_error.store(true, Ordering::SeqCst);
    let e = match f.wait() {
        Err(FenceError::Failed(e)) => e,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        e.kind,
        BackendErrorKind::Driver {
            api: "cuStreamQuery",
            code: 700
        }
    );
    assert!(e.message.contains("test ring"), "{e}");
    r.knobs.device_error.store(false, Ordering::SeqCst);
    r.knobs.hold.store(false, Ordering::SeqCst);
    assert!(r.engine.shutdown());
}

#[test]
fn a_stuck_consumer_is_abandoned_within_the_bound_and_its_memory_leaked() {
    let r = rig(RingConfig {
        stop_wait: Duration::from_millis(30),
        ..CFG
    });
    let pages = Pages::new(1);
    r.knobs.stuck.store(true, Ordering::SeqCst);
    let f = submit(&r, &pages.to_own(&[0]));
    let t = Instant::now();
    assert!(!r.engine.shutdown(), "abandoned");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "bounded: {:?}",
        t.elapsed()
    );
    match f.status() {
        FenceStatus::Failed(e) => {
            assert_eq!(e.kind, BackendErrorKind::DeviceLost);
            assert!(e.message.contains("did not stop"), "{e}");
        }
        s => panic!("{s:?}"),
    }
    let Rig {
        engine,
        knobs,
        running,
        freed,
        ..
    } = r;
    drop(f);
    drop(engine);
    // The consumer comes back to life: the ring's memory was not freed under it.
    knobs.stuck.store(false, Ordering::SeqCst);
    wait_until("the consumer returns", Duration::from_secs(5), || {
        running.load(Ordering::SeqCst) == 0
    });
    assert_eq!(freed.load(Ordering::SeqCst), 0, "leaked, not freed");
    let _ = RING_BYTES;
}
