//! The host side (feature `host`): loads a plug-in with `libloading`, checks its table before
//! calling anything else in it, and adapts its tables to the core's traits
//! ([`Plugin::open`] returns a `Box<dyn Backend>`).
//!
//! # Contract
//! - **Rejected before any call.** The entry symbol is looked up and called; its table's
//!   `abi_version`, `struct_size`, name and required entries are checked; only then is `probe`
//!   or `open` called. A rejected library is closed again.
//! - **Never unloaded.** A plug-in that passed the checks stays loaded until the process ends
//!   (its threads, callbacks and statics may outlive every object from it), and every object
//!   from it holds its backend, which is destroyed only after the last of them.
//! - **Loud diagnostics.** Every reason a plug-in cannot be used is a [`LoadError`] whose
//!   text is one of: file missing, not a plug-in (no entry symbol), ABI version N not
//!   supported (this host supports 1), table too small, a required entry missing, probe
//!   failed: MESSAGE, panicked in probe: MESSAGE.
//! - **Loaded once.** Loading the same path again (from any thread) returns the same
//!   [`Plugin`].

mod adapter;
mod services;

use crate::abi::*;
use crate::ffi;
use drm_pagemap_core::{Backend, BackendConfig, BackendError, BackendErrorKind};
use std::ffi::CStr;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub use services::{LogRecord, log_records};

/// The ABI versions this host supports, newest first (the order symbols are probed in).
pub const SUPPORTED_VERSIONS: &[u32] = &[1];

/// Newer entry symbols this host does not know: when one of these exists and no supported
/// one does, the plug-in is reported with its version.
const LATER_VERSIONS: std::ops::RangeInclusive<u32> = 2..=16;

/// Why a plug-in cannot be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoadError {
    /// No file at the path.
    FileMissing(PathBuf),
    /// The dynamic loader refused the file (not a shared object, missing dependencies).
    CannotLoad(String),
    /// The library has no `drm_pagemap_plugin_v*` symbol.
    NotAPlugin,
    /// The library only exports an entry of an ABI version this host does not support, or its
    /// table says so.
    Version(u32),
    /// The table is shorter than its version requires.
    TableTooSmall {
        /// Bytes the table says it has.
        size: u32,
        /// Bytes its version requires.
        needed: u32,
    },
    /// A required entry (or the name) is null.
    MissingEntry(&'static str),
    /// The name is not `[a-z0-9_-]{1,32}`, or another plug-in of that name is loaded.
    BadName(String),
    /// `probe` returned an error.
    ProbeFailed(String),
    /// `probe` panicked.
    ProbePanicked(String),
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::FileMissing(p) => write!(f, "file missing: {}", p.display()),
            LoadError::CannotLoad(m) => write!(f, "cannot be loaded: {m}"),
            LoadError::NotAPlugin => {
                f.write_str("not a plug-in (no entry symbol drm_pagemap_plugin_v1)")
            }
            LoadError::Version(v) => write!(
                f,
                "ABI version {v} not supported (this host supports {})",
                SUPPORTED_VERSIONS
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            LoadError::TableTooSmall { size, needed } => {
                write!(
                    f,
                    "table too small ({size} bytes; ABI version 1 needs {needed})"
                )
            }
            LoadError::MissingEntry(e) => write!(f, "a required entry missing: `{e}`"),
            LoadError::BadName(m) => write!(f, "bad name: {m}"),
            LoadError::ProbeFailed(m) => write!(f, "probe failed: {m}"),
            LoadError::ProbePanicked(m) => write!(f, "panicked in probe: {m}"),
        }
    }
}

impl std::error::Error for LoadError {}

/// A loaded plug-in (its table checked). Never unloaded.
pub struct Plugin {
    path: PathBuf,
    name: &'static str,
    description: String,
    is_gpu: bool,
    table: DppPluginV1,
    /// Kept for the process's life: never dropped, so never unloaded.
    _lib: &'static libloading::Library,
}

impl fmt::Debug for Plugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.name)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// The plug-ins loaded so far, in load order.
static LOADED: Mutex<Vec<Arc<Plugin>>> = Mutex::new(Vec::new());

