//! Statistics that stay on: faults, migrations, evictions, copy calls and commands, CPU fence
//! waits, by direction and by size bucket.
//!
//! Copies are observed, not decorated: a call counts when it is issued, and its duration
//! when its completion is first observed, through a wrapper of the backend's fence that only
//! observes (its status, waits, native handle, members and callbacks are the backend's
//! fence's, so a device still waits for it natively). The engine waits for every copy it
//! issues, so every call's completion is observed, right when the engine sees it.
//!
//! # Cost
//! Every counter is an [`AtomicU64`] bumped with `Relaxed` `fetch_add`: a handful per copy
//! call, per fault and per migration, never per page, and no lock anywhere. Times come from one
//! `Instant::now()` pair per event (tens of nanoseconds). That is cheaper than any sampling
//! switch would save, so there is no switch. Counters of one device share cache lines; the
//! contention that causes is a few uncontended-in-practice atomic adds per fault, far below the
//! cost of the fault itself. Each copy call costs one small allocation (the observing wrapper);
//! no callback is registered and the fence worker is not involved (measured on the H200: a
//! completion callback per copy, handed to the fence worker for CUDA's events, added 1.5-3 us
//! to a 64 KiB fault).
//!
//! # Consistency
//! A [`Stats`] snapshot reads each counter once; it is not a consistent cut across counters
//! (a fault finishing during the snapshot may be counted in one field and not yet in another).
//!
//! # Buckets
//! Sizes are bucketed as upper bounds: up to 4 KiB, up to 64 KiB, up to 2 MiB, larger. Faults
//! and migrations are bucketed by the SVM range's size, copy calls by the bytes the call moved.

use drm_pagemap_core::{
    CopyOp, Fence, FenceCallback, FenceError, FenceOps, FenceStatus, NativeFence,
};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A size bucket (upper bounds).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Bucket {
    /// Up to 4 KiB.
    K4,
    /// Up to 64 KiB.
    K64,
    /// Up to 2 MiB.
    M2,
    /// More than 2 MiB.
    Larger,
}

impl Bucket {
    /// Every bucket, smallest first.
    pub const ALL: [Bucket; 4] = [Bucket::K4, Bucket::K64, Bucket::M2, Bucket::Larger];

    /// The bucket of `bytes`.
    pub const fn of(bytes: u64) -> Bucket {
        if bytes <= 4 << 10 {
            Bucket::K4
        } else if bytes <= 64 << 10 {
            Bucket::K64
        } else if bytes <= 2 << 20 {
            Bucket::M2
        } else {
            Bucket::Larger
        }
    }

    /// Its index in the per-bucket arrays of [`Stats`].
    pub const fn index(self) -> usize {
        self as usize
    }

    /// A short label for tables.
    pub const fn label(self) -> &'static str {
        match self {
            Bucket::K4 => "<=4K",
            Bucket::K64 => "<=64K",
            Bucket::M2 => "<=2M",
            Bucket::Larger => ">2M",
        }
    }
}

/// Count, bytes and total time of one kind of event.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// How many events.
    pub count: u64,
    /// Bytes they moved or covered.
    pub bytes: u64,
    /// Their total duration, in microseconds.
    pub micros: u64,
}

impl Tally {
    fn merge(&mut self, o: &Tally) {
        self.count += o.count;
        self.bytes += o.bytes;
        self.micros += o.micros;
    }
}

/// Copy calls of one operation and size bucket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CopyTally {
    /// Copy calls the core made.
    pub calls: u64,
    /// Backend commands they were issued as: one per call for a backend without a command
    /// limit (the core's call, untouched), else the pieces the call was split into for the
    /// backend's declared limit ([`drm_pagemap_core::CopyCaps::max_command_bytes`]).
    pub commands: u64,
    /// Bytes copied.
    pub bytes: u64,
    /// Total microseconds from issue until the call's completion was first observed (by the
    /// engine's wait: an upper bound of the device time).
    pub micros: u64,
}

impl CopyTally {
    fn merge(&mut self, o: &CopyTally) {
        self.calls += o.calls;
        self.commands += o.commands;
        self.bytes += o.bytes;
        self.micros += o.micros;
    }
}

