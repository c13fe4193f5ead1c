//! The generator on small results files. SAMPLE DATA: the figures below are copied from
//! tables of BENCHMARKS.md (the H100 copy benches of 2026-11-25, the fault-latency tables)
//! and shaped as the benches write them; they exist to test the generator and are never
//! drawn into docs/plots.

use drm_pagemap_plots::model::{CopyDirection, parse_size, size_label};
use drm_pagemap_plots::parse::{ParseError, parse_jsonl, parse_migrate, parse_svm_latency};
use drm_pagemap_plots::{Error, generate, read_dir, render_all};
use std::path::PathBuf;

const BYTES: f64 = 268_435_456.0;

/// SAMPLE: cuda_copy rows as JSON lines, from BENCHMARKS.md's H100 table (GB/s, device time).
fn sample_copy_jsonl() -> String {
    let mut s =
        String::from(r#"{"bench":"cuda_copy","kind":"meta","gpu":"SAMPLE GPU","driver":"0.0"}"#);
    s.push('\n');
    let rows: [(&str, &str, [f64; 3]); 12] = [
        ("h2d", "ours", [50.5, 50.5, 50.3]),
        ("h2d", "contiguous", [54.8, 54.7, 54.3]),
        ("h2d", "per-page-loop", [1.5, 16.3, 50.9]),
        ("h2d", "batch", [6.7, 54.3, 54.6]),
        ("h2d", "managed-prefetch", [48.5, 48.1, 48.3]),
        ("d2h", "ours", [52.1, 52.1, 52.0]),
        ("d2h", "contiguous", [55.1, 54.8, 55.1]),
        ("d2h", "per-page-loop", [1.7, 17.5, 52.1]),
        ("d2h", "batch", [8.5, 54.7, 55.1]),
        ("d2h", "managed-prefetch", [10.0, 11.6, 12.6]),
        ("p2p", "ours-push", [1370.0, 1361.0, 1364.0]),
        ("p2p", "d2d-contiguous", [1483.0, 1483.0, 1483.0]),
    ];
    for (dir, row, gbps) in rows {
        for (size, g) in ["4k", "64k", "2m"].into_iter().zip(gbps) {
            let issue = if row.starts_with("ours") {
                format!("{}", BYTES / (g * 0.9) / 1e9)
            } else {
                "null".into()
            };
            s.push_str(&format!(
                r#"{{"bench":"cuda_copy","kind":"row","group":"{dir}-{size}","row":"{row}","bytes":{BYTES},"device_s":{},"iters":10,"issue_s":{issue}}}"#,
                BYTES / g / 1e9
            ));
            s.push('\n');
        }
    }
    // Rows the copy charts do not draw.
    s.push_str(r#"{"bench":"cuda_copy","kind":"row","group":"mixed-4k","row":"by-source","bytes":268435456,"device_s":0.00189,"iters":10,"issue_s":0.0021}"#);
    s.push('\n');
    s.push_str(r#"{"bench":"cuda_copy","kind":"row","group":"crossover-64k","row":"h2d-dma","bytes":268435456,"device_s":0.0167,"iters":10,"issue_s":null}"#);
    s.push('\n');
    s
}

/// SAMPLE: `svm-multi-device latency` output in its table format, with BENCHMARKS.md's
/// "Final build (2026-11-25, session 2)" run 1 medians.
fn sample_svm_text(median_64k: f64) -> String {
    format!(
        "backend cuda (SAMPLE GPU); GPU fault -> migrate -> page table, pages from system memory, 500 faults each
range    pages     count     min us  median us     p90 us     p99 us    mean us  resident us  target us
2 MiB    512x4K      500       55.0       60.8       66.0       80.1       61.9         0.35         80
2 MiB    1x2M        500       47.0       49.8       53.0       60.2       50.3         0.30         80
64 KiB   16x4K       500       11.0       {median_64k:.1}       14.1       19.9       13.4         0.40         15
64 KiB   1x64K       500       10.9       12.6       13.8       18.0       12.9         0.35         15

range    pages     alloc+migrate   copy calls   (page table)    svm layer      fault
2 MiB    512x4K             58.1         50.2            4.8          2.0       60.1
"
    )
}

/// SAMPLE: fault_latency JSON lines with BENCHMARKS.md's H100 backend-level medians.
fn sample_fault_jsonl() -> String {
    let rows = [
        ("64 KiB, 16x4K", "on free", 10.9),
        ("64 KiB, 16x4K", "cuMemcpyAsync + event", 9.3),
        ("2 MiB, 512x4K", "on free", 53.0),
        ("2 MiB, 512x4K", "on allocate", 62.3),
        ("2 MiB, 512x4K", "cuMemcpyAsync + event", 47.2),
    ];
    rows.iter()
        .map(|(case, series, p50)| {
            format!(
                r#"{{"bench":"fault_latency","kind":"fault","case":"{case}","series":"{series}","samples":300,"min_us":{},"p50_us":{p50},"p90_us":{},"p99_us":{},"mean_us":{p50}}}"#,
                p50 * 0.9,
                p50 * 1.1,
                p50 * 1.5
            ) + "\n"
        })
        .collect()
}

/// SAMPLE: `migrate`'s summary, the H100 main-job figures of BENCHMARKS.md.
fn sample_migrate(page: &str, gbps: f64) -> String {
    format!(
        "backend cuda (SAMPLE GPU), 3 pagemaps, page size {page}, 262144 pages (1024 MiB) -> pagemap 0, coalesce BySource
copy calls issued: 3
moved 1024.0 MiB in 0.039 s: {gbps:.2} GB/s (plan 7.70 ms, map 3.50 ms, issue 1.90 ms, wait 6.30 ms, commit 15.30 ms)
data verified (read back through the CPU path)
"
    )
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("drm-pagemap-plots-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn count(svg: &str, what: &str) -> usize {
    svg.matches(what).count()
}

#[test]
fn copy_rows_become_points_with_their_rates() {
    let r = parse_jsonl("sample.jsonl", &sample_copy_jsonl()).unwrap();
    // 5 methods x 3 sizes x 2 directions + 2 x 3 device-to-device; mixed and crossover dropped.
    assert_eq!(r.copies.len(), 36);
    assert_eq!(r.copy_machine.as_deref(), Some("SAMPLE GPU, driver 0.0"));
    let p = r
        .copies
        .iter()
        .find(|p| {
            p.direction == CopyDirection::DeviceToHost
                && p.page_size == 4096
                && p.method == "managed-prefetch"
        })
        .unwrap();
    assert!((p.device_gbps - 10.0).abs() < 1e-9, "{}", p.device_gbps);
    assert_eq!(p.issue_gbps, None);
    let d2d: Vec<_> = r
        .copies
        .iter()
        .filter(|p| p.direction == CopyDirection::DeviceToDevice)
        .map(|p| p.method.as_str())
        .collect();
    assert_eq!(d2d.iter().filter(|m| **m == "ours").count(), 3);
    assert_eq!(d2d.iter().filter(|m| **m == "contiguous").count(), 3);
    let ours = r.copies.iter().find(|p| p.method == "ours").unwrap();
    assert!((ours.issue_gbps.unwrap() - 50.5 * 0.9).abs() < 1e-9);
}

#[test]
fn copy_charts_draw_every_point_and_name_every_method() {
    let r = parse_jsonl("sample.jsonl", &sample_copy_jsonl()).unwrap();
    let charts = render_all(&r, None).unwrap();
    let names: Vec<&str> = charts.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["copy-h2d.svg", "copy-d2h.svg", "copy-d2d.svg"]);
    let h2d = &charts[0].1;
    assert!(h2d.starts_with("<svg"), "{}", &h2d[..40]);
    // 15 points plus one marker per solid legend entry (5 methods).
    assert_eq!(count(h2d, "<circle"), 20);
    for label in [
        "ours: one backend call, scattered pages",
        "one contiguous cuMemcpyAsync",
        "cuMemcpyAsync per page",
        "cuMemcpyBatchAsync, a copy per page",
        "managed memory, cuMemPrefetchAsync",
        "ours, including the CPU&apos;s issue time",
        "4 KiB",
        "64 KiB",
        "2 MiB",
        "Host -&gt; device copies",
        "SAMPLE GPU, driver 0.0",
    ] {
        assert!(h2d.contains(label), "copy-h2d.svg lacks {label:?}");
    }
    // Device to device: two methods, 6 points + 2 legend markers.
    assert_eq!(count(&charts[2].1, "<circle"), 8);
    assert!(!charts[2].1.contains("managed memory"));
}

#[test]
fn svm_latency_table_is_read_with_its_targets() {
    let runs = parse_svm_latency(&sample_svm_text(13.0), "bin-1");
    assert_eq!(runs.len(), 4);
    assert_eq!(runs[0].chart, "fault-latency-svm-cuda");
    assert_eq!(runs[0].case, "2 MiB, 512x4K");
    assert_eq!(runs[2].case, "64 KiB, 16x4K");
    assert_eq!(
        (
            runs[2].min_us,
            runs[2].p50_us,
            runs[2].p90_us,
            runs[2].p99_us
        ),
        (11.0, 13.0, 14.1, Some(19.9))
    );
    assert_eq!(runs[2].target_us, Some(15.0));
    assert_eq!(runs[3].series, "bin-1");
    // The breakdown table below it is not read as more rows.
    assert!(parse_svm_latency("no table here\n", "x").is_empty());
}

#[test]
fn latency_chart_has_a_mark_per_run_and_the_targets() {
    let mut runs = parse_svm_latency(&sample_svm_text(13.0), "run 1");
    runs.extend(parse_svm_latency(&sample_svm_text(12.2), "run 2"));
    let r = drm_pagemap_plots::model::Results {
        latency: runs,
        ..Default::default()
    };
    let charts = render_all(&r, Some("SAMPLE machine")).unwrap();
    assert_eq!(charts.len(), 1);
    let (name, svg) = &charts[0];
    assert_eq!(name, "fault-latency-svm-cuda.svg");
    // 4 cases x 2 runs medians + 2 legend markers (the target entry is dashed, no marker).
    assert_eq!(count(svg, "<circle"), 10);
    for label in [
        "2 MiB, 512x4K",
        "64 KiB, 1x64K",
        "run 1",
        "run 2",
        "target",
        "SAMPLE machine",
    ] {
        assert!(svg.contains(label), "latency chart lacks {label:?}");
    }
}

#[test]
fn fault_latency_records_chart_every_series() {
    let r = parse_jsonl("fl.jsonl", &sample_fault_jsonl()).unwrap();
    assert_eq!(r.latency.len(), 5);
    let charts = render_all(&r, None).unwrap();
    assert_eq!(charts[0].0, "fault-latency-backend-cuda.svg");
    // 5 medians + 3 series in the legend.
    assert_eq!(count(&charts[0].1, "<circle"), 8);
    assert!(charts[0].1.contains("cuMemcpyAsync + event"));
}

#[test]
fn migrate_summary_gives_backend_page_size_and_rate() {
    let r = parse_migrate(&sample_migrate("64 KiB", 117.0)).unwrap();
    assert_eq!(
        (r.backend.as_str(), r.page_size, r.gbps),
        ("cuda", 65536, 117.0)
    );
    // A failed migration has no "moved" line: no point.
    let failed = "backend sim (x), 3 pagemaps, page size 4 KiB, 1 pages (0 MiB) -> pagemap 0, coalesce BySource\nmigration failed: copy\n";
    assert_eq!(parse_migrate(failed), None);
}

#[test]
fn a_directory_becomes_svg_files_and_regenerates_identically() {
    let data = temp_dir("data");
    let out = temp_dir("out");
    std::fs::write(data.join("machine.txt"), "SAMPLE machine\n").unwrap();
    std::fs::write(data.join("cuda_copy.jsonl"), sample_copy_jsonl()).unwrap();
    std::fs::write(data.join("fault_latency.jsonl"), sample_fault_jsonl()).unwrap();
    std::fs::write(data.join("svm-latency-1.txt"), sample_svm_text(13.0)).unwrap();
    for (i, (page, g)) in [("4 KiB", 27.3), ("64 KiB", 117.0), ("2 MiB", 143.0)]
        .into_iter()
        .enumerate()
    {
        std::fs::write(
            data.join(format!("migrate-{i}.txt")),
            sample_migrate(page, g),
        )
        .unwrap();
    }
    std::fs::write(data.join("notes.md"), "ignored").unwrap();
    let (results, machine) = read_dir(&data).unwrap();
    assert_eq!(machine.as_deref(), Some("SAMPLE machine"));
    assert_eq!(results.main_job.len(), 3);
    let written = generate(&data, &out).unwrap();
    let mut names: Vec<String> = written
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "copy-d2d.svg",
            "copy-d2h.svg",
            "copy-h2d.svg",
            "fault-latency-backend-cuda.svg",
            "fault-latency-svm-cuda.svg",
            "main-job-cuda.svg"
        ]
    );
    let main = std::fs::read_to_string(out.join("main-job-cuda.svg")).unwrap();
    assert!(
        main.contains(" 117\n") && main.contains(" 143\n"),
        "medians written"
    );
    let first: Vec<Vec<u8>> = written.iter().map(|p| std::fs::read(p).unwrap()).collect();
    generate(&data, &out).unwrap();
    let second: Vec<Vec<u8>> = written.iter().map(|p| std::fs::read(p).unwrap()).collect();
    assert_eq!(first, second, "the output depends only on the input");
    // To look at the sample charts: PLOTS_SAMPLE_OUT=/some/dir cargo test -p drm-pagemap-plots
    if let Some(keep) = std::env::var_os("PLOTS_SAMPLE_OUT") {
        generate(&data, std::path::Path::new(&keep)).unwrap();
    }
    std::fs::remove_dir_all(&data).unwrap();
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn malformed_files_are_errors_that_name_the_line() {
    let bad = "{\"bench\":\"cuda_copy\",\"kind\":\"meta\",\"gpu\":\"x\"}\n\nnot json\n";
    match parse_jsonl("f.jsonl", bad) {
        Err(ParseError::Json { file, line, .. }) => {
            assert_eq!((file.as_str(), line), ("f.jsonl", 3))
        }
        other => panic!("{other:?}"),
    }
    let missing = r#"{"bench":"cuda_copy","kind":"row","group":"h2d-4k","row":"ours","bytes":1}"#;
    let e = parse_jsonl("f.jsonl", missing).unwrap_err();
    assert!(
        matches!(
            e,
            ParseError::Field {
                field: "device_s",
                line: 1,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("f.jsonl:1"), "{e}");
    let dir = temp_dir("missing").join("nope");
    assert!(matches!(read_dir(&dir), Err(Error::Io { .. })));
}

#[test]
fn sizes_parse_and_print_as_the_report_writes_them() {
    for (t, b) in [
        ("4 KiB", 4096),
        ("64k", 65536),
        ("2M", 2 << 20),
        ("2 MiB", 2 << 20),
        ("512", 512),
    ] {
        assert_eq!(parse_size(t), Some(b), "{t}");
    }
    assert_eq!(parse_size("4 parsecs"), None);
    assert_eq!(parse_size("99999999999999999999k"), None);
    assert_eq!(size_label(4096), "4 KiB");
    assert_eq!(size_label(2 << 20), "2 MiB");
    assert_eq!(size_label(1 << 30), "1 GiB");
}
