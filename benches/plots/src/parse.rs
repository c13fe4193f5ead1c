//! Readers of the benches' output: JSON lines (`cuda_copy`, `fault_latency`) and the text
//! the examples print (`svm-multi-device latency`'s table, `migrate`'s summary).

use crate::model::{
    CopyDirection, CopyPoint, LatencyRun, MainJobRun, Results, parse_size, size_label,
};
use serde_json::Value;

/// What went wrong reading a results file.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// A line of a JSON lines file is not a JSON object.
    #[error("{file}:{line}: not a JSON object: {reason}")]
    Json {
        /// The file.
        file: String,
        /// The 1-based line number.
        line: usize,
        /// serde_json's message.
        reason: String,
    },
    /// A record lacks a field the plots need, or has it of the wrong type.
    #[error(
        "{file}:{line}: record of bench `{bench}` lacks field `{field}` (or it has the wrong type)"
    )]
    Field {
        /// The file.
        file: String,
        /// The 1-based line number.
        line: usize,
        /// The record's `bench`.
        bench: String,
        /// The field.
        field: &'static str,
    },
}

fn num(v: &Value, key: &str) -> Option<f64> {
    v.get(key)?.as_f64()
}

/// Reads a JSON lines results file (one object per line, each with a `"bench"` field; blank
/// lines are skipped, records of benches or kinds the plots do not use are ignored).
///
/// Records read:
/// - `{"bench":"cuda_copy","kind":"meta","gpu":S,"driver":S}`: the machine;
/// - `{"bench":"cuda_copy","kind":"row","group":"h2d-4k","row":"ours","bytes":N,
///   "device_s":F,"issue_s":F|null}`: a copy row; groups `h2d-*`, `d2h-*` and `p2p-*`
///   (pagemap to pagemap on one GPU, drawn as device -> device) with a page size `4k`,
///   `64k` or `2m`; the row `ours-push` of `p2p` is drawn as `ours`, `d2d-contiguous` as
///   `contiguous`;
/// - `{"bench":"fault_latency","kind":"fault"|"floor","case":S,"series":S,"min_us":F,
///   "p50_us":F,"p90_us":F,"p99_us":F}`: a latency distribution of the backend-level
///   fault bench (`series`: the clear policy, or the floor's API).
pub fn parse_jsonl(file: &str, text: &str) -> Result<Results, ParseError> {
    let mut out = Results::default();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line).map_err(|e| ParseError::Json {
            file: file.to_string(),
            line: i + 1,
            reason: e.to_string(),
        })?;
        let bench = v.get("bench").and_then(Value::as_str).unwrap_or("");
        let kind = v.get("kind").and_then(Value::as_str).unwrap_or("");
        let missing = |field| ParseError::Field {
            file: file.to_string(),
            line: i + 1,
            bench: bench.to_string(),
            field,
        };
        match (bench, kind) {
            ("cuda_copy", "meta") => {
                let gpu = v.get("gpu").and_then(Value::as_str).unwrap_or("?");
                let driver = v.get("driver").and_then(Value::as_str);
                out.copy_machine = Some(match driver {
                    Some(d) => format!("{gpu}, driver {d}"),
                    None => gpu.to_string(),
                });
            }
            ("cuda_copy", "row") => {
                let group = v
                    .get("group")
                    .and_then(Value::as_str)
                    .ok_or(missing("group"))?;
                let row = v.get("row").and_then(Value::as_str).ok_or(missing("row"))?;
                let Some((dir, size)) = group.split_once('-') else {
                    continue;
                };
                let direction = match dir {
                    "h2d" => CopyDirection::HostToDevice,
                    "d2h" => CopyDirection::DeviceToHost,
                    "p2p" => CopyDirection::DeviceToDevice,
                    _ => continue, // mixed layouts, crossover: not plotted
                };
                let Some(page_size) = parse_size(size) else {
                    continue;
                };
                let bytes = num(&v, "bytes").ok_or(missing("bytes"))?;
                let device_s = num(&v, "device_s").ok_or(missing("device_s"))?;
                let method = match row {
                    "ours-push" => "ours",
                    "d2d-contiguous" => "contiguous",
                    r => r,
                };
                let gbps = |s: f64| (s > 0.0).then(|| bytes / s / 1e9);
                let Some(device_gbps) = gbps(device_s) else {
                    continue;
                };
                out.copies.push(CopyPoint {
                    direction,
                    page_size,
                    method: method.to_string(),
                    device_gbps,
                    issue_gbps: num(&v, "issue_s").and_then(gbps),
                });
            }
            ("fault_latency", "fault" | "floor") => {
                let case = v
                    .get("case")
                    .and_then(Value::as_str)
                    .ok_or(missing("case"))?;
                let series = v
                    .get("series")
                    .and_then(Value::as_str)
                    .ok_or(missing("series"))?;
                out.latency.push(LatencyRun {
                    chart: "fault-latency-backend-cuda".into(),
                    title: "Fault latency, CUDA backend alone (allocate, copy, fence)".into(),
                    case: case.to_string(),
                    series: series.to_string(),
                    min_us: num(&v, "min_us").ok_or(missing("min_us"))?,
                    p50_us: num(&v, "p50_us").ok_or(missing("p50_us"))?,
                    p90_us: num(&v, "p90_us").ok_or(missing("p90_us"))?,
                    p99_us: num(&v, "p99_us"),
                    target_us: None,
                });
            }
            _ => {}
        }
    }
    Ok(out)
}

