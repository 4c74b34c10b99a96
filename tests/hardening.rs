//! Regression tests for the defects found when umtune was tried as a new user would: files
//! beside outputs, non-finite metrics, label sets of another dataset, corrupt or NaN weights,
//! interrupted runs, predict vs eval with the memory, NaN memory entries, and config checks.
mod common;
use common::*;
use std::path::{Path, PathBuf};
use umtune::config::{Config, PeftMethod};
use umtune::train::report::{collect_runs, results_csv, results_table};
use umtune::train::restore::load_run;
use umtune::train::run_files::Summary;
use umtune::train::run_files::{read_record, RunState};

fn scratch(tag: &str) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let dir = common::fresh_dir(&format!("hard-{tag}"));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Defect 1: an atomic write touches nothing but its target, leaves no temporary file, and a
/// failed write leaves the old target as it was.
#[test]
fn atomic_writes_leave_neighbours_alone() -> TestResult {
    use umtune::atomic_file::{write_atomic, write_atomic_with};
    let dir = scratch("atomic")?;
    let target = dir.join("out.jsonl");
    let neighbour = dir.join("out.tmp");
    std::fs::write(&neighbour, "mine")?;
    write_atomic(&target, b"one\n")?;
    write_atomic(&target, b"two\n")?;
    assert_eq!(std::fs::read_to_string(&target)?, "two\n");
    assert_eq!(std::fs::read_to_string(&neighbour)?, "mine");
    let failed = write_atomic_with(&target, |tmp| {
        std::fs::write(tmp, "half").map_err(|e| umtune::Error::io(tmp, e))?;
        Err(umtune::Error::Internal("writer failed".into()))
    });
    assert!(failed.is_err());
    assert_eq!(std::fs::read_to_string(&target)?, "two\n");
    let mut names: Vec<String> = std::fs::read_dir(&dir)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().to_string()))
        .collect::<Result<_, _>>()?;
    names.sort();
    assert_eq!(names, ["out.jsonl", "out.tmp"], "a temporary file was left");
    Ok(())
}

/// A finished tiny run, shared by the tests below that only read it.
fn trained(tag: &str) -> Result<Summary, Box<dyn std::error::Error>> {
    train(&tiny_config(tag, PeftMethod::Lora)?)
}

/// Defect 2: non-finite metrics round-trip through summary.json and are flagged; a report lists
/// every run (finished, unfinished, broken), marked.
#[test]
fn non_finite_metrics_round_trip_and_reports_list_every_run() -> TestResult {
    let summary = trained("nan-report")?;
    let root = summary.run_dir.parent().ok_or("run root")?.to_path_buf();
    // A copy of the run whose validation loss is NaN, as a run that diverged late would write.
    let mut nan = summary.clone();
    nan.validation.loss = f64::NAN;
    nan.run_dir = root.join("nan-run");
    let json = serde_json::to_string(&nan)?;
    assert!(json.contains("\"loss\":\"NaN\""), "{json}");
    let back: Summary = serde_json::from_str(&json)?;
    assert!(back.validation.loss.is_nan() && !back.is_finite());
    // Files from before this fix wrote `null`: they read as NaN instead of failing.
    let legacy: Summary = serde_json::from_str(&json.replace("\"NaN\"", "null"))?;
    assert!(legacy.validation.loss.is_nan());
    std::fs::create_dir_all(&nan.run_dir)?;
    std::fs::write(nan.run_dir.join("summary.json"), json)?;
    // An unfinished run (run.json only) and a broken one (summary.json is not JSON).
    let unfinished = root.join("unfinished-run");
    std::fs::create_dir_all(&unfinished)?;
    let mut record = read_record(&summary.run_dir)?;
    record.state = RunState::Running;
    record.step = 2;
    std::fs::write(unfinished.join("run.json"), serde_json::to_string(&record)?)?;
    // A live run's log is ahead of its run.json (rewritten only at evaluations and state changes).
    let live = root.join("live-run");
    std::fs::create_dir_all(&live)?;
    std::fs::write(live.join("run.json"), serde_json::to_string(&record)?)?;
    std::fs::write(
        live.join("metrics.jsonl"),
        "{\"step\":1,\"split\":\"train\"}\n{\"step\":3,\"split\":\"train\",\"loss\":0.5}\n",
    )?;
    let broken = root.join("broken-run");
    std::fs::create_dir_all(&broken)?;
    std::fs::write(broken.join("summary.json"), "{not json")?;
    let runs = collect_runs(&root)?;
    let status = |name: &str| -> Result<String, String> {
        runs.iter()
            .find(|r| r.dir.ends_with(name))
            .map(|r| r.status.clone())
            .ok_or(format!("{name} not listed"))
    };
    assert_eq!(runs.len(), 5);
    let own = summary
        .run_dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or("name")?;
    assert_eq!(status(own)?, "finished");
    assert_eq!(status("nan-run")?, "finished, non-finite metrics");
    assert_eq!(status("unfinished-run")?, "running at step 2 of 4");
    assert_eq!(status("live-run")?, "running at step 3 of 4");
    let b = status("broken-run")?;
    assert!(
        b.starts_with("broken: ") && b.contains("summary.json"),
        "{b}"
    );
    let table = results_table(&runs);
    assert!(table.contains("| NaN |"), "{table}");
    let csv = results_csv(&runs)?;
    assert_eq!(csv.lines().count(), 1 + 2 + 2 + 1 + 1 + 1, "{csv}");
    Ok(())
}

