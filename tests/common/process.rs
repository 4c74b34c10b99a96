//! Helpers of the tests that run umtune as processes: the binaries, the tiny model's `train`
//! arguments, and a run's saved tensors and metrics compared with another run's.
use super::fixture;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use tch::{Kind, Tensor};

pub fn venv_bin(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(".venv/bin")
        .join(name)
}

pub fn python() -> PathBuf {
    venv_bin("python")
}

pub fn umtune_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_umtune"))
}

/// `umtune-launch`: built by the same `cargo test --workspace` (next to the umtune binary).
pub fn launcher_bin() -> PathBuf {
    umtune_bin().with_file_name("umtune-launch")
}

/// `umtune train` arguments for the tiny model: LoRA + UM + memory, every part on (LoRA dropout,
/// UM noise, heteroscedastic samples: their draws are keyed by the example's position in the
/// global batch, so they do not depend on the world size), `batch` examples per rank.
pub fn train_args(
    out: &Path,
    name: &str,
    batch: usize,
    steps: usize,
    extra: &[&str],
) -> Vec<String> {
    let model = fixture("llama-tiny-gguf").unwrap().join("tiny.gguf");
    let mut args: Vec<String> = vec![
        "train".into(),
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("configs/ablations/lora-um-ema.toml")
            .display()
            .to_string(),
    ];
    let sets = [
        format!("model.source={}", model.display()),
        "model.device=cpu".into(),
        "data.dataset=uci-sentiment".into(),
        "data.train_limit=96".into(),
        "data.eval_limit=48".into(),
        format!("train.max_steps={steps}"),
        format!("train.batch_size={batch}"),
        "train.lr=0.01".into(),
        "train.eval_every=0".into(),
        "run.threads=1".into(),
        format!("run.output_dir={}", out.display()),
        format!("run.name={name}"),
        "dist.timeout_s=60".into(),
    ];
    for s in sets.iter().map(String::as_str).chain(extra.iter().copied()) {
        args.push("--set".into());
        args.push(s.to_string());
    }
    args
}

/// Every tensor a run saved: the trainable weights and the memory (the whole ring, assembled
/// from the ranks' shards, so the entries and their slots compare with one process's).
pub fn weights(run: &Path) -> HashMap<String, Tensor> {
    let mut all: HashMap<String, Tensor> =
        Tensor::read_safetensors(run.join("trainable.safetensors"))
            .unwrap()
            .into_iter()
            .map(|(n, t)| (format!("trainable/{n}"), t))
            .collect();
    let index = run.join("memory.index.json");
    if index.exists() {
        all.extend(whole_ring(&index));
    }
    all
}

/// A saved memory's whole ring in slot order, whatever world size saved it.
pub fn whole_ring(index: &Path) -> HashMap<String, Tensor> {
    let saved = umtune::memory::files::load(index, 0, 1).unwrap();
    let first = &saved.shards[0].tensors;
    let (d_k, d_v) = (first["keys"].size()[1], first["values"].size()[1]);
    let mut ring = umtune::memory::ShardedKvMemory::new(
        &umtune::config::MemoryConfig {
            capacity: saved.capacity,
            key_size: d_k,
            tau: 1.0,
            ..Default::default()
        },
        d_v,
        0,
        1,
        tch::Device::Cpu,
    );
    ring.restore(&saved, index).unwrap();
    ring.tensors()
        .into_iter()
        .map(|(n, t)| (format!("memory/{n}"), t))
        .collect()
}

/// The largest |a - b| relative to a's scale (at least 1: memory values are hidden states, far
/// from unit size).
pub fn relative_diff(a: &Tensor, b: &Tensor) -> f64 {
    let scale = a
        .to_kind(Kind::Double)
        .abs()
        .max()
        .double_value(&[])
        .max(1.0);
    super::max_abs_diff(a, b) / scale
}

pub fn summary(run: &Path) -> serde_json::Value {
    super::read_json(run.join("summary.json")).unwrap()
}

