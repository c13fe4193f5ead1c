//! The copy path's fence policy (what xe's `xe_svm_copy` does, done right), as a
//! [`DevmemOps`] wrapper installed on every pagemap of an SVM context.
//!
//! For each copy call the core makes:
//! 1. **Pre-migrate fence.** Signalled: ignored. Failed: the call fails before anything is
//!    issued (upstream ignores the error). Pending and from a device queue of this context:
//!    handed to the call's **first command** as a device-side dependency; later commands of the
//!    call run on the same queue behind it. Pending and host-only or a container: waited on
//!    the CPU first (the only CPU waits of the copy path).
//! 2. **Commands.** Entries with an address are grouped into runs of physically contiguous
//!    device pages, each at most 8 MiB ([`MAX_COMMAND_BYTES`]); a run that reaches the limit
//!    ends there, so there is no 2049-page command. Holes (no address) end a run.
//! 3. **Ordering check.** A command issued without the dependency while the pre-migrate
//!    fence was still pending must be provably behind the first command: same fence context,
//!    later seqno, not a container. If one is not, the pre-migrate fence and every command
//!    are waited on the CPU and the unproven commands are issued again; their first run may
//!    have been overwritten by the clear, the second cannot be (the core keeps the sources
//!    unchanged while a copy is in flight). Counted as an ordering repair.
//! 4. **Result.** The fence of the call: the pre-migrate fence when nothing was copied (that
//!    is the only thing to wait for), the one command's fence, or a container of all of them,
//!    so that an error of any command reaches the core. A failure after something was issued
//!    comes back through that fence (a member that signalled the error), so the core waits
//!    for what is in flight before it releases anything.
//!
//! The wrapper also keeps the pagemap's accounting: `allocate` refuses what does not fit the
//! capacity, `devmem_release` gives it back.

use crate::accounting::Account;
use crate::fences::{QueueContexts, TimedFence};
use crate::stats::{Bucket, Counters};
use drm_pagemap_core::{
    BackendError, BackendErrorKind, CopyOp, CopyRequest, DeviceId, DevmemBacking, DevmemOps, Fence,
    FenceArray, FenceContext, FenceError, FenceStatus, HostFence, PageSize, PagemapId, Pfn,
};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The largest command: 8 MiB of contiguous device pages.
pub const MAX_COMMAND_BYTES: u64 = 8 << 20;

/// The fence policy and accounting around one pagemap's device-memory operations.
pub(crate) struct PolicyOps {
    pub inner: Arc<dyn DevmemOps>,
    pub pagemap: PagemapId,
    pub device: DeviceId,
    pub stats: Arc<Counters>,
    pub queues: Arc<QueueContexts>,
    pub account: Arc<Account>,
    pub fence_timeout: Option<Duration>,
}

/// One command issued by a call.
struct Issued {
    start: usize,
    end: usize,
    fence: Fence,
    /// Issued without the dependency while the pre-migrate fence was pending.
    unproven: bool,
}

fn copy_error(msg: String) -> BackendError {
    BackendError::new(BackendErrorKind::CopyFailed, msg)
}

/// A fence that has already signalled `error`.
fn failed_fence(error: BackendError) -> Fence {
    let f = HostFence::new(FenceContext::new(), 1);
    f.signal_error(error);
    Fence::from_host(f)
}

impl PolicyOps {
    fn op_index(op: CopyOp) -> usize {
        match op {
            CopyOp::ToDevmem => 0,
            CopyOp::ToRam => 1,
        }
    }

    fn issue(&self, op: CopyOp, req: &CopyRequest<'_>) -> Result<Fence, BackendError> {
        let f = match op {
            CopyOp::ToDevmem => self.inner.copy_to_devmem(req)?,
            CopyOp::ToRam => self.inner.copy_to_ram(req)?,
        };
        self.queues.learn(&f);
        Ok(f)
    }

