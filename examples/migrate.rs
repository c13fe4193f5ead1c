//! `migrate`: the main job. Builds a range whose pages sit in system memory and in several
//! pagemaps, gives every page a distinct byte pattern, migrates the range to one pagemap,
//! reads the whole range back through the CPU path and checks every byte — also after a
//! failed migration.
//!
//! ```text
//! cargo run --release --example migrate -- [--backend auto|sim|cuda|level-zero|plugin:PATH|NAME] [--devices N]
//!     [--page-size BYTES] [--layout LAYOUT] [--to K] [--no-source-peer-migrates]
//!     [--same-pagemap] [--coalesce by-source|consecutive] [--foreign K]... [--fail-copy N]
//!     [--option BACKEND.KEY=VALUE]... [--release background|inline] [--pointers] [--json]
//!     [--stats]
//! ```
//! `--help` lists the flags and explains the layout notation. Without `--layout`: a 1 GiB range spread over system memory and every other pagemap,
//! migrated to pagemap 0, with a table of what moved. Exit codes: 0 success; 1 the migration
//! failed (the data still verifies) or the backend is unavailable; 2 bad arguments (also a
//! backend option that does not parse; one line `migrate: MESSAGE` on stderr). A progress bar
//! shows on stderr when stdout and stderr are a terminal (never with `--json`).
//!
//! `--release` (default `background`): the pages the migration replaced are given back by the
//! address space's reclaimer thread after the call returns (`ReleaseMode::Background`), and
//! the tool waits for that before it checks anything, printing how long after the return it
//! took; `inline` gives them back before the call returns. The `moved ... in` time is the
//! call's.
//!
//! Plug-ins: `--backend plugin:PATH` loads the shared object at PATH; the plug-ins in
//! `DRM_PAGEMAP_PLUGIN_PATH` (files or directories, `:`-separated) are loaded at start and
//! can be named by their name (`--backend tier`). A broken plug-in is `backend ...
//! unavailable: REASON` and exit 1.
//!
//! Backend options: the environment's first (`BackendConfig::from_env`:
//! `DRM_PAGEMAP_CUDA_VMM=0` and the others), then each `--option` (`--option cuda.kernel=ptx`,
//! `--option sim.copy_latency=1ms`; the last value of a key wins). The keys are documented on
//! `SimConfig` and `CudaConfig`.
//!
//! `--backend level-zero` runs on the workspace's software Level Zero driver (`ze-soft`, built
//! next to this example) through the real loader: before anything probes Level Zero, the
//! loader is routed to it with `--devices` devices of enough memory for the range (settings
//! already in the environment win: `ZE_SOFT_*`, `ZE_ENABLE_ALT_DRIVERS`). With
//! `DRM_PAGEMAP_LEVEL_ZERO_REAL=1` the loader keeps its own drivers (an Intel GPU's). `auto`
//! never routes the loader: it picks CUDA, else an Intel GPU, else sim.
//!
//! `--pointers` (sim, and CUDA in a build with the `cuda` feature): the range is memory of
//! this process (`drm_pagemap::uffd`: the backend's system memory is a memfd, on CUDA
//! registered with the driver as `cuda.host_memfd=1` makes it; the range a `PointerRange`),
//! filled with plain stores through its pointer and verified with loads through it (a page on
//! a device faults home through userfaultfd); same migration, output and exit codes. The
//! default workload is then at most 32768 pages (128 MiB of 4 KiB pages): checking it through
//! the pointer faults every page home one at a time. A backend without pointer ranges, or no
//! usable userfaultfd: one line `migrate: --pointers: REASON` and exit 1.

use clap::{Parser, ValueEnum};
use drm_pagemap::uffd::{PointerSpace, UffdConfig};
use drm_pagemap::{
    AddressSpace, Backend, BackendConfig, BackendOptions, Coalesce, CopyCall, CopyOp, Error,
    MigrateDetails, MigrateOutcome, PageSize, PagemapId, ReleaseMode, StatsSnapshot, VaRange,
};
use drm_pagemap_testkit::inject::{FaultInjector, FaultSite};
use drm_pagemap_testkit::layout::{self, LayoutPage};
use serde::Serialize;
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "tool/mod.rs"]
mod tool;

use tool::cli;
use tool::pointers::{self, Cpu, CpuError};
use tool::progress::Progress;

