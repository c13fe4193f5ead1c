//! Statistics of an address space, for every backend: what moved where (per link, per page
//! size), how large the copy calls were and how long migrations took (log2 histograms), what
//! is in flight, what memory is used, and why requests failed.
//!
//! Always on: the engine updates relaxed atomic counters in fixed arrays (no lock, no heap
//! allocation, no formatting on the hot path). [`AddressSpace::stats`] takes a
//! [`StatsSnapshot`] (it allocates, and briefly takes the address space's lock to sum the
//! device memory of live allocations); [`AddressSpace::reset_stats`] zeroes the counters.
//!
//! ## Bounds
//! Pagemaps `0..`[`TRACKED_PAGEMAPS`] get a location each; the links of every higher
//! pagemap id (ids go up to 255) are summed in one [`Location::OtherPagemaps`] bucket.
//! Device memory per pagemap ([`PagemapStats`]) is exact for every pagemap id.
//!
//! ## What "device time" is
//! The engine issues every copy call of a transaction, then waits for their fences in issue
//! order. A call's device time is the time from just before the engine submitted it to the
//! moment the engine's wait saw its fence signalled. It is an upper bound of the device's
//! work: it includes the submission itself, queueing behind other work, and (for a call
//! waited after another) the time it had already finished while the engine waited for the
//! previous one.
//!
//! ## Counters and gauges
//! Counters (bytes, pages, calls, device time, histograms, failures, evictions, faults,
//! waits) only grow until a reset. Gauges (copies and bytes in flight, host frames in use,
//! device memory used) describe the present: a reset leaves them alone.

use crate::error::{BackendErrorKind, BusyReason, Error, FenceError};
use crate::mm::AddressSpace;
use crate::types::{PageSize, PagemapId};
use serde::Serialize;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Pagemap ids below this have a location of their own in the link statistics; higher ids
/// share [`Location::OtherPagemaps`]. 16: two dozen devices per node is rare, and the link
/// matrix (18 x 18 locations, 7 counters each: calls and pages per page size, device
/// time; 18 KiB) stays small enough to keep per address space.
pub const TRACKED_PAGEMAPS: usize = 16;

/// Locations: system memory, the tracked pagemaps, the overflow bucket.
const LOCATIONS: usize = TRACKED_PAGEMAPS + 2;
const OVERFLOW: usize = LOCATIONS - 1;

/// Buckets of a [`Histogram`]: one per power of two of a `u64`.
pub const HISTOGRAM_BUCKETS: usize = 64;

/// Where bytes were read from or written to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Location {
    /// System memory (the address space's host frames).
    System,
    /// The device memory of one pagemap (id below [`TRACKED_PAGEMAPS`]).
    Pagemap(u8),
    /// The device memory of any pagemap with an id of [`TRACKED_PAGEMAPS`] or more.
    OtherPagemaps,
}

impl Location {
    /// The location of `pagemap`'s device memory.
    pub fn of(pagemap: PagemapId) -> Location {
        if (pagemap.0 as usize) < TRACKED_PAGEMAPS {
            Location::Pagemap(pagemap.0)
        } else {
            Location::OtherPagemaps
        }
    }

    #[inline]
    fn index(self) -> usize {
        match self {
            Location::System => 0,
            Location::Pagemap(p) if (p as usize) < TRACKED_PAGEMAPS => 1 + p as usize,
            _ => OVERFLOW,
        }
    }

    fn from_index(i: usize) -> Location {
        match i {
            0 => Location::System,
            OVERFLOW => Location::OtherPagemaps,
            i => Location::Pagemap((i - 1) as u8),
        }
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::System => f.write_str("system"),
            Location::Pagemap(p) => write!(f, "pagemap {p}"),
            Location::OtherPagemaps => write!(f, "pagemaps >= {TRACKED_PAGEMAPS}"),
        }
    }
}

/// A link (source location, destination location) packed into an index of the link matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Link(u16);

impl Link {
    /// The link from `from` to `to`.
    #[inline]
    pub(crate) fn new(from: Location, to: Location) -> Link {
        Link((from.index() * LOCATIONS + to.index()) as u16)
    }

