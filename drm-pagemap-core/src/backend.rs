//! What a backend implements. The backend provides memory, mappings and copies; the core
//! decides what moves where.
//!
//! # Shape
//! - [`HostMemory`]: the system memory of an address space, as frames that every device of
//!   the backend can reach (pinned and device-mapped on CUDA), so mapping a system page for a
//!   device is an address computation.
//! - [`PagemapOps`]: `device_map` / `device_unmap` of one pagemap: the address by which a
//!   device reaches one of this pagemap's pages (its own device: a local address; a peer: a
//!   peer address).
//! - [`DevmemOps`]: device-memory allocations of one pagemap and the copies its device
//!   executes: `copy_to_devmem` (write into its own pages) and `copy_to_ram` (read its own
//!   pages, write through the addresses given, which may be system pages or another
//!   pagemap's pages: the source push).
//!
//! # Copy contract
//! Copy operations are **asynchronous**: they submit work and return a [`Fence`] that
//! signals when every byte has landed (or signals an error). They must not write any
//! destination byte before `pre_fence` has signalled: a backend expresses that as a device
//! dependency where it can (a CUDA event: `cuStreamWaitEvent`; a Level Zero event: a wait
//! event of the first command) and waits on the CPU otherwise. A pre-fence that signalled an
//! error must make the returned fence fail. Entries whose address is [`DmaAddr::NONE`] are
//! skipped. Each call carries one executor's pages only; the core issues the calls of every
//! executor before it waits for any, so devices copy concurrently.
//!
//! # Capabilities
//! A pagemap's [`DevmemOps::caps`] declares what its copies can do ([`CopyCaps`]: the largest
//! command, the native fence kinds its queue waits on, what it does with host fences, whether
//! its queue runs in order, a batch size hint), so layers above (xe-svm's copy policy, the
//! plug-in adapter) follow the backend instead of guessing. The caps describe; the copy
//! contract above holds whatever they say.
//!
//! # Memory access contract
//! While a copy involving a page is in flight, the core does not read, write, free or reuse
//! that page: pages under migration are locked in the page table. Backends may rely on it.

use crate::caps::CopyCaps;
use crate::error::BackendError;
use crate::fence::Fence;
use crate::options::{BackendOptions, OptionError};
use crate::types::{DeviceId, Direction, DmaAddr, HostFrame, OwnerId, PageSize, PagemapId, Pfn};
use std::fmt;
use std::sync::Arc;

/// One copy call: the executor's own device pages and, for each, the other side's address as
/// mapped for the executor's device. `pages.len() == addrs.len()`.
#[derive(Clone, Copy, Debug)]
pub struct CopyRequest<'a> {
    /// The page size of every entry.
    pub page_size: PageSize,
    /// The executor's device pages: destinations for `copy_to_devmem`, sources for `copy_to_ram`.
    pub pages: &'a [Pfn],
    /// The other side of each entry; [`DmaAddr::NONE`] entries are skipped.
    pub addrs: &'a [DmaAddr],
    /// No destination byte may be written before this fence signals.
    pub pre_fence: Option<&'a Fence>,
}