/// A snapshot of one device's statistics (or a sum over devices).
///
/// Faults, migrations and evictions count on the device whose fault caused them; copy calls
/// and fence events count on the device that executed the copy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Every fault handled successfully, by SVM range size; time: fault to page table.
    pub faults: [Tally; 4],
    /// Faults that found the range resident with a valid page table: nothing done.
    pub valid_faults: u64,
    /// Faults that failed (typed error returned).
    pub fault_errors: u64,
    /// Faults that wanted device memory but were served from system memory (no room, busy).
    pub fallbacks: u64,
    /// Migrations that came back Busy and were retried under the write lock after evicting
    /// the range.
    pub busy_retries: u64,
    /// Time spent waiting for another device's timeslice before migrating.
    pub timeslice_waits: Tally,
    /// Migrations into device memory, by SVM range size; bytes: bytes copied; time: the
    /// allocation (with any LRU eviction it needed) and the migration.
    pub to_device: [Tally; 4],
    /// Moves to system memory on behalf of faults (system placement, busy retries), by SVM
    /// range size; bytes: device bytes moved back.
    pub to_system: [Tally; 4],
    /// Least-recently-used allocations evicted to make room; bytes: allocation size.
    pub lru_evictions: Tally,
    /// `copy_to_devmem` calls (the executor writes its own memory), by call size.
    pub copy_to_devmem: [CopyTally; 4],
    /// `copy_to_ram` calls (the executor pushes its own pages out), by call size.
    pub copy_to_ram: [CopyTally; 4],
    /// Pre-migrate fences waited on the CPU by the copy policy: only the host parts of a
    /// pre-fence for a backend that would block on them in the copy call itself
    /// ([`drm_pagemap_core::HostFenceWait::Blocking`]), so the wait is bounded by the context's
    /// fence timeout. Zero for backends that bridge host fences (sim, CUDA).
    pub cpu_fence_waits: Tally,
    /// Copy calls whose pre-migrate fence had a pending part the device waits on natively (a
    /// native handle of a kind the backend declares), handed to the backend as a device-side
    /// dependency (of the first command, when the call was split).
    pub fence_dependencies: u64,
    /// Copy calls whose pre-migrate fence had a pending part the device cannot wait on (a
    /// host fence), handed to a backend that bridges it from the host without blocking the
    /// faulting thread.
    pub bridged_fences: u64,
    /// Fences that signalled an error (pre-migrate or copy).
    pub fence_errors: u64,
    /// Split copy calls whose later commands could not be ordered behind the first on the
    /// backend's queue (a queue not in order, or a host fence the backend defers), so every
    /// command was given the pre-migrate fence itself. (Before backends declared their caps,
    /// such commands were issued again after a CPU wait.)
    pub ordering_repairs: u64,
    /// Page tables built; bytes: bytes mapped; time: mapping time.
    pub page_tables: Tally,
}

impl Stats {
    /// Adds `other` into `self`.
    pub fn merge(&mut self, other: &Stats) {
        for b in 0..4 {
            self.faults[b].merge(&other.faults[b]);
            self.to_device[b].merge(&other.to_device[b]);
            self.to_system[b].merge(&other.to_system[b]);
            self.copy_to_devmem[b].merge(&other.copy_to_devmem[b]);
            self.copy_to_ram[b].merge(&other.copy_to_ram[b]);
        }
        self.valid_faults += other.valid_faults;
        self.fault_errors += other.fault_errors;
        self.fallbacks += other.fallbacks;
        self.busy_retries += other.busy_retries;
        self.timeslice_waits.merge(&other.timeslice_waits);
        self.lru_evictions.merge(&other.lru_evictions);
        self.cpu_fence_waits.merge(&other.cpu_fence_waits);
        self.fence_dependencies += other.fence_dependencies;
        self.bridged_fences += other.bridged_fences;
        self.fence_errors += other.fence_errors;
        self.ordering_repairs += other.ordering_repairs;
        self.page_tables.merge(&other.page_tables);
    }

    /// Faults handled, over every bucket.
    pub fn total_faults(&self) -> u64 {
        self.faults.iter().map(|t| t.count).sum()
    }

    /// Migrations into device memory, over every bucket.
    pub fn total_to_device(&self) -> u64 {
        self.to_device.iter().map(|t| t.count).sum()
    }

    /// Copy calls of both operations, over every bucket.
    pub fn total_copy_calls(&self) -> u64 {
        self.copy_to_devmem
            .iter()
            .chain(&self.copy_to_ram)
            .map(|t| t.calls)
            .sum()
    }

    /// Copy commands of both operations, over every bucket.
    pub fn total_commands(&self) -> u64 {
        self.copy_to_devmem
            .iter()
            .chain(&self.copy_to_ram)
            .map(|t| t.commands)
            .sum()
    }
}

