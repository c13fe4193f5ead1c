//! # tier: a drm-pagemap backend whose device memory is a file
//!
//! A plug-in (built as `libdrm_pagemap_plugin_tier.so`) for a slow memory tier on local disk
//! or NVMe: each pagemap is a file-backed shared mapping under a directory the user gives, so
//! a runtime can spill cold pages to storage through the same engine (`migrate` to a tier
//! pagemap) and bring them back (evict, or touch them from the CPU). Several pagemaps are
//! several files; each has a copy engine thread that runs its copies in submission order.
//!
//! System pages live in an anonymous mapping; an address ([`DmaAddr`]) is the page's
//! virtual address in this process, for the host memory and every tier alike, so any tier
//! copies to and from any other (peers) with `memcpy`.
//!
//! ## Options (`BackendConfig::options`, keys under `tier.`)
//! - `tier.path=DIR`: where the files go (default `/var/tmp`). Each file is unlinked as soon
//!   as it is mapped: nothing is left behind, even after a crash.
//! - `tier.capacity=BYTES`: bytes per tier file (default: the config's `device_capacity`,
//!   else 256 MiB); files are sparse, disk is used as pages are written.
//! - `tier.fsync=never|copy`: `copy` makes every copy into a tier reach the disk
//!   (`msync(MS_SYNC)`) before its fence signals; `never` (default) leaves it to the kernel.
//! - `tier.inject_panic=ENTRY`: testing: the named entry panics (see [`Entry`]), to show a
//!   panic never crosses the boundary.
//!
//! `BackendConfig::devices` is the number of tiers (default 2), `host_capacity` the bytes of
//! system memory (default 256 MiB).

use drm_pagemap_plugin::core::fence::FenceTimeline;
use drm_pagemap_plugin::core::{
    Backend, BackendConfig, BackendError, BackendErrorKind, CopyCaps, CopyRequest, DeviceId,
    DeviceInfo, DeviceName, DevmemBacking, DevmemOps, Direction, DmaAddr, ExtentAllocator, Fence,
    FenceError, GRANULE, HostFence, HostFenceWait, HostFrame, HostMemory, OwnerId, PageSize,
    Pagemap, PagemapOps, PagemapSpec, Pfn,
};
use drm_pagemap_plugin::sdk::{Host, Plugin};
use std::collections::HashMap;
use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// The plug-in.
pub struct TierPlugin;

drm_pagemap_plugin::export_plugin!(TierPlugin);

impl Plugin for TierPlugin {
    const NAME: &'static CStr = c"tier";
    const DESCRIPTION: &'static CStr = c"file-backed slow tier (disk or NVMe) as device memory";

    fn probe(_host: &Host) -> Result<(), BackendError> {
        Ok(())
    }

    fn open(host: &Host, config: &BackendConfig) -> Result<Arc<dyn Backend>, BackendError> {
        let cfg = TierConfig::from_backend_config(config)?;
        cfg.check(Entry::Open);
        host.log(
            drm_pagemap_plugin::abi::DPP_LOG_INFO,
            &format!(
                "tier: {} tiers of {} bytes under {}",
                cfg.devices,
                cfg.capacity,
                cfg.path.display()
            ),
        );
        Ok(Arc::new(TierBackend::new(cfg)?))
    }
}

/// Entries `tier.inject_panic` can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// Opening the backend.
    Open,
    /// `create_pagemap`.
    CreatePagemap,
    /// `device_map`.
    DeviceMap,
    /// `allocate`.
    Allocate,
    /// `populate_devmem_pfn`.
    Populate,
    /// `copy_to_devmem`.
    CopyToDevmem,
    /// `copy_to_ram`.
    CopyToRam,
    /// `alloc_frames`.
    AllocFrames,
    /// `map_frames`.
    MapFrames,
    /// `read`.
    Read,
    /// `write`.
    Write,
    /// `zero`.
    Zero,
}

