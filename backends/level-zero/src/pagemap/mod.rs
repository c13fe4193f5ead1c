//! A pagemap: device memory of one device in chunks ([`arena`]), pages handed out by an
//! extent allocator, its copy engine ([`engine`]), calls planned into runs ([`plan`]) and
//! submitted ([`submit`]).

mod arena;
mod clean;
mod engine;
mod plan;
mod submit;

use crate::device::ZeDevice;
use crate::events::{EventSlot, Events};
use crate::fence::ZeFence;
use arena::Arena;
use clean::CleanMap;
use drm_pagemap_core::{
    BackendError, BackendErrorKind, CopyCaps, CopyRequest, DeviceId, DevmemBacking, DevmemOps,
    Direction, DmaAddr, ExtentAllocator, Fence, FenceStatus, FenceTimeline, GRANULE, HostFenceWait,
    NativeFenceKind, NativeFenceKinds, PageSize, PagemapOps, Pfn,
};
use engine::{Engine, InFlight, SubmitError};
use plan::Op;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long an allocation waits for what it queued before a failed append (a clear that
/// could only be queued in part) before it gives its pages back.
const CLEAR_DRAIN: Duration = Duration::from_secs(10);

/// Counters of one pagemap, for tests and tables.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZeStats {
    /// Successful `allocate` calls.
    pub allocations: u64,
    /// Allocations released.
    pub releases: u64,
    /// `copy_to_devmem` calls.
    pub copy_to_devmem_calls: u64,
    /// `copy_to_ram` calls.
    pub copy_to_ram_calls: u64,
    /// Calls (copies and clears) queued on the immediate command list.
    pub immediate_calls: u64,
    /// Calls recorded in a regular command list and submitted once.
    pub regular_calls: u64,
    /// Commands appended (copies, fills, barriers).
    pub appends: u64,
    /// Regular command lists submitted.
    pub submissions: u64,
    /// Copy commands after merging contiguous entries.
    pub runs: u64,
    /// Pages copied by this pagemap's calls.
    pub pages_copied: u64,
    /// Pre-fences made wait events of the first command (no CPU wait).
    pub device_waits: u64,
    /// Calls whose pre-fence had host fences, bridged through a host-signalled event.
    pub host_bridges: u64,
    /// Calls refused because their pre-fence had failed (their fence fails).
    pub failed_pre_fences: u64,
    /// Calls whose records are still kept (their last event not seen signalled yet).
    pub in_flight: u64,
    /// Regular command lists made (free or in flight).
    pub command_lists: u64,
    /// Allocations that had pages to clear (fresh memory, or pages freed without a clear).
    pub alloc_clears: u64,
    /// Releases whose pages were cleared on the way back (clear on free).
    pub free_clears: u64,
    /// Bytes allocated now.
    pub used_bytes: u64,
    /// Device memory allocated from the driver.
    pub backed_bytes: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    allocations: AtomicU64,
    releases: AtomicU64,
    to_devmem: AtomicU64,
    to_ram: AtomicU64,
    immediate: AtomicU64,
    regular: AtomicU64,
    pub(crate) appends: AtomicU64,
    pub(crate) submissions: AtomicU64,
    runs: AtomicU64,
    pages: AtomicU64,
    device_waits: AtomicU64,
    host_bridges: AtomicU64,
    failed_pre: AtomicU64,
    alloc_clears: AtomicU64,
    free_clears: AtomicU64,
    used: AtomicU64,
}

/// An allocation: its pages' first granules.
struct Alloc {
    starts: Vec<u64>,
    granules: u64,
}

/// A pagemap of the Level Zero backend.
pub struct ZePagemap {
    // Field order is drop order: the engine drains before the arena's memory is freed.
    engine: Mutex<Engine>,
    /// Released pages waiting for a clear: whether they are clean once it has succeeded.
    parked: Mutex<Vec<(Fence, Alloc, bool)>>,
    /// Which free pages hold zeros (under its own lock, taken once per call).
    clean: Mutex<CleanMap>,
    clear_on_free: bool,
    arena: Arena,
    device: Arc<ZeDevice>,
    events: Arc<Events>,
    frames: ExtentAllocator,
    allocs: Mutex<HashMap<u64, Alloc>>,
    next_cookie: AtomicU64,
    /// Devices (by id) that reach this pagemap's memory: its own and its peers.
    reach: Vec<bool>,
    timeline: FenceTimeline,
    regular_min_runs: usize,
    counters: Counters,
    /// The pagemap's id (for `tracing` fields).
    pagemap: u8,
}

