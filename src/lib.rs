//! # drm-pagemap
//!
//! Page-granular migration of memory between system RAM and the device memory of several
//! GPUs, after the Linux kernel's `drm_pagemap` (Intel Xe multi-device SVM). This facade
//! re-exports the engine ([`drm_pagemap_core`]) and owns the registry of built-in backends:
//! each registers through `inventory`, the registry lists each with "available" or the reason
//! it is not, and `auto` picks a GPU backend when one is available, else the simulated one.
//!
//! ```
//! use drm_pagemap::{AddressSpace, MigrateDetails, PageSize, PagemapId, VaRange, BackendConfig};
//!
//! let machine = drm_pagemap::Machine::open("sim", &BackendConfig::default(), 2)?;
//! let mm = &machine.mm;
//! let range = VaRange::new(1 << 30, 16 * 4096);
//! mm.create_range(range, PageSize::Size4K)?;
//! mm.write(range.start, b"hello")?;
//! let report = mm.migrate(range, PagemapId(1), &MigrateDetails::default())?;
//! assert_eq!(report.calls.len(), 1); // one copy_to_devmem by the destination
//! let mut back = [0u8; 5];
//! mm.read(range.start, &mut back)?; // the CPU-fault path brings the page home
//! assert_eq!(&back, b"hello");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ## Configuration
//! A [`BackendConfig`] carries sizes and per-backend [`options`]
//! (`cuda.vmm=0`, `sim.copy_latency=1ms`): each backend refuses keys under its name it does not
//! know and values it cannot parse, and [`open_backend`] checks every built-in backend's
//! options first ([`check_config`], [`Error::BadOption`] naming the key).
//!
//! The library reads no environment variable: configs' `Default` is pure. Binaries ask for
//! the environment's settings with [`BackendConfig::from_env`] (the `DRM_PAGEMAP_CUDA_*`
//! variables become `cuda.*` options), so `Machine::open("auto", &BackendConfig::from_env(), n)`
//! is the environment-configured set-up. In this crate only [`backends`] and [`auto_backend`]
//! (the registry as this process's environment configures it) call `from_env`;
//! [`backends_with`], [`auto_backend_with`] and [`open_backend`] use the config given.
//!
//! ```
//! use drm_pagemap::{BackendConfig, Error, Machine};
//!
//! let config = BackendConfig::default().with_option("sim.copy_latency", "50us")?;
//! let machine = Machine::open("sim", &config, 2)?;
//! assert_eq!(machine.pagemaps.len(), 2);
//! let typo = BackendConfig::default().with_option("sim.copy_latncy", "50us")?;
//! let err = Machine::open("sim", &typo, 2).unwrap_err();
//! assert!(matches!(&err, Error::BadOption { source, .. } if source.key() == Some("sim.copy_latncy")));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

//!
//! ## Features
//! `sim` (the simulated backend, [`sim`]), `cuda` (the CUDA backend, [`cuda`]; links cudarc,
//! loads `libcuda` at run time), `level-zero` (the Level Zero backend, [`level_zero`]; loads
//! `libze_loader.so.1` at run time), `svm` (the xe-style SVM layer, [`svm`]), `plugins`
//! (out-of-tree backends loaded from shared objects, [`plugins`]) and `uffd` (ranges that are
//! memory of the process, [`uffd`]) are on by default.
//! `--no-default-features --features sim` builds without cudarc; with no backend
//! feature at all the registry is empty until a crate of yours registers one.
//!
//! ## Test tooling
//! Fault injection, the one-character-per-page layout notation of the `migrate` example and
//! the arena memory of the simulator are the `drm-pagemap-testkit` crate, not part of this
//! API: tests and examples take it as a dev-dependency.

#![forbid(unsafe_code)]

mod registry;

/// Out-of-tree backends loaded as plug-ins (the C ABI of the `drm-pagemap-plugin` crate).
#[cfg(feature = "plugins")]
pub mod plugins;

