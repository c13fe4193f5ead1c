//! The charts, drawn with plotters into SVG text. Every chart has the plot on the left and
//! its legend on the right, so no legend ever covers a point.

use crate::model::{CopyDirection, CopyPoint, LatencyRun, MainJobRun, median, size_label};
use plotters::coord::Shift;
use plotters::prelude::*;

/// A chart could not be drawn.
#[derive(Debug, thiserror::Error)]
#[error("drawing {chart}: {reason}")]
pub struct RenderError {
    /// The chart's file stem.
    pub chart: String,
    /// What plotters reported.
    pub reason: String,
}

const W: u32 = 900;
const H: u32 = 480;
const PLOT_W: u32 = 610;
const FONT: &str = "sans-serif";

/// A fixed colour per method or series position, so the same method has the same colour in
/// every chart.
const PALETTE: [RGBColor; 8] = [
    RGBColor(214, 39, 40),   // red: ours
    RGBColor(31, 119, 180),  // blue
    RGBColor(44, 160, 44),   // green
    RGBColor(255, 127, 14),  // orange
    RGBColor(148, 103, 189), // purple
    RGBColor(140, 86, 75),   // brown
    RGBColor(23, 190, 207),  // cyan
    RGBColor(127, 127, 127), // grey
];

/// The copy methods in the order (and colours) the charts show them, with their legend text.
const METHODS: [(&str, &str); 5] = [
    ("ours", "ours: one backend call, scattered pages"),
    ("contiguous", "one contiguous cuMemcpyAsync"),
    ("batch", "cuMemcpyBatchAsync, a copy per page"),
    ("per-page-loop", "cuMemcpyAsync per page"),
    ("managed-prefetch", "managed memory, cuMemPrefetchAsync"),
];

fn err(chart: &str) -> impl Fn(String) -> RenderError + '_ {
    move |reason| RenderError {
        chart: chart.to_string(),
        reason,
    }
}

