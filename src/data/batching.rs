//! From examples to tensors: tokenization with truncation and NER word-to-sub-token alignment,
//! dynamic padding (right side, so the last real token is the classification pool), and a
//! seeded, length-bucketed sampler whose position (epoch, batch) can be saved and restored.
use super::readers::Example;
use super::TextTokenizer;
use crate::error::{Error, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

/// One tokenized example: a class label, or (NER) a label per token, -100 where no label applies.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub ids: Vec<i64>,
    /// The class (sequence classification); -100 for token classification.
    pub label: i64,
    /// Per-token labels (token classification): the word's tag on its first sub-token.
    pub token_labels: Vec<i64>,
    /// Words that fit after truncation (token classification).
    pub words: usize,
    /// The example's id: its index in its split (plus the split's offset, see `load_data`); the
    /// external memory never returns an entry of the querying example.
    pub id: i64,
}

/// Label value the loss ignores.
pub const IGNORE: i64 = -100;

/// Tokenizes `examples` with truncation to `max_length` tokens (a BOS the tokenizer adds counts).
/// Words of a tagged example are encoded one by one with a leading space (as transformers'
/// `is_split_into_words` with `add_prefix_space`); a word's tag goes on its first sub-token.
pub fn encode(
    tok: &TextTokenizer,
    examples: &[Example],
    max_length: usize,
) -> Result<Vec<Encoded>> {
    let fallback = tok.eos_id.or(tok.bos_id).map(i64::from).unwrap_or(0);
    examples
        .iter()
        .enumerate()
        .map(|(id, ex)| match ex {
            Example::Text { text, label } => {
                let mut ids: Vec<i64> = tok.encode(text)?.into_iter().map(i64::from).collect();
                ids.truncate(max_length);
                if ids.is_empty() {
                    // An empty text still needs one position to pool from.
                    ids.push(fallback);
                }
                Ok(Encoded {
                    ids,
                    label: *label as i64,
                    token_labels: Vec::new(),
                    words: 0,
                    id: id as i64,
                })
            }
            Example::Tagged { tokens, tags } => {
                let mut ids: Vec<i64> = Vec::new();
                let mut labels: Vec<i64> = Vec::new();
                if tok.add_bos {
                    ids.extend(tok.bos_id.map(i64::from));
                    labels.resize(ids.len(), IGNORE);
                }
                let mut words = 0;
                for (word, &tag) in tokens.iter().zip(tags) {
                    let enc = tok.inner.encode(format!(" {word}"), false).map_err(|e| {
                        Error::Tokenizer {
                            path: "<memory>".into(),
                            msg: e.to_string(),
                        }
                    })?;
                    let piece: Vec<i64> = enc.get_ids().iter().map(|&i| i64::from(i)).collect();
                    if piece.is_empty() || ids.len() + piece.len() > max_length {
                        break;
                    }
                    labels.push(tag as i64);
                    labels.extend(std::iter::repeat_n(IGNORE, piece.len() - 1));
                    ids.extend(piece);
                    words += 1;
                }
                if ids.is_empty() {
                    ids.push(fallback);
                    labels.push(IGNORE);
                }
                Ok(Encoded {
                    ids,
                    label: IGNORE,
                    token_labels: labels,
                    words,
                    id: id as i64,
                })
            }
        })
        .collect()
}

/// A padded batch: `input_ids`, `attention_mask` `(b, t)`, `labels` `(b,)` or, for token
/// classification, `(b, t)` with -100 on padding.
pub struct Batch {
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
    pub labels: Tensor,
    /// Real (non-padding) tokens in the batch.
    pub n_tokens: usize,
    /// `(b,)` example ids.
    pub example_ids: Tensor,
}

/// Pads `items` on the right to the longest one with `pad_id`.
pub fn collate(items: &[&Encoded], pad_id: i64, device: Device) -> Batch {
    collate_to(items, pad_id, device, 0)
}

/// [`collate`] padding to at least `min_len` positions (a data-parallel rank pads its share to
/// the global batch's longest example, so its rows have the shapes one process would use).
pub fn collate_to(items: &[&Encoded], pad_id: i64, device: Device, min_len: usize) -> Batch {
    let seq_len = items
        .iter()
        .map(|e| e.ids.len())
        .max()
        .unwrap_or(1)
        .max(min_len);
    let tokens = items.first().is_some_and(|e| !e.token_labels.is_empty());
    let mut ids = Vec::with_capacity(items.len() * seq_len);
    let mut mask = Vec::with_capacity(items.len() * seq_len);
    let mut labels = Vec::with_capacity(if tokens {
        items.len() * seq_len
    } else {
        items.len()
    });
    for e in items {
        let pad = seq_len - e.ids.len();
        ids.extend(&e.ids);
        ids.extend(std::iter::repeat_n(pad_id, pad));
        mask.extend(std::iter::repeat_n(1i64, e.ids.len()));
        mask.extend(std::iter::repeat_n(0i64, pad));
        if tokens {
            labels.extend(&e.token_labels);
            labels.extend(std::iter::repeat_n(IGNORE, pad));
        } else {
            labels.push(e.label);
        }
    }
    let shape = [items.len() as i64, seq_len as i64];
    let labels = Tensor::from_slice(&labels);
    Batch {
        input_ids: upload(Tensor::from_slice(&ids).view(shape), device),
        attention_mask: upload(Tensor::from_slice(&mask).view(shape), device),
        labels: upload(if tokens { labels.view(shape) } else { labels }, device),
        n_tokens: items.iter().map(|e| e.ids.len()).sum(),
        example_ids: upload(
            Tensor::from_slice(&items.iter().map(|e| e.id).collect::<Vec<_>>()),
            device,
        ),
    }
}

