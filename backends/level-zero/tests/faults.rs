//! Faults through the software driver: out of device memory, a lost device, injected append
//! and submission failures. Each leaves the data where it was, reports a typed error that
//! keeps the `ze_result_t`, and leaks nothing.

mod common;

use common::*;
use drm_pagemap_core::{
    BackendErrorKind, CopyRequest, DeviceId, DevmemBacking, PageSize, Pagemap, Pfn,
};
use drm_pagemap_level_zero::{LevelZeroConfig, ze_result_of};
use level_zero_sys::ze_result_t;

/// Copies `pfns` of `pm` back to fresh system pages and checks pattern `seed`.
fn check_device(
    env: &Env,
    pm: &Pagemap,
    pfns: &[Pfn],
    ps: PageSize,
    seed: u8,
) -> Result<(), String> {
    let host = env.host();
    let (frames, dst) = host_pages(&*host, pfns.len(), ps, 0, pm.device().0);
    let f = pm
        .devmem()
        .copy_to_ram(&CopyRequest {
            page_size: ps,
            pages: pfns,
            addrs: &dst,
            pre_fence: None,
        })
        .map_err(|e| e.to_string())?;
    f.wait_timeout(LONG).map_err(|e| e.to_string())?;
    let r = check_host(&*host, &frames, ps, seed);
    host.free_frames(&frames, ps);
    r
}

/// An allocation of `n` pages holding pattern `seed`.
fn filled(env: &Env, pm: &Pagemap, n: usize, ps: PageSize, seed: u8) -> (DevmemBacking, Vec<Pfn>) {
    let host = env.host();
    let (frames, src) = host_pages(&*host, n, ps, seed, pm.device().0);
    let (b, pfns) = alloc(pm, n, ps);
    wait(
        &pm.devmem()
            .copy_to_devmem(&CopyRequest {
                page_size: ps,
                pages: &pfns,
                addrs: &src,
                pre_fence: None,
            })
            .unwrap(),
    );
    host.free_frames(&frames, ps);
    (b, pfns)
}

#[test]
fn out_of_device_memory_is_typed_and_loses_nothing() {
    let Some(env) = setup(LevelZeroConfig::default()) else {
        return;
    };
    let start = env.counters();
    let ps = PageSize::Size2M;
    // Two pagemaps of the whole device each: their chunks run out of device memory before
    // either pagemap is full.
    let pm = env.pagemap(0, 0, DEVICE_MEMORY);
    let other = env.pagemap(1, 0, DEVICE_MEMORY);
    let (keep, keep_pfns) = filled(&env, &pm, 3, ps, 11);
    let mut held = Vec::new();
    let e = loop {
        let on = if held.len() % 2 == 0 { &other } else { &pm };
        match on.devmem().allocate(16, ps) {
            Ok(b) => held.push((on.clone(), b)),
            Err(e) => break e,
        }
        assert!(held.len() < 64, "never ran out");
    };
    assert_eq!(e.kind, BackendErrorKind::OutOfMemory, "{e}");
    assert!(e.is_transient());
    assert_eq!(ze_result_of(&e), Some(0x7000_0003), "{e}");
    assert!(e.message.contains("device 0"), "{e}");
    assert!(
        e.message.contains("ZE_RESULT_ERROR_OUT_OF_DEVICE_MEMORY"),
        "{e}"
    );
    check_device(&env, &pm, &keep_pfns, ps, 11).expect("earlier data intact");
    // Releasing makes room again.
    for (on, b) in held.drain(..) {
        on.devmem().devmem_release(b);
    }
    let again = pm.devmem().allocate(16, ps).expect("room after release");
    again.wait_ready().unwrap();
    pm.devmem().devmem_release(again);
    pm.devmem().devmem_release(keep);
    assert_eq!(env.counters().strict_violations, 0);
    drop((pm, other));
    let Env { backend, soft, .. } = env;
    drop(backend);
    let end = soft.counters().unwrap();
    assert_eq!(end.live_allocations, start.live_allocations);
    assert_eq!(end.live_device_bytes, start.live_device_bytes);
}

#[test]
fn a_lost_device_is_a_typed_error() {
    let Some(env) = setup(LevelZeroConfig::default()) else {
        return;
    };
    let ps = PageSize::Size4K;
    let pm = env.pagemap(1, 1, 16 << 20);
    let (b, pfns) = filled(&env, &pm, 4, ps, 6);
    let host = env.host();
    // A copy queued behind a gate, then the device is lost.
    let (gate_ev, gate) = env.backend.host_event(DeviceId(1)).unwrap();
    let (frames, dst) = host_pages(&*host, 4, ps, 0, 1);
    let pending = pm
        .devmem()
        .copy_to_ram(&CopyRequest {
            page_size: ps,
            pages: &pfns,
            addrs: &dst,
            pre_fence: Some(&gate),
        })
        .unwrap();
    env.soft.lose_device(1).unwrap();
    let lost = |e: &drm_pagemap_core::BackendError| {
        assert_eq!(e.kind, BackendErrorKind::DeviceLost, "{e}");
        assert_eq!(ze_result_of(e), Some(0x7000_0001), "{e}");
    };
    match pending.wait_timeout(LONG) {
        Err(drm_pagemap_core::FenceError::Failed(e)) => lost(&e),
        other => panic!("{other:?}"),
    }
    // New work on the lost device: refused or failed, typed.
    match pm.devmem().copy_to_ram(&CopyRequest {
        page_size: ps,
        pages: &pfns,
        addrs: &dst,
        pre_fence: None,
    }) {
        Err(e) => lost(&e),
        Ok(f) => match f.wait_timeout(LONG) {
            Err(drm_pagemap_core::FenceError::Failed(e)) => lost(&e),
            other => panic!("{other:?}"),
        },
    }
    lost(&pm.devmem().allocate(1, ps).unwrap_err());
    // Nothing of the lost device's copies reached system memory.
    check_host(&*host, &frames, ps, 0).unwrap();
    // The driver brings the device back (a reset of the injection).
    env.soft.reset().unwrap();
    let _ = gate_ev.signal();
    drop(pending);
    pm.devmem().devmem_release(b);
    host.free_frames(&frames, ps);
}