/// Draws the legend in the right part of the chart: a sample line (solid or dashed) or a
/// marker, then the text.
fn legend(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    entries: &[(String, RGBColor, bool)],
) -> Result<(), String> {
    for (k, (text, color, dashed)) in entries.iter().enumerate() {
        let y = 60 + 22 * k as i32;
        if *dashed {
            for s in 0..3 {
                area.draw(&PathElement::new(
                    vec![(10 + 9 * s, y), (15 + 9 * s, y)],
                    color.stroke_width(2),
                ))
                .map_err(|e| e.to_string())?;
            }
        } else {
            area.draw(&PathElement::new(
                vec![(8, y), (34, y)],
                color.stroke_width(2),
            ))
            .map_err(|e| e.to_string())?;
            area.draw(&Circle::new((21, y), 3, color.filled()))
                .map_err(|e| e.to_string())?;
        }
        area.draw(&Text::new(text.clone(), (42, y - 7), (FONT, 13)))
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Two significant digits: `9.5`, `16`, `250`, `1300`.
fn significant(v: f64) -> String {
    significant_n(v, 2)
}

/// `n` significant digits (`n` >= 1), no exponent: `0.74`, `117`, `1370`.
fn significant_n(v: f64, n: i32) -> String {
    if !v.is_finite() || v <= 0.0 {
        return String::new();
    }
    let digits = v.log10().floor() as i32;
    let scale = 10f64.powi(digits + 1 - n);
    let r = (v / scale).round() * scale;
    format!("{r:.*}", (n - 1 - digits).max(0) as usize)
}

/// The machine's description at the bottom of the legend panel, wrapped to its width.
fn machine_note(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    machine: Option<&str>,
) -> Result<(), String> {
    let Some(m) = machine else { return Ok(()) };
    let mut lines = vec![String::from("machine:")];
    for word in m.split_whitespace() {
        let last = lines.last_mut().expect("one line at least");
        if last.len() + word.len() + 1 > 42 {
            lines.push(word.to_string());
        } else {
            last.push(' ');
            last.push_str(word);
        }
    }
    let top = H as i32 - 30 - 17 * lines.len() as i32;
    for (k, l) in lines.iter().enumerate() {
        area.draw(&Text::new(l.clone(), (8, top + 17 * k as i32), (FONT, 12)))
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn log2(x: u64) -> f64 {
    (x.max(1) as f64).log2()
}

/// The x range of a page-size axis (log2 of bytes), half a step beyond the sizes present.
fn size_range(sizes: &[u64]) -> std::ops::Range<f64> {
    let lo = sizes.iter().map(|&s| log2(s)).fold(f64::INFINITY, f64::min);
    let hi = sizes
        .iter()
        .map(|&s| log2(s))
        .fold(f64::NEG_INFINITY, f64::max);
    if !lo.is_finite() || hi - lo < 1.0 {
        let c = if lo.is_finite() { lo } else { 12.0 };
        return c - 1.0..c + 1.0;
    }
    lo - 0.5..hi + 0.5
}

fn size_tick(x: &f64) -> String {
    if (x - x.round()).abs() > 1e-6 || *x < 0.0 || *x > 62.0 {
        return String::new();
    }
    size_label(1u64 << x.round() as u32)
}

/// `(lo, hi)` of positive values, widened for a log axis.
fn log_bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite() && *v > 0.0) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (1.0, 10.0);
    }
    // From a power of ten: plotters labels a log axis only from the decade its range starts in.
    (10f64.powf((lo / 1.3).log10().floor()), hi * 1.6)
}

/// Groups `(x, y)` by x: the median per x, in order of x.
fn medians_by_x(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut xs: Vec<f64> = points.iter().map(|p| p.0).collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    xs.into_iter()
        .filter_map(|x| {
            let ys: Vec<f64> = points.iter().filter(|p| p.0 == x).map(|p| p.1).collect();
            Some((x, median(&ys)?))
        })
        .collect()
}

/// GB/s against page size for every method of one direction: a line through the medians of
/// the runs, a dot for each run; our call's rate including its issue time dashed.
pub fn copy_chart(
    direction: CopyDirection,
    points: &[CopyPoint],
    machine: Option<&str>,
) -> Result<String, RenderError> {
    let chart = format!("copy-{}", direction.short());
    let e = err(&chart);
    let pts: Vec<&CopyPoint> = points.iter().filter(|p| p.direction == direction).collect();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
        let (plot, side) = root.split_horizontally(PLOT_W);
        let sizes: Vec<u64> = pts.iter().map(|p| p.page_size).collect();
        let (ylo, yhi) = log_bounds(
            pts.iter()
                .flat_map(|p| [Some(p.device_gbps), p.issue_gbps])
                .flatten(),
        );
        let title = format!("{direction} copies: GB/s by page size");
        let mut c = ChartBuilder::on(&plot)
            .caption(title, (FONT, 16))
            .margin(12)
            .x_label_area_size(42)
            .y_label_area_size(58)
            .build_cartesian_2d(size_range(&sizes), (ylo..yhi).log_scale())
            .map_err(|x| e(x.to_string()))?;
        c.configure_mesh()
            .light_line_style(TRANSPARENT)
            .x_desc("page size (scattered pages; 256 MiB per call)")
            .y_desc("GB/s, GPU execution time (log scale)")
            .y_labels(30)
            .x_labels(40)
            .x_label_formatter(&size_tick)
            .y_label_formatter(&|y| format!("{y}"))
            .draw()
            .map_err(|x| e(x.to_string()))?;
        let mut entries = Vec::new();
        let mut methods: Vec<(String, String)> = METHODS
            .iter()
            .map(|(m, l)| (m.to_string(), l.to_string()))
            .collect();
        for p in &pts {
            if !methods.iter().any(|(m, _)| *m == p.method) {
                methods.push((p.method.clone(), p.method.clone()));
            }
        }
        for (k, (m, label)) in methods.iter().enumerate() {
            let color = PALETTE[k % PALETTE.len()];
            let runs: Vec<(f64, f64)> = pts
                .iter()
                .filter(|p| p.method == *m)
                .map(|p| (log2(p.page_size), p.device_gbps))
                .collect();
            if runs.is_empty() {
                continue;
            }
            let width = if m == "ours" { 3 } else { 2 };
            c.draw_series(LineSeries::new(
                medians_by_x(&runs),
                color.stroke_width(width),
            ))
            .map_err(|x| e(x.to_string()))?;
            c.draw_series(runs.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(|x| e(x.to_string()))?;
            entries.push((label.clone(), color, false));
            if m == "ours" {
                let issue: Vec<(f64, f64)> = pts
                    .iter()
                    .filter(|p| p.method == *m)
                    .filter_map(|p| Some((log2(p.page_size), p.issue_gbps?)))
                    .collect();
                if !issue.is_empty() {
                    c.draw_series(DashedLineSeries::new(
                        medians_by_x(&issue),
                        6,
                        4,
                        color.stroke_width(2),
                    ))
                    .map_err(|x| e(x.to_string()))?;
                    entries.push(("ours, including the CPU's issue time".into(), color, true));
                }
            }
        }
        legend(&side, &entries).map_err(&e)?;
        machine_note(&side, machine).map_err(&e)?;
        root.present().map_err(|x| e(x.to_string()))?;
    }
    Ok(svg)
}

/// The latency distribution of every case of one chart: per case, a slot for each series and
/// run: a line from the fastest sample to p99, a box from the median to p90, a dot at the
/// median; the target (if any) as a dashed black line across the case.
pub fn latency_chart(runs: &[LatencyRun], machine: Option<&str>) -> Result<String, RenderError> {
    let chart = runs.first().map(|r| r.chart.clone()).unwrap_or_default();
    let e = err(&chart);
    let mut cases: Vec<&str> = Vec::new();
    let mut series: Vec<&str> = Vec::new();
    for r in runs {
        if !cases.contains(&r.case.as_str()) {
            cases.push(&r.case);
        }
        if !series.contains(&r.series.as_str()) {
            series.push(&r.series);
        }
    }
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
        let (plot, side) = root.split_horizontally(PLOT_W);
        // The y axis is log10 of microseconds (tails can be 100x the median on a busy machine),
        // labelled in microseconds.
        let (mut ylo, mut yhi) = (f64::INFINITY, f64::NEG_INFINITY);
        for v in runs.iter().flat_map(|r| {
            [
                Some(r.min_us),
                Some(r.p50_us),
                Some(r.p90_us),
                r.p99_us,
                r.target_us,
            ]
            .into_iter()
            .flatten()
        }) {
            if v.is_finite() && v > 0.0 {
                ylo = ylo.min(v);
                yhi = yhi.max(v);
            }
        }
        if !ylo.is_finite() {
            (ylo, yhi) = (1.0, 10.0);
        }
        let (ylo, yhi) = ((ylo / 1.25).log10(), (yhi * 1.25).log10());
        let l = |v: f64| v.max(1e-9).log10();
        let title = runs.first().map(|r| r.title.clone()).unwrap_or_default();
        let n = cases.len().max(1) as f64;
        let labels: Vec<String> = cases.iter().map(|c| c.to_string()).collect();
        let tick = move |x: &f64| {
            let i = x.round();
            if (x - i).abs() > 1e-6 || i < 0.0 {
                return String::new();
            }
            labels.get(i as usize).cloned().unwrap_or_default()
        };
        let mut c = ChartBuilder::on(&plot)
            .caption(title, (FONT, 15))
            .margin(12)
            .x_label_area_size(42)
            .y_label_area_size(58)
            .build_cartesian_2d(-0.5..n - 0.5, ylo..yhi)
            .map_err(|x| e(x.to_string()))?;
        c.configure_mesh()
            .light_line_style(TRANSPARENT)
            .disable_x_mesh()
            .x_labels(cases.len() * 2 + 1)
            .x_label_formatter(&tick)
            .x_desc("range, pages")
            .y_desc("microseconds per fault (log scale)")
            .y_labels(12)
            .y_label_formatter(&|y| significant(10f64.powf(*y)))
            .draw()
            .map_err(|x| e(x.to_string()))?;
        let mut targets: Vec<String> = Vec::new();
        for (i, case) in cases.iter().enumerate() {
            let here: Vec<&LatencyRun> = series
                .iter()
                .flat_map(|s| {
                    runs.iter()
                        .filter(move |r| r.case == *case && r.series == *s)
                })
                .collect();
            let slot = 0.7 / here.len().max(1) as f64;
            for (k, r) in here.iter().enumerate() {
                let color = PALETTE
                    [series.iter().position(|s| *s == r.series).unwrap_or(0) % PALETTE.len()];
                let x = i as f64 - 0.35 + (k as f64 + 0.5) * slot;
                let top = r.p99_us.unwrap_or(r.p90_us);
                let half = (slot * 0.3).min(0.08);
                let elements: Vec<DynElement<'static, SVGBackend<'_>, (f64, f64)>> = vec![
                    PathElement::new(vec![(x, l(r.min_us)), (x, l(top))], color.stroke_width(1))
                        .into_dyn(),
                    PathElement::new(
                        vec![(x - half, l(top)), (x + half, l(top))],
                        color.stroke_width(1),
                    )
                    .into_dyn(),
                    Rectangle::new(
                        [(x - half, l(r.p50_us)), (x + half, l(r.p90_us))],
                        color.mix(0.25).filled(),
                    )
                    .into_dyn(),
                    Rectangle::new([(x - half, l(r.p50_us)), (x + half, l(r.p90_us))], color)
                        .into_dyn(),
                    Circle::new((x, l(r.p50_us)), 4, color.filled()).into_dyn(),
                ];
                c.draw_series(elements).map_err(|x| e(x.to_string()))?;
            }
            if let Some(t) = here.iter().find_map(|r| r.target_us) {
                if !targets.contains(&significant(t)) {
                    targets.push(significant(t));
                }
                c.draw_series(DashedLineSeries::new(
                    vec![(i as f64 - 0.45, l(t)), (i as f64 + 0.45, l(t))],
                    6,
                    4,
                    BLACK.stroke_width(2),
                ))
                .map_err(|x| e(x.to_string()))?;
            }
        }
        let mut entries: Vec<(String, RGBColor, bool)> = series
            .iter()
            .enumerate()
            .map(|(k, s)| (s.to_string(), PALETTE[k % PALETTE.len()], false))
            .collect();
        if !targets.is_empty() {
            entries.push((format!("target: {} us", targets.join(", ")), BLACK, true));
        }
        legend(&side, &entries).map_err(&e)?;
        machine_note(&side, machine).map_err(&e)?;
        let key = [
            "dot: median; box: median to p90;",
            "line: fastest fault to p99",
            "(one mark per run)",
        ];
        for (k, t) in key.iter().enumerate() {
            side.draw(&Text::new(
                t.to_string(),
                (8, 80 + 22 * entries.len() as i32 + 18 * k as i32),
                (FONT, 12),
            ))
            .map_err(|x| e(x.to_string()))?;
        }
        root.present().map_err(|x| e(x.to_string()))?;
    }
    Ok(svg)
}

