//! `svm-multi-device`: three devices share one buffer through xe-svm on the best available
//! backend (a GPU backend when one is available, else the simulated one).
//!
//! ```text
//! cargo run --release --example svm-multi-device -- [--backend auto|sim|cuda|level-zero] [--mib N]
//!     [--rounds N] [--capacity-mib N] [--pointers] [--stats]
//! cargo run --release --example svm-multi-device -- latency [--backend auto|sim|cuda|level-zero]
//!     [--iters N] [--stats]
//! ```
//! (`--help` says more; `--backend` and `--stats` go before or after `latency`.)
//!
//! Default mode: the three devices take turns faulting (write, atomic, read) on the whole
//! buffer, so each migration pulls the pages from the previous device (the source pushes its
//! own pages); then each faults a disjoint third of it at the same time, and the thirds
//! rotate; then one device maps a peer's memory through a preferred location. After each
//! phase every page table is checked (every entry mapped, placed where the fault wanted it)
//! and the CPU reads the buffer back and checks every byte. Prints the statistics of every
//! device. With `--capacity-mib` smaller than the buffer, device memory is oversubscribed
//! and LRU eviction keeps it running.
//!
//! `latency`: CPU wall time of GPU fault -> migrate -> page table for a 2 MiB and a 64 KiB
//! range whose pages are in system memory (4 KiB pages, and one page of the range's size),
//! and of a fault that finds the range already resident. Prints a table.
//!
//! Exit codes: 0 success; 1 a check failed or the backend is unavailable; 2 bad arguments
//! (one line `svm-multi-device: MESSAGE` on stderr). A progress bar shows on stderr when stdout
//! and stderr are a terminal.
//!
//! Backend options come from the environment (`BackendConfig::from_env`), e.g.
//! `DRM_PAGEMAP_CUDA_VMM=0`.
//!
//! `--backend level-zero` runs on the workspace's software Level Zero driver through the real
//! loader (routed before anything probes Level Zero: 3 devices of 1 GiB; `ZE_SOFT_*` settings
//! already in the environment win); `DRM_PAGEMAP_LEVEL_ZERO_REAL=1` keeps the loader's own
//! drivers (an Intel GPU's). `auto` never routes the loader to the software driver.
//!
//! `--pointers` (default mode; sim, and CUDA in a build with the `cuda` feature): the buffer
//! is memory of this process (`drm_pagemap::uffd`: the backend's system memory is a memfd,
//! on CUDA registered with the driver as `cuda.host_memfd=1` makes it; the buffer a
//! `PointerRange`);
//! the CPU writes each phase's pattern with plain stores through its pointer and checks it with
//! loads through it (pages on a device fault home through userfaultfd). A backend without
//! pointer ranges, or no usable userfaultfd: one line `svm-multi-device: --pointers: REASON`
//! and exit 1.

use clap::{Parser, Subcommand};
use drm_pagemap::svm::{
    Access, Attributes, FaultAction, GpuVm, Placement, PreferredLocation, Svm, SvmConfig,
};
use drm_pagemap::uffd::{PointerRange, PointerSpace, UffdConfig};
use drm_pagemap::{Backend, BackendConfig, Location, Machine, PageSize, PagemapId, VaRange};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "tool/mod.rs"]
mod tool;

use tool::cli;
use tool::pointers::{self, Cpu};
use tool::progress::Progress;

const BASE: u64 = 1 << 40;
const M2: u64 = 2 << 20;

/// What `--help` says after the flags.
const AFTER_HELP: &str = "\
Default mode: three GPU VMs over three pagemaps share one buffer of --mib MiB (2 MiB SVM
ranges, 4 KiB pages). Phase 1 (--rounds rounds): the devices take turns faulting the whole
buffer (write, atomic, read), so every migration pulls the pages from the previous device.
Phase 2: each device faults a disjoint third at the same time, three times, the thirds
rotating. Phase 3: device 0 prefers device 1's memory and maps it remotely. After each
phase every page table is checked and the CPU reads every byte back. With --capacity-mib
below the buffer's size, device memory is oversubscribed and LRU eviction keeps it running.
With --pointers (sim, cuda), the buffer is memory of the process: the CPU writes and checks it
with plain stores and loads through its pointer (device pages fault home through
userfaultfd).

