//! How one copy call is split: runs of entries that are contiguous on both sides, long runs
//! to DMA, everything else to one gather/scatter kernel launch. No driver calls here.

use drm_pagemap_core::{DmaAddr, PageSize, Pfn};

/// The split of one call.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Split {
    /// Runs `(first entry, entries)` copied with one DMA each.
    pub dma: Vec<(usize, usize)>,
    /// Entries (not `NONE`) left to the kernel.
    pub kernel_entries: usize,
    /// Entries that are not `NONE`.
    pub live_entries: usize,
    /// One past the largest granule any entry's own page covers (0 when none).
    pub pfn_end: u64,
}

/// Splits `pages`/`addrs` (same length) of `page_size`: a maximal run of entries whose own
/// pfns and other-side addresses both advance by one page goes to DMA when its length in
/// bytes reaches `dma_min(first address of the run)`; `min_any` is a lower bound of
/// `dma_min` over every address (runs shorter than it never ask).
pub fn split(
    pages: &[Pfn],
    addrs: &[DmaAddr],
    page_size: PageSize,
    min_any: u64,
    dma_min: impl Fn(u64) -> u64,
) -> Split {
    let n = pages.len().min(addrs.len());
    let g = page_size.granules() as u32;
    let b = page_size.bytes();
    // Fast pass (vectorisable, no loop-carried state): live entries, the largest pfn, and
    // how many entries continue their predecessor. Fewer continuations than a DMA run needs
    // means no run can go to DMA: scattered pages, the common case, end here.
    let min_pages = min_any.div_ceil(b).max(1);
    let (live, max_pfn) =
        pages[..n]
            .iter()
            .zip(&addrs[..n])
            .fold((0usize, 0u32), |(l, m), (p, a)| {
                let on = a.0 != 0;
                (l + on as usize, m.max(if on { p.0 } else { 0 }))
            });
    // Continuations of the own side first (cheap); both sides only if that leaves a chance.
    let conts = |both: bool| -> u64 {
        if n < 2 {
            return 0;
        }
        let own = pages[1..n].iter().zip(&pages[..n - 1]);
        if !both {
            return own
                .map(|(p, pp)| (p.0 == pp.0.wrapping_add(g)) as u64)
                .sum();
        }
        own.zip(addrs[1..n].iter().zip(&addrs[..n - 1]))
            .map(|((p, pp), (a, pa))| {
                ((p.0 == pp.0.wrapping_add(g)) as u64)
                    & ((a.0 == pa.0.wrapping_add(b)) as u64)
                    & ((pa.0 != 0) as u64)
            })
            .sum()
    };
    let conts = match conts(false) {
        c if c + 1 < min_pages => c,
        _ => conts(true),
    };
    if live > 0 && conts + 1 < min_pages {
        return Split {
            dma: Vec::new(),
            kernel_entries: live,
            live_entries: live,
            pfn_end: max_pfn as u64 + g as u64,
        };
    }
    if live == 0 {
        return Split::default();
    }
    let mut out = Split::default();
    let mut max_pfn: Option<u32> = None;
    let mut i = 0;
    while i < n {
        let a = addrs[i].0;
        if a == 0 {
            i += 1;
            continue;
        }
        let mut j = i + 1;
        while j < n
            && pages[j].0 == pages[j - 1].0.wrapping_add(g)
            && addrs[j].0 == addrs[j - 1].0.wrapping_add(b)
        {
            j += 1;
        }
        let len = j - i;
        // The run's largest pfn is its last (it advances) unless it wrapped; check each end.
        let hi = pages[i].0.max(pages[j - 1].0);
        max_pfn = Some(max_pfn.map_or(hi, |m| m.max(hi)));
        let bytes = len as u64 * b;
        if bytes >= min_any && bytes >= dma_min(a) {
            out.dma.push((i, len));
        } else {
            out.kernel_entries += len;
        }
        out.live_entries += len;
        i = j;
    }
    out.pfn_end = max_pfn.map_or(0, |m| m as u64 + g as u64);
    out
}

/// How many runs `pages`/`addrs` make (as [`split`] forms them; entries without an address
/// belong to none), counting no further than `limit`.
pub fn count_runs(pages: &[Pfn], addrs: &[DmaAddr], page_size: PageSize, limit: usize) -> usize {
    let n = pages.len().min(addrs.len());
    let g = page_size.granules() as u32;
    let b = page_size.bytes();
    let mut runs = 0;
    for i in 0..n {
        if addrs[i].0 == 0 {
            continue;
        }
        let continues = i > 0
            && addrs[i - 1].0 != 0
            && pages[i].0 == pages[i - 1].0.wrapping_add(g)
            && addrs[i].0 == addrs[i - 1].0.wrapping_add(b);
        if !continues {
            runs += 1;
            if runs > limit {
                break;
            }
        }
    }
    runs
}

