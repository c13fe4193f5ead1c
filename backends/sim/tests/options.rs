//! The sim backend's options: what `SimConfig::from_backend_config` makes of them, what it
//! refuses (naming the key), and that an option set through `BackendConfig` reaches the
//! running backend.

use drm_pagemap_core::*;
use drm_pagemap_sim::{SimBackend, SimConfig};
use std::time::{Duration, Instant};

fn config(pairs: &[(&str, &str)]) -> BackendConfig {
    let mut c = BackendConfig {
        devices: Some(2),
        device_capacity: Some(64 << 20),
        host_capacity: Some(64 << 20),
        ..BackendConfig::default()
    };
    for (k, v) in pairs {
        c.options.set(*k, *v).unwrap();
    }
    c
}

#[test]
fn options_set_what_the_generic_config_lacks() {
    let d = SimConfig::default();
    let plain = SimConfig::from_backend_config(&BackendConfig::default()).unwrap();
    assert_eq!(
        (plain.devices, plain.copy_latency, plain.owner_groups),
        (d.devices, d.copy_latency, d.owner_groups)
    );
    let c = SimConfig::from_backend_config(&config(&[
        ("sim.copy_latency", "3ms"),
        ("sim.owner_groups", "0,1"),
        // Another backend's keys are its business.
        ("cuda.vmm", "0"),
    ]))
    .unwrap();
    assert_eq!(c.copy_latency, Duration::from_millis(3));
    assert_eq!(c.owner_groups, Some(vec![0, 1]));
    assert_eq!((c.devices, c.device_capacity), (2, 64 << 20));
}

#[test]
fn unknown_keys_and_bad_values_are_refused_naming_the_key() {
    for (key, value) in [
        ("sim.copy_latency", "fast"),
        ("sim.copy_latency", "10"),
        ("sim.owner_groups", "a,b"),
        ("sim.devices", "2"),
        ("sim.latency", "1ms"),
        ("sim.disable", "2"),
        ("sim.resident", "maybe"),
    ] {
        let cfg = config(&[(key, value)]);
        let e = SimConfig::from_backend_config(&cfg).expect_err(key);
        assert_eq!(e.key(), Some(key), "{e}");
        let b = drm_pagemap_sim::open(&cfg).err().expect(key);
        assert_eq!(b.kind, BackendErrorKind::BadConfig, "{b}");
        assert!(b.message.contains(key), "{b}");
    }
    // Owner groups that do not fit the device count: the backend's own check.
    let e = drm_pagemap_sim::open(&config(&[("sim.owner_groups", "0,0,1")]))
        .err()
        .unwrap();
    assert_eq!(e.kind, BackendErrorKind::BadConfig);
    assert!(
        e.message.contains("3 owner groups given for 2 devices"),
        "{e}"
    );
    // A list written against version 1 reads (newer ones cannot be built by this build).
    let cfg = BackendConfig {
        options: BackendOptions::with_version(1).unwrap(),
        ..BackendConfig::default()
    };
    SimConfig::from_backend_config(&cfg).unwrap();
}

#[test]
fn options_reach_the_backend() {
    // Owner groups: devices 0 and 1 in different groups do not reach each other.
    let b = drm_pagemap_sim::open(&config(&[("sim.owner_groups", "0,1")])).unwrap();
    assert!(!b.can_access_peer(DeviceId(0), DeviceId(1)));
    let b = drm_pagemap_sim::open(&config(&[])).unwrap();
    assert!(b.can_access_peer(DeviceId(0), DeviceId(1)));

    // Copy latency: every copy call (and the clear of a fresh allocation) takes it.
    let latency = Duration::from_millis(150);
    let migrate = |cfg: &BackendConfig| {
        let sim = SimBackend::new(SimConfig::from_backend_config(cfg).unwrap()).unwrap();
        let mm = AddressSpace::new(sim.host_memory());
        for pm in sim.pagemap_per_device().unwrap() {
            mm.add_pagemap(pm).unwrap();
        }
        let r = VaRange::new(1 << 30, 4096);
        mm.create_range(r, PageSize::Size4K).unwrap();
        mm.write(r.start, b"x").unwrap();
        let t = Instant::now();
        mm.migrate(r, PagemapId(1), &MigrateDetails::default())
            .unwrap();
        (t.elapsed(), sim.config().copy_latency)
    };
    let (slow, set) = migrate(&config(&[("sim.copy_latency", "150ms")]));
    assert_eq!(set, latency);
    assert!(
        slow >= latency,
        "a migration took {slow:?} with {latency:?} per copy"
    );
    let (_, none) = migrate(&config(&[]));
    assert_eq!(none, Duration::ZERO);
}

#[test]
fn resident_backs_every_device_before_the_backend_is_returned() {
    let lazy = drm_pagemap_sim::open(&config(&[])).unwrap();
    drop(lazy);
    let sim = SimBackend::new(
        SimConfig::from_backend_config(&config(&[("sim.resident", "true")])).unwrap(),
    )
    .unwrap();
    assert!(sim.config().resident);
    assert!(sim.resident_time().is_some());
    for d in 0..2 {
        assert_eq!(
            sim.device_resident_bytes(DeviceId(d)),
            Some(64 << 20),
            "device {d}"
        );
    }
    assert_eq!(sim.device_resident_bytes(DeviceId(2)), None);
    // Without the option nothing is backed until written.
    let sim = SimBackend::new(SimConfig::from_backend_config(&config(&[])).unwrap()).unwrap();
    assert_eq!(sim.resident_time(), None);
    assert_eq!(sim.device_resident_bytes(DeviceId(0)), Some(0));
    // A migration into resident memory moves the bytes as into lazily backed memory.
    let sim = SimBackend::new(SimConfig {
        devices: 1,
        device_capacity: 8 << 20,
        host_capacity: 8 << 20,
        resident: true,
        ..SimConfig::default()
    })
    .unwrap();
    let pm = sim.pagemap_per_device().unwrap();
    let mm = AddressSpace::new(sim.host_memory());
    mm.add_pagemap(pm[0].clone()).unwrap();
    let r = VaRange::new(1 << 30, 16 * 4096);
    mm.create_range(r, PageSize::Size4K).unwrap();
    let data: Vec<u8> = (0..r.len).map(|i| (i % 251) as u8).collect();
    mm.write(r.start, &data).unwrap();
    mm.migrate(r, PagemapId(0), &MigrateDetails::default())
        .unwrap();
    assert!(matches!(
        mm.location(r.start).unwrap(),
        PageLocation::Device {
            pagemap: PagemapId(0),
            ..
        }
    ));
    let mut back = vec![0u8; data.len()];
    mm.read(r.start, &mut back).unwrap();
    assert_eq!(back, data);
}

#[test]
fn resident_memory_past_what_the_machine_has_is_a_typed_error() {
    // 16 TiB per device is more than any machine here has available: refused before any
    // memory is touched, naming the option.
    let Some(available) = drm_pagemap_sim::available_memory() else {
        println!("skipped: /proc/meminfo has no MemAvailable here");
        return;
    };
    assert!(available > 0);
    let e = SimBackend::new(SimConfig {
        devices: 2,
        device_capacity: drm_pagemap_sim::MAX_DEVICE_CAPACITY,
        resident: true,
        ..SimConfig::default()
    })
    .expect_err("refused");
    assert_eq!(e.kind, BackendErrorKind::OutOfMemory, "{e}");
    assert!(e.message.contains("sim.resident"), "{e}");
}
