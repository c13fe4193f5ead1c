//! The registry of built-in backends: what it lists, what `auto` picks, and how an
//! unavailable or unknown backend is reported (an error, never a panic).

use drm_pagemap::{
    BackendConfig, BackendErrorKind, Error, Machine, OptionError, auto_backend, auto_backend_with,
    backends, backends_with, check_config, open_backend,
};

#[test]
fn lists_sim_and_cuda_with_availability() {
    let list = backends();
    let sim = list
        .iter()
        .find(|b| b.name == "sim")
        .expect("sim is registered");
    assert!(!sim.is_gpu);
    assert_eq!(sim.available, Ok(()));
    let cuda = list
        .iter()
        .find(|b| b.name == "cuda")
        .expect("cuda is registered");
    assert!(cuda.is_gpu);
    if let Err(why) = &cuda.available {
        assert!(!why.is_empty(), "an unavailable backend says why");
    }
    // GPU backends come first.
    assert!(list[0].is_gpu);
}

#[test]
fn level_zero_is_a_gpu_backend_after_cuda() {
    let list = backends();
    let names: Vec<&str> = list.iter().map(|b| b.name).collect();
    let l0 = list
        .iter()
        .find(|b| b.name == "level-zero")
        .expect("level-zero is registered");
    assert!(l0.is_gpu);
    if let Err(why) = &l0.available {
        // This binary does not route the loader to the software driver: without an Intel
        // GPU's driver the loader finds none, and `auto` cannot pick the software driver.
        assert!(!why.is_empty(), "an unavailable backend says why");
    }
    // `auto` prefers CUDA: it comes first among the GPU backends.
    let pos = |n: &str| names.iter().position(|&m| m == n).expect(n);
    assert!(pos("cuda") < pos("level-zero"), "{names:?}");
    let cfg = BackendConfig::default()
        .with_option("cuda.disable", "1")
        .unwrap()
        .with_option("level-zero.disable", "1")
        .unwrap();
    assert_eq!(auto_backend_with(&cfg), "sim");
    assert!(matches!(
        open_backend("level-zero", &cfg),
        Err(Error::BackendUnavailable { reason, .. }) if reason.contains("level-zero.disable")
    ));
    // Its options are checked before anything opens.
    let bad = BackendConfig::default()
        .with_option("level-zero.regular_list_min_runs", "0")
        .unwrap();
    assert!(matches!(
        check_config(&bad),
        Err(Error::BadOption { backend, source }) if backend == "level-zero"
            && source.key() == Some("level-zero.regular_list_min_runs")
    ));
}

#[test]
fn auto_picks_an_available_gpu_backend_else_sim() {
    let gpu = backends()
        .into_iter()
        .find(|b| b.is_gpu && b.available.is_ok())
        .map(|b| b.name);
    assert_eq!(auto_backend(), gpu.unwrap_or("sim"));
    // `backends()` and `auto_backend()` see the environment's configuration.
    let backend = open_backend("auto", &BackendConfig::from_env()).expect("auto opens");
    assert_eq!(backend.name(), auto_backend());
}

#[test]
fn unavailable_and_unknown_backends_are_errors() {
    match backends()
        .into_iter()
        .find(|b| b.name == "cuda")
        .map(|b| b.available)
    {
        Some(Err(why)) => {
            let err = open_backend("cuda", &BackendConfig::from_env())
                .err()
                .expect("no driver: error");
            assert!(matches!(&err, Error::BackendUnavailable { name, .. } if name == "cuda"));
            let text = err.to_string();
            assert!(
                text.contains("cuda unavailable") && text.contains(&why),
                "{text}"
            );
        }
        _ => eprintln!("skipped: cuda is available here, its unavailable path is not reachable"),
    }
    let err = open_backend("nope", &BackendConfig::default())
        .err()
        .expect("unknown: error");
    let text = err.to_string();
    assert!(
        text.contains("nope") && text.contains("sim") && text.contains("cuda"),
        "{text}"
    );
}

