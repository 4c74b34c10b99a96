//! Calibration metrics and temperature scaling against a numpy / torch reference computed on the
//! same logits (tests/make_fixtures.py `calibration_reference`).
mod common;
use common::*;
use umtune::uncertainty::calibration::{calibrated, fit_temperature};
use umtune::uncertainty::{calibration_scores, CalibrationScores};

fn scores_of(v: &serde_json::Value) -> Result<CalibrationScores, Box<dyn std::error::Error>> {
    Ok(serde_json::from_value(v.clone())?)
}

fn assert_scores(what: &str, ours: &CalibrationScores, theirs: &CalibrationScores) {
    for (name, a, b) in [
        ("ece", ours.ece, theirs.ece),
        ("nll", ours.nll, theirs.nll),
        ("brier", ours.brier, theirs.brier),
        ("aurc", ours.aurc, theirs.aurc),
    ] {
        assert!((a - b).abs() < 1e-9, "{what} {name}: {a} vs reference {b}");
    }
}

#[test]
fn calibration_metrics_and_temperature_match_the_reference() -> TestResult {
    let r = read_json(fixture("calibration")?.join("reference.json"))?;
    let logits: Vec<Vec<f64>> = serde_json::from_value(r["logits"].clone())?;
    let labels: Vec<usize> = serde_json::from_value(r["labels"].clone())?;
    let raw = calibrated(&logits, 1.0);
    assert_scores(
        "raw",
        &calibration_scores(&raw, &labels),
        &scores_of(&r["raw"])?,
    );
    let t = fit_temperature(&logits, &labels);
    let t_ref = r["temperature"].as_f64().ok_or("temperature")?;
    assert!(
        (t - t_ref).abs() < 1e-5 * t_ref,
        "temperature {t} vs LBFGS {t_ref}"
    );
    let after = calibration_scores(&calibrated(&logits, t), &labels);
    let theirs = scores_of(&r["calibrated"])?;
    assert!((after.nll - theirs.nll).abs() < 1e-9);
    assert!((after.ece - theirs.ece).abs() < 1e-6 && (after.brier - theirs.brier).abs() < 1e-6);
    // Scaling never changes the ranking of a unit's classes, so the argmax and the
    // risk-coverage order hold; the fitted temperature lowers the NLL.
    assert!(after.nll < calibration_scores(&raw, &labels).nll);
    Ok(())
}

#[test]
fn perfect_and_useless_predictions_score_as_expected() {
    let labels = [0usize, 1, 1, 0];
    let certain: Vec<Vec<f64>> = labels
        .iter()
        .map(|&y| {
            if y == 0 {
                vec![1.0, 0.0]
            } else {
                vec![0.0, 1.0]
            }
        })
        .collect();
    let s = calibration_scores(&certain, &labels);
    assert_eq!((s.ece, s.brier, s.aurc), (0.0, 0.0, 0.0));
    let coin = vec![vec![0.5, 0.5]; 4];
    let s = calibration_scores(&coin, &labels);
    // Confidence 0.5 everywhere, argmax always class 0: accuracy 0.5, ECE 0; NLL ln 2.
    assert!(s.ece.abs() < 1e-12 && (s.nll - 2f64.ln()).abs() < 1e-12);
    assert!((s.brier - 0.5).abs() < 1e-12);
}