    /// A placeholder for fences that are not copies (a pre-migrate fence).
    pub(crate) const NONE: Link = Link(u16::MAX);
}

/// The counters of one link. Calls and pages are kept per page size, so that a submitted
/// call costs two additions here: the link's bytes and pages, the per-size statistics and
/// the copies in flight are derived from them by the snapshot.
#[derive(Default)]
struct LinkCounters {
    sizes: [SizeCounters; 3],
    device_ns: AtomicU64,
}

/// Calls and pages of one page size on one link (bytes: pages times the size).
#[derive(Default)]
struct SizeCounters {
    pages: AtomicU64,
    calls: AtomicU64,
}

const SIZES: [PageSize; 3] = [PageSize::Size4K, PageSize::Size64K, PageSize::Size2M];

/// Whether `trace`-level spans of the engine may be recorded: the global level filter
/// (one relaxed load), so that the per-phase spans cost nothing more without a subscriber.
#[inline]
pub(crate) fn trace_on() -> bool {
    tracing::level_filters::STATIC_MAX_LEVEL >= tracing::level_filters::LevelFilter::TRACE
        && tracing::level_filters::LevelFilter::current()
            >= tracing::level_filters::LevelFilter::TRACE
}

/// The counters of one address space (see the module docs).
///
/// The hot path adds as little as it can: a submitted call adds to its link's calls and
/// pages of its page size and to one bucket of the call-size histogram (3 additions); the
/// wait adds each call's device time and, once per wait, the calls and bytes that landed.
/// Copies in flight are the calls submitted minus those landed (a reset moves what it
/// zeroes out of the landed counts too, so that the difference stays); migrations are the
/// latency histogram's count.
pub(crate) struct Counters {
    links: Box<[LinkCounters]>,
    call_bytes: [AtomicU64; HISTOGRAM_BUCKETS],
    migrate_ns: [AtomicU64; HISTOGRAM_BUCKETS],
    not_needed: AtomicU64,
    landed_calls: AtomicI64,
    landed_bytes: AtomicI64,
    /// Host frames in use, per page size.
    host_frames: [AtomicI64; 3],
    busy: [AtomicU64; 5],
    out_of_memory: AtomicU64,
    fence_error: AtomicU64,
    timeout: AtomicU64,
    injected: AtomicU64,
    backend: AtomicU64,
    other: AtomicU64,
    evictions: AtomicU64,
    evicted_pages: AtomicU64,
    cpu_faults: AtomicU64,
    cpu_fault_pages: AtomicU64,
    timeslice_waits: AtomicU64,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            links: (0..LOCATIONS * LOCATIONS)
                .map(|_| LinkCounters::default())
                .collect(),
            call_bytes: [const { AtomicU64::new(0) }; HISTOGRAM_BUCKETS],
            migrate_ns: [const { AtomicU64::new(0) }; HISTOGRAM_BUCKETS],
            not_needed: AtomicU64::new(0),
            landed_calls: AtomicI64::new(0),
            landed_bytes: AtomicI64::new(0),
            host_frames: Default::default(),
            busy: Default::default(),
            out_of_memory: AtomicU64::new(0),
            fence_error: AtomicU64::new(0),
            timeout: AtomicU64::new(0),
            injected: AtomicU64::new(0),
            backend: AtomicU64::new(0),
            other: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            evicted_pages: AtomicU64::new(0),
            cpu_faults: AtomicU64::new(0),
            cpu_fault_pages: AtomicU64::new(0),
            timeslice_waits: AtomicU64::new(0),
        }
    }
}

/// The bucket of `v`: `floor(log2(v))`, 0 for 0 and 1.
#[inline]
pub fn bucket_of(v: u64) -> usize {
    (63 - (v | 1).leading_zeros()) as usize
}

/// Nanoseconds of `d`, saturating (no 128-bit arithmetic on the hot path).
#[inline]
fn ns(d: Duration) -> u64 {
    d.as_secs()
        .saturating_mul(1_000_000_000)
        .saturating_add(d.subsec_nanos() as u64)
}

#[inline]
fn size_index(ps: PageSize) -> usize {
    match ps {
        PageSize::Size4K => 0,
        PageSize::Size64K => 1,
        PageSize::Size2M => 2,
    }
}