    /// Step 1: what to do with the pre-migrate fence. `Ok(Some)`: hand it to the first
    /// command; `Ok(None)`: nothing to order behind (signalled, or waited here).
    fn prepare<'a>(
        &self,
        pre: Option<&'a Fence>,
        op: CopyOp,
    ) -> Result<Option<&'a Fence>, BackendError> {
        let Some(f) = pre else { return Ok(None) };
        match f.status() {
            FenceStatus::Signaled => Ok(None),
            FenceStatus::Failed(e) => {
                self.stats.fence_errors.inc();
                Err(copy_error(format!(
                    "{} on {}: {op}: the pre-migrate fence failed: {e}",
                    self.pagemap, self.device
                )))
            }
            FenceStatus::Pending if self.queues.is_device_fence(f) => Ok(Some(f)),
            FenceStatus::Pending => {
                self.cpu_wait(f).map_err(|e| {
                    copy_error(format!(
                        "{} on {}: {op}: pre-migrate fence: {e}",
                        self.pagemap, self.device
                    ))
                })?;
                Ok(None)
            }
        }
    }

    fn cpu_wait(&self, f: &Fence) -> Result<(), FenceError> {
        let t = Instant::now();
        let r = f.wait_for(self.fence_timeout);
        self.stats.cpu_fence_waits.add(0, t.elapsed());
        if matches!(r, Err(FenceError::Failed(_))) {
            self.stats.fence_errors.inc();
        }
        r
    }

    /// The fence for a call that failed after issuing `issued`: the core waits for them and
    /// then sees `error`.
    fn fail_after(&self, issued: Vec<Issued>, error: BackendError) -> Fence {
        let mut members: Vec<Fence> = issued.into_iter().map(|c| c.fence).collect();
        members.push(failed_fence(error));
        Fence::new(FenceArray::new(members))
    }

    /// Step 3: proves that commands issued without the dependency run after the first one,
    /// or waits and issues them again.
    fn check_order(
        &self,
        op: CopyOp,
        req: &CopyRequest<'_>,
        pre: &Fence,
        issued: &mut [Issued],
    ) -> Result<(), BackendError> {
        let (ctx, seq, first_container) = {
            let f0 = &issued[0].fence;
            (f0.context(), f0.seqno(), f0.is_container())
        };
        let ordered = |f: &Fence| {
            !first_container && !f.is_container() && f.context() == ctx && f.seqno() > seq
        };
        if issued.iter().all(|c| !c.unproven || ordered(&c.fence)) {
            return Ok(());
        }
        self.stats.ordering_repairs.inc();
        self.cpu_wait(pre).map_err(|e| {
            copy_error(format!(
                "{} on {}: {op}: pre-migrate fence (ordering repair): {e}",
                self.pagemap, self.device
            ))
        })?;
        let t = Instant::now();
        for c in issued.iter() {
            // Errors of commands issued again do not matter; the others' reach the core.
            let _ = c.fence.wait_for(self.fence_timeout);
        }
        self.stats.cpu_fence_waits.add(0, t.elapsed());
        for c in issued.iter_mut() {
            if c.unproven && !ordered(&c.fence) {
                let sub = CopyRequest {
                    page_size: req.page_size,
                    pages: &req.pages[c.start..c.end],
                    addrs: &req.addrs[c.start..c.end],
                    pre_fence: None,
                };
                c.fence = self.issue(op, &sub)?;
                c.unproven = false;
            }
        }
        Ok(())
    }

    fn copy(&self, op: CopyOp, req: &CopyRequest<'_>) -> Result<Fence, BackendError> {
        let start = Instant::now();
        let n = req.pages.len();
        if req.addrs.len() != n {
            return Err(copy_error(format!(
                "{} on {}: {op}: {} pages but {} addresses",
                self.pagemap,
                self.device,
                n,
                req.addrs.len()
            )));
        }
        let dep = self.prepare(req.pre_fence, op)?;
        let ps = req.page_size;
        let max = (MAX_COMMAND_BYTES / ps.bytes()).max(1) as usize;
        let gran = ps.granules();
        // The first command waits in `one` (most calls are one command: no heap allocation);
        // a second moves both into `issued`.
        let mut one: Option<Issued> = None;
        let mut issued: Vec<Issued> = Vec::new();
        let mut dep_pending = dep.is_some();
        let mut entries = 0usize;
        let mut i = 0;
        while i < n {
            if req.addrs[i].is_none() {
                i += 1;
                continue;
            }
            let s = i;
            let base = req.pages[s].0 as u64;
            i += 1;
            while i < n
                && i - s < max
                && !req.addrs[i].is_none()
                && req.pages[i].0 as u64 == base + (i - s) as u64 * gran
            {
                i += 1;
            }
            let first = one.is_none() && issued.is_empty();
            if !first && dep_pending {
                dep_pending = dep.is_some_and(|f| !f.is_signaled());
            }
            let sub = CopyRequest {
                page_size: ps,
                pages: &req.pages[s..i],
                addrs: &req.addrs[s..i],
                pre_fence: if first { dep } else { None },
            };
            match self.issue(op, &sub) {
                Ok(fence) => {
                    if first && dep.is_some() {
                        self.stats.fence_dependencies.inc();
                    }
                    entries += i - s;
                    let c = Issued {
                        start: s,
                        end: i,
                        fence,
                        unproven: !first && dep_pending,
                    };
                    if first {
                        one = Some(c);
                    } else {
                        issued.extend(one.take());
                        issued.push(c);
                    }
                }
                Err(e) if first => return Err(e),
                Err(e) => {
                    issued.splice(0..0, one.take());
                    return Ok(self.fail_after(issued, e));
                }
            }
        }
        if let Some(pre) = dep
            && issued.iter().any(|c| c.unproven)
            && let Err(e) = self.check_order(op, req, pre, &mut issued)
        {
            return Ok(self.fail_after(issued, e));
        }
        let bytes = entries as u64 * ps.bytes();
        let (opi, bucket) = (Self::op_index(op), Bucket::of(bytes).index());
        let commands = issued.len() + one.is_some() as usize;
        self.stats.copies[opi][bucket].issued(commands as u64, bytes);
        let fence = match (one, issued.len()) {
            (Some(c), _) => c.fence,
            (None, 0) => return Ok(dep.cloned().unwrap_or_else(Fence::signaled)),
            (None, 1) => issued.pop().map(|c| c.fence).expect("one command"),
            (None, _) => Fence::new(FenceArray::new(
                issued.into_iter().map(|c| c.fence).collect(),
            )),
        };
        Ok(TimedFence::wrap(
            fence,
            start,
            self.stats.clone(),
            opi,
            bucket,
        ))
    }
}