/// Where the range starts (any page-aligned address works).
const BASE: u64 = 1 << 40;
/// Size of the default workload.
const DEFAULT_BYTES: u64 = 1 << 30;
/// Pages per run of one source in the default workload's layout.
const DEFAULT_RUN: usize = 16;
/// Most pages of the default workload with `--pointers`: checking it through the pointer
/// faults every page home one at a time (and a range mapped page by page, where the host
/// memory does not place frames, needs a mapping per page: 65,530 is the usual
/// `vm.max_map_count`).
const POINTER_DEFAULT_PAGES: u64 = 32768;

/// What `--help` says after the flags.
const AFTER_HELP: &str = "\
Layouts (--layout): one character per page, left to right from the range's start:
  s      a page in system memory
  .      an unpopulated page (never written; reads as zeros)
  0-9    a page in pagemap K's device memory (K < --devices)
  x*N    the page x repeated N times
  a,b    items joined with commas, each a plain run or a repetition
Examples: ss00s11s0 (9 pages), s*1000,1*500,.,2*7 (1508 pages). The tool writes a distinct
pattern into every populated page, places it as the layout says, migrates the whole range
to pagemap --to, reads every byte back through the CPU path and prints the layout after
(`2*9`: nine pages in pagemap 2). Without --layout: a 1 GiB range in runs of 16 pages over
system memory and every pagemap but --to, printed as a table.

Output: a table (no --layout), the layouts and copy calls (--layout), or one JSON line
(--json: result, error, copies, layout_before, layout_after, verified, stats). --stats
adds the address space's statistics of the migration as tables (with --json they are in
its \"stats\" field only).

--pointers (sim, cuda): the range is memory of the process; it is filled with plain stores through
its pointer and verified with loads through it (device pages fault home through
userfaultfd). The default workload is then at most 32768 pages (128 MiB of 4 KiB pages).

Exit codes: 0 success; 1 the migration failed (the data still verifies) or the backend is
unavailable (also --pointers where the backend or the system cannot give pointers); 2 bad
arguments (also a backend option that does not parse).

Environment: DRM_PAGEMAP_PLUGIN_PATH (plug-ins, `:`-separated files or directories, nameable
by --backend), the backends' DRM_PAGEMAP_* settings (before --option), ZE_SOFT_* and
DRM_PAGEMAP_LEVEL_ZERO_REAL=1 (level-zero: keep the loader's own drivers).";

/// Migrates a range spread over system memory and several pagemaps to one pagemap and
/// checks every byte.
#[derive(Debug, Parser)]
// A flag given twice: the last value wins (`--option` and `--foreign` collect every value).
#[command(name = "migrate", after_help = AFTER_HELP, args_override_self = true)]
struct Args {
    /// auto (CUDA, else an Intel GPU's Level Zero, else sim), sim, cuda, level-zero (the
    /// software driver through the real loader), plugin:PATH, or a loaded plug-in's name.
    #[arg(long, value_name = "BACKEND", default_value = "auto", value_parser = backend_name)]
    backend: String,
    /// Pagemaps (1 to 10), over the backend's devices.
    #[arg(long, value_name = "N", default_value = "3", value_parser = devices)]
    devices: usize,
    /// Page size in bytes: 4096, 65536 or 2097152.
    #[arg(long, value_name = "BYTES", default_value = "4096", value_parser = page_size)]
    page_size: PageSize,
    /// Where each page starts (see Layouts below); without it, the 1 GiB default workload.
    #[arg(long, value_name = "LAYOUT", value_parser = layout_pages)]
    layout: Option<Layout>,
    /// The destination pagemap.
    #[arg(long, value_name = "K", default_value_t = 0)]
    to: usize,
    /// The destination's copy engine pulls pages from peers (the sources push by default).
    #[arg(long = "no-source-peer-migrates", action = clap::ArgAction::SetFalse)]
    source_peer_migrates: bool,
    /// Pages already in the destination pagemap migrate again (can_migrate_same_pagemap).
    #[arg(long)]
    same_pagemap: bool,
    /// How copy calls are formed: one per source, or one per run of consecutive pages.
    #[arg(long, value_enum, value_name = "MODE", default_value_t = CoalesceArg::BySource)]
    coalesce: CoalesceArg,
    /// Pagemap K belongs to another owner (repeatable).
    #[arg(long, value_name = "K")]
    foreign: Vec<usize>,
    /// Most pages one copy call moves: a source's call of more pages is issued in pieces
    /// of N pages, the device starting on the first while the CPU prepares the next (0:
    /// each source's call whole).
    #[arg(long, value_name = "N", default_value_t = MigrateDetails::CALL_PAGES.get())]
    max_call_pages: u32,
    /// The Nth copy call of the migration fails (from 1).
    #[arg(long, value_name = "N", value_parser = fail_copy)]
    fail_copy: Option<u64>,
    /// A backend option, after the environment's (repeatable; the last value of a key
    /// wins): cuda.kernel=ptx, sim.copy_latency=1ms, ...
    #[arg(long = "option", value_name = "BACKEND.KEY=VALUE", value_parser = option)]
    options: Vec<String>,
    /// When the pages the migration replaced are given back: on the address space's
    /// reclaimer thread after the call returns, or before it returns.
    #[arg(long, value_enum, value_name = "WHEN", default_value_t = ReleaseArg::Background)]
    release: ReleaseArg,
    /// The range is memory of the process (sim, cuda): filled and verified through its
    /// pointer.
    #[arg(long)]
    pointers: bool,
    /// Do not keep migration buffers for the range (`AddressSpace::keep_buffers`, made at
    /// start-up by default, as a runtime that migrates such ranges would): the migration
    /// then allocates and first writes its buffers itself, as a process's first large
    /// migration does.
    #[arg(long)]
    no_kept_buffers: bool,
    /// One JSON line instead of the text.
    #[arg(long)]
    json: bool,
    /// Also print the address space's statistics as a table.
    #[arg(long)]
    stats: bool,
}

/// `--coalesce`'s values.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum CoalesceArg {
    /// One call per source pagemap.
    BySource,
    /// One call per run of consecutive pages of one source.
    Consecutive,
}

