//! The shared SVM context ([`SvmInner`]): one address space, the pagemaps of its devices (with
//! the copy policy and accounting installed), the locks, statistics, and the moves every VM
//! shares: migrate a range in with room made by LRU eviction, evict a range, make it
//! system-resident. A VM's seat in it is a [`VmDevice`]; a range a VM moves is a [`Span`].
//!
//! # Locks
//! Order: an SVM range's lock (one fault at a time per range of a VM), then the context's
//! migrate lock, then the lock of the 2 MiB block of addresses the range lies in (one fault
//! at a time per block across every VM), then the engine's. A fault holds the migrate lock
//! for read and the block lock from its first look at the pages to its page table
//! ([`Locks`]), so the timeslice check, the migration and the table see the same pages; the
//! evict-and-retry path lets both go and takes the migrate lock for write, then the block
//! lock again. The VM's range map is only locked briefly and never while waiting for a
//! range's lock. Nothing that holds a later lock waits for an earlier one; waits for memory
//! (LRU eviction, migrations in flight) and for page locks are bounded in the engine and here.

use crate::accounting::Account;
use crate::config::{SvmConfig, fence_limit, timeslice_limit};
use crate::copy::PolicyOps;
use crate::error::SvmError;
use crate::range::{MapCtx, OpsOf, SvmRange};
use crate::stats::{Bucket, Counters};
use drm_pagemap_core::{
    AddressSpace, AllocId, BackendErrorKind, Coalesce, DeviceId, Error as CoreError,
    MigrateDetails, MigrateOutcome, OwnerId, PageBacking, PageSize, Pagemap, PagemapId, PagemapOps,
    Pfn, VaRange,
};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

/// What the context knows of one of its pagemaps.
pub(crate) struct PagemapInfo {
    pub device: DeviceId,
    pub owner: OwnerId,
    pub ops: Arc<dyn PagemapOps>,
    pub account: Arc<Account>,
}

/// Shared by the context and its VMs.
pub(crate) struct SvmInner {
    pub mm: Arc<AddressSpace>,
    pub config: SvmConfig,
    /// Taken for read by every fault that migrates, for write by the evict-and-retry path of
    /// a Busy migration: that path then runs with no other migration of this context racing it.
    pub migrate_lock: RwLock<()>,
    /// Serialise migrations of one 2 MiB block of addresses (every SVM range lies in one),
    /// whichever VM makes them: the timeslice check and the migration then see the same
    /// pages. Striped: blocks share [`STRIPES`] locks.
    stripes: Vec<Mutex<()>>,
    pagemaps: Vec<Option<PagemapInfo>>,
    /// The statistics of each device, sorted by device.
    devices: Vec<(DeviceId, Arc<Counters>)>,
}

/// How many block locks there are.
const STRIPES: usize = 64;

/// How long one wait for memory to free up lasts before the state is looked at again.
const STALL: Duration = Duration::from_millis(5);
/// How many such waits one allocation tolerates (about two seconds).
const MAX_STALLS: u32 = 400;
/// How many refused evictions (each bounded by the engine's own retries) one allocation
/// tolerates.
const MAX_REFUSED: u32 = 16;

/// A range one VM moves: its extent and page size, the device its errors name and whose
/// statistics count the move.
#[derive(Clone, Copy)]
pub(crate) struct Span<'a> {
    pub va: VaRange,
    pub page_size: PageSize,
    pub device: DeviceId,
    pub stats: &'a Counters,
}

/// A GPU VM's seat in the context: its device, the device's own memory, the owner whose
/// pagemaps the device maps directly, and the device's statistics.
pub(crate) struct VmDevice {
    pub svm: Arc<SvmInner>,
    pub device: DeviceId,
    pub local: PagemapId,
    pub owner: OwnerId,
    pub stats: Arc<Counters>,
}

impl VmDevice {
    /// `va` (pages of `page_size`) as this VM moves it.
    #[inline]
    pub(crate) fn span(&self, va: VaRange, page_size: PageSize) -> Span<'_> {
        Span {
            va,
            page_size,
            device: self.device,
            stats: &self.stats,
        }
    }

    /// What mapping the pages of `r` for the device needs.
    #[inline]
    pub(crate) fn map_ctx(&self, r: &SvmRange) -> MapCtx<'_> {
        MapCtx {
            mm: &self.svm.mm,
            ops: &*self.svm,
            device: self.device,
            va: r.va,
            page_size: r.page_size,
        }
    }
}

