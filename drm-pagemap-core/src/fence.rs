//! Fences: one-shot completion objects on a timeline.
//!
//! The contract every implementation keeps (it mirrors `dma_fence`):
//! - A fence belongs to a **context** (one timeline, e.g. one copy queue) and carries a
//!   **seqno**; fences of one context signal in seqno order, and seqnos only increase.
//! - Signalled is **sticky**: once [`Fence::is_signaled`] returned true it stays true, and the
//!   outcome (success or error) never changes.
//! - An error status travels with the fence: [`Fence::wait`] returns it, so a failed copy can
//!   never be mistaken for a completed one (upstream's xe ignores it; we do not).
//! - [`Fence::is_later`] is only defined within one context; across contexts it answers `None`.
//! - Containers ([`FenceArray`]) aggregate fences on a context of their own.
//!
//! Backends implement [`FenceOps`] for their native primitive (a CUDA event, a Level Zero event)
//! and may look through a [`Fence`] with [`Fence::downcast_ref`] to turn a foreign fence into a
//! device-side dependency instead of a CPU wait. [`HostFence`] is the CPU implementation.

use crate::error::{BackendError, FenceError};
use crate::sync::{Arc, AtomicU64, Condvar, Mutex, Ordering};
use std::any::Any;
use std::fmt;
use std::time::{Duration, Instant};

/// What a fence's state is right now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FenceStatus {
    /// Not signalled yet.
    Pending,
    /// Signalled without error.
    Signaled,
    /// Signalled with an error.
    Failed(BackendError),
}

/// The operations behind a [`Fence`]. Implemented by the core's [`HostFence`] and
/// [`FenceArray`], and by backends for their native completion primitives.
pub trait FenceOps: Send + Sync + fmt::Debug + 'static {
    /// The timeline this fence belongs to.
    fn context(&self) -> u64;
    /// The fence's position on its timeline.
    fn seqno(&self) -> u64;
    /// Polls the state without blocking. Must be sticky once not `Pending`.
    fn status(&self) -> FenceStatus;
    /// Blocks until signalled or until `timeout` (`None`: no limit) passes.
    fn wait(&self, timeout: Option<Duration>) -> Result<(), FenceError>;
    /// Whether this fence aggregates others (it has a context of its own, so seqno reasoning
    /// against a queue's fences does not apply).
    fn is_container(&self) -> bool {
        false
    }
    /// For downcasting to the concrete type.
    fn as_any(&self) -> &dyn Any;
}

/// A shared handle to a fence. Cheap to clone.
#[derive(Clone)]
pub struct Fence(Arc<dyn FenceOps>);

impl fmt::Debug for Fence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Fence(ctx {}, seq {}, {:?})",
            self.context(),
            self.seqno(),
            self.status()
        )
    }
}

impl Fence {
    /// Wraps an implementation.
    pub fn new<F: FenceOps>(ops: F) -> Fence {
        Fence(Arc::new(ops))
    }

    /// Wraps a shared implementation.
    pub fn from_arc(ops: Arc<dyn FenceOps>) -> Fence {
        Fence(ops)
    }

    /// A fence that is already signalled successfully.
    pub fn signaled() -> Fence {
        let f = HostFence::new(FenceContext::new(), 1);
        f.signal();
        Fence::from_host(f)
    }

    /// Wraps a shared host fence.
    pub fn from_host(fence: Arc<HostFence>) -> Fence {
        Fence(fence)
    }

    /// The fence's timeline.
    pub fn context(&self) -> u64 {
        self.0.context()
    }

    /// The fence's position on its timeline.
    pub fn seqno(&self) -> u64 {
        self.0.seqno()
    }

    /// The state right now.
    pub fn status(&self) -> FenceStatus {
        self.0.status()
    }

    /// Whether the fence has signalled (with or without error).
    pub fn is_signaled(&self) -> bool {
        !matches!(self.0.status(), FenceStatus::Pending)
    }

    /// The error the fence signalled with, if it signalled with one.
    pub fn error(&self) -> Option<BackendError> {
        match self.0.status() {
            FenceStatus::Failed(e) => Some(e),
            _ => None,
        }
    }

    /// Waits without a time limit; returns the fence's error status.
    pub fn wait(&self) -> Result<(), FenceError> {
        self.0.wait(None)
    }

