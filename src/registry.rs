//! The registry of backends: each registers a [`BackendRegistration`] with `inventory`
//! (the facade does it for the built-in ones; a backend crate of yours does it for its own,
//! in a crate the final binary links).

use drm_pagemap_core::{Backend, BackendConfig, BackendError};

/// A backend as the registry knows it, submitted with
/// `drm_pagemap::inventory::submit! { drm_pagemap::BackendRegistration { .. } }`.
#[derive(Debug)]
pub struct BackendRegistration {
    /// Its name on the command line ("sim", "cuda").
    pub name: &'static str,
    /// Whether it drives real GPUs (preferred by `auto` when available).
    pub is_gpu: bool,
    /// Whether it can be used here; `Err` says why not. Must never panic.
    pub probe: fn() -> Result<(), String>,
    /// Opens it.
    pub open: fn(&BackendConfig) -> Result<Box<dyn Backend>, BackendError>,
}

inventory::collect!(BackendRegistration);
