//! Classification metrics: accuracy and macro-F1 (per-class F1 averaged over the label set, 0 for
//! a class with no predictions and no examples, as scikit-learn's `zero_division=0`).

pub fn accuracy(pred: &[usize], gold: &[usize]) -> f64 {
    if gold.is_empty() {
        return 0.0;
    }
    pred.iter().zip(gold).filter(|(p, g)| p == g).count() as f64 / gold.len() as f64
}

pub fn macro_f1(pred: &[usize], gold: &[usize], num_labels: usize) -> f64 {
    if num_labels == 0 {
        return 0.0;
    }
    let mut tp = vec![0usize; num_labels];
    let mut fp = vec![0usize; num_labels];
    let mut fn_ = vec![0usize; num_labels];
    for (&p, &g) in pred.iter().zip(gold) {
        if p == g {
            tp[g] += 1;
        } else {
            fp[p] += 1;
            fn_[g] += 1;
        }
    }
    let f1: f64 = (0..num_labels)
        .map(|c| {
            let denom = 2 * tp[c] + fp[c] + fn_[c];
            if denom == 0 {
                0.0
            } else {
                2.0 * tp[c] as f64 / denom as f64
            }
        })
        .sum();
    f1 / num_labels as f64
}
