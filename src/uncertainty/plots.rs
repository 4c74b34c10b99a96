//! Calibration pictures for the run directory (plotters, PNG): a reliability diagram (accuracy per
//! equal-width confidence bin against the diagonal, raw and after the post-hoc temperature side by
//! side) and the risk-coverage curve of selective prediction. They draw the same bins and curve
//! that ECE and AURC are computed from ([`super::metrics`]), so a picture never disagrees with the
//! table. Text needs fontconfig and a system font; without them the PNGs are an error the caller
//! turns into a warning, never a failed run (font-kit would panic without libfontconfig, so its
//! presence is checked first, and any other panic while drawing is caught).
use super::metrics::{ece, reliability_bins, risk_coverage, ECE_BINS};
use crate::error::{Error, Result};
use plotters::prelude::*;
use std::path::{Path, PathBuf};

/// Probabilities of one split, raw and (if a temperature was fitted) calibrated.
pub struct CalibrationView<'a> {
    /// Split name for the titles ("test", "validation").
    pub split: &'a str,
    pub raw: &'a [Vec<f64>],
    pub calibrated: Option<(f64, &'a [Vec<f64>])>,
    pub labels: &'a [usize],
}

const RAW: RGBColor = RGBColor(31, 119, 180);
const CALIBRATED: RGBColor = RGBColor(214, 39, 40);

fn plot_err(path: &Path) -> impl Fn(String) -> Error + '_ {
    move |msg| Error::format(path, format!("drawing the plot: {msg}"))
}

/// Whether libfontconfig (loaded at run time) is there for text.
fn fontconfig_available() -> bool {
    fontconfig_sys::statics::LIB_RESULT.is_ok()
}

/// Writes `reliability.png` (accuracy bars, the gap to mean confidence in orange, the diagonal)
/// and `risk_coverage.png` under `dir`; returns their paths.
pub fn write_calibration_plots(dir: &Path, view: &CalibrationView) -> Result<Vec<PathBuf>> {
    let reliability = dir.join("reliability.png");
    if !fontconfig_available() {
        return Err(plot_err(&reliability)(
            "libfontconfig.so.1 cannot be loaded (install fontconfig for the PNGs)".into(),
        ));
    }
    let risk = dir.join("risk_coverage.png");
    let drawn = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        draw_reliability(&reliability, view).map_err(plot_err(&reliability))?;
        draw_risk_coverage(&risk, view).map_err(plot_err(&risk))
    }));
    let result = match drawn {
        Ok(result) => result,
        Err(_) => Err(plot_err(&reliability)(
            "the drawing library panicked".into(),
        )),
    };
    if result.is_err() {
        // No half-drawn pictures.
        let _ = std::fs::remove_file(&reliability);
        let _ = std::fs::remove_file(&risk);
    }
    result.map(|()| vec![reliability, risk])
}

