//! Copy fences: Level Zero events signalled by the last command of a call.

use crate::events::EventSlot;
use drm_pagemap_core::{
    BackendError, BackendErrorKind, DeviceId, Fence, FenceError, FenceOps, FenceStatus,
    NativeFence, NativeFenceKind,
};
use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// A fence of this backend: a Level Zero event from a host-visible pool, signalled by the
/// last command of the work it guards.
///
/// - `status` queries the event (`zeEventQueryStatus`); `wait` blocks in
///   `zeEventHostSynchronize` (with the limit given, in nanoseconds). A driver error (device
///   lost) fails the fence, keeping the `ze_result_t`.
/// - Fences the work was ordered after whose failure the event does not carry (host fences
///   bridged into the queue, events of fences that depend on others) are kept: the fence
///   signals once they have, and fails if one of them failed.
/// - Work that could only be queued in part (an append failed after others succeeded) is
///   closed by a barrier that signals the event: the fence fails with the append's error once
///   what was queued has completed, never before.
/// - Its native handle ([`FenceOps::native`]) is the event, of kind
///   [`NativeFenceKind::LEVEL_ZERO_EVENT`] in the domain of its context: a copy of this
///   backend on a device of the same context makes it a wait event of its first command.
///   [`NativeFence::COMPLETE`] when the event carries the whole outcome.
/// - The event is recycled only once the fence, and every command that waits for it, are
///   gone.
pub struct ZeFence {
    context: u64,
    seqno: u64,
    device: DeviceId,
    event: Option<Arc<EventSlot>>,
    deps: Vec<Fence>,
    forced: Option<BackendError>,
    outcome: OnceLock<Result<(), BackendError>>,
}

impl fmt::Debug for ZeFence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZeFence")
            .field("context", &self.context)
            .field("seqno", &self.seqno)
            .field("device", &self.device)
            .field("event", &self.event)
            .field("deps", &self.deps.len())
            .finish_non_exhaustive()
    }
}

impl ZeFence {
    pub(crate) fn new(
        (context, seqno): (u64, u64),
        device: DeviceId,
        event: Arc<EventSlot>,
        deps: Vec<Fence>,
        forced: Option<BackendError>,
    ) -> ZeFence {
        ZeFence {
            context,
            seqno,
            device,
            event: Some(event),
            deps,
            forced,
            outcome: OnceLock::new(),
        }
    }

    /// A fence that has failed already (nothing was queued).
    pub(crate) fn failed(
        (context, seqno): (u64, u64),
        device: DeviceId,
        e: BackendError,
    ) -> ZeFence {
        let f = ZeFence {
            context,
            seqno,
            device,
            event: None,
            deps: Vec::new(),
            forced: None,
            outcome: OnceLock::new(),
        };
        let _ = f.outcome.set(Err(e));
        f
    }

    /// The device whose queue signals the event.
    pub fn device(&self) -> DeviceId {
        self.device
    }

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

    fn driver_error(&self, f: crate::ze::Failure) -> BackendError {
        f.about(format_args!(
            "{} fence (context {}, seqno {})",
            self.device, self.context, self.seqno
        ))
    }

    /// Once the event has signalled: the dependencies' outcome, then the forced error.
    fn settle(&self) -> Option<Result<(), BackendError>> {
        let deps = self.deps_outcome()?;
        Some(self.finish(deps.and_then(|()| match &self.forced {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        })))
    }

