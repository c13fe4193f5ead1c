//! The fuzz drivers, shared by the libFuzzer targets (`fuzz_targets/`, nightly) and the
//! stable corpus replay (`tests/replay.rs`). Each panics when a property is violated.
//!
//! - [`layout_round_trip`]: `layout::parse` never panics; what it accepts is non-empty, within
//!   the page limit, and formats back to text that parses to the same pages; any page vector
//!   formats to text that parses back to it.
//! - [`api_sequence`]: the input is decoded into calls on a simulated machine (4 devices, one
//!   of another owner, small device memory, fault injection armed by the input): create, free,
//!   CPU write and read, migrate (valid or garbage arguments), eviction, explicit
//!   reservations with absurd sizes, a migration whose fence never signals. Every call
//!   returns `Ok` or a typed error with a non-empty message (no panic); every successful
//!   read returns the bytes of a reference model; at the end every range reads back intact,
//!   and after freeing everything no device byte, host frame or allocation is left (except
//!   destinations parked behind a fence that never signals, which must be accounted for).

#![forbid(unsafe_code)]

use drm_pagemap_core::{
    AddressSpace, AllocId, AllocState, Backend, Coalesce, Error, MigrateDetails, MigrateOutcome,
    PageBacking, PageLocation, PageSize, PagemapId, Pfn, VaRange,
};
use drm_pagemap_sim::{SimBackend, SimConfig};
use drm_pagemap_testkit::inject::{FaultInjector, FaultSite};
use drm_pagemap_testkit::layout::{self, LayoutPage, MAX_LAYOUT_PAGES};
use std::time::Duration;

/// The layout parser property.
pub fn layout_round_trip(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        match layout::parse(text) {
            Ok(pages) => {
                assert!(!pages.is_empty(), "parse accepted {text:?} as no pages");
                assert!(
                    pages.len() <= MAX_LAYOUT_PAGES,
                    "parse accepted more than the limit"
                );
                let again = layout::format(&pages);
                assert_eq!(
                    layout::parse(&again).as_ref(),
                    Ok(&pages),
                    "{text:?} -> {again:?} does not round-trip"
                );
            }
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }
    // Any page vector (one byte per page) formats and parses back.
    let pages: Vec<LayoutPage> = data
        .iter()
        .map(|&b| match b % 12 {
            10 => LayoutPage::Hole,
            11 => LayoutPage::System,
            k => LayoutPage::Device(k),
        })
        .collect();
    if !pages.is_empty() {
        let text = layout::format(&pages);
        assert!(
            text.chars().all(|c| c == ','
                || c == '*'
                || c == '.'
                || c == 's'
                || c.is_ascii_digit()),
            "{text:?}"
        );
        assert_eq!(layout::parse(&text), Ok(pages), "format produced {text:?}");
    }
}

/// Reads operands off the input; zeros once it runs out.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        for x in &mut b {
            *x = self.u8();
        }
        u64::from_le_bytes(b)
    }
    fn done(&self) -> bool {
        self.0.is_empty()
    }
}

const DEVICES: usize = 4;
const CAPACITY: u64 = 256 << 10;
const SLOTS: usize = 4;
const BASE: u64 = 1 << 30;
const STRIDE: u64 = 4 << 20;
const MAX_OPS: usize = 64;

fn slot_base(i: usize) -> u64 {
    BASE + i as u64 * STRIDE
}

struct Slot {
    ps: PageSize,
    bytes: Vec<u8>,
}

impl Slot {
    fn range(&self, i: usize) -> VaRange {
        VaRange::new(slot_base(i), self.bytes.len() as u64)
    }
}

fn page_size(b: u8) -> PageSize {
    match b % 8 {
        0 => PageSize::Size64K,
        7 => PageSize::Size2M,
        _ => PageSize::Size4K,
    }
}

/// What one input exercised (so a harness can tell that its inputs reach the engine).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Exercised {
    /// Calls made.
    pub calls: u64,
    /// Calls refused with a typed error.
    pub errors: u64,
    /// Successful migrations.
    pub migrations: u64,
    /// Successful reads compared with the model.
    pub reads_checked: u64,
    /// Successful evictions.
    pub evictions: u64,
    /// Faults injected.
    pub faults: u64,
    /// Destinations parked behind a timed-out fence at the end.
    pub parked: u64,
}

