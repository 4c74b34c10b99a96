//! Training curves from `metrics.jsonl`: `curves.png` in a run directory at the end of training
//! (the training loss raw and smoothed, the learning rate, the gradient norm before clipping, and
//! the validation accuracy, macro-F1 and loss at each evaluation), and for `umtune report` one
//! picture of every run below a directory (smoothed loss and validation accuracy, a line a run).
//! The smoothing is TensorBoard's: an exponential moving average with weight 0.9, debiased.
use super::run_files::METRICS_FILE;
use crate::error::{Error, Result};
use crate::uncertainty::plots::{write_panels, Panel, PanelLine};
use std::path::{Path, PathBuf};

/// The picture's file name, in a run directory and in a report's directory.
pub const CURVES_FILE: &str = "curves.png";

/// A run's logged series, (step, value) in log order.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RunCurves {
    pub loss: Vec<(f64, f64)>,
    pub lr: Vec<(f64, f64)>,
    pub grad_norm: Vec<(f64, f64)>,
    pub val_accuracy: Vec<(f64, f64)>,
    pub val_macro_f1: Vec<(f64, f64)>,
    pub val_loss: Vec<(f64, f64)>,
}

/// The series of `run/metrics.jsonl`; a line that is not JSON is an error naming the file and line.
pub fn read_curves(run: &Path) -> Result<RunCurves> {
    let path = run.join(METRICS_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let mut c = RunCurves::default();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| Error::format(&path, format!("line {}: {e}", i + 1)))?;
        let Some(step) = v["step"].as_f64() else {
            continue;
        };
        let push = |into: &mut Vec<(f64, f64)>, x: &serde_json::Value| {
            if let Some(y) = x.as_f64() {
                into.push((step, y));
            }
        };
        match v["split"].as_str() {
            Some("validation") => {
                let e = &v["eval"];
                push(&mut c.val_accuracy, &e["accuracy"]);
                push(&mut c.val_macro_f1, &e["macro_f1"]);
                push(&mut c.val_loss, &e["loss"]);
            }
            Some(_) => {}
            None => {
                push(&mut c.loss, &v["loss"]);
                push(&mut c.lr, &v["lr"]);
                push(&mut c.grad_norm, &v["grad_norm"]);
            }
        }
    }
    Ok(c)
}

/// TensorBoard's smoothing: `s_t = w s_(t-1) + (1 - w) x_t` from `s_0 = 0`, divided by
/// `1 - w^t` so that the first points are not pulled toward 0; non-finite values are skipped.
pub fn smooth(points: &[(f64, f64)], weight: f64) -> Vec<(f64, f64)> {
    let (mut s, mut n) = (0.0, 0);
    points
        .iter()
        .filter(|p| p.1.is_finite())
        .map(|&(x, y)| {
            s = weight * s + (1.0 - weight) * y;
            n += 1;
            (x, s / (1.0 - weight.powi(n)))
        })
        .collect()
}

fn line(label: &str, points: Vec<(f64, f64)>, color: usize, faint: bool) -> PanelLine {
    PanelLine {
        label: label.to_string(),
        points,
        faint,
        color,
    }
}

/// Draws `run/curves.png` from the run's `metrics.jsonl`; returns its path.
pub fn write_run_curves(run: &Path) -> Result<PathBuf> {
    let c = read_curves(run)?;
    let panel = |title: &str, y_label: &str, lines: Vec<PanelLine>| Panel {
        title: title.into(),
        y_label: y_label.into(),
        lines,
    };
    let panels = [
        panel(
            "training loss",
            "loss",
            vec![
                line("raw", c.loss.clone(), 0, true),
                line("smoothed (0.9)", smooth(&c.loss, 0.9), 0, false),
            ],
        ),
        panel("learning rate", "lr", vec![line("", c.lr, 2, false)]),
        panel(
            "gradient norm (before clipping)",
            "norm",
            vec![
                line("raw", c.grad_norm.clone(), 3, true),
                line("smoothed (0.9)", smooth(&c.grad_norm, 0.9), 3, false),
            ],
        ),
        panel(
            "validation",
            "score",
            vec![
                line("accuracy", c.val_accuracy, 1, false),
                line("macro-F1", c.val_macro_f1, 4, false),
                line("loss", c.val_loss, 5, false),
            ],
        ),
    ];
    let path = run.join(CURVES_FILE);
    write_panels(&path, &panels, 2)?;
    Ok(path)
}

/// Most runs a report's picture names in its legends (more are drawn without names).
const LEGEND_RUNS: usize = 12;

/// Draws `dir/curves.png`: the smoothed training loss and the validation accuracy of every run in
/// `runs` (a line a run, named by its directory); runs without a readable log are left out.
pub fn write_report_curves(dir: &Path, runs: &[&Path]) -> Result<PathBuf> {
    let mut loss = Vec::new();
    let mut accuracy = Vec::new();
    for (i, run) in runs.iter().enumerate() {
        let Ok(c) = read_curves(run) else { continue };
        let name = if runs.len() <= LEGEND_RUNS {
            run.file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
        } else {
            String::new()
        };
        loss.push(line(&name, smooth(&c.loss, 0.9), i, false));
        accuracy.push(line(&name, c.val_accuracy, i, false));
    }
    let panels = [
        Panel {
            title: "training loss (smoothed, 0.9)".into(),
            y_label: "loss".into(),
            lines: loss,
        },
        Panel {
            title: "validation accuracy".into(),
            y_label: "accuracy".into(),
            lines: accuracy,
        },
    ];
    let path = dir.join(CURVES_FILE);
    write_panels(&path, &panels, 2)?;
    Ok(path)
}

/// `umtune report`'s training curves of the runs below `dir` (two or more with a log): the line
/// naming the picture, or nothing; a picture that cannot be drawn is a warning.
pub fn report_curves(dir: &Path, entries: &[super::report::ReportEntry]) -> String {
    let runs: Vec<&Path> = entries
        .iter()
        .map(|e| e.dir.as_path())
        .filter(|d| d.join(METRICS_FILE).is_file())
        .collect();
    if runs.len() < 2 {
        return String::new();
    }
    match write_report_curves(dir, &runs) {
        Ok(path) => format!("\nplot: {}\n", path.display()),
        Err(e) => {
            tracing::warn!("training curves skipped: {e}");
            String::new()
        }
    }
}
