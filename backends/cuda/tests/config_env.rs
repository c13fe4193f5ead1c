//! The CUDA config and the environment: `Default` reads none of it, `from_env` reads each of
//! the six variables. One test in its own binary: it changes this process's environment.

use drm_pagemap_core::{BackendConfig, OptionError};
use drm_pagemap_cuda::{
    CudaConfig, DEFAULT_DMA_MIN_DEVICE, DEFAULT_DMA_MIN_HOST, KernelSource, probe, probe_with,
};

const VARS: [(&str, &str); 6] = [
    ("DRM_PAGEMAP_CUDA_DMA_MIN_HOST", "4096"),
    ("DRM_PAGEMAP_CUDA_DMA_MIN_DEVICE", "8192"),
    ("DRM_PAGEMAP_CUDA_VMM", "0"),
    ("DRM_PAGEMAP_CUDA_CLEAR_ON_FREE", "0"),
    ("DRM_PAGEMAP_CUDA_KERNEL", "ptx"),
    ("DRM_PAGEMAP_CUDA_DISABLE", ""),
];

fn set(name: &str, value: &str) {
    // SAFETY: this binary's only test runs on one thread and no other thread of the process
    // reads the environment meanwhile.
    unsafe { std::env::set_var(name, value) }
}

fn unset(name: &str) {
    // SAFETY: as in `set`.
    unsafe { std::env::remove_var(name) }
}

#[test]
fn default_reads_no_environment_and_from_env_reads_each_variable() {
    for (name, _) in VARS {
        unset(name);
    }
    let pure = CudaConfig::default();
    assert_eq!(
        CudaConfig::from_env().unwrap(),
        pure,
        "nothing set: the default"
    );

    for (name, value) in VARS {
        set(name, value);
    }
    assert_eq!(
        CudaConfig::default(),
        pure,
        "Default ignores the environment"
    );
    assert_eq!(
        (
            pure.dma_min_host,
            pure.dma_min_device,
            pure.kernel,
            pure.vmm
        ),
        (
            DEFAULT_DMA_MIN_HOST,
            DEFAULT_DMA_MIN_DEVICE,
            KernelSource::Auto,
            true
        )
    );
    assert!(BackendConfig::default().options.is_empty());
    assert_eq!(probe_with(&CudaConfig::default()), probe());

    let env = CudaConfig::from_env().unwrap();
    assert_eq!(
        env,
        CudaConfig {
            dma_min_host: 4096,
            dma_min_device: 8192,
            vmm: false,
            clear_on_free: false,
            kernel: KernelSource::Fallback,
            disable: true,
            ..CudaConfig::default()
        }
    );
    // DISABLE: set means disabled, whatever the value (as before options existed).
    let why = probe_with(&env).unwrap_err();
    assert!(why.contains("cuda.disable"), "{why}");

    // One at a time: each variable reaches its field alone.
    for (name, value) in VARS {
        for (other, _) in VARS {
            unset(other);
        }
        set(name, value);
        let c = CudaConfig::from_env().unwrap();
        assert_ne!(c, pure, "{name}={value} changes nothing");
    }

    // The historic meaning of the boolean variables: only `0` turns them off.
    for (other, _) in VARS {
        unset(other);
    }
    set("DRM_PAGEMAP_CUDA_VMM", "yes");
    assert!(CudaConfig::from_env().unwrap().vmm);
    // A value that does not parse is an error naming the option (it used to be ignored).
    set("DRM_PAGEMAP_CUDA_DMA_MIN_HOST", "lots");
    let e = CudaConfig::from_env().unwrap_err();
    assert!(
        matches!(&e, OptionError::BadValue { key, .. } if key == "cuda.dma_min_host"),
        "{e}"
    );
    unset("DRM_PAGEMAP_CUDA_DMA_MIN_HOST");
    set("DRM_PAGEMAP_CUDA_KERNEL", "cubin");
    assert_eq!(
        CudaConfig::from_env().unwrap_err().key(),
        Some("cuda.kernel")
    );
    unset("DRM_PAGEMAP_CUDA_KERNEL");
    unset("DRM_PAGEMAP_CUDA_VMM");
}
