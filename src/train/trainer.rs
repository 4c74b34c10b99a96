//! The fine-tuning loop, and only the loop: micro-batches with gradient accumulation, the global
//! decisions (skip a non-finite step, stop on a signal) agreed through the collective, gradient
//! synchronization at exactly one point ([`sync_gradients`]), clipping, AdamW, memory commits,
//! logging and periodic evaluation; then temperature fitting, final evaluation and the summary.
//! Data, model, evaluation, reports and files live in their own modules.
use super::checkpoint::{self, LoopState};
use super::diagnostics::part_of;
use super::eval::{evaluate, outputs, scores};
use super::optimizer::AdamW;
use super::progress::Progress;
use super::resume::{self, Resume, Start};
use super::run_dir::RunDir;
use super::run_files::{read_summary, RunState, Summary};
use super::schedule::learning_rate;
use super::setup::Setup;
use crate::config::Config;
use crate::data::batching::{collate_to, padded, shard, Encoded, Sampler, IGNORE};
use crate::dist::context::signal_name;
use crate::dist::{Collective, ReduceOp, RunContext};
use crate::error::{Error, Result};
use crate::ffi::streams as noise;
use crate::task::TaskModel;
use crate::uncertainty::calibration::{at_search_bound, fit_temperature, T_RANGE};
use std::time::Instant;
use tch::{Kind, Tensor};

/// `umtune train`'s arguments.
#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// TOML experiment config (see configs/).
    pub config: std::path::PathBuf,
    #[command(flatten)]
    pub overrides: crate::config::OverrideArgs,
    /// Continue from a checkpoint: `auto` (the run's newest good checkpoint, a fresh start if it
    /// has none, nothing to do if it finished), a checkpoint directory, or a run directory (its
    /// newest good checkpoint).
    #[arg(long, value_name = "auto|PATH")]
    pub resume: Option<String>,
}

impl TrainArgs {
    pub fn config_args(&self) -> crate::config::ConfigArgs {
        crate::config::ConfigArgs::file(&self.config, &self.overrides)
    }

    pub fn resume(&self) -> Resume {
        self.resume.as_deref().map_or(Resume::No, Resume::parse)
    }
}

/// Trains as `cfg` says and writes the run directory.
pub fn train(cfg: &Config, ctx: &RunContext) -> Result<Summary> {
    train_model(cfg, ctx).map(|(summary, _)| summary)
}

/// [`train`], also handing back the trained model.
pub fn train_model(cfg: &Config, ctx: &RunContext) -> Result<(Summary, TaskModel)> {
    train_resuming(cfg, ctx, &Resume::No)
}