#[test]
fn a_backend_disabled_by_option_is_unavailable_and_auto_skips_it() {
    // On any machine, GPU or not: the option is what `DRM_PAGEMAP_CUDA_DISABLE` sets.
    let cfg = BackendConfig::default()
        .with_option("cuda.disable", "1")
        .unwrap();
    let cuda = backends_with(&cfg)
        .into_iter()
        .find(|b| b.name == "cuda")
        .unwrap();
    assert_eq!(
        cuda.available,
        Err("disabled by option cuda.disable".to_string())
    );
    assert_eq!(auto_backend_with(&cfg), "sim");
    assert_eq!(open_backend("auto", &cfg).unwrap().name(), "sim");
    let err = open_backend("cuda", &cfg).err().expect("disabled: error");
    assert!(
        matches!(&err, Error::BackendUnavailable { name, reason }
            if name == "cuda" && reason.contains("cuda.disable")),
        "{err}"
    );
    // Opened directly, the backend refuses too.
    let e = drm_pagemap::sim::open(
        &BackendConfig::default()
            .with_option("sim.disable", "on")
            .unwrap(),
    )
    .err()
    .expect("sim disabled");
    assert_eq!(e.kind, BackendErrorKind::Unavailable);
    assert!(e.message.contains("sim.disable"), "{e}");
    let cfg = BackendConfig::default()
        .with_option("cuda.disable", "0")
        .unwrap();
    assert_eq!(
        backends_with(&cfg)
            .into_iter()
            .find(|b| b.name == "cuda")
            .unwrap()
            .available,
        drm_pagemap_cuda_probe(),
        "disable=0 leaves the probe's answer"
    );
}

fn drm_pagemap_cuda_probe() -> Result<(), String> {
    backends_with(&BackendConfig::default())
        .into_iter()
        .find(|b| b.name == "cuda")
        .unwrap()
        .available
}

#[test]
fn bad_options_are_typed_errors_naming_the_key_before_anything_opens() {
    let open = |key: &str, value: &str| {
        let cfg = BackendConfig::default().with_option(key, value).unwrap();
        assert_eq!(
            check_config(&cfg).err().map(|e| e.to_string()),
            open_backend("sim", &cfg).err().map(|e| e.to_string()),
            "open_backend checks as check_config does"
        );
        open_backend("sim", &cfg).err()
    };
    // A key the backend does not know, also one of another backend than the one opened.
    for (key, value, backend) in [
        ("sim.copy_latncy", "1ms", "sim"),
        ("cuda.vmmm", "0", "cuda"),
        ("cuda.vmm", "maybe", "cuda"),
        ("cuda.kernel", "cubin", "cuda"),
        ("cuda.dma_min_host", "lots", "cuda"),
        ("sim.copy_latency", "5", "sim"),
        ("sim.disable", "perhaps", "sim"),
        ("nope.x", "1", "nope"),
    ] {
        let err = open(key, value).expect(key);
        match &err {
            Error::BadOption { backend: b, source } => {
                assert_eq!(b, backend, "{err}");
                assert_eq!(source.key(), Some(key), "{err}");
            }
            other => panic!("{key}={value}: {other}"),
        }
        assert!(err.to_string().contains(key), "{err}");
        assert!(!err.is_transient());
    }
    assert!(matches!(
        open("cuda.kernel", "cubin"),
        Some(Error::BadOption { source: OptionError::BadValue { expected, .. }, .. })
            if expected.contains("nvrtc")
    ));
    assert!(matches!(
        open("sim.copy_latncy", "1ms"),
        Some(Error::BadOption { source: OptionError::UnknownKey { known, .. }, .. })
            if known.contains("copy_latency")
    ));
    // Good values of every backend pass.
    let mut cfg = BackendConfig::default();
    for kv in [
        "cuda.dma_min_host=4096",
        "cuda.dma_min_device=1GiB",
        "cuda.vmm=0",
        "cuda.clear_on_free=false",
        "cuda.kernel=ptx",
        "cuda.device_capacity=8G",
        "cuda.disable=0",
        "sim.copy_latency=0",
        "sim.owner_groups=0,0,1",
        "sim.disable=no",
    ] {
        cfg.options.parse_assignment(kv).unwrap();
    }
    check_config(&cfg).unwrap();
}

#[test]
fn a_machine_and_its_svm_context_share_one_address_space() {
    let (machine, svm) = Machine::open_svm(
        "sim",
        &BackendConfig::default(),
        2,
        drm_pagemap::svm::SvmConfig::default(),
    )
    .unwrap();
    assert!(std::sync::Arc::ptr_eq(&machine.mm, svm.mm()));
    assert_eq!(
        machine.mm.pagemaps().len(),
        2,
        "added once, by the SVM context"
    );
    let r = drm_pagemap::VaRange::new(1 << 30, 16 * 4096);
    machine
        .mm
        .create_range(r, drm_pagemap::PageSize::Size4K)
        .unwrap();
    machine.mm.write(r.start + 100, b"shared").unwrap();
    let vm = svm.vm(drm_pagemap::PagemapId(1)).unwrap();
    vm.handle_gpu_fault(r.start + 100, drm_pagemap::svm::Access::Write)
        .unwrap();
    assert!(matches!(
        machine.mm.location(r.start + 100).unwrap(),
        drm_pagemap::PageLocation::Device { .. }
    ));
    let mut b = [0u8; 6];
    machine.mm.read(r.start + 100, &mut b).unwrap();
    assert_eq!(&b, b"shared");
}