impl Counters {
    /// A copy call of `pages` pages of `ps` was submitted on `link`.
    #[inline]
    pub(crate) fn issued(&self, link: Link, ps: PageSize, pages: usize) -> u64 {
        let bytes = pages as u64 * ps.bytes();
        if let Some(l) = self.links.get(link.0 as usize) {
            let s = &l.sizes[size_index(ps)];
            s.calls.fetch_add(1, Relaxed);
            s.pages.fetch_add(pages as u64, Relaxed);
        }
        self.call_bytes[bucket_of(bytes)].fetch_add(1, Relaxed);
        bytes
    }

    /// A copy call on `link` took `device_time` (see the module docs).
    #[inline]
    pub(crate) fn device_time(&self, link: Link, device_time: Duration) {
        if let Some(l) = self.links.get(link.0 as usize) {
            l.device_ns.fetch_add(ns(device_time), Relaxed);
        }
    }

    /// `copies` copies of `bytes` in all were seen done (signalled, or failed; or a parked
    /// cleanup ended): out of flight.
    #[inline]
    pub(crate) fn landed_many(&self, copies: u64, bytes: u64) {
        self.landed_calls.fetch_add(copies as i64, Relaxed);
        self.landed_bytes.fetch_add(bytes as i64, Relaxed);
    }

    /// A migration committed after `latency` (from its start to the end of its commit).
    #[inline]
    pub(crate) fn migrated(&self, latency: Duration) {
        self.migrate_ns[bucket_of(ns(latency))].fetch_add(1, Relaxed);
    }

    /// A migration found every page in its destination already.
    pub(crate) fn not_needed(&self) {
        self.not_needed.fetch_add(1, Relaxed);
    }

    /// `n` host frames of `ps` were allocated (`n` > 0) or freed (`n` < 0) by the engine.
    #[inline]
    pub(crate) fn host_frames(&self, n: i64, ps: PageSize) {
        self.host_frames[size_index(ps)].fetch_add(n, Relaxed);
    }

    /// An eviction moved `pages` pages back and released its allocation.
    pub(crate) fn evicted(&self, pages: usize) {
        self.evictions.fetch_add(1, Relaxed);
        self.evicted_pages.fetch_add(pages as u64, Relaxed);
    }

    /// The CPU-fault path moved `pages` pages back.
    pub(crate) fn cpu_fault(&self, pages: usize) {
        self.cpu_faults.fetch_add(1, Relaxed);
        self.cpu_fault_pages.fetch_add(pages as u64, Relaxed);
    }

    /// A CPU access waited for an allocation's timeslice.
    pub(crate) fn timeslice_wait(&self) {
        self.timeslice_waits.fetch_add(1, Relaxed);
    }

    /// A public operation failed with `e`: counted by [`FailureKind::of`].
    #[cold]
    pub(crate) fn failed(&self, e: &Error) {
        let c = match FailureKind::of(e) {
            FailureKind::Busy(r) => &self.busy[busy_index(r)],
            FailureKind::OutOfMemory => &self.out_of_memory,
            FailureKind::FenceError => &self.fence_error,
            FailureKind::Timeout => &self.timeout,
            FailureKind::Backend => &self.backend,
            FailureKind::Other => &self.other,
        };
        c.fetch_add(1, Relaxed);
        if FailureKind::injected(e) {
            self.injected.fetch_add(1, Relaxed);
        }
    }

    /// Zeroes every counter (gauges stay).
    fn reset(&self) {
        let zero = |a: &AtomicU64| a.store(0, Relaxed);
        for l in self.links.iter() {
            for (s, ps) in l.sizes.iter().zip(SIZES) {
                // What is zeroed leaves the landed counts too: calls in flight (submitted
                // minus landed) stay what they were.
                let calls = s.calls.swap(0, Relaxed);
                let pages = s.pages.swap(0, Relaxed);
                self.landed_calls.fetch_sub(calls as i64, Relaxed);
                self.landed_bytes
                    .fetch_sub(pages.saturating_mul(ps.bytes()) as i64, Relaxed);
            }
            zero(&l.device_ns);
        }
        self.call_bytes.iter().for_each(zero);
        self.migrate_ns.iter().for_each(zero);
        self.busy.iter().for_each(zero);
        for a in [
            &self.not_needed,
            &self.out_of_memory,
            &self.fence_error,
            &self.timeout,
            &self.injected,
            &self.backend,
            &self.other,
            &self.evictions,
            &self.evicted_pages,
            &self.cpu_faults,
            &self.cpu_fault_pages,
            &self.timeslice_waits,
        ] {
            zero(a);
        }
    }
}

