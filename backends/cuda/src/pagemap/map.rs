//! Mapping a pagemap's pages for a device ([`drm_pagemap_core::PagemapOps`]): an address
//! computation inside the arena, allowed for the devices of the owner group (peer access
//! is enabled between them); nothing to undo.

use super::CudaPagemap;
use crate::driver::err;
use drm_pagemap_core::{BackendError, BackendErrorKind, DeviceId, DmaAddr, Pfn};

impl CudaPagemap {
    /// `PagemapOps::device_map`: the device address of each pfn, for a device of the group.
    pub(super) fn map_pfns(
        &self,
        device: DeviceId,
        pfns: &[Pfn],
        out: &mut [DmaAddr],
    ) -> Result<(), BackendError> {
        if !self.in_group(device) {
            return Err(err(
                BackendErrorKind::MapFailed,
                format!("cuda: {device} has no peer access to {}", self.device.id),
            ));
        }
        for (o, &p) in out.iter_mut().zip(pfns) {
            *o = DmaAddr(self.pfn_addr(p));
        }
        Ok(())
    }

    /// Whether `d`'s copies may read and write this memory directly (its owner group).
    fn in_group(&self, d: DeviceId) -> bool {
        self.group.contains(&d)
    }
}