/// [`train_model`], continuing from a checkpoint as `resume` says (see [`checkpoint`]): the
/// weights, optimizer, memory, data order and loop state of the checkpoint's step, so the result
/// is the uninterrupted run's — bitwise at the same world size on the CPU.
pub fn train_resuming(
    cfg: &Config,
    ctx: &RunContext,
    resume: &Resume,
) -> Result<(Summary, TaskModel)> {
    let start = Instant::now();
    let Setup { data, mut model } = Setup::new(cfg, ctx)?;
    let num_labels = data.label_names.len();
    let device = ctx.device;
    let world = ctx.world_size;
    model.broadcast_trainable()?;
    // Every batch below is collated with right padding.
    model
        .right_padded
        .store(true, std::sync::atomic::Ordering::Relaxed);

    let t = &cfg.train;
    let mut opt = AdamW::new(model.named_trainable(), t.weight_decay).with_eps(t.adam_eps);
    let start_at = resume::locate(cfg, ctx, resume)?;
    // Global batches of batch_size per rank; each rank trains on its share (`shard`). A resumed
    // run keeps its checkpoint's global batch at any world size, so the data order continues.
    if let Start::Finished(run) = &start_at {
        return Ok((read_summary(run)?, model));
    }
    let global_batch = match &start_at {
        Start::From { manifest, .. } => manifest.global_batch,
        _ => t.batch_size * world,
    };
    if global_batch % world != 0 {
        return Err(Error::Config(format!(
            "the checkpoint's global batch of {global_batch} examples does not split over {world} ranks: resume on a world size that divides it"
        )));
    }
    if global_batch != t.batch_size * world {
        tracing::info!(
            global_batch,
            per_rank = global_batch / world,
            "resuming with the checkpoint's global batch (train.batch_size is per rank)"
        );
    }
    let mut sampler = Sampler::new(cfg.run.seed, global_batch);
    let lengths: Vec<usize> = data.train.iter().map(|e| e.ids.len()).collect();
    let steps_per_epoch = sampler
        .batches_per_epoch(data.train.len())
        .div_ceil(t.grad_accum)
        .max(1);
    let total = if t.max_steps > 0 {
        t.max_steps
    } else {
        steps_per_epoch * t.epochs
    };
    if let Start::From { manifest, .. } = &start_at {
        if manifest.step > total {
            return Err(Error::Config(format!(
                "the checkpoint is at step {}, past this run's {total} steps (train.max_steps / train.epochs): raise them to continue it",
                manifest.step
            )));
        }
    }
    let warmup = (t.warmup_ratio * total as f64).round() as usize;
    let pad = model.tokenizer()?.padding_id();
    let backbone_params = model.backbone.num_parameters();
    let (mut run, mut log, first_step, mut ls) = match &start_at {
        Start::Fresh(at) => {
            let run = match at {
                Some(path) => RunDir::create_at(path, cfg, ctx, &data.label_names, total)?,
                None => RunDir::create(cfg, ctx, &data.label_names, total)?,
            };
            let mut log = run.metrics()?;
            if cfg.train.tensorboard {
                log = log.with_tensorboard(run.path(), None)?;
            }
            (run, log, 1, LoopState::default())
        }
        Start::Finished(run) => {
            return Err(Error::run(run, "a finished run has nothing to resume"));
        }
        Start::From {
            run,
            checkpoint: dir,
            manifest,
        } => {
            checkpoint::restore(dir, manifest, &model, &mut opt)?;
            sampler.state = manifest.sampler();
            let mut run = RunDir::resume(run, ctx, total)?;
            run.set_step(manifest.step);
            let mut log = run.metrics_from(manifest.step, manifest.step == total)?;
            if cfg.train.tensorboard {
                log = log.with_tensorboard(run.path(), Some(manifest.step))?;
            }
            tracing::info!(checkpoint = %dir.display(), step = manifest.step, world_size = manifest.world_size, "resuming");
            (run, log, manifest.step + 1, manifest.loop_state.clone())
        }
    };
    tracing::info!(
        run_dir = %run.path().display(), train = data.train.len(), validation = data.validation.len(),
        labels = num_labels, steps = total, trainable = model.trainable_params(), "training"
    );

    // The loop and the finish; an error that ends them is recorded in run.json (a signal and a
    // divergence record themselves), so the run does not stay `running` forever.
    let outcome = (|| -> Result<Summary> {
        let progress = Progress::new(total, ctx.is_writer);
        // The UM probes of the last logged step, for the summary.
        let mut last_um = std::collections::BTreeMap::new();
        let snapshot = |run: &RunDir,
                        step: usize,
                        ls: &LoopState,
                        sampler: &Sampler,
                        opt: &AdamW,
                        validation: Option<&super::eval::EvalResult>| {
            run.save_checkpoint(
                cfg,
                ctx,
                &model,
                opt,
                &checkpoint::Snapshot {
                    step,
                    total_steps: total,
                    sampler: sampler.state,
                    global_batch,
                    loop_state: ls,
                    validation,
                },
            )
        };
        // The most device-to-host reads a plain step (no log line, evaluation or checkpoint)
        // made since the last log line.
        let mut unlogged_reads: Option<u64> = None;
        for step in first_step..=total {
            let step_start = Instant::now();
            let reads_at_start = crate::host::reads();
            let logged = step % t.log_every == 0 || step == total;
            if logged {
                model.probe.start();
            }
            model.training.set(true);
            opt.zero_grad();
            let lr = learning_rate(t.schedule, t.lr, step - 1, warmup, total);
            // The loss stays on the device (f64, as the micro-batches add up) until the one read
            // of this step below.
            let mut loss_sum = Tensor::zeros([], (Kind::Double, device));
            for micro in 0..t.grad_accum {
                crate::faults::abort_at(step, micro);
                let global = sampler.next_batch(&lengths);
                let idx = shard(&global, ctx.rank, world);
                let items: Vec<&Encoded> = idx.iter().map(|&i| &data.train[i]).collect();
                // Padded to the global batch's longest example, and each example's dropout and
                // noise keyed by its position in the global batch: every rank's rows are the rows
                // one process would compute.
                let longest = global.iter().map(|&i| lengths[i]).max().unwrap_or(1);
                let batch = collate_to(&items, pad, device, longest);
                ls.tokens += batch.n_tokens;
                let first = ctx.rank * idx.len();
                let keys = (first..first + idx.len())
                    .map(|position| noise::example_key(cfg.run.seed, step, micro, position))
                    .collect();
                // Normalized by the global batch's labelled units, so N ranks step as one process
                // at N times the batch (rank gradients are averaged, hence the division by N).
                let units = (world > 1).then(|| {
                    labelled_units(&padded(&global, world), &data.train) as f64 / world as f64
                });
                // The backward runs inside the streams too: checkpointed blocks replay their draws.
                let loss = noise::with_streams(keys, || {
                    model.forward_backward(
                        &batch.input_ids,
                        &batch.attention_mask,
                        Some(&batch.example_ids),
                        &batch.labels,
                        units,
                        t.grad_accum as f64,
                    )
                })?;
                loss_sum += loss.to_kind(Kind::Double);
            }
            // The global loss and stop signal (see `Consensus`) and the synchronized gradients'
            // norms, read together: this step's one device-to-host read. Every rank then skips,
            // or none does, stops after this step or none does, and rank 0 logs the job's loss.
            let consensus = step_consensus(
                ctx.group.as_ref(),
                &loss_sum,
                ctx.stop.requested().unwrap_or(0),
            )?;
            let sync_start = Instant::now();
            sync_gradients(ctx.group.as_ref(), &opt)?;
            ls.sync_secs += sync_start.elapsed().as_secs_f64();
            let norms = opt.grad_norms(part_of);
            let read = crate::host::f64s(&Tensor::cat(
                &[consensus, norms.values.to_kind(Kind::Double)],
                0,
            ))?;
            let (agreed, read) = read.split_at(world + 1);
            let agreed = Consensus::of(agreed);
            let loss_value = agreed.loss;
            if !loss_value.is_finite() {
                ls.skipped += 1;
                ls.bad_in_a_row += 1;
                model.discard_memory()?;
                progress.suspend(|| tracing::warn!(step, "non-finite loss: step skipped"));
                if ls.bad_in_a_row >= t.max_bad_steps {
                    progress.finish();
                    return Err(diverged(&mut run, step, ls.bad_in_a_row));
                }
            } else {
                ls.bad_in_a_row = 0;
                if let Some(path) = crate::faults::gradient_dump(step).filter(|_| ctx.is_writer) {
                    opt.save_gradients(&path)?;
                }
                let grad_norm = read[0];
                let part_norms: std::collections::BTreeMap<String, f64> = norms
                    .groups
                    .iter()
                    .map(|g| g.to_string())
                    .zip(read[1..].iter().copied())
                    .collect();
                opt.clip_gradients(grad_norm, t.max_grad_norm);
                if let Some(spike) = ls.guard.observe(step, loss_value, grad_norm, &part_norms) {
                    progress.suspend(|| {
                    tracing::warn!(
                        step,
                        loss = spike.loss,
                        loss_avg = spike.loss_avg,
                        grad_norm = spike.grad_norm,
                        grad_norm_avg = spike.grad_norm_avg,
                        part = %spike.part,
                        part_norm = spike.part_norm,
                        part_avg = spike.part_avg,
                        "training spike: far above the running average; the part whose gradient rose most is named"
                    )
                });
                    log.write(
                        serde_json::json!({"step": step, "warning": "spike", "spike": spike}),
                    )?;
                }
                opt.step(lr);
                model.commit_memory()?;
                ls.train_secs += step_start.elapsed().as_secs_f64();
                if logged {
                    let tps = ls.tokens as f64 / ls.train_secs.max(1e-9);
                    let eta = ls.train_secs / step as f64 * (total - step) as f64;
                    progress.step(step, loss_value, lr, tps);
                    if progress.is_visible() {
                        tracing::debug!(step, total, loss = loss_value, lr, grad_norm, "train");
                    } else {
                        tracing::info!(
                            step,
                            total,
                            loss = loss_value,
                            lr,
                            grad_norm,
                            tokens_per_s = tps as u64,
                            eta_s = eta as u64,
                            "train"
                        );
                    }
                    let probe = model.probe.take();
                    let reads = crate::host::reads() - reads_at_start;
                    last_um = probe
                        .iter()
                        .filter(|(k, _)| k.starts_with("um.") && !k.starts_with("um.logvar"))
                        .map(|(k, v)| (k.clone(), *v))
                        .collect();
                    log.write(serde_json::json!({
                        "step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                        "tokens_per_s": tps, "grad_norms": part_norms, "probe": probe,
                        "grad_sync_share": ls.sync_secs / ls.train_secs.max(1e-9),
                        "host_reads": reads, "host_reads_unlogged_max": unlogged_reads.take(),
                    }))?;
                }
            }
            model.probe.take();
            run.set_step(step);
            let mut validation = None;
            if t.eval_every > 0 && step % t.eval_every == 0 && step < total {
                let ev = evaluate(
                    &model,
                    &data.validation,
                    t.eval_batch_size(),
                    &data.label_names,
                )?;
                progress.suspend(|| {
                    tracing::info!(
                        step,
                        loss = ev.loss,
                        accuracy = ev.accuracy,
                        macro_f1 = ev.macro_f1,
                        "validation"
                    )
                });
                log.write(serde_json::json!({"step": step, "split": "validation", "eval": ev}))?;
                run.save_weights(&model, step)?;
                validation = Some(ev);
            }
            let every = cfg.checkpoint.every;
            if every > 0 && step % every == 0 && step < total {
                snapshot(&run, step, &ls, &sampler, &opt, validation.as_ref())?;
            }
            let signal = agreed.signal;
            if signal != 0 {
                progress.finish();
                // Preemption: the ranks agreed on this step; its checkpoint is what a requeued
                // `--resume auto` continues from.
                if every == 0 || step % every != 0 || step == total {
                    snapshot(&run, step, &ls, &sampler, &opt, validation.as_ref())?;
                }
                return Err(interrupted(&mut run, &model, step, signal)?);
            }
            // A plain step (no log line, evaluation or checkpoint): its reads from start to end.
            let checkpointed = every > 0 && step % every == 0;
            if !logged && validation.is_none() && !checkpointed {
                let reads = crate::host::reads() - reads_at_start;
                unlogged_reads = Some(unlogged_reads.unwrap_or(0).max(reads));
            }
        }
        progress.finish();
        // The end of training has a checkpoint too (a job stopped during the final evaluation
        // resumes to just that).
        if first_step <= total {
            snapshot(&run, total, &ls, &sampler, &opt, None)?;
        }
        // Post-hoc temperature scaling, fitted on the validation split and kept with the run.
        let bs = t.eval_batch_size();
        let val_out = outputs(&model, &data.validation, bs)?;
        let (val_logits, val_gold) = super::eval::calibration_units(&val_out, &data.label_names);
        let temperature = fit_temperature(&val_logits, &val_gold);
        if at_search_bound(temperature) {
            tracing::warn!(
            temperature,
            "the fitted temperature is at the end of its search range {T_RANGE:?}: the validation NLL kept falling past it (near-uniform or degenerate outputs?)"
        );
        }
        model.temperature = Some(temperature);
        run.write_calibration(temperature, total)?;
        let validation = scores(
            &val_out,
            &data.label_names,
            model.temperature,
            data.validation.len(),
        );
        log.write(serde_json::json!({"step": total, "split": "validation", "eval": validation}))?;
        crate::faults::abort_in_final_evaluation();
        let test_out = data
            .test
            .as_ref()
            .map(|d| outputs(&model, d, bs))
            .transpose()?;
        let test = test_out
            .as_ref()
            .zip(data.test.as_ref())
            .map(|(out, d)| scores(out, &data.label_names, model.temperature, d.len()));
        if let Some(ev) = &test {
            log.write(serde_json::json!({"step": total, "split": "test", "eval": ev}))?;
        }
        run.write_plots(
            &val_out,
            test_out.as_ref(),
            &data.label_names,
            model.temperature,
        );
        log.images(run.path(), total);
        run.save_weights(&model, total)?;
        let trainable_params = model.trainable_params();
        let summary = Summary {
            steps: total,
            skipped_steps: ls.skipped,
            train_tokens_per_s: ls.tokens as f64 / ls.train_secs.max(1e-9),
            seconds: start.elapsed().as_secs_f64(),
            validation,
            test,
            um: last_um,
            ..Summary::of(
                cfg,
                run.path(),
                data.label_names,
                trainable_params,
                backbone_params,
            )
        };
        if !summary.is_finite() {
            tracing::warn!(run_dir = %run.path().display(), "the run finished with non-finite metrics");
        }
        run.write_summary(&summary)?;
        Ok(summary)
    })();
    // The masks of whoever uses the model next are not ours to vouch for.
    model
        .right_padded
        .store(false, std::sync::atomic::Ordering::Relaxed);
    match outcome {
        Ok(summary) => Ok((summary, model)),
        Err(e) => {
            if !matches!(e, Error::Interrupted { .. } | Error::Diverged { .. }) {
                if let Err(also) = run.set_state(RunState::Failed, Some(e.to_string())) {
                    tracing::error!("recording the failure in run.json: {also}");
                }
            }
            Err(e)
        }
    }
}

