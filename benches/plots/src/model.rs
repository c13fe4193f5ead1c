//! What the plots are drawn from: measurements read out of the benches' results files,
//! independent of the file they came from.

use std::fmt;

/// The direction of a copy measured by the CUDA copy bench.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CopyDirection {
    /// System memory to device memory.
    HostToDevice,
    /// Device memory to system memory (an eviction).
    DeviceToHost,
    /// Device memory to device memory on one GPU (pagemap to pagemap).
    DeviceToDevice,
}

impl CopyDirection {
    /// Every direction, in the order the report shows them.
    pub const ALL: [CopyDirection; 3] = [
        CopyDirection::HostToDevice,
        CopyDirection::DeviceToHost,
        CopyDirection::DeviceToDevice,
    ];

    /// The short name used in file names: `h2d`, `d2h`, `d2d`.
    pub fn short(self) -> &'static str {
        match self {
            CopyDirection::HostToDevice => "h2d",
            CopyDirection::DeviceToHost => "d2h",
            CopyDirection::DeviceToDevice => "d2d",
        }
    }
}

impl fmt::Display for CopyDirection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CopyDirection::HostToDevice => "Host -> device",
            CopyDirection::DeviceToHost => "Device -> host",
            CopyDirection::DeviceToDevice => "Device -> device",
        })
    }
}

/// One row of the copy bench: a method moving a fixed number of bytes in pages of one size.
#[derive(Clone, Debug, PartialEq)]
pub struct CopyPoint {
    /// Which way the bytes went.
    pub direction: CopyDirection,
    /// The page size of the scattered pages, in bytes.
    pub page_size: u64,
    /// The method: `ours` or a baseline (`contiguous`, `per-page-loop`, `batch`,
    /// `managed-prefetch`).
    pub method: String,
    /// Throughput in GB/s (10^9 bytes per second) over GPU execution time.
    pub device_gbps: f64,
    /// Throughput in GB/s including the CPU time to issue the call, when measured.
    pub issue_gbps: Option<f64>,
}

/// A latency distribution of one run of one case (all values in microseconds).
#[derive(Clone, Debug, PartialEq)]
pub struct LatencyRun {
    /// The chart it belongs to (the file stem of the SVG, e.g. `fault-latency-svm-cuda`).
    pub chart: String,
    /// The chart's title.
    pub title: String,
    /// The case on the x axis, e.g. `64 KiB, 16x4K`.
    pub case: String,
    /// The series within a case (a build, a clear policy, a floor), coloured alike.
    pub series: String,
    /// The fastest sample, in microseconds.
    pub min_us: f64,
    /// The median, in microseconds.
    pub p50_us: f64,
    /// The 90th percentile, in microseconds.
    pub p90_us: f64,
    /// The 99th percentile, in microseconds (absent where the bench reports none).
    pub p99_us: Option<f64>,
    /// The target for this case, in microseconds, if the report sets one.
    pub target_us: Option<f64>,
}

/// One run of the main job (`migrate`): end-to-end throughput at one page size.
#[derive(Clone, Debug, PartialEq)]
pub struct MainJobRun {
    /// The backend's name (`sim`, `cuda`, `level-zero`, ...).
    pub backend: String,
    /// The page size, in bytes.
    pub page_size: u64,
    /// End-to-end throughput in GB/s (10^9 bytes per second).
    pub gbps: f64,
}

/// Everything read from a set of results files.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Results {
    /// Copy bench rows.
    pub copies: Vec<CopyPoint>,
    /// The machine the copy bench ran on (its GPU and driver), if the file says.
    pub copy_machine: Option<String>,
    /// Latency distributions.
    pub latency: Vec<LatencyRun>,
    /// Main-job runs.
    pub main_job: Vec<MainJobRun>,
}

impl Results {
    /// Appends what `other` holds (the first machine description found wins).
    pub fn merge(&mut self, other: Results) {
        self.copies.extend(other.copies);
        self.latency.extend(other.latency);
        self.main_job.extend(other.main_job);
        if self.copy_machine.is_none() {
            self.copy_machine = other.copy_machine;
        }
    }

    /// Whether nothing was read.
    pub fn is_empty(&self) -> bool {
        self.copies.is_empty() && self.latency.is_empty() && self.main_job.is_empty()
    }
}

/// A byte count as the report writes page sizes: `4 KiB`, `64 KiB`, `2 MiB`.
pub fn size_label(bytes: u64) -> String {
    const KIB: u64 = 1 << 10;
    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    match bytes {
        b if b >= GIB && b % GIB == 0 => format!("{} GiB", b / GIB),
        b if b >= MIB && b % MIB == 0 => format!("{} MiB", b / MIB),
        b if b >= KIB && b % KIB == 0 => format!("{} KiB", b / KIB),
        b => format!("{b} B"),
    }
}

/// Parses `4 KiB`, `64KiB`, `2 MiB`, `4k`, `64k`, `2m`, `4K`, `2M` or a plain byte count.
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let n: u64 = t[..digits].parse().ok()?;
    let unit = t[digits..].trim().to_ascii_lowercase();
    let mul = match unit.as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mul)
}

/// The median of `v` (the mean of the middle two for an even count); `None` when empty.
pub fn median(v: &[f64]) -> Option<f64> {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return None;
    }
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    Some(if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    })
}
