//! # drm-pagemap-cuda
//!
//! The CUDA backend of drm-pagemap: the core's traits on NVIDIA GPUs through cudarc's
//! driver bindings, loaded at run time (the crate builds and its tests pass on machines
//! without CUDA; there [`probe`] says why the backend is unavailable and [`open`] fails —
//! nothing panics).
//!
//! - **Pagemaps** are device-memory arenas: one contiguous virtual range per pagemap, backed
//!   lazily by the virtual memory management API (`cuMemAddressReserve`/`cuMemCreate`/
//!   `cuMemMap`), split into 4 KiB granules (pfns). Several pagemaps may live on one GPU
//!   (two memory regions of one device); pagemaps on different GPUs reach each other where
//!   `cuDeviceCanAccessPeer` allows both ways (peer access is enabled and the owner group is
//!   shared); elsewhere mapping fails and owner groups differ, so the core stages through
//!   system memory.
//! - **System pages** ([`PinnedHostMemory`]) live in pinned, device-mapped, portable host
//!   memory (`cuMemHostAlloc(DEVICEMAP | PORTABLE)`, not write-combined, so CPU reads are
//!   fast), allocated in chunks as needed. Mapping one for a device is an address
//!   computation (unified addressing). With [`CudaConfig::host_memfd`] (`cuda.host_memfd=1`)
//!   the memory is one memfd mapped shared whose chunks are registered with
//!   `cuMemHostRegister(DEVICEMAP | PORTABLE)` ([`PinnedHostMemory::memfd`]): another
//!   mapping of a frame (a pointer range of `drm-pagemap-uffd`) reaches the very pages the
//!   GPUs copy. Pinned memory is never given back page by page: a page resident on a device
//!   keeps its host memory on CUDA (its frame returns to the pool, not to the system).
//! - **Copies** run on the executing pagemap's stream. A call is split into runs that are
//!   contiguous on both sides; runs of at least the DMA crossover go to `cuMemcpyAsync`
//!   (direction and peer inferred through unified addressing), everything else to **one**
//!   launch of a gather/scatter kernel (one warp per 4 KiB, reading the call's page lists
//!   from pinned staging memory). The kernel is compiled with NVRTC at first use, or loaded
//!   from the checked-in PTX when NVRTC is missing. Crossovers: [`CudaConfig`].
//! - **Fences** ([`CudaFence`]) are CUDA events recorded on the copy stream. A pre-fence
//!   that is a queued CUDA fence of this backend (any context, any GPU; also inside a
//!   [`drm_pagemap_core::FenceArray`]) becomes `cuStreamWaitEvent`; any other pending fence is
//!   waited for on the CPU by a helper thread that then queues the copy (the call returns at
//!   once; a stream never waits for the host). Device pages are cleared when freed, on a
//!   clear stream beside the copy stream, and reach the allocator again once that clear is
//!   done, so new allocations are clean and queue nothing; pages that could not be cleared
//!   then are cleared by the allocation on the copy stream, and that clear is its
//!   pre-migrate fence. Driver errors keep their `CUresult`
//!   ([`drm_pagemap_core::BackendErrorKind::Driver`]).
//!
//! Configured by [`CudaConfig`] (pure `Default`), from a [`BackendConfig`]'s `cuda.*` options
//! ([`CudaConfig::from_backend_config`]), or, in binaries, from the `DRM_PAGEMAP_CUDA_*`
//! environment variables ([`CudaConfig::from_env`], the only place this crate reads them).
//!
//! Tests and benches reach a few internals through the cargo feature `internals` (off by
//! default; this crate's own tests and benches turn it on): holding a pagemap's stream
//! deterministically (`CudaPagemap::hold`; while a stream is held, an implicitly
//! synchronising driver call of any thread, such as an allocation, waits for it), stalling
//! it, setting the DMA crossover and reading the raw stream handle.

mod allocs;
mod clean;
mod device;
mod driver;
mod fence;
mod gate;
mod host;
mod kernel;
mod memfd;
mod pagemap;
mod plan;
mod ring;
mod settle;

