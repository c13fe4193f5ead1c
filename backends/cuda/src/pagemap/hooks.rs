//! Test and bench hooks (cargo feature `internals`, which this crate's own tests and benches
//! turn on): setting the DMA crossover at run time, the raw copy stream, stalling a stream
//! and holding one until released.

use super::CudaPagemap;
use crate::driver::Stream;
use crate::gate::Hold;
use crate::kernel::GATE_ABORT;
use drm_pagemap_core::BackendError;
use std::sync::Arc;
use std::sync::atomic::Ordering;

impl CudaPagemap {
    /// Runs with the DMA crossover set to `host` bytes (runs touching system memory) and
    /// `device` bytes (device-to-device runs): a run at least that long is one DMA copy.
    /// Besides, a call of at most 64 entries in at most 3 runs copies its system-memory runs
    /// by DMA whatever their length; `host == u64::MAX` turns DMA off for those as well.
    pub fn set_dma_min(&self, host: u64, device: u64) {
        self.dma_min_host.store(host, Ordering::SeqCst);
        self.dma_min_device.store(device, Ordering::SeqCst);
    }

    /// Staged kernel copies with Hopper's bulk copies (`dpm_copy_pages_bulk`) or not, as
    /// option `cuda.bulk`; returns whether the loaded module has that kernel (without it the
    /// setting changes nothing).
    pub fn set_bulk(&self, on: bool) -> Result<bool, BackendError> {
        self.bulk.store(on, Ordering::SeqCst);
        Ok(self.device.kernels()?.has_bulk())
    }

    /// The raw `CUstream` of this pagemap's copies (benches record timing events on it).
    pub fn stream_handle(&self) -> usize {
        self.stream.handle()
    }

    /// Keeps the copy stream busy for `ns` nanoseconds of GPU time (tests widen race windows
    /// with it; benches queue work behind it so only device time is measured).
    pub fn stall(&self, ns: u64) -> Result<(), BackendError> {
        let k = self.device.kernels()?;
        let _g = self.submit.lock().unwrap_or_else(|p| p.into_inner());
        self.device.ctx.bind()?;
        k.launch_spin(&self.stream, ns)
    }

    /// Holds the copy stream until the returned [`Hold`] is released or dropped: work queued
    /// meanwhile waits on the device (tests use it to order things deterministically).
    ///
    /// While the stream is held, driver calls that synchronise the device implicitly (memory
    /// allocations: a new pagemap, arena growth, more pinned host memory) wait for the
    /// release, in every thread of the process: release it from a thread that makes none.
    pub fn hold(&self) -> Result<Hold, BackendError> {
        self.hold_stream(&self.stream)
    }

    /// Holds the clear stream (clears of freed pages and of fresh segments) like
    /// [`CudaPagemap::hold`] holds the copy stream.
    pub fn hold_clears(&self) -> Result<Hold, BackendError> {
        self.hold_stream(&self.clear_stream)
    }

    fn hold_stream(&self, stream: &Stream) -> Result<Hold, BackendError> {
        let k = self.device.kernels()?;
        let mut sub = self.submit.lock().unwrap_or_else(|p| p.into_inner());
        self.device.ctx.bind()?;
        let g = sub.gates.take()?;
        // SAFETY: the gate word lives in the control page, kept alive by the Hold.
        let launched = unsafe { k.launch_wait(stream, sub.gates.page.addr(g), 0) };
        if let Err(e) = launched {
            sub.gates.page.set(g, GATE_ABORT);
            return Err(e);
        }
        let ev = Arc::new(self.device.events.get()?);
        ev.record(stream)?;
        sub.gates.retire_after(g, ev);
        Ok(Hold {
            page: sub.gates.page.clone(),
            gate: g,
        })
    }
}

impl CudaPagemap {
    /// The ring's newest kernel instance (its epoch, 0 before the first) and whether one
    /// runs (or is being stopped) as far as the ring's keeper knows; `None` without a ring.
    pub fn ring_instance(&self) -> Option<(u64, bool)> {
        self.ring
            .as_ref()
            .map(|r| (r.engine().epoch(), r.engine().running()))
    }

    /// The ring kernel's phase clocks (NVRTC kernels; zeros with the fallback PTX), summed
    /// over its copies: nanoseconds from seeing `head` to the slot loaded, from there to
    /// the bytes copied and visible, from there to `done` written; and the copies timed.
    /// `None` without a ring.
    pub fn ring_clocks(&self) -> Option<[u64; 4]> {
        self.ring.as_ref().map(|r| {
            let c = &r.engine().ring().header().clocks;
            std::array::from_fn(|i| c[i].load(std::sync::atomic::Ordering::Acquire))
        })
    }
}
