//! Host fences (signalled by CPU code) and timelines.

use super::{FenceCallback, FenceContext, FenceOps, FenceStatus};
use crate::error::{BackendError, FenceError};
use crate::sync::{Arc, AtomicU64, Condvar, Mutex, Ordering};
use std::time::{Duration, Instant};

/// A timeline: one context and a monotonically increasing seqno. Fences made from it signal
/// in order when the work they guard completes in order (one queue).
#[derive(Debug)]
pub struct FenceTimeline {
    context: u64,
    next: AtomicU64,
}

impl Default for FenceTimeline {
    fn default() -> Self {
        FenceTimeline::new()
    }
}

impl FenceTimeline {
    /// A new timeline on a fresh context (from [`super::FenceContexts::global`]).
    pub fn new() -> FenceTimeline {
        FenceTimeline::on_context(FenceContext::new())
    }

    /// A new timeline on `context` (one taken from a shared [`super::FenceContexts`]).
    pub fn on_context(context: u64) -> FenceTimeline {
        FenceTimeline {
            context,
            next: AtomicU64::new(1),
        }
    }

    /// The timeline's context.
    pub fn context(&self) -> u64 {
        self.context
    }

    /// The next seqno (strictly larger than every earlier one).
    pub fn next_seqno(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// A new unsignalled host fence at the next seqno of this timeline.
    pub fn host_fence(&self) -> Arc<HostFence> {
        HostFence::new(self.context, self.next_seqno())
    }
}

enum HostState {
    /// Not signalled; the callbacks registered so far.
    Pending(Vec<FenceCallback>),
    Done(Result<(), BackendError>),
}

impl std::fmt::Debug for HostState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostState::Pending(cbs) => write!(f, "Pending({} callbacks)", cbs.len()),
            HostState::Done(r) => write!(f, "Done({r:?})"),
        }
    }
}

/// A fence signalled by CPU code (a worker thread, a completion callback). Its callbacks run
/// in the thread that signals it, after its lock is released.
#[derive(Debug)]
pub struct HostFence {
    context: u64,
    seqno: u64,
    state: Mutex<HostState>,
    cond: Condvar,
}

impl HostFence {
    /// A new unsignalled fence.
    pub fn new(context: u64, seqno: u64) -> Arc<HostFence> {
        Arc::new(HostFence {
            context,
            seqno,
            state: Mutex::new(HostState::Pending(Vec::new())),
            cond: Condvar::new(),
        })
    }

    /// Signals success. Has no effect if already signalled (signalled is sticky).
    pub fn signal(&self) {
        self.complete(Ok(()));
    }

    /// Signals an error. Has no effect if already signalled.
    pub fn signal_error(&self, error: BackendError) {
        self.complete(Err(error));
    }

    /// Signals with `result`. The first completion wins; later ones are ignored. The
    /// callbacks registered so far run here, in this thread, once.
    pub fn complete(&self, result: Result<(), BackendError>) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let HostState::Pending(cbs) = &mut *st {
            let cbs = std::mem::take(cbs);
            let outcome = result.clone().map_err(FenceError::Failed);
            *st = HostState::Done(result);
            drop(st);
            self.cond.notify_all();
            for cb in cbs {
                cb(outcome.clone());
            }
        }
    }

    fn outcome(st: &HostState) -> Option<Result<(), FenceError>> {
        match st {
            HostState::Pending(_) => None,
            HostState::Done(Ok(())) => Some(Ok(())),
            HostState::Done(Err(e)) => Some(Err(FenceError::Failed(e.clone()))),
        }
    }
}

impl FenceOps for HostFence {
    fn context(&self) -> u64 {
        self.context
    }

    fn seqno(&self) -> u64 {
        self.seqno
    }

    fn status(&self) -> FenceStatus {
        match &*self.state.lock().unwrap_or_else(|p| p.into_inner()) {
            HostState::Pending(_) => FenceStatus::Pending,
            HostState::Done(Ok(())) => FenceStatus::Signaled,
            HostState::Done(Err(e)) => FenceStatus::Failed(e.clone()),
        }
    }

    fn wait(&self, timeout: Option<Duration>) -> Result<(), FenceError> {
        // `None` past any reachable instant: `Duration::MAX` waits for ever, it never overflows.
        let deadline = timeout.and_then(|t| Some((crate::time::deadline(Instant::now(), t)?, t)));
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(r) = Self::outcome(&st) {
                return r;
            }
            match deadline {
                None => st = self.cond.wait(st).unwrap_or_else(|p| p.into_inner()),
                Some((at, limit)) => {
                    let now = Instant::now();
                    if now >= at {
                        return Err(FenceError::Timeout(limit));
                    }
                    st = self
                        .cond
                        .wait_timeout(st, at - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
    }

    fn add_callback(&self, cb: FenceCallback) -> Result<(), FenceCallback> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *st {
            HostState::Pending(cbs) => {
                cbs.push(cb);
                Ok(())
            }
            HostState::Done(_) => {
                let outcome = Self::outcome(&st).expect("done");
                drop(st);
                cb(outcome);
                Ok(())
            }
        }
    }
}