    /// Waits at most `timeout`; returns [`FenceError::Timeout`] if it passes.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<(), FenceError> {
        self.0.wait(Some(timeout))
    }

    /// Waits with an optional limit.
    pub fn wait_for(&self, timeout: Option<Duration>) -> Result<(), FenceError> {
        self.0.wait(timeout)
    }

    /// Whether `self` comes after `other` on the same timeline. `None` when the two fences
    /// belong to different contexts: the question has no answer there.
    pub fn is_later(&self, other: &Fence) -> Option<bool> {
        (self.context() == other.context()).then(|| self.seqno() > other.seqno())
    }

    /// Whether the fence is a container of several fences.
    pub fn is_container(&self) -> bool {
        self.0.is_container()
    }

    /// The concrete implementation, if it is a `T`.
    pub fn downcast_ref<T: FenceOps>(&self) -> Option<&T> {
        self.0.as_any().downcast_ref::<T>()
    }

    /// Whether two handles refer to the same fence.
    pub fn ptr_eq(&self, other: &Fence) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// Process-wide, so always a `std` atomic (a loom atomic cannot live in a `static`, and the
/// counter is not part of what the loom models check).
static NEXT_CONTEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Allocates fence contexts (timeline ids), unique for the process.
#[derive(Clone, Copy, Debug)]
pub struct FenceContext;

impl FenceContext {
    /// A fresh context id.
    #[allow(clippy::new_ret_no_self)]
    pub fn new() -> u64 {
        NEXT_CONTEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }
}

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
    /// A new timeline on a fresh context.
    pub fn new() -> FenceTimeline {
        FenceTimeline {
            context: FenceContext::new(),
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

#[derive(Debug)]
enum HostState {
    Pending,
    Done(Result<(), BackendError>),
}

/// A fence signalled by CPU code (a worker thread, a completion callback).
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
            state: Mutex::new(HostState::Pending),
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

    /// Signals with `result`. The first completion wins; later ones are ignored.
    pub fn complete(&self, result: Result<(), BackendError>) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if matches!(*st, HostState::Pending) {
            *st = HostState::Done(result);
            drop(st);
            self.cond.notify_all();
        }
    }

    fn outcome(st: &HostState) -> Option<Result<(), FenceError>> {
        match st {
            HostState::Pending => None,
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
            HostState::Pending => FenceStatus::Pending,
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

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A container: signals when every member has signalled; its error is the first member error
/// in member order. Lives on a fresh context of its own (seqno 1).
#[derive(Debug)]
pub struct FenceArray {
    context: u64,
    members: Vec<Fence>,
}

impl FenceArray {
    /// A container of `members`.
    pub fn new(members: Vec<Fence>) -> FenceArray {
        FenceArray {
            context: FenceContext::new(),
            members,
        }
    }

    /// The fences it aggregates.
    pub fn members(&self) -> &[Fence] {
        &self.members
    }

    /// One fence for `fences`: none → `None`; one → that fence; several → a container.
    pub fn unify(mut fences: Vec<Fence>) -> Option<Fence> {
        match fences.len() {
            0 => None,
            1 => fences.pop(),
            _ => Some(Fence::new(FenceArray::new(fences))),
        }
    }
}

impl FenceOps for FenceArray {
    fn context(&self) -> u64 {
        self.context
    }

    fn seqno(&self) -> u64 {
        1
    }

    fn status(&self) -> FenceStatus {
        let mut first_err = None;
        for m in &self.members {
            match m.status() {
                FenceStatus::Pending => return FenceStatus::Pending,
                FenceStatus::Signaled => {}
                FenceStatus::Failed(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(FenceStatus::Signaled, FenceStatus::Failed)
    }

    fn wait(&self, timeout: Option<Duration>) -> Result<(), FenceError> {
        let start = Instant::now();
        let mut first_err = None;
        for m in &self.members {
            let left = timeout.map(|t| t.saturating_sub(start.elapsed()));
            match m.wait_for(left) {
                Ok(()) => {}
                Err(FenceError::Timeout(_)) => {
                    return Err(FenceError::Timeout(timeout.unwrap_or_default()));
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn is_container(&self) -> bool {
        true
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