/// Injected failures of the `nth` append (or submission) of a call of `runs` runs: the call
/// fails or its fence fails, the source is intact, and the engine works afterwards.
fn injected(regular_runs: usize, runs: usize, submit: bool) {
    let Some(env) = setup(LevelZeroConfig {
        regular_list_min_runs: regular_runs,
        ..LevelZeroConfig::default()
    }) else {
        return;
    };
    let start = env.counters();
    let ps = PageSize::Size4K;
    let host = env.host();
    let pm = env.pagemap(0, 0, 16 << 20);
    let (src_frames, src) = host_pages(&*host, runs, ps, 8, 0);
    let (b, pfns) = alloc(&pm, runs, ps);
    // Reversed: one run per page.
    let pages: Vec<Pfn> = pfns.iter().rev().copied().collect();
    let addrs: Vec<_> = src.iter().rev().copied().collect();
    let code = ze_result_t::ZE_RESULT_ERROR_UNKNOWN;
    let mut outcomes = (0, 0);
    for nth in 1..=(runs as u64 + 3) {
        env.soft.reset().unwrap();
        if submit {
            env.soft.fail_submit(0, nth, code).unwrap();
        } else {
            env.soft.fail_append(0, nth, code).unwrap();
        }
        let r = pm.devmem().copy_to_devmem(&CopyRequest {
            page_size: ps,
            pages: &pages,
            addrs: &addrs,
            pre_fence: None,
        });
        let failed = match r {
            Err(e) => {
                outcomes.0 += 1;
                Some(e)
            }
            Ok(f) => match f.wait_timeout(LONG) {
                Ok(()) => None,
                Err(drm_pagemap_core::FenceError::Failed(e)) => {
                    outcomes.1 += 1;
                    Some(e)
                }
                Err(e) => panic!("nth {nth}: {e}"),
            },
        };
        if let Some(e) = failed {
            assert_eq!(ze_result_of(&e), Some(code.0), "nth {nth}: {e}");
            assert!(matches!(e.kind, BackendErrorKind::Driver { .. }), "{e}");
            assert!(e.message.contains("device 0"), "{e}");
        }
        check_host(&*host, &src_frames, ps, 8).expect("the source is intact");
    }
    env.soft.reset().unwrap();
    assert!(outcomes.0 >= 1, "the first append's failure fails the call");
    if !regular_runs_used(regular_runs, runs) && !submit {
        assert!(
            outcomes.1 >= 1,
            "a later append's failure fails the fence: {outcomes:?}"
        );
    }
    // The engine works afterwards.
    wait(
        &pm.devmem()
            .copy_to_devmem(&CopyRequest {
                page_size: ps,
                pages: &pages,
                addrs: &addrs,
                pre_fence: None,
            })
            .unwrap(),
    );
    check_device(&env, &pm, &pfns, ps, 8).unwrap();
    assert_eq!(env.counters().strict_violations, 0);
    pm.devmem().devmem_release(b);
    host.free_frames(&src_frames, ps);
    drop((pm, host));
    let Env { backend, soft, .. } = env;
    drop(backend);
    let end = soft.counters().unwrap();
    assert_eq!(end.live_events, start.live_events);
    assert_eq!(end.live_command_lists, start.live_command_lists);
    assert_eq!(end.live_allocations, start.live_allocations);
    assert_eq!(end.live_event_pools, start.live_event_pools);
    assert_eq!(end.live_queues, start.live_queues);
}

fn regular_runs_used(regular_runs: usize, runs: usize) -> bool {
    runs >= regular_runs
}

#[test]
fn injected_append_failures_on_the_immediate_list_lose_nothing() {
    injected(1000, 6, false);
}

#[test]
fn injected_append_failures_on_a_regular_list_lose_nothing() {
    injected(4, 6, false);
}

#[test]
fn injected_submission_failures_lose_nothing() {
    injected(4, 6, true);
    injected(1000, 6, true);
}

#[test]
fn a_failed_clear_gives_its_pages_back() {
    let Some(env) = setup(LevelZeroConfig::default()) else {
        return;
    };
    let pm = env.pagemap(0, 0, 1 << 20);
    env.soft
        .fail_append(0, 1, ze_result_t::ZE_RESULT_ERROR_OUT_OF_HOST_MEMORY)
        .unwrap();
    let e = pm.devmem().allocate(256, PageSize::Size4K).unwrap_err();
    assert_eq!(e.kind, BackendErrorKind::OutOfMemory, "{e}");
    assert_eq!(ze_result_of(&e), Some(0x7000_0002));
    // All 1 MiB can be allocated again: nothing was kept by the failed allocation.
    let b = pm
        .devmem()
        .allocate(256, PageSize::Size4K)
        .expect("pages given back");
    b.wait_ready().unwrap();
    pm.devmem().devmem_release(b);
}
