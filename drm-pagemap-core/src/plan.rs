//! Planning a migration: classify every page by who copies it and with which operation, then
//! group pages into copy calls. Pure functions over the packed entries; two linear passes,
//! no allocation per page.
//!
//! Key of a page = (executor pagemap, op):
//! - hole or system page: (destination, `copy_to_devmem`); holes move no data.
//! - page of a peer pagemap (same owner): with `source_peer_migrates` (peer, `copy_to_ram`),
//!   the source pushes; without it (destination, `copy_to_devmem`), the destination reads.
//! - page already in the destination: with `can_migrate_same_pagemap`, as upstream's table
//!   (section 3.7): (destination, `copy_to_ram`) with `source_peer_migrates`, else
//!   (destination, `copy_to_devmem`). Without it: all local → "not needed"; some → Busy.
//! - page of another owner: Busy, nothing collected.

use crate::error::BusyReason;
use crate::page::{Kind, PageEntry, same_prefix};
use crate::types::{CopyOp, OwnerId, PagemapId};

/// How pages of one key are grouped into copy calls.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Coalesce {
    /// One copy call per distinct (executor, op) over the whole range, ordered by each key's
    /// first page. A source that reappears costs nothing extra.
    #[default]
    BySource,
    /// The seed's order: a new call at every change of key; holes share the destination's
    /// `copy_to_devmem` key. Kept so benches can compare.
    Consecutive,
}

/// One planned copy call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlannedCall {
    /// The pagemap whose device executes it.
    pub executor: PagemapId,
    /// The operation.
    pub op: CopyOp,
    /// Index (in the range) of the call's first page.
    pub first_page: u32,
    /// The call's pages are `order[start..end]`.
    pub start: u32,
    /// End of the call's pages in `order`.
    pub end: u32,
}

impl PlannedCall {
    /// Pages the call moves.
    pub fn pages(&self) -> usize {
        (self.end - self.start) as usize
    }
}

/// The copy calls of one migration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Calls in issue order.
    pub calls: Vec<PlannedCall>,
    /// Page indices (in the range), grouped by call. Holes do not appear.
    pub order: Vec<u32>,
}

/// What planning concluded: the result of [`AddressSpace::plan`](crate::AddressSpace::plan),
/// and what [`AddressSpace::migrate`](crate::AddressSpace::migrate) executes.
///
/// Each page is keyed by who copies it and how (executor pagemap, op):
/// - a hole or system page: (destination, `copy_to_devmem`); holes move no data;
/// - a page of a peer pagemap (same owner): (peer, `copy_to_ram`) with
///   `source_peer_migrates` (the source pushes), else (destination, `copy_to_devmem`);
/// - a page already in the destination: with `can_migrate_same_pagemap`, (destination,
///   `copy_to_ram`) with `source_peer_migrates`, else (destination, `copy_to_devmem`);
///   without it, all local is [`Classified::NotNeeded`] and some local is busy;
/// - a page of another owner: busy, nothing collected.
///
/// Pages of one key are grouped into calls as [`Coalesce`] says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Classified {
    /// Every page is already in the destination pagemap.
    NotNeeded,
    /// The migration cannot proceed; the pagemap is the one that caused it, if any.
    Busy(BusyReason, Option<PagemapId>),
    /// Copy calls to issue.
    Plan(Plan),
}

/// The inputs that classify a page.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PlanParams<'a> {
    pub dest: PagemapId,
    /// Owner of each pagemap id (`None`: unknown).
    pub owners: &'a [Option<OwnerId>; PagemapId::MAX_PAGEMAPS],
    pub source_peer_migrates: bool,
    pub can_migrate_same_pagemap: bool,
    pub coalesce: Coalesce,
}

const HOLE_KEY: u16 = u16::MAX;

#[inline]
const fn key(executor: PagemapId, op: CopyOp) -> u16 {
    ((executor.0 as u16) << 1) | matches!(op, CopyOp::ToRam) as u16
}

#[inline]
const fn unkey(k: u16) -> (PagemapId, CopyOp) {
    (
        PagemapId((k >> 1) as u8),
        if k & 1 == 1 {
            CopyOp::ToRam
        } else {
            CopyOp::ToDevmem
        },
    )
}

/// Key of one page (holes: `HOLE_KEY`), given the page is collectable.
#[inline]
fn page_key(e: PageEntry, p: &PlanParams<'_>, dest_devmem: u16) -> u16 {
    match e.kind() {
        Kind::Hole => HOLE_KEY,
        Kind::System => dest_devmem,
        Kind::Device => {
            let src = e.pagemap();
            if p.source_peer_migrates {
                key(src, CopyOp::ToRam)
            } else {
                dest_devmem
            }
        }
    }
}

/// Bits of an entry that decide its key: the kind, and for device pages the pagemap.
const CLASS_MASK: u64 = (0b11 << 62) | (0xff << 53);

