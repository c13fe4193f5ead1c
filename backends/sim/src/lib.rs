//! # drm-pagemap-sim
//!
//! A backend of simulated devices that needs no GPU: the default when none is present, and
//! the engine's test vehicle. Everything is real except the hardware:
//! - each device has a device-memory arena of real bytes with a capacity, carved into pages
//!   by an extent allocator (several pagemaps may share one device); backed on first write,
//!   or all of it when the backend is built ([`SimConfig::resident`], as a GPU's memory is);
//! - each device has a copy engine: a worker thread that executes copy calls in order,
//!   waits for their input fence first, and signals a fence when the bytes have landed;
//! - fresh allocations are cleared asynchronously on that engine and the clear is their
//!   pre-migrate fence;
//! - devices are grouped into owner groups (devices of one group reach each other's memory);
//! - faults can be injected through [`drm_pagemap_testkit::inject::FaultInjector`]: the Nth
//!   allocation, map or copy fails, or the Nth copy fence signals an error or never signals.
//!
//! Configured by [`SimConfig`], or through the generic [`BackendConfig`] with its `sim.*`
//! options (`sim.copy_latency`, `sim.owner_groups`, `sim.resident`:
//! [`SimConfig::from_backend_config`]). No
//! environment variable is read.
//!
//! Memory is made of atomic words ([`drm_pagemap_testkit::mem::AtomicArena`]), so the backend
//! needs no `unsafe`. The arenas, the address encoding of device and host memory
//! ([`drm_pagemap_testkit::mem::arena_addr`]) and the fault injector come from
//! `drm-pagemap-testkit`: this backend is test tooling built over them, which a backend of
//! real devices does not need.

#![forbid(unsafe_code)]

mod device;
mod pagemap;

pub use device::SimStats;
use device::{Memories, SimDevice};
use drm_pagemap_core::{
    Backend, BackendConfig, BackendError, BackendErrorKind, DeviceId, DeviceInfo, DeviceName,
    HostMemory, OptionError, OwnerId, Pagemap, PagemapId, PagemapSpec,
};
use drm_pagemap_testkit::bytes::{BytesHostMemory, FrameBytes};
use drm_pagemap_testkit::inject::FaultInjector;
use drm_pagemap_testkit::mem::ArenaHostMemory;
use pagemap::SimPagemap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The memory id of host memory in sim addresses; device `d` is `FIRST_DEVICE_MEM + d`.
pub const HOST_MEM: u16 = 1;
const FIRST_DEVICE_MEM: u16 = 2;

/// Most devices a sim machine has.
pub const MAX_DEVICES: usize = 64;
/// Most bytes of device memory per device: 16 TiB, what page frame numbers ([`Pfn`], 32 bits
/// counting 4 KiB granules) can address.
///
/// [`Pfn`]: drm_pagemap_core::Pfn
pub const MAX_DEVICE_CAPACITY: u64 = (u32::MAX as u64 + 1) * drm_pagemap_core::GRANULE;
/// Most bytes of host memory: 256 TiB, what the 48-bit offsets of sim addresses reach.
pub const MAX_HOST_CAPACITY: u64 = drm_pagemap_testkit::mem::arena_addr::MAX_OFFSET + 1;

/// How to build a simulated machine.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Number of devices (1 to [`MAX_DEVICES`]).
    pub devices: usize,
    /// Bytes of device memory per device (at most [`MAX_DEVICE_CAPACITY`]; backed lazily, so
    /// a large capacity costs nothing until written).
    pub device_capacity: u64,
    /// Bytes of host memory for system pages (at most [`MAX_HOST_CAPACITY`]; backed lazily).
    pub host_capacity: u64,
    /// Owner group of each device (devices of one group reach each other); `None`: one group.
    pub owner_groups: Option<Vec<u32>>,
    /// Extra time each copy call takes (to widen race windows in tests).
    pub copy_latency: Duration,
    /// Back every device's memory when the backend is built (all cores at once), as a
    /// GPU's memory is resident: copies into it then pay no page fault on first write. Costs
    /// the devices' whole capacity in RAM and the time to fault it in at start-up
    /// ([`SimBackend::resident_time`]); off by default, where a large capacity costs
    /// nothing until written.
    pub resident: bool,
    /// Fault injection shared by every pagemap and the host memory.
    pub faults: Option<Arc<FaultInjector>>,
    /// The bytes of system memory, instead of the default arena (which `host_capacity`
    /// sizes): for example `drm-pagemap-uffd`'s memfd memory, whose frames a process maps at
    /// a range's addresses. Its length is the host capacity then.
    pub host_bytes: Option<Arc<dyn FrameBytes>>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            devices: 3,
            device_capacity: 4 << 30,
            host_capacity: 8 << 30,
            owner_groups: None,
            copy_latency: Duration::ZERO,
            resident: false,
            faults: None,
            host_bytes: None,
        }
    }
}

