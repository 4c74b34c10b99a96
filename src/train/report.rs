//! What a run reports: its `summary.json`, the calibration pictures of its outputs, and the
//! results table (markdown and CSV) of one run or of every run under a directory, in which runs
//! that are unfinished, diverged, interrupted, broken or have non-finite metrics are listed and
//! marked rather than skipped.
use super::eval::{calibration_units, EvalResult, Outputs};
use super::run_dir::{read_record, read_summary, RUN_FILE, SUMMARY_FILE};
use crate::error::{Error, Result};
use crate::uncertainty::calibration::calibrated;
use crate::uncertainty::plots::{write_calibration_plots, CalibrationView};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// `summary.json`: a finished run's numbers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub run_dir: PathBuf,
    pub model: String,
    pub dataset: String,
    pub method: String,
    pub label_names: Vec<String>,
    pub trainable_params: i64,
    pub backbone_params: i64,
    #[serde(with = "crate::finite_json")]
    pub trainable_share: f64,
    pub steps: usize,
    pub skipped_steps: usize,
    #[serde(with = "crate::finite_json")]
    pub train_tokens_per_s: f64,
    #[serde(with = "crate::finite_json")]
    pub seconds: f64,
    pub validation: EvalResult,
    pub test: Option<EvalResult>,
}

impl Summary {
    /// Whether every metric is a finite number.
    pub fn is_finite(&self) -> bool {
        self.validation.is_finite() && self.test.as_ref().is_none_or(EvalResult::is_finite)
    }
}

/// The reliability diagram and risk-coverage plot in `dir`, of the test split's outputs or,
/// without a test split, the validation split's. A failure (no font on the machine, say) is a
/// warning: pictures never fail a run.
pub fn write_plots(
    dir: &Path,
    validation: &Outputs,
    test: Option<&Outputs>,
    label_names: &[String],
    temperature: Option<f64>,
) {
    let (split, out) = match test {
        Some(t) => ("test", t),
        None => ("validation", validation),
    };
    let (logits, labels) = calibration_units(out, label_names);
    if labels.is_empty() {
        return;
    }
    let raw = calibrated(&logits, 1.0);
    let scaled = temperature.map(|t| (t, calibrated(&logits, t)));
    let view = CalibrationView {
        split,
        raw: &raw,
        calibrated: scaled.as_ref().map(|(t, p)| (*t, p.as_slice())),
        labels: &labels,
    };
    match write_calibration_plots(dir, &view) {
        Ok(paths) => tracing::info!(?paths, "calibration plots"),
        Err(e) => tracing::warn!("calibration plots skipped: {e}"),
    }
}

/// One run in a report: where it is, how it stands, and its summary if it finished.
pub struct ReportEntry {
    pub dir: PathBuf,
    /// `finished`, `finished, non-finite metrics`, `running (step 3 of 10)`, `interrupted at
    /// step 3 of 10`, `diverged at step 3 of 10`, or `broken: <why>`.
    pub status: String,
    pub summary: Option<Summary>,
}

impl ReportEntry {
    pub fn finished(summary: Summary) -> Self {
        let status = if summary.is_finite() {
            "finished"
        } else {
            "finished, non-finite metrics"
        };
        ReportEntry {
            dir: summary.run_dir.clone(),
            status: status.to_string(),
            summary: Some(summary),
        }
    }

    /// How the run in `dir` stands, from its files; never fails (a broken run is an entry).
    pub fn read(dir: &Path) -> Self {
        let broken = |e: Error| ReportEntry {
            dir: dir.to_path_buf(),
            status: format!("broken: {e}"),
            summary: None,
        };
        if dir.join(SUMMARY_FILE).is_file() {
            return match read_summary(dir) {
                Ok(s) => ReportEntry {
                    dir: dir.to_path_buf(),
                    ..ReportEntry::finished(s)
                },
                Err(e) => broken(e),
            };
        }
        match read_record(dir) {
            Ok(r) => ReportEntry {
                dir: dir.to_path_buf(),
                status: format!(
                    "{} at step {} of {}",
                    r.state.as_str(),
                    r.step,
                    r.total_steps
                ),
                summary: None,
            },
            Err(e) => broken(e),
        }
    }
}