// The engine's API, by name. Test tooling (fault injection, the layout notation, arena
// memory) is the `drm-pagemap-testkit` crate, not re-exported here.
pub use drm_pagemap_core::{
    AddressSpace, AllocId, AllocState, AllocationInfo, Backend, BackendConfig, BackendError,
    BackendErrorKind, BackendOp, BackendOption, BackendOptions, BusyReason, Classified, Coalesce,
    CopyCall, CopyCaps, CopyOp, CopyRequest, Dependencies, DeviceId, DeviceInfo, DeviceName,
    DevmemBacking, DevmemOps, Direction, DmaAddr, Error, EvictReport, ExtentAllocator, Fence,
    FenceArray, FenceCallback, FenceContext, FenceContextSource, FenceContexts, FenceError,
    FenceOps, FenceRole, FenceStatus, FenceTimeline, GRANULE, HostFence, HostFenceWait, HostFrame,
    HostMemory, KeptBufferInfo, MigrateDetails, MigrateOutcome, MigrateReport, MigrateTiming,
    NativeFence, NativeFenceKind, NativeFenceKinds, NativeWait, OptionError, OptionReader, OwnerId,
    PageBacking, PageLocation, PageSize, Pagemap, PagemapId, PagemapOps, PagemapSpec, Pfn, Plan,
    PlannedCall, RangeProblem, ReleaseMode, Result, VaRange, WhileCopying, available_memory,
    sort_dependencies,
};
pub use drm_pagemap_core::{
    FailureKind, Failures, Histogram, LinkStats, Location, PageSizeStats, PagemapStats,
    StatsSnapshot,
};
pub use drm_pagemap_core::{fence, options, stats};
/// Re-exported so a backend crate can register with
/// `drm_pagemap::inventory::submit! { drm_pagemap::BackendRegistration { .. } }`.
pub use inventory;
pub use registry::BackendRegistration;

/// The simulated backend.
#[cfg(feature = "sim")]
pub use drm_pagemap_sim as sim;

/// The CUDA backend.
#[cfg(feature = "cuda")]
pub use drm_pagemap_cuda as cuda;

/// The Level Zero backend.
#[cfg(feature = "level-zero")]
pub use drm_pagemap_level_zero as level_zero;

/// Ranges that are memory of the process (the `drm-pagemap-uffd` crate): a pointer the
/// application loads and stores through, device-resident pages faulting home through
/// userfaultfd. The simulated backend, and CUDA when feature `cuda` is on too (its host memory
/// made with `cuda.host_memfd=1`; [`uffd::support`] says why the others are not).
#[cfg(feature = "uffd")]
pub use drm_pagemap_uffd as uffd;
/// The SVM layer a GPU runtime talks to (the `xe-svm` crate): GPU VMs, the fault handler,
/// eviction, statistics. [`Machine::open_svm`] sets one up over a backend.
#[cfg(feature = "svm")]
pub use xe_svm as svm;

use std::sync::Arc;

#[cfg(feature = "sim")]
inventory::submit! {
    BackendRegistration {
        name: "sim",
        is_gpu: false,
        probe: || Ok(()),
        open: drm_pagemap_sim::open,
    }
}

#[cfg(feature = "cuda")]
inventory::submit! {
    BackendRegistration {
        name: "cuda",
        is_gpu: true,
        probe: drm_pagemap_cuda::probe,
        open: drm_pagemap_cuda::open,
    }
}

#[cfg(feature = "level-zero")]
inventory::submit! {
    BackendRegistration {
        name: "level-zero",
        is_gpu: true,
        probe: drm_pagemap_level_zero::probe,
        open: drm_pagemap_level_zero::open,
    }
}

/// A backend as the registry sees it.
#[derive(Clone, Debug)]
pub struct BackendStatus {
    /// Its name ("sim", "cuda", "level-zero").
    pub name: &'static str,
    /// Whether it drives real GPUs.
    pub is_gpu: bool,
    /// `Ok` when usable here, else why not.
    pub available: Result<(), String>,
}

/// Every registered backend with its availability under the environment's configuration:
/// [`backends_with`]`(&BackendConfig::from_env())`, so `DRM_PAGEMAP_CUDA_DISABLE` still shows
/// the CUDA backend as unavailable. Besides [`BackendConfig::from_env`] itself, this and
/// [`auto_backend`] are the only functions of the library that read the environment.
pub fn backends() -> Vec<BackendStatus> {
    backends_with(&BackendConfig::from_env())
}

