//! Large ranges: one million 4 KiB pages spread over three peer devices, system memory and
//! holes, migrated to a fourth device in one call per source; and a range of 2 MiB pages.
//! Pages carry 8-byte stamps (first and last word) rather than full patterns, and most of
//! the range is holes, so memory stays modest.

mod common;

use common::{D, Options, R, backends, build, calls};
use drm_pagemap::layout::{self, LayoutPage};
use drm_pagemap::{Coalesce, CopyOp, MigrateDetails, MigrateOutcome, PageSize};

const MILLION: usize = 1 << 20;

/// A mixed head (every source interleaved in uneven runs) followed by a mostly-empty tail
/// with a block of every source every 64 Ki pages.
fn big_layout() -> String {
    let cycle = [
        "s*5", "1*3", ".*2", "2*7", "s*1", "3*4", ".*6", "1*2", "3*1", "2*2",
    ];
    let per_cycle: usize = 33;
    let head_cycles = 16384 / per_cycle;
    let mut items: Vec<String> = Vec::new();
    for _ in 0..head_cycles {
        items.extend(cycle.iter().map(|s| s.to_string()));
    }
    let head = head_cycles * per_cycle;
    let block: usize = 65536;
    let first_block = head.div_ceil(block) * block;
    items.push(format!(".*{}", first_block - head));
    let mut at = first_block;
    while at < MILLION {
        items.extend(
            ["s*64", "1*64", "2*64", "3*64"]
                .iter()
                .map(|s| s.to_string()),
        );
        items.push(format!(".*{}", block - 256));
        at += block;
    }
    items.join(",")
}

/// Calls of the seed's consecutive mode: one per change of key, holes joining the
/// destination's copy_to_devmem key, runs of holes only issuing nothing.
fn consecutive_calls(pages: &[LayoutPage], to: u8) -> Vec<(u8, CopyOp, usize)> {
    let key = |p: LayoutPage| match p {
        LayoutPage::Device(k) => (k, R),
        _ => (to, D),
    };
    let mut out: Vec<(u8, CopyOp, usize)> = Vec::new();
    let mut run: Option<((u8, CopyOp), usize)> = None;
    for &p in pages {
        let k = key(p);
        let moved = usize::from(p != LayoutPage::Hole);
        match &mut run {
            Some((rk, n)) if *rk == k => *n += moved,
            _ => {
                if let Some((rk, n)) = run.take()
                    && n > 0
                {
                    out.push((rk.0, rk.1, n));
                }
                run = Some((k, moved));
            }
        }
    }
    if let Some((rk, n)) = run
        && n > 0
    {
        out.push((rk.0, rk.1, n));
    }
    out
}

fn by_source_calls(pages: &[LayoutPage], to: u8) -> Vec<(u8, CopyOp, usize)> {
    let mut out: Vec<(u8, CopyOp, usize)> = Vec::new();
    for &p in pages {
        let k = match p {
            LayoutPage::Hole => continue,
            LayoutPage::System => (to, D),
            LayoutPage::Device(k) => (k, R),
        };
        match out.iter_mut().find(|c| (c.0, c.1) == k) {
            Some(c) => c.2 += 1,
            None => out.push((k.0, k.1, 1)),
        }
    }
    out
}

#[test]
fn million_pages_mixed_layout_to_one_device() {
    let text = big_layout();
    let pages = layout::parse(&text).unwrap();
    assert_eq!(pages.len(), MILLION);
    let want = by_source_calls(&pages, 0);
    // One call per distinct source: system, and each of the three peers.
    assert_eq!(want.len(), 4);
    assert_eq!(want[0].1, D);
    for b in backends() {
        let rig = build(&text, 4, PageSize::Size4K, Options::on(b).stamps());
        let r = rig.migrate(0, &MigrateDetails::default()).unwrap();
        assert_eq!(r.outcome, MigrateOutcome::Migrated);
        assert_eq!(r.pages, MILLION);
        assert_eq!(calls(&r.calls), want, "{b}");
        rig.assert_layout(&format!("0*{MILLION}"));
        rig.verify();
        assert!(rig.layout().iter().all(|p| *p != LayoutPage::Device(0)));
        if let Some(sim) = &rig.sim {
            // Sim-only: bringing a million mostly never-written pages home backs only the
            // written ones (all of them would be 4 GiB).
            let resident = sim.arena_host().arena().resident_bytes();
            assert!(resident < 1 << 30, "host memory backs {resident} bytes");
        }
        rig.finish();
    }
}

#[test]
fn million_pages_consecutive_mode_issues_the_seed_calls() {
    // The same layout in the seed's order: one call per change of source.
    let text = big_layout();
    let pages = layout::parse(&text).unwrap();
    let want = consecutive_calls(&pages, 0);
    assert!(
        want.len() > 3000,
        "the head interleaves sources: {} calls",
        want.len()
    );
    let rig = build(&text, 4, PageSize::Size4K, Options::on("sim").stamps());
    let details = MigrateDetails {
        coalesce: Coalesce::Consecutive,
        ..MigrateDetails::default()
    };
    let r = rig.migrate(0, &details).unwrap();
    assert_eq!(calls(&r.calls), want);
    rig.verify();
    rig.finish();
}

#[test]
fn two_megabyte_pages_mixed_layout() {
    let text = "s*8,1*8,.*24,2*8,s*4,.*40,1*4,3*8,.*24";
    let pages = layout::parse(text).unwrap();
    let want = by_source_calls(&pages, 0);
    assert_eq!(want, vec![(0, D, 12), (1, R, 12), (2, R, 8), (3, R, 8)]);
    for b in backends() {
        let rig = build(text, 4, PageSize::Size2M, Options::on(b).stamps());
        let r = rig.migrate(0, &MigrateDetails::default()).unwrap();
        assert_eq!(calls(&r.calls), want, "{b}");
        rig.assert_layout(&format!("0*{}", pages.len()));
        rig.verify();
        rig.finish();
    }
}
