//! The buffers a transaction works in ([`Scratch`]), and where they are kept between
//! transactions.
//!
//! - **The thread's**: buffers of at most [`THREAD_KEEP`] entries each stay with the thread
//!   that used them, so a small transaction (a GPU fault's) makes no heap allocation of its
//!   own.
//! - **The address space's** ([`AddressSpace::keep_buffers`]): one set of buffers sized for
//!   a range the caller names, made and written once (their memory resident) when it asks,
//!   and reused by the large migrations that follow (and the copies back to RAM of the
//!   allocations they fit). Without it, the buffers of a large
//!   migration (about 40 bytes per page: 10 MiB for a 1 GiB range of 4 KiB pages)
//!   are allocated fresh each time, and writing fresh memory costs a page fault per 4 KiB
//!   (1.7 us on the GPU machine) before the first copy starts.
//!
//! Taking and giving back buffers never blocks: the address space's set is taken only when
//! free (another large migration running at the time uses fresh buffers).

use crate::error::{Error, Result};
use crate::host_info::available_memory;
use crate::mapping::Mappings;
use crate::mm::AddressSpace;
use crate::page::{PageEntry, RmapEntry};
use crate::plan::Plan;
use crate::txn::Issued;
use crate::types::{DmaAddr, HostFrame, Pfn, VaRange};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A transaction's buffers, emptied between transactions (see the module docs).
#[derive(Default)]
pub(crate) struct Scratch {
    /// A migration's snapshot of its pages.
    pub snapshot: Vec<PageEntry>,
    /// A migration's source pfns (of device pages).
    pub src_pfns: Vec<Pfn>,
    /// A migration's copy calls.
    pub plan: Plan,
    /// The pages each copy call reads or writes, in call order.
    pub pages: Vec<Pfn>,
    /// Frames to map (a migration), or to free (its commit).
    pub frames: Vec<HostFrame>,
    /// Pfns to map.
    pub pfns: Vec<Pfn>,
    /// The pages a copy back to RAM took: (index in the allocation, where it is mapped).
    pub picked: Vec<(u32, RmapEntry)>,
    /// The transaction's mappings.
    pub maps: Mappings,
    /// The transaction's copies.
    pub copies: Vec<Issued>,
    /// The transaction's new system frames (a copy back to RAM).
    pub new_frames: Vec<HostFrame>,
    /// The frames the pages of a copy back to RAM ask for (their ranges' home extents;
    /// empty when none has one).
    pub wishes: Vec<HostFrame>,
}

/// Buffers of more entries than this do not stay with a thread (a huge transaction would pin
/// its memory); [`AddressSpace::keep_buffers`] keeps larger ones where the caller asks.
const THREAD_KEEP: usize = 1 << 14;

/// Bytes per page of [`Scratch::prepared`]'s buffers (40 today: see there).
const PREPARED_BYTES_PER_PAGE: u64 = (size_of::<PageEntry>()
    + 3 * size_of::<Pfn>()
    + size_of::<u32>()
    + size_of::<HostFrame>()
    + size_of::<DmaAddr>()) as u64;

/// What a transaction moves, to size its buffers by.
#[derive(Clone, Copy)]
pub(crate) enum ScratchFor {
    /// The pages of a range (a migration to device memory).
    Range(VaRange),
    /// The pages of an allocation (the way back to RAM).
    Alloc(crate::AllocId),
}

/// Copy fences a kept set of buffers may have room for (one per copy call issued).
const COPIES_KEEP: usize = 1024;

thread_local! {
    static THREAD: std::cell::Cell<Option<Box<Scratch>>> = const { std::cell::Cell::new(None) };
}

impl Scratch {
    /// The most entries any of the page-sized buffers has room for.
    fn largest(&self) -> usize {
        [
            self.snapshot.capacity(),
            self.src_pfns.capacity(),
            self.plan.order.capacity(),
            self.pages.capacity(),
            self.frames.capacity(),
            self.pfns.capacity(),
            self.picked.capacity(),
            self.maps.addrs.capacity(),
            self.maps.records.capacity(),
            self.new_frames.capacity(),
            self.wishes.capacity(),
        ]
        .into_iter()
        .max()
        .unwrap_or(0)
    }

