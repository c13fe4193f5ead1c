//! The SVM context: one address space, the pagemaps of its devices (with the copy policy and
//! accounting installed), the migrate lock, statistics, and the moves every VM shares
//! (migrate a range in with room made by LRU eviction, evict a range, make it system-resident).

use crate::accounting::{Account, MemoryUsage};
use crate::copy::PolicyOps;
use crate::error::SvmError;
use crate::stats::{Bucket, Counters, Stats};
use crate::vm::GpuVm;
use drm_pagemap_core::{
    AddressSpace, AllocId, BackendErrorKind, Coalesce, DeviceId, Error as CoreError,
    MigrateDetails, MigrateOutcome, OwnerId, PageBacking, PageSize, Pagemap, PagemapId, PagemapOps,
    Pfn, VaRange,
};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

/// How an SVM context behaves.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SvmConfig {
    /// Most bytes of device memory each pagemap may hold at once; `None`: the pagemap's own
    /// capacity. When a fault needs more, least-recently-used allocations are evicted.
    pub capacity: Option<u64>,
    /// Longest wait for any fence (copies, pre-migrate fences); `None`: no limit. Any length
    /// is accepted: `Some(Duration::ZERO)` times out every wait for a fence that has not
    /// signalled yet (the fault fails with a typed error or is served from system memory,
    /// no data is lost), and a timeout of [`FOREVER`] or longer (`Duration::MAX`) is the same
    /// as `None`.
    pub fence_timeout: Option<Duration>,
}

/// About a century: later than any instant a process reaches. User durations at least this
/// long mean "no limit" — a fence timeout this long is no timeout, a timeslice this long keeps
/// the pages until they are evicted — and are cut to it before they meet an `Instant`, so no
/// deadline arithmetic can overflow (`Duration::MAX` is the natural "forever").
pub const FOREVER: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// A fence timeout as waits take it: `None` (no deadline) for one of [`FOREVER`] or longer.
pub(crate) fn fence_limit(timeout: Option<Duration>) -> Option<Duration> {
    timeout.filter(|t| *t < FOREVER)
}

/// A timeslice as the engine takes it: at most [`FOREVER`].
pub(crate) fn timeslice_limit(timeslice: Duration) -> Duration {
    timeslice.min(FOREVER)
}

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

