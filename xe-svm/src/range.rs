//! SVM ranges: the pieces a GPU VM cuts the CPU's address ranges into, each with the device's
//! page table for it.
//!
//! # Chunking
//! A fault at address `a` inside CPU range `C` (the mirrored allocation) creates the largest
//! SVM range of 2 MiB, 64 KiB or 4 KiB that is aligned to its size, holds `a`, lies inside `C`
//! and inside the attribute interval around `a`, is a multiple of `C`'s page size, and overlaps
//! no SVM range of the VM. If none fits (`C`'s pages are larger than the attribute interval
//! allows), the range is the one CPU page holding `a`.
//!
//! So SVM ranges are chosen per CPU range: several CPU ranges inside one 2 MiB block (small
//! or unaligned buffers) each get SVM ranges and page tables of their own, and a fault on one
//! leaves the others alone. An SVM range is stale only when the CPU range it was cut from is
//! gone from the address space (freed, or re-created with another extent or page size): a
//! new range cut in its block drops it, and a fault on it finds out (once the pages' generation
//! moved: the CPU range it was cut from is no longer exactly a range of the address space, or
//! its pages have another size) and cuts it again from the current CPU range.
//!
//! # Page table
//! Per page, the address by which the VM's device reaches it ([`Pte`]): its own memory, a
//! peer's, or system memory, as `device_map` / `map_frames` give it. The table stays valid
//! while the pages stay where they were when it was built; [`RangeState::backing`] records
//! that, and a fault compares it with the pages' current backing.

use drm_pagemap_core::{
    AddressSpace, AllocId, DeviceId, Direction, DmaAddr, Error as CoreError, HostFrame,
    PageBacking, PageSize, PagemapId, PagemapOps, Pfn, VaRange,
};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// The SVM range sizes, largest first.
pub const CHUNK_SIZES: [PageSize; 3] = [PageSize::Size2M, PageSize::Size64K, PageSize::Size4K];

/// Where a page the device maps lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Placement {
    /// Not populated: nothing mapped (only seen on ranges whose pages were never placed).
    None,
    /// System memory.
    System,
    /// A pagemap's device memory (the device's own, or a peer's).
    Device(PagemapId),
}

/// One page-table entry: the address by which the device reaches the page, and where the page
/// lives. `addr` is [`DmaAddr::NONE`] for [`Placement::None`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Pte {
    /// The device address of the page.
    pub addr: DmaAddr,
    /// Where the page lives.
    pub placement: Placement,
}

/// A device's page table for one SVM range, as [`crate::GpuVm::with_page_table`] shows it.
#[derive(Clone, Copy, Debug)]
pub struct PageTable<'a> {
    /// The SVM range.
    pub range: VaRange,
    /// The page size of its entries.
    pub page_size: PageSize,
    /// Whether the entries allow writes.
    pub writable: bool,
    /// One entry per page, in address order.
    pub ptes: &'a [Pte],
}

/// Which provider a batch of mappings came from, to undo it through the same one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MapSource {
    Host,
    Pagemap(PagemapId),
}

/// A few distinct allocations, without a heap allocation.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct FewAllocs {
    ids: [Option<AllocId>; 8],
    n: usize,
}

impl FewAllocs {
    /// Adds `id`; false if it was there already.
    pub(crate) fn add(&mut self, id: AllocId) -> bool {
        // Neighbouring pages mostly share an allocation: the last one answers most calls.
        if self.n > 0 && self.ids[self.n - 1] == Some(id) {
            return false;
        }
        if self.ids[..self.n].contains(&Some(id)) {
            return false;
        }
        if self.n < self.ids.len() {
            self.ids[self.n] = Some(id);
            self.n += 1;
        }
        true
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = AllocId> + '_ {
        self.ids[..self.n].iter().flatten().copied()
    }
}

/// One SVM range of a VM.
#[derive(Debug)]
pub(crate) struct SvmRange {
    pub va: VaRange,
    pub page_size: PageSize,
    /// The CPU range it was cut from (to recognise ranges outliving their CPU range).
    pub cpu: VaRange,
    state: Mutex<RangeState>,
}