/// Defect 3: another dataset's labels are mapped by name onto the run's, and labels the run does
/// not have are refused by name.
#[test]
fn eval_on_another_dataset_maps_labels_by_name() -> TestResult {
    use umtune::data::dataset::load_data;
    use umtune::train::restore::run_config;
    let summary = trained("labels")?;
    let names = summary.label_names.clone();
    let dir = scratch("labels-data")?;
    // The same two classes, spelled out and listed in the other order.
    let rows = |pairs: &[(&str, &str)]| -> String {
        pairs
            .iter()
            .map(|(t, l)| format!("{}\n", serde_json::json!({"text": t, "label": l})))
            .collect()
    };
    let swapped = [
        ("great fun", names[1].as_str()),
        ("dull", names[0].as_str()),
    ];
    for split in ["train", "validation"] {
        std::fs::write(dir.join(format!("{split}.jsonl")), rows(&swapped))?;
    }
    let set = format!("data.dataset={}", dir.display());
    let cfg = run_config(&summary.run_dir, std::slice::from_ref(&set))?;
    let run = load_run(&summary.run_dir, &[])?;
    let data = load_data(&cfg, run.model.tokenizer()?)?;
    assert_eq!(data.label_names, names);
    assert_eq!(
        data.validation.iter().map(|e| e.label).collect::<Vec<_>>(),
        [1, 0]
    );
    // A third class the run never saw.
    let three = [("great fun", names[1].as_str()), ("meh", "neutral")];
    for split in ["train", "validation"] {
        std::fs::write(dir.join(format!("{split}.jsonl")), rows(&three))?;
    }
    let e = load_data(&cfg, run.model.tokenizer()?)
        .err()
        .ok_or("expected an error")?
        .to_string();
    assert!(e.contains("`neutral`") && e.contains("train.jsonl"), "{e}");
    Ok(())
}

