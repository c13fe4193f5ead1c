//! Out-of-tree backends loaded as plug-ins (feature `plugins`): shared objects exporting the
//! C ABI of the `drm-pagemap-plugin` crate, written in Rust with its SDK or in C against
//! `include/drm_pagemap_plugin.h`.
//!
//! - [`load`](crate::plugins::load) loads one (a path), [`discover`](crate::plugins::discover)
//!   files and directories (every `libdrm_pagemap_plugin_*.so` in a directory),
//!   [`from_env`](crate::plugins::from_env) the `:`-separated list in
//!   `DRM_PAGEMAP_PLUGIN_PATH` (the only function here that reads the environment; binaries
//!   call it).
//! - Loaded plug-ins appear in [`crate::backends`] beside the built-in backends, by their
//!   name, each "available" or with the reason it is not (its probe's message); a path that
//!   failed to load appears as `plugin:PATH` with the reason (file missing, not a plug-in, ABI
//!   version N not supported, table too small, a required entry missing).
//! - [`crate::open_backend`] opens a loaded plug-in by its name, or loads and opens
//!   `plugin:PATH`; a broken plug-in is [`crate::Error::BackendUnavailable`] with the reason,
//!   never a crash.
//! - A plug-in stays loaded for the process's life, and its backend lives until the last
//!   pagemap, host memory and fence from it is gone.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub use drm_pagemap_plugin::abi;
pub use drm_pagemap_plugin::host::{
    LoadError, LogRecord, Plugin, SUPPORTED_VERSIONS, log_records, plugins_in,
};

/// The environment variable [`from_env`] reads: plug-in files or directories, `:`-separated.
pub const PLUGIN_PATH_VAR: &str = "DRM_PAGEMAP_PLUGIN_PATH";

/// A path tried by discovery, with what came of it.
#[derive(Debug)]
pub struct Discovered {
    /// The file.
    pub path: PathBuf,
    /// The plug-in, or why it could not be loaded.
    pub result: Result<Arc<Plugin>, LoadError>,
}

/// Paths that failed to load, with the reason (the latest per path), for [`crate::backends`].
static FAILED: Mutex<Vec<(&'static str, LoadError)>> = Mutex::new(Vec::new());

/// Loads the plug-in at `path` (once: loading it again returns the same plug-in). A failure
/// is also remembered, so [`crate::backends`] lists `plugin:PATH` with its reason.
pub fn load(path: impl AsRef<Path>) -> Result<Arc<Plugin>, LoadError> {
    let path = path.as_ref();
    let result = drm_pagemap_plugin::host::load(path);
    let key = format!("plugin:{}", path.display());
    let mut failed = FAILED.lock().unwrap_or_else(|p| p.into_inner());
    match &result {
        Ok(_) => failed.retain(|(k, _)| *k != key),
        Err(e) => match failed.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = e.clone(),
            None => failed.push((Box::leak(key.into_boxed_str()), e.clone())),
        },
    }
    result
}

/// Loads every plug-in `paths` name: a file is loaded as it is; a directory contributes its
/// `libdrm_pagemap_plugin_*.so` files; a path that does not exist is reported missing.
pub fn discover<P: AsRef<Path>>(paths: impl IntoIterator<Item = P>) -> Vec<Discovered> {
    let mut out = Vec::new();
    for p in paths {
        let p = p.as_ref();
        let files = if p.is_dir() {
            plugins_in(p)
        } else {
            vec![p.to_path_buf()]
        };
        for f in files {
            let result = load(&f);
            out.push(Discovered { path: f, result });
        }
    }
    out
}

/// [`discover`] on a `:`-separated list (empty entries are skipped).
pub fn discover_list(list: &str) -> Vec<Discovered> {
    discover(list.split(':').filter(|s| !s.is_empty()))
}

/// [`discover_list`] on `DRM_PAGEMAP_PLUGIN_PATH` (nothing when it is unset): the one place
/// the library reads it.
pub fn from_env() -> Vec<Discovered> {
    match std::env::var_os(PLUGIN_PATH_VAR) {
        Some(v) => discover_list(&v.to_string_lossy()),
        None => Vec::new(),
    }
}

/// Every plug-in loaded so far.
pub fn loaded() -> Vec<Arc<Plugin>> {
    drm_pagemap_plugin::host::loaded()
}

/// The registry's view: each loaded plug-in (availability: not disabled, then its probe),
/// then each path that failed to load.
pub(crate) fn statuses(config: &crate::BackendConfig) -> Vec<crate::BackendStatus> {
    let mut out: Vec<crate::BackendStatus> = loaded()
        .into_iter()
        .map(|p| crate::BackendStatus {
            name: p.name(),
            is_gpu: p.is_gpu(),
            available: availability(&p, config),
        })
        .collect();
    let failed = FAILED.lock().unwrap_or_else(|p| p.into_inner());
    out.extend(failed.iter().map(|(k, e)| crate::BackendStatus {
        name: k,
        is_gpu: false,
        available: Err(e.to_string()),
    }));
    out
}

fn availability(p: &Plugin, config: &crate::BackendConfig) -> Result<(), String> {
    match config.disabled(p.name()) {
        Ok(true) => Err(format!("disabled by option {}.disable", p.name())),
        Ok(false) => p.probe().map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// The plug-in `name` stands for: `plugin:PATH` (loaded now), or a loaded plug-in's name.
/// `None`: not a plug-in name.
pub(crate) fn resolve(name: &str) -> Option<Result<Arc<Plugin>, String>> {
    if let Some(path) = name.strip_prefix("plugin:") {
        return Some(load(path).map_err(|e| e.to_string()));
    }
    drm_pagemap_plugin::host::find(name).map(Ok)
}

/// Opens plug-in `p` (named `name` on the command line) with `config`.
pub(crate) fn open(
    name: &str,
    p: &Arc<Plugin>,
    config: &crate::BackendConfig,
) -> Result<Box<dyn crate::Backend>, crate::Error> {
    let unavailable = |reason: String| crate::Error::BackendUnavailable {
        name: name.into(),
        reason,
    };
    availability(p, config).map_err(unavailable)?;
    p.open(config).map_err(|e| match e.kind {
        crate::BackendErrorKind::BadConfig => crate::Error::BadConfig {
            backend: p.name().into(),
            reason: e.message,
        },
        _ => unavailable(e.to_string()),
    })
}

/// The names of loaded plug-ins (for option checks).
pub(crate) fn names() -> Vec<&'static str> {
    loaded().iter().map(|p| p.name()).collect()
}
