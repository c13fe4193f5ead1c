//! [`PointerSpace`]: the pointer ranges of one address space, their userfaultfd and how one
//! of its faults is served (by the process's fault handler, `handler`); [`PointerRange`]:
//! one range, whose address is the pointer the application uses.

use crate::error::UffdError;
use crate::handler::{self, FaultServer};
use crate::limits::{MapLimits, mappings_in_use};
use crate::memfd::FrameFile;
use crate::sys;
use drm_pagemap_core::{AddressSpace, CpuMappings, GRANULE, HostFrame, PageSize, VaRange};
use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

/// How a [`PointerSpace`] is made.
#[derive(Clone, Debug, Default)]
pub struct UffdConfig {
    /// The map-count check (see [`crate::limits`]).
    pub limits: MapLimits,
    /// How long a fault the engine cannot serve is retried before the faulting thread gets
    /// SIGBUS (a page whose range was freed in the engine gets it at once). `None`: one
    /// second.
    pub fault_retry: Option<Duration>,
    /// Map every range page by page, as on a host memory that does not place frames (no
    /// home extent): the map-count check then counts one mapping per page. For tests and
    /// comparisons; `false` (the default) asks the host memory for a home extent.
    pub scattered: bool,
    /// Test hook: make opening the userfaultfd fail with this `errno` (as a kernel without
    /// it, or a seccomp filter, would), so the typed error can be tested on a machine that
    /// has it.
    pub inject_open_errno: Option<i32>,
}

/// A page's frame in the range's mapping: none yet (the range's empty file is mapped).
const NO_FRAME: u64 = u64::MAX;
/// The frame was mapped but registering it failed: map it again on the next fault.
const UNREGISTERED: u64 = u64::MAX - 1;
/// Mappings a range with a home extent reserves in the map-count check: itself, the pieces
/// a page mapped elsewhere splits it into, and a few such pages (see the crate doc).
const HOMED_MAPS: u64 = 16;

/// One range's mapping state.
#[derive(Debug)]
pub(crate) struct RangeState {
    start: u64,
    len: u64,
    page_bytes: u64,
    /// The first frame of the range's home extent: the range is one mapping of the frame
    /// file from there ([`PointerRange::coalesced`]).
    home: Option<HostFrame>,
    /// Mappings reserved for it in the map-count check.
    maps: u64,
    /// Without a home: an empty memfd mapped where a page has no frame mapped yet (a first
    /// access is a missing fault).
    _hole: Option<OwnedFd>,
    inner: Mutex<RangeInner>,
}

#[derive(Debug)]
struct RangeInner {
    /// The memfd frame each page's mapping shows ([`NO_FRAME`]: the hole file; a page of a
    /// range with a home starts with its home frame).
    frames: Vec<u64>,
    /// Freed: faults are not served any more.
    dead: bool,
}

impl RangeState {
    fn lock(&self) -> MutexGuard<'_, RangeInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub(crate) type Ranges = Arc<RwLock<BTreeMap<u64, Arc<RangeState>>>>;

fn find(ranges: &Ranges, addr: u64) -> Option<Arc<RangeState>> {
    let map = ranges.read().unwrap_or_else(|p| p.into_inner());
    map.range(..=addr)
        .next_back()
        .filter(|(_, r)| addr < r.start + r.len)
        .map(|(_, r)| r.clone())
}

/// The hook the engine calls before a migration copies pages: drops their page-table
/// entries in the range's mapping (the data stays in the memfd's page cache), so the next
/// CPU access is a minor fault the handler serves once the migration is over.
pub(crate) struct TakeOut {
    pub(crate) ranges: Ranges,
}

impl CpuMappings for TakeOut {
    fn take_out(&self, range: VaRange) {
        // Held while zapping, so a range being freed is not unmapped meanwhile.
        let map = self.ranges.read().unwrap_or_else(|p| p.into_inner());
        if let Some((_, r)) = map
            .range(..=range.start)
            .next_back()
            .filter(|(_, r)| range.start < r.start + r.len)
        {
            let end = range.end().min(r.start + r.len);
            // Cannot fail on a mapping of ours; if it did, the pages would stay mapped.
            let _ = sys::zap(range.start, end - range.start);
        }
    }
}

/// Counters of the fault handler.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultStats {
    /// Faults served (the access completed).
    pub served: u64,
    /// Attempts that failed and were retried (the engine or a mapping call failed).
    pub errors: u64,
    /// Faults given up on: the faulting thread got SIGBUS.
    pub sigbus: u64,
}