/// Defect 4: a flipped byte in the weights is caught by the digest; NaN weights are refused by
/// tensor name; a model with NaN outputs never yields metrics.
#[test]
fn corrupt_or_nan_weights_are_refused() -> TestResult {
    use umtune::train::eval::outputs;
    let summary = trained("corrupt")?;
    let file = summary.run_dir.join("trainable.safetensors");
    let good = std::fs::read(&file)?;
    let mut bad = good.clone();
    let last = bad.len() - 3;
    bad[last] ^= 0x40;
    std::fs::write(&file, &bad)?;
    let e = load_run(&summary.run_dir, &[])
        .err()
        .ok_or("a corrupt file loaded")?
        .to_string();
    assert!(
        e.contains("trainable.safetensors") && e.contains("corrupt"),
        "{e}"
    );
    // NaN weights in a file whose digest matches (as a run that saved NaN weights would have).
    std::fs::write(&file, &good)?;
    let run = load_run(&summary.run_dir, &[])?;
    let named = run.model.named_trainable();
    let (poisoned, _) = named
        .iter()
        .find(|(n, _)| n.contains("lora_B"))
        .ok_or("lora_B")?;
    let nan: Vec<(String, tch::Tensor)> = named
        .iter()
        .map(|(n, t)| {
            let t = if n == poisoned {
                t.detach().fill(f64::NAN)
            } else {
                t.detach().copy()
            };
            (n.clone(), t)
        })
        .collect();
    tch::Tensor::write_safetensors(&nan, &file)?;
    let mut record = read_record(&summary.run_dir)?;
    record.files.clear();
    std::fs::write(
        summary.run_dir.join("run.json"),
        serde_json::to_string(&record)?,
    )?;
    let e = load_run(&summary.run_dir, &[])
        .err()
        .ok_or("NaN weights loaded")?
        .to_string();
    assert!(e.contains(poisoned.as_str()) && e.contains("NaN"), "{e}");
    // And outputs themselves: a NaN head gives an error, not accuracy.
    let mut score = run.model.trained_vars()["score.weight"].shallow_clone();
    tch::no_grad(|| {
        let _ = score.fill_(f64::NAN);
    });
    let data = umtune::data::dataset::load_data(&run.config, run.model.tokenizer()?)?;
    let e = outputs(&run.model, &data.validation, 8)
        .err()
        .ok_or("NaN logits were scored")?;
    assert!(matches!(e, umtune::Error::NonFinite(_)), "{e}");
    Ok(())
}

/// Defect 5: a stop request finishes the step, saves, records the state, and the run stays
/// usable: eval loads its weights (marked unfinished) and the report lists it.
#[test]
fn an_interrupted_run_is_saved_and_loadable() -> TestResult {
    let mut cfg = tiny_config("interrupt", PeftMethod::Lora)?;
    cfg.train.max_steps = 6;
    let ctx = ctx(&cfg)?;
    ctx.stop.raise(15);
    let e = umtune::train::trainer::train(&cfg, &ctx)
        .err()
        .ok_or("the run ignored the stop")?;
    assert_eq!(e.exit_code(), 143);
    let msg = e.to_string();
    assert!(msg.contains("SIGTERM") && msg.contains("step 1"), "{msg}");
    let dir = std::fs::read_dir(&cfg.run.output_dir)?
        .next()
        .ok_or("no run dir")??
        .path();
    let record = read_record(&dir)?;
    assert_eq!(
        (record.state, record.step, record.weights_step),
        (RunState::Interrupted, 1, Some(1))
    );
    assert!(!dir.join("summary.json").exists());
    let run = load_run(&dir, &[])?;
    assert!(!run.finished);
    let runs = collect_runs(Path::new(&cfg.run.output_dir))?;
    assert_eq!(runs[0].status, "interrupted at step 1 of 6");
    Ok(())
}

/// Defect 5: a run that stopped before saving anything is refused with what happened, not a
/// missing-file error.
#[test]
fn a_run_without_weights_says_so() -> TestResult {
    let summary = trained("no-weights")?;
    let mut record = read_record(&summary.run_dir)?;
    record.state = RunState::Running;
    record.weights_step = None;
    std::fs::write(
        summary.run_dir.join("run.json"),
        serde_json::to_string(&record)?,
    )?;
    std::fs::remove_file(summary.run_dir.join("summary.json"))?;
    std::fs::remove_file(summary.run_dir.join("trainable.safetensors"))?;
    let e = load_run(&summary.run_dir, &[])
        .err()
        .ok_or("loaded without weights")?
        .to_string();
    assert!(
        e.contains("running at step 4 of 4") && e.contains("saved no weights"),
        "{e}"
    );
    assert_eq!(e.matches("No such file").count(), 0, "{e}");
    Ok(())
}