fn draw_reliability(path: &Path, view: &CalibrationView) -> std::result::Result<(), String> {
    let mut panels = vec![("raw".to_string(), view.raw, RAW)];
    if let Some((t, probs)) = view.calibrated {
        panels.push((format!("temperature T = {t:.3}"), probs, CALIBRATED));
    }
    let width = 480 * panels.len() as u32;
    let root = BitMapBackend::new(path, (width, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let root = root
        .titled(
            &format!(
                "Reliability diagram ({}, {} units, {ECE_BINS} bins)",
                view.split,
                view.labels.len()
            ),
            ("sans-serif", 22),
        )
        .map_err(|e| e.to_string())?;
    for ((name, probs, color), area) in panels.iter().zip(root.split_evenly((1, panels.len()))) {
        let bins = reliability_bins(probs, view.labels, ECE_BINS);
        let mut chart = ChartBuilder::on(&area)
            .caption(
                format!("{name}: ECE {:.4}", ece(probs, view.labels, ECE_BINS)),
                ("sans-serif", 17),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..1f64, 0f64..1f64)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("confidence (top probability)")
            .y_desc("accuracy")
            .light_line_style(WHITE)
            .draw()
            .map_err(|e| e.to_string())?;
        let filled = bins.iter().filter(|b| b.count > 0);
        // The accuracy bars, then the gap to each bin's mean confidence over them.
        chart
            .draw_series(filled.clone().map(|b| {
                Rectangle::new([(b.lo, 0.0), (b.hi, b.accuracy)], color.mix(0.75).filled())
            }))
            .map_err(|e| e.to_string())?;
        chart
            .draw_series(filled.clone().map(|b| {
                let (lo, hi) = (b.accuracy.min(b.confidence), b.accuracy.max(b.confidence));
                Rectangle::new(
                    [(b.lo, lo), (b.hi, hi)],
                    RGBAColor(255, 127, 14, 0.5).filled(),
                )
            }))
            .map_err(|e| e.to_string())?;
        chart
            .draw_series(
                filled.map(|b| {
                    Rectangle::new([(b.lo, 0.0), (b.hi, b.accuracy)], BLACK.stroke_width(1))
                }),
            )
            .map_err(|e| e.to_string())?;
        chart
            .draw_series(DashedLineSeries::new(
                [(0.0, 0.0), (1.0, 1.0)],
                6,
                4,
                BLACK.mix(0.6).stroke_width(1),
            ))
            .map_err(|e| e.to_string())?;
    }
    root.present().map_err(|e| e.to_string())
}

fn draw_risk_coverage(path: &Path, view: &CalibrationView) -> std::result::Result<(), String> {
    // The raw curve is drawn wider so that it shows where the calibrated one covers it (a
    // temperature keeps the ranking of two classes, so the curves often coincide).
    let mut curves = vec![("raw", risk_coverage(view.raw, view.labels), RAW, 5)];
    if let Some((_, probs)) = view.calibrated {
        curves.push((
            "after temperature",
            risk_coverage(probs, view.labels),
            CALIBRATED,
            2,
        ));
    }
    let top = curves
        .iter()
        .flat_map(|(_, r, _, _)| r.iter().copied())
        .fold(0.0f64, f64::max);
    let root = BitMapBackend::new(path, (640, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "Risk-coverage ({}, {} units)",
                view.split,
                view.labels.len()
            ),
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..1f64, 0f64..(top * 1.1).max(0.01))
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("coverage (most confident first)")
        .y_desc("risk (error rate)")
        .light_line_style(WHITE)
        .draw()
        .map_err(|e| e.to_string())?;
    for (name, risk, color, width) in curves {
        let n = risk.len().max(1) as f64;
        let aurc = risk.iter().sum::<f64>() / n;
        let points = risk
            .into_iter()
            .enumerate()
            .map(move |(k, r)| ((k + 1) as f64 / n, r));
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(width)))
            .map_err(|e| e.to_string())?
            .label(format!("{name}: AURC {aurc:.4}"))
            .legend(move |(x, y)| {
                PathElement::new([(x, y), (x + 20, y)], color.stroke_width(width))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

/// One point of a line: x, and for each of the two panels the mean over seeds and its sample
/// standard deviation (drawn as a band around the line; 0 draws none).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CurvePoint {
    pub x: f64,
    pub mean: [f64; 2],
    pub sd: [f64; 2],
}

/// Two panels of lines against one x: `(label, points)`, x ascending.
pub struct Curves {
    pub x_label: String,
    /// The two panels' titles (the metric each shows).
    pub titles: [String; 2],
    pub lines: Vec<(String, Vec<CurvePoint>)>,
}

const PALETTE: [RGBColor; 8] = [
    RAW,
    CALIBRATED,
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// `path`: the two panels of `curves` side by side, x log-scaled when every x is positive (a
/// learning-rate sweep), one line per series with its seed spread as a band. Same guards as the
/// calibration plots.
pub fn write_curves_plot(path: &Path, curves: &Curves) -> Result<()> {
    guarded(path, || draw_curves(path, curves))
}

/// Draws one picture at `path` with the calibration plots' guards: no fontconfig, an error or a
/// panic of the drawing library are an error naming the file, and no half-drawn file stays.
fn guarded(path: &Path, draw: impl FnOnce() -> std::result::Result<(), String>) -> Result<()> {
    if !fontconfig_available() {
        return Err(plot_err(path)(
            "libfontconfig.so.1 cannot be loaded (install fontconfig for the PNGs)".into(),
        ));
    }
    let drawn = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        draw().map_err(plot_err(path))
    }));
    let result =
        drawn.unwrap_or_else(|_| Err(plot_err(path)("the drawing library panicked".into())));
    if result.is_err() {
        let _ = std::fs::remove_file(path);
    }
    result
}

/// One line of a panel; a faint one (raw values under their smoothed line) is drawn thin and light.
pub struct PanelLine {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    pub faint: bool,
    /// Index into the palette (lines of one series share it across panels).
    pub color: usize,
}

/// One panel of a multi-panel picture against the optimizer step.
pub struct Panel {
    pub title: String,
    pub y_label: String,
    pub lines: Vec<PanelLine>,
}

/// `path`: `panels` in a grid of `columns`, each with the step on x; an empty panel says so.
pub fn write_panels(path: &Path, panels: &[Panel], columns: usize) -> Result<()> {
    guarded(path, || draw_panels(path, panels, columns.max(1)))
}

fn draw_panels(path: &Path, panels: &[Panel], columns: usize) -> std::result::Result<(), String> {
    let rows = panels.len().div_ceil(columns).max(1);
    let root =
        BitMapBackend::new(path, (500 * columns as u32, 380 * rows as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let areas = root.split_evenly((rows, columns));
    for (panel, area) in panels.iter().zip(areas.iter()) {
        let all = || panel.lines.iter().flat_map(|l| l.points.iter());
        let (x0, x1) = range(all().map(|p| p.0), (0.0, 1.0));
        let (y0, y1) = range(all().map(|p| p.1), (0.0, 1.0));
        let (xpad, ypad) = (((x1 - x0) * 0.03).max(0.5), ((y1 - y0) * 0.08).max(1e-6));
        let title = if all().next().is_none() {
            format!("{} (nothing logged)", panel.title)
        } else {
            panel.title.clone()
        };
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 17))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(65)
            .build_cartesian_2d((x0 - xpad)..(x1 + xpad), (y0 - ypad)..(y1 + ypad))
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("optimizer step")
            .y_desc(panel.y_label.as_str())
            .y_label_formatter(&|v| {
                if *v == 0.0 || (1e-2..1e4).contains(&v.abs()) {
                    format!("{v:.3}")
                } else {
                    format!("{v:.1e}")
                }
            })
            .light_line_style(WHITE)
            .draw()
            .map_err(|e| e.to_string())?;
        for line in &panel.lines {
            let color = PALETTE[line.color % PALETTE.len()];
            let style = if line.faint {
                color.mix(0.3).stroke_width(1)
            } else {
                color.stroke_width(2)
            };
            let drawn = chart
                .draw_series(LineSeries::new(line.points.iter().copied(), style))
                .map_err(|e| e.to_string())?;
            if !line.label.is_empty() {
                drawn
                    .label(line.label.clone())
                    .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], style));
            }
            if line.points.len() == 1 {
                chart
                    .draw_series(
                        line.points
                            .iter()
                            .map(|&p| Circle::new(p, 4, color.filled())),
                    )
                    .map_err(|e| e.to_string())?;
            }
        }
        if panel.lines.iter().any(|l| !l.label.is_empty()) {
            draw_legend(&mut chart)?;
        }
    }
    root.present().map_err(|e| e.to_string())
}

