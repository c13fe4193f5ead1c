//! The fault handler of the process: one pool of threads serving the userfaultfds of every
//! [`crate::PointerSpace`].
//!
//! - **One thread at rest.** A pool exists while at least one space has a userfaultfd; it
//!   starts with one thread and ends (every thread joined) when the last space detaches. At
//!   any time at most one thread of the pool waits in `epoll_wait` over every space's
//!   descriptor and the pool's stop signal (the *poller*).
//! - **Leader/follower.** The poller reads one fault message, hands the poller role to an
//!   idle thread (or spawns one when none is idle and the pool is below its size), and serves
//!   the fault itself. A thread that found the role taken waits; a helper idle for
//!   [`LINGER`] ends, so a process between bursts of faults has one handler thread however
//!   many spaces it has. A steady stream of faults keeps two threads (one serving, one
//!   polling) and spawns nothing more.
//! - **Bound.** Each space has at most [`PER_SPACE`] faults in service: its descriptor is
//!   registered `EPOLLONESHOT` and armed again only while it is under that count, so one
//!   space's slow faults (a copy home behind a slow device, a page whose migration takes long,
//!   a failing copy retried for a second) occupy at most [`PER_SPACE`] threads. The pool
//!   grows to `1 + PER_SPACE * spaces` threads, at most [`MAX_THREADS`]: with up to 7 spaces a
//!   fault never waits behind another space's fault (there is always a thread polling and
//!   one to spare for it); beyond that, it waits until one of the faults in service returns.
//!   Within the space, faults are served in arrival order (two at a time).

use crate::sys;
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{JoinHandle, ThreadId};
use std::time::Duration;

/// Faults of one space a pool serves at once.
pub const PER_SPACE: usize = 2;
/// The most threads a pool has.
pub const MAX_THREADS: usize = 16;
/// How long a helper thread stays idle before it ends (the first thread stays while a space
/// is attached).
pub const LINGER: Duration = Duration::from_millis(200);

/// The token of the stop signal in the epoll set.
const WAKE: u64 = u64::MAX;

/// What the pool serves: a userfaultfd and what to do with one of its faults.
pub(crate) trait FaultServer: Send + Sync {
    /// The userfaultfd (non-blocking).
    fn uffd(&self) -> BorrowedFd<'_>;
    /// Serves the fault of thread `tid` at `addr`: when it returns, the faulting thread is
    /// woken or signalled. Must not unwind (the pool catches a panic and counts it as an
    /// unserved fault via [`FaultServer::abandon`]).
    fn serve(&self, addr: u64, tid: i32);
    /// The fault at `addr` of thread `tid` could not be served (its serving panicked).
    fn abandon(&self, addr: u64, tid: i32, why: String);
}

struct Entry {
    server: Arc<dyn FaultServer>,
    in_service: usize,
    armed: bool,
}

#[derive(Default)]
struct State {
    spaces: HashMap<u64, Entry>,
    next_id: u64,
    /// Threads started and not yet ended.
    live: usize,
    /// Threads waiting for the poller role.
    idle: usize,
    /// A thread is in (or on its way to) `epoll_wait`.
    polling: bool,
    threads: Vec<(ThreadId, JoinHandle<()>)>,
}

struct Pool {
    epoll: OwnedFd,
    wake: OwnedFd,
    stop: AtomicBool,
    state: Mutex<State>,
    /// Idle threads wait here for the poller role.
    idle: Condvar,
    /// A detaching space waits here for its faults in service.
    drained: Condvar,
}

/// The pool of the process, while a space is attached.
static POOL: Mutex<Option<Arc<Pool>>> = Mutex::new(None);

fn pool_slot() -> MutexGuard<'static, Option<Arc<Pool>>> {
    POOL.lock().unwrap_or_else(|p| p.into_inner())
}

impl Pool {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn arm(&self, id: u64, server: &dyn FaultServer) -> io::Result<()> {
        sys::epoll_ctl(
            self.epoll.as_fd(),
            libc::EPOLL_CTL_MOD,
            server.uffd(),
            (libc::EPOLLIN | libc::EPOLLONESHOT) as u32,
            id,
        )
    }
}

/// Threads of the process's fault handler now (0 when no space has a userfaultfd).
pub fn handler_threads() -> usize {
    pool_slot().as_ref().map_or(0, |p| p.lock().live)
}

/// A space's place in the pool; dropping it detaches the space (after its faults in service
/// return) and, for the last space, ends the pool's threads.
pub(crate) struct Attached {
    pool: Arc<Pool>,
    id: u64,
}

/// Serves `server`'s userfaultfd from the process's pool (started here if none runs).
pub(crate) fn attach(server: Arc<dyn FaultServer>) -> io::Result<Attached> {
    let mut slot = pool_slot();
    let pool = match &*slot {
        Some(p) => p.clone(),
        None => {
            let epoll = sys::epoll()?;
            let wake = sys::eventfd()?;
            sys::epoll_ctl(
                epoll.as_fd(),
                libc::EPOLL_CTL_ADD,
                wake.as_fd(),
                libc::EPOLLIN as u32,
                WAKE,
            )?;
            Arc::new(Pool {
                epoll,
                wake,
                stop: AtomicBool::new(false),
                state: Mutex::new(State::default()),
                idle: Condvar::new(),
                drained: Condvar::new(),
            })
        }
    };
    let mut st = pool.lock();
    let id = st.next_id;
    st.next_id += 1;
    sys::epoll_ctl(
        pool.epoll.as_fd(),
        libc::EPOLL_CTL_ADD,
        server.uffd(),
        (libc::EPOLLIN | libc::EPOLLONESHOT) as u32,
        id,
    )?;
    st.spaces.insert(
        id,
        Entry {
            server,
            in_service: 0,
            armed: true,
        },
    );
    if st.live == 0
        && let Err(e) = spawn(&pool, &mut st)
    {
        if let Some(e) = st.spaces.remove(&id) {
            let _ = sys::epoll_ctl(
                pool.epoll.as_fd(),
                libc::EPOLL_CTL_DEL,
                e.server.uffd(),
                0,
                0,
            );
        }
        return Err(e);
    }
    drop(st);
    *slot = Some(pool.clone());
    Ok(Attached { pool, id })
}