pub fn check(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Weights are compared relative to their norm, or to this for a tensor that stays smaller (a
/// scalar that starts at 0, like UM's `theta`): under [`PARITY`] one step moves all weights by
/// at most lr / eps x the clipped gradient norm (1) together, and a tensor whose gradient is under
/// a thousandth of the whole (judged against that thousandth in [`assert_same_gradients`], its
/// elements being cancellations) moves by at most 1e-3 a step: 2e-2 in 20 steps.
const WEIGHT_FLOOR: f64 = 1e-2;

/// The trainable weights, the memory and the validation metrics of `multi` match the
/// one-process run `single` (see [`PARITY_TOL`] and [`WEIGHT_FLOOR`]); memory ids and `written`
/// exactly.
pub fn assert_same_run(single: &Path, multi: &Path, tol: f64) {
    let (a, b) = (weights(single), weights(multi));
    assert!(!a.is_empty(), "no weights in {}", single.display());
    assert_eq!(
        a.keys().collect::<std::collections::BTreeSet<_>>(),
        b.keys().collect()
    );
    let mut worst = (0.0f64, "");
    for (name, t) in &a {
        if t.kind() == Kind::Int64 {
            assert!(t.equal(&b[name]), "{name}: differs");
            continue;
        }
        let (a64, b64) = (t.to_kind(Kind::Double), b[name].to_kind(Kind::Double));
        let scale = a64.norm().double_value(&[]).max(WEIGHT_FLOOR);
        let d = (a64 - b64).norm().double_value(&[]) / scale;
        if d > worst.0 {
            worst = (d, name);
        }
        assert!(
            d <= tol,
            "{name}: |diff| / max(|tensor|, {WEIGHT_FLOOR}) {d:e} > {tol:e}"
        );
    }
    eprintln!("largest weight difference {:e} ({})", worst.0, worst.1);
    let (sa, sb) = (summary(single), summary(multi));
    for split in ["validation", "test"] {
        for key in ["accuracy", "macro_f1"] {
            assert_eq!(sa[split][key], sb[split][key], "{split} {key}");
        }
        let (la, lb) = (
            sa[split]["loss"].as_f64().unwrap(),
            sb[split]["loss"].as_f64().unwrap(),
        );
        assert!((la - lb).abs() < 1e-4, "{split} loss {la} vs {lb}");
    }
}

/// The `--set`s that make a multi-step weight comparison between world sizes meaningful:
/// - `train.adam_eps = 0.1`, far above any gradient element (clipped to a global norm of 1 over
///   ~45k elements): AdamW's update `lr m / (sqrt(v) + eps)` is then a smooth function of the
///   gradient (its derivative is at most lr / eps per element), so summation-order differences
///   propagate linearly and a wrong normalization of a gradient shows in the weights. At the
///   usual 1e-8, Adam divides each element by its own size: an element whose gradient is a
///   cancellation (|g| ~ eps) turns a last-bit difference into an update of ~lr, and Adam's scale
///   invariance hides a gradient off by a constant factor (issue 18: 2.6e-2 after 20 steps at 3
///   ranks, from rounding alone).
/// - `memory.k = 256`, above the 240 entries 20 steps write: every read takes every entry, so
///   the comparison does not pass through top-k's selection, which is discontinuous at ties (a
///   near-tie flipped by rounding swaps an entry). Selection with k below the entries is
///   compared at equal weights by [`assert_same_gradients`].
pub const PARITY: &[&str] = &["train.lr=0.1", "train.adam_eps=0.1", "memory.k=256"];

/// [`train_args`] with [`PARITY`]'s settings (before `extra`).
pub fn parity_args(
    out: &Path,
    name: &str,
    batch: usize,
    steps: usize,
    extra: &[&str],
) -> Vec<String> {
    let sets: Vec<&str> = PARITY.iter().chain(extra).copied().collect();
    train_args(out, name, batch, steps, &sets)
}

// Tolerance of the weight comparison, |diff| / |tensor| per tensor. The ranks compute the same
// gradient in another summation order (per-rank batches, the ring's chunked sum, other matmul
// shapes): f32 rounding, u = 2^-24 = 6e-8 per operation, and a reduction of n terms in another
// order differs by at most ~n u of the terms' magnitudes; the longest reductions are over the
// batch's 12 x 64 token positions (n u = 4.6e-5). Measured: gradients 1e-7 to 7e-6 per tensor
// at equal weights, weights after 20 steps 1.8e-6 (3 ranks) under [`PARITY`]. Asserted 1e-4,
// twice the worst-case single-reduction bound. Each wrong normalization met while building the
// parity (a per-rank InfoNCE, a padding-dependent UM regularizer, a detached memory read,
// rank-dependent dropout and noise) was off by 1e-2 or more; see [`assert_same_gradients`].
pub const PARITY_TOL: f64 = 1e-4;

/// The synchronized gradients that `UMTUNE_TEST_DUMP_GRADIENTS` saved for `step` in `single` and
/// `multi` agree tensor by tensor within [`PARITY_TOL`] of the tensor's norm (or of a thousandth
/// of the whole gradient's norm, for a tensor whose gradient is itself that small: its elements
/// are cancellations). Every tensor has a gradient (the check covers every part).
pub fn assert_same_gradients(single: &Path, multi: &Path, step: usize) {
    let file = format!("step_{step:06}.safetensors");
    let read = |dir: &Path| -> HashMap<String, Tensor> {
        Tensor::read_safetensors(dir.join(&file))
            .unwrap_or_else(|e| panic!("{}: {e}", dir.join(&file).display()))
            .into_iter()
            .collect()
    };
    let (a, b) = (read(single), read(multi));
    for (name, g) in &a {
        let scale = g.to_kind(Kind::Double).norm().double_value(&[]);
        assert!(scale > 0.0, "{name}: no gradient in one process");
    }
    let (worst, name) = assert_tensors_close(&format!("step {step} gradient"), &a, &b, PARITY_TOL);
    eprintln!("step {step}: largest gradient difference {worst:e} ({name})");
}

/// The same tensors in `a` and `b`, each within `tol` of its norm (or of a thousandth of the
/// whole's norm, for a tensor that small: its elements are cancellations, or it is zero, as a
/// zero-initialized adapter's gradient at step 1); returns the largest difference and where.
pub fn assert_tensors_close(
    what: &str,
    a: &HashMap<String, Tensor>,
    b: &HashMap<String, Tensor>,
    tol: f64,
) -> (f64, String) {
    assert_eq!(
        a.keys().collect::<std::collections::BTreeSet<_>>(),
        b.keys().collect(),
        "{what}: the same tensors"
    );
    let norm = |t: &Tensor| t.to_kind(Kind::Double).norm().double_value(&[]);
    let global = a.values().map(|t| norm(t).powi(2)).sum::<f64>().sqrt();
    assert!(global > 0.0, "{what}: all zero");
    let mut worst = (0.0f64, String::new());
    for (name, x) in a {
        let diff = norm(&(x.to_kind(Kind::Double) - b[name].to_kind(Kind::Double)));
        let d = diff / norm(x).max(1e-3 * global);
        assert!(d <= tol, "{what} of {name}: |diff| / |t| {d:e} > {tol:e}");
        if d > worst.0 {
            worst = (d, name.clone());
        }
    }
    worst
}

/// Copies the directory `from` to `to` (a run, to resume it twice).
pub fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

/// `launcher` (a command that starts 2 ranks of what follows it) trains 20 steps at batch 4 per
/// rank; one process trains at batch 8; the runs must match.
pub fn two_ranks_match_one_process(
    name: &str,
    mut launcher: Command,
) -> Result<(), Box<dyn std::error::Error>> {
    let out = super::fresh_dir(name);
    let one = Command::new(umtune_bin())
        .args(parity_args(&out, "w1", 8, 20, &[]))
        .output()?;
    check(&one, "one process");
    let run = launcher
        .arg(umtune_bin())
        .args(parity_args(&out, name, 4, 20, &[]))
        .output()?;
    check(&run, name);
    assert_same_run(&out.join("w1"), &out.join(name), PARITY_TOL);
    let _ = std::fs::remove_dir_all(&out);
    Ok(())
}

/// Everything a run's result is made of: trainable weights, the memory's whole ring, the final
/// checkpoint's optimizer state, and metrics.jsonl without its timings.
pub fn outcome(run: &Path, last_step: usize) -> (HashMap<String, Tensor>, Vec<serde_json::Value>) {
    let mut tensors = weights(run);
    let last = run.join(format!(
        "checkpoints/step_{last_step:06}/optimizer.safetensors"
    ));
    for (name, t) in Tensor::read_safetensors(&last).unwrap() {
        tensors.insert(format!("optimizer/{name}"), t);
    }
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let lines = text
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            if let Some(o) = v.as_object_mut() {
                o.remove("tokens_per_s");
                o.remove("grad_sync_share");
            }
            v
        })
        .collect();
    (tensors, lines)
}

/// The resumed run ended bitwise as the reference: tensors, optimizer state, metrics.
pub fn assert_bitwise(reference: &Path, resumed: &Path, last_step: usize) {
    let (a, la) = outcome(reference, last_step);
    let (b, lb) = outcome(resumed, last_step);
    assert_eq!(
        a.keys().collect::<std::collections::BTreeSet<_>>(),
        b.keys().collect()
    );
    for (name, t) in &a {
        assert!(t.equal(&b[name]), "{name} differs after resuming");
    }
    assert_eq!(la.len(), lb.len(), "metrics.jsonl line counts");
    for (x, y) in la.iter().zip(&lb) {
        assert_eq!(x, y, "metrics.jsonl lines differ");
    }
    let (sa, sb) = (summary(reference), summary(resumed));
    assert_eq!(sa["validation"], sb["validation"]);
    assert_eq!(sa["test"], sb["test"]);
}
