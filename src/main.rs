//! The `umtune` command line.
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::time::Instant;
use tch::{Kind, Tensor};
use umtune::config::{parse_device, Config};
use umtune::data::corrupt::Corruption;
use umtune::logging::{self, LogFormat};
use umtune::models::{generate, resolve, NoHook};
use umtune::train::{run_dir, trainer};

#[derive(Parser)]
#[command(
    name = "umtune",
    version,
    about = "Uncertainty-modeled, memory-augmented PEFT for LLMs"
)]
struct Cli {
    /// Log as human-readable text or as JSON lines.
    #[arg(long, value_enum, default_value = "text", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct ConfigArgs {
    /// TOML experiment config.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a config value: `--set section.key=value` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
}

/// What both benchmark commands take.
#[derive(clap::Args)]
struct BenchArgs {
    #[command(flatten)]
    cfg: ConfigArgs,
    #[arg(long)]
    model: Option<String>,
    #[arg(long, default_value_t = 8)]
    batch: i64,
    #[arg(long, default_value_t = 128)]
    seq_len: i64,
    #[arg(long, default_value_t = 5)]
    iters: usize,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
}

impl BenchArgs {
    /// Runs `f` `warmup` times, then `iters` timed times (synchronizing CUDA after each), and
    /// returns the median seconds, as the bench/ scripts take it for the reference.
    fn median_secs(&self, device: tch::Device, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
        if self.iters == 0 {
            bail!("--iters must be at least 1");
        }
        let mut timed = || -> Result<f64> {
            let start = Instant::now();
            f()?;
            if device.is_cuda() {
                tch::Cuda::synchronize(0);
            }
            Ok(start.elapsed().as_secs_f64())
        };
        for _ in 0..self.warmup {
            timed()?;
        }
        let mut times: Vec<f64> = (0..self.iters).map(|_| timed()).collect::<Result<_>>()?;
        times.sort_by(f64::total_cmp);
        let mid = times.len() / 2;
        Ok(if times.len() % 2 == 1 {
            times[mid]
        } else {
            (times[mid - 1] + times[mid]) / 2.0
        })
    }
}

