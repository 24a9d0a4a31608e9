//! What a benchmark run leaves behind besides its tables: `results.json` (every sample, the
//! ratios, the tree's commit and the machine), two SVG plots (throughput per path and size,
//! latency percentiles per path and offered rate), and the `RATIO` line.

use std::path::PathBuf;

use anyhow::{Context, Result};
use plotters::prelude::*;
use serde::Serialize;

use crate::{Args, Ratios, Results, Route, Sample};

/// Where and on what the benchmark ran.
#[derive(Debug, Serialize)]
pub struct Meta {
    pub command: String,
    pub date: String,
    /// `git rev-parse HEAD` of the tree the benchmark was built from.
    pub commit: String,
    /// `git describe --dirty`: says whether the tree had uncommitted changes.
    pub describe: String,
    pub nproc: usize,
    pub cpu: String,
    pub kernel: String,
    pub loadavg: String,
    pub memory_kib: u64,
    pub rabbitmq: String,
}

#[derive(Debug, Serialize)]
pub(crate) struct SampleJson<'a> {
    path: &'static str,
    experiment: &'static str,
    size: usize,
    offered_rate: Option<f64>,
    messages: u64,
    msg_per_s: f64,
    mb_per_s: f64,
    elapsed_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    lost: u64,
    duplicates: u64,
    corrupted: u64,
    /// µs of CPU per message delivered, per process (and "other": the rest of the machine).
    cpu_us_per_msg: Vec<(&'a str, f64)>,
}

#[derive(Debug, Serialize)]
struct Document<'a> {
    meta: &'a Meta,
    args: ArgsJson<'a>,
    ratios: Option<Ratios>,
    samples: Vec<SampleJson<'a>>,
}

#[derive(Debug, Serialize)]
struct ArgsJson<'a> {
    messages: u64,
    size: usize,
    runs: usize,
    warmup: u64,
    rates: &'a [f64],
    rate_seconds: u64,
    sizes: &'a [usize],
    size_budget: u64,
    /// The paths measured (`--routes`), by short name.
    routes: Vec<&'static str>,
}

/// The last line of the output, for scripts: the 1 KiB (or `--size`) flood's ratios.
/// The tunnel path's two ratios follow when it was measured.
pub fn ratio_line(r: &Ratios) -> String {
    let mut line = format!(
        "RATIO drawbridge/shovel={:.2} drawbridge/raw={:.2} forwarder_cpu/shovel_cpu={:.2}",
        r.drawbridge_shovel, r.drawbridge_raw, r.forwarder_cpu_shovel_cpu
    );
    if let (Some(rate), Some(cpu)) = (
        r.drawbridge_tunnel_drawbridge,
        r.tunnel_forwarder_cpu_forwarder_cpu,
    ) {
        line.push_str(&format!(
            " drawbridge-tunnel/drawbridge={rate:.2} tunnel_forwarder_cpu/forwarder_cpu={cpu:.2}"
        ));
    }
    line
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub(crate) fn sample_json<'a>(
    s: &Sample,
    experiment: &'static str,
    names: &[&'a str],
) -> SampleJson<'a> {
    let n = s.report.expected.max(1) as f64;
    SampleJson {
        path: s.route.short(),
        experiment,
        size: s.size,
        offered_rate: s.rate,
        messages: s.report.expected,
        msg_per_s: s.rate(),
        mb_per_s: s.rate() * s.size as f64 / 1e6,
        elapsed_s: s.e2e.as_secs_f64(),
        p50_ms: ms(s.report.p50),
        p99_ms: ms(s.report.p99),
        p999_ms: ms(s.report.p999),
        lost: s.report.lost,
        duplicates: s.report.duplicates,
        corrupted: s.report.corrupted,
        cpu_us_per_msg: names
            .iter()
            .zip(&s.cpu)
            .map(|(name, cpu)| (*name, cpu / n * 1e6))
            .collect(),
    }
}