/// What a submission is, for its `tracing` span: the operation (`copy_to_devmem`,
/// `copy_to_ram`, `clear`, `clear_on_free`) and the pages it moves or clears.
#[derive(Clone, Copy)]
pub(crate) struct Traced {
    pub op: &'static str,
    pub pages: usize,
    pub page_size: PageSize,
}

impl std::fmt::Debug for ZePagemap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZePagemap")
            .field("device", &self.device.id)
            .field("capacity", &self.arena.capacity)
            .finish_non_exhaustive()
    }
}

impl ZePagemap {
    pub(crate) fn new(
        device: Arc<ZeDevice>,
        capacity: u64,
        reach: Vec<bool>,
        regular_min_runs: usize,
        clear_on_free: bool,
        pagemap: drm_pagemap_core::PagemapId,
    ) -> Result<ZePagemap, BackendError> {
        let index = device.next_queue();
        let engine = Engine::new(
            device.ctx.clone(),
            device.handle,
            device.id,
            device.facts.copy_ordinal,
            index,
        )?;
        let arena = Arena::new(device.ctx.clone(), device.handle, device.id, capacity);
        Ok(ZePagemap {
            engine: Mutex::new(engine),
            parked: Mutex::new(Vec::new()),
            clean: Mutex::new(CleanMap::new(arena.granules())),
            clear_on_free,
            frames: ExtentAllocator::new(arena.granules()),
            arena,
            events: device.events.clone(),
            device,
            allocs: Mutex::new(HashMap::new()),
            next_cookie: AtomicU64::new(1),
            reach,
            timeline: FenceTimeline::new(),
            regular_min_runs: regular_min_runs.max(1),
            counters: Counters::default(),
            pagemap: pagemap.0,
        })
    }

    /// The device whose memory this is.
    pub fn device(&self) -> DeviceId {
        self.device.id
    }

    /// The counters.
    pub fn stats(&self) -> ZeStats {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (in_flight, lists) = {
            let e = self.lock_engine();
            (e.in_flight() as u64, e.lists() as u64)
        };
        ZeStats {
            allocations: l(&c.allocations),
            releases: l(&c.releases),
            copy_to_devmem_calls: l(&c.to_devmem),
            copy_to_ram_calls: l(&c.to_ram),
            immediate_calls: l(&c.immediate),
            regular_calls: l(&c.regular),
            appends: l(&c.appends),
            submissions: l(&c.submissions),
            runs: l(&c.runs),
            pages_copied: l(&c.pages),
            device_waits: l(&c.device_waits),
            host_bridges: l(&c.host_bridges),
            failed_pre_fences: l(&c.failed_pre),
            alloc_clears: l(&c.alloc_clears),
            free_clears: l(&c.free_clears),
            in_flight,
            command_lists: lists,
            used_bytes: l(&c.used),
            backed_bytes: self.arena.backed_bytes(),
        }
    }

    /// Retires what completed: in-flight records whose event signalled, and pages of
    /// released allocations whose clear has completed.
    pub fn reap(&self) {
        self.lock_engine().reap();
        self.free_parked();
    }

    fn lock_engine(&self) -> std::sync::MutexGuard<'_, Engine> {
        self.engine.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn seq(&self) -> (u64, u64) {
        (self.timeline.context(), self.timeline.next_seqno())
    }

    /// Hands released pages whose clear has finished to the allocator: clean when the clear
    /// succeeded and was a clear on free, else marked as holding old data.
    fn free_parked(&self) {
        let mut parked = self.parked.lock().unwrap_or_else(|p| p.into_inner());
        if parked.is_empty() {
            return;
        }
        let mut clean = self.clean.lock().unwrap_or_else(|p| p.into_inner());
        parked.retain(|(f, a, clears)| {
            let ok = match f.status() {
                FenceStatus::Pending => return true,
                FenceStatus::Signaled => *clears,
                FenceStatus::Failed(_) => false,
            };
            clean.set_pages(&a.starts, a.granules, ok);
            self.frames.free_pages(&a.starts, a.granules);
            false
        });
    }

    /// Out of pages: waits (at most [`CLEAR_DRAIN`] in all) for the clears of released
    /// pages, then hands them over. Whether any were waiting.
    fn drain_parked(&self) -> bool {
        let fences: Vec<Fence> = {
            let parked = self.parked.lock().unwrap_or_else(|p| p.into_inner());
            parked.iter().map(|(f, _, _)| f.clone()).collect()
        };
        let start = std::time::Instant::now();
        for f in &fences {
            let _ = f.wait_timeout(CLEAR_DRAIN.saturating_sub(start.elapsed()));
        }
        self.free_parked();
        !fences.is_empty()
    }