fn row(f: &mut fmt::Formatter<'_>, name: &str, cells: [u64; 4]) -> fmt::Result {
    write!(f, "{name:<26}")?;
    for c in cells {
        write!(f, "{c:>11}")?;
    }
    writeln!(f, "{:>11}", cells.iter().sum::<u64>())
}

fn avg_row(f: &mut fmt::Formatter<'_>, name: &str, t: [(u64, u64); 4]) -> fmt::Result {
    write!(f, "{name:<26}")?;
    for (n, us) in t {
        if n == 0 {
            write!(f, "{:>11}", "-")?;
        } else {
            write!(f, "{:>11.1}", us as f64 / n as f64)?;
        }
    }
    let (n, us) = t.iter().fold((0, 0), |a, &(n, us)| (a.0 + n, a.1 + us));
    if n == 0 {
        writeln!(f, "{:>11}", "-")
    } else {
        writeln!(f, "{:>11.1}", us as f64 / n as f64)
    }
}

fn kib(bytes: u64) -> u64 {
    bytes.div_ceil(1024)
}

impl fmt::Display for Stats {
    /// A table: one row per metric, one column per size bucket, then the total.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:<26}", "")?;
        for b in Bucket::ALL {
            write!(f, "{:>11}", b.label())?;
        }
        writeln!(f, "{:>11}", "total")?;
        let t = |a: &[Tally; 4], g: fn(&Tally) -> u64| [g(&a[0]), g(&a[1]), g(&a[2]), g(&a[3])];
        let avg = |a: &[Tally; 4]| {
            [
                (a[0].count, a[0].micros),
                (a[1].count, a[1].micros),
                (a[2].count, a[2].micros),
                (a[3].count, a[3].micros),
            ]
        };
        row(f, "faults", t(&self.faults, |x| x.count))?;
        avg_row(f, "  us per fault", avg(&self.faults))?;
        row(f, "migrations to device", t(&self.to_device, |x| x.count))?;
        row(f, "  KiB copied", t(&self.to_device, |x| kib(x.bytes)))?;
        avg_row(f, "  us per migration", avg(&self.to_device))?;
        row(f, "moves to system", t(&self.to_system, |x| x.count))?;
        row(f, "  KiB moved", t(&self.to_system, |x| kib(x.bytes)))?;
        avg_row(f, "  us per move", avg(&self.to_system))?;
        for (name, a) in [
            ("copy_to_devmem", &self.copy_to_devmem),
            ("copy_to_ram", &self.copy_to_ram),
        ] {
            let c = |g: fn(&CopyTally) -> u64| [g(&a[0]), g(&a[1]), g(&a[2]), g(&a[3])];
            row(f, &format!("{name} calls"), c(|x| x.calls))?;
            row(f, "  commands", c(|x| x.commands))?;
            row(f, "  KiB", c(|x| kib(x.bytes)))?;
            let us = [
                (a[0].calls, a[0].micros),
                (a[1].calls, a[1].micros),
                (a[2].calls, a[2].micros),
                (a[3].calls, a[3].micros),
            ];
            avg_row(f, "  us per call", us)?;
        }
        writeln!(
            f,
            "valid faults {}, fault errors {}, fallbacks to system {}, busy retries {}",
            self.valid_faults, self.fault_errors, self.fallbacks, self.busy_retries
        )?;
        writeln!(
            f,
            "timeslice waits {} ({} us), LRU evictions {} ({} KiB, {} us)",
            self.timeslice_waits.count,
            self.timeslice_waits.micros,
            self.lru_evictions.count,
            kib(self.lru_evictions.bytes),
            self.lru_evictions.micros
        )?;
        writeln!(
            f,
            "CPU fence waits {} ({} us), fence dependencies {}, bridged fences {}, fence errors {}, \
             ordering repairs {}",
            self.cpu_fence_waits.count,
            self.cpu_fence_waits.micros,
            self.fence_dependencies,
            self.bridged_fences,
            self.fence_errors,
            self.ordering_repairs
        )?;
        writeln!(
            f,
            "page tables built {} ({} KiB mapped, {} us)",
            self.page_tables.count,
            kib(self.page_tables.bytes),
            self.page_tables.micros
        )
    }
}

/// Live counters behind a [`Tally`].
#[derive(Debug, Default)]
pub(crate) struct TallyCell {
    count: AtomicU64,
    bytes: AtomicU64,
    nanos: AtomicU64,
}