/// The system memory of an address space, as frames reachable by the backend's devices.
///
/// Frames are numbered in 4 KiB granules; a frame of a larger page size spans several.
/// `read`/`write`/`zero` are CPU accesses; the core never calls them on a frame with a copy in
/// flight (see the module's memory access contract).
pub trait HostMemory: Send + Sync {
    /// Allocates `out.len()` frames of `page_size` into `out` (the caller's buffer). All or
    /// nothing: on error `out` holds nothing the caller must free.
    fn alloc_frames(&self, page_size: PageSize, out: &mut [HostFrame]) -> Result<(), BackendError>;
    /// Returns frames to the pool.
    fn free_frames(&self, frames: &[HostFrame], page_size: PageSize);
    /// Copies bytes out of a frame, from `offset` (must stay inside the page). An error (a
    /// plug-in's memory that could not be reached, say) fails the caller's access with
    /// [`crate::BackendOp::HostAccess`]; memory a backend maps for the CPU cannot fail.
    fn read(&self, frame: HostFrame, offset: usize, buf: &mut [u8]) -> Result<(), BackendError>;
    /// Copies bytes into a frame, at `offset` (must stay inside the page). Errors as
    /// [`HostMemory::read`].
    fn write(&self, frame: HostFrame, offset: usize, data: &[u8]) -> Result<(), BackendError>;
    /// Fills a whole page with zeros. Errors as [`HostMemory::read`].
    fn zero(&self, frame: HostFrame, page_size: PageSize) -> Result<(), BackendError>;
    /// The addresses by which `device` reaches `frames`.
    fn map_frames(
        &self,
        device: DeviceId,
        frames: &[HostFrame],
        page_size: PageSize,
        dir: Direction,
        out: &mut [DmaAddr],
    ) -> Result<(), BackendError>;
    /// Undoes [`HostMemory::map_frames`]. `NONE` entries are skipped.
    fn unmap_frames(
        &self,
        device: DeviceId,
        addrs: &[DmaAddr],
        page_size: PageSize,
        dir: Direction,
    );
    /// Bytes of frames the pool can hand out in total.
    fn capacity_bytes(&self) -> u64;

    /// Reserves a *home extent* of `pages` consecutive frames of `page_size` (aligned to
    /// it): frames the pool hands out only through [`HostMemory::alloc_frames_at`] to
    /// whoever asks for them by number, never through [`HostMemory::alloc_frames`]. A range
    /// given it ([`crate::AddressSpace::create_range_homed`]) gets page `i`'s frame at
    /// `first + i * page_size.granules()` whenever that frame is free, so a layer mapping
    /// the range into the process can map it once, whole. The reserved frames hold no
    /// memory until allocated. Returns the first frame, or `None` where the pool does not
    /// place frames (the default) or has no room.
    fn reserve_home(&self, _page_size: PageSize, _pages: u64) -> Option<HostFrame> {
        None
    }

    /// Gives back a home extent of [`HostMemory::reserve_home`]. Frames of it still
    /// allocated (a range's frames kept aside for a late copy) return to the pool when freed.
    fn release_home(&self, _first: HostFrame, _page_size: PageSize, _pages: u64) {}

    /// [`HostMemory::alloc_frames`] with a placement: `frames[i]` holds on entry the frame
    /// wanted for page `i` (a frame of a home extent); it gets that frame where the pool
    /// honours placement and the frame is free, any frame otherwise. All or nothing, as
    /// [`HostMemory::alloc_frames`]. The default ignores the wish.
    fn alloc_frames_at(
        &self,
        page_size: PageSize,
        frames: &mut [HostFrame],
    ) -> Result<(), BackendError> {
        self.alloc_frames(page_size, frames)
    }
}

/// Mapping of one pagemap's pages for devices (upstream `drm_pagemap_ops`).
pub trait PagemapOps: Send + Sync {
    /// The addresses by which `device` reaches `pfns` of this pagemap. Fails with
    /// [`crate::BackendErrorKind::MapFailed`] where `device` cannot reach them.
    fn device_map(
        &self,
        device: DeviceId,
        pfns: &[Pfn],
        page_size: PageSize,
        dir: Direction,
        out: &mut [DmaAddr],
    ) -> Result<(), BackendError>;
    /// Undoes [`PagemapOps::device_map`]. `NONE` entries are skipped.
    fn device_unmap(
        &self,
        device: DeviceId,
        addrs: &[DmaAddr],
        page_size: PageSize,
        dir: Direction,
    );
}

/// The backend's side of one device-memory allocation: an opaque cookie, its size, and the
/// fence that must signal before its pages may be written (typically their clear).
///
/// A descriptor: cloning it copies the description, not the memory. The allocation is freed
/// once, by one of the `devmem_release*` calls of [`DevmemOps`].
#[derive(Clone, Debug)]
pub struct DevmemBacking {
    /// Backend-private identification of the allocation.
    pub cookie: u64,
    /// Number of pages.
    pub npages: usize,
    /// Size of each page.
    pub page_size: PageSize,
    /// Signals when the pages are ready to be written (and read as zeros); `None` when they
    /// are ready now (for example pages a backend cleared when they were last freed).
    pub pre_migrate_fence: Option<Fence>,
}