impl SimConfig {
    /// A config from the generic backend config: its sizes (missing ones keep their
    /// defaults) and its `sim.*` options:
    ///
    /// | key | value | sets |
    /// |---|---|---|
    /// | `sim.copy_latency` | a duration (`0`, `250us`, `5ms`) | [`copy_latency`](Self::copy_latency) |
    /// | `sim.owner_groups` | a list, one group per device (`0,0,1`) | [`owner_groups`](Self::owner_groups) |
    /// | `sim.resident` | a boolean | [`resident`](Self::resident) |
    /// | `sim.disable` | a boolean | nothing here: [`open`] refuses (unavailable) |
    ///
    /// Another `sim.*` key, or a value that does not parse, is an [`OptionError`] naming the
    /// key; other backends' keys are left to them. [`faults`](Self::faults) is a live object,
    /// not an option: set the field.
    pub fn from_backend_config(c: &BackendConfig) -> Result<SimConfig, OptionError> {
        let d = SimConfig::default();
        let mut r = c.options.reader("sim")?;
        let copy_latency = r.duration("copy_latency")?.unwrap_or(d.copy_latency);
        let owner_groups = r.u32_list("owner_groups")?.or(d.owner_groups);
        let resident = r.bool("resident")?.unwrap_or(d.resident);
        r.finish()?;
        Ok(SimConfig {
            devices: c.devices.unwrap_or(d.devices),
            device_capacity: c.device_capacity.unwrap_or(d.device_capacity),
            host_capacity: c.host_capacity.unwrap_or(d.host_capacity),
            owner_groups,
            copy_latency,
            resident,
            faults: None,
            host_bytes: None,
        })
    }
}

/// The memory the system says is available for new allocations without swapping; what
/// [`SimConfig::resident`] checks its devices' capacity against (the core's
/// [`drm_pagemap_core::available_memory`]).
pub use drm_pagemap_core::available_memory;

/// Backs every device's memory ([`SimConfig::resident`]): pieces of 64 MiB handed to one
/// thread per core (at most 16). Out of memory is an error naming the device.
fn make_resident(devices: &[Arc<SimDevice>]) -> Result<(), BackendError> {
    const PIECE_CHUNKS: usize = 32;
    let pieces: Vec<(usize, usize)> = devices
        .iter()
        .enumerate()
        .flat_map(|(d, dev)| {
            (0..dev.arena.chunks())
                .step_by(PIECE_CHUNKS)
                .map(move |c| (d, c))
        })
        .collect();
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 16)
        .min(pieces.len().max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let work = || -> Result<(), BackendError> {
        loop {
            let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some(&(d, c)) = pieces.get(k) else {
                return Ok(());
            };
            devices[d]
                .arena
                .back_chunks(c..c + PIECE_CHUNKS)
                .map_err(|e| {
                    BackendError::new(
                        e.kind,
                        format!(
                            "sim device {d}: making device memory resident: {}",
                            e.message
                        ),
                    )
                })?;
        }
    };
    std::thread::scope(|s| {
        let helpers: Vec<_> = (1..threads).map(|_| s.spawn(work)).collect();
        let mut result = work();
        for h in helpers {
            let r = h.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
            result = result.and(r);
        }
        result
    })
}

/// A simulated machine: devices, host memory, pagemaps.
pub struct SimBackend {
    config: SimConfig,
    devices: Vec<Arc<SimDevice>>,
    host: Arc<ArenaHostMemory>,
    bytes_host: Option<Arc<BytesHostMemory>>,
    pagemaps: Mutex<Vec<(PagemapId, Arc<SimPagemap>)>>,
    resident_time: Option<Duration>,
}

