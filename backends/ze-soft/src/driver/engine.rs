//! Copy engines: one thread per command queue or immediate command list, running batches of
//! commands in order. A command waits on its wait events (blocking on their condition
//! variables), runs, then signals its signal event.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::control::INJECT;
use super::counters::COUNTERS;
use super::device::{Device, state};
use super::events::{Event, Signal, Waited};
use super::handles::Handle;
use super::memory::{check_range, table};
use super::{ZeResult, code};

/// How often a blocked engine re-checks for a lost device or a stop request.
const RECHECK: Duration = Duration::from_millis(20);

/// What a command does.
#[derive(Clone)]
pub(crate) enum Op {
    Copy {
        dst: usize,
        src: usize,
        len: usize,
    },
    Fill {
        dst: usize,
        pattern: Arc<[u8]>,
        len: usize,
    },
    /// Barrier, signal-event and wait-on-events: nothing but the waits and the signal.
    Nop,
    Reset(&'static Handle<Event>),
}

/// One command.
#[derive(Clone)]
pub(crate) struct Cmd {
    pub op: Op,
    pub signal: Option<&'static Handle<Event>>,
    pub waits: Vec<&'static Handle<Event>>,
}

/// Commands submitted together, and what to signal when they are done.
pub(crate) struct Batch {
    pub cmds: Arc<[Cmd]>,
    pub done: Option<&'static Signal>,
}

struct Progress {
    submitted: u64,
    completed: u64,
}

struct Shared {
    device: &'static Handle<Device>,
    context: u64,
    stop: AtomicBool,
    progress: Mutex<Progress>,
    cv: Condvar,
}

/// An engine thread and its queue of batches.
pub(crate) struct Engine {
    tx: Mutex<Option<Sender<Batch>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    shared: Arc<Shared>,
}

impl Engine {
    /// Starts the thread.
    pub fn start(device: &'static Handle<Device>, context: u64, name: String) -> ZeResult<Self> {
        let shared = Arc::new(Shared {
            device,
            context,
            stop: AtomicBool::new(false),
            progress: Mutex::new(Progress {
                submitted: 0,
                completed: 0,
            }),
            cv: Condvar::new(),
        });
        let (tx, rx) = channel();
        let worker = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || run(&worker, rx))
            .map_err(|_| code::OUT_OF_HOST_MEMORY)?;
        Ok(Engine {
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            shared,
        })
    }

    /// Queues a batch.
    pub fn submit(&self, batch: Batch) -> ZeResult {
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        let tx = tx.as_ref().ok_or(code::INVALID_NULL_HANDLE)?;
        self.shared
            .progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .submitted += 1;
        if tx.send(batch).is_err() {
            self.shared
                .progress
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .submitted -= 1;
            return Err(code::UNKNOWN);
        }
        Ok(())
    }