/// The mutable part of an SVM range, behind its lock (held for a whole fault on the range).
#[derive(Debug, Default)]
pub(crate) struct RangeState {
    /// Removed from its VM: look it up again.
    pub dropped: bool,
    /// `ptes` match `backing`.
    pub mapped: bool,
    /// The mappings allow device writes.
    pub writable: bool,
    /// The pages' backing when the page table was built.
    pub backing: Vec<PageBacking>,
    /// The page table.
    pub ptes: Vec<Pte>,
    /// The backing as last looked at (reused buffer).
    pub scratch: Vec<PageBacking>,
    /// The address space's generation of the range when `backing` was taken: while it is
    /// the same, `backing` still holds (checked in O(1)).
    pub generation: u64,
    /// Where every page of `backing` lives, if all in one place.
    pub home: Option<Placement>,
    /// The allocations holding `backing`'s device pages, in order of first appearance (at
    /// most [`FewAllocs`]' capacity).
    pub allocs: FewAllocs,
    /// The backing a migration in flight will leave (reused buffer).
    predicted: Vec<PageBacking>,
    maps: Vec<(MapSource, Direction, usize, usize)>,
    addrs: Vec<DmaAddr>,
    frames: Vec<HostFrame>,
    pfns: Vec<Pfn>,
}

