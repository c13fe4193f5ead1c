//! `AddressSpace::keep_buffers`: the buffers kept for a range's large migrations are made once,
//! used by each large migration (and so absent while it runs), given back after it whatever
//! its outcome, left alone by migrations they do not fit and by small ones, and released on
//! request; bad ranges and sizes the system cannot hold are typed errors that change nothing.

mod common;

use common::{Options, backends, build};
use drm_pagemap::{
    AddressSpace, Error, KeptBufferInfo, MigrateDetails, PageSize, PagemapId, VaRange,
};
use drm_pagemap_testkit::inject::{FaultInjector, FaultSite};
use drm_pagemap_testkit::layout::LayoutPage;

/// Pages of the ranges below: more than a thread keeps buffers for (16,384).
const PAGES: usize = 20_000;

/// A layout of `PAGES` pages: system pages and the pages of two peers in runs.
fn layout() -> String {
    vec!["s*8,1*4,2*4,.*2,s*2"; PAGES / 20].join(",")
}

/// The kept set after a migration used it: the same pages, and no page-sized buffer grew
/// (a grown one would add at least 80 KB here; the small ones, of calls and fences, may).
fn assert_given_back(now: KeptBufferInfo, made: KeptBufferInfo, what: &str) {
    assert_eq!(now.pages, made.pages, "{what}");
    assert!(
        now.bytes >= made.bytes && now.bytes < made.bytes + 16 * 1024,
        "{what}: {now:?} after, {made:?} made"
    );
}

/// Migrates the rig's whole range to `to` through a reserved allocation, returning what
/// `kept_buffers` said while the copies ran (`None`: a copy call failed, so the work that
/// runs while they copy did not run).
fn migrate_watching(rig: &common::Rig, to: u8) -> (Result<(), Error>, Option<KeptBufferInfo>) {
    migrate_part_watching(rig, rig.range, to)
}

/// [`migrate_watching`] for `range`, a part of the rig's range.
fn migrate_part_watching(
    rig: &common::Rig,
    range: VaRange,
    to: u8,
) -> (Result<(), Error>, Option<KeptBufferInfo>) {
    let mm: &AddressSpace = &rig.mm;
    let pages = (range.len / rig.page_size.bytes()) as usize;
    let alloc = mm
        .allocate_devmem(PagemapId(to), pages, rig.page_size, range)
        .expect("allocate");
    let mut during = None;
    let r = mm.migrate_to_devmem_with(alloc, range, &MigrateDetails::default(), &mut |_| {
        during = Some(mm.kept_buffers())
    });
    (r.map(|_| ()), during)
}

#[test]
fn kept_buffers_are_made_for_the_range_and_released() {
    let rig = build(&layout(), 3, PageSize::Size4K, Options::on("sim").stamps());
    let mm = &rig.mm;
    assert_eq!(mm.kept_buffers(), KeptBufferInfo::default());
    let kept = mm.keep_buffers(rig.range).unwrap();
    assert_eq!(kept.pages, PAGES);
    // Seven buffers of a page each: at least 40 bytes per page.
    assert!(kept.bytes >= PAGES * 40, "{kept:?}");
    assert_eq!(mm.kept_buffers(), kept);
    // A part of the range: buffers for its pages, replacing the first set.
    let part = VaRange::new(rig.range.start, 100 * 4096);
    assert_eq!(mm.keep_buffers(part).unwrap().pages, 100);
    assert_eq!(mm.kept_buffers().pages, 100);
    assert!(mm.release_buffers() >= 100 * 40);
    assert_eq!(mm.kept_buffers(), KeptBufferInfo::default());
    assert_eq!(mm.release_buffers(), 0);
    rig.finish();
}

#[test]
fn a_large_migration_uses_the_kept_buffers_and_gives_them_back() {
    for b in backends() {
        let rig = build(&layout(), 3, PageSize::Size4K, Options::on(b).stamps());
        assert_eq!(rig.mm.keep_buffers(rig.range).unwrap().pages, PAGES);
        // To pagemap 0 (three sources), then to 1 and to 0 again (each `verify` reads the
        // pages through the CPU, which brings them home in between).
        for to in [0, 1, 0] {
            // Before: what was made, then what the copies back to RAM of `verify` (CPU reads
            // bring the pages home) added to it.
            let before = rig.mm.kept_buffers();
            let (r, during) = migrate_watching(&rig, to);
            r.unwrap();
            let in_use = KeptBufferInfo {
                pages: PAGES,
                bytes: 0,
            };
            assert_eq!(during, Some(in_use), "{b}: in use");
            // Back, and no larger: the migration wrote into the kept memory.
            assert_given_back(rig.mm.kept_buffers(), before, b);
            rig.assert_layout(&format!("{to}*{PAGES}"));
            rig.verify();
        }
        rig.finish();
    }
}

