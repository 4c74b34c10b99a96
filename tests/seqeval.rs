//! Entity-level NER metrics against Python seqeval on random, partly malformed tag sequences.
mod common;
use common::*;
use umtune::train::seqeval::{entities, precision_recall_f1};

#[test]
fn matches_python_seqeval() -> TestResult {
    let cases = read_json(fixture("seqeval")?.join("cases.json"))?;
    let cases = cases.as_array().ok_or("cases.json")?;
    assert_eq!(cases.len(), 40);
    for (i, c) in cases.iter().enumerate() {
        let gold: Vec<Vec<String>> = serde_json::from_value(c["y_true"].clone())?;
        let pred: Vec<Vec<String>> = serde_json::from_value(c["y_pred"].clone())?;
        let want: Vec<(String, usize, usize)> = serde_json::from_value(c["entities_true"].clone())?;
        assert_eq!(entities(&gold), want, "case {i}: entities of {gold:?}");
        let (p, r, f) = precision_recall_f1(&gold, &pred);
        for (name, ours, theirs) in [
            ("precision", p, &c["precision"]),
            ("recall", r, &c["recall"]),
            ("f1", f, &c["f1"]),
        ] {
            let theirs = theirs.as_f64().ok_or(name)?;
            assert!(
                (ours - theirs).abs() < 1e-12,
                "case {i} {name}: {ours} vs seqeval {theirs}"
            );
        }
    }
    Ok(())
}
