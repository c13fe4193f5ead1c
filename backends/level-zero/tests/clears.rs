//! Clears of device memory: fresh pages are cleared when allocated (the clear is the
//! pre-migrate fence); with clear on free (the default) released pages are cleared on the way
//! back, so an allocation of recycled pages has nothing to wait for; a clear on free that
//! cannot be queued leaves its pages to be cleared by the next allocation.

mod common;

use common::*;
use drm_pagemap_core::{CopyRequest, PageSize, Pagemap, PagemapId, Pfn};
use drm_pagemap_level_zero::{LevelZeroConfig, ZeStats};
use level_zero_sys::ze_result_t;
use std::time::{Duration, Instant};

const PS: PageSize = PageSize::Size4K;
const N: usize = 12;

fn stats(env: &Env) -> ZeStats {
    env.backend.ze_pagemap(PagemapId(0)).unwrap().stats()
}

/// Waits until the pagemap has nothing in flight (a clear on free has completed).
fn settle(env: &Env) {
    let zp = env.backend.ze_pagemap(PagemapId(0)).unwrap();
    let until = Instant::now() + LONG;
    while zp.stats().in_flight > 0 {
        assert!(Instant::now() < until, "{:?}", zp.stats());
        std::thread::sleep(Duration::from_millis(2));
        zp.reap();
    }
}

/// Fills `pfns` with pattern `seed`.
fn fill(env: &Env, pm: &Pagemap, pfns: &[Pfn], seed: u8) {
    let host = env.host();
    let (frames, src) = host_pages(&*host, pfns.len(), PS, seed, pm.device().0);
    wait(
        &pm.devmem()
            .copy_to_devmem(&CopyRequest {
                page_size: PS,
                pages: pfns,
                addrs: &src,
                pre_fence: None,
            })
            .unwrap(),
    );
    host.free_frames(&frames, PS);
}

/// Whether `pfns` hold zeros (read back to system memory).
fn zeros(env: &Env, pm: &Pagemap, pfns: &[Pfn]) -> Result<(), String> {
    let host = env.host();
    let (frames, dst) = host_pages(&*host, pfns.len(), PS, 77, pm.device().0);
    wait(
        &pm.devmem()
            .copy_to_ram(&CopyRequest {
                page_size: PS,
                pages: pfns,
                addrs: &dst,
                pre_fence: None,
            })
            .unwrap(),
    );
    let r = check_host(&*host, &frames, PS, 0);
    host.free_frames(&frames, PS);
    r
}

/// Allocates N pages: the backing, its pfns (sorted) and whether it had a pre-migrate fence.
fn allocate(pm: &Pagemap) -> (drm_pagemap_core::DevmemBacking, Vec<Pfn>, bool) {
    let b = pm.devmem().allocate(N, PS).expect("allocate");
    let fenced = b.pre_migrate_fence.is_some();
    b.wait_ready().expect("clear");
    let mut pfns = vec![Pfn(0); N];
    pm.devmem().populate_devmem_pfn(&b, &mut pfns).unwrap();
    pfns.sort();
    (b, pfns, fenced)
}

#[test]
fn recycled_pages_are_cleared_on_free_and_need_no_wait() {
    let Some(env) = setup(LevelZeroConfig::default()) else {
        return;
    };
    let pm = env.pagemap(0, 0, 1 << 20);
    let (b, pfns, fenced) = allocate(&pm);
    assert!(fenced, "fresh memory is cleared when allocated");
    assert_eq!(stats(&env).alloc_clears, 1);
    fill(&env, &pm, &pfns, 9);
    pm.devmem().devmem_release(b);
    assert_eq!(stats(&env).free_clears, 1);
    settle(&env);
    // The same pages again (the pagemap holds only a little more than them): no clear, no
    // pre-migrate fence, and zeros where pattern 9 was.
    let (b, again, fenced) = allocate(&pm);
    assert_eq!(again, pfns, "the released pages were recycled");
    assert!(
        !fenced,
        "recycled pages cleared on free need no pre-migrate fence"
    );
    assert_eq!(stats(&env).alloc_clears, 1, "{:?}", stats(&env));
    zeros(&env, &pm, &again).expect("cleared on free");
    pm.devmem().devmem_release(b);
}

#[test]
fn without_clear_on_free_allocations_clear_recycled_pages() {
    let Some(env) = setup(LevelZeroConfig {
        clear_on_free: false,
        ..LevelZeroConfig::default()
    }) else {
        return;
    };
    let pm = env.pagemap(0, 0, 1 << 20);
    let (b, pfns, _) = allocate(&pm);
    fill(&env, &pm, &pfns, 4);
    pm.devmem().devmem_release(b);
    let (b, again, fenced) = allocate(&pm);
    assert_eq!(again, pfns, "the released pages were recycled");
    assert!(fenced, "the allocation clears them");
    let s = stats(&env);
    assert_eq!((s.alloc_clears, s.free_clears), (2, 0), "{s:?}");
    zeros(&env, &pm, &again).expect("cleared when allocated");
    pm.devmem().devmem_release(b);
}

#[test]
fn a_clear_on_free_that_cannot_be_queued_leaves_the_clear_to_the_allocation() {
    let Some(env) = setup(LevelZeroConfig::default()) else {
        return;
    };
    let pm = env.pagemap(0, 0, 1 << 20);
    let (b, pfns, _) = allocate(&pm);
    fill(&env, &pm, &pfns, 6);
    env.soft
        .fail_append(0, 1, ze_result_t::ZE_RESULT_ERROR_OUT_OF_HOST_MEMORY)
        .unwrap();
    pm.devmem().devmem_release(b);
    assert_eq!(stats(&env).free_clears, 0, "the clear on free failed");
    let (b, again, fenced) = allocate(&pm);
    assert_eq!(again, pfns, "the released pages were recycled");
    assert!(
        fenced,
        "pages not cleared on free are cleared when allocated"
    );
    assert_eq!(stats(&env).alloc_clears, 2);
    zeros(&env, &pm, &again).expect("cleared when allocated");
    pm.devmem().devmem_release(b);
    assert_eq!(env.counters().strict_violations, 0);
}