/// The entry ranges `[start, end)` the kernel copies: everything between DMA runs.
pub fn kernel_segments(split: &Split, n: usize) -> Vec<(usize, usize)> {
    let mut segs = Vec::with_capacity(split.dma.len() + 1);
    let mut at = 0;
    for &(s, len) in &split.dma {
        if s > at {
            segs.push((at, s));
        }
        at = s + len;
    }
    if at < n {
        segs.push((at, n));
    }
    segs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(v: &[u64]) -> Vec<DmaAddr> {
        v.iter().map(|&x| DmaAddr(x)).collect()
    }
    fn p(v: &[u32]) -> Vec<Pfn> {
        v.iter().map(|&x| Pfn(x)).collect()
    }

    #[test]
    fn scattered_pages_all_go_to_the_kernel() {
        let s = split(
            &p(&[0, 5, 2]),
            &a(&[0x10000, 0x30000, 0x20000]),
            PageSize::Size4K,
            8192,
            |_| 8192,
        );
        assert_eq!(s.dma, vec![]);
        assert_eq!(s.kernel_entries, 3);
        assert_eq!(s.pfn_end, 6);
    }

    #[test]
    fn long_runs_go_to_dma_and_holes_split_runs() {
        // 4 contiguous, a hole, 2 contiguous, 1 alone.
        let pages = p(&[10, 11, 12, 13, 14, 20, 21, 40]);
        let addrs = a(&[0x1000, 0x2000, 0x3000, 0x4000, 0, 0x9000, 0xa000, 0x5000]);
        let s = split(&pages, &addrs, PageSize::Size4K, 2 * 4096, |_| 3 * 4096);
        assert_eq!(s.dma, vec![(0, 4)]);
        assert_eq!(s.kernel_entries, 3);
        assert_eq!(s.live_entries, 7);
        assert_eq!(s.pfn_end, 41);
        assert_eq!(kernel_segments(&s, pages.len()), vec![(4, 8)]);
    }

    #[test]
    fn the_threshold_depends_on_the_address() {
        let pages = p(&[0, 1, 8, 9]);
        let addrs = a(&[0x1000, 0x2000, 0x100_0000, 0x100_1000]);
        let s = split(&pages, &addrs, PageSize::Size4K, 0, |x| {
            if x < 0x100_0000 { 8192 } else { 1 << 30 }
        });
        assert_eq!(s.dma, vec![(0, 2)]);
        assert_eq!(kernel_segments(&s, 4), vec![(2, 4)]);
    }

    #[test]
    fn own_contiguity_counts_in_pages_of_the_size() {
        // 64 KiB pages: pfns advance by 16 granules.
        let pages = p(&[0, 16, 32]);
        let addrs = a(&[0x10_0000, 0x11_0000, 0x12_0000]);
        let s = split(&pages, &addrs, PageSize::Size64K, 0, |_| 3 * 65536);
        assert_eq!(s.dma, vec![(0, 3)]);
        assert_eq!(s.pfn_end, 48);
        let s = split(&pages, &addrs, PageSize::Size4K, 0, |_| 1);
        assert_eq!(
            s.dma.len(),
            3,
            "4 KiB pages 16 granules apart are not contiguous"
        );
    }

    /// The plain algorithm, for comparison with the fast pass.
    fn reference(pages: &[Pfn], addrs: &[DmaAddr], ps: PageSize, min: u64) -> Split {
        let (g, b) = (ps.granules() as u32, ps.bytes());
        let mut out = Split::default();
        let mut i = 0;
        while i < pages.len() {
            if addrs[i].0 == 0 {
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < pages.len()
                && pages[j].0 == pages[j - 1].0 + g
                && addrs[j].0 == addrs[j - 1].0 + b
            {
                j += 1;
            }
            if (j - i) as u64 * b >= min {
                out.dma.push((i, j - i));
            } else {
                out.kernel_entries += j - i;
            }
            out.live_entries += j - i;
            out.pfn_end = out.pfn_end.max(pages[j - 1].0 as u64 + g as u64);
            i = j;
        }
        out
    }

    #[test]
    fn fast_pass_agrees_with_the_plain_algorithm() {
        let mut x = 0x1234_5678u64;
        let mut rnd = |m: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % m
        };
        for case in 0..400 {
            let n = rnd(300) as usize;
            let (mut pages, mut addrs) = (Vec::new(), Vec::new());
            let (mut p, mut a) = (rnd(1000) as u32, 0x10_0000 + rnd(1000) * 4096);
            while pages.len() < n {
                let run = rnd(if case % 3 == 0 { 200 } else { 6 }) + 1;
                for _ in 0..run {
                    pages.push(Pfn(p));
                    addrs.push(DmaAddr(if rnd(20) == 0 { 0 } else { a }));
                    p += 1;
                    a += 4096;
                }
                p += 1 + rnd(50) as u32;
                a += 4096 * (1 + rnd(50));
            }
            pages.truncate(n);
            addrs.truncate(n);
            let min = 4096 * (1 + rnd(64));
            let got = split(&pages, &addrs, PageSize::Size4K, min, |_| min);
            assert_eq!(
                got,
                reference(&pages, &addrs, PageSize::Size4K, min),
                "case {case}"
            );
        }
    }

    #[test]
    fn count_runs_agrees_with_split() {
        let pages = p(&[10, 11, 12, 13, 14, 20, 21, 40]);
        let addrs = a(&[0x1000, 0x2000, 0x3000, 0x4000, 0, 0x9000, 0xa000, 0x5000]);
        assert_eq!(count_runs(&pages, &addrs, PageSize::Size4K, 100), 3);
        assert_eq!(
            count_runs(&pages, &addrs, PageSize::Size4K, 1),
            2,
            "stops past the limit"
        );
        let s = split(&pages, &addrs, PageSize::Size4K, 0, |_| 0);
        assert_eq!(s.dma.len(), 3);
        assert_eq!(count_runs(&[], &[], PageSize::Size2M, 5), 0);
        assert_eq!(count_runs(&p(&[1, 2]), &a(&[0, 0]), PageSize::Size4K, 5), 0);
    }

    #[test]
    fn empty_and_all_holes() {
        let s = split(&[], &[], PageSize::Size2M, 0, |_| 0);
        assert_eq!(s, Split::default());
        let s = split(&p(&[1, 2]), &a(&[0, 0]), PageSize::Size2M, 0, |_| 0);
        assert_eq!(s.live_entries, 0);
        assert_eq!(kernel_segments(&s, 2), vec![(0, 2)]);
    }
}
