//! `migrate`: the main job. Builds a range whose pages sit in system memory and in several
//! pagemaps, gives every page a distinct byte pattern, migrates the range to one pagemap,
//! reads the whole range back through the CPU path and checks every byte — also after a
//! failed migration.
//!
//! ```text
//! cargo run --release --example migrate -- [--backend auto|sim|cuda|level-zero|plugin:PATH|NAME] [--devices N]
//!     [--page-size BYTES] [--layout LAYOUT] [--to K] [--no-source-peer-migrates]
//!     [--same-pagemap] [--coalesce by-source|consecutive] [--foreign K]... [--fail-copy N]
//!     [--option BACKEND.KEY=VALUE]... [--json]
//! ```
//! Without `--layout`: a 1 GiB range spread over system memory and every other pagemap,
//! migrated to pagemap 0, with a table of what moved. Exit codes: 0 success; 1 the migration
//! failed (the data still verifies) or the backend is unavailable; 2 bad arguments (also a
//! backend option that does not parse).
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

use drm_pagemap::{
    AddressSpace, Backend, BackendConfig, BackendOptions, Coalesce, CopyCall, CopyOp, Error,
    MigrateDetails, MigrateOutcome, PageSize, PagemapId, VaRange,
};
use drm_pagemap_testkit::inject::{FaultInjector, FaultSite};
use drm_pagemap_testkit::layout::{self, LayoutPage};
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where the range starts (any page-aligned address works).
const BASE: u64 = 1 << 40;
/// Size of the default workload.
const DEFAULT_BYTES: u64 = 1 << 30;
/// Pages per run of one source in the default workload's layout.
const DEFAULT_RUN: usize = 16;

#[derive(Debug)]
struct Args {
    backend: String,
    devices: usize,
    page_size: PageSize,
    layout: Option<String>,
    to: usize,
    source_peer_migrates: bool,
    same_pagemap: bool,
    coalesce: Coalesce,
    foreign: Vec<usize>,
    fail_copy: Option<u64>,
    /// The environment's options, then `--option`s.
    options: BackendOptions,
    json: bool,
}

const USAGE: &str = "usage: migrate [--backend auto|sim|cuda|level-zero|plugin:PATH|NAME] [--devices N] [--page-size BYTES] \
[--layout LAYOUT] [--to K] [--no-source-peer-migrates] [--same-pagemap] \
[--coalesce by-source|consecutive] [--foreign K]... [--fail-copy N] \
[--option BACKEND.KEY=VALUE]... [--json]";

