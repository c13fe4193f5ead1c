//! Fault injection that wraps any backend: fail the Nth allocation, map or copy, or make the
//! Nth copy's fence signal an error or never signal. Counting is shared by every object wrapped
//! with one [`FaultInjector`], so "the 3rd copy" means the 3rd copy call anywhere.

use drm_pagemap_core::{
    BackendError, BackendErrorKind, CopyCaps, CopyRequest, DeviceId, DevmemBacking, DevmemOps,
    Direction, DmaAddr, Fence, FenceError, FenceOps, FenceStatus, HostFrame, HostMemory, PageSize,
    Pagemap, PagemapOps, Pfn,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Where a fault can be injected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FaultSite {
    /// Device-memory allocation (`allocate`) or host frame allocation.
    Alloc,
    /// `device_map` or `map_frames`.
    Map,
    /// Submission of a copy call (`copy_to_devmem` / `copy_to_ram`).
    Copy,
    /// The fence of a copy call signals an error although the copy ran.
    FenceError,
    /// The fence of a copy call never signals.
    FenceHang,
}

const SITES: usize = 5;

fn site_index(site: FaultSite) -> usize {
    match site {
        FaultSite::Alloc => 0,
        FaultSite::Map => 1,
        FaultSite::Copy => 2,
        FaultSite::FenceError => 3,
        FaultSite::FenceHang => 4,
    }
}

/// Counts operations per site and fails the armed ones. Thread-safe; share it with `Arc`.
#[derive(Debug, Default)]
pub struct FaultInjector {
    seen: [AtomicU64; SITES],
    /// Absolute operation number (1-based) that fails; 0: disarmed.
    target: [AtomicU64; SITES],
    injected: AtomicU64,
    /// Armed faults panic instead of failing (see [`FaultInjector::set_panics`]).
    panics: std::sync::atomic::AtomicBool,
}

impl FaultInjector {
    /// An injector with nothing armed.
    pub fn new() -> Arc<FaultInjector> {
        Arc::new(FaultInjector::default())
    }

    /// Makes the `n`th operation at `site`, counted from now (1 = the next one), fail.
    /// `n == 0` disarms the site; an `n` past the last countable operation (`u64::MAX`)
    /// means "never".
    pub fn fail_nth(&self, site: FaultSite, n: u64) {
        let i = site_index(site);
        let t = if n == 0 {
            0
        } else {
            self.seen[i].load(Ordering::SeqCst).saturating_add(n)
        };
        self.target[i].store(t, Ordering::SeqCst);
    }

    /// With `true`, an armed fault panics inside the backend call instead of returning an
    /// error (a fence fault: its wait panics once the copy is done), to prove that a panic
    /// in a backend leaves every page readable and no lock held. `FenceHang` still hangs.
    pub fn set_panics(&self, on: bool) {
        self.panics.store(on, Ordering::SeqCst);
    }

    fn panics(&self) -> bool {
        self.panics.load(Ordering::SeqCst)
    }

    /// Disarms every site.
    pub fn disarm(&self) {
        for t in &self.target {
            t.store(0, Ordering::SeqCst);
        }
    }

    /// How many operations were seen at `site`.
    pub fn seen(&self, site: FaultSite) -> u64 {
        self.seen[site_index(site)].load(Ordering::SeqCst)
    }

    /// How many faults were injected in total.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::SeqCst)
    }

    /// Counts one operation at `site`; true if it must fail.
    pub fn hit(&self, site: FaultSite) -> bool {
        let i = site_index(site);
        let n = self.seen[i].fetch_add(1, Ordering::SeqCst) + 1;
        let t = self.target[i].load(Ordering::SeqCst);
        let fire = t != 0 && n == t;
        if fire {
            self.target[i].store(0, Ordering::SeqCst);
            self.injected.fetch_add(1, Ordering::SeqCst);
        }
        fire
    }

    fn check(&self, site: FaultSite, what: &str) -> Result<(), BackendError> {
        if self.hit(site) {
            if self.panics() {
                panic!("injected panic: {what}");
            }
            Err(BackendError::new(
                BackendErrorKind::Injected,
                format!("{what} failed on purpose"),
            ))
        } else {
            Ok(())
        }
    }

    /// Wraps a pagemap's operations.
    pub fn wrap_pagemap(self: &Arc<Self>, pagemap: &Pagemap) -> Pagemap {
        pagemap.with_ops(
            Arc::new(InjectedPagemapOps {
                inner: pagemap.ops().clone(),
                inj: self.clone(),
            }),
            Arc::new(InjectedDevmem {
                inner: pagemap.devmem().clone(),
                inj: self.clone(),
            }),
        )
    }

    /// Wraps host memory.
    pub fn wrap_host(self: &Arc<Self>, host: Arc<dyn HostMemory>) -> Arc<dyn HostMemory> {
        Arc::new(InjectedHost {
            inner: host,
            inj: self.clone(),
        })
    }

    fn wrap_copy_fence(&self, fence: Fence) -> Fence {
        if self.hit(FaultSite::FenceHang) {
            return Fence::new(HangingFence { inner: fence });
        }
        if self.hit(FaultSite::FenceError) {
            let error = BackendError::new(
                BackendErrorKind::Injected,
                format!(
                    "copy fence #{} signalled an error on purpose",
                    self.seen(FaultSite::FenceError)
                ),
            );
            return Fence::new(FailingFence {
                inner: fence,
                error,
                panics: self.panics(),
            });
        }
        fence
    }
}

