//! Calibration and selective-prediction metrics over per-unit class probabilities (a unit is an
//! example, or a word for NER): expected calibration error with equal-width bins (Guo et al.
//! 2017, <https://arxiv.org/abs/1706.04599>), negative log-likelihood, the multi-class Brier score
//! and the area under the risk-coverage curve (Geifman & El-Yaniv 2017), confidence = the top
//! probability.
use serde::{Deserialize, Serialize};

/// ECE bins, as METHOD.md fixes them.
pub const ECE_BINS: usize = 15;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct CalibrationScores {
    #[serde(with = "crate::finite_json")]
    pub ece: f64,
    #[serde(with = "crate::finite_json")]
    pub nll: f64,
    #[serde(with = "crate::finite_json")]
    pub brier: f64,
    #[serde(with = "crate::finite_json")]
    pub aurc: f64,
}

impl CalibrationScores {
    pub fn is_finite(&self) -> bool {
        [self.ece, self.nll, self.brier, self.aurc]
            .iter()
            .all(|x| x.is_finite())
    }
}

/// The index of the largest score, the first one on ties (as `torch.argmax`); 0 for an empty
/// row. The one argmax of predictions, metrics and evaluation.
pub fn argmax(p: &[f64]) -> usize {
    p.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
        .map(|(i, _)| i)
        .unwrap_or(0)
}

fn confidence(p: &[f64]) -> f64 {
    p.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

/// One equal-width confidence bin `(lo, hi]` of a reliability diagram.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReliabilityBin {
    pub lo: f64,
    pub hi: f64,
    pub count: usize,
    /// Mean top probability of the bin's units (0 when empty).
    pub confidence: f64,
    /// Share of the bin's units predicted right (0 when empty).
    pub accuracy: f64,
}

/// The reliability diagram's bins: a unit with confidence c falls in bin ceil(c * bins) - 1, so
/// bins are `(lo, hi]` and a confidence of exactly 0 falls in none (as in Guo et al.).
pub fn reliability_bins(probs: &[Vec<f64>], labels: &[usize], bins: usize) -> Vec<ReliabilityBin> {
    let mut count = vec![0usize; bins];
    let mut correct = vec![0.0; bins];
    let mut conf_sum = vec![0.0; bins];
    for (p, &y) in probs.iter().zip(labels) {
        let c = confidence(p);
        let Some(b) = ((c * bins as f64).ceil() as usize).checked_sub(1) else {
            continue;
        };
        let b = b.min(bins - 1);
        count[b] += 1;
        conf_sum[b] += c;
        if argmax(p) == y {
            correct[b] += 1.0;
        }
    }
    (0..bins)
        .map(|b| {
            let n = count[b].max(1) as f64;
            ReliabilityBin {
                lo: b as f64 / bins as f64,
                hi: (b + 1) as f64 / bins as f64,
                count: count[b],
                confidence: conf_sum[b] / n,
                accuracy: correct[b] / n,
            }
        })
        .collect()
}

/// Expected calibration error: sum over the [`reliability_bins`] of |accuracy - mean confidence|
/// weighted by the bin's share of units.
pub fn ece(probs: &[Vec<f64>], labels: &[usize], bins: usize) -> f64 {
    let n = probs.len().max(1) as f64;
    reliability_bins(probs, labels, bins)
        .iter()
        .map(|b| b.count as f64 * (b.accuracy - b.confidence).abs() / n)
        .sum()
}

/// Mean of -ln p(label).
pub fn nll(probs: &[Vec<f64>], labels: &[usize]) -> f64 {
    let n = probs.len().max(1) as f64;
    probs
        .iter()
        .zip(labels)
        .map(|(p, &y)| -p[y].max(f64::MIN_POSITIVE).ln())
        .sum::<f64>()
        / n
}

/// Mean over units of sum over classes of (p_c - [c = label])^2.
pub fn brier(probs: &[Vec<f64>], labels: &[usize]) -> f64 {
    let n = probs.len().max(1) as f64;
    probs
        .iter()
        .zip(labels)
        .map(|(p, &y)| {
            p.iter()
                .enumerate()
                .map(|(c, &pc)| (pc - if c == y { 1.0 } else { 0.0 }).powi(2))
                .sum::<f64>()
        })
        .sum::<f64>()
        / n
}

/// The risk-coverage curve: units sorted by confidence, most confident first (ties in input
/// order); entry k-1 is the error rate among the first k, so coverage is k / n.
pub fn risk_coverage(probs: &[Vec<f64>], labels: &[usize]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| confidence(&probs[b]).total_cmp(&confidence(&probs[a])));
    let mut errors = 0.0;
    order
        .iter()
        .enumerate()
        .map(|(k, &i)| {
            if argmax(&probs[i]) != labels[i] {
                errors += 1.0;
            }
            errors / (k + 1) as f64
        })
        .collect()
}

/// Area under the [`risk_coverage`] curve: the mean risk over k = 1..n.
pub fn aurc(probs: &[Vec<f64>], labels: &[usize]) -> f64 {
    risk_coverage(probs, labels).iter().sum::<f64>() / probs.len().max(1) as f64
}

/// All four scores.
pub fn calibration_scores(probs: &[Vec<f64>], labels: &[usize]) -> CalibrationScores {
    CalibrationScores {
        ece: ece(probs, labels, ECE_BINS),
        nll: nll(probs, labels),
        brier: brier(probs, labels),
        aurc: aurc(probs, labels),
    }
}

/// Softmax of `logits / temperature`, in f64.
pub fn softmax(logits: &[f64], temperature: f64) -> Vec<f64> {
    let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = logits
        .iter()
        .map(|&z| ((z - m) / temperature).exp())
        .collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|x| x / s).collect()
}
