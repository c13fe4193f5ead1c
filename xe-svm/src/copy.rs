//! The copy path's fence policy (what xe's `xe_svm_copy` does, done right), through the copy
//! contract of the core: the backend declares what its copies can do
//! ([`DevmemOps::caps`], a [`CopyCaps`]) and the policy follows it, never re-planning what
//! the backend plans.
//!
//! For each copy call the core makes on a pagemap of the context:
//! 1. **Pre-migrate fence** (see the `fences` module). Signalled: nothing to do. Failed: the
//!    call fails before anything is issued (upstream ignores the error). Pending parts whose
//!    native handle ([`drm_pagemap_core::Fence::native`]) is of a kind the backend declares
//!    are device dependencies; the rest are host fences, bridged by the backend when it says
//!    it bridges them ([`HostFenceWait::InQueue`], [`HostFenceWait::Deferred`]); either way
//!    the backend gets the pre-fence as it is and nothing is waited on the faulting thread.
//!    Only for a backend that would block on host fences in the call
//!    ([`HostFenceWait::Blocking`], the default of a backend that declares nothing) are they
//!    waited here first, bounded by the context's fence timeout.
//! 2. **Commands.** A backend without a command limit (`max_command_bytes: None`: sim,
//!    CUDA, which plans one gather launch per call) gets the core's call untouched: the same
//!    pages, addresses and pre-fence, one call. A backend that declares a limit gets the call
//!    in pieces of at most that many bytes of entries with an address (at least one page
//!    each; entries without an address are skipped between pieces and passed along inside
//!    them, the backend skips them). Nothing else splits a call: contiguity and holes are the
//!    backend's to plan.
//! 3. **Ordering of pieces.** The first piece gets the pre-fence; later pieces run behind it on
//!    a queue that runs in order ([`CopyCaps::in_order`]). Where that does not hold (a queue
//!    not in order, or a host fence the backend defers, which work queued meanwhile could
//!    overtake), every piece gets the pre-fence itself (counted as an ordering repair).
//! 4. **Result.** The backend's own fence for one command (as the backend made it), a
//!    container of the pieces' fences when split, or the pre-fence when a split call had
//!    nothing to copy. A submission failure after a piece
//!    was issued comes back through that fence (a member that signalled the error), so the
//!    core waits for what is in flight before it releases anything.
//!
//! Around the policy, the context observes (it does not change what a copy does): the
//! pagemap's accounting sees allocations and releases (refusing an allocation past the
//! context's capacity, which the fault handler answers with LRU eviction), the statistics
//! count what only the policy knows (commands of a split call, pre-fence handling). Bytes,
//! calls and device time of every copy are the core's statistics.
//!
//! The wrapper is the one place the context attaches to a pagemap (the core calls a
//! pagemap's [`DevmemOps`] and nothing else), so it is installed on every pagemap of the
//! context by [`crate::Svm::new`].

use crate::accounting::Account;
use crate::fences::{Pending, Refused, sort_pre};
use crate::stats::Counters;
use drm_pagemap_core::{
    BackendError, BackendErrorKind, CopyCaps, CopyOp, CopyRequest, DeviceId, DevmemBacking,
    DevmemOps, Fence, FenceArray, HostFenceWait, PageSize, PagemapId, Pfn,
};
use std::sync::Arc;
use std::time::Duration;

/// The largest command of Intel Xe's copy engine: 8 MiB. What an Xe (Level Zero) backend
/// declares as its [`CopyCaps::max_command_bytes`]; the policy applies a limit only where a
/// backend declares one, never this one by itself.
pub const MAX_COMMAND_BYTES: u64 = 8 << 20;

/// The fence policy around one pagemap's device-memory operations, with the observers.
pub(crate) struct PolicyOps {
    pub inner: Arc<dyn DevmemOps>,
    /// The inner pagemap's caps, read once (they are constant for its life).
    pub caps: CopyCaps,
    pub pagemap: PagemapId,
    pub device: DeviceId,
    pub stats: Arc<Counters>,
    pub account: Arc<Account>,
    pub fence_timeout: Option<Duration>,
}

fn copy_error(msg: String) -> BackendError {
    BackendError::new(BackendErrorKind::CopyFailed, msg)
}

