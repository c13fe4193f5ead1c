//! The allocation table of an address space: every device-memory allocation, the pages that
//! still reference it (reverse map), and release exactly once when the last page is gone.

use crate::backend::{DevmemBacking, DevmemOps};
use crate::page::{MAX_ALLOC_SLOTS, RmapEntry};
use crate::types::{PageSize, PagemapId, Pfn};
use std::fmt;
use std::sync::Arc;
use std::time::Instant;

/// A handle to one device-memory allocation of an address space. Stale handles (released
/// allocations whose slot was reused) are recognised by their generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AllocId {
    pub(crate) slot: u32,
    pub(crate) generation: u32,
}

impl fmt::Display for AllocId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}.{}", self.slot, self.generation)
    }
}

/// Where an allocation is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllocState {
    /// Allocated, not yet migrated into.
    Reserved,
    /// A migration into it is running.
    Migrating,
    /// Its pages hold data of the address space.
    Live,
}

/// A public snapshot of one allocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllocationInfo {
    /// Its handle.
    pub id: AllocId,
    /// The pagemap it belongs to.
    pub pagemap: PagemapId,
    /// Pages allocated.
    pub npages: usize,
    /// Page size.
    pub page_size: PageSize,
    /// Pages of the address space that still reference it.
    pub live_pages: usize,
    /// Its state.
    pub state: AllocState,
    /// Until when a CPU access leaves its pages on the device (the timeslice).
    pub expires: Instant,
}

pub(crate) struct AllocRecord {
    pub generation: u32,
    pub state: AllocState,
    pub pagemap: PagemapId,
    pub page_size: PageSize,
    /// The pages, as `populate_devmem_pfn` gave them (shared: never changes).
    pub pfns: Arc<[Pfn]>,
    /// The range page each page backs: one entry per page once the allocation is live;
    /// empty before (a reserved or migrating allocation backs no page yet, and a large
    /// migration brings a reverse map it built while its copies ran).
    pub rmap: Vec<RmapEntry>,
    pub live: u32,
    pub expires: Instant,
    pub backing: Option<DevmemBacking>,
    pub devmem: Arc<dyn DevmemOps>,
}

/// What must be released after the table's lock is dropped: the backing, and the removed
/// record's page arrays (freed with the release, after the lock or on the reclaimer thread,
/// not under the lock: a migration that empties thousands of small source allocations
/// would otherwise free two arrays each while every other caller waits).
pub(crate) struct Release {
    pub ops: Arc<dyn DevmemOps>,
    pub backing: DevmemBacking,
    _arrays: Option<(Arc<[Pfn]>, Vec<RmapEntry>)>,
}

impl Release {
    /// A release of `backing` through `ops` (no arrays of a record).
    #[cfg(test)]
    pub(crate) fn new(ops: Arc<dyn DevmemOps>, backing: DevmemBacking) -> Release {
        Release {
            ops,
            backing,
            _arrays: None,
        }
    }
}

pub(crate) struct AllocTable {
    slots: Vec<Option<AllocRecord>>,
    generations: Vec<u32>,
    free: Vec<u32>,
    released: u64,
    /// Most allocations alive at once: [`MAX_ALLOC_SLOTS`] (lower in tests).
    pub limit: u32,
}

impl Default for AllocTable {
    fn default() -> Self {
        AllocTable {
            slots: Vec::new(),
            generations: Vec::new(),
            free: Vec::new(),
            released: 0,
            limit: MAX_ALLOC_SLOTS,
        }
    }
}