impl TallyCell {
    pub(crate) fn add(&self, bytes: u64, time: Duration) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.nanos.fetch_add(
            time.as_nanos().min(u64::MAX as u128) as u64,
            Ordering::Relaxed,
        );
    }

    fn get(&self) -> Tally {
        Tally {
            count: self.count.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            micros: self.nanos.load(Ordering::Relaxed) / 1000,
        }
    }

    fn reset(&self) {
        self.count.store(0, Ordering::Relaxed);
        self.bytes.store(0, Ordering::Relaxed);
        self.nanos.store(0, Ordering::Relaxed);
    }
}

/// Live counters behind a [`CopyTally`].
#[derive(Debug, Default)]
pub(crate) struct CopyCell {
    calls: AtomicU64,
    commands: AtomicU64,
    bytes: AtomicU64,
    nanos: AtomicU64,
}

impl CopyCell {
    pub(crate) fn issued(&self, commands: u64, bytes: u64) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.commands.fetch_add(commands, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn completed(&self, time: Duration) {
        self.nanos.fetch_add(
            time.as_nanos().min(u64::MAX as u128) as u64,
            Ordering::Relaxed,
        );
    }

    fn get(&self) -> CopyTally {
        CopyTally {
            calls: self.calls.load(Ordering::Relaxed),
            commands: self.commands.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            micros: self.nanos.load(Ordering::Relaxed) / 1000,
        }
    }

    fn reset(&self) {
        for a in [&self.calls, &self.commands, &self.bytes, &self.nanos] {
            a.store(0, Ordering::Relaxed);
        }
    }
}

/// A counter.
#[derive(Debug, Default)]
pub(crate) struct Count(AtomicU64);

impl Count {
    pub(crate) fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
    fn reset(&self) {
        self.0.store(0, Ordering::Relaxed)
    }
}

/// The live counters of one device.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub faults: [TallyCell; 4],
    pub valid_faults: Count,
    pub fault_errors: Count,
    pub fallbacks: Count,
    pub busy_retries: Count,
    pub timeslice_waits: TallyCell,
    pub to_device: [TallyCell; 4],
    pub to_system: [TallyCell; 4],
    pub lru_evictions: TallyCell,
    /// `[0]`: copy_to_devmem, `[1]`: copy_to_ram.
    pub copies: [[CopyCell; 4]; 2],
    pub cpu_fence_waits: TallyCell,
    pub fence_dependencies: Count,
    pub bridged_fences: Count,
    pub fence_errors: Count,
    pub ordering_repairs: Count,
    pub page_tables: TallyCell,
}