/// Defect 6: with the external memory, predict gives exactly the probabilities eval computes for
/// the same texts (its inputs never exclude a training entry).
#[test]
fn predict_equals_eval_with_the_memory() -> TestResult {
    use umtune::data::readers::{read_split, Columns, Example, Task};
    use umtune::train::eval::outputs;
    use umtune::train::predict::predict;
    let mut cfg = tiny_config("predict-mem", PeftMethod::Lora)?;
    cfg.memory.enabled = true;
    cfg.memory.capacity = 64;
    cfg.memory.k = 4;
    let summary = train(&cfg)?;
    let run = load_run(&summary.run_dir, &[])?;
    let data = umtune::data::dataset::load_data(&run.config, run.model.tokenizer()?)?;
    let out = outputs(&run.model, &data.validation, 16)?;
    let dir = umtune::data::dataset::dataset_dir(&cfg.data.dataset);
    let path = umtune::data::dataset::split_file(&dir, "validation")?.ok_or("split")?;
    let split = read_split(
        &path,
        Task::Classification,
        &Columns::default(),
        Some(&run.label_names),
    )?;
    let texts = |s: &[Example], n: usize| -> Vec<String> {
        s.iter()
            .take(n)
            .filter_map(|e| match e {
                Example::Text { text, .. } => Some(text.clone()),
                _ => None,
            })
            .collect()
    };
    let val_texts = texts(&split.examples, 32);
    let predicted = predict(&run, &val_texts, 16)?;
    for (i, p) in predicted.iter().enumerate() {
        let want = umtune::uncertainty::metrics::softmax(&out.logits[i][0], 1.0);
        for (a, b) in p.probabilities.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "example {i}: predict {a} vs eval {b}");
        }
    }
    Ok(())
}

/// Defect 7: entries recorded by a skipped step never reach the ring, and a NaN-scored entry
/// never ranks first.
#[test]
fn skipped_steps_and_nan_keys_never_reach_the_memory() -> TestResult {
    use tch::{Device, Kind, Tensor};
    use umtune::dist::SingleProcess;
    use umtune::memory::ShardedKvMemory;
    let mut cfg = tiny_config("mem-skip", PeftMethod::Lora)?;
    cfg.memory.enabled = true;
    cfg.memory.capacity = 32;
    cfg.memory.k = 4;
    let (model, device) = build_model(&cfg, 2)?;
    let ids = Tensor::from_slice(&[5i64, 9, 3, 7, 5, 2])
        .view([2, 3])
        .to_device(device);
    let mask = ids.ones_like();
    model.training.set(true);
    model.forward(&ids, &mask, Some(&Tensor::from_slice(&[1i64, 2])))?;
    model.discard_memory()?;
    model.commit_memory()?;
    let fusion = model.memory.as_ref().ok_or("memory")?;
    assert_eq!(
        fusion.store()?.len(),
        0,
        "a skipped step's entries were written"
    );
    model.forward(&ids, &mask, Some(&Tensor::from_slice(&[1i64, 2])))?;
    model.commit_memory()?;
    assert_eq!(fusion.store()?.len(), 2);
    // A NaN key (written directly, past the commit's filter) scores last, not first.
    let mut memory = ShardedKvMemory::new(
        &umtune::config::MemoryConfig {
            capacity: 4,
            key_size: 2,
            tau: 1.0,
            ..Default::default()
        },
        1,
        0,
        1,
        Device::Cpu,
    );
    let keys = Tensor::from_slice(&[f32::NAN, f32::NAN, 1.0, 0.0, 0.0, 1.0]).view([3, 2]);
    let values = Tensor::zeros([3, 1], (Kind::Float, Device::Cpu));
    memory.write(
        &SingleProcess,
        &keys,
        &values,
        &Tensor::from_slice(&[10i64, 11, 12]),
    )?;
    let found = memory.search_local(
        &Tensor::from_slice(&[1.0f32, 0.0]).view([1, 2]),
        &Tensor::from_slice(&[-5i64]),
        1,
    )?;
    assert_eq!(found.ids.int64_value(&[0, 0]), 11);
    Ok(())
}

