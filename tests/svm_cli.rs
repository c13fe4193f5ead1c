//! The `svm-multi-device` tool's interface: `--help` (exit 0), bad arguments (exit 2, one
//! line on stderr), the `latency` table that `backends/cuda/ab-run.sh` keeps (its header and
//! one row per case), `--stats`. Runs the example binary `cargo test` builds, on sim.

use std::path::PathBuf;
use std::process::Command;

fn bin() -> PathBuf {
    // target/<profile>/deps/<this test> -> target/<profile>/examples/svm-multi-device
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target profile dir");
    let bin = dir
        .join("examples")
        .join(format!("svm-multi-device{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} is missing: `cargo test --workspace` (or `cargo build --examples`) builds it",
        bin.display()
    );
    bin
}

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin()).args(args).output().expect("run");
    (
        out.status.code().expect("exit code"),
        String::from_utf8(out.stdout).expect("utf-8 stdout"),
        String::from_utf8(out.stderr).expect("utf-8 stderr"),
    )
}

#[test]
fn help_exits_0() {
    for args in [&["--help"][..], &["-h"], &["latency", "--help"]] {
        let (code, out, err) = run(args);
        assert_eq!(code, 0, "{args:?}: {err}");
        assert!(out.contains("--backend"), "{args:?}: {out}");
    }
}

#[test]
fn bad_arguments_exit_2_with_one_line() {
    for args in [
        &["--mib", "5"][..],
        &["--mib", "7"],
        &["--mib", "99999999999999999999"],
        &["--rounds"],
        &["--rounds", "-1"],
        &["--capacity-mib", "0"],
        &["--bogus"],
        &["sideways"],
        &["latency", "--iters", "x"],
        &["latency", "--iters", "18446744073709551615"],
    ] {
        let (code, out, err) = run(args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(out.is_empty(), "{args:?} printed {out}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("svm-multi-device: "), "{err}");
    }
}

#[test]
fn latency_table_keeps_its_format() {
    // `--backend` after the subcommand, as before.
    let (code, out, err) = run(&["latency", "--iters", "2", "--backend", "sim"]);
    assert_eq!(code, 0, "{out} {err}");
    let lines: Vec<&str> = out.lines().collect();
    let header = lines
        .iter()
        .position(|l| l.starts_with("range    pages     count"))
        .unwrap_or_else(|| panic!("no header: {out}"));
    assert_eq!(
        lines[header].split_whitespace().collect::<Vec<_>>(),
        [
            "range", "pages", "count", "min", "us", "median", "us", "p90", "us", "p99", "us",
            "mean", "us", "resident", "us", "target", "us"
        ]
    );
    let rows: Vec<Vec<&str>> = lines[header + 1..header + 5]
        .iter()
        .map(|l| l.split_whitespace().collect())
        .collect();
    // "2 MiB" is two words: range, pages, count, then the times.
    let cases: Vec<(String, &str)> = rows
        .iter()
        .map(|r| (format!("{} {}", r[0], r[1]), r[2]))
        .collect();
    assert_eq!(
        cases
            .iter()
            .map(|c| (c.0.as_str(), c.1))
            .collect::<Vec<_>>(),
        [
            ("2 MiB", "512x4K"),
            ("2 MiB", "1x2M"),
            ("64 KiB", "16x4K"),
            ("64 KiB", "1x64K")
        ]
    );
    for r in &rows {
        assert_eq!(r.len(), 11, "{r:?}");
        assert_eq!(r[3], "2", "{r:?}");
        for t in &r[4..] {
            assert!(t.parse::<f64>().is_ok(), "{r:?}");
        }
    }
    assert!(!out.contains("FAILED"), "{out}");
}

#[test]
fn stats_prints_the_address_space_tables() {
    let (code, out, err) = run(&["--backend", "sim", "--mib", "6", "--rounds", "1", "--stats"]);
    assert_eq!(code, 0, "{out} {err}");
    let at = out
        .find("== statistics: the address space ==")
        .unwrap_or_else(|| panic!("no statistics: {out}"));
    let table = &out[at..];
    // Three 2 MiB ranges faulted to each device in turn: system -> pagemap 0 moved them first.
    let row = table
        .lines()
        .find(|l| l.starts_with("system -> pagemap 0"))
        .unwrap_or_else(|| panic!("no system -> pagemap 0 row: {table}"));
    let cols: Vec<&str> = row["system -> pagemap 0".len()..]
        .split_whitespace()
        .collect();
    let pages: u64 = cols[1].parse().expect("pages");
    assert!(pages >= 3 * 512, "{row}");
    assert!(table.contains("failures 0:"), "{table}");
}

/// The link rows of the statistics table (`from -> to`, calls, pages, bytes), device time
/// left out.
fn link_rows(out: &str) -> Vec<String> {
    out.lines()
        .filter(|l| l.starts_with("system ->") || (l.starts_with("pagemap ") && l.contains("->")))
        .map(|l| l.split_whitespace().take(7).collect::<Vec<_>>().join(" "))
        .collect()
}

#[test]
fn pointers_run_the_same_workload_and_verify_through_the_pointer() {
    for extra in [&[][..], &["--capacity-mib", "4"]] {
        let args = [
            &["--backend", "sim", "--mib", "6", "--rounds", "1", "--stats"],
            extra,
        ]
        .concat();
        let (code, out, err) = run(&[&args[..], &["--pointers"]].concat());
        if code == 1
            && (err.contains("userfaultfd unavailable") || err.contains("userfaultfd lacks"))
        {
            println!("skipped: {}", err.trim());
            return;
        }
        assert_eq!(code, 0, "{extra:?}: {out} {err}");
        assert!(out.contains("buffer 6 MiB (through its pointer)"), "{out}");
        assert!(
            out.contains("verification: every byte and page table checked, OK"),
            "{out}"
        );
        let (code, plain, err) = run(&args);
        assert_eq!(code, 0, "{plain} {err}");
        if extra.is_empty() {
            // The buffer is 2 MiB aligned like BASE: the same migrations, page for page.
            assert!(!link_rows(&out).is_empty(), "{out}");
            assert_eq!(link_rows(&out), link_rows(&plain), "{out}\n{plain}");
        }
    }
}

#[test]
fn pointers_on_a_backend_without_them_is_one_line_and_exit_1() {
    let (code, out, err) = run(&["--backend", "level-zero", "--pointers"]);
    assert_eq!(code, 1, "{err}");
    assert!(out.is_empty(), "{out}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(
            "svm-multi-device: --pointers: pointer ranges unsupported on backend level-zero: "
        ),
        "{err}"
    );
}

/// CUDA gives pointer ranges (the tool opens it with `cuda.host_memfd=1`): without a GPU,
/// one line saying why the backend could not be opened and exit 1; with one, the run passes.
#[test]
fn pointers_on_cuda_run_or_say_why_the_backend_is_unavailable() {
    let (code, out, err) = run(&["--backend", "cuda", "--pointers"]);
    if drm_pagemap::cuda::probe().is_ok() {
        assert_eq!(code, 0, "{out}\n{err}");
        assert!(out.contains("OK"), "{out}");
    } else {
        assert_eq!(code, 1, "{err}");
        assert!(out.is_empty(), "{out}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.starts_with("svm-multi-device: --pointers: backend cuda: "),
            "{err}"
        );
    }
}

#[test]
fn pointers_with_latency_is_a_bad_argument() {
    let (code, out, err) = run(&["--backend", "sim", "--pointers", "latency"]);
    assert_eq!(code, 2, "{err}");
    assert!(out.is_empty(), "{out}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("svm-multi-device: --pointers: "), "{err}");
}