/// End-to-end GB/s of the main job against page size for one backend: a dot per run, a line
/// through the medians, each median written beside its point.
pub fn main_job_chart(runs: &[MainJobRun], machine: Option<&str>) -> Result<String, RenderError> {
    let backend = runs.first().map(|r| r.backend.clone()).unwrap_or_default();
    let chart = format!("main-job-{backend}");
    let e = err(&chart);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
        let (plot, side) = root.split_horizontally(PLOT_W);
        let sizes: Vec<u64> = runs.iter().map(|r| r.page_size).collect();
        let ymax = runs.iter().map(|r| r.gbps).fold(0.0, f64::max).max(1e-3) * 1.25;
        let title = format!("Main job (migrate, 1 GiB, 3 sources) on {backend}: GB/s by page size");
        let mut c = ChartBuilder::on(&plot)
            .caption(title, (FONT, 15))
            .margin(12)
            .x_label_area_size(42)
            .y_label_area_size(58)
            .build_cartesian_2d(size_range(&sizes), 0.0..ymax)
            .map_err(|x| e(x.to_string()))?;
        c.configure_mesh()
            .light_line_style(TRANSPARENT)
            .x_desc("page size")
            .y_desc("GB/s end to end")
            .x_labels(40)
            .x_label_formatter(&size_tick)
            .draw()
            .map_err(|x| e(x.to_string()))?;
        let color = PALETTE[0];
        let pts: Vec<(f64, f64)> = runs.iter().map(|r| (log2(r.page_size), r.gbps)).collect();
        let meds = medians_by_x(&pts);
        c.draw_series(LineSeries::new(meds.clone(), color.stroke_width(2)))
            .map_err(|x| e(x.to_string()))?;
        c.draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))
            .map_err(|x| e(x.to_string()))?;
        c.draw_series(
            meds.iter()
                .map(|&(x, y)| Text::new(format!("  {}", significant_n(y, 3)), (x, y), (FONT, 13))),
        )
        .map_err(|x| e(x.to_string()))?;
        let entries = vec![(
            format!("{backend}: dots are runs, the line their median"),
            color,
            false,
        )];
        legend(&side, &entries).map_err(&e)?;
        machine_note(&side, machine).map_err(&e)?;
        root.present().map_err(|x| e(x.to_string()))?;
    }
    Ok(svg)
}
