//! The backend under the loader's layers. Each layer is chosen by environment variables that
//! the loader reads at the first `zeInit`, so each case runs in a child process (this test
//! binary again, test `scenario`, with the variables set) whose output is checked here:
//!
//! - `ZE_ENABLE_LOADER_INTERCEPT=1`: the loader wraps every handle and unwraps it on each
//!   call (the backend and the software driver's control entry work on wrapped handles);
//! - `ZE_ENABLE_VALIDATION_LAYER=1 ZE_ENABLE_PARAMETER_VALIDATION=1`: every call of the
//!   scenario passes the validation layer: no call fails and the layer reports nothing.
//!   What the layer (loader 1.8.12) does on an error is established by
//!   `the_validation_layer_rejects_a_bad_call` (a null context given to `zeMemFree`): it
//!   returns `ZE_RESULT_ERROR_INVALID_NULL_HANDLE` to the caller and prints nothing. So a
//!   validation error in the scenario is a failed call, which the backend turns into an
//!   error that fails the scenario; the children's output is checked to be empty too.

mod common;

use common::*;
use drm_pagemap_core::{
    Backend, CopyRequest, DeviceId, DmaAddr, FenceArray, PageSize, PagemapId, Pfn,
};
use drm_pagemap_level_zero::LevelZeroConfig;
use std::process::Command;

/// Set in a child: what it runs under (`intercept`, `validation`, `bad-call`).
const CHILD: &str = "DRM_PAGEMAP_L0_LAYER_CHILD";
/// Printed by a child whose scenario passed.
const PASSED: &str = "layer scenario passed";

const PS: PageSize = PageSize::Size4K;

/// Round trips on the immediate and on a regular list, a pre-fence of this driver as a wait
/// event, a host fence bridged, a push into a peer; bytes checked, no strict violation.
fn run_scenario(env: &Env) {
    let host = env.host();
    let start = env.counters();
    let pm = env.pagemap(0, 0, 32 << 20);
    let peer = env.pagemap(1, 1, 32 << 20);
    let zp = env.backend.ze_pagemap(PagemapId(0)).unwrap();
    for (n, scatter) in [(8usize, false), (40, true)] {
        let (src_frames, src) = host_pages(&*host, n, PS, 3 + n as u8, 0);
        let (b, pfns) = alloc(&pm, n, PS);
        let mut order: Vec<usize> = (0..n).collect();
        if scatter {
            order.reverse();
        }
        let pages: Vec<Pfn> = order.iter().map(|&i| pfns[i]).collect();
        let addrs: Vec<DmaAddr> = order.iter().map(|&i| src[i]).collect();
        // The copy waits on the device for a host-signalled event of this driver and for a
        // host fence (bridged).
        let (hev, gate) = env.backend.host_event(DeviceId(0)).unwrap();
        let timeline = drm_pagemap_core::FenceTimeline::new();
        let signal = timeline.host_fence();
        let pre = FenceArray::unify(vec![
            gate,
            drm_pagemap_core::Fence::from_host(signal.clone()),
        ])
        .unwrap();
        let f = pm
            .devmem()
            .copy_to_devmem(&CopyRequest {
                page_size: PS,
                pages: &pages,
                addrs: &addrs,
                pre_fence: Some(&pre),
            })
            .expect("copy_to_devmem");
        hev.signal().unwrap();
        signal.signal();
        wait(&f);
        // Push into the peer, then read the peer back.
        let (pb, ppfns) = alloc(&peer, n, PS);
        let mut peer_addrs = vec![DmaAddr::NONE; n];
        peer.ops()
            .device_map(
                DeviceId(0),
                &ppfns,
                PS,
                drm_pagemap_core::Direction::ToDevice,
                &mut peer_addrs,
            )
            .unwrap();
        wait(
            &pm.devmem()
                .copy_to_ram(&CopyRequest {
                    page_size: PS,
                    pages: &pfns,
                    addrs: &peer_addrs,
                    pre_fence: None,
                })
                .unwrap(),
        );
        let (dst_frames, dst) = host_pages(&*host, n, PS, 0, 1);
        wait(
            &peer
                .devmem()
                .copy_to_ram(&CopyRequest {
                    page_size: PS,
                    pages: &ppfns,
                    addrs: &dst,
                    pre_fence: None,
                })
                .unwrap(),
        );
        check_host(&*host, &dst_frames, PS, 3 + n as u8).expect("bytes through two devices");
        pm.devmem().devmem_release(b);
        peer.devmem().devmem_release(pb);
        for f in [&src_frames, &dst_frames] {
            host.free_frames(f, PS);
        }
    }
    let s = zp.stats();
    assert!(s.regular_calls > 0 && s.immediate_calls > 0, "{s:?}");
    assert!(s.device_waits >= 2 && s.host_bridges >= 2, "{s:?}");
    let c = env.counters();
    assert_eq!(c.strict_violations, start.strict_violations, "{c:?}");
    assert!(c.copies > start.copies, "{c:?}");
    let _ = env.backend.device_count();
}

