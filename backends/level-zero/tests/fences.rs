//! Fences and pre-fences: this driver's events as wait events (no CPU wait), host fences
//! bridged through host-signalled events (no thread per copy), events recycled only once
//! retired, failed pre-fences failing the call's fence.

mod common;

use common::*;
use drm_pagemap_core::{
    BackendError, BackendErrorKind, CopyRequest, DeviceId, Direction, DmaAddr, Fence, FenceArray,
    FenceTimeline, NativeFenceKind, PageSize, PagemapId,
};
use drm_pagemap_level_zero::LevelZeroConfig;
use std::collections::HashSet;
use std::time::{Duration, Instant};

const PS: PageSize = PageSize::Size4K;

#[test]
fn a_pre_fence_of_this_driver_is_a_wait_event_of_the_first_command() {
    let Some(env) = setup(LevelZeroConfig::default()) else {
        return;
    };
    let host = env.host();
    // Two pagemaps of device 0: two engines (the reader is not queued behind the writer).
    let pm = env.pagemap(0, 0, 16 << 20);
    let reader = env.pagemap(1, 0, 16 << 20);
    let n = 4;
    let (src_frames, src) = host_pages(&*host, n, PS, 9, 0);
    let (b, pfns) = alloc(&pm, n, PS);
    let (hev, gate) = env.backend.host_event(DeviceId(0)).unwrap();
    let native = gate.native().expect("a native fence");
    assert_eq!(native.kind, NativeFenceKind::LEVEL_ZERO_EVENT);
    let pre = FenceArray::unify(vec![gate.clone(), b.pre_migrate_fence.clone().unwrap()]).unwrap();
    let start = Instant::now();
    let f = pm
        .devmem()
        .copy_to_devmem(&CopyRequest {
            page_size: PS,
            pages: &pfns,
            addrs: &src,
            pre_fence: Some(&pre),
        })
        .unwrap();
    // The call returned without the gate (a CPU wait would never have returned).
    assert!(start.elapsed() < Duration::from_secs(5));
    let stats = env.backend.ze_pagemap(PagemapId(0)).unwrap().stats();
    assert_eq!(stats.device_waits, 1, "the gate is a wait event: {stats:?}");
    assert_eq!(stats.host_bridges, 0, "{stats:?}");
    std::thread::sleep(Duration::from_millis(50));
    assert!(!f.is_signaled(), "the copy waits for the gate");
    // Read the destination through the other engine: still the clear's zeros.
    let read = |seed| {
        let (rb, rp) = alloc(&reader, n, PS);
        let mut own = vec![DmaAddr::NONE; n];
        pm.ops()
            .device_map(DeviceId(0), &pfns, PS, Direction::ToDevice, &mut own)
            .unwrap();
        wait(
            &reader
                .devmem()
                .copy_to_devmem(&CopyRequest {
                    page_size: PS,
                    pages: &rp,
                    addrs: &own,
                    pre_fence: None,
                })
                .unwrap(),
        );
        let (frames, dst) = host_pages(&*host, n, PS, 0, 0);
        wait(
            &reader
                .devmem()
                .copy_to_ram(&CopyRequest {
                    page_size: PS,
                    pages: &rp,
                    addrs: &dst,
                    pre_fence: None,
                })
                .unwrap(),
        );
        let r = check_host(&*host, &frames, PS, seed);
        host.free_frames(&frames, PS);
        reader.devmem().devmem_release(rb);
        r
    };
    read(0).expect("nothing written before the gate");
    assert!(!f.is_signaled());
    hev.signal().unwrap();
    wait(&f);
    read(9).expect("written after the gate");
    // The copy's fence is itself a native fence another copy waits on (a chain).
    let native = f.native().unwrap();
    assert!(native.is_complete());
    let (frames, dst) = host_pages(&*host, n, PS, 0, 0);
    let g = pm
        .devmem()
        .copy_to_ram(&CopyRequest {
            page_size: PS,
            pages: &pfns,
            addrs: &dst,
            pre_fence: Some(&f),
        })
        .unwrap();
    wait(&g);
    check_host(&*host, &frames, PS, 9).unwrap();
    assert_eq!(
        env.backend
            .ze_pagemap(PagemapId(0))
            .unwrap()
            .stats()
            .device_waits,
        1,
        "a signalled pre-fence needs no wait"
    );
    pm.devmem().devmem_release(b);
    host.free_frames(&src_frames, PS);
    host.free_frames(&frames, PS);
}