/// The context's migrate lock (read, or write on the evict-and-retry path) and the lock of
/// the range's 2 MiB block, held for a whole fault: the pages the fault looks at, the
/// timeslice check and the migration all see the same state. Fields drop in order: the block
/// lock before the migrate lock.
pub(crate) struct Locks<'a> {
    svm: &'a SvmInner,
    va: VaRange,
    block: Option<MutexGuard<'a, ()>>,
    read: Option<RwLockReadGuard<'a, ()>>,
    write: Option<RwLockWriteGuard<'a, ()>>,
}

impl<'a> Locks<'a> {
    /// The migrate lock for read, then the block lock of `va`.
    #[inline]
    pub(crate) fn read(svm: &'a SvmInner, va: VaRange) -> Locks<'a> {
        let read = svm.migrate_lock.read().unwrap_or_else(|p| p.into_inner());
        let block = svm.block_lock(va);
        Locks {
            svm,
            va,
            block: Some(block),
            read: Some(read),
            write: None,
        }
    }

    /// Trades the read side for the write side (both locks are let go in between).
    pub(crate) fn upgrade(&mut self) {
        if self.write.is_some() {
            return;
        }
        self.block = None;
        self.read = None;
        self.write = Some(
            self.svm
                .migrate_lock
                .write()
                .unwrap_or_else(|p| p.into_inner()),
        );
        self.block = Some(self.svm.block_lock(self.va));
    }
}

impl OpsOf for SvmInner {
    fn ops_of(&self, id: PagemapId) -> Option<Arc<dyn PagemapOps>> {
        SvmInner::ops_of(self, id)
    }
}

impl SvmInner {
    /// Builds the context over `mm` and adds `pagemaps` to it, each with the copy path's
    /// fence policy (following the pagemap's [`drm_pagemap_core::CopyCaps`], read here once)
    /// and the observers of its device memory (accounting, statistics) installed around its
    /// operations. See [`crate::Svm::new`].
    pub(crate) fn new(
        mm: Arc<AddressSpace>,
        pagemaps: Vec<Pagemap>,
        config: SvmConfig,
    ) -> Result<SvmInner, SvmError> {
        let mut infos: Vec<Option<PagemapInfo>> =
            (0..PagemapId::MAX_PAGEMAPS).map(|_| None).collect();
        let mut devices: Vec<(DeviceId, Arc<Counters>)> = Vec::new();
        for pm in &pagemaps {
            let dup = pagemaps.iter().filter(|p| p.id() == pm.id()).count() > 1;
            if dup || mm.pagemap(pm.id()).is_some() {
                return Err(SvmError::Core(CoreError::BadPagemap {
                    pagemap: pm.id(),
                    reason: "given twice, or already in the address space",
                }));
            }
        }
        let mut wrapped = Vec::with_capacity(pagemaps.len());
        for pm in pagemaps {
            let device = pm.device();
            let stats = match devices.iter().find(|(d, _)| *d == device) {
                Some((_, c)) => c.clone(),
                None => {
                    let c = Arc::new(Counters::default());
                    devices.push((device, c.clone()));
                    c
                }
            };
            let capacity = pm
                .devmem()
                .capacity_bytes()
                .min(config.capacity.unwrap_or(u64::MAX));
            let account = Arc::new(Account::new(pm.id(), device, capacity));
            let policy = PolicyOps {
                inner: pm.devmem().clone(),
                caps: pm.devmem().caps(),
                pagemap: pm.id(),
                device,
                stats,
                account: account.clone(),
                fence_timeout: fence_limit(config.fence_timeout),
            };
            infos[pm.id().0 as usize] = Some(PagemapInfo {
                device,
                owner: pm.owner(),
                ops: pm.ops().clone(),
                account,
            });
            wrapped.push(pm.with_ops(pm.ops().clone(), Arc::new(policy)));
        }
        for pm in wrapped {
            mm.add_pagemap(pm)?;
        }
        devices.sort_by_key(|(d, _)| *d);
        Ok(SvmInner {
            mm,
            config,
            migrate_lock: RwLock::new(()),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            pagemaps: infos,
            devices,
        })
    }

