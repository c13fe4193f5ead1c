//! Bytes through the real loader and the software driver: system memory to device memory
//! and back, device to peer device, immediate and regular command lists.

mod common;

use common::*;
use drm_pagemap_core::{
    Backend, BackendErrorKind, CopyRequest, DeviceId, Direction, DmaAddr, PageSize, Pfn,
};
use drm_pagemap_level_zero::{DEFAULT_REGULAR_LIST_MIN_RUNS, LevelZeroConfig};

fn round_trip(ps: PageSize, n: usize, scatter: bool) {
    let Some(env) = setup(LevelZeroConfig::default()) else {
        return;
    };
    let host = env.host();
    let pm = env.pagemap(0, 0, 64 << 20);
    let (src_frames, src) = host_pages(&*host, n, ps, 7, 0);
    let (back, pfns) = alloc(&pm, n, ps);
    // Scattered: pages in reverse order, so no two entries merge.
    let mut order: Vec<usize> = (0..n).collect();
    if scatter {
        order.reverse();
    }
    let pages: Vec<Pfn> = order.iter().map(|&i| pfns[i]).collect();
    let addrs: Vec<DmaAddr> = order.iter().map(|&i| src[i]).collect();
    let f = pm
        .devmem()
        .copy_to_devmem(&CopyRequest {
            page_size: ps,
            pages: &pages,
            addrs: &addrs,
            pre_fence: back.pre_migrate_fence.as_ref(),
        })
        .expect("copy_to_devmem");
    wait(&f);
    let (dst_frames, dst) = host_pages(&*host, n, ps, 0, 0);
    let f = pm
        .devmem()
        .copy_to_ram(&CopyRequest {
            page_size: ps,
            pages: &pfns,
            addrs: &dst,
            pre_fence: None,
        })
        .expect("copy_to_ram");
    wait(&f);
    check_host(&*host, &dst_frames, ps, 7).expect("bytes back in RAM");
    let stats = env
        .backend
        .ze_pagemap(drm_pagemap_core::PagemapId(0))
        .unwrap()
        .stats();
    assert_eq!(stats.pages_copied, 2 * n as u64);
    if scatter {
        assert_eq!(
            stats.runs,
            n as u64 + 1,
            "scattered in, one run out: {stats:?}"
        );
        assert_eq!(
            stats.regular_calls,
            u64::from(n >= DEFAULT_REGULAR_LIST_MIN_RUNS),
            "{stats:?}"
        );
    } else {
        assert_eq!(stats.runs, 2, "contiguous both ways: {stats:?}");
        assert_eq!(stats.regular_calls, 0, "{stats:?}");
    }
    pm.devmem().devmem_release(back);
    host.free_frames(&src_frames, ps);
    host.free_frames(&dst_frames, ps);
}

#[test]
fn bytes_round_trip_ram_device_ram_4k_contiguous() {
    round_trip(PageSize::Size4K, 8, false);
}

#[test]
fn bytes_round_trip_ram_device_ram_4k_scattered_on_the_immediate_list() {
    round_trip(PageSize::Size4K, 64, true);
}

#[test]
fn bytes_round_trip_ram_device_ram_4k_scattered_on_a_regular_list() {
    round_trip(PageSize::Size4K, 300, true);
}

#[test]
fn bytes_round_trip_ram_device_ram_2m() {
    round_trip(PageSize::Size2M, 3, true);
}

#[test]
fn a_device_pushes_into_a_peer_and_not_into_a_stranger() {
    let Some(env) = setup(LevelZeroConfig::default()) else {
        return;
    };
    let ps = PageSize::Size64K;
    let n = 5;
    let host = env.host();
    let pm0 = env.pagemap(0, 0, 32 << 20);
    let pm1 = env.pagemap(1, 1, 32 << 20);
    let pm2 = env.pagemap(2, 2, 32 << 20);
    assert!(env.backend.can_access_peer(DeviceId(0), DeviceId(1)));
    assert!(!env.backend.can_access_peer(DeviceId(0), DeviceId(2)));
    assert_eq!(pm0.owner(), pm1.owner());
    assert_ne!(pm0.owner(), pm2.owner());
    let (src_frames, src) = host_pages(&*host, n, ps, 3, 0);
    let (b0, p0) = alloc(&pm0, n, ps);
    wait(
        &pm0.devmem()
            .copy_to_devmem(&CopyRequest {
                page_size: ps,
                pages: &p0,
                addrs: &src,
                pre_fence: None,
            })
            .unwrap(),
    );
    // Device 0 pushes its pages straight into device 1's memory.
    let b1 = pm1.devmem().allocate(n, ps).unwrap();
    let mut p1 = vec![Pfn(0); n];
    pm1.devmem().populate_devmem_pfn(&b1, &mut p1).unwrap();
    let mut peer = vec![DmaAddr::NONE; n];
    pm1.ops()
        .device_map(DeviceId(0), &p1, ps, Direction::FromDevice, &mut peer)
        .expect("peer mapping");
    let f = pm0
        .devmem()
        .copy_to_ram(&CopyRequest {
            page_size: ps,
            pages: &p0,
            addrs: &peer,
            pre_fence: b1.pre_migrate_fence.as_ref(),
        })
        .unwrap();
    wait(&f);
    let (dst_frames, dst) = host_pages(&*host, n, ps, 0, 1);
    wait(
        &pm1.devmem()
            .copy_to_ram(&CopyRequest {
                page_size: ps,
                pages: &p1,
                addrs: &dst,
                pre_fence: None,
            })
            .unwrap(),
    );
    check_host(&*host, &dst_frames, ps, 3).expect("bytes in the peer");
    // Device 2 is not a peer: its memory cannot be mapped for device 0.
    let (b2, p2) = alloc(&pm2, 1, ps);
    let mut out = [DmaAddr::NONE];
    let e = pm2
        .ops()
        .device_map(DeviceId(0), &p2, ps, Direction::FromDevice, &mut out)
        .unwrap_err();
    assert_eq!(e.kind, BackendErrorKind::MapFailed, "{e}");
    assert_eq!(env.counters().strict_violations, 0);
    for (pm, b) in [(&pm0, b0), (&pm1, b1), (&pm2, b2)] {
        pm.devmem().devmem_release(b);
    }
    host.free_frames(&src_frames, ps);
    host.free_frames(&dst_frames, ps);
}
