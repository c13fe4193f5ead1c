//! Giving back replaced pages off the caller's path: the reclaimer of an address space.
//!
//! Once a migration (or a copy back to RAM) has switched the page table, the pages it
//! replaced belong to nobody: their release (`devmem_release*` of their allocations, the
//! host memory's `free_frames`) can run after the call returns. In
//! [`ReleaseMode::Background`] the address space queues that work for one thread of its
//! own, started at the first queued release and joined when the address space drops (which
//! runs whatever is still queued first).
//!
//! Memory is never over-committed by the delay:
//! - the queue holds at most `max_pending_bytes` of replaced pages (one job is always
//!   accepted when the queue is empty); past that the caller releases inline, as in
//!   [`ReleaseMode::Inline`];
//! - an allocation that fails for lack of memory (`BackendErrorKind::OutOfMemory`: device
//!   memory, host frames) while releases are queued waits for the releases queued before it
//!   ([`Reclaimer::drain`]: a ticket, so a steady stream of later releases cannot hold it)
//!   and tries once more;
//! - [`crate::AddressSpace::flush_releases`] waits for everything queued so far.
//!
//! A release that panics is caught on the reclaimer's thread (a `tracing` error names it);
//! the jobs after it still run.

use crate::alloc::{Release, release_all};
use crate::backend::HostMemory;
use crate::error::{BackendError, BackendErrorKind};
use crate::stats::Counters;
use crate::types::{HostFrame, PageSize};
use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// How an address space gives back the pages a migration or a copy back to RAM replaced
/// ([`crate::AddressSpace::set_release_mode`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReleaseMode {
    /// On the caller's thread, before the call returns (the default): when a migration
    /// returns, its old pages are free.
    #[default]
    Inline,
    /// On the address space's reclaimer thread, after the call returns: the call returns
    /// once the page table has switched. At most `max_pending_bytes` of replaced pages wait
    /// at a time (more is released inline); an allocation that fails for lack of memory
    /// while releases wait waits for them and tries again, so the delay never makes an
    /// allocation fail. The replaced pages leave the address space's tables at once; the
    /// host-frame statistics and a backend's own memory counters count them until they are
    /// given back ([`crate::AddressSpace::flush_releases`] waits for that).
    Background {
        /// Bytes of replaced pages (device and host) that may wait for release at a time.
        /// A single job larger than this is still queued when nothing else waits.
        max_pending_bytes: u64,
    },
}

impl ReleaseMode {
    /// Bytes of replaced pages [`ReleaseMode::background`] lets wait: 4 GiB.
    pub const DEFAULT_MAX_PENDING_BYTES: u64 = 4 << 30;

    /// [`ReleaseMode::Background`] with [`ReleaseMode::DEFAULT_MAX_PENDING_BYTES`].
    pub const fn background() -> ReleaseMode {
        ReleaseMode::Background {
            max_pending_bytes: ReleaseMode::DEFAULT_MAX_PENDING_BYTES,
        }
    }
}

/// Whether an allocation failed for lack of memory (then memory queued for release is waited
/// for and the allocation tried once more; other failures are the caller's).
pub(crate) fn out_of_memory(e: &BackendError) -> bool {
    e.kind == BackendErrorKind::OutOfMemory
}

/// What one call replaced: host frames and device allocations to give back.
pub(crate) struct Job {
    /// Frames to free, of one page size, and the memory they belong to.
    pub frames: Option<(Arc<dyn HostMemory>, Vec<HostFrame>, PageSize)>,
    /// Allocations whose last pages went.
    pub releases: Vec<Release>,
    /// The statistics the frees are counted in.
    pub stats: Arc<Counters>,
    /// Bytes of pages the job gives back (its weight against the limit).
    pub bytes: u64,
}

impl Job {
    /// A job of `frames` (of `page_size`, from `host`; may be empty) and `releases`,
    /// weighed by the bytes of pages both hold.
    pub fn new(
        host: Option<(Arc<dyn HostMemory>, Vec<HostFrame>, PageSize)>,
        releases: Vec<Release>,
        stats: Arc<Counters>,
    ) -> Job {
        let host_bytes = host
            .as_ref()
            .map_or(0, |(_, f, ps)| (f.len() as u64).saturating_mul(ps.bytes()));
        let device_bytes = releases.iter().fold(0u64, |n, r| {
            let b = &r.backing;
            n.saturating_add((b.npages as u64).saturating_mul(b.page_size.bytes()))
        });
        Job {
            frames: host,
            releases,
            stats,
            bytes: host_bytes.saturating_add(device_bytes),
        }
    }

    /// Whether the job has nothing to give back.
    pub fn is_empty(&self) -> bool {
        self.releases.is_empty() && self.frames.as_ref().is_none_or(|f| f.1.is_empty())
    }