/// Parses the arguments; `options` are the environment's, which `--option` adds to.
fn parse_args(
    mut it: impl Iterator<Item = String>,
    options: BackendOptions,
) -> Result<Args, String> {
    let mut a = Args {
        backend: "auto".into(),
        devices: 3,
        page_size: PageSize::Size4K,
        layout: None,
        to: 0,
        source_peer_migrates: true,
        same_pagemap: false,
        coalesce: Coalesce::BySource,
        foreign: Vec::new(),
        fail_copy: None,
        options,
        json: false,
    };
    fn value(it: &mut impl Iterator<Item = String>, flag: &str) -> Result<String, String> {
        it.next().ok_or_else(|| format!("{flag} needs a value"))
    }
    fn number<T: std::str::FromStr>(text: &str, flag: &str) -> Result<T, String> {
        text.parse()
            .map_err(|_| format!("{flag}: {text:?} is not a valid number"))
    }
    while let Some(arg) = it.next() {
        // Accept both `--flag value` and `--flag=value` (`--option=KEY=VALUE` too).
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut val = || -> Result<String, String> {
            match &inline {
                Some(v) => Ok(v.clone()),
                None => value(&mut it, &flag),
            }
        };
        match flag.as_str() {
            "--backend" => {
                a.backend = val()?;
                if !["auto", "sim", "cuda", "level-zero"].contains(&a.backend.as_str())
                    && !is_plugin_name(&a.backend)
                {
                    return Err(format!(
                        "--backend: {:?} is not one of auto, sim, cuda, level-zero, plugin:PATH \
                         or a discovered plug-in's name",
                        a.backend
                    ));
                }
            }
            "--devices" => {
                a.devices = number(&val()?, "--devices")?;
                if !(1..=10).contains(&a.devices) {
                    return Err(format!(
                        "--devices: {} is out of range (1 to 10)",
                        a.devices
                    ));
                }
            }
            "--page-size" => {
                let bytes: u64 = number(&val()?, "--page-size")?;
                a.page_size = PageSize::from_bytes(bytes)
                    .ok_or_else(|| format!("--page-size: {bytes} is not 4096, 65536 or 2097152"))?;
            }
            "--layout" => a.layout = Some(val()?),
            "--to" => a.to = number(&val()?, "--to")?,
            "--no-source-peer-migrates" => a.source_peer_migrates = false,
            "--same-pagemap" => a.same_pagemap = true,
            "--coalesce" => {
                a.coalesce = match val()?.as_str() {
                    "by-source" => Coalesce::BySource,
                    "consecutive" => Coalesce::Consecutive,
                    other => {
                        return Err(format!(
                            "--coalesce: {other:?} is not by-source or consecutive"
                        ));
                    }
                }
            }
            "--foreign" => a.foreign.push(number(&val()?, "--foreign")?),
            "--fail-copy" => {
                let n: u64 = number(&val()?, "--fail-copy")?;
                if n == 0 {
                    return Err("--fail-copy: N counts from 1".into());
                }
                a.fail_copy = Some(n);
            }
            "--option" => {
                a.options
                    .parse_assignment(&val()?)
                    .map_err(|e| format!("--option: {e}"))?;
            }
            "--json" => a.json = true,
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other:?} ({USAGE})")),
        }
    }
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
    Ok(a)
}

