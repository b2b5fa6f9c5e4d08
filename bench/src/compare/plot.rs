//! SVG plots of a comparison: throughput by target (bars at the median, whiskers from the
//! smallest to the largest round) for S1, S1b and S3, and S2's latency percentiles by
//! target at each fixed rate (logarithmic), drawn with `plotters`.

use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;

use super::measure::Measurement;
use super::report::{CompareReport, Summary};
use super::targets::TargetKind;
use crate::dataplane::DataplaneError;

/// The colour of a target: Sallyport's in blue shades, direct grey, peers warm.
fn colour(target: TargetKind) -> RGBColor {
    match target {
        TargetKind::Direct => RGBColor(150, 150, 150),
        TargetKind::Nginx => RGBColor(0, 150, 57),
        TargetKind::NginxTls => RGBColor(120, 200, 120),
        TargetKind::RatholeTcp => RGBColor(230, 120, 20),
        TargetKind::RatholeTls => RGBColor(200, 60, 20),
        TargetKind::Frp => RGBColor(160, 80, 160),
        TargetKind::Sallyport => RGBColor(70, 130, 230),
        TargetKind::SallyportAuth => RGBColor(20, 60, 160),
    }
}

fn plot_error(what: &str) -> impl Fn(String) -> DataplaneError + '_ {
    move |message| DataplaneError::Io {
        what: format!("drawing {what}"),
        source: std::io::Error::other(message),
    }
}

/// Writes `throughput.svg` and (when S2 ran) `latency.svg` into `dir`; returns their paths.
pub fn write_all(report: &CompareReport, dir: &Path) -> Result<Vec<PathBuf>, DataplaneError> {
    std::fs::create_dir_all(dir)
        .map_err(DataplaneError::io(format!("creating {}", dir.display())))?;
    let mut written = Vec::new();
    let throughput: Vec<Measurement> = report
        .measurements()
        .into_iter()
        .filter(|m| !matches!(m, Measurement::S2 { .. } | Measurement::S3b { .. }))
        .collect();
    if !throughput.is_empty() {
        let path = dir.join("throughput.svg");
        draw_throughput(report, &throughput, &path).map_err(plot_error("throughput.svg"))?;
        written.push(path);
    }
    let rates: Vec<Measurement> = report
        .measurements()
        .into_iter()
        .filter(|m| matches!(m, Measurement::S2 { .. } | Measurement::S3b { .. }))
        .collect();
    if !rates.is_empty() {
        let path = dir.join("latency.svg");
        draw_latency(report, &rates, &path).map_err(plot_error("latency.svg"))?;
        written.push(path);
    }
    Ok(written)
}

fn caption(report: &CompareReport) -> String {
    format!(
        "median of {} rounds; whiskers: min-max; {} CPUs",
        report.settings.rounds,
        report
            .machine
            .cpus
            .map_or_else(|| "?".to_owned(), |c| c.to_string())
    )
}

