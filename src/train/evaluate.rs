//! `umtune eval`: a saved run scored on its validation and test splits (or on another dataset,
//! under a robustness protocol, with MC sampling), as one row of the results table.
use super::eval::write_plots;
use super::eval::{outputs, scores};
use super::report::ReportEntry;
use super::restore::{load_run, LoadedRun};
use super::run_files::{read_summary, Summary};
use crate::data::corrupt::Corruption;
use crate::data::dataset::load_data;
use crate::error::{Error, Result};
use std::path::PathBuf;

/// `umtune eval`'s arguments.
#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    pub run_dir: PathBuf,
    /// A dataset name or directory to evaluate on instead of the run's.
    #[arg(long)]
    pub data: Option<String>,
    /// Robustness protocol on the evaluated splits, e.g. `drop=0.3` or `mask=0.2,seed=7`
    /// (keys: drop, mask, label_noise, seed).
    #[arg(long)]
    pub corrupt: Option<String>,
    /// Average N stochastic passes (MC sampling; runs with uncertainty modeling).
    #[arg(long, value_name = "N")]
    pub mc: Option<i64>,
    /// Write the reliability diagram and risk-coverage plot (PNG) of the test split, or the
    /// validation split without one, into this directory.
    #[arg(long, value_name = "DIR")]
    pub plots: Option<PathBuf>,
    /// Keep the scores in the run directory as `evals/PROTOCOL.json` (e.g. `evals/drop=0.3.json`,
    /// `evals/mc=16.json`), where `umtune report` draws the robustness curves from.
    #[arg(long)]
    pub save: bool,
}

/// The directory of a run's saved evaluations (`umtune eval --save`).
pub const EVALS_DIR: &str = "evals";

/// What a saved evaluation was: the corruption of the evaluated splits, the MC passes, another
/// dataset; its file name is [`Protocol::name`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Protocol {
    #[serde(default)]
    pub corruption: Corruption,
    #[serde(default)]
    pub mc: Option<i64>,
    #[serde(default)]
    pub data: Option<String>,
}

impl Protocol {
    /// `drop=0.3`, `mask=0.1,seed=7`, `mc=16`, `data=NAME,drop=0.3`; `clean` for none.
    pub fn name(&self) -> String {
        let c = &self.corruption;
        let mut parts: Vec<String> = self
            .data
            .iter()
            .map(|d| format!("data={}", d.replace(['/', '\\'], "_")))
            .collect();
        for (key, v) in [
            ("drop", c.drop),
            ("mask", c.mask),
            ("label_noise", c.label_noise),
        ] {
            if v > 0.0 {
                parts.push(format!("{key}={v}"));
            }
        }
        if !c.is_none() && c.seed != Corruption::default().seed {
            parts.push(format!("seed={}", c.seed));
        }
        parts.extend(self.mc.map(|n| format!("mc={n}")));
        if parts.is_empty() {
            "clean".into()
        } else {
            parts.join(",")
        }
    }
}

/// One file of `evals/`: the protocol and the run's summary with the scores under it.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct SavedEval {
    pub protocol: Protocol,
    pub summary: Summary,
}

/// What an evaluation found: the table row, and the corruption applied (when asked for one).
pub struct Evaluation {
    pub corruption: Option<Corruption>,
    pub entry: ReportEntry,
}

pub fn evaluate(args: &EvalArgs) -> Result<Evaluation> {
    let mut overrides: Vec<String> = args
        .data
        .iter()
        .map(|d| format!("data.dataset={d}"))
        .collect();
    overrides.extend(args.mc.map(|n| format!("uncertainty.mc_predict={n}")));
    let mut run = load_run(&args.run_dir, &overrides)?;
    if let Some(spec) = &args.corrupt {
        run.config.data.eval_corruption = Corruption::parse(spec)?;
    }
    let data = load_data(&run.config, run.model.tokenizer()?)?;
    let bs = run.config.train.eval_batch_size();
    let t = run.model.temperature;
    let val = outputs(&run.model, &data.validation, bs)?;
    let test = data
        .test
        .as_ref()
        .map(|d| outputs(&run.model, d, bs).map(|o| (o, d.len())))
        .transpose()?;
    let mut summary = summary_of(&run);
    summary.validation = scores(&val, &run.label_names, t, data.validation.len());
    summary.test = test
        .as_ref()
        .map(|(o, n)| scores(o, &run.label_names, t, *n));
    if let Some(dir) = &args.plots {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        write_plots(
            dir,
            &val,
            test.as_ref().map(|(o, _)| o),
            &run.label_names,
            t,
        );
    }
    let mut entry = ReportEntry::finished(summary);
    if !run.finished {
        entry.status = format!(
            "unfinished run, weights of step {}",
            run.weights_step.unwrap_or(0)
        );
    }
    if args.save {
        let summary = entry
            .summary
            .clone()
            .ok_or_else(|| Error::Internal("no summary".into()))?;
        let protocol = Protocol {
            corruption: run.config.data.eval_corruption,
            mc: args.mc,
            data: args.data.clone(),
        };
        let dir = run.dir.join(EVALS_DIR);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let path = dir.join(format!("{}.json", protocol.name()));
        let saved = SavedEval { protocol, summary };
        let text = serde_json::to_string_pretty(&saved)
            .map_err(|e| Error::Internal(format!("saved evaluation: {e}")))?;
        crate::atomic_file::write_atomic(&path, text.as_bytes())?;
    }
    Ok(Evaluation {
        corruption: args
            .corrupt
            .is_some()
            .then_some(run.config.data.eval_corruption),
        entry,
    })
}

/// The summary an evaluation's row starts from: the run's own for a finished run, else one made
/// from the loaded run (no training throughput to report).
fn summary_of(run: &LoadedRun) -> Summary {
    if run.finished {
        if let Ok(s) = read_summary(&run.dir) {
            return s;
        }
    }
    Summary {
        steps: run.weights_step.unwrap_or(0),
        ..Summary::of(
            &run.config,
            &run.dir,
            run.label_names.clone(),
            run.model.trainable_params(),
            run.model.backbone.num_parameters(),
        )
    }
}