struct Shared {
    mm: Arc<AddressSpace>,
    mem: Arc<dyn FrameFile>,
    ranges: Ranges,
    config: UffdConfig,
    /// Mappings the live ranges may need at worst (one per page, plus the pieces around).
    reserved_maps: AtomicU64,
    stop: AtomicBool,
    user_mode_only: AtomicBool,
    served: AtomicU64,
    errors: AtomicU64,
    sigbus: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// A space's userfaultfd as the process's fault handler serves it.
struct Faults {
    shared: Arc<Shared>,
    uffd: OwnedFd,
}

impl FaultServer for Faults {
    fn uffd(&self) -> BorrowedFd<'_> {
        self.uffd.as_fd()
    }

    fn serve(&self, addr: u64, tid: i32) {
        serve(&self.shared, &self.uffd, addr, tid)
    }

    fn abandon(&self, addr: u64, tid: i32, why: String) {
        note_error(
            &self.shared,
            format!("fault at {addr:#x}: serving it panicked: {why}"),
        );
        give_up(&self.shared, &self.uffd, addr, tid);
    }
}

/// The pointer ranges of one [`AddressSpace`] whose system memory is a [`FrameFile`] such as
/// [`crate::MemfdMemory`] (the
/// host memory of the backend the address space uses: the simulated backend with
/// `SimConfig::host_bytes` set to the same memory). One per address space.
///
/// The space's userfaultfd is made with its first range (so an unavailable userfaultfd is
/// the typed error of [`PointerSpace::create_range`]) and handed to the process's one fault
/// handler (see the crate doc), which serves every space; it is closed when the space is
/// dropped (every range holds it), and the handler's threads end with the last space.
pub struct PointerSpace {
    shared: Arc<Shared>,
    /// The userfaultfd and its place in the process's fault handler, from the first range.
    faults: Mutex<Option<(Arc<Faults>, handler::Attached)>>,
}

impl std::fmt::Debug for PointerSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PointerSpace").finish_non_exhaustive()
    }
}

impl PointerSpace {
    /// Attaches to `mm`, whose host memory must be `mem`'s frames (a range maps the frames
    /// the engine gives its pages from `mem`'s file).
    ///
    /// One space per address space: while a space of `mm` lives, this fails with
    /// [`UffdError::AlreadyAttached`] (the live one is [`PointerSpace::attached`]); once it is
    /// dropped, a new one may attach. A second space is refused rather than handed the first
    /// one's ranges because it may name other memory and another configuration. It also fails
    /// with that error when `mm` has a CPU mapping layer that is not a space of this crate.
    pub fn new(
        mm: Arc<AddressSpace>,
        mem: Arc<dyn FrameFile>,
        config: UffdConfig,
    ) -> Result<Arc<PointerSpace>, UffdError> {
        let mut table = crate::attach::lock();
        let ranges = crate::attach::claim(&mut table, &mm)?;
        let space = Arc::new(PointerSpace {
            shared: Arc::new(Shared {
                mm: mm.clone(),
                mem,
                ranges,
                config,
                reserved_maps: AtomicU64::new(0),
                stop: AtomicBool::new(false),
                user_mode_only: AtomicBool::new(false),
                served: AtomicU64::new(0),
                errors: AtomicU64::new(0),
                sigbus: AtomicU64::new(0),
                last_error: Mutex::new(None),
            }),
            faults: Mutex::new(None),
        });
        crate::attach::settle(&mut table, &mm, Arc::downgrade(&space));
        Ok(space)
    }

