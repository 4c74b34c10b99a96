//! Post-hoc temperature scaling (Guo et al. 2017, <https://arxiv.org/abs/1706.04599>): the one
//! scalar T > 0 that minimizes the NLL of `softmax(logits / T)` on the validation split. The NLL
//! is a smooth function of log T with one minimum for all practical data, so a bracketing
//! golden-section search on log T in [ln 0.05, ln 20] finds it to 1e-6 without gradients.
use super::metrics::softmax;

/// The temperatures searched; a fit at either end means the NLL kept falling past it (near-uniform
/// outputs, for instance), which the trainer reports.
pub const T_RANGE: (f64, f64) = (0.05, 20.0);

/// Whether `t` lies at an end of [`T_RANGE`].
pub fn at_search_bound(t: f64) -> bool {
    let (lo, hi) = T_RANGE;
    (t.ln() - lo.ln()).abs() < 1e-6 || (t.ln() - hi.ln()).abs() < 1e-6
}

/// Mean NLL of `labels` under `softmax(logits / t)`.
pub fn nll_at(logits: &[Vec<f64>], labels: &[usize], t: f64) -> f64 {
    let n = logits.len().max(1) as f64;
    logits
        .iter()
        .zip(labels)
        .map(|(z, &y)| {
            let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let lse = z.iter().map(|&v| ((v - m) / t).exp()).sum::<f64>().ln();
            lse - (z[y] - m) / t
        })
        .sum::<f64>()
        / n
}

/// The NLL-minimizing temperature (1.0 when there is nothing to fit).
pub fn fit_temperature(logits: &[Vec<f64>], labels: &[usize]) -> f64 {
    if logits.is_empty() {
        return 1.0;
    }
    let f = |log_t: f64| nll_at(logits, labels, log_t.exp());
    let phi = (5f64.sqrt() - 1.0) / 2.0;
    let (mut a, mut b) = (T_RANGE.0.ln(), T_RANGE.1.ln());
    let mut c = b - phi * (b - a);
    let mut d = a + phi * (b - a);
    let (mut fc, mut fd) = (f(c), f(d));
    while b - a > 1e-9 {
        if fc < fd {
            b = d;
            d = c;
            fd = fc;
            c = b - phi * (b - a);
            fc = f(c);
        } else {
            a = c;
            c = d;
            fc = fd;
            d = a + phi * (b - a);
            fd = f(d);
        }
    }
    ((a + b) / 2.0).exp()
}

/// Probabilities of `logits` at temperature `t`.
pub fn calibrated(logits: &[Vec<f64>], t: f64) -> Vec<Vec<f64>> {
    logits.iter().map(|z| softmax(z, t)).collect()
}
