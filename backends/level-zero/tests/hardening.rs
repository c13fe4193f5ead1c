//! Hardening: an event that never signals (the fence times out with a typed error, its event
//! is never recycled, the backend stays usable and does not grow), and many threads copying
//! random page sets at once (bytes checked, progress bounded in time, event pools bounded).

mod common;

use common::*;
use drm_pagemap_core::{CopyRequest, DeviceId, FenceError, FenceStatus, PageSize, PagemapId, Pfn};
use drm_pagemap_level_zero::LevelZeroConfig;
use std::time::{Duration, Instant};

const PS: PageSize = PageSize::Size4K;

#[test]
fn an_event_that_never_signals_times_out_and_is_never_recycled() {
    let Some(env) = setup(LevelZeroConfig {
        regular_list_min_runs: 4,
        ..LevelZeroConfig::default()
    }) else {
        return;
    };
    let host = env.host();
    let pm = env.pagemap(0, 0, 16 << 20);
    let zp = env.backend.ze_pagemap(PagemapId(0)).unwrap();
    let n = 8;
    let (src_frames, src) = host_pages(&*host, n, PS, 5, 0);
    let (_b, pfns) = alloc(&pm, n, PS);
    let events_before = env.backend.event_stats(DeviceId(0)).unwrap();

    env.soft.hang_events(1).unwrap();
    let copy = |pages: &[Pfn], addrs, to_dev: bool| {
        let req = CopyRequest {
            page_size: PS,
            pages,
            addrs,
            pre_fence: None,
        };
        let d = pm.devmem();
        if to_dev {
            d.copy_to_devmem(&req)
        } else {
            d.copy_to_ram(&req)
        }
        .expect("the call queues")
    };
    let hung = copy(&pfns, &src, true);
    let hung_event = hung.native().expect("an event").handle;
    let limit = Duration::from_millis(200);
    let t = Instant::now();
    match hung.wait_timeout(limit) {
        Err(FenceError::Timeout(d)) => assert_eq!(d, limit),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(t.elapsed() >= limit && t.elapsed() < Duration::from_secs(10));
    assert!(matches!(hung.status(), FenceStatus::Pending));
    drop(hung);

    // The backend stays usable: round trips on the same pages, on both kinds of list, none
    // of them given the hung event (its command might still signal it).
    // Pages in descending order do not merge: a call of k >= 4 of them is a regular list.
    let (back_frames, back) = host_pages(&*host, n, PS, 0, 0);
    fn rev<T: Copy>(v: &[T]) -> Vec<T> {
        v.iter().rev().copied().collect()
    }
    let (rpfns, rsrc, rback) = (rev(&pfns), rev(&src), rev(&back));
    for i in 0..200 {
        let k = 1 + i % n;
        let (p, s, b) = match i % 2 {
            0 => (&pfns[..k], &src[..k], &back[..k]),
            _ => (&rpfns[n - k..], &rsrc[n - k..], &rback[n - k..]),
        };
        let f = copy(p, s, true);
        assert_ne!(f.native().unwrap().handle, hung_event, "call {i}");
        wait(&f);
        let g = copy(p, b, false);
        assert_ne!(g.native().unwrap().handle, hung_event, "call {i}");
        wait(&g);
    }
    check_host(&*host, &back_frames, PS, 5).expect("bytes after the hang");
    zp.reap();
    let s = zp.stats();
    assert_eq!(s.in_flight, 1, "only the hung call is kept: {s:?}");
    assert!(s.regular_calls > 0 && s.immediate_calls > 0, "{s:?}");
    let events = env.backend.event_stats(DeviceId(0)).unwrap();
    assert!(
        events.live_events <= events_before.live_events + 4,
        "events do not pile up behind the hung one: {events_before:?} -> {events:?}"
    );
    assert!(events.in_use >= 1, "the hung event is held: {events:?}");
    host.free_frames(&src_frames, PS);
    host.free_frames(&back_frames, PS);
}

/// xorshift64*: the tests' random numbers, reproducible from the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn many_threads_copy_random_page_sets() {
    // Calls of 16 runs and more on regular lists: both kinds of list in use.
    let Some(env) = setup(LevelZeroConfig {
        regular_list_min_runs: 16,
        ..LevelZeroConfig::default()
    }) else {
        return;
    };
    const THREADS: usize = 8;
    const ROUNDS: usize = 40;
    const PAGES: usize = 96;
    let start_counters = env.counters();
    // Three pagemaps on two devices: threads share engines and event pools.
    let pms = [
        env.pagemap(0, 0, 16 << 20),
        env.pagemap(1, 0, 16 << 20),
        env.pagemap(2, 1, 16 << 20),
    ];
    let host = env.host();
    let deadline = Instant::now() + Duration::from_secs(120);
    let done = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let pm = pms[t % pms.len()].clone();
                let host = host.clone();
                s.spawn(move || -> Result<usize, String> {
                    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (t as u64 + 1));
                    let dev = pm.device().0;
                    let (b, pfns) = alloc(&pm, PAGES, PS);
                    let mut calls = 0;
                    for round in 0..ROUNDS {
                        if Instant::now() > deadline {
                            return Err(format!("thread {t}: no progress by round {round}"));
                        }
                        // A random set of distinct pages in random order (1 .. PAGES).
                        let k = 1 + rng.below(if round % 4 == 0 { PAGES } else { 24 });
                        let mut idx: Vec<usize> = (0..PAGES).collect();
                        for i in 0..k {
                            let j = i + rng.below(PAGES - i);
                            idx.swap(i, j);
                        }
                        let set: Vec<Pfn> = idx[..k].iter().map(|&i| pfns[i]).collect();
                        let seed = (t * ROUNDS + round) as u8 | 1;
                        let (src_frames, src) = host_pages(&*host, k, PS, seed, dev);
                        let (dst_frames, dst) = host_pages(&*host, k, PS, 0, dev);
                        let to = pm
                            .devmem()
                            .copy_to_devmem(&CopyRequest {
                                page_size: PS,
                                pages: &set,
                                addrs: &src,
                                pre_fence: None,
                            })
                            .map_err(|e| e.to_string())?;
                        // Back to RAM after the first copy, on the device (a wait event).
                        let back = pm
                            .devmem()
                            .copy_to_ram(&CopyRequest {
                                page_size: PS,
                                pages: &set,
                                addrs: &dst,
                                pre_fence: Some(&to),
                            })
                            .map_err(|e| e.to_string())?;
                        back.wait_timeout(LONG)
                            .map_err(|e| format!("thread {t} round {round}: {e}"))?;
                        check_host(&*host, &dst_frames, PS, seed)
                            .map_err(|e| format!("thread {t} round {round}: {e}"))?;
                        host.free_frames(&src_frames, PS);
                        host.free_frames(&dst_frames, PS);
                        calls += 2;
                    }
                    pm.devmem().devmem_release(b);
                    Ok(calls)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("no panic"))
            .collect::<Result<Vec<usize>, String>>()
    })
    .expect("every thread finished with its bytes checked");
    assert_eq!(done.iter().sum::<usize>(), THREADS * ROUNDS * 2);
    let mut regular = 0;
    for id in 0..pms.len() as u8 {
        let zp = env.backend.ze_pagemap(PagemapId(id)).unwrap();
        // The clears on free of the last releases may still run.
        let until = Instant::now() + LONG;
        while zp.stats().in_flight > 0 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
            zp.reap();
        }
        let s = zp.stats();
        assert_eq!(s.in_flight, 0, "pagemap {id}: {s:?}");
        assert_eq!(
            s.copy_to_ram_calls, s.copy_to_devmem_calls,
            "pagemap {id}: {s:?}"
        );
        regular += s.regular_calls;
    }
    assert!(regular > 0, "some calls went to regular lists");
    let waits: u64 = (0..pms.len() as u8)
        .map(|id| {
            env.backend
                .ze_pagemap(PagemapId(id))
                .unwrap()
                .stats()
                .device_waits
        })
        .sum();
    assert!(
        waits > 0,
        "some copies back waited for their first copy on the device"
    );
    for d in 0..2 {
        let e = env.backend.event_stats(DeviceId(d)).unwrap();
        // At most a few calls per thread are pending at once: a pool or two per device,
        // never one per call (each device saw hundreds).
        assert!(e.pools <= 3, "device {d}: {e:?}");
        assert!(e.acquired >= 100 && e.in_use == 0, "device {d}: {e:?}");
    }
    let c = env.counters();
    assert_eq!(c.strict_violations, start_counters.strict_violations);
}
