//! Statistics only the SVM layer knows, per device: GPU faults and what the fault handler
//! did for them (migrations and moves to system memory by SVM range size, LRU evictions,
//! timeslice waits, fallbacks, busy retries), page-table builds, and the copy policy's own
//! decisions (commands a call was split into, pre-migrate fence handling).
//!
//! What moved where is the core's: bytes, pages, calls and device time per link, sizes,
//! latency histograms, copies in flight, device memory and failures by kind are in the
//! address space's [`drm_pagemap_core::StatsSnapshot`] (`svm.mm().stats()`), counted once,
//! there. Copy fences that signal an error fail the migration and count there
//! (`failures.fence_error`); this layer counts only the pre-migrate fences its policy
//! refuses ([`Stats::pre_fence_errors`]).
//!
//! # Cost
//! Every counter is an [`AtomicU64`] bumped with `Relaxed` `fetch_add`: a handful per fault
//! and per migration, never per page or per copy call (a backend that declares a command
//! limit adds two per call, for the split), and no lock anywhere. Times come from one
//! `Instant::now()` pair per event the handler times anyway.
//!
//! # Consistency
//! A [`Stats`] snapshot reads each counter once; it is not a consistent cut across counters
//! (a fault finishing during the snapshot may be counted in one field and not yet in another).
//!
//! # Buckets
//! Sizes are bucketed as upper bounds: up to 4 KiB, up to 64 KiB, up to 2 MiB, larger. Faults
//! and migrations are bucketed by the SVM range's size.

use drm_pagemap_core::CopyOp;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

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

/// Copy calls on a pagemap whose backend declares a command limit
/// ([`drm_pagemap_core::CopyCaps::max_command_bytes`]), and the backend commands the policy
/// issued them as. Calls of a backend without a limit are passed on untouched (one command
/// each) and are counted by the core only.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommandTally {
    /// Copy calls the core made on such a pagemap.
    pub calls: u64,
    /// Commands they were issued as (pieces of at most the declared limit; 0 for a call
    /// with nothing to copy).
    pub commands: u64,
}

impl CommandTally {
    fn merge(&mut self, o: &CommandTally) {
        self.calls += o.calls;
        self.commands += o.commands;
    }

    /// Calls that became more commands than one: the commands beyond one per call.
    pub fn extra_commands(&self) -> u64 {
        self.commands.saturating_sub(self.calls)
    }
}