fn config_error(file: Option<&Path>, sets: &[&str]) -> String {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    match Config::load(file, &sets) {
        Ok(_) => "no error".into(),
        Err(e) => e.to_string(),
    }
}

/// Defect 8: integers stay integers, memory.k fits the ring, label names are unique, run names
/// stay inside output_dir, and errors name the layer that caused them.
#[test]
fn config_refuses_what_it_used_to_accept() -> TestResult {
    let e = config_error(None, &["train.batch_size=1.5"]);
    assert!(
        e.contains("train.batch_size") && e.contains("whole number") && e.contains("--set"),
        "{e}"
    );
    let e = config_error(None, &["train.batch_size=1e20"]);
    assert!(e.contains("train.batch_size"), "{e}");
    let e = config_error(None, &["memory.k=64", "memory.capacity=16"]);
    assert!(
        e.contains("memory.k = 64") && e.contains("memory.capacity = 16"),
        "{e}"
    );
    let e = config_error(None, &["data.label_names=[\"a\", \"b\", \"a\"]"]);
    assert!(e.contains("`a` twice"), "{e}");
    for name in ["../x", "/abs", "a/b"] {
        let set = format!("run.name={name}");
        let e = config_error(None, &[&set]);
        assert!(
            e.contains("run.name") && e.contains("plain directory name"),
            "{e}"
        );
    }
    // A bad value from --set is blamed on --set, not on the file.
    let dir = scratch("config")?;
    let file = dir.join("c.toml");
    std::fs::write(&file, "[train]\nlr = 0.001\n")?;
    let e = config_error(Some(&file), &["train.epochs=x"]);
    assert!(
        e.contains("--set `train.epochs=x`") && !e.contains("c.toml"),
        "{e}"
    );
    std::fs::write(&file, "[train]\nepochs = \"x\"\n")?;
    let e = config_error(Some(&file), &[]);
    assert!(e.contains("c.toml"), "{e}");
    // A relative dataset directory is stored absolute.
    let data = dir.join("ds");
    std::fs::create_dir_all(&data)?;
    let cwd = std::env::current_dir()?;
    let rel = pathdiff(&data, &cwd);
    let set = format!("data.dataset={}", rel.display());
    let cfg = Config::load(None, &[set])?;
    assert!(
        Path::new(&cfg.data.dataset).is_absolute(),
        "{}",
        cfg.data.dataset
    );
    assert_eq!(Path::new(&cfg.data.dataset), data.canonicalize()?);
    Ok(())
}

/// `target` relative to `base` (both absolute), through `..` where needed.
fn pathdiff(target: &Path, base: &Path) -> PathBuf {
    let (t, b): (Vec<_>, Vec<_>) = (target.components().collect(), base.components().collect());
    let common = t.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut out = PathBuf::new();
    for _ in common..b.len() {
        out.push("..");
    }
    for c in &t[common..] {
        out.push(c);
    }
    out
}

/// Defect 8: two files for one split are an error naming both.
#[test]
fn two_files_for_a_split_are_refused() -> TestResult {
    let dir = scratch("two-files")?;
    std::fs::write(dir.join("train.jsonl"), "{\"text\": \"a\", \"label\": 0}\n")?;
    std::fs::write(dir.join("train.csv"), "text,label\na,0\n")?;
    let e = umtune::data::dataset::split_file(&dir, "train")
        .err()
        .ok_or("one file chosen silently")?
        .to_string();
    assert!(e.contains("train.jsonl") && e.contains("train.csv"), "{e}");
    Ok(())
}