#[test]
fn runs_fit_a_temperature_that_eval_and_predict_apply() -> TestResult {
    use umtune::config::PeftMethod;
    use umtune::train::eval::evaluate;
    use umtune::train::predict::predict;
    use umtune::train::restore::load_run;
    let summary = train(&tiny_config("temperature", PeftMethod::Lora)?)?;
    let v = &summary.validation;
    let t = v.temperature.ok_or("no temperature")?;
    let (raw, cal) = (
        v.calibration.ok_or("no raw scores")?,
        v.calibrated.ok_or("no calibrated scores")?,
    );
    // The temperature minimizes the validation NLL, so it can only lower it.
    assert!(cal.nll <= raw.nll + 1e-12, "{cal:?} vs {raw:?}");
    let run = load_run(&summary.run_dir, &[])?;
    assert_eq!(run.model.temperature, Some(t));
    let data = umtune::data::dataset::load_data(&run.config, run.model.tokenizer()?)?;
    // T minimizes the validation NLL over the search range: 5% either way (inside the range) is
    // no better. (This tiny random model's outputs are near-uniform, so T sits at the top end.)
    let out = umtune::train::eval::outputs(&run.model, &data.validation, 16)?;
    let (logits, gold) = umtune::train::eval::calibration_units(&out, &run.label_names);
    let nll = |t: f64| calibration_scores(&calibrated(&logits, t), &gold).nll;
    let (lo, hi) = umtune::uncertainty::calibration::T_RANGE;
    let (up, down) = ((t * 1.05).min(hi), (t / 1.05).max(lo));
    assert!(
        nll(t) <= nll(up) + 1e-9 && nll(t) <= nll(down) + 1e-9,
        "T = {t} is not the NLL minimum: {} vs {} / {}",
        nll(t),
        nll(up),
        nll(down)
    );
    let again = evaluate(&run.model, &data.validation, 16, &run.label_names)?;
    assert!((again.calibrated.ok_or("eval")?.nll - cal.nll).abs() < 1e-9);
    let p = predict(&run, &["a fine film".to_string()], 1)?.remove(0);
    let c = p
        .calibrated
        .ok_or("predict without calibrated probabilities")?;
    // p_T ∝ p^(1/T): the ratio of log-probabilities is preserved up to 1/T.
    let (a, b) = (
        p.probabilities[0].ln() - p.probabilities[1].ln(),
        c[0].ln() - c[1].ln(),
    );
    assert!((a / t - b).abs() < 1e-9, "{a} / {t} vs {b}");
    // The run directory has the calibration pictures (test split, raw and calibrated panels).
    for (name, width) in [("reliability.png", 960), ("risk_coverage.png", 640)] {
        let png = std::fs::read(summary.run_dir.join(name))?;
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{name}");
        let w = u32::from_be_bytes(png[16..20].try_into()?);
        assert_eq!(w, width, "{name}: two panels when a temperature is fitted");
        assert!(
            png.len() > 10_000,
            "{name}: {} bytes, an empty picture",
            png.len()
        );
    }
    Ok(())
}

#[test]
fn reliability_bins_and_risk_coverage_are_what_ece_and_aurc_sum() -> TestResult {
    use umtune::uncertainty::metrics::{aurc, ece, reliability_bins, risk_coverage};
    let r = read_json(fixture("calibration")?.join("reference.json"))?;
    let logits: Vec<Vec<f64>> = serde_json::from_value(r["logits"].clone())?;
    let labels: Vec<usize> = serde_json::from_value(r["labels"].clone())?;
    let probs = calibrated(&logits, 1.0);
    let bins = reliability_bins(&probs, &labels, 15);
    assert_eq!(bins.len(), 15);
    assert_eq!(bins.iter().map(|b| b.count).sum::<usize>(), labels.len());
    let n = labels.len() as f64;
    let mut weighted = 0.0;
    for b in &bins {
        assert!((b.hi - b.lo - 1.0 / 15.0).abs() < 1e-12);
        if b.count > 0 {
            assert!(b.confidence > b.lo && b.confidence <= b.hi, "{b:?}");
            weighted += b.count as f64 / n * (b.accuracy - b.confidence).abs();
        }
    }
    assert!((weighted - r["raw"]["ece"].as_f64().ok_or("ece")?).abs() < 1e-9);
    assert!((ece(&probs, &labels, 15) - weighted).abs() < 1e-12);
    let risk = risk_coverage(&probs, &labels);
    assert_eq!(risk.len(), labels.len());
    // At full coverage the risk is the error rate.
    let errors = probs
        .iter()
        .zip(&labels)
        .filter(|(p, &y)| p.iter().cloned().fold(f64::MIN, f64::max) > p[y])
        .count();
    assert!((risk[risk.len() - 1] - errors as f64 / n).abs() < 1e-12);
    assert!((risk.iter().sum::<f64>() / n - aurc(&probs, &labels)).abs() < 1e-12);
    Ok(())
}