    /// The live space of `mm`, if it has one.
    pub fn attached(mm: &Arc<AddressSpace>) -> Option<Arc<PointerSpace>> {
        crate::attach::live(&crate::attach::lock(), mm)
    }

    /// The address space.
    pub fn address_space(&self) -> &Arc<AddressSpace> {
        &self.shared.mm
    }

    /// The handler's counters.
    pub fn fault_stats(&self) -> FaultStats {
        FaultStats {
            served: self.shared.served.load(Ordering::Relaxed),
            errors: self.shared.errors.load(Ordering::Relaxed),
            sigbus: self.shared.sigbus.load(Ordering::Relaxed),
        }
    }

    /// Whether the userfaultfd reports user-mode faults only (an unprivileged process with
    /// `vm.unprivileged_userfaultfd=0`): a system call writing into an unmapped page of a
    /// pointer range then fails with `EFAULT` instead of waiting for the page.
    pub fn user_mode_only(&self) -> bool {
        self.shared.user_mode_only.load(Ordering::Relaxed)
    }

    /// The last error the handler retried after, if any.
    pub fn last_fault_error(&self) -> Option<String> {
        self.shared
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Live ranges.
    pub fn range_count(&self) -> usize {
        self.shared
            .ranges
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// The space's userfaultfd, opened (and handed to the process's fault handler) on first
    /// use.
    fn faults(&self) -> Result<Arc<Faults>, UffdError> {
        let mut f = self.faults.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((faults, _)) = &*f {
            return Ok(faults.clone());
        }
        let open = |source| UffdError::Unavailable {
            step: "open",
            source,
        };
        let (uffd, user_mode_only) = match self.shared.config.inject_open_errno {
            Some(errno) => return Err(open(io::Error::from_raw_os_error(errno))),
            None => sys::userfaultfd().map_err(open)?,
        };
        self.shared
            .user_mode_only
            .store(user_mode_only, Ordering::Relaxed);
        let want = sys::FEATURE_MISSING_SHMEM | sys::FEATURE_MINOR_SHMEM | sys::FEATURE_THREAD_ID;
        let features =
            sys::uffd_api(uffd.as_fd(), want).map_err(|source| UffdError::Unavailable {
                step: "UFFDIO_API",
                source,
            })?;
        if features & want != want {
            return Err(UffdError::MissingFeature {
                missing: if features & sys::FEATURE_MINOR_SHMEM == 0 {
                    "UFFD_FEATURE_MINOR_SHMEM"
                } else if features & sys::FEATURE_MISSING_SHMEM == 0 {
                    "UFFD_FEATURE_MISSING_SHMEM"
                } else {
                    "UFFD_FEATURE_THREAD_ID"
                },
                features,
            });
        }
        let faults = Arc::new(Faults {
            shared: self.shared.clone(),
            uffd,
        });
        let attached =
            handler::attach(faults.clone()).map_err(|source| UffdError::Unavailable {
                step: "fault handler",
                source,
            })?;
        *f = Some((faults.clone(), attached));
        Ok(faults)
    }

    /// Creates a range of `len` bytes (a multiple of `page_size`) that is memory of this
    /// process: its address ([`PointerRange::as_ptr`]) is also its address in the engine,
    /// aligned to its page size, and to 2 MiB when it is 2 MiB or longer.
    /// Every page starts unpopulated (a first access reads zeros).
    ///
    /// Errors: [`UffdError::Unavailable`] / [`UffdError::MissingFeature`] (no usable
    /// userfaultfd), [`UffdError::MapCountLimit`] (the range could fragment past
    /// `vm.max_map_count`), [`UffdError::BadRange`], [`UffdError::Map`],
    /// [`UffdError::Engine`]. Nothing is left behind on error.
    pub fn create_range(
        self: &Arc<Self>,
        len: u64,
        page_size: PageSize,
    ) -> Result<PointerRange, UffdError> {
        let ps = page_size.bytes();
        let bad = |problem| UffdError::BadRange {
            len,
            page_size: ps,
            problem,
        };
        if len == 0 {
            return Err(bad("empty"));
        }
        if !len.is_multiple_of(ps) {
            return Err(bad("not a multiple of the page size"));
        }
        if len > (1 << 46) {
            return Err(bad("larger than 64 TiB"));
        }
        let faults = self.faults()?;
        let uffd = &faults.uffd;
        let pages = len / ps;
        let mut frames = Vec::new();
        if frames.try_reserve_exact(pages as usize).is_err() {
            return Err(bad("too many pages for the mapping state's memory"));
        }
        // A home extent of the frame file: page i always comes home to frame home + i, so
        // the range is one mapping of the file. Where the host memory does not place frames
        // (or has no room), pages map their frames one by one.
        let host = self.shared.mm.host();
        let home = if self.shared.config.scattered {
            None
        } else {
            host.reserve_home(page_size, pages)
        };
        let unhome = || {
            if let Some(h) = home {
                host.release_home(h, page_size, pages)
            }
        };
        // Worst case: one mapping per page (plus the pieces around); with a home, the range
        // and a few pages whose home frame was still held (a late copy's) when they came
        // back.
        let need = if home.is_some() {
            HOMED_MAPS
        } else {
            pages + 2
        };
        let limits = self.shared.config.limits;
        let limit = limits.limit();
        let in_use = mappings_in_use();
        let reserved = self.shared.reserved_maps.load(Ordering::Relaxed);
        if in_use + reserved + need + limits.headroom > limit {
            unhome();
            return Err(UffdError::MapCountLimit {
                pages,
                in_use,
                reserved,
                limit,
                headroom: limits.headroom,
            });
        }
        let map_err = |op| move |source| UffdError::Map { op, len, source };
        let hole = match home {
            Some(_) => None,
            None => Some(
                sys::memfd(c"drm-pagemap-range", len)
                    .map_err(map_err("memfd_create"))
                    .inspect_err(|_| unhome())?,
            ),
        };
        // A range of 2 MiB or more starts on a 2 MiB boundary (as the kernel aligns large
        // anonymous mappings), so 2 MiB chunks of it (the SVM layer's) line up.
        let align = if len >= 2 << 20 {
            2 << 20
        } else {
            ps.max(GRANULE)
        };
        let start = sys::reserve(len, align.max(ps))
            .map_err(map_err("mmap (reserve)"))
            .inspect_err(|_| unhome())?;
        let undo = |e| {
            sys::munmap(start, len);
            unhome();
            e
        };
        let (fd, offset) = match (&hole, home) {
            (Some(hole), _) => (hole.as_fd(), 0),
            (None, Some(h)) => (self.shared.mem.frame_fd(), h.0 * GRANULE),
            (None, None) => unreachable!("a range without a home has a hole file"),
        };
        // SAFETY: [start, start + len) was just reserved by `sys::reserve` for this range.
        unsafe { sys::map_fixed(start, len, fd, offset) }
            .map_err(map_err("mmap (range)"))
            .map_err(undo)?;
        // Not inherited by a child process (see the crate doc's "fork").
        sys::dont_fork(start, len)
            .map_err(map_err("madvise (MADV_DONTFORK)"))
            .map_err(undo)?;
        sys::uffd_register(uffd.as_fd(), start, len)
            .map_err(map_err("UFFDIO_REGISTER"))
            .map_err(undo)?;
        let va = VaRange::new(start, len);
        match home {
            Some(h) => self.shared.mm.create_range_homed(va, page_size, h),
            None => self.shared.mm.create_range(va, page_size),
        }
        .map_err(|source| UffdError::Engine { range: va, source })
        .map_err(undo)?;
        match home {
            Some(h) => frames.extend((0..pages).map(|i| h.0 + i * page_size.granules())),
            None => frames.resize(pages as usize, NO_FRAME),
        }
        let state = Arc::new(RangeState {
            start,
            len,
            page_bytes: ps,
            home,
            maps: need,
            _hole: hole,
            inner: Mutex::new(RangeInner {
                frames,
                dead: false,
            }),
        });
        self.shared.reserved_maps.fetch_add(need, Ordering::Relaxed);
        self.shared
            .ranges
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(start, state.clone());
        Ok(PointerRange {
            space: self.clone(),
            state,
            page_size,
            freed: false,
        })
    }
}

impl Drop for PointerSpace {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        let f = self.faults.lock().unwrap_or_else(|p| p.into_inner()).take();
        // Detaching waits for this space's faults in service; the last space ends the
        // handler's threads. The userfaultfd closes with the last `Faults`.
        if let Some((faults, attached)) = f {
            drop(attached);
            drop(faults);
        }
    }
}

/// The fault of thread `tid` at `addr` cannot be served: the thread gets SIGBUS.
fn give_up(shared: &Shared, uffd: &OwnedFd, addr: u64, tid: i32) {
    shared.sigbus.fetch_add(1, Ordering::Relaxed);
    if sys::sigbus(tid).is_err() {
        // The thread is gone: nothing waits.
        return;
    }
    // The signal interrupts the wait; wake it too in case it is already past it.
    let _ = sys::uffd_wake(uffd.as_fd(), addr & !(GRANULE - 1), GRANULE);
}

fn note_error(shared: &Shared, e: String) {
    shared.errors.fetch_add(1, Ordering::Relaxed);
    *shared.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
}

/// Serves one fault at `addr`: the engine makes the page a system page (bringing it home or
/// populating it) and, with the page held still, the range's mapping of it is pointed at its
/// frame and the page mapped; the faulting thread then resumes. A failure cannot be returned
/// to the faulting thread: it is retried for [`UffdConfig::fault_retry`], then (or at once
/// when the engine no longer has the range) the thread gets SIGBUS, as the kernel's
/// `migrate_to_ram` failing does.
fn serve(shared: &Shared, uffd: &OwnedFd, addr: u64, tid: i32) {
    let Some(r) = find(&shared.ranges, addr) else {
        // Not a live range (freed meanwhile): let the thread retry.
        let _ = sys::uffd_wake(uffd.as_fd(), addr & !(GRANULE - 1), GRANULE);
        return;
    };
    let deadline =
        std::time::Instant::now() + shared.config.fault_retry.unwrap_or(Duration::from_secs(1));
    loop {
        let mut inner = r.lock();
        if inner.dead || shared.stop.load(Ordering::Acquire) {
            let _ = sys::uffd_wake(uffd.as_fd(), r.start, r.len);
            return;
        }
        let result = shared.mm.with_cpu_page(addr, |page_va, frame, _ps| {
            let i = ((page_va - r.start) / r.page_bytes) as usize;
            if inner.frames[i] != frame.0 {
                inner.frames[i] = UNREGISTERED;
                // SAFETY: the page lies inside this live range's reservation (`inner.dead`
                // is false under its lock, so it is not being unmapped).
                unsafe {
                    sys::map_fixed(
                        page_va,
                        r.page_bytes,
                        shared.mem.frame_fd(),
                        frame.0 * GRANULE,
                    )?
                };
                // Not inherited by a child process, like the rest of the range.
                sys::dont_fork(page_va, r.page_bytes)?;
                sys::uffd_register(uffd.as_fd(), page_va, r.page_bytes)?;
                inner.frames[i] = frame.0;
            }
            sys::uffd_continue(uffd.as_fd(), page_va, r.page_bytes)
        });
        let gone = matches!(&result, Err(drm_pagemap_core::Error::BadRange { .. }));
        match result {
            Ok(Ok(())) => {
                shared.served.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Ok(Err(e)) => note_error(shared, format!("fault at {addr:#x}: mapping: {e}")),
            Err(e) => note_error(shared, format!("fault at {addr:#x}: {e}")),
        }
        drop(inner);
        if gone || std::time::Instant::now() >= deadline {
            give_up(shared, uffd, addr, tid);
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A range that is memory of this process: loads and stores through
/// [`PointerRange::as_ptr`] reach its pages wherever they live (a device page faults home
/// first). Dropping it frees the range in the engine and unmaps it.
pub struct PointerRange {
    space: Arc<PointerSpace>,
    state: Arc<RangeState>,
    page_size: PageSize,
    freed: bool,
}

impl std::fmt::Debug for PointerRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PointerRange")
            .field("range", &self.range())
            .finish_non_exhaustive()
    }
}

impl PointerRange {
    /// The pointer: the range's first byte, valid for [`PointerRange::len`] bytes while the
    /// range lives.
    pub fn as_ptr(&self) -> *mut u8 {
        self.state.start as *mut u8
    }

    /// The range in the engine (its start is the pointer).
    pub fn range(&self) -> VaRange {
        VaRange::new(self.state.start, self.state.len)
    }

    /// Its length in bytes.
    pub fn len(&self) -> u64 {
        self.state.len
    }

    /// Whether it has no bytes (never: ranges are not empty).
    pub fn is_empty(&self) -> bool {
        self.state.len == 0
    }

    /// Its page size.
    pub fn page_size(&self) -> PageSize {
        self.page_size
    }

    /// Whether it is one mapping of a home extent of the frame file (its pages come home to
    /// frames of their own, so faults map nothing and the range needs one mapping), rather
    /// than mapped page by page (a host memory that does not place frames, such as CUDA's
    /// without `cuda.host_memfd`, a pool without room for the extent, or
    /// [`UffdConfig::scattered`]).
    pub fn coalesced(&self) -> bool {
        self.state.home.is_some()
    }

    /// The space it belongs to.
    pub fn space(&self) -> &Arc<PointerSpace> {
        &self.space
    }

    /// The 8-byte word `index` of the range as an atomic (`None` past the end): loads and
    /// stores on it are plain CPU accesses of the mapping, faulting like any other.
    pub fn word(&self, index: u64) -> Option<&AtomicU64> {
        if index.checked_mul(8)?.checked_add(8)? > self.state.len {
            return None;
        }
        let p = (self.state.start + index * 8) as *mut u64;
        // SAFETY: the word is inside the range's mapping (checked above), 8-byte aligned
        // (the range is page aligned), and stays mapped as long as `self` (the borrow); a
        // page away from system memory faults and comes back instead of vanishing. The
        // memory is only ever accessed as atomics or through raw copies, never as `&mut`.
        Some(unsafe { AtomicU64::from_ptr(p) })
    }

    /// Frees the range: the engine's pages (frames back to the pool, device pages
    /// released) and the mapping. Waits for a migration running on it.
    pub fn free(mut self) -> Result<(), UffdError> {
        self.free_inner()
    }

    fn free_inner(&mut self) -> Result<(), UffdError> {
        if self.freed {
            return Ok(());
        }
        self.freed = true;
        let shared = &self.space.shared;
        shared
            .ranges
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.state.start);
        let mut inner = self.state.lock();
        inner.dead = true;
        let result = shared.mm.free_range(self.state.start);
        sys::munmap(self.state.start, self.state.len);
        if let Some(h) = self.state.home {
            // After the engine let go of the range's frames (a frame a late copy still
            // writes returns to the pool when it is freed).
            shared.mm.host().release_home(
                h,
                self.page_size,
                self.state.len / self.state.page_bytes,
            );
        }
        shared
            .reserved_maps
            .fetch_sub(self.state.maps, Ordering::Relaxed);
        drop(inner);
        result.map_err(|source| UffdError::Engine {
            range: self.range(),
            source,
        })
    }
}

impl Drop for PointerRange {
    fn drop(&mut self) {
        let _ = self.free_inner();
    }
}