/// A deliberate bad call through the loader (a null context), made only under the
/// validation layer (which rejects it before any driver sees it): its result code.
fn bad_call() -> u32 {
    let loader = level_zero_sys::Loader::open().expect("loader");
    let free = loader.zeMemFree().expect("zeMemFree");
    // SAFETY: a null context and a null pointer: the validation layer's parameter check
    // rejects the call before it reaches the loader's dispatch or the driver (this runs
    // only in a child that has the layer enabled, checked by the caller).
    let r = unsafe {
        free(
            level_zero_sys::ze_context_handle_t(std::ptr::null_mut()),
            std::ptr::null_mut(),
        )
    };
    r.0
}

#[test]
fn scenario() {
    let mode = std::env::var(CHILD).unwrap_or_default();
    if mode == "validation" || mode == "bad-call" {
        // SAFETY: before the loader is opened and before zeInit, in a child process running
        // this test alone.
        unsafe {
            std::env::set_var("ZE_ENABLE_VALIDATION_LAYER", "1");
            std::env::set_var("ZE_ENABLE_PARAMETER_VALIDATION", "1");
        }
    } else if mode == "intercept" {
        // SAFETY: as above.
        unsafe { std::env::set_var("ZE_ENABLE_LOADER_INTERCEPT", "1") };
    }
    let config = LevelZeroConfig {
        regular_list_min_runs: 16,
        ..LevelZeroConfig::default()
    };
    let Some(env) = setup(config) else { return };
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    if mode == "validation" || mode == "bad-call" {
        assert!(
            maps.contains("libze_validation_layer"),
            "the validation layer is not loaded"
        );
    }
    if mode == "bad-call" {
        println!("bad call result: {:#x}", bad_call());
        return;
    }
    run_scenario(&env);
    println!(
        "{PASSED} ({})",
        if mode.is_empty() { "plain" } else { &mode }
    );
}

/// Runs test `scenario` in a child with `mode`: its exit status and output.
fn child(mode: &str) -> (bool, String) {
    let exe = std::env::current_exe().expect("this test binary");
    let out = Command::new(exe)
        .args(["--exact", "scenario", "--nocapture", "--test-threads=1"])
        .env(CHILD, mode)
        .output()
        .expect("run the child");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Lines of the child's output that are not the test harness's own.
fn foreign_lines(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|l| {
            let l = l.trim();
            !(l.is_empty()
                || l == "ok"
                || l.starts_with("running ")
                || l.starts_with("test ")
                || l.starts_with("test result:")
                || l.starts_with("successes:")
                || l.starts_with("scenario")
                || l.contains(PASSED))
        })
        .collect()
}

/// `None` when the child skipped (no loader or driver here): prints the one skip line.
fn passed(mode: &str) -> Option<String> {
    let (ok, text) = child(mode);
    if let Some(l) = text.lines().find(|l| l.starts_with("skipped: ")) {
        println!("{l}");
        return None;
    }
    assert!(ok, "the {mode} child failed:\n{text}");
    assert!(
        text.contains(PASSED),
        "the {mode} child ran no scenario:\n{text}"
    );
    Some(text)
}

#[test]
fn the_backend_works_with_the_loaders_wrapped_handles() {
    let Some(text) = passed("intercept") else {
        return;
    };
    assert!(foreign_lines(&text).is_empty(), "{text}");
}

#[test]
fn the_backend_passes_the_validation_layer() {
    let Some(text) = passed("validation") else {
        return;
    };
    let foreign = foreign_lines(&text);
    assert!(foreign.is_empty(), "the validation layer said: {foreign:?}");
}

#[test]
fn the_validation_layer_rejects_a_bad_call() {
    let (ok, text) = child("bad-call");
    if let Some(l) = text.lines().find(|l| l.starts_with("skipped: ")) {
        println!("{l}");
        return;
    }
    assert!(ok, "{text}");
    // The layer returns ZE_RESULT_ERROR_INVALID_NULL_HANDLE and prints nothing: an error of
    // the layer reaches the backend as a failed call (a typed error), not only as output.
    assert!(
        text.contains(&format!(
            "bad call result: {:#x}",
            level_zero_sys::ze_result_t::ZE_RESULT_ERROR_INVALID_NULL_HANDLE.0
        )),
        "{text}"
    );
    assert!(foreign_lines(&text).is_empty(), "{text}");
}