pub use fence::CudaFence;
#[cfg(feature = "internals")]
pub use gate::Hold;
pub use host::PinnedHostMemory;
pub use kernel::KernelSource;
pub use pagemap::{CudaPagemap, CudaStats};

use device::CudaDevice;
use drm_pagemap_core::{
    Backend, BackendConfig, BackendError, BackendErrorKind, DeviceId, DeviceInfo, DeviceName,
    HostMemory, OptionError, OwnerId, Pagemap, PagemapId, PagemapSpec,
};
use std::sync::{Arc, Mutex};

/// Default DMA crossover for runs that touch system memory: a run of at least this many
/// bytes is one `cuMemcpyAsync`. From the crossover sweep in BENCHMARKS.md (CUDA section).
pub const DEFAULT_DMA_MIN_HOST: u64 = 2 << 20;
/// Default DMA crossover for device-to-device runs. On the H100 the kernel was faster than
/// one DMA per run for every run length measured (up to 64 MiB, where they were within 3%),
/// so only runs longer than any layout produces in practice go to the copy engine.
pub const DEFAULT_DMA_MIN_DEVICE: u64 = 256 << 20;
/// Default bytes of host memory for system pages (pinned lazily, 64 MiB at a time).
pub const DEFAULT_HOST_CAPACITY: u64 = 16 << 30;
/// Default [`CudaConfig::ring_idle`]: how long the ring's kernel may sit idle before it is
/// stopped (so an implicitly synchronising driver call of the application waits at most
/// about this long for it).
pub const DEFAULT_RING_IDLE: std::time::Duration = std::time::Duration::from_millis(2);
/// Most bytes of host memory for system pages: 128 TiB, the user address space of x86-64
/// (pinned memory must fit in RAM besides; the chunk table costs 24 bytes per
/// 64 MiB chunk of capacity, 48 MiB at this limit).
pub const MAX_HOST_CAPACITY: u64 = 1 << 47;

