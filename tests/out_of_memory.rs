//! Issue 11, D5: when the engine cannot allocate memory for a range's page table (its
//! directory at `create_range`, a chunk of entries when pages are first written), the call
//! fails with a typed `Error::OutOfMemory` and changes nothing; the process does not abort.
//!
//! A global allocator refuses, on the test's own thread only, every request of at least a
//! set size (other threads, such as the sim's copy engines, are not affected).

use drm_pagemap::sim::{SimBackend, SimConfig};
use drm_pagemap::{
    AddressSpace, Backend, Error, MigrateDetails, PageLocation, PageSize, PagemapId, VaRange,
};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

thread_local! {
    /// Requests of this many bytes or more fail on this thread.
    static LIMIT: Cell<usize> = const { Cell::new(usize::MAX) };
}

fn limit() -> usize {
    LIMIT.try_with(Cell::get).unwrap_or(usize::MAX)
}

/// The system allocator, refusing large requests where a test asked for it.
struct Refusing;

// SAFETY: every request is forwarded to `System` unchanged or refused with a null pointer
// (which `GlobalAlloc` allows); memory is always returned to `System`, which allocated it.
unsafe impl GlobalAlloc for Refusing {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() >= limit() {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller upholds `alloc`'s contract, which is `System`'s.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() >= limit() {
            return std::ptr::null_mut();
        }
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` with `layout` (every allocation here does).
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size >= limit() {
            return std::ptr::null_mut();
        }
        // SAFETY: `ptr` came from `System` with `layout`; the caller upholds the rest.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Refusing = Refusing;

/// Runs `f` with requests of `bytes` or more refused on this thread.
fn refusing<T>(bytes: usize, f: impl FnOnce() -> T) -> T {
    LIMIT.with(|l| l.set(bytes));
    let r = f();
    LIMIT.with(|l| l.set(usize::MAX));
    r
}

const PS: u64 = 4096;

fn machine() -> (SimBackend, AddressSpace) {
    let sim = SimBackend::new(SimConfig {
        devices: 1,
        device_capacity: 64 << 20,
        host_capacity: 64 << 20,
        ..SimConfig::default()
    })
    .unwrap();
    let mm = AddressSpace::new(sim.host_memory());
    for pm in sim.pagemap_per_device().unwrap() {
        mm.add_pagemap(pm).unwrap();
    }
    (sim, mm)
}

#[test]
fn a_page_table_directory_that_cannot_be_allocated_is_a_typed_error() {
    let (_sim, mm) = machine();
    // u32::MAX pages: a directory of 2^18 chunk pointers (4 MiB).
    let range = VaRange::new(1 << 44, u32::MAX as u64 * PS);
    let e = refusing(1 << 20, || mm.create_range(range, PageSize::Size4K)).unwrap_err();
    assert!(
        matches!(e, Error::OutOfMemory { range: r, bytes, .. } if r == range && bytes >= 1 << 20),
        "{e:?}"
    );
    assert!(e.is_transient() && !e.is_busy(), "{e}");
    assert!(e.to_string().contains("out of memory"), "{e}");
    assert!(mm.ranges().is_empty(), "nothing was created");
    // With the memory there, the same call succeeds.
    mm.create_range(range, PageSize::Size4K).unwrap();
    mm.free_range(range.start).unwrap();
}

#[test]
fn a_page_table_chunk_that_cannot_be_allocated_is_a_typed_error() {
    let (_sim, mm) = machine();
    // Chunks of 2^14 entries (128 KiB) are allocated as pages are first written.
    let range = VaRange::new(1 << 40, (1 << 20) * PS);
    mm.create_range(range, PageSize::Size4K).unwrap();
    let page = |i: u64| range.start + i * PS;
    mm.write(page(0), &[1; 16]).unwrap();
    let far = 5 << 14;
    let refuse = 64 << 10;
    // A CPU write to a page of a chunk never written.
    let e = refusing(refuse, || mm.write(page(far), &[2; 16])).unwrap_err();
    assert!(matches!(e, Error::OutOfMemory { .. }), "{e:?}");
    assert_eq!(mm.location(page(far)).unwrap(), PageLocation::Unpopulated);
    // A migration of pages there: refused before any page is locked or memory allocated.
    let span = VaRange::new(page(far), 4 * PS);
    let e = refusing(refuse, || {
        mm.migrate(span, PagemapId(0), &MigrateDetails::default())
    })
    .unwrap_err();
    assert!(matches!(e, Error::OutOfMemory { .. }), "{e:?}");
    assert!(mm.allocations().is_empty(), "no destination was allocated");
    // A write where the chunk exists needs no new chunk.
    refusing(refuse, || mm.write(page(7), &[3; 16])).unwrap();
    // Nothing is left locked: with memory, both go through.
    mm.write(page(far), &[2; 16]).unwrap();
    mm.migrate(span, PagemapId(0), &MigrateDetails::default())
        .unwrap();
    let mut buf = [0u8; 16];
    mm.read(page(far), &mut buf).unwrap();
    assert_eq!(buf, [2; 16]);
    mm.read(page(0), &mut buf).unwrap();
    assert_eq!(buf, [1; 16]);
    mm.read(page(7), &mut buf).unwrap();
    assert_eq!(buf, [3; 16]);
    mm.free_range(range.start).unwrap();
}