impl From<CoalesceArg> for Coalesce {
    fn from(c: CoalesceArg) -> Coalesce {
        match c {
            CoalesceArg::BySource => Coalesce::BySource,
            CoalesceArg::Consecutive => Coalesce::Consecutive,
        }
    }
}

/// `--release`'s values.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum ReleaseArg {
    /// After the call returns (`ReleaseMode::Background`).
    Background,
    /// Before the call returns (`ReleaseMode::Inline`).
    Inline,
}

impl From<ReleaseArg> for ReleaseMode {
    fn from(r: ReleaseArg) -> ReleaseMode {
        match r {
            ReleaseArg::Background => ReleaseMode::background(),
            ReleaseArg::Inline => ReleaseMode::Inline,
        }
    }
}

/// A parsed `--layout`.
#[derive(Clone, Debug)]
struct Layout(Vec<LayoutPage>);

fn backend_name(name: &str) -> Result<String, String> {
    if ["auto", "sim", "cuda", "level-zero"].contains(&name) || is_plugin_name(name) {
        Ok(name.to_string())
    } else {
        Err(
            "not one of auto, sim, cuda, level-zero, plugin:PATH or a discovered plug-in's name"
                .into(),
        )
    }
}

fn devices(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if (1..=10).contains(&n) => Ok(n),
        Ok(n) => Err(format!("{n} is out of range (1 to 10)")),
        Err(e) => Err(e.to_string()),
    }
}

fn page_size(text: &str) -> Result<PageSize, String> {
    let bytes: u64 = text.parse().map_err(|e| format!("{e}"))?;
    PageSize::from_bytes(bytes).ok_or_else(|| format!("{bytes} is not 4096, 65536 or 2097152"))
}

fn layout_pages(text: &str) -> Result<Layout, String> {
    layout::parse(text).map(Layout).map_err(|e| e.to_string())
}