#[test]
fn evicting_a_large_allocation_works_in_the_kept_buffers_too() {
    // The way back to RAM of an allocation the kept set fits takes the set: its own buffers
    // (the pages it picks, the new frames) join the set the first time and are reused after.
    let rig = build(&layout(), 3, PageSize::Size4K, Options::on("sim").stamps());
    let made = rig.mm.keep_buffers(rig.range).unwrap();
    let migrate_and_evict = |to: u8| {
        let r = rig
            .mm
            .migrate(rig.range, PagemapId(to), &MigrateDetails::default())
            .unwrap();
        let ev = rig.mm.evict_to_ram(r.alloc.expect("moved")).unwrap();
        assert_eq!((ev.pages, ev.released), (PAGES, true));
        rig.assert_layout(&format!("s*{PAGES}"));
        rig.verify();
        rig.mm.kept_buffers()
    };
    let first = migrate_and_evict(0);
    assert_eq!(first.pages, PAGES);
    // At least the picked pages (12 bytes each) and the new frames (8) joined the set.
    assert!(
        first.bytes >= made.bytes + PAGES * 20,
        "{first:?} after the first eviction, {made:?} made"
    );
    // The second round reuses them.
    assert_given_back(migrate_and_evict(1), first, "second eviction");
    rig.finish();
}

#[test]
fn without_kept_buffers_a_large_migration_keeps_nothing() {
    let rig = build(&layout(), 3, PageSize::Size4K, Options::on("sim").stamps());
    let (r, during) = migrate_watching(&rig, 0);
    r.unwrap();
    assert_eq!(during, Some(KeptBufferInfo::default()));
    assert_eq!(rig.mm.kept_buffers(), KeptBufferInfo::default());
    rig.verify();
    rig.finish();
}

#[test]
fn a_failed_migration_gives_the_kept_buffers_back_and_loses_no_data() {
    let inj = FaultInjector::new();
    let rig = build(
        &layout(),
        3,
        PageSize::Size4K,
        Options::on("sim").faults(&inj).stamps(),
    );
    let kept = rig.mm.keep_buffers(rig.range).unwrap();
    inj.fail_nth(FaultSite::Copy, 2);
    let before = rig.layout_str();
    let (r, during) = migrate_watching(&rig, 0);
    assert!(r.is_err());
    // The second copy call failed: nothing ran while copying.
    assert_eq!(during, None);
    assert_given_back(rig.mm.kept_buffers(), kept, "failed");
    assert_eq!(rig.layout_str(), before);
    rig.verify();
    // The next migration succeeds in the same buffers.
    inj.disarm();
    let (r, _) = migrate_watching(&rig, 0);
    r.unwrap();
    assert_given_back(rig.mm.kept_buffers(), kept, "after");
    rig.verify();
    rig.finish();
}

#[test]
fn buffers_kept_for_a_smaller_range_stay_out_of_larger_and_small_migrations() {
    let rig = build(&layout(), 3, PageSize::Size4K, Options::on("sim").stamps());
    let part = VaRange::new(rig.range.start, 17_000 * 4096);
    let kept = rig.mm.keep_buffers(part).unwrap();
    // The whole range is larger than what is kept: fresh buffers, the kept set untouched.
    let (r, during) = migrate_watching(&rig, 0);
    r.unwrap();
    assert_eq!(during, Some(kept));
    assert_eq!(rig.mm.kept_buffers(), kept);
    // A small migration uses the thread's buffers.
    let small = VaRange::new(rig.range.start, 16 * 4096);
    let (r, during) = migrate_part_watching(&rig, small, 1);
    r.unwrap();
    assert_eq!(during, Some(kept));
    // The part itself fits: it uses them.
    let (r, during) = migrate_part_watching(&rig, part, 2);
    r.unwrap();
    assert_eq!(during.map(|k| k.bytes), Some(0));
    assert_given_back(rig.mm.kept_buffers(), kept, "the part");
    rig.verify();
    rig.finish();
}