#[test]
fn mc_prediction_averages_samples_and_is_off_by_default() -> TestResult {
    let (model, _) = build_model(&um_config("um-mc", &[])?, 2)?;
    let (ids, mask, _) = batch(&model)?;
    let _g = tch::no_grad_guard();
    model.training.set(false);
    assert_eq!(model.mc_samples, 0, "MC sampling must be opt-in");
    let plain = model.forward(&ids, &mask, None)?.logits;
    // Deterministic by default: the forward logits, bitwise, every time.
    for _ in 0..2 {
        assert!(model.predictive_logits(&ids, &mask, None)?.equal(&plain));
    }
    let mut mc = model;
    mc.mc_samples = 16;
    let a = mc.predictive_logits(&ids, &mask, None)?;
    let sums = a.exp().sum_dim_intlist(-1, false, tch::Kind::Double);
    assert!(max_abs_diff(&sums, &sums.ones_like()) < 1e-5, "{sums}");
    // Feature noise and the logit draws make the samples, and so their mean, differ.
    assert!(!a.equal(&plain.log_softmax(-1, tch::Kind::Float)));
    assert!(!a.equal(&mc.predictive_logits(&ids, &mask, None)?));
    // With both sources of randomness off every sample is the deterministic pass, so the mean
    // is its softmax.
    let (mut quiet, _) = build_model(
        &um_config("um-mc-quiet", &["noise=false", "heteroscedastic=false"])?,
        2,
    )?;
    quiet.mc_samples = 8;
    let want = quiet
        .forward(&ids, &mask, None)?
        .logits
        .log_softmax(-1, tch::Kind::Float);
    let d = max_abs_diff(&quiet.predictive_logits(&ids, &mask, None)?, &want);
    assert!(d < 1e-5, "{d}");
    Ok(())
}

/// MC prediction computes the blocks below the first UM block once and runs only the plugged
/// blocks per sample: the same numbers as whole stochastic passes with the same draws. Nothing
/// below the estimator draws at evaluation (adapter dropout is off), so the shared output is the
/// one every whole pass computes: the same kernels on the same input, so equal up to libtorch's
/// choice of reduction order between the two call paths (none on the CPU; bound 1e-5 on
/// log-probabilities of magnitude < 10, ~100 f32 ulp). The draws come from per-example streams
/// (thread-local), not the global generator, which the tests running beside this one also use.
#[test]
fn mc_samples_share_the_blocks_below_the_estimators() -> TestResult {
    use umtune::ffi::streams::{example_key, with_streams};
    let mut cfg = um_config("um-mc-shared", &[])?;
    cfg.uncertainty.layers = vec![1];
    let (mut model, _) = build_model(&cfg, 2)?;
    assert!(
        model.backbone.arch().num_layers() > 1,
        "needs a block below the estimator"
    );
    let (ids, mask, _) = batch(&model)?;
    let _g = tch::no_grad_guard();
    model.training.set(false);
    model.mc_samples = 8;
    let keys = |seed| {
        (0..2)
            .map(|i| example_key(seed, 0, 0, i))
            .collect::<Vec<u64>>()
    };
    let shared = with_streams(keys(11), || model.predictive_logits(&ids, &mask, None))?;
    let whole = with_streams(keys(11), || {
        (0..8)
            .map(|_| {
                Ok(model
                    .mc_sample_logits(&ids, &mask, None)?
                    .softmax(-1, tch::Kind::Float))
            })
            .collect::<Result<Vec<_>, Box<dyn std::error::Error>>>()
    })?;
    let whole = umtune::task::predictive::log_mean(&whole);
    let d = max_abs_diff(&shared, &whole);
    assert!(
        d <= 1e-5,
        "shared-prefix MC differs from whole passes by {d}"
    );
    // The samples do draw: other streams give another mean.
    let other = with_streams(keys(12), || model.predictive_logits(&ids, &mask, None))?;
    assert!(max_abs_diff(&other, &shared) > 1e-4);
    Ok(())
}