impl DevmemOps for PolicyOps {
    fn allocate(&self, npages: usize, page_size: PageSize) -> Result<DevmemBacking, BackendError> {
        let bytes = (npages as u64).saturating_mul(page_size.bytes());
        if !self.account.try_reserve(bytes) {
            return Err(BackendError::new(
                BackendErrorKind::OutOfMemory,
                format!(
                    "{} on {}: {bytes} bytes requested, {} of {} in use",
                    self.pagemap,
                    self.device,
                    self.account.used(),
                    self.account.capacity
                ),
            ));
        }
        match self.inner.allocate(npages, page_size) {
            Ok(b) => {
                if let Some(f) = &b.pre_migrate_fence {
                    self.queues.learn(f);
                }
                Ok(b)
            }
            Err(e) => {
                self.account.release(bytes);
                Err(e)
            }
        }
    }

    fn populate_devmem_pfn(
        &self,
        backing: &DevmemBacking,
        out: &mut [Pfn],
    ) -> Result<(), BackendError> {
        self.inner.populate_devmem_pfn(backing, out)
    }

    fn copy_to_devmem(&self, req: &CopyRequest<'_>) -> Result<Fence, BackendError> {
        self.copy(CopyOp::ToDevmem, req)
    }

    fn copy_to_ram(&self, req: &CopyRequest<'_>) -> Result<Fence, BackendError> {
        self.copy(CopyOp::ToRam, req)
    }

    fn devmem_release(&self, backing: DevmemBacking) {
        let bytes = (backing.npages as u64).saturating_mul(backing.page_size.bytes());
        self.inner.devmem_release(backing);
        self.account.release(bytes);
    }

    fn devmem_release_unused(&self, backing: DevmemBacking) {
        let bytes = (backing.npages as u64).saturating_mul(backing.page_size.bytes());
        self.inner.devmem_release_unused(backing);
        self.account.release(bytes);
    }

    fn devmem_release_many(&self, backings: Vec<DevmemBacking>) {
        let sizes: Vec<u64> = backings
            .iter()
            .map(|b| (b.npages as u64).saturating_mul(b.page_size.bytes()))
            .collect();
        self.inner.devmem_release_many(backings);
        for bytes in sizes {
            self.account.release(bytes);
        }
    }