#[derive(Subcommand)]
enum Command {
    /// Print libtorch, CUDA, NCCL, threads and where models are looked up.
    Doctor,
    /// Evaluate a run on its validation and test splits (or on another dataset with --data).
    Eval {
        run_dir: PathBuf,
        /// A dataset name or directory to evaluate on instead of the run's.
        #[arg(long)]
        data: Option<String>,
        /// Robustness protocol on the evaluated splits, e.g. `drop=0.3` or `mask=0.2,seed=7`
        /// (keys: drop, mask, label_noise, seed).
        #[arg(long)]
        corrupt: Option<String>,
        /// Average N stochastic passes (MC sampling; runs with uncertainty modeling).
        #[arg(long, value_name = "N")]
        mc: Option<i64>,
        /// Write the reliability diagram and risk-coverage plot (PNG) of the test split, or the
        /// validation split without one, into this directory.
        #[arg(long, value_name = "DIR")]
        plots: Option<PathBuf>,
    },
    /// Predict labels for a JSONL file of texts (`{"text": ...}` per line).
    Predict {
        run_dir: PathBuf,
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        output: PathBuf,
        /// Average N stochastic passes (MC sampling; runs with uncertainty modeling).
        #[arg(long, value_name = "N")]
        mc: Option<i64>,
    },
    /// The external memory: `memory build` prebuilds one from a corpus.
    Memory {
        #[command(subcommand)]
        command: MemoryCommand,
    },
    /// A results table (markdown and CSV) of every run under a directory; writes
    /// DIR/results.md and DIR/results.csv.
    Report { dir: PathBuf },
    /// Export a run's trained weights for other tools (`--format peft`: a PEFT LoRA adapter).
    Export {
        run_dir: PathBuf,
        #[arg(long, default_value = "peft")]
        format: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Fine-tune as the config says; writes a run directory and prints a results table.
    Train {
        /// TOML experiment config (see configs/).
        config: PathBuf,
        /// Override a config value: `--set section.key=value` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
    },
    /// Print the resolved configuration (file, then UMTUNE__* environment, then --set).
    Config {
        #[command(flatten)]
        cfg: ConfigArgs,
    },
    /// Greedy generation with a KV cache, to see that a pretrained model loaded right.
    Generate {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// Model reference (overrides model.source).
        #[arg(long)]
        model: Option<String>,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 32)]
        max_new_tokens: usize,
        /// Print the token ids as JSON instead of text.
        #[arg(long)]
        ids: bool,
    },
    /// Time LoRA training steps (forward, backward, AdamW) on random tokens with a 2-class head,
    /// median seconds per step as one JSON line for bench/ scripts.
    BenchTrain(BenchArgs),
    /// Time forward passes (median tokens/s), printed as one JSON line for bench/ scripts.
    BenchForward(BenchArgs),
    /// Time exact top-k reads of the external memory: keys and queries from a safetensors file
    /// (`keys (n, d)`, `queries (q, d)`); prints JSON with queries/s; `--out` saves the slots found.
    BenchMemory {
        #[arg(long)]
        vectors: PathBuf,
        #[arg(long, default_value_t = 16)]
        k: usize,
        #[arg(long, default_value_t = 5)]
        iters: usize,
        #[arg(long, default_value_t = 0)]
        threads: i32,
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum MemoryCommand {
    /// Prebuild a memory from a corpus in one pass: from a run directory (its trained W_k; writes
    /// RUN_DIR/memory.safetensors, which eval and predict read) or from a config (needs --out;
    /// train from it with `--set memory.prebuilt=FILE`).
    Build {
        /// A run directory or a TOML config with `[memory] enabled = true`.
        source: PathBuf,
        /// A dataset (name or directory) to read instead of the source's.
        #[arg(long)]
        data: Option<String>,
        #[arg(long, default_value = "train")]
        split: String,
        #[arg(long)]
        out: Option<PathBuf>,
        /// Override a config value: `--set section.key=value` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
    },
}

fn load_config(args: &ConfigArgs, model: &Option<String>) -> Result<Config> {
    let mut overrides = args.overrides.clone();
    if let Some(m) = model {
        overrides.push(format!("model.source={m}"));
    }
    let cfg = Config::load(args.config.as_deref(), &overrides)?;
    if cfg.run.threads > 0 {
        tch::set_num_threads(cfg.run.threads as i32);
    }
    tch::manual_seed(cfg.run.seed as i64);
    Ok(cfg)
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    match run(cli.command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Doctor => {
            for fact in umtune::doctor::facts() {
                println!("{:<24} {}", fact.name, fact.value);
            }
        }
        Command::Eval {
            run_dir,
            data,
            corrupt,
            mc,
            plots,
        } => {
            let mut overrides: Vec<String> =
                data.iter().map(|d| format!("data.dataset={d}")).collect();
            overrides.extend(mc.map(|n| format!("uncertainty.mc_predict={n}")));
            let mut run = run_dir::load_run(&run_dir, &overrides)?;
            if let Some(spec) = &corrupt {
                run.config.data.eval_corruption = Corruption::parse(spec)?;
            }
            let data = trainer::load_data(&run.config, run.model.tokenizer()?)?;
            if corrupt.is_some() {
                println!("corruption: {:?}", run.config.data.eval_corruption);
            }
            let bs = run.config.train.batch_size * 2;
            let mut summary: trainer::Summary = serde_json::from_str(
                &std::fs::read_to_string(run_dir.join("summary.json")).context("summary.json")?,
            )?;
            let t = run.model.temperature;
            let val = trainer::outputs(&run.model, &data.validation, bs, run.device)?;
            summary.validation = trainer::scores(&val, &run.label_names, t, data.validation.len());
            let test = data
                .test
                .as_ref()
                .map(|d| trainer::outputs(&run.model, d, bs, run.device).map(|o| (o, d.len())))
                .transpose()?;
            summary.test = test
                .as_ref()
                .map(|(o, n)| trainer::scores(o, &run.label_names, t, *n));
            if let Some(dir) = plots {
                std::fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
                let test = test.as_ref().map(|(o, _)| o);
                trainer::write_plots(&dir, &val, test, &run.label_names, t);
            }
            println!("{}", trainer::results_table(std::slice::from_ref(&summary)));
        }
        Command::Predict {
            run_dir,
            input,
            output,
            mc,
        } => {
            let overrides: Vec<String> = mc
                .map(|n| format!("uncertainty.mc_predict={n}"))
                .into_iter()
                .collect();
            let run = run_dir::load_run(&run_dir, &overrides)?;
            let n = run_dir::predict_jsonl(&run, &input, &output)?;
            tracing::info!(examples = n, output = %output.display(), "predicted");
        }
        Command::Export {
            run_dir,
            format,
            out,
        } => {
            if format != "peft" {
                bail!("--format {format}: only `peft` is supported");
            }
            run_dir::export_peft(&run_dir::load_run(&run_dir, &[])?, &out)?;
            println!("PEFT adapter written to {}", out.display());
        }
        Command::Memory {
            command:
                MemoryCommand::Build {
                    source,
                    data,
                    split,
                    out,
                    overrides,
                },
        } => {
            let report =
                umtune::train::memory_build::build(&umtune::train::memory_build::BuildRequest {
                    source: &source,
                    data: data.as_deref(),
                    split: &split,
                    out: out.as_deref(),
                    overrides: &overrides,
                })?;
            println!("{}", serde_json::to_string(&report)?);
        }
        Command::Report { dir } => {
            let summaries = trainer::collect_summaries(&dir)?;
            if summaries.is_empty() {
                bail!(
                    "{}: no run directories (with summary.json) below it",
                    dir.display()
                );
            }
            let md = trainer::results_table(&summaries);
            trainer::write_atomic(&dir.join("results.md"), md.as_bytes())?;
            trainer::write_atomic(
                &dir.join("results.csv"),
                trainer::results_csv(&summaries).as_bytes(),
            )?;
            print!("{md}");
        }
        Command::Config { cfg } => print!("{}", load_config(&cfg, &None)?.to_toml()),
        Command::Train { config, overrides } => {
            let cfg = load_config(
                &ConfigArgs {
                    config: Some(config),
                    overrides,
                },
                &None,
            )?;
            let summary = umtune::train::trainer::train(&cfg)?;
            println!(
                "{}",
                umtune::train::trainer::results_table(std::slice::from_ref(&summary))
            );
            println!("run directory: {}", summary.run_dir.display());
        }
        Command::Generate {
            cfg,
            model,
            prompt,
            max_new_tokens,
            ids,
        } => {
            let cfg = load_config(&cfg, &model)?;
            let device = parse_device(&cfg.model.device)?;
            let start = Instant::now();
            let loaded = resolve::load(&cfg.model.source, cfg.model.dtype.kind(), device)?;
            tracing::info!(model = %cfg.model.source, device = ?device, secs = start.elapsed().as_secs_f64(), "loaded");
            let tok = loaded
                .tokenizer
                .context("this model came without a tokenizer")?;
            let prompt_ids: Vec<i64> = tok.encode(&prompt)?.into_iter().map(i64::from).collect();
            let stop: Vec<i64> = tok.eos_id.into_iter().map(i64::from).collect();
            let start = Instant::now();
            let out =
                generate::greedy(loaded.backbone.as_ref(), &prompt_ids, max_new_tokens, &stop);
            let secs = start.elapsed().as_secs_f64();
            tracing::info!(
                tokens = out.len(),
                tokens_per_s = out.len() as f64 / secs,
                "generated"
            );
            if ids {
                println!(
                    "{}",
                    serde_json::json!({"prompt_ids": prompt_ids, "generated_ids": out})
                );
            } else {
                let text: Vec<u32> = out.iter().map(|&i| i as u32).collect();
                println!("{}{}", prompt, tok.decode(&text)?);
            }
        }
        Command::BenchTrain(args) => {
            let cfg = load_config(&args.cfg, &args.model)?;
            let (task, device) = trainer::TaskModel::build(&cfg, 2)?;
            let mut opt = umtune::train::optimizer::AdamW::new(
                task.named_trainable(),
                cfg.train.weight_decay,
            );
            let vocab = task.backbone.arch().vocab_size() as i64;
            let (b_sz, seq_len) = (args.batch, args.seq_len);
            let ids = Tensor::randint(vocab, [b_sz, seq_len], (Kind::Int64, device));
            let mask = Tensor::ones([b_sz, seq_len], (Kind::Int64, device));
            let labels = Tensor::randint(2, [b_sz], (Kind::Int64, device));
            task.training.set(true);
            let example_ids = Tensor::arange(b_sz, (Kind::Int64, device));
            let secs = args.median_secs(device, || {
                opt.zero_grad();
                let fwd = task.forward(&ids, &mask, Some(&example_ids))?;
                task.loss(&fwd, &labels).backward();
                opt.step(cfg.train.lr);
                task.commit_memory()?;
                Ok(())
            })?;
            println!(
                "{}",
                serde_json::json!({
                    "model": cfg.model.source, "dtype": cfg.model.dtype.as_str(), "batch": b_sz,
                    "seq_len": seq_len, "threads": tch::get_num_threads(),
                    "trainable": task.trainable_params(), "secs_per_step": secs,
                })
            );
        }
        Command::BenchMemory {
            vectors,
            k,
            iters,
            threads,
            out,
        } => {
            use umtune::dist::SingleProcess;
            use umtune::memory::ShardedKvMemory;
            if threads > 0 {
                tch::set_num_threads(threads);
            }
            let tensors: std::collections::HashMap<String, Tensor> =
                Tensor::read_safetensors(&vectors)
                    .with_context(|| vectors.display().to_string())?
                    .into_iter()
                    .collect();
            let get = |name: &str| {
                tensors
                    .get(name)
                    .map(|t| t.to_kind(Kind::Float))
                    .with_context(|| format!("{}: no tensor `{name}`", vectors.display()))
            };
            let (keys, queries) = (get("keys")?, get("queries")?);
            let (n, d) = keys.size2()?;
            let q = queries.size()[0];
            // Values do not take part in the search; one column keeps the memory small.
            let mut memory = ShardedKvMemory::new(n as usize, d, 1, 1.0, 0, 1, tch::Device::Cpu);
            let chunk = 65536;
            for start in (0..n).step_by(chunk as usize) {
                let len = chunk.min(n - start);
                let ids = Tensor::arange_start(start, start + len, (Kind::Int64, tch::Device::Cpu));
                memory.write(
                    &SingleProcess,
                    &keys.narrow(0, start, len),
                    &Tensor::zeros([len, 1], (Kind::Float, tch::Device::Cpu)),
                    &ids,
                )?;
            }
            let query_ids = Tensor::full([q], -2, (Kind::Int64, tch::Device::Cpu));
            let _guard = tch::no_grad_guard();
            let mut times = Vec::new();
            let mut found = None;
            for _ in 0..iters.max(1) + 1 {
                let start = Instant::now();
                let r = memory.search_local(&queries, &query_ids, k);
                times.push(start.elapsed().as_secs_f64());
                found = Some(r.slots);
            }
            times.remove(0); // warm-up
            times.sort_by(f64::total_cmp);
            let secs = times[times.len() / 2];
            if let (Some(path), Some(slots)) = (out, found) {
                Tensor::write_safetensors(&[("slots", slots)], &path)?;
            }
            println!(
                "{}",
                serde_json::json!({"entries": n, "queries": q, "dim": d, "k": k,
                    "threads": tch::get_num_threads(), "secs_per_batch": secs,
                    "queries_per_s": q as f64 / secs})
            );
        }
        Command::BenchForward(args) => {
            let cfg = load_config(&args.cfg, &args.model)?;
            let device = parse_device(&cfg.model.device)?;
            let loaded = resolve::load(&cfg.model.source, cfg.model.dtype.kind(), device)?;
            tracing::info!(model = %cfg.model.source, parameters = loaded.backbone.num_parameters(), "loaded");
            let vocab = loaded.backbone.arch().vocab_size() as i64;
            let (b_sz, seq_len) = (args.batch, args.seq_len);
            let ids = Tensor::randint(vocab, [b_sz, seq_len], (Kind::Int64, device));
            let _guard = tch::no_grad_guard();
            let secs = args.median_secs(device, || {
                let h = loaded.backbone.forward(&ids, None, None, &mut NoHook);
                drop(loaded.backbone.lm_logits(&h));
                Ok(())
            })?;
            println!(
                "{}",
                serde_json::json!({
                    "model": cfg.model.source, "dtype": cfg.model.dtype.as_str(), "batch": b_sz,
                    "seq_len": seq_len, "threads": tch::get_num_threads(), "secs_per_iter": secs,
                    "tokens_per_s": (b_sz * seq_len) as f64 / secs,
                })
            );
        }
    }
    Ok(())
}