impl SvmRange {
    pub(crate) fn new(va: VaRange, page_size: PageSize, cpu: VaRange) -> SvmRange {
        SvmRange {
            va,
            page_size,
            cpu,
            state: Mutex::new(RangeState::default()),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, RangeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Picks the SVM range for a fault at `addr` inside `[lo, hi)` (the CPU range clipped to the
/// attribute interval), whose pages are `page_size`, avoiding `existing` ranges.
pub(crate) fn choose_chunk(
    addr: u64,
    page_size: PageSize,
    lo: u64,
    hi: u64,
    existing: &BTreeMap<u64, Arc<SvmRange>>,
) -> VaRange {
    for chunk in CHUNK_SIZES {
        if chunk < page_size {
            break;
        }
        let size = chunk.bytes();
        let start = addr - addr % size;
        let Some(end) = start.checked_add(size) else {
            continue;
        };
        if start < lo || end > hi {
            continue;
        }
        let overlaps = existing
            .range(..end)
            .next_back()
            .is_some_and(|(_, r)| r.va.end() > start);
        if !overlaps {
            return VaRange::new(start, size);
        }
    }
    let ps = page_size.bytes();
    VaRange::new(addr - addr % ps, ps)
}

fn placement(b: PageBacking) -> Placement {
    match b {
        PageBacking::Unpopulated => Placement::None,
        PageBacking::System(_) => Placement::System,
        PageBacking::Device { pagemap, .. } => Placement::Device(pagemap),
    }
}

fn source_of(b: PageBacking) -> Option<MapSource> {
    match b {
        PageBacking::Unpopulated => None,
        PageBacking::System(_) => Some(MapSource::Host),
        PageBacking::Device { pagemap, .. } => Some(MapSource::Pagemap(pagemap)),
    }
}

/// Where a page table finds the mapping operations of a pagemap (the SVM context).
pub(crate) trait OpsOf {
    /// The mapping operations of pagemap `id`, if it is known.
    fn ops_of(&self, id: PagemapId) -> Option<Arc<dyn PagemapOps>>;
}

/// What mapping pages of one range for one device needs.
pub(crate) struct MapCtx<'a> {
    /// The address space (its host memory maps system pages).
    pub mm: &'a AddressSpace,
    /// The mapping operations of the pagemaps.
    pub ops: &'a dyn OpsOf,
    /// The device the page table is for.
    pub device: DeviceId,
    /// The range (for messages).
    pub va: VaRange,
    /// Its page size.
    pub page_size: PageSize,
}

impl RangeState {
    /// Undoes every mapping of the page table.
    pub(crate) fn unmap(&mut self, cx: &MapCtx<'_>) {
        let (device, ps) = (cx.device, cx.page_size);
        for &(src, dir, s, e) in &self.maps {
            let addrs = &self.addrs[s..e];
            match src {
                MapSource::Host => cx.mm.host().unmap_frames(device, addrs, ps, dir),
                MapSource::Pagemap(id) => {
                    if let Some(o) = cx.ops.ops_of(id) {
                        o.device_unmap(device, addrs, ps, dir);
                    }
                }
            }
        }
        self.maps.clear();
        self.mapped = false;
    }

    /// Builds the page table from `scratch` (the current backing, of `generation`), mapping
    /// every page for the device. On failure nothing stays mapped.
    pub(crate) fn build(
        &mut self,
        cx: &MapCtx<'_>,
        writable: bool,
        generation: u64,
    ) -> Result<(), CoreError> {
        self.unmap(cx);
        let (mm, device, ps, range) = (cx.mm, cx.device, cx.page_size, cx.va);
        std::mem::swap(&mut self.backing, &mut self.scratch);
        let n = self.backing.len();
        let dir = if writable {
            Direction::FromDevice
        } else {
            Direction::ToDevice
        };
        self.addrs.clear();
        self.addrs.resize(n, DmaAddr::NONE);
        let mut i = 0;
        while i < n {
            let src = source_of(self.backing[i]);
            let mut j = i;
            while j < n && source_of(self.backing[j]) == src {
                j += 1;
            }
            let out = &mut self.addrs[i..j];
            let res = match src {
                None => Ok(()),
                Some(MapSource::Host) => {
                    self.frames.clear();
                    self.frames
                        .extend(self.backing[i..j].iter().map(|b| match b {
                            PageBacking::System(f) => *f,
                            _ => HostFrame(0),
                        }));
                    mm.host()
                        .map_frames(device, &self.frames, ps, dir, out)
                        .map_err(|source| CoreError::Backend {
                            range,
                            op: drm_pagemap_core::BackendOp::MapFrames,
                            pagemap: None,
                            device: Some(device),
                            source,
                        })
                }
                Some(MapSource::Pagemap(id)) => {
                    self.pfns.clear();
                    self.pfns.extend(self.backing[i..j].iter().map(|b| match b {
                        PageBacking::Device { pfn, .. } => *pfn,
                        _ => Pfn(0),
                    }));
                    match cx.ops.ops_of(id) {
                        None => Err(CoreError::UnknownPagemap { range, pagemap: id }),
                        Some(o) => {
                            o.device_map(device, &self.pfns, ps, dir, out)
                                .map_err(|source| CoreError::Backend {
                                    range,
                                    op: drm_pagemap_core::BackendOp::DeviceMap,
                                    pagemap: Some(id),
                                    device: Some(device),
                                    source,
                                })
                        }
                    }
                }
            };
            if let Err(e) = res {
                out.fill(DmaAddr::NONE);
                self.unmap(cx);
                std::mem::swap(&mut self.backing, &mut self.scratch);
                return Err(e);
            }
            if let Some(src) = src {
                self.maps.push((src, dir, i, j));
            }
            i = j;
        }
        self.ptes.clear();
        let mut allocs = FewAllocs::default();
        let first = self.backing.first().map(|&b| placement(b));
        let mut uniform = true;
        self.ptes
            .extend(self.backing.iter().zip(&self.addrs).map(|(&b, &addr)| {
                let placement = placement(b);
                uniform &= Some(placement) == first;
                if let PageBacking::Device { alloc, .. } = b {
                    allocs.add(alloc);
                }
                Pte { addr, placement }
            }));
        self.home = if uniform { first } else { None };
        self.allocs = allocs;
        self.generation = generation;
        self.mapped = true;
        self.writable = writable;
        Ok(())
    }

    /// Builds the page table for the backing a migration into `alloc` of `pagemap` leaves
    /// once it commits (page `k` in `pfns[k]`), while its copies are still running. The
    /// caller sets [`RangeState::generation`] once the migration has committed, or unmaps
    /// if it did not. `scratch` is kept.
    pub(crate) fn build_for(
        &mut self,
        cx: &MapCtx<'_>,
        writable: bool,
        pagemap: PagemapId,
        alloc: AllocId,
        pfns: &[Pfn],
    ) -> Result<(), CoreError> {
        self.predicted.clear();
        self.predicted
            .extend(pfns.iter().map(|&pfn| PageBacking::Device {
                pagemap,
                alloc,
                pfn,
            }));
        // build() takes its backing from `scratch`: lend it the prediction and take the
        // snapshot back afterwards.
        std::mem::swap(&mut self.scratch, &mut self.predicted);
        let r = self.build(cx, writable, 0);
        std::mem::swap(&mut self.scratch, &mut self.predicted);
        r
    }

    /// Whether `backing` is what the address space holds now for the range at generation
    /// `generation` (a debug check of [`RangeState::build_for`]'s prediction): `None` when
    /// the generation has moved on since.
    #[cfg(debug_assertions)]
    pub(crate) fn backing_matches(&mut self, cx: &MapCtx<'_>) -> Option<bool> {
        let g = cx
            .mm
            .backing_with_generation(cx.va, &mut self.predicted)
            .ok()?;
        (g == self.generation).then(|| self.predicted == self.backing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K4: u64 = 4 << 10;
    const K64: u64 = 64 << 10;
    const M2: u64 = 2 << 20;

    fn with(ranges: &[VaRange]) -> BTreeMap<u64, Arc<SvmRange>> {
        ranges
            .iter()
            .map(|&r| (r.start, Arc::new(SvmRange::new(r, PageSize::Size4K, r))))
            .collect()
    }

    #[test]
    fn largest_aligned_chunk_inside_the_allocation() {
        let none = BTreeMap::new();
        let base = 1 << 30;
        // A 4 MiB allocation: 2 MiB chunks.
        let r = choose_chunk(base + M2 + 5, PageSize::Size4K, base, base + 2 * M2, &none);
        assert_eq!(r, VaRange::new(base + M2, M2));
        // Allocation of 1 MiB + 64 KiB starting at a 2 MiB boundary: 64 KiB chunks.
        let r = choose_chunk(
            base + K64 + 1,
            PageSize::Size4K,
            base,
            base + (1 << 20) + K64,
            &none,
        );
        assert_eq!(r, VaRange::new(base + K64, K64));
        // 12 KiB allocation: 4 KiB chunks.
        let r = choose_chunk(
            base + 2 * K4 + 9,
            PageSize::Size4K,
            base,
            base + 3 * K4,
            &none,
        );
        assert_eq!(r, VaRange::new(base + 2 * K4, K4));
        // 64 KiB pages never give 4 KiB chunks; 2 MiB pages only 2 MiB chunks.
        let r = choose_chunk(base + 5, PageSize::Size64K, base, base + K64, &none);
        assert_eq!(r, VaRange::new(base, K64));
        let r = choose_chunk(base + 5, PageSize::Size2M, base, base + M2, &none);
        assert_eq!(r, VaRange::new(base, M2));
        // A 2 MiB page cut by an attribute interval: the page itself.
        let r = choose_chunk(base + 5, PageSize::Size2M, base, base + K64, &none);
        assert_eq!(r, VaRange::new(base, M2));
    }

    #[test]
    fn existing_ranges_shrink_the_chunk() {
        let base = 1 << 30;
        let existing = with(&[VaRange::new(base + K64, K64)]);
        let r = choose_chunk(base + 5, PageSize::Size4K, base, base + M2, &existing);
        assert_eq!(r, VaRange::new(base, K64));
        let existing = with(&[VaRange::new(base + K4, K4)]);
        let r = choose_chunk(base + 5, PageSize::Size4K, base, base + M2, &existing);
        assert_eq!(r, VaRange::new(base, K4));
    }
}
