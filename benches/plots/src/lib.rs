//! The plots of BENCHMARKS.md, drawn from the benches' own results files.
//!
//! The data path: a bench writes a results file (on the GPU machine, into `$OUT`), the files
//! of one machine are kept in one directory under `docs/plots/data/`, and this crate's binary
//! turns each such directory into SVG files under `docs/plots/`:
//!
//! ```text
//! cargo run -p drm-pagemap-plots -- docs/plots/data/*/
//! ```
//!
//! Contract (what [`read_dir`] reads; everything else in a directory is ignored):
//! - `*.jsonl`: JSON lines written by the CUDA benches (`bench-cuda_copy` with
//!   `DRM_PAGEMAP_BENCH_JSON=PATH`, `bench-fault_latency --json PATH`); see
//!   [`parse::parse_jsonl`] for the records;
//! - `*.txt` holding the table of `svm-multi-device latency` ([`parse::parse_svm_latency`];
//!   the file's stem names the run), or `migrate`'s text summary ([`parse::parse_migrate`]);
//! - `machine.txt`: one line naming the machine, written into every chart's title.
//!
//! What [`render_all`] draws (a chart only where its data exists):
//! - `copy-h2d.svg`, `copy-d2h.svg`, `copy-d2d.svg`: GB/s against page size for our copy
//!   call and each baseline;
//! - `fault-latency-svm-<backend>.svg`, `fault-latency-backend-cuda.svg`: fault latency per
//!   range size, median and tail (p90, p99) of every run;
//! - `main-job-<backend>.svg`: the main job's end-to-end GB/s per page size.
//!
//! The output depends only on the input: no font files are read (plotters lays text out by
//! its built-in estimate), so the checked-in SVGs regenerate byte for byte.

pub mod model;
pub mod parse;
pub mod render;

use model::{CopyDirection, Results};
use std::path::{Path, PathBuf};

/// Reading or writing the files failed, or a chart could not be drawn.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The system's error.
        source: std::io::Error,
    },
    /// A results file is malformed.
    #[error(transparent)]
    Parse(#[from] parse::ParseError),
    /// A chart could not be drawn.
    #[error(transparent)]
    Render(#[from] render::RenderError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads every results file directly in `dir` (not below it), in file-name order, and the
/// machine's name from `machine.txt` if present.
pub fn read_dir(dir: &Path) -> Result<(Results, Option<String>), Error> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let mut out = Results::default();
    let mut machine = None;
    for path in files {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if ext != "jsonl" && ext != "txt" {
            continue;
        }
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        if name == "machine.txt" {
            machine = text
                .lines()
                .next()
                .map(|l| l.trim().to_string())
                .filter(|l| !l.is_empty());
        } else if ext == "jsonl" {
            out.merge(parse::parse_jsonl(&path.display().to_string(), &text)?);
        } else {
            let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or(name);
            out.latency.extend(parse::parse_svm_latency(&text, stem));
            out.main_job.extend(parse::parse_migrate(&text));
        }
    }
    Ok((out, machine))
}

/// Draws every chart `results` has data for; returns `(file name, SVG text)` pairs, in a
/// fixed order. `machine` goes into every title (the copy bench's own GPU name wins for the
/// copy charts).
pub fn render_all(
    results: &Results,
    machine: Option<&str>,
) -> Result<Vec<(String, String)>, Error> {
    let mut out = Vec::new();
    let copy_machine = results.copy_machine.as_deref().or(machine);
    for dir in CopyDirection::ALL {
        if results.copies.iter().any(|p| p.direction == dir) {
            out.push((
                format!("copy-{}.svg", dir.short()),
                render::copy_chart(dir, &results.copies, copy_machine)?,
            ));
        }
    }
    let mut charts: Vec<&str> = Vec::new();
    for r in &results.latency {
        if !charts.contains(&r.chart.as_str()) {
            charts.push(&r.chart);
        }
    }
    for chart in charts {
        let runs: Vec<_> = results
            .latency
            .iter()
            .filter(|r| r.chart == chart)
            .cloned()
            .collect();
        out.push((
            format!("{chart}.svg"),
            render::latency_chart(&runs, machine)?,
        ));
    }
    let mut backends: Vec<&str> = Vec::new();
    for r in &results.main_job {
        if !backends.contains(&r.backend.as_str()) {
            backends.push(&r.backend);
        }
    }
    for b in backends {
        let runs: Vec<_> = results
            .main_job
            .iter()
            .filter(|r| r.backend == b)
            .cloned()
            .collect();
        out.push((
            format!("main-job-{b}.svg"),
            render::main_job_chart(&runs, machine)?,
        ));
    }
    Ok(out)
}

/// Reads `dir` and writes its charts into `out_dir` (created if missing); returns the paths
/// written.
pub fn generate(dir: &Path, out_dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let (results, machine) = read_dir(dir)?;
    std::fs::create_dir_all(out_dir).map_err(io(out_dir))?;
    let mut written = Vec::new();
    for (name, svg) in render_all(&results, machine.as_deref())? {
        let path = out_dir.join(name);
        std::fs::write(&path, svg).map_err(io(&path))?;
        written.push(path);
    }
    Ok(written)
}