fn busy_index(r: BusyReason) -> usize {
    match r {
        BusyReason::Fragmentation => 0,
        BusyReason::ForeignOwner => 1,
        BusyReason::PageLocked => 2,
        BusyReason::EvictIncomplete => 3,
        BusyReason::CpuAccess => 4,
    }
}

/// How a failure is counted in [`Failures`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// [`Error::Busy`], by reason.
    Busy(BusyReason),
    /// No memory: [`Error::OutOfMemory`], or a backend's
    /// [`BackendErrorKind::OutOfMemory`].
    OutOfMemory,
    /// A fence signalled an error ([`FenceError::Failed`]).
    FenceError,
    /// A fence wait or a CPU access ran out of time ([`FenceError::Timeout`],
    /// [`Error::CpuAccessTimeout`]).
    Timeout,
    /// Any other backend failure (an allocation, mapping or copy submission failed, a
    /// device lost, a driver error, an injected fault).
    Backend,
    /// A refused request (bad range, unknown pagemap or allocation, too large, ...).
    Other,
}

impl FailureKind {
    /// The kind `e` is counted as (each failure has exactly one).
    pub fn of(e: &Error) -> FailureKind {
        match e {
            Error::Busy { reason, .. } => FailureKind::Busy(*reason),
            Error::OutOfMemory { .. } => FailureKind::OutOfMemory,
            Error::CpuAccessTimeout { .. } => FailureKind::Timeout,
            Error::Fence { source, .. } => match source {
                FenceError::Timeout(_) => FailureKind::Timeout,
                FenceError::Failed(_) => FailureKind::FenceError,
            },
            Error::Backend { source, .. } => match source.kind {
                BackendErrorKind::OutOfMemory => FailureKind::OutOfMemory,
                _ => FailureKind::Backend,
            },
            _ => FailureKind::Other,
        }
    }

    /// Whether `e` comes from a fault injected on purpose ([`BackendErrorKind::Injected`],
    /// from a backend call or through a fence): counted in [`Failures::injected`] besides
    /// its kind.
    pub fn injected(e: &Error) -> bool {
        match e {
            Error::Backend { source, .. }
            | Error::Fence {
                source: FenceError::Failed(source),
                ..
            } => source.kind == BackendErrorKind::Injected,
            _ => false,
        }
    }
}

/// Bytes, pages, calls and device time of copies from one location to another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct LinkStats {
    /// Where the bytes were read.
    pub from: Location,
    /// Where the bytes were written.
    pub to: Location,
    /// Bytes copied (pages times page size), counted when a call is submitted.
    pub bytes: u64,
    /// Pages copied, counted when a call is submitted.
    pub pages: u64,
    /// Copy calls submitted successfully.
    pub calls: u64,
    /// Device time of the calls that landed, in nanoseconds (see the module docs: submit to
    /// signal, as the engine's wait observed it).
    pub device_time_ns: u64,
}

/// Copies of pages of one size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct PageSizeStats {
    /// The page size, in bytes.
    pub page_size: u64,
    /// Bytes copied in pages of this size.
    pub bytes: u64,
    /// Pages of this size copied.
    pub pages: u64,
    /// Copy calls of pages of this size.
    pub calls: u64,
}

/// A log2 histogram: `buckets[k]` counts the values `v` with `floor(log2(v)) == k` (0 and 1
/// in bucket 0). The unit is the field's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Histogram {
    /// [`HISTOGRAM_BUCKETS`] counts.
    pub buckets: Vec<u64>,
}

impl Histogram {
    /// Values counted.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// The bucket a value falls in (`floor(log2(v))`).
    pub fn bucket_of(v: u64) -> usize {
        bucket_of(v)
    }