    /// Bytes the buffers hold.
    fn bytes(&self) -> usize {
        fn b<T>(v: &Vec<T>) -> usize {
            v.capacity() * size_of::<T>()
        }
        b(&self.snapshot)
            + b(&self.src_pfns)
            + b(&self.plan.order)
            + b(&self.plan.calls)
            + b(&self.pages)
            + b(&self.frames)
            + b(&self.pfns)
            + b(&self.picked)
            + b(&self.maps.addrs)
            + b(&self.maps.records)
            + b(&self.copies)
            + b(&self.new_frames)
            + b(&self.wishes)
    }

    /// Empties every buffer (dropping the fences), keeping the capacity.
    fn clear(&mut self) {
        self.snapshot.clear();
        self.src_pfns.clear();
        self.plan.calls.clear();
        self.plan.order.clear();
        self.pages.clear();
        self.frames.clear();
        self.pfns.clear();
        self.picked.clear();
        self.maps.addrs.clear();
        self.maps.records.clear();
        self.copies.clear();
        self.new_frames.clear();
        self.wishes.clear();
    }

    /// Buffers for a migration to device memory of `pages` pages, written once so that their
    /// memory is resident. `None`: the memory could not be had.
    fn prepared(pages: usize) -> Option<Box<Scratch>> {
        fn fill<T: Copy>(v: &mut Vec<T>, n: usize, value: T) -> Option<()> {
            v.try_reserve_exact(n).ok()?;
            v.resize(n, value);
            v.clear();
            Some(())
        }
        let mut sc = Box::<Scratch>::default();
        fill(&mut sc.snapshot, pages, PageEntry::HOLE)?;
        fill(&mut sc.src_pfns, pages, Pfn(0))?;
        fill(&mut sc.plan.order, pages, 0)?;
        fill(&mut sc.pages, pages, Pfn(0))?;
        fill(&mut sc.frames, pages, HostFrame(0))?;
        fill(&mut sc.pfns, pages, Pfn(0))?;
        fill(&mut sc.maps.addrs, pages, DmaAddr::NONE)?;
        Some(sc)
    }

    /// The thread's buffers (fresh ones if another transaction of this thread holds them).
    fn take_thread() -> Box<Scratch> {
        THREAD.with(|c| c.take()).unwrap_or_default()
    }
}

/// The buffers an address space keeps for its large migrations (see
/// [`AddressSpace::keep_buffers`]).
#[derive(Default)]
pub(crate) struct KeptBuffers {
    /// Pages the kept buffers are sized for (0: none kept). Buffers that grew past it are not
    /// kept.
    pages: AtomicUsize,
    /// The buffers, while no transaction uses them.
    free: Mutex<Option<Box<Scratch>>>,
}

