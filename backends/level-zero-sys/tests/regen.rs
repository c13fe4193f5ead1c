//! The checked-in bindings are what `regen.sh` makes of the installed headers.

use std::path::{Path, PathBuf};
use std::process::Command;

fn bindgen() -> Option<PathBuf> {
    let from_path = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("bindgen"))
            .find(|b| b.is_file())
    });
    from_path.or_else(|| {
        let home = PathBuf::from(std::env::var_os("HOME")?);
        let b = home.join(".cargo/bin/bindgen");
        b.is_file().then_some(b)
    })
}

#[test]
fn bindings_match_the_installed_headers() {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let header = Path::new("/usr/include/level_zero/ze_ddi.h");
    if !header.is_file() {
        println!(
            "skipped: {} not found (apt-get install libze-dev)",
            header.display()
        );
        return;
    }
    let Some(bindgen) = bindgen() else {
        println!("skipped: bindgen not found (cargo install bindgen-cli --version 0.71.1)");
        return;
    };
    let out = std::env::temp_dir().join(format!("level-zero-sys-regen-{}.rs", std::process::id()));
    let dir = bindgen.parent().expect("bindgen has a directory");
    let path = std::env::join_paths(std::iter::once(dir.to_path_buf()).chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))
    .expect("PATH");
    let status = Command::new("bash")
        .arg(here.join("regen.sh"))
        .arg(&out)
        .env("PATH", path)
        .status()
        .expect("run regen.sh");
    assert!(status.success(), "regen.sh failed: {status}");
    let fresh = std::fs::read_to_string(&out).expect("regen.sh output");
    let _ = std::fs::remove_file(&out);
    let checked_in = std::fs::read_to_string(here.join("src/bindings.rs")).expect("bindings.rs");
    if fresh != checked_in {
        let line = fresh
            .lines()
            .zip(checked_in.lines())
            .position(|(a, b)| a != b)
            .map_or(fresh.lines().count().min(checked_in.lines().count()), |i| i);
        panic!(
            "src/bindings.rs differs from regen.sh's output from line {} on: run \
             backends/level-zero-sys/regen.sh",
            line + 1
        );
    }
}