const ENTRIES: &[(&str, Entry)] = &[
    ("open", Entry::Open),
    ("create_pagemap", Entry::CreatePagemap),
    ("device_map", Entry::DeviceMap),
    ("allocate", Entry::Allocate),
    ("populate_devmem_pfn", Entry::Populate),
    ("copy_to_devmem", Entry::CopyToDevmem),
    ("copy_to_ram", Entry::CopyToRam),
    ("alloc_frames", Entry::AllocFrames),
    ("map_frames", Entry::MapFrames),
    ("read", Entry::Read),
    ("write", Entry::Write),
    ("zero", Entry::Zero),
];

/// When copies into a tier reach the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fsync {
    /// Left to the kernel's writeback.
    Never,
    /// Before the copy's fence signals.
    Copy,
}

/// The tier's configuration.
#[derive(Clone, Debug)]
pub struct TierConfig {
    /// Directory of the files.
    pub path: PathBuf,
    /// Bytes per tier file.
    pub capacity: u64,
    /// Number of tiers.
    pub devices: usize,
    /// Bytes of system memory.
    pub host_capacity: u64,
    /// fsync policy.
    pub fsync: Fsync,
    /// Testing: the entry that panics.
    pub inject_panic: Option<Entry>,
}

impl TierConfig {
    /// Reads the `tier.*` options (unknown keys refused).
    pub fn from_backend_config(c: &BackendConfig) -> Result<TierConfig, BackendError> {
        let bad = |e: drm_pagemap_plugin::core::OptionError| {
            BackendError::new(BackendErrorKind::BadConfig, e.to_string())
        };
        let mut r = c.options.reader("tier").map_err(bad)?;
        let path = r.raw("path").map(|(_, v)| PathBuf::from(v));
        let capacity = r.bytes("capacity").map_err(bad)?;
        let fsync = r
            .choice("fsync", &[("never", Fsync::Never), ("copy", Fsync::Copy)])
            .map_err(bad)?;
        let inject_panic = r.choice("inject_panic", ENTRIES).map_err(bad)?;
        let _ = r.bool("disable").map_err(bad)?;
        r.finish().map_err(bad)?;
        let cfg = TierConfig {
            path: path.unwrap_or_else(|| PathBuf::from("/var/tmp")),
            capacity: capacity.or(c.device_capacity).unwrap_or(256 << 20),
            devices: c.devices.unwrap_or(2),
            host_capacity: c.host_capacity.unwrap_or(256 << 20),
            fsync: fsync.unwrap_or(Fsync::Never),
            inject_panic,
        };
        if cfg.devices == 0 || cfg.devices > 64 {
            return Err(BackendError::new(
                BackendErrorKind::BadConfig,
                format!("tier: {} tiers requested (1 to 64)", cfg.devices),
            ));
        }
        // Pfns are 32-bit granule numbers: 16 TiB per tier at most.
        let max = (u32::MAX as u64) * GRANULE;
        if cfg.capacity > max || cfg.host_capacity > max {
            return Err(BackendError::new(
                BackendErrorKind::BadConfig,
                format!(
                    "tier: capacity {} / host capacity {} past {max} bytes",
                    cfg.capacity, cfg.host_capacity
                ),
            ));
        }
        Ok(cfg)
    }

    /// Testing: panics when `entry` is the one to panic in.
    fn check(&self, entry: Entry) {
        if self.inject_panic == Some(entry) {
            panic!("tier: injected panic in {entry:?}");
        }
    }
}