/// Labelled units of the examples at `idx`: examples (classification) or tagged tokens (NER).
fn labelled_units(idx: &[usize], data: &[Encoded]) -> usize {
    idx.iter()
        .map(|&i| {
            let e = &data[i];
            if e.token_labels.is_empty() {
                1
            } else {
                e.token_labels.iter().filter(|&&l| l != IGNORE).count()
            }
        })
        .sum()
}

/// What the ranks agree on once per step, in one all-reduce (a sum) of `1 + W` f64 values on the
/// loss's device: index 0 the ranks' summed loss, index `1 + r` rank r's stop signal (0 while none
/// asked). Built without a host-to-device copy; read with the step's gradient norms, then
/// [`Consensus::of`]. Nothing is exchanged in one process.
pub fn step_consensus(group: &dyn Collective, loss_sum: &Tensor, signal: i32) -> Result<Tensor> {
    let (world, device) = (group.world_size(), loss_sum.device());
    let signals = Tensor::zeros([world as i64], (Kind::Double, device));
    let _ = signals.get(group.rank() as i64).fill_(f64::from(signal));
    let mut t = Tensor::cat(&[loss_sum.to_kind(Kind::Double).reshape([1]), signals], 0);
    if world > 1 {
        group.all_reduce(&mut t, ReduceOp::Sum)?;
    }
    Ok(t)
}

