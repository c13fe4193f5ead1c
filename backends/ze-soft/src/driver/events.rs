//! Events, event pools and the signal primitive they share with fences.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use level_zero_sys::*;

use super::counters::COUNTERS;
use super::device::Context;
use super::handles::{Handle, Kind, resolve};
use super::{ZeResult, code, guard, write_out};

#[derive(Default, Clone, Copy)]
struct SignalState {
    signalled: bool,
    /// The command that should signal it ran on a lost device.
    lost: bool,
}

/// A host-visible flag with a condition variable: signalled until reset.
#[derive(Default)]
pub(crate) struct Signal {
    state: Mutex<SignalState>,
    cv: Condvar,
}

/// How a wait ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Waited {
    Signalled,
    Lost,
    TimedOut,
}

impl Signal {
    fn lock(&self) -> MutexGuard<'_, SignalState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
    pub fn set(&self) {
        self.lock().signalled = true;
        self.cv.notify_all();
    }
    pub fn set_lost(&self) {
        self.lock().lost = true;
        self.cv.notify_all();
    }
    pub fn reset(&self) {
        *self.lock() = SignalState::default();
    }
    /// Waits up to `timeout` (`None`: forever).
    pub fn wait(&self, timeout: Option<Duration>) -> Waited {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let mut state = self.lock();
        loop {
            if state.signalled {
                return Waited::Signalled;
            }
            if state.lost {
                return Waited::Lost;
            }
            match deadline {
                // No timeout, or one too large to represent: forever.
                None => state = self.cv.wait(state).unwrap_or_else(|e| e.into_inner()),
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Waited::TimedOut;
                    }
                    state = self
                        .cv
                        .wait_timeout(state, deadline - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
    }
    /// A host synchronize with a Level Zero timeout (ns; `u64::MAX` forever; 0 polls).
    pub fn host_synchronize(&self, timeout_ns: u64) -> ZeResult {
        let timeout = (timeout_ns != u64::MAX).then(|| Duration::from_nanos(timeout_ns));
        match self.wait(timeout) {
            Waited::Signalled => Ok(()),
            Waited::Lost => Err(code::DEVICE_LOST),
            Waited::TimedOut => Err(code::NOT_READY),
        }
    }
}

/// An event pool.
pub(crate) struct EventPool {
    pub context: u64,
    pub count: u32,
}
impl Kind for EventPool {
    const MAGIC: u64 = 0x5A45_5346_4550_0004;
}

/// An event.
pub(crate) struct Event {
    pub context: u64,
    pub pool: &'static Handle<EventPool>,
    pub signal: Signal,
}
impl Kind for Event {
    const MAGIC: u64 = 0x5A45_5346_4556_0005;
}

/// Resolves a live event whose pool is alive.
pub(crate) fn event(h: ze_event_handle_t) -> ZeResult<&'static Handle<Event>> {
    let ev = resolve!(Event, h)?;
    if !ev.obj.pool.alive() {
        return Err(super::hard_violation(code::INVALID_NULL_HANDLE));
    }
    Ok(ev)
}

/// `zeEventPoolCreate`.
pub(crate) unsafe extern "C" fn event_pool_create(
    ctx: ze_context_handle_t,
    desc: *const ze_event_pool_desc_t,
    _num_devices: u32,
    _devices: *mut ze_device_handle_t,
    out: *mut ze_event_pool_handle_t,
) -> ze_result_t {
    guard(|| {
        let ctx = resolve!(Context, ctx)?;
        if desc.is_null() || out.is_null() {
            return Err(code::INVALID_NULL_POINTER);
        }
        // SAFETY: non-null application descriptor.
        let count = unsafe { (*desc).count };
        if count == 0 {
            return Err(code::INVALID_SIZE);
        }
        let pool = Handle::create(EventPool {
            context: ctx.obj.id,
            count,
        });
        COUNTERS.live_event_pools.add(1);
        // SAFETY: non-null application out-pointer.
        unsafe { write_out(out, ze_event_pool_handle_t(pool.raw())) }
    })
}

/// `zeEventPoolDestroy`.
pub(crate) unsafe extern "C" fn event_pool_destroy(h: ze_event_pool_handle_t) -> ze_result_t {
    guard(|| {
        resolve!(EventPool, h)?.destroy()?;
        COUNTERS.live_event_pools.sub(1);
        Ok(())
    })
}

/// `zeEventCreate`.
pub(crate) unsafe extern "C" fn event_create(
    pool: ze_event_pool_handle_t,
    desc: *const ze_event_desc_t,
    out: *mut ze_event_handle_t,
) -> ze_result_t {
    guard(|| {
        let pool = resolve!(EventPool, pool)?;
        if desc.is_null() || out.is_null() {
            return Err(code::INVALID_NULL_POINTER);
        }
        // SAFETY: non-null application descriptor.
        if unsafe { (*desc).index } >= pool.obj.count {
            return Err(code::INVALID_ARGUMENT);
        }
        let ev = Handle::create(Event {
            context: pool.obj.context,
            pool,
            signal: Signal::default(),
        });
        COUNTERS.live_events.add(1);
        // SAFETY: non-null application out-pointer.
        unsafe { write_out(out, ze_event_handle_t(ev.raw())) }
    })
}

/// `zeEventDestroy`.
pub(crate) unsafe extern "C" fn event_destroy(h: ze_event_handle_t) -> ze_result_t {
    guard(|| {
        resolve!(Event, h)?.destroy()?;
        COUNTERS.live_events.sub(1);
        Ok(())
    })
}

/// `zeEventHostSignal`.
pub(crate) unsafe extern "C" fn event_host_signal(h: ze_event_handle_t) -> ze_result_t {
    guard(|| {
        event(h)?.obj.signal.set();
        Ok(())
    })
}

/// `zeEventHostSynchronize`.
pub(crate) unsafe extern "C" fn event_host_synchronize(
    h: ze_event_handle_t,
    timeout: u64,
) -> ze_result_t {
    guard(|| event(h)?.obj.signal.host_synchronize(timeout))
}

/// `zeEventQueryStatus`.
pub(crate) unsafe extern "C" fn event_query_status(h: ze_event_handle_t) -> ze_result_t {
    guard(|| event(h)?.obj.signal.host_synchronize(0))
}

/// `zeEventHostReset`.
pub(crate) unsafe extern "C" fn event_host_reset(h: ze_event_handle_t) -> ze_result_t {
    guard(|| {
        event(h)?.obj.signal.reset();
        COUNTERS.events_host_reset.add(1);
        Ok(())
    })
}