impl std::fmt::Debug for SimBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimBackend")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl SimBackend {
    /// Builds the machine. Fails with [`BackendErrorKind::BadConfig`] on a config that cannot
    /// work (no device or more than [`MAX_DEVICES`], a group list of the wrong length, a
    /// capacity past [`MAX_DEVICE_CAPACITY`] or [`MAX_HOST_CAPACITY`]), naming the device or
    /// memory and the limit; with out of memory when the tables of its memories do not fit.
    pub fn new(config: SimConfig) -> Result<SimBackend, BackendError> {
        let bad = |m: String| BackendError::new(BackendErrorKind::BadConfig, m);
        if config.devices == 0 || config.devices > MAX_DEVICES {
            return Err(bad(format!(
                "sim: {} devices requested (1 to {MAX_DEVICES} allowed)",
                config.devices
            )));
        }
        if config.device_capacity > MAX_DEVICE_CAPACITY {
            return Err(bad(format!(
                "sim device 0: capacity {} bytes exceeds the limit of {MAX_DEVICE_CAPACITY} \
                 bytes (16 TiB: page frame numbers are 32-bit counts of 4 KiB granules)",
                config.device_capacity
            )));
        }
        if config.host_capacity > MAX_HOST_CAPACITY {
            return Err(bad(format!(
                "sim host memory: capacity {} bytes exceeds the limit of {MAX_HOST_CAPACITY} \
                 bytes (256 TiB: sim addresses carry 48-bit offsets)",
                config.host_capacity
            )));
        }
        if let Some(g) = &config.owner_groups
            && g.len() != config.devices
        {
            return Err(bad(format!(
                "sim: {} owner groups given for {} devices",
                g.len(),
                config.devices
            )));
        }
        let arena_capacity = if config.host_bytes.is_some() {
            0
        } else {
            config.host_capacity
        };
        let host = Arc::new(ArenaHostMemory::try_new(HOST_MEM, arena_capacity)?);
        let bytes_host = match &config.host_bytes {
            Some(b) => Some(Arc::new(BytesHostMemory::try_new(HOST_MEM, b.clone())?)),
            None => None,
        };
        let host_bytes: Arc<dyn FrameBytes> = match &config.host_bytes {
            Some(b) => b.clone(),
            None => host.arena().clone(),
        };
        let mut arenas = vec![host_bytes];
        let mut devices = Vec::new();
        for d in 0..config.devices {
            let dev = SimDevice::new(
                DeviceId(d as u32),
                FIRST_DEVICE_MEM + d as u16,
                config.device_capacity,
            )?;
            arenas.push(dev.arena.clone() as Arc<dyn FrameBytes>);
            devices.push(dev);
        }
        let resident_time = if config.resident {
            let needed = config.device_capacity.saturating_mul(config.devices as u64);
            if let Some(available) = available_memory()
                && needed > available
            {
                return Err(BackendError::new(
                    BackendErrorKind::OutOfMemory,
                    format!(
                        "sim: resident device memory of {needed} bytes ({} devices of {} \
                         bytes, sim.resident) exceeds the {available} bytes of memory \
                         available",
                        config.devices, config.device_capacity
                    ),
                ));
            }
            let t = std::time::Instant::now();
            make_resident(&devices)?;
            Some(t.elapsed())
        } else {
            None
        };
        let memories = Arc::new(Memories::new(arenas));
        for dev in &devices {
            dev.start(memories.clone(), config.copy_latency);
        }
        Ok(SimBackend {
            config,
            devices,
            host,
            bytes_host,
            pagemaps: Mutex::new(Vec::new()),
            resident_time,
        })
    }

    /// How long backing the devices' memory took when the backend was built
    /// ([`SimConfig::resident`]); `None` when it was not asked for.
    pub fn resident_time(&self) -> Option<Duration> {
        self.resident_time
    }

    /// Bytes of `device`'s memory that are backed (written at least once, or made resident);
    /// `None` for a device it does not have.
    pub fn device_resident_bytes(&self, device: DeviceId) -> Option<u64> {
        self.devices
            .get(device.0 as usize)
            .map(|d| d.arena.resident_bytes())
    }

    /// The owner group of `device`.
    pub fn owner_group(&self, device: DeviceId) -> u32 {
        self.config
            .owner_groups
            .as_ref()
            .and_then(|g| g.get(device.0 as usize).copied())
            .unwrap_or(0)
    }

    /// The configuration it was built with.
    pub fn config(&self) -> &SimConfig {
        &self.config
    }

    /// The fault injector, if the config has one.
    pub fn faults(&self) -> Option<&Arc<FaultInjector>> {
        self.config.faults.as_ref()
    }

    /// The statistics of pagemap `id`, if this backend created it.
    pub fn stats(&self, id: PagemapId) -> Option<SimStats> {
        let maps = self.pagemaps.lock().unwrap_or_else(|p| p.into_inner());
        maps.iter().find(|(i, _)| *i == id).map(|(_, p)| p.stats())
    }

    /// The host memory over [`SimConfig::host_bytes`], when the config gave bytes.
    pub fn bytes_host(&self) -> Option<&Arc<BytesHostMemory>> {
        self.bytes_host.as_ref()
    }

    /// The host memory as the concrete type (free-frame counts for tests). Empty when the
    /// config gave [`SimConfig::host_bytes`] (see [`SimBackend::bytes_host`]).
    pub fn arena_host(&self) -> &Arc<ArenaHostMemory> {
        &self.host
    }

    /// Creates one pagemap per device (ids 0..n, owner = the device's group) with the whole
    /// device as capacity: the usual set-up.
    pub fn pagemap_per_device(&self) -> Result<Vec<Pagemap>, BackendError> {
        (0..self.devices.len())
            .map(|d| {
                self.create_pagemap(&PagemapSpec {
                    id: PagemapId(d as u8),
                    device: DeviceId(d as u32),
                    owner: None,
                    capacity_bytes: self.config.device_capacity,
                })
            })
            .collect()
    }
}