fn fail_copy(text: &str) -> Result<u64, String> {
    match text.parse::<u64>() {
        Ok(0) => Err("N counts from 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

fn option(text: &str) -> Result<String, String> {
    BackendOptions::new()
        .parse_assignment(text)
        .map(|_| text.to_string())
        .map_err(|e| e.to_string())
}

/// The arguments clap cannot check alone (they depend on each other), and the backend
/// options: the environment's (`env`), then `--option`s.
fn check(a: &Args, env: BackendOptions) -> Result<BackendOptions, String> {
    if a.to >= a.devices {
        return Err(format!(
            "--to: pagemap {} does not exist (--devices {})",
            a.to, a.devices
        ));
    }
    if let Some(&k) = a.foreign.iter().find(|&&k| k >= a.devices) {
        return Err(format!(
            "--foreign: pagemap {k} does not exist (--devices {})",
            a.devices
        ));
    }
    let mut options = env;
    for o in &a.options {
        options
            .parse_assignment(o)
            .map_err(|e| format!("--option: {e}"))?;
    }
    Ok(options)
}

/// The layout to build: parsed from `--layout`, or the default workload.
fn wanted_layout(a: &Args) -> Result<Vec<LayoutPage>, String> {
    match &a.layout {
        Some(Layout(pages)) => {
            if let Some(LayoutPage::Device(k)) = pages
                .iter()
                .find(|p| matches!(p, LayoutPage::Device(k) if *k as usize >= a.devices))
            {
                return Err(format!(
                    "--layout: pagemap {k} does not exist (--devices {})",
                    a.devices
                ));
            }
            Ok(pages.clone())
        }
        None => {
            // System memory and every pagemap but the destination, in runs of 16 pages.
            let mut sources = vec![LayoutPage::System];
            sources.extend(
                (0..a.devices)
                    .filter(|&k| k != a.to)
                    .map(|k| LayoutPage::Device(k as u8)),
            );
            let mut n = DEFAULT_BYTES / a.page_size.bytes();
            if a.pointers {
                n = n.min(POINTER_DEFAULT_PAGES);
            }
            let n = n as usize;
            Ok((0..n)
                .map(|i| sources[(i / DEFAULT_RUN) % sources.len()])
                .collect())
        }
    }
}

/// The byte pattern of page `i`: distinct for every page and every 8-byte word.
fn fill_pattern(i: u64, buf: &mut [u8]) {
    for (j, w) in buf.chunks_exact_mut(8).enumerate() {
        let v = (i << 24 | j as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
        w.copy_from_slice(&v.to_le_bytes());
    }
}

/// Why a run stopped: the engine's error, or one of `--pointers` (printed after
/// `--pointers: `).
enum RunError {
    Engine(Error),
    Pointers(String),
}

impl From<Error> for RunError {
    fn from(e: Error) -> RunError {
        RunError::Engine(e)
    }
}

impl From<CpuError> for RunError {
    fn from(e: CpuError) -> RunError {
        match e {
            CpuError::Engine(e) => RunError::Engine(e),
            CpuError::Pointer(e) => RunError::Pointers(e),
        }
    }
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunError::Engine(e) => write!(f, "{e}"),
            RunError::Pointers(e) => write!(f, "--pointers: {e}"),
        }
    }
}

/// Writes every page's pattern (holes stay unpopulated) and moves pages to the pagemaps the
/// layout names, run by run.
fn build(
    mm: &AddressSpace,
    cpu: &Cpu,
    range: VaRange,
    ps: PageSize,
    pages: &[LayoutPage],
    p: &Progress,
) -> Result<(), RunError> {
    let psz = ps.bytes();
    let mut buf = vec![0u8; psz as usize];
    p.phase("filling", pages.len() as u64);
    for (i, page) in pages.iter().enumerate() {
        if *page != LayoutPage::Hole {
            fill_pattern(i as u64, &mut buf);
            cpu.write(range.start + i as u64 * psz, &buf)?;
        }
        if i % 1024 == 0 {
            p.set(i as u64);
        }
    }
    p.phase("placing", pages.len() as u64);
    let mut i = 0;
    let setup = MigrateDetails::default();
    while i < pages.len() {
        let mut j = i + 1;
        while j < pages.len() && pages[j] == pages[i] {
            j += 1;
        }
        if let LayoutPage::Device(k) = pages[i] {
            let run = VaRange::new(range.start + i as u64 * psz, (j - i) as u64 * psz);
            // Holes inside a device run are impossible: runs are of one kind.
            mm.migrate(run, PagemapId(k), &setup)?;
        }
        p.set(j as u64);
        i = j;
    }
    Ok(())
}

/// Reads the range back through the CPU path (or loads it through the pointer); true if every
/// byte is as written.
fn verify(
    cpu: &Cpu,
    range: VaRange,
    ps: PageSize,
    pages: &[LayoutPage],
    p: &Progress,
) -> Result<bool, RunError> {
    let psz = ps.bytes() as usize;
    let mut want = vec![0u8; psz];
    // Read in chunks of up to 8 MiB to keep the CPU path's calls few.
    let per_read = (8 << 20) / psz;
    let per_read = per_read.max(1);
    let mut got = vec![0u8; per_read * psz];
    let mut ok = true;
    let mut i = 0;
    p.phase("verifying", pages.len() as u64);
    while i < pages.len() {
        let n = per_read.min(pages.len() - i);
        let chunk = &mut got[..n * psz];
        cpu.read(range.start + (i * psz) as u64, chunk)?;
        for k in 0..n {
            if pages[i + k] == LayoutPage::Hole {
                want.fill(0);
            } else {
                fill_pattern((i + k) as u64, &mut want);
            }
            ok &= chunk[k * psz..(k + 1) * psz] == want[..];
        }
        i += n;
        p.set(i as u64);
    }
    Ok(ok)
}

struct Outcome {
    result: Result<drm_pagemap::MigrateReport, Error>,
    trace: Vec<CopyCall>,
    elapsed: Duration,
    /// How long after the call returned its replaced pages were all given back.
    released: Duration,
    before: Vec<LayoutPage>,
    after: Vec<LayoutPage>,
    verified: bool,
    /// The statistics of the migration.
    stats: StatsSnapshot,
    /// How long opening the backend took (the simulator's resident memory is backed then).
    opened: Duration,
    /// The migration buffers kept for the range, and how long making them took (`None`:
    /// `--no-kept-buffers`).
    kept: Option<(drm_pagemap::KeptBufferInfo, Duration)>,
}

/// The `--json` line.
#[derive(Serialize)]
struct JsonReport<'a> {
    /// `ok` or `error`.
    result: &'static str,
    /// The error's message, or null.
    error: Option<String>,
    /// The copy calls that moved pages, in the order issued.
    copies: Vec<JsonCopy>,
    layout_before: String,
    layout_after: String,
    /// Every byte read back as written.
    verified: bool,
    /// The address space's statistics of the migration (`AddressSpace::stats` after it;
    /// counted from the end of building the layout).
    stats: &'a StatsSnapshot,
}

/// One copy call of the `--json` line.
#[derive(Serialize)]
struct JsonCopy {
    /// The pagemap whose copy engine ran the call.
    executor: u8,
    /// `copy_to_devmem` or `copy_to_ram`.
    op: &'static str,
    pages: usize,
}

/// Prints the `--json` line; false (with a line on stderr) if it cannot be formed.
fn print_json(o: &Outcome) -> bool {
    let report = JsonReport {
        result: if o.result.is_ok() { "ok" } else { "error" },
        error: o.result.as_ref().err().map(|e| e.to_string()),
        copies: o
            .trace
            .iter()
            .filter(|c| c.pages > 0)
            .map(|c| JsonCopy {
                executor: c.executor.0,
                op: c.op.name(),
                pages: c.pages,
            })
            .collect(),
        layout_before: layout::format(&o.before),
        layout_after: layout::format(&o.after),
        verified: o.verified,
        stats: &o.stats,
    };
    // Not println!: a closed stdout (`| head -c 100`) is a line on stderr, not a panic.
    let mut out = std::io::stdout().lock();
    match serde_json::to_writer(&mut out, &report) {
        Ok(()) => match writeln!(out) {
            Ok(()) => true,
            Err(e) => {
                eprintln!("migrate: the JSON line cannot be written: {e}");
                false
            }
        },
        Err(e) => {
            eprintln!("migrate: the JSON line cannot be written: {e}");
            false
        }
    }
}

/// What was made at start-up, outside the measured migration: the kept migration buffers,
/// and with the simulator's resident memory, how long making it resident took.
fn print_start_up(config: &BackendConfig, backend: &dyn Backend, o: &Outcome) {
    if let Some((kept, took)) = o.kept {
        println!(
            "migration buffers kept for {} pages ({:.1} MiB), made at start-up in {:.1} ms \
             (--no-kept-buffers: the migration makes its own)",
            kept.pages,
            kept.bytes as f64 / (1u64 << 20) as f64,
            took.as_secs_f64() * 1e3
        );
    }
    if backend.name() == "sim" && config.options.get(SIM_RESIDENT) == Some("true") {
        println!(
            "device memory made resident at start-up in {:.0} ms ({SIM_RESIDENT}=true, as a \
             GPU's memory is; {SIM_RESIDENT}=false backs it on first write, inside the migration)",
            o.opened.as_secs_f64() * 1e3
        );
    }
}

fn print_table(a: &Args, config: &BackendConfig, backend: &dyn Backend, o: &Outcome) {
    let psz = a.page_size.bytes();
    println!(
        "backend {} ({}), {} pagemaps, page size {}, {} pages ({} MiB) -> pagemap {}, coalesce {:?}",
        backend.name(),
        backend
            .devices()
            .first()
            .map(|d| d.name.to_string())
            .unwrap_or_else(|| "?".into()),
        a.devices,
        a.page_size,
        o.before.len(),
        (o.before.len() as u64 * psz) >> 20,
        a.to,
        Coalesce::from(a.coalesce)
    );
    let list: Vec<String> = drm_pagemap::backends_with(config)
        .into_iter()
        .map(|b| match b.available {
            Ok(()) => format!("{} (available)", b.name),
            Err(why) => format!("{} (unavailable: {why})", b.name),
        })
        .collect();
    println!("backends: {}", list.join(", "));
    println!(
        "{:<22} {:>10} {:>6} {:>12}",
        "source", "pages", "calls", "MiB"
    );
    let mut sources: Vec<LayoutPage> = Vec::new();
    for p in &o.before {
        if !sources.contains(p) {
            sources.push(*p);
        }
    }
    sources.sort_by_key(|p| match p {
        LayoutPage::System => 0,
        LayoutPage::Hole => 1,
        LayoutPage::Device(k) => 2 + *k as u32,
    });
    for s in &sources {
        let pages = o.before.iter().filter(|p| *p == s).count();
        let (name, calls) = match s {
            LayoutPage::System => ("system memory".to_string(), None),
            LayoutPage::Hole => ("unpopulated".to_string(), None),
            LayoutPage::Device(k) => {
                let n = o
                    .trace
                    .iter()
                    .filter(|c| c.executor.0 == *k && c.op == CopyOp::ToRam)
                    .count();
                (format!("pagemap {k}"), Some(n))
            }
        };
        let calls = calls.map(|n| n.to_string()).unwrap_or_else(|| "-".into());
        println!(
            "{name:<22} {pages:>10} {calls:>6} {:>12.1}",
            (pages as u64 * psz) as f64 / (1 << 20) as f64
        );
    }
    let moved: usize = o.trace.iter().map(|c| c.pages).sum();
    let bytes = moved as u64 * psz;
    let secs = o.elapsed.as_secs_f64();
    println!("copy calls issued: {}", o.trace.len());
    for c in &o.trace {
        println!(
            "  pagemap {} ({}) {} {} pages",
            c.executor.0, c.device, c.op, c.pages
        );
    }
    match &o.result {
        Ok(r) => {
            let t = r.timing;
            println!(
                "moved {:.1} MiB in {:.3} s: {:.2} GB/s (plan {:.2} ms, allocate {:.2} ms, map {:.2} ms, issue {:.2} ms, wait {:.2} ms, commit {:.2} ms)",
                bytes as f64 / (1 << 20) as f64,
                secs,
                bytes as f64 / secs / 1e9,
                t.plan.as_secs_f64() * 1e3,
                t.allocate.as_secs_f64() * 1e3,
                t.map.as_secs_f64() * 1e3,
                t.issue.as_secs_f64() * 1e3,
                t.wait.as_secs_f64() * 1e3,
                t.commit.as_secs_f64() * 1e3
            );
        }
        Err(e) => println!("migration failed: {e}"),
    }
    if matches!(a.release, ReleaseArg::Background) {
        println!(
            "old pages given back {:.2} ms after the call returned (--release background)",
            o.released.as_secs_f64() * 1e3
        );
    }
    print_start_up(config, backend, o);
    println!(
        "data {} ({})",
        if o.verified { "verified" } else { "CORRUPT" },
        if a.pointers {
            "loaded back through the range's pointer"
        } else {
            "read back through the CPU path"
        }
    );
}

/// Whether `name` is `plugin:PATH` or the name of a plug-in loaded from the environment.
fn is_plugin_name(name: &str) -> bool {
    #[cfg(feature = "plugins")]
    {
        name.starts_with("plugin:")
            || drm_pagemap::plugins::loaded()
                .iter()
                .any(|p| p.name() == name)
    }
    #[cfg(not(feature = "plugins"))]
    {
        let _ = name;
        false
    }
}

fn main() -> ExitCode {
    // The one place this binary reads the environment's backend settings (and plug-ins):
    // before the arguments, so that `--backend` can name a discovered plug-in.
    #[cfg(feature = "plugins")]
    for d in drm_pagemap::plugins::from_env() {
        if let Err(e) = &d.result {
            eprintln!("migrate: plug-in {} not loaded: {e}", d.path.display());
        }
    }
    let env = BackendConfig::from_env().options;
    let args: Args = match cli::parse("migrate") {
        Ok(a) => a,
        Err(code) => return code,
    };
    let checked = check(&args, env).and_then(|options| Ok((options, wanted_layout(&args)?)));
    let (options, pages) = match checked {
        Ok(c) => c,
        Err(msg) => {
            cli::bad_argument("migrate", &msg);
            return ExitCode::from(cli::BAD_ARGUMENTS);
        }
    };
    // A plug-in is loaded before the options are checked (its keys become known); one that
    // cannot be loaded is an unavailable backend.
    #[cfg(feature = "plugins")]
    if let Some(path) = args.backend.strip_prefix("plugin:")
        && let Err(e) = drm_pagemap::plugins::load(path)
    {
        eprintln!("migrate: backend {} unavailable: {e}", args.backend);
        return ExitCode::from(1);
    }
    // A backend option that does not parse is a bad argument, like a bad flag.
    let bytes = pages.len() as u64 * args.page_size.bytes();
    let config = config(&args, &options, bytes);
    if let Err(e) = drm_pagemap::check_config(&config) {
        cli::bad_argument("migrate", &e.to_string());
        return ExitCode::from(cli::BAD_ARGUMENTS);
    }
    if args.pointers {
        let name = match args.backend.as_str() {
            "auto" => drm_pagemap::auto_backend_with(&config),
            name => name,
        };
        if let Some(why) = pointers::unsupported(name) {
            eprintln!("migrate: --pointers: {why}");
            return ExitCode::from(1);
        }
    }
    if args.backend == "level-zero"
        && let Err(e) = route_level_zero(&args, &config)
    {
        eprintln!("migrate: backend level-zero unavailable: {e}");
        return ExitCode::from(1);
    }
    match run(&args, &config, &pages) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("migrate: {e}");
            ExitCode::from(1)
        }
    }
}