impl std::ops::AddAssign for Exercised {
    fn add_assign(&mut self, o: Exercised) {
        self.calls += o.calls;
        self.errors += o.errors;
        self.migrations += o.migrations;
        self.reads_checked += o.reads_checked;
        self.evictions += o.evictions;
        self.faults += o.faults;
        self.parked += o.parked;
    }
}

struct Driver {
    ex: Exercised,
    sim: SimBackend,
    mm: AddressSpace,
    inj: std::sync::Arc<FaultInjector>,
    slots: [Option<Slot>; SLOTS],
    /// Ranges created with arbitrary arguments: never written, so they read as zeros.
    raw: Vec<VaRange>,
    host_free: u64,
}

impl Driver {
    /// A refused call: formatting must not panic and must say something.
    fn typed(&mut self, e: &Error) {
        assert!(!e.to_string().is_empty(), "empty message for {e:?}");
        self.ex.errors += 1;
    }

    fn new() -> Driver {
        let inj = FaultInjector::new();
        let sim = SimBackend::new(SimConfig {
            devices: DEVICES,
            device_capacity: CAPACITY,
            host_capacity: 8 << 20,
            owner_groups: Some(vec![0, 0, 0, 1]),
            copy_latency: Duration::ZERO,
            resident: false,
            faults: Some(inj.clone()),
            host_bytes: None,
        })
        .expect("sim");
        let mm = AddressSpace::new(sim.host_memory());
        for pm in sim.pagemap_per_device().expect("pagemaps") {
            mm.add_pagemap(pm).expect("add");
        }
        let host_free = sim.arena_host().free_granules();
        Driver {
            ex: Exercised::default(),
            sim,
            mm,
            inj,
            slots: Default::default(),
            raw: Vec::new(),
            host_free,
        }
    }

    /// Checks a successful read of `buf` at `va` against the model.
    fn check_read(&mut self, va: u64, buf: &[u8]) {
        self.ex.reads_checked += 1;
        if buf.is_empty() {
            // A 0-byte read is a no-op at any address, mapped or not (documented).
            return;
        }
        for (i, s) in self.slots.iter().enumerate() {
            if let Some(s) = s {
                let r = s.range(i);
                if va >= r.start && va < r.end() {
                    let off = (va - r.start) as usize;
                    assert_eq!(
                        buf,
                        &s.bytes[off..off + buf.len()],
                        "read at {va:#x} differs from what was written"
                    );
                    return;
                }
            }
        }
        assert!(
            self.raw.iter().any(|r| va >= r.start && va < r.end()),
            "read at {va:#x} succeeded outside every range"
        );
        assert!(
            buf.iter().all(|&b| b == 0),
            "a never-written range does not read as zeros"
        );
    }

    /// A migration into a reservation through `migrate_to_devmem_with`: the work runs at
    /// most once, always when pages moved, and the report's generation names the committed
    /// backing (every page in the reservation, in order; nothing else runs meanwhile).
    fn migrate_overlapped(
        &mut self,
        id: AllocId,
        pm: PagemapId,
        r: VaRange,
        d: &MigrateDetails,
    ) -> Result<(), Error> {
        let mut runs = 0;
        let mut seen: Vec<Pfn> = Vec::new();
        let rep = self.mm.migrate_to_devmem_with(id, r, d, &mut |pfns| {
            runs += 1;
            seen = pfns.to_vec();
        })?;
        assert!(runs <= 1, "the work ran {runs} times");
        match rep.generation {
            Some(g) => {
                assert_eq!(runs, 1, "pages moved without the work");
                let mut backing = Vec::new();
                assert_eq!(self.mm.backing_with_generation(r, &mut backing), Ok(g));
                let want: Vec<PageBacking> = seen
                    .iter()
                    .map(|&pfn| PageBacking::Device {
                        pagemap: pm,
                        alloc: id,
                        pfn,
                    })
                    .collect();
                assert_eq!(backing, want, "the committed backing");
            }
            None => assert_eq!(rep.outcome, MigrateOutcome::NotNeeded),
        }
        Ok(())
    }

