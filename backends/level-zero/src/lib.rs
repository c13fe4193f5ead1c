//! # drm-pagemap-level-zero
//!
//! The Level Zero backend of drm-pagemap, registered as `"level-zero"`: drm-pagemap-core's
//! [`Backend`], [`HostMemory`], `PagemapOps` and `DevmemOps` on Level Zero devices, through
//! Debian's real loader (`libze_loader.so.1`, opened at run time by `level-zero-sys`'s
//! [`Loader`]: the crate builds and its tests pass on machines
//! without Level Zero; there [`probe`] says why the backend is unavailable and [`open`]
//! fails, nothing panics).
//!
//! ## Verified where, and how
//!
//! Verified through Debian's Level Zero loader 1.8.12 against the workspace's software
//! driver (`ze-soft`, loaded with `ZE_ENABLE_ALT_DRIVERS`): copies with bytes read back on
//! immediate and regular lists, peer pushes, pre-fences as wait events, bridged host fences,
//! event recycling under load, out of device memory, a lost device, injected append and
//! submission failures, an event that never signals, eight threads copying at once, clears
//! on free (recycled pages read back as zeros with no pre-migrate fence) and their failure; the
//! same scenario with the loader wrapping every handle (`ZE_ENABLE_LOADER_INTERCEPT=1`) and
//! under the validation layer (`ZE_ENABLE_VALIDATION_LAYER=1
//! ZE_ENABLE_PARAMETER_VALIDATION=1`, every call accepted). **It has not yet run on Intel
//! hardware**: the crate's tests always route the loader to `ze-soft` (they need its fault
//! injection and counters), so no real driver has exercised it.
//!
//! ## The contract
//!
//! - **Devices**: every root device of every driver (`zeInit(ZE_INIT_FLAG_GPU_ONLY)`) with a
//!   queue group that copies; one context per driver.
//! - **System pages** ([`ZeHostMemory`]): `zeMemAllocHost` chunks of [`CHUNK_BYTES`] in the
//!   first driver's context, allocated as needed and shared by that context's devices:
//!   mapping a system page for a device is an address computation.
//! - **Pagemaps** ([`ZePagemap`]): device memory in chunks (`zeMemAllocDevice`, at most
//!   [`CHUNK_BYTES`] each, made when a page first lands in them), several pagemaps per
//!   device, pages handed out by an extent allocator. Pages not known to hold zeros are
//!   cleared by `zeCommandListAppendMemoryFill` when allocated; that clear is the
//!   allocation's pre-migrate fence. With [`LevelZeroConfig::clear_on_free`] (the default)
//!   released pages are cleared on the way back and reach the allocator once that clear has
//!   completed, so an allocation of recycled pages has no pre-migrate fence; out of pages,
//!   an allocation waits for pending clears of released pages (at most 10 s) and retries.
//! - **Copies** run on the device's copy group (a COPY-only group when there is one; each
//!   pagemap takes a queue of it in turn). A call's physically contiguous entries are merged
//!   into runs (never across an allocation); a call of fewer than
//!   [`LevelZeroConfig::regular_list_min_runs`] runs goes to the pagemap's immediate command
//!   list, a larger one is recorded as one regular command list (one append per run) and
//!   submitted once. Several commands are framed by barriers: the first waits for the
//!   pre-fence, the last signals the call's event. The default threshold
//!   ([`DEFAULT_REGULAR_LIST_MIN_RUNS`], 128) is where the calling thread's cost crosses
//!   over (bench `l0_copy`, BENCHMARKS.md).
//! - **Fences** ([`ZeFence`]) are events from host-visible pools, recycled (reset) only once
//!   retired: the fence is gone and every command that signals or waits for the event has
//!   completed. Each call is retired on its own event: an event that never signals (a hung
//!   command) keeps its call's record, and so the event, for ever (it is never reset while
//!   that command might still signal it), without holding back later calls; its fence's
//!   [`Fence::wait_timeout`](drm_pagemap_core::Fence::wait_timeout) returns
//!   [`FenceError::Timeout`](drm_pagemap_core::FenceError::Timeout).
//!   A pre-fence that is an event of the same context ([`LEVEL_ZERO_EVENT`](drm_pagemap_core::NativeFenceKind::LEVEL_ZERO_EVENT),
//!   also inside a [`drm_pagemap_core::FenceArray`]) is a wait event of the first command (no
//!   CPU wait); any other pending pre-fence is bridged into the queue: the command waits for a
//!   fresh event that a callback of that fence host-signals (no thread per copy); a failed
//!   pre-fence fails the returned fence without queuing anything.
//! - **Peers**: devices of one driver that `zeDeviceCanAccessPeer` both ways form an owner
//!   group; a source pushes into a peer's device memory directly, otherwise the core stages
//!   pages through system memory.
//! - **Errors** keep every `ze_result_t` (in the message, and in
//!   [`BackendErrorKind::Driver`]; see [`ze_result_of`]); device lost and out of device or
//!   host memory are [`BackendErrorKind::DeviceLost`] and [`BackendErrorKind::OutOfMemory`].
//!   A call whose first append fails queues nothing and returns the error; one whose later
//!   append fails closes what it queued with a barrier and returns a fence that fails once
//!   that has completed, so nothing is freed under a running command.
//!
//! ## Options
//!
//! [`LevelZeroConfig`] (pure `Default`), or a [`BackendConfig`]'s `level-zero.*` options
//! ([`LevelZeroConfig::from_backend_config`]): `level-zero.regular_list_min_runs` (runs from
//! which a call is a regular list, default 128), `level-zero.clear_on_free` (default true),
//! `level-zero.device_capacity` (bytes offered per device, default the device's memory),
//! `level-zero.disable`; the generic device count
//! and host capacity (default 16 GiB, allocated lazily). The library reads no environment
//! variable (the loader and the drivers it loads read theirs).
//!
//! ## Limits
//!
//! - System memory lives in the first driver's context, so devices of other drivers cannot
//!   map system pages (their `map_frames` fails).
//! - Dropping a pagemap waits at most 5 s for its pending work (a lost device or a hung
//!   event never completes it).
//! - Device memory chunks are freed only when their pagemap is dropped: a chunk whose pages
//!   are all free stays allocated (freeing it would need the lock-free address lookup of
//!   every copy, and the map of clean pages, to take a lock or an epoch against a chunk
//!   going away under a call being planned).
//! - More than 16 consecutive calls whose events never signal hold back the retirement of
//!   the calls after them (they are kept until the pagemap is dropped).

