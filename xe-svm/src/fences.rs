//! Which fences a device can wait on by itself, and a copy fence that times its call.
//!
//! A pre-migrate fence is handed to a backend as a device-side dependency only when it comes
//! from a device queue of this SVM context: its context was seen on a fence the backend
//! returned (an allocation's clear, a copy command). Anything else is *host-only* (signalled by
//! CPU code the devices know nothing about) and is waited on the CPU, as are containers, whose
//! context is their own and never a queue's.

use crate::stats::Counters;
use drm_pagemap_core::{Fence, FenceError, FenceOps, FenceStatus};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How many queue contexts are remembered. Backends have a few queues per device; a backend
/// that made a fresh context per fence would fill the table, after which unknown contexts are
/// treated as host-only (a CPU wait: correct, only slower).
const MAX_QUEUES: usize = 64;

/// The fence contexts of device queues seen so far. Lock-free: a fixed table of atomics,
/// filled once per queue, read with a short scan.
#[derive(Debug)]
pub(crate) struct QueueContexts {
    slots: [AtomicU64; MAX_QUEUES],
}

impl Default for QueueContexts {
    fn default() -> Self {
        QueueContexts {
            slots: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl QueueContexts {
    /// Remembers the context of `fence`, a fence a device queue returned.
    pub(crate) fn learn(&self, fence: &Fence) {
        if fence.is_container() {
            return;
        }
        let ctx = fence.context();
        if ctx == 0 {
            return;
        }
        for slot in &self.slots {
            let v = slot.load(Ordering::Acquire);
            if v == ctx {
                return;
            }
            if v == 0 {
                match slot.compare_exchange(0, ctx, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => return,
                    Err(other) if other == ctx => return,
                    Err(_) => continue,
                }
            }
        }
    }

    /// Whether `fence` comes from a known device queue (so a device can wait on it).
    pub(crate) fn is_device_fence(&self, fence: &Fence) -> bool {
        if fence.is_container() {
            return false;
        }
        let ctx = fence.context();
        for slot in &self.slots {
            match slot.load(Ordering::Acquire) {
                0 => return false,
                v if v == ctx => return true,
                _ => {}
            }
        }
        false
    }
}

/// The fence returned for one copy call: the call's own fence, plus the bookkeeping that
/// records the call's duration (and a fence error) the first time its completion is observed.
pub(crate) struct TimedFence {
    inner: Fence,
    start: Instant,
    stats: Arc<Counters>,
    op: usize,
    bucket: usize,
    recorded: AtomicBool,
}

impl fmt::Debug for TimedFence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TimedFence")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl TimedFence {
    pub(crate) fn wrap(
        inner: Fence,
        start: Instant,
        stats: Arc<Counters>,
        op: usize,
        bucket: usize,
    ) -> Fence {
        Fence::new(TimedFence {
            inner,
            start,
            stats,
            op,
            bucket,
            recorded: AtomicBool::new(false),
        })
    }

    fn observe(&self, failed: bool) {
        if !self.recorded.swap(true, Ordering::AcqRel) {
            self.stats.copies[self.op][self.bucket].completed(self.start.elapsed());
            if failed {
                self.stats.fence_errors.inc();
            }
        }
    }
}

impl FenceOps for TimedFence {
    fn context(&self) -> u64 {
        self.inner.context()
    }

    fn seqno(&self) -> u64 {
        self.inner.seqno()
    }

    fn status(&self) -> FenceStatus {
        let s = self.inner.status();
        match &s {
            FenceStatus::Pending => {}
            FenceStatus::Signaled => self.observe(false),
            FenceStatus::Failed(_) => self.observe(true),
        }
        s
    }

    fn wait(&self, timeout: Option<Duration>) -> Result<(), FenceError> {
        let r = self.inner.wait_for(timeout);
        match &r {
            Ok(()) => self.observe(false),
            Err(FenceError::Failed(_)) => self.observe(true),
            Err(FenceError::Timeout(_)) => {}
        }
        r
    }

    // Timing only observes: the outcome is the inner fence's, so a device may wait for its
    // native handle, and containers and callbacks are the inner fence's.
    fn native(&self) -> Option<drm_pagemap_core::NativeFence> {
        self.inner.native()
    }

    fn members(&self) -> Option<&[Fence]> {
        self.inner.members()
    }

    fn add_callback(
        &self,
        cb: drm_pagemap_core::FenceCallback,
    ) -> Result<(), drm_pagemap_core::FenceCallback> {
        self.inner.add_callback(cb);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drm_pagemap_core::{FenceArray, FenceTimeline};

    #[test]
    fn learns_queue_contexts_and_rejects_others() {
        let q = QueueContexts::default();
        let queue = FenceTimeline::new();
        let a = Fence::from_host(queue.host_fence());
        let b = Fence::from_host(queue.host_fence());
        let other = Fence::from_host(FenceTimeline::new().host_fence());
        assert!(!q.is_device_fence(&a));
        q.learn(&a);
        q.learn(&a);
        assert!(q.is_device_fence(&b), "same queue, later fence");
        assert!(!q.is_device_fence(&other));
        let container = Fence::new(FenceArray::new(vec![a.clone(), b.clone()]));
        q.learn(&container);
        assert!(!q.is_device_fence(&container));
    }

    #[test]
    fn full_table_treats_new_contexts_as_host_only() {
        let q = QueueContexts::default();
        for _ in 0..MAX_QUEUES {
            q.learn(&Fence::from_host(FenceTimeline::new().host_fence()));
        }
        let late = Fence::from_host(FenceTimeline::new().host_fence());
        q.learn(&late);
        assert!(!q.is_device_fence(&late));
    }
}
