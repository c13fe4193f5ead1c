//! The shared fence worker: one thread (per copy of the core, started on first use) that runs
//! work handed to [`super::Fence::on_signal`] once its fence signals, and watches fences
//! whose implementation has no callbacks of its own (polling them, backing off from 10 us to
//! 1 ms while nothing changes). A copy whose pre-fence is a host fence is submitted from here
//! when the fence signals: no thread per copy.
//!
//! Plain `std` synchronisation on purpose: the worker is not part of what the loom models
//! explore (they check the fences' own callback registration).

use super::{Fence, FenceCallback};
use crate::error::FenceError;
use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::Duration;

type Outcome = Result<(), FenceError>;

#[derive(Default)]
struct State {
    /// Work whose fence has signalled, in arrival order.
    ready: VecDeque<(FenceCallback, Outcome)>,
    /// Fences watched by polling, with what to run when they signal.
    watched: Vec<(Fence, FenceCallback)>,
    /// The thread runs.
    started: bool,
}

struct Worker {
    state: Mutex<State>,
    cond: Condvar,
}

const FIRST_NAP: Duration = Duration::from_micros(10);
const LONGEST_NAP: Duration = Duration::from_millis(1);

fn worker() -> &'static Worker {
    static W: OnceLock<Worker> = OnceLock::new();
    W.get_or_init(|| Worker {
        state: Mutex::new(State::default()),
        cond: Condvar::new(),
    })
}

/// Runs `work` with `outcome` on the worker thread.
pub(super) fn run(work: FenceCallback, outcome: Outcome) {
    let w = worker();
    let mut st = w.state.lock().unwrap_or_else(|p| p.into_inner());
    st.ready.push_back((work, outcome));
    wake(w, st);
}

/// Has the worker poll `fence` and run `cb` (on the worker thread) once it signals.
pub(super) fn watch(fence: Fence, cb: FenceCallback) {
    let w = worker();
    let mut st = w.state.lock().unwrap_or_else(|p| p.into_inner());
    st.watched.push((fence, cb));
    wake(w, st);
}

/// Starts the thread if needed, and wakes it.
fn wake(w: &'static Worker, mut st: std::sync::MutexGuard<'_, State>) {
    if !st.started {
        st.started = std::thread::Builder::new()
            .name("drm-pagemap-fences".into())
            .spawn(move || serve(w))
            .is_ok();
        if !st.started {
            // No thread to be had: do the work here (blocking, but correct).
            let ready: Vec<_> = st.ready.drain(..).collect();
            let watched = std::mem::take(&mut st.watched);
            drop(st);
            for (work, outcome) in ready {
                call(work, outcome);
            }
            for (f, cb) in watched {
                let outcome = f.wait();
                call(cb, outcome);
            }
            return;
        }
    }
    drop(st);
    w.cond.notify_one();
}

/// Runs one piece of work; a panic in it is contained (the worker must keep serving).
fn call(work: FenceCallback, outcome: Outcome) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || work(outcome)));
}

fn serve(w: &'static Worker) {
    let mut nap = FIRST_NAP;
    let mut st = w.state.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let ready: Vec<_> = st.ready.drain(..).collect();
        let watched = std::mem::take(&mut st.watched);
        drop(st);
        let mut progressed = !ready.is_empty();
        for (work, outcome) in ready {
            call(work, outcome);
        }
        // Poll without the lock (a status query may call into a driver).
        let mut still = Vec::with_capacity(watched.len());
        for (f, cb) in watched {
            match f.status().outcome() {
                Some(outcome) => {
                    progressed = true;
                    call(cb, outcome);
                }
                None => still.push((f, cb)),
            }
        }
        st = w.state.lock().unwrap_or_else(|p| p.into_inner());
        st.watched.append(&mut still);
        if !st.ready.is_empty() {
            continue;
        }
        nap = if progressed {
            FIRST_NAP
        } else {
            (nap * 2).min(LONGEST_NAP)
        };
        st = if st.watched.is_empty() {
            nap = FIRST_NAP;
            w.cond.wait(st).unwrap_or_else(|p| p.into_inner())
        } else {
            let (g, waited) = w
                .cond
                .wait_timeout(st, nap)
                .unwrap_or_else(|p| p.into_inner());
            if !waited.timed_out() {
                // New work: look at the watched fences soon again.
                nap = FIRST_NAP;
            }
            g
        };
    }
}

#[cfg(test)]
mod tests {
    use super::super::{FenceOps, FenceStatus, HostFence};
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// A fence with no callbacks of its own: the worker polls it.
    #[derive(Debug, Default)]
    struct Polled(AtomicBool);

    impl FenceOps for Polled {
        fn context(&self) -> u64 {
            1
        }
        fn seqno(&self) -> u64 {
            1
        }
        fn status(&self) -> FenceStatus {
            if self.0.load(Ordering::SeqCst) {
                FenceStatus::Signaled
            } else {
                FenceStatus::Pending
            }
        }
        fn wait(&self, _: Option<Duration>) -> Result<(), FenceError> {
            unreachable!("the worker polls")
        }
    }

    #[test]
    // The worker lives as long as the process; Miri refuses to end with threads running.
    #[cfg_attr(miri, ignore)]
    fn on_signal_runs_once_on_the_worker_whatever_the_fence() {
        let ran = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = std::sync::mpsc::channel();
        let me = std::thread::current().id();
        let poll = Arc::new(Polled::default());
        let polled = Fence::from_arc(poll.clone());
        let host = HostFence::new(1, 1);
        let fences = [
            Fence::signaled(),
            Fence::from_host(host.clone()),
            polled.clone(),
        ];
        for f in &fences {
            let (ran, tx) = (ran.clone(), tx.clone());
            f.on_signal(Box::new(move |o| {
                ran.fetch_add(1, Ordering::SeqCst);
                tx.send((o, std::thread::current().id())).unwrap();
            }));
        }
        // A callback that panics does not stop the worker.
        Fence::signaled().on_signal(Box::new(|_| panic!("contained")));
        let (o, on) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(o, Ok(()));
        assert_ne!(on, me, "already signalled: still on the worker");
        host.signal();
        poll.0.store(true, Ordering::SeqCst);
        for _ in 0..2 {
            let (o, on) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
            assert_eq!(o, Ok(()));
            assert_ne!(on, me);
        }
        assert!(rx.recv_timeout(Duration::from_millis(50)).is_err());
        assert_eq!(ran.load(Ordering::SeqCst), 3, "each exactly once");
    }
}