    fn capacity_bytes(&self) -> u64 {
        self.inner.capacity_bytes().min(self.account.capacity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drm_pagemap_core::{DmaAddr, FenceTimeline};
    use std::sync::Mutex;

    /// What the fake backend saw of one command.
    #[derive(Clone, Debug)]
    struct Seen {
        first_pfn: u32,
        len: usize,
        had_pre_fence: bool,
        pre_signalled_at_issue: bool,
    }

    /// A backend that records commands and returns fences from `timeline` (an in-order
    /// queue) or, with `scatter`, each from a fresh context (a queue that proves nothing).
    struct Fake {
        seen: Mutex<Vec<Seen>>,
        watch: Mutex<Option<Fence>>,
        timeline: FenceTimeline,
        scatter: bool,
        fail_nth: Option<usize>,
        error_fences: bool,
    }

    impl Fake {
        fn new() -> Arc<Fake> {
            Fake::with(false, None, false)
        }
        fn with(scatter: bool, fail_nth: Option<usize>, error_fences: bool) -> Arc<Fake> {
            Arc::new(Fake {
                seen: Mutex::new(Vec::new()),
                watch: Mutex::new(None),
                timeline: FenceTimeline::new(),
                scatter,
                fail_nth,
                error_fences,
            })
        }
        fn seen(&self) -> Vec<Seen> {
            self.seen.lock().unwrap().clone()
        }
        fn record(&self, req: &CopyRequest<'_>) -> Result<Fence, BackendError> {
            let watched = self.watch.lock().unwrap().clone();
            let mut seen = self.seen.lock().unwrap();
            if Some(seen.len()) == self.fail_nth {
                return Err(BackendError::new(
                    BackendErrorKind::Injected,
                    "fake submit failure",
                ));
            }
            seen.push(Seen {
                first_pfn: req.pages[0].0,
                len: req.pages.len(),
                had_pre_fence: req.pre_fence.is_some(),
                pre_signalled_at_issue: watched.is_some_and(|f| f.is_signaled()),
            });
            let f = if self.scatter {
                FenceTimeline::new().host_fence()
            } else {
                self.timeline.host_fence()
            };
            if self.error_fences {
                f.signal_error(BackendError::new(
                    BackendErrorKind::CopyFailed,
                    "fake copy failed",
                ));
            } else {
                f.signal();
            }
            Ok(Fence::from_host(f))
        }
    }

    impl DevmemOps for Fake {
        fn allocate(
            &self,
            npages: usize,
            page_size: PageSize,
        ) -> Result<DevmemBacking, BackendError> {
            Ok(DevmemBacking {
                cookie: 1,
                npages,
                page_size,
                pre_migrate_fence: Some(Fence::from_host(self.timeline.host_fence())),
            })
        }
        fn populate_devmem_pfn(
            &self,
            _b: &DevmemBacking,
            out: &mut [Pfn],
        ) -> Result<(), BackendError> {
            for (i, p) in out.iter_mut().enumerate() {
                *p = Pfn(i as u32);
            }
            Ok(())
        }
        fn copy_to_devmem(&self, req: &CopyRequest<'_>) -> Result<Fence, BackendError> {
            self.record(req)
        }
        fn copy_to_ram(&self, req: &CopyRequest<'_>) -> Result<Fence, BackendError> {
            self.record(req)
        }
        fn devmem_release(&self, _b: DevmemBacking) {}
        fn capacity_bytes(&self) -> u64 {
            1 << 40
        }
    }

    fn policy(inner: Arc<Fake>) -> (PolicyOps, Arc<Counters>, Arc<QueueContexts>) {
        let stats = Arc::new(Counters::default());
        let queues = Arc::new(QueueContexts::default());
        let p = PolicyOps {
            inner,
            pagemap: PagemapId(0),
            device: DeviceId(0),
            stats: stats.clone(),
            queues: queues.clone(),
            account: Arc::new(Account::new(PagemapId(0), DeviceId(0), 1 << 40)),
            fence_timeout: None,
        };
        (p, stats, queues)
    }

    fn addrs(n: usize) -> Vec<DmaAddr> {
        (0..n).map(|i| DmaAddr(0x1000 + i as u64 * 4096)).collect()
    }

    fn contiguous(n: usize) -> Vec<Pfn> {
        (0..n as u32).map(Pfn).collect()
    }

    #[test]
    fn commands_never_exceed_8_mib() {
        for (n, expect) in [
            (2048, vec![2048]),
            (2049, vec![2048, 1]),
            (4096, vec![2048, 2048]),
            (4097, vec![2048, 2048, 1]),
        ] {
            let fake = Fake::new();
            let (p, stats, _) = policy(fake.clone());
            let req = CopyRequest {
                page_size: PageSize::Size4K,
                pages: &contiguous(n),
                addrs: &addrs(n),
                pre_fence: None,
            };
            p.copy_to_devmem(&req).unwrap().wait().unwrap();
            let lens: Vec<usize> = fake.seen().iter().map(|s| s.len).collect();
            assert_eq!(lens, expect, "{n} pages");
            assert_eq!(stats.snapshot().total_commands(), expect.len() as u64);
        }
        // 2 MiB pages: four per command.
        let fake = Fake::new();
        let (p, _, _) = policy(fake.clone());
        let pages: Vec<Pfn> = (0..9u32).map(|i| Pfn(i * 512)).collect();
        let req = CopyRequest {
            page_size: PageSize::Size2M,
            pages: &pages,
            addrs: &addrs(9),
            pre_fence: None,
        };
        p.copy_to_ram(&req).unwrap().wait().unwrap();
        let lens: Vec<usize> = fake.seen().iter().map(|s| s.len).collect();
        assert_eq!(lens, vec![4, 4, 1]);
    }

    #[test]
    fn discontiguous_pages_and_holes_split_commands() {
        let fake = Fake::new();
        let (p, _, _) = policy(fake.clone());
        // d, d+1, d+5, d+6, hole, d+8
        let pages = [Pfn(10), Pfn(11), Pfn(15), Pfn(16), Pfn(17), Pfn(18)];
        let mut a = addrs(6);
        a[4] = DmaAddr::NONE;
        let req = CopyRequest {
            page_size: PageSize::Size4K,
            pages: &pages,
            addrs: &a,
            pre_fence: None,
        };
        p.copy_to_devmem(&req).unwrap().wait().unwrap();
        let cmds: Vec<(u32, usize)> = fake.seen().iter().map(|s| (s.first_pfn, s.len)).collect();
        assert_eq!(cmds, vec![(10, 2), (15, 2), (18, 1)]);
    }

    #[test]
    fn device_fence_is_a_dependency_of_the_first_command_only() {
        let fake = Fake::new();
        let (p, stats, _) = policy(fake.clone());
        // The allocation teaches the policy the queue's context.
        let b = p.allocate(4, PageSize::Size4K).unwrap();
        let pre = b.pre_migrate_fence.clone().unwrap();
        let pages = [Pfn(0), Pfn(1), Pfn(5), Pfn(6)];
        let req = CopyRequest {
            page_size: PageSize::Size4K,
            pages: &pages,
            addrs: &addrs(4),
            pre_fence: Some(&pre),
        };
        let f = p.copy_to_devmem(&req).unwrap();
        let seen = fake.seen();
        assert_eq!(seen.len(), 2);
        assert!(seen[0].had_pre_fence);
        assert!(!seen[1].had_pre_fence);
        assert!(!pre.is_signaled(), "no CPU wait for a device fence");
        let s = stats.snapshot();
        assert_eq!(s.fence_dependencies, 1);
        assert_eq!(s.cpu_fence_waits.count, 0);
        assert_eq!(s.ordering_repairs, 0, "same queue, later seqno: proven");
        f.wait().unwrap();
        p.devmem_release(b);
    }

    fn signal_later(f: Arc<HostFence>, error: bool) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            if error {
                f.signal_error(BackendError::new(
                    BackendErrorKind::CopyFailed,
                    "clear failed",
                ));
            } else {
                f.signal();
            }
        })
    }

    #[test]
    fn host_only_and_container_fences_are_waited_on_the_cpu() {
        for container in [false, true] {
            let fake = Fake::new();
            let (p, stats, _) = policy(fake.clone());
            let host = HostFence::new(FenceContext::new(), 1);
            let pre = if container {
                Fence::new(FenceArray::new(vec![
                    Fence::from_host(host.clone()),
                    Fence::signaled(),
                ]))
            } else {
                Fence::from_host(host.clone())
            };
            let t = signal_later(host, false);
            let req = CopyRequest {
                page_size: PageSize::Size4K,
                pages: &contiguous(3),
                addrs: &addrs(3),
                pre_fence: Some(&pre),
            };
            p.copy_to_devmem(&req).unwrap().wait().unwrap();
            assert!(pre.is_signaled(), "returned only after the CPU wait");
            let seen = fake.seen();
            assert!(!seen[0].had_pre_fence, "nothing left to depend on");
            let s = stats.snapshot();
            assert_eq!(s.cpu_fence_waits.count, 1);
            assert_eq!(s.fence_dependencies, 0);
            t.join().unwrap();
        }
    }

    /// The CPU waits of the policy (pre-migrate fence, ordering repair) with the context's
    /// fence timeout as `Svm::new` hands it over, at 0, 1 ns and `Duration::MAX` (issue 11,
    /// D1): no panic; the short ones time a pending fence out with an error, `MAX` waits.
    #[test]
    fn cpu_waits_take_a_fence_timeout_of_any_length() {
        for d in [Duration::ZERO, Duration::from_nanos(1), Duration::MAX] {
            let forever = d == Duration::MAX;
            let fake = Fake::new();
            let (mut p, stats, _) = policy(fake.clone());
            p.fence_timeout = crate::svm::fence_limit(Some(d));
            let host = HostFence::new(FenceContext::new(), 1);
            let pre = Fence::from_host(host.clone());
            let t = signal_later(host, false);
            let req = CopyRequest {
                page_size: PageSize::Size4K,
                pages: &contiguous(3),
                addrs: &addrs(3),
                pre_fence: Some(&pre),
            };
            match p.copy_to_devmem(&req) {
                Ok(f) => {
                    assert!(forever, "{d:?}: a pending fence was not timed out");
                    f.wait().unwrap();
                    assert!(pre.is_signaled());
                    assert_eq!(fake.seen().len(), 1);
                }
                Err(e) => {
                    assert!(!forever, "{d:?}: {e}");
                    assert!(e.message.contains("timed out"), "{d:?}: {e}");
                    assert!(fake.seen().is_empty(), "{d:?}: issued before the fence");
                }
            }
            assert_eq!(stats.snapshot().cpu_fence_waits.count, 1);
            t.join().unwrap();

            // The ordering repair waits for the pre-migrate fence and every command.
            let fake = Fake::with(true, None, false);
            let (mut p, stats, queues) = policy(fake.clone());
            p.fence_timeout = crate::svm::fence_limit(Some(d));
            let queue = FenceTimeline::new();
            let host = queue.host_fence();
            let pre = Fence::from_host(host.clone());
            queues.learn(&pre);
            let t = signal_later(host, false);
            let pages = [Pfn(0), Pfn(4), Pfn(8)];
            let req = CopyRequest {
                page_size: PageSize::Size4K,
                pages: &pages,
                addrs: &addrs(3),
                pre_fence: Some(&pre),
            };
            // A failure after commands were issued comes back through the call's fence.
            match p.copy_to_devmem(&req).map(|f| f.wait()) {
                Ok(Ok(())) => {
                    assert!(pre.is_signaled(), "{d:?}");
                    assert_eq!(fake.seen().len(), 5, "{d:?}: two commands issued again");
                }
                Ok(Err(e)) => {
                    assert!(!forever, "{d:?}: {e}");
                    assert!(e.to_string().contains("timed out"), "{d:?}: {e}");
                }
                Err(e) => panic!("{d:?}: {e}"),
            }
            assert_eq!(stats.snapshot().ordering_repairs, 1, "{d:?}");
            t.join().unwrap();
        }
    }

    #[test]
    fn failed_pre_fence_fails_the_call_before_any_command() {
        let fake = Fake::new();
        let (p, stats, _) = policy(fake.clone());
        // Already failed.
        let bad = failed_fence(BackendError::new(
            BackendErrorKind::CopyFailed,
            "clear failed",
        ));
        let req = CopyRequest {
            page_size: PageSize::Size4K,
            pages: &contiguous(2),
            addrs: &addrs(2),
            pre_fence: Some(&bad),
        };
        let e = p.copy_to_devmem(&req).unwrap_err();
        assert!(e.message.contains("pre-migrate fence failed"), "{e}");
        // Fails while we wait on the CPU (host-only).
        let host = HostFence::new(FenceContext::new(), 1);
        let pre = Fence::from_host(host.clone());
        let t = signal_later(host, true);
        let req = CopyRequest {
            pre_fence: Some(&pre),
            ..req
        };
        assert!(p.copy_to_devmem(&req).is_err());
        t.join().unwrap();
        assert!(fake.seen().is_empty(), "no command was issued");
        assert_eq!(stats.snapshot().fence_errors, 2);
    }

    #[test]
    fn nothing_copied_returns_the_pre_migrate_fence() {
        let fake = Fake::new();
        let (p, _, _) = policy(fake.clone());
        let b = p.allocate(2, PageSize::Size4K).unwrap();
        let pre = b.pre_migrate_fence.clone().unwrap();
        let none = [DmaAddr::NONE, DmaAddr::NONE];
        let req = CopyRequest {
            page_size: PageSize::Size4K,
            pages: &contiguous(2),
            addrs: &none,
            pre_fence: Some(&pre),
        };
        let f = p.copy_to_devmem(&req).unwrap();
        assert!(fake.seen().is_empty());
        assert!(f.ptr_eq(&pre), "the only thing to wait for");
        let req = CopyRequest {
            pre_fence: None,
            ..req
        };
        assert!(p.copy_to_devmem(&req).unwrap().is_signaled());
    }

    #[test]
    fn command_fence_errors_propagate() {
        let fake = Fake::with(false, None, true);
        let (p, stats, _) = policy(fake.clone());
        let pages = [Pfn(0), Pfn(7)];
        let req = CopyRequest {
            page_size: PageSize::Size4K,
            pages: &pages,
            addrs: &addrs(2),
            pre_fence: None,
        };
        let f = p.copy_to_ram(&req).unwrap();
        assert!(matches!(f.wait(), Err(FenceError::Failed(_))));
        assert_eq!(stats.snapshot().fence_errors, 1);
    }

    #[test]
    fn submit_failure_after_a_command_comes_back_through_the_fence() {
        let fake = Fake::with(false, Some(1), false);
        let (p, _, _) = policy(fake.clone());
        let pages = [Pfn(0), Pfn(9)];
        let req = CopyRequest {
            page_size: PageSize::Size4K,
            pages: &pages,
            addrs: &addrs(2),
            pre_fence: None,
        };
        let f = p.copy_to_devmem(&req).unwrap();
        let e = f.wait().unwrap_err();
        assert!(e.to_string().contains("fake submit failure"), "{e}");
        // The first command failing: nothing in flight, plain error.
        let fake = Fake::with(false, Some(0), false);
        let (p, _, _) = policy(fake);
        assert!(p.copy_to_devmem(&req).is_err());
    }

    #[test]
    fn unordered_queue_is_repaired_after_the_pre_migrate_fence() {
        let fake = Fake::with(true, None, false);
        let (p, stats, queues) = policy(fake.clone());
        // A pending pre-migrate fence from a known device queue.
        let queue = FenceTimeline::new();
        let host = queue.host_fence();
        let pre = Fence::from_host(host.clone());
        queues.learn(&pre);
        *fake.watch.lock().unwrap() = Some(pre.clone());
        // Signal only once all three commands were issued, so two of them went out without
        // the dependency while it was pending: the policy must wait and issue them again.
        let watcher = fake.clone();
        let t = std::thread::spawn(move || {
            while watcher.seen().len() < 3 {
                std::thread::sleep(Duration::from_millis(1));
            }
            host.signal();
        });
        let pages = [Pfn(0), Pfn(4), Pfn(8)];
        let req = CopyRequest {
            page_size: PageSize::Size4K,
            pages: &pages,
            addrs: &addrs(3),
            pre_fence: Some(&pre),
        };
        let f = p.copy_to_devmem(&req).unwrap();
        f.wait().unwrap();
        t.join().unwrap();
        let seen = fake.seen();
        // Three commands, then the two unproven ones again, after the fence.
        let firsts: Vec<u32> = seen.iter().map(|s| s.first_pfn).collect();
        assert_eq!(firsts, vec![0, 4, 8, 4, 8]);
        assert!(seen[0].had_pre_fence && !seen[1].had_pre_fence && !seen[2].had_pre_fence);
        assert!(!seen[1].pre_signalled_at_issue && !seen[2].pre_signalled_at_issue);
        assert!(seen[3].pre_signalled_at_issue && seen[4].pre_signalled_at_issue);
        assert!(!seen[3].had_pre_fence && !seen[4].had_pre_fence);
        let s = stats.snapshot();
        assert_eq!(s.ordering_repairs, 1);
        assert!(s.cpu_fence_waits.count >= 1);
    }
}
