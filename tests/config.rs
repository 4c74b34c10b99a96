//! Configuration: file, environment and --set layering, and the promised messages for bad input.
mod common;
use std::path::PathBuf;
use umtune::config::{Config, Dtype};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Every test here loads configs, which read the process's UMTUNE__* environment, and one test
/// sets such a variable: they take this lock so none sees another's variable.
static ENV: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn env_lock() -> std::sync::MutexGuard<'static, ()> {
    ENV.lock().unwrap_or_else(|e| e.into_inner())
}

fn write(name: &str, text: &str) -> std::io::Result<PathBuf> {
    let dir = common::fresh_dir("config");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(name);
    std::fs::write(&path, text)?;
    Ok(path)
}

fn load_err(file: Option<&PathBuf>, overrides: &[&str]) -> String {
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    match Config::load(file.map(|p| p.as_path()), &overrides) {
        Ok(cfg) => panic!("expected an error, got {cfg:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn file_then_overrides() -> TestResult {
    let _env = env_lock();
    let f = write(
        "ok.toml",
        "[model]\nsource = \"preset:gpt2\"\ndtype = \"bf16\"\n[run]\nthreads = 2\n",
    )?;
    let cfg = Config::load(Some(&f), &[])?;
    assert_eq!(cfg.model.source, "preset:gpt2");
    assert_eq!(cfg.model.dtype, Dtype::Bf16);
    assert_eq!(cfg.run.threads, 2);
    let cfg = Config::load(
        Some(&f),
        &["model.dtype=f16".into(), "run.threads=1".into()],
    )?;
    assert_eq!((cfg.model.dtype, cfg.run.threads), (Dtype::F16, 1));
    // The printed config loads back to the same values.
    let round = write("round.toml", &cfg.to_toml()?)?;
    assert_eq!(Config::load(Some(&round), &[])?, cfg);
    Ok(())
}

#[test]
fn environment_overrides_file_and_set_overrides_environment() -> TestResult {
    let _env = env_lock();
    let f = write("env.toml", "[run]\nseed = 1\n")?;
    std::env::set_var("UMTUNE__RUN__SEED", "7");
    let from_env = Config::load(Some(&f), &[])?.run.seed;
    let from_set = Config::load(Some(&f), &["run.seed=9".into()])?.run.seed;
    std::env::remove_var("UMTUNE__RUN__SEED");
    assert_eq!((from_env, from_set), (7, 9));
    Ok(())
}

#[test]
fn unknown_key_names_the_key_and_the_allowed_ones() -> TestResult {
    let _env = env_lock();
    let f = write("unknown.toml", "[model]\ndtyp = \"f32\"\n")?;
    let e = load_err(Some(&f), &[]);
    assert!(
        e.contains("unknown.toml")
            && e.contains("`dtyp`")
            && e.contains("`dtype`")
            && e.contains("model"),
        "{e}"
    );
    let e = load_err(None, &["run.thread=2"]);
    assert!(e.contains("`thread`") && e.contains("`threads`"), "{e}");
    let e = load_err(None, &["trainer.lr=1"]);
    assert!(e.contains("`trainer`") && e.contains("`model`"), "{e}");
    Ok(())
}

#[test]
fn wrong_type_names_the_key() -> TestResult {
    let _env = env_lock();
    let f = write("type.toml", "[run]\nthreads = \"many\"\n")?;
    let e = load_err(Some(&f), &[]);
    assert!(e.contains("run.threads") && e.contains("integer"), "{e}");
    Ok(())
}

#[test]
fn bad_values_list_the_allowed_values() {
    let _env = env_lock();
    let e = load_err(None, &["model.dtype=f64"]);
    assert!(
        e.contains("model.dtype") && e.contains("`f32`, `bf16`, `f16`"),
        "{e}"
    );
    let e = load_err(None, &["model.device=tpu"]);
    assert!(e.contains("model.device") && e.contains("cuda:N"), "{e}");
    let e = load_err(None, &["run.threads=5000"]);
    assert!(
        e.contains("run.threads = 5000") && e.contains("1024"),
        "{e}"
    );
    let e = load_err(None, &["model.source="]);
    assert!(e.contains("model.source"), "{e}");
    let e = load_err(None, &["no-equals-sign"]);
    assert!(e.contains("section.key=value"), "{e}");
}

#[test]
fn missing_file_is_named() {
    let _env = env_lock();
    let e = load_err(Some(&PathBuf::from("/nonexistent/exp.toml")), &[]);
    assert!(e.contains("/nonexistent/exp.toml"), "{e}");
}

#[test]
fn shipped_configs_are_valid() -> TestResult {
    let _env = env_lock();
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut n = 0;
    for sub in [dir.clone(), dir.join("ablations")] {
        for entry in std::fs::read_dir(&sub)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "toml") {
                Config::load(Some(&path), &[]).map_err(|e| format!("{}: {e}", path.display()))?;
                n += 1;
            }
        }
    }
    assert!(n >= 16, "expected the shipped configs in {}", dir.display());
    Ok(())
}

#[test]
fn overrides_take_toml_literals() -> TestResult {
    let _env = env_lock();
    let sets: Vec<String> = [
        "peft.targets=[\"q_proj\", \"o_proj\"]",
        "train.lr=1e-3",
        "peft.rslora=true",
        "run.name=abc",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let cfg = Config::load(None, &sets)?;
    assert_eq!(cfg.peft.targets, ["q_proj", "o_proj"]);
    assert_eq!(
        (cfg.train.lr, cfg.peft.rslora, cfg.run.name.as_str()),
        (1e-3, true, "abc")
    );
    let e = load_err(None, &["train.lr=2.5"]);
    assert!(
        e.contains("train.lr = 2.5") && e.contains("0 < lr < 1"),
        "{e}"
    );
    Ok(())
}

#[test]
fn dtype_auto_and_activation_checkpointing_values() -> TestResult {
    let _env = env_lock();
    // `auto` is resolved at load: f32 where the model runs on the CPU.
    let cfg = Config::load(
        None,
        &["model.dtype=auto".into(), "model.device=cpu".into()],
    )?;
    assert_eq!(cfg.model.dtype, Dtype::F32);
    for (given, every) in [
        ("false", None),
        ("true", Some(1)),
        ("3", Some(3)),
        ("0", None),
    ] {
        let cfg = Config::load(None, &[format!("train.activation_checkpointing={given}")])?;
        assert_eq!(cfg.train.activation_checkpointing.every(), every, "{given}");
        // Written back and read again, the same.
        let round = write("ckpt.toml", &cfg.to_toml()?)?;
        assert_eq!(Config::load(Some(&round), &[])?, cfg);
    }
    let e = load_err(None, &["train.activation_checkpointing=-2"]);
    assert!(e.contains("train.activation_checkpointing"), "{e}");
    let e = load_err(None, &["model.dtype=f64"]);
    assert!(e.contains("`f32`, `bf16`, `f16`, `auto`"), "{e}");
    Ok(())
}
