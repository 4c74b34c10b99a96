//! What a run reports: its `summary.json`, the calibration pictures of its outputs, and the
//! results table (markdown and CSV) of one run or of every run under a directory, in which runs
//! that are unfinished, diverged, interrupted, broken or have non-finite metrics are listed and
//! marked rather than skipped.
use super::eval::EvalResult;
use super::run_files::{read_record, read_summary, Summary, METRICS_FILE, RUN_FILE, SUMMARY_FILE};
use crate::error::{Error, Result};
use crate::uncertainty::estimation::NOISE_TO_FEATURE;
use crate::uncertainty::metrics::CalibrationScores;
use crate::uncertainty::plots::{CurvePoint, Curves};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

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
                // run.json is rewritten at evaluations and state changes; the log is live.
                status: format!(
                    "{} at step {} of {}",
                    r.state.as_str(),
                    r.step.max(last_logged_step(dir).unwrap_or(0)),
                    r.total_steps
                ),
                summary: None,
            },
            Err(e) => broken(e),
        }
    }
}

/// The step of the last line of the run's `metrics.jsonl` (read from its end: logs grow long).
fn last_logged_step(dir: &Path) -> Option<usize> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(dir.join(METRICS_FILE)).ok()?;
    let len = f.metadata().ok()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(8192))).ok()?;
    let mut tail = Vec::new();
    f.read_to_end(&mut tail).ok()?;
    String::from_utf8_lossy(&tail)
        .lines()
        .rev()
        .find_map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).ok()?;
            Some(v.get("step")?.as_u64()? as usize)
        })
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
/// Writes `DIR/results.md` and `DIR/results.csv` of the runs below `dir`; returns the markdown.
pub fn write_results(dir: &Path, runs: &[ReportEntry]) -> Result<String> {
    if runs.is_empty() {
        return Err(Error::run(
            dir,
            "no run directories (with run.json or summary.json) below it",
        ));
    }
    let md = results_table(runs);
    crate::atomic_file::write_atomic(&dir.join("results.md"), md.as_bytes())?;
    crate::atomic_file::write_atomic(&dir.join("results.csv"), results_csv(runs)?.as_bytes())?;
    Ok(md)
}

pub fn results_table(entries: &[ReportEntry]) -> String {
    markdown_table(&RESULT_COLUMNS, &result_rows(entries))
}

/// The same table as CSV (quoted by the `csv` crate where a field needs it).
pub fn results_csv(entries: &[ReportEntry]) -> Result<String> {
    let bytes = csv_table("results", &RESULT_COLUMNS, &result_rows(entries))?;
    String::from_utf8(bytes).map_err(|e| Error::Internal(format!("results CSV: {e}")))
}

/// A markdown table (`|` in a cell escaped).
pub(super) fn markdown_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let cells: Vec<String> = cells.map(|c| c.replace('|', "\\|")).collect();
        format!("| {} |\n", cells.join(" | "))
    };
    let mut out = line(&mut header.iter().copied());
    out.push_str(&format!("|{}\n", "---|".repeat(header.len())));
    for row in rows {
        out.push_str(&line(&mut row.iter().map(String::as_str)));
    }
    out
}

/// A CSV table (quoted by the `csv` crate where a field needs it); `what` names it in errors.
pub(super) fn csv_table(what: &str, header: &[&str], rows: &[Vec<String>]) -> Result<Vec<u8>> {
    let internal = |e: String| Error::Internal(format!("{what} CSV: {e}"));
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(header)
        .map_err(|e| internal(e.to_string()))?;
    for row in rows {
        w.write_record(row).map_err(|e| internal(e.to_string()))?;
    }
    w.into_inner().map_err(|e| internal(e.to_string()))
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

/// Runs that differ only in their seed: a sweep's grid point (from `sweep.json`), or elsewhere
/// the run name without its `-sSEED` suffix.
struct Group<'a> {
    name: String,
    point: BTreeMap<String, String>,
    runs: Vec<&'a Summary>,
}

impl Group<'_> {
    /// The mean accuracy of the group's runs on their scored split (what `best` is chosen by).
    fn mean_accuracy(&self) -> f64 {
        let acc: Vec<f64> = self.runs.iter().map(|s| scored(s).accuracy).collect();
        spread(&acc).0
    }
}

fn group_runs<'a>(
    dir: &Path,
    entries: &'a [ReportEntry],
) -> Result<(Vec<Group<'a>>, Option<super::sweep::SweepPlan>)> {
    let plan_path = dir.join(super::sweep::PLAN_FILE);
    let plan = plan_path
        .is_file()
        .then(|| super::sweep::SweepPlan::read(&plan_path))
        .transpose()?;
    let mut groups: Vec<Group> = Vec::new();
    for e in entries {
        let Some(s) = &e.summary else { continue };
        let name = e
            .dir
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        let (key, point) = match &plan {
            Some(p) => match p.runs.iter().find(|r| r.name == name) {
                Some(r) => (
                    name.rsplit_once(",seed=")
                        .map_or(name.clone(), |(k, _)| k.to_string()),
                    r.point.clone(),
                ),
                None => continue,
            },
            None => (line_name(&name, s), BTreeMap::new()),
        };
        match groups.iter_mut().find(|g| g.name == key) {
            Some(g) => g.runs.push(s),
            None => groups.push(Group {
                name: key,
                point,
                runs: vec![s],
            }),
        }
    }
    Ok((groups, plan))
}

