//! Evaluation: the ONE batched no-grad inference loop (evaluation, `predict` and `memory build`
//! all run through [`for_each_batch`]), the per-unit outputs it collects, the units calibration
//! is measured on, and the scores of a split (task metrics, ECE/NLL/Brier/AURC raw and after the
//! fitted temperature). Non-finite outputs are an error, never a number in a report.
use super::metrics::{accuracy, macro_f1};
use crate::data::batching::{collate, Batch, Encoded, IGNORE};
use crate::error::{Error, Result};
use crate::task::loss::cross_entropy;
use crate::task::TaskModel;
use crate::uncertainty::calibration::calibrated;
use crate::uncertainty::metrics::argmax;
use crate::uncertainty::plots::{write_calibration_plots, CalibrationView};
use crate::uncertainty::{calibration_scores, CalibrationScores};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::Reduction;

/// Loss and metrics on one split. Classification: accuracy and macro-F1 over examples. NER:
/// accuracy over words, macro-F1 over tag classes, and entity-level precision/recall/F1.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct EvalResult {
    #[serde(with = "crate::finite_json")]
    pub loss: f64,
    #[serde(with = "crate::finite_json")]
    pub accuracy: f64,
    #[serde(with = "crate::finite_json")]
    pub macro_f1: f64,
    pub examples: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entity: Option<EntityScores>,
    /// ECE, NLL, Brier, AURC of the raw probabilities (NER: on entity words).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<CalibrationScores>,
    /// The post-hoc temperature, when one was fitted.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::finite_json::option"
    )]
    pub temperature: Option<f64>,
    /// The same scores after temperature scaling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibrated: Option<CalibrationScores>,
}