impl AllocTable {
    /// Adds `rec`; hands it back when the table is full (its backing is the caller's to
    /// release).
    pub(crate) fn insert(&mut self, mut rec: AllocRecord) -> Result<AllocId, Box<AllocRecord>> {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                if self.slots.len() as u32 >= self.limit {
                    return Err(Box::new(rec));
                }
                self.slots.push(None);
                self.generations.push(0);
                self.slots.len() as u32 - 1
            }
        };
        let generation = self.generations[slot as usize].wrapping_add(1);
        self.generations[slot as usize] = generation;
        rec.generation = generation;
        self.slots[slot as usize] = Some(rec);
        Ok(AllocId { slot, generation })
    }

    pub(crate) fn get(&self, id: AllocId) -> Option<&AllocRecord> {
        self.slots
            .get(id.slot as usize)?
            .as_ref()
            .filter(|r| r.generation == id.generation)
    }

    pub(crate) fn get_mut(&mut self, id: AllocId) -> Option<&mut AllocRecord> {
        self.slots
            .get_mut(id.slot as usize)?
            .as_mut()
            .filter(|r| r.generation == id.generation)
    }

    /// The record in `slot`, whatever its generation (page entries carry slots only).
    pub(crate) fn by_slot(&self, slot: u32) -> &AllocRecord {
        self.slots[slot as usize]
            .as_ref()
            .expect("a page references a released allocation")
    }

    pub(crate) fn by_slot_mut(&mut self, slot: u32) -> &mut AllocRecord {
        self.slots[slot as usize]
            .as_mut()
            .expect("a page references a released allocation")
    }

    pub(crate) fn id_of_slot(&self, slot: u32) -> AllocId {
        AllocId {
            slot,
            generation: self.by_slot(slot).generation,
        }
    }

    /// Removes the allocation and hands back what to release. Exactly once per allocation:
    /// the record (and its backing) leaves the table here.
    pub(crate) fn remove(&mut self, slot: u32) -> Option<Release> {
        let rec = self.slots.get_mut(slot as usize)?.take()?;
        self.free.push(slot);
        self.released += 1;
        let AllocRecord {
            pfns,
            rmap,
            backing,
            devmem,
            ..
        } = rec;
        backing.map(|backing| Release {
            ops: devmem,
            backing,
            _arrays: Some((pfns, rmap)),
        })
    }

    /// Drops `n` page references of `slot`; removes it when none is left.
    pub(crate) fn put_pages(&mut self, slot: u32, n: u32, out: &mut Vec<Release>) {
        let rec = self.by_slot_mut(slot);
        debug_assert!(rec.live >= n);
        rec.live -= n;
        if rec.live == 0 && rec.state == AllocState::Live {
            out.extend(self.remove(slot));
        }
    }

    pub(crate) fn info(&self, id: AllocId) -> Option<AllocationInfo> {
        let r = self.get(id)?;
        Some(AllocationInfo {
            id,
            pagemap: r.pagemap,
            npages: r.pfns.len(),
            page_size: r.page_size,
            live_pages: r.live as usize,
            state: r.state,
            expires: r.expires,
        })
    }

    pub(crate) fn all(&self) -> Vec<AllocationInfo> {
        (0..self.slots.len() as u32)
            .filter_map(|s| {
                let g = self.slots[s as usize].as_ref()?.generation;
                self.info(AllocId {
                    slot: s,
                    generation: g,
                })
            })
            .collect()
    }

    pub(crate) fn released(&self) -> u64 {
        self.released
    }

    /// Per pagemap with allocations: (pagemap, bytes they hold, how many).
    pub(crate) fn usage_by_pagemap(&self) -> Vec<(PagemapId, u64, u64)> {
        let mut out: Vec<(PagemapId, u64, u64)> = Vec::new();
        for r in self.slots.iter().flatten() {
            let bytes = r.pfns.len() as u64 * r.page_size.bytes();
            match out.iter_mut().find(|u| u.0 == r.pagemap) {
                Some(u) => {
                    u.1 += bytes;
                    u.2 += 1;
                }
                None => out.push((r.pagemap, bytes, 1)),
            }
        }
        out
    }
}

/// Releases allocations (outside any lock): one call per pagemap for all of its
/// allocations in `list` (the backend may batch them; the order between pagemaps does not
/// matter).
/// Releases allocations into which no copy was ever issued (outside any lock): see
/// [`DevmemOps::devmem_release_unused`].
pub(crate) fn release_unused(list: impl IntoIterator<Item = Release>) {
    for Release {
        ops, backing: b, ..
    } in list
    {
        tracing::trace!(
            target: "drm_pagemap",
            cookie = b.cookie,
            pages = b.npages,
            unused = true,
            "release"
        );
        ops.devmem_release_unused(b);
    }
}