    /// Gives released pages back: cleared on the way when clearing on free (they reach the
    /// allocator once the clear has completed), else at once, marked as holding old data.
    fn release_pages(&self, a: Alloc, page_size: PageSize) {
        if self.clear_on_free {
            let mut ops: Vec<Op> = Vec::new();
            for &s in &a.starts {
                if let Some(dst) = self.arena.addr(Pfn(s as u32)) {
                    plan::push(
                        &mut ops,
                        Op {
                            dst,
                            src: None,
                            len: a.granules * GRANULE,
                        },
                    );
                }
            }
            let what = format_args!(
                "{}: clear on free of {} pages of {page_size}",
                self.device.id,
                a.starts.len()
            )
            .to_string();
            let traced = Traced {
                op: "clear_on_free",
                pages: a.starts.len(),
                page_size,
            };
            if let Ok((signal, forced)) =
                self.submit_ops(&ops, &mut [], Vec::new(), None, &what, traced)
            {
                self.counters.free_clears.fetch_add(1, Ordering::Relaxed);
                let fence = ZeFence::new(self.seq(), self.device.id, signal, Vec::new(), forced);
                self.parked.lock().unwrap_or_else(|p| p.into_inner()).push((
                    Fence::new(fence),
                    a,
                    true,
                ));
                return;
            }
        }
        self.clean
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set_pages(&a.starts, a.granules, false);
        self.frames.free_pages(&a.starts, a.granules);
    }

    /// The device address of own page `pfn` of `page_size`, if it lies in the arena and is
    /// backed.
    fn page_addr(&self, pfn: Pfn, page_size: PageSize) -> Option<u64> {
        let end = pfn.0 as u64 + page_size.granules();
        if end > self.arena.granules() {
            return None;
        }
        self.arena.addr(pfn)
    }

    fn event(&self, what: &str) -> Result<Arc<EventSlot>, BackendError> {
        self.events
            .acquire()
            .map_err(|f| f.about(format_args!("{}: event for {what}", self.device.id)))
    }

    /// Submits `ops` on the engine after `waits`, keeping `keep` and `bridge` until done,
    /// inside a `debug` span `submit` (target `drm_pagemap::level_zero`: pagemap, device,
    /// op, pages, bytes, runs, waits, list kind, outcome `queued`, `partial` or `failed`).
    /// `Ok`: the call's event and, if it was queued only in part, the error its fence must
    /// fail with once the event signals.
    #[allow(clippy::too_many_arguments)]
    fn submit_ops(
        &self,
        ops: &[Op],
        waits: &mut [crate::ze::EventHandle],
        keep: Vec<Fence>,
        bridge: Option<Arc<EventSlot>>,
        what: &dyn std::fmt::Display,
        traced: Traced,
    ) -> Result<(Arc<EventSlot>, Option<BackendError>), BackendError> {
        let regular = ops.len() >= self.regular_min_runs;
        // Lazy fields: nothing is computed or formatted unless a subscriber wants the span.
        let span = tracing::debug_span!(
            target: "drm_pagemap::level_zero",
            "submit",
            pagemap = self.pagemap,
            device = self.device.id.0,
            op = traced.op,
            pages = traced.pages,
            bytes = traced.pages as u64 * traced.page_size.bytes(),
            runs = ops.len(),
            waits = waits.len(),
            list = if regular { "regular" } else { "immediate" },
            outcome = tracing::field::Empty,
        );
        let _in = span.enter();
        let r = self.submit_in_span(ops, waits, keep, bridge, what, regular);
        match &r {
            Ok((_, None)) => {
                span.record("outcome", "queued");
            }
            Ok((_, Some(e))) => {
                span.record("outcome", "partial");
                tracing::debug!(target: "drm_pagemap::level_zero", error = %e, "queued in part");
            }
            Err(e) => {
                span.record("outcome", "failed");
                tracing::debug!(target: "drm_pagemap::level_zero", error = %e, "submission failed");
            }
        }
        r
    }

