//! `cargo run -p drm-pagemap-plots -- [--out DIR] DATA_DIR...`: draws the SVG plots of
//! BENCHMARKS.md from each results directory (default output: `docs/plots`). Exit codes: 0
//! done, 1 a file could not be read, parsed or written, 2 bad arguments.

use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "usage: plots [--out DIR] DATA_DIR...\n\
    Reads the results files in each DATA_DIR (*.jsonl of the CUDA benches, *.txt of\n\
    `svm-multi-device latency` and `migrate`, machine.txt) and writes SVG charts into DIR\n\
    (default docs/plots).";

fn main() -> ExitCode {
    let mut out = PathBuf::from("docs/plots");
    let mut dirs = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--out" => match args.next() {
                Some(d) => out = PathBuf::from(d),
                None => {
                    eprintln!("--out needs a directory\n{USAGE}");
                    return ExitCode::from(2);
                }
            },
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            s if s.starts_with('-') => {
                eprintln!("unknown option {s}\n{USAGE}");
                return ExitCode::from(2);
            }
            _ => dirs.push(PathBuf::from(a)),
        }
    }
    if dirs.is_empty() {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    }
    for d in &dirs {
        match drm_pagemap_plots::generate(d, &out) {
            Ok(written) if written.is_empty() => {
                eprintln!("{}: no results files found", d.display());
            }
            Ok(written) => {
                for p in written {
                    println!("{} -> {}", d.display(), p.display());
                }
            }
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(1);
            }
        }
    }
    ExitCode::SUCCESS
}