/// A shared mapping (of a file or anonymous memory), unmapped on drop.
struct Mapping {
    base: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory; who writes which bytes when is ordered by the core's
// memory access contract (a page under copy is not touched by anyone else).
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(len: u64, file: Option<&File>) -> Result<Mapping, BackendError> {
        let len = usize::try_from(len.max(GRANULE)).map_err(|_| oom("mapping length"))?;
        let (flags, fd) = match file {
            Some(f) => (libc::MAP_SHARED, f.as_raw_fd()),
            None => (
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
            ),
        };
        // SAFETY: a fresh mapping at an address the kernel picks; no existing memory is touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(BackendError::driver(
                "mmap",
                i64::from(last_errno()),
                format!("tier: mmap of {len} bytes failed"),
            ));
        }
        Ok(Mapping {
            base: p.cast(),
            len,
        })
    }

    /// The address of granule `g` (checked against the length).
    fn at(&self, g: u64, bytes: u64) -> Option<*mut u8> {
        let off = g.checked_mul(GRANULE)?;
        (off.checked_add(bytes)? <= self.len as u64).then(|| self.base.wrapping_add(off as usize))
    }

    fn contains(&self, addr: u64, bytes: u64) -> bool {
        let b = self.base as u64;
        addr >= b
            && addr
                .checked_add(bytes)
                .is_some_and(|e| e <= b + self.len as u64)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once; nothing refers to it any more.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn oom(what: &str) -> BackendError {
    BackendError::new(BackendErrorKind::OutOfMemory, format!("tier: {what}"))
}

/// System memory: an anonymous mapping carved into frames.
struct TierHost {
    mem: Mapping,
    frames: ExtentAllocator,
    cfg: Arc<TierConfig>,
}

impl HostMemory for TierHost {
    fn alloc_frames(&self, page_size: PageSize, out: &mut [HostFrame]) -> Result<(), BackendError> {
        self.cfg.check(Entry::AllocFrames);
        let mut starts = Vec::with_capacity(out.len());
        if !self
            .frames
            .alloc_pages(out.len(), page_size.granules(), &mut starts)
        {
            return Err(oom(&format!(
                "{} system pages of {page_size}: host memory exhausted",
                out.len()
            )));
        }
        for (o, s) in out.iter_mut().zip(starts) {
            *o = HostFrame(s);
        }
        Ok(())
    }

    fn free_frames(&self, frames: &[HostFrame], page_size: PageSize) {
        self.frames
            .free_page_iter(frames.iter().map(|f| f.0), page_size.granules());
    }

    fn read(&self, frame: HostFrame, offset: usize, buf: &mut [u8]) -> Result<(), BackendError> {
        self.cfg.check(Entry::Read);
        let p = self
            .mem
            .at(frame.0, offset as u64 + buf.len() as u64)
            .expect("tier: read past the host memory");
        // SAFETY: inside the mapping (checked); the core does not copy into this frame now.
        unsafe { std::ptr::copy_nonoverlapping(p.add(offset), buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    fn write(&self, frame: HostFrame, offset: usize, data: &[u8]) -> Result<(), BackendError> {
        self.cfg.check(Entry::Write);
        let p = self
            .mem
            .at(frame.0, offset as u64 + data.len() as u64)
            .expect("tier: write past the host memory");
        // SAFETY: as `read`.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p.add(offset), data.len()) };
        Ok(())
    }

    fn zero(&self, frame: HostFrame, page_size: PageSize) -> Result<(), BackendError> {
        self.cfg.check(Entry::Zero);
        let p = self
            .mem
            .at(frame.0, page_size.bytes())
            .expect("tier: zero past the host memory");
        // SAFETY: as `read`.
        unsafe { std::ptr::write_bytes(p, 0, page_size.bytes() as usize) };
        Ok(())
    }

    fn map_frames(
        &self,
        device: DeviceId,
        frames: &[HostFrame],
        page_size: PageSize,
        _dir: Direction,
        out: &mut [DmaAddr],
    ) -> Result<(), BackendError> {
        self.cfg.check(Entry::MapFrames);
        for (o, f) in out.iter_mut().zip(frames) {
            let p = self.mem.at(f.0, page_size.bytes()).ok_or_else(|| {
                BackendError::new(
                    BackendErrorKind::MapFailed,
                    format!(
                        "tier: host frame {} for {device} is outside the host memory",
                        f.0
                    ),
                )
            })?;
            *o = DmaAddr(p as u64);
        }
        Ok(())
    }

    fn unmap_frames(&self, _: DeviceId, _: &[DmaAddr], _: PageSize, _: Direction) {}

    fn capacity_bytes(&self) -> u64 {
        self.frames.total() * GRANULE
    }
}

/// The backend: tiers on demand.
struct TierBackend {
    cfg: Arc<TierConfig>,
    host: Arc<TierHost>,
    /// Numbers files of this backend.
    files: AtomicU64,
}

impl TierBackend {
    fn new(cfg: TierConfig) -> Result<TierBackend, BackendError> {
        let cfg = Arc::new(cfg);
        let host = Arc::new(TierHost {
            mem: Mapping::new(cfg.host_capacity, None)?,
            frames: ExtentAllocator::new(cfg.host_capacity / GRANULE),
            cfg: cfg.clone(),
        });
        Ok(TierBackend {
            cfg,
            host,
            files: AtomicU64::new(0),
        })
    }
}

impl Backend for TierBackend {
    fn name(&self) -> &str {
        "tier"
    }

    fn device_count(&self) -> usize {
        self.cfg.devices
    }

    fn device_info(&self, index: usize) -> Option<DeviceInfo> {
        (index < self.cfg.devices).then(|| DeviceInfo {
            id: DeviceId(index as u32),
            name: DeviceName::new(&format!("tier {index} ({})", self.cfg.path.display())),
            memory_bytes: self.cfg.capacity,
        })
    }

    fn host_memory(&self) -> Arc<dyn HostMemory> {
        self.host.clone()
    }

    fn create_pagemap(&self, spec: &PagemapSpec) -> Result<Pagemap, BackendError> {
        self.cfg.check(Entry::CreatePagemap);
        if spec.device.0 as usize >= self.cfg.devices {
            return Err(BackendError::new(
                BackendErrorKind::BadConfig,
                format!("tier: no {}", spec.device),
            ));
        }
        let n = self.files.fetch_add(1, Ordering::Relaxed);
        let path = self.cfg.path.join(format!(
            "drm-pagemap-tier-{}-{:p}-{n}.bin",
            std::process::id(),
            self
        ));
        let capacity = spec.capacity_bytes.min(self.cfg.capacity) / GRANULE * GRANULE;
        let tier = Tier::create(path, capacity, spec.device, self.cfg.clone())?;
        let tier = Arc::new(tier);
        Ok(Pagemap::new(
            spec.id,
            spec.owner.unwrap_or(OwnerId(0x7100)),
            spec.device,
            format!("tier {} ({})", spec.device.0, self.cfg.path.display()),
            tier.clone(),
            tier,
        ))
    }

    fn can_access_peer(&self, _: DeviceId, _: DeviceId) -> bool {
        true
    }
}

/// One queued copy: page pairs (source, destination), after `pre`.
struct Job {
    pairs: Vec<(u64, u64)>,
    bytes: usize,
    pre: Option<Fence>,
    done: Arc<HostFence>,
    /// `msync` these destination pages before signalling.
    sync: bool,
}

/// One tier: a file mapping, its allocator and its copy engine thread.
struct Tier {
    file: File,
    mem: Arc<Mapping>,
    pfns: ExtentAllocator,
    allocations: Mutex<HashMap<u64, Vec<u64>>>,
    next_cookie: AtomicU64,
    timeline: FenceTimeline,
    engine: Mutex<Option<Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    device: DeviceId,
    path: PathBuf,
    cfg: Arc<TierConfig>,
}

impl Tier {
    fn create(
        path: PathBuf,
        capacity: u64,
        device: DeviceId,
        cfg: Arc<TierConfig>,
    ) -> Result<Tier, BackendError> {
        let io = |what: &str, e: std::io::Error| {
            BackendError::driver(
                "open",
                i64::from(e.raw_os_error().unwrap_or(0)),
                format!("tier: {what} {}: {e}", path.display()),
            )
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| io("creating", e))?;
        let _ = std::fs::remove_file(&path); // nothing left behind; the mapping keeps the data
        file.set_len(capacity).map_err(|e| io("sizing", e))?;
        let mem = Arc::new(Mapping::new(capacity, Some(&file))?);
        let (tx, rx) = channel::<Job>();
        let engine_mem = mem.clone();
        let thread = std::thread::Builder::new()
            .name(format!("tier-{}-copy", device.0))
            .spawn(move || {
                for job in rx {
                    run(&engine_mem, job);
                }
            })
            .map_err(|e| {
                BackendError::new(
                    BackendErrorKind::Unavailable,
                    format!("tier: copy engine thread: {e}"),
                )
            })?;
        Ok(Tier {
            file,
            mem,
            pfns: ExtentAllocator::new(capacity / GRANULE),
            allocations: Mutex::new(HashMap::new()),
            next_cookie: AtomicU64::new(1),
            timeline: FenceTimeline::new(),
            engine: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            device,
            path,
            cfg,
        })
    }

    fn copy(&self, req: &CopyRequest<'_>, to_ram: bool) -> Result<Fence, BackendError> {
        let bytes = req.page_size.bytes();
        let mut pairs = Vec::with_capacity(req.pages.len());
        for (pfn, addr) in req.pages.iter().zip(req.addrs) {
            if addr.is_none() {
                continue;
            }
            let local = self.mem.at(u64::from(pfn.0), bytes).ok_or_else(|| {
                BackendError::new(
                    BackendErrorKind::CopyFailed,
                    format!("tier: pfn {} of {} past the file", pfn.0, self.device),
                )
            })? as u64;
            pairs.push(if to_ram {
                (local, addr.0)
            } else {
                (addr.0, local)
            });
        }
        let done = self.timeline.host_fence();
        let job = Job {
            pairs,
            bytes: bytes as usize,
            pre: req.pre_fence.cloned(),
            done: done.clone(),
            sync: !to_ram && self.cfg.fsync == Fsync::Copy,
        };
        let engine = self.engine.lock().unwrap_or_else(|p| p.into_inner());
        let sent = engine.as_ref().is_some_and(|tx| tx.send(job).is_ok());
        if !sent {
            return Err(BackendError::new(
                BackendErrorKind::DeviceLost,
                format!("tier: the copy engine of {} stopped", self.device),
            ));
        }
        Ok(Fence::from_host(done))
    }
}

/// The copy engine's work: waits for the pre-fence (in queue), copies, syncs, signals.
fn run(mem: &Mapping, job: Job) {
    if let Some(pre) = &job.pre
        && let Err(e) = pre.wait()
    {
        let e = match e {
            FenceError::Failed(b) => b,
            other => BackendError::new(BackendErrorKind::CopyFailed, other.to_string()),
        };
        job.done.signal_error(BackendError::new(
            BackendErrorKind::CopyFailed,
            format!("tier: pre-fence failed: {e}"),
        ));
        return;
    }
    for (src, dst) in &job.pairs {
        // SAFETY: both addresses come from `map_frames` / `device_map` of this backend (live
        // mappings of at least one page), and the core keeps every other access off pages
        // under copy (the memory access contract).
        unsafe { std::ptr::copy_nonoverlapping(*src as *const u8, *dst as *mut u8, job.bytes) };
    }
    if job.sync {
        for (_, dst) in &job.pairs {
            if mem.contains(*dst, job.bytes as u64) {
                // SAFETY: a page-aligned range inside our live file mapping.
                let r = unsafe { libc::msync(*dst as *mut libc::c_void, job.bytes, libc::MS_SYNC) };
                if r != 0 {
                    job.done.signal_error(BackendError::driver(
                        "msync",
                        i64::from(last_errno()),
                        "tier: msync failed",
                    ));
                    return;
                }
            }
        }
    }
    job.done.signal();
}

impl Drop for Tier {
    fn drop(&mut self) {
        // Stop the engine after the queued copies, and wait for it.
        self.engine.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

impl PagemapOps for Tier {
    fn device_map(
        &self,
        device: DeviceId,
        pfns: &[Pfn],
        page_size: PageSize,
        _dir: Direction,
        out: &mut [DmaAddr],
    ) -> Result<(), BackendError> {
        self.cfg.check(Entry::DeviceMap);
        for (o, p) in out.iter_mut().zip(pfns) {
            let a = self
                .mem
                .at(u64::from(p.0), page_size.bytes())
                .ok_or_else(|| {
                    BackendError::new(
                        BackendErrorKind::MapFailed,
                        format!(
                            "tier: pfn {} of {} for {device} past the file",
                            p.0, self.device
                        ),
                    )
                })?;
            *o = DmaAddr(a as u64);
        }
        Ok(())
    }

    fn device_unmap(&self, _: DeviceId, _: &[DmaAddr], _: PageSize, _: Direction) {}
}

impl DevmemOps for Tier {
    fn allocate(&self, npages: usize, page_size: PageSize) -> Result<DevmemBacking, BackendError> {
        self.cfg.check(Entry::Allocate);
        let mut starts = Vec::new();
        if !self
            .pfns
            .alloc_pages(npages, page_size.granules(), &mut starts)
        {
            return Err(oom(&format!(
                "{npages} pages of {page_size} do not fit in the free space of {} ({})",
                self.device,
                self.path.display()
            )));
        }
        let cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed);
        self.allocations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(cookie, starts);
        Ok(DevmemBacking {
            cookie,
            npages,
            page_size,
            pre_migrate_fence: None,
        })
    }

    fn populate_devmem_pfn(
        &self,
        backing: &DevmemBacking,
        out: &mut [Pfn],
    ) -> Result<(), BackendError> {
        self.cfg.check(Entry::Populate);
        let a = self.allocations.lock().unwrap_or_else(|p| p.into_inner());
        let starts = a.get(&backing.cookie).ok_or_else(|| {
            BackendError::new(
                BackendErrorKind::Unsupported,
                format!("tier: no allocation {} on {}", backing.cookie, self.device),
            )
        })?;
        for (o, s) in out.iter_mut().zip(starts) {
            *o = Pfn(*s as u32);
        }
        Ok(())
    }

    fn copy_to_devmem(&self, req: &CopyRequest<'_>) -> Result<Fence, BackendError> {
        self.cfg.check(Entry::CopyToDevmem);
        self.copy(req, false)
    }

    fn copy_to_ram(&self, req: &CopyRequest<'_>) -> Result<Fence, BackendError> {
        self.cfg.check(Entry::CopyToRam);
        self.copy(req, true)
    }

    fn devmem_release(&self, backing: DevmemBacking) {
        let Some(starts) = self
            .allocations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&backing.cookie)
        else {
            return;
        };
        let bytes = backing.page_size.bytes();
        for s in &starts {
            // Freed pages read as zeros again: punch a hole (frees the disk too), else write
            // zeros.
            // SAFETY: a plain syscall on our own file descriptor.
            let punched = unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    (*s * GRANULE) as libc::off_t,
                    bytes as libc::off_t,
                )
            } == 0;
            if !punched && let Some(p) = self.mem.at(*s, bytes) {
                // SAFETY: inside our mapping; the page is free (no copy touches it).
                unsafe { std::ptr::write_bytes(p, 0, bytes as usize) };
            }
        }
        self.pfns.free_pages(&starts, backing.page_size.granules());
    }

    fn capacity_bytes(&self) -> u64 {
        self.pfns.total() * GRANULE
    }

    fn caps(&self) -> CopyCaps {
        CopyCaps {
            host_fences: HostFenceWait::InQueue,
            in_order: true,
            ..CopyCaps::CONSERVATIVE
        }
    }
}