    /// [`Self::submit_ops`] inside its span.
    fn submit_in_span(
        &self,
        ops: &[Op],
        waits: &mut [crate::ze::EventHandle],
        keep: Vec<Fence>,
        bridge: Option<Arc<EventSlot>>,
        what: &dyn std::fmt::Display,
        regular: bool,
    ) -> Result<(Arc<EventSlot>, Option<BackendError>), BackendError> {
        let signal = self.event("a call")?;
        let mut eng = self.lock_engine();
        eng.reap();
        // SAFETY: own pages lie in backed chunks (checked when planned); other addresses
        // were mapped for this device by the core, which does not free them while the call
        // is in flight; the events belong to this device's context (sorted by domain) and
        // the in-flight record below keeps them alive until the call completes.
        let r = unsafe { eng.submit(ops, signal.handle, waits, regular, &self.counters, what) };
        let (list, forced) = match r {
            Ok(list) => (list, None),
            Err(SubmitError::Nothing(e)) => return Err(e),
            Err(SubmitError::Partial(e)) => (None, Some(e)),
        };
        if regular && forced.is_none() {
            self.counters.regular.fetch_add(1, Ordering::Relaxed);
        } else {
            self.counters.immediate.fetch_add(1, Ordering::Relaxed);
        }
        eng.push(InFlight {
            signal: signal.clone(),
            _keep: keep,
            _bridge: bridge,
            list,
        });
        Ok((signal, forced))
    }
}

impl PagemapOps for ZePagemap {
    fn device_map(
        &self,
        device: DeviceId,
        pfns: &[Pfn],
        page_size: PageSize,
        _dir: Direction,
        out: &mut [DmaAddr],
    ) -> Result<(), BackendError> {
        if !self.reach.get(device.0 as usize).copied().unwrap_or(false) {
            return Err(BackendError::new(
                BackendErrorKind::MapFailed,
                format!(
                    "level-zero: {device} has no peer access to {}'s memory",
                    self.device.id
                ),
            ));
        }
        for (o, &p) in out.iter_mut().zip(pfns) {
            *o = DmaAddr(self.page_addr(p, page_size).ok_or_else(|| {
                BackendError::new(
                    BackendErrorKind::MapFailed,
                    format!(
                        "level-zero {}: pfn {} is not an allocated page of the pagemap ({} granules)",
                        self.device.id,
                        p.0,
                        self.arena.granules()
                    ),
                )
            })?);
        }
        Ok(())
    }

    fn device_unmap(
        &self,
        _device: DeviceId,
        _addrs: &[DmaAddr],
        _page_size: PageSize,
        _dir: Direction,
    ) {
    }
}