impl Backend for SimBackend {
    fn name(&self) -> &str {
        "sim"
    }

    fn device_count(&self) -> usize {
        self.devices.len()
    }

    fn device_info(&self, index: usize) -> Option<DeviceInfo> {
        let d = self.devices.get(index)?;
        Some(DeviceInfo {
            id: d.id,
            name: DeviceName::new(&format!("simulated device {}", d.id.0)),
            memory_bytes: self.config.device_capacity,
        })
    }

    fn host_memory(&self) -> Arc<dyn HostMemory> {
        let host: Arc<dyn HostMemory> = match &self.bytes_host {
            Some(b) => b.clone(),
            None => self.host.clone(),
        };
        match &self.config.faults {
            Some(f) => f.wrap_host(host),
            None => host,
        }
    }

    fn create_pagemap(&self, spec: &PagemapSpec) -> Result<Pagemap, BackendError> {
        let dev = self
            .devices
            .get(spec.device.0 as usize)
            .ok_or_else(|| {
                BackendError::new(
                    BackendErrorKind::Unsupported,
                    format!(
                        "sim: {} does not exist ({} devices)",
                        spec.device,
                        self.devices.len()
                    ),
                )
            })?
            .clone();
        let owner = spec.owner.unwrap_or(OwnerId(self.owner_group(spec.device)));
        let groups: Vec<u32> = (0..self.devices.len())
            .map(|d| self.owner_group(DeviceId(d as u32)))
            .collect();
        let pm = Arc::new(SimPagemap::new(
            dev,
            spec.capacity_bytes.min(self.config.device_capacity),
            groups,
        ));
        self.pagemaps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((spec.id, pm.clone()));
        let pagemap = Pagemap::new(
            spec.id,
            owner,
            spec.device,
            format!("sim{}:{}", spec.device.0, spec.id.0),
            pm.clone(),
            pm,
        );
        Ok(match &self.config.faults {
            Some(f) => f.wrap_pagemap(&pagemap),
            None => pagemap,
        })
    }

    fn can_access_peer(&self, a: DeviceId, b: DeviceId) -> bool {
        self.owner_group(a) == self.owner_group(b)
    }
}

/// Opens the sim backend from a generic config (used by the registry): refuses with
/// [`BackendErrorKind::BadConfig`] an option [`SimConfig::from_backend_config`] refuses, and
/// with [`BackendErrorKind::Unavailable`] when `sim.disable` is true.
pub fn open(config: &BackendConfig) -> Result<Box<dyn Backend>, BackendError> {
    let sim = SimConfig::from_backend_config(config)?;
    if config.disabled("sim")? {
        return Err(BackendError::new(
            BackendErrorKind::Unavailable,
            "sim: disabled by option sim.disable",
        ));
    }
    Ok(Box::new(SimBackend::new(sim)?))
}