/// Every plug-in loaded so far (in load order).
pub fn loaded() -> Vec<Arc<Plugin>> {
    LOADED.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// The loaded plug-in named `name`.
pub fn find(name: &str) -> Option<Arc<Plugin>> {
    loaded().into_iter().find(|p| p.name == name)
}

/// Loads the plug-in at `path` (or returns the one loaded from it before) and checks its
/// table. Calls nothing in the library but its entry symbol; [`Plugin::probe`] says whether
/// it can be used here.
///
/// A rejection is a `warn` event (target `drm_pagemap::plugin`: path, reason); a load a
/// `debug` event (path, plugin).
pub fn load(path: impl AsRef<Path>) -> Result<Arc<Plugin>, LoadError> {
    let path = path.as_ref();
    let r = load_untraced(path);
    match &r {
        Ok(p) => tracing::debug!(
            target: "drm_pagemap::plugin",
            path = %path.display(),
            plugin = p.name,
            outcome = "loaded",
            "plug-in loaded"
        ),
        Err(e) => tracing::warn!(
            target: "drm_pagemap::plugin",
            path = %path.display(),
            reason = %e,
            outcome = "rejected",
            "plug-in rejected"
        ),
    }
    r
}

fn load_untraced(path: &Path) -> Result<Arc<Plugin>, LoadError> {
    if !path.exists() {
        return Err(LoadError::FileMissing(path.to_path_buf()));
    }
    let canonical = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    // One load at a time: two threads loading one path get one plug-in.
    let mut list = LOADED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(p) = list.iter().find(|p| p.path == canonical) {
        return Ok(p.clone());
    }
    // SAFETY: loading a library runs its initialisers: the caller chose to trust this file
    // (that is what loading a plug-in means).
    let lib = unsafe { libloading::Library::new(&canonical) }
        .map_err(|e| LoadError::CannotLoad(e.to_string()))?;
    let table = check(&lib)?;
    // SAFETY: `check` verified a non-null, NUL-terminated name (the ABI's static string).
    let name = unsafe { CStr::from_ptr(table.name) }
        .to_string_lossy()
        .into_owned();
    if name.is_empty()
        || name.len() > 32
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    {
        return Err(LoadError::BadName(format!(
            "{name:?} is not [a-z0-9_-]{{1,32}}"
        )));
    }
    if let Some(other) = list.iter().find(|p| p.name == name) {
        return Err(LoadError::BadName(format!(
            "{name:?} is already loaded from {}",
            other.path.display()
        )));
    }
    // SAFETY: as the name.
    let description = unsafe { ffi::c_text(table.description) }.unwrap_or_default();
    let plugin = Arc::new(Plugin {
        path: canonical,
        name: Box::leak(name.into_boxed_str()),
        description,
        is_gpu: table.flags & DPP_PLUGIN_IS_GPU != 0,
        table,
        _lib: Box::leak(Box::new(lib)),
    });
    list.push(plugin.clone());
    Ok(plugin)
}

/// Finds the entry and checks the table; calls nothing else.
fn check(lib: &libloading::Library) -> Result<DppPluginV1, LoadError> {
    // SAFETY: the symbol, if present, has the ABI's entry signature (that is what exporting
    // this name promises).
    let entry = unsafe { lib.get::<EntryV1>(ENTRY_SYMBOL_V1) };
    let Ok(entry) = entry else {
        for v in LATER_VERSIONS {
            let sym = format!("drm_pagemap_plugin_v{v}\0");
            // SAFETY: only looked up, never called.
            if unsafe { lib.get::<*const ()>(sym.as_bytes()) }.is_ok() {
                return Err(LoadError::Version(v));
            }
        }
        return Err(LoadError::NotAPlugin);
    };
    // SAFETY: the ABI's entry: no arguments, returns a static table or null.
    let t = unsafe { entry() };
    if t.is_null() {
        return Err(LoadError::MissingEntry("table (the entry returned null)"));
    }
    // SAFETY: the first two fields exist in every version's table.
    let (version, size) = unsafe { ((*t).abi_version, (*t).struct_size) };
    if !SUPPORTED_VERSIONS.contains(&version) {
        return Err(LoadError::Version(version));
    }
    let needed = size_of_table::<DppPluginV1>();
    if size < needed {
        return Err(LoadError::TableTooSmall { size, needed });
    }
    // SAFETY: at least `needed` bytes (checked) of a static table.
    let table: DppPluginV1 = unsafe { read_table(t, size) };
    if table.name.is_null() {
        return Err(LoadError::MissingEntry("name"));
    }
    if table.probe.is_none() {
        return Err(LoadError::MissingEntry("probe"));
    }
    if table.open.is_none() {
        return Err(LoadError::MissingEntry("open"));
    }
    Ok(table)
}

impl Plugin {
    /// The backend's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Where it was loaded from (canonical).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its one-line description.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// Whether it drives real GPUs.
    pub fn is_gpu(&self) -> bool {
        self.is_gpu
    }

    /// Whether it can be used here: its `probe`. A refusal is a `warn` event (target
    /// `drm_pagemap::plugin`: plugin, path, reason).
    pub fn probe(&self) -> Result<(), LoadError> {
        let r = self.probe_untraced();
        if let Err(e) = &r {
            tracing::warn!(
                target: "drm_pagemap::plugin",
                plugin = self.name,
                path = %self.path.display(),
                reason = %e,
                outcome = "unavailable",
                "plug-in probe refused"
            );
        }
        r
    }

    fn probe_untraced(&self) -> Result<(), LoadError> {
        let mut err = DppError::empty();
        let probe = self.table.probe.ok_or(LoadError::MissingEntry("probe"))?;
        // SAFETY: a checked entry; the services are static; `err` is writable.
        let s = unsafe { probe(services::services(), &mut err) };
        if s == DPP_OK {
            return Ok(());
        }
        // SAFETY: the plug-in's strings, valid now.
        let message = unsafe { ffi::c_text(err.message) }.unwrap_or_else(|| format!("status {s}"));
        if s == DPP_E_PANICKED {
            let m = message
                .strip_prefix("panicked in probe: ")
                .unwrap_or(&message)
                .to_owned();
            Err(LoadError::ProbePanicked(m))
        } else {
            Err(LoadError::ProbeFailed(message))
        }
    }

    /// Opens the backend with `config` (every option is passed; the plug-in reads the keys
    /// under its name and refuses unknown ones). A refusal is a `warn` event (target
    /// `drm_pagemap::plugin`: plugin, reason).
    pub fn open(
        self: &Arc<Self>,
        config: &BackendConfig,
    ) -> Result<Box<dyn Backend>, BackendError> {
        let open = self.table.open.ok_or_else(|| {
            BackendError::new(
                BackendErrorKind::Unavailable,
                "a required entry missing: `open`",
            )
        });
        let r = open.and_then(|open| adapter::open(self.clone(), open, config));
        if let Err(e) = &r {
            tracing::warn!(
                target: "drm_pagemap::plugin",
                plugin = self.name,
                reason = %e,
                outcome = "refused",
                "plug-in open refused"
            );
        }
        r
    }
}

/// Shared objects in `dir` that look like plug-ins (`libdrm_pagemap_plugin_*.so`), sorted.
pub fn plugins_in(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                        n.starts_with("libdrm_pagemap_plugin_")
                            && (n.ends_with(".so") || n.ends_with(".dylib"))
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}