/// Evaluation's MC draws come from each example's own stream (run seed, example id): scoring the
/// same examples in one batch or in batches of two (other companions, other padded lengths)
/// gives the same MC predictions. What differs is only the float rounding of the other padded
/// shapes in the backbone's matmuls (f32, relative ~1e-6 per block here), far below the 1e-4
/// bound on log-probabilities; drawing from one shared generator instead moves them by ~0.1.
#[test]
fn mc_predictions_do_not_depend_on_the_batch() -> TestResult {
    let (mut model, _) = build_model(&um_config("um-mc-batch", &[])?, 2)?;
    let tok = model.tokenizer()?;
    let texts = [
        "a wonderful little film",
        "the service was slow and the food cold",
        "fine",
        "I would not go back there again, not even for free",
        "great acting",
        "boring and far too long for what it has to say",
        "the best meal of the year",
    ];
    let data = texts
        .iter()
        .enumerate()
        .map(|(i, t)| {
            Ok(umtune::data::batching::Encoded {
                ids: tok.encode(t)?.into_iter().map(i64::from).collect(),
                label: (i % 2) as i64,
                token_labels: Vec::new(),
                words: 0,
                id: 100 + i as i64,
            })
        })
        .collect::<Result<Vec<_>, Box<dyn std::error::Error>>>()?;
    model.mc_samples = 8;
    let local = umtune::train::eval::local_outputs;
    let (whole, pairs) = (local(&model, &data, 7)?, local(&model, &data, 2)?);
    let mut d: f64 = 0.0;
    for (a, b) in whole
        .logits
        .iter()
        .flatten()
        .zip(pairs.logits.iter().flatten())
    {
        for (x, y) in a.iter().zip(b) {
            d = d.max((x - y).abs());
        }
    }
    assert!(d <= 1e-4, "MC logits move by {d} with the batch");
    // They are MC samples: not the deterministic logits.
    model.mc_samples = 0;
    let plain = local(&model, &data, 7)?;
    assert_ne!(plain.logits, whole.logits);
    Ok(())
}

fn um_config(tag: &str, sets: &[&str]) -> Result<umtune::Config, Box<dyn std::error::Error>> {
    let mut cfg = tiny_config(tag, umtune::config::PeftMethod::Lora)?;
    cfg.uncertainty.enabled = true;
    cfg.peft.dropout = 0.0;
    for s in sets {
        let (k, v) = s.split_once('=').ok_or("k=v")?;
        match k {
            "noise" => cfg.uncertainty.noise = v == "true",
            "propagation" => cfg.uncertainty.propagation = v == "true",
            "suppression" => cfg.uncertainty.suppression = v == "true",
            "heteroscedastic" => cfg.uncertainty.heteroscedastic = v == "true",
            "conditioned_temperature" => cfg.uncertainty.conditioned_temperature = v == "true",
            _ => return Err(format!("unknown switch {k}").into()),
        }
    }
    Ok(cfg)
}

fn batch(
    model: &umtune::task::TaskModel,
) -> Result<(tch::Tensor, tch::Tensor, tch::Tensor), Box<dyn std::error::Error>> {
    let tok = model.tokenizer()?;
    let texts = [
        "a wonderful little film",
        "the service was slow and the food cold",
    ];
    let ids: Vec<Vec<i64>> = texts
        .iter()
        .map(|t| Ok(tok.encode(t)?.into_iter().map(i64::from).collect()))
        .collect::<Result<_, Box<dyn std::error::Error>>>()?;
    let len = ids.iter().map(Vec::len).max().unwrap_or(1);
    let mut flat = Vec::new();
    let mut mask = Vec::new();
    for row in &ids {
        flat.extend(
            row.iter()
                .copied()
                .chain(std::iter::repeat_n(0, len - row.len())),
        );
        mask.extend((0..len).map(|j| i64::from(j < row.len())));
    }
    let shape = [ids.len() as i64, len as i64];
    Ok((
        tch::Tensor::from_slice(&flat).view(shape),
        tch::Tensor::from_slice(&mask).view(shape),
        tch::Tensor::from_slice(&[1i64, 0]),
    ))
}

#[test]
fn gradients_reach_every_uncertainty_tensor_and_no_frozen_one() -> TestResult {
    let cfg = um_config("um-grads", &[])?;
    let (model, _) = build_model(&cfg, 2)?;
    let names: Vec<String> = model
        .named_trainable()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    for want in [
        "uncertainty.blocks.",
        ".c",
        ".theta",
        "head.gamma",
        "head.w_a",
        "head.b_a",
        "head.w_t",
        "head.b_t",
    ] {
        assert!(
            names
                .iter()
                .any(|n| n.starts_with("uncertainty.") && n.contains(want)),
            "no {want} in {names:?}"
        );
    }
    let (ids, mask, labels) = batch(&model)?;
    model.training.set(true);
    let f = model.forward(&ids, &mask, None)?;
    assert!(f.samples.is_some() && f.regularizer.is_some());
    // Two steps: the zero-initialized last layers move in the first, everything has a gradient
    // in the second.
    assert_gradients_reach(&model, (&ids, &mask, &labels), None, |_| true)
}

