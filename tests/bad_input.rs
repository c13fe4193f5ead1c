//! Bad input: each case of the list gives a typed error, a message that names what is
//! wrong, and no state change (page layout and bytes unchanged, no allocation leaked, device
//! and host memory as before).
//!
//! Zero-length, unaligned, out-of-range and overlapping ranges, unknown pagemap, a
//! destination of another owner, a freed range, double free, page-size mismatch, an
//! allocation larger than the device, a fence that never signals (timeout) — plus a few
//! neighbours (overflowing ranges, stale allocation handles, absurd page counts) and, at the
//! end, extreme parameter values of every entry (module `extremes`).
//!
//! Every check that does not depend on one backend runs on every backend of
//! `common::backends()` (sim, level-zero on the software driver, the "hostmem" and "tier"
//! plug-ins, CUDA where there is a GPU), one after the other in each test; a failure names the
//! backend. "Nothing changed" is counted by the audit of tests/common (allocations, releases,
//! bytes allocated per pagemap, host frames in use) on every backend, and on sim also by its
//! own statistics and host arena. Checks of sim's own configuration and of backend-independent
//! building blocks are labelled sim-only.

mod common;

use drm_pagemap::sim::{SimBackend, SimConfig};
use drm_pagemap::{
    AddressSpace, AllocId, AllocState, Backend, BackendError, BusyReason, Error, FenceError,
    MigrateDetails, PageLocation, PageSize, PagemapId, RangeProblem, VaRange,
};
use drm_pagemap_testkit::inject::{FaultInjector, FaultSite};
use drm_pagemap_testkit::layout;
use std::sync::Arc;
use std::time::Duration;

const PS: u64 = 4096;
const BASE: u64 = 1 << 30;
/// A second range, 64 KiB pages.
const BIG: u64 = 2 << 30;
const CAPACITY: u64 = 1 << 20;
const HOST_CAPACITY: u64 = 16 << 20;

/// Device 0, 1: one owner; device 2: another owner. Faults injected inside the audit of
/// tests/common (which counts allocations, releases and host frames on any backend).
struct Rig {
    /// The backend's name.
    name: &'static str,
    rig: common::Rig,
    mm: Arc<AddressSpace>,
    inj: Arc<FaultInjector>,
}

/// Everything observable that bad input must not change.
#[derive(Debug, PartialEq)]
struct State {
    ranges: Vec<(VaRange, PageSize)>,
    layouts: Vec<String>,
    locations: Vec<Vec<PageLocation>>,
    bytes: Vec<Vec<u8>>,
    allocations: Vec<AllocId>,
    /// Bytes of device memory allocated, per pagemap (the audit; on sim also its own count).
    used: Vec<u64>,
    /// Allocations minus releases, per pagemap: a refused request may allocate and release
    /// internally, but must leave nothing behind.
    balance: Vec<u64>,
    /// Host granules in use (the audit; on sim also its arena's free granules).
    host_used: u64,
    host_free: Option<u64>,
    deferred: usize,
}

/// Runs `f` on every backend of `common::backends()`, naming the backend if it panics.
fn on_every_backend(f: impl Fn(&'static str)) {
    for b in common::backends() {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(b)));
        if let Err(p) = r {
            eprintln!("failed on backend {b}");
            std::panic::resume_unwind(p);
        }
    }
}

impl Rig {
    /// Range A at BASE: 8 pages `ss00s1s.`-like content; range B at BIG: 2 pages of 64 KiB
    /// on device 2 (another owner).
    fn on(name: &'static str) -> Rig {
        let inj = FaultInjector::new();
        let opts = common::Options::on(name)
            .foreign(2)
            .faults(&inj)
            .device_capacity(CAPACITY)
            .host_capacity(HOST_CAPACITY);
        let rig = common::machine(3, &opts);
        let mm = rig.mm.clone();
        mm.create_range(VaRange::new(BASE, 8 * PS), PageSize::Size4K)
            .unwrap();
        for i in 0..7 {
            mm.write(BASE + i * PS + 7, &[i as u8 + 1; 100]).unwrap();
        }
        let d = MigrateDetails::default();
        mm.migrate(VaRange::new(BASE + 2 * PS, 2 * PS), PagemapId(0), &d)
            .unwrap();
        mm.migrate(VaRange::new(BASE + 5 * PS, PS), PagemapId(1), &d)
            .unwrap();
        mm.create_range(VaRange::new(BIG, 2 << 16), PageSize::Size64K)
            .unwrap();
        mm.write(BIG + 3, b"other owner").unwrap();
        mm.migrate(VaRange::new(BIG, 2 << 16), PagemapId(2), &d)
            .unwrap();
        let rig = Rig { name, rig, mm, inj };
        assert_eq!(rig.layout(BASE, 8), "ss00s1s.", "{name}");
        rig
    }

    /// The backend.
    fn backend(&self) -> &Arc<dyn Backend> {
        &self.rig.backend
    }

    /// Bytes allocated on pagemap `k` now (the audit).
    fn used(&self, k: u8) -> u64 {
        self.rig.audit.used_bytes(k)
    }

