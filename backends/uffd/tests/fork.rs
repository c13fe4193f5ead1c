//! What a child process sees of a pointer range: nothing. The range's mappings and the memfd
//! pool are `MADV_DONTFORK`, so a child that touches them gets SIGSEGV (never the parent's
//! frames, which the parent goes on moving and reusing), and the parent's range keeps
//! working while the child lives and after it.

use drm_pagemap_core::{
    AddressSpace, Backend, MigrateDetails, PageLocation, PageSize, PagemapId, VaRange,
};
use drm_pagemap_sim::{SimBackend, SimConfig};
use drm_pagemap_testkit::bytes::FrameBytes;
use drm_pagemap_uffd::{MemfdMemory, PointerSpace, UffdConfig, UffdError};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// SIGSEGV on Linux.
const SIGSEGV: i32 = 11;

/// A forked child that waits for a byte on a pipe, then runs `touch` and exits 0 (so a child
/// that survives `touch` is told apart from one killed by a signal).
struct Child {
    pid: libc::pid_t,
    go: libc::c_int,
    reaped: bool,
}

impl Drop for Child {
    /// A child not waited for (the test failed before) is killed, so that none outlives the
    /// test waiting on its pipe (whose write end its siblings inherited).
    fn drop(&mut self) {
        if !self.reaped {
            // SAFETY: kills and reaps our own child; closes our own descriptor.
            unsafe {
                libc::kill(self.pid, libc::SIGKILL);
                libc::waitpid(self.pid, std::ptr::null_mut(), 0);
                libc::close(self.go);
            }
        }
    }
}

fn fork_child(touch: impl FnOnce()) -> Child {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe writes.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: fork; the child below only reads a pipe, runs `touch` (loads, no allocation or
    // lock) and calls _exit, all safe after fork in a multi-threaded process.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let mut b = 0u8;
        // SAFETY: reads one byte into `b`; fds[0] is the pipe's read end.
        unsafe { libc::read(fds[0], (&mut b as *mut u8).cast(), 1) };
        touch();
        // SAFETY: ends the child without running the parent's atexit handlers or unwinding.
        unsafe { libc::_exit(0) };
    }
    // SAFETY: the parent's copy of the read end is not used.
    unsafe { libc::close(fds[0]) };
    Child {
        pid,
        go: fds[1],
        reaped: false,
    }
}

impl Child {
    /// Lets the child touch, and returns how it ended: `Ok(exit code)` or `Err(signal)`.
    fn run(mut self) -> Result<i32, i32> {
        let b = 1u8;
        // SAFETY: writes one byte from `b` to the pipe's write end.
        unsafe { libc::write(self.go, (&b as *const u8).cast(), 1) };
        let end = Instant::now() + Duration::from_secs(30);
        let mut status = 0;
        loop {
            // SAFETY: waits for our own child; `status` is a valid int.
            let rc = unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) };
            if rc == self.pid {
                self.reaped = true;
                break;
            }
            // (Dropping `self` kills the child.)
            assert!(
                Instant::now() < end,
                "the child still runs after 30 s: it waits on a fault nobody serves"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        // SAFETY: closes our own descriptor (the child is gone).
        unsafe { libc::close(self.go) };
        if libc::WIFSIGNALED(status) {
            Err(libc::WTERMSIG(status))
        } else {
            Ok(libc::WEXITSTATUS(status))
        }
    }
}

/// Loads the word at `p` (the child's touch).
fn load(p: *const u64) {
    // SAFETY: in the parent, `p` is a word of a live pointer range; in the child the address
    // is not mapped (MADV_DONTFORK) and the load is expected to end it with SIGSEGV.
    let v = unsafe { std::ptr::read_volatile(p) };
    std::hint::black_box(v);
}

#[test]
fn a_child_gets_sigsegv_on_the_range_and_the_parent_keeps_it() {
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
    let space = PointerSpace::new(mm.clone(), mem.clone(), UffdConfig::default()).unwrap();
    let pages = 8u64;
    let pr = match space.create_range(pages * 4096, PageSize::Size4K) {
        Ok(r) => r,
        Err(e @ (UffdError::Unavailable { .. } | UffdError::MissingFeature { .. })) => {
            println!("skipped: {e}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let word = |p: u64| pr.word(p * 512).unwrap();
    for p in 0..pages {
        word(p).store(100 + p, Ordering::Relaxed);
    }
    // Pages 4.. live on the device; 0..4 are system pages mapped in the range.
    let upper = VaRange::new(pr.range().start + 4 * 4096, 4 * 4096);
    mm.migrate(upper, PagemapId(0), &MigrateDetails::default())
        .unwrap();
    assert_eq!(mm.location(pr.range().start).unwrap(), PageLocation::System);
    let base = pr.as_ptr() as usize;
    // A child touching a mapped system page, one touching a device page, one reading the
    // pool through the engine's memory.
    let system = fork_child(move || load(base as *const u64));
    let device = fork_child(move || load((base + 5 * 4096) as *const u64));
    let pool = {
        let mem = mem.clone();
        fork_child(move || {
            let mut b = [0u8; 8];
            mem.read(0, &mut b);
        })
    };
    // While the children live, the parent's range works: stores, a migration of all of it,
    // loads that fault every page home.
    for p in 0..pages {
        word(p).store(200 + p, Ordering::Relaxed);
    }
    mm.migrate(pr.range(), PagemapId(0), &MigrateDetails::default())
        .unwrap();
    for p in 0..pages {
        assert_eq!(word(p).load(Ordering::Relaxed), 200 + p);
    }
    for (what, child) in [("system", system), ("device", device), ("pool", pool)] {
        assert_eq!(
            child.run(),
            Err(SIGSEGV),
            "a child touching a {what} page must end with SIGSEGV"
        );
    }
    // And after the children are gone.
    mm.migrate(upper, PagemapId(0), &MigrateDetails::default())
        .unwrap();
    for p in 0..pages {
        assert_eq!(word(p).load(Ordering::Relaxed), 200 + p);
    }
    let mut b = [0u8; 8];
    mm.read(pr.range().start + 7 * 4096, &mut b).unwrap();
    assert_eq!(u64::from_le_bytes(b), 207);
    let stats = space.fault_stats();
    assert_eq!((stats.errors, stats.sigbus), (0, 0), "{stats:?}");
}
