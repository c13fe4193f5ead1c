//! Freeing a pointer range gives back every mapping and frame (its own test binary: the
//! process's mapping count must not move with other tests' threads).
#![allow(dead_code)]

use drm_pagemap_core::{AddressSpace, MigrateDetails, PageSize, PagemapId, VaRange};
use drm_pagemap_sim::SimBackend;
use drm_pagemap_uffd::{MemfdMemory, PointerSpace, UffdConfig, UffdError};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

mod common;
use common::*;

#[test]
fn freeing_unmaps_and_returns_every_frame() {
    watchdog(Duration::from_secs(30), || {
        let r = rig(1, UffdConfig::default());
        // Warm up (the handler thread, its descriptors) before taking the baseline; no
        // other rig is made (a dropped one's pool goes when its copy threads end).
        match r.space.create_range(64 * 4096, PageSize::Size4K) {
            Ok(warm) => {
                // Faults as below, so that the fault handler's helper threads have run once
                // (glibc keeps an ended thread's stack mapped for the next thread) ...
                for i in (0..64 * 512).step_by(512) {
                    warm.word(i).unwrap().store(i, Ordering::Relaxed);
                }
                r.mm.migrate(warm.range(), PagemapId(0), &MigrateDetails::default())
                    .unwrap();
                for i in (0..64 * 512).step_by(512) {
                    assert_eq!(warm.word(i).unwrap().load(Ordering::Relaxed), i);
                }
                drop(warm);
                // ... and have ended again (a helper idle for 200 ms ends).
                let end = Instant::now() + Duration::from_secs(5);
                while drm_pagemap_uffd::handler_threads() > 1 && Instant::now() < end {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            Err(e @ (UffdError::Unavailable { .. } | UffdError::MissingFeature { .. })) => {
                println!("skipped: {e}");
                return;
            }
            Err(e) => panic!("{e}"),
        }
        let maps0 = drm_pagemap_uffd::limits::mappings_in_use();
        let Rig {
            _sim: sim,
            mm,
            mem,
            space,
        } = r;
        // A range with a home extent (the sim's host memory places frames): one mapping
        // however its pages move.
        scatter_and_free(&sim, &mm, &mem, &space, maps0, true);
        // Page by page (as on a host memory that does not place frames): one mapping per
        // page at worst. A new space for the same address space, so the first goes.
        drop(space);
        let scattered = UffdConfig {
            scattered: true,
            ..UffdConfig::default()
        };
        let space = PointerSpace::new(mm.clone(), mem.clone(), scattered).unwrap();
        scatter_and_free(&sim, &mm, &mem, &space, maps0, false);
    });
}

/// A 64-page range whose every other page goes through a device and back while another
/// range takes the frames freed meanwhile; then freed: nothing of it is left.
fn scatter_and_free(
    sim: &SimBackend,
    mm: &Arc<AddressSpace>,
    mem: &Arc<MemfdMemory>,
    space: &Arc<PointerSpace>,
    maps0: u64,
    coalesced: bool,
) {
    let host = sim.bytes_host().unwrap().clone();
    let free0 = host.free_granules();
    let pr = space.create_range(64 * 4096, PageSize::Size4K).unwrap();
    assert_eq!(pr.coalesced(), coalesced);
    let span = pr.range();
    for i in 0..64 * 512 {
        pr.word(i).unwrap().store(i, Ordering::Relaxed);
    }
    for p in (0..64).step_by(2) {
        mm.migrate(
            VaRange::new(pr.range().start + p * 4096, 4096),
            PagemapId(0),
            &MigrateDetails::default(),
        )
        .unwrap();
    }
    // Another range takes the frames just freed, so without a home the pages come home to
    // other ones.
    let other = space.create_range(32 * 4096, PageSize::Size4K).unwrap();
    for i in 0..32 * 512 {
        other.word(i).unwrap().store(1, Ordering::Relaxed);
    }
    for i in 0..64 * 512 {
        assert_eq!(pr.word(i).unwrap().load(Ordering::Relaxed), i);
    }
    drop(other);
    let within = drm_pagemap_uffd::limits::mappings_within(span.start, span.len);
    if coalesced {
        // Home again, each page in its own frame: the range is still one mapping.
        assert_eq!(within, 1);
        // The pool and the range.
        assert_eq!(maps_named("drm-pagemap-host"), 2);
    } else {
        // Scattered frames: one mapping per page, or close to it.
        assert!(within >= 32, "{within}");
        assert!(drm_pagemap_uffd::limits::mappings_in_use() > maps0);
        assert!(maps_named("drm-pagemap-host") >= 32);
    }
    assert!(host.free_granules() < free0);
    pr.free().unwrap();
    assert_eq!(
        drm_pagemap_uffd::limits::mappings_within(span.start, span.len),
        0
    );
    // Nothing of the range anywhere: no mapping of its file, only the pool maps the host
    // file. (The process's total moves with the sim's heap: device arena chunks.)
    assert_eq!(maps_named("drm-pagemap-range"), 0);
    assert_eq!(
        maps_named("drm-pagemap-host"),
        1,
        "{}\nrange {span}",
        std::fs::read_to_string("/proc/self/maps").unwrap()
    );
    // The margin: the sim's heap, and the fault handler's helper threads if this run
    // needed more than the warm-up did (a stack, its guard, a signal stack and its guard
    // each, for at most 2 helpers of one space). A leak of the range's mappings (32 or
    // more, above) would exceed it.
    assert!(
        drm_pagemap_uffd::limits::mappings_in_use() <= maps0 + 24,
        "{} > {maps0} + 24\n{}",
        drm_pagemap_uffd::limits::mappings_in_use(),
        std::fs::read_to_string("/proc/self/maps").unwrap()
    );
    // Every frame back, the home extent included.
    assert_eq!(host.free_granules(), free0);
    assert_eq!(space.range_count(), 0);
    assert!(mm.ranges().is_empty());
    assert_eq!(mem.allocated_bytes(), 0);
}

/// Mappings whose name (the memfd's) contains `name`.
fn maps_named(name: &str) -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|l| l.contains(name))
        .count()
}