#[test]
fn host_fences_are_bridged_without_a_thread_per_copy() {
    let Some(env) = setup(LevelZeroConfig::default()) else {
        return;
    };
    let host = env.host();
    let pm = env.pagemap(0, 0, 64 << 20);
    let copies = 1000;
    let (src_frames, src) = host_pages(&*host, copies, PS, 5, 0);
    let (b, pfns) = alloc(&pm, copies, PS);
    let tl = FenceTimeline::new();
    let before = threads();
    let mut gates = Vec::new();
    let mut fences = Vec::new();
    let start = Instant::now();
    for i in 0..copies {
        let gate = tl.host_fence();
        let f = pm
            .devmem()
            .copy_to_devmem(&CopyRequest {
                page_size: PS,
                pages: &pfns[i..i + 1],
                addrs: &src[i..i + 1],
                pre_fence: Some(&Fence::from_host(gate.clone())),
            })
            .unwrap();
        gates.push(gate);
        fences.push(f);
    }
    assert!(start.elapsed() < Duration::from_secs(20), "no call blocked");
    let during = threads();
    assert!(
        during <= before + 4,
        "{copies} bridged copies started threads: {before} -> {during}"
    );
    assert!(fences.iter().all(|f| !f.is_signaled()));
    let stats = env.backend.ze_pagemap(PagemapId(0)).unwrap().stats();
    assert_eq!(stats.host_bridges, copies as u64, "{stats:?}");
    // Signal in reverse order: every copy still runs once its own gate is open.
    for g in gates.iter().rev() {
        g.signal();
    }
    for f in &fences {
        wait(f);
    }
    let (frames, dst) = host_pages(&*host, copies, PS, 0, 0);
    wait(
        &pm.devmem()
            .copy_to_ram(&CopyRequest {
                page_size: PS,
                pages: &pfns,
                addrs: &dst,
                pre_fence: None,
            })
            .unwrap(),
    );
    check_host(&*host, &frames, PS, 5).expect("every bridged copy landed");
    assert!(threads() <= before + 4);
    pm.devmem().devmem_release(b);
    host.free_frames(&src_frames, PS);
    host.free_frames(&frames, PS);
}

#[test]
fn failed_pre_fences_fail_the_call_fence() {
    let Some(env) = setup(LevelZeroConfig::default()) else {
        return;
    };
    let host = env.host();
    let pm = env.pagemap(0, 0, 16 << 20);
    let (src_frames, src) = host_pages(&*host, 2, PS, 4, 0);
    let (b, pfns) = alloc(&pm, 2, PS);
    let appends = env.counters().appends;
    // Failed already: nothing is queued, the fence fails at once.
    let failed = Fence::failed(BackendError::new(BackendErrorKind::CopyFailed, "upstream"));
    let f = pm
        .devmem()
        .copy_to_devmem(&CopyRequest {
            page_size: PS,
            pages: &pfns,
            addrs: &src,
            pre_fence: Some(&failed),
        })
        .unwrap();
    let e = f.wait_timeout(LONG).unwrap_err();
    assert!(e.to_string().contains("upstream"), "{e}");
    assert_eq!(env.counters().appends, appends, "nothing queued");
    // Fails later: the bridged copy's fence fails with it.
    let tl = FenceTimeline::new();
    let gate = tl.host_fence();
    let f = pm
        .devmem()
        .copy_to_devmem(&CopyRequest {
            page_size: PS,
            pages: &pfns,
            addrs: &src,
            pre_fence: Some(&Fence::from_host(gate.clone())),
        })
        .unwrap();
    gate.signal_error(BackendError::new(BackendErrorKind::CopyFailed, "late"));
    let e = f.wait_timeout(LONG).unwrap_err();
    assert!(e.to_string().contains("late"), "{e}");
    assert_eq!(
        env.backend
            .ze_pagemap(PagemapId(0))
            .unwrap()
            .stats()
            .failed_pre_fences,
        1
    );
    pm.devmem().devmem_release(b);
    host.free_frames(&src_frames, PS);
}

