//! The CPU side of a Level Zero copy call: what `copy_to_devmem` costs the calling thread to
//! plan and queue a scattered call of 4 KiB pages, on the pagemap's immediate command list
//! against one regular command list (recorded, closed, executed once), for 1 .. 512 runs
//! (1, 4, 8, 16, 32, 64, 128, 256, 512).
//!
//! Runs through Debian's real loader against the workspace's software driver (`ze-soft`,
//! `ZE_SOFT_COPY_LATENCY_US=0`). What stays true on Intel hardware is the backend's part and
//! the number of driver calls per run (the software driver's own cost per append stands in
//! for the real driver's); the execution of the copies is software here and is not compared.
//!
//! - "submit": from the call to its return (the fence exists, the work is queued);
//! - "complete": from the call to its fence signalled (the software engine's execution
//!   included), reported in the summary only;
//! - every call waits for the previous one first, so each starts with an idle engine.
//!
//! Prints a summary table (median ns per page, appends per second, the crossover) after the
//! criterion rows. `--callgrind imm|reg [N]` (N from 1 to 512, default 64) runs a few warm-up calls and then exactly one call
//! in `measured_call` (for `valgrind --tool=callgrind --collect-atstart=no
//! --toggle-collect='*measured_call*'`). Without the loader: one `skipped: <reason>` line.

use clap::error::ErrorKind;
use clap::{CommandFactory, Parser, ValueEnum};
use criterion::{BenchmarkId, Criterion, Throughput};
use drm_pagemap_core::*;
use drm_pagemap_level_zero::{LevelZeroBackend, LevelZeroConfig, probe};
use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const PS: PageSize = PageSize::Size4K;
const RUNS: [usize; 9] = [1, 4, 8, 16, 32, 64, 128, 256, 512];
const MAX: usize = 512;

/// Seconds per call (sum, calls) by (kind, runs): submission, and submission + completion.
#[derive(Default)]
struct Results {
    submit: BTreeMap<(&'static str, usize), Vec<f64>>,
    complete: BTreeMap<(&'static str, usize), Vec<f64>>,
}

static RESULTS: Mutex<Option<Results>> = Mutex::new(None);

fn record(kind: &'static str, runs: usize, submit: f64, complete: f64) {
    let mut g = RESULTS.lock().unwrap();
    let r = g.get_or_insert_with(Results::default);
    r.submit.entry((kind, runs)).or_default().push(submit);
    r.complete.entry((kind, runs)).or_default().push(complete);
}

/// One path: a backend that sends every call to one kind of list, a pagemap, `2 * MAX`
/// device pages (every other one used: no two entries merge) and `MAX` system pages.
struct Path {
    kind: &'static str,
    backend: LevelZeroBackend,
    pm: Pagemap,
    pfns: Vec<Pfn>,
    addrs: Vec<DmaAddr>,
}

impl Path {
    fn new(kind: &'static str, regular_list_min_runs: usize) -> Path {
        let backend = LevelZeroBackend::new(LevelZeroConfig {
            devices: Some(1),
            host_capacity: 64 << 20,
            regular_list_min_runs,
            ..LevelZeroConfig::default()
        })
        .expect("open level-zero on the software driver");
        let pm = backend
            .create_pagemap(&PagemapSpec {
                id: PagemapId(0),
                device: DeviceId(0),
                owner: None,
                capacity_bytes: 16 << 20,
            })
            .expect("pagemap");
        let b = pm.devmem().allocate(2 * MAX, PS).expect("allocate");
        b.wait_ready().expect("clear");
        let mut all = vec![Pfn(0); 2 * MAX];
        pm.devmem().populate_devmem_pfn(&b, &mut all).expect("pfns");
        std::mem::forget(b); // kept for the whole run
        let pfns = all.iter().step_by(2).copied().collect();
        let host = backend.host_memory();
        let mut frames = vec![HostFrame(0); MAX];
        host.alloc_frames(PS, &mut frames).expect("host frames");
        let mut addrs = vec![DmaAddr::NONE; MAX];
        host.map_frames(DeviceId(0), &frames, PS, Direction::ToDevice, &mut addrs)
            .expect("map");
        Path {
            kind,
            backend,
            pm,
            pfns,
            addrs,
        }
    }

    fn call(&self, n: usize) -> Fence {
        self.pm
            .devmem()
            .copy_to_devmem(&CopyRequest {
                page_size: PS,
                pages: &self.pfns[..n],
                addrs: &self.addrs[..n],
                pre_fence: None,
            })
            .expect("copy_to_devmem")
    }

    /// Checks that a call of `n` pages is `n` runs on this path's kind of list.
    fn check(&self, n: usize) {
        let zp = self.backend.ze_pagemap(PagemapId(0)).unwrap();
        let before = zp.stats();
        self.call(n).wait_timeout(Duration::from_secs(30)).unwrap();
        let after = zp.stats();
        assert_eq!(after.runs - before.runs, n as u64, "{n} pages, {n} runs");
        let regular = after.regular_calls - before.regular_calls;
        assert_eq!(
            regular == 1,
            self.kind == "regular",
            "{n} runs on {}",
            self.kind
        );
    }
}

#[inline(never)]
fn measured_call(p: &Path, n: usize) -> Fence {
    p.call(n)
}

/// The command list of a `--callgrind` call.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum List {
    /// The pagemap's immediate command list.
    #[value(alias = "immediate")]
    Imm,
    /// One regular command list.
    #[value(alias = "regular")]
    Reg,
}

/// The CPU side of a Level Zero copy call, immediate against regular command lists.
#[derive(Debug, Parser)]
#[command(name = "l0_copy")]
struct Args {
    /// Warm up, then exactly one call of RUNS runs (default 64, at most 512) on LIST (imm or
    /// reg) in `measured_call`, for callgrind; no criterion rows.
    #[arg(long, num_args = 1..=2, value_names = ["LIST", "RUNS"])]
    callgrind: Option<Vec<String>>,
    /// criterion's own arguments (`--bench`, a filter, `--save-baseline NAME`, ...).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    criterion: Vec<String>,
}

/// `--callgrind`'s values: the list, and the runs (1 to [`MAX`]).
fn callgrind_values(values: &[String]) -> Result<(List, usize), String> {
    let list = List::from_str(&values[0], true).map_err(|e| format!("LIST: {e}"))?;
    let runs = match values.get(1) {
        None => 64,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=MAX).contains(&n) => n,
            _ => return Err(format!("RUNS: {v:?} is not a number from 1 to {MAX}")),
        },
    };
    Ok((list, runs))
}

