//! Loom model tests: every interleaving of the fence code (the real `HostFence`,
//! `FenceArray` and `FenceTimeline`, whose mutex, condition variable and counter become loom's
//! under `--cfg loom`), and a model of the page-reference protocol of the allocation table.
//!
//! Run with:
//! `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p drm-pagemap-core --test loom_fence --release`
//!
//! A lost wake-up shows as a loom deadlock, a non-sticky state or a swallowed error as a
//! failed assertion in some interleaving.
#![cfg(loom)]
#![allow(missing_docs)]

use drm_pagemap_core::{
    BackendError, BackendErrorKind, Fence, FenceArray, FenceError, FenceStatus, FenceTimeline,
    HostFence,
};
use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::sync::{Arc, Mutex};
use loom::thread;
use std::time::Duration;

fn err(msg: &str) -> BackendError {
    BackendError::new(BackendErrorKind::CopyFailed, msg)
}

#[test]
fn signal_wakes_a_waiter() {
    loom::model(|| {
        let tl = FenceTimeline::new();
        let f = tl.host_fence();
        let s = f.clone();
        let t = thread::spawn(move || s.signal());
        let fence = Fence::from_host(f);
        assert_eq!(fence.wait(), Ok(()));
        assert!(fence.is_signaled());
        assert_eq!(fence.status(), FenceStatus::Signaled);
        t.join().unwrap();
    });
}

#[test]
fn every_waiter_wakes() {
    // Two waiters: a notify_one in place of notify_all leaves one asleep (loom: deadlock).
    loom::model(|| {
        let f = HostFence::new(1, 1);
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let w = Fence::from_host(f.clone());
                thread::spawn(move || w.wait())
            })
            .collect();
        f.signal();
        for w in waiters {
            assert_eq!(w.join().unwrap(), Ok(()));
        }
    });
}

#[test]
fn timed_wait_returns_the_signal() {
    // loom's timed wait never times out, so this checks the signalled path of `wait_timeout`.
    loom::model(|| {
        let f = HostFence::new(1, 1);
        let s = f.clone();
        let t = thread::spawn(move || s.signal_error(err("late")));
        let r = Fence::from_host(f).wait_timeout(Duration::from_secs(3600));
        assert_eq!(r, Err(FenceError::Failed(err("late"))));
        t.join().unwrap();
    });
}

#[test]
fn first_completion_wins_and_stays() {
    // Success and error race; an observer polls twice. Whatever won is what every later
    // look sees: the state never flips.
    loom::model(|| {
        let f = HostFence::new(7, 3);
        let a = f.clone();
        let b = f.clone();
        let ta = thread::spawn(move || a.signal());
        let tb = thread::spawn(move || b.signal_error(err("copy failed")));
        let obs = Fence::from_host(f.clone());
        let first = obs.status();
        let second = obs.status();
        if first != FenceStatus::Pending {
            assert_eq!(first, second, "signalled state changed");
        }
        ta.join().unwrap();
        tb.join().unwrap();
        let end = obs.status();
        assert_ne!(end, FenceStatus::Pending);
        if second != FenceStatus::Pending {
            assert_eq!(second, end, "signalled state changed");
        }
        // The wait reports exactly the final state.
        match (obs.wait(), end.clone()) {
            (Ok(()), FenceStatus::Signaled) => {}
            (Err(FenceError::Failed(e)), FenceStatus::Failed(e2)) => assert_eq!(e, e2),
            (w, s) => panic!("wait {w:?} disagrees with status {s:?}"),
        }
        // Completing again changes nothing.
        f.signal();
        assert_eq!(obs.status(), end);
    });
}

#[test]
fn error_travels_to_the_waiter() {
    loom::model(|| {
        let f = HostFence::new(2, 9);
        let s = f.clone();
        let t = thread::spawn(move || s.signal_error(err("dma fault")));
        let fence = Fence::from_host(f);
        assert_eq!(fence.wait(), Err(FenceError::Failed(err("dma fault"))));
        assert_eq!(fence.error(), Some(err("dma fault")));
        t.join().unwrap();
    });
}

#[test]
fn array_waits_for_every_member_and_reports_the_first_error() {
    loom::model(|| {
        let tl = FenceTimeline::new();
        let m0 = tl.host_fence();
        let m1 = tl.host_fence();
        let (s0, s1) = (m0.clone(), m1.clone());
        let t0 = thread::spawn(move || s0.signal());
        let t1 = thread::spawn(move || s1.signal_error(err("second member")));
        let arr = FenceArray::unify(vec![
            Fence::from_host(m0.clone()),
            Fence::from_host(m1.clone()),
        ])
        .unwrap();
        assert!(arr.is_container());
        // A container that says it is done had every member done (members are sticky, so
        // they still are when we look after it).
        let st = arr.status();
        if st != FenceStatus::Pending {
            assert!(
                Fence::from_host(m0.clone()).is_signaled()
                    && Fence::from_host(m1.clone()).is_signaled()
            );
            assert_eq!(st, FenceStatus::Failed(err("second member")));
        }
        assert_eq!(arr.wait(), Err(FenceError::Failed(err("second member"))));
        assert!(Fence::from_host(m0).is_signaled());
        assert!(Fence::from_host(m1).is_signaled());
        assert_eq!(arr.status(), FenceStatus::Failed(err("second member")));
        t0.join().unwrap();
        t1.join().unwrap();
    });
}