mod device;
mod events;
mod fence;
mod host;
mod pagemap;
#[cfg(feature = "testing")]
pub mod testing;
mod ze;

pub use events::EventStats;
pub use fence::{HostEvent, ZeFence, ze_result_of};
pub use host::ZeHostMemory;
pub use pagemap::{ZePagemap, ZeStats};

use device::ZeDevice;
use drm_pagemap_core::{
    Backend, BackendConfig, BackendError, BackendErrorKind, DeviceId, DeviceInfo, DeviceName,
    FenceContext, HostMemory, OptionError, OwnerId, Pagemap, PagemapId, PagemapSpec,
};
use events::Events;
use level_zero_sys::Loader;
use std::sync::{Arc, Mutex};
use ze::discover;
use ze::objects::Context;

/// Bytes of one memory chunk (host and device): every allocation of the backend starts at a
/// multiple of it and is at most that long, so merged runs never cross an allocation.
pub const CHUNK_BYTES: u64 = 64 << 20;
/// Default bytes of host memory for system pages (allocated lazily, a chunk at a time).
pub const DEFAULT_HOST_CAPACITY: u64 = 16 << 30;
/// Most bytes of host memory for system pages: 128 TiB, the user address space of x86-64.
pub const MAX_HOST_CAPACITY: u64 = 1 << 47;
/// Default runs from which a call is recorded in a regular command list instead of the
/// immediate list: where the calling thread's cost of a scattered 4 KiB call crosses over
/// (bench `l0_copy`, BENCHMARKS.md, "Level Zero"): through the loader and the software
/// driver the immediate list costs less up to 64 runs, the regular list from 128 on. The
/// backend's own work per run is the same on both paths; the crossover is the driver's, so
/// re-measure it on Intel hardware (`level-zero.regular_list_min_runs`).
pub const DEFAULT_REGULAR_LIST_MIN_RUNS: usize = 128;