/// How to open the CUDA backend.
///
/// `Default` is pure (the constants above, every GPU, the NVRTC kernel where it works, lazy
/// arenas, clears on free); it reads no environment variable. [`CudaConfig::from_env`] adds
/// what the environment sets, [`CudaConfig::from_backend_config`] what a
/// [`BackendConfig`]'s options set. The keys (options `cuda.KEY`; the variable a binary's
/// `from_env` reads for it):
///
/// | key | value | field | variable |
/// |---|---|---|---|
/// | `dma_min_host` | a byte count | [`dma_min_host`](Self::dma_min_host) | `DRM_PAGEMAP_CUDA_DMA_MIN_HOST` |
/// | `dma_min_device` | a byte count | [`dma_min_device`](Self::dma_min_device) | `DRM_PAGEMAP_CUDA_DMA_MIN_DEVICE` |
/// | `vmm` | a boolean | [`vmm`](Self::vmm) | `DRM_PAGEMAP_CUDA_VMM` (`0`: off) |
/// | `clear_on_free` | a boolean | [`clear_on_free`](Self::clear_on_free) | `DRM_PAGEMAP_CUDA_CLEAR_ON_FREE` (`0`: off) |
/// | `kernel` | `auto`, `nvrtc`, `ptx` (or `fallback`) | [`kernel`](Self::kernel) | `DRM_PAGEMAP_CUDA_KERNEL` |
/// | `device_capacity` | a byte count | [`device_capacity`](Self::device_capacity) | |
/// | `disable` | a boolean | [`disable`](Self::disable) | `DRM_PAGEMAP_CUDA_DISABLE` (set: on) |
/// | `host_memfd` | a boolean | [`host_memfd`](Self::host_memfd) | |
/// | `bulk` | a boolean | [`bulk`](Self::bulk) | |
/// | `ring` | a boolean | [`ring`](Self::ring) | |
/// | `ring_idle` | a duration | [`ring_idle`](Self::ring_idle) | |
///
/// [`BackendConfig::devices`] and [`BackendConfig::host_capacity`] set
/// [`devices`](Self::devices) and [`host_capacity`](Self::host_capacity).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CudaConfig {
    /// Use at most this many GPUs (`None`: all; `Some(0)` is refused).
    pub devices: Option<usize>,
    /// Bytes of device memory offered per GPU (`None`: its total memory).
    pub device_capacity: Option<u64>,
    /// Bytes of host memory for system pages (at most [`MAX_HOST_CAPACITY`]).
    pub host_capacity: u64,
    /// DMA crossover (bytes) for runs touching system memory.
    pub dma_min_host: u64,
    /// DMA crossover (bytes) for device-to-device runs.
    pub dma_min_device: u64,
    /// Where the gather/scatter kernel comes from.
    pub kernel: KernelSource,
    /// Back pagemaps lazily with the virtual memory management API (else one `cuMemAlloc`
    /// of the whole capacity per pagemap).
    pub vmm: bool,
    /// Clear device pages when they are freed (and arena memory when it is first mapped),
    /// so that an allocation normally finds clean pages and queues no clear in front of the
    /// migration's copies; pages whose clear could not be queued are cleared when they are
    /// allocated again. `false`: every allocation clears its pages (the clear is its
    /// pre-migrate fence). Default `true`.
    pub clear_on_free: bool,
    /// Do not use the GPUs: [`probe_with`] reports the backend unavailable and
    /// [`CudaBackend::new`] refuses ([`BackendErrorKind::Unavailable`]), as on a machine
    /// without CUDA. Default `false`.
    pub disable: bool,
    /// Make the host memory one memfd mapped shared and registered with the driver
    /// (`cuMemHostRegister(DEVICEMAP | PORTABLE)`, a 64 MiB chunk at a time) instead of
    /// `cuMemHostAlloc` chunks, so that its frames can be mapped at other addresses: what
    /// pointer ranges (`drm-pagemap-uffd`) need ([`PinnedHostMemory::memfd`]). The memory
    /// is pinned either way and frames are never given back to the system while it lives.
    /// Default `false`.
    pub host_memfd: bool,
    /// Small copies skip the driver's submission (opt-in, default `false`): each pagemap
    /// keeps a persistent copy kernel (`dpm_ring`: **one block of 512 threads, holding one
    /// multiprocessor** of the GPU while it runs) that polls a ring of descriptors in pinned
    /// host memory and completes through a word the CPU polls. A copy takes the ring when it
    /// has at most 64 entries and 1 MiB, its pre-fence has signalled (or is an earlier ring
    /// copy of the same pagemap) and the copy stream has nothing pending; otherwise, or when
    /// the ring is full, it takes the stream as before. Copies queued on the stream after ring
    /// copies wait for them on the device (`cuStreamWaitValue64`), so the pagemap's copies
    /// stay in submission order. The kernel is started on demand and stopped after
    /// [`ring_idle`](Self::ring_idle) without copies (a keeper thread per pagemap decides),
    /// or after a 20 ms lease while busy (then restarted), so an implicitly synchronising
    /// driver call of the application (`cuCtxSynchronize`, `cuMemFree`, an allocation)
    /// waits at most about that long for it. Needs 64-bit stream memory operations (a CUDA
    /// 11.7 or newer driver); without them pagemaps use the stream only
    /// ([`CudaPagemap::ring_status`] says why). Both kernel sources have the ring's kernel.
    /// Ring fences have no native handle: other queues wait for them from the host.
    pub ring: bool,
    /// Copies staged for the gather/scatter kernel use Hopper's bulk copies
    /// (`dpm_copy_pages_bulk`: one `cp.async.bulk` per 4 KiB into shared memory and one out,
    /// issued by the SM's tensor memory accelerator) instead of 16-byte loads and stores.
    /// NVRTC builds for sm_90 and later only (elsewhere the plain kernel runs). Default
    /// `false`; BENCHMARKS.md compares both.
    pub bulk: bool,
    /// How long the ring's kernel may sit idle before it is stopped (default
    /// [`DEFAULT_RING_IDLE`], at least 50 us).
    pub ring_idle: std::time::Duration,
}