    fn poll(&self) -> Option<Result<(), BackendError>> {
        if let Some(o) = self.outcome.get() {
            return Some(o.clone());
        }
        let ev = self.event.as_ref()?;
        match ev.query() {
            Ok(false) => None,
            Ok(true) => self.settle(),
            Err(f) => Some(self.finish(Err(self.driver_error(f)))),
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl FenceOps for ZeFence {
    fn context(&self) -> u64 {
        self.context
    }

    fn seqno(&self) -> u64 {
        self.seqno
    }

    fn status(&self) -> FenceStatus {
        FenceStatus::from_poll(self.poll())
    }

    fn wait(&self, timeout: Option<Duration>) -> Result<(), FenceError> {
        // A trace span (its duration is the wait's, for a subscriber that times spans);
        // nothing is done without one.
        let span = tracing::trace_span!(
            target: "drm_pagemap::level_zero",
            "fence_wait",
            device = self.device.0,
            seqno = self.seqno,
            outcome = tracing::field::Empty,
        );
        let _in = span.enter();
        let r = self.wait_untraced(timeout);
        span.record(
            "outcome",
            match &r {
                Ok(()) => "signaled",
                Err(FenceError::Failed(_)) => "failed",
                Err(FenceError::Timeout(_)) => "timeout",
            },
        );
        r
    }

    fn native(&self) -> Option<NativeFence> {
        let ev = self.event.as_ref()?;
        Some(NativeFence {
            kind: NativeFenceKind::LEVEL_ZERO_EVENT,
            flags: if self.deps.is_empty() && self.forced.is_none() {
                NativeFence::COMPLETE
            } else {
                0
            },
            domain: ev.ctx().handle.as_u64(),
            handle: ev.handle.as_u64(),
        })
    }
}

impl ZeFence {
    /// [`FenceOps::wait`] without its span.
    fn wait_untraced(&self, timeout: Option<Duration>) -> Result<(), FenceError> {
        let done = |r: Result<(), BackendError>| r.map_err(FenceError::Failed);
        if let Some(r) = self.poll() {
            return done(r);
        }
        let start = Instant::now();
        let left = || timeout.map(|t| t.saturating_sub(start.elapsed()));
        if let Some(ev) = &self.event {
            match ev.host_synchronize(left().map_or(u64::MAX, nanos)) {
                Ok(true) => {}
                Ok(false) => return Err(FenceError::Timeout(timeout.unwrap_or_default())),
                Err(f) => return done(self.finish(Err(self.driver_error(f)))),
            }
        }
        // The event signalled after what the queue waited for; a host fence may take a
        // moment longer to report its own state.
        for d in &self.deps {
            if let Err(FenceError::Timeout(_)) = d.wait_for(left()) {
                return Err(FenceError::Timeout(timeout.unwrap_or_default()));
            }
        }
        done(self.settle().unwrap_or(Ok(())))
    }
}

/// A Level Zero event of a backend's context that the host signals: its [`Fence`] is a
/// native fence ([`NativeFenceKind::LEVEL_ZERO_EVENT`]) that copies of the backend wait for on
/// the device, and that any code can wait for on the host. Made by
/// [`crate::LevelZeroBackend::host_event`]. Dropping it without signalling leaves the fence
/// pending for ever (as a device event that never signals).
pub struct HostEvent {
    event: Arc<EventSlot>,
    device: DeviceId,
}

impl fmt::Debug for HostEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostEvent")
            .field("event", &self.event)
            .field("device", &self.device)
            .finish()
    }
}

impl HostEvent {
    pub(crate) fn new(
        event: Arc<EventSlot>,
        device: DeviceId,
        seq: (u64, u64),
    ) -> (HostEvent, Fence) {
        let fence = Fence::new(ZeFence::new(seq, device, event.clone(), Vec::new(), None));
        (HostEvent { event, device }, fence)
    }

    /// Signals the event (`zeEventHostSignal`).
    pub fn signal(&self) -> Result<(), BackendError> {
        self.event
            .host_signal()
            .map_err(|f| f.about(format_args!("host event of {}", self.device)))
    }
}

/// The `ze_result_t` an error of this backend carries, if any (every error of a failed
/// Level Zero call keeps it, also when its kind is [`BackendErrorKind::DeviceLost`] or
/// [`BackendErrorKind::OutOfMemory`]).
pub fn ze_result_of(e: &BackendError) -> Option<u32> {
    if let BackendErrorKind::Driver { code, .. } = e.kind {
        return u32::try_from(code).ok();
    }
    // The message ends a call's part with "(0x7000000n)".
    let at = e.message.rfind("(0x")?;
    let hex = &e.message[at + 3..];
    let end = hex.find(')')?;
    u32::from_str_radix(&hex[..end], 16).ok()
}
