//! The robustness protocols of METHOD.md section 6, applied to examples before tokenization:
//! missing information (a fraction of the words of each example removed, or replaced by an
//! unknown marker; NER always replaces so that tags stay aligned) and label noise (a fraction of
//! labels flipped to a different class, uniformly). Seeded per example, so a corruption is the
//! same whatever the order or the subset the examples are read in.
use super::readers::Example;
pub use crate::config::Corruption;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The word that replaces masked words.
pub const UNKNOWN_WORD: &str = "<unk>";

impl Corruption {
    fn rng(&self, index: usize, stream: u64) -> ChaCha8Rng {
        let mut rng = ChaCha8Rng::seed_from_u64(
            self.seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        rng.set_stream(stream);
        rng
    }

    /// Which of `n` words are dropped and which (of the others) are masked.
    fn positions(&self, index: usize, n: usize) -> (Vec<bool>, Vec<bool>) {
        let dropped = chosen(&mut self.rng(index, 1), &vec![false; n], self.drop);
        let masked = chosen(&mut self.rng(index, 2), &dropped, self.mask);
        (dropped, masked)
    }

    /// The corrupted copy of `examples`; `num_labels` classes for label noise.
    pub fn apply(&self, examples: &[Example], num_labels: usize) -> Vec<Example> {
        examples
            .iter()
            .enumerate()
            .map(|(i, e)| self.apply_one(i, e, num_labels))
            .collect()
    }

    fn apply_one(&self, index: usize, example: &Example, num_labels: usize) -> Example {
        match example {
            Example::Text { text, label } => {
                let words: Vec<&str> = text.split_whitespace().collect();
                let (dropped, masked) = self.positions(index, words.len());
                let kept: Vec<&str> = words
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| !dropped[*j])
                    .map(|(j, w)| if masked[j] { UNKNOWN_WORD } else { *w })
                    .collect();
                let mut rng = self.rng(index, 3);
                Example::Text {
                    text: kept.join(" "),
                    label: flip(&mut rng, *label, num_labels, self.label_noise),
                }
            }
            Example::Tagged { tokens, tags } => {
                let n = tokens.len();
                let (dropped, masked) = self.positions(index, n);
                let tokens = tokens
                    .iter()
                    .enumerate()
                    .map(|(j, w)| {
                        if dropped[j] || masked[j] {
                            UNKNOWN_WORD.to_string()
                        } else {
                            w.clone()
                        }
                    })
                    .collect();
                let mut rng = self.rng(index, 3);
                let tags = tags
                    .iter()
                    .map(|&t| flip(&mut rng, t, num_labels, self.label_noise))
                    .collect();
                Example::Tagged { tokens, tags }
            }
        }
    }
}

/// `round(rate * n)` of the positions where `taken` is false, uniformly without replacement.
fn chosen(rng: &mut ChaCha8Rng, taken: &[bool], rate: f64) -> Vec<bool> {
    let k = (rate * taken.len() as f64).round() as usize;
    let mut out = vec![false; taken.len()];
    let mut free: Vec<usize> = (0..taken.len()).filter(|&i| !taken[i]).collect();
    free.shuffle(rng);
    for &i in free.iter().take(k) {
        out[i] = true;
    }
    out
}

/// With probability `rate`, a label other than `label`, uniformly.
fn flip(rng: &mut ChaCha8Rng, label: usize, num_labels: usize, rate: f64) -> usize {
    if num_labels < 2 || rate == 0.0 || !rng.random_bool(rate) {
        return label;
    }
    let other = rng.random_range(0..num_labels - 1);
    if other >= label {
        other + 1
    } else {
        other
    }
}
