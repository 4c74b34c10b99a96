//! Paired differences against a baseline config (`umtune report --baseline`, default `lora`): for
//! every other config, dataset and condition of the robustness study (the clean test scores, each
//! test-time corruption, each training label noise), the difference CONFIG − BASELINE of runs
//! with the same seed, as mean, sample sd and in how many seeds the config did better. The seeds
//! share the data order, the initialization of what both configs train and (for label noise) the
//! flipped labels, so the paired sd is the spread of the effect, not of the seeds: a difference
//! larger than it is one the seed spread of each config alone can hide.
use super::eval::EvalResult;
use super::report::{spread, Metric};
use std::collections::BTreeMap;

/// The protocols, in table order, with the x-axis label of their pictures.
pub(super) const PROTOCOLS: [(&str, &str); 3] = [
    ("drop", "fraction of words dropped at test time"),
    ("mask", "fraction of words masked at test time"),
    ("label_noise", "fraction of training labels flipped"),
];

/// Per (protocol, dataset, config): the (seed, scores) of its runs at each severity.
pub(super) type Points =
    BTreeMap<(String, String, String), Vec<(f64, Vec<(Option<i64>, EvalResult)>)>>;

/// The scores the robustness report and the paired table read from one evaluation.
pub(super) const ACCURACY: Metric = |e| Some(e.accuracy);
pub(super) const ECE: Metric = |e| e.calibration.as_ref().map(|c| c.ece);
pub(super) const ECE_T: Metric = |e| e.calibrated.as_ref().map(|c| c.ece);

/// The metrics of the table, with whether higher is better.
const METRICS: [(&str, Metric, bool); 3] = [
    ("accuracy", ACCURACY, true),
    ("ECE", ECE, false),
    ("ECE (T)", ECE_T, false),
];

pub(super) const PAIRED_COLUMNS: [&str; 13] = [
    "dataset",
    "config",
    "condition",
    "pairs",
    "accuracy diff mean",
    "accuracy diff sd",
    "accuracy better in",
    "ECE diff mean",
    "ECE diff sd",
    "ECE better in",
    "ECE (T) diff mean",
    "ECE (T) diff sd",
    "ECE (T) better in",
];

/// A condition's name: `clean` at severity 0 (the same scores under every protocol), else
/// `PROTOCOL=SEVERITY`.
fn condition(protocol: &str, severity: f64) -> String {
    if severity == 0.0 {
        "clean".into()
    } else {
        format!("{protocol}={severity}")
    }
}

/// (dataset, config, protocol position, severity bits) -> (condition, [config, baseline] pairs).
type Table<'a> = BTreeMap<(String, String, usize, u64), (String, Vec<[&'a EvalResult; 2]>)>;

/// One row per (dataset, config other than `baseline`, condition) where both have runs of a
/// common seed; clean first, then the protocols in table order by severity.
pub(super) fn paired_rows(points: &Points, baseline: &str) -> Vec<Vec<String>> {
    let mut table: Table = BTreeMap::new();
    for ((protocol, dataset, line), pts) in points {
        if line == baseline {
            continue;
        }
        let Some(base) = points.get(&(protocol.clone(), dataset.clone(), baseline.to_string()))
        else {
            continue;
        };
        let order = PROTOCOLS.iter().position(|(p, _)| p == protocol);
        for (x, results) in pts {
            let Some((_, base_results)) = base.iter().find(|(bx, _)| bx == x) else {
                continue;
            };
            let key = (
                dataset.clone(),
                line.clone(),
                if *x == 0.0 {
                    0
                } else {
                    1 + order.unwrap_or(PROTOCOLS.len())
                },
                x.to_bits(),
            );
            if table.contains_key(&key) {
                continue; // the clean point, already taken from an earlier protocol
            }
            let pairs: Vec<[&EvalResult; 2]> = results
                .iter()
                .filter_map(|(seed, r)| {
                    let (_, b) = base_results.iter().find(|(s, _)| s == seed)?;
                    Some([r, b])
                })
                .collect();
            if !pairs.is_empty() {
                table.insert(key, (condition(protocol, *x), pairs));
            }
        }
    }
    table
        .into_iter()
        .map(|((dataset, line, _, _), (cond, pairs))| {
            let mut row = vec![dataset, line, cond, pairs.len().to_string()];
            for (_, m, higher) in METRICS {
                let diffs: Vec<f64> = pairs
                    .iter()
                    .filter_map(|[r, b]| Some(m(r)? - m(b)?))
                    .collect();
                if diffs.is_empty() {
                    row.extend(["-".into(), "-".into(), "-".into()]);
                    continue;
                }
                let (mean, sd, _, _) = spread(&diffs);
                let better = diffs
                    .iter()
                    .filter(|d| if higher { **d > 0.0 } else { **d < 0.0 })
                    .count();
                row.extend([
                    format!("{mean:+.4}"),
                    format!("{sd:.4}"),
                    format!("{better} of {}", diffs.len()),
                ]);
            }
            row
        })
        .collect()
}