    fn details(&self, inp: &mut Input<'_>) -> MigrateDetails {
        let f = inp.u8();
        MigrateDetails {
            timeslice: Duration::ZERO,
            can_migrate_same_pagemap: f & 1 != 0,
            source_peer_migrates: f & 2 == 0,
            coalesce: if f & 4 != 0 {
                Coalesce::Consecutive
            } else {
                Coalesce::BySource
            },
            fence_timeout: (f & 8 != 0).then_some(Duration::from_secs(60)),
            // Whole calls, or pieces of 1 to 3 pages.
            max_call_pages: if f & 16 != 0 {
                std::num::NonZeroU32::new(u32::from(f >> 5) % 3 + 1)
            } else {
                None
            },
        }
    }

    fn step(&mut self, inp: &mut Input<'_>) {
        let op = inp.u8() % 12;
        self.ex.calls += 1;
        match op {
            0 => {
                let i = inp.u8() as usize % SLOTS;
                let ps = page_size(inp.u8() & 3); // 4K or 64K for the slots
                let pages = 1 + inp.u8() as u64 % 16;
                let r = VaRange::new(slot_base(i), pages * ps.bytes());
                match self.mm.create_range(r, ps) {
                    Ok(()) => {
                        assert!(self.slots[i].is_none(), "created over a live range");
                        self.slots[i] = Some(Slot {
                            ps,
                            bytes: vec![0; r.len as usize],
                        });
                    }
                    Err(e) => self.typed(&e),
                }
            }
            1 => {
                let i = inp.u8() as usize % SLOTS;
                match self.mm.free_range(slot_base(i)) {
                    Ok(()) => assert!(
                        self.slots[i].take().is_some(),
                        "freed a range that was not there"
                    ),
                    Err(e) => {
                        self.typed(&e);
                        assert!(self.slots[i].is_none(), "free of a live range failed: {e}");
                    }
                }
            }
            2 | 3 => {
                let i = inp.u8() as usize % SLOTS;
                let off = inp.u16() as u64;
                let len = inp.u16() as u64 % (3 * 65536);
                let Some(s) = &self.slots[i] else {
                    // No slot there; a raw range (any length now) may still cover it.
                    let va = slot_base(i) + off;
                    let mut b = [0u8; 1];
                    match self.mm.read(va, &mut b) {
                        Ok(()) => self.check_read(va, &b),
                        Err(e) => self.typed(&e),
                    }
                    return;
                };
                let size = s.bytes.len() as u64;
                let off = off % size;
                let len = 1 + len % (size - off);
                let va = slot_base(i) + off;
                if op == 2 {
                    let seed = inp.u8();
                    let data: Vec<u8> =
                        (0..len).map(|k| seed ^ (k as u8).wrapping_mul(7)).collect();
                    match self.mm.write(va, &data) {
                        Ok(()) => {
                            let s = self.slots[i].as_mut().expect("live");
                            s.bytes[off as usize..(off + len) as usize].copy_from_slice(&data);
                        }
                        Err(e) => self.typed(&e),
                    }
                } else {
                    let mut buf = vec![0u8; len as usize];
                    match self.mm.read(va, &mut buf) {
                        Ok(()) => self.check_read(va, &buf),
                        Err(e) => self.typed(&e),
                    }
                }
            }
            4 => {
                // Migrate part of a slot, to any pagemap id (most unknown ones are refused).
                let i = inp.u8() as usize % SLOTS;
                let first = inp.u8() as u64;
                let count = inp.u8() as u64;
                let to = PagemapId(inp.u8() % 6);
                let d = self.details(inp);
                let (start, len) = match &self.slots[i] {
                    Some(s) => {
                        let ps = s.ps.bytes();
                        let pages = s.bytes.len() as u64 / ps;
                        let first = first % pages;
                        (
                            slot_base(i) + first * ps,
                            (1 + count % (pages - first)) * ps,
                        )
                    }
                    None => (slot_base(i), 4096),
                };
                match self.mm.migrate(VaRange::new(start, len), to, &d) {
                    Ok(_) => self.ex.migrations += 1,
                    Err(e) => self.typed(&e),
                }
            }
            5 => {
                // Arm a fault: the nth allocation, map, copy or copy-fence error from now.
                let site = match inp.u8() % 4 {
                    0 => FaultSite::Alloc,
                    1 => FaultSite::Map,
                    2 => FaultSite::Copy,
                    _ => FaultSite::FenceError,
                };
                self.inj.fail_nth(site, 1 + inp.u8() as u64 % 8);
            }
            6 => {
                // A migration whose first copy fence never signals.
                let i = inp.u8() as usize % SLOTS;
                let to = PagemapId(inp.u8() % 3);
                let Some(s) = &self.slots[i] else { return };
                let r = s.range(i);
                self.inj.fail_nth(FaultSite::FenceHang, 1);
                let d = MigrateDetails {
                    fence_timeout: Some(Duration::from_millis(1)),
                    ..MigrateDetails::default()
                };
                let res = self.mm.migrate(r, to, &d);
                self.inj.fail_nth(FaultSite::FenceHang, 0);
                if let Err(e) = res {
                    self.typed(&e);
                }
            }
            7 => {
                // Evict the allocation under a page, or any allocation.
                let i = inp.u8() as usize % SLOTS;
                let k = inp.u8() as usize;
                let id = match &self.slots[i] {
                    Some(s) if k & 1 == 0 => {
                        let va = slot_base(i) + (k as u64 * s.ps.bytes()) % s.bytes.len() as u64;
                        match self.mm.location(va) {
                            Ok(PageLocation::Device { alloc, .. }) => Some(alloc),
                            _ => None,
                        }
                    }
                    _ => {
                        let all = self.mm.allocations();
                        (!all.is_empty()).then(|| all[k % all.len()].id)
                    }
                };
                if let Some(id) = id {
                    match self.mm.evict_to_ram(id) {
                        Ok(_) => self.ex.evictions += 1,
                        Err(e) => self.typed(&e),
                    }
                }
            }
            8 => {
                // Explicit reservation with any size, then migrate into it or release it.
                let pm = PagemapId(inp.u8() % 6);
                let n = match inp.u8() % 4 {
                    0 => inp.u64() as usize,
                    _ => inp.u8() as usize,
                };
                let ps = page_size(inp.u8());
                let i = inp.u8() as usize % SLOTS;
                let how = inp.u8();
                let (into, overlapped) = (how & 1 == 0, how & 2 != 0);
                let d = self.details(inp);
                let r = match &self.slots[i] {
                    Some(s) => s.range(i),
                    None => VaRange::new(slot_base(i), 4096),
                };
                // The overlapped variant mostly reserves the right size, so it commits.
                let (n, ps) = match &self.slots[i] {
                    Some(s) if overlapped && how & 4 == 0 => {
                        (s.bytes.len() / s.ps.bytes() as usize, s.ps)
                    }
                    _ => (n, ps),
                };
                match self.mm.allocate_devmem(pm, n, ps, r) {
                    Ok(id) => {
                        let res = if into && overlapped {
                            self.migrate_overlapped(id, pm, r, &d)
                        } else if into {
                            self.mm.migrate_to_devmem(id, r, &d).map(|_| ())
                        } else {
                            self.mm.release_devmem(id)
                        };
                        if let Err(e) = res {
                            self.typed(&e);
                            assert!(
                                self.mm.allocation(id).is_none(),
                                "a refused reservation was not consumed"
                            );
                        }
                    }
                    Err(e) => self.typed(&e),
                }
            }
            9 => {
                // Garbage arguments: read, migrate, layout, free at arbitrary addresses.
                let va = inp.u64();
                let len = inp.u64();
                let what = inp.u8();
                let to = PagemapId(inp.u8());
                match what % 4 {
                    0 => {
                        let mut buf = vec![0u8; (len % 65536) as usize];
                        match self.mm.read(va, &mut buf) {
                            Ok(()) => self.check_read(va, &buf),
                            Err(e) => self.typed(&e),
                        }
                    }
                    1 => {
                        if let Err(e) =
                            self.mm
                                .migrate(VaRange::new(va, len), to, &MigrateDetails::default())
                        {
                            self.typed(&e);
                        }
                    }
                    2 => match layout::of(&self.mm, VaRange::new(va, len)) {
                        Ok(l) => assert!(!l.is_empty()),
                        Err(e) => self.typed(&e),
                    },
                    _ => match self.mm.free_range(va) {
                        Ok(()) => {
                            if let Some(i) =
                                (0..SLOTS).find(|&i| slot_base(i) == va && self.slots[i].is_some())
                            {
                                self.slots[i] = None;
                            } else {
                                let before = self.raw.len();
                                self.raw.retain(|r| r.start != va);
                                assert_eq!(
                                    self.raw.len() + 1,
                                    before,
                                    "freed a range nobody created at {va:#x}"
                                );
                            }
                        }
                        Err(e) => self.typed(&e),
                    },
                }
            }
            10 => {
                // A range with arbitrary arguments: any length, up to 32 TiB, or up to
                // 1 GiB (the page table is allocated as pages are written, so a range of
                // u32::MAX pages costs its directory only).
                let start = inp.u64();
                let len = match inp.u8() % 3 {
                    0 => inp.u64(),
                    1 => inp.u64() % (1 << 45),
                    _ => inp.u64() % (1 << 30),
                };
                let ps = page_size(inp.u8());
                let r = VaRange::new(start, len);
                match self.mm.create_range(r, ps) {
                    Ok(()) => {
                        let clash = self
                            .slots
                            .iter()
                            .enumerate()
                            .any(|(i, s)| s.as_ref().is_some_and(|s| s.range(i).overlaps(&r)))
                            || self.raw.iter().any(|x| x.overlaps(&r));
                        assert!(!clash, "created {r} over a live range");
                        self.raw.push(r);
                    }
                    Err(e) => self.typed(&e),
                }
            }
            _ => {
                self.inj.disarm();
            }
        }
    }

