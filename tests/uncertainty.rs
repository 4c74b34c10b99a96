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
    use umtune::train::run_dir::{load_run, predict};
    use umtune::train::trainer::{evaluate, train};
    let summary = train(&tiny_config("temperature", PeftMethod::Lora)?)?;
    let v = &summary.validation;
    let t = v.temperature.ok_or("no temperature")?;
    let (raw, cal) = (
        v.calibration.ok_or("no raw scores")?,
        v.calibrated.ok_or("no calibrated scores")?,
    );
    // The temperature minimizes the validation NLL, so it can only lower it.
    assert!(cal.nll <= raw.nll + 1e-12, "{cal:?} vs {raw:?}");
    assert!(t > 0.05 && t < 20.0);
    let run = load_run(&summary.run_dir, &[])?;
    assert_eq!(run.model.temperature, Some(t));
    let data = umtune::train::trainer::load_data(&run.config, run.model.tokenizer()?)?;
    let again = evaluate(
        &run.model,
        &data.validation,
        16,
        &run.label_names,
        run.device,
    );
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
    Ok(())
}
