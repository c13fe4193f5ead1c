//! Test fences.

use drm_pagemap_core::{
    FenceError, FenceOps, FenceStatus, HostFence, NativeFence, NativeFenceKind,
};
use std::sync::Arc;
use std::time::Duration;

/// A "device" fence of a plug-in kind ([`NativeFenceKind::PLUGIN_FIRST`], domain 1, its
/// handle the seqno, [`NativeFence::COMPLETE`]) whose completion is a host fence the test
/// signals: what a backend that declares that kind waits for natively.
#[derive(Debug)]
pub struct NativeTestFence(pub Arc<HostFence>);

impl FenceOps for NativeTestFence {
    fn context(&self) -> u64 {
        self.0.context()
    }
    fn seqno(&self) -> u64 {
        self.0.seqno()
    }
    fn status(&self) -> FenceStatus {
        self.0.status()
    }
    fn wait(&self, timeout: Option<Duration>) -> Result<(), FenceError> {
        self.0.wait(timeout)
    }
    fn native(&self) -> Option<NativeFence> {
        Some(NativeFence {
            kind: NativeFenceKind::PLUGIN_FIRST,
            flags: NativeFence::COMPLETE,
            domain: 1,
            handle: self.0.seqno(),
        })
    }
}
