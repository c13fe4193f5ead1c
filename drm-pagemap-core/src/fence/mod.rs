//! Fences: one-shot completion objects on a timeline, and the copy-submission contract around
//! them.
//!
//! The contract every implementation keeps (it mirrors `dma_fence`):
//! - A fence belongs to a **context** (one timeline, e.g. one copy queue) and carries a
//!   **seqno**; fences of one context signal in seqno order, and seqnos only increase.
//!   Context ids come from [`FenceContexts`], an allocator every copy of the core in a process
//!   can share (a host hands its allocator to a plug-in), so ids never collide.
//! - Signalled is **sticky**: once [`Fence::is_signaled`] returned true it stays true, and the
//!   outcome (success or error) never changes.
//! - An error status travels with the fence: [`Fence::wait`] returns it, so a failed copy can
//!   never be mistaken for a completed one (upstream's xe ignores it; we do not).
//! - [`Fence::is_later`] is only defined within one context; across contexts it answers `None`.
//! - **Callbacks** fire exactly once per registration, also when the fence had signalled
//!   already and also on error ([`Fence::add_callback`] in the signalling context,
//!   [`Fence::on_signal`] on the shared fence worker thread).
//! - A fence that a device can wait on exposes a **native handle** ([`FenceOps::native`]:
//!   kind + raw handle, e.g. a CUDA event). Wrappers that do not change the outcome
//!   (timing, accounting) delegate it; wrappers that change the outcome (fault injection)
//!   must not. No backend downcasts a fence: [`sort_dependencies`] sorts a pre-fence into what
//!   a backend waits on natively, what it must bridge from the host, and what already failed.
//! - **Containers** ([`FenceArray`]) aggregate fences on a context of their own and expose
//!   their members ([`FenceOps::members`]); nested containers are flattened.
//!
//! Backends implement [`FenceOps`] for their native primitive (a CUDA event, a Level Zero
//! event). [`HostFence`] is the CPU implementation.

mod array;
mod context;
mod deps;
mod host;
mod native;
mod worker;

pub use array::FenceArray;
pub use context::{FenceContext, FenceContextSource, FenceContexts};
pub use deps::{Dependencies, NativeWait, sort_dependencies};
pub use host::{FenceTimeline, HostFence};
pub use native::{NativeFence, NativeFenceKind};

use crate::error::{BackendError, FenceError};
use crate::sync::Arc;
use std::fmt;
use std::time::Duration;

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

impl FenceStatus {
    /// The status of a polled outcome: `None` pending, `Some(Ok)` signalled, `Some(Err)`
    /// failed (what a backend's fence learns from polling its native primitive).
    pub fn from_poll(polled: Option<Result<(), BackendError>>) -> FenceStatus {
        match polled {
            None => FenceStatus::Pending,
            Some(Ok(())) => FenceStatus::Signaled,
            Some(Err(e)) => FenceStatus::Failed(e),
        }
    }

    /// The outcome once signalled (`None` while pending).
    pub fn outcome(&self) -> Option<Result<(), FenceError>> {
        match self {
            FenceStatus::Pending => None,
            FenceStatus::Signaled => Some(Ok(())),
            FenceStatus::Failed(e) => Some(Err(FenceError::Failed(e.clone()))),
        }
    }
}

/// A completion callback: gets the fence's outcome (`Ok`, or [`FenceError::Failed`]; never a
/// timeout). Fires exactly once.
pub type FenceCallback = Box<dyn FnOnce(Result<(), FenceError>) + Send>;

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
    /// The native primitive a device can wait on, if there is one whose completion is exactly
    /// this fence's outcome (a wrapper that only observes delegates its inner fence's; one
    /// that changes the outcome returns `None`). Default: none.
    fn native(&self) -> Option<NativeFence> {
        None
    }
    /// The fences this one aggregates, if it is a container (it has a context of its own, so
    /// seqno reasoning against a queue's fences does not apply). Default: not a container.
    fn members(&self) -> Option<&[Fence]> {
        None
    }
    /// Registers `cb` to run exactly once with the outcome, in the signalling context (so it
    /// must be short and must not block), or right away when already signalled. Returns the
    /// callback back when this implementation has no native way to call it; the core then
    /// has its shared fence worker watch the fence. Default: not supported.
    fn add_callback(&self, cb: FenceCallback) -> Result<(), FenceCallback> {
        Err(cb)
    }
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

    /// A fence that has already failed with `error`.
    pub fn failed(error: BackendError) -> Fence {
        let f = HostFence::new(FenceContext::new(), 1);
        f.signal_error(error);
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
        self.0.members().is_some()
    }

    /// The fences a container aggregates (`None` for a single fence).
    pub fn members(&self) -> Option<&[Fence]> {
        self.0.members()
    }

    /// The native primitive a device can wait on (see [`FenceOps::native`]).
    pub fn native(&self) -> Option<NativeFence> {
        self.0.native()
    }

    /// Runs `cb` exactly once with the outcome: right now (in this thread) when the fence has
    /// signalled already, else in the signalling context, or on the shared fence worker when
    /// the implementation has no callbacks of its own. `cb` must be short and must not block
    /// or take locks the signaller may hold; use [`Fence::on_signal`] for real work.
    pub fn add_callback(&self, cb: FenceCallback) {
        if let Some(outcome) = self.status().outcome() {
            return cb(outcome);
        }
        if let Err(cb) = self.0.add_callback(cb) {
            worker::watch(self.clone(), cb);
        }
    }

    /// Runs `work` exactly once with the outcome on the shared fence worker thread (never in
    /// the caller's or the signaller's thread, also when already signalled): the place for
    /// work that takes locks or submits to a device once a host fence has signalled (a
    /// deferred copy), without a thread of its own.
    pub fn on_signal(&self, work: FenceCallback) {
        self.add_callback(Box::new(move |outcome| worker::run(work, outcome)));
    }

    /// Whether two handles refer to the same fence.
    pub fn ptr_eq(&self, other: &Fence) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}