fn callgrind(list: List, n: usize) {
    let p = match list {
        List::Imm => Path::new("immediate", usize::MAX),
        List::Reg => Path::new("regular", 1),
    };
    for _ in 0..20 {
        p.call(n).wait_timeout(Duration::from_secs(30)).unwrap();
    }
    let f = measured_call(&p, black_box(n));
    f.wait_timeout(Duration::from_secs(30)).unwrap();
    println!("one {} call of {n} runs measured", p.kind);
}

fn bench(c: &mut Criterion, paths: &[Path]) {
    let mut g = c.benchmark_group("level-zero copy_to_devmem submit (4 KiB scattered)");
    g.sample_size(30)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    for &n in &RUNS {
        g.throughput(Throughput::Elements(n as u64));
        for p in paths {
            g.bench_with_input(BenchmarkId::new(p.kind, n), &n, |b, &n| {
                b.iter_custom(|iters| {
                    let (mut submit, mut complete) = (Duration::ZERO, Duration::ZERO);
                    for _ in 0..iters {
                        let t = Instant::now();
                        let f = p.call(n);
                        submit += t.elapsed();
                        f.wait_timeout(Duration::from_secs(30)).unwrap();
                        complete += t.elapsed();
                    }
                    let k = iters as f64;
                    record(
                        p.kind,
                        n,
                        submit.as_secs_f64() / k,
                        complete.as_secs_f64() / k,
                    );
                    submit
                })
            });
        }
    }
    g.finish();
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn summary() {
    let g = RESULTS.lock().unwrap();
    let Some(r) = g.as_ref() else { return };
    println!();
    println!(
        "4 KiB scattered copy_to_devmem, medians of the samples' means: submit = CPU time of the \
         call; complete = until the fence signalled (software execution)"
    );
    println!(
        "{:>5} | {:>12} {:>12} {:>7} | {:>14} {:>14} | {:>12} {:>12}",
        "runs",
        "imm ns/page",
        "reg ns/page",
        "reg/imm",
        "imm appends/s",
        "reg appends/s",
        "imm compl us",
        "reg compl us"
    );
    let mut crossover = None;
    for &n in &RUNS {
        let get =
            |m: &BTreeMap<(&'static str, usize), Vec<f64>>, k| m.get(&(k, n)).map(|v| median(v));
        let (Some(is), Some(rs)) = (get(&r.submit, "immediate"), get(&r.submit, "regular")) else {
            continue;
        };
        let ic = get(&r.complete, "immediate").unwrap_or(f64::NAN);
        let rc = get(&r.complete, "regular").unwrap_or(f64::NAN);
        // Appends per call: one command for a single run, else the runs and two barriers
        // (no pre-fence here).
        let appends = if n == 1 { 1.0 } else { n as f64 + 1.0 };
        // The crossover: the fewest runs from which the regular list stays cheaper.
        match (rs < is, crossover) {
            (true, None) => crossover = Some(n),
            (false, Some(_)) => crossover = None,
            _ => {}
        }
        println!(
            "{:>5} | {:>12.0} {:>12.0} {:>7.2} | {:>14.0} {:>14.0} | {:>12.1} {:>12.1}",
            n,
            is * 1e9 / n as f64,
            rs * 1e9 / n as f64,
            rs / is,
            appends / is,
            appends / rs,
            ic * 1e6,
            rc * 1e6
        );
    }
    match crossover {
        Some(n) => println!(
            "crossover: the regular list costs the caller less from {n} runs on (every larger count)"
        ),
        None => println!("crossover: none in 1..=512 runs (the immediate list is cheaper)"),
    }
}

fn main() {
    // Criterion reads its own arguments again (`configure_from_args`) when there is no
    // `--callgrind`.
    let args = Args::parse();
    let callgrind_call = match args.callgrind.as_deref().map(callgrind_values) {
        None => None,
        Some(Ok(c)) => Some(c),
        Some(Err(e)) => Args::command()
            .error(ErrorKind::InvalidValue, format!("--callgrind: {e}"))
            .exit(),
    };
    // SAFETY: before the loader is opened and before zeInit (the driver reads it then); the
    // bench is single-threaded here.
    unsafe { std::env::set_var("ZE_SOFT_COPY_LATENCY_US", "0") };
    let ready = ze_soft::route_loader().and_then(|_| probe());
    if let Err(reason) = ready {
        println!("skipped: level-zero: {reason}");
        return;
    }
    if let Some((list, runs)) = callgrind_call {
        callgrind(list, runs);
        return;
    }
    let paths = [Path::new("immediate", usize::MAX), Path::new("regular", 1)];
    for p in &paths {
        for &n in &RUNS {
            p.check(n);
        }
    }
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c, &paths);
    c.final_summary();
    summary();
}