/// `t` on `device`. To a GPU through pinned (page-locked) memory with a non-blocking copy, as
/// PyTorch's `DataLoader(pin_memory=True)` and `.to(device, non_blocking=True)`: the host does not
/// wait for the copy (a copy from pageable memory syncs), and the caching host allocator keeps the
/// pinned buffer alive until the copy has run.
fn upload(t: Tensor, device: Device) -> Tensor {
    match device {
        Device::Cuda(_) => t
            .pin_memory(device)
            .to_device_(device, t.kind(), true, false),
        _ => t.to_device(device),
    }
}

/// Rank `rank`'s share of a global batch (example indices, in the sampler's order): the contiguous
/// slice `[rank * s, (rank + 1) * s)` with `s = ceil(n / world_size)`. When `n` is not a multiple
/// of the world size (the last batch of an epoch), the global batch is padded by wrapping — its
/// first examples repeat — so every rank gets `s` examples and runs the same collectives. Shares
/// are contiguous, not strided, so that gathering them in rank order gives back the global batch's
/// order (the external memory's ring slots then match one process's). One rank: the batch itself.
pub fn shard(global: &[usize], rank: usize, world_size: usize) -> Vec<usize> {
    if world_size <= 1 || global.is_empty() {
        return global.to_vec();
    }
    let s = global.len().div_ceil(world_size);
    (rank * s..(rank + 1) * s)
        .map(|j| global[j % global.len()])
        .collect()
}

/// The global batch padded as [`shard`] pads it (every rank's share, in rank order).
pub fn padded(global: &[usize], world_size: usize) -> Vec<usize> {
    (0..world_size.max(1))
        .flat_map(|r| shard(global, r, world_size))
        .collect()
}

/// Where a sampler stands; saved with checkpoints.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplerState {
    pub epoch: u64,
    /// Batches of this epoch already handed out.
    pub batch: usize,
}

/// Seeded shuffling with length bucketing: each epoch shuffles the examples, sorts windows of
/// `BUCKET` batches by length (less padding), then shuffles the batch order.
pub struct Sampler {
    seed: u64,
    batch_size: usize,
    pub state: SamplerState,
    /// The current epoch's batches, computed once per epoch.
    epoch_cache: Option<(u64, Vec<Vec<usize>>)>,
}

const BUCKET: usize = 50;

impl Sampler {
    pub fn new(seed: u64, batch_size: usize) -> Self {
        Sampler {
            seed,
            batch_size,
            state: SamplerState { epoch: 0, batch: 0 },
            epoch_cache: None,
        }
    }

    /// The batches (example indices) of `epoch`, a pure function of seed, epoch and lengths.
    pub fn epoch_batches(&self, epoch: u64, lengths: &[usize]) -> Vec<Vec<usize>> {
        let mut rng =
            ChaCha8Rng::seed_from_u64(self.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut order: Vec<usize> = (0..lengths.len()).collect();
        order.shuffle(&mut rng);
        let mut batches: Vec<Vec<usize>> = Vec::new();
        for window in order.chunks(self.batch_size * BUCKET) {
            let mut w = window.to_vec();
            w.sort_by_key(|&i| lengths[i]);
            batches.extend(w.chunks(self.batch_size).map(<[usize]>::to_vec));
        }
        batches.shuffle(&mut rng);
        batches
    }

    /// The next batch, moving to the next epoch when one is used up. The epoch's order is
    /// computed once per epoch (and again after the state was restored). Empty for no examples.
    pub fn next_batch(&mut self, lengths: &[usize]) -> Vec<usize> {
        if self.state.batch >= self.batches_per_epoch(lengths.len()) {
            self.state = SamplerState {
                epoch: self.state.epoch + 1,
                batch: 0,
            };
        }
        let epoch = self.state.epoch;
        if self.epoch_cache.as_ref().is_none_or(|(e, _)| *e != epoch) {
            self.epoch_cache = Some((epoch, self.epoch_batches(epoch, lengths)));
        }
        let batch = self.state.batch;
        self.state.batch += 1;
        match &self.epoch_cache {
            Some((_, batches)) if batch < batches.len() => batches[batch].clone(),
            _ => Vec::new(),
        }
    }

    pub fn batches_per_epoch(&self, n: usize) -> usize {
        n.div_ceil(self.batch_size)
    }
}