    /// The seat of a new VM for the device of `local`, whose own memory is `local`.
    pub(crate) fn vm_device(self: &Arc<Self>, local: PagemapId) -> Result<VmDevice, SvmError> {
        let info = self
            .info(local)
            .ok_or(SvmError::UnknownPagemap { pagemap: local })?;
        let (device, owner) = (info.device, info.owner);
        Ok(VmDevice {
            svm: self.clone(),
            device,
            local,
            owner,
            stats: self.counters(device),
        })
    }

    /// The devices of the context's pagemaps with their statistics, sorted by device.
    pub(crate) fn devices(&self) -> &[(DeviceId, Arc<Counters>)] {
        &self.devices
    }

    /// The lock of the 2 MiB block holding `va`.
    #[inline]
    pub(crate) fn block_lock(&self, va: VaRange) -> MutexGuard<'_, ()> {
        let block = va.start / PageSize::Size2M.bytes();
        let i = (block ^ (block >> 17)) as usize % STRIPES;
        self.stripes[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn info(&self, id: PagemapId) -> Option<&PagemapInfo> {
        self.pagemaps.get(id.0 as usize)?.as_ref()
    }

    fn counters(&self, device: DeviceId) -> Arc<Counters> {
        self.devices
            .iter()
            .find(|(d, _)| *d == device)
            .map(|(_, c)| c.clone())
            .expect("every device of a pagemap has counters")
    }

    /// The mapping operations of a pagemap (also one added to the address space by others).
    pub(crate) fn ops_of(&self, id: PagemapId) -> Option<Arc<dyn PagemapOps>> {
        match self.info(id) {
            Some(i) => Some(i.ops.clone()),
            None => self.mm.pagemap(id).map(|p| p.ops().clone()),
        }
    }

    /// Allocates room for `span` in the pagemap of `info`, evicting least-recently-used
    /// allocations of it until it fits. The allocation counts as in flight until
    /// [`Account::end_inflight`].
    fn allocate_room(&self, info: &PagemapInfo, span: Span<'_>) -> Result<AllocId, SvmError> {
        let Span {
            va,
            page_size: ps,
            device,
            stats,
        } = span;
        let npages = (va.len / ps.bytes()) as usize;
        let acct = &info.account;
        let pm = acct.pagemap;
        let (mut stalls, mut refused) = (0, 0);
        loop {
            match self.mm.allocate_devmem(pm, npages, ps, va) {
                Ok(id) => {
                    acct.begin_inflight();
                    return Ok(id);
                }
                Err(CoreError::Backend { source, .. })
                    if source.kind == BackendErrorKind::OutOfMemory => {}
                Err(source) => {
                    return Err(SvmError::Migrate {
                        range: va,
                        pagemap: pm,
                        device,
                        source,
                    });
                }
            }
            if let Some((victim, bytes)) = acct.pop_oldest() {
                let t = Instant::now();
                match self.mm.evict_to_ram(victim) {
                    Ok(_) => stats.lru_evictions.add(bytes, t.elapsed()),
                    Err(CoreError::NoSuchAllocation { .. }) => {}
                    Err(CoreError::Busy { .. }) => {
                        // Its pages are being moved by someone else; it will likely be
                        // released by that move. Try it again later.
                        acct.requeue(victim, bytes);
                        refused += 1;
                        acct.wait_change(STALL);
                    }
                    Err(source) => {
                        // Still allocated: keep it a candidate.
                        acct.requeue(victim, bytes);
                        return Err(SvmError::ToSystem {
                            range: va,
                            device,
                            source,
                        });
                    }
                }
            } else {
                // A migration whose copies timed out (a short fence timeout) keeps its device
                // memory until the copies finish: the engine's deferred cleanup. Finish those
                // whose copies are done, and wait for the others.
                let used = acct.used();
                let deferred = self.mm.deferred_cleanups();
                stalls += 1;
                if acct.used() < used {
                    continue;
                }
                if deferred > 0 || acct.inflight() > 0 {
                    // Other faults' allocations are being migrated into (or cleaned up): they
                    // become evictable (or are released) when those migrations end.
                    acct.wait_change(STALL);
                } else {
                    stalls = MAX_STALLS + 1;
                }
            }
            if stalls > MAX_STALLS || refused > MAX_REFUSED {
                return Err(SvmError::OutOfDeviceMemory {
                    range: va,
                    pagemap: pm,
                    device,
                    needed: npages as u64 * ps.bytes(),
                    used: acct.used(),
                    capacity: acct.capacity,
                });
            }
        }
    }

    /// Migrates `span` into `pm` (all pages or none) for `timeslice`, with the peer sources
    /// pushing their own pages; `while_copying` runs once the copies are issued, with the new
    /// allocation and its pfns. Returns the pages copied (0 when they were all there already)
    /// and, when pages moved, the range's generation right after (every page then in that
    /// allocation, in order).
    pub(crate) fn migrate_range(
        &self,
        span: Span<'_>,
        pm: PagemapId,
        timeslice: Duration,
        while_copying: &mut dyn FnMut(AllocId, &[Pfn]),
    ) -> Result<(usize, Option<u64>), SvmError> {
        let Span {
            va,
            page_size: ps,
            device,
            stats,
        } = span;
        let info = self
            .info(pm)
            .ok_or(SvmError::UnknownPagemap { pagemap: pm })?;
        let t = Instant::now();
        let alloc = self.allocate_room(info, span)?;
        let details = MigrateDetails {
            timeslice: timeslice_limit(timeslice),
            can_migrate_same_pagemap: false,
            source_peer_migrates: true,
            coalesce: Coalesce::BySource,
            fence_timeout: fence_limit(self.config.fence_timeout),
            ..MigrateDetails::default()
        };
        let mut work = |pfns: &[Pfn]| while_copying(alloc, pfns);
        match self
            .mm
            .migrate_to_devmem_with(alloc, va, &details, &mut work)
        {
            Ok(rep) if rep.outcome == MigrateOutcome::Migrated => {
                info.account.end_inflight(Some((alloc, va.len)));
                let pages: usize = rep.calls.iter().map(|c| c.pages).sum();
                stats.to_device[Bucket::of(va.len).index()]
                    .add(pages as u64 * ps.bytes(), t.elapsed());
                if info.account.needs_prune() {
                    info.account.prune(|id| self.mm.allocation(id).is_some());
                }
                Ok((pages, rep.generation))
            }
            Ok(_) => {
                info.account.end_inflight(None);
                Ok((0, None))
            }
            Err(source) => {
                info.account.end_inflight(None);
                Err(SvmError::Migrate {
                    range: va,
                    pagemap: pm,
                    device,
                    source,
                })
            }
        }
    }

    /// Moves every device page of `span` to system memory (evicting the allocations that
    /// hold them). `buf` is scratch space. Returns the pages moved.
    pub(crate) fn evict_range(
        &self,
        span: Span<'_>,
        buf: &mut Vec<PageBacking>,
    ) -> Result<usize, SvmError> {
        let Span {
            va,
            page_size: ps,
            device,
            stats,
        } = span;
        let to_sys = |source| SvmError::ToSystem {
            range: va,
            device,
            source,
        };
        self.mm.backing(va, buf).map_err(to_sys)?;
        let mut allocs: Vec<AllocId> = Vec::new();
        for b in buf.iter() {
            if let PageBacking::Device { alloc, .. } = *b
                && !allocs.contains(&alloc)
            {
                allocs.push(alloc);
            }
        }
        let mut moved = 0;
        for a in allocs {
            let t = Instant::now();
            match self.mm.evict_to_ram(a) {
                Ok(rep) => {
                    moved += rep.pages;
                    stats.to_system[Bucket::of(va.len).index()]
                        .add(rep.pages as u64 * ps.bytes(), t.elapsed());
                }
                Err(CoreError::NoSuchAllocation { .. }) => {}
                Err(e) => return Err(to_sys(e)),
            }
        }
        Ok(moved)
    }

    /// Makes every page of `span` a system page (device pages come back through their
    /// device, honouring timeslices; holes get zeroed pages). `before` is the backing seen
    /// last.
    pub(crate) fn to_system(&self, span: Span<'_>, before: &[PageBacking]) -> Result<(), SvmError> {
        let Span {
            va,
            page_size: ps,
            device,
            stats,
        } = span;
        let device_pages = before
            .iter()
            .filter(|b| matches!(b, PageBacking::Device { .. }))
            .count();
        let t = Instant::now();
        self.mm.populate(va).map_err(|source| SvmError::ToSystem {
            range: va,
            device,
            source,
        })?;
        if device_pages > 0 {
            stats.to_system[Bucket::of(va.len).index()]
                .add(device_pages as u64 * ps.bytes(), t.elapsed());
        }
        Ok(())
    }
}