/// Write `results.json`, `throughput.svg` and `latency.svg` into `args.results`; returns
/// the files written.
pub fn write(meta: &Meta, args: &Args, names: &[&str], results: &Results) -> Result<Vec<PathBuf>> {
    let dir = &args.results;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let samples = results
        .flood
        .iter()
        .map(|s| sample_json(s, "flood", names))
        .chain(results.rates.iter().map(|s| sample_json(s, "rate", names)))
        .chain(results.sizes.iter().map(|s| sample_json(s, "size", names)))
        .collect();
    let doc = Document {
        meta,
        args: ArgsJson {
            messages: args.messages,
            size: args.size,
            runs: args.runs,
            warmup: args.warmup,
            rates: &args.rates,
            rate_seconds: args.rate_seconds,
            sizes: &args.sizes,
            size_budget: args.size_budget,
            routes: args.routes.iter().map(|r| r.short()).collect(),
        },
        ratios: results.ratios,
        samples,
    };
    let mut written = Vec::new();
    let json = dir.join("results.json");
    std::fs::write(&json, serde_json::to_string_pretty(&doc)?)?;
    written.push(json);

    // Throughput per path: over the sizes if there are size runs, else the flood's median.
    let throughput = dir.join("throughput.svg");
    let sizes: Vec<usize> = if results.sizes.is_empty() {
        vec![args.size]
    } else {
        args.sizes.clone()
    };
    let source = if results.sizes.is_empty() {
        &results.flood
    } else {
        &results.sizes
    };
    let series: Vec<(Route, Vec<f64>)> = args
        .routes
        .iter()
        .map(|&r| {
            let per_size = sizes
                .iter()
                .map(|&size| {
                    crate::median(
                        source
                            .iter()
                            .filter(|s| s.route == r && s.size == size)
                            .map(|s| s.rate() * size as f64 / 1e6)
                            .collect(),
                    )
                })
                .collect();
            (r, per_size)
        })
        .collect();
    let labels: Vec<String> = sizes.iter().map(|&s| crate::bytes(s)).collect();
    plot(
        &throughput,
        "throughput per path and body size (MB/s, log scale)",
        "body size",
        "MB/s",
        &labels,
        &series
            .iter()
            .map(|(r, v)| (r.short().to_string(), v.clone(), false))
            .collect::<Vec<_>>(),
        1,
    )?;
    written.push(throughput);

    if !results.rates.is_empty() {
        let latency = dir.join("latency.svg");
        let labels: Vec<String> = args.rates.iter().map(|r| format!("{r:.0} msg/s")).collect();
        let mut lines = Vec::new();
        for &r in &args.routes {
            for (pct, thin, get) in [
                (
                    "p50",
                    true,
                    (|s: &Sample| ms(s.report.p50)) as fn(&Sample) -> f64,
                ),
                ("p99", false, |s: &Sample| ms(s.report.p99)),
                ("p99.9", true, |s: &Sample| ms(s.report.p999)),
            ] {
                let values = args
                    .rates
                    .iter()
                    .map(|&rate| {
                        results
                            .rates
                            .iter()
                            .find(|s| s.route == r && s.rate == Some(rate))
                            .map_or(f64::NAN, get)
                    })
                    .collect();
                lines.push((format!("{} {pct}", r.short()), values, thin));
            }
        }
        plot(
            &latency,
            "end-to-end latency at offered rates (ms, log scale)",
            "offered rate",
            "ms",
            &labels,
            &lines,
            3,
        )?;
        written.push(latency);
    }
    Ok(written)
}

/// A line chart over categories (`labels`), log-scale y; each line is (name, values, thin),
/// `per_path` consecutive lines per path (one colour per path).
fn plot(
    path: &std::path::Path,
    caption: &str,
    x_desc: &str,
    y_desc: &str,
    labels: &[String],
    lines: &[(String, Vec<f64>, bool)],
    per_path: usize,
) -> Result<()> {
    let finite = || {
        lines
            .iter()
            .flat_map(|(_, v, _)| v)
            .copied()
            .filter(|v| v.is_finite() && *v > 0.0)
    };
    let lo = finite().fold(f64::INFINITY, f64::min);
    let hi = finite().fold(0.0, f64::max);
    let (lo, hi) = if hi > 0.0 {
        (lo / 2.0, hi * 2.0)
    } else {
        (0.1, 1.0)
    };
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    let draw = || -> Result<(), Box<dyn std::error::Error + '_>> {
        root.fill(&WHITE)?;
        let last = labels.len().saturating_sub(1).max(1) as f64;
        let mut chart = ChartBuilder::on(&root)
            .caption(caption, ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(-0.3f64..last + 0.3, (lo..hi).log_scale())?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .x_labels(labels.len().max(2))
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() < 1e-6 && i >= 0.0 {
                    labels.get(i as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .draw()?;
        for (i, (name, values, thin)) in lines.iter().enumerate() {
            // Latency plots have three lines per path: one colour per path, p99 thick.
            let color = Palette99::pick(i / per_path.max(1));
            let style = color.stroke_width(if *thin { 1 } else { 3 });
            let points: Vec<(f64, f64)> = values
                .iter()
                .enumerate()
                .filter(|(_, v)| v.is_finite() && **v > 0.0)
                .map(|(x, v)| (x as f64, *v))
                .collect();
            chart
                .draw_series(LineSeries::new(points.clone(), style))?
                .label(name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
            chart.draw_series(
                points
                    .into_iter()
                    .map(|p| Circle::new(p, 3, color.filled())),
            )?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow::anyhow!("plotting {}: {e}", path.display()))
}