/// A snapshot of one device's statistics (or a sum over devices): what only the SVM layer
/// knows. Copies (bytes, calls, device time per link), failures by kind, evictions and
/// memory use are the core's ([`drm_pagemap_core::AddressSpace::stats`]).
///
/// Faults, migrations and evictions count on the device whose fault caused them; copy
/// commands and pre-migrate fence handling count on the device that executed the copy.
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
    /// Migrations into device memory for faults, by SVM range size; bytes: bytes copied;
    /// time: the allocation (with any LRU eviction it needed) and the migration.
    pub to_device: [Tally; 4],
    /// Moves to system memory on behalf of faults (system placement, busy retries), by SVM
    /// range size; bytes: device bytes moved back.
    pub to_system: [Tally; 4],
    /// Least-recently-used allocations the fault handler evicted to make room; bytes:
    /// allocation size; time: the eviction. (The core counts them among its evictions too,
    /// without the reason.)
    pub lru_evictions: Tally,
    /// `copy_to_devmem` calls on pagemaps with a command limit, and their commands.
    pub commands_to_devmem: CommandTally,
    /// `copy_to_ram` calls on pagemaps with a command limit, and their commands.
    pub commands_to_ram: CommandTally,
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
    /// Pre-migrate fences the policy found failed (or whose CPU wait failed): the call was
    /// refused before anything was issued. Copy fences that fail are the core's
    /// (`failures.fence_error` of [`drm_pagemap_core::StatsSnapshot`]).
    pub pre_fence_errors: u64,
    /// Split copy calls whose later commands could not be ordered behind the first on the
    /// backend's queue (a queue not in order, or a host fence the backend defers), so every
    /// command was given the pre-migrate fence itself.
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
        }
        self.valid_faults += other.valid_faults;
        self.fault_errors += other.fault_errors;
        self.fallbacks += other.fallbacks;
        self.busy_retries += other.busy_retries;
        self.timeslice_waits.merge(&other.timeslice_waits);
        self.lru_evictions.merge(&other.lru_evictions);
        self.commands_to_devmem.merge(&other.commands_to_devmem);
        self.commands_to_ram.merge(&other.commands_to_ram);
        self.cpu_fence_waits.merge(&other.cpu_fence_waits);
        self.fence_dependencies += other.fence_dependencies;
        self.bridged_fences += other.bridged_fences;
        self.pre_fence_errors += other.pre_fence_errors;
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

    /// Copy calls of both operations on pagemaps with a command limit.
    pub fn total_limited_calls(&self) -> u64 {
        self.commands_to_devmem.calls + self.commands_to_ram.calls
    }

    /// Commands of both operations on pagemaps with a command limit.
    pub fn total_commands(&self) -> u64 {
        self.commands_to_devmem.commands + self.commands_to_ram.commands
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
    /// A table: one row per metric, one column per size bucket, then the total; then the
    /// counters without buckets.
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
        if self.total_limited_calls() > 0 {
            writeln!(
                f,
                "split copies: copy_to_devmem {} calls as {} commands, copy_to_ram {} calls \
                 as {} commands",
                self.commands_to_devmem.calls,
                self.commands_to_devmem.commands,
                self.commands_to_ram.calls,
                self.commands_to_ram.commands
            )?;
        }
        writeln!(
            f,
            "CPU fence waits {} ({} us), fence dependencies {}, bridged fences {}, \
             pre-fence errors {}, ordering repairs {}",
            self.cpu_fence_waits.count,
            self.cpu_fence_waits.micros,
            self.fence_dependencies,
            self.bridged_fences,
            self.pre_fence_errors,
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

/// Live counters behind a [`CommandTally`].
#[derive(Debug, Default)]
pub(crate) struct CommandCell {
    calls: AtomicU64,
    commands: AtomicU64,
}

impl CommandCell {
    fn get(&self) -> CommandTally {
        CommandTally {
            calls: self.calls.load(Ordering::Relaxed),
            commands: self.commands.load(Ordering::Relaxed),
        }
    }

    fn reset(&self) {
        self.calls.store(0, Ordering::Relaxed);
        self.commands.store(0, Ordering::Relaxed);
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
    commands: [CommandCell; 2],
    pub cpu_fence_waits: TallyCell,
    pub fence_dependencies: Count,
    pub bridged_fences: Count,
    pub pre_fence_errors: Count,
    pub ordering_repairs: Count,
    pub page_tables: TallyCell,
}

impl Counters {
    /// A copy call of `op` on a pagemap with a command limit was issued as `commands`
    /// backend commands.
    #[inline]
    pub(crate) fn split(&self, op: CopyOp, commands: u64) {
        let c = &self.commands[match op {
            CopyOp::ToDevmem => 0,
            CopyOp::ToRam => 1,
        }];
        c.calls.fetch_add(1, Ordering::Relaxed);
        c.commands.fetch_add(commands, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> Stats {
        let t = |a: &[TallyCell; 4]| [a[0].get(), a[1].get(), a[2].get(), a[3].get()];
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
            commands_to_devmem: self.commands[0].get(),
            commands_to_ram: self.commands[1].get(),
            cpu_fence_waits: self.cpu_fence_waits.get(),
            fence_dependencies: self.fence_dependencies.get(),
            bridged_fences: self.bridged_fences.get(),
            pre_fence_errors: self.pre_fence_errors.get(),
            ordering_repairs: self.ordering_repairs.get(),
            page_tables: self.page_tables.get(),
        }
    }

    pub(crate) fn reset(&self) {
        for a in [&self.faults, &self.to_device, &self.to_system] {
            a.iter().for_each(TallyCell::reset);
        }
        self.commands.iter().for_each(CommandCell::reset);
        for c in [
            &self.valid_faults,
            &self.fault_errors,
            &self.fallbacks,
            &self.busy_retries,
            &self.fence_dependencies,
            &self.bridged_fences,
            &self.pre_fence_errors,
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
        c.split(CopyOp::ToRam, 2);
        c.valid_faults.inc();
        let s = c.snapshot();
        assert_eq!(s.faults[2].count, 2);
        assert_eq!(s.faults[2].micros, 100);
        assert_eq!(
            s.commands_to_ram,
            CommandTally {
                calls: 1,
                commands: 2
            }
        );
        assert_eq!(s.commands_to_ram.extra_commands(), 1);
        let mut sum = s;
        sum.merge(&s);
        assert_eq!(sum.total_faults(), 4);
        assert_eq!(sum.total_commands(), 4);
        assert_eq!(sum.total_limited_calls(), 2);
        let table = s.to_string();
        assert!(table.contains("us per fault"), "{table}");
        assert!(table.contains("50.0"), "{table}");
        assert!(
            table.contains("copy_to_ram 1 calls as 2 commands"),
            "{table}"
        );
        c.reset();
        assert_eq!(c.snapshot(), Stats::default());
    }
}
