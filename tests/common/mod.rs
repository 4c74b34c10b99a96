//! Shared helpers for the integration tests: fixture paths (made by tests/make_fixtures.py) and
//! tensor comparisons.
#![allow(dead_code)]
pub mod process;
use std::collections::HashMap;
use std::path::PathBuf;
use tch::Tensor;

pub type TestResult = Result<(), Box<dyn std::error::Error>>;

/// A fixture directory; a missing one is an error that says how to make it.
pub fn fixture(name: &str) -> Result<PathBuf, String> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
        .join(name);
    if dir.exists() {
        Ok(dir)
    } else {
        Err(format!("{} is missing: run `make fixtures`", dir.display()))
    }
}

pub fn reference(name: &str) -> Result<HashMap<String, Tensor>, Box<dyn std::error::Error>> {
    let path = fixture(name)?.join("reference.safetensors");
    Ok(Tensor::read_safetensors(&path)?.into_iter().collect())
}

/// Largest absolute difference between two tensors of equal shape (compared in f32).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shape mismatch");
    (a.to_kind(tch::Kind::Float) - b.to_kind(tch::Kind::Float))
        .abs()
        .max()
        .double_value(&[])
}

pub fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f64) {
    let d = max_abs_diff(a, b);
    assert!(d <= tol, "{what}: max |diff| = {d:e} > {tol:e}");
}

pub fn read_json(path: PathBuf) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    Ok(serde_json::from_str(&std::fs::read_to_string(path)?)?)
}

/// f32 logits of `model` on the reference's padded batch, zero on padding positions.
pub fn padded_logits(model: &dyn umtune::models::Backbone, r: &HashMap<String, Tensor>) -> Tensor {
    let device = model.device();
    let (ids, mask) = (
        r["input_ids"].to_device(device),
        r["attention_mask"].to_device(device),
    );
    let hidden = model.forward(&ids, Some(&mask), None, &mut umtune::models::NoHook);
    let logits = model
        .lm_logits(&hidden)
        .to_device(tch::Device::Cpu)
        .to_kind(tch::Kind::Float);
    masked(r, &logits)
}

/// `t (b, t, ...)` with padding positions of the reference batch zeroed.
pub fn masked(r: &HashMap<String, Tensor>, t: &Tensor) -> Tensor {
    t * r["attention_mask"].unsqueeze(-1).to_kind(tch::Kind::Float)
}

/// The training lines of a run's metrics.jsonl (those with a loss and a gradient norm: not the
/// evaluations).
pub fn training_lines(
    run_dir: &std::path::Path,
) -> Result<Vec<serde_json::Value>, Box<dyn std::error::Error>> {
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl"))?;
    let mut out = Vec::new();
    for line in text.lines() {
        let l: serde_json::Value = serde_json::from_str(line)?;
        if l.get("grad_norm").is_some() {
            out.push(l);
        }
    }
    Ok(out)
}

/// A quick config on the tiny LLaMA GGUF fixture (random weights with a real vocabulary).
pub fn tiny_config(
    tag: &str,
    method: umtune::config::PeftMethod,
) -> Result<umtune::config::Config, Box<dyn std::error::Error>> {
    let model = fixture("llama-tiny-gguf")?.join("tiny.gguf");
    tiny_config_on(tag, method, &model)
}

/// [`tiny_config`] on any model (a tiny fixture with a tokenizer).
pub fn tiny_config_on(
    tag: &str,
    method: umtune::config::PeftMethod,
    model: &std::path::Path,
) -> Result<umtune::config::Config, Box<dyn std::error::Error>> {
    let out = fresh_dir(&format!("train-{tag}"));
    let sets = [
        format!("model.source={}", model.display()),
        "model.device=cpu".into(),
        "data.dataset=uci-sentiment".into(),
        "data.train_limit=64".into(),
        "data.eval_limit=32".into(),
        "train.max_steps=4".into(),
        "train.batch_size=8".into(),
        "train.lr=0.01".into(),
        format!("peft.method={}", method.name()),
        format!("run.output_dir={}", out.display()),
    ];
    Ok(umtune::config::Config::load(None, &sets)?)
}

