//! One GPU: its primary context, its event pool and its kernels (loaded at first use).

use crate::driver::{Attribute, Context, EventPool};
use crate::kernel::{FALLBACK_SM_COUNT, KernelSource, Kernels};
use drm_pagemap_core::{BackendError, DeviceId};
use std::sync::{Arc, OnceLock};

pub(crate) struct CudaDevice {
    // Field order is drop order: the module and the events before the context.
    kernels: OnceLock<Result<Arc<Kernels>, BackendError>>,
    pub events: Arc<EventPool>,
    pub ctx: Arc<Context>,
    pub id: DeviceId,
    pub ordinal: i32,
    pub name: String,
    pub total_mem: u64,
    /// Whether pagemap arenas use the virtual memory management API (lazily backed).
    pub vmm: bool,
    /// Multiprocessors (`CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT`; [`FALLBACK_SM_COUNT`]
    /// when the device does not say): sizes the zeroing kernel's grid.
    pub sm_count: u32,
    kernel_source: KernelSource,
}

impl CudaDevice {
    pub(crate) fn open(
        ordinal: i32,
        id: DeviceId,
        use_vmm: bool,
        kernel_source: KernelSource,
    ) -> Result<CudaDevice, BackendError> {
        let ctx = Arc::new(Context::retain(ordinal)?);
        let vmm = use_vmm
            && ctx
                .attribute(Attribute::VirtualAddressManagementSupported)
                .unwrap_or(0)
                != 0;
        let unified = ctx.attribute(Attribute::UnifiedAddressing)?;
        if unified == 0 {
            return Err(crate::driver::err(
                drm_pagemap_core::BackendErrorKind::Unsupported,
                format!("cuda device {ordinal}: no unified addressing"),
            ));
        }
        let sm_count = ctx
            .attribute(Attribute::MultiprocessorCount)
            .ok()
            .and_then(|n| u32::try_from(n).ok())
            .filter(|&n| n > 0)
            .unwrap_or(FALLBACK_SM_COUNT);
        Ok(CudaDevice {
            kernels: OnceLock::new(),
            events: EventPool::new(&ctx),
            name: ctx.name(),
            total_mem: ctx.total_mem()?,
            ctx,
            id,
            ordinal,
            vmm,
            sm_count,
            kernel_source,
        })
    }

    /// The kernels, loaded on first use (NVRTC, else the checked-in PTX).
    pub(crate) fn kernels(&self) -> Result<Arc<Kernels>, BackendError> {
        self.kernels
            .get_or_init(|| {
                Kernels::load(&self.ctx, self.kernel_source, self.sm_count).map(Arc::new)
            })
            .clone()
    }
}