/// The layout to build: parsed from `--layout`, or the default workload.
fn wanted_layout(a: &Args) -> Result<Vec<LayoutPage>, String> {
    match &a.layout {
        Some(text) => {
            let pages = layout::parse(text).map_err(|e| format!("--layout: {e}"))?;
            if let Some(LayoutPage::Device(k)) = pages
                .iter()
                .find(|p| matches!(p, LayoutPage::Device(k) if *k as usize >= a.devices))
            {
                return Err(format!(
                    "--layout: pagemap {k} does not exist (--devices {})",
                    a.devices
                ));
            }
            Ok(pages)
        }
        None => {
            // System memory and every pagemap but the destination, in runs of 16 pages.
            let mut sources = vec![LayoutPage::System];
            sources.extend(
                (0..a.devices)
                    .filter(|&k| k != a.to)
                    .map(|k| LayoutPage::Device(k as u8)),
            );
            let n = (DEFAULT_BYTES / a.page_size.bytes()) as usize;
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

/// A progress line on stderr: a bar on a terminal, phase lines otherwise.
struct Progress {
    enabled: bool,
    tty: bool,
    phase: &'static str,
    last: Instant,
}

impl Progress {
    fn new(enabled: bool) -> Progress {
        Progress {
            enabled,
            tty: std::io::stderr().is_terminal(),
            phase: "",
            last: Instant::now() - Duration::from_secs(1),
        }
    }

    fn update(&mut self, phase: &'static str, done: usize, total: usize) {
        if !self.enabled {
            return;
        }
        let finished = done >= total;
        if phase != self.phase {
            if self.tty && !self.phase.is_empty() {
                eprintln!();
            }
            self.phase = phase;
            if !self.tty {
                eprintln!("{phase} ...");
            }
        }
        if self.tty && (finished || self.last.elapsed() > Duration::from_millis(100)) {
            self.last = Instant::now();
            let pct = (done * 100).checked_div(total).unwrap_or(100);
            let bar: String = (0..40)
                .map(|k| if k * 100 / 40 < pct { '#' } else { '.' })
                .collect();
            eprint!("\r{phase:<10} [{bar}] {pct:3}%");
            let _ = std::io::stderr().flush();
        }
    }

    fn finish(&mut self) {
        if self.enabled && self.tty && !self.phase.is_empty() {
            eprintln!();
        }
    }
}

/// Writes every page's pattern (holes stay unpopulated) and moves pages to the pagemaps the
/// layout names, run by run.
fn build(
    mm: &AddressSpace,
    range: VaRange,
    ps: PageSize,
    pages: &[LayoutPage],
    p: &mut Progress,
) -> Result<(), Error> {
    let psz = ps.bytes();
    let mut buf = vec![0u8; psz as usize];
    for (i, page) in pages.iter().enumerate() {
        if *page != LayoutPage::Hole {
            fill_pattern(i as u64, &mut buf);
            mm.write(range.start + i as u64 * psz, &buf)?;
        }
        if i % 1024 == 0 {
            p.update("filling", i, pages.len());
        }
    }
    p.update("filling", pages.len(), pages.len());
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
        p.update("placing", j, pages.len());
        i = j;
    }
    Ok(())
}

/// Reads the range back through the CPU path; true if every byte is as written.
fn verify(
    mm: &AddressSpace,
    range: VaRange,
    ps: PageSize,
    pages: &[LayoutPage],
    p: &mut Progress,
) -> Result<bool, Error> {
    let psz = ps.bytes() as usize;
    let mut want = vec![0u8; psz];
    // Read in chunks of up to 8 MiB to keep the CPU path's calls few.
    let per_read = (8 << 20) / psz;
    let per_read = per_read.max(1);
    let mut got = vec![0u8; per_read * psz];
    let mut ok = true;
    let mut i = 0;
    while i < pages.len() {
        let n = per_read.min(pages.len() - i);
        let chunk = &mut got[..n * psz];
        mm.read(range.start + (i * psz) as u64, chunk)?;
        for k in 0..n {
            if pages[i + k] == LayoutPage::Hole {
                want.fill(0);
            } else {
                fill_pattern((i + k) as u64, &mut want);
            }
            ok &= chunk[k * psz..(k + 1) * psz] == want[..];
        }
        i += n;
        p.update("verifying", i, pages.len());
    }
    Ok(ok)
}

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

struct Outcome {
    result: Result<drm_pagemap::MigrateReport, Error>,
    trace: Vec<CopyCall>,
    elapsed: Duration,
    before: Vec<LayoutPage>,
    after: Vec<LayoutPage>,
    verified: bool,
}

fn print_json(o: &Outcome) {
    let copies: Vec<String> = o
        .trace
        .iter()
        .filter(|c| c.pages > 0)
        .map(|c| {
            format!(
                "{{\"executor\":{},\"op\":\"{}\",\"pages\":{}}}",
                c.executor.0,
                c.op.name(),
                c.pages
            )
        })
        .collect();
    let (result, error) = match &o.result {
        Ok(_) => ("ok", "null".to_string()),
        Err(e) => ("error", json_string(&e.to_string())),
    };
    println!(
        "{{\"result\":\"{result}\",\"error\":{error},\"copies\":[{}],\"layout_before\":{},\"layout_after\":{},\"verified\":{}}}",
        copies.join(","),
        json_string(&layout::format(&o.before)),
        json_string(&layout::format(&o.after)),
        o.verified
    );
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
        a.coalesce
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
                "moved {:.1} MiB in {:.3} s: {:.2} GB/s (plan {:.2} ms, map {:.2} ms, issue {:.2} ms, wait {:.2} ms, commit {:.2} ms)",
                bytes as f64 / (1 << 20) as f64,
                secs,
                bytes as f64 / secs / 1e9,
                t.plan.as_secs_f64() * 1e3,
                t.map.as_secs_f64() * 1e3,
                t.issue.as_secs_f64() * 1e3,
                t.wait.as_secs_f64() * 1e3,
                t.commit.as_secs_f64() * 1e3
            );
        }
        Err(e) => println!("migration failed: {e}"),
    }
    println!(
        "data {} (read back through the CPU path)",
        if o.verified { "verified" } else { "CORRUPT" }
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
    // The one place this binary reads the environment's backend settings (and plug-ins).
    #[cfg(feature = "plugins")]
    for d in drm_pagemap::plugins::from_env() {
        if let Err(e) = &d.result {
            eprintln!("migrate: plug-in {} not loaded: {e}", d.path.display());
        }
    }
    let env = BackendConfig::from_env().options;
    let args = match parse_args(std::env::args().skip(1), env) {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("migrate: {msg}");
            return ExitCode::from(2);
        }
    };
    let pages = match wanted_layout(&args) {
        Ok(p) => p,
        Err(msg) => {
            eprintln!("migrate: {msg}");
            return ExitCode::from(2);
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
    if let Err(e) = drm_pagemap::check_config(&config(&args, bytes)) {
        eprintln!("migrate: {e}");
        return ExitCode::from(2);
    }
    if args.backend == "level-zero"
        && let Err(e) = route_level_zero(&args, bytes)
    {
        eprintln!("migrate: backend level-zero unavailable: {e}");
        return ExitCode::from(1);
    }
    match run(&args, &pages) {
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
fn route_level_zero(args: &Args, bytes: u64) -> Result<(), String> {
    if std::env::var_os("DRM_PAGEMAP_LEVEL_ZERO_REAL").is_some_and(|v| v == "1") {
        return Ok(());
    }
    let devices = args.devices.to_string();
    let memory = config(args, bytes)
        .device_capacity
        .unwrap_or(bytes)
        .to_string();
    ze_soft::route_loader_with(&[
        ("ZE_SOFT_DEVICES", &devices),
        ("ZE_SOFT_DEVICE_MEMORY", &memory),
    ])
    .map(drop)
}

/// The backend config for a range of `bytes`.
fn config(args: &Args, bytes: u64) -> BackendConfig {
    BackendConfig {
        devices: Some(args.devices),
        // Each pagemap may end up holding the whole range; the CPU path needs frames again.
        device_capacity: Some(bytes + (64 << 20)),
        host_capacity: Some(2 * bytes + (64 << 20)),
        options: args.options.clone(),
    }
}

fn run(args: &Args, pages: &[LayoutPage]) -> Result<ExitCode, Error> {
    let psz = args.page_size.bytes();
    let bytes = pages.len() as u64 * psz;
    let config = config(args, bytes);
    let backend: Arc<dyn Backend> = Arc::from(drm_pagemap::open_backend(&args.backend, &config)?);
    let injector = FaultInjector::new();
    let machine = drm_pagemap::Machine::build(
        backend.clone(),
        args.devices,
        &args.foreign,
        config.device_capacity,
    )?;
    // Wrap every pagemap so `--fail-copy` works on any backend.
    let mm = AddressSpace::new(backend.host_memory());
    for pm in &machine.pagemaps {
        mm.add_pagemap(injector.wrap_pagemap(pm))?;
    }
    let range = VaRange::new(BASE, bytes);
    mm.create_range(range, args.page_size)?;
    let mut progress = Progress::new(!args.json && args.layout.is_none());
    build(&mm, range, args.page_size, pages, &mut progress)?;
    let before = layout::of(&mm, range)?;
    let details = MigrateDetails {
        source_peer_migrates: args.source_peer_migrates,
        can_migrate_same_pagemap: args.same_pagemap,
        coalesce: args.coalesce,
        ..MigrateDetails::default()
    };
    if let Some(n) = args.fail_copy {
        injector.fail_nth(FaultSite::Copy, n);
    }
    progress.update("migrating", 0, 1);
    let mut trace = Vec::new();
    let t = Instant::now();
    let result = mm.migrate_traced(range, PagemapId(args.to as u8), &details, &mut trace);
    let elapsed = t.elapsed();
    progress.update("migrating", 1, 1);
    injector.disarm();
    let after = layout::of(&mm, range)?;
    let verified = verify(&mm, range, args.page_size, pages, &mut progress)?;
    progress.finish();
    let failed = result.is_err();
    let not_needed = matches!(&result, Ok(r) if r.outcome == MigrateOutcome::NotNeeded);
    let o = Outcome {
        result,
        trace,
        elapsed,
        before,
        after,
        verified,
    };
    if args.json {
        print_json(&o);
    } else if args.layout.is_none() {
        print_table(args, &config, backend.as_ref(), &o);
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
        println!("verified: {}", o.verified);
    }
    Ok(if failed || !o.verified {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