#[test]
fn every_uncertainty_part_switches_off() -> TestResult {
    let off = [
        "noise=false",
        "suppression=false",
        "heteroscedastic=false",
        "conditioned_temperature=false",
    ];
    let mut plain_cfg = tiny_config("um-plain", umtune::config::PeftMethod::Lora)?;
    plain_cfg.peft.dropout = 0.0;
    let (plain, _) = build_model(&plain_cfg, 2)?;
    let (bare, _) = build_model(&um_config("um-bare", &off)?, 2)?;
    // The same adapters and head in both (tests share the global RNG, so seeds cannot do it).
    copy_trainable(&plain, &bare);
    let (ids, mask, _) = batch(&plain)?;
    // Estimation alone changes nothing the head sees, even in training mode.
    bare.training.set(true);
    plain.training.set(true);
    let f = bare.forward(&ids, &mask, None)?;
    assert!(f.samples.is_none() && f.regularizer.is_some());
    let d = max_abs_diff(&f.logits, &plain.forward(&ids, &mask, None)?.logits);
    assert!(d == 0.0, "logits differ by {d}");
    let names: Vec<String> = bare.named_trainable().into_iter().map(|(n, _)| n).collect();
    assert!(
        !names.iter().any(|n| n.contains("uncertainty.head.")),
        "{names:?}"
    );
    // Each switch on its own adds its part.
    for (switch, part) in [
        ("suppression", "head.gamma"),
        ("heteroscedastic", "head.w_a"),
        ("conditioned_temperature", "head.w_t"),
    ] {
        let sets: Vec<&str> = off
            .iter()
            .copied()
            .filter(|s| !s.starts_with(switch))
            .collect();
        let (m, _) = build_model(&um_config(switch, &sets)?, 2)?;
        assert!(
            m.named_trainable().iter().any(|(n, _)| n.contains(part)),
            "{switch}"
        );
    }
    // Without propagation no block has c; noise makes training passes differ.
    let (m, _) = build_model(&um_config("um-noprop", &["propagation=false"])?, 2)?;
    assert!(!m.named_trainable().iter().any(|(n, _)| n.ends_with(".c")));
    let (noisy, _) = build_model(&um_config("um-noise", &off[1..])?, 2)?;
    noisy.training.set(true);
    let (a, b) = (noisy.logits(&ids, &mask)?, noisy.logits(&ids, &mask)?);
    assert!(!a.equal(&b), "training noise is off");
    noisy.training.set(false);
    assert!(noisy
        .logits(&ids, &mask)?
        .equal(&noisy.logits(&ids, &mask)?));
    Ok(())
}

#[test]
fn a_run_with_uncertainty_modeling_trains_and_reports_calibration() -> TestResult {
    let cfg = um_config("um-run", &[])?;
    let (summary, model) = train_model(&cfg)?;
    assert!(summary.is_finite());
    assert!(summary.validation.calibration.is_some() && summary.validation.calibrated.is_some());
    // The estimators trained: their zero-initialized up-projections moved, and they are saved.
    let saved = tch::Tensor::read_safetensors(summary.run_dir.join("trainable.safetensors"))?;
    let ups: Vec<&(String, tch::Tensor)> = saved
        .iter()
        .filter(|(n, _)| n.contains("blocks") && n.ends_with("up.weight"))
        .collect();
    let blocks =
        umtune::uncertainty::plugin_layers(&cfg.uncertainty, model.backbone.arch().num_layers());
    assert_eq!(ups.len(), blocks.len(), "one estimator per UM block");
    for (name, t) in ups {
        assert!(
            t.abs().sum(tch::Kind::Float).double_value(&[]) > 0.0,
            "{name} never trained"
        );
    }
    // The relative noise acts (METHOD.md section 1: 0.3% of the feature RMS before it was
    // relative): the summary reports the last logged step's ratio and each block's variance.
    let ratio = summary
        .um
        .get("um.noise_to_feature")
        .copied()
        .unwrap_or(0.0);
    assert!((0.01..=0.3).contains(&ratio), "noise / feature RMS {ratio}");
    for layer in blocks {
        assert!(
            summary.um.contains_key(&format!("um.p_mean.{layer}")),
            "{:?}",
            summary.um
        );
        assert!(summary
            .um
            .contains_key(&format!("um.moved_from_prior.{layer}")));
    }
    // A run from before the relative noise and the KL (its config.toml without those keys)
    // loads as it was trained: absolute noise, the l1 regularizer.
    use umtune::train::restore::run_config;
    let fresh = run_config(&summary.run_dir, &[])?;
    assert!(fresh.uncertainty.relative);
    let file = summary.run_dir.join("config.toml");
    let text = std::fs::read_to_string(&file)?;
    let older: String = text
        .lines()
        .filter(|l| !l.starts_with("relative =") && !l.starts_with("regularizer ="))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(text.lines().count(), older.lines().count() + 2, "{text}");
    std::fs::write(&file, older)?;
    let old = run_config(&summary.run_dir, &[])?;
    assert!(!old.uncertainty.relative);
    assert_eq!(
        old.uncertainty.regularizer,
        umtune::config::VarRegularizer::L1
    );
    Ok(())
}