/// Every registered backend with its availability under `config` (a backend whose
/// `NAME.disable` option is true is unavailable, "disabled by option NAME.disable"): GPU
/// backends first, then by name. Reads no environment variable.
pub fn backends_with(config: &BackendConfig) -> Vec<BackendStatus> {
    let mut list: Vec<BackendStatus> = inventory::iter::<BackendRegistration>
        .into_iter()
        .map(|r| BackendStatus {
            name: r.name,
            is_gpu: r.is_gpu,
            available: availability(r, config),
        })
        .collect();
    #[cfg(feature = "plugins")]
    list.extend(plugins::statuses(config));
    list.sort_by_key(|b| (!b.is_gpu, b.name));
    list
}

fn availability(r: &BackendRegistration, config: &BackendConfig) -> Result<(), String> {
    match config.disabled(r.name) {
        Ok(true) => Err(format!("disabled by option {}.disable", r.name)),
        Ok(false) => (r.probe)(),
        Err(e) => Err(e.to_string()),
    }
}

/// The backend `auto` resolves to under the environment's configuration:
/// [`auto_backend_with`]`(&BackendConfig::from_env())` (see [`backends`]).
pub fn auto_backend() -> &'static str {
    auto_backend_with(&BackendConfig::from_env())
}

/// The backend `auto` resolves to under `config`: the first available GPU backend by name
/// ("cuda" before "level-zero"), else "sim". Reads no environment variable.
///
/// The Level Zero backend is available only where the Level Zero loader finds a driver:
/// an Intel GPU's, or the workspace's software driver (`ze-soft`) when a process routes the
/// loader to it (`ze_soft::route_loader`, which the test suites call and the `migrate`
/// example calls only for `--backend level-zero`). A process that does not route it never
/// sees the software driver, so `auto` there is CUDA, an Intel GPU, or "sim".
pub fn auto_backend_with(config: &BackendConfig) -> &'static str {
    backends_with(config)
        .into_iter()
        .find(|b| b.is_gpu && b.available.is_ok())
        .map(|b| b.name)
        .unwrap_or("sim")
}

/// How the built-in backends read their options (each refuses unknown keys under its name).
type OptionCheck = fn(&BackendConfig) -> std::result::Result<(), OptionError>;
const OPTION_CHECKS: &[(&str, OptionCheck)] = &[
    #[cfg(feature = "sim")]
    ("sim", |c| {
        drm_pagemap_sim::SimConfig::from_backend_config(c).map(drop)
    }),
    #[cfg(feature = "cuda")]
    ("cuda", |c| {
        drm_pagemap_cuda::CudaConfig::from_backend_config(c).map(drop)
    }),
    #[cfg(feature = "level-zero")]
    ("level-zero", |c| {
        drm_pagemap_level_zero::LevelZeroConfig::from_backend_config(c).map(drop)
    }),
];

/// Checks `config`'s options without opening anything: that each key names a registered
/// backend, and the list's version and every key and value of the built-in backends (a backend
/// registered elsewhere checks its own keys when it opens). [`open_backend`] checks first, so
/// a typo in an option for a backend other than the one opened is reported too. A command
/// line can call it to report a bad `--option` as a bad argument.
pub fn check_config(config: &BackendConfig) -> Result<(), Error> {
    #[allow(unused_mut)]
    let mut names: Vec<&'static str> = inventory::iter::<BackendRegistration>
        .into_iter()
        .map(|r| r.name)
        .collect();
    #[cfg(feature = "plugins")]
    names.extend(plugins::names());
    for b in config.options.backends() {
        if !names.contains(&b) {
            let key = config
                .options
                .iter()
                .find(|o| o.key.split_once('.').is_some_and(|(p, _)| p == b))
                .map_or_else(String::new, |o| o.key.clone());
            return Err(Error::BadOption {
                backend: b.into(),
                source: OptionError::UnknownKey {
                    key,
                    known: format!("no backend named {b}; known: {}", names.join(", ")),
                },
            });
        }
    }
    for (name, check) in OPTION_CHECKS {
        check(config).map_err(|source| Error::BadOption {
            backend: (*name).into(),
            source,
        })?;
    }
    Ok(())
}