/// The end of the run of pages from `i` that share `entries[i]`'s key (same kind, and the
/// same pagemap for device pages; frames and allocation pages do not matter).
#[inline]
fn run_end(entries: &[PageEntry], i: usize) -> usize {
    let e = entries[i];
    let mask = if e.kind() == Kind::Device {
        CLASS_MASK
    } else {
        0b11 << 62
    };
    i + 1 + same_prefix(&entries[i + 1..], mask, e.0 & mask)
}

/// What [`plan_into`] concluded (the calls are in its output when it says `Plan`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    NotNeeded,
    Busy(BusyReason, Option<PagemapId>),
    Plan,
}

/// Classifies `entries` (unlocked values) and plans the copy calls.
pub(crate) fn plan(entries: &[PageEntry], p: &PlanParams<'_>) -> Classified {
    let mut out = Plan::default();
    match plan_into(entries, p, &mut out) {
        Verdict::NotNeeded => Classified::NotNeeded,
        Verdict::Busy(reason, pm) => Classified::Busy(reason, pm),
        Verdict::Plan => Classified::Plan(out),
    }
}

/// [`plan`] into `out` (cleared first; its buffers are reused), for callers that plan often.
pub(crate) fn plan_into(entries: &[PageEntry], p: &PlanParams<'_>, out: &mut Plan) -> Verdict {
    let dest_owner = p.owners[p.dest.0 as usize];
    let dest_devmem = key(p.dest, CopyOp::ToDevmem);
    out.calls.clear();
    out.order.clear();
    // Pass 1 (a run of pages of one key at a time): ownership checks, local count, and one
    // call per key in order of its first page (the walk is in address order), whose `end`
    // counts the key's pages for now. `slot_of[key]`: the key's call.
    let mut own = 0usize;
    let mut moved = 0usize;
    let mut slot_of = [u16::MAX; 512];
    let calls = &mut out.calls;
    let mut i = 0;
    while i < entries.len() {
        let e = entries[i];
        let end = run_end(entries, i);
        if e.kind() == Kind::Device {
            let src = e.pagemap();
            if p.owners[src.0 as usize] != dest_owner || dest_owner.is_none() {
                return Verdict::Busy(BusyReason::ForeignOwner, Some(src));
            }
            if src == p.dest {
                own += end - i;
            }
        }
        let k = page_key(e, p, dest_devmem);
        if k != HOLE_KEY {
            let slot = &mut slot_of[k as usize];
            if *slot == u16::MAX {
                *slot = calls.len() as u16;
                let (executor, op) = unkey(k);
                calls.push(PlannedCall {
                    executor,
                    op,
                    first_page: i as u32,
                    start: 0,
                    end: 0,
                });
            }
            calls[*slot as usize].end += (end - i) as u32;
            moved += end - i;
        }
        i = end;
    }
    if own == entries.len() {
        return Verdict::NotNeeded;
    }
    if own > 0 && !p.can_migrate_same_pagemap {
        return Verdict::Busy(BusyReason::Fragmentation, Some(p.dest));
    }
    out.order.resize(moved, 0);
    match p.coalesce {
        Coalesce::BySource => by_source(entries, p, dest_devmem, &slot_of, out),
        Coalesce::Consecutive => {
            out.calls.clear();
            consecutive(entries, p, dest_devmem, &mut out.calls, &mut out.order);
        }
    }
    Verdict::Plan
}

/// Lays out the calls of pass 1 in `order` (each key's pages in address order).
fn by_source(
    entries: &[PageEntry],
    p: &PlanParams<'_>,
    dest_devmem: u16,
    slot_of: &[u16; 512],
    out: &mut Plan,
) {
    // Each call's pages start where the previous call's end; `end` becomes its cursor.
    let mut at = 0u32;
    for c in &mut out.calls {
        let n = c.end;
        c.start = at;
        c.end = at;
        at += n;
    }
    // Pass 2, a run at a time: each key's pages in address order.
    let mut i = 0;
    while i < entries.len() {
        let end = run_end(entries, i);
        let k = page_key(entries[i], p, dest_devmem);
        if k != HOLE_KEY {
            let c = &mut out.calls[slot_of[k as usize] as usize];
            let o = &mut out.order[c.end as usize..c.end as usize + (end - i)];
            for (o, page) in o.iter_mut().zip(i as u32..) {
                *o = page;
            }
            c.end += (end - i) as u32;
        }
        i = end;
    }
}

