//! The `umtune` command line.
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::time::Instant;
use tch::{Kind, Tensor};
use umtune::config::{parse_device, Config};
use umtune::logging::{self, LogFormat};
use umtune::models::{generate, resolve, NoHook};

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

#[derive(Subcommand)]
enum Command {
    /// Print libtorch, CUDA, NCCL, threads and where models are looked up.
    Doctor,
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
    /// Time forward passes (median tokens/s), printed as one JSON line for bench/ scripts.
    BenchForward {
        #[command(flatten)]
        cfg: ConfigArgs,
        #[arg(long)]
        model: Option<String>,
        #[arg(long, default_value_t = 8)]
        batch: i64,
        #[arg(long, default_value_t = 128)]
        seq_len: i64,
        #[arg(long, default_value_t = 10)]
        iters: usize,
        #[arg(long, default_value_t = 2)]
        warmup: usize,
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
        Command::BenchForward {
            cfg,
            model,
            batch,
            seq_len,
            iters,
            warmup,
        } => {
            let cfg = load_config(&cfg, &model)?;
            if iters == 0 {
                bail!("--iters must be at least 1");
            }
            let device = parse_device(&cfg.model.device)?;
            let loaded = resolve::load(&cfg.model.source, cfg.model.dtype.kind(), device)?;
            tracing::info!(model = %cfg.model.source, parameters = loaded.backbone.num_parameters(), "loaded");
            let vocab = loaded.backbone.arch().vocab_size() as i64;
            let ids = Tensor::randint(vocab, [batch, seq_len], (Kind::Int64, device));
            let _guard = tch::no_grad_guard();
            let run = || {
                let h = loaded.backbone.forward(&ids, None, None, &mut NoHook);
                drop(loaded.backbone.lm_logits(&h));
                if device.is_cuda() {
                    tch::Cuda::synchronize(0);
                }
            };
            for _ in 0..warmup {
                run();
            }
            let mut times: Vec<f64> = (0..iters)
                .map(|_| {
                    let start = Instant::now();
                    run();
                    start.elapsed().as_secs_f64()
                })
                .collect();
            times.sort_by(f64::total_cmp);
            let mid = times.len() / 2;
            // The median, as bench/forward.py takes it for the reference.
            let secs = if times.len() % 2 == 1 {
                times[mid]
            } else {
                (times[mid - 1] + times[mid]) / 2.0
            };
            let dtype = cfg.model.dtype.as_str();
            println!(
                "{}",
                serde_json::json!({
                    "model": cfg.model.source, "dtype": dtype, "batch": batch, "seq_len": seq_len,
                    "threads": tch::get_num_threads(), "secs_per_iter": secs,
                    "tokens_per_s": (batch * seq_len) as f64 / secs,
                })
            );
        }
    }
    Ok(())
}
