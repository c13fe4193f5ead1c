//! Copy submission: the call's entries planned into runs, its pre-fence sorted (events of
//! this context become wait events of the first command; anything else pending is bridged
//! through an event a fence callback host-signals; a failure fails the call's fence), then
//! queued on the immediate list or recorded in one regular list.

use super::ZePagemap;
use super::plan::{self, Op};
use crate::fence::ZeFence;
use crate::ze::EventHandle;
use drm_pagemap_core::{
    BackendError, BackendErrorKind, CopyRequest, Dependencies, Fence, FenceArray, NativeFence,
    NativeFenceKind, NativeWait, sort_dependencies,
};
use level_zero_sys::ze_event_handle_t;
use std::sync::atomic::Ordering;

impl ZePagemap {
    /// What the copy engine does with a native handle: events of this device's context are
    /// waited for on the device; anything else is a host fence to it.
    fn native_wait(&self, n: &NativeFence) -> NativeWait {
        if n.kind == NativeFenceKind::LEVEL_ZERO_EVENT
            && n.domain == self.device.ctx.handle.as_u64()
            && n.handle != 0
        {
            NativeWait::Device
        } else {
            NativeWait::No
        }
    }

    /// The call's entries as commands (runs merged), or an error naming the first entry that
    /// is not an allocated page of this pagemap.
    fn plan_copy(&self, req: &CopyRequest<'_>, to_own: bool) -> Result<Vec<Op>, BackendError> {
        let bad = |m: String| BackendError::new(BackendErrorKind::CopyFailed, m);
        if req.pages.len() != req.addrs.len() {
            return Err(bad(format!(
                "level-zero {}: {} pages but {} addresses",
                self.device.id,
                req.pages.len(),
                req.addrs.len()
            )));
        }
        let len = req.page_size.bytes();
        let mut ops = Vec::new();
        for (&pfn, &a) in req.pages.iter().zip(req.addrs) {
            if a.is_none() {
                continue;
            }
            let own = self.page_addr(pfn, req.page_size).ok_or_else(|| {
                bad(format!(
                    "level-zero {}: pfn {} of a {} page is not an allocated page of the \
                     pagemap ({} granules)",
                    self.device.id,
                    pfn.0,
                    req.page_size,
                    self.arena.granules()
                ))
            })?;
            let (dst, src) = if to_own { (own, a.0) } else { (a.0, own) };
            plan::push(
                &mut ops,
                Op {
                    dst,
                    src: Some(src),
                    len,
                },
            );
        }
        Ok(ops)
    }

    /// `copy_to_devmem` (`to_own`) and `copy_to_ram`.
    pub(super) fn copy(&self, req: &CopyRequest<'_>, to_own: bool) -> Result<Fence, BackendError> {
        let ops = self.plan_copy(req, to_own)?;
        let mut deps = Dependencies::default();
        sort_dependencies(req.pre_fence, |_, n| self.native_wait(n), &mut deps);
        if let Some(e) = deps.failed.take() {
            self.counters.failed_pre.fetch_add(1, Ordering::Relaxed);
            let e = BackendError::new(e.kind.clone(), format!("pre-fence failed: {}", e.message));
            return Ok(Fence::new(ZeFence::failed(self.seq(), self.device.id, e)));
        }
        self.counters
            .runs
            .fetch_add(ops.len() as u64, Ordering::Relaxed);
        let pages = req.addrs.iter().filter(|a| !a.is_none()).count();
        self.counters
            .pages
            .fetch_add(pages as u64, Ordering::Relaxed);

        // The first command waits for the device dependencies and for the bridge event.
        let mut waits: Vec<EventHandle> = deps
            .device
            .iter()
            .map(|(_, n)| EventHandle(ze_event_handle_t(n.handle as *mut _)))
            .collect();
        let bridge = match deps.host.is_empty() {
            true => None,
            false => {
                let b = self.event("a bridged host fence")?;
                waits.push(b.handle);
                Some(b)
            }
        };
        self.counters
            .device_waits
            .fetch_add(deps.device.len() as u64, Ordering::Relaxed);
        // The fence keeps what the event does not carry: device dependencies whose handle is
        // not complete, and the host fences.
        let mut fence_deps: Vec<Fence> = deps
            .device
            .iter()
            .filter(|(_, n)| !n.is_complete())
            .map(|(f, _)| f.clone())
            .collect();
        fence_deps.extend(deps.host.iter().cloned());
        let keep: Vec<Fence> = deps.device.iter().map(|(f, _)| f.clone()).collect();
        let op = if to_own {
            "copy_to_devmem"
        } else {
            "copy_to_ram"
        };
        let (signal, forced) = self.submit_ops(
            &ops,
            &mut waits,
            keep,
            bridge.clone(),
            &format_args!(
                "{}: {op} of {pages} pages in {} runs",
                self.device.id,
                ops.len()
            ),
            super::Traced {
                op,
                pages,
                page_size: req.page_size,
            },
        )?;
        if let Some(b) = bridge {
            self.counters.host_bridges.fetch_add(1, Ordering::Relaxed);
            let host = FenceArray::unify(deps.host).expect("host fences are pending");
            // Short and non-blocking, run where the host fence signals: the event lets the
            // queued command start. A failed fence lets it start too (the call's fence keeps
            // the host fence and fails with it).
            host.add_callback(Box::new(move |_outcome| {
                let _ = b.host_signal();
            }));
        }
        Ok(Fence::new(ZeFence::new(
            self.seq(),
            self.device.id,
            signal,
            fence_deps,
            forced,
        )))
    }
}