/// The step's agreed loss and stop signal.
pub struct Consensus {
    /// The mean loss over ranks (NaN on any rank makes it NaN, so all skip the step).
    pub loss: f64,
    /// The stop signal, 0 while none asked: the lowest rank's that saw one. A signal may reach
    /// one rank a step before another (a launcher forwards it one worker at a time); the stop,
    /// its step and the exit status (128 + the signal) must be the same on every rank, so no
    /// rank takes a branch the others do not and the launcher reports one cause.
    pub signal: i32,
}

impl Consensus {
    /// From the values [`step_consensus`] gave, read.
    pub fn of(values: &[f64]) -> Consensus {
        let world = values.len() - 1;
        Consensus {
            // As the collective's mean computes it: the f64 sum over ranks, divided once.
            loss: if world > 1 {
                values[0] / world as f64
            } else {
                values[0]
            },
            signal: values[1..]
                .iter()
                .find(|&&s| s != 0.0)
                .map_or(0, |&s| s as i32),
        }
    }
}

/// The one place where gradients are made consistent across ranks, before clipping and the
/// optimizer step: every trainable gradient flattened into one f32 buffer, summed over ranks
/// through the collective, divided by the world size (so N ranks at batch b step as one rank at
/// batch N*b), and copied back. Nothing to do in one process.
pub fn sync_gradients(group: &dyn Collective, opt: &AdamW) -> Result<()> {
    let world_size = group.world_size();
    if world_size == 1 {
        return Ok(());
    }
    let grads = opt.gradients();
    if grads.is_empty() {
        return Ok(());
    }
    let flat: Vec<Tensor> = grads
        .iter()
        .map(|g| g.to_kind(Kind::Float).reshape([-1]))
        .collect();
    let mut buffer = Tensor::cat(&flat, 0);
    group.all_reduce_sum(&mut buffer)?;
    buffer /= world_size as f64;
    let mut offset = 0;
    tch::no_grad(|| {
        for mut g in grads {
            let n = g.numel() as i64;
            let part = buffer.narrow(0, offset, n).view_as(&g).to_kind(g.kind());
            g.copy_(&part);
            offset += n;
        }
    });
    Ok(())
}

