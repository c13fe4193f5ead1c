//! Plug-ins: the C header against the Rust ABI, rejection of broken shared objects with the
//! reason the registry shows, an error status (C) or a panic (Rust) in every entry point, a
//! copy fence that never signals, loading from many threads, use from many threads,
//! discovery, and the `migrate` tool on plug-ins.
#![cfg(all(feature = "plugins", target_os = "linux"))]

mod common;

use common::plugins::{self, c_plugin, hostmem, tier, tier_dir};
use drm_pagemap::plugins::{LoadError, abi::*};
use drm_pagemap::{
    BackendConfig, Error, FenceError, Machine, MigrateDetails, PageSize, PagemapId, VaRange,
};
use std::mem::{offset_of, size_of};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------
// The header

macro_rules! layout {
    ($out:ident, $c:literal, $t:ty, [$($f:ident),* $(,)?]) => {
        $out.push_str(&format!(
            "_Static_assert(sizeof({}) == {}, \"sizeof {}\");\n",
            $c, size_of::<$t>(), $c
        ));
        $(
            $out.push_str(&format!(
                "_Static_assert(offsetof({c}, {f}) == {o}, \"{c}.{f}\");\n",
                c = $c, f = stringify!($f), o = offset_of!($t, $f)
            ));
        )*
    };
}