/// How to open the Level Zero backend.
///
/// `Default` is pure; it reads no environment variable. Options (`level-zero.KEY`):
///
/// | key | value | field |
/// |---|---|---|
/// | `regular_list_min_runs` | a positive integer | [`regular_list_min_runs`](Self::regular_list_min_runs) |
/// | `device_capacity` | a byte count | [`device_capacity`](Self::device_capacity) |
/// | `clear_on_free` | a boolean | [`clear_on_free`](Self::clear_on_free) |
/// | `disable` | a boolean | [`disable`](Self::disable) |
///
/// [`BackendConfig::devices`] and [`BackendConfig::host_capacity`] set
/// [`devices`](Self::devices) and [`host_capacity`](Self::host_capacity);
/// [`BackendConfig::device_capacity`] is for simulated devices and is not used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LevelZeroConfig {
    /// Use at most this many devices (`None`: all; `Some(0)` is refused).
    pub devices: Option<usize>,
    /// Bytes of device memory offered per device (`None`: its total memory).
    pub device_capacity: Option<u64>,
    /// Bytes of host memory for system pages (at most [`MAX_HOST_CAPACITY`]).
    pub host_capacity: u64,
    /// Calls of at least this many runs are recorded in a regular command list and
    /// submitted once; smaller ones go to the immediate list (at least 1).
    pub regular_list_min_runs: usize,
    /// Clear released pages on the way back (a memory fill queued at release; the pages
    /// reach the allocator once it has completed), so that an allocation of recycled pages
    /// has nothing to clear and no pre-migrate fence. `false`: every allocation clears its
    /// pages (the clear is its pre-migrate fence). Fresh device memory is cleared when first
    /// allocated either way. Default `true`.
    pub clear_on_free: bool,
    /// Do not use Level Zero: [`probe_with`] reports the backend unavailable and
    /// [`LevelZeroBackend::new`] refuses ([`BackendErrorKind::Unavailable`]).
    pub disable: bool,
}

impl Default for LevelZeroConfig {
    fn default() -> Self {
        LevelZeroConfig {
            devices: None,
            device_capacity: None,
            host_capacity: DEFAULT_HOST_CAPACITY,
            regular_list_min_runs: DEFAULT_REGULAR_LIST_MIN_RUNS,
            clear_on_free: true,
            disable: false,
        }
    }
}

impl LevelZeroConfig {
    /// A config from the generic backend config: its device count and host capacity, and
    /// its `level-zero.*` options (the table above). Another `level-zero.*` key, or a value
    /// that does not parse, is an [`OptionError`] naming the key.
    pub fn from_backend_config(c: &BackendConfig) -> Result<LevelZeroConfig, OptionError> {
        let d = LevelZeroConfig::default();
        let mut r = c.options.reader(NAME)?;
        let regular_list_min_runs = match r.raw("regular_list_min_runs") {
            None => d.regular_list_min_runs,
            Some((key, value)) => match value.parse::<usize>() {
                Ok(n) if n > 0 => n,
                _ => {
                    return Err(OptionError::BadValue {
                        key,
                        value: value.into(),
                        expected: "a positive integer (runs per call)".into(),
                    });
                }
            },
        };
        let config = LevelZeroConfig {
            devices: c.devices,
            device_capacity: r.bytes("device_capacity")?.or(d.device_capacity),
            host_capacity: c.host_capacity.unwrap_or(d.host_capacity),
            regular_list_min_runs,
            clear_on_free: r.bool("clear_on_free")?.unwrap_or(d.clear_on_free),
            disable: r.bool("disable")?.unwrap_or(d.disable),
        };
        r.finish()?;
        Ok(config)
    }