struct InjectedPagemapOps {
    inner: Arc<dyn PagemapOps>,
    inj: Arc<FaultInjector>,
}

impl PagemapOps for InjectedPagemapOps {
    fn device_map(
        &self,
        device: DeviceId,
        pfns: &[Pfn],
        page_size: PageSize,
        dir: Direction,
        out: &mut [DmaAddr],
    ) -> Result<(), BackendError> {
        self.inj.check(FaultSite::Map, "device_map")?;
        self.inner.device_map(device, pfns, page_size, dir, out)
    }

    fn device_unmap(
        &self,
        device: DeviceId,
        addrs: &[DmaAddr],
        page_size: PageSize,
        dir: Direction,
    ) {
        self.inner.device_unmap(device, addrs, page_size, dir)
    }
}

struct InjectedDevmem {
    inner: Arc<dyn DevmemOps>,
    inj: Arc<FaultInjector>,
}

impl DevmemOps for InjectedDevmem {
    fn allocate(&self, npages: usize, page_size: PageSize) -> Result<DevmemBacking, BackendError> {
        self.inj.check(FaultSite::Alloc, "device allocation")?;
        self.inner.allocate(npages, page_size)
    }

    fn populate_devmem_pfn(
        &self,
        backing: &DevmemBacking,
        out: &mut [Pfn],
    ) -> Result<(), BackendError> {
        self.inner.populate_devmem_pfn(backing, out)
    }

    fn copy_to_devmem(&self, req: &CopyRequest<'_>) -> Result<Fence, BackendError> {
        self.inj.check(FaultSite::Copy, "copy call")?;
        let f = self.inner.copy_to_devmem(req)?;
        Ok(self.inj.wrap_copy_fence(f))
    }

    fn copy_to_ram(&self, req: &CopyRequest<'_>) -> Result<Fence, BackendError> {
        self.inj.check(FaultSite::Copy, "copy call")?;
        let f = self.inner.copy_to_ram(req)?;
        Ok(self.inj.wrap_copy_fence(f))
    }

    fn devmem_release(&self, backing: DevmemBacking) {
        self.inner.devmem_release(backing)
    }

    fn devmem_release_many(&self, backings: &[DevmemBacking]) {
        self.inner.devmem_release_many(backings)
    }

    fn devmem_release_unused(&self, backing: DevmemBacking) {
        self.inner.devmem_release_unused(backing)
    }

    fn capacity_bytes(&self) -> u64 {
        self.inner.capacity_bytes()
    }

    /// The wrapped pagemap's: injection changes outcomes, not what the device can do (a
    /// fence whose outcome it changes exposes no native handle, so it reaches the backend as
    /// a host fence).
    fn caps(&self) -> CopyCaps {
        self.inner.caps()
    }
}

