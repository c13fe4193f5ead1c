//! A GPU VM: one device's view of the address space, cut into SVM ranges (see the range
//! module for how they are cut), with the device's page table per range, madvise-like
//! attributes per address interval, and the entry of its fault handler
//! ([`GpuVm::handle_gpu_fault`]): it finds or cuts the range holding the address, locks it
//! and runs one fault on it (the steps are the `fault` module's), dropping and cutting the
//! range again when it no longer matches its CPU range. The VM's range map is only locked
//! briefly and never while waiting for a range's lock; the lock order is the `context`
//! module's.

use crate::attrs::{AttrMap, AttrSpan, Attributes, PreferredLocation};
use crate::context::VmDevice;
use crate::error::SvmError;
use crate::fault::{Access, Fault, FaultAction, FaultReport, MAX_ROUNDS};
use crate::range::{PageTable, RangeState, SvmRange, choose_chunk};
use crate::stats::Bucket;
use drm_pagemap_core::{DeviceId, Error as CoreError, PageSize, PagemapId, RangeProblem, VaRange};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Instant;

struct VmInner {
    /// The VM's seat in the context.
    dev: VmDevice,
    ranges: Mutex<BTreeMap<u64, Arc<SvmRange>>>,
    attrs: RwLock<AttrMap>,
}

/// A GPU VM: one device's mirror of the address space, with SVM ranges and their page tables.
/// Thread-safe; cheap to clone (clones share the VM).
#[derive(Clone)]
pub struct GpuVm {
    inner: Arc<VmInner>,
}

impl std::fmt::Debug for GpuVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuVm")
            .field("device", &self.inner.dev.device)
            .field("local", &self.inner.dev.local)
            .finish_non_exhaustive()
    }
}

/// Whether the CPU range `r` was cut from is still in the address space, with the same page
/// size. `cpu_ranges` is sorted by start.
fn cpu_range_live(cpu_ranges: &[(VaRange, PageSize)], r: &SvmRange) -> bool {
    cpu_ranges
        .binary_search_by_key(&r.cpu.start, |(c, _)| c.start)
        .is_ok_and(|i| cpu_ranges[i] == (r.cpu, r.page_size))
}

impl GpuVm {
    pub(crate) fn new(dev: VmDevice) -> GpuVm {
        GpuVm {
            inner: Arc::new(VmInner {
                dev,
                ranges: Mutex::new(BTreeMap::new()),
                attrs: RwLock::new(AttrMap::default()),
            }),
        }
    }

    /// The VM's device.
    pub fn device(&self) -> DeviceId {
        self.inner.dev.device
    }

    /// The device's own memory.
    pub fn local_pagemap(&self) -> PagemapId {
        self.inner.dev.local
    }

    fn ranges(&self) -> MutexGuard<'_, BTreeMap<u64, Arc<SvmRange>>> {
        self.inner.ranges.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn attrs_at(&self, addr: u64) -> AttrSpan {
        self.inner
            .attrs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .lookup(addr)
    }

    /// Sets the attributes of `range` (madvise). SVM ranges overlapping it are dropped, so
    /// the next fault cuts and places them under the new attributes.
    pub fn madvise(&self, range: VaRange, attrs: Attributes) -> Result<(), SvmError> {
        let end = range.checked_end().ok_or(CoreError::BadRange {
            range,
            problem: RangeProblem::Overflow,
        })?;
        if range.len == 0 {
            return Err(CoreError::BadRange {
                range,
                problem: RangeProblem::Empty,
            }
            .into());
        }
        if let PreferredLocation::Pagemap(id) = attrs.preferred
            && self.inner.dev.svm.info(id).is_none()
        {
            return Err(SvmError::UnknownPagemap { pagemap: id });
        }
        self.inner
            .attrs
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .set(range.start, end, attrs);
        self.invalidate(range);
        Ok(())
    }

    /// The attributes at `address`.
    pub fn attributes(&self, address: u64) -> Attributes {
        self.attrs_at(address).attrs
    }