fn draw_throughput(
    report: &CompareReport,
    measurements: &[Measurement],
    path: &Path,
) -> Result<(), String> {
    let columns = 2usize;
    let rows = measurements.len().div_ceil(columns);
    let root = SVGBackend::new(path, (1200, 420 * rows as u32 + 40)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let (title, body) = root.split_vertically(40);
    title
        .titled(
            &format!("Throughput by target ({})", caption(report)),
            ("sans-serif", 20),
        )
        .map_err(|e| e.to_string())?;
    let areas = body.split_evenly((rows, columns));
    for (area, measurement) in areas.iter().zip(measurements) {
        let summaries: Vec<&Summary> = report
            .summaries
            .iter()
            .filter(|s| s.measurement == *measurement)
            .collect();
        bars(area, *measurement, &summaries)?;
    }
    root.present().map_err(|e| e.to_string())
}

fn bars(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    measurement: Measurement,
    summaries: &[&Summary],
) -> Result<(), String> {
    let scale = if measurement.is_transfer() {
        1e-9
    } else {
        1e-3
    };
    let unit = if measurement.is_transfer() {
        "GB/s"
    } else {
        "thousand req/s"
    };
    let top = summaries
        .iter()
        .filter_map(|s| s.max.or(s.median))
        .fold(0.0f64, f64::max)
        * scale
        * 1.15;
    // A segmented range `0..n` has n + 1 segments: one per target.
    let count = summaries.len() as i32;
    let mut chart = ChartBuilder::on(area)
        .caption(measurement.label(), ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((0..(count - 1).max(0)).into_segmented(), 0.0..top.max(1e-6))
        .map_err(|e| e.to_string())?;
    let labels: Vec<&'static str> = summaries.iter().map(|s| s.target.label()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc(unit)
        .x_labels(summaries.len())
        .x_label_formatter(&|value| match value {
            SegmentValue::CenterOf(i) => labels
                .get(usize::try_from(*i).unwrap_or(usize::MAX))
                .map_or_else(String::new, |l| (*l).to_owned()),
            _ => String::new(),
        })
        .label_style(("sans-serif", 12))
        .draw()
        .map_err(|e| e.to_string())?;
    for (index, summary) in summaries.iter().enumerate() {
        let i = index as i32;
        let Some(median) = summary.median else {
            continue;
        };
        let colour = colour(summary.target);
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [
                    (SegmentValue::Exact(i), 0.0),
                    (SegmentValue::Exact(i + 1), median * scale),
                ],
                colour.filled(),
            )))
            .map_err(|e| e.to_string())?;
        if let (Some(min), Some(max)) = (summary.min, summary.max) {
            chart
                .draw_series(std::iter::once(ErrorBar::new_vertical(
                    SegmentValue::CenterOf(i),
                    min * scale,
                    median * scale,
                    max * scale,
                    BLACK.filled(),
                    10,
                )))
                .map_err(|e| e.to_string())?;
        }
        let text = if measurement.is_transfer() {
            format!("{:.2}", median * scale)
        } else {
            format!("{:.1}k", median * scale)
        };
        chart
            .draw_series(std::iter::once(Text::new(
                text,
                (SegmentValue::Exact(i), median * scale),
                ("sans-serif", 12),
            )))
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn draw_latency(report: &CompareReport, rates: &[Measurement], path: &Path) -> Result<(), String> {
    let root = SVGBackend::new(path, (600 * rates.len() as u32, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let (title, body) = root.split_vertically(40);
    title
        .titled(
            &format!(
                "S2 latency, coordinated omission corrected (median of {} rounds)",
                report.settings.rounds
            ),
            ("sans-serif", 16),
        )
        .map_err(|e| e.to_string())?;
    let areas = body.split_evenly((1, rates.len()));
    for (area, measurement) in areas.iter().zip(rates) {
        let summaries: Vec<&Summary> = report
            .summaries
            .iter()
            .filter(|s| s.measurement == *measurement)
            .collect();
        let points = |s: &Summary| -> Vec<(i32, f64)> {
            [s.latency.p50_ms, s.latency.p99_ms, s.latency.p999_ms]
                .into_iter()
                .enumerate()
                .filter_map(|(i, v)| v.filter(|v| *v > 0.0).map(|v| (i as i32, v)))
                .collect()
        };
        let all: Vec<f64> = summaries
            .iter()
            .flat_map(|s| points(s))
            .map(|(_, v)| v)
            .collect();
        let low = all.iter().copied().fold(f64::INFINITY, f64::min).min(0.1) * 0.8;
        let high = all.iter().copied().fold(0.0f64, f64::max).max(1.0) * 1.5;
        let mut chart = ChartBuilder::on(area)
            .caption(measurement.label(), ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(60)
            .build_cartesian_2d((0..2).into_segmented(), (low..high).log_scale())
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .y_desc("ms (log)")
            .x_label_formatter(&|value| match value {
                SegmentValue::CenterOf(0) => "p50".to_owned(),
                SegmentValue::CenterOf(1) => "p99".to_owned(),
                SegmentValue::CenterOf(2) => "p99.9".to_owned(),
                _ => String::new(),
            })
            .draw()
            .map_err(|e| e.to_string())?;
        for summary in &summaries {
            let colour = colour(summary.target);
            let line: Vec<(SegmentValue<i32>, f64)> = points(summary)
                .into_iter()
                .map(|(i, v)| (SegmentValue::CenterOf(i), v))
                .collect();
            chart
                .draw_series(LineSeries::new(line.clone(), colour.stroke_width(2)))
                .map_err(|e| e.to_string())?
                .label(summary.target.label())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2))
                });
            chart
                .draw_series(
                    line.into_iter()
                        .map(|point| Circle::new(point, 3, colour.filled())),
                )
                .map_err(|e| e.to_string())?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())?;
    }
    root.present().map_err(|e| e.to_string())
}
