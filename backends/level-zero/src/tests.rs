//! Unit tests that need no driver.

use super::*;
use crate::ze::Failure;
use level_zero_sys::{LoaderError, ZeError, ze_result_t};

fn with_options(pairs: &[(&str, &str)]) -> BackendConfig {
    let mut c = BackendConfig::default();
    for (k, v) in pairs {
        c.options.set(*k, *v).unwrap();
    }
    c
}

#[test]
fn default_is_the_documented_constants() {
    let d = LevelZeroConfig::default();
    assert_eq!(
        (d.devices, d.device_capacity, d.host_capacity),
        (None, None, DEFAULT_HOST_CAPACITY)
    );
    assert_eq!(d.regular_list_min_runs, DEFAULT_REGULAR_LIST_MIN_RUNS);
    assert!(!d.disable);
    assert!(d.clear_on_free);
    assert_eq!(
        LevelZeroConfig::from_backend_config(&BackendConfig::default()).unwrap(),
        d
    );
}

#[test]
fn every_option_reaches_its_field() {
    let mut c = with_options(&[
        ("level-zero.regular_list_min_runs", "4"),
        ("level-zero.device_capacity", "1G"),
        ("level-zero.disable", "yes"),
        ("level-zero.clear_on_free", "no"),
        ("sim.copy_latency", "1ms"),
    ]);
    c.devices = Some(2);
    c.host_capacity = Some(1 << 30);
    c.device_capacity = Some(123);
    assert_eq!(
        LevelZeroConfig::from_backend_config(&c).unwrap(),
        LevelZeroConfig {
            devices: Some(2),
            device_capacity: Some(1 << 30),
            host_capacity: 1 << 30,
            regular_list_min_runs: 4,
            clear_on_free: false,
            disable: true,
        }
    );
}

#[test]
fn bad_options_are_refused_naming_the_key() {
    for (key, value) in [
        ("level-zero.regular_list_min_runs", "0"),
        ("level-zero.regular_list_min_runs", "-3"),
        ("level-zero.regular_list_min_runs", "many"),
        ("level-zero.device_capacity", "lots"),
        ("level-zero.disable", "2"),
        ("level-zero.clear_on_free", "maybe"),
        ("level-zero.immediate", "1"),
    ] {
        let cfg = with_options(&[(key, value)]);
        let e = LevelZeroConfig::from_backend_config(&cfg).expect_err(key);
        assert_eq!(e.key(), Some(key), "{e}");
        let b = open(&cfg).err().expect(key);
        assert_eq!(b.kind, BackendErrorKind::BadConfig, "{b}");
        assert!(b.message.contains(key), "{b}");
    }
}

#[test]
fn configs_past_the_limits_are_refused_before_any_driver_call() {
    for (c, needle) in [
        (
            LevelZeroConfig {
                devices: Some(0),
                ..LevelZeroConfig::default()
            },
            "0 devices",
        ),
        (
            LevelZeroConfig {
                host_capacity: u64::MAX,
                ..LevelZeroConfig::default()
            },
            "18446744073709551615",
        ),
        (
            LevelZeroConfig {
                regular_list_min_runs: 0,
                ..LevelZeroConfig::default()
            },
            "regular_list_min_runs",
        ),
    ] {
        let e = LevelZeroBackend::new(c).expect_err(needle);
        assert_eq!(e.kind, BackendErrorKind::BadConfig, "{e}");
        assert!(e.message.contains(needle), "{e}");
    }
}

#[test]
fn a_disabled_backend_is_unavailable_before_any_driver_call() {
    let cfg = LevelZeroConfig {
        disable: true,
        ..LevelZeroConfig::default()
    };
    assert!(probe_with(&cfg).unwrap_err().contains("level-zero.disable"));
    let e = LevelZeroBackend::new(cfg).expect_err("disabled");
    assert_eq!(e.kind, BackendErrorKind::Unavailable);
    assert!(e.message.starts_with("level-zero: "), "{e}");
}

#[test]
fn probe_and_open_never_panic() {
    match probe() {
        Ok(()) => {
            let b = open(&BackendConfig::default()).expect("probe said yes");
            assert!(!b.devices().is_empty());
            assert_eq!(b.name(), "level-zero");
        }
        Err(reason) => {
            assert!(!reason.is_empty());
            let e = open(&BackendConfig::default()).err().expect("unavailable");
            assert_eq!(e.kind, BackendErrorKind::Unavailable, "{e}");
            assert!(
                e.to_string().starts_with("unavailable: level-zero: "),
                "{e}"
            );
        }
    }
}

#[test]
fn driver_errors_keep_their_code_and_typed_kinds() {
    let call = |code| {
        Failure::Call(ZeError {
            call: "zeMemAllocDevice",
            code,
        })
    };
    let oom = call(ze_result_t::ZE_RESULT_ERROR_OUT_OF_DEVICE_MEMORY).about("device 1: chunk 3");
    assert_eq!(oom.kind, BackendErrorKind::OutOfMemory);
    assert!(oom.message.contains("device 1: chunk 3"), "{oom}");
    assert!(
        oom.message.contains("ZE_RESULT_ERROR_OUT_OF_DEVICE_MEMORY"),
        "{oom}"
    );
    assert_eq!(ze_result_of(&oom), Some(0x7000_0003));
    let host = call(ze_result_t::ZE_RESULT_ERROR_OUT_OF_HOST_MEMORY).about("x");
    assert_eq!(host.kind, BackendErrorKind::OutOfMemory);
    assert_eq!(ze_result_of(&host), Some(0x7000_0002));
    let lost = call(ze_result_t::ZE_RESULT_ERROR_DEVICE_LOST).about("x");
    assert_eq!(lost.kind, BackendErrorKind::DeviceLost);
    assert_eq!(ze_result_of(&lost), Some(0x7000_0001));
    let other = call(ze_result_t::ZE_RESULT_ERROR_INVALID_ARGUMENT).about("x");
    assert_eq!(
        other.kind,
        BackendErrorKind::Driver {
            api: "zeMemAllocDevice",
            code: 0x7800_0004
        }
    );
    assert_eq!(ze_result_of(&other), Some(0x7800_0004));
    let missing = Failure::Missing(LoaderError::MissingEntry {
        name: "zeMemAllocDevice",
    })
    .about("x");
    assert_eq!(missing.kind, BackendErrorKind::Unsupported);
    assert!(missing.message.contains("zeMemAllocDevice"));
    assert_eq!(ze_result_of(&missing), None);
}