/// The finite range of `values`, or `fallback` when there is none.
fn range(values: impl Iterator<Item = f64>, fallback: (f64, f64)) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    if lo.is_finite() {
        (lo, hi)
    } else {
        fallback
    }
}

fn draw_curves(path: &Path, s: &Curves) -> std::result::Result<(), String> {
    let all = || s.lines.iter().flat_map(|(_, p)| p.iter());
    if all().next().is_none() {
        return Err("no points".into());
    }
    let (lo, hi) = range(all().map(|p| p.x), (0.0, 1.0));
    let log = lo > 0.0;
    // Log axes are drawn on log10(x), labelled with x.
    let tx = |x: f64| if log { x.log10() } else { x };
    let (a, b) = (tx(lo), tx(hi));
    let pad = ((b - a) * 0.05).max(0.05);
    let root = BitMapBackend::new(path, (1000, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let panels = root.split_evenly((1, 2));
    for (k, area) in panels.iter().enumerate() {
        let (ylo, yhi) = range(
            all().flat_map(|p| [p.mean[k] - p.sd[k], p.mean[k] + p.sd[k]]),
            (0.0, 1.0),
        );
        let ypad = ((yhi - ylo) * 0.1).max(0.01);
        let mut chart = ChartBuilder::on(area)
            .caption(&s.titles[k], ("sans-serif", 17))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(55)
            .build_cartesian_2d((a - pad)..(b + pad), (ylo - ypad)..(yhi + ypad))
            .map_err(|e| e.to_string())?;
        let label = if log {
            format!("{} (log scale)", s.x_label)
        } else {
            s.x_label.clone()
        };
        chart
            .configure_mesh()
            .x_desc(label)
            .x_label_formatter(&|v| {
                if log {
                    format!("{:.0e}", 10f64.powf(*v))
                } else {
                    format!("{v:.3}")
                }
            })
            .light_line_style(WHITE)
            .draw()
            .map_err(|e| e.to_string())?;
        for (i, (name, pts)) in s.lines.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            let pts: Vec<&CurvePoint> = pts.iter().filter(|p| p.mean[k].is_finite()).collect();
            if pts.iter().any(|p| p.sd[k] > 0.0) {
                let upper = pts.iter().map(|p| (tx(p.x), p.mean[k] + p.sd[k]));
                let lower = pts.iter().rev().map(|p| (tx(p.x), p.mean[k] - p.sd[k]));
                chart
                    .draw_series(std::iter::once(Polygon::new(
                        upper.chain(lower).collect::<Vec<_>>(),
                        color.mix(0.15).filled(),
                    )))
                    .map_err(|e| e.to_string())?;
            }
            let line: Vec<(f64, f64)> = pts.iter().map(|p| (tx(p.x), p.mean[k])).collect();
            chart
                .draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))
                .map_err(|e| e.to_string())?
                .label(name.clone())
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 18, y)], color.stroke_width(2))
                });
            chart
                .draw_series(line.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(|e| e.to_string())?;
        }
        draw_legend(&mut chart)?;
    }
    root.present().map_err(|e| e.to_string())
}

type Chart<'a, 'b> = ChartContext<
    'a,
    BitMapBackend<'b>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

/// The series' legend of a panel, in its default corner.
fn draw_legend<'b: 'a, 'a>(chart: &mut Chart<'a, 'b>) -> std::result::Result<(), String> {
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK.mix(0.4))
        .draw()
        .map_err(|e| e.to_string())
}
