//! Activation checkpointing: a training micro-batch's forward and backward with the blocks below
//! the first plugged one recomputed in the backward pass (see [`TaskModel::forward_backward`]).
use super::model::{Entry, Pass, TaskModel};
use crate::error::{Error, Result};
use crate::ffi::streams;
use crate::models::attention::BatchMask;
use crate::models::NoHook;
use tch::Tensor;

/// One block of the checkpointed part of a forward: its input, its output when its graph is kept
/// (None: recomputed in the backward), and the random-draw counter before it.
struct Piece {
    block: usize,
    input: Tensor,
    output: Option<Tensor>,
    draws: Option<u64>,
}

impl TaskModel {
    /// The first block whose output a plug-in (UM's estimators, the memory) changes; the blocks
    /// below it are the backbone's alone.
    pub(super) fn first_plugged_layer(&self) -> usize {
        let um = self.um.as_ref().and_then(|um| um.features.first_layer());
        let memory = self.memory.as_ref().map(|m| m.layer);
        [um, memory]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or_else(|| self.backbone.arch().num_layers())
    }

    /// A training micro-batch's forward and backward: the loss over `units` (see
    /// [`super::loss::loss_over`]) divided by `accumulation`, its gradients accumulated into the
    /// trainable tensors; returns the loss, detached and still on the device (reading it
    /// would sync: the trainer reads it once per step). With activation checkpointing every N-th block below
    /// the first plugged one (N = 1: all of them) runs twice: forward without autograd keeping
    /// only its input, then — after the rest of the model's forward and backward — recomputed,
    /// from the top down, each block backpropagating the gradient of its output
    /// (`(y * g).sum()`) and handing its input's gradient down (the other blocks keep their graph
    /// from a leaf input and do the same without recomputing). The per-example random streams'
    /// draw counter is set back before each recompute, so dropout and noise replay exactly.
    pub fn forward_backward(
        &self,
        input_ids: &Tensor,
        mask: &Tensor,
        example_ids: Option<&Tensor>,
        labels: &Tensor,
        units: Option<f64>,
        accumulation: f64,
    ) -> Result<Tensor> {
        let plugged = self.first_plugged_layer();
        let every = self.checkpoint_every.filter(|_| self.training.get());
        let Some(every) = every.filter(|_| plugged > 0) else {
            let fwd = self.forward(input_ids, mask, example_ids)?;
            let loss = self.loss_over(&fwd, labels, units) / accumulation;
            loss.backward();
            return Ok(loss.detach());
        };
        if streams::draws().is_none() {
            return Err(Error::Internal(
                "a checkpointed forward must run inside ffi::streams::with_streams, so that the recomputed blocks replay their draws".into(),
            ));
        }
        let batch = BatchMask::new(input_ids, self.attention_mask(mask), None);
        // Block i of the first `plugged` is recomputed when i % every == 0 (only its input is
        // kept); any other keeps its graph from a leaf input, as torchtune's "every N-th layer".
        let mut pieces: Vec<Piece> = Vec::with_capacity(plugged);
        let mut top = tch::no_grad(|| self.in_autocast(|| self.backbone.embed(input_ids, &batch)));
        for block in 0..plugged {
            let draws = streams::draws();
            let run = |x: &Tensor| {
                self.in_autocast(|| {
                    let r = block..block + 1;
                    self.backbone
                        .blocks(x.shallow_clone(), &batch, r, &mut NoHook)
                })
            };
            if block % every == 0 {
                let y = tch::no_grad(|| run(&top));
                pieces.push(Piece {
                    block,
                    input: std::mem::replace(&mut top, y),
                    output: None,
                    draws,
                });
            } else {
                let input = top.detach().set_requires_grad(true);
                let y = run(&input);
                top = y.detach();
                pieces.push(Piece {
                    block,
                    input,
                    output: Some(y),
                    draws,
                });
            }
        }
        let entry_hidden = top.detach().set_requires_grad(true);
        let entry = Entry {
            hidden: &entry_hidden,
            layer: plugged,
            batch: &batch,
        };
        let fwd = self.forward_with(input_ids, mask, example_ids, Pass::Plain, Some(&entry))?;
        let loss = self.loss_over(&fwd, labels, units) / accumulation;
        loss.backward();
        let value = loss.detach();
        let after = streams::draws();
        let mut grad = entry_hidden.grad();
        for piece in pieces.into_iter().rev() {
            let (x, y) = match piece.output {
                Some(y) => (piece.input, y),
                None => {
                    if let Some(n) = piece.draws {
                        streams::set_draws(n);
                    }
                    let x = piece.input.detach().set_requires_grad(true);
                    let r = piece.block..piece.block + 1;
                    let y = self.in_autocast(|| {
                        self.backbone
                            .blocks(x.shallow_clone(), &batch, r.clone(), &mut NoHook)
                    });
                    (x, y)
                }
            };
            (y.to_kind(tch::Kind::Float) * grad.to_kind(tch::Kind::Float))
                .sum(tch::Kind::Float)
                .backward();
            grad = x.grad();
        }
        // Full fine-tuning trains the embeddings too.
        if self.full {
            let e = self.in_autocast(|| self.backbone.embed(input_ids, &batch));
            (e.to_kind(tch::Kind::Float) * grad.to_kind(tch::Kind::Float))
                .sum(tch::Kind::Float)
                .backward();
        }
        if let Some(n) = after {
            streams::set_draws(n);
        }
        Ok(value)
    }
}