    /// Waits until everything submitted so far has run (ns timeout; `u64::MAX` forever).
    pub fn synchronize(&self, timeout_ns: u64) -> ZeResult {
        self.shared.device.obj.check()?;
        let deadline = (timeout_ns != u64::MAX)
            .then(|| std::time::Instant::now().checked_add(Duration::from_nanos(timeout_ns)))
            .flatten();
        let forever = timeout_ns == u64::MAX || deadline.is_none();
        let mut p = self
            .shared
            .progress
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let target = p.submitted;
        while p.completed < target {
            self.shared.device.obj.check()?;
            let slice = match deadline {
                _ if forever => RECHECK,
                Some(d) => {
                    let now = std::time::Instant::now();
                    if now >= d {
                        return Err(code::NOT_READY);
                    }
                    (d - now).min(RECHECK)
                }
                None => RECHECK,
            };
            p = self
                .shared
                .cv
                .wait_timeout(p, slice)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }

    /// Stops the thread (abandoning what it has not run) and joins it.
    pub fn shutdown(&self) {
        self.shared.stop.store(true, Ordering::Release);
        drop(self.tx.lock().unwrap_or_else(|e| e.into_inner()).take());
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn run(shared: &Shared, rx: Receiver<Batch>) {
    while let Ok(batch) = rx.recv() {
        for cmd in batch.cmds.iter() {
            if shared.stop.load(Ordering::Acquire) {
                return;
            }
            execute(shared, cmd);
        }
        if let Some(done) = batch.done {
            if shared.device.obj.lost.load(Ordering::Acquire) {
                done.set_lost();
            } else {
                done.set();
            }
        }
        shared
            .progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .completed += 1;
        shared.cv.notify_all();
    }
}

/// Waits for `signal`, re-checking for a lost device or a stop. `false`: give up.
fn wait_gate(shared: &Shared, signal: &Signal) -> bool {
    loop {
        if shared.stop.load(Ordering::Acquire) || shared.device.obj.check().is_err() {
            return false;
        }
        match signal.wait(Some(RECHECK)) {
            Waited::Signalled => return true,
            Waited::Lost => return false,
            Waited::TimedOut => {}
        }
    }
}

fn execute(shared: &Shared, cmd: &Cmd) {
    let gates_open = cmd.waits.iter().all(|ev| wait_gate(shared, &ev.obj.signal));
    if !gates_open || shared.device.obj.check().is_err() {
        // A lost device (or a stop): the command never completes.
        if let Some(ev) = cmd.signal
            && shared.device.obj.check().is_err()
        {
            ev.obj.signal.set_lost();
        }
        return;
    }
    match &cmd.op {
        Op::Copy { dst, src, len } => copy(shared, *dst, *src, *len),
        Op::Fill { dst, pattern, len } => fill(shared, *dst, pattern, *len),
        Op::Nop => {}
        Op::Reset(ev) => ev.obj.signal.reset(),
    }
    if let Ok(s) = state()
        && !s.config.latency.is_zero()
    {
        std::thread::sleep(s.config.latency);
    }
    if let Some(ev) = cmd.signal
        && !INJECT.take_hang()
    {
        ev.obj.signal.set();
    }
}

/// Re-checks ranges at run time (memory may have been freed since the append). In strict mode a
/// failing range is counted and the command is skipped; otherwise it is logged and run.
fn ranges_ok(shared: &Shared, t: &super::memory::Table, ranges: &[(usize, usize)]) -> bool {
    for &(addr, len) in ranges {
        if let Err(why) = check_range(t, shared.context, &shared.device.obj, addr, len) {
            let what = format_args!("engine of device {}: {why}", shared.device.obj.index);
            if super::violation(code::INVALID_ARGUMENT, what).is_err() {
                eprintln!("ze-soft: command skipped: {why}");
                return false;
            }
        }
    }
    true
}

fn copy(shared: &Shared, dst: usize, src: usize, len: usize) {
    let t = table();
    if len == 0 || !ranges_ok(shared, &t, &[(dst, len), (src, len)]) {
        return;
    }
    // SAFETY: both ranges lie inside live allocations (checked under the table's read lock,
    // which a free needs for writing), or the user turned strict checks off and vouched for
    // them; `copy` allows overlap.
    unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, len) };
    COUNTERS.copies.add(1);
    COUNTERS.bytes_copied.add(len as u64);
}

fn fill(shared: &Shared, dst: usize, pattern: &[u8], len: usize) {
    let t = table();
    if len == 0 || pattern.is_empty() || !ranges_ok(shared, &t, &[(dst, len)]) {
        return;
    }
    // SAFETY: as in `copy`: the range is inside a live allocation held by the read lock.
    let out = unsafe { std::slice::from_raw_parts_mut(dst as *mut u8, len) };
    for (i, b) in out.iter_mut().enumerate() {
        *b = pattern[i % pattern.len()];
    }
    COUNTERS.fills.add(1);
}