impl Default for CudaConfig {
    fn default() -> Self {
        CudaConfig {
            devices: None,
            device_capacity: None,
            host_capacity: DEFAULT_HOST_CAPACITY,
            dma_min_host: DEFAULT_DMA_MIN_HOST,
            dma_min_device: DEFAULT_DMA_MIN_DEVICE,
            kernel: KernelSource::Auto,
            vmm: true,
            clear_on_free: true,
            disable: false,
            host_memfd: false,
            ring: false,
            bulk: false,
            ring_idle: DEFAULT_RING_IDLE,
        }
    }
}

impl CudaConfig {
    /// The default config with what the environment sets (the variables in the table
    /// above): `CudaConfig::from_backend_config(&BackendConfig::from_env())`. For binaries,
    /// tests and benches; library code does not call it. A variable whose value does not
    /// parse is an [`OptionError`] naming its option.
    pub fn from_env() -> Result<CudaConfig, OptionError> {
        CudaConfig::from_backend_config(&BackendConfig::from_env())
    }

    /// A config from the generic backend config: its device count and host capacity, and
    /// its `cuda.*` options (the table above); what is not set keeps its default.
    /// [`BackendConfig::device_capacity`] is for simulated devices and is not used: a GPU
    /// offers its memory (pagemaps back it lazily; their own capacity comes with each
    /// [`PagemapSpec`]); `cuda.device_capacity` limits it. Another `cuda.*` key, or a value
    /// that does not parse, is an [`OptionError`] naming the key; other backends' keys are
    /// left to them.
    pub fn from_backend_config(c: &BackendConfig) -> Result<CudaConfig, OptionError> {
        let d = CudaConfig::default();
        let mut r = c.options.reader("cuda")?;
        let config = CudaConfig {
            devices: c.devices,
            device_capacity: r.bytes("device_capacity")?.or(d.device_capacity),
            host_capacity: c.host_capacity.unwrap_or(d.host_capacity),
            dma_min_host: r.bytes("dma_min_host")?.unwrap_or(d.dma_min_host),
            dma_min_device: r.bytes("dma_min_device")?.unwrap_or(d.dma_min_device),
            kernel: r
                .choice(
                    "kernel",
                    &[
                        ("auto", KernelSource::Auto),
                        ("nvrtc", KernelSource::Nvrtc),
                        ("ptx", KernelSource::Fallback),
                        ("fallback", KernelSource::Fallback),
                    ],
                )?
                .unwrap_or(d.kernel),
            vmm: r.bool("vmm")?.unwrap_or(d.vmm),
            clear_on_free: r.bool("clear_on_free")?.unwrap_or(d.clear_on_free),
            disable: r.bool("disable")?.unwrap_or(d.disable),
            host_memfd: r.bool("host_memfd")?.unwrap_or(d.host_memfd),
            ring: r.bool("ring")?.unwrap_or(d.ring),
            bulk: r.bool("bulk")?.unwrap_or(d.bulk),
            ring_idle: r
                .duration("ring_idle")?
                .unwrap_or(d.ring_idle)
                .max(std::time::Duration::from_micros(50)),
        };
        r.finish()?;
        Ok(config)
    }

    /// Checks what needs no driver: at least one device asked for, a host capacity of at
    /// most [`MAX_HOST_CAPACITY`]. [`CudaBackend::new`] checks it first, so a bad config is
    /// reported as such ([`BackendErrorKind::BadConfig`]) on any machine.
    pub fn validate(&self) -> Result<(), BackendError> {
        let bad = |m: String| BackendError::new(BackendErrorKind::BadConfig, m);
        if self.devices == Some(0) {
            return Err(bad("cuda: 0 devices requested (at least 1)".into()));
        }
        if self.host_capacity > MAX_HOST_CAPACITY {
            return Err(bad(format!(
                "cuda host memory: capacity {} bytes exceeds the limit of {MAX_HOST_CAPACITY} \
                 bytes (128 TiB, the user address space)",
                self.host_capacity
            )));
        }
        Ok(())
    }
}

