//! A pagemap on a simulated device: allocations carved from the device arena, mappings as
//! address computations, copies queued on the device's copy engine.

use crate::device::{SimDevice, SimStats, Work};
use drm_pagemap_core::{
    BackendError, BackendErrorKind, CopyCaps, CopyRequest, DeviceId, DevmemBacking, DevmemOps,
    Direction, DmaAddr, Fence, GRANULE, HostFenceWait, NativeFenceKinds, PageSize, PagemapOps, Pfn,
};
use drm_pagemap_testkit::mem::arena_addr;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub(crate) struct SimPagemap {
    device: Arc<SimDevice>,
    capacity: u64,
    /// Owner group of every device, to refuse mappings across groups.
    groups: Vec<u32>,
    allocs: Mutex<HashMap<u64, Vec<Pfn>>>,
    next_cookie: AtomicU64,
    used: AtomicU64,
    allocations: AtomicU64,
    releases: AtomicU64,
    unused_releases: AtomicU64,
    to_devmem_calls: AtomicU64,
    to_ram_calls: AtomicU64,
    pages_copied: AtomicU64,
}

impl SimPagemap {
    pub(crate) fn new(device: Arc<SimDevice>, capacity: u64, groups: Vec<u32>) -> SimPagemap {
        SimPagemap {
            device,
            capacity,
            groups,
            allocs: Mutex::new(HashMap::new()),
            next_cookie: AtomicU64::new(1),
            used: AtomicU64::new(0),
            allocations: AtomicU64::new(0),
            releases: AtomicU64::new(0),
            unused_releases: AtomicU64::new(0),
            to_devmem_calls: AtomicU64::new(0),
            to_ram_calls: AtomicU64::new(0),
            pages_copied: AtomicU64::new(0),
        }
    }

    pub(crate) fn stats(&self) -> SimStats {
        SimStats {
            allocations: self.allocations.load(Ordering::SeqCst),
            releases: self.releases.load(Ordering::SeqCst),
            unused_releases: self.unused_releases.load(Ordering::SeqCst),
            copy_to_devmem_calls: self.to_devmem_calls.load(Ordering::SeqCst),
            copy_to_ram_calls: self.to_ram_calls.load(Ordering::SeqCst),
            pages_copied: self.pages_copied.load(Ordering::SeqCst),
            used_bytes: self.used.load(Ordering::SeqCst),
        }
    }

    fn addr(&self, pfn: Pfn) -> DmaAddr {
        arena_addr::encode(self.device.mem_id, pfn.0 as u64 * GRANULE)
    }

    fn group(&self, d: DeviceId) -> Option<u32> {
        self.groups.get(d.0 as usize).copied()
    }

    fn copy(&self, req: &CopyRequest<'_>, own_is_dst: bool) -> Result<Fence, BackendError> {
        if req.pages.len() != req.addrs.len() {
            return Err(BackendError::new(
                BackendErrorKind::CopyFailed,
                format!(
                    "sim {}: {} pages but {} addresses",
                    self.device.id,
                    req.pages.len(),
                    req.addrs.len()
                ),
            ));
        }
        let pairs: Vec<(DmaAddr, DmaAddr)> = req
            .pages
            .iter()
            .zip(req.addrs)
            .filter(|(_, a)| !a.is_none())
            .map(|(&p, &a)| {
                if own_is_dst {
                    (a, self.addr(p))
                } else {
                    (self.addr(p), a)
                }
            })
            .collect();
        self.pages_copied
            .fetch_add(pairs.len() as u64, Ordering::SeqCst);
        let work = Work::Copy {
            pairs,
            bytes: req.page_size.bytes(),
        };
        self.device.submit(work, req.pre_fence.cloned())
    }
}

impl PagemapOps for SimPagemap {
    fn device_map(
        &self,
        device: DeviceId,
        pfns: &[Pfn],
        _page_size: PageSize,
        _dir: Direction,
        out: &mut [DmaAddr],
    ) -> Result<(), BackendError> {
        match (self.group(device), self.group(self.device.id)) {
            (Some(a), Some(b)) if a == b => {}
            _ => {
                return Err(BackendError::new(
                    BackendErrorKind::MapFailed,
                    format!("sim: {device} has no interconnect to {}", self.device.id),
                ));
            }
        }
        for (o, &p) in out.iter_mut().zip(pfns) {
            *o = self.addr(p);
        }
        Ok(())
    }

    fn device_unmap(
        &self,
        _device: DeviceId,
        _addrs: &[DmaAddr],
        _page_size: PageSize,
        _dir: Direction,
    ) {
    }
}