/// METHOD.md section 1's relative noise, `h + s sqrt(p) rms(h) eps` (rms per token, detached):
/// replaying the hook's per-example draw gives eps, and the noise equals the formula at feature
/// scales 1 (GPT-2's residual stream) and 60 (SmolLM2's), with the same p at both (the estimator
/// reads LayerNorm(h)): the noise-to-feature ratio is `s sqrt(p)` whatever the scale.
#[test]
fn relative_noise_is_s_sqrt_p_of_the_feature_rms_at_any_scale() -> TestResult {
    use tch::{nn, Device, Kind, Tensor};
    use umtune::ffi::streams;
    use umtune::models::LayerHook;
    let (d, s) = (64, 0.7);
    let cfg = umtune::config::UncertaintyConfig {
        enabled: true,
        noise_scale: s,
        ..Default::default()
    };
    assert!(cfg.relative, "relative noise is the default");
    let vs = nn::VarStore::new(Device::Cpu);
    let um = umtune::uncertainty::FeatureUncertainty::new(&vs.root(), &[0], d, &cfg);
    tch::manual_seed(3);
    // Estimators off their constant start, so that p varies over features and tokens.
    tch::no_grad(|| {
        for (name, mut t) in vs.variables() {
            if name.ends_with("up.weight") {
                t.copy_(&(Tensor::randn_like(&t) * 0.5));
            }
        }
    });
    // Tokens of different scales within each sequence.
    let token_scale = (Tensor::arange(5, (Kind::Float, Device::Cpu)) + 1.0).view([1, 5, 1]);
    let base = Tensor::randn([2, 5, d], (Kind::Float, Device::Cpu)) * token_scale;
    let probe = umtune::probe::Probe::default();
    let mut ps = Vec::new();
    for scale in [1.0, 60.0] {
        let h = &base * scale;
        let (out, p, eps) = streams::with_streams(vec![11, 12], || {
            let mut hook = um.hook(true, &probe);
            let out = hook.after_block(0, h.shallow_clone());
            let p = hook.p[0].shallow_clone();
            streams::set_draws(0);
            let eps = streams::randn(&p.size(), 0, &p);
            (out, p, eps)
        });
        let rms = h
            .pow_tensor_scalar(2)
            .mean_dim(-1, true, Kind::Float)
            .sqrt();
        let want = p.sqrt() * s * rms * eps;
        // `out - h` rounds `h + noise` once and subtracts exactly (Sterbenz does not apply, but
        // the subtraction's error is at most one ulp of its operands): within 2 ulp of
        // |h| + |noise| element by element.
        let bound = (h.abs() + want.abs()) * (2.0 * f64::from(f32::EPSILON));
        let excess = ((&out - &h) - &want).abs() - bound;
        let worst = excess.max().double_value(&[]);
        assert!(
            worst <= 0.0,
            "scale {scale}: noise off the formula by {worst} beyond rounding"
        );
        ps.push(p);
    }
    // LayerNorm's eps (1e-5 against a variance of ~1 and ~3600) is all that differs.
    let dp = (&ps[0] - &ps[1]).abs().max().double_value(&[]);
    let p_max = ps[0].abs().max().double_value(&[]);
    assert!(
        dp <= 1e-4 * p_max,
        "p depends on the feature scale: {dp} of {p_max}"
    );
    Ok(())
}

