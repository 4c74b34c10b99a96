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
    pub ece: f64,
    pub nll: f64,
    pub brier: f64,
    pub aurc: f64,
}

fn argmax(p: &[f64]) -> usize {
    p.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
        .map(|(i, _)| i)
        .unwrap_or(0)
}

fn confidence(p: &[f64]) -> f64 {
    p.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

/// Expected calibration error: sum over bins `(lo, hi]` of |accuracy - mean confidence| weighted
/// by the bin's share of units (a confidence of exactly 0 falls in no bin, as in Guo et al.).
pub fn ece(probs: &[Vec<f64>], labels: &[usize], bins: usize) -> f64 {
    let n = probs.len().max(1) as f64;
    let mut count = vec![0usize; bins];
    let mut correct = vec![0.0; bins];
    let mut conf_sum = vec![0.0; bins];
    for (p, &y) in probs.iter().zip(labels) {
        let c = confidence(p);
        // (lo, hi] with lo = b / bins: the bin is ceil(c * bins) - 1.
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
        .filter(|&b| count[b] > 0)
        .map(|b| (correct[b] - conf_sum[b]).abs() / n)
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

/// Area under the risk-coverage curve: units sorted by confidence, most confident first (ties in
/// input order); the mean over k = 1..n of the error rate among the first k.
pub fn aurc(probs: &[Vec<f64>], labels: &[usize]) -> f64 {
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| confidence(&probs[b]).total_cmp(&confidence(&probs[a])));
    let mut errors = 0.0;
    let mut area = 0.0;
    for (k, &i) in order.iter().enumerate() {
        if argmax(&probs[i]) != labels[i] {
            errors += 1.0;
        }
        area += errors / (k + 1) as f64;
    }
    area / probs.len().max(1) as f64
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
