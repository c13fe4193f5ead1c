//! The ring's lifecycle around the protocol ([`Ring`]): one producer lock, consumer
//! instances started on demand by a [`Launcher`], the keeper thread that stops an idle
//! instance, failures, and shutdown.
//!
//! - **Submit** ([`Engine::submit`], under the lock): refused (the caller takes its other
//!   path) when the ring is shut, failed, or full; otherwise an instance is made sure of
//!   (launched when none runs or the last one returned: a new epoch, ordered after the old
//!   instance) *before* the descriptor is published, so a failed launch publishes nothing.
//! - **Idle stop**: the keeper thread (one per ring, asleep while no instance runs) asks the
//!   instance to return once it has run nothing for [`RingConfig::idle_stop`] and everything
//!   published is done. An instance also returns when its lease
//!   ([`RingConfig::lease`], measured by the consumer) runs out, busy or not; what it left
//!   unfinished is picked up by a new instance (the keeper, a fence wait or the next submit
//!   relaunches). So an implicitly synchronising call of the application (which waits for
//!   every kernel of the device) waits at most about the longer of the two.
//! - **Failures** fail the fences of every unfinished seq, and only once no instance can
//!   run them any more (the launcher reports every instance returned, or the device failed):
//!   a failed copy has not written anything after its fence reported the failure.
//! - **Shutdown** ([`Engine::shutdown`]): stop everything, wait (bounded) until every
//!   instance has returned; past the bound the ring's memory and launcher are leaked (a
//!   `tracing` warning says so) rather than freed under a consumer that may still write.

use super::layout::DescBody;
use super::proto::{Full, Ring};
use drm_pagemap_core::{BackendError, BackendErrorKind, FenceContext};
use std::mem::ManuallyDrop;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

/// Starts consumer instances of one ring.
pub(crate) trait Launcher: Send + Sync {
    /// Starts an instance of `epoch` on `ring`, to run after every instance launched before
    /// has returned. Its lease is `lease`.
    fn launch(&self, ring: &Arc<Ring>, epoch: u64, lease: Duration) -> Result<(), BackendError>;
    /// `Ok(true)` once every launched instance has returned; `Err`: the device failed (the
    /// error keeps the driver's code), no instance runs any more.
    fn idle(&self) -> Result<bool, BackendError>;
}

/// Timing of a ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RingConfig {
    /// An instance that has run nothing for this long is asked to return.
    pub idle_stop: Duration,
    /// An instance returns after this long, busy or not.
    pub lease: Duration,
    /// How long shutdown waits for the instances to return before leaking the ring.
    pub stop_wait: Duration,
}

/// Why [`Engine::submit`] did not take a copy (the caller takes its other path).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Every slot holds an unfinished copy.
    Full,
    /// The ring is shut down or has failed.
    Closed,
    /// No instance could be launched (the ring takes no more copies).
    Launch(BackendError),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Run {
    /// No instance runs (as far as the producer knows: a returned one is checked by the
    /// launcher).
    Idle,
    /// Instance `epoch` runs.
    Running,
    /// Instance `epoch` was asked to return.
    Stopping,
}

struct State {
    epoch: u64,
    run: Run,
    last_submit: Instant,
    shut: bool,
    /// No more launches (one failed).
    broken: bool,
}

/// A ring with its lifecycle. See the module documentation.
pub(crate) struct Engine {
    // Leaked (not dropped) when shutdown could not see every instance return.
    ring: ManuallyDrop<Arc<Ring>>,
    launcher: ManuallyDrop<Box<dyn Launcher>>,
    st: Mutex<State>,
    wake: Condvar,
    /// The first seq that failed, and why; every later seq fails too.
    failure: OnceLock<(u64, BackendError)>,
    keeper: Mutex<Option<std::thread::JoinHandle<()>>>,
    abandoned: AtomicBool,
    context: u64,
    cfg: RingConfig,
    /// Names the ring in messages ("cuda 0 pagemap 1").
    what: String,
}