    /// The lower bound of the bucket holding the `q`-quantile (`q` in 0..=1), in the
    /// histogram's unit; `None` when empty.
    pub fn quantile_floor(&self, q: f64) -> Option<u64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let want = ((q.clamp(0.0, 1.0) * n as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (k, &c) in self.buckets.iter().enumerate() {
            seen += c;
            if seen >= want {
                return Some(if k == 0 { 0 } else { 1 << k });
            }
        }
        None
    }

    fn of(a: &[AtomicU64; HISTOGRAM_BUCKETS]) -> Histogram {
        Histogram {
            buckets: a.iter().map(|b| b.load(Relaxed)).collect(),
        }
    }
}

/// Failed public operations (migrations, evictions, CPU accesses, allocations), by kind
/// (see [`FailureKind::of`]). Counts of operations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Failures {
    /// [`BusyReason::Fragmentation`].
    pub busy_fragmentation: u64,
    /// [`BusyReason::ForeignOwner`].
    pub busy_foreign_owner: u64,
    /// [`BusyReason::PageLocked`].
    pub busy_page_locked: u64,
    /// [`BusyReason::EvictIncomplete`].
    pub busy_evict_incomplete: u64,
    /// [`BusyReason::CpuAccess`].
    pub busy_cpu_access: u64,
    /// [`FailureKind::OutOfMemory`].
    pub out_of_memory: u64,
    /// [`FailureKind::FenceError`].
    pub fence_error: u64,
    /// [`FailureKind::Timeout`].
    pub timeout: u64,
    /// Of all the failures here, those an injected fault caused
    /// ([`FailureKind::injected`]); already counted under their kind.
    pub injected: u64,
    /// [`FailureKind::Backend`].
    pub backend: u64,
    /// [`FailureKind::Other`].
    pub other: u64,
}

impl Failures {
    /// Failures of every kind (each counted once; `injected` is a part of them).
    pub fn total(&self) -> u64 {
        self.busy()
            + self.out_of_memory
            + self.fence_error
            + self.timeout
            + self.backend
            + self.other
    }

    /// Busy refusals of every reason.
    pub fn busy(&self) -> u64 {
        self.busy_fragmentation
            + self.busy_foreign_owner
            + self.busy_page_locked
            + self.busy_evict_incomplete
            + self.busy_cpu_access
    }
}

/// The device memory of one pagemap.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PagemapStats {
    /// The pagemap's id.
    pub pagemap: u8,
    /// Its device's id.
    pub device: u32,
    /// Its name.
    pub name: String,
    /// Bytes of its device memory the address space's allocations hold (reserved,
    /// migrating, live, or waiting for a late fence before release).
    pub used_bytes: u64,
    /// Allocations of it that exist.
    pub allocations: u64,
    /// Its device memory's capacity, in bytes.
    pub capacity_bytes: u64,
}

/// A snapshot of an address space's statistics ([`AddressSpace::stats`]). Counters are
/// since the address space was made or since [`AddressSpace::reset_stats`]; gauges
/// (`*_in_flight`, `host_*`, [`PagemapStats`]) are now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StatsSnapshot {
    /// Copies per link with any traffic, sources then destinations in order (system first).
    pub links: Vec<LinkStats>,
    /// Copies per page size with any traffic, smallest first.
    pub page_sizes: Vec<PageSizeStats>,
    /// Copy calls by size: buckets of bytes per call.
    pub call_bytes: Histogram,
    /// Migrations to device memory by latency: buckets of nanoseconds. The latency is the
    /// sum of the migration's [`crate::MigrateTiming`] phases (plan, allocate, map, issue,
    /// wait, commit).
    pub migrate_latency_ns: Histogram,
    /// Migrations to device memory that moved pages.
    pub migrations: u64,
    /// Migrations that found every page in place already.
    pub migrations_not_needed: u64,
    /// Copy calls submitted and not yet seen done (gauge).
    pub copies_in_flight: u64,
    /// Bytes of those calls (gauge).
    pub bytes_in_flight: u64,
    /// The device memory of every pagemap of the address space, by id (gauge).
    pub pagemaps: Vec<PagemapStats>,
    /// Host frames the engine allocated for the address space and holds (gauge).
    pub host_frames_in_use: u64,
    /// Bytes of those frames (gauge).
    pub host_bytes_in_use: u64,
    /// The host memory's capacity, in bytes.
    pub host_capacity_bytes: u64,
    /// Failed operations by kind.
    pub failures: Failures,
    /// Evictions ([`AddressSpace::evict_to_ram`]) that succeeded.
    pub evictions: u64,
    /// Pages those evictions moved back.
    pub evicted_pages: u64,
    /// Passes of the CPU-fault path (a CPU access to device pages) that moved pages.
    pub cpu_faults: u64,
    /// Pages the CPU-fault path moved back.
    pub cpu_fault_pages: u64,
    /// Times a CPU access waited for an allocation's timeslice.
    pub timeslice_waits: u64,
}