/// Whether the backend can be used here; `Err` says why not ("no NVIDIA driver: ...",
/// "no CUDA device"). Asks the driver only; [`probe_with`] also honours a config's
/// [`disable`](CudaConfig::disable). Never panics.
pub fn probe() -> Result<(), String> {
    driver::probe().map(|_| ())
}

/// Whether the backend can be used here with `config`: "disabled by option cuda.disable" when
/// [`CudaConfig::disable`] is set, else [`probe`]. Never panics.
pub fn probe_with(config: &CudaConfig) -> Result<(), String> {
    if config.disable {
        return Err(DISABLED.into());
    }
    probe()
}

const DISABLED: &str = "disabled by option cuda.disable (env DRM_PAGEMAP_CUDA_DISABLE)";

/// The CUDA driver version (e.g. 13000), when a driver is present.
pub fn driver_version() -> Option<i32> {
    driver::probe().ok().map(|p| p.driver_version)
}

/// Opens the backend from a generic config (used by the registry): an option
/// [`CudaConfig::from_backend_config`] refuses is [`BackendErrorKind::BadConfig`].
pub fn open(config: &BackendConfig) -> Result<Box<dyn Backend>, BackendError> {
    Ok(Box::new(CudaBackend::new(
        CudaConfig::from_backend_config(config)?,
    )?))
}

