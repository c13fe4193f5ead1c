//! A fault that cannot be served kills the faulting thread's process with SIGBUS, as the
//! kernel does when a device page cannot come home (run in a child process).

use drm_pagemap_core::{AddressSpace, Backend, MigrateDetails, PageSize, PagemapId};
use drm_pagemap_sim::{SimBackend, SimConfig};
use drm_pagemap_uffd::{MemfdMemory, PointerSpace, UffdConfig, UffdError};
use std::os::unix::process::ExitStatusExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// SIGBUS on Linux (x86-64 and arm64).
const SIGBUS: i32 = 7;
/// Set in the child's environment (tests may read the environment; the library does not).
const CHILD: &str = "DRM_PAGEMAP_UFFD_SIGBUS_CHILD";
const NAME: &str = "a_fault_on_a_range_freed_in_the_engine_gets_sigbus";

#[test]
fn a_fault_on_a_range_freed_in_the_engine_gets_sigbus() {
    if std::env::var_os(CHILD).is_some() {
        child();
        return;
    }
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Watchdog: a handler that never gives up would leave the child waiting for ever.
    let end = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the child still waits on its fault after 60 s: no SIGBUS");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if let Some(line) = stdout.lines().find(|l| l.starts_with("skipped: ")) {
        println!("{line}");
        return;
    }
    assert!(stdout.contains("child: touching"), "{out:?}");
    assert!(!stdout.contains("child: the load returned"), "{out:?}");
    assert_eq!(out.status.signal(), Some(SIGBUS), "{out:?}");
}

fn child() {
    let mem = Arc::new(MemfdMemory::new(64 << 20).unwrap());
    let sim = SimBackend::new(SimConfig {
        devices: 1,
        device_capacity: 64 << 20,
        host_bytes: Some(mem.clone()),
        ..SimConfig::default()
    })
    .unwrap();
    let mm = Arc::new(AddressSpace::new(sim.host_memory()));
    for pm in sim.pagemap_per_device().unwrap() {
        mm.add_pagemap(pm).unwrap();
    }
    let space = PointerSpace::new(mm.clone(), mem, UffdConfig::default()).unwrap();
    let pr = match space.create_range(4096, PageSize::Size4K) {
        Ok(r) => r,
        Err(e @ (UffdError::Unavailable { .. } | UffdError::MissingFeature { .. })) => {
            println!("skipped: {e}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    pr.word(0).unwrap().store(1, Ordering::Relaxed);
    mm.migrate(pr.range(), PagemapId(0), &MigrateDetails::default())
        .unwrap();
    // Freed behind the pointer range's back: the page has nowhere to come home to.
    mm.free_range(pr.range().start).unwrap();
    println!("child: touching");
    let v = pr.word(0).unwrap().load(Ordering::Relaxed);
    println!("child: the load returned {v}");
}