    /// Drops every SVM range overlapping `range` with its page table (for a runtime that
    /// unmaps CPU memory, or wants ranges cut again). The pages stay where they are.
    pub fn invalidate(&self, range: VaRange) {
        let gone: Vec<Arc<SvmRange>> = {
            let mut map = self.ranges();
            let keys: Vec<u64> = map
                .range(..range.end())
                .rev()
                .take_while(|(_, r)| r.va.end() > range.start)
                .map(|(&k, _)| k)
                .collect();
            keys.iter().filter_map(|k| map.remove(k)).collect()
        };
        for r in gone {
            let mut st = r.lock();
            st.dropped = true;
            st.unmap(&self.inner.dev.map_ctx(&r));
        }
    }

    /// The SVM ranges of the VM, in address order.
    pub fn svm_ranges(&self) -> Vec<(VaRange, PageSize)> {
        self.ranges()
            .values()
            .map(|r| (r.va, r.page_size))
            .collect()
    }

    /// Calls `f` with the page table of the SVM range holding `address`, if it has one.
    pub fn with_page_table<R>(
        &self,
        address: u64,
        f: impl FnOnce(&PageTable<'_>) -> R,
    ) -> Option<R> {
        let range = self.lookup(address)?;
        let st = range.lock();
        if st.dropped || !st.mapped {
            return None;
        }
        Some(f(&PageTable {
            range: range.va,
            page_size: range.page_size,
            writable: st.writable,
            ptes: &st.ptes,
        }))
    }

    /// Whether the page table of the SVM range holding `address` still matches where its
    /// pages are (it goes stale when another device, the CPU or an eviction moves them).
    pub fn is_valid(&self, address: u64) -> bool {
        let Some(range) = self.lookup(address) else {
            return false;
        };
        let mut st = range.lock();
        if st.dropped || !st.mapped {
            return false;
        }
        let mm = &self.inner.dev.svm.mm;
        if mm.generation(range.va).is_ok_and(|g| g == st.generation) {
            return true;
        }
        let mut now = std::mem::take(&mut st.scratch);
        let ok = mm.backing(range.va, &mut now).is_ok() && now == st.backing;
        st.scratch = now;
        ok
    }

    /// Moves every device page of `range` (page aligned, inside one range of the address
    /// space) back to system memory, evicting whole the allocations holding them. Runs under
    /// the migrate lock taken for write. Returns the pages moved.
    pub fn evict_range(&self, range: VaRange) -> Result<usize, SvmError> {
        let dev = &self.inner.dev;
        let ps = dev
            .svm
            .mm
            .ranges()
            .into_iter()
            .find(|(r, _)| r.contains_range(&range))
            .map(|(_, ps)| ps)
            .ok_or(CoreError::BadRange {
                range,
                problem: RangeProblem::NotMapped,
            })?;
        let _w = dev
            .svm
            .migrate_lock
            .write()
            .unwrap_or_else(|p| p.into_inner());
        dev.svm.evict_range(dev.span(range, ps), &mut Vec::new())
    }

    fn lookup(&self, address: u64) -> Option<Arc<SvmRange>> {
        let map = self.ranges();
        let (_, r) = map.range(..=address).next_back()?;
        (r.va.end() > address).then(|| r.clone())
    }

    /// Finds the SVM range holding `address`, or cuts a new one.
    fn find_or_create(&self, address: u64) -> Result<Arc<SvmRange>, SvmError> {
        if let Some(r) = self.lookup(address) {
            return Ok(r);
        }
        let not_mirrored = SvmError::NotMirrored {
            device: self.inner.dev.device,
            address,
        };
        // Sorted by start: the CPU ranges do not overlap.
        let cpu_ranges = self.inner.dev.svm.mm.ranges();
        let i = cpu_ranges.partition_point(|(r, _)| r.start <= address);
        let (cpu, ps) = i
            .checked_sub(1)
            .map(|i| cpu_ranges[i])
            .filter(|(r, _)| address < r.end())
            .ok_or(not_mirrored)?;
        let span = self.attrs_at(address);
        let (lo, hi) = (cpu.start.max(span.start), cpu.end().min(span.end));
        let (range, stale) = {
            let mut map = self.ranges();
            if let Some((_, r)) = map.range(..=address).next_back()
                && r.va.end() > address
            {
                return Ok(r.clone());
            }
            // Ranges cut from a CPU range that is gone (freed, or re-created with another
            // extent or page size) cannot stay in the way of the new one (every range lies in
            // one 2 MiB block). Ranges of the other live CPU ranges in the block stay: they
            // never overlap the new one, which lies inside its own CPU range.
            let block = address - address % PageSize::Size2M.bytes();
            let block_end = block.saturating_add(PageSize::Size2M.bytes());
            let stale_keys: Vec<u64> = map
                .range(..block_end)
                .rev()
                .take_while(|(_, r)| r.va.end() > block)
                .filter(|(_, r)| !cpu_range_live(&cpu_ranges, r))
                .map(|(&k, _)| k)
                .collect();
            let stale: Vec<Arc<SvmRange>> =
                stale_keys.iter().filter_map(|k| map.remove(k)).collect();
            let va = choose_chunk(address, ps, lo, hi, &map);
            let range = Arc::new(SvmRange::new(va, ps, cpu));
            map.insert(va.start, range.clone());
            (range, stale)
        };
        for r in stale {
            let mut st = r.lock();
            st.dropped = true;
            st.unmap(&self.inner.dev.map_ctx(&r));
        }
        Ok(range)
    }

    /// Removes `range` from the VM (it no longer matches the address space).
    fn drop_range(&self, range: &Arc<SvmRange>, st: &mut RangeState) {
        {
            let mut map = self.ranges();
            if map
                .get(&range.va.start)
                .is_some_and(|r| Arc::ptr_eq(r, range))
            {
                map.remove(&range.va.start);
            }
        }
        st.dropped = true;
        st.unmap(&self.inner.dev.map_ctx(range));
    }

    /// Serves a device fault at `address`: places the SVM range holding it where the
    /// attributes and `access` want it and builds the device's page table for it. See the
    /// `fault` module's documentation for the steps. On error every page's data is where it
    /// was.
    pub fn handle_gpu_fault(&self, address: u64, access: Access) -> Result<FaultReport, SvmError> {
        let t0 = Instant::now();
        let span = tracing::debug_span!(
            target: "xe_svm",
            "gpu_fault",
            address,
            access = ?access,
            range = tracing::field::Empty,
            action = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        let _entered = span.enter();
        let r = self.fault(address, access, t0);
        let stats = &self.inner.dev.stats;
        if !span.is_disabled() {
            match &r {
                Ok(rep) => {
                    span.record("range", tracing::field::display(rep.range));
                    span.record("action", tracing::field::debug(rep.action));
                    span.record("outcome", "ok");
                }
                Err(e) => {
                    span.record("outcome", "failed");
                    tracing::debug!(target: "xe_svm", error = %e, "gpu fault failed");
                }
            }
        }
        match &r {
            Ok(rep) => {
                stats.faults[Bucket::of(rep.range.len).index()].add(rep.range.len, rep.elapsed);
                match rep.action {
                    FaultAction::Valid => stats.valid_faults.inc(),
                    FaultAction::FellBack => stats.fallbacks.inc(),
                    _ => {}
                }
            }
            Err(_) => stats.fault_errors.inc(),
        }
        r
    }

    fn fault(&self, address: u64, access: Access, t0: Instant) -> Result<FaultReport, SvmError> {
        for _ in 0..MAX_ROUNDS {
            let range = self.find_or_create(address)?;
            let mut st = range.lock();
            if st.dropped {
                continue;
            }
            let attrs = self.attrs_at(range.va.start).attrs;
            let served = Fault::serve(&self.inner.dev, &range, &mut st, access, &attrs, t0)?;
            match served {
                Some(rep) => return Ok(rep),
                None => self.drop_range(&range, &mut st),
            }
        }
        Err(SvmError::Unstable {
            range: VaRange::new(address - address % 4096, 4096),
            device: self.inner.dev.device,
        })
    }
}