fn spawn(pool: &Arc<Pool>, st: &mut State) -> io::Result<()> {
    // Threads that ended on their own are joined here (they have returned already).
    st.threads.retain(|(_, t)| !t.is_finished());
    let p = pool.clone();
    let t = std::thread::Builder::new()
        .name("drm-pagemap-uffd".into())
        .spawn(move || run(&p))?;
    st.threads.push((t.thread().id(), t));
    st.live += 1;
    Ok(())
}

impl Drop for Attached {
    fn drop(&mut self) {
        let mut st = self.pool.lock();
        if let Some(e) = st.spaces.get(&self.id) {
            let _ = sys::epoll_ctl(
                self.pool.epoll.as_fd(),
                libc::EPOLL_CTL_DEL,
                e.server.uffd(),
                0,
                0,
            );
        }
        // Faults of this space in service finish first (they hold its server).
        while st.spaces.get(&self.id).is_some_and(|e| e.in_service > 0) {
            st = self
                .pool
                .drained
                .wait(st)
                .unwrap_or_else(|p| p.into_inner());
        }
        st.spaces.remove(&self.id);
        drop(st);
        // Lock order: the slot, then the pool's state (as `attach`).
        let mut slot = pool_slot();
        let mut st = self.pool.lock();
        if !st.spaces.is_empty() || !slot.as_ref().is_some_and(|p| Arc::ptr_eq(p, &self.pool)) {
            return;
        }
        // The last space: this pool ends; a space attached from now on starts a new one.
        *slot = None;
        drop(slot);
        self.pool.stop.store(true, Ordering::Release);
        sys::eventfd_signal(self.pool.wake.as_fd());
        self.pool.idle.notify_all();
        let threads = std::mem::take(&mut st.threads);
        drop(st);
        let me = std::thread::current().id();
        for (id, t) in threads {
            // A space dropped by a pool thread itself cannot wait for that thread: it ends
            // on its own at its next turn (it sees `stop`).
            if id != me {
                let _ = t.join();
            }
        }
    }
}

/// One pool thread: waits for the poller role, polls, takes one fault, hands the role on
/// and serves the fault.
fn run(pool: &Arc<Pool>) {
    let mut st = pool.lock();
    loop {
        if pool.stop.load(Ordering::Acquire) {
            break;
        }
        if st.polling {
            st.idle += 1;
            let (g, waited) = pool
                .idle
                .wait_timeout(st, LINGER)
                .unwrap_or_else(|p| p.into_inner());
            st = g;
            st.idle -= 1;
            if waited.timed_out() && st.polling && st.live > 1 {
                break;
            }
            continue;
        }
        st.polling = true;
        drop(st);
        let event = sys::epoll_wait1(pool.epoll.as_fd(), 1000);
        st = pool.lock();
        st.polling = false;
        let id = match event {
            Ok(Some(WAKE)) | Ok(None) => continue,
            Ok(Some(id)) => id,
            Err(_) => {
                // Not expected on a valid epoll set; do not spin.
                drop(st);
                std::thread::sleep(Duration::from_millis(1));
                st = pool.lock();
                continue;
            }
        };
        let Some(entry) = st.spaces.get_mut(&id) else {
            continue;
        };
        // The descriptor is disarmed (one-shot) until armed again below.
        let msg = sys::uffd_read(entry.server.uffd());
        let fault = match msg {
            Ok(Some(m)) if m.event == sys::EVENT_PAGEFAULT => Some((m.address, m.thread_id())),
            _ => None,
        };
        if fault.is_some() {
            entry.in_service += 1;
        }
        entry.armed = entry.in_service < PER_SPACE;
        let server = entry.server.clone();
        if entry.armed && pool.arm(id, &*server).is_err() {
            // Armed again when a fault of the space in service returns, or never if the
            // descriptor is gone (the space is detaching).
            entry.armed = false;
        }
        let Some((addr, tid)) = fault else {
            continue;
        };
        // Someone else polls while this thread serves.
        if st.idle > 0 {
            pool.idle.notify_one();
        } else if st.live < (1 + PER_SPACE * st.spaces.len()).min(MAX_THREADS) {
            // Without a new thread the other spaces wait for this fault: they would still
            // be served (this thread polls again next), only later.
            let _ = spawn(pool, &mut st);
        }
        drop(st);
        let served =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| server.serve(addr, tid)));
        if let Err(p) = served {
            let why = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                server.abandon(addr, tid, why)
            }));
        }
        drop(server);
        st = pool.lock();
        if let Some(e) = st.spaces.get_mut(&id) {
            e.in_service -= 1;
            if !e.armed {
                let server = e.server.clone();
                e.armed = pool.arm(id, &*server).is_ok();
            }
        }
        pool.drained.notify_all();
    }
    st.live -= 1;
}