pub(crate) fn release_all(list: Vec<Release>) {
    if list.is_empty() {
        return;
    }
    tracing::trace!(target: "drm_pagemap", allocations = list.len(), "release");
    if list.len() == 1 {
        for Release {
            ops, backing: b, ..
        } in list
        {
            ops.devmem_release(b);
        }
        return;
    }
    let mut groups: Vec<(Arc<dyn DevmemOps>, Vec<DevmemBacking>)> = Vec::new();
    for Release {
        ops, backing: b, ..
    } in list
    {
        match groups.iter_mut().find(|(o, _)| Arc::ptr_eq(o, &ops)) {
            Some((_, v)) => v.push(b),
            None => groups.push((ops, vec![b])),
        }
    }
    for (ops, mut v) in groups {
        if v.len() == 1 {
            ops.devmem_release(v.pop().expect("one"));
        } else {
            ops.devmem_release_many(&v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BackendError, CopyRequest, Fence, PageSize};
    use std::sync::Mutex;

    /// Records the cookies of each release call: one vector per call.
    #[derive(Default)]
    struct Calls(Mutex<Vec<Vec<u64>>>);

    impl DevmemOps for Calls {
        fn allocate(&self, _: usize, _: PageSize) -> Result<DevmemBacking, BackendError> {
            unreachable!()
        }
        fn populate_devmem_pfn(
            &self,
            _: &DevmemBacking,
            _: &mut [Pfn],
        ) -> Result<(), BackendError> {
            unreachable!()
        }
        fn copy_to_devmem(&self, _: &CopyRequest<'_>) -> Result<Fence, BackendError> {
            unreachable!()
        }
        fn copy_to_ram(&self, _: &CopyRequest<'_>) -> Result<Fence, BackendError> {
            unreachable!()
        }
        fn devmem_release(&self, b: DevmemBacking) {
            self.0.lock().unwrap().push(vec![b.cookie]);
        }
        fn devmem_release_many(&self, bs: &[DevmemBacking]) {
            self.0
                .lock()
                .unwrap()
                .push(bs.iter().map(|b| b.cookie).collect());
        }
        fn capacity_bytes(&self) -> u64 {
            0
        }
    }

    fn backing(cookie: u64) -> DevmemBacking {
        DevmemBacking {
            cookie,
            npages: 1,
            page_size: PageSize::Size4K,
            pre_migrate_fence: None,
        }
    }

    #[test]
    fn release_all_batches_each_pagemap_and_releases_each_once() {
        let (a, b) = (Arc::new(Calls::default()), Arc::new(Calls::default()));
        let (da, db): (Arc<dyn DevmemOps>, Arc<dyn DevmemOps>) = (a.clone(), b.clone());
        release_all(vec![
            Release::new(da.clone(), backing(1)),
            Release::new(da.clone(), backing(2)),
            Release::new(da.clone(), backing(3)),
            Release::new(db.clone(), backing(4)),
            Release::new(da.clone(), backing(5)),
        ]);
        assert_eq!(*a.0.lock().unwrap(), vec![vec![1, 2, 3, 5]]);
        assert_eq!(*b.0.lock().unwrap(), vec![vec![4]]);
        release_all(Vec::new());
        release_all(vec![Release::new(da.clone(), backing(6))]);
        assert_eq!(*a.0.lock().unwrap(), vec![vec![1, 2, 3, 5], vec![6]]);
    }

    /// Device memory that hands out allocations and records their releases.
    #[derive(Default)]
    struct Counting {
        next: std::sync::atomic::AtomicU64,
        released: Mutex<Vec<u64>>,
    }

    impl DevmemOps for Counting {
        fn allocate(
            &self,
            npages: usize,
            page_size: PageSize,
        ) -> Result<DevmemBacking, BackendError> {
            let cookie = self.next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(DevmemBacking {
                cookie,
                npages,
                page_size,
                pre_migrate_fence: None,
            })
        }
        fn populate_devmem_pfn(
            &self,
            _: &DevmemBacking,
            _: &mut [Pfn],
        ) -> Result<(), BackendError> {
            Ok(())
        }
        fn copy_to_devmem(&self, _: &CopyRequest<'_>) -> Result<Fence, BackendError> {
            unreachable!()
        }
        fn copy_to_ram(&self, _: &CopyRequest<'_>) -> Result<Fence, BackendError> {
            unreachable!()
        }
        fn devmem_release(&self, b: DevmemBacking) {
            self.released.lock().unwrap().push(b.cookie);
        }
        fn capacity_bytes(&self) -> u64 {
            1 << 30
        }
    }

    impl crate::PagemapOps for Counting {
        fn device_map(
            &self,
            _: crate::DeviceId,
            _: &[Pfn],
            _: PageSize,
            _: crate::Direction,
            _: &mut [crate::DmaAddr],
        ) -> Result<(), BackendError> {
            unreachable!()
        }
        fn device_unmap(
            &self,
            _: crate::DeviceId,
            _: &[crate::DmaAddr],
            _: PageSize,
            _: crate::Direction,
        ) {
        }
    }

    /// Host memory for a test that never touches system pages (the arena-backed one lives in
    /// drm-pagemap-testkit, which the core's unit tests cannot use).
    struct NoHost;

    impl crate::HostMemory for NoHost {
        fn alloc_frames(
            &self,
            _: PageSize,
            _: &mut [crate::HostFrame],
        ) -> Result<(), BackendError> {
            unreachable!("no system page in this test")
        }
        fn free_frames(&self, _: &[crate::HostFrame], _: PageSize) {}
        fn read(
            &self,
            _: crate::HostFrame,
            _: usize,
            _: &mut [u8],
        ) -> Result<(), crate::BackendError> {
            unreachable!("no system page in this test")
        }
        fn write(
            &self,
            _: crate::HostFrame,
            _: usize,
            _: &[u8],
        ) -> Result<(), crate::BackendError> {
            unreachable!("no system page in this test")
        }
        fn zero(&self, _: crate::HostFrame, _: PageSize) -> Result<(), crate::BackendError> {
            unreachable!("no system page in this test")
        }
        fn map_frames(
            &self,
            _: crate::DeviceId,
            _: &[crate::HostFrame],
            _: PageSize,
            _: crate::Direction,
            _: &mut [crate::DmaAddr],
        ) -> Result<(), BackendError> {
            unreachable!("no system page in this test")
        }
        fn unmap_frames(
            &self,
            _: crate::DeviceId,
            _: &[crate::DmaAddr],
            _: PageSize,
            _: crate::Direction,
        ) {
        }
        fn capacity_bytes(&self) -> u64 {
            0
        }
    }

    #[test]
    fn a_full_allocation_table_releases_the_refused_allocation() {
        // Regression: when the table was full, the new allocation's backing was dropped
        // without `devmem_release` (device memory leaked) and the error blamed the pagemap.
        let mm = crate::AddressSpace::new(Arc::new(NoHost));
        let dev = Arc::new(Counting::default());
        mm.add_pagemap(crate::Pagemap::new(
            PagemapId(4),
            crate::OwnerId(0),
            crate::DeviceId(2),
            "counting",
            dev.clone(),
            dev.clone(),
        ))
        .unwrap();
        mm.lock().allocs.limit = 2;
        let r = crate::VaRange::new(1 << 30, 4096);
        let a = mm
            .allocate_devmem(PagemapId(4), 1, PageSize::Size4K, r)
            .unwrap();
        mm.allocate_devmem(PagemapId(4), 1, PageSize::Size4K, r)
            .unwrap();
        let e = mm
            .allocate_devmem(PagemapId(4), 1, PageSize::Size4K, r)
            .unwrap_err();
        assert!(
            matches!(&e, crate::Error::Backend { op: crate::BackendOp::Allocate, source, .. }
                if source.kind == crate::BackendErrorKind::OutOfMemory),
            "{e:?}"
        );
        assert!(e.is_transient());
        for n in ["pagemap 4", "device 2", "at most 2 live allocations"] {
            assert!(e.to_string().contains(n), "{e} does not name {n:?}");
        }
        assert_eq!(
            *dev.released.lock().unwrap(),
            vec![2],
            "the third is released"
        );
        // A slot freed is a slot usable again.
        mm.release_devmem(a).unwrap();
        mm.allocate_devmem(PagemapId(4), 1, PageSize::Size4K, r)
            .unwrap();
        assert_eq!(*dev.released.lock().unwrap(), vec![2, 0]);
    }
}
