//! Copy fences: CUDA events recorded on a pagemap's copy stream.

use crate::driver::Event;
use drm_pagemap_core::{
    BackendError, DeviceId, Fence, FenceError, FenceOps, FenceStatus, NativeFence, NativeFenceKind,
};
use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// How long a timed wait polls the event back to back (small copies finish within this).
const SPIN_HOT: Duration = Duration::from_micros(50);
/// How long a timed wait polls the event, yielding between polls, before it starts to sleep.
const SPIN_BEFORE_SLEEP: Duration = Duration::from_micros(500);

/// A fence of this backend: a CUDA event recorded on a copy stream after the work it guards.
///
/// - `status` polls the event (`cuEventQuery`); `wait` without a limit blocks in
///   `cuEventSynchronize`, with a limit it polls (spinning briefly, then sleeping).
/// - A driver error (a sticky context error such as `CUDA_ERROR_ILLEGAL_ADDRESS`) makes the
///   fence fail with [`drm_pagemap_core::BackendErrorKind::Driver`], keeping the `CUresult`.
/// - Fences the guarded work was ordered after (its pre-fence) are kept: the fence signals
///   once they have, and fails if one of them failed.
/// - A copy whose pre-fence is not a CUDA fence is queued from the core's shared fence
///   worker once that fence has signalled (the stream never waits for the host, and no
///   thread is started per copy); until then the fence has no event and reports pending.
///   Such a fence has a context of its own.
/// - Its native handle ([`FenceOps::native`]) is the event, once queued: another copy of this
///   backend (or of any component in the process, a plug-in included) that gets this fence
///   as its pre-fence waits for it on the device. The handle is
///   [`NativeFence::COMPLETE`] when the fence depends on nothing else.
pub struct CudaFence {
    context: u64,
    seqno: u64,
    device: DeviceId,
    event: OnceLock<Arc<Event>>,
    deps: Vec<Fence>,
    outcome: OnceLock<Result<(), BackendError>>,
}

impl fmt::Debug for CudaFence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CudaFence")
            .field("context", &self.context)
            .field("seqno", &self.seqno)
            .field("device", &self.device)
            .field("queued", &self.event.get().is_some())
            .field("deps", &self.deps.len())
            .finish_non_exhaustive()
    }
}

impl CudaFence {
    pub(crate) fn new(
        context: u64,
        seqno: u64,
        device: DeviceId,
        event: Arc<Event>,
        deps: Vec<Fence>,
    ) -> CudaFence {
        let f = CudaFence::deferred(context, seqno, device, deps);
        let _ = f.event.set(event);
        f
    }

    /// A fence whose work is not queued yet: [`CudaFence::queued`] or [`CudaFence::fail`]
    /// completes it.
    pub(crate) fn deferred(
        context: u64,
        seqno: u64,
        device: DeviceId,
        deps: Vec<Fence>,
    ) -> CudaFence {
        CudaFence {
            context,
            seqno,
            device,
            event: OnceLock::new(),
            deps,
            outcome: OnceLock::new(),
        }
    }

    /// A fence that has already failed with `error` (the work was never queued).
    pub(crate) fn failed(
        context: u64,
        seqno: u64,
        device: DeviceId,
        error: BackendError,
    ) -> CudaFence {
        let f = CudaFence::deferred(context, seqno, device, Vec::new());
        f.fail(error);
        f
    }

    /// The deferred work is queued; `event` follows it.
    pub(crate) fn queued(&self, event: Arc<Event>) {
        let _ = self.event.set(event);
    }

    /// The deferred work will never be queued.
    pub(crate) fn fail(&self, error: BackendError) {
        let _ = self.outcome.set(Err(error));
    }

    /// The device whose stream records the event.
    pub fn device(&self) -> DeviceId {
        self.device
    }

    pub(crate) fn event(&self) -> Option<&Arc<Event>> {
        self.event.get()
    }

    /// The outcome of the dependencies: `None` while one is pending, else the first error.
    fn deps_outcome(&self) -> Option<Result<(), BackendError>> {
        let mut first = None;
        for d in &self.deps {
            match d.status() {
                FenceStatus::Pending => return None,
                FenceStatus::Signaled => {}
                FenceStatus::Failed(e) => {
                    first.get_or_insert(e);
                }
            }
        }
        Some(match first {
            None => Ok(()),
            Some(e) => Err(BackendError::new(
                e.kind.clone(),
                format!("copy ordered after a failed fence: {}", e.message),
            )),
        })
    }