#[test]
fn array_status_is_never_early() {
    // While any member is pending the container must say Pending, whatever the others did.
    loom::model(|| {
        let m0 = HostFence::new(1, 1);
        let m1 = HostFence::new(1, 2);
        let s0 = m0.clone();
        let t0 = thread::spawn(move || s0.signal_error(err("first")));
        let arr = Fence::new(FenceArray::new(vec![
            Fence::from_host(m0.clone()),
            Fence::from_host(m1.clone()),
        ]));
        assert_eq!(arr.status(), FenceStatus::Pending, "m1 never signalled yet");
        t0.join().unwrap();
        assert_eq!(arr.status(), FenceStatus::Pending);
        m1.signal();
        // The first member error in member order, not the last.
        assert_eq!(arr.status(), FenceStatus::Failed(err("first")));
        assert_eq!(arr.wait(), Err(FenceError::Failed(err("first"))));
    });
}

#[test]
fn a_callback_fires_exactly_once_under_races() {
    // Registration races a success and an error: the callback runs exactly once, with the
    // outcome that won, whichever thread runs it.
    loom::model(|| {
        let f = HostFence::new(3, 1);
        let fired = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(None));
        let (s, e) = (f.clone(), f.clone());
        let t0 = thread::spawn(move || s.signal());
        let t1 = thread::spawn(move || e.signal_error(err("late")));
        let (c, o) = (fired.clone(), seen.clone());
        Fence::from_host(f.clone()).add_callback(Box::new(move |outcome| {
            c.fetch_add(1, Ordering::SeqCst);
            *o.lock().unwrap() = Some(outcome);
        }));
        t0.join().unwrap();
        t1.join().unwrap();
        assert_eq!(fired.load(Ordering::SeqCst), 1, "fired once");
        let want = Fence::from_host(f).status().outcome();
        assert_eq!(*seen.lock().unwrap(), want, "with the outcome that stuck");
    });
}

#[test]
fn an_array_callback_fires_once_with_the_first_error() {
    // Two members signalled from two threads while the callback is registered: it fires once,
    // after both, with the first error in member order.
    loom::model(|| {
        let m0 = HostFence::new(4, 1);
        let m1 = HostFence::new(4, 2);
        let (s0, s1) = (m0.clone(), m1.clone());
        let t0 = thread::spawn(move || s0.signal_error(err("first")));
        let t1 = thread::spawn(move || s1.signal_error(err("second")));
        let arr = FenceArray::unify(vec![
            Fence::from_host(m0.clone()),
            Fence::from_host(m1.clone()),
        ])
        .unwrap();
        let fired = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(None));
        let (c, o) = (fired.clone(), seen.clone());
        let (w0, w1) = (Fence::from_host(m0), Fence::from_host(m1));
        arr.add_callback(Box::new(move |outcome| {
            // Never early: both members are done when it runs.
            assert!(w0.is_signaled() && w1.is_signaled());
            c.fetch_add(1, Ordering::SeqCst);
            *o.lock().unwrap() = Some(outcome);
        }));
        t0.join().unwrap();
        t1.join().unwrap();
        assert_eq!(fired.load(Ordering::SeqCst), 1);
        assert_eq!(
            *seen.lock().unwrap(),
            Some(Err(FenceError::Failed(err("first"))))
        );
    });
}

#[test]
fn timeline_seqnos_are_unique_and_ordered() {
    loom::model(|| {
        let tl = std::sync::Arc::new(FenceTimeline::new());
        let t2 = tl.clone();
        let t = thread::spawn(move || t2.host_fence());
        let mine = tl.host_fence();
        let theirs = t.join().unwrap();
        let (a, b) = (Fence::from_host(mine), Fence::from_host(theirs));
        assert_ne!(a.seqno(), b.seqno());
        assert_eq!(a.context(), b.context());
        assert_eq!(a.is_later(&b), Some(a.seqno() > b.seqno()));
        assert_eq!(b.is_later(&a), Some(b.seqno() > a.seqno()));
        let other = FenceTimeline::new().host_fence();
        assert_eq!(
            a.is_later(&Fence::from_host(other)),
            None,
            "is_later across contexts"
        );
    });
}

