//! A pagemap's copy engine: an immediate command list and a command queue on one queue of
//! its device's copy group, a pool of regular command lists, and the record of what is in
//! flight (which keeps every event and list a pending command uses alive).

use super::Counters;
use super::plan::Op;
use crate::events::EventSlot;
use crate::ze::objects::Context;
use crate::ze::{Device, EventHandle, Failure, List, Queue};
use drm_pagemap_core::{BackendError, DeviceId, Fence};
use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// How long dropping an engine waits for its pending work (a lost device or an event that
/// never signals must not hang the drop).
const DRAIN: Duration = Duration::from_secs(5);

/// Consecutive pending in-flight records after which [`Engine::reap`] stops looking.
const SCAN_PENDING: usize = 16;

/// What a submitted call keeps alive until its signal event has been seen signalled.
pub(crate) struct InFlight {
    /// The event its last command signals.
    pub signal: Arc<EventSlot>,
    /// The fences whose events its first command waits for (held, not read: their events
    /// stay alive while it may wait).
    pub _keep: Vec<Fence>,
    /// The event a host callback signals (a bridged host fence), which it waits for (held).
    pub _bridge: Option<Arc<EventSlot>>,
    /// The regular list it was recorded in, if any.
    pub list: Option<List>,
}

/// A submission that failed.
#[derive(Debug)]
pub(crate) enum SubmitError {
    /// Nothing was queued.
    Nothing(BackendError),
    /// Some commands were queued on the immediate list before an append failed; a barrier
    /// after them signals the call's event: its fence must fail with this error once that
    /// event has signalled.
    Partial(BackendError),
}

pub(crate) struct Engine {
    ctx: Arc<Context>,
    device: Device,
    ordinal: u32,
    immediate: List,
    queue: Queue,
    free_lists: Vec<List>,
    in_flight: VecDeque<InFlight>,
}

/// # Safety
/// `list` is a list of `ctx` under the engine's lock; the op's memory and the events stay
/// valid until the command completes (the caller's in-flight record).
unsafe fn append(
    ctx: &Context,
    list: List,
    op: &Op,
    signal: Option<EventHandle>,
    waits: &mut [EventHandle],
) -> Result<(), Failure> {
    // SAFETY: the caller vouches for the list, the memory and the events.
    unsafe {
        match op.src {
            Some(s) => ctx.append_copy(list, op.dst, s, op.len as usize, signal, waits),
            None => ctx.append_zero_fill(list, op.dst, op.len as usize, signal, waits),
        }
    }
}

impl Engine {
    /// The engine on queue `index` of group `ordinal` of `device`.
    pub(crate) fn new(
        ctx: Arc<Context>,
        device: Device,
        id: DeviceId,
        ordinal: u32,
        index: u32,
    ) -> Result<Engine, BackendError> {
        let what = || format!("{id}: copy queue {index} of group {ordinal}");
        let immediate = ctx
            .create_immediate(device, ordinal, index)
            .map_err(|f| f.about(what()))?;
        let queue = match ctx.create_queue(device, ordinal, index) {
            Ok(q) => q,
            Err(f) => {
                // SAFETY: just made, nothing appended.
                unsafe { ctx.destroy_list(immediate) };
                return Err(f.about(what()));
            }
        };
        Ok(Engine {
            ctx,
            device,
            ordinal,
            immediate,
            queue,
            free_lists: Vec::new(),
            in_flight: VecDeque::new(),
        })
    }

    /// Calls in flight.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Regular command lists made so far (in flight or free).
    pub(crate) fn lists(&self) -> usize {
        self.free_lists.len() + self.in_flight.iter().filter(|f| f.list.is_some()).count()
    }

    /// Drops the records of calls seen complete, oldest first: their events may be recycled,
    /// their lists reset for reuse. A record still pending does not hold back the ones after
    /// it (each is retired on its own event: an event that never signals keeps its record,
    /// and so the event itself, for ever, but nothing else); the scan stops after
    /// [`SCAN_PENDING`] consecutive pending records (work queued behind them is younger).
    pub(crate) fn reap(&mut self) {
        let (mut i, mut pending) = (0, 0);
        while i < self.in_flight.len() && pending < SCAN_PENDING {
            if matches!(self.in_flight[i].signal.query(), Ok(true)) {
                let f = self.in_flight.remove(i).expect("index in range");
                self.retire(f);
            } else {
                i += 1;
                pending += 1;
            }
        }
    }

    fn retire(&mut self, f: InFlight) {
        if let Some(list) = f.list {
            self.recycle(list);
        }
    }

    /// Resets a regular list with nothing pending and keeps it for reuse (destroys it when
    /// the reset fails).
    fn recycle(&mut self, list: List) {
        // SAFETY: a regular list of this engine with no execution pending.
        match unsafe { self.ctx.reset(list) } {
            Ok(()) => self.free_lists.push(list),
            // SAFETY: as above; not used afterwards.
            Err(_) => unsafe { self.ctx.destroy_list(list) },
        }
    }

