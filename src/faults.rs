//! Test-only fault injection and inspection, the one place that reads the `UMTUNE_TEST_*`
//! variables: read once, at the first use, so the training loop's checks are field reads.
//! Nothing here changes what a run computes; each hook stops, pauses or records.
//!
//! - `UMTUNE_TEST_ABORT_AT=STEP:MICRO`: abort (no cleanup, as a kill -9) when micro-batch MICRO of
//!   step STEP is about to run.
//! - `UMTUNE_TEST_PAUSE_IN_CHECKPOINT=STEP`: the writer stops for a minute halfway through the
//!   checkpoint of STEP (so a test can kill it there).
//! - `UMTUNE_TEST_ABORT_AFTER_COMMIT=STEP`: abort when the weights of STEP are recorded in
//!   `run.json` but not yet moved into place.
//! - `UMTUNE_TEST_ABORT_IN_FINAL_EVALUATION=1`: abort after the final validation line is written,
//!   before the test split is evaluated.
//! - `UMTUNE_TEST_DUMP_GRADIENTS=DIR`: the writer rank saves every step's synchronized gradients
//!   (before clipping) as `DIR/step_NNNNNN.safetensors`, for parity checks between world sizes.
use std::path::PathBuf;
use std::sync::OnceLock;

#[derive(Debug, Default)]
struct Faults {
    abort_at: Option<(usize, usize)>,
    pause_in_checkpoint: Option<usize>,
    abort_after_commit: Option<usize>,
    abort_in_final_evaluation: bool,
    dump_gradients: Option<PathBuf>,
}

fn faults() -> &'static Faults {
    static FAULTS: OnceLock<Faults> = OnceLock::new();
    FAULTS.get_or_init(|| {
        let var = |k: &str| std::env::var(k).ok();
        let step = |k: &str| var(k).and_then(|s| s.parse().ok());
        Faults {
            abort_at: var("UMTUNE_TEST_ABORT_AT").and_then(|s| {
                let (a, b) = s.split_once(':')?;
                Some((a.parse().ok()?, b.parse().ok()?))
            }),
            pause_in_checkpoint: step("UMTUNE_TEST_PAUSE_IN_CHECKPOINT"),
            abort_after_commit: step("UMTUNE_TEST_ABORT_AFTER_COMMIT"),
            abort_in_final_evaluation: var("UMTUNE_TEST_ABORT_IN_FINAL_EVALUATION").as_deref()
                == Some("1"),
            dump_gradients: var("UMTUNE_TEST_DUMP_GRADIENTS").map(PathBuf::from),
        }
    })
}

/// Aborts if told to at micro-batch `micro` of `step`.
pub fn abort_at(step: usize, micro: usize) {
    if faults().abort_at == Some((step, micro)) {
        eprintln!("UMTUNE_TEST_ABORT_AT={step}:{micro}: aborting");
        std::process::abort();
    }
}

/// Pauses a minute if told to in the checkpoint of `step`.
pub fn pause_in_checkpoint(step: usize) {
    if faults().pause_in_checkpoint == Some(step) {
        tracing::warn!(step, "UMTUNE_TEST_PAUSE_IN_CHECKPOINT: pausing mid-write");
        std::thread::sleep(std::time::Duration::from_secs(60));
    }
}

/// Aborts if told to after the commit of the weights of `step`.
pub fn abort_after_commit(step: usize) {
    if faults().abort_after_commit == Some(step) {
        eprintln!("UMTUNE_TEST_ABORT_AFTER_COMMIT={step}: aborting");
        std::process::abort();
    }
}

/// Aborts if told to in the final evaluation.
pub fn abort_in_final_evaluation() {
    if faults().abort_in_final_evaluation {
        eprintln!("UMTUNE_TEST_ABORT_IN_FINAL_EVALUATION: aborting");
        std::process::abort();
    }
}

/// Where the gradients of `step` go, if they are to be saved.
pub fn gradient_dump(step: usize) -> Option<PathBuf> {
    let dir = faults().dump_gradients.as_ref()?;
    Some(dir.join(format!("step_{step:06}.safetensors")))
}