struct InjectedHost {
    inner: Arc<dyn HostMemory>,
    inj: Arc<FaultInjector>,
}

impl HostMemory for InjectedHost {
    fn alloc_frames(&self, page_size: PageSize, out: &mut [HostFrame]) -> Result<(), BackendError> {
        self.inj.check(FaultSite::Alloc, "host frame allocation")?;
        self.inner.alloc_frames(page_size, out)
    }
    fn free_frames(&self, frames: &[HostFrame], page_size: PageSize) {
        self.inner.free_frames(frames, page_size)
    }
    fn alloc_frames_at(
        &self,
        page_size: PageSize,
        frames: &mut [HostFrame],
    ) -> Result<(), BackendError> {
        self.inj.check(FaultSite::Alloc, "host frame allocation")?;
        self.inner.alloc_frames_at(page_size, frames)
    }
    fn reserve_home(&self, page_size: PageSize, pages: u64) -> Option<HostFrame> {
        self.inner.reserve_home(page_size, pages)
    }
    fn release_home(&self, first: HostFrame, page_size: PageSize, pages: u64) {
        self.inner.release_home(first, page_size, pages)
    }
    fn read(&self, frame: HostFrame, offset: usize, buf: &mut [u8]) -> Result<(), BackendError> {
        self.inner.read(frame, offset, buf)
    }
    fn write(&self, frame: HostFrame, offset: usize, data: &[u8]) -> Result<(), BackendError> {
        self.inner.write(frame, offset, data)
    }
    fn zero(&self, frame: HostFrame, page_size: PageSize) -> Result<(), BackendError> {
        self.inner.zero(frame, page_size)
    }
    fn map_frames(
        &self,
        device: DeviceId,
        frames: &[HostFrame],
        page_size: PageSize,
        dir: Direction,
        out: &mut [DmaAddr],
    ) -> Result<(), BackendError> {
        self.inj.check(FaultSite::Map, "map_frames")?;
        self.inner.map_frames(device, frames, page_size, dir, out)
    }
    fn unmap_frames(
        &self,
        device: DeviceId,
        addrs: &[DmaAddr],
        page_size: PageSize,
        dir: Direction,
    ) {
        self.inner.unmap_frames(device, addrs, page_size, dir)
    }
    fn capacity_bytes(&self) -> u64 {
        self.inner.capacity_bytes()
    }
}

/// A copy fence that reports an error once the copy it wraps is done.
#[derive(Debug)]
struct FailingFence {
    inner: Fence,
    error: BackendError,
    /// The wait panics instead of returning the error.
    panics: bool,
}

impl FenceOps for FailingFence {
    fn context(&self) -> u64 {
        self.inner.context()
    }
    fn seqno(&self) -> u64 {
        self.inner.seqno()
    }
    fn status(&self) -> FenceStatus {
        match self.inner.status() {
            FenceStatus::Pending => FenceStatus::Pending,
            _ => FenceStatus::Failed(self.error.clone()),
        }
    }
    fn wait(&self, timeout: Option<Duration>) -> Result<(), FenceError> {
        self.inner.wait_for(timeout)?;
        if self.panics {
            panic!("injected panic: {}", self.error.message);
        }
        Err(FenceError::Failed(self.error.clone()))
    }
}

/// A copy fence that never signals (the copy underneath does complete).
#[derive(Debug)]
struct HangingFence {
    inner: Fence,
}

impl FenceOps for HangingFence {
    fn context(&self) -> u64 {
        self.inner.context()
    }
    fn seqno(&self) -> u64 {
        self.inner.seqno()
    }
    fn status(&self) -> FenceStatus {
        FenceStatus::Pending
    }
    fn wait(&self, timeout: Option<Duration>) -> Result<(), FenceError> {
        let limit = timeout.unwrap_or(Duration::MAX);
        // Never signals: sleep out the timeout (for ever without a reachable deadline).
        let at = crate::time::deadline(Instant::now(), limit);
        loop {
            let now = Instant::now();
            match at {
                Some(at) if now >= at => return Err(FenceError::Timeout(limit)),
                Some(at) => std::thread::sleep((at - now).min(Duration::from_millis(50))),
                None => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}