    /// Records `ops` (see [`Engine::submit`]) on `list`, counting successful appends in
    /// `appended`.
    ///
    /// # Safety
    /// As [`append`].
    unsafe fn record(
        &self,
        list: List,
        ops: &[Op],
        signal: EventHandle,
        waits: &mut [EventHandle],
        appended: &mut usize,
        counters: &Counters,
    ) -> Result<(), Failure> {
        let ctx = &*self.ctx;
        let count = |appended: &mut usize| {
            *appended += 1;
            counters.appends.fetch_add(1, Ordering::Relaxed);
        };
        match ops {
            [] => {
                // SAFETY: the caller vouches for the list, memory and events.
                let r = unsafe { ctx.append_barrier(list, Some(signal), waits) };
                r.map(|()| count(appended))
            }
            [op] => {
                // SAFETY: as above.
                let r = unsafe { append(ctx, list, op, Some(signal), waits) };
                r.map(|()| count(appended))
            }
            _ => {
                if !waits.is_empty() {
                    // SAFETY: as above.
                    unsafe { ctx.append_barrier(list, None, waits) }?;
                    count(appended);
                }
                for op in ops {
                    // SAFETY: as above.
                    unsafe { append(ctx, list, op, None, &mut []) }?;
                    count(appended);
                }
                // SAFETY: as above.
                unsafe { ctx.append_barrier(list, Some(signal), &mut []) }?;
                count(appended);
                Ok(())
            }
        }
    }

    /// Queues `ops` after `waits`, `signal` signalled once all of them completed: one command
    /// for a single op (the waits and the signal on it), else a barrier on the waits, one
    /// command per op and a barrier that signals. On the immediate list, or (`regular`)
    /// recorded in one regular list submitted once to the queue. `Ok`: the regular list used,
    /// to keep in the call's in-flight record.
    ///
    /// # Safety
    /// The ops' memory is reachable by the device and stays allocated, and `signal` and
    /// `waits` are events of this context that stay alive, until the call's in-flight record
    /// is retired.
    pub(crate) unsafe fn submit(
        &mut self,
        ops: &[Op],
        signal: EventHandle,
        waits: &mut [EventHandle],
        regular: bool,
        counters: &Counters,
        what: &dyn fmt::Display,
    ) -> Result<Option<List>, SubmitError> {
        let mut appended = 0usize;
        if !regular {
            // SAFETY: the caller vouches for memory and events; the list is ours, under the
            // engine's lock (`&mut self`).
            let r =
                unsafe { self.record(self.immediate, ops, signal, waits, &mut appended, counters) };
            return match r {
                Ok(()) => Ok(None),
                Err(f) if appended == 0 => Err(SubmitError::Nothing(f.about(what))),
                Err(f) => {
                    let e = f.about(what);
                    // What was queued runs: close it with a barrier that signals the event,
                    // so the fence reports the failure only once it has completed.
                    // SAFETY: as above.
                    match unsafe {
                        self.ctx
                            .append_barrier(self.immediate, Some(signal), &mut [])
                    } {
                        Ok(()) => Err(SubmitError::Partial(e)),
                        Err(_) => Err(SubmitError::Nothing(e)),
                    }
                }
            };
        }
        let list = match self.free_lists.pop() {
            Some(l) => l,
            None => self
                .ctx
                .create_list(self.device, self.ordinal)
                .map_err(|f| SubmitError::Nothing(f.about(what)))?,
        };
        // SAFETY: a regular list of this engine under its lock; the caller vouches for
        // memory and events; the list is executed once, after it is closed.
        let r = unsafe {
            self.record(list, ops, signal, waits, &mut appended, counters)
                .and_then(|()| self.ctx.close(list))
                .and_then(|()| self.ctx.execute(self.queue, list))
        };
        match r {
            Ok(()) => {
                counters.submissions.fetch_add(1, Ordering::Relaxed);
                Ok(Some(list))
            }
            Err(f) => {
                // Nothing of a regular list runs unless it was executed.
                self.recycle(list);
                Err(SubmitError::Nothing(f.about(what)))
            }
        }
    }

    /// Keeps `f` until its signal event has been seen signalled.
    pub(crate) fn push(&mut self, f: InFlight) {
        self.in_flight.push_back(f);
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let start = Instant::now();
        for f in std::mem::take(&mut self.in_flight) {
            let left = DRAIN.saturating_sub(start.elapsed());
            let _ = f.signal.host_synchronize(left.as_nanos() as u64);
            if let Some(list) = f.list {
                // SAFETY: its execution completed, or the device is lost or the wait ran out
                // (then nothing better can be done than to let the driver clean up).
                unsafe { self.ctx.destroy_list(list) };
            }
        }
        for list in self.free_lists.drain(..) {
            // SAFETY: free lists have nothing pending.
            unsafe { self.ctx.destroy_list(list) };
        }
        // SAFETY: drained above (as far as the device lets us); not used afterwards.
        unsafe {
            self.ctx.destroy_list(self.immediate);
            self.ctx.destroy_queue(self.queue);
        }
    }
}