/// A run's name without its `-sSEED` suffix.
pub(super) fn seedless(name: &str) -> &str {
    match name.rsplit_once("-s") {
        Some((stem, seed)) if !seed.is_empty() && seed.chars().all(|c| c.is_ascii_digit()) => stem,
        _ => name,
    }
}

/// The group of a run outside a sweep: its name without the seed, and the training label noise
/// when there was some (runs of one config under several noise levels share their names).
fn line_name(name: &str, s: &Summary) -> String {
    let noise = s.train_label_noise();
    if noise > 0.0 {
        format!("{} (label_noise={noise})", seedless(name))
    } else {
        seedless(name).to_string()
    }
}

/// Mean, sample standard deviation, min and max.
pub(super) fn spread(xs: &[f64]) -> (f64, f64, f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let sd = if xs.len() > 1 {
        (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    let min = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let max = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (mean, sd, min, max)
}

/// The split a group is scored on: test when the run has one, else validation.
pub(super) fn scored(s: &Summary) -> &EvalResult {
    s.test.as_ref().unwrap_or(&s.validation)
}

const GROUP_COLUMNS: [&str; 18] = [
    "group",
    "seeds",
    "accuracy mean",
    "accuracy sd",
    "accuracy min",
    "accuracy max",
    "macro-F1 mean",
    "macro-F1 sd",
    "ECE mean",
    "ECE sd",
    "ECE (T) mean",
    "ECE (T) sd",
    "NLL mean",
    "NLL sd",
    "AURC mean",
    "AURC sd",
    "noise/feature mean",
    "noise/feature sd",
];

fn group_rows(groups: &[Group]) -> Vec<Vec<String>> {
    groups
        .iter()
        .map(|g| {
            let metric = |f: &dyn Fn(&Summary) -> Option<f64>| -> Vec<f64> {
                g.runs.iter().filter_map(|s| f(s)).collect()
            };
            let raw = |f: fn(&CalibrationScores) -> f64| {
                metric(&|s| scored(s).calibration.as_ref().map(f))
            };
            let acc = spread(&metric(&|s| Some(scored(s).accuracy)));
            let f1 = spread(&metric(&|s| Some(scored(s).macro_f1)));
            let ece_t = metric(&|s| scored(s).calibrated.as_ref().map(|c| c.ece));
            let noise = metric(&|s| s.um.get(NOISE_TO_FEATURE).copied());
            let show = |xs: &[f64], pick: fn((f64, f64, f64, f64)) -> f64| match xs.is_empty() {
                true => "-".to_string(),
                false => format!("{:.4}", pick(spread(xs))),
            };
            let mut row = vec![
                g.name.clone(),
                g.runs.len().to_string(),
                format!("{:.4}", acc.0),
                format!("{:.4}", acc.1),
                format!("{:.4}", acc.2),
                format!("{:.4}", acc.3),
                format!("{:.4}", f1.0),
                format!("{:.4}", f1.1),
            ];
            // Mean and sd of each optional metric, "-" where no run of the group has it.
            for xs in [
                raw(|c| c.ece),
                ece_t,
                raw(|c| c.nll),
                raw(|c| c.aurc),
                noise,
            ] {
                row.push(show(&xs, |s| s.0));
                row.push(show(&xs, |s| s.1));
            }
            row
        })
        .collect()
}

/// The runs under `dir` grouped by everything but the seed (a sweep's grid points, or run names
/// without `-sSEED`): mean and spread of accuracy, macro-F1, ECE raw and after the temperature,
/// NLL and AURC (test split, or validation without one) and of UM's noise-to-feature ratio at
/// the end of training, and the best group by mean accuracy.
/// Writes `groups.md`, `groups.csv` and, for a sweep with a numeric axis, `sweep.png` (the metric
/// against that axis — the learning rate when it is one — one line per other grid value).
/// Returns the markdown (empty when no group has two runs and there is no sweep).
pub fn sweep_report(dir: &Path, entries: &[ReportEntry]) -> Result<String> {
    let (groups, plan) = group_runs(dir, entries)?;
    if groups.is_empty() {
        return Ok(plan.map_or_else(String::new, |p| missing_runs(&p, entries)));
    }
    if plan.is_none() && groups.iter().all(|g| g.runs.len() < 2) {
        return Ok(String::new());
    }
    let rows = group_rows(&groups);
    let mut md =
        String::from("\nMean and spread over seeds (test split, or validation without one):\n\n");
    md.push_str(&markdown_table(&GROUP_COLUMNS, &rows));
    let best = groups
        .iter()
        .max_by(|a, b| a.mean_accuracy().total_cmp(&b.mean_accuracy()))
        .map(|g| {
            format!(
                "\nbest: {} (accuracy {:.4} over {} seeds)\n",
                g.name,
                g.mean_accuracy(),
                g.runs.len()
            )
        });
    md.push_str(&best.unwrap_or_default());
    if let Some(plan) = &plan {
        md.push_str(&missing_runs(plan, entries));
    }
    let bytes = csv_table("groups", &GROUP_COLUMNS, &rows)?;
    crate::atomic_file::write_atomic(&dir.join("groups.csv"), &bytes)?;
    crate::atomic_file::write_atomic(&dir.join("groups.md"), md.as_bytes())?;
    if let Some(plan) = &plan {
        if let Some(series) = sweep_series(plan, &groups) {
            let path = dir.join("sweep.png");
            match crate::uncertainty::plots::write_curves_plot(&path, &series) {
                Ok(()) => md.push_str(&format!("\nplot: {}\n", path.display())),
                Err(e) => tracing::warn!("sweep plot skipped: {e}"),
            }
        }
    }
    Ok(md)
}

/// The planned runs that have no results (failed, unfinished or never started), each with its
/// state: they are not in the table, and `best` is chosen without them.
fn missing_runs(plan: &super::sweep::SweepPlan, entries: &[ReportEntry]) -> String {
    let lines: Vec<String> = plan
        .runs
        .iter()
        .filter_map(|run| {
            let entry = entries
                .iter()
                .find(|e| e.dir.file_name().is_some_and(|n| n == run.name.as_str()));
            match entry {
                Some(e) if e.summary.is_some() => None,
                Some(e) => Some(format!("- {}: {}\n", run.name, e.status)),
                None => Some(format!("- {}: not started\n", run.name)),
            }
        })
        .collect();
    if lines.is_empty() {
        return String::new();
    }
    format!(
        "\n{} of {} planned runs have no results (not in the table; `best` is among the others):\n{}",
        lines.len(),
        plan.runs.len(),
        lines.concat()
    )
}

/// The lines of the sweep plot: x is the first numeric grid axis (`train.lr` if it is one), one
/// line per combination of the other axes' values, points (x, mean accuracy, mean calibrated
/// ECE) sorted by x.
fn sweep_series(plan: &super::sweep::SweepPlan, groups: &[Group]) -> Option<Curves> {
    let numeric = |a: &&super::sweep::Axis| a.values.iter().all(|v| v.parse::<f64>().is_ok());
    let axis = plan
        .grid
        .iter()
        .filter(numeric)
        .find(|a| a.key == "train.lr")
        .or_else(|| plan.grid.iter().find(numeric))?;
    let mut lines: BTreeMap<String, Vec<CurvePoint>> = BTreeMap::new();
    for g in groups {
        let x = g.point.get(&axis.key)?.parse::<f64>().ok()?;
        let label: Vec<String> = g
            .point
            .iter()
            .filter(|(k, _)| **k != axis.key)
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let label = if label.is_empty() {
            "runs".to_string()
        } else {
            label.join(", ")
        };
        let results: Vec<&EvalResult> = g.runs.iter().map(|s| scored(s)).collect();
        lines.entry(label).or_default().push(curve_point(
            x,
            &results,
            [
                |e| Some(e.accuracy),
                |e| e.calibrated.as_ref().map(|c| c.ece),
            ],
        ));
    }
    for pts in lines.values_mut() {
        pts.sort_by(|a, b| a.x.total_cmp(&b.x));
    }
    Some(Curves {
        x_label: axis.key.clone(),
        titles: [
            "accuracy (mean and sd over seeds)".into(),
            "ECE after temperature (mean and sd over seeds)".into(),
        ],
        lines: lines.into_iter().collect(),
    })
}

/// A score of one evaluation (`None` where it was not computed).
pub(super) type Metric = fn(&EvalResult) -> Option<f64>;

/// The point at `x` of a line over seeds: the mean and sample sd of the two metrics.
pub(super) fn curve_point(x: f64, results: &[&EvalResult], metrics: [Metric; 2]) -> CurvePoint {
    let stat = |m: Metric| {
        let xs: Vec<f64> = results.iter().filter_map(|e| m(e)).collect();
        if xs.is_empty() {
            (f64::NAN, 0.0)
        } else {
            let (mean, sd, _, _) = spread(&xs);
            (mean, sd)
        }
    };
    let (a, b) = (stat(metrics[0]), stat(metrics[1]));
    CurvePoint {
        x,
        mean: [a.0, b.0],
        sd: [a.1, b.1],
    }
}
