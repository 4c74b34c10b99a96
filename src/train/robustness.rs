//! The robustness study's report (METHOD.md section 6), drawn by `umtune report` from the runs
//! under a directory and their saved evaluations (`umtune eval --save`, `RUN/evals/*.json`):
//! accuracy and ECE against the severity of each protocol — test-time word drop and mask (the
//! saved evaluations of runs trained on clean labels, severity 0 being the run's own scores) and
//! training label noise (runs whose `data.train_corruption.label_noise` differs) — one line per
//! config (the run name without its seed and `-DATASET`) and dataset, with the mean and sample sd over seeds;
//! and MC prediction against the deterministic pass on the runs that saved an `mc=N` evaluation.
//! Written as `robustness.md`, `robustness.csv` and one `robustness-PROTOCOL-DATASET.png` each,
//! with the paired differences against a baseline config (`paired.rs`) in `robustness.md` and
//! `paired.csv`.
use super::eval::EvalResult;
use super::evaluate::{SavedEval, EVALS_DIR};
use super::paired::{paired_rows, Points, ACCURACY, ECE, ECE_T, PAIRED_COLUMNS, PROTOCOLS};
use super::report::{
    csv_table, curve_point, markdown_table, scored, seedless, spread, Metric, ReportEntry,
};
use crate::error::{Error, Result};
use crate::uncertainty::plots::{write_curves_plot, CurvePoint, Curves};
use std::collections::BTreeMap;
use std::path::Path;

/// One config's line in a picture.
type Line = (String, Vec<CurvePoint>);

/// Per (dataset, config): (passes, deterministic scores, MC scores) of each run.
type McPairs = BTreeMap<(String, String), Vec<(i64, EvalResult, EvalResult)>>;

const AURC: Metric = |e| e.calibration.as_ref().map(|c| c.aurc);

/// The evaluations a run saved, in file-name order; an unreadable file is an error naming it.
fn saved_evals(run: &Path) -> Result<Vec<SavedEval>> {
    let dir = run.join(EVALS_DIR);
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .map_err(|e| Error::io(&dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(f).map_err(|e| Error::io(f, e))?;
            serde_json::from_str(&text).map_err(|e| Error::format(f, e.to_string()))
        })
        .collect()
}

/// A point of `key`'s line at `severity`: one run's (seed, scores).
fn add(
    points: &mut Points,
    key: (&str, &str, &str),
    severity: f64,
    run: (Option<i64>, &EvalResult),
) {
    let (protocol, dataset, line) = key;
    let (seed, result) = run;
    let pts = points
        .entry((protocol.into(), dataset.into(), line.into()))
        .or_default();
    match pts.iter_mut().find(|(x, _)| *x == severity) {
        Some((_, rs)) => rs.push((seed, result.clone())),
        None => pts.push((severity, vec![(seed, result.clone())])),
    }
}