/// What a split call issued.
struct Pieces {
    fence: Fence,
    commands: u64,
}

impl PolicyOps {
    fn issue(&self, op: CopyOp, req: &CopyRequest<'_>) -> Result<Fence, BackendError> {
        match op {
            CopyOp::ToDevmem => self.inner.copy_to_devmem(req),
            CopyOp::ToRam => self.inner.copy_to_ram(req),
        }
    }

    /// Step 1: what is pending of the pre-fence (see the `fences` module).
    fn prepare(&self, pre: Option<&Fence>, op: CopyOp) -> Result<Pending, BackendError> {
        sort_pre(pre, &self.caps, &self.stats, self.fence_timeout).map_err(|r| match r {
            Refused::Failed(e) => copy_error(format!(
                "{} on {}: {op}: the pre-migrate fence failed: {e}",
                self.pagemap, self.device
            )),
            Refused::Wait(e) => copy_error(format!(
                "{} on {}: {op}: pre-migrate fence: {e}",
                self.pagemap, self.device
            )),
        })
    }

    /// Steps 2-4 for a backend with a limit of `max` pages per command.
    fn split(
        &self,
        op: CopyOp,
        req: &CopyRequest<'_>,
        max: usize,
        pending: Pending,
    ) -> Result<Result<Pieces, Fence>, BackendError> {
        let n = req.pages.len();
        let ordered = self.caps.in_order
            && !(pending.host && self.caps.host_fences == HostFenceWait::Deferred);
        let later_pre = if pending.any() && !ordered {
            req.pre_fence
        } else {
            None
        };
        // Most calls are one piece: it waits in `one` (no heap allocation); a second moves
        // both into `rest`.
        let mut one: Option<Fence> = None;
        let mut rest: Vec<Fence> = Vec::new();
        let mut i = 0;
        while i < n {
            while i < n && req.addrs[i].is_none() {
                i += 1;
            }
            if i == n {
                break;
            }
            let s = i;
            let mut live = 0;
            while i < n && live < max {
                live += usize::from(!req.addrs[i].is_none());
                i += 1;
            }
            let first = one.is_none() && rest.is_empty();
            let sub = CopyRequest {
                page_size: req.page_size,
                pages: &req.pages[s..i],
                addrs: &req.addrs[s..i],
                pre_fence: if first { req.pre_fence } else { later_pre },
            };
            match self.issue(op, &sub) {
                Ok(f) if first => one = Some(f),
                Ok(f) => {
                    rest.extend(one.take());
                    rest.push(f);
                }
                Err(e) if first => return Err(e),
                Err(e) => {
                    // The core waits for what was issued, then sees the error.
                    rest.extend(one.take());
                    rest.push(Fence::failed(e));
                    return Ok(Err(Fence::new(FenceArray::new(rest))));
                }
            }
        }
        let commands = (rest.len() + usize::from(one.is_some())) as u64;
        if commands > 1 && later_pre.is_some() {
            self.stats.ordering_repairs.inc();
        }
        let fence = match (one, rest.len()) {
            (Some(f), _) => f,
            // Nothing to copy: the pre-fence is the only thing to wait for.
            (None, 0) => req.pre_fence.cloned().unwrap_or_else(Fence::signaled),
            (None, _) => Fence::new(FenceArray::new(rest)),
        };
        Ok(Ok(Pieces { fence, commands }))
    }

    fn copy(&self, op: CopyOp, req: &CopyRequest<'_>) -> Result<Fence, BackendError> {
        if req.addrs.len() != req.pages.len() {
            return Err(copy_error(format!(
                "{} on {}: {op}: {} pages but {} addresses",
                self.pagemap,
                self.device,
                req.pages.len(),
                req.addrs.len()
            )));
        }
        let pending = self.prepare(req.pre_fence, op)?;
        let fence = match self.caps.max_pages_per_command(req.page_size) {
            // The core's call, untouched (and counted by the core only).
            None => self.issue(op, req)?,
            Some(max) => match self.split(op, req, max, pending)? {
                Ok(p) => {
                    self.stats.split(op, p.commands);
                    p.fence
                }
                Err(failed) => return Ok(failed),
            },
        };
        if pending.device {
            self.stats.fence_dependencies.inc();
        }
        if pending.host {
            self.stats.bridged_fences.inc();
        }
        Ok(fence)
    }
}

