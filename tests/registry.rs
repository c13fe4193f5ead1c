//! The registry of built-in backends: what it lists, what `auto` picks, and how an
//! unavailable or unknown backend is reported (an error, never a panic).

use drm_pagemap::{BackendConfig, Error, auto_backend, backends, open_backend};

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
fn auto_picks_an_available_gpu_backend_else_sim() {
    let gpu = backends()
        .into_iter()
        .find(|b| b.is_gpu && b.available.is_ok())
        .map(|b| b.name);
    assert_eq!(auto_backend(), gpu.unwrap_or("sim"));
    let backend = open_backend("auto", &BackendConfig::default()).expect("auto opens");
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
            let err = open_backend("cuda", &BackendConfig::default())
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