#[test]
fn bad_ranges_and_oversized_requests_are_typed_errors_that_change_nothing() {
    let rig = build(&layout(), 3, PageSize::Size4K, Options::on("sim").stamps());
    let mm = &rig.mm;
    let kept = mm.keep_buffers(rig.range).unwrap();
    // Not a range of this address space, unaligned, empty, past the end of the range.
    let end = rig.range.start + rig.range.len;
    for bad in [
        VaRange::new(1 << 50, 4096),
        VaRange::new(rig.range.start + 1, 4096),
        VaRange::new(rig.range.start, 0),
        VaRange::new(end - 4096, 8192),
        VaRange::new(u64::MAX - 4095, 4096),
    ] {
        let e = mm.keep_buffers(bad).unwrap_err();
        assert!(matches!(e, Error::BadRange { .. }), "{bad}: {e}");
        assert_eq!(mm.kept_buffers(), kept, "{bad}: unchanged");
    }
    // The largest range an address space takes: u32::MAX pages (16 TiB of 4 KiB pages):
    // buffers of about 160 GiB, more than half of what any machine here has available.
    let huge_pages = u32::MAX as u64;
    let huge = VaRange::new(1 << 61, huge_pages * 4096);
    mm.create_range(huge, PageSize::Size4K).unwrap();
    let need = huge_pages * 40;
    match drm_pagemap::available_memory() {
        Some(avail) if need > avail / 2 => {
            let e = mm.keep_buffers(huge).unwrap_err();
            match &e {
                Error::OutOfMemory { range, bytes, .. } => {
                    assert_eq!(*range, huge);
                    assert!(*bytes >= need, "{e}");
                }
                other => panic!("not OutOfMemory: {other}"),
            }
            assert!(e.to_string().contains("kept migration buffers"), "{e}");
            // Nothing kept (the earlier set is released first).
            assert_eq!(mm.kept_buffers(), KeptBufferInfo::default());
        }
        avail => println!("skipped: the oversized case ({avail:?} bytes available)"),
    }
    // Migrations still work, and keeping works again.
    assert_eq!(mm.keep_buffers(rig.range).unwrap(), kept);
    let (r, _) = migrate_watching(&rig, 0);
    r.unwrap();
    rig.verify();
    rig.finish();
}

#[test]
fn concurrent_large_migrations_and_keeping_make_progress_and_lose_nothing() {
    // Three parts of 20,000 pages, each migrated around the three pagemaps by its own thread
    // (they contend for the one kept set), while a fourth keeps buffers for a part, for the
    // whole range and releases them, over and over. Every migration succeeds, all of it ends
    // well within the bound, and every byte is where it should be.
    const PARTS: usize = 3;
    const ROUNDS: usize = 4;
    const BOUND: std::time::Duration = std::time::Duration::from_secs(120);
    let text = vec![layout(); PARTS].join(",");
    let rig = build(&text, 3, PageSize::Size4K, Options::on("sim").stamps());
    let part = |k: usize| {
        VaRange::new(
            rig.range.start + (k * PAGES) as u64 * 4096,
            PAGES as u64 * 4096,
        )
    };
    /// Counts a worker as finished however it ends (a panic too), so the keeper stops.
    struct Finished<'a>(&'a std::sync::atomic::AtomicUsize);
    impl Drop for Finished<'_> {
        fn drop(&mut self) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
    let start = std::time::Instant::now();
    let done = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for k in 0..PARTS {
            let (rig, done, part) = (&rig, &done, part(k));
            s.spawn(move || {
                let _finished = Finished(done);
                // Round r to pagemap r % 3: the layout has no page in pagemap 0, and each
                // round's destination holds none of the part's pages.
                for round in 0..ROUNDS {
                    let (r, _) = migrate_part_watching(rig, part, (round % 3) as u8);
                    r.unwrap_or_else(|e| panic!("part {k} round {round}: {e}"));
                }
            });
        }
        let (rig, done) = (&rig, &done);
        s.spawn(move || {
            let mut i = 0;
            while done.load(std::sync::atomic::Ordering::SeqCst) < PARTS && start.elapsed() < BOUND
            {
                match i % 3 {
                    0 => assert_eq!(rig.mm.keep_buffers(part(i % PARTS)).unwrap().pages, PAGES),
                    1 => assert_eq!(rig.mm.keep_buffers(rig.range).unwrap().pages, PARTS * PAGES),
                    _ => {
                        rig.mm.release_buffers();
                    }
                }
                i += 1;
                std::thread::yield_now();
            }
        });
    });
    let took = start.elapsed();
    assert!(took < BOUND, "took {took:?}");
    let now = rig.layout();
    for k in 0..PARTS {
        let to = ((ROUNDS - 1) % 3) as u8;
        let part = &now[k * PAGES..(k + 1) * PAGES];
        assert!(
            part.iter().all(|&p| p == LayoutPage::Device(to)),
            "part {k} not all in pagemap {to}"
        );
    }
    rig.verify();
    rig.finish();
}