    /// Checks what needs no driver: at least one device, a host capacity of at most
    /// [`MAX_HOST_CAPACITY`], at least one run per regular list.
    pub fn validate(&self) -> Result<(), BackendError> {
        let bad = |m: String| BackendError::new(BackendErrorKind::BadConfig, m);
        if self.devices == Some(0) {
            return Err(bad("level-zero: 0 devices requested (at least 1)".into()));
        }
        if self.host_capacity > MAX_HOST_CAPACITY {
            return Err(bad(format!(
                "level-zero host memory: capacity {} bytes exceeds the limit of \
                 {MAX_HOST_CAPACITY} bytes (128 TiB, the user address space)",
                self.host_capacity
            )));
        }
        if self.regular_list_min_runs == 0 {
            return Err(bad(
                "level-zero: regular_list_min_runs must be at least 1".into()
            ));
        }
        Ok(())
    }
}

/// The backend's name in the registry and its options' prefix.
pub const NAME: &str = "level-zero";

const DISABLED: &str = "disabled by option level-zero.disable";

/// Whether the backend can be used here: the loader opens, `zeInit` succeeds, and there is at
/// least one device; `Err` says why not. Never panics.
pub fn probe() -> Result<(), String> {
    let loader = Loader::open().map_err(|e| e.to_string())?;
    discover::init(&loader).map_err(|f| format!("{f} (no Level Zero driver loaded)"))?;
    let drivers = discover::drivers(&loader).map_err(|f| f.to_string())?;
    let mut devices = 0usize;
    for d in drivers {
        devices += discover::devices(&loader, d)
            .map_err(|f| f.to_string())?
            .len();
    }
    if devices == 0 {
        return Err("no Level Zero device".into());
    }
    Ok(())
}

/// [`probe`], or "disabled by option level-zero.disable" when `config` disables the backend.
pub fn probe_with(config: &LevelZeroConfig) -> Result<(), String> {
    if config.disable {
        return Err(DISABLED.into());
    }
    probe()
}

/// Opens the backend from a generic config (what a registry calls): an option
/// [`LevelZeroConfig::from_backend_config`] refuses is [`BackendErrorKind::BadConfig`].
pub fn open(config: &BackendConfig) -> Result<Box<dyn Backend>, BackendError> {
    Ok(Box::new(LevelZeroBackend::new(
        LevelZeroConfig::from_backend_config(config)?,
    )?))
}

/// The Level Zero backend: devices, host memory, pagemaps.
pub struct LevelZeroBackend {
    // Field order is drop order: pagemaps and host memory before the devices.
    pagemaps: Mutex<Vec<(PagemapId, Arc<ZePagemap>)>>,
    host: Arc<ZeHostMemory>,
    devices: Vec<Arc<ZeDevice>>,
    /// Owner group of each device.
    groups: Vec<u32>,
    config: LevelZeroConfig,
    /// The loader (the contexts hold it too; the test support asks it for the driver's
    /// extension functions).
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    loader: Loader,
}

impl std::fmt::Debug for LevelZeroBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LevelZeroBackend")
            .field(
                "devices",
                &self
                    .devices
                    .iter()
                    .map(|d| &d.facts.name)
                    .collect::<Vec<_>>(),
            )
            .field("groups", &self.groups)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn unavailable(reason: impl std::fmt::Display) -> BackendError {
    BackendError::new(BackendErrorKind::Unavailable, format!("{NAME}: {reason}"))
}