fn consecutive(
    entries: &[PageEntry],
    p: &PlanParams<'_>,
    dest_devmem: u16,
    calls: &mut Vec<PlannedCall>,
    order: &mut [u32],
) {
    let mut at = 0u32;
    let mut run_key = u16::MAX - 1;
    let mut run_first = 0u32;
    let mut run_start = 0u32;
    let flush = |calls: &mut Vec<PlannedCall>, k: u16, first: u32, start: u32, end: u32| {
        // A run of holes only moves nothing: no call.
        if end > start {
            let (executor, op) = unkey(k);
            calls.push(PlannedCall {
                executor,
                op,
                first_page: first,
                start,
                end,
            });
        }
    };
    for (i, &e) in entries.iter().enumerate() {
        let k = page_key(e, p, dest_devmem);
        // Holes share the destination's copy_to_devmem key (the seed's rule).
        let run = if k == HOLE_KEY { dest_devmem } else { k };
        if run != run_key {
            if i > 0 {
                flush(calls, run_key, run_first, run_start, at);
            }
            run_key = run;
            run_first = i as u32;
            run_start = at;
        }
        if k != HOLE_KEY {
            if at == run_start {
                run_first = i as u32;
            }
            order[at as usize] = i as u32;
            at += 1;
        }
    }
    if !entries.is_empty() {
        flush(calls, run_key, run_first, run_start, at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::HostFrame;

    fn entries(layout: &str) -> Vec<PageEntry> {
        layout
            .chars()
            .enumerate()
            .map(|(i, c)| match c {
                's' => PageEntry::system(HostFrame(i as u64)),
                '.' => PageEntry::HOLE,
                d => PageEntry::device(PagemapId(d as u8 - b'0'), 0, i as u32),
            })
            .collect()
    }

    fn owners() -> [Option<OwnerId>; 256] {
        let mut o = [None; 256];
        for (i, slot) in o.iter_mut().enumerate().take(8) {
            *slot = Some(OwnerId(if i == 7 { 99 } else { 1 }));
        }
        o
    }

    fn calls(layout: &str, dest: u8, spm: bool, cms: bool, coalesce: Coalesce) -> Classified {
        let o = owners();
        plan(
            &entries(layout),
            &PlanParams {
                dest: PagemapId(dest),
                owners: &o,
                source_peer_migrates: spm,
                can_migrate_same_pagemap: cms,
                coalesce,
            },
        )
    }

    fn summary(c: &Classified) -> Vec<(u8, CopyOp, usize)> {
        match c {
            Classified::Plan(p) => p
                .calls
                .iter()
                .map(|c| (c.executor.0, c.op, c.pages()))
                .collect(),
            other => panic!("not a plan: {other:?}"),
        }
    }

    use CopyOp::{ToDevmem as D, ToRam as R};

    #[test]
    fn issue_example_by_source_and_consecutive() {
        let c = calls("ss00s11s0", 2, true, false, Coalesce::BySource);
        assert_eq!(summary(&c), vec![(2, D, 4), (0, R, 3), (1, R, 2)]);
        let c = calls("ss00s11s0", 2, true, false, Coalesce::Consecutive);
        assert_eq!(
            summary(&c),
            vec![
                (2, D, 2),
                (0, R, 2),
                (2, D, 1),
                (1, R, 2),
                (2, D, 1),
                (0, R, 1)
            ]
        );
    }

    #[test]
    fn by_source_order_holds_the_pages_of_each_call() {
        let Classified::Plan(p) = calls("1s.1s", 0, true, false, Coalesce::BySource) else {
            panic!()
        };
        assert_eq!(p.order, vec![0, 3, 1, 4]);
        assert_eq!(p.calls[0].first_page, 0);
        assert_eq!(p.calls[1].first_page, 1);
    }

    #[test]
    fn holes_split_peer_runs_only_in_consecutive_mode() {
        // Upstream scenario 7: A H A.
        let c = calls("1.1", 0, true, false, Coalesce::Consecutive);
        assert_eq!(summary(&c), vec![(1, R, 1), (1, R, 1)]);
        let c = calls("1.1", 0, true, false, Coalesce::BySource);
        assert_eq!(summary(&c), vec![(1, R, 2)]);
        // Holes join the destination's system run.
        let c = calls("s.s", 0, true, false, Coalesce::Consecutive);
        assert_eq!(summary(&c), vec![(0, D, 2)]);
    }

    #[test]
    fn local_and_foreign_pages() {
        assert_eq!(
            calls("0000", 0, true, false, Coalesce::BySource),
            Classified::NotNeeded
        );
        assert_eq!(
            calls("0000", 0, true, true, Coalesce::BySource),
            Classified::NotNeeded
        );
        assert_eq!(
            calls("0sss", 0, true, false, Coalesce::BySource),
            Classified::Busy(BusyReason::Fragmentation, Some(PagemapId(0)))
        );
        assert_eq!(
            summary(&calls("0sss", 0, true, true, Coalesce::BySource)),
            vec![(0, R, 1), (0, D, 3)]
        );
        assert_eq!(
            summary(&calls("0sss", 0, false, true, Coalesce::BySource)),
            vec![(0, D, 4)]
        );
        assert_eq!(
            calls("7sss", 0, true, false, Coalesce::BySource),
            Classified::Busy(BusyReason::ForeignOwner, Some(PagemapId(7)))
        );
    }

    #[test]
    fn destination_reads_peers_without_source_peer_migrates() {
        assert_eq!(
            summary(&calls("11ss", 0, false, false, Coalesce::BySource)),
            vec![(0, D, 4)]
        );
    }

    #[test]
    fn holes_only_issue_no_call() {
        assert_eq!(
            summary(&calls("....", 0, true, false, Coalesce::BySource)),
            vec![]
        );
        assert_eq!(
            summary(&calls("....", 0, true, false, Coalesce::Consecutive)),
            vec![]
        );
    }
}