impl SvmInner {
    /// The lock of the 2 MiB block holding `va`.
    pub(crate) fn block_lock(&self, va: VaRange) -> MutexGuard<'_, ()> {
        let block = va.start / PageSize::Size2M.bytes();
        let i = (block ^ (block >> 17)) as usize % STRIPES;
        self.stripes[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn info(&self, id: PagemapId) -> Option<&PagemapInfo> {
        self.pagemaps.get(id.0 as usize)?.as_ref()
    }

    pub(crate) fn counters(&self, device: DeviceId) -> Arc<Counters> {
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

    /// Allocates `npages` in `pm` for `va`, evicting least-recently-used allocations of `pm`
    /// until it fits. The allocation counts as in flight until [`Account::end_inflight`].
    fn allocate_room(
        &self,
        info: &PagemapInfo,
        npages: usize,
        ps: PageSize,
        va: VaRange,
        stats: &Counters,
        device: DeviceId,
    ) -> Result<AllocId, SvmError> {
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

    /// Migrates `va` into `pm` (all pages or none), with the peer sources pushing their own
    /// pages; `while_copying` runs once the copies are issued, with the new allocation and
    /// its pfns. Returns the pages copied (0 when they were all there already) and, when
    /// pages moved, the range's generation right after (every page then in that
    /// allocation, in order).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn migrate_range(
        &self,
        va: VaRange,
        ps: PageSize,
        pm: PagemapId,
        timeslice: Duration,
        device: DeviceId,
        stats: &Counters,
        while_copying: &mut dyn FnMut(AllocId, &[Pfn]),
    ) -> Result<(usize, Option<u64>), SvmError> {
        let info = self
            .info(pm)
            .ok_or(SvmError::UnknownPagemap { pagemap: pm })?;
        let npages = (va.len / ps.bytes()) as usize;
        let t = Instant::now();
        let alloc = self.allocate_room(info, npages, ps, va, stats, device)?;
        let details = MigrateDetails {
            timeslice: timeslice_limit(timeslice),
            can_migrate_same_pagemap: false,
            source_peer_migrates: true,
            coalesce: Coalesce::BySource,
            fence_timeout: fence_limit(self.config.fence_timeout),
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

    /// Moves every device page of `va` to system memory (evicting the allocations that hold
    /// them). `buf` is scratch space. Returns the pages moved.
    pub(crate) fn evict_range(
        &self,
        va: VaRange,
        ps: PageSize,
        device: DeviceId,
        stats: &Counters,
        buf: &mut Vec<PageBacking>,
    ) -> Result<usize, SvmError> {
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

    /// Makes every page of `va` a system page (device pages come back through their device,
    /// honouring timeslices; holes get zeroed pages). `before` is the backing seen last.
    pub(crate) fn to_system(
        &self,
        va: VaRange,
        ps: PageSize,
        device: DeviceId,
        stats: &Counters,
        before: &[PageBacking],
    ) -> Result<(), SvmError> {
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

/// An SVM context: the address space every device mirrors, the device memory of each device
/// (one pagemap per device memory region), and the statistics. Create one GPU VM per device
/// (or per device memory region) with [`Svm::vm`]. Cheap to clone.
#[derive(Clone)]
pub struct Svm {
    inner: Arc<SvmInner>,
}

impl std::fmt::Debug for Svm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Svm")
            .field("config", &self.inner.config)
            .field("devices", &self.devices())
            .finish_non_exhaustive()
    }
}

impl Svm {
    /// Builds the context over `mm` and adds `pagemaps` to it, each with the copy path's
    /// fence policy (following the pagemap's [`drm_pagemap_core::CopyCaps`], read here once)
    /// and the observers of its device memory (accounting, statistics) installed around its
    /// operations. The pagemaps must not be in `mm` yet (pages of pagemaps added behind the
    /// context's back are still mapped, but their memory is neither accounted nor copied with
    /// the policy).
    pub fn new(
        mm: Arc<AddressSpace>,
        pagemaps: Vec<Pagemap>,
        config: SvmConfig,
    ) -> Result<Svm, SvmError> {
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
        Ok(Svm {
            inner: Arc::new(SvmInner {
                mm,
                config,
                migrate_lock: RwLock::new(()),
                stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
                pagemaps: infos,
                devices,
            }),
        })
    }

    /// The address space (CPU access: `create_range`, `read`, `write`, ...).
    pub fn mm(&self) -> &Arc<AddressSpace> {
        &self.inner.mm
    }

    /// The configuration.
    pub fn config(&self) -> &SvmConfig {
        &self.inner.config
    }

    /// A new GPU VM for the device of `local`, whose own memory is `local`.
    pub fn vm(&self, local: PagemapId) -> Result<GpuVm, SvmError> {
        let info = self
            .inner
            .info(local)
            .ok_or(SvmError::UnknownPagemap { pagemap: local })?;
        Ok(GpuVm::new(
            self.inner.clone(),
            local,
            info.device,
            info.owner,
        ))
    }

    /// The devices of the context's pagemaps, in order.
    pub fn devices(&self) -> Vec<DeviceId> {
        self.inner.devices.iter().map(|(d, _)| *d).collect()
    }

    /// The statistics of `device` (zeros for a device the context does not know).
    pub fn stats(&self, device: DeviceId) -> Stats {
        self.inner
            .devices
            .iter()
            .find(|(d, _)| *d == device)
            .map(|(_, c)| c.snapshot())
            .unwrap_or_default()
    }

    /// The statistics summed over every device.
    pub fn total_stats(&self) -> Stats {
        let mut s = Stats::default();
        for (_, c) in &self.inner.devices {
            s.merge(&c.snapshot());
        }
        s
    }

    /// Sets every counter back to zero.
    pub fn reset_stats(&self) {
        for (_, c) in &self.inner.devices {
            c.reset();
        }
    }

    /// The device-memory accounting of `pagemap`.
    pub fn memory(&self, pagemap: PagemapId) -> Option<MemoryUsage> {
        self.inner.info(pagemap).map(|i| i.account.usage())
    }

    /// The allocations of `pagemap` that eviction would pick, least recently used first.
    pub fn lru(&self, pagemap: PagemapId) -> Vec<AllocId> {
        self.inner
            .info(pagemap)
            .map(|i| i.account.lru_order())
            .unwrap_or_default()
    }
}
