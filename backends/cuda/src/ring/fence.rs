//! The fence of a ring copy: signalled once the ring's `done` word reaches its seq.

use super::engine::Engine;
use drm_pagemap_core::{BackendError, DeviceId, FenceError, FenceOps, FenceStatus, NativeFence};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a wait polls the `done` word back to back (a ring copy of 64 KiB takes a few
/// microseconds).
const SPIN_HOT: Duration = Duration::from_micros(50);
/// How long it polls, yielding between polls, before it sleeps.
const SPIN_BEFORE_SLEEP: Duration = Duration::from_micros(500);

/// A copy that went through a ring ([`Engine`]).
///
/// - Signalled when the consumer's `done` word is at least its seq (the consumer publishes
///   `done` after the copy's bytes are visible to the system); failed when the ring failed
///   before completing it (the consumer could not be launched or relaunched, the device
///   failed, the ring was stopped or abandoned): the error names the ring and keeps the
///   driver's code.
/// - Its seqno is its seq in the ring's own fence context (ring copies complete in order).
/// - No native handle: a queue that gets it as a pre-fence waits for it through the host,
///   except the copy stream of the same pagemap, which waits on the `done` word itself
///   (`cuStreamWaitValue64`) before any copy it queues after ring copies.
pub(crate) struct RingFence {
    engine: Arc<Engine>,
    seq: u64,
    device: DeviceId,
}

impl fmt::Debug for RingFence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RingFence")
            .field("ring", &self.engine.what())
            .field("seq", &self.seq)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl RingFence {
    /// The fence of seq `seq` of `engine`.
    pub(crate) fn new(engine: Arc<Engine>, seq: u64, device: DeviceId) -> RingFence {
        RingFence {
            engine,
            seq,
            device,
        }
    }

    fn poll(&self) -> Option<Result<(), BackendError>> {
        self.engine.outcome(self.seq)
    }
}

impl FenceOps for RingFence {
    fn context(&self) -> u64 {
        self.engine.context()
    }

    fn seqno(&self) -> u64 {
        self.seq
    }

    fn status(&self) -> FenceStatus {
        FenceStatus::from_poll(self.poll())
    }

    /// None: see the type's documentation.
    fn native(&self) -> Option<NativeFence> {
        None
    }

    fn wait(&self, timeout: Option<Duration>) -> Result<(), FenceError> {
        let span = tracing::trace_span!(
            target: "drm_pagemap::cuda",
            "ring_fence_wait",
            device = self.device.0,
            seqno = self.seq,
            outcome = tracing::field::Empty,
        );
        let _in = span.enter();
        let r = self.wait_untraced(timeout);
        span.record("outcome", crate::fence::wait_outcome(&r));
        r
    }
}

impl RingFence {
    fn wait_untraced(&self, timeout: Option<Duration>) -> Result<(), FenceError> {
        let start = Instant::now();
        let mut naps = 0u32;
        loop {
            if let Some(r) = self.poll() {
                return r.map_err(FenceError::Failed);
            }
            let elapsed = start.elapsed();
            if let Some(limit) = timeout
                && elapsed >= limit
            {
                return Err(FenceError::Timeout(limit));
            }
            if elapsed < SPIN_HOT {
                std::hint::spin_loop();
            } else if elapsed < SPIN_BEFORE_SLEEP {
                std::thread::yield_now();
            } else {
                // Asleep: look after the consumer too (a returned instance with this copy
                // unfinished is relaunched, a failed one fails the fence), then nap.
                self.engine.tick();
                naps += 1;
                let nap = Duration::from_micros(if naps < 1000 { 20 } else { 200 });
                let nap = timeout.map_or(nap, |l| nap.min(l.saturating_sub(elapsed)));
                std::thread::sleep(nap);
            }
        }
    }
}