impl StatsSnapshot {
    /// The link from `from` to `to` (zeros when it carried nothing).
    pub fn link(&self, from: Location, to: Location) -> LinkStats {
        self.links
            .iter()
            .find(|l| l.from == from && l.to == to)
            .copied()
            .unwrap_or(LinkStats {
                from,
                to,
                bytes: 0,
                pages: 0,
                calls: 0,
                device_time_ns: 0,
            })
    }

    /// The statistics of pages of `ps` (zeros when none moved).
    pub fn page_size(&self, ps: PageSize) -> PageSizeStats {
        self.page_sizes
            .iter()
            .find(|s| s.page_size == ps.bytes())
            .copied()
            .unwrap_or(PageSizeStats {
                page_size: ps.bytes(),
                bytes: 0,
                pages: 0,
                calls: 0,
            })
    }

    /// The device memory of `pagemap`, if the address space has it.
    pub fn pagemap(&self, pagemap: PagemapId) -> Option<&PagemapStats> {
        self.pagemaps.iter().find(|p| p.pagemap == pagemap.0)
    }
}

fn gauge(a: &AtomicI64) -> u64 {
    a.load(Relaxed).max(0) as u64
}

impl AddressSpace {
    /// A snapshot of the address space's statistics (see [`crate::stats`]'s docs: what each
    /// number counts, its unit, the bound on pagemaps). Cheap enough to call often; takes the
    /// address space's lock once, briefly.
    pub fn stats(&self) -> StatsSnapshot {
        let c = &self.stats;
        let mut links = Vec::new();
        let mut page_sizes: Vec<PageSizeStats> = SIZES
            .iter()
            .map(|ps| PageSizeStats {
                page_size: ps.bytes(),
                bytes: 0,
                pages: 0,
                calls: 0,
            })
            .collect();
        let (mut all_calls, mut all_bytes) = (0u64, 0u64);
        for (i, l) in c.links.iter().enumerate() {
            let mut link = LinkStats {
                from: Location::from_index(i / LOCATIONS),
                to: Location::from_index(i % LOCATIONS),
                bytes: 0,
                pages: 0,
                calls: 0,
                device_time_ns: l.device_ns.load(Relaxed),
            };
            for ((s, ps), sum) in l.sizes.iter().zip(SIZES).zip(page_sizes.iter_mut()) {
                let calls = s.calls.load(Relaxed);
                let pages = s.pages.load(Relaxed);
                let bytes = pages.saturating_mul(ps.bytes());
                link.calls += calls;
                link.pages += pages;
                link.bytes = link.bytes.saturating_add(bytes);
                sum.calls += calls;
                sum.pages += pages;
                sum.bytes = sum.bytes.saturating_add(bytes);
            }
            all_calls += link.calls;
            all_bytes = all_bytes.saturating_add(link.bytes);
            if link.calls != 0 || link.bytes != 0 || link.device_time_ns != 0 {
                links.push(link);
            }
        }
        page_sizes.retain(|s| s.calls > 0);
        let in_flight = |submitted: u64, landed: &AtomicI64| {
            (submitted as i64)
                .saturating_sub(landed.load(Relaxed))
                .max(0) as u64
        };
        let (host_frames, host_bytes) = c
            .host_frames
            .iter()
            .zip(SIZES)
            .map(|(n, ps)| {
                let n = gauge(n);
                (n, n.saturating_mul(ps.bytes()))
            })
            .fold((0u64, 0u64), |a, b| (a.0 + b.0, a.1.saturating_add(b.1)));
        let migrate_latency_ns = Histogram::of(&c.migrate_ns);
        let b = |r| c.busy[busy_index(r)].load(Relaxed);
        let failures = Failures {
            busy_fragmentation: b(BusyReason::Fragmentation),
            busy_foreign_owner: b(BusyReason::ForeignOwner),
            busy_page_locked: b(BusyReason::PageLocked),
            busy_evict_incomplete: b(BusyReason::EvictIncomplete),
            busy_cpu_access: b(BusyReason::CpuAccess),
            out_of_memory: c.out_of_memory.load(Relaxed),
            fence_error: c.fence_error.load(Relaxed),
            timeout: c.timeout.load(Relaxed),
            injected: c.injected.load(Relaxed),
            backend: c.backend.load(Relaxed),
            other: c.other.load(Relaxed),
        };
        let usage = self.lock().allocs.usage_by_pagemap();
        let pagemaps = self
            .pagemaps()
            .into_iter()
            .map(|pm| {
                let (used_bytes, allocations) = usage
                    .iter()
                    .find(|u| u.0 == pm.id())
                    .map_or((0, 0), |u| (u.1, u.2));
                PagemapStats {
                    pagemap: pm.id().0,
                    device: pm.device().0,
                    name: pm.name().to_string(),
                    used_bytes,
                    allocations,
                    capacity_bytes: pm.devmem().capacity_bytes(),
                }
            })
            .collect();
        StatsSnapshot {
            links,
            page_sizes,
            call_bytes: Histogram::of(&c.call_bytes),
            migrations: migrate_latency_ns.count(),
            migrate_latency_ns,
            migrations_not_needed: c.not_needed.load(Relaxed),
            copies_in_flight: in_flight(all_calls, &c.landed_calls),
            bytes_in_flight: in_flight(all_bytes, &c.landed_bytes),
            pagemaps,
            host_frames_in_use: host_frames,
            host_bytes_in_use: host_bytes,
            host_capacity_bytes: self.host.capacity_bytes(),
            failures,
            evictions: c.evictions.load(Relaxed),
            evicted_pages: c.evicted_pages.load(Relaxed),
            cpu_faults: c.cpu_faults.load(Relaxed),
            cpu_fault_pages: c.cpu_fault_pages.load(Relaxed),
            timeslice_waits: c.timeslice_waits.load(Relaxed),
        }
    }

