//! The test plug-ins: the C "hostmem" plug-in compiled with the `cc` crate (and its broken
//! variants), and the Rust "tier" plug-in, a workspace member built by `cargo build
//! --workspace` / `cargo test --workspace` into the target directory (built here with a
//! nested `cargo build` into a target directory of its own when it is not there).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

/// The repository's root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Where the tests put what they build.
fn scratch() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("plugins")
}

/// Compiles `examples/plugins/hostmem-c/hostmem.c` with `defines` into
/// `<scratch>/<variant>/libdrm_pagemap_plugin_<file_name>.so` (once per process and variant).
pub fn c_plugin(variant: &str, file_name: &str, defines: &[(&str, &str)]) -> PathBuf {
    try_c_plugin(variant, file_name, defines).unwrap_or_else(|e| panic!("{e}"))
}

/// [`c_plugin`], or why it cannot be built here (no C compiler, no sources: a machine that
/// runs packed test binaries).
pub fn try_c_plugin(
    variant: &str,
    file_name: &str,
    defines: &[(&str, &str)],
) -> Result<PathBuf, String> {
    static BUILT: Mutex<Option<HashMap<String, PathBuf>>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    let map = built.get_or_insert_with(HashMap::new);
    if let Some(p) = map.get(variant) {
        return Ok(p.clone());
    }
    let source = root().join("examples/plugins/hostmem-c/hostmem.c");
    if !source.exists() {
        return Err(format!("{} is not here", source.display()));
    }
    let dir = scratch().join(format!("{variant}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("scratch dir {}: {e}", dir.display()))?;
    let out = dir.join(format!("libdrm_pagemap_plugin_{file_name}.so"));
    let target = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
    let mut b = cc::Build::new();
    b.target(&target)
        .host(&target)
        .opt_level(1)
        .debug(false)
        .cargo_metadata(false)
        .cargo_warnings(false)
        .pic(true)
        .include(root().join("include"));
    for (k, v) in defines {
        b.define(k, Some(*v));
    }
    let compiler = b
        .try_get_compiler()
        .map_err(|e| format!("no C compiler: {e}"))?;
    let mut cmd = compiler.to_command();
    cmd.args([
        "-shared",
        "-Wall",
        "-Werror",
        "-std=c11",
        "-D_GNU_SOURCE",
        "-o",
    ])
    .arg(&out)
    .arg(root().join("examples/plugins/hostmem-c/hostmem.c"))
    .arg("-lpthread");
    for (k, v) in defines {
        cmd.arg(format!("-D{k}={v}"));
    }
    let st = cmd
        .output()
        .map_err(|e| format!("running the C compiler: {e}"))?;
    if !st.status.success() {
        return Err(format!(
            "compiling the C plug-in failed:\n{}",
            String::from_utf8_lossy(&st.stderr)
        ));
    }
    map.insert(variant.into(), out.clone());
    Ok(out)
}

/// The C plug-in as shipped.
pub fn hostmem() -> PathBuf {
    c_plugin("hostmem", "hostmem", &[])
}

/// The Rust tier plug-in: the workspace's build of it (`target/<profile>/`), else one built
/// now with `cargo build -p drm-pagemap-plugin-tier` into a target directory of the tests.
pub fn tier() -> PathBuf {
    try_tier().unwrap_or_else(|e| panic!("{e}"))
}

/// [`tier`], or why it cannot be had here (no cargo: a machine that runs packed test binaries).
pub fn try_tier() -> Result<PathBuf, String> {
    static PATH: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PATH.get_or_init(|| {
        let name = "libdrm_pagemap_plugin_tier.so";
        // target/<profile>/deps/<test binary> -> target/<profile>/
        let exe = std::env::current_exe().expect("test binary path");
        if let Some(profile_dir) = exe.parent().and_then(Path::parent) {
            let p = profile_dir.join(name);
            if fresh(&p) {
                return Ok(p);
            }
        }
        let target = scratch().join("cargo-target");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let st = std::process::Command::new(cargo)
            .args([
                "build",
                "-q",
                "-p",
                "drm-pagemap-plugin-tier",
                "--target-dir",
            ])
            .arg(&target)
            .current_dir(root())
            .status()
            .map_err(|e| format!("cargo build of the tier plug-in could not run: {e}"))?;
        if !st.success() {
            return Err("cargo build of the tier plug-in failed".into());
        }
        Ok(target.join("debug").join(name))
    })
    .clone()
}

/// Whether `lib` exists and is newer than every source of the plug-in and the SDK.
fn fresh(lib: &Path) -> bool {
    let Ok(built) = lib.metadata().and_then(|m| m.modified()) else {
        return false;
    };
    let mut newest = std::time::SystemTime::UNIX_EPOCH;
    for dir in [
        "examples/plugins/tier/src",
        "drm-pagemap-plugin/src",
        "drm-pagemap-plugin/src/sdk",
        "drm-pagemap-core/src",
        "drm-pagemap-core/src/fence",
    ] {
        if let Ok(rd) = std::fs::read_dir(root().join(dir)) {
            for e in rd.flatten() {
                if let Ok(m) = e.metadata().and_then(|m| m.modified()) {
                    newest = newest.max(m);
                }
            }
        }
    }
    built >= newest
}

/// A scratch directory for the tier's files.
pub fn tier_dir() -> PathBuf {
    let d = scratch().join("tier-files");
    std::fs::create_dir_all(&d).expect("tier dir");
    d
}

/// Loads both test plug-ins (once) and returns their names: `["hostmem", "tier"]`.
pub fn load_all() -> Vec<&'static str> {
    static NAMES: OnceLock<Vec<&'static str>> = OnceLock::new();
    NAMES
        .get_or_init(|| {
            let mut names = Vec::new();
            for (what, path) in [
                ("hostmem", try_c_plugin("hostmem", "hostmem", &[])),
                ("tier", try_tier()),
            ] {
                let loaded = path.and_then(|p| {
                    drm_pagemap::plugins::load(&p).map_err(|e| format!("{}: {e}", p.display()))
                });
                match loaded {
                    Ok(p) => names.push(p.name()),
                    // Once per test binary (the list is made once): a machine that runs
                    // packed binaries has neither the sources nor cargo.
                    Err(reason) => {
                        use std::io::Write;
                        let _ = writeln!(std::io::stderr(), "skipped: plugin {what}: {reason}");
                    }
                }
            }
            names
        })
        .clone()
}

/// The loaded plug-in `name`.
pub fn plugin(name: &str) -> Arc<drm_pagemap::plugins::Plugin> {
    load_all();
    drm_pagemap::plugins::loaded()
        .into_iter()
        .find(|p| p.name() == name)
        .expect("loaded plug-in")
}