impl DevmemOps for ZePagemap {
    fn allocate(&self, npages: usize, page_size: PageSize) -> Result<DevmemBacking, BackendError> {
        let bytes = (npages as u64).saturating_mul(page_size.bytes());
        let oom = || {
            BackendError::new(
                BackendErrorKind::OutOfMemory,
                format!(
                    "level-zero {}: {bytes} bytes requested, {} of {} in use",
                    self.device.id,
                    self.counters.used.load(Ordering::Relaxed),
                    self.arena.capacity
                ),
            )
        };
        if bytes > self.arena.capacity {
            return Err(oom());
        }
        self.free_parked();
        let g = page_size.granules();
        let mut starts = Vec::new();
        let give_back = |e: BackendError, starts: &[u64]| {
            self.frames.free_pages(starts, g);
            e
        };
        // Released pages may still be clearing: out of pages, or of device memory for a
        // new chunk, wait for those clears once and try again.
        let mut retried = false;
        loop {
            starts.clear();
            if !self.frames.alloc_pages(npages, g, &mut starts) {
                if !retried && self.drain_parked() {
                    retried = true;
                    continue;
                }
                return Err(oom());
            }
            // Back the chunks the pages lie in.
            match starts.iter().try_for_each(|&s| self.arena.back(s)) {
                Ok(()) => break,
                Err(e) => {
                    let e = give_back(e, &starts);
                    if !retried && e.kind == BackendErrorKind::OutOfMemory && self.drain_parked() {
                        retried = true;
                        continue;
                    }
                    return Err(e);
                }
            }
        }
        // Fill the pages not known to hold zeros, run by run (none when all of them were
        // cleared on free: then nothing to wait for).
        let mut ops: Vec<Op> = Vec::new();
        {
            let clean = self.clean.lock().unwrap_or_else(|p| p.into_inner());
            for &s in &starts {
                if clean.page_clean(s, g) {
                    continue;
                }
                let dst = self.arena.addr(Pfn(s as u32)).expect("backed just now");
                plan::push(
                    &mut ops,
                    Op {
                        dst,
                        src: None,
                        len: page_size.bytes(),
                    },
                );
            }
        }
        let pre_migrate_fence = if ops.is_empty() {
            None
        } else {
            let what = format_args!(
                "{}: clear of {npages} pages of {page_size} (pfn {}..)",
                self.device.id,
                starts.first().copied().unwrap_or(0)
            )
            .to_string();
            let traced = Traced {
                op: "clear",
                pages: npages,
                page_size,
            };
            let submitted = self.submit_ops(&ops, &mut [], Vec::new(), None, &what, traced);
            let (signal, forced) = match submitted {
                Ok(x) => x,
                Err(e) => return Err(give_back(e, &starts)),
            };
            if let Some(e) = forced {
                // Part of the clear runs: give the pages back only once it has completed
                // (they hold old data in part: dirty, as they were).
                if matches!(
                    signal.host_synchronize(CLEAR_DRAIN.as_nanos() as u64),
                    Ok(true)
                ) {
                    self.clean
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .set_pages(&starts, g, false);
                    return Err(give_back(e, &starts));
                }
                return Err(e);
            }
            self.counters.alloc_clears.fetch_add(1, Ordering::Relaxed);
            Some(Fence::new(ZeFence::new(
                self.seq(),
                self.device.id,
                signal,
                Vec::new(),
                None,
            )))
        };
        let cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed);
        self.allocs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                cookie,
                Alloc {
                    starts,
                    granules: g,
                },
            );
        self.counters.allocations.fetch_add(1, Ordering::Relaxed);
        self.counters.used.fetch_add(bytes, Ordering::Relaxed);
        Ok(DevmemBacking {
            cookie,
            npages,
            page_size,
            pre_migrate_fence,
        })
    }

    fn populate_devmem_pfn(
        &self,
        backing: &DevmemBacking,
        out: &mut [Pfn],
    ) -> Result<(), BackendError> {
        let allocs = self.allocs.lock().unwrap_or_else(|p| p.into_inner());
        let a = allocs.get(&backing.cookie).ok_or_else(|| {
            BackendError::new(
                BackendErrorKind::Unsupported,
                format!(
                    "level-zero {}: allocation {} is unknown",
                    self.device.id, backing.cookie
                ),
            )
        })?;
        if out.len() != a.starts.len() {
            return Err(BackendError::new(
                BackendErrorKind::Unsupported,
                format!(
                    "level-zero {}: {} pfns asked of a {}-page allocation",
                    self.device.id,
                    out.len(),
                    a.starts.len()
                ),
            ));
        }
        for (o, &s) in out.iter_mut().zip(&a.starts) {
            *o = Pfn(s as u32);
        }
        Ok(())
    }

    fn copy_to_devmem(&self, req: &CopyRequest<'_>) -> Result<Fence, BackendError> {
        self.counters.to_devmem.fetch_add(1, Ordering::Relaxed);
        self.copy(req, true)
    }

    fn copy_to_ram(&self, req: &CopyRequest<'_>) -> Result<Fence, BackendError> {
        self.counters.to_ram.fetch_add(1, Ordering::Relaxed);
        self.copy(req, false)
    }

    fn devmem_release(&self, backing: DevmemBacking) {
        let a = self
            .allocs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&backing.cookie);
        let Some(a) = a else { return };
        self.counters.used.fetch_sub(
            backing.npages as u64 * backing.page_size.bytes(),
            Ordering::Relaxed,
        );
        self.counters.releases.fetch_add(1, Ordering::Relaxed);
        match backing.pre_migrate_fence {
            // The clear may still run (an allocation released unused): its pages come back
            // once it has completed (not known clean: it may fail).
            Some(f) if !f.is_signaled() => {
                self.parked
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((f, a, false));
            }
            _ => self.release_pages(a, backing.page_size),
        }
    }

    fn capacity_bytes(&self) -> u64 {
        self.arena.capacity
    }

    /// No command limit (a call is planned into one command per run); Level Zero events of
    /// the pagemap's context are wait events of the first command; any other pending
    /// pre-fence is bridged into the queue through an event a callback host-signals
    /// ([`HostFenceWait::InQueue`]: the call never blocks, later work on the immediate list
    /// stays behind it). Calls are not ordered among themselves: a large call is recorded
    /// in a regular command list on its own queue.
    fn caps(&self) -> CopyCaps {
        CopyCaps {
            max_command_bytes: None,
            native_fence_kinds: NativeFenceKinds::one(NativeFenceKind::LEVEL_ZERO_EVENT),
            host_fences: HostFenceWait::InQueue,
            in_order: false,
            batch_bytes_hint: None,
        }
    }
}