impl Counters {
    /// Observes a copy call of `op` issued as `commands` backend commands moving `bytes`
    /// (started at `start`) and, when `done` is its fence, its completion: a callback on that
    /// fence adds the duration (and a fence error) once it signals.
    /// Counts a copy call issued now (`commands` backend calls, `bytes` moved, started at
    /// `start`) and returns its fence `done` wrapped to record its duration and error the
    /// first time its completion is observed (the engine waits for every copy it issues).
    /// The wrapper only observes: it delegates the native handle, members and callbacks,
    /// so a device still waits for the copy natively. No callback, no fence-worker
    /// traffic on the fault path.
    pub(crate) fn copy_issued(
        self: &Arc<Self>,
        op: CopyOp,
        commands: u64,
        bytes: u64,
        start: Instant,
        done: Fence,
    ) -> Fence {
        let opi = match op {
            CopyOp::ToDevmem => 0,
            CopyOp::ToRam => 1,
        };
        let bucket = Bucket::of(bytes).index();
        self.copies[opi][bucket].issued(commands, bytes);
        if commands == 0 {
            return done;
        }
        Fence::new(TimedFence {
            inner: done,
            start,
            stats: self.clone(),
            op: opi,
            bucket,
            recorded: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub(crate) fn snapshot(&self) -> Stats {
        let t = |a: &[TallyCell; 4]| [a[0].get(), a[1].get(), a[2].get(), a[3].get()];
        let c = |a: &[CopyCell; 4]| [a[0].get(), a[1].get(), a[2].get(), a[3].get()];
        Stats {
            faults: t(&self.faults),
            valid_faults: self.valid_faults.get(),
            fault_errors: self.fault_errors.get(),
            fallbacks: self.fallbacks.get(),
            busy_retries: self.busy_retries.get(),
            timeslice_waits: self.timeslice_waits.get(),
            to_device: t(&self.to_device),
            to_system: t(&self.to_system),
            lru_evictions: self.lru_evictions.get(),
            copy_to_devmem: c(&self.copies[0]),
            copy_to_ram: c(&self.copies[1]),
            cpu_fence_waits: self.cpu_fence_waits.get(),
            fence_dependencies: self.fence_dependencies.get(),
            bridged_fences: self.bridged_fences.get(),
            fence_errors: self.fence_errors.get(),
            ordering_repairs: self.ordering_repairs.get(),
            page_tables: self.page_tables.get(),
        }
    }

    pub(crate) fn reset(&self) {
        for a in [&self.faults, &self.to_device, &self.to_system] {
            a.iter().for_each(TallyCell::reset);
        }
        for a in &self.copies {
            a.iter().for_each(CopyCell::reset);
        }
        for c in [
            &self.valid_faults,
            &self.fault_errors,
            &self.fallbacks,
            &self.busy_retries,
            &self.fence_dependencies,
            &self.bridged_fences,
            &self.fence_errors,
            &self.ordering_repairs,
        ] {
            c.reset();
        }
        for t in [
            &self.timeslice_waits,
            &self.lru_evictions,
            &self.cpu_fence_waits,
            &self.page_tables,
        ] {
            t.reset();
        }
    }
}

/// A copy call's fence, wrapped to record the call's duration (and a fence error) the first
/// time its completion is observed. It changes nothing about the fence: status, waits,
/// native handle, members and callbacks are the inner fence's.
struct TimedFence {
    inner: Fence,
    start: Instant,
    stats: Arc<Counters>,
    op: usize,
    bucket: usize,
    recorded: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for TimedFence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TimedFence")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl TimedFence {
    fn observe(&self, failed: bool) {
        if !self
            .recorded
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            self.stats.copies[self.op][self.bucket].completed(self.start.elapsed());
            if failed {
                self.stats.fence_errors.inc();
            }
        }
    }
}

impl FenceOps for TimedFence {
    fn context(&self) -> u64 {
        self.inner.context()
    }

    fn seqno(&self) -> u64 {
        self.inner.seqno()
    }

    fn status(&self) -> FenceStatus {
        let s = self.inner.status();
        match &s {
            FenceStatus::Pending => {}
            FenceStatus::Signaled => self.observe(false),
            FenceStatus::Failed(_) => self.observe(true),
        }
        s
    }

    fn wait(&self, timeout: Option<std::time::Duration>) -> Result<(), FenceError> {
        let r = self.inner.wait_for(timeout);
        match &r {
            Ok(()) => self.observe(false),
            Err(FenceError::Failed(_)) => self.observe(true),
            Err(FenceError::Timeout(_)) => {}
        }
        r
    }

    fn native(&self) -> Option<NativeFence> {
        self.inner.native()
    }

    fn members(&self) -> Option<&[Fence]> {
        self.inner.members()
    }

    fn add_callback(&self, cb: FenceCallback) -> Result<(), FenceCallback> {
        self.inner.add_callback(cb);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_upper_bounds() {
        assert_eq!(Bucket::of(1), Bucket::K4);
        assert_eq!(Bucket::of(4096), Bucket::K4);
        assert_eq!(Bucket::of(4097), Bucket::K64);
        assert_eq!(Bucket::of(64 << 10), Bucket::K64);
        assert_eq!(Bucket::of(2 << 20), Bucket::M2);
        assert_eq!(Bucket::of((2 << 20) + 1), Bucket::Larger);
    }

    #[test]
    fn snapshot_merge_and_reset() {
        let c = Counters::default();
        c.faults[Bucket::M2.index()].add(2 << 20, Duration::from_micros(40));
        c.faults[Bucket::M2.index()].add(2 << 20, Duration::from_micros(60));
        c.copies[1][Bucket::K64.index()].issued(2, 65536);
        c.copies[1][Bucket::K64.index()].completed(Duration::from_micros(7));
        c.valid_faults.inc();
        let s = c.snapshot();
        assert_eq!(s.faults[2].count, 2);
        assert_eq!(s.faults[2].micros, 100);
        assert_eq!(s.copy_to_ram[1].commands, 2);
        assert_eq!(s.copy_to_ram[1].micros, 7);
        let mut sum = s;
        sum.merge(&s);
        assert_eq!(sum.total_faults(), 4);
        assert_eq!(sum.total_commands(), 4);
        let table = s.to_string();
        assert!(table.contains("us per fault"), "{table}");
        assert!(table.contains("50.0"), "{table}");
        c.reset();
        assert_eq!(c.snapshot(), Stats::default());
    }
}