/// The KL regularizer `0.5 (p / p0 - log(p / p0) - 1)` is zero at the prior and its gradient
/// pushes p toward it from both sides; `l1` is p itself.
#[test]
fn the_kl_regularizer_is_zero_at_the_prior_and_pulls_toward_it() -> TestResult {
    use tch::{nn, Device, Kind, Tensor};
    let mut cfg = umtune::config::UncertaintyConfig {
        enabled: true,
        prior_var: 0.01,
        ..Default::default()
    };
    let vs = nn::VarStore::new(Device::Cpu);
    let um = umtune::uncertainty::Uncertainty::new(&vs.root(), &cfg, &[0], 8);
    let at =
        |v: f64| Tensor::full([1, 3, 8], v, (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let prior = at(0.01);
    assert_eq!(
        um.per_token_penalty(&prior).abs().max().double_value(&[]),
        0.0
    );
    for (v, direction) in [(0.04, 1.0), (0.0025, -1.0)] {
        let p = at(v);
        let penalty = um.per_token_penalty(&p);
        // 0.5 (r - ln r - 1) with r = v / p0.
        let r = v / 0.01;
        let want = 0.5 * (r - r.ln() - 1.0);
        assert!((penalty.double_value(&[0, 0]) - want).abs() <= 1e-6 * want);
        penalty.sum(Kind::Float).backward();
        // Gradient descent moves p against the gradient: down from above, up from below.
        let g = p.grad().mean(Kind::Float).double_value(&[]);
        assert!(g * direction > 0.0, "p = {v}: gradient {g}");
    }
    cfg.regularizer = umtune::config::VarRegularizer::L1;
    let other = nn::VarStore::new(Device::Cpu);
    let l1 = umtune::uncertainty::Uncertainty::new(&other.root(), &cfg, &[0], 8);
    // p itself, up to f32 rounding of 0.04.
    assert!((l1.per_token_penalty(&at(0.04)).double_value(&[0, 0]) - 0.04).abs() <= 0.04 * 1e-6);
    Ok(())
}

#[test]
fn ner_runs_with_uncertainty_and_memory_calibrate_on_entity_words() -> TestResult {
    use umtune::train::eval::{calibration_units, outputs, scores};
    use umtune::uncertainty::calibration::calibrated;
    let mut cfg = um_config("um-ner", &[])?;
    cfg.data.dataset = "conll2003".into();
    cfg.data.task = umtune::config::TaskKind::Ner;
    cfg.memory.enabled = true; // one entry and one read per token
    cfg.memory.capacity = 256;
    let (summary, model) = train_model(&cfg)?;
    assert!(summary.validation.entity.is_some());
    let data = umtune::data::dataset::load_data(&cfg, model.tokenizer()?)?;
    let out = outputs(&model, &data.validation, 16)?;
    let names = &summary.label_names;
    // The calibration units are exactly the words whose gold tag is an entity tag.
    let (logits, gold) = calibration_units(&out, names);
    let entity_words = out
        .gold
        .iter()
        .flatten()
        .filter(|&&y| names[y] != "O")
        .count();
    assert!(entity_words > 0 && entity_words < out.units);
    assert_eq!((logits.len(), gold.len()), (entity_words, entity_words));
    assert!(gold.iter().all(|&y| names[y] != "O"));
    // The reported scores are those of the entity words: not those of all words, and the same
    // from the run's summary as from evaluating its model again.
    let ev = scores(&out, names, model.temperature, data.validation.len());
    let all: Vec<Vec<f64>> = out.logits.iter().flatten().cloned().collect();
    let all_gold: Vec<usize> = out.gold.iter().flatten().copied().collect();
    let over_all_words = calibration_scores(&calibrated(&all, 1.0), &all_gold);
    assert_ne!(ev.calibration.ok_or("no calibration")?, over_all_words);
    assert_eq!(ev.calibration, summary.validation.calibration);
    Ok(())
}