impl KeptBuffers {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Box<Scratch>>> {
        self.free.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What an address space keeps for its large migrations (see [`AddressSpace::keep_buffers`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeptBufferInfo {
    /// The most pages a migration may move in the kept buffers (0: none kept).
    pub pages: usize,
    /// Bytes they hold, when no migration is using them (0 while one is).
    pub bytes: usize,
}

impl AddressSpace {
    /// Buffers for a transaction of `size`: the address space's kept set when it moves more
    /// pages than the thread keeps buffers for, no more than the set was made for, and the
    /// set is free; else the thread's.
    pub(crate) fn take_scratch(&self, size: ScratchFor) -> Box<Scratch> {
        let kept = self.kept.pages.load(Ordering::Relaxed);
        let large = |pages: usize| pages > THREAD_KEEP && pages <= kept;
        let fits = kept > 0
            && match size {
                // A 4 KiB page is the smallest: fewer bytes than this many pages is a small
                // range whatever its page size (and needs no look-up).
                ScratchFor::Range(range) => {
                    range.len / crate::PageSize::Size4K.bytes() > THREAD_KEEP as u64
                        && self
                            .lock()
                            .locate(range, true)
                            .is_ok_and(|s| large(s.count))
                }
                ScratchFor::Alloc(alloc) => self
                    .lock()
                    .allocs
                    .get(alloc)
                    .is_some_and(|rec| large(rec.pfns.len())),
            };
        if fits && let Some(sc) = self.kept.lock().take() {
            return sc;
        }
        Scratch::take_thread()
    }

    /// Empties `sc` and keeps it: with the thread when small, as the address space's set
    /// when it fits what [`AddressSpace::keep_buffers`] asked for and the set is free;
    /// otherwise its memory is freed.
    pub(crate) fn put_scratch(&self, mut sc: Box<Scratch>) {
        let largest = sc.largest();
        if sc.copies.capacity() > COPIES_KEEP {
            return;
        }
        if largest <= THREAD_KEEP {
            sc.clear();
            THREAD.with(|c| c.set(Some(sc)));
            return;
        }
        if largest > self.kept.pages.load(Ordering::Relaxed) {
            return;
        }
        sc.clear();
        let mut free = self.kept.lock();
        // Checked again under the lock: `release_buffers` may have run meanwhile.
        if free.is_none() && largest <= self.kept.pages.load(Ordering::Relaxed) {
            *free = Some(sc);
        }
    }

    /// Keeps, between migrations, buffers for migrating every page of `range` at once (a
    /// range of this address space, or a part of one), and makes them now, writing them once
    /// so that their memory is resident: the large migrations that follow start their copies
    /// without first faulting in fresh memory. About 40 bytes per page (10 MiB for a 1 GiB
    /// range of 4 KiB pages), held until [`AddressSpace::release_buffers`] or until the
    /// address space drops. Replaces what an earlier call kept.
    ///
    /// The way back to RAM (eviction, a CPU fault) of an allocation of up to that many pages
    /// works in them too; its own buffers (about 24 bytes per page more) join the set the
    /// first time and stay.
    ///
    /// One set is kept: concurrent large migrations beyond the first use fresh buffers, as
    /// do migrations larger than `range` (their buffers are then not kept). Small
    /// migrations (up to 16,384 pages) use the calling thread's buffers either way.
    ///
    /// # Errors
    /// [`Error::BadRange`] when `range` is not (a page-aligned part of) a range of this
    /// address space (what an earlier call kept stays); [`Error::OutOfMemory`] when the
    /// buffers cannot be allocated, or would take more than half the memory the system has
    /// available ([`crate::available_memory`]): nothing is kept then (what an earlier call
    /// kept was released first).
    pub fn keep_buffers(&self, range: VaRange) -> Result<KeptBufferInfo> {
        let pages = self.lock().locate(range, true)?.count;
        // The earlier set goes first (its memory is not held twice).
        self.release_buffers();
        let bytes = (pages as u64).saturating_mul(PREPARED_BYTES_PER_PAGE);
        let oom = Error::OutOfMemory {
            range,
            what: "the kept migration buffers",
            bytes,
        };
        // Writing more than the system has would end in the OOM killer, not in an error.
        if available_memory().is_some_and(|a| bytes > a / 2) {
            return Err(oom);
        }
        let sc = Scratch::prepared(pages).ok_or(oom)?;
        let bytes = sc.bytes();
        let mut free = self.kept.lock();
        self.kept.pages.store(pages, Ordering::Relaxed);
        *free = Some(sc);
        Ok(KeptBufferInfo { pages, bytes })
    }

    /// Frees the buffers [`AddressSpace::keep_buffers`] kept (buffers a migration is using
    /// at the time are freed when it ends). Returns the bytes freed now.
    pub fn release_buffers(&self) -> usize {
        let mut free = self.kept.lock();
        self.kept.pages.store(0, Ordering::Relaxed);
        free.take().map_or(0, |sc| sc.bytes())
    }

    /// What [`AddressSpace::keep_buffers`] keeps now.
    pub fn kept_buffers(&self) -> KeptBufferInfo {
        let free = self.kept.lock();
        KeptBufferInfo {
            pages: self.kept.pages.load(Ordering::Relaxed),
            bytes: free.as_ref().map_or(0, |sc| sc.bytes()),
        }
    }
}