/// Defect 9: a corrupt parquet page is reported with the rows it holds, not at "row 0".
#[test]
fn a_corrupt_parquet_page_names_its_row_group() -> TestResult {
    use umtune::data::readers::{read_split, Columns, Task};
    let src = umtune::config::asset_cache()
        .join("data")
        .join("uci-sentiment")
        .join("train.parquet");
    let mut bytes = std::fs::read(&src)?;
    let dir = scratch("parquet")?;
    // Garble the data pages (the middle of the file), not the footer.
    let (a, b) = (bytes.len() / 4, bytes.len() / 2);
    for x in &mut bytes[a..b] {
        *x = x.wrapping_mul(31).wrapping_add(7);
    }
    let path = dir.join("train.parquet");
    std::fs::write(&path, &bytes)?;
    let e = read_split(&path, Task::Classification, &Columns::default(), None)
        .err()
        .ok_or("a garbled file read")?
        .to_string();
    assert!(
        e.contains("train.parquet") && e.contains("row group 0 (rows 1 to"),
        "{e}"
    );
    assert!(!e.contains("row 0"), "{e}");
    Ok(())
}

/// `sync_gradients` makes every rank's gradients the mean over ranks (an in-process group of two
/// ranks standing in for two processes).
#[test]
fn sync_gradients_averages_over_ranks() -> TestResult {
    use tch::{Kind, Tensor};
    use umtune::dist::InProcessGroup;
    use umtune::train::optimizer::AdamW;
    use umtune::train::trainer::sync_gradients;
    let handles: Vec<_> = InProcessGroup::new(2)
        .into_iter()
        .map(|group| {
            std::thread::spawn(move || -> Result<Vec<f64>, String> {
                let rank = umtune::dist::Collective::rank(&group) as f64;
                let w =
                    Tensor::zeros([2, 2], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
                let b = Tensor::zeros([3], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
                ((&w * (rank + 1.0)).sum(Kind::Float) + (&b * (10.0 * rank)).sum(Kind::Float))
                    .backward();
                let opt = AdamW::new(
                    vec![
                        ("w".into(), w.shallow_clone()),
                        ("b".into(), b.shallow_clone()),
                    ],
                    0.0,
                );
                sync_gradients(&group, &opt).map_err(|e| e.to_string())?;
                let mut out =
                    Vec::<f64>::try_from(w.grad().reshape([-1])).map_err(|e| e.to_string())?;
                out.extend(Vec::<f64>::try_from(b.grad()).map_err(|e| e.to_string())?);
                Ok(out)
            })
        })
        .collect();
    for h in handles {
        let grads = h.join().map_err(|_| "rank panicked")??;
        // w: mean of 1 and 2; b: mean of 0 and 10.
        assert_eq!(grads, [1.5, 1.5, 1.5, 1.5, 5.0, 5.0, 5.0]);
    }
    Ok(())
}

/// The divergence guard: steady steps pass; a loss or gradient spike far above the running
/// average is reported with the part whose gradient rose the most against its own average.
#[test]
fn the_spike_guard_names_the_part_that_rose() {
    use std::collections::BTreeMap;
    use umtune::train::diagnostics::{SpikeGuard, WARMUP};
    let parts = |lora: f64, gate: f64| -> BTreeMap<String, f64> {
        [
            ("lora".to_string(), lora),
            ("memory_gate".to_string(), gate),
        ]
        .into_iter()
        .collect()
    };
    let mut guard = SpikeGuard::default();
    for step in 1..=WARMUP + 5 {
        let wobble = if step % 2 == 0 { 0.1 } else { -0.1 };
        assert!(guard
            .observe(step, 0.8 + wobble, 2.0 + wobble, &parts(1.0, 0.5))
            .is_none());
    }
    // The gate's gradient jumps 40x, the LoRA one 2x: the gate is named.
    let spike = guard
        .observe(WARMUP + 6, 2.4, 25.0, &parts(2.0, 20.0))
        .expect("a spike");
    assert_eq!(spike.part, "memory_gate");
    assert!(spike.grad_norm_avg < 3.0 && spike.loss_avg < 1.0);
    // A loss that quadruples but stays small in absolute terms is not a spike, nor is ordinary
    // small-batch noise (a loss of 1.5 among losses around 0.5 +- 0.3).
    let mut calm = SpikeGuard::default();
    for step in 1..=WARMUP + 1 {
        calm.observe(step, 0.05, 1.0, &parts(1.0, 1.0));
    }
    assert!(calm
        .observe(WARMUP + 2, 0.2, 1.0, &parts(1.0, 1.0))
        .is_none());
    let mut noisy = SpikeGuard::default();
    for step in 1..=WARMUP + 30 {
        let loss = [0.2, 0.8, 0.5, 0.3, 0.7][step % 5];
        assert!(
            noisy.observe(step, loss, 5.0, &parts(1.0, 1.0)).is_none(),
            "step {step}"
        );
    }
    assert!(noisy
        .observe(WARMUP + 31, 1.5, 9.0, &parts(1.0, 1.0))
        .is_none());
    // A sustained climb is: the loss triples and stays there.
    let climb =
        (WARMUP + 32..WARMUP + 45).find_map(|step| noisy.observe(step, 1.6, 6.0, &parts(1.2, 1.0)));
    assert!(climb.is_some(), "a sustained climb went unnoticed");
}

/// What a user sees of a run with every part on: each logged line of metrics.jsonl carries the
/// gradient norm of every part and the probes of the quantities that can blow up.
#[test]
fn metrics_carry_part_gradients_and_probes() -> TestResult {
    let mut cfg = tiny_config("probes", PeftMethod::Lora)?;
    cfg.uncertainty.enabled = true;
    cfg.memory.enabled = true;
    cfg.memory.capacity = 64;
    cfg.memory.k = 4;
    cfg.train.log_every = 2;
    let summary = train(&cfg)?;
    let logged = training_lines(&summary.run_dir)?;
    assert_eq!(logged.len(), 2, "steps 2 and 4");
    for line in &logged {
        let parts = line["grad_norms"].as_object().ok_or("grad_norms")?;
        for part in [
            "lora",
            "head",
            "um_estimators",
            "um_head",
            "memory_w_q",
            "memory_w_k",
            "memory_gate",
            "memory_w_o",
        ] {
            assert!(
                parts[part].as_f64().is_some_and(f64::is_finite),
                "{part}: {line}"
            );
        }
        // The parts add up to the total (before clipping).
        let sq: f64 = parts
            .values()
            .filter_map(|v| v.as_f64())
            .map(|v| v * v)
            .sum();
        let total = line["grad_norm"].as_f64().ok_or("grad_norm")?;
        assert!((sq.sqrt() - total).abs() < 1e-3 * total.max(1.0), "{line}");
        let probe = line["probe"].as_object().ok_or("probe")?;
        for key in [
            "um.logvar_max",
            "um.p_max",
            "um.noise_to_feature",
            "um.temperature_max",
            "um.logit_var_max",
            "memory.gate_mean",
            "memory.gate_max",
            "memory.gate_log_p_min",
            "memory.update_to_hidden",
            "memory.infonce",
        ] {
            assert!(
                probe[key].as_f64().is_some_and(f64::is_finite),
                "{key}: {line}"
            );
        }
        // Logvar is clamped to [-10, 10] after it is recorded; p is an average of exp(logvar).
        assert!(probe["um.p_max"].as_f64() <= Some(10f64.exp()));
        assert!(probe["memory.gate_max"].as_f64() <= Some(1.0));
    }
    Ok(())
}
