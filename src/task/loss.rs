//! The training loss: cross-entropy over labelled positions (the example, or each word's first
//! sub-token for NER), averaged over the heteroscedastic samples when uncertainty modeling draws
//! them (METHOD.md section 1.4), plus the regularizers the forward pass returned.
use crate::data::batching::IGNORE;
use tch::{Reduction, Tensor};

/// What a forward pass gives the loss.
pub struct Forward {
    /// `(b, C)` or `(b, t, C)` f32: what evaluation and prediction use.
    pub logits: Tensor,
    /// `(n_mc, …)` heteroscedastic samples (training with uncertainty modeling).
    pub samples: Option<Tensor>,
    /// `lambda_var` times the variance penalty (uncertainty modeling: the KL to the prior or p,
    /// averaged over each example's real tokens, then over examples) plus the memory's InfoNCE
    /// term.
    pub regularizer: Option<Tensor>,
}

/// Cross-entropy over labelled positions of `logits (…, C)` against `labels (…)`.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor, reduction: Reduction) -> Tensor {
    let n = *logits.size().last().expect("logits have a class dimension");
    // (N, C) against (N,)
    logits.reshape([-1, n]).cross_entropy_loss::<Tensor>(
        &labels.reshape([-1]),
        None,
        reduction,
        IGNORE,
        0.0,
    )
}

/// The training loss of a forward pass: cross-entropy on the logits, or its mean over the
/// heteroscedastic samples, plus the variance regularizer and the memory's InfoNCE term.
pub fn loss(f: &Forward, labels: &Tensor) -> Tensor {
    loss_over(f, labels, None)
}

/// [`loss`] with the cross-entropy summed over the labelled units and divided by `units` instead
/// of averaged over this batch's own: how a data-parallel rank normalizes by the GLOBAL batch's
/// count (scaled by the world size, since ranks' gradients are averaged), so that N ranks equal one
/// process at N times the batch even when ranks hold different numbers of labelled tokens.
pub fn loss_over(f: &Forward, labels: &Tensor, units: Option<f64>) -> Tensor {
    let reduction = if units.is_some() {
        Reduction::Sum
    } else {
        Reduction::Mean
    };
    let (ce, samples) = match &f.samples {
        // Every sample has the same labelled positions, so the mean over all of them is the
        // mean over samples of each sample's mean.
        Some(samples) => {
            let mut shape = vec![samples.size()[0]];
            shape.extend(labels.size());
            let expanded = labels.unsqueeze(0).expand(shape.as_slice(), false);
            (
                cross_entropy(samples, &expanded, reduction),
                shape[0] as f64,
            )
        }
        None => (cross_entropy(&f.logits, labels, reduction), 1.0),
    };
    let ce = match units {
        Some(n) => ce / (n * samples),
        None => ce,
    };
    match &f.regularizer {
        Some(r) => ce + r,
        None => ce,
    }
}