    /// Waits (at most a minute) until no migration is parked behind a copy that outlived
    /// its fence timeout: their releases run on the fence worker.
    fn drain_deferred(&self, backend: &str) {
        let t = std::time::Instant::now();
        while self.mm.deferred_cleanups() > 0 {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "{backend}: parked for ever"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Allocations minus releases on pagemap `k` (the audit).
    fn balance(&self, k: u8) -> u64 {
        self.rig.audit.balance(k)
    }

    fn layout(&self, start: u64, pages: u64) -> String {
        layout::format(&layout::of(&self.mm, VaRange::new(start, pages * PS)).unwrap())
    }

    /// Reads without disturbing: locations are captured before, and a read faults device
    /// pages home, so bytes are compared through a twin rig where needed. Here: bytes of
    /// system pages only, read directly; device pages are checked by location + a final
    /// read-back in each test.
    fn state(&self) -> State {
        let ranges = self.mm.ranges();
        let mut layouts = Vec::new();
        let mut locations = Vec::new();
        let mut bytes = Vec::new();
        for &(r, _) in &ranges {
            let locs = self.mm.locations(r).unwrap();
            layouts.push(layout::format(&layout::of(&self.mm, r).unwrap()));
            let ps = r.len / locs.len() as u64;
            let mut b = Vec::new();
            for (i, l) in locs.iter().enumerate() {
                if *l == PageLocation::System {
                    let mut page = vec![0u8; ps as usize];
                    self.mm.read(r.start + i as u64 * ps, &mut page).unwrap();
                    b.extend(page);
                }
            }
            locations.push(locs);
            bytes.push(b);
        }
        let st = State {
            ranges,
            layouts,
            locations,
            bytes,
            allocations: self.mm.allocations().iter().map(|a| a.id).collect(),
            used: (0..3).map(|k| self.used(k)).collect(),
            balance: (0..3).map(|k| self.balance(k)).collect(),
            host_used: self.rig.audit.host_granules(),
            host_free: self
                .rig
                .sim
                .as_ref()
                .map(|s| s.arena_host().free_granules()),
            deferred: self.mm.deferred_cleanups(),
        };
        if let Some(sim) = &self.rig.sim {
            // Sim-only: its own counters agree with the audit's.
            for k in 0..3u8 {
                let s = sim.stats(PagemapId(k)).unwrap();
                assert_eq!(
                    (s.used_bytes, s.allocations - s.releases),
                    (st.used[k as usize], st.balance[k as usize]),
                    "sim pagemap {k}: its counters and the audit's"
                );
            }
        }
        st
    }

    /// Reads range A whole (faulting everything home) and checks the content written by
    /// `new`.
    fn check_bytes(&self) {
        let mut b = vec![0u8; 8 * PS as usize];
        self.mm.read(BASE, &mut b).unwrap();
        for i in 0..8usize {
            let page = &b[i * PS as usize..(i + 1) * PS as usize];
            for (j, &x) in page.iter().enumerate() {
                let want = if i < 7 && (7..107).contains(&j) {
                    i as u8 + 1
                } else {
                    0
                };
                assert_eq!(x, want, "page {i} byte {j}");
            }
        }
        let mut o = [0u8; 11];
        self.mm.read(BIG + 3, &mut o).unwrap();
        assert_eq!(&o, b"other owner");
    }
}

/// Runs `bad` and checks: it failed, `check` accepts the error, the message contains every
/// word of `names`, and nothing observable changed.
fn refuse<T: std::fmt::Debug>(
    rig: &Rig,
    what: &str,
    bad: impl FnOnce(&AddressSpace) -> Result<T, Error>,
    check: impl FnOnce(&Error) -> bool,
    names: &[&str],
) {
    let before = rig.state();
    let r = bad(&rig.mm);
    let b = rig.name;
    let err = match r {
        Ok(v) => panic!("{b}: {what}: accepted ({v:?})"),
        Err(e) => e,
    };
    assert!(check(&err), "{b}: {what}: wrong error {err:?}");
    let msg = err.to_string();
    for n in names {
        assert!(
            msg.contains(n),
            "{b}: {what}: message {msg:?} does not name {n:?}"
        );
    }
    assert_eq!(rig.state(), before, "{b}: {what}: state changed");
}

fn range_problem(p: RangeProblem) -> impl Fn(&Error) -> bool {
    move |e| matches!(e, Error::BadRange { problem, .. } if *problem == p)
}

#[test]
fn zero_length_ranges() {
    on_every_backend(zero_length_ranges_on);
}

fn zero_length_ranges_on(b: &'static str) {
    let rig = Rig::on(b);
    let d = MigrateDetails::default();
    let empty = VaRange::new(BASE, 0);
    let names = ["[0x40000000, 0x40000000)", "is empty"];
    refuse(
        &rig,
        "create",
        |mm| mm.create_range(VaRange::new(3 << 30, 0), PageSize::Size4K),
        range_problem(RangeProblem::Empty),
        &["is empty"],
    );
    refuse(
        &rig,
        "migrate",
        |mm| mm.migrate(empty, PagemapId(1), &d),
        range_problem(RangeProblem::Empty),
        &names,
    );
    // Zero-length CPU accesses are no-ops (see `extremes::zero_length_cpu_accesses_*`).
    let before = rig.state();
    rig.mm.read(BASE, &mut []).unwrap();
    rig.mm.write(BASE, &[]).unwrap();
    assert_eq!(rig.state(), before);
    refuse(
        &rig,
        "locations",
        |mm| mm.locations(empty),
        range_problem(RangeProblem::Empty),
        &names,
    );
    refuse(
        &rig,
        "allocate 0 pages",
        |mm| mm.allocate_devmem(PagemapId(0), 0, PageSize::Size4K, empty),
        range_problem(RangeProblem::Empty),
        &names,
    );
    rig.check_bytes();
}

#[test]
fn unaligned_ranges() {
    on_every_backend(unaligned_ranges_on);
}

fn unaligned_ranges_on(b: &'static str) {
    let rig = Rig::on(b);
    let d = MigrateDetails::default();
    refuse(
        &rig,
        "create start",
        |mm| mm.create_range(VaRange::new((3 << 30) + 512, PS), PageSize::Size4K),
        range_problem(RangeProblem::Unaligned),
        &["0xc0000200", "not aligned"],
    );
    refuse(
        &rig,
        "create length",
        |mm| mm.create_range(VaRange::new(3 << 30, PS + 1), PageSize::Size4K),
        range_problem(RangeProblem::Unaligned),
        &["not aligned"],
    );
    refuse(
        &rig,
        "create 64K on 4K",
        |mm| mm.create_range(VaRange::new((3 << 30) + PS, 1 << 16), PageSize::Size64K),
        range_problem(RangeProblem::Unaligned),
        &["not aligned"],
    );
    refuse(
        &rig,
        "migrate start",
        |mm| mm.migrate(VaRange::new(BASE + 1, PS), PagemapId(1), &d),
        range_problem(RangeProblem::Unaligned),
        &["0x40000001", "not aligned"],
    );
    refuse(
        &rig,
        "migrate length",
        |mm| mm.migrate(VaRange::new(BASE, PS + 8), PagemapId(1), &d),
        range_problem(RangeProblem::Unaligned),
        &["not aligned"],
    );
    refuse(
        &rig,
        "migrate 4K inside 64K pages",
        |mm| mm.migrate(VaRange::new(BIG, PS), PagemapId(2), &d),
        range_problem(RangeProblem::Unaligned),
        &["0x80000000", "not aligned"],
    );
    refuse(
        &rig,
        "layout",
        |mm| layout::of(mm, VaRange::new(BASE + 16, PS)),
        range_problem(RangeProblem::Unaligned),
        &["not aligned"],
    );
    rig.check_bytes();
}

#[test]
fn out_of_range_and_overflowing_ranges() {
    on_every_backend(out_of_range_and_overflowing_ranges_on);
}

fn out_of_range_and_overflowing_ranges_on(b: &'static str) {
    let rig = Rig::on(b);
    let d = MigrateDetails::default();
    let past = VaRange::new(BASE + 6 * PS, 4 * PS);
    refuse(
        &rig,
        "migrate past the end",
        |mm| mm.migrate(past, PagemapId(1), &d),
        range_problem(RangeProblem::OutOfRange),
        &["0x40006000", "runs past the end"],
    );
    refuse(
        &rig,
        "read past the end",
        |mm| mm.read(BASE + 8 * PS - 2, &mut [0u8; 4]),
        range_problem(RangeProblem::OutOfRange),
        &["runs past the end"],
    );
    refuse(
        &rig,
        "write past the end",
        |mm| mm.write(BASE + 8 * PS - 2, &[1u8; 4]),
        range_problem(RangeProblem::OutOfRange),
        &["runs past the end"],
    );
    refuse(
        &rig,
        "migrate below every range",
        |mm| mm.migrate(VaRange::new(PS, PS), PagemapId(1), &d),
        range_problem(RangeProblem::NotMapped),
        &["not mapped"],
    );
    refuse(
        &rig,
        "migrate between ranges",
        |mm| mm.migrate(VaRange::new(BASE + (1 << 20), PS), PagemapId(1), &d),
        range_problem(RangeProblem::NotMapped),
        &["not mapped"],
    );
    refuse(
        &rig,
        "create wrapping",
        |mm| mm.create_range(VaRange::new(u64::MAX - PS + 1, 2 * PS), PageSize::Size4K),
        range_problem(RangeProblem::Overflow),
        &["wraps around"],
    );
    refuse(
        &rig,
        "migrate wrapping",
        |mm| mm.migrate(VaRange::new(u64::MAX - PS + 1, 2 * PS), PagemapId(0), &d),
        range_problem(RangeProblem::Overflow),
        &["wraps around"],
    );
    refuse(
        &rig,
        "read wrapping",
        |mm| mm.read(u64::MAX, &mut [0u8; 2]),
        range_problem(RangeProblem::Overflow),
        &["wraps around"],
    );
    rig.check_bytes();
}

#[test]
fn overlapping_ranges() {
    on_every_backend(overlapping_ranges_on);
}

fn overlapping_ranges_on(b: &'static str) {
    let rig = Rig::on(b);
    for (what, r) in [
        ("same start", VaRange::new(BASE, PS)),
        ("inside", VaRange::new(BASE + 2 * PS, PS)),
        ("over the end", VaRange::new(BASE + 7 * PS, 4 * PS)),
        ("over the start", VaRange::new(BASE - 2 * PS, 4 * PS)),
        ("around", VaRange::new(BASE - 4 * PS, 64 * PS)),
    ] {
        refuse(
            &rig,
            what,
            |mm| mm.create_range(r, PageSize::Size4K),
            range_problem(RangeProblem::Overlapping),
            &["overlaps an existing range"],
        );
    }
    rig.check_bytes();
}

#[test]
fn unknown_pagemap() {
    on_every_backend(unknown_pagemap_on);
}

fn unknown_pagemap_on(b: &'static str) {
    let rig = Rig::on(b);
    let d = MigrateDetails::default();
    let r = VaRange::new(BASE, 2 * PS);
    let unknown = |e: &Error| {
        matches!(
            e,
            Error::UnknownPagemap {
                pagemap: PagemapId(9),
                ..
            }
        )
    };
    refuse(
        &rig,
        "migrate",
        |mm| mm.migrate(r, PagemapId(9), &d),
        unknown,
        &["unknown pagemap 9", "0x40000000"],
    );
    refuse(
        &rig,
        "allocate",
        |mm| mm.allocate_devmem(PagemapId(9), 1, PageSize::Size4K, r),
        unknown,
        &["unknown pagemap 9"],
    );
    // A pagemap id that is taken already.
    let again = rig.backend().create_pagemap(&drm_pagemap::PagemapSpec {
        id: PagemapId(1),
        device: drm_pagemap::DeviceId(1),
        owner: None,
        capacity_bytes: 1 << 20,
    });
    refuse(
        &rig,
        "add a pagemap twice",
        |mm| mm.add_pagemap(again.unwrap()),
        |e| {
            matches!(
                e,
                Error::BadPagemap {
                    pagemap: PagemapId(1),
                    ..
                }
            )
        },
        &["pagemap 1", "exists already"],
    );
    rig.check_bytes();
}

#[test]
fn destination_of_another_owner() {
    on_every_backend(destination_of_another_owner_on);
}

fn destination_of_another_owner_on(b: &'static str) {
    let rig = Rig::on(b);
    let d = MigrateDetails::default();
    let foreign = |e: &Error| {
        matches!(
            e,
            Error::Busy {
                reason: BusyReason::ForeignOwner,
                ..
            }
        )
    };
    // Pages of devices 0 and 1 to device 2 (another owner).
    refuse(
        &rig,
        "to another owner",
        |mm| mm.migrate(VaRange::new(BASE, 8 * PS), PagemapId(2), &d),
        foreign,
        &["pagemap 2", "device 2", "another owner"],
    );
    // Pages of device 2 to device 0.
    refuse(
        &rig,
        "from another owner",
        |mm| mm.migrate(VaRange::new(BIG, 2 << 16), PagemapId(0), &d),
        foreign,
        &["pagemap 0", "another owner"],
    );
    // Explicit reservation: the reservation is consumed, nothing else changes.
    let before = rig.state();
    let id = rig
        .mm
        .allocate_devmem(
            PagemapId(2),
            8,
            PageSize::Size4K,
            VaRange::new(BASE, 8 * PS),
        )
        .unwrap();
    let e = rig
        .mm
        .migrate_to_devmem(id, VaRange::new(BASE, 8 * PS), &d)
        .unwrap_err();
    assert!(foreign(&e), "{e:?}");
    assert!(
        rig.mm.allocation(id).is_none(),
        "the reservation was not released"
    );
    assert_eq!(rig.state(), before);
    assert_eq!(
        rig.balance(2),
        1,
        "{b}: only the live allocation of range B remains"
    );
    rig.check_bytes();
}

#[test]
fn freed_range_and_double_free() {
    on_every_backend(freed_range_and_double_free_on);
}

fn freed_range_and_double_free_on(b: &'static str) {
    let rig = Rig::on(b);
    let d = MigrateDetails::default();
    let r = VaRange::new(3 << 30, 4 * PS);
    rig.mm.create_range(r, PageSize::Size4K).unwrap();
    rig.mm.write(r.start, b"gone").unwrap();
    rig.mm.migrate(r, PagemapId(1), &d).unwrap();
    rig.mm.free_range(r.start).unwrap();
    let names = ["0xc0000000", "not mapped"];
    let nm = range_problem(RangeProblem::NotMapped);
    refuse(&rig, "double free", |mm| mm.free_range(r.start), nm, &names);
    refuse(
        &rig,
        "read freed",
        |mm| mm.read(r.start, &mut [0u8; 4]),
        range_problem(RangeProblem::NotMapped),
        &names,
    );
    refuse(
        &rig,
        "write freed",
        |mm| mm.write(r.start, b"x"),
        range_problem(RangeProblem::NotMapped),
        &names,
    );
    refuse(
        &rig,
        "migrate freed",
        |mm| mm.migrate(r, PagemapId(0), &d),
        range_problem(RangeProblem::NotMapped),
        &names,
    );
    refuse(
        &rig,
        "locations of freed",
        |mm| mm.locations(r),
        range_problem(RangeProblem::NotMapped),
        &names,
    );
    refuse(
        &rig,
        "free inside a range",
        |mm| mm.free_range(BASE + PS),
        range_problem(RangeProblem::NotStart { address: BASE + PS }),
        &[
            "0x40001000",
            "[0x40000000, 0x40008000)",
            "does not start there",
        ],
    );
    // The freed range's allocation went with it; a stale handle to it is refused.
    assert_eq!(
        rig.used(1),
        PS,
        "{b}: only range A's page remains on device 1"
    );
    rig.check_bytes();
}

#[test]
fn stale_and_foreign_allocation_handles() {
    on_every_backend(stale_and_foreign_allocation_handles_on);
}

fn stale_and_foreign_allocation_handles_on(b: &'static str) {
    let rig = Rig::on(b);
    let d = MigrateDetails::default();
    let PageLocation::Device { alloc, .. } = rig.mm.location(BASE + 5 * PS).unwrap() else {
        panic!()
    };
    rig.mm.evict_to_ram(alloc).unwrap();
    let stale = |e: &Error| matches!(e, Error::NoSuchAllocation { .. });
    refuse(
        &rig,
        "evict stale",
        |mm| mm.evict_to_ram(alloc),
        stale,
        &[&alloc.to_string(), "does not exist"],
    );
    refuse(
        &rig,
        "release stale",
        |mm| mm.release_devmem(alloc),
        stale,
        &["does not exist"],
    );
    refuse(
        &rig,
        "migrate into stale",
        |mm| mm.migrate_to_devmem(alloc, VaRange::new(BASE + 5 * PS, PS), &d),
        stale,
        &["does not exist"],
    );
    // A live allocation (not a reservation) cannot be migrated into again.
    let PageLocation::Device { alloc: live, .. } = rig.mm.location(BASE + 2 * PS).unwrap() else {
        panic!()
    };
    refuse(
        &rig,
        "migrate into a live allocation",
        |mm| mm.migrate_to_devmem(live, VaRange::new(BASE + 6 * PS, PS), &d),
        |e| {
            matches!(e, Error::AllocationNotReserved { alloc, state: AllocState::Live, .. }
                if *alloc == live)
        },
        &[&live.to_string(), "not reserved"],
    );
    rig.check_bytes();
}

#[test]
fn page_size_mismatch() {
    on_every_backend(page_size_mismatch_on);
}

fn page_size_mismatch_on(b: &'static str) {
    let rig = Rig::on(b);
    let d = MigrateDetails::default();
    let before = rig.state();
    let r = VaRange::new(BASE + 6 * PS, PS);
    let id = rig
        .mm
        .allocate_devmem(PagemapId(1), 1, PageSize::Size64K, r)
        .unwrap();
    let e = rig.mm.migrate_to_devmem(id, r, &d).unwrap_err();
    assert!(
        matches!(
            e,
            Error::PageSizeMismatch {
                expected: PageSize::Size4K,
                given: PageSize::Size64K,
                ..
            }
        ),
        "{e:?}"
    );
    let msg = e.to_string();
    for n in ["0x40006000", "page size 64 KiB", "4 KiB"] {
        assert!(msg.contains(n), "{msg:?} does not name {n:?}");
    }
    // The reservation is consumed (released exactly once), nothing else changed.
    assert!(rig.mm.allocation(id).is_none());
    let released = rig.mm.released_allocations();
    assert_eq!(rig.state(), before);
    assert_eq!(
        rig.balance(1),
        1,
        "{b}: only range A's page remains on device 1"
    );
    assert!(released > 0);
    // A page count that does not match the range is refused the same way.
    let id = rig
        .mm
        .allocate_devmem(PagemapId(1), 3, PageSize::Size4K, r)
        .unwrap();
    let e = rig.mm.migrate_to_devmem(id, r, &d).unwrap_err();
    assert!(
        matches!(
            e,
            Error::BadRange {
                problem: RangeProblem::OutOfRange,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(rig.mm.allocation(id).is_none());
    assert_eq!(rig.state().used, before.used);
    rig.check_bytes();
}

#[test]
fn allocation_larger_than_the_device() {
    on_every_backend(allocation_larger_than_the_device_on);
}

fn allocation_larger_than_the_device_on(b: &'static str) {
    let rig = Rig::on(b);
    let d = MigrateDetails::default();
    let huge = VaRange::new(4 << 30, 2 * CAPACITY);
    rig.mm.create_range(huge, PageSize::Size4K).unwrap();
    rig.mm.write(huge.start + 5, b"big").unwrap();
    let too_large = |e: &Error| matches!(e, Error::TooLarge { .. });
    refuse(
        &rig,
        "migrate",
        |mm| mm.migrate(huge, PagemapId(1), &d),
        too_large,
        &[
            "0x100000000",
            "2097152 bytes",
            "pagemap 1",
            "device 1",
            "capacity 1048576",
        ],
    );
    refuse(
        &rig,
        "allocate",
        |mm| mm.allocate_devmem(PagemapId(0), 257, PageSize::Size4K, huge),
        too_large,
        &["1052672 bytes", "capacity 1048576"],
    );
    // Absurd page counts: a typed error, never an arithmetic overflow.
    for (n, ps) in [
        (usize::MAX, PageSize::Size2M),
        (usize::MAX / 2, PageSize::Size64K),
        (1 << 43, PageSize::Size2M),
    ] {
        refuse(
            &rig,
            "allocate an absurd count",
            |mm| mm.allocate_devmem(PagemapId(0), n, ps, huge),
            too_large,
            &["pagemap 0", "capacity"],
        );
    }
    // Fits in bytes but not in free memory: the device's own out-of-memory, nothing changed.
    let half = VaRange::new(huge.start, CAPACITY);
    refuse(
        &rig,
        "out of device memory",
        |mm| mm.migrate(half, PagemapId(0), &d),
        |e| {
            matches!(
                e,
                Error::Backend {
                    op: drm_pagemap::BackendOp::Allocate,
                    ..
                }
            )
        },
        &["allocate", "pagemap 0", "out of memory"],
    );
    let mut b = [0u8; 3];
    rig.mm.read(huge.start + 5, &mut b).unwrap();
    assert_eq!(&b, b"big");
    rig.check_bytes();
}

#[test]
fn fence_that_never_signals_times_out() {
    on_every_backend(fence_that_never_signals_times_out_on);
}

fn fence_that_never_signals_times_out_on(b: &'static str) {
    let rig = Rig::on(b);
    let d = MigrateDetails {
        fence_timeout: Some(Duration::from_millis(50)),
        ..MigrateDetails::default()
    };
    let before = rig.state();
    // The first copy call of the next migration gets a fence that never signals.
    rig.inj.fail_nth(FaultSite::FenceHang, 1);
    let r = VaRange::new(BASE, 5 * PS);
    let e = rig.mm.migrate(r, PagemapId(1), &d).unwrap_err();
    rig.inj.disarm();
    assert!(
        matches!(&e, Error::Fence { what: drm_pagemap::FenceRole::Copy, source: FenceError::Timeout(t), .. } if *t == Duration::from_millis(50)),
        "{e:?}"
    );
    let msg = e.to_string();
    for n in ["0x40000000", "copy fence", "timed out"] {
        assert!(msg.contains(n), "{msg:?} does not name {n:?}");
    }
    // Every page is where it was, with its bytes. The destination is not released while a
    // copy may still write into it: it is parked as one deferred cleanup (with a fence that
    // never signals it stays parked; it is accounted for, not lost).
    let after = rig.state();
    assert_eq!(after.deferred, 1, "the destination is parked");
    assert_eq!(after.layouts, before.layouts);
    assert_eq!(after.locations, before.locations);
    assert_eq!(after.bytes, before.bytes);
    // The parked destination is listed, still migrating, on device 1; nothing else is new.
    let parked: Vec<_> = rig
        .mm
        .allocations()
        .into_iter()
        .filter(|a| !before.allocations.contains(&a.id))
        .collect();
    assert_eq!(parked.len(), 1, "{parked:?}");
    assert_eq!(
        (parked[0].pagemap, parked[0].state, parked[0].live_pages),
        (PagemapId(1), AllocState::Migrating, 0)
    );
    assert!(
        before
            .allocations
            .iter()
            .all(|a| after.allocations.contains(a))
    );
    assert_eq!(after.used[0], before.used[0]);
    assert_eq!(after.used[2], before.used[2]);
    assert_eq!(
        after.used[1],
        before.used[1] + 5 * PS,
        "device 1 keeps the parked destination"
    );
    // The engine still works: the same range migrates with fences that signal.
    rig.mm
        .migrate(r, PagemapId(1), &MigrateDetails::default())
        .unwrap();
    assert_eq!(rig.layout(BASE, 8), "1*6,s.");
    rig.check_bytes();
}

#[test]
fn a_fence_that_signals_late_is_cleaned_up() {
    on_every_backend(a_fence_that_signals_late_is_cleaned_up_on);
}

fn a_fence_that_signals_late_is_cleaned_up_on(b: &'static str) {
    // The copy's fence signals only after the wait gave up (the audit holds every copy fence
    // behind a gate the test opens: a fence that signals late, deterministically): the
    // migration fails with every page where it was, the destination stays parked while the
    // copy could still write, and is released (once) by the first engine call after the
    // fence signalled.
    let opts = common::Options::on(b).device_capacity(CAPACITY);
    let rig = common::machine(2, &opts);
    let mm = rig.mm.clone();
    let gate = common::Gate::new();
    rig.audit.hold_copies(Some(&gate));
    let r = VaRange::new(BASE, 2 * PS);
    mm.create_range(r, PageSize::Size4K).unwrap();
    mm.write(BASE, b"late").unwrap();
    let d = MigrateDetails {
        fence_timeout: Some(Duration::from_millis(10)),
        ..MigrateDetails::default()
    };
    let e = mm.migrate(r, PagemapId(0), &d).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Fence {
                what: drm_pagemap::FenceRole::Copy,
                source: FenceError::Timeout(_),
                ..
            }
        ),
        "{b}: {e:?}"
    );
    assert_eq!(layout::format(&layout::of(&mm, r).unwrap()), "s.");
    assert_eq!(
        mm.deferred_cleanups(),
        1,
        "{b}: the destination is parked while the gate is shut"
    );
    assert_eq!(rig.audit.used_bytes(0), 2 * PS, "{b}");
    if let Some(sim) = &rig.sim {
        // Sim-only: its own count.
        assert_eq!(sim.stats(PagemapId(0)).unwrap().used_bytes, 2 * PS);
    }
    gate.open();
    // The real copy fence may still be a moment behind the gate: wait (generously).
    let t = std::time::Instant::now();
    while mm.deferred_cleanups() > 0 {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "{b}: the late fence never got reaped"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(rig.audit.used_bytes(0), 0, "{b}");
    assert_eq!(rig.audit.allocs_since(0).len(), 1, "{b}");
    rig.audit.assert_all_released_once();
    if let Some(sim) = &rig.sim {
        let s = sim.stats(PagemapId(0)).unwrap();
        assert_eq!((s.used_bytes, s.allocations, s.releases), (0, 1, 1));
    }
    rig.audit.hold_copies(None);
    let mut buf = [0u8; 4];
    mm.read(BASE, &mut buf).unwrap();
    assert_eq!(&buf, b"late");
    mm.free_range(BASE).unwrap();
    assert!(mm.allocations().is_empty());
    assert_eq!(rig.audit.host_granules(), 0, "{b}: host frames left");
}

// =========================================================================================
// Extreme parameter values (issue 11, D8 and "Also seen").
//
// Every public entry that takes a size, a count, an address, a page count, a capacity or an
// id, tried with 0, 1, the type's maximum (u64::MAX, usize::MAX, u32::MAX + 1) and addresses
// near u64::MAX: each gives a typed error or succeeds meaningfully, nothing panics or aborts,
// and no page changes (layout, locations and bytes compared before and after, bytes read back
// at the end). Duration parameters are covered elsewhere. Page counts of up to u32::MAX pages
// in `create_range` belong to the large-range tests (their page table is D5's business).
// =========================================================================================

mod extremes {
    use super::*;
    use drm_pagemap::ExtentAllocator;
    use drm_pagemap::sim::{MAX_DEVICE_CAPACITY, MAX_HOST_CAPACITY};
    use drm_pagemap::{BackendConfig, BackendErrorKind, DeviceId, Machine, PagemapSpec};
    use drm_pagemap_testkit::mem::AtomicArena;
    use xe_svm::{Access, Attributes, PreferredLocation, Svm, SvmConfig, SvmError};

    /// The last page an address space can hold a range at (the one above it would end at
    /// 2^64, which a `VaRange` cannot express).
    const TOP: u64 = u64::MAX - 2 * PS + 1;

    /// Ranges no engine entry may accept, whatever the entry.
    fn absurd_ranges() -> Vec<VaRange> {
        vec![
            VaRange::new(0, 0),
            VaRange::new(0, 1),
            VaRange::new(0, u64::MAX),
            VaRange::new(1, PS),
            VaRange::new(u64::MAX, 0),
            VaRange::new(u64::MAX, 1),
            VaRange::new(u64::MAX, u64::MAX),
            VaRange::new(u64::MAX - PS + 1, PS),
            VaRange::new(TOP, PS),
            VaRange::new(BASE, 0),
            VaRange::new(BASE, u64::MAX),
            VaRange::new(BASE, u64::MAX - BASE),
            VaRange::new(BASE, 1 << 63),
            VaRange::new(BASE - PS, 2 * PS),
            VaRange::new(BASE + 7 * PS, 2 * PS),
            VaRange::new(BASE + 8 * PS, PS),
        ]
    }

    fn any_range_problem(e: &Error) -> bool {
        matches!(e, Error::BadRange { .. })
    }

    /// Runs `ok` and checks that it succeeded and that nothing observable changed.
    fn accept<T: std::fmt::Debug>(
        rig: &Rig,
        what: &str,
        ok: impl FnOnce(&AddressSpace) -> Result<T, Error>,
    ) -> T {
        let before = rig.state();
        let v = ok(&rig.mm).unwrap_or_else(|e| panic!("{what}: refused: {e}"));
        assert_eq!(rig.state(), before, "{what}: state changed");
        v
    }

    #[test]
    fn range_arguments_at_the_edges_of_the_address_space() {
        on_every_backend(range_arguments_at_the_edges_of_the_address_space_on);
    }

    fn range_arguments_at_the_edges_of_the_address_space_on(b: &'static str) {
        let rig = Rig::on(b);
        let d = MigrateDetails::default();
        for r in absurd_ranges() {
            let name = r.to_string();
            let names: &[&str] = &[&name];
            refuse(
                &rig,
                "migrate",
                |mm| mm.migrate(r, PagemapId(0), &d),
                any_range_problem,
                names,
            );
            refuse(
                &rig,
                "migrate_traced",
                |mm| mm.migrate_traced(r, PagemapId(1), &d, &mut Vec::new()),
                any_range_problem,
                names,
            );
            refuse(
                &rig,
                "plan",
                |mm| mm.plan(r, PagemapId(0), &d),
                any_range_problem,
                names,
            );
            refuse(
                &rig,
                "layout",
                |mm| layout::of(mm, r),
                any_range_problem,
                names,
            );
            refuse(
                &rig,
                "locations",
                |mm| mm.locations(r),
                any_range_problem,
                names,
            );
            refuse(
                &rig,
                "populate",
                |mm| mm.populate(r),
                any_range_problem,
                names,
            );
            refuse(
                &rig,
                "generation",
                |mm| mm.generation(r),
                any_range_problem,
                names,
            );
            refuse(
                &rig,
                "backing",
                |mm| mm.backing(r, &mut Vec::new()),
                any_range_problem,
                names,
            );
            refuse(
                &rig,
                "backing_with_generation",
                |mm| mm.backing_with_generation(r, &mut Vec::new()),
                any_range_problem,
                names,
            );
            // A reservation that fits, migrated into an absurd range: refused, consumed.
            let before = rig.state();
            let id = rig
                .mm
                .allocate_devmem(PagemapId(1), 1, PageSize::Size4K, r)
                .unwrap();
            let e = rig.mm.migrate_to_devmem(id, r, &d).unwrap_err();
            assert!(any_range_problem(&e), "migrate_to_devmem {r}: {e:?}");
            assert!(rig.mm.allocation(id).is_none(), "{r}: reservation kept");
            assert_eq!(rig.state(), before, "migrate_to_devmem {r}: state changed");
        }
        // create_range: the absurd ranges that are not wholly above range A's end overlap it
        // or are malformed; none is created.
        for r in [
            VaRange::new(0, 0),
            VaRange::new(0, 1),
            VaRange::new(0, u64::MAX),
            VaRange::new(0, u64::MAX - PS + 1),
            VaRange::new(1, PS),
            VaRange::new(u64::MAX, 0),
            VaRange::new(u64::MAX, 1),
            VaRange::new(u64::MAX, u64::MAX),
            VaRange::new(u64::MAX - PS + 1, PS),
            VaRange::new(BASE, u64::MAX),
            VaRange::new(BASE + 8 * PS, 1 << 63),
            VaRange::new(BASE + 8 * PS, (u32::MAX as u64 + 1) * PS),
            VaRange::new(0, 1 << 63),
        ] {
            let name = r.to_string();
            refuse(
                &rig,
                "create_range",
                |mm| mm.create_range(r, PageSize::Size4K),
                any_range_problem,
                &[&name],
            );
        }
        for ps in [PageSize::Size64K, PageSize::Size2M] {
            refuse(
                &rig,
                "create_range of more than u32::MAX large pages",
                |mm| {
                    mm.create_range(
                        VaRange::new(1 << 62, (u32::MAX as u64 + 1) * ps.bytes()),
                        ps,
                    )
                },
                range_problem(RangeProblem::Overflow),
                &["wraps around"],
            );
        }
        rig.check_bytes();
    }

    #[test]
    fn addresses_at_the_edges_of_the_address_space() {
        on_every_backend(addresses_at_the_edges_of_the_address_space_on);
    }

    fn addresses_at_the_edges_of_the_address_space_on(b: &'static str) {
        let rig = Rig::on(b);
        for va in [0, 1, BASE - 1, BASE + 8 * PS, u64::MAX - 1, u64::MAX] {
            refuse(
                &rig,
                "location",
                |mm| mm.location(va),
                any_range_problem,
                &[],
            );
            refuse(
                &rig,
                "read 1",
                |mm| mm.read(va, &mut [0u8]),
                any_range_problem,
                &[],
            );
            refuse(
                &rig,
                "read 2",
                |mm| mm.read(va, &mut [0u8; 2]),
                any_range_problem,
                &[],
            );
            refuse(
                &rig,
                "write 1",
                |mm| mm.write(va, &[1u8]),
                any_range_problem,
                &[],
            );
            refuse(
                &rig,
                "write 2",
                |mm| mm.write(va, &[1u8; 2]),
                any_range_problem,
                &[],
            );
            let name = format!("{va:#x}");
            refuse(
                &rig,
                "free_range",
                |mm| mm.free_range(va),
                range_problem(RangeProblem::NotMapped),
                &[&name, "not mapped"],
            );
        }
        // Accesses that start in range A and run past its end.
        for len in [2usize, PS as usize + 1, 64 << 10] {
            refuse(
                &rig,
                "read past the end",
                |mm| mm.read(BASE + 8 * PS - 1, &mut vec![0u8; len]),
                range_problem(RangeProblem::OutOfRange),
                &["runs past the end"],
            );
        }
        // An address inside range A is not its start: the message says which range holds it.
        for va in [BASE + 1, BASE + PS, BASE + 8 * PS - 1] {
            let name = format!("{va:#x}");
            refuse(
                &rig,
                "free_range inside a range",
                |mm| mm.free_range(va),
                |e| {
                    matches!(e, Error::BadRange { range, problem: RangeProblem::NotStart { address } }
                        if *address == va && *range == VaRange::new(BASE, 8 * PS))
                },
                &[&name, "[0x40000000, 0x40008000)", "does not start there"],
            );
        }
        rig.check_bytes();
    }

    #[test]
    fn zero_length_cpu_accesses_are_no_ops_anywhere() {
        on_every_backend(zero_length_cpu_accesses_are_no_ops_anywhere_on);
    }

    fn zero_length_cpu_accesses_are_no_ops_anywhere_on(b: &'static str) {
        // As `std::io` and `memcpy` have it: an access of no byte succeeds and does nothing,
        // whatever the address (it names no byte, so there is nothing to be mapped) and
        // wherever the pages are (device pages stay on their device: no CPU fault).
        let rig = Rig::on(b);
        for va in [
            0,
            1,
            BASE,
            BASE + 2 * PS,
            BASE + 5 * PS + 17,
            BASE + 8 * PS,
            BIG,
            3 << 30,
            u64::MAX - 1,
            u64::MAX,
        ] {
            accept(&rig, "read of 0 bytes", |mm| mm.read(va, &mut []));
            accept(&rig, "write of 0 bytes", |mm| mm.write(va, &[]));
        }
        assert_eq!(rig.layout(BASE, 8), "ss00s1s.");
        rig.check_bytes();
    }

    #[test]
    fn page_counts_of_device_memory_reservations() {
        on_every_backend(page_counts_of_device_memory_reservations_on);
    }

    fn page_counts_of_device_memory_reservations_on(b: &'static str) {
        let rig = Rig::on(b);
        let r = VaRange::new(BASE, 8 * PS);
        // 0 pages: an empty request, not "0 bytes do not fit".
        for ps in [PageSize::Size4K, PageSize::Size64K, PageSize::Size2M] {
            refuse(
                &rig,
                "allocate 0 pages",
                |mm| mm.allocate_devmem(PagemapId(0), 0, ps, r),
                range_problem(RangeProblem::Empty),
                &["[0x40000000, 0x40000000)", "is empty"],
            );
        }
        // 1 page: reserved, then released; nothing else changes. The range only names the
        // request, so even an absurd one is fine.
        for named in [r, VaRange::new(0, 0), VaRange::new(u64::MAX, u64::MAX)] {
            accept(&rig, "allocate 1 page", |mm| {
                let id = mm.allocate_devmem(PagemapId(1), 1, PageSize::Size4K, named)?;
                assert_eq!(mm.allocation(id).map(|a| a.npages), Some(1));
                mm.release_devmem(id)
            });
        }
        // Counts past the capacity, past u32::MAX and up to usize::MAX: too large.
        for ps in [PageSize::Size4K, PageSize::Size64K, PageSize::Size2M] {
            for n in [
                CAPACITY as usize / ps.bytes() as usize + 1,
                u32::MAX as usize,
                u32::MAX as usize + 1,
                usize::MAX / 2,
                usize::MAX,
            ] {
                refuse(
                    &rig,
                    "allocate too many pages",
                    |mm| mm.allocate_devmem(PagemapId(2), n, ps, r),
                    |e| matches!(e, Error::TooLarge { .. }),
                    &["pagemap 2", "device 2", "capacity 1048576"],
                );
            }
        }
        // Exactly the capacity, with pages of device 0 in use: the device's own "out of
        // memory", typed, nothing changed.
        refuse(
            &rig,
            "allocate the whole device",
            |mm| {
                mm.allocate_devmem(
                    PagemapId(0),
                    CAPACITY as usize / PS as usize,
                    PageSize::Size4K,
                    r,
                )
            },
            |e| {
                matches!(
                    e,
                    Error::Backend {
                        op: drm_pagemap::BackendOp::Allocate,
                        ..
                    }
                )
            },
            &["pagemap 0", "out of memory"],
        );
        rig.check_bytes();
    }

    #[test]
    fn pagemap_and_device_ids_at_their_limits() {
        on_every_backend(pagemap_and_device_ids_at_their_limits_on);
    }

    fn pagemap_and_device_ids_at_their_limits_on(b: &'static str) {
        let rig = Rig::on(b);
        let d = MigrateDetails::default();
        let r = VaRange::new(BASE, 2 * PS);
        for id in [3u8, 128, u8::MAX] {
            let unknown =
                |e: &Error| matches!(e, Error::UnknownPagemap { pagemap, .. } if pagemap.0 == id);
            let name = format!("unknown pagemap {id}");
            refuse(
                &rig,
                "migrate",
                |mm| mm.migrate(r, PagemapId(id), &d),
                unknown,
                &[&name],
            );
            refuse(
                &rig,
                "plan",
                |mm| mm.plan(r, PagemapId(id), &d),
                unknown,
                &[&name],
            );
            refuse(
                &rig,
                "allocate",
                |mm| mm.allocate_devmem(PagemapId(id), 1, PageSize::Size4K, r),
                unknown,
                &[&name],
            );
            assert!(rig.mm.pagemap(PagemapId(id)).is_none());
        }
        // A device that does not exist: the backend refuses, naming it.
        for dev in [3u32, u32::MAX] {
            let e = rig
                .backend()
                .create_pagemap(&PagemapSpec {
                    id: PagemapId(200),
                    device: DeviceId(dev),
                    owner: None,
                    capacity_bytes: CAPACITY,
                })
                .unwrap_err();
            assert!(e.to_string().contains(&format!("device {dev}")), "{e}");
        }
        // The largest pagemap id, with a capacity of u64::MAX (clamped to the device's), is
        // as good as any: pages go there and come back intact.
        let top = rig
            .backend()
            .create_pagemap(&PagemapSpec {
                id: PagemapId(u8::MAX),
                device: DeviceId(1),
                owner: None,
                capacity_bytes: u64::MAX,
            })
            .unwrap();
        assert_eq!(top.devmem().capacity_bytes(), CAPACITY);
        rig.mm.add_pagemap(top).unwrap();
        rig.mm
            .migrate(VaRange::new(BASE, PS), PagemapId(u8::MAX), &d)
            .unwrap();
        assert_eq!(
            rig.mm.location(BASE).unwrap(),
            rig.mm.locations(VaRange::new(BASE, PS)).unwrap()[0]
        );
        assert!(matches!(
            rig.mm.location(BASE).unwrap(),
            PageLocation::Device {
                pagemap: PagemapId(u8::MAX),
                ..
            }
        ));
        assert_eq!(rig.layout(BASE, 8), "?s00s1s.");
        rig.check_bytes();
    }

    #[test]
    fn pagemap_capacities_of_zero_and_one_byte() {
        on_every_backend(pagemap_capacities_of_zero_and_one_byte_on);
    }

    fn pagemap_capacities_of_zero_and_one_byte_on(b: &'static str) {
        let rig = Rig::on(b);
        for (id, cap) in [(10u8, 0u64), (11, 1)] {
            let pm = rig
                .backend()
                .create_pagemap(&PagemapSpec {
                    id: PagemapId(id),
                    device: DeviceId(0),
                    owner: None,
                    capacity_bytes: cap,
                })
                .unwrap();
            // Sim offers the byte count asked; a backend of whole 4 KiB pages (level-zero,
            // the plug-ins) rounds it down. Either way the message names what it offers.
            let offered = pm.devmem().capacity_bytes();
            assert!(offered <= cap, "{b}: {offered} bytes offered for {cap}");
            if b == "sim" {
                assert_eq!(offered, cap);
            }
            rig.mm.add_pagemap(pm).unwrap();
            let name = format!("capacity {offered} bytes");
            refuse(
                &rig,
                "migrate into a tiny pagemap",
                |mm| {
                    mm.migrate(
                        VaRange::new(BASE, PS),
                        PagemapId(id),
                        &MigrateDetails::default(),
                    )
                },
                |e| matches!(e, Error::TooLarge { .. }),
                &[&name, &format!("pagemap {id}")],
            );
        }
        rig.check_bytes();
    }

    #[test]
    fn a_range_at_the_top_of_the_address_space_works() {
        on_every_backend(a_range_at_the_top_of_the_address_space_works_on);
    }

    fn a_range_at_the_top_of_the_address_space_works_on(b: &'static str) {
        let rig = Rig::on(b);
        let d = MigrateDetails::default();
        let top = VaRange::new(TOP, PS);
        rig.mm.create_range(top, PageSize::Size4K).unwrap();
        rig.mm.write(TOP, b"top").unwrap();
        rig.mm.write(TOP + PS - 1, b"!").unwrap();
        rig.mm.migrate(top, PagemapId(1), &d).unwrap();
        assert_eq!(layout::format(&layout::of(&rig.mm, top).unwrap()), "1");
        let mut b = [0u8; 3];
        rig.mm.read(TOP, &mut b).unwrap();
        assert_eq!(&b, b"top");
        let mut b = [0u8; 1];
        rig.mm.read(TOP + PS - 1, &mut b).unwrap();
        assert_eq!(&b, b"!");
        for (va, len) in [(TOP + PS - 1, 2), (TOP + PS, 1), (u64::MAX, 1)] {
            refuse(
                &rig,
                "bytes past the top range",
                |mm| mm.read(va, &mut vec![0u8; len]),
                any_range_problem,
                &[],
            );
        }
        rig.mm.free_range(TOP).unwrap();
        rig.check_bytes();
    }

    /// Sim-only: the simulated backend's own configuration limits.
    #[test]
    fn sim_configs_at_their_limits() {
        let with = |devices: usize, device_capacity: u64, host_capacity: u64| {
            SimBackend::new(SimConfig {
                devices,
                device_capacity,
                host_capacity,
                ..SimConfig::default()
            })
        };
        let bad_config = |r: Result<SimBackend, BackendError>, names: &[&str]| {
            let e = r.expect_err("accepted");
            assert_eq!(e.kind, BackendErrorKind::BadConfig, "{e}");
            let msg = e.to_string();
            for n in names {
                assert!(msg.contains(n), "{msg:?} does not name {n:?}");
            }
        };
        // Device counts.
        for n in [0, 65, usize::MAX] {
            bad_config(
                with(n, CAPACITY, 16 << 20),
                &[&format!("{n} devices"), "1 to 64"],
            );
        }
        for n in [1, 64] {
            assert_eq!(with(n, CAPACITY, 16 << 20).unwrap().devices().len(), n);
        }
        // Device capacities past what 32-bit pfns of 4 KiB granules address (16 TiB): the
        // chunk table alone would not fit in memory.
        let limit = MAX_DEVICE_CAPACITY.to_string();
        assert_eq!(MAX_DEVICE_CAPACITY, (u32::MAX as u64 + 1) * 4096);
        for cap in [
            MAX_DEVICE_CAPACITY + 1,
            1 << 50,
            u64::MAX - (1 << 20),
            u64::MAX,
        ] {
            bad_config(
                with(2, cap, 16 << 20),
                &["device 0", &cap.to_string(), &limit],
            );
        }
        // Host capacities past what a sim address holds (48-bit offsets).
        let limit = MAX_HOST_CAPACITY.to_string();
        for cap in [MAX_HOST_CAPACITY + 1, u64::MAX] {
            bad_config(
                with(1, CAPACITY, cap),
                &["host memory", &cap.to_string(), &limit],
            );
        }
        // At the limits: cheap (memory is backed lazily) and usable; every page lands.
        let t = std::time::Instant::now();
        let sim = with(1, MAX_DEVICE_CAPACITY, MAX_HOST_CAPACITY).unwrap();
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        let mm = AddressSpace::new(sim.host_memory());
        for pm in sim.pagemap_per_device().unwrap() {
            assert_eq!(pm.devmem().capacity_bytes(), MAX_DEVICE_CAPACITY);
            mm.add_pagemap(pm).unwrap();
        }
        let r = VaRange::new(BASE, 4 * PS);
        mm.create_range(r, PageSize::Size4K).unwrap();
        mm.write(BASE + 3 * PS + 5, b"far").unwrap();
        mm.migrate(r, PagemapId(0), &MigrateDetails::default())
            .unwrap();
        let mut b = [0u8; 3];
        mm.read(BASE + 3 * PS + 5, &mut b).unwrap();
        assert_eq!(&b, b"far");
        // Capacities of 0 and 1 byte: usable, every request is refused with a typed error.
        let sim = with(1, 0, 0).unwrap();
        let mm = AddressSpace::new(sim.host_memory());
        for pm in sim.pagemap_per_device().unwrap() {
            mm.add_pagemap(pm).unwrap();
        }
        mm.create_range(r, PageSize::Size4K).unwrap();
        let e = mm.write(BASE, b"x").unwrap_err();
        assert!(matches!(e, Error::Backend { .. }), "{e:?}");
        let e = mm
            .migrate(r, PagemapId(0), &MigrateDetails::default())
            .unwrap_err();
        assert!(matches!(e, Error::TooLarge { .. }), "{e:?}");
        with(1, 1, 1).unwrap();
    }

    /// Every `Duration` of a migration (fence timeout, timeslice) at 0, 1 ns and
    /// `Duration::MAX`, on every backend: the migration succeeds or (a fence timeout that ran
    /// out) fails typed with every page where it was; nothing panics or wedges; the bytes are
    /// intact and, once both ranges are freed, every allocation was released exactly once and
    /// every host frame came back.
    #[test]
    fn durations_at_their_limits() {
        on_every_backend(|b| {
            for d in [Duration::ZERO, Duration::from_nanos(1), Duration::MAX] {
                let rig = Rig::on(b);
                let before = rig.state();
                let r = VaRange::new(BASE, 2 * PS);
                let details = MigrateDetails {
                    fence_timeout: Some(d),
                    ..MigrateDetails::default()
                };
                match rig.mm.migrate(r, PagemapId(1), &details) {
                    Ok(_) => assert_eq!(rig.layout(BASE, 8), "1100s1s.", "{b} {d:?}"),
                    Err(Error::Fence {
                        source: FenceError::Timeout(t),
                        ..
                    }) => {
                        assert_eq!(t, d, "{b}");
                        assert_ne!(d, Duration::MAX, "{b}: a wait for ever timed out");
                        // The timed-out copy may still run and its destination be released
                        // from the fence worker: let that finish before the snapshot compares
                        // the backend's counters with the audit's.
                        rig.drain_deferred(b);
                        assert_eq!(rig.state().locations, before.locations, "{b} {d:?}");
                    }
                    Err(e) => panic!("{b}: fence timeout {d:?}: {e}"),
                }
                let details = MigrateDetails {
                    timeslice: d,
                    ..MigrateDetails::default()
                };
                let six = VaRange::new(BASE + 6 * PS, PS);
                let rep = rig
                    .mm
                    .migrate(six, PagemapId(0), &details)
                    .unwrap_or_else(|e| panic!("{b}: timeslice {d:?}: {e}"));
                if d == Duration::MAX {
                    // "For ever": a bounded CPU access gives up, nothing changed; eviction
                    // ignores the timeslice.
                    let mut buf = [0u8; 8];
                    let e = rig
                        .mm
                        .read_timeout(six.start, &mut buf, Duration::from_millis(20))
                        .unwrap_err();
                    assert!(matches!(e, Error::CpuAccessTimeout { .. }), "{b}: {e}");
                    rig.mm.evict_to_ram(rep.alloc.unwrap()).unwrap();
                }
                // A copy that outlived its fence timeout finishes; its destination goes.
                rig.drain_deferred(b);
                rig.check_bytes();
                rig.mm.free_range(BASE).unwrap();
                rig.mm.free_range(BIG).unwrap();
                assert!(rig.mm.allocations().is_empty(), "{b} {d:?}");
                rig.rig.audit.assert_all_released_once();
                assert_eq!(rig.rig.audit.host_granules(), 0, "{b} {d:?}: host frames");
            }
        });
    }

    /// Pagemap counts of 0 and more than there are ids: refused on every backend, naming it.
    #[test]
    fn pagemap_counts_at_their_limits() {
        on_every_backend(|b| {
            let opts = common::Options::on(b).device_capacity(CAPACITY);
            let (backend, _) = common::open(2, &opts);
            for n in [0, 257, usize::MAX] {
                let e =
                    Machine::build(backend.clone(), n, &[], Some(CAPACITY)).expect_err("accepted");
                assert!(
                    matches!(&e, Error::BadConfig { backend, .. } if backend == b),
                    "{b}: {e:?}"
                );
                let msg = e.to_string();
                for want in [format!("{n} pagemaps"), "1 to 256".to_string()] {
                    assert!(msg.contains(&want), "{b}: {msg:?} does not name {want:?}");
                }
            }
            // 256 pagemaps on two devices: fine, each with its share (at most CAPACITY).
            let m = Machine::build(backend.clone(), 256, &[], Some(CAPACITY)).unwrap();
            assert_eq!(m.pagemaps.len(), 256, "{b}");
            assert!(
                m.pagemaps
                    .iter()
                    .all(|p| p.devmem().capacity_bytes() <= CAPACITY),
                "{b}"
            );
        });
    }

    /// Sim-only: the generic config's device counts and capacities against sim's limits.
    #[test]
    fn machine_configs_at_their_limits() {
        let bad = |r: Result<Machine, Error>, names: &[&str]| {
            let e = r.expect_err("accepted");
            assert!(
                matches!(&e, Error::BadConfig { backend, .. } if backend == "sim"),
                "{e:?}"
            );
            let msg = e.to_string();
            for n in names {
                assert!(msg.contains(n), "{msg:?} does not name {n:?}");
            }
        };
        let small = BackendConfig {
            devices: Some(2),
            device_capacity: Some(CAPACITY),
            host_capacity: Some(16 << 20),
            ..BackendConfig::default()
        };
        // Pagemap counts: 0 and more than there are pagemap ids.
        for n in [0, 257, usize::MAX] {
            bad(
                Machine::open("sim", &small, n),
                &[&format!("{n} pagemaps"), "1 to 256"],
            );
        }
        assert_eq!(Machine::open("sim", &small, 1).unwrap().pagemaps.len(), 1);
        assert_eq!(
            Machine::open("sim", &small, 256).unwrap().pagemaps.len(),
            256
        );
        // Device counts and capacities through the generic config.
        for devices in [0, 65, usize::MAX] {
            let c = BackendConfig {
                devices: Some(devices),
                ..small.clone()
            };
            bad(
                Machine::open("sim", &c, 1),
                &[&format!("{devices} devices")],
            );
        }
        for cap in [MAX_DEVICE_CAPACITY + 1, u64::MAX] {
            let c = BackendConfig {
                device_capacity: Some(cap),
                ..small.clone()
            };
            bad(
                Machine::open("sim", &c, 2),
                &["device 0", &MAX_DEVICE_CAPACITY.to_string()],
            );
        }
        let c = BackendConfig {
            host_capacity: Some(u64::MAX),
            ..small.clone()
        };
        bad(
            Machine::open("sim", &c, 2),
            &["host memory", &MAX_HOST_CAPACITY.to_string()],
        );
    }

    /// Host frames and device memory called directly, with absurd counts, on every backend:
    /// "out of memory", typed, and nothing held afterwards (what was refused can be had in
    /// full right after).
    #[test]
    fn host_frames_and_device_memory_at_their_limits() {
        on_every_backend(|b| {
            let opts = common::Options::on(b)
                .device_capacity(CAPACITY)
                .host_capacity(HOST_CAPACITY);
            let rig = common::machine(1, &opts);
            let host = rig.backend.host_memory();
            host.alloc_frames(PageSize::Size4K, &mut []).unwrap();
            let cap = host.capacity_bytes();
            for ps in [PageSize::Size4K, PageSize::Size64K, PageSize::Size2M] {
                let n = usize::try_from(cap / ps.bytes() + 1).unwrap();
                if n > 1 << 20 {
                    continue; // a host memory this large is not probed frame by frame
                }
                let mut out = vec![drm_pagemap::HostFrame(0); n];
                let e = host.alloc_frames(ps, &mut out).unwrap_err();
                assert_eq!(e.kind, BackendErrorKind::OutOfMemory, "{b}: {e}");
            }
            // Nothing was kept: one frame of each size comes and goes.
            for ps in [PageSize::Size4K, PageSize::Size64K, PageSize::Size2M] {
                let mut one = [drm_pagemap::HostFrame(0)];
                host.alloc_frames(ps, &mut one).unwrap();
                host.free_frames(&one, ps);
            }
            let pm = &rig.pagemaps[0];
            for (n, ps) in [
                (usize::MAX, PageSize::Size2M),
                (usize::MAX, PageSize::Size4K),
                (u32::MAX as usize + 1, PageSize::Size4K),
                (1 << 40, PageSize::Size64K),
                (CAPACITY as usize / PS as usize + 1, PageSize::Size4K),
            ] {
                let e = pm.devmem().allocate(n, ps).unwrap_err();
                assert_eq!(e.kind, BackendErrorKind::OutOfMemory, "{b}: {n} pages: {e}");
            }
            // The whole pagemap is still free.
            let whole = pm
                .devmem()
                .allocate(CAPACITY as usize / PS as usize, PageSize::Size4K)
                .unwrap_or_else(|e| panic!("{b}: the whole pagemap after refusals: {e}"));
            if let Some(f) = &whole.pre_migrate_fence {
                f.wait().unwrap();
            }
            pm.devmem().devmem_release(whole);
        });
    }

    /// Sim-only: sim's host arena and statistics; the extent allocator, the arena and the
    /// fault injector (backend-independent building blocks, run once).
    #[test]
    fn backend_building_blocks_at_their_limits() {
        // Host frames: 0 frames is nothing, more than the pool holds is "out of memory" (the
        // caller's buffer bounds the count: an absurd one cannot even be asked for).
        let sim = SimBackend::new(SimConfig {
            devices: 1,
            device_capacity: CAPACITY,
            host_capacity: 16 << 20,
            ..SimConfig::default()
        })
        .unwrap();
        let host = sim.host_memory();
        let free = sim.arena_host().free_granules();
        host.alloc_frames(PageSize::Size4K, &mut []).unwrap();
        for (n, ps) in [
            ((16 << 20) / 4096 + 1, PageSize::Size4K),
            ((16 << 20) / 65536 + 1, PageSize::Size64K),
            (9, PageSize::Size2M),
        ] {
            let mut out = vec![drm_pagemap::HostFrame(0); n];
            let e = host.alloc_frames(ps, &mut out).unwrap_err();
            assert_eq!(e.kind, BackendErrorKind::OutOfMemory, "{e}");
        }
        assert_eq!(sim.arena_host().free_granules(), free);
        // Device memory of a pagemap, called directly.
        let pm = &sim.pagemap_per_device().unwrap()[0];
        for (n, ps) in [
            (usize::MAX, PageSize::Size2M),
            (usize::MAX, PageSize::Size4K),
            (u32::MAX as usize + 1, PageSize::Size4K),
            (1 << 40, PageSize::Size64K),
        ] {
            let e = pm.devmem().allocate(n, ps).unwrap_err();
            assert_eq!(e.kind, BackendErrorKind::OutOfMemory, "{e}");
        }
        assert_eq!(sim.stats(PagemapId(0)).unwrap().used_bytes, 0);
        // The extent allocator and the arena.
        let ex = ExtentAllocator::new(1024);
        // Granule 0 is aligned to anything: take it, so an alignment of u64::MAX finds none.
        assert_eq!(ex.alloc(1, u64::MAX), Some(0));
        for (len, align) in [(0, 0), (u64::MAX, 1), (1, u64::MAX), (u64::MAX, u64::MAX)] {
            assert_eq!(ex.alloc(len, align), None, "alloc({len}, {align})");
        }
        let mut starts = Vec::new();
        for (n, page) in [(usize::MAX, 1), (2, u64::MAX), (usize::MAX, u64::MAX)] {
            assert!(
                !ex.alloc_pages(n, page, &mut starts),
                "alloc_pages({n}, {page})"
            );
        }
        assert!(starts.is_empty());
        assert_eq!(ex.free_granules(), 1023);
        assert!(AtomicArena::try_new(u64::MAX).is_err());
        assert_eq!(AtomicArena::try_new(0).unwrap().len(), 0);
        assert_eq!(AtomicArena::try_new(1).unwrap().len(), 2 << 20);
        // Fault injection counts.
        let inj = FaultInjector::new();
        inj.fail_nth(FaultSite::Alloc, u64::MAX);
        assert!(!inj.hit(FaultSite::Alloc));
        inj.fail_nth(FaultSite::Alloc, 0);
        assert!(!inj.hit(FaultSite::Alloc));
    }

    /// An SVM context over two devices of backend `b`, with range A's first 8 pages created.
    fn svm_rig(b: &'static str, config: SvmConfig) -> (Arc<dyn Backend>, Svm) {
        let opts = common::Options::on(b)
            .device_capacity(8 << 20)
            .host_capacity(32 << 20);
        let (backend, _) = common::open(2, &opts);
        let m = Machine::build(backend.clone(), 2, &[], Some(8 << 20)).unwrap();
        let mm = Arc::new(AddressSpace::new(backend.host_memory()));
        let svm = Svm::new(mm.clone(), m.pagemaps.clone(), config).unwrap();
        mm.create_range(VaRange::new(BASE, 8 * PS), PageSize::Size4K)
            .unwrap();
        mm.write(BASE + 3, b"svm").unwrap();
        (backend, svm)
    }

    /// Every entry of xe-svm with extreme addresses, ranges and capacities, on every backend.
    #[test]
    fn xe_svm_entries_at_their_limits() {
        on_every_backend(xe_svm_entries_at_their_limits_on);
    }

    fn xe_svm_entries_at_their_limits_on(b: &'static str) {
        for capacity in [None, Some(0), Some(1), Some(u64::MAX)] {
            let (_backend, svm) = svm_rig(
                b,
                SvmConfig {
                    capacity,
                    ..SvmConfig::default()
                },
            );
            let mm = svm.mm().clone();
            let r = VaRange::new(BASE, 8 * PS);
            let snapshot = || {
                let mut b = vec![0u8; 8 * PS as usize];
                // Reading faults device pages home: compare layouts first.
                let l = layout::format(&layout::of(&mm, r).unwrap());
                mm.read(BASE, &mut b).unwrap();
                (l, b)
            };
            for id in [2u8, u8::MAX] {
                assert!(matches!(
                    svm.vm(PagemapId(id)),
                    Err(SvmError::UnknownPagemap { .. })
                ));
                assert!(svm.memory(PagemapId(id)).is_none());
                assert!(svm.lru(PagemapId(id)).is_empty());
            }
            assert_eq!(svm.stats(DeviceId(u32::MAX)).total_faults(), 0);
            let vm = svm.vm(PagemapId(0)).unwrap();
            // A fault in the range works whatever the capacity (too small: served from
            // system memory).
            vm.handle_gpu_fault(BASE + PS, Access::Write).unwrap();
            let before = layout::format(&layout::of(&mm, r).unwrap());
            for a in [0, 1, BASE - 1, BASE + 8 * PS, u64::MAX - 1, u64::MAX] {
                for access in [Access::Read, Access::Write, Access::Atomic] {
                    let e = vm.handle_gpu_fault(a, access).unwrap_err();
                    assert!(
                        matches!(e, SvmError::NotMirrored { address, .. } if address == a),
                        "{e:?}"
                    );
                }
                assert!(!vm.is_valid(a));
                assert!(vm.with_page_table(a, |_| ()).is_none());
            }
            for bad in absurd_ranges() {
                assert!(vm.evict_range(bad).is_err(), "evict_range {bad}");
                vm.invalidate(bad);
            }
            let bad_madvise = [
                VaRange::new(0, 0),
                VaRange::new(u64::MAX, 1),
                VaRange::new(u64::MAX, u64::MAX),
                VaRange::new(1, u64::MAX),
            ];
            for m in bad_madvise {
                let e = vm.madvise(m, Attributes::default()).unwrap_err();
                assert!(
                    matches!(e, SvmError::Core(Error::BadRange { .. })),
                    "madvise {m}: {e:?}"
                );
            }
            let e = vm
                .madvise(
                    r,
                    Attributes {
                        preferred: PreferredLocation::Pagemap(PagemapId(u8::MAX)),
                        ..Attributes::default()
                    },
                )
                .unwrap_err();
            assert!(matches!(e, SvmError::UnknownPagemap { .. }), "{e:?}");
            assert_eq!(layout::format(&layout::of(&mm, r).unwrap()), before);
            // The whole address space at once is a valid interval.
            let sys = Attributes {
                preferred: PreferredLocation::System,
                ..Attributes::default()
            };
            vm.madvise(VaRange::new(0, u64::MAX), sys).unwrap();
            assert_eq!(vm.attributes(0), sys);
            assert_eq!(vm.attributes(u64::MAX - 1), sys);
            assert_eq!(vm.attributes(u64::MAX), Attributes::default());
            vm.invalidate(VaRange::new(0, u64::MAX));
            assert_eq!(layout::format(&layout::of(&mm, r).unwrap()), before);
            let (_, bytes) = snapshot();
            assert_eq!(&bytes[3..6], b"svm");
        }
    }
}