/// The CUDA backend: GPUs, host memory, pagemaps.
pub struct CudaBackend {
    // Field order is drop order: pagemaps and host memory before the devices.
    pagemaps: Mutex<Vec<(PagemapId, Arc<CudaPagemap>)>>,
    host: Arc<PinnedHostMemory>,
    devices: Vec<Arc<CudaDevice>>,
    /// Owner group of each device (devices of one group have peer access both ways).
    groups: Vec<u32>,
    config: CudaConfig,
    driver_version: i32,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field(
                "devices",
                &self.devices.iter().map(|d| &d.name).collect::<Vec<_>>(),
            )
            .field("groups", &self.groups)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl CudaBackend {
    /// Opens every GPU (up to `config.devices`), enables peer access where both directions
    /// allow it, and sets up the host memory. Fails (never panics) without a driver or GPU,
    /// and when the config [disables](CudaConfig::disable) the backend.
    pub fn new(config: CudaConfig) -> Result<CudaBackend, BackendError> {
        config.validate()?;
        if config.disable {
            return Err(BackendError::new(
                BackendErrorKind::Unavailable,
                format!("cuda: {DISABLED}"),
            ));
        }
        let info =
            driver::probe().map_err(|r| BackendError::new(BackendErrorKind::Unavailable, r))?;
        let n = config
            .devices
            .map_or(info.devices as usize, |d| d.min(info.devices as usize));
        if n == 0 {
            return Err(BackendError::new(
                BackendErrorKind::Unavailable,
                "cuda: no device",
            ));
        }
        let mut devices = Vec::with_capacity(n);
        for i in 0..n {
            devices.push(Arc::new(CudaDevice::open(
                i as i32,
                DeviceId(i as u32),
                config.vmm,
                config.kernel,
            )?));
        }
        let groups = peer_groups(&devices);
        let host = Arc::new(PinnedHostMemory::new(
            devices[0].ctx.clone(),
            config.host_capacity,
            n as u32,
            config.host_memfd,
        )?);
        Ok(CudaBackend {
            pagemaps: Mutex::new(Vec::new()),
            host,
            devices,
            groups,
            config,
            driver_version: info.driver_version,
        })
    }

    /// The driver's CUDA version (e.g. 13000).
    pub fn driver_version(&self) -> i32 {
        self.driver_version
    }

    /// The host memory as the concrete type.
    pub fn pinned_host(&self) -> &Arc<PinnedHostMemory> {
        &self.host
    }

    /// The owner group of `device`.
    pub fn owner_group(&self, device: DeviceId) -> u32 {
        self.groups
            .get(device.0 as usize)
            .copied()
            .unwrap_or(u32::MAX)
    }

    /// Pagemap `id` as the concrete type, if this backend created it.
    pub fn cuda_pagemap(&self, id: PagemapId) -> Option<Arc<CudaPagemap>> {
        let maps = self.pagemaps.lock().unwrap_or_else(|p| p.into_inner());
        maps.iter()
            .rev()
            .find(|(i, _)| *i == id)
            .map(|(_, p)| p.clone())
    }

    /// The configuration.
    pub fn config(&self) -> &CudaConfig {
        &self.config
    }

    fn device_capacity(&self, d: &CudaDevice) -> u64 {
        match self.config.device_capacity {
            Some(c) => c.min(d.total_mem),
            // Eager arenas claim their whole capacity at once: offer half the device.
            None if !d.vmm => d.total_mem / 2,
            None => d.total_mem,
        }
    }
}

/// Enables peer access between devices that allow it both ways; returns each device's group
/// (connected components of that relation).
fn peer_groups(devices: &[Arc<CudaDevice>]) -> Vec<u32> {
    let n = devices.len();
    let mut group: Vec<u32> = (0..n as u32).collect();
    fn find(g: &mut [u32], i: u32) -> u32 {
        let mut r = i;
        while g[r as usize] != r {
            r = g[r as usize];
        }
        g[i as usize] = r;
        r
    }
    for i in 0..n {
        for j in i + 1..n {
            let can = |a: &CudaDevice, b: &CudaDevice| {
                driver::peer::can_access(&a.ctx, &b.ctx).unwrap_or(false)
            };
            let (a, b) = (&devices[i], &devices[j]);
            if !(can(a, b) && can(b, a)) {
                continue;
            }
            let enable = |from: &CudaDevice, to: &CudaDevice| {
                if from.ctx.bind().is_err() {
                    return false;
                }
                // Access already enabled counts as enabled.
                driver::peer::enable_access(&to.ctx).is_ok()
            };
            if enable(a, b) && enable(b, a) {
                let (ra, rb) = (find(&mut group, i as u32), find(&mut group, j as u32));
                group[ra.max(rb) as usize] = ra.min(rb);
            }
        }
    }
    (0..n as u32).map(|i| find(&mut group, i)).collect()
}

impl Backend for CudaBackend {
    fn name(&self) -> &str {
        "cuda"
    }

    fn device_count(&self) -> usize {
        self.devices.len()
    }

    fn device_info(&self, index: usize) -> Option<DeviceInfo> {
        let d = self.devices.get(index)?;
        Some(DeviceInfo {
            id: d.id,
            name: DeviceName::new(&d.name),
            memory_bytes: self.device_capacity(d),
        })
    }

    fn host_memory(&self) -> Arc<dyn HostMemory> {
        self.host.clone()
    }

    fn create_pagemap(&self, spec: &PagemapSpec) -> Result<Pagemap, BackendError> {
        let dev = self
            .devices
            .get(spec.device.0 as usize)
            .ok_or_else(|| {
                BackendError::new(
                    BackendErrorKind::Unsupported,
                    format!(
                        "cuda: {} does not exist ({} devices)",
                        spec.device,
                        self.devices.len()
                    ),
                )
            })?
            .clone();
        let g = self.owner_group(spec.device);
        let group: Vec<DeviceId> = self
            .devices
            .iter()
            .filter(|d| self.owner_group(d.id) == g)
            .map(|d| d.id)
            .collect();
        let peers: Vec<i32> = self
            .devices
            .iter()
            .filter(|d| d.id != spec.device && self.owner_group(d.id) == g)
            .map(|d| d.ordinal)
            .collect();
        let capacity = spec.capacity_bytes.min(self.device_capacity(&dev));
        let pm = Arc::new(CudaPagemap::new(
            dev.clone(),
            group,
            &peers,
            self.host.clone(),
            capacity,
            &self.config,
            spec.id,
        )?);
        pm.set_self();
        self.pagemaps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((spec.id, pm.clone()));
        Ok(Pagemap::new(
            spec.id,
            spec.owner.unwrap_or(OwnerId(g)),
            spec.device,
            format!("cuda{}:{}", spec.device.0, spec.id.0),
            pm.clone(),
            pm,
        ))
    }