impl DevmemBacking {
    /// Blocks until the pages are ready to be written: waits for the pre-migrate fence, if
    /// there is one.
    pub fn wait_ready(&self) -> Result<(), crate::FenceError> {
        self.pre_migrate_fence.as_ref().map_or(Ok(()), |f| f.wait())
    }
}

/// Device memory of one pagemap: allocations and the copies its device executes
/// (upstream `drm_pagemap_devmem_ops`, plus the allocation the driver makes itself).
pub trait DevmemOps: Send + Sync {
    /// Allocates `npages` pages of `page_size`. Their content must read as zeros once the
    /// returned pre-migrate fence has signalled.
    fn allocate(&self, npages: usize, page_size: PageSize) -> Result<DevmemBacking, BackendError>;
    /// Writes the pfns of the allocation's pages, in address order, into `out`
    /// (`out.len() == backing.npages`).
    fn populate_devmem_pfn(
        &self,
        backing: &DevmemBacking,
        out: &mut [Pfn],
    ) -> Result<(), BackendError>;
    /// Copies into this device's pages `req.pages[i]` from `req.addrs[i]`.
    fn copy_to_devmem(&self, req: &CopyRequest<'_>) -> Result<Fence, BackendError>;
    /// Copies this device's pages `req.pages[i]` out to `req.addrs[i]`.
    fn copy_to_ram(&self, req: &CopyRequest<'_>) -> Result<Fence, BackendError>;
    /// Frees the allocation. Called exactly once per allocation, when no page uses it.
    fn devmem_release(&self, backing: DevmemBacking);
    /// Frees several allocations at once (a migration's commit or an eviction releases many
    /// together): a backend can batch the work (one clear for all of them). Same contract as
    /// [`DevmemOps::devmem_release`] for each; the default releases them one by one.
    ///
    /// The slice is the caller's buffer (a C table carries it as a pointer and a count): the
    /// backend reads the descriptors and keeps none of them; the caller drops them after the
    /// call and never passes them again.
    fn devmem_release_many(&self, backings: &[DevmemBacking]) {
        for b in backings {
            self.devmem_release(b.clone());
        }
    }
    /// Frees an allocation into which no copy was ever issued (a migration refused, not
    /// needed, or failed before its first copy; a reservation released unused). Its pages
    /// hold what [`DevmemOps::allocate`] left (zeros once its pre-migrate fence has
    /// signalled), so a backend that clears freed pages may skip that clear. Same contract
    /// as [`DevmemOps::devmem_release`] otherwise; the default calls it.
    fn devmem_release_unused(&self, backing: DevmemBacking) {
        self.devmem_release(backing)
    }
    /// Total bytes this pagemap can allocate.
    fn capacity_bytes(&self) -> u64;
    /// What this pagemap's copies can do (see [`CopyCaps`]). Constant for the pagemap's
    /// life: a layer above may read it once. A wrapper that only observes forwards its inner
    /// pagemap's. Default: [`CopyCaps::CONSERVATIVE`] (no command limit, no native fence
    /// kind, host fences waited in the call, no ordering between calls, no batch hint).
    fn caps(&self) -> CopyCaps {
        CopyCaps::CONSERVATIVE
    }
}

/// A device-memory provider: id, owner, device, and its operations (upstream `drm_pagemap`).
#[derive(Clone)]
pub struct Pagemap {
    id: PagemapId,
    owner: OwnerId,
    device: DeviceId,
    /// Shared: a lookup clones the pagemap, which must not allocate.
    name: Arc<str>,
    ops: Arc<dyn PagemapOps>,
    devmem: Arc<dyn DevmemOps>,
}

impl fmt::Debug for Pagemap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pagemap")
            .field("id", &self.id)
            .field("owner", &self.owner)
            .field("device", &self.device)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Pagemap {
    /// A pagemap with the given identity and operations.
    pub fn new(
        id: PagemapId,
        owner: OwnerId,
        device: DeviceId,
        name: impl Into<String>,
        ops: Arc<dyn PagemapOps>,
        devmem: Arc<dyn DevmemOps>,
    ) -> Pagemap {
        Pagemap {
            id,
            owner,
            device,
            name: Arc::from(name.into()),
            ops,
            devmem,
        }
    }

    /// The id pages record.
    pub fn id(&self) -> PagemapId {
        self.id
    }
    /// The owner: pagemaps of one owner exchange pages directly.
    pub fn owner(&self) -> OwnerId {
        self.owner
    }
    /// The device whose memory this is and which executes this pagemap's copies.
    pub fn device(&self) -> DeviceId {
        self.device
    }
    /// A name for messages and tables.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The mapping operations.
    pub fn ops(&self) -> &Arc<dyn PagemapOps> {
        &self.ops
    }
    /// The allocation and copy operations.
    pub fn devmem(&self) -> &Arc<dyn DevmemOps> {
        &self.devmem
    }
    /// The same pagemap with other operations (used to wrap them, e.g. for fault injection).
    pub fn with_ops(&self, ops: Arc<dyn PagemapOps>, devmem: Arc<dyn DevmemOps>) -> Pagemap {
        Pagemap {
            ops,
            devmem,
            ..self.clone()
        }
    }
    /// The same pagemap with another owner.
    pub fn with_owner(&self, owner: OwnerId) -> Pagemap {
        Pagemap {
            owner,
            ..self.clone()
        }
    }
}

/// What to create a pagemap with.
#[derive(Clone, Debug)]
pub struct PagemapSpec {
    /// The id to give it.
    pub id: PagemapId,
    /// The device whose memory it provides.
    pub device: DeviceId,
    /// Its owner; `None`: the backend's owner for that device's interconnect group.
    pub owner: Option<OwnerId>,
    /// Bytes of device memory it may hand out.
    pub capacity_bytes: u64,
}

/// What to open a backend with: the sizes every backend understands (a field a backend does
/// not use is ignored), and per-backend [`options`](Self::options).
///
/// `Default` is pure: no option set, nothing read from the environment. A binary that wants
/// the environment's settings (`DRM_PAGEMAP_CUDA_VMM=0` and the others of
/// [`ENV_OPTIONS`](crate::options::ENV_OPTIONS)) asks for them with
/// [`BackendConfig::from_env`], the one place the library reads the environment.
#[derive(Clone, Debug, Default)]
pub struct BackendConfig {
    /// Number of devices (the simulated backend's count; a GPU backend's upper limit); `None`:
    /// the backend's default.
    pub devices: Option<usize>,
    /// Bytes of device memory per device (simulated backends).
    pub device_capacity: Option<u64>,
    /// Bytes of host memory for system pages.
    pub host_capacity: Option<u64>,
    /// Per-backend knobs as a versioned `backend.key=value` list (`cuda.vmm=0`,
    /// `sim.copy_latency=1ms`): see [`crate::options`] for the syntax; each backend's config
    /// type documents its keys. A backend refuses keys under its name that it does not know and
    /// values it cannot parse ([`OptionError`](crate::options::OptionError)).
    pub options: BackendOptions,
}

impl BackendConfig {
    /// The default config with the options the environment sets (the variables of
    /// [`ENV_OPTIONS`](crate::options::ENV_OPTIONS): `DRM_PAGEMAP_CUDA_DMA_MIN_HOST`,
    /// `_DMA_MIN_DEVICE`, `_VMM`, `_CLEAR_ON_FREE`, `_KERNEL`, `_DISABLE`). This is the one
    /// place the library reads the environment; binaries call it, library code does not.
    /// A value the backend cannot parse is refused when the backend reads it.
    pub fn from_env() -> BackendConfig {
        BackendConfig {
            options: crate::options::options_from_vars(|k| {
                std::env::var_os(k).map(|v| v.to_string_lossy().into_owned())
            }),
            ..BackendConfig::default()
        }
    }

    /// The same config with option `key` set to `value`.
    pub fn with_option(
        mut self,
        key: impl Into<String>,
        value: impl Into<String>,
    ) -> Result<BackendConfig, OptionError> {
        self.options.set(key, value)?;
        Ok(self)
    }

    /// Whether option `backend.disable` is true: the registry reports such a backend
    /// unavailable and its `open` refuses ([`BackendErrorKind::Unavailable`]).
    ///
    /// [`BackendErrorKind::Unavailable`]: crate::BackendErrorKind::Unavailable
    pub fn disabled(&self, backend: &str) -> Result<bool, OptionError> {
        self.options.disabled(backend)
    }
}

/// Description of one device: plain data (a C ABI carries it as is).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Its id.
    pub id: DeviceId,
    /// A name for tables, e.g. "NVIDIA H100 80GB HBM3".
    pub name: DeviceName,
    /// Bytes of device memory.
    pub memory_bytes: u64,
}

/// A device's name in a fixed buffer: UTF-8, at most [`DeviceName::CAPACITY`] bytes (longer
/// names are cut at a character boundary).
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct DeviceName {
    len: u8,
    bytes: [u8; DeviceName::CAPACITY],
}

impl DeviceName {
    /// Bytes a name can hold.
    pub const CAPACITY: usize = 63;