impl EvalResult {
    /// Whether every number in it is finite (a run whose validation loss is NaN is flagged).
    pub fn is_finite(&self) -> bool {
        [self.loss, self.accuracy, self.macro_f1]
            .iter()
            .chain(self.temperature.iter())
            .all(|x| x.is_finite())
            && self
                .calibration
                .iter()
                .chain(&self.calibrated)
                .all(CalibrationScores::is_finite)
            && self
                .entity
                .iter()
                .all(|e| [e.precision, e.recall, e.f1].iter().all(|x| x.is_finite()))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EntityScores {
    #[serde(with = "crate::finite_json")]
    pub precision: f64,
    #[serde(with = "crate::finite_json")]
    pub recall: f64,
    #[serde(with = "crate::finite_json")]
    pub f1: f64,
}

/// The one inference loop: `data` in batches of `batch_size` (length-sorted when `sorted`, in
/// the given order otherwise), the model in evaluation mode, no gradients; `visit` gets each
/// batch with the indices (into `data`) of its examples.
pub fn for_each_batch(
    model: &TaskModel,
    data: &[Encoded],
    batch_size: usize,
    sorted: bool,
    mut visit: impl FnMut(&[usize], &Batch) -> Result<()>,
) -> Result<()> {
    model.training.set(false);
    let _g = tch::no_grad_guard();
    let mut order: Vec<usize> = (0..data.len()).collect();
    if sorted {
        order.sort_by_key(|&i| data[i].ids.len());
    }
    let pad = match &model.tokenizer {
        Some(tok) => tok.padding_id(),
        None => 0,
    };
    for chunk in order.chunks(batch_size.max(1)) {
        let items: Vec<&Encoded> = chunk.iter().map(|&i| &data[i]).collect();
        let batch = collate(&items, pad, model.device());
        visit(chunk, &batch)?;
    }
    Ok(())
}

/// What one pass over a split yields: per example, the gold label, prediction and logits of each
/// scored unit (the example, or each word that fits for NER), and the summed loss.
#[derive(Serialize, Deserialize)]
pub struct Outputs {
    /// Token classification (units are words), from the data rather than guessed from counts.
    pub tagged: bool,
    pub gold: Vec<Vec<usize>>,
    pub pred: Vec<Vec<usize>>,
    pub logits: Vec<Vec<Vec<f64>>>,
    pub loss_sum: f64,
    pub units: usize,
    /// Per example, its units' summed loss (what `loss_sum` adds up).
    pub example_loss: Vec<f64>,
}

impl Outputs {
    /// The first `n` examples' outputs.
    fn truncate(&mut self, n: usize) {
        self.gold.truncate(n);
        self.pred.truncate(n);
        self.logits.truncate(n);
        self.example_loss.truncate(n);
        self.units = self.gold.iter().map(Vec::len).sum();
        self.loss_sum = self.example_loss.iter().sum();
    }

    /// `parts` one after another (in the order of the examples they cover).
    fn concat(parts: Vec<Outputs>, tagged: bool) -> Outputs {
        let mut out = Outputs {
            tagged,
            gold: Vec::new(),
            pred: Vec::new(),
            logits: Vec::new(),
            loss_sum: 0.0,
            units: 0,
            example_loss: Vec::new(),
        };
        for p in parts {
            out.gold.extend(p.gold);
            out.pred.extend(p.pred);
            out.logits.extend(p.logits);
            out.example_loss.extend(p.example_loss);
        }
        out.truncate(out.gold.len());
        out
    }
}

/// The model's predictive logits for every unit of `data`, sharded over the model's ranks: rank r
/// scores a contiguous share of `ceil(n / W)` examples (the last share padded by wrapping, so every
/// rank runs the same number of batches — the memory reads are collective), and the shares are
/// gathered in order. Every rank gets the whole result. One process: [`local_outputs`].
pub fn outputs(model: &TaskModel, data: &[Encoded], batch_size: usize) -> Result<Outputs> {
    let group = model.group.clone();
    let w = group.world_size();
    if w == 1 {
        return local_outputs(model, data, batch_size);
    }
    let per = data.len().div_ceil(w);
    let start = (group.rank() * per).min(data.len());
    let real = per.min(data.len() - start);
    let share: Vec<Encoded> = match data.len() {
        0 => Vec::new(),
        n => (0..per).map(|j| data[(start + j) % n].clone()).collect(),
    };
    let mut mine = local_outputs(model, &share, batch_size)?;
    mine.truncate(real);
    let bytes = serde_json::to_vec(&mine)
        .map_err(|e| Error::Internal(format!("encoding evaluation outputs: {e}")))?;
    let parts = group.all_gather(&tch::Tensor::from_slice(&bytes))?;
    let parts = parts
        .iter()
        .enumerate()
        .map(|(r, t)| {
            let b = crate::host::u8s(t)?;
            serde_json::from_slice::<Outputs>(&b).map_err(|e| Error::Collective {
                rank: group.rank(),
                msg: format!("rank {r}'s evaluation outputs do not decode: {e}"),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Outputs::concat(parts, mine.tagged))
}

/// The model's predictive logits (see [`TaskModel::predictive_logits`]) for every unit of
/// `data`, in this process. Fails, naming the examples (their positions in `data`), when any is
/// not finite.
pub fn local_outputs(model: &TaskModel, data: &[Encoded], batch_size: usize) -> Result<Outputs> {
    let mut out = Outputs {
        tagged: data.first().is_some_and(|e| !e.token_labels.is_empty()),
        gold: vec![Vec::new(); data.len()],
        pred: vec![Vec::new(); data.len()],
        logits: vec![Vec::new(); data.len()],
        loss_sum: 0.0,
        units: 0,
        example_loss: vec![0.0; data.len()],
    };
    for_each_batch(model, data, batch_size, true, |chunk, batch| {
        let ids: Vec<i64> = chunk.iter().map(|&i| data[i].id).collect();
        let logits = model.predictive_logits_of(
            &batch.input_ids,
            &batch.attention_mask,
            &batch.example_ids,
            &ids,
        )?;
        let n = logits.size()[logits.dim() - 1];
        let labels = crate::host::i64s(&batch.labels)?;
        // (b * units per example, n_labels)
        let rows: Vec<Vec<f64>> = crate::host::f64s(&logits)?
            .chunks(n as usize)
            .map(<[f64]>::to_vec)
            .collect();
        let per_row = labels.len() / chunk.len();
        let mut bad = Vec::new();
        for (k, &i) in chunk.iter().enumerate() {
            for j in k * per_row..(k + 1) * per_row {
                if labels[j] == IGNORE {
                    continue;
                }
                let z = &rows[j];
                if z.iter().any(|x| !x.is_finite()) {
                    bad.push(i);
                    break;
                }
                out.gold[i].push(labels[j] as usize);
                out.pred[i].push(argmax(z));
                out.logits[i].push(z.clone());
                out.units += 1;
            }
        }
        if !bad.is_empty() {
            bad.sort_unstable();
            return Err(Error::NonFinite(format!(
                "the model gave NaN or infinite logits for {} example(s) of this batch (positions {:?} in the split, 0-based); its weights are likely broken",
                bad.len(),
                &bad[..bad.len().min(8)]
            )));
        }
        let unit_loss = crate::host::f64s(&cross_entropy(&logits, &batch.labels, Reduction::None))?;
        for (k, &i) in chunk.iter().enumerate() {
            let l: f64 = unit_loss[k * per_row..(k + 1) * per_row].iter().sum();
            out.example_loss[i] = l;
            out.loss_sum += l;
        }
        Ok(())
    })?;
    Ok(out)
}

/// The units calibration is measured on: every example, or for NER the words whose gold tag is
/// an entity tag (not `O`). Returns (logits, gold labels).
pub fn calibration_units(out: &Outputs, label_names: &[String]) -> (Vec<Vec<f64>>, Vec<usize>) {
    let mut logits = Vec::new();
    let mut gold = Vec::new();
    for (g, z) in out.gold.iter().zip(&out.logits) {
        for (&y, row) in g.iter().zip(z) {
            if !out.tagged || label_names[y] != "O" {
                logits.push(row.clone());
                gold.push(y);
            }
        }
    }
    (logits, gold)
}

/// Loss and metrics of `model` on `data` (see [`EvalResult`]); calibration scores raw and, if the
/// model has a fitted temperature, after scaling.
pub fn evaluate(
    model: &TaskModel,
    data: &[Encoded],
    batch_size: usize,
    label_names: &[String],
) -> Result<EvalResult> {
    let out = outputs(model, data, batch_size)?;
    Ok(scores(&out, label_names, model.temperature, data.len()))
}

/// [`EvalResult`] of collected outputs.
pub fn scores(
    out: &Outputs,
    label_names: &[String],
    temperature: Option<f64>,
    examples: usize,
) -> EvalResult {
    let flat = |v: &[Vec<usize>]| v.iter().flatten().copied().collect::<Vec<_>>();
    let (g, p) = (flat(&out.gold), flat(&out.pred));
    let entity = out.tagged.then(|| {
        let name = |seqs: &[Vec<usize>]| -> Vec<Vec<String>> {
            seqs.iter()
                .map(|s| s.iter().map(|&t| label_names[t].clone()).collect())
                .collect()
        };
        let (precision, recall, f1) =
            super::seqeval::precision_recall_f1(&name(&out.gold), &name(&out.pred));
        EntityScores {
            precision,
            recall,
            f1,
        }
    });
    let (logits, gold) = calibration_units(out, label_names);
    let at = |t: f64| calibration_scores(&calibrated(&logits, t), &gold);
    EvalResult {
        loss: out.loss_sum / out.units.max(1) as f64,
        accuracy: accuracy(&p, &g),
        macro_f1: macro_f1(&p, &g, label_names.len()),
        examples,
        entity,
        calibration: (!gold.is_empty()).then(|| at(1.0)),
        temperature,
        calibrated: temperature.filter(|_| !gold.is_empty()).map(at),
    }
}

/// The reliability diagram and risk-coverage plot in `dir`, of the test split's outputs or,
/// without a test split, the validation split's. A failure (no font on the machine, say) is a
/// warning: pictures never fail a run.
pub fn write_plots(
    dir: &Path,
    validation: &Outputs,
    test: Option<&Outputs>,
    label_names: &[String],
    temperature: Option<f64>,
) {
    let (split, out) = match test {
        Some(t) => ("test", t),
        None => ("validation", validation),
    };
    let (logits, labels) = calibration_units(out, label_names);
    if labels.is_empty() {
        return;
    }
    let raw = calibrated(&logits, 1.0);
    let scaled = temperature.map(|t| (t, calibrated(&logits, t)));
    let view = CalibrationView {
        split,
        raw: &raw,
        calibrated: scaled.as_ref().map(|(t, p)| (*t, p.as_slice())),
        labels: &labels,
    };
    match write_calibration_plots(dir, &view) {
        Ok(paths) => tracing::info!(?paths, "calibration plots"),
        Err(e) => tracing::warn!("calibration plots skipped: {e}"),
    }
}