    fn can_access_peer(&self, a: DeviceId, b: DeviceId) -> bool {
        a.0 < self.devices.len() as u32 && self.owner_group(a) == self.owner_group(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::{FALLBACK_PTX, KERNEL_SOURCE};

    #[test]
    fn probe_and_open_never_panic() {
        match probe() {
            Ok(()) => {
                let b = open(&BackendConfig::default()).expect("probe said yes");
                assert!(!b.devices().is_empty());
            }
            Err(reason) => {
                assert!(!reason.is_empty());
                let e = open(&BackendConfig::default())
                    .err()
                    .expect("no driver: open fails");
                assert_eq!(e.kind, BackendErrorKind::Unavailable);
                assert!(e.to_string().starts_with("unavailable: "), "{e}");
            }
        }
        // Cached: asking again gives the same answer.
        assert_eq!(probe().is_ok(), probe().is_ok());
    }

    #[test]
    fn configs_past_the_limits_are_refused_before_any_driver_call() {
        // Regression: 0 devices was "unavailable" (and only after probing the driver); a
        // host capacity of u64::MAX sized a chunk table of 2^38 entries and aborted.
        let with = |devices, host_capacity| CudaConfig {
            devices,
            host_capacity,
            ..CudaConfig::default()
        };
        for (c, names) in [
            (with(Some(0), DEFAULT_HOST_CAPACITY), vec!["0 devices"]),
            (
                with(None, MAX_HOST_CAPACITY + 1),
                vec!["host memory", "140737488355329", "140737488355328"],
            ),
            (
                with(Some(1), u64::MAX),
                vec!["host memory", "18446744073709551615", "140737488355328"],
            ),
        ] {
            let e = CudaBackend::new(c).expect_err("refused");
            assert_eq!(e.kind, BackendErrorKind::BadConfig, "{e}");
            for n in names {
                assert!(e.to_string().contains(n), "{e} does not name {n:?}");
            }
        }
        for c in [
            with(None, MAX_HOST_CAPACITY),
            with(Some(usize::MAX), 0),
            with(Some(1), 1),
        ] {
            c.validate().unwrap();
        }
    }

    fn with_options(pairs: &[(&str, &str)]) -> BackendConfig {
        let mut c = BackendConfig::default();
        for (k, v) in pairs {
            c.options.set(*k, *v).unwrap();
        }
        c
    }

    #[test]
    fn default_is_the_documented_constants() {
        let d = CudaConfig::default();
        assert_eq!(
            (d.devices, d.device_capacity, d.host_capacity),
            (None, None, DEFAULT_HOST_CAPACITY)
        );
        assert_eq!(
            (d.dma_min_host, d.dma_min_device),
            (DEFAULT_DMA_MIN_HOST, DEFAULT_DMA_MIN_DEVICE)
        );
        assert_eq!(
            (d.kernel, d.vmm, d.clear_on_free, d.disable, d.host_memfd),
            (KernelSource::Auto, true, true, false, false)
        );
        assert_eq!((d.ring, d.ring_idle), (false, DEFAULT_RING_IDLE));
        assert_eq!(
            CudaConfig::from_backend_config(&BackendConfig::default()).unwrap(),
            d
        );
    }

    #[test]
    fn every_option_reaches_its_field() {
        let c = CudaConfig::from_backend_config(&BackendConfig {
            devices: Some(2),
            host_capacity: Some(1 << 30),
            // Not a CUDA knob: pagemaps get their capacity from their spec.
            device_capacity: Some(123),
            options: with_options(&[
                ("cuda.dma_min_host", "4096"),
                ("cuda.dma_min_device", "64MiB"),
                ("cuda.vmm", "0"),
                ("cuda.clear_on_free", "off"),
                ("cuda.kernel", "ptx"),
                ("cuda.device_capacity", "8G"),
                ("cuda.disable", "true"),
                ("cuda.host_memfd", "1"),
                ("cuda.ring", "1"),
                ("cuda.ring_idle", "5ms"),
                ("cuda.bulk", "1"),
                ("sim.copy_latency", "1ms"),
            ])
            .options,
        })
        .unwrap();
        assert_eq!(
            c,
            CudaConfig {
                devices: Some(2),
                device_capacity: Some(8 << 30),
                host_capacity: 1 << 30,
                dma_min_host: 4096,
                dma_min_device: 64 << 20,
                kernel: KernelSource::Fallback,
                vmm: false,
                clear_on_free: false,
                disable: true,
                host_memfd: true,
                ring: true,
                ring_idle: std::time::Duration::from_millis(5),
                bulk: true,
            }
        );
        for (v, k) in [
            ("auto", KernelSource::Auto),
            ("nvrtc", KernelSource::Nvrtc),
            ("fallback", KernelSource::Fallback),
        ] {
            let c = CudaConfig::from_backend_config(&with_options(&[("cuda.kernel", v)]));
            assert_eq!(c.unwrap().kernel, k, "{v}");
        }
    }

    #[test]
    fn bad_options_are_refused_naming_the_key() {
        for (key, value) in [
            ("cuda.vmm", "maybe"),
            ("cuda.clear_on_free", ""),
            ("cuda.kernel", "cubin"),
            ("cuda.dma_min_host", "-1"),
            ("cuda.dma_min_device", "1PiB"),
            ("cuda.device_capacity", "lots"),
            ("cuda.disable", "2"),
            ("cuda.host_memfd", "yes please"),
            ("cuda.ring", "fast"),
            ("cuda.ring_idle", "soon"),
            ("cuda.vmmm", "0"),
            ("cuda.host_capacity", "1G"),
        ] {
            let cfg = with_options(&[(key, value)]);
            let e = CudaConfig::from_backend_config(&cfg).expect_err(key);
            assert_eq!(e.key(), Some(key), "{e}");
            // Through `open`, before any driver call: a bad config on any machine.
            let b = open(&cfg).err().expect(key);
            assert_eq!(b.kind, BackendErrorKind::BadConfig, "{b}");
            assert!(b.message.contains(key), "{b}");
        }
        let e = CudaConfig::from_backend_config(&with_options(&[("cuda.vmmm", "0")])).unwrap_err();
        assert!(
            e.to_string().contains("vmm") && e.to_string().contains("clear_on_free"),
            "names the known keys: {e}"
        );
    }

    #[test]
    fn a_disabled_backend_is_unavailable_before_any_driver_call() {
        let cfg = CudaConfig {
            disable: true,
            ..CudaConfig::default()
        };
        let why = probe_with(&cfg).unwrap_err();
        assert!(why.contains("cuda.disable"), "{why}");
        assert_eq!(probe_with(&CudaConfig::default()), probe());
        let e = CudaBackend::new(cfg).expect_err("disabled");
        assert_eq!(e.kind, BackendErrorKind::Unavailable);
        assert!(e.message.contains("cuda.disable"), "{e}");
        let e = open(&with_options(&[("cuda.disable", "1")]))
            .err()
            .expect("disabled");
        assert_eq!(e.kind, BackendErrorKind::Unavailable);
    }

    #[test]
    fn kernel_sources_agree_on_names() {
        for name in ["dpm_copy_pages", "dpm_spin", "dpm_ring"] {
            assert!(KERNEL_SOURCE.contains(name));
            assert!(FALLBACK_PTX.contains(&format!(".entry {name}")));
        }
    }
}