    /// `name`, cut to [`DeviceName::CAPACITY`] bytes at a character boundary.
    pub fn new(name: &str) -> DeviceName {
        let mut end = name.len().min(DeviceName::CAPACITY);
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        let mut bytes = [0u8; DeviceName::CAPACITY];
        bytes[..end].copy_from_slice(&name.as_bytes()[..end]);
        DeviceName {
            len: end as u8,
            bytes,
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        // Built from a &str cut at a character boundary: valid UTF-8.
        std::str::from_utf8(&self.bytes[..self.len as usize]).unwrap_or("")
    }
}

impl std::fmt::Display for DeviceName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for DeviceName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl From<&str> for DeviceName {
    fn from(name: &str) -> DeviceName {
        DeviceName::new(name)
    }
}

/// An opened backend: devices, host memory, and pagemaps on demand.
pub trait Backend: Send + Sync {
    /// The backend's name ("sim", "cuda").
    fn name(&self) -> &str;
    /// How many devices it has.
    fn device_count(&self) -> usize;
    /// Device `index` (0 to [`Backend::device_count`]), `None` past the end.
    fn device_info(&self, index: usize) -> Option<DeviceInfo>;
    /// Every device (built from the two above).
    fn devices(&self) -> Vec<DeviceInfo> {
        (0..self.device_count())
            .filter_map(|i| self.device_info(i))
            .collect()
    }
    /// The host memory system pages of address spaces used with this backend live in.
    fn host_memory(&self) -> Arc<dyn HostMemory>;
    /// Creates a pagemap on `spec.device`.
    fn create_pagemap(&self, spec: &PagemapSpec) -> Result<Pagemap, BackendError>;
    /// Whether `a`'s copy engine can write into `b`'s memory directly.
    fn can_access_peer(&self, a: DeviceId, b: DeviceId) -> bool;
}

#[cfg(test)]
mod device_name_tests {
    use super::DeviceName;

    #[test]
    fn names_are_cut_at_a_character_boundary() {
        assert_eq!(DeviceName::new("NVIDIA H200").as_str(), "NVIDIA H200");
        assert_eq!(DeviceName::new("").as_str(), "");
        let long = "x".repeat(100);
        assert_eq!(DeviceName::new(&long).as_str().len(), DeviceName::CAPACITY);
        // A 3-byte character straddling the limit is left out whole.
        let s = format!("{}€", "a".repeat(DeviceName::CAPACITY - 1));
        assert_eq!(
            DeviceName::new(&s).as_str(),
            "a".repeat(DeviceName::CAPACITY - 1)
        );
        assert_eq!(format!("{}", DeviceName::from("sim 0")), "sim 0");
    }
}