latency: the CPU wall time of GPU fault -> migrate -> page table for a 2 MiB and a 64 KiB
range in system memory (4 KiB pages, and one page of the range's size), and of a fault on a
resident range; a table per case (min, median, p90, p99, mean, resident) and a breakdown.

Exit codes: 0 success; 1 a check failed or the backend is unavailable (also --pointers
where the backend or the system cannot give pointers); 2 bad arguments (also --pointers with
latency).

Environment: the backends' DRM_PAGEMAP_* settings (DRM_PAGEMAP_CUDA_VMM=0, ...); for
level-zero, ZE_SOFT_* and DRM_PAGEMAP_LEVEL_ZERO_REAL=1 (keep the loader's own drivers).";

/// Three devices share one buffer through xe-svm.
#[derive(Debug, Parser)]
// A flag given twice: the last value wins.
#[command(name = "svm-multi-device", after_help = AFTER_HELP, args_override_self = true)]
struct Args {
    #[command(subcommand)]
    mode: Option<Mode>,
    /// auto (a GPU backend when one is available, else sim), sim, cuda, level-zero (the
    /// software driver through the real loader: 3 devices of 1 GiB), or a plug-in.
    #[arg(long, value_name = "BACKEND", default_value = "auto", global = true)]
    backend: String,
    /// The buffer's size in MiB (even, 6 to 1048576).
    #[arg(long, value_name = "N", default_value = "16", value_parser = mib)]
    mib: u64,
    /// Rounds of phase 1 (at most 1000000).
    #[arg(long, value_name = "N", default_value = "2", value_parser = clap::value_parser!(u64).range(..=1_000_000))]
    rounds: u64,
    /// Device memory per pagemap in MiB (default: uncapped); below the buffer's size it
    /// oversubscribes.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1 << 24))]
    capacity_mib: Option<u64>,
    /// The buffer is memory of the process (sim, default mode): the CPU writes and checks it
    /// through its pointer.
    #[arg(long)]
    pointers: bool,
    /// Also print the address space's statistics as tables (after everything else).
    #[arg(long, global = true)]
    stats: bool,
}

/// The modes besides the default one.
#[derive(Debug, Subcommand)]
enum Mode {
    /// GPU fault latency: fault -> migrate -> page table, from system memory.
    Latency {
        /// Faults per case (0 counts as 1; at most 1000000).
        #[arg(long, value_name = "N", default_value = "200", value_parser = clap::value_parser!(u64).range(..=1_000_000))]
        iters: u64,
    },
}

fn mib(text: &str) -> Result<u64, String> {
    match text.parse::<u64>() {
        Ok(n) if (6..=1 << 20).contains(&n) && n.is_multiple_of(2) => Ok(n),
        Ok(_) => Err("must be even, at least 6 and at most 1048576".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// The three VMs over three pagemaps of the backend (on a machine with fewer devices,
/// several pagemaps share a device).
struct Setup {
    backend: String,
    devices: Vec<String>,
    svm: Svm,
    vms: Vec<GpuVm>,
    /// With `--pointers`: the pointer ranges of the address space.
    pointers: Option<Arc<PointerSpace>>,
}

/// The config of the three pagemaps' backend (options from the environment:
/// `DRM_PAGEMAP_CUDA_VMM=0` and the others; the library reads none itself).
fn backend_config(host_bytes: u64) -> BackendConfig {
    BackendConfig {
        devices: Some(3),
        device_capacity: Some(1 << 30),
        host_capacity: Some(host_bytes),
        ..BackendConfig::from_env()
    }
}

fn setup(
    backend: &str,
    capacity: Option<u64>,
    host_bytes: u64,
    with_pointers: bool,
) -> Result<Setup, String> {
    let config = backend_config(host_bytes);
    let svm_config = SvmConfig {
        capacity,
        fence_timeout: Some(Duration::from_secs(30)),
    };
    // One address space: the SVM context owns the machine's pagemaps.
    let (backend, svm, pointers): (Arc<dyn Backend>, _, _) = if with_pointers {
        // A backend whose system memory pointer ranges map (checked in main), three
        // pagemaps, and the pointer ranges of the address space.
        let name = match backend {
            "auto" => drm_pagemap::auto_backend_with(&config),
            name => name,
        };
        let (backend, file) =
            pointers::open_backend(name, &config).map_err(|e| format!("--pointers: {e}"))?;
        let (machine, svm) = Machine::svm_on(backend, 3, config.device_capacity, svm_config)
            .map_err(|e| e.to_string())?;
        let space = PointerSpace::new(machine.mm.clone(), file, UffdConfig::default())
            .map_err(|e| format!("--pointers: {e}"))?;
        (machine.backend, svm, Some(space))
    } else {
        let (machine, svm) =
            Machine::open_svm(backend, &config, 3, svm_config).map_err(|e| e.to_string())?;
        (machine.backend, svm, None)
    };
    let mut vms = Vec::with_capacity(3);
    for k in 0..3u8 {
        vms.push(svm.vm(PagemapId(k)).map_err(|e| e.to_string())?);
    }
    Ok(Setup {
        backend: backend.name().to_string(),
        devices: backend
            .devices()
            .iter()
            .map(|d| d.name.to_string())
            .collect(),
        svm,
        vms,
        pointers,
    })
}

fn byte(va: u64, seed: u8) -> u8 {
    ((va >> 12) as u8).wrapping_mul(29) ^ (va as u8).rotate_left(3) ^ seed
}

fn pattern(range: VaRange, seed: u8) -> Vec<u8> {
    (range.start..range.end())
        .map(|va| byte(va, seed))
        .collect()
}

/// Counts what failed, with a line for each of the first few.
#[derive(Default)]
struct Checks {
    failed: usize,
}

impl Checks {
    fn fail(&mut self, what: String) {
        self.failed += 1;
        if self.failed <= 10 {
            eprintln!("CHECK FAILED: {what}");
        }
    }

    /// The CPU reads `range` back (or loads it through its pointer) and compares every byte
    /// with the pattern of `seed`.
    fn data(&mut self, cpu: &Cpu, range: VaRange, seed: u8, phase: &str) {
        let mut got = vec![0u8; range.len as usize];
        if let Err(e) = cpu.read(range.start, &mut got) {
            return self.fail(format!("{phase}: reading {range}: {e}"));
        }
        let want = pattern(range, seed);
        if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
            self.fail(format!(
                "{phase}: byte at {:#x} is {:#x}, want {:#x}",
                range.start + i as u64,
                got[i],
                want[i]
            ));
        }
    }

    /// `vm`'s page table for the SVM range at `va`: every entry mapped and placed at `want`.
    fn table(&mut self, vm: &GpuVm, va: u64, want: Placement, phase: &str) {
        let r = vm.with_page_table(va, |pt| {
            pt.ptes
                .iter()
                .position(|p| p.placement != want || p.addr.is_none())
                .map(|i| (pt.range, i, pt.ptes[i]))
        });
        match r {
            None => self.fail(format!(
                "{phase}: {:?} has no page table at {va:#x}",
                vm.device()
            )),
            Some(Some((range, i, pte))) => self.fail(format!(
                "{phase}: {:?} page {i} of {range}: {pte:?}, want {want:?}",
                vm.device()
            )),
            Some(None) => {}
        }
    }

    /// A fault that must succeed.
    fn fault(
        &mut self,
        vm: &GpuVm,
        va: u64,
        access: Access,
        phase: &str,
    ) -> Option<xe_svm::FaultReport> {
        match vm.handle_gpu_fault(va, access) {
            Ok(r) => Some(r),
            Err(e) => {
                self.fail(format!("{phase}: {access:?} fault at {va:#x}: {e}"));
                None
            }
        }
    }
}

fn demo(a: &Args) -> Result<usize, String> {
    let bytes = a.mib << 20;
    let capacity = a.capacity_mib.map(|m| m << 20);
    let progress = Progress::new(true);
    let s = setup(&a.backend, capacity, (bytes * 4).max(256 << 20), a.pointers)?;
    let mm = s.svm.mm().clone();
    println!(
        "backend {} ({}), 3 pagemaps on devices {:?}, buffer {} MiB{}, device memory per pagemap {}",
        s.backend,
        s.devices.join(", "),
        s.svm.devices(),
        a.mib,
        if a.pointers {
            " (through its pointer)"
        } else {
            ""
        },
        capacity.map_or("uncapped".to_string(), |c| format!("{} MiB", c >> 20))
    );
    // With --pointers the buffer is where its mapping is (2 MiB aligned: its address is the
    // pointer); otherwise at BASE.
    let pointer: Option<PointerRange> = match &s.pointers {
        Some(space) => Some(
            space
                .create_range(bytes, PageSize::Size4K)
                .map_err(|e| format!("--pointers: {e}"))?,
        ),
        None => {
            mm.create_range(VaRange::new(BASE, bytes), PageSize::Size4K)
                .map_err(|e| e.to_string())?;
            None
        }
    };
    let (buf, cpu) = match &pointer {
        Some(r) => (r.range(), Cpu::Pointer(r)),
        None => (VaRange::new(BASE, bytes), Cpu::Explicit(&mm)),
    };
    let ranges: Vec<u64> = (0..bytes / M2).map(|i| buf.start + i * M2).collect();
    let mut c = Checks::default();
    let t0 = Instant::now();
    // Phase 1: turns on the whole buffer.
    let accesses = [Access::Write, Access::Atomic, Access::Read];
    progress.phase("turns", a.rounds * 3 * ranges.len() as u64);
    for round in 0..a.rounds as usize {
        let seed = (round as u8).wrapping_add(1);
        cpu.write(buf.start, &pattern(buf, seed))
            .map_err(|e| e.to_string())?;
        for (d, vm) in s.vms.iter().enumerate() {
            let phase = format!("turns round {round}, device {d}");
            for &va in &ranges {
                if c.fault(vm, va, accesses[(d + round) % 3], &phase).is_some()
                    && capacity.is_none()
                {
                    c.table(vm, va, Placement::Device(vm.local_pagemap()), &phase);
                }
                progress.inc(1);
            }
        }
        c.data(&cpu, buf, seed, &format!("turns round {round}"));
    }
    // Phase 2: disjoint thirds at the same time, then rotated.
    let seed = 0x40;
    cpu.write(buf.start, &pattern(buf, seed))
        .map_err(|e| e.to_string())?;
    progress.phase("pieces", 3 * ranges.len() as u64);
    for shift in 0..3 {
        let results: Vec<Vec<String>> = std::thread::scope(|scope| {
            let handles: Vec<_> = s
                .vms
                .iter()
                .enumerate()
                .map(|(d, vm)| {
                    let mine: Vec<u64> = ranges
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| (i + shift) % 3 == d)
                        .map(|(_, &va)| va)
                        .collect();
                    let progress = progress.clone();
                    scope.spawn(move || {
                        let mut errs = Vec::new();
                        for va in mine {
                            if let Err(e) = vm.handle_gpu_fault(va, Access::Write) {
                                errs.push(format!(
                                    "pieces shift {shift}, device {d}: fault at {va:#x}: {e}"
                                ));
                            }
                            progress.inc(1);
                        }
                        errs
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_default())
                .collect()
        });
        for e in results.into_iter().flatten() {
            c.fail(e);
        }
        if capacity.is_none() {
            for (i, &va) in ranges.iter().enumerate() {
                let d = (0..3).find(|d| (i + shift) % 3 == *d).unwrap_or(0);
                let vm = &s.vms[d];
                c.table(
                    vm,
                    va,
                    Placement::Device(vm.local_pagemap()),
                    &format!("pieces shift {shift}"),
                );
            }
        }
    }
    c.data(&cpu, buf, seed, "pieces");
    // Phase 3: device 0 prefers device 1's memory and maps it remotely.
    let (vm0, vm1) = (&s.vms[0], &s.vms[1]);
    vm0.madvise(
        buf,
        Attributes {
            preferred: PreferredLocation::Pagemap(vm1.local_pagemap()),
            ..Attributes::default()
        },
    )
    .map_err(|e| e.to_string())?;
    progress.phase("peer", ranges.len() as u64);
    for &va in &ranges {
        progress.inc(1);
        if let Some(r) = c.fault(vm0, va, Access::Read, "peer mapping")
            && r.action != FaultAction::FellBack
        {
            c.table(
                vm0,
                va,
                Placement::Device(vm1.local_pagemap()),
                "peer mapping",
            );
        }
    }
    c.data(&cpu, buf, seed, "peer mapping");
    let elapsed = t0.elapsed();
    progress.finish();
    for d in s.svm.devices() {
        print!("\n== {d} ==\n{}", s.svm.stats(d));
    }
    println!("== device memory ==");
    for k in 0..3u8 {
        if let Some(m) = s.svm.memory(PagemapId(k)) {
            println!(
                "pagemap {k} on {}: capacity {} MiB, peak {} MiB, in use {} MiB",
                m.device,
                m.capacity >> 20,
                m.peak.div_ceil(1 << 20),
                m.used.div_ceil(1 << 20)
            );
        }
    }
    let total = s.svm.total_stats();
    println!(
        "\n{} faults, {} migrations, {} LRU evictions in {:.1} ms; verification: {}",
        total.total_faults(),
        total.total_to_device(),
        total.lru_evictions.count,
        elapsed.as_secs_f64() * 1e3,
        if c.failed == 0 {
            "every byte and page table checked, OK".to_string()
        } else {
            format!("{} checks FAILED", c.failed)
        }
    );
    if a.stats {
        tool::stats::print("the address space", &mm.stats());
    }
    Ok(c.failed)
}

fn size_label(len: u64) -> &'static str {
    if len == M2 { "2 MiB" } else { "64 KiB" }
}

fn pages_label(len: u64, ps: PageSize) -> String {
    let p = match ps {
        PageSize::Size4K => "4K",
        PageSize::Size64K => "64K",
        PageSize::Size2M => "2M",
    };
    format!("{}x{p}", len / ps.bytes())
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

fn latency(a: &Args, iters: usize) -> Result<usize, String> {
    let s = setup(&a.backend, None, 256 << 20, false)?;
    let mm = s.svm.mm().clone();
    let vm = &s.vms[0];
    println!(
        "backend {} ({}); GPU fault -> migrate -> page table, pages from system memory, {} faults each",
        s.backend,
        s.devices.join(", "),
        iters
    );
    println!(
        "{:<8} {:<8} {:>6} {:>10} {:>10} {:>10} {:>10} {:>10} {:>12} {:>10}",
        "range",
        "pages",
        "count",
        "min us",
        "median us",
        "p90 us",
        "p99 us",
        "mean us",
        "resident us",
        "target us"
    );
    let cases = [
        (M2, PageSize::Size4K, 80.0),
        (M2, PageSize::Size2M, 80.0),
        (64 << 10, PageSize::Size4K, 15.0),
        (64 << 10, PageSize::Size64K, 15.0),
    ];
    let mut c = Checks::default();
    let mut parts = Vec::new();
    for (k, &(len, ps, target)) in cases.iter().enumerate() {
        let range = VaRange::new(BASE + k as u64 * (4 * M2), len);
        mm.create_range(range, ps).map_err(|e| e.to_string())?;
        mm.write(range.start, &pattern(range, k as u8))
            .map_err(|e| e.to_string())?;
        let warmup = 5.min(iters);
        let progress = Progress::new(true);
        progress.phase(size_label(len), (iters + warmup) as u64);
        let mut breakdown = xe_svm::Stats::default();
        // Device time of the copy calls (the core's, from submission to the engine seeing
        // them done), nanoseconds over the timed faults.
        let mut copy_ns = 0u64;
        let mut cold = Vec::with_capacity(iters);
        let mut warm = Vec::with_capacity(iters);
        for i in 0..iters + warmup {
            // Back to system memory (not timed).
            vm.evict_range(range).map_err(|e| e.to_string())?;
            s.svm.reset_stats();
            let t = Instant::now();
            let r = vm.handle_gpu_fault(range.start, Access::Write);
            let dt = t.elapsed();
            if i >= warmup {
                breakdown.merge(&s.svm.total_stats());
                copy_ns += mm
                    .stats()
                    .links
                    .iter()
                    .filter(|l| l.to != Location::System)
                    .map(|l| l.device_time_ns)
                    .sum::<u64>();
            }
            match r {
                Ok(r) if matches!(r.action, FaultAction::Migrated { .. }) => {}
                Ok(r) => c.fail(format!("{range}: fault did not migrate: {r:?}")),
                Err(e) => return Err(format!("{range}: {e}")),
            }
            let t = Instant::now();
            let again = vm.handle_gpu_fault(range.start, Access::Write);
            let dw = t.elapsed();
            if !matches!(again, Ok(ref r) if r.action == FaultAction::Valid) {
                c.fail(format!(
                    "{range}: second fault was not a valid fault: {again:?}"
                ));
            }
            if i >= warmup {
                cold.push(dt);
                warm.push(dw);
            }
            progress.set(i as u64 + 1);
        }
        c.table(
            vm,
            range.start,
            Placement::Device(vm.local_pagemap()),
            "latency",
        );
        c.data(&Cpu::Explicit(&mm), range, k as u8, "latency");
        progress.finish();
        cold.sort();
        warm.sort();
        let mean = cold.iter().map(|d| d.as_secs_f64()).sum::<f64>() / cold.len() as f64 * 1e6;
        println!(
            "{:<8} {:<8} {:>6} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>12.2} {:>10.0}",
            size_label(len),
            pages_label(len, ps),
            cold.len(),
            percentile(&cold, 0.0),
            percentile(&cold, 0.5),
            percentile(&cold, 0.9),
            percentile(&cold, 0.99),
            mean,
            percentile(&warm, 0.5),
            target
        );
        parts.push((range, ps, breakdown, copy_ns));
    }
    // Where a cold fault's time goes (averages, microseconds): allocation + migration in the
    // engine (copies, waits, commit), the copy calls within it (submission to completion),
    // the page table (built while the copies run, so it is part of alloc+migrate), and the
    // rest of the SVM layer (lookups, backing snapshot, locks, accounting).
    println!(
        "\n{:<8} {:<8} {:>14} {:>12} {:>14} {:>12} {:>10}",
        "range", "pages", "alloc+migrate", "copy calls", "(page table)", "svm layer", "fault"
    );
    for (range, ps, b, copy_ns) in parts {
        let n = b.total_faults().max(1) as f64;
        let fault: u64 = b.faults.iter().map(|t| t.micros).sum();
        let migrate: u64 = b.to_device.iter().map(|t| t.micros).sum();
        let copies = copy_ns / 1000;
        let pt = b.page_tables.micros;
        println!(
            "{:<8} {:<8} {:>14.1} {:>12.1} {:>14.1} {:>12.1} {:>10.1}",
            size_label(range.len),
            pages_label(range.len, ps),
            migrate as f64 / n,
            copies as f64 / n,
            pt as f64 / n,
            fault.saturating_sub(migrate) as f64 / n,
            fault as f64 / n
        );
    }
    if c.failed > 0 {
        println!("{} checks FAILED", c.failed);
    }
    if a.stats {
        tool::stats::print("the address space", &mm.stats());
    }
    Ok(c.failed)
}

fn main() -> ExitCode {
    let args: Args = match cli::parse("svm-multi-device") {
        Ok(a) => a,
        Err(code) => return code,
    };
    if args.pointers {
        if matches!(args.mode, Some(Mode::Latency { .. })) {
            cli::bad_argument(
                "svm-multi-device",
                "--pointers: the latency mode works through the explicit API only",
            );
            return ExitCode::from(cli::BAD_ARGUMENTS);
        }
        let name = match args.backend.as_str() {
            "auto" => drm_pagemap::auto_backend_with(&backend_config(256 << 20)),
            name => name,
        };
        if let Some(why) = pointers::unsupported(name) {
            eprintln!("svm-multi-device: --pointers: {why}");
            return ExitCode::from(1);
        }
    }
    if args.backend == "level-zero"
        && std::env::var_os("DRM_PAGEMAP_LEVEL_ZERO_REAL").is_none_or(|v| v != "1")
        && let Err(e) =
            ze_soft::route_loader_with(&[("ZE_SOFT_DEVICES", "3"), ("ZE_SOFT_DEVICE_MEMORY", "1G")])
    {
        eprintln!("error: backend level-zero unavailable: {e}");
        return ExitCode::from(1);
    }
    let r = match args.mode {
        Some(Mode::Latency { iters }) => latency(&args, iters.max(1) as usize),
        None => demo(&args),
    };
    match r {
        Ok(0) => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(1),
        // What --pointers could not do: one line, as the tool's own.
        Err(e) if e.starts_with("--pointers: ") => {
            eprintln!("svm-multi-device: {e}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}