impl Engine {
    /// A ring over `ring`, with instances from `launcher`, and its keeper thread.
    pub(crate) fn start(
        ring: Ring,
        launcher: Box<dyn Launcher>,
        cfg: RingConfig,
        what: String,
    ) -> Result<Arc<Engine>, BackendError> {
        let e = Arc::new(Engine {
            ring: ManuallyDrop::new(Arc::new(ring)),
            launcher: ManuallyDrop::new(launcher),
            st: Mutex::new(State {
                epoch: 0,
                run: Run::Idle,
                last_submit: Instant::now(),
                shut: false,
                broken: false,
            }),
            wake: Condvar::new(),
            failure: OnceLock::new(),
            keeper: Mutex::new(None),
            abandoned: AtomicBool::new(false),
            context: FenceContext::new(),
            cfg,
            what,
        });
        let weak = Arc::downgrade(&e);
        let h = std::thread::Builder::new()
            .name("dpm-ring-keeper".into())
            .spawn(move || keeper(weak))
            .map_err(|x| {
                BackendError::new(
                    BackendErrorKind::Unavailable,
                    format!("{}: ring keeper thread: {x}", e.what),
                )
            })?;
        *e.keeper.lock().unwrap_or_else(|p| p.into_inner()) = Some(h);
        Ok(e)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The protocol view (tests read its words).
    pub(crate) fn ring(&self) -> &Ring {
        &self.ring
    }

    /// The fence context of this ring's copies (their seqnos are their seqs).
    pub(crate) fn context(&self) -> u64 {
        self.context
    }

    /// Names the ring in messages.
    pub(crate) fn what(&self) -> &str {
        &self.what
    }

    /// Publishes `body` (launching an instance if none runs); `Ok`: its seq.
    pub(crate) fn submit(&self, body: &DescBody) -> Result<u64, Refused> {
        let mut st = self.lock();
        if st.shut || st.broken || self.failure.get().is_some() {
            return Err(Refused::Closed);
        }
        let ring = &**self.ring;
        if ring.head() - ring.done().min(ring.head()) >= super::layout::RING_SLOTS as u64 {
            return Err(Refused::Full);
        }
        // An instance first: a failed launch publishes nothing.
        let returned = ring.header().exited.load(Ordering::Acquire) == st.epoch;
        if st.run != Run::Running || returned {
            self.relaunch(&mut st).map_err(Refused::Launch)?;
        }
        let seq = ring.publish(body).map_err(|Full::Full| Refused::Full)?;
        st.last_submit = Instant::now();
        Ok(seq)
    }

    /// Launches the next epoch (the caller holds the lock); a failure marks the ring broken,
    /// and fails what is unfinished if no instance is left to run it.
    fn relaunch(&self, st: &mut State) -> Result<(), BackendError> {
        let e = st.epoch + 1;
        match self.launcher.launch(&self.ring, e, self.cfg.lease) {
            Ok(()) => {
                st.epoch = e;
                let was_idle = st.run == Run::Idle;
                st.run = Run::Running;
                if was_idle {
                    self.wake.notify_all();
                }
                Ok(())
            }
            Err(err) => {
                st.broken = true;
                tracing::warn!(target: "drm_pagemap::cuda", ring = %self.what, error = %err,
                    "ring consumer launch failed; small copies take the stream path");
                let err = BackendError::new(
                    err.kind.clone(),
                    format!(
                        "{}: ring consumer launch failed: {}",
                        self.what, err.message
                    ),
                );
                if self.launcher.idle() != Ok(false) {
                    self.fail_unfinished(err.clone());
                    st.run = Run::Idle;
                }
                Err(err)
            }
        }
    }

    /// Fails every seq not done yet (only once no instance can run them) and closes the
    /// ring for good: its `done` word is forced to the end, so that device work ordered
    /// after ring copies (`cuStreamWaitValue64`) is not held forever; the fences check the
    /// failure first.
    fn fail_unfinished(&self, err: BackendError) {
        let from = self.ring.done().saturating_add(1);
        if self.failure.set((from, err)).is_ok() {
            self.ring.abandon();
        }
    }

    /// The outcome of seq `seq`: `None` while pending.
    pub(crate) fn outcome(&self, seq: u64) -> Option<Result<(), BackendError>> {
        if let Some((from, e)) = self.failure.get()
            && seq >= *from
        {
            return Some(Err(e.clone()));
        }
        (self.ring.done() >= seq).then_some(Ok(()))
    }

    /// The newest published seq (every copy of the ring up to it was submitted).
    pub(crate) fn published(&self) -> u64 {
        self.ring.head()
    }

    /// Looks after the instance now (fence waits call it while they sleep; the keeper
    /// periodically): fails or relaunches when the instance returned with work left,
    /// asks an idle one to return.
    pub(crate) fn tick(&self) {
        let mut st = self.lock();
        self.tick_locked(&mut st, Instant::now());
    }

    fn tick_locked(&self, st: &mut State, now: Instant) {
        if st.run == Run::Idle {
            return;
        }
        let ring = &**self.ring;
        let returned = match self.launcher.idle() {
            Err(e) => {
                self.fail_unfinished(BackendError::new(
                    e.kind.clone(),
                    format!("{}: ring consumer failed: {}", self.what, e.message),
                ));
                st.run = Run::Idle;
                return;
            }
            Ok(r) => r,
        };
        if returned {
            let fault = ring.header().fault.load(Ordering::Acquire);
            if fault != 0 {
                self.fail_unfinished(BackendError::new(
                    BackendErrorKind::CopyFailed,
                    format!("{}: ring descriptor {fault} was torn (seq word)", self.what),
                ));
                st.broken = true;
                st.run = Run::Idle;
            } else if ring.done() < ring.head() {
                if st.shut || st.broken {
                    self.fail_unfinished(BackendError::new(
                        BackendErrorKind::CopyFailed,
                        format!("{}: ring stopped with the copy unfinished", self.what),
                    ));
                    st.run = Run::Idle;
                } else if self.relaunch(st).is_err() {
                    st.run = Run::Idle;
                }
            } else {
                st.run = Run::Idle;
            }
            return;
        }
        if st.run == Run::Running
            && ring.done() >= ring.head()
            && now.duration_since(st.last_submit) >= self.cfg.idle_stop
        {
            ring.request_stop(st.epoch);
            st.run = Run::Stopping;
        }
    }

    /// Stops the ring: no more copies, every instance asked to return, then waits up to
    /// [`RingConfig::stop_wait`] for them. `true`: every instance returned (unfinished
    /// copies, if any, have failed); `false`: the ring is abandoned and its memory will be
    /// leaked, with its copies failed and `done` forced so that no device work waits for
    /// it. Idempotent.
    pub(crate) fn shutdown(&self) -> bool {
        {
            let mut st = self.lock();
            st.shut = true;
            self.ring.request_stop(st.epoch);
            self.wake.notify_all();
        }
        if let Some(h) = self.keeper.lock().unwrap_or_else(|p| p.into_inner()).take()
            && h.thread().id() != std::thread::current().id()
        {
            let _ = h.join();
        }
        let start = Instant::now();
        let mut st = self.lock();
        loop {
            match self.launcher.idle() {
                Ok(true) => break,
                Err(e) => {
                    self.fail_unfinished(BackendError::new(
                        e.kind.clone(),
                        format!("{}: ring consumer failed: {}", self.what, e.message),
                    ));
                    break;
                }
                Ok(false) if start.elapsed() >= self.cfg.stop_wait => {
                    self.fail_unfinished(BackendError::new(
                        BackendErrorKind::DeviceLost,
                        format!(
                            "{}: ring consumer did not stop within {:?}",
                            self.what, self.cfg.stop_wait
                        ),
                    ));
                    self.abandoned.store(true, Ordering::SeqCst);
                    st.run = Run::Idle;
                    tracing::warn!(target: "drm_pagemap::cuda", ring = %self.what,
                        "ring consumer did not stop: its memory is leaked");
                    return false;
                }
                Ok(false) => {
                    drop(st);
                    std::thread::sleep(Duration::from_micros(50));
                    st = self.lock();
                }
            }
        }
        if self.ring.done() < self.ring.head() {
            self.fail_unfinished(BackendError::new(
                BackendErrorKind::CopyFailed,
                format!("{}: ring stopped with the copy unfinished", self.what),
            ));
        }
        st.run = Run::Idle;
        true
    }

    /// Whether an instance runs or is being stopped (tests).
    #[cfg_attr(not(any(test, feature = "internals")), allow(dead_code))]
    pub(crate) fn running(&self) -> bool {
        self.lock().run != Run::Idle
    }

    /// The epoch of the newest instance (tests).
    #[cfg_attr(not(any(test, feature = "internals")), allow(dead_code))]
    pub(crate) fn epoch(&self) -> u64 {
        self.lock().epoch
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let clean = !self.abandoned.load(Ordering::SeqCst) && self.shutdown();
        if clean {
            // SAFETY: dropped once, here; every instance has returned, nothing reads the
            // ring any more.
            unsafe {
                ManuallyDrop::drop(&mut self.launcher);
                ManuallyDrop::drop(&mut self.ring);
            }
        }
        // Else both stay leaked: a consumer may still write the ring's memory.
    }
}

/// The keeper thread: ticks while an instance runs; while none does, sleeps until a launch
/// wakes it (or 100 ms pass). It holds the engine only while awake.
fn keeper(weak: Weak<Engine>) {
    loop {
        let Some(e) = weak.upgrade() else { return };
        let period =
            (e.cfg.idle_stop / 4).clamp(Duration::from_micros(50), Duration::from_millis(10));
        {
            let mut st = e.lock();
            if st.shut {
                return;
            }
            e.tick_locked(&mut st, Instant::now());
            let wait = if st.run == Run::Idle {
                Duration::from_millis(100)
            } else {
                period
            };
            let _ = e.wake.wait_timeout(st, wait);
        }
        // The last owner may have let go meanwhile: the engine drops here then (its
        // shutdown does not join this thread).
        drop(e);
    }
}