#[test]
fn events_are_recycled_only_once_retired_under_load() {
    let Some(env) = setup(LevelZeroConfig::default()) else {
        return;
    };
    let start = env.counters();
    let host = env.host();
    let threads_n = 4;
    let per_thread = 400;
    let pms: Vec<_> = (0..threads_n)
        .map(|t| env.pagemap(t as u8, (t % 2) as u32, 16 << 20))
        .collect();
    // Fences kept alive (never waited, never polled) while thousands of events are recycled:
    // their events must not be reused.
    let kept = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for pm in &pms {
            let host = host.clone();
            let kept = &kept;
            s.spawn(move || {
                let dev = pm.device().0;
                let (frames, src) = host_pages(&*host, 8, PS, 1, dev);
                let (b, pfns) = alloc(pm, 8, PS);
                let mut prev: Option<Fence> = None;
                let mut window = std::collections::VecDeque::new();
                for i in 0..per_thread {
                    let k = i % 8;
                    let f = pm
                        .devmem()
                        .copy_to_devmem(&CopyRequest {
                            page_size: PS,
                            pages: &pfns[k..k + 1],
                            addrs: &src[k..k + 1],
                            pre_fence: prev.as_ref(),
                        })
                        .unwrap();
                    if i % 40 == 0 {
                        kept.lock().unwrap().push(f.clone());
                    }
                    prev = Some(f.clone());
                    window.push_back(f);
                    if window.len() > 16 {
                        wait(&window.pop_front().unwrap());
                    }
                }
                for f in window {
                    wait(&f);
                }
                drop(prev);
                pm.devmem().devmem_release(b);
                host.free_frames(&frames, PS);
            });
        }
    });
    let kept = kept.into_inner().unwrap();
    let handles: HashSet<u64> = kept.iter().map(|f| f.native().unwrap().handle).collect();
    assert_eq!(handles.len(), kept.len(), "two live fences share an event");
    for f in &kept {
        assert!(f.is_signaled(), "a kept fence's event was reset under it");
    }
    let mid = env.counters();
    let stats = env.backend.event_stats(DeviceId(0)).unwrap();
    assert!(
        mid.live_events - start.live_events <= 256,
        "events bounded: {} live ({stats:?})",
        mid.live_events - start.live_events
    );
    assert!(
        stats.resets >= (threads_n * per_thread) as u64 / 2,
        "{stats:?}"
    );
    assert!(mid.events_host_reset > start.events_host_reset);
    assert_eq!(mid.strict_violations, 0);
    drop((kept, pms, host));
    drop(env.backend);
    let end = env.soft.counters().unwrap();
    assert_eq!(end.live_events, start.live_events, "every event destroyed");
    assert_eq!(end.live_event_pools, start.live_event_pools);
    assert_eq!(end.live_command_lists, start.live_command_lists);
    assert_eq!(end.live_queues, start.live_queues);
    assert_eq!(end.live_allocations, start.live_allocations);
}

#[test]
fn an_event_a_pending_command_waits_for_is_not_recycled() {
    let Some(env) = setup(LevelZeroConfig::default()) else {
        return;
    };
    let host = env.host();
    let a = env.pagemap(0, 0, 16 << 20);
    let b = env.pagemap(1, 0, 16 << 20);
    let (src_frames, src) = host_pages(&*host, 1, PS, 2, 0);
    let (ba, pa) = alloc(&a, 1, PS);
    let (bb, pb) = alloc(&b, 1, PS);
    let copy = |pm: &drm_pagemap_core::Pagemap, p: &[drm_pagemap_core::Pfn], pre: &Fence| {
        pm.devmem()
            .copy_to_devmem(&CopyRequest {
                page_size: PS,
                pages: p,
                addrs: &src,
                pre_fence: Some(pre),
            })
            .unwrap()
    };
    let (h1, g1) = env.backend.host_event(DeviceId(0)).unwrap();
    let (h2, g2) = env.backend.host_event(DeviceId(0)).unwrap();
    let (h3, g3) = env.backend.host_event(DeviceId(0)).unwrap();
    // A on engine a, behind gate 1. Engine b is held by gate 2, then waits for A's event.
    let fa = copy(&a, &pa, &g1);
    let b0 = copy(&b, &pb, &g2);
    let fb = copy(&b, &pb, &fa);
    drop(fa);
    h1.signal().unwrap();
    // A completes; engine a retires it. Its event must not be reused while B may wait on it.
    let za = env.backend.ze_pagemap(PagemapId(0)).unwrap();
    let t = Instant::now();
    while za.stats().in_flight > 0 && t.elapsed() < LONG {
        std::thread::sleep(Duration::from_millis(5));
        za.reap();
    }
    assert_eq!(za.stats().in_flight, 0);
    // A new call on engine a takes an event (a recycled one would be A's) and stays pending.
    let fc = copy(&a, &pa, &g3);
    h2.signal().unwrap();
    wait(&b0);
    fb.wait_timeout(Duration::from_secs(10))
        .expect("B waited for A's event, not for a recycled one");
    assert!(!fc.is_signaled());
    h3.signal().unwrap();
    wait(&fc);
    a.devmem().devmem_release(ba);
    b.devmem().devmem_release(bb);
    host.free_frames(&src_frames, PS);
}