    /// Zeroes every counter of [`AddressSpace::stats`]; the gauges (in flight, memory in
    /// use) describe the present and stay. Concurrent operations may land a count either
    /// side of the reset.
    pub fn reset_stats(&self) {
        self.stats.reset();
    }

    /// Counts a failed public operation (see [`FailureKind::of`]) and hands it back.
    #[cold]
    pub(crate) fn count_failure(&self, e: Error) -> Error {
        self.stats.failed(&e);
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_floor_log2() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(1), 0);
        assert_eq!(bucket_of(2), 1);
        assert_eq!(bucket_of(4095), 11);
        assert_eq!(bucket_of(4096), 12);
        assert_eq!(bucket_of(u64::MAX), 63);
    }

    #[test]
    fn locations_round_trip_and_overflow() {
        for i in 0..LOCATIONS {
            assert_eq!(Location::from_index(i).index(), i);
        }
        assert_eq!(Location::of(PagemapId(3)), Location::Pagemap(3));
        assert_eq!(Location::of(PagemapId(200)), Location::OtherPagemaps);
        let l = Link::new(Location::of(PagemapId(255)), Location::System);
        assert!((l.0 as usize) < LOCATIONS * LOCATIONS);
    }

    #[test]
    fn quantiles_of_a_histogram() {
        let mut h = Histogram {
            buckets: vec![0; HISTOGRAM_BUCKETS],
        };
        assert_eq!(h.quantile_floor(0.5), None);
        h.buckets[10] = 9;
        h.buckets[20] = 1;
        assert_eq!(h.quantile_floor(0.5), Some(1024));
        assert_eq!(h.quantile_floor(1.0), Some(1 << 20));
    }
}
