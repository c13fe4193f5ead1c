//! The `migrate` tool's interface, which other tooling reads: the exact JSON of the issue's
//! example in both coalescing modes (the fields of before the statistics byte for byte, then
//! `"stats"`), a failed copy (exit 1, data verified), bad arguments (exit 2, one line on
//! stderr), `--help` (exit 0), `--stats`. Runs the example binary `cargo test` builds, on
//! sim; and on level-zero (the software driver through the real loader) every layout below
//! gives sim's answer, statistics included.

use std::path::PathBuf;
use std::process::Command;

fn migrate_bin() -> PathBuf {
    // target/<profile>/deps/<this test> -> target/<profile>/examples/migrate
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target profile dir");
    let bin = dir
        .join("examples")
        .join(format!("migrate{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} is missing: `cargo test --workspace` (or `cargo build --example migrate`) builds it",
        bin.display()
    );
    bin
}

/// Splits a `--json` line into the line without its `"stats"` field (the last one) and the
/// statistics.
fn split_stats(line: &str) -> (String, serde_json::Value) {
    let line = line.trim();
    let at = line
        .find(r#","stats":{"#)
        .unwrap_or_else(|| panic!("no \"stats\" in {line}"));
    let stats = serde_json::from_str(&line[at + r#","stats":"#.len()..line.len() - 1])
        .unwrap_or_else(|e| panic!("stats of {line}: {e}"));
    (format!("{}}}", &line[..at]), stats)
}

/// The links of a `"stats"` field: (from, to, pages, bytes, calls), device time left out.
fn links(stats: &serde_json::Value) -> Vec<(String, String, u64, u64, u64)> {
    stats["links"]
        .as_array()
        .expect("links")
        .iter()
        .map(|l| {
            assert!(l["device_time_ns"].is_u64(), "{l}");
            (
                l["from"].to_string(),
                l["to"].to_string(),
                l["pages"].as_u64().unwrap(),
                l["bytes"].as_u64().unwrap(),
                l["calls"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn run(args: &[&str]) -> (i32, String, String) {
    run_on("sim", args)
}

fn run_on(backend: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(migrate_bin())
        .args(["--backend", backend])
        .args(args)
        .output()
        .expect("run migrate");
    (
        out.status.code().expect("exit code"),
        String::from_utf8(out.stdout).expect("utf-8 stdout"),
        String::from_utf8(out.stderr).expect("utf-8 stderr"),
    )
}

#[test]
fn issue_example_by_source() {
    let (code, out, _) = run(&[
        "--devices",
        "3",
        "--layout",
        "ss00s11s0",
        "--to",
        "2",
        "--json",
    ]);
    assert_eq!(code, 0);
    let (line, stats) = split_stats(&out);
    assert_eq!(
        line,
        r#"{"result":"ok","error":null,"copies":[{"executor":2,"op":"copy_to_devmem","pages":4},{"executor":0,"op":"copy_to_ram","pages":3},{"executor":1,"op":"copy_to_ram","pages":2}],"layout_before":"ss00s11s0","layout_after":"2*9","verified":true}"#
    );
    // The statistics of the migration alone (placing the layout is not counted): one call
    // per link, the pages and bytes of the copies above.
    let p = |k: u64| format!(r#"{{"pagemap":{k}}}"#);
    let sys = || r#""system""#.to_string();
    assert_eq!(
        links(&stats),
        vec![
            (sys(), p(2), 4, 4 * 4096, 1),
            (p(0), p(2), 3, 3 * 4096, 1),
            (p(1), p(2), 2, 2 * 4096, 1),
        ]
    );
    assert_eq!(
        stats["page_sizes"],
        serde_json::json!([{"page_size":4096,"bytes":9*4096,"pages":9,"calls":3}])
    );
    assert_eq!(stats["migrations"], 1);
    assert_eq!(stats["copies_in_flight"], 0);
    let buckets = stats["call_bytes"]["buckets"].as_array().unwrap();
    assert_eq!(buckets.len(), 64);
    // 16 KiB, 12 KiB and 8 KiB: floor(log2) 14, 13, 13.
    assert_eq!(
        (buckets[13].as_u64(), buckets[14].as_u64()),
        (Some(2), Some(1))
    );
    let in_use: Vec<(u64, u64)> = stats["pagemaps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["pagemap"].as_u64().unwrap(),
                p["used_bytes"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(in_use, vec![(0, 0), (1, 0), (2, 9 * 4096)]);
    assert_eq!(stats["failures"]["busy_fragmentation"], 0);
}

#[test]
fn issue_example_consecutive() {
    let (code, out, _) = run(&[
        "--devices",
        "3",
        "--layout",
        "ss00s11s0",
        "--to",
        "2",
        "--coalesce",
        "consecutive",
        "--json",
    ]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON line");
    let calls: Vec<(u64, String, u64)> = v["copies"]
        .as_array()
        .expect("copies")
        .iter()
        .map(|c| {
            (
                c["executor"].as_u64().unwrap(),
                c["op"].as_str().unwrap().to_string(),
                c["pages"].as_u64().unwrap(),
            )
        })
        .collect();
    let d = || "copy_to_devmem".to_string();
    let r = || "copy_to_ram".to_string();
    assert_eq!(
        calls,
        vec![
            (2, d(), 2),
            (0, r(), 2),
            (2, d(), 1),
            (1, r(), 2),
            (2, d(), 1),
            (0, r(), 1)
        ]
    );
}

#[test]
fn failed_copy_exits_1_with_data_verified_and_layout_unchanged() {
    let (code, out, _) = run(&[
        "--layout",
        "ss00s11s0",
        "--to",
        "2",
        "--fail-copy",
        "2",
        "--json",
    ]);
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON line");
    assert_eq!(v["result"], "error");
    assert!(
        v["error"].as_str().unwrap().contains("copy_to_ram"),
        "{out}"
    );
    assert_eq!(v["layout_before"], "ss00s11s0");
    assert_eq!(v["layout_after"], "ss00s11s0");
    assert_eq!(v["verified"], true);
    // Only the call issued before the failing one is listed.
    assert_eq!(v["copies"].as_array().unwrap().len(), 1);
    // Counted: the one failure, injected; no migration completed.
    let f = &v["stats"]["failures"];
    assert_eq!(f["injected"], 1, "{out}");
    assert_eq!(v["stats"]["migrations"], 0);
}

#[test]
fn help_exits_0_and_explains_layouts() {
    for flag in ["--help", "-h"] {
        let (code, out, err) = run(&[flag]);
        assert_eq!(code, 0, "{flag}: {err}");
        assert!(out.contains("--layout"), "{flag}: {out}");
        assert!(out.contains("Layouts"), "{flag}: {out}");
        assert!(out.contains("x*N"), "{flag}: {out}");
        assert!(err.is_empty(), "{flag}: {err}");
    }
}

#[test]
fn stats_prints_tables_and_json_stays_one_line() {
    let base = ["--devices", "3", "--layout", "ss00s11s0", "--to", "2"];
    let (code, out, _) = run(&[&base[..], &["--stats"]].concat());
    assert_eq!(code, 0, "{out}");
    let table: Vec<&str> = out
        .lines()
        .skip_while(|l| !l.contains("statistics"))
        .collect();
    assert!(!table.is_empty(), "{out}");
    for want in [
        "system -> pagemap 2",
        "pagemap 0 -> pagemap 2",
        "pagemap 1 -> pagemap 2",
    ] {
        let row = table
            .iter()
            .find(|l| l.starts_with(want))
            .unwrap_or_else(|| panic!("no row {want}: {out}"));
        // calls, pages: 1 call each; 4, 3, 2 pages.
        let cols: Vec<&str> = row[want.len()..].split_whitespace().collect();
        assert_eq!(cols[0], "1", "{row}");
    }
    // With --json the statistics are in the line, not printed.
    let (code, out, _) = run(&[&base[..], &["--stats", "--json"]].concat());
    assert_eq!(code, 0);
    assert_eq!(out.trim().lines().count(), 1, "{out}");
    split_stats(&out);
}

#[test]
fn bad_arguments_exit_2_with_one_line() {
    for args in [
        &["--layout", "s9"][..],
        &["--layout", "sx"],
        &["--to", "3"],
        &["--page-size", "1000"],
        &["--coalesce", "sideways"],
        &["--fail-copy", "0"],
        &["--foreign", "7"],
        &["--devices"],
        &["--bogus"],
        // Backend options: syntax, unknown keys, bad values (of any backend), no value.
        &["--option", "novalue"],
        &["--option", "sim.bogus=1"],
        &["--option=sim.copy_latency=fast"],
        &["--option", "cuda.vmm=maybe"],
        &["--option", "nope.x=1"],
        &["--option"],
    ] {
        let (code, out, err) = run(args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(out.is_empty(), "{args:?} printed {out}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("migrate: "), "{err}");
    }
}

#[test]
fn options_reach_the_backend() {
    // sim.owner_groups puts device 2 in a group of its own: pagemap 2 may not take the pages
    // of pagemaps 0 and 1 (another owner), which it can without the option.
    let base = ["--layout", "0s1", "--to", "2", "--json"];
    let (code, out, _) = run(&base);
    assert_eq!(code, 0, "{out}");
    let (code, out, err) = run(&[&base[..], &["--option", "sim.owner_groups=0,0,1"]].concat());
    assert_eq!(code, 1, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON line");
    assert!(
        v["error"].as_str().unwrap().contains("another owner"),
        "{out}"
    );
    assert_eq!(v["verified"], true);
    // Repeatable, the last value of a key wins; `--option=K=V` works too.
    let (code, out, err) = run(&[
        &base[..],
        &[
            "--option",
            "sim.owner_groups=0,0,1",
            "--option=sim.owner_groups=0,0,0",
            "--option",
            "sim.copy_latency=1ms",
        ],
    ]
    .concat());
    assert_eq!(code, 0, "{out} {err}");
}

#[test]
fn the_simulators_device_memory_is_resident_unless_an_option_says_otherwise() {
    // The tool makes the simulator's device memory resident where the machine has room (a
    // small layout's devices always fit), and says how long that took; `sim.resident=false`
    // keeps it backed on first write; a value that is not a boolean is a bad argument.
    let base = ["--backend", "sim", "--layout", "s1.2", "--to", "0"];
    let (code, out, err) = run(&base);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("verified: true"), "{out}");
    assert!(
        out.contains("device memory made resident at start-up in"),
        "{out}"
    );
    let (code, out, err) = run(&[&base[..], &["--option", "sim.resident=false"]].concat());
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("verified: true"), "{out}");
    assert!(!out.contains("resident"), "{out}");
    let (code, _, err) = run(&[&base[..], &["--option", "sim.resident=maybe"]].concat());
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("sim.resident"), "{err}");
}

#[test]
fn migration_buffers_are_kept_for_the_range_unless_asked_not_to() {
    // The tool keeps migration buffers for its range (AddressSpace::keep_buffers) after
    // building the layout and says so; --no-kept-buffers leaves the migration to make its
    // own; --json carries no new field either way.
    let base = ["--backend", "sim", "--layout", "s1.2s", "--to", "0"];
    let (code, out, err) = run(&base);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("verified: true"), "{out}");
    assert!(
        out.contains("migration buffers kept for 5 pages ("),
        "{out}"
    );
    let (code, out, err) = run(&[&base[..], &["--no-kept-buffers"]].concat());
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("verified: true"), "{out}");
    assert!(!out.contains("migration buffers"), "{out}");
    for extra in [&[][..], &["--no-kept-buffers"][..]] {
        let (code, out, err) = run(&[&base[..], &["--json"], extra].concat());
        assert_eq!(code, 0, "{out}\n{err}");
        assert!(!out.contains("kept"), "{out}");
    }
}

#[test]
fn foreign_owner_is_busy_with_nothing_moved() {
    let (code, out, _) = run(&["--layout", "0s1", "--foreign", "1", "--json"]);
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON line");
    assert!(
        v["error"].as_str().unwrap().contains("another owner"),
        "{out}"
    );
    assert_eq!(v["copies"].as_array().unwrap().len(), 0);
    assert_eq!(v["layout_after"], "0s1");
    assert_eq!(v["verified"], true);
}

/// A run's JSON without its error text (backends word their errors differently).
fn outcome(backend: &str, args: &[&str]) -> (i32, serde_json::Value) {
    let (code, out, err) = run_on(backend, args);
    let mut v: serde_json::Value = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("{backend} {args:?}: not one JSON line ({e}): {out} {err}"));
    assert_eq!(v["verified"], true, "{backend} {args:?}: {out}");
    let failed = !v["error"].is_null();
    v["error"] = failed.into();
    // The statistics that do not depend on timing: what moved where, the failures.
    let stats = v["stats"].take();
    v["stats"] = serde_json::json!({
        "links": format!("{:?}", links(&stats)),
        "page_sizes": stats["page_sizes"],
        "call_bytes": stats["call_bytes"],
        "migrations": stats["migrations"],
        "migrations_not_needed": stats["migrations_not_needed"],
        "failures": stats["failures"],
    });
    (code, v)
}

#[test]
fn level_zero_runs_every_layout_as_sim_does() {
    let (code, _, err) = run_on("level-zero", &["--layout", "0", "--json"]);
    if code == 1 && err.contains("unavailable") && err.contains("libze_loader") {
        println!("skipped: level-zero: {}", err.trim());
        return;
    }
    assert_eq!(code, 0, "{err}");
    let cases: &[&[&str]] = &[
        &["--devices", "3", "--layout", "ss00s11s0", "--to", "2"],
        &[
            "--layout",
            "ss00s11s0",
            "--to",
            "2",
            "--coalesce",
            "consecutive",
        ],
        &[
            "--layout",
            "ss00s11s0",
            "--to",
            "2",
            "--no-source-peer-migrates",
        ],
        &["--layout", "s.0.1.2", "--to", "1"],
        &["--layout", "s.0.1.2", "--to", "1", "--same-pagemap"],
        &["--layout", "....", "--to", "1"],
        &["--layout", "0000", "--to", "0"],
        &["--layout", "0s1", "--foreign", "1"],
        &["--layout", "s0s1s2", "--page-size", "65536"],
        &["--layout", "s1s2.1", "--page-size", "2097152", "--to", "2"],
        &["--devices", "5", "--layout", "s01234s", "--to", "4"],
        &["--layout", "ss00s11s0", "--to", "2", "--fail-copy", "1"],
        &["--layout", "ss00s11s0", "--to", "2", "--fail-copy", "2"],
    ];
    for args in cases {
        let args = [*args, &["--json"]].concat();
        let sim = outcome("sim", &args);
        let l0 = outcome("level-zero", &args);
        assert_eq!(l0, sim, "{args:?}: level-zero (left) and sim differ");
        if args.contains(&"--fail-copy") {
            assert_eq!(l0.0, 1, "{args:?}");
            assert_eq!(l0.1["layout_after"], l0.1["layout_before"], "{args:?}");
        }
    }
}

/// Whether `--pointers` could not run because this system has no usable userfaultfd (then
/// the test prints one `skipped:` line).
fn no_userfaultfd(code: i32, err: &str) -> bool {
    let unavailable = code == 1
        && err.starts_with("migrate: --pointers: ")
        && (err.contains("userfaultfd unavailable") || err.contains("userfaultfd lacks"));
    if unavailable {
        println!("skipped: {}", err.trim());
    }
    unavailable
}

#[test]
fn pointers_give_the_explicit_apis_answer_on_every_layout() {
    let (code, _, err) = run(&["--pointers", "--layout", "s0", "--to", "1", "--json"]);
    if no_userfaultfd(code, &err) {
        return;
    }
    assert_eq!(code, 0, "{err}");
    let cases: &[&[&str]] = &[
        &["--devices", "3", "--layout", "ss00s11s0", "--to", "2"],
        &[
            "--layout",
            "ss00s11s0",
            "--to",
            "2",
            "--coalesce",
            "consecutive",
        ],
        &["--layout", "s.0.1.2", "--to", "1"],
        &["--layout", "....", "--to", "1"],
        &["--layout", "0000", "--to", "0"],
        &["--layout", "s*100,.,0*50,2*3,.*7,1", "--to", "2"],
        &["--layout", "s0s1s2", "--page-size", "65536"],
        &["--layout", "s1s2.1", "--page-size", "2097152", "--to", "2"],
        &["--layout", "ss00s11s0", "--to", "2", "--fail-copy", "1"],
    ];
    for args in cases {
        let args = [*args, &["--json"]].concat();
        let explicit = outcome("sim", &args);
        let pointers = outcome("sim", &[&args[..], &["--pointers"]].concat());
        assert_eq!(
            pointers, explicit,
            "{args:?}: --pointers (left) and the explicit API differ"
        );
    }
}

#[test]
fn pointers_failed_copy_exits_1_with_data_verified_and_layout_unchanged() {
    let args = [
        "--pointers",
        "--layout",
        "ss00s11s0",
        "--to",
        "2",
        "--fail-copy",
        "2",
        "--json",
    ];
    let (code, out, err) = run(&args);
    if no_userfaultfd(code, &err) {
        return;
    }
    assert_eq!(code, 1, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON line");
    assert_eq!(v["result"], "error");
    assert!(
        v["error"].as_str().unwrap().contains("copy_to_ram"),
        "{out}"
    );
    assert_eq!(v["layout_before"], "ss00s11s0");
    assert_eq!(v["layout_after"], "ss00s11s0");
    // Loaded back through the pointer: the pages on devices faulted home.
    assert_eq!(v["verified"], true);
    assert_eq!(v["copies"].as_array().unwrap().len(), 1);
    assert_eq!(v["stats"]["failures"]["injected"], 1, "{out}");
    // The same JSON fields as without --pointers.
    let (_, plain, _) = run(&args[1..]);
    let plain: serde_json::Value = serde_json::from_str(plain.trim()).expect("one JSON line");
    let keys = |v: &serde_json::Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&v), keys(&plain));
}

#[test]
fn pointers_default_workload_verifies_through_the_pointer() {
    // The default workload, at most 32768 pages with --pointers: 128 MiB of 4 KiB pages in
    // runs of 16 over system memory and pagemaps 1 and 2 (2048 runs: 683, 683, 682), migrated
    // to pagemap 0.
    let (code, out, err) = run(&["--pointers"]);
    if no_userfaultfd(code, &err) {
        return;
    }
    assert_eq!(code, 0, "{out} {err}");
    assert!(
        out.lines()
            .next()
            .unwrap_or("")
            .contains("32768 pages (128 MiB) -> pagemap 0"),
        "{out}"
    );
    for (source, pages) in [
        ("system memory", 10928),
        ("pagemap 1", 10928),
        ("pagemap 2", 10912),
    ] {
        let row = out
            .lines()
            .find(|l| l.starts_with(source))
            .unwrap_or_else(|| panic!("no {source} row: {out}"));
        let cols: Vec<&str> = row[source.len()..].split_whitespace().collect();
        assert_eq!(cols[0], pages.to_string(), "{row}");
    }
    assert!(
        out.contains("data verified (loaded back through the range's pointer)"),
        "{out}"
    );
}

#[test]
fn pointers_on_a_backend_without_them_is_one_line_and_exit_1() {
    let (code, out, err) = run_on("level-zero", &["--pointers", "--layout", "s0"]);
    assert_eq!(code, 1, "{err}");
    assert!(out.is_empty(), "{out}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("migrate: --pointers: pointer ranges unsupported on backend level-zero: "),
        "{err}"
    );
}

/// CUDA gives pointer ranges (the tool opens it with `cuda.host_memfd=1`): without a GPU,
/// one line saying why the backend could not be opened and exit 1; with one, the pages
/// verify through the pointer.
#[test]
fn pointers_on_cuda_run_or_say_why_the_backend_is_unavailable() {
    let (code, out, err) = run_on("cuda", &["--pointers", "--layout", "s1,2s"]);
    if drm_pagemap::cuda::probe().is_ok() {
        assert_eq!(code, 0, "{out}\n{err}");
        assert!(out.contains("verified: true"), "{out}");
    } else {
        assert_eq!(code, 1, "{err}");
        assert!(out.is_empty(), "{out}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.starts_with("migrate: --pointers: backend cuda: "),
            "{err}"
        );
    }
}

/// `--release`: both modes move and verify the same data; the default (background) says
/// when the old pages were given back, `inline` gives them back before the call returns.
#[test]
fn release_modes_verify_and_background_reports_the_give_back() {
    let layout = [
        "--backend",
        "sim",
        "--layout",
        "s*3,1*20,2*7,s",
        "--to",
        "0",
    ];
    let (code, out, err) = run(&layout);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("verified: true"), "{out}");
    assert!(
        out.contains("after the call returned (--release background)"),
        "{out}"
    );
    let (code, out, err) = run(&[&layout[..], &["--release", "inline"]].concat());
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("verified: true"), "{out}");
    assert!(!out.contains("after the call returned"), "{out}");
    let (code, _, err) = run(&["--backend", "sim", "--release", "later"]);
    assert_eq!(code, 2, "{err}");
}