impl LevelZeroBackend {
    /// Opens every device (up to `config.devices`), forms owner groups from peer access,
    /// and sets up the host memory. Fails (never panics) without a loader, driver or device,
    /// and when the config disables the backend.
    pub fn new(config: LevelZeroConfig) -> Result<LevelZeroBackend, BackendError> {
        config.validate()?;
        if config.disable {
            return Err(unavailable(DISABLED));
        }
        let loader = Loader::open().map_err(unavailable)?;
        discover::init(&loader)
            .map_err(|f| unavailable(format_args!("{f} (no Level Zero driver loaded)")))?;
        let drivers = discover::drivers(&loader).map_err(|f| f.about("driver discovery"))?;
        let limit = config.devices.unwrap_or(usize::MAX);
        let mut devices: Vec<Arc<ZeDevice>> = Vec::new();
        for (di, &drv) in drivers.iter().enumerate() {
            if devices.len() >= limit {
                break;
            }
            let handles = discover::devices(&loader, drv)
                .map_err(|f| f.about(format_args!("devices of driver {di}")))?;
            if handles.is_empty() {
                continue;
            }
            let ctx = Context::create(&loader, drv)
                .map_err(|f| f.about(format_args!("context of driver {di}")))?;
            let events = Events::new(ctx.clone());
            for h in handles {
                if devices.len() >= limit {
                    break;
                }
                let id = DeviceId(devices.len() as u32);
                let facts = discover::facts(&loader, h)
                    .map_err(|f| f.about(format_args!("properties of {id}")))?;
                // A device without a queue group that copies cannot serve a pagemap.
                let Some(facts) = facts else { continue };
                devices.push(Arc::new(ZeDevice::new(
                    id,
                    h,
                    di,
                    ctx.clone(),
                    events.clone(),
                    facts,
                )));
            }
        }
        if devices.is_empty() {
            return Err(unavailable("no Level Zero device with a copy queue group"));
        }
        let groups = peer_groups(&loader, &devices);
        let first = devices[0].driver;
        let reach = devices.iter().map(|d| d.driver == first).collect();
        let host = Arc::new(ZeHostMemory::new(
            devices[0].ctx.clone(),
            config.host_capacity,
            reach,
        )?);
        Ok(LevelZeroBackend {
            pagemaps: Mutex::new(Vec::new()),
            host,
            devices,
            groups,
            config,
            loader,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &LevelZeroConfig {
        &self.config
    }

    /// The host memory as the concrete type.
    pub fn ze_host(&self) -> &Arc<ZeHostMemory> {
        &self.host
    }

    /// The owner group of `device` (`u32::MAX` for a device that does not exist).
    pub fn owner_group(&self, device: DeviceId) -> u32 {
        self.groups
            .get(device.0 as usize)
            .copied()
            .unwrap_or(u32::MAX)
    }

    /// Pagemap `id` as the concrete type, if this backend created it (the latest of that id).
    pub fn ze_pagemap(&self, id: PagemapId) -> Option<Arc<ZePagemap>> {
        let maps = self.pagemaps.lock().unwrap_or_else(|p| p.into_inner());
        maps.iter()
            .rev()
            .find(|(i, _)| *i == id)
            .map(|(_, p)| p.clone())
    }

    /// The counters of the events of `device`'s context.
    pub fn event_stats(&self, device: DeviceId) -> Option<EventStats> {
        Some(self.devices.get(device.0 as usize)?.events.stats())
    }

    /// Whether `device`'s copy group is COPY-only (a copy engine rather than a compute one).
    pub fn copies_on_copy_engine(&self, device: DeviceId) -> Option<bool> {
        Some(self.devices.get(device.0 as usize)?.facts.copy_only)
    }

    /// A Level Zero event of `device`'s context that the host signals, and its fence (kind
    /// [`drm_pagemap_core::NativeFenceKind::LEVEL_ZERO_EVENT`]): a copy of this backend given that fence as
    /// its pre-fence waits for it on the device.
    pub fn host_event(
        &self,
        device: DeviceId,
    ) -> Result<(HostEvent, drm_pagemap_core::Fence), BackendError> {
        let d = self.device(device)?;
        let ev = d
            .events
            .acquire()
            .map_err(|f| f.about(format_args!("host event of {device}")))?;
        Ok(HostEvent::new(ev, device, (FenceContext::new(), 1)))
    }

    fn device(&self, device: DeviceId) -> Result<&Arc<ZeDevice>, BackendError> {
        self.devices.get(device.0 as usize).ok_or_else(|| {
            BackendError::new(
                BackendErrorKind::Unsupported,
                format!(
                    "{NAME}: {device} does not exist ({} devices)",
                    self.devices.len()
                ),
            )
        })
    }

    fn device_capacity(&self, d: &ZeDevice) -> u64 {
        self.config
            .device_capacity
            .map_or(d.facts.memory, |c| c.min(d.facts.memory))
    }

    #[cfg(feature = "testing")]
    pub(crate) fn loader(&self) -> &Loader {
        &self.loader
    }

    #[cfg(feature = "testing")]
    pub(crate) fn driver_handle(&self, device: DeviceId) -> Option<ze::Driver> {
        Some(self.devices.get(device.0 as usize)?.ctx.driver)
    }
}

/// Owner groups: connected components of "both ways peer access" among devices of one
/// driver (one context).
fn peer_groups(loader: &Loader, devices: &[Arc<ZeDevice>]) -> Vec<u32> {
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
            let (a, b) = (&devices[i], &devices[j]);
            if a.driver != b.driver {
                continue;
            }
            let can = |x: &ZeDevice, y: &ZeDevice| {
                discover::can_access_peer(loader, x.handle, y.handle).unwrap_or(false)
            };
            if can(a, b) && can(b, a) {
                let (ra, rb) = (find(&mut group, i as u32), find(&mut group, j as u32));
                group[ra.max(rb) as usize] = ra.min(rb);
            }
        }
    }
    (0..n as u32).map(|i| find(&mut group, i)).collect()
}

impl Backend for LevelZeroBackend {
    fn name(&self) -> &str {
        NAME
    }

