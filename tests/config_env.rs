//! The environment reaches the library only through `BackendConfig::from_env` (and the
//! registry's `backends()` / `auto_backend()`, which call it): `Default` configs ignore it,
//! `Machine::open("auto", &BackendConfig::from_env(), n)` honours it. One test in its own
//! binary: it changes this process's environment.

use drm_pagemap::sim::SimConfig;
use drm_pagemap::{
    BackendConfig, Error, Machine, auto_backend, auto_backend_with, backends, backends_with,
    open_backend,
};

fn set(name: &str, value: &str) {
    // SAFETY: this binary's only test runs on one thread and no other thread of the process
    // reads the environment meanwhile.
    unsafe { std::env::set_var(name, value) }
}

fn unset(name: &str) {
    // SAFETY: as in `set`.
    unsafe { std::env::remove_var(name) }
}

fn cuda(list: Vec<drm_pagemap::BackendStatus>) -> Result<(), String> {
    list.into_iter()
        .find(|b| b.name == "cuda")
        .expect("cuda is registered")
        .available
}

#[test]
fn only_from_env_reads_the_environment() {
    unset("DRM_PAGEMAP_CUDA_DISABLE");
    let probed = cuda(backends_with(&BackendConfig::default()));
    assert_eq!(cuda(backends()), probed);

    set("DRM_PAGEMAP_CUDA_DISABLE", "1");
    set("DRM_PAGEMAP_CUDA_VMM", "0");
    // Pure: the default config, the registry under it, the sim config.
    assert!(BackendConfig::default().options.is_empty());
    assert_eq!(cuda(backends_with(&BackendConfig::default())), probed);
    let sim = SimConfig::default();
    assert_eq!(
        (sim.devices, sim.copy_latency, sim.owner_groups),
        (3, std::time::Duration::ZERO, None)
    );
    // From the environment: the options, and the registry's environment view.
    let env = BackendConfig::from_env();
    assert_eq!(env.options.to_string(), "cuda.vmm=0 cuda.disable=1");
    assert_eq!(
        cuda(backends()),
        Err("disabled by option cuda.disable".to_string())
    );
    assert_eq!(auto_backend(), "sim");
    assert_eq!(auto_backend_with(&env), "sim");
    let m = Machine::open("auto", &env, 2).expect("auto is sim");
    assert_eq!(m.backend.name(), "sim");
    let e = open_backend("cuda", &env).err().expect("disabled");
    assert!(
        matches!(&e, Error::BackendUnavailable { reason, .. } if reason.contains("cuda.disable")),
        "{e}"
    );
    unset("DRM_PAGEMAP_CUDA_DISABLE");
    unset("DRM_PAGEMAP_CUDA_VMM");

    // A variable that does not parse is an error naming its option, whichever backend opens.
    set("DRM_PAGEMAP_CUDA_DMA_MIN_HOST", "lots");
    let e = open_backend("sim", &BackendConfig::from_env())
        .err()
        .expect("refused");
    assert!(
        matches!(&e, Error::BadOption { backend, source } if backend == "cuda"
            && source.key() == Some("cuda.dma_min_host")),
        "{e}"
    );
    assert!(open_backend("sim", &BackendConfig::default()).is_ok());
    unset("DRM_PAGEMAP_CUDA_DMA_MIN_HOST");
}