/// Points the Level Zero loader at the software driver (unless `DRM_PAGEMAP_LEVEL_ZERO_REAL=1`):
/// one device per pagemap, each able to hold the whole range. Must run before anything probes
/// Level Zero (the loader initialises once per process).
fn route_level_zero(args: &Args, config: &BackendConfig) -> Result<(), String> {
    if std::env::var_os("DRM_PAGEMAP_LEVEL_ZERO_REAL").is_some_and(|v| v == "1") {
        return Ok(());
    }
    let devices = args.devices.to_string();
    let memory = config.device_capacity.unwrap_or(1 << 30).to_string();
    ze_soft::route_loader_with(&[
        ("ZE_SOFT_DEVICES", &devices),
        ("ZE_SOFT_DEVICE_MEMORY", &memory),
    ])
    .map(drop)
}

/// The backend config for a range of `bytes`.
fn config(args: &Args, options: &BackendOptions, bytes: u64) -> BackendConfig {
    // Each pagemap may end up holding the whole range; the CPU path needs frames again.
    let device_capacity = bytes + (64 << 20);
    let mut options = options.clone();
    // The simulator's device memory is made resident at start-up, as a GPU's is, where the
    // machine has room for it (at most half its available memory) and no option says
    // otherwise: the migration then measures copies, not the first-touch faults of host
    // memory standing in for device memory.
    let resident_fits = drm_pagemap::sim::available_memory().is_some_and(|available| {
        device_capacity.saturating_mul(args.devices as u64) <= available / 2
    });
    if options.get(SIM_RESIDENT).is_none() && resident_fits {
        options
            .set(SIM_RESIDENT, "true")
            .expect("a well-formed key and value");
    }
    BackendConfig {
        devices: Some(args.devices),
        device_capacity: Some(device_capacity),
        host_capacity: Some(2 * bytes + (64 << 20)),
        options,
    }
}