    /// Frees and releases (the inline path, and the reclaimer's).
    pub fn run(self) {
        if let Some((host, frames, ps)) = self.frames
            && !frames.is_empty()
        {
            host.free_frames(&frames, ps);
            self.stats.host_frames(-(frames.len() as i64), ps);
        }
        release_all(self.releases);
    }
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    /// Jobs queued since the start, and jobs finished (run or panicked).
    queued: u64,
    finished: u64,
    pending_bytes: u64,
    stop: bool,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    /// Signalled when a job is queued or the reclaimer must stop.
    work: Condvar,
    /// Signalled when a job finished.
    done: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The reclaimer of one address space (see the module docs).
#[derive(Default)]
pub(crate) struct Reclaimer {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// 0: [`ReleaseMode::Inline`]; else the byte limit of [`ReleaseMode::Background`].
    limit: AtomicU64,
}

impl Reclaimer {
    pub fn set_mode(&self, mode: ReleaseMode) {
        let limit = match mode {
            ReleaseMode::Inline => 0,
            // 0 bytes would read as inline: the smallest background limit is one byte
            // (one job at a time).
            ReleaseMode::Background { max_pending_bytes } => max_pending_bytes.max(1),
        };
        self.limit.store(limit, Ordering::Relaxed);
    }

    /// Whether releases may be queued ([`ReleaseMode::Background`]).
    pub fn is_background(&self) -> bool {
        self.limit.load(Ordering::Relaxed) != 0
    }

    pub fn mode(&self) -> ReleaseMode {
        match self.limit.load(Ordering::Relaxed) {
            0 => ReleaseMode::Inline,
            n => ReleaseMode::Background {
                max_pending_bytes: n,
            },
        }
    }

    /// Gives back what `job` holds: queued in background mode when it fits, else now.
    pub fn release(&self, job: Job) {
        if job.is_empty() {
            return;
        }
        let limit = self.limit.load(Ordering::Relaxed);
        let job = if limit == 0 {
            Some(job)
        } else {
            self.enqueue(job, limit)
        };
        if let Some(job) = job {
            job.run();
        }
    }

    /// Queues `job` unless the queue is over `limit` or no thread can run it; returns it
    /// then (to run inline).
    fn enqueue(&self, job: Job, limit: u64) -> Option<Job> {
        let mut thread = self.thread.lock().unwrap_or_else(|p| p.into_inner());
        {
            let mut q = self.shared.lock();
            if q.stop || (q.pending_bytes > 0 && q.pending_bytes.saturating_add(job.bytes) > limit)
            {
                return Some(job);
            }
            if thread.is_none() {
                let shared = self.shared.clone();
                match std::thread::Builder::new()
                    .name("drm-pagemap-reclaim".into())
                    .spawn(move || reclaim_loop(&shared))
                {
                    Ok(t) => *thread = Some(t),
                    Err(e) => {
                        tracing::warn!(
                            target: "drm_pagemap",
                            error = %e,
                            "no reclaimer thread: releasing inline"
                        );
                        return Some(job);
                    }
                }
            }
            q.pending_bytes = q.pending_bytes.saturating_add(job.bytes);
            q.queued += 1;
            q.jobs.push_back(job);
        }
        self.shared.work.notify_one();
        None
    }

    /// Waits until every job queued before this call has run. Returns whether there was
    /// any to wait for.
    pub fn drain(&self) -> bool {
        let mut q = self.shared.lock();
        let ticket = q.queued;
        if q.finished >= ticket {
            return false;
        }
        while q.finished < ticket {
            q = self.shared.done.wait(q).unwrap_or_else(|p| p.into_inner());
        }
        true
    }

    /// Jobs queued and not yet run, and the bytes of pages they hold.
    pub fn pending(&self) -> (u64, u64) {
        let q = self.shared.lock();
        (q.queued - q.finished, q.pending_bytes)
    }
}

impl Drop for Reclaimer {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.work.notify_all();
        let thread = self.thread.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = thread.take() {
            // The loop catches panics of jobs: it ends only by running out of work.
            let _ = t.join();
        }
    }
}

/// The reclaimer thread: runs jobs in order until stopped with an empty queue.
fn reclaim_loop(shared: &Shared) {
    loop {
        let job = {
            let mut q = shared.lock();
            loop {
                if let Some(j) = q.jobs.pop_front() {
                    break j;
                }
                if q.stop {
                    return;
                }
                q = shared.work.wait(q).unwrap_or_else(|p| p.into_inner());
            }
        };
        let bytes = job.bytes;
        if catch_unwind(AssertUnwindSafe(|| job.run())).is_err() {
            tracing::error!(
                target: "drm_pagemap",
                bytes,
                "a background release panicked (its memory may be lost); the reclaimer goes on"
            );
        }
        {
            let mut q = shared.lock();
            q.pending_bytes = q.pending_bytes.saturating_sub(bytes);
            q.finished += 1;
        }
        shared.done.notify_all();
    }
}