/// Opens backend `name` ("auto" picks with [`auto_backend_with`] under `config`). Options
/// are checked first ([`check_config`]: [`Error::BadOption`] naming the key). A backend
/// disabled by its `NAME.disable` option, or one that cannot run here, is
/// [`Error::BackendUnavailable`]; a config the backend refuses as such
/// ([`BackendErrorKind::BadConfig`]: 0 devices, a capacity past its limits) is
/// [`Error::BadConfig`]; every other failure is [`Error::BackendUnavailable`].
///
/// Reads no environment variable: pass [`BackendConfig::from_env`] for what the
/// environment sets (`open_backend("auto", &BackendConfig::from_env())` is what the
/// environment-configured binaries of this repository do).
pub fn open_backend(name: &str, config: &BackendConfig) -> Result<Box<dyn Backend>, Error> {
    // A plug-in (`plugin:PATH`, or a loaded plug-in's name) is loaded before the options are
    // checked, so its keys are known.
    #[cfg(feature = "plugins")]
    if let Some(p) = plugins::resolve(name) {
        let p = p.map_err(|reason| Error::BackendUnavailable {
            name: name.into(),
            reason,
        })?;
        check_config(config)?;
        return plugins::open(name, &p, config);
    }
    check_config(config)?;
    let name = if name == "auto" {
        auto_backend_with(config)
    } else {
        name
    };
    let reg = inventory::iter::<BackendRegistration>
        .into_iter()
        .find(|r| r.name == name)
        .ok_or_else(|| Error::BackendUnavailable {
            name: name.into(),
            reason: format!(
                "no such backend (known: {})",
                backends_with(config)
                    .iter()
                    .map(|b| b.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })?;
    availability(reg, config).map_err(|reason| Error::BackendUnavailable {
        name: name.into(),
        reason,
    })?;
    (reg.open)(config).map_err(|e| match e.kind {
        BackendErrorKind::BadConfig => Error::BadConfig {
            backend: name.into(),
            reason: e.message,
        },
        _ => Error::BackendUnavailable {
            name: name.into(),
            reason: e.to_string(),
        },
    })
}

/// A backend, `n` pagemaps on it and an address space using them: the usual set-up.
pub struct Machine {
    /// The backend.
    pub backend: Arc<dyn Backend>,
    /// Pagemaps 0..n. On a backend with fewer devices than pagemaps, pagemaps share devices
    /// round-robin (several memory regions of one device).
    pub pagemaps: Vec<Pagemap>,
    /// The address space, with every pagemap added (through the SVM layer's copy policy when
    /// opened with [`Machine::open_svm`]: then [`svm::Svm::mm`] is this same address space).
    pub mm: Arc<AddressSpace>,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("backend", &self.backend.name())
            .field("pagemaps", &self.pagemaps)
            .finish_non_exhaustive()
    }
}

impl Machine {
    /// Opens `backend` and creates `n` pagemaps, each with an equal share of its device.
    pub fn open(backend: &str, config: &BackendConfig, n: usize) -> Result<Machine, Error> {
        let backend: Arc<dyn Backend> = Arc::from(open_backend(backend, config)?);
        Machine::build(backend, n, &[], config.device_capacity)
    }

    /// Creates `n` pagemaps on `backend`; pagemaps listed in `foreign` get an owner of their
    /// own (their pages are never collected by the others).
    pub fn with_backend(
        backend: Arc<dyn Backend>,
        n: usize,
        foreign: &[usize],
    ) -> Result<Machine, Error> {
        Machine::build(backend, n, foreign, None)
    }

    /// Opens `backend` with `n` pagemaps as [`Machine::open`] does, and an SVM context over
    /// them: one address space, which the SVM context owns the pagemaps of (they are added
    /// to [`Machine::mm`] by [`svm::Svm::new`], wrapped in its copy policy), so CPU access
    /// through `machine.mm` and GPU faults through the context's VMs see the same pages.
    #[cfg(feature = "svm")]
    #[allow(clippy::result_large_err)] // the SVM layer's own error, as its API returns it
    pub fn open_svm(
        backend: &str,
        config: &BackendConfig,
        n: usize,
        svm_config: svm::SvmConfig,
    ) -> std::result::Result<(Machine, svm::Svm), svm::SvmError> {
        let backend: Arc<dyn Backend> = Arc::from(open_backend(backend, config)?);
        Machine::svm_on(backend, n, config.device_capacity, svm_config)
    }

    /// [`Machine::open_svm`] on a backend already open (one opened with settings of its own,
    /// such as a CUDA backend whose host memory pointer ranges can map): `n` pagemaps of at
    /// most `pagemap_capacity` bytes each, and an SVM context over them.
    #[cfg(feature = "svm")]
    #[allow(clippy::result_large_err)] // the SVM layer's own error, as its API returns it
    pub fn svm_on(
        backend: Arc<dyn Backend>,
        n: usize,
        pagemap_capacity: Option<u64>,
        svm_config: svm::SvmConfig,
    ) -> std::result::Result<(Machine, svm::Svm), svm::SvmError> {
        let machine = Machine::make(backend, n, &[], pagemap_capacity, false)?;
        let svm = svm::Svm::new(machine.mm.clone(), machine.pagemaps.clone(), svm_config)?;
        Ok((machine, svm))
    }

    /// Creates `n` pagemaps on `backend`, each with an equal share of its device but at most
    /// `pagemap_capacity` bytes; pagemaps listed in `foreign` get an owner of their own.
    /// `n` must be 1 to [`PagemapId::MAX_PAGEMAPS`] ([`Error::BadConfig`] otherwise); a
    /// backend without devices is [`Error::BackendUnavailable`].
    pub fn build(
        backend: Arc<dyn Backend>,
        n: usize,
        foreign: &[usize],
        pagemap_capacity: Option<u64>,
    ) -> Result<Machine, Error> {
        Machine::make(backend, n, foreign, pagemap_capacity, true)
    }

    /// [`Machine::build`]; `add`: whether the pagemaps join the address space here (not when
    /// an SVM context adds them itself).
    fn make(
        backend: Arc<dyn Backend>,
        n: usize,
        foreign: &[usize],
        pagemap_capacity: Option<u64>,
        add: bool,
    ) -> Result<Machine, Error> {
        if n == 0 || n > PagemapId::MAX_PAGEMAPS {
            return Err(Error::BadConfig {
                backend: backend.name().into(),
                reason: format!(
                    "{n} pagemaps requested (1 to {} allowed)",
                    PagemapId::MAX_PAGEMAPS
                ),
            });
        }
        let devices = backend.devices();
        if devices.is_empty() {
            return Err(Error::BackendUnavailable {
                name: backend.name().into(),
                reason: "it has no devices".into(),
            });
        }
        let mm = Arc::new(AddressSpace::new(backend.host_memory()));
        let mut pagemaps = Vec::with_capacity(n);
        for k in 0..n {
            let dev = &devices[k % devices.len()];
            let sharing = n.div_ceil(devices.len()) as u64;
            let spec = PagemapSpec {
                id: PagemapId(k as u8),
                device: dev.id,
                owner: foreign.contains(&k).then_some(OwnerId(0x1000 + k as u32)),
                capacity_bytes: (dev.memory_bytes / sharing)
                    .min(pagemap_capacity.unwrap_or(u64::MAX)),
            };
            let pm = backend.create_pagemap(&spec).map_err(|e| match e.kind {
                BackendErrorKind::BadConfig => Error::BadConfig {
                    backend: backend.name().into(),
                    reason: format!("creating pagemap {k}: {}", e.message),
                },
                _ => Error::BackendUnavailable {
                    name: backend.name().into(),
                    reason: format!("creating pagemap {k}: {e}"),
                },
            })?;
            if add {
                mm.add_pagemap(pm.clone())?;
            }
            pagemaps.push(pm);
        }
        Ok(Machine {
            backend,
            pagemaps,
            mm,
        })
    }
}