/// The simulator's option that backs its device memory at start-up.
const SIM_RESIDENT: &str = "sim.resident";

fn run(args: &Args, config: &BackendConfig, pages: &[LayoutPage]) -> Result<ExitCode, RunError> {
    let psz = args.page_size.bytes();
    let bytes = pages.len() as u64 * psz;
    // With --pointers (a backend uffd supports, checked in main): the backend's system
    // memory is a memfd that pointer ranges map.
    let opening = Instant::now();
    let (backend, memfd): (Arc<dyn Backend>, _) = if args.pointers {
        let name = match args.backend.as_str() {
            "auto" => drm_pagemap::auto_backend_with(config),
            name => name,
        };
        let (backend, file) = pointers::open_backend(name, config).map_err(RunError::Pointers)?;
        (backend, Some(file))
    } else {
        (
            Arc::from(drm_pagemap::open_backend(&args.backend, config)?),
            None,
        )
    };
    let opened = opening.elapsed();
    let injector = FaultInjector::new();
    let machine = drm_pagemap::Machine::build(
        backend.clone(),
        args.devices,
        &args.foreign,
        config.device_capacity,
    )?;
    // Wrap every pagemap so `--fail-copy` works on any backend.
    let mm = Arc::new(AddressSpace::new(backend.host_memory()));
    for pm in &machine.pagemaps {
        mm.add_pagemap(injector.wrap_pagemap(pm))?;
    }
    // With --pointers the range is where its mapping is (its address is the pointer).
    let pointer = match memfd {
        Some(mem) => {
            let fail = |e: drm_pagemap::uffd::UffdError| RunError::Pointers(e.to_string());
            let space = PointerSpace::new(mm.clone(), mem, UffdConfig::default()).map_err(fail)?;
            Some(space.create_range(bytes, args.page_size).map_err(fail)?)
        }
        None => {
            mm.create_range(VaRange::new(BASE, bytes), args.page_size)?;
            None
        }
    };
    let (range, cpu) = match &pointer {
        Some(r) => (r.range(), Cpu::Pointer(r)),
        None => (VaRange::new(BASE, bytes), Cpu::Explicit(&mm)),
    };
    let progress = Progress::new(!args.json);
    build(&mm, &cpu, range, args.page_size, pages, &progress)?;
    // Kept after the layout is built: its migrations are small, the timed one is not.
    let kept = if args.no_kept_buffers {
        None
    } else {
        let t = Instant::now();
        Some((mm.keep_buffers(range)?, t.elapsed()))
    };
    let before = layout::of(&mm, range)?;
    let details = MigrateDetails {
        source_peer_migrates: args.source_peer_migrates,
        can_migrate_same_pagemap: args.same_pagemap,
        coalesce: args.coalesce.into(),
        max_call_pages: std::num::NonZeroU32::new(args.max_call_pages),
        ..MigrateDetails::default()
    };
    if let Some(n) = args.fail_copy {
        injector.fail_nth(FaultSite::Copy, n);
    }
    progress.phase("migrating", 1);
    let mut trace = Vec::new();
    // The statistics cover the migration, not the placing of the layout.
    mm.reset_stats();
    mm.set_release_mode(args.release.into());
    let t = Instant::now();
    let result = mm.migrate_traced(range, PagemapId(args.to as u8), &details, &mut trace);
    let elapsed = t.elapsed();
    // The old pages are given back before anything else is measured or checked.
    mm.flush_releases();
    let released = t.elapsed().saturating_sub(elapsed);
    let stats = mm.stats();
    progress.inc(1);
    injector.disarm();
    let after = layout::of(&mm, range)?;
    let verified = verify(&cpu, range, args.page_size, pages, &progress)?;
    progress.finish();
    let failed = result.is_err();
    let not_needed = matches!(&result, Ok(r) if r.outcome == MigrateOutcome::NotNeeded);
    let o = Outcome {
        result,
        trace,
        elapsed,
        released,
        before,
        after,
        verified,
        stats,
        opened,
        kept,
    };
    let mut printed = true;
    if args.json {
        printed = print_json(&o);
    } else if args.layout.is_none() {
        print_table(args, config, backend.as_ref(), &o);
    } else {
        println!("layout before: {}", layout::format(&o.before));
        for c in &o.trace {
            println!("copy: pagemap {} {} {} pages", c.executor.0, c.op, c.pages);
        }
        match &o.result {
            Ok(_) if not_needed => println!("result: ok (not needed: every page already there)"),
            Ok(_) => println!("result: ok"),
            Err(e) => println!("result: error: {e}"),
        }
        println!("layout after:  {}", layout::format(&o.after));
        if matches!(args.release, ReleaseArg::Background) {
            println!(
                "old pages given back {:.2} ms after the call returned (--release background)",
                o.released.as_secs_f64() * 1e3
            );
        }
        print_start_up(config, backend.as_ref(), &o);
        println!("verified: {}", o.verified);
    }
    if args.stats && !args.json {
        tool::stats::print("the migration", &o.stats);
    }
    Ok(if failed || !o.verified || !printed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