/// Per protocol and dataset, per config, the scores at each severity; and per dataset and config
/// the (deterministic, MC) pairs of the runs that saved an MC evaluation.
fn observations(entries: &[ReportEntry]) -> Result<(Points, McPairs)> {
    let mut points = Points::new();
    let mut mc = McPairs::new();
    for entry in entries {
        let Some(s) = &entry.summary else { continue };
        let name = entry
            .dir
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        // The dataset has its own column: a name's `-DATASET` part (scripts/stability.sh's
        // CONFIG-DATASET-sSEED) is left out of the config's.
        let stem = seedless(&name);
        let line = stem
            .strip_suffix(&format!("-{}", s.dataset))
            .unwrap_or(stem);
        let clean = scored(s);
        let seed = s.hyper.get("run.seed").and_then(serde_json::Value::as_i64);
        let noise = s.train_label_noise();
        add(
            &mut points,
            ("label_noise", &s.dataset, line),
            noise,
            (seed, clean),
        );
        if noise > 0.0 {
            continue;
        }
        for p in ["drop", "mask"] {
            add(&mut points, (p, &s.dataset, line), 0.0, (seed, clean));
        }
        for saved in saved_evals(&entry.dir)? {
            let (p, result) = (&saved.protocol, scored(&saved.summary));
            let c = &p.corruption;
            if p.data.is_some() || c.label_noise > 0.0 {
                continue;
            }
            match (c.drop > 0.0, c.mask > 0.0, p.mc) {
                (true, false, None) => add(
                    &mut points,
                    ("drop", &s.dataset, line),
                    c.drop,
                    (seed, result),
                ),
                (false, true, None) => add(
                    &mut points,
                    ("mask", &s.dataset, line),
                    c.mask,
                    (seed, result),
                ),
                (false, false, Some(n)) => mc
                    .entry((s.dataset.clone(), line.to_string()))
                    .or_default()
                    .push((n, clean.clone(), result.clone())),
                _ => {}
            }
        }
    }
    // A protocol is studied where some line has a point beyond the clean one (a directory of
    // label-noise runs alone has no clean point and is still a study of label noise).
    let studied: Vec<(String, String)> = points
        .iter()
        .filter(|(_, pts)| pts.iter().any(|(x, _)| *x > 0.0))
        .map(|((p, d, _), _)| (p.clone(), d.clone()))
        .collect();
    points.retain(|(p, d, _), _| studied.contains(&(p.clone(), d.clone())));
    for pts in points.values_mut() {
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    Ok((points, mc))
}

const ROBUSTNESS_COLUMNS: [&str; 11] = [
    "protocol",
    "dataset",
    "config",
    "severity",
    "seeds",
    "accuracy mean",
    "accuracy sd",
    "ECE mean",
    "ECE sd",
    "ECE (T) mean",
    "ECE (T) sd",
];

const MC_COLUMNS: [&str; 11] = [
    "dataset",
    "config",
    "passes",
    "seeds",
    "accuracy",
    "accuracy (MC)",
    "ECE",
    "ECE (MC)",
    "AURC",
    "AURC (MC)",
    "ECE (MC) - ECE, sd",
];

/// `mean ± sd` of a metric over results.
fn mean_sd(results: &[&EvalResult], m: Metric) -> String {
    let p = curve_point(0.0, results, [m, m]);
    format!("{:.4} ± {:.4}", p.mean[0], p.sd[0])
}

fn mc_rows(mc: &McPairs) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    for ((dataset, line), pairs) in mc {
        let mut by_n: BTreeMap<i64, Vec<(&EvalResult, &EvalResult)>> = BTreeMap::new();
        for (n, det, sampled) in pairs {
            by_n.entry(*n).or_default().push((det, sampled));
        }
        for (n, pairs) in by_n {
            let det: Vec<&EvalResult> = pairs.iter().map(|p| p.0).collect();
            let sampled: Vec<&EvalResult> = pairs.iter().map(|p| p.1).collect();
            // The paired difference: both passes of one run share its weights and data.
            let diffs: Vec<f64> = pairs
                .iter()
                .filter_map(|(d, s)| Some(ECE(s)? - ECE(d)?))
                .collect();
            let (dm, dsd, _, _) = spread(&diffs);
            rows.push(vec![
                dataset.clone(),
                line.clone(),
                n.to_string(),
                pairs.len().to_string(),
                mean_sd(&det, ACCURACY),
                mean_sd(&sampled, ACCURACY),
                mean_sd(&det, ECE),
                mean_sd(&sampled, ECE),
                mean_sd(&det, AURC),
                mean_sd(&sampled, AURC),
                format!("{dm:+.4} ± {dsd:.4}"),
            ]);
        }
    }
    rows
}

