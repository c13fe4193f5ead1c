//! Finding the built `libze_soft.so` and pointing the Level Zero loader at it.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The file name of the driver library.
pub const LIBRARY_FILE: &str = "libze_soft.so";
/// The loader's variable that replaces its list of drivers.
const ALT_DRIVERS: &str = "ZE_ENABLE_ALT_DRIVERS";

/// The built `libze_soft.so`: looked for next to the current executable (its directory, the
/// `deps/` below it and the directory above it, which covers `target/<profile>/`,
/// `target/<profile>/deps/` and `target/<profile>/examples/`). Cargo builds the cdylib whenever
/// `ze-soft` is a (dev-)dependency, because the library's crate types include `cdylib`.
///
/// # Errors
/// Says which directories were searched when the library is in none of them.
pub fn library_path() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("ze-soft: current_exe: {e}"))?;
    let dir = exe
        .parent()
        .ok_or_else(|| format!("ze-soft: {} has no parent directory", exe.display()))?;
    let mut searched = Vec::new();
    let mut candidates = vec![dir.to_path_buf(), dir.join("deps")];
    if let Some(up) = dir.parent() {
        candidates.push(up.to_path_buf());
        candidates.push(up.join("deps"));
    }
    for candidate in candidates {
        if let Some(found) = newest_in(&candidate) {
            return Ok(found);
        }
        searched.push(candidate.display().to_string());
    }
    Err(format!(
        "ze-soft: {LIBRARY_FILE} not found next to {} (searched {}); build it with \
         `cargo build -p ze-soft` or add ze-soft as a (dev-)dependency",
        exe.display(),
        searched.join(", ")
    ))
}

/// `dir/libze_soft.so`, else the newest `dir/libze_soft-<hash>.so`.
fn newest_in(dir: &Path) -> Option<PathBuf> {
    let exact = dir.join(LIBRARY_FILE);
    if exact.is_file() {
        return Some(exact);
    }
    let entries = std::fs::read_dir(dir).ok()?;
    entries
        .filter_map(Result::ok)
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with("libze_soft-") && name.ends_with(".so")
        })
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .max_by_key(|(time, _)| *time)
        .map(|(_, path)| path)
}

/// Points the Level Zero loader at this driver: once per process, unless `ZE_ENABLE_ALT_DRIVERS`
/// is already set (then its value is returned untouched), sets it to [`library_path`] and
/// returns that path. Call it before the loader library is opened and before `zeInit`.
///
/// # Errors
/// [`library_path`]'s error when the library cannot be found.
pub fn route_loader() -> Result<PathBuf, String> {
    route_loader_with(&[])
}

/// [`route_loader`], after setting the driver's configuration variables: each `(name, value)`
/// of `settings` whose `name` starts with `ZE_SOFT_` and is not set yet in the environment is
/// set (a value the user already set wins). Only the first routing call of the process
/// (this or [`route_loader`]) applies settings: the driver reads them once, at `zeInit`.
///
/// # Errors
/// A name outside `ZE_SOFT_*`, or a name or value that cannot be an environment variable
/// (empty, `=` or NUL in it), before anything is set; else [`library_path`]'s error.
pub fn route_loader_with(settings: &[(&str, &str)]) -> Result<PathBuf, String> {
    for (name, value) in settings {
        let bad_name = !name.starts_with("ZE_SOFT_") || name.contains(['=', '\0']);
        if bad_name || value.contains('\0') {
            return Err(format!(
                "ze-soft: {name:?}={value:?} is not a ZE_SOFT_* driver setting"
            ));
        }
    }
    static ROUTED: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    ROUTED
        .get_or_init(|| {
            for (name, value) in settings {
                if std::env::var_os(name).is_none() {
                    // SAFETY: as below: once per process, before the loader is opened and
                    // zeInit runs (the driver reads these there).
                    unsafe { std::env::set_var(name, value) };
                }
            }
            if let Some(value) = std::env::var_os(ALT_DRIVERS) {
                return Ok(PathBuf::from(value));
            }
            let path = library_path()?;
            // SAFETY: this runs once per process (OnceLock), before the caller opens the loader
            // and calls zeInit, as the documentation requires; no other thread of ours reads the
            // environment concurrently at this point.
            unsafe { std::env::set_var(ALT_DRIVERS, &path) };
            Ok(path)
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::route_loader_with;

    #[test]
    fn settings_outside_ze_soft_are_refused_before_anything_is_set() {
        let before = std::env::var_os("ZE_SOFT_DEVICES");
        for (name, value) in [
            ("PATH", "/x"),
            ("ZE_ENABLE_ALT_DRIVERS", "/x.so"),
            ("ZE_SOFT_A=B", "1"),
            ("ZE_SOFT_DEVICES", "2\0"),
        ] {
            let e = route_loader_with(&[("ZE_SOFT_DEVICES", "2"), (name, value)]).expect_err(name);
            assert!(e.contains("is not a ZE_SOFT_* driver setting"), "{e}");
        }
        assert_eq!(
            std::env::var_os("ZE_SOFT_DEVICES"),
            before,
            "a setting leaked"
        );
    }
}
