//! The public handle of an SVM context ([`Svm`]): it builds the shared context
//! ([`crate::context`]), hands out GPU VMs and shows statistics and accounting.

use crate::accounting::MemoryUsage;
use crate::config::SvmConfig;
use crate::context::SvmInner;
use crate::error::SvmError;
use crate::stats::Stats;
use crate::vm::GpuVm;
use drm_pagemap_core::{AddressSpace, AllocId, DeviceId, Pagemap, PagemapId};
use std::sync::Arc;

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
        Ok(Svm {
            inner: Arc::new(SvmInner::new(mm, pagemaps, config)?),
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
        Ok(GpuVm::new(self.inner.vm_device(local)?))
    }

    /// The devices of the context's pagemaps, in order.
    pub fn devices(&self) -> Vec<DeviceId> {
        self.inner.devices().iter().map(|(d, _)| *d).collect()
    }

    /// The statistics only the SVM layer knows of `device` (zeros for a device the context
    /// does not know): faults, the fault handler's moves, page tables, the copy policy's
    /// decisions. What moved where (bytes, calls, device time per link), failures by kind
    /// and memory use are the address space's: [`AddressSpace::stats`] on [`Svm::mm`].
    pub fn stats(&self, device: DeviceId) -> Stats {
        self.inner
            .devices()
            .iter()
            .find(|(d, _)| *d == device)
            .map(|(_, c)| c.snapshot())
            .unwrap_or_default()
    }

    /// The statistics summed over every device.
    pub fn total_stats(&self) -> Stats {
        let mut s = Stats::default();
        for (_, c) in self.inner.devices() {
            s.merge(&c.snapshot());
        }
        s
    }

    /// Sets every counter back to zero: the context's own and the address space's
    /// ([`AddressSpace::reset_stats`]; its gauges stay).
    pub fn reset_stats(&self) {
        for (_, c) in self.inner.devices() {
            c.reset();
        }
        self.inner.mm.reset_stats();
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
