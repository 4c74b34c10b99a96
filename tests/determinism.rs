//! Same seed, same numbers. Alone in its own test binary: libtorch's global generator is shared
//! by every thread of a process, so concurrent tests would draw from it in between.
mod common;
use common::*;
use umtune::config::PeftMethod;

#[test]
fn same_seed_same_numbers() -> TestResult {
    let (a, ma) = train_model(&tiny_config("det-a", PeftMethod::Lora)?)?;
    let (b, mb) = train_model(&tiny_config("det-b", PeftMethod::Lora)?)?;
    assert_eq!(a.validation, b.validation);
    let vb = mb.trainable.variables();
    for (name, t) in ma.trainable.variables() {
        assert!(
            t.equal(&vb[&name]),
            "{name} differs between two runs with one seed"
        );
    }
    // And a different seed gives different weights.
    let mut cfg = tiny_config("det-c", PeftMethod::Lora)?;
    cfg.run.seed = 7;
    let (_, mc) = train_model(&cfg)?;
    assert!(
        !mc.trainable.variables()["score.weight"].equal(&ma.trainable.variables()["score.weight"])
    );
    Ok(())
}