    fn finish(mut self) -> Exercised {
        self.inj.disarm();
        for i in 0..SLOTS {
            if let Some(s) = &self.slots[i] {
                let mut buf = vec![0u8; s.bytes.len()];
                self.mm.read(slot_base(i), &mut buf).expect("final read");
                assert!(buf == s.bytes, "slot {i} lost bytes");
                self.mm.free_range(slot_base(i)).expect("final free");
            }
            self.slots[i] = None;
        }
        for r in std::mem::take(&mut self.raw) {
            self.mm.free_range(r.start).expect("free raw range");
        }
        assert!(
            self.mm.ranges().is_empty(),
            "ranges left: {:?}",
            self.mm.ranges()
        );
        // What is left: only destinations parked behind a fence that timed out (one that never
        // signals, or a slow one not reaped yet). Reap first: only engine calls reap.
        let parked = self.mm.deferred_cleanups();
        let left = self.mm.allocations();
        assert_eq!(
            left.len(),
            parked,
            "allocations left that are not parked: {left:?}"
        );
        for a in &left {
            assert_eq!((a.state, a.live_pages), (AllocState::Migrating, 0), "{a:?}");
        }
        for pm in 0..DEVICES as u8 {
            let s = self.sim.stats(PagemapId(pm)).expect("stats");
            let mine: Vec<_> = left.iter().filter(|a| a.pagemap == PagemapId(pm)).collect();
            let parked: u64 = mine
                .iter()
                .map(|a| a.npages as u64 * a.page_size.bytes())
                .sum();
            assert_eq!(s.used_bytes, parked, "pagemap {pm}: device bytes leaked");
            assert_eq!(
                s.allocations - s.releases,
                mine.len() as u64,
                "pagemap {pm}: allocations leaked"
            );
        }
        assert_eq!(
            self.sim.arena_host().free_granules(),
            self.host_free,
            "host frames leaked"
        );
        self.ex.faults = self.inj.injected();
        self.ex.parked = parked as u64;
        self.ex
    }
}

/// The API-sequence property. Returns what the input exercised.
pub fn api_sequence(data: &[u8]) -> Exercised {
    let mut d = Driver::new();
    let mut inp = Input(data);
    let mut n = 0;
    while !inp.done() && n < MAX_OPS {
        d.step(&mut inp);
        n += 1;
    }
    d.finish()
}