/// Bytes taken from an account for an allocation under way: given back when dropped (the
/// allocation failed or panicked), kept when forgotten (it exists).
struct Reserved<'a> {
    account: &'a Account,
    bytes: u64,
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        self.account.release(self.bytes);
    }
}

/// Bytes of `npages` pages of `page_size` (saturating: an absurd count is out of memory).
fn bytes_of(npages: usize, page_size: PageSize) -> u64 {
    (npages as u64).saturating_mul(page_size.bytes())
}

impl DevmemOps for PolicyOps {
    fn allocate(&self, npages: usize, page_size: PageSize) -> Result<DevmemBacking, BackendError> {
        let bytes = bytes_of(npages, page_size);
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
        // Given back if the backend fails, or panics (the core rolls a panic back and goes
        // on: the reservation must not outlive it).
        let reserved = Reserved {
            account: &self.account,
            bytes,
        };
        let b = self.inner.allocate(npages, page_size)?;
        std::mem::forget(reserved);
        Ok(b)
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
        let bytes = bytes_of(backing.npages, backing.page_size);
        self.inner.devmem_release(backing);
        self.account.release(bytes);
    }

    fn devmem_release_unused(&self, backing: DevmemBacking) {
        let bytes = bytes_of(backing.npages, backing.page_size);
        self.inner.devmem_release_unused(backing);
        self.account.release(bytes);
    }

    fn devmem_release_many(&self, backings: &[DevmemBacking]) {
        self.inner.devmem_release_many(backings);
        for b in backings {
            self.account.release(bytes_of(b.npages, b.page_size));
        }
    }

    fn capacity_bytes(&self) -> u64 {
        self.inner.capacity_bytes().min(self.account.capacity)
    }