impl DevmemOps for SimPagemap {
    fn allocate(&self, npages: usize, page_size: PageSize) -> Result<DevmemBacking, BackendError> {
        // Saturating: an absurd count is out of memory, not an arithmetic overflow.
        let bytes = (npages as u64).saturating_mul(page_size.bytes());
        let oom = || {
            BackendError::new(
                BackendErrorKind::OutOfMemory,
                format!(
                    "sim {}: {bytes} bytes requested, {} of {} in use",
                    self.device.id,
                    self.used.load(Ordering::SeqCst),
                    self.capacity
                ),
            )
        };
        if bytes > self.capacity {
            return Err(oom());
        }
        let prev = self.used.fetch_add(bytes, Ordering::SeqCst);
        if prev + bytes > self.capacity {
            self.used.fetch_sub(bytes, Ordering::SeqCst);
            return Err(oom());
        }
        let mut starts = Vec::with_capacity(npages);
        if !self
            .device
            .frames
            .alloc_pages(npages, page_size.granules(), &mut starts)
        {
            self.used.fetch_sub(bytes, Ordering::SeqCst);
            return Err(oom());
        }
        // Clear asynchronously: the clear is the allocation's pre-migrate fence.
        let mut extents: Vec<(u64, u64)> = Vec::new();
        for &s in &starts {
            let (off, len) = (s * GRANULE, page_size.bytes());
            match extents.last_mut() {
                Some(last) if last.0 + last.1 == off => last.1 += len,
                _ => extents.push((off, len)),
            }
        }
        let clear = match self.device.submit(Work::Clear { extents }, None) {
            Ok(f) => f,
            Err(e) => {
                self.device.frames.free_pages(&starts, page_size.granules());
                self.used.fetch_sub(bytes, Ordering::SeqCst);
                return Err(e);
            }
        };
        let cookie = self.next_cookie.fetch_add(1, Ordering::SeqCst);
        let pfns = starts.into_iter().map(|s| Pfn(s as u32)).collect();
        self.allocs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(cookie, pfns);
        self.allocations.fetch_add(1, Ordering::SeqCst);
        Ok(DevmemBacking {
            cookie,
            npages,
            page_size,
            pre_migrate_fence: Some(clear),
        })
    }

    fn populate_devmem_pfn(
        &self,
        backing: &DevmemBacking,
        out: &mut [Pfn],
    ) -> Result<(), BackendError> {
        let allocs = self.allocs.lock().unwrap_or_else(|p| p.into_inner());
        let pfns = allocs.get(&backing.cookie).ok_or_else(|| {
            BackendError::new(
                BackendErrorKind::Unsupported,
                format!(
                    "sim {}: allocation {} is unknown",
                    self.device.id, backing.cookie
                ),
            )
        })?;
        if out.len() != pfns.len() {
            return Err(BackendError::new(
                BackendErrorKind::Unsupported,
                format!(
                    "sim {}: {} pfns asked of a {}-page allocation",
                    self.device.id,
                    out.len(),
                    pfns.len()
                ),
            ));
        }
        out.copy_from_slice(pfns);
        Ok(())
    }

    fn copy_to_devmem(&self, req: &CopyRequest<'_>) -> Result<Fence, BackendError> {
        self.to_devmem_calls.fetch_add(1, Ordering::SeqCst);
        self.copy(req, true)
    }

    fn copy_to_ram(&self, req: &CopyRequest<'_>) -> Result<Fence, BackendError> {
        self.to_ram_calls.fetch_add(1, Ordering::SeqCst);
        self.copy(req, false)
    }

    fn devmem_release_unused(&self, backing: DevmemBacking) {
        self.unused_releases.fetch_add(1, Ordering::SeqCst);
        self.devmem_release(backing);
    }

    fn devmem_release(&self, backing: DevmemBacking) {
        let pfns = self
            .allocs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&backing.cookie);
        if let Some(pfns) = pfns {
            let starts: Vec<u64> = pfns.iter().map(|p| p.0 as u64).collect();
            self.device
                .frames
                .free_pages(&starts, backing.page_size.granules());
            self.used.fetch_sub(
                backing.npages as u64 * backing.page_size.bytes(),
                Ordering::SeqCst,
            );
            self.releases.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn capacity_bytes(&self) -> u64 {
        self.capacity
    }

    /// No command limit (a call is one job of any size); no native fence kind (the sim's
    /// fences are host fences); any pending pre-fence is waited for by the engine thread
    /// before it runs the job, so the call never blocks and later jobs stay behind it
    /// ([`HostFenceWait::InQueue`]); one engine runs the jobs in submission order.
    fn caps(&self) -> CopyCaps {
        CopyCaps {
            max_command_bytes: None,
            native_fence_kinds: NativeFenceKinds::NONE,
            host_fences: HostFenceWait::InQueue,
            in_order: true,
            batch_bytes_hint: None,
        }
    }
}