/// Two training steps (zero-initialized tensors move in the first; memory writes committed), then
/// one more backward: every trainable tensor `check` names has a non-zero gradient, and no
/// backbone tensor has one.
pub fn assert_gradients_reach(
    model: &umtune::task::TaskModel,
    (ids, mask, labels): (&Tensor, &Tensor, &Tensor),
    example_ids: Option<&Tensor>,
    check: impl Fn(&str) -> bool,
) -> TestResult {
    model.training.set(true);
    let mut opt = umtune::train::optimizer::AdamW::new(model.named_trainable(), 0.0);
    for _ in 0..2 {
        opt.zero_grad();
        let f = model.forward(ids, mask, example_ids)?;
        model.loss(&f, labels).backward();
        opt.step(1e-2);
        model.commit_memory()?;
    }
    opt.zero_grad();
    let f = model.forward(ids, mask, example_ids)?;
    model.loss(&f, labels).backward();
    for (name, t) in model.named_trainable().iter().filter(|(n, _)| check(n)) {
        let g = t.grad();
        assert!(
            g.defined() && g.abs().sum(tch::Kind::Float).double_value(&[]) > 0.0,
            "{name}: no gradient"
        );
    }
    for (name, t) in model.backbone.var_store().variables() {
        assert!(!t.grad().defined(), "frozen {name} got a gradient");
    }
    Ok(())
}

/// Copies every trainable tensor of `from` into the same-named one of `into` (tests share the
/// global RNG, so equal seeds cannot make two models' adapters and heads equal).
pub fn copy_trainable(from: &umtune::task::TaskModel, into: &umtune::task::TaskModel) {
    let vars = into.trained_vars();
    for (name, t) in from.named_trainable() {
        let mut dst = vars[&name].shallow_clone();
        tch::no_grad(|| dst.copy_(&t));
    }
}

/// A one-process run context for `cfg` (its device, threads and seed).
pub fn ctx(
    cfg: &umtune::config::Config,
) -> Result<umtune::dist::RunContext, Box<dyn std::error::Error>> {
    Ok(umtune::dist::RunContext::single(cfg)?)
}

/// The task model `cfg` describes, in one process, and its device.
pub fn build_model(
    cfg: &umtune::config::Config,
    num_labels: usize,
) -> Result<(umtune::task::TaskModel, tch::Device), Box<dyn std::error::Error>> {
    let ctx = ctx(cfg)?;
    Ok((
        umtune::task::TaskModel::build(cfg, num_labels, &ctx)?,
        ctx.device,
    ))
}

/// Trains `cfg` in one process; the summary and the trained model.
pub fn train_model(
    cfg: &umtune::config::Config,
) -> Result<(umtune::train::run_files::Summary, umtune::task::TaskModel), Box<dyn std::error::Error>>
{
    Ok(umtune::train::trainer::train_model(cfg, &ctx(cfg)?)?)
}

/// Trains `cfg` in one process.
pub fn train(
    cfg: &umtune::config::Config,
) -> Result<umtune::train::run_files::Summary, Box<dyn std::error::Error>> {
    Ok(train_model(cfg)?.0)
}

/// `world` ranks of the CPU ring backend, connected over loopback through a TCPStore this
/// function serves (each rank a client, as under torchrun's agent store); rank order.
pub fn ring_groups(world: usize) -> Vec<Box<dyn umtune::dist::Collective>> {
    use umtune::dist::c10d::Store;
    let timeout = std::time::Duration::from_secs(30);
    let server = Store::connect("127.0.0.1", 0, true, world, timeout, "ring-test", 0).unwrap();
    let port = server.port();
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            std::thread::spawn(move || {
                let store =
                    Store::connect("127.0.0.1", port, false, world, timeout, "ring-test", rank)
                        .unwrap();
                Box::new(
                    umtune::dist::ring::RingGroup::connect(
                        &store,
                        rank,
                        world,
                        "127.0.0.1",
                        timeout,
                    )
                    .unwrap(),
                ) as Box<dyn umtune::dist::Collective>
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// A private scratch directory under the temp dir, named by `name` and this process's id, with
/// anything an earlier process of the same id left there removed: pids repeat across boots of a
/// CI image, and a stale run directory or file would otherwise be read as this test's.
pub fn fresh_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("umtune-{name}-{}", std::process::id()));
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        assert!(
            e.kind() == std::io::ErrorKind::NotFound,
            "cannot clear {}: {e}",
            dir.display()
        );
    }
    dir
}