    fn device_count(&self) -> usize {
        self.devices.len()
    }

    fn device_info(&self, index: usize) -> Option<DeviceInfo> {
        let d = self.devices.get(index)?;
        Some(DeviceInfo {
            id: d.id,
            name: DeviceName::new(&d.facts.name),
            memory_bytes: self.device_capacity(d),
        })
    }

    fn host_memory(&self) -> Arc<dyn HostMemory> {
        self.host.clone()
    }

    fn create_pagemap(&self, spec: &PagemapSpec) -> Result<Pagemap, BackendError> {
        let dev = self.device(spec.device)?.clone();
        let g = self.owner_group(spec.device);
        let reach = self
            .devices
            .iter()
            .map(|d| self.owner_group(d.id) == g)
            .collect();
        let capacity = spec.capacity_bytes.min(self.device_capacity(&dev));
        let pm = Arc::new(ZePagemap::new(
            dev,
            capacity,
            reach,
            self.config.regular_list_min_runs,
            self.config.clear_on_free,
            spec.id,
        )?);
        self.pagemaps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((spec.id, pm.clone()));
        Ok(Pagemap::new(
            spec.id,
            spec.owner.unwrap_or(OwnerId(g)),
            spec.device,
            format!("ze{}:{}", spec.device.0, spec.id.0),
            pm.clone(),
            pm,
        ))
    }

    fn can_access_peer(&self, a: DeviceId, b: DeviceId) -> bool {
        (a.0 as usize) < self.devices.len() && self.owner_group(a) == self.owner_group(b)
    }
}

#[cfg(test)]
mod tests;