/// Every struct of the header has the Rust definition's size and field offsets, and every
/// constant its value: a C file of static assertions, compiled with the `cc` crate's compiler.
#[test]
fn the_c_header_matches_the_rust_abi() {
    let mut c = String::from("#include <stddef.h>\n#include \"drm_pagemap_plugin.h\"\n");
    layout!(
        c,
        "dpp_error",
        DppError,
        [kind, flags, driver_code, api, message]
    );
    layout!(
        c,
        "dpp_native_fence",
        DppNativeFence,
        [kind, flags, domain, handle]
    );
    layout!(c, "dpp_fence", DppFence, [obj, ops]);
    layout!(
        c,
        "dpp_fence_ops",
        DppFenceOps,
        [
            struct_size,
            reserved,
            retain,
            release,
            context,
            seqno,
            status,
            wait,
            native,
            add_callback,
            member_count,
            member_at,
        ]
    );
    layout!(
        c,
        "dpp_host_services",
        DppHostServices,
        [
            abi_version,
            struct_size,
            host,
            reserve_fence_contexts,
            log,
            fence_create,
            fence_signal,
            on_signal,
        ]
    );
    layout!(c, "dpp_option", DppOption, [key, key_len, value, value_len]);
    layout!(
        c,
        "dpp_config",
        DppConfig,
        [
            struct_size,
            flags,
            devices,
            device_capacity,
            host_capacity,
            options,
            option_count,
            options_version,
            reserved,
        ]
    );
    layout!(
        c,
        "dpp_plugin_v1",
        DppPluginV1,
        [
            abi_version,
            struct_size,
            name,
            description,
            flags,
            probe,
            open,
        ]
    );
    layout!(
        c,
        "dpp_device_info",
        DppDeviceInfo,
        [id, name_len, name, memory_bytes]
    );
    layout!(c, "dpp_backend", DppBackend, [obj, ops]);
    layout!(
        c,
        "dpp_backend_ops",
        DppBackendOps,
        [
            struct_size,
            reserved,
            destroy,
            device_count,
            device_info,
            host_memory,
            create_pagemap,
            can_access_peer,
        ]
    );
    layout!(
        c,
        "dpp_pagemap_spec",
        DppPagemapSpec,
        [id, device, owner, has_owner, capacity_bytes]
    );
    layout!(
        c,
        "dpp_pagemap",
        DppPagemap,
        [obj, pagemap_ops, devmem_ops, owner, device, name]
    );
    layout!(
        c,
        "dpp_pagemap_ops",
        DppPagemapOps,
        [struct_size, reserved, destroy, device_map, device_unmap]
    );
    layout!(
        c,
        "dpp_devmem_backing",
        DppDevmemBacking,
        [cookie, npages, page_size, pre_migrate_fence]
    );
    layout!(
        c,
        "dpp_copy_request",
        DppCopyRequest,
        [page_size, pages, addrs, count, pre_fence]
    );
    layout!(
        c,
        "dpp_copy_caps",
        DppCopyCaps,
        [
            max_command_bytes,
            native_kind_count,
            native_kinds,
            host_fences,
            in_order,
            batch_bytes_hint,
        ]
    );
    layout!(
        c,
        "dpp_devmem_ops",
        DppDevmemOps,
        [
            struct_size,
            reserved,
            allocate,
            populate_devmem_pfn,
            copy_to_devmem,
            copy_to_ram,
            devmem_release,
            devmem_release_many,
            devmem_release_unused,
            capacity_bytes,
            caps,
        ]
    );
    layout!(c, "dpp_host_memory", DppHostMemory, [obj, ops]);
    layout!(
        c,
        "dpp_host_memory_ops",
        DppHostMemoryOps,
        [
            struct_size,
            reserved,
            destroy,
            alloc_frames,
            free_frames,
            read,
            write,
            zero,
            map_frames,
            unmap_frames,
            capacity_bytes,
        ]
    );
    for (name, value) in [
        ("DPP_ABI_VERSION", ABI_VERSION as i64),
        ("DPP_OK", DPP_OK as i64),
        ("DPP_PENDING", DPP_PENDING as i64),
        ("DPP_TIMEOUT", DPP_TIMEOUT as i64),
        ("DPP_E_OUT_OF_MEMORY", DPP_E_OUT_OF_MEMORY as i64),
        ("DPP_E_DEVICE_LOST", DPP_E_DEVICE_LOST as i64),
        ("DPP_E_MAP_FAILED", DPP_E_MAP_FAILED as i64),
        ("DPP_E_COPY_FAILED", DPP_E_COPY_FAILED as i64),
        ("DPP_E_UNSUPPORTED", DPP_E_UNSUPPORTED as i64),
        ("DPP_E_UNAVAILABLE", DPP_E_UNAVAILABLE as i64),
        ("DPP_E_INJECTED", DPP_E_INJECTED as i64),
        ("DPP_E_BAD_CONFIG", DPP_E_BAD_CONFIG as i64),
        ("DPP_E_DRIVER", DPP_E_DRIVER as i64),
        ("DPP_E_PANICKED", DPP_E_PANICKED as i64),
        ("DPP_E_INVALID_ARGUMENT", DPP_E_INVALID_ARGUMENT as i64),
        ("DPP_PLUGIN_IS_GPU", DPP_PLUGIN_IS_GPU as i64),
        ("DPP_CONFIG_HAS_DEVICES", DPP_CONFIG_HAS_DEVICES as i64),
        (
            "DPP_CONFIG_HAS_DEVICE_CAPACITY",
            DPP_CONFIG_HAS_DEVICE_CAPACITY as i64,
        ),
        (
            "DPP_CONFIG_HAS_HOST_CAPACITY",
            DPP_CONFIG_HAS_HOST_CAPACITY as i64,
        ),
        ("DPP_DIR_TO_DEVICE", DPP_DIR_TO_DEVICE as i64),
        ("DPP_DIR_FROM_DEVICE", DPP_DIR_FROM_DEVICE as i64),
        (
            "DPP_NATIVE_CUDA_EVENT",
            drm_pagemap::NativeFenceKind::CUDA_EVENT.0 as i64,
        ),
        (
            "DPP_NATIVE_LEVEL_ZERO_EVENT",
            drm_pagemap::NativeFenceKind::LEVEL_ZERO_EVENT.0 as i64,
        ),
        (
            "DPP_NATIVE_PLUGIN_FIRST",
            drm_pagemap::NativeFenceKind::PLUGIN_FIRST.0 as i64,
        ),
        (
            "DPP_NATIVE_COMPLETE",
            drm_pagemap::NativeFence::COMPLETE as i64,
        ),
    ] {
        c.push_str(&format!("_Static_assert({name} == {value}, \"{name}\");\n"));
    }
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("layout-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("layout.c");
    std::fs::write(&src, &c).unwrap();
    let target = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
    let compiler = cc::Build::new()
        .target(&target)
        .host(&target)
        .opt_level(0)
        .cargo_metadata(false)
        .cargo_warnings(false)
        .include(plugins::root().join("include"))
        .try_get_compiler()
        .expect("a C compiler");
    let out = compiler
        .to_command()
        .args(["-std=c11", "-Wall", "-Werror", "-c", "-o"])
        .arg(dir.join("layout.o"))
        .arg(&src)
        .output()
        .expect("run the C compiler");
    assert!(
        out.status.success(),
        "the header disagrees with the Rust ABI:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The check can fail: a wrong size is caught.
    std::fs::write(
        &src,
        c.replace("sizeof(dpp_error) ==", "sizeof(dpp_error) + 1 =="),
    )
    .unwrap();
    let out = compiler
        .to_command()
        .args(["-std=c11", "-c", "-o"])
        .arg(dir.join("bad.o"))
        .arg(&src)
        .output()
        .unwrap();
    assert!(!out.status.success(), "a wrong layout compiled");
}

// ---------------------------------------------------------------------------------------
// Rejection with a reason

fn listed_reason(name: &str) -> Option<Result<(), String>> {
    drm_pagemap::backends()
        .into_iter()
        .find(|b| b.name == name)
        .map(|b| b.available)
}

/// A broken variant: its name, its C defines, the reason it is refused with.
type Case = (
    &'static str,
    &'static [(&'static str, &'static str)],
    &'static str,
);

#[test]
fn broken_shared_objects_are_rejected_with_their_reason() {
    let cases: &[Case] = &[
        (
            "noentry",
            &[("DPP_TEST_NO_ENTRY", "1"), ("DPP_NAME", "\"noentry\"")],
            "not a plug-in (no entry symbol drm_pagemap_plugin_v1)",
        ),
        (
            "v2",
            &[("DPP_TEST_VERSION", "2"), ("DPP_NAME", "\"v2\"")],
            "ABI version 2 not supported (this host supports 1)",
        ),
        (
            "v2only",
            &[("DPP_TEST_V2_ONLY", "1"), ("DPP_NAME", "\"v2only\"")],
            "ABI version 2 not supported (this host supports 1)",
        ),
        (
            "truncated",
            &[("DPP_TEST_TRUNCATED", "1"), ("DPP_NAME", "\"truncated\"")],
            "table too small (16 bytes; ABI version 1 needs 48)",
        ),
        (
            "nullopen",
            &[("DPP_TEST_NULL_OPEN", "1"), ("DPP_NAME", "\"nullopen\"")],
            "a required entry missing: `open`",
        ),
    ];
    for (variant, defines, reason) in cases {
        let path = c_plugin(variant, variant, defines);
        let err = drm_pagemap::plugins::load(&path).expect_err(variant);
        assert_eq!(err.to_string(), *reason, "{variant}");
        // The registry lists the path with the reason; opening it is "unavailable: reason".
        let key = format!("plugin:{}", path.display());
        assert_eq!(
            listed_reason(&key),
            Some(Err(reason.to_string())),
            "{variant}"
        );
        let e = drm_pagemap::open_backend(&key, &BackendConfig::default())
            .err()
            .expect("refused");
        assert_eq!(
            e.to_string(),
            format!("backend {key} unavailable: {reason}")
        );
    }
    let missing = plugins::root().join("no/such/libdrm_pagemap_plugin_x.so");
    let err = drm_pagemap::plugins::load(&missing).unwrap_err();
    assert_eq!(err, LoadError::FileMissing(missing.clone()));
    assert!(err.to_string().starts_with("file missing: "));
    // Not a shared object at all.
    let text = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("not-a-library.so");
    std::fs::write(&text, b"hello").unwrap();
    assert!(matches!(
        drm_pagemap::plugins::load(&text),
        Err(LoadError::CannotLoad(_))
    ));
}

#[test]
fn a_failing_or_panicking_probe_makes_the_plugin_unavailable() {
    let p = drm_pagemap::plugins::load(c_plugin(
        "probefail",
        "probefail",
        &[("DPP_TEST_PROBE_FAIL", "1"), ("DPP_NAME", "\"probefail\"")],
    ))
    .unwrap();
    let reason = "probe failed: no hostmem device on this machine (test variant)";
    assert_eq!(p.probe().unwrap_err().to_string(), reason);
    assert_eq!(listed_reason("probefail"), Some(Err(reason.into())));
    let e = drm_pagemap::open_backend("probefail", &BackendConfig::default())
        .err()
        .unwrap();
    assert_eq!(
        e.to_string(),
        format!("backend probefail unavailable: {reason}")
    );

    let p = drm_pagemap::plugins::load(c_plugin(
        "probepanic",
        "probepanic",
        &[
            ("DPP_TEST_PROBE_PANIC", "1"),
            ("DPP_NAME", "\"probepanic\""),
        ],
    ))
    .unwrap();
    assert_eq!(
        p.probe().unwrap_err().to_string(),
        "panicked in probe: internal bug (test variant)"
    );
    assert_eq!(
        listed_reason("probepanic"),
        Some(Err("panicked in probe: internal bug (test variant)".into()))
    );
    // Disabled by option.
    let cfg = BackendConfig::default()
        .with_option("hostmem.disable", "1")
        .unwrap();
    plugins::load_all();
    let st = drm_pagemap::backends_with(&cfg)
        .into_iter()
        .find(|b| b.name == "hostmem")
        .unwrap();
    assert_eq!(
        st.available,
        Err("disabled by option hostmem.disable".into())
    );
    assert_eq!(listed_reason("hostmem"), Some(Ok(())));
    assert_eq!(listed_reason("tier"), Some(Ok(())));
}

// ---------------------------------------------------------------------------------------
// Failures in every entry point

const PAGES: u64 = 8;

fn pattern(seed: u8) -> Vec<u8> {
    (0..PAGES * 4096)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

/// What one run of the workload saw.
#[derive(Debug, Default)]
struct Outcome {
    errors: Vec<String>,
    verified: bool,
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

/// Opens `backend` with `config`, writes a range, migrates it to pagemap 1, then to
/// pagemap 0 (a peer push), and reads it back through the CPU path: each step may fail with
/// a typed error (or a panic from an infallible trait entry, caught here).
fn workload(backend: &str, config: &BackendConfig) -> Outcome {
    let mut o = Outcome::default();
    macro_rules! step {
        ($e:expr) => {
            match catch_unwind(AssertUnwindSafe(|| $e)) {
                Ok(Ok(v)) => Some(v),
                Ok(Err(e)) => {
                    o.errors.push(e.to_string());
                    None
                }
                Err(p) => {
                    o.errors.push(format!("panic: {}", panic_text(p)));
                    None
                }
            }
        };
    }
    let Some(b) = step!(drm_pagemap::open_backend(backend, config)) else {
        return o;
    };
    let Some(m) = step!(Machine::with_backend(Arc::from(b), 2, &[])) else {
        return o;
    };
    let range = VaRange::new(1 << 30, PAGES * 4096);
    if step!(m.mm.create_range(range, PageSize::Size4K)).is_none() {
        return o;
    }
    let data = pattern(7);
    if step!(m.mm.write(range.start, &data)).is_none() {
        return o;
    }
    let d = MigrateDetails::default();
    step!(m.mm.migrate(range, PagemapId(1), &d));
    step!(m.mm.migrate(range, PagemapId(0), &d));
    let mut back = vec![0u8; data.len()];
    if step!(m.mm.read(range.start, &mut back)).is_some() {
        o.verified = back == data;
    }
    o
}

/// Writes a few bytes into a fresh page of `backend` (its frame must be zeroed around them:
/// [`drm_pagemap::HostMemory::zero`]), then reads them back: a refused clear must leave the
/// page unpopulated and the range usable.
fn partial_write(backend: &str, config: &BackendConfig) -> Outcome {
    let mut o = Outcome::default();
    let b = match catch_unwind(AssertUnwindSafe(|| {
        drm_pagemap::open_backend(backend, config)
    })) {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            o.errors.push(e.to_string());
            return o;
        }
        Err(p) => {
            o.errors.push(format!("panic: {}", panic_text(p)));
            return o;
        }
    };
    let m = Machine::with_backend(Arc::from(b), 2, &[]).expect("machine");
    let range = VaRange::new(1 << 30, PAGES * 4096);
    m.mm.create_range(range, PageSize::Size4K).expect("range");
    let at = range.start + 4096 + 100;
    match catch_unwind(AssertUnwindSafe(|| m.mm.write(at, b"partial"))) {
        Ok(Ok(())) => {
            let mut back = [0u8; 4096];
            m.mm.read(range.start + 4096, &mut back).expect("read back");
            o.verified = &back[100..107] == b"partial"
                && back[..100].iter().chain(&back[107..]).all(|&x| x == 0);
        }
        Ok(Err(e)) => {
            o.errors.push(e.to_string());
            // Nothing changed: the page is still unpopulated.
            let loc = m.mm.location(at).expect("location");
            o.verified = loc == drm_pagemap::PageLocation::Unpopulated;
        }
        Err(p) => o.errors.push(format!("panic: {}", panic_text(p))),
    }
    o
}

fn plugin_config(extra: &[(&str, &str)]) -> BackendConfig {
    let mut c = BackendConfig {
        devices: Some(2),
        device_capacity: Some(16 << 20),
        host_capacity: Some(16 << 20),
        ..BackendConfig::default()
    }
    .with_option("tier.path", tier_dir().display().to_string())
    .unwrap();
    for (k, v) in extra {
        c = c.with_option(*k, *v).unwrap();
    }
    c
}

#[test]
fn both_plugins_run_the_workload() {
    plugins::load_all();
    for b in ["hostmem", "tier"] {
        let o = workload(b, &plugin_config(&[]));
        assert!(o.errors.is_empty() && o.verified, "{b}: {o:?}");
    }
}

/// Entries whose failure leaves the data readable (the CPU path does not need them).
const OFF_READ_PATH: &[&str] = &[
    "zero",
    "open",
    "host_memory",
    "create_pagemap",
    "device_map",
    "allocate",
    "populate_devmem_pfn",
    "copy_to_devmem",
];

#[test]
fn an_error_status_in_every_c_entry_point_is_a_typed_error() {
    plugins::load_all();
    for entry in [
        "open",
        "host_memory",
        "create_pagemap",
        "device_map",
        "allocate",
        "populate_devmem_pfn",
        "copy_to_devmem",
        "copy_to_ram",
        "alloc_frames",
        "map_frames",
        "read",
        "write",
        "zero",
    ] {
        let config = plugin_config(&[("hostmem.fail", entry)]);
        let o = if entry == "zero" {
            partial_write("hostmem", &config)
        } else {
            workload("hostmem", &config)
        };
        let needle = format!("injected failure in {entry}");
        assert!(
            o.errors.iter().any(|e| e.contains(&needle)),
            "{entry}: {o:?}"
        );
        // Every entry, host memory accesses included, fails with a typed error: nothing
        // reaches the host as a panic.
        assert!(
            !o.errors.iter().any(|e| e.starts_with("panic: ")),
            "{entry}: a panic reached the host: {o:?}"
        );
        if OFF_READ_PATH.contains(&entry) {
            assert!(
                o.verified || o.errors.iter().any(|e| e.contains("unavailable")),
                "{entry}: data lost: {o:?}"
            );
        }
    }
    // The backend is usable again without the fault: nothing was left broken.
    assert!(workload("hostmem", &plugin_config(&[])).verified);
}

#[test]
fn a_panic_in_every_rust_entry_point_is_a_typed_error() {
    plugins::load_all();
    for entry in [
        "open",
        "create_pagemap",
        "device_map",
        "allocate",
        "populate_devmem_pfn",
        "copy_to_devmem",
        "copy_to_ram",
        "alloc_frames",
        "map_frames",
        "read",
        "write",
        "zero",
    ] {
        let config = plugin_config(&[("tier.inject_panic", entry)]);
        let o = if entry == "zero" {
            partial_write("tier", &config)
        } else {
            workload("tier", &config)
        };
        let hit = o
            .errors
            .iter()
            .any(|e| e.contains("panicked in ") && e.contains("injected panic"));
        assert!(hit, "{entry}: {o:?}");
        assert!(
            !o.errors.iter().any(|e| e.starts_with("panic: ")),
            "{entry}: a panic reached the host: {o:?}"
        );
        if OFF_READ_PATH.contains(&entry) {
            assert!(
                o.verified || o.errors.iter().any(|e| e.contains("unavailable")),
                "{entry}: data lost: {o:?}"
            );
        }
    }
    assert!(workload("tier", &plugin_config(&[])).verified);
}

#[test]
fn a_copy_fence_that_never_signals_times_out_and_loses_nothing() {
    plugins::load_all();
    let b = drm_pagemap::open_backend("hostmem", &plugin_config(&[("hostmem.hang", "1")])).unwrap();
    let m = Machine::with_backend(Arc::from(b), 2, &[]).unwrap();
    let range = VaRange::new(1 << 30, PAGES * 4096);
    m.mm.create_range(range, PageSize::Size4K).unwrap();
    let data = pattern(3);
    m.mm.write(range.start, &data).unwrap();
    let d = MigrateDetails {
        fence_timeout: Some(Duration::from_millis(200)),
        ..MigrateDetails::default()
    };
    let t = Instant::now();
    let e = m.mm.migrate(range, PagemapId(1), &d).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Fence {
                source: FenceError::Timeout(_),
                ..
            }
        ),
        "{e}"
    );
    assert!(t.elapsed() < Duration::from_secs(30));
    let mut back = vec![0u8; data.len()];
    m.mm.read(range.start, &mut back).unwrap();
    assert_eq!(back, data, "the data stayed in system memory");
}

// ---------------------------------------------------------------------------------------
// Threads

#[test]
fn loading_one_plugin_from_many_threads_gives_one_plugin() {
    let path = tier();
    let loaded: Vec<_> = (0..8)
        .map(|_| {
            let p = path.clone();
            std::thread::spawn(move || drm_pagemap::plugins::load(p).unwrap())
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    for p in &loaded {
        assert!(Arc::ptr_eq(p, &loaded[0]));
    }
    assert_eq!(
        drm_pagemap::plugins::loaded()
            .iter()
            .filter(|p| p.name() == "tier")
            .count(),
        1
    );
}

#[test]
fn many_threads_use_one_plugin_backend() {
    plugins::load_all();
    for b in ["hostmem", "tier"] {
        let m = Arc::new(Machine::open(b, &plugin_config(&[]), 3).unwrap());
        let threads: Vec<_> = (0..6u64)
            .map(|t| {
                let m = m.clone();
                std::thread::spawn(move || {
                    let range = VaRange::new((1 << 30) + t * (1 << 24), PAGES * 4096);
                    m.mm.create_range(range, PageSize::Size4K).unwrap();
                    for round in 0..12u8 {
                        let data = pattern(round.wrapping_add(t as u8));
                        m.mm.write(range.start, &data).unwrap();
                        let to = PagemapId(((t as u8) + round) % 3);
                        m.mm.migrate(range, to, &MigrateDetails::default()).unwrap();
                        let mut back = vec![0u8; data.len()];
                        m.mm.read(range.start, &mut back).unwrap();
                        assert_eq!(back, data, "thread {t} round {round}");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }
}

// ---------------------------------------------------------------------------------------
// Discovery and the tool

#[test]
fn discovery_loads_files_and_directories_and_reports_the_rest() {
    plugins::load_all();
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("discover-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let _ = std::fs::remove_file(dir.join("libdrm_pagemap_plugin_tier.so"));
    std::os::unix::fs::symlink(tier(), dir.join("libdrm_pagemap_plugin_tier.so")).unwrap();
    let broken = c_plugin(
        "discover-noentry",
        "noentry2",
        &[("DPP_TEST_NO_ENTRY", "1"), ("DPP_NAME", "\"noentry2\"")],
    );
    let missing = dir.join("gone.so");
    let list = format!(
        "{}::{}:{}",
        dir.display(),
        broken.display(),
        missing.display()
    );
    let found = drm_pagemap::plugins::discover_list(&list);
    assert_eq!(found.len(), 3, "{found:?}");
    assert_eq!(found[0].result.as_ref().unwrap().name(), "tier");
    assert_eq!(
        found[1].result.as_ref().unwrap_err(),
        &LoadError::NotAPlugin
    );
    assert!(matches!(found[2].result, Err(LoadError::FileMissing(_))));
    assert_eq!(
        listed_reason(&format!("plugin:{}", missing.display())),
        Some(Err(format!("file missing: {}", missing.display())))
    );
}

fn migrate_bin() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .and_then(|d| d.parent())
        .unwrap()
        .join("examples")
        .join("migrate")
}

fn migrate(args: &[&str], env: Option<&std::path::Path>) -> (i32, String, String) {
    let mut cmd = std::process::Command::new(migrate_bin());
    cmd.args(args).env_remove("DRM_PAGEMAP_PLUGIN_PATH");
    if let Some(p) = env {
        cmd.env("DRM_PAGEMAP_PLUGIN_PATH", p);
    }
    let out = cmd.output().expect("run migrate");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn the_migrate_tool_runs_on_plugins_and_refuses_broken_ones() {
    let expected = r#"{"result":"ok","error":null,"copies":[{"executor":2,"op":"copy_to_devmem","pages":4},{"executor":0,"op":"copy_to_ram","pages":3},{"executor":1,"op":"copy_to_ram","pages":2}],"layout_before":"ss00s11s0","layout_after":"2*9","verified":true}"#;
    let tier_path = format!("plugin:{}", tier().display());
    let hostmem_path = format!("plugin:{}", hostmem().display());
    let dir = format!("tier.path={}", tier_dir().display());
    for (backend, extra) in [
        (&tier_path, vec!["--option", dir.as_str()]),
        (&hostmem_path, vec![]),
    ] {
        let mut args = vec![
            "--backend",
            backend.as_str(),
            "--devices",
            "3",
            "--layout",
            "ss00s11s0",
            "--to",
            "2",
            "--json",
        ];
        args.extend(extra.iter());
        let (code, out, err) = migrate(&args, None);
        assert_eq!(code, 0, "{backend}: {err}");
        // The fields of before the statistics byte for byte, then `"stats"`.
        let line = out.trim();
        let at = line.find(r#","stats":{"#).expect("stats");
        assert_eq!(format!("{}}}", &line[..at]), expected, "{backend}");
        let v: serde_json::Value = serde_json::from_str(line).expect("one JSON line");
        assert_eq!(v["stats"]["page_sizes"][0]["pages"], 9, "{backend}: {line}");
        // Other layouts and page sizes, data verified.
        for layout in ["s0s2s0", "ss00ss22", "0202s.s"] {
            let mut args = vec![
                "--backend",
                backend.as_str(),
                "--devices",
                "3",
                "--layout",
                layout,
                "--to",
                "1",
                "--page-size",
                "65536",
                "--json",
            ];
            args.extend(extra.iter());
            let (code, out, err) = migrate(&args, None);
            assert_eq!(code, 0, "{backend} {layout}: {err}");
            assert!(
                out.contains(r#""verified":true"#),
                "{backend} {layout}: {out}"
            );
        }
    }
    // Discovered from the environment, named by its name.
    let (code, out, err) = migrate(
        &[
            "--backend",
            "tier",
            "--option",
            &dir,
            "--devices",
            "2",
            "--layout",
            "s0s",
            "--to",
            "1",
            "--json",
        ],
        Some(&tier()),
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(r#""verified":true"#), "{out}");
    // Broken: "backend ... unavailable: reason", exit 1, no crash.
    let broken = c_plugin(
        "cli-noentry",
        "clinoentry",
        &[("DPP_TEST_NO_ENTRY", "1"), ("DPP_NAME", "\"clinoentry\"")],
    );
    let key = format!("plugin:{}", broken.display());
    let (code, _, err) = migrate(&["--backend", &key], None);
    assert_eq!(code, 1);
    assert_eq!(
        err.trim(),
        format!(
            "migrate: backend {key} unavailable: not a plug-in (no entry symbol drm_pagemap_plugin_v1)"
        )
    );
    let (code, _, err) = migrate(&["--backend", "plugin:/no/such.so"], None);
    assert_eq!(code, 1);
    assert_eq!(
        err.trim(),
        "migrate: backend plugin:/no/such.so unavailable: file missing: /no/such.so"
    );
}