/// The divergence stop: recorded in `run.json`, and an error that says where the last saved
/// weights are, if any.
fn diverged(run: &mut RunDir, step: usize, bad_in_a_row: usize) -> Error {
    let dir = run.path().display().to_string();
    let weights = match run.record().weights_step {
        Some(w) => format!("the weights of the last evaluation (step {w}) are in {dir}"),
        None => format!(
            "no weights were saved ({dir} has no evaluation before this step; train.eval_every saves them)"
        ),
    };
    let msg = format!(
        "{bad_in_a_row} consecutive non-finite losses (train.max_bad_steps); {weights}; lower train.lr or check the data"
    );
    if let Err(e) = run.set_state(RunState::Diverged, Some(msg.clone())) {
        tracing::error!("recording the divergence: {e}");
    }
    Error::Diverged { step, msg }
}

/// The stop on a signal after `step`: the weights saved, the state recorded, and the error that
/// ends the process with 128 + the signal.
fn interrupted(run: &mut RunDir, model: &TaskModel, step: usize, signal: i32) -> Result<Error> {
    run.save_weights(model, step)?;
    let name = signal_name(signal);
    let msg = format!(
        "weights of step {step} of {} saved in {}; `umtune eval` and `umtune predict` use them",
        run.record().total_steps,
        run.path().display()
    );
    run.set_state(RunState::Interrupted, Some(format!("{name}: {msg}")))?;
    Ok(Error::Interrupted {
        signal,
        name,
        step,
        msg,
    })
}