    fn finish(&self, r: Result<(), BackendError>) -> Result<(), BackendError> {
        self.outcome.get_or_init(|| r).clone()
    }

    fn poll(&self) -> Option<Result<(), BackendError>> {
        if let Some(o) = self.outcome.get() {
            return Some(o.clone());
        }
        let ev = self.event.get()?;
        match ev.query() {
            Ok(false) => None,
            Ok(true) => self.deps_outcome().map(|r| self.finish(r)),
            Err(e) => Some(self.finish(Err(e))),
        }
    }
}

impl FenceOps for CudaFence {
    fn context(&self) -> u64 {
        self.context
    }

    fn seqno(&self) -> u64 {
        self.seqno
    }

    fn status(&self) -> FenceStatus {
        FenceStatus::from_poll(self.poll())
    }

    /// The event, once queued. Complete when the fence depends on nothing else: work queued
    /// on the same stream after it is then ordered after it and learns of its failure (a
    /// failure on the stream is a sticky context error, which every later event reports).
    fn native(&self) -> Option<NativeFence> {
        let ev = self.event.get()?;
        Some(NativeFence {
            kind: NativeFenceKind::CUDA_EVENT,
            flags: if self.deps.is_empty() {
                NativeFence::COMPLETE
            } else {
                0
            },
            domain: ev.context_handle(),
            handle: ev.handle(),
        })
    }

    fn wait(&self, timeout: Option<Duration>) -> Result<(), FenceError> {
        // A trace span (its duration is the wait's, for a subscriber that times spans);
        // nothing is done without one.
        let span = tracing::trace_span!(
            target: "drm_pagemap::cuda",
            "fence_wait",
            device = self.device.0,
            seqno = self.seqno,
            outcome = tracing::field::Empty,
        );
        let _in = span.enter();
        let r = self.wait_untraced(timeout);
        span.record("outcome", wait_outcome(&r));
        r
    }
}

/// The `outcome` field of a fence wait's span.
pub(crate) fn wait_outcome(r: &Result<(), FenceError>) -> &'static str {
    match r {
        Ok(()) => "signaled",
        Err(FenceError::Failed(_)) => "failed",
        Err(FenceError::Timeout(_)) => "timeout",
    }
}

impl CudaFence {
    /// [`FenceOps::wait`] without its span.
    fn wait_untraced(&self, timeout: Option<Duration>) -> Result<(), FenceError> {
        let done = |r: Result<(), BackendError>| r.map_err(FenceError::Failed);
        if let Some(r) = self.poll() {
            return done(r);
        }
        if timeout.is_none()
            && let Some(ev) = self.event.get()
        {
            if let Err(e) = ev.synchronize() {
                return done(self.finish(Err(e)));
            }
            // The dependencies completed before the event (the stream waited for them, or
            // the work was queued after them); a host fence may take a moment to report it.
            for d in &self.deps {
                let _ = d.wait();
            }
            return done(self.deps_outcome().map_or(Ok(()), |r| self.finish(r)));
        }
        // With a limit, or while deferred work is not queued yet: poll.
        let start = Instant::now();
        let mut naps = 0u32;
        loop {
            if let Some(r) = self.poll() {
                return done(r);
            }
            let elapsed = start.elapsed();
            if let Some(limit) = timeout
                && elapsed >= limit
            {
                return Err(FenceError::Timeout(limit));
            }
            // Copies of a few MiB finish within tens of microseconds: poll for a while before
            // sleeping, since a sleep of 20 us costs 50 us or more once the kernel's timer
            // slack is added, and that lands on every fault's latency.
            if elapsed < SPIN_HOT {
                // A yield is a system call that may cost a microsecond of latency.
                std::hint::spin_loop();
            } else if elapsed < SPIN_BEFORE_SLEEP {
                std::thread::yield_now();
            } else {
                naps += 1;
                let nap = Duration::from_micros(if naps < 1000 { 20 } else { 200 });
                let nap = timeout.map_or(nap, |l| nap.min(l.saturating_sub(elapsed)));
                std::thread::sleep(nap);
            }
            // Deferred work queued meanwhile: block in the driver instead of polling.
            if timeout.is_none() && self.event.get().is_some() {
                return self.wait_untraced(None);
            }
        }
    }
}