/// Writes `robustness.md`, `robustness.csv`, `paired.csv` (differences against the config named
/// `baseline`, seed by seed) and the pictures under `dir`; returns the markdown (empty when no
/// protocol has more than its clean point and no run saved an MC evaluation).
pub fn robustness_report(dir: &Path, entries: &[ReportEntry], baseline: &str) -> Result<String> {
    let (points, mc) = observations(entries)?;
    if points.is_empty() && mc.is_empty() {
        return Ok(String::new());
    }
    let mut rows = Vec::new();
    let mut pictures: BTreeMap<(&str, &str), Vec<Line>> = BTreeMap::new();
    for ((protocol, dataset, line), pts) in &points {
        let mut curve = Vec::new();
        for (x, results) in pts {
            let results: Vec<&EvalResult> = results.iter().map(|(_, r)| r).collect();
            let [acc, ece, ece_t] =
                [ACCURACY, ECE, ECE_T].map(|m| curve_point(*x, &results, [m, m]));
            rows.push(vec![
                protocol.to_string(),
                dataset.to_string(),
                line.clone(),
                format!("{x}"),
                results.len().to_string(),
                format!("{:.4}", acc.mean[0]),
                format!("{:.4}", acc.sd[0]),
                format!("{:.4}", ece.mean[0]),
                format!("{:.4}", ece.sd[0]),
                format!("{:.4}", ece_t.mean[0]),
                format!("{:.4}", ece_t.sd[0]),
            ]);
            curve.push(curve_point(*x, &results, [ACCURACY, ECE]));
        }
        pictures
            .entry((protocol, dataset))
            .or_default()
            .push((line.clone(), curve));
    }
    rows.sort_by_key(|r| PROTOCOLS.iter().position(|(p, _)| *p == r[0]));
    let mut md = String::new();
    let mut csv = Vec::new();
    if !rows.is_empty() {
        md.push_str(
            "\nRobustness: mean and sd over seeds (test split, or validation without one):\n\n",
        );
        md.push_str(&markdown_table(&ROBUSTNESS_COLUMNS, &rows));
        csv = csv_table("robustness", &ROBUSTNESS_COLUMNS, &rows)?;
    }
    let mc_rows = mc_rows(&mc);
    if !mc_rows.is_empty() {
        md.push_str("\nMC prediction against the deterministic pass (mean ± sd over seeds):\n\n");
        md.push_str(&markdown_table(&MC_COLUMNS, &mc_rows));
    }
    let paired = paired_rows(&points, baseline);
    if !points.is_empty() && !points.keys().any(|(_, _, line)| line == baseline) {
        tracing::warn!(
            "no config named {baseline:?} under {}: no paired differences (--baseline names one)",
            dir.display()
        );
    }
    if !paired.is_empty() {
        md.push_str(&format!(
            "\nPaired differences, config − {baseline} of the same dataset and seed (test split, or \
             validation without one; \"better in\": seeds where the config's accuracy is higher or its \
             ECE lower):\n\n"
        ));
        md.push_str(&markdown_table(&PAIRED_COLUMNS, &paired));
        let csv = csv_table("paired", &PAIRED_COLUMNS, &paired)?;
        crate::atomic_file::write_atomic(&dir.join("paired.csv"), &csv)?;
    }
    crate::atomic_file::write_atomic(&dir.join("robustness.md"), md.as_bytes())?;
    if !csv.is_empty() {
        crate::atomic_file::write_atomic(&dir.join("robustness.csv"), &csv)?;
    }
    for ((protocol, dataset), lines) in pictures {
        let x_label = PROTOCOLS
            .iter()
            .find(|(p, _)| *p == protocol)
            .map_or(protocol, |(_, l)| l);
        let curves = Curves {
            x_label: x_label.to_string(),
            titles: [
                format!("{dataset}: accuracy (mean, sd band)"),
                format!("{dataset}: ECE (mean, sd band)"),
            ],
            lines,
        };
        let file = format!(
            "robustness-{protocol}-{}.png",
            dataset.replace(['/', '\\'], "_")
        );
        let path = dir.join(file);
        match write_curves_plot(&path, &curves) {
            Ok(()) => md.push_str(&format!("\nplot: {}\n", path.display())),
            Err(e) => tracing::warn!("robustness plot skipped: {e}"),
        }
    }
    Ok(md)
}