const RESULT_COLUMNS: [&str; 16] = [
    "run",
    "status",
    "split",
    "accuracy",
    "macro-F1",
    "entity F1",
    "loss",
    "ECE",
    "ECE (T)",
    "NLL",
    "NLL (T)",
    "Brier",
    "AURC",
    "trainable params",
    "share of backbone",
    "train tokens/s",
];

/// One row per run and split: task metrics, calibration before and after the temperature,
/// trainable parameters and throughput; one row of dashes for a run without a summary.
fn result_rows(entries: &[ReportEntry]) -> Vec<Vec<String>> {
    let num = |x: Option<f64>| x.map_or_else(|| "-".to_string(), |v| format!("{v:.4}"));
    let mut rows = Vec::new();
    for entry in entries {
        let name = entry.dir.file_name().map_or_else(
            || entry.dir.display().to_string(),
            |n| n.to_string_lossy().to_string(),
        );
        let Some(s) = &entry.summary else {
            let mut row = vec![name, entry.status.clone()];
            row.resize(RESULT_COLUMNS.len(), "-".to_string());
            rows.push(row);
            continue;
        };
        let mut splits = vec![("validation", &s.validation)];
        splits.extend(s.test.as_ref().map(|t| ("test", t)));
        for (split, e) in splits {
            let (raw, cal) = (e.calibration.as_ref(), e.calibrated.as_ref());
            rows.push(vec![
                name.clone(),
                entry.status.clone(),
                split.to_string(),
                format!("{:.4}", e.accuracy),
                format!("{:.4}", e.macro_f1),
                num(e.entity.as_ref().map(|x| x.f1)),
                format!("{:.4}", e.loss),
                num(raw.map(|c| c.ece)),
                num(cal.map(|c| c.ece)),
                num(raw.map(|c| c.nll)),
                num(cal.map(|c| c.nll)),
                num(raw.map(|c| c.brier)),
                num(raw.map(|c| c.aurc)),
                s.trainable_params.to_string(),
                format!("{:.4}%", 100.0 * s.trainable_share),
                format!("{:.0}", s.train_tokens_per_s),
            ]);
        }
    }
    rows
}

/// A markdown results table.
pub fn results_table(entries: &[ReportEntry]) -> String {
    let line = |cells: &[String]| {
        let cells: Vec<String> = cells.iter().map(|c| c.replace('|', "\\|")).collect();
        format!("| {} |\n", cells.join(" | "))
    };
    let header: Vec<String> = RESULT_COLUMNS.iter().map(|c| c.to_string()).collect();
    let mut out = line(&header);
    out.push_str(&format!("|{}\n", "---|".repeat(RESULT_COLUMNS.len())));
    for row in result_rows(entries) {
        out.push_str(&line(&row));
    }
    out
}

/// The same table as CSV (quoted by the `csv` crate where a field needs it).
pub fn results_csv(entries: &[ReportEntry]) -> Result<String> {
    let mut w = csv::Writer::from_writer(Vec::new());
    let internal = |e: csv::Error| Error::Internal(format!("results CSV: {e}"));
    w.write_record(RESULT_COLUMNS).map_err(internal)?;
    for row in result_rows(entries) {
        w.write_record(&row).map_err(internal)?;
    }
    let bytes = w
        .into_inner()
        .map_err(|e| Error::Internal(format!("results CSV: {e}")))?;
    String::from_utf8(bytes).map_err(|e| Error::Internal(format!("results CSV: {e}")))
}

/// Every run under `dir` (directories holding a `summary.json` or a `run.json`, searched
/// recursively; a run's own subdirectories are not searched), sorted by path.
pub fn collect_runs(dir: &Path) -> Result<Vec<ReportEntry>> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if d.join(SUMMARY_FILE).is_file() || d.join(RUN_FILE).is_file() {
            found.push(ReportEntry::read(&d));
            continue;
        }
        for entry in std::fs::read_dir(&d).map_err(|e| Error::io(&d, e))? {
            let path = entry.map_err(|e| Error::io(&d, e))?.path();
            if path.is_dir() {
                stack.push(path);
            }
        }
    }
    found.sort_by(|a, b| a.dir.cmp(&b.dir));
    Ok(found)
}