// ---------------------------------------------------------------------------------------
// The page-reference protocol.
//
// The allocation table of the core (`alloc.rs`) is plain data behind the address space's
// one mutex, which is a `std` mutex of `mm.rs`; it is not reachable from a test and not
// built on the swappable primitives. So the protocol is modelled here, step for step as the
// core runs it:
//   - every device page holds one reference (`live`) to its allocation;
//   - a path that drops references (free_range, commit of a migration, an eviction pass)
//     does `live -= n` under the lock, and if that made `live == 0` on a Live allocation it
//     takes the record out of the table under the same lock (`AllocTable::remove`);
//   - whoever took the record out calls `devmem_release` after unlocking.
// The claim: with any interleaving of the paths, `devmem_release` runs exactly once. A
// variant that decides to release outside the lock (check, unlock, relock, remove) is also
// run, and loom must find the interleaving that releases twice: the model can fail.

#[derive(Debug)]
struct Record {
    live: u32,
    releases: std::sync::Arc<AtomicUsize>,
}

#[derive(Default)]
struct Table {
    slots: Vec<Option<Record>>,
}

impl Table {
    /// `AllocTable::put_pages` + `remove`: hands back what to release.
    fn put_pages(&mut self, slot: usize, n: u32) -> Option<std::sync::Arc<AtomicUsize>> {
        let rec = self.slots[slot]
            .as_mut()
            .expect("a page references a released allocation");
        assert!(rec.live >= n, "more references dropped than held");
        rec.live -= n;
        if rec.live == 0 {
            self.slots[slot].take().map(|r| r.releases)
        } else {
            None
        }
    }
}

fn release(r: Option<std::sync::Arc<AtomicUsize>>) {
    if let Some(c) = r {
        c.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn page_references_release_exactly_once() {
    loom::model(|| {
        let releases = std::sync::Arc::new(AtomicUsize::new(0));
        // One allocation of 3 pages: free_range drops 1, an eviction pass 1, a migration's
        // commit the last one (its pages moved to another allocation).
        let table = Arc::new(Mutex::new(Table {
            slots: vec![Some(Record {
                live: 3,
                releases: releases.clone(),
            })],
        }));
        let paths: Vec<_> = (0..3)
            .map(|_| {
                let t = table.clone();
                thread::spawn(move || {
                    let r = t.lock().unwrap().put_pages(0, 1);
                    release(r); // outside the lock, as release_all
                })
            })
            .collect();
        for p in paths {
            p.join().unwrap();
        }
        assert_eq!(
            releases.load(Ordering::SeqCst),
            1,
            "devmem_release must run exactly once"
        );
        assert!(table.lock().unwrap().slots[0].is_none());
    });
}

#[test]
fn deferred_cleanup_is_reaped_once() {
    // `reap_deferred`: two callers partition the deferred list under the lock, then each
    // removes the slots it took, under the lock again. Each slot is removed once.
    loom::model(|| {
        let releases = std::sync::Arc::new(AtomicUsize::new(0));
        struct St {
            deferred: Vec<usize>,
            table: Table,
        }
        let st = Arc::new(Mutex::new(St {
            deferred: vec![0],
            table: Table {
                slots: vec![Some(Record {
                    live: 0,
                    releases: releases.clone(),
                })],
            },
        }));
        let reapers: Vec<_> = (0..2)
            .map(|_| {
                let st = st.clone();
                thread::spawn(move || {
                    let ready = std::mem::take(&mut st.lock().unwrap().deferred);
                    for slot in ready {
                        let r = st.lock().unwrap().table.slots[slot]
                            .take()
                            .map(|r| r.releases);
                        release(r);
                    }
                })
            })
            .collect();
        for r in reapers {
            r.join().unwrap();
        }
        assert_eq!(releases.load(Ordering::SeqCst), 1);
    });
}

#[test]
fn the_protocol_model_catches_a_double_release() {
    // The broken variant: read `live` under the lock, release after relocking on what was
    // read. Two paths can both see `live == 0`... after both decrements. Loom must find it.
    let found = std::panic::catch_unwind(|| {
        loom::model(|| {
            let releases = std::sync::Arc::new(AtomicUsize::new(0));
            let live = Arc::new(Mutex::new(2u32));
            let paths: Vec<_> = (0..2)
                .map(|_| {
                    let live = live.clone();
                    let releases = releases.clone();
                    thread::spawn(move || {
                        *live.lock().unwrap() -= 1;
                        let last = *live.lock().unwrap() == 0; // check in a second critical section
                        if last {
                            releases.fetch_add(1, Ordering::SeqCst);
                        }
                    })
                })
                .collect();
            for p in paths {
                p.join().unwrap();
            }
            assert_eq!(releases.load(Ordering::SeqCst), 1, "double release");
        })
    });
    assert!(
        found.is_err(),
        "loom did not find the double release of the broken protocol"
    );
}
