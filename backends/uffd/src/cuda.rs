//! [`CudaHostFile`]: the CUDA backend's host memory, made with `cuda.host_memfd=1`, as the
//! [`FrameFile`] of a [`crate::PointerSpace`].

use crate::{FrameFile, UffdError};
use drm_pagemap_cuda::PinnedHostMemory;
use std::os::fd::BorrowedFd;
use std::sync::Arc;

/// The host memory of a CUDA backend opened with [`CudaConfig::host_memfd`]
/// (`cuda.host_memfd=1`): one memfd mapped shared, registered with `cuMemHostRegister`
/// (`DEVICEMAP | PORTABLE`). A range maps its frames at its own addresses, so the CPU's
/// loads and stores reach the pinned pages the GPUs copy to and from.
///
/// Unlike [`crate::MemfdMemory`], a frame's memory is not given back when the frame is freed:
/// a registered (pinned) page cannot be punched out of the file, so a page resident on a
/// device keeps its host memory on CUDA (the frame returns to the backend's pool).
///
/// [`CudaConfig::host_memfd`]: drm_pagemap_cuda::CudaConfig::host_memfd
#[derive(Debug, Clone)]
pub struct CudaHostFile {
    host: Arc<PinnedHostMemory>,
}

impl CudaHostFile {
    /// The frame file of `host` (`CudaBackend::pinned_host`). Fails with
    /// [`UffdError::Unsupported`] when the backend was not opened with `cuda.host_memfd=1`
    /// (its memory is then `cuMemHostAlloc` chunks, which cannot be mapped elsewhere).
    pub fn new(host: Arc<PinnedHostMemory>) -> Result<Arc<CudaHostFile>, UffdError> {
        if host.memfd().is_none() {
            return Err(UffdError::Unsupported {
                backend: "cuda".into(),
                reason: "the backend's host memory is cuMemHostAlloc chunks, which cannot be \
                         mapped at a range's addresses: open it with cuda.host_memfd=1 \
                         (CudaConfig::host_memfd)",
            });
        }
        Ok(Arc::new(CudaHostFile { host }))
    }

    /// The host memory.
    pub fn host(&self) -> &Arc<PinnedHostMemory> {
        &self.host
    }
}

impl FrameFile for CudaHostFile {
    fn frame_fd(&self) -> BorrowedFd<'_> {
        self.host
            .memfd()
            .expect("checked by CudaHostFile::new: the memory is a memfd for its whole life")
    }
}
