//! Events: host-visible event pools of one context, and events handed out one at a time and
//! recycled.
//!
//! An [`EventSlot`] is one event, shared (`Arc`) by everything that may still signal it or
//! wait for it: the fence it backs, the in-flight record of the command that signals it
//! (dropped once that command has been seen complete), the in-flight records of commands
//! that wait for it, and a host callback that will signal it. When the last of them drops it,
//! nobody can see the event any more: it is reset (`zeEventHostReset`) and goes back to the
//! free list. So an event is never reset while a waiter can still see it.

use crate::ze::objects::Context;
use crate::ze::{EventHandle, Failure, PoolHandle};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Events per pool.
pub(crate) const POOL_EVENTS: u32 = 64;

#[derive(Default)]
struct State {
    pools: Vec<PoolHandle>,
    /// Events created in the last pool.
    used_in_last: u32,
    /// Reset events ready for use.
    free: Vec<EventHandle>,
}

/// The events of one context.
pub(crate) struct Events {
    pub ctx: Arc<Context>,
    state: Mutex<State>,
    live: AtomicU64,
    resets: AtomicU64,
    acquired: AtomicU64,
}

/// Counters of the events of one context.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventStats {
    /// Events created and not destroyed.
    pub live_events: u64,
    /// Event pools created.
    pub pools: u64,
    /// Events recycled (reset once retired).
    pub resets: u64,
    /// Events handed out (fresh or recycled).
    pub acquired: u64,
    /// Of the live events, those in use now.
    pub in_use: u64,
}

impl Events {
    pub(crate) fn new(ctx: Arc<Context>) -> Arc<Events> {
        Arc::new(Events {
            ctx,
            state: Mutex::new(State::default()),
            live: AtomicU64::new(0),
            resets: AtomicU64::new(0),
            acquired: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An unsignalled event: a recycled one, or a new one (a new pool when the last is full).
    pub(crate) fn acquire(self: &Arc<Self>) -> Result<Arc<EventSlot>, Failure> {
        let mut st = self.lock();
        let handle = match st.free.pop() {
            Some(h) => h,
            None => {
                if st.pools.is_empty() || st.used_in_last == POOL_EVENTS {
                    let pool = self.ctx.create_event_pool(POOL_EVENTS)?;
                    st.pools.push(pool);
                    st.used_in_last = 0;
                }
                let pool = *st.pools.last().expect("a pool was just made");
                let h = self.ctx.create_event(pool, st.used_in_last)?;
                st.used_in_last += 1;
                self.live.fetch_add(1, Ordering::Relaxed);
                h
            }
        };
        drop(st);
        self.acquired.fetch_add(1, Ordering::Relaxed);
        Ok(Arc::new(EventSlot {
            events: self.clone(),
            handle,
        }))
    }

    pub(crate) fn stats(&self) -> EventStats {
        let st = self.lock();
        let live = self.live.load(Ordering::Relaxed);
        EventStats {
            live_events: live,
            pools: st.pools.len() as u64,
            resets: self.resets.load(Ordering::Relaxed),
            acquired: self.acquired.load(Ordering::Relaxed),
            in_use: live - st.free.len() as u64,
        }
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let st = std::mem::take(&mut *self.lock());
        for e in st.free {
            // SAFETY: a free event: nobody refers to it (every slot holds `Arc<Events>`, so
            // none is left).
            unsafe { self.ctx.destroy_event(e) };
        }
        for p in st.pools {
            // SAFETY: every event of the pool is destroyed (free ones above; the others when
            // their reset failed).
            unsafe { self.ctx.destroy_event_pool(p) };
        }
    }
}

/// One event in use (see the module docs).
pub(crate) struct EventSlot {
    events: Arc<Events>,
    pub handle: EventHandle,
}

impl std::fmt::Debug for EventSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Event({:#x})", self.handle.as_u64())
    }
}

impl EventSlot {
    /// The context of the event.
    pub(crate) fn ctx(&self) -> &Arc<Context> {
        &self.events.ctx
    }

    /// Whether it has signalled.
    pub(crate) fn query(&self) -> Result<bool, Failure> {
        self.events.ctx.query(self.handle)
    }

    /// Signals it from the host.
    pub(crate) fn host_signal(&self) -> Result<(), Failure> {
        self.events.ctx.host_signal(self.handle)
    }

    /// Waits for it at most `timeout_ns`; `Ok(false)` when the time ran out.
    pub(crate) fn host_synchronize(&self, timeout_ns: u64) -> Result<bool, Failure> {
        self.events.ctx.host_synchronize(self.handle, timeout_ns)
    }
}

impl Drop for EventSlot {
    fn drop(&mut self) {
        // The last holder is gone: no pending command signals or waits for the event (their
        // in-flight records hold it), no fence exposes it, no callback will signal it.
        match self.events.ctx.host_reset(self.handle) {
            Ok(()) => {
                self.events.resets.fetch_add(1, Ordering::Relaxed);
                self.events.lock().free.push(self.handle);
            }
            Err(_) => {
                // Not reusable (a lost device): destroy it.
                // SAFETY: nobody refers to the event (see above).
                unsafe { self.events.ctx.destroy_event(self.handle) };
                self.events.live.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}