/// Reads the table `svm-multi-device latency` prints (its text output, unchanged since the
/// example was written): the backend from the first line (`backend NAME (...)`), then the rows
/// under the header that names `median us`, `p90 us` and `p99 us`:
/// `RANGE UNIT PAGES COUNT MIN MEDIAN P90 P99 MEAN RESIDENT TARGET`.
/// `series` names the build or run (e.g. the file's name); returns nothing if the text has
/// no such table.
pub fn parse_svm_latency(text: &str, series: &str) -> Vec<LatencyRun> {
    let mut backend = None;
    let mut in_table = false;
    let mut out = Vec::new();
    for line in text.lines() {
        if backend.is_none()
            && let Some(rest) = line.strip_prefix("backend ")
        {
            backend = rest.split_whitespace().next().map(str::to_string);
            continue;
        }
        if line.contains("median us") && line.contains("p99 us") {
            in_table = true;
            continue;
        }
        if !in_table {
            continue;
        }
        let t: Vec<&str> = line.split_whitespace().collect();
        if t.len() != 11 {
            break;
        }
        let nums: Option<Vec<f64>> = t[3..].iter().map(|x| x.parse().ok()).collect();
        let (Some(nums), Some(range)) = (nums, parse_size(&format!("{}{}", t[0], t[1]))) else {
            break;
        };
        let b = backend.clone().unwrap_or_else(|| "unknown".into());
        out.push(LatencyRun {
            chart: format!("fault-latency-svm-{b}"),
            title: format!("GPU fault -> migrate -> page table (xe-svm), backend {b}"),
            case: format!("{}, {}", size_label(range), t[2]),
            series: series.to_string(),
            min_us: nums[1],
            p50_us: nums[2],
            p90_us: nums[3],
            p99_us: Some(nums[4]),
            target_us: Some(nums[7]).filter(|&x| x > 0.0),
        });
    }
    out
}

/// Reads `migrate`'s text summary: the backend and page size from its first line
/// (`backend NAME (...), N pagemaps, page size 4 KiB, ...`) and the throughput from the line
/// `moved X MiB in Y s: Z GB/s (...)`. `None` when either is missing (a failed migration).
pub fn parse_migrate(text: &str) -> Option<MainJobRun> {
    let mut backend = None;
    let mut page_size = None;
    let mut gbps = None;
    for line in text.lines() {
        if backend.is_none()
            && let Some(rest) = line.strip_prefix("backend ")
        {
            backend = rest.split_whitespace().next().map(str::to_string);
            page_size = line
                .split(", ")
                .find_map(|p| p.strip_prefix("page size "))
                .and_then(parse_size);
        }
        if let Some(rest) = line.strip_prefix("moved ") {
            gbps = rest
                .split_once(": ")
                .and_then(|(_, r)| r.split_whitespace().next())
                .and_then(|x| x.parse::<f64>().ok());
        }
    }
    Some(MainJobRun {
        backend: backend?,
        page_size: page_size?,
        gbps: gbps?,
    })
}
