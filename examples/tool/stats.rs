//! `--stats`: an address space's statistics ([`drm_pagemap::StatsSnapshot`]) as tables.

use drm_pagemap::{Histogram, StatsSnapshot};

/// Prints `s` as tables on stdout, after a heading naming what they cover.
pub fn print(heading: &str, s: &StatsSnapshot) {
    println!("\n== statistics: {heading} ==");
    println!(
        "{:<28} {:>8} {:>10} {:>12} {:>12} {:>8}",
        "link", "calls", "pages", "bytes", "device time", "GB/s"
    );
    for l in &s.links {
        let rate = if l.device_time_ns > 0 {
            format!("{:.2}", l.bytes as f64 / l.device_time_ns as f64)
        } else {
            "-".into()
        };
        println!(
            "{:<28} {:>8} {:>10} {:>12} {:>12} {:>8}",
            format!("{} -> {}", l.from, l.to),
            l.calls,
            l.pages,
            bytes(l.bytes),
            duration(l.device_time_ns),
            rate
        );
    }
    if s.links.is_empty() {
        println!("(no copies)");
    }
    println!(
        "\n{:<28} {:>8} {:>10} {:>12}",
        "page size", "calls", "pages", "bytes"
    );
    for p in &s.page_sizes {
        println!(
            "{:<28} {:>8} {:>10} {:>12}",
            bytes(p.page_size),
            p.calls,
            p.pages,
            bytes(p.bytes)
        );
    }
    println!("\ncopy call sizes: {}", histogram(&s.call_bytes, bytes));
    println!(
        "migration latency: {}",
        histogram(&s.migrate_latency_ns, duration)
    );
    println!(
        "migrations {} (not needed {}), copies in flight {} ({})",
        s.migrations,
        s.migrations_not_needed,
        s.copies_in_flight,
        bytes(s.bytes_in_flight)
    );
    println!(
        "\n{:<8} {:>7} {:<24} {:>12} {:>12} {:>12}",
        "pagemap", "device", "name", "used", "allocations", "capacity"
    );
    for p in &s.pagemaps {
        println!(
            "{:<8} {:>7} {:<24} {:>12} {:>12} {:>12}",
            p.pagemap,
            p.device,
            p.name,
            bytes(p.used_bytes),
            p.allocations,
            bytes(p.capacity_bytes)
        );
    }
    println!(
        "host frames in use {} ({} of {})",
        s.host_frames_in_use,
        bytes(s.host_bytes_in_use),
        bytes(s.host_capacity_bytes)
    );
    let f = &s.failures;
    println!(
        "failures {}: busy {} (fragmentation {}, foreign owner {}, page locked {}, evict \
         incomplete {}, cpu access {}), out of memory {}, fence error {}, timeout {}, backend {}, \
         other {}; injected {}",
        f.total(),
        f.busy(),
        f.busy_fragmentation,
        f.busy_foreign_owner,
        f.busy_page_locked,
        f.busy_evict_incomplete,
        f.busy_cpu_access,
        f.out_of_memory,
        f.fence_error,
        f.timeout,
        f.backend,
        f.other,
        f.injected
    );
    println!(
        "evictions {} ({} pages), CPU faults {} ({} pages), timeslice waits {}",
        s.evictions, s.evicted_pages, s.cpu_faults, s.cpu_fault_pages, s.timeslice_waits
    );
}

/// The count, median and 99th percentile of a log2 histogram (each the floor of its bucket).
fn histogram(h: &Histogram, unit: fn(u64) -> String) -> String {
    let n = h.count();
    match (h.quantile_floor(0.5), h.quantile_floor(0.99)) {
        (Some(p50), Some(p99)) => format!(
            "{n}, median >= {}, p99 >= {} (log2 buckets)",
            unit(p50),
            unit(p99)
        ),
        _ => "none".into(),
    }
}

/// `b` bytes in the largest binary unit that keeps the number at least 1.
fn bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if b < 1024 {
        return format!("{b} B");
    }
    let mut v = b as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// `ns` nanoseconds in us, ms or s.
fn duration(ns: u64) -> String {
    match ns {
        n if n < 1_000_000 => format!("{:.1} us", n as f64 / 1e3),
        n if n < 1_000_000_000 => format!("{:.1} ms", n as f64 / 1e6),
        n => format!("{:.2} s", n as f64 / 1e9),
    }
}