    /// The inner pagemap's caps, except that calls of any size are accepted here (the policy
    /// splits them for the inner limit).
    fn caps(&self) -> CopyCaps {
        CopyCaps {
            max_command_bytes: None,
            ..self.caps
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::fence_limit;
    use crate::stats::CommandTally;
    use drm_pagemap_core::{
        DmaAddr, FenceError, FenceOps, FenceStatus, FenceTimeline, HostFence, NativeFenceKind,
        NativeFenceKinds,
    };
    use drm_pagemap_testkit::fence::NativeTestFence as Dev;
    use std::sync::Mutex;

    /// What the fake backend saw of one call.
    #[derive(Clone, Debug)]
    struct Seen {
        /// Where the call's page slice starts (to tell the core's slice from a copy).
        pages_at: usize,
        first_pfn: u32,
        len: usize,
        pre: Option<Fence>,
        pre_pending: bool,
    }

    /// A backend that records calls, declares `caps`, and returns host fences of one queue:
    /// signalled at once, or (with `hold`) when the test says.
    struct Fake {
        caps: CopyCaps,
        seen: Mutex<Vec<Seen>>,
        returned: Mutex<Vec<Fence>>,
        held: Mutex<Vec<Arc<HostFence>>>,
        timeline: FenceTimeline,
        hold: bool,
        fail_nth: Option<usize>,
        error_fences: bool,
    }

    impl Fake {
        fn new(caps: CopyCaps) -> Arc<Fake> {
            Fake::with(caps, |_| {})
        }
        fn with(caps: CopyCaps, f: impl FnOnce(&mut Fake)) -> Arc<Fake> {
            let mut fake = Fake {
                caps,
                seen: Mutex::new(Vec::new()),
                returned: Mutex::new(Vec::new()),
                held: Mutex::new(Vec::new()),
                timeline: FenceTimeline::new(),
                hold: false,
                fail_nth: None,
                error_fences: false,
            };
            f(&mut fake);
            Arc::new(fake)
        }
        fn seen(&self) -> Vec<Seen> {
            self.seen.lock().unwrap().clone()
        }
        fn lens(&self) -> Vec<usize> {
            self.seen().iter().map(|s| s.len).collect()
        }
        fn record(&self, req: &CopyRequest<'_>) -> Result<Fence, BackendError> {
            let mut seen = self.seen.lock().unwrap();
            if Some(seen.len()) == self.fail_nth {
                return Err(BackendError::new(
                    BackendErrorKind::Injected,
                    "fake submit failure",
                ));
            }
            seen.push(Seen {
                pages_at: req.pages.as_ptr() as usize,
                first_pfn: req.pages.first().map_or(u32::MAX, |p| p.0),
                len: req.pages.len(),
                pre: req.pre_fence.cloned(),
                pre_pending: req.pre_fence.is_some_and(|f| !f.is_signaled()),
            });
            let h = self.timeline.host_fence();
            if self.hold {
                self.held.lock().unwrap().push(h.clone());
            } else if self.error_fences {
                h.signal_error(BackendError::new(
                    BackendErrorKind::CopyFailed,
                    "fake copy failed",
                ));
            } else {
                h.signal();
            }
            let f = Fence::from_host(h);
            self.returned.lock().unwrap().push(f.clone());
            Ok(f)
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
                pre_migrate_fence: None,
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
        fn caps(&self) -> CopyCaps {
            self.caps
        }
    }

    /// Sim-like caps: no limit, host fences waited by the queue, in order.
    const SIM: CopyCaps = CopyCaps {
        max_command_bytes: None,
        native_fence_kinds: NativeFenceKinds::NONE,
        host_fences: HostFenceWait::InQueue,
        in_order: true,
        batch_bytes_hint: None,
    };

    /// Xe-like caps: 8 MiB commands, a native kind, host fences waited by the queue.
    const XE: CopyCaps = CopyCaps {
        max_command_bytes: Some(MAX_COMMAND_BYTES),
        native_fence_kinds: NativeFenceKinds::one(NativeFenceKind::PLUGIN_FIRST),
        host_fences: HostFenceWait::InQueue,
        in_order: true,
        batch_bytes_hint: None,
    };

    fn policy(inner: Arc<Fake>) -> (PolicyOps, Arc<Counters>) {
        let stats = Arc::new(Counters::default());
        let p = PolicyOps {
            caps: inner.caps(),
            inner,
            pagemap: PagemapId(0),
            device: DeviceId(0),
            stats: stats.clone(),
            account: Arc::new(Account::new(PagemapId(0), DeviceId(0), 1 << 40)),
            fence_timeout: None,
        };
        (p, stats)
    }

    fn addrs(n: usize) -> Vec<DmaAddr> {
        (0..n).map(|i| DmaAddr(0x1000 + i as u64 * 4096)).collect()
    }

    fn contiguous(n: usize) -> Vec<Pfn> {
        (0..n as u32).map(Pfn).collect()
    }

    fn req<'a>(pages: &'a [Pfn], addrs: &'a [DmaAddr], pre: Option<&'a Fence>) -> CopyRequest<'a> {
        CopyRequest {
            page_size: PageSize::Size4K,
            pages,
            addrs,
            pre_fence: pre,
        }
    }

    #[test]
    fn without_a_limit_the_core_call_reaches_the_backend_untouched() {
        let fake = Fake::new(SIM);
        let (p, stats) = policy(fake.clone());
        // Scattered pages with holes, 5000 of them (past any 8 MiB), a pending host fence.
        let pages: Vec<Pfn> = (0..5000u32).map(|i| Pfn(i * 3)).collect();
        let mut a = addrs(5000);
        a[7] = DmaAddr::NONE;
        a[4999] = DmaAddr::NONE;
        let host = FenceTimeline::new().host_fence();
        let pre = Fence::from_host(host.clone());
        let f = p.copy_to_devmem(&req(&pages, &a, Some(&pre))).unwrap();
        let seen = fake.seen();
        assert_eq!(seen.len(), 1, "one call");
        assert_eq!(
            seen[0].pages_at,
            pages.as_ptr() as usize,
            "the core's slice"
        );
        assert_eq!(seen[0].len, 5000);
        assert!(
            seen[0].pre.as_ref().unwrap().ptr_eq(&pre),
            "the pre-fence as it is"
        );
        assert!(seen[0].pre_pending, "not waited on the CPU");
        // The backend's own fence, as it is (no wrapper).
        let own = fake.returned.lock().unwrap()[0].clone();
        assert!(f.ptr_eq(&own), "the backend's fence");
        let s = stats.snapshot();
        assert_eq!(
            (s.total_limited_calls(), s.total_commands()),
            (0, 0),
            "counted by the core only"
        );
        assert_eq!((s.bridged_fences, s.fence_dependencies), (1, 0));
        assert_eq!(s.cpu_fence_waits.count, 0);
        host.signal();
        // The policy reports the inner caps but takes calls of any size.
        assert_eq!(p.caps(), SIM);
        let (xe, _) = policy(Fake::new(XE));
        assert_eq!(xe.caps().max_command_bytes, None);
        assert_eq!(xe.caps().native_fence_kinds, XE.native_fence_kinds);
    }

    #[test]
    fn a_declared_limit_splits_by_bytes_only() {
        for (n, expect) in [
            (2048, vec![2048]),
            (2049, vec![2048, 1]),
            (4096, vec![2048, 2048]),
            (4097, vec![2048, 2048, 1]),
        ] {
            let fake = Fake::new(XE);
            let (p, stats) = policy(fake.clone());
            p.copy_to_devmem(&req(&contiguous(n), &addrs(n), None))
                .unwrap()
                .wait()
                .unwrap();
            assert_eq!(fake.lens(), expect, "{n} pages");
            let s = stats.snapshot();
            assert_eq!(
                s.commands_to_devmem,
                CommandTally {
                    calls: 1,
                    commands: expect.len() as u64
                }
            );
            assert_eq!(s.commands_to_ram, CommandTally::default());
        }
        // 2 MiB pages: four per command.
        let fake = Fake::new(XE);
        let (p, _) = policy(fake.clone());
        let pages: Vec<Pfn> = (0..9u32).map(|i| Pfn(i * 512)).collect();
        let a9 = addrs(9);
        let r = CopyRequest {
            page_size: PageSize::Size2M,
            ..req(&pages, &a9, None)
        };
        p.copy_to_ram(&r).unwrap().wait().unwrap();
        assert_eq!(fake.lens(), vec![4, 4, 1]);
        // Discontiguous pages and holes are the backend's to plan: one command.
        let pages = [Pfn(10), Pfn(11), Pfn(15), Pfn(16), Pfn(17), Pfn(18)];
        let mut a = addrs(6);
        a[4] = DmaAddr::NONE;
        let fake = Fake::new(XE);
        let (p, _) = policy(fake.clone());
        p.copy_to_devmem(&req(&pages, &a, None)).unwrap();
        assert_eq!(fake.lens(), vec![6]);
        // A limit of two pages: pieces of two live entries, holes between pieces skipped.
        a[0] = DmaAddr::NONE;
        let fake = Fake::new(CopyCaps {
            max_command_bytes: Some(8192),
            ..XE
        });
        let (p, stats) = policy(fake.clone());
        p.copy_to_devmem(&req(&pages, &a, None)).unwrap();
        let cmds: Vec<(u32, usize)> = fake.seen().iter().map(|s| (s.first_pfn, s.len)).collect();
        assert_eq!(cmds, vec![(11, 2), (16, 3)], "pfn 17 has no address");
        assert_eq!(
            stats.snapshot().commands_to_devmem,
            CommandTally {
                calls: 1,
                commands: 2
            }
        );
    }

    #[test]
    fn a_native_pre_fence_reaches_the_first_piece_unwaited() {
        let fake = Fake::new(XE);
        let (p, stats) = policy(fake.clone());
        let dev = FenceTimeline::new().host_fence();
        let pre = Fence::new(Dev(dev.clone()));
        let n = 4097;
        let f = p
            .copy_to_devmem(&req(&contiguous(n), &addrs(n), Some(&pre)))
            .unwrap();
        let seen = fake.seen();
        assert_eq!(seen.len(), 3);
        assert!(seen[0].pre.as_ref().unwrap().ptr_eq(&pre) && seen[0].pre_pending);
        assert!(
            seen[1].pre.is_none() && seen[2].pre.is_none(),
            "ordered behind the first"
        );
        assert!(!pre.is_signaled(), "no CPU wait for a device fence");
        let s = stats.snapshot();
        assert_eq!((s.fence_dependencies, s.bridged_fences), (1, 0));
        assert_eq!((s.cpu_fence_waits.count, s.ordering_repairs), (0, 0));
        dev.signal();
        f.wait().unwrap();
    }

    #[test]
    fn pieces_not_ordered_by_the_queue_each_get_the_pre_fence() {
        let host = || Fence::from_host(FenceTimeline::new().host_fence());
        let dev = || Fence::new(Dev(FenceTimeline::new().host_fence()));
        // (caps, pre-fence, every piece gets it)
        let cases: [(CopyCaps, Fence, bool); 4] = [
            (
                CopyCaps {
                    in_order: false,
                    ..XE
                },
                dev(),
                true,
            ),
            (
                CopyCaps {
                    host_fences: HostFenceWait::Deferred,
                    ..XE
                },
                host(),
                true,
            ),
            (
                CopyCaps {
                    host_fences: HostFenceWait::Deferred,
                    ..XE
                },
                dev(),
                false,
            ),
            (XE, host(), false),
        ];
        for (i, (caps, pre, each)) in cases.into_iter().enumerate() {
            let fake = Fake::new(caps);
            let (p, stats) = policy(fake.clone());
            p.copy_to_devmem(&req(&contiguous(4097), &addrs(4097), Some(&pre)))
                .unwrap();
            let seen = fake.seen();
            assert_eq!(seen.len(), 3, "case {i}");
            assert!(seen.iter().all(|s| s.pre.is_none() || s.pre_pending));
            let with: Vec<bool> = seen.iter().map(|s| s.pre.is_some()).collect();
            assert_eq!(with, vec![true, each, each], "case {i}");
            assert_eq!(
                stats.snapshot().ordering_repairs,
                u64::from(each),
                "case {i}"
            );
            assert_eq!(stats.snapshot().cpu_fence_waits.count, 0, "case {i}");
        }
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

    /// A host fence that is still pending when the policy sorts it, however late the call
    /// comes: the first wait for it starts the thread that signals it 20 ms later. (Started
    /// before the call, that thread could signal first on a busy machine; the policy drops a
    /// signalled part, and there would be nothing to wait for.)
    #[derive(Debug)]
    struct SignalledWhileWaited {
        host: Arc<HostFence>,
        signaller: Mutex<Option<std::thread::JoinHandle<()>>>,
    }

    impl FenceOps for SignalledWhileWaited {
        fn context(&self) -> u64 {
            self.host.context()
        }
        fn seqno(&self) -> u64 {
            self.host.seqno()
        }
        fn status(&self) -> FenceStatus {
            self.host.status()
        }
        fn wait(&self, timeout: Option<Duration>) -> Result<(), FenceError> {
            self.signaller
                .lock()
                .unwrap()
                .get_or_insert_with(|| signal_later(self.host.clone(), false));
            self.host.wait(timeout)
        }
    }

    /// A backend that declares nothing would block on host fences in the call: the policy
    /// waits for them first, with the context's fence timeout as `Svm::new` hands it over,
    /// at 0, 1 ns and `Duration::MAX` (issue 11, D1): no panic; the short ones time a
    /// pending fence out with an error, `MAX` waits. Device fences of a declared kind are
    /// still passed on unwaited.
    #[test]
    fn a_blocking_backend_gets_host_fences_waited_with_the_fence_timeout() {
        for d in [Duration::ZERO, Duration::from_nanos(1), Duration::MAX] {
            let forever = d == Duration::MAX;
            let fake = Fake::new(CopyCaps {
                native_fence_kinds: NativeFenceKinds::one(NativeFenceKind::PLUGIN_FIRST),
                ..CopyCaps::default()
            });
            let (mut p, stats) = policy(fake.clone());
            p.fence_timeout = fence_limit(Some(d));
            let host = Arc::new(SignalledWhileWaited {
                host: HostFence::new(drm_pagemap_core::FenceContext::new(), 1),
                signaller: Mutex::new(None),
            });
            let dev = FenceTimeline::new().host_fence();
            let pre = Fence::new(FenceArray::new(vec![
                Fence::from_arc(host.clone()),
                Fence::new(Dev(dev.clone())),
            ]));
            match p.copy_to_devmem(&req(&contiguous(3), &addrs(3), Some(&pre))) {
                Ok(_) => {
                    assert!(forever, "{d:?}: a pending fence was not timed out");
                    let seen = fake.seen();
                    assert_eq!(seen.len(), 1);
                    assert!(seen[0].pre_pending, "the device part is left to the device");
                    assert!(!pre.is_signaled());
                    let s = stats.snapshot();
                    assert_eq!((s.fence_dependencies, s.bridged_fences), (1, 0));
                }
                Err(e) => {
                    assert!(!forever, "{d:?}: {e}");
                    assert!(e.message.contains("timed out"), "{d:?}: {e}");
                    assert!(fake.seen().is_empty(), "{d:?}: issued before the fence");
                }
            }
            assert_eq!(stats.snapshot().cpu_fence_waits.count, 1);
            let t = host.signaller.lock().unwrap().take();
            t.expect("the host fence was waited for").join().unwrap();
            dev.signal();
        }
    }

    #[test]
    fn failed_pre_fence_fails_the_call_before_any_command() {
        let fake = Fake::new(CopyCaps::default());
        let (p, stats) = policy(fake.clone());
        let bad = Fence::failed(BackendError::new(
            BackendErrorKind::CopyFailed,
            "clear failed",
        ));
        let (pages, a) = (contiguous(2), addrs(2));
        let e = p.copy_to_devmem(&req(&pages, &a, Some(&bad))).unwrap_err();
        assert!(e.message.contains("pre-migrate fence failed"), "{e}");
        // Fails while a blocking backend's host fence is waited for.
        let host = HostFence::new(drm_pagemap_core::FenceContext::new(), 1);
        let pre = Fence::from_host(host.clone());
        let t = signal_later(host, true);
        assert!(p.copy_to_devmem(&req(&pages, &a, Some(&pre))).is_err());
        t.join().unwrap();
        assert!(fake.seen().is_empty(), "no command was issued");
        assert_eq!(stats.snapshot().pre_fence_errors, 2);
    }

    #[test]
    fn nothing_copied_returns_the_pre_migrate_fence_when_splitting() {
        let none = [DmaAddr::NONE, DmaAddr::NONE];
        let pages = contiguous(2);
        let fake = Fake::new(XE);
        let (p, _) = policy(fake.clone());
        let pre = Fence::from_host(FenceTimeline::new().host_fence());
        let f = p.copy_to_devmem(&req(&pages, &none, Some(&pre))).unwrap();
        assert!(fake.seen().is_empty());
        assert!(f.ptr_eq(&pre), "the only thing to wait for");
        assert!(
            p.copy_to_devmem(&req(&pages, &none, None))
                .unwrap()
                .is_signaled()
        );
        // Without a limit the call is the backend's, whatever it holds.
        let fake = Fake::new(SIM);
        let (p, _) = policy(fake.clone());
        p.copy_to_devmem(&req(&pages, &none, None)).unwrap();
        assert_eq!(fake.lens(), vec![2]);
    }

    #[test]
    fn submit_failure_after_a_piece_comes_back_through_the_fence() {
        let one_page = CopyCaps {
            max_command_bytes: Some(4096),
            ..XE
        };
        let (pages, a) = ([Pfn(0), Pfn(9)], addrs(2));
        let fake = Fake::with(one_page, |f| f.fail_nth = Some(1));
        let (p, _) = policy(fake);
        let f = p.copy_to_devmem(&req(&pages, &a, None)).unwrap();
        let e = f.wait().unwrap_err();
        assert!(e.to_string().contains("fake submit failure"), "{e}");
        // The first piece failing: nothing in flight, plain error.
        let fake = Fake::with(one_page, |f| f.fail_nth = Some(0));
        let (p, _) = policy(fake);
        assert!(p.copy_to_devmem(&req(&pages, &a, None)).is_err());
        // Without a limit, the backend's error as it is.
        let fake = Fake::with(SIM, |f| f.fail_nth = Some(0));
        let (p, stats) = policy(fake);
        assert!(p.copy_to_devmem(&req(&pages, &a, None)).is_err());
        assert_eq!(stats.snapshot(), crate::Stats::default());
    }
}
