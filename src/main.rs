//! The `umtune` command line.
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::time::Instant;
use tch::{Kind, Tensor};
use umtune::atomic_file::write_atomic;
use umtune::config::Config;
use umtune::data::corrupt::Corruption;
use umtune::data::dataset::load_data;
use umtune::dist::context::{device_for, setup_process};
use umtune::dist::env::JobEnv;
use umtune::dist::RunContext;
use umtune::logging::{self, LogFormat};
use umtune::models::{generate, resolve, NoHook};
use umtune::task::TaskModel;
use umtune::train::checkpoint::Resume;
use umtune::train::eval::{outputs, scores};
use umtune::train::report::{collect_runs, results_csv, results_table, write_plots, ReportEntry};
use umtune::train::run_dir::read_summary;
use umtune::train::sweep::{self, SweepPlan};
use umtune::train::{export, predict, report, restore, trainer};

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
        /// Continue from a checkpoint: `auto` (the run's newest good checkpoint, a fresh start
        /// if it has none, nothing to do if it finished), a checkpoint directory, or a run
        /// directory (its newest good checkpoint).
        #[arg(long, value_name = "auto|PATH")]
        resume: Option<String>,
    },
    /// A grid of overrides x seeds, one run each (named after the values), run here one after
    /// another or K at a time (--local / --parallel K) or as a SLURM job array (--slurm);
    /// finished runs are skipped and interrupted ones resumed. `umtune report OUT` summarizes.
    Sweep {
        /// TOML experiment config every run starts from.
        config: PathBuf,
        /// `section.key=v1,v2,...` (repeatable; the grid is their product).
        #[arg(long)]
        grid: Vec<String>,
        /// Seeds, comma separated.
        #[arg(long, value_delimiter = ',', default_value = "42")]
        seeds: Vec<u64>,
        /// The sweep's directory (sweep.json, the runs, logs/).
        #[arg(long)]
        out: PathBuf,
        /// Override a config value for every run: `--set section.key=value` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        #[arg(long)]
        local: bool,
        /// Runs at once with --local.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
        parallel: u64,
        #[arg(long)]
        slurm: bool,
        /// Print the sbatch script (--slurm) or each run's overrides instead of running.
        #[arg(long)]
        dry_run: bool,
        /// GPUs (workers under umtune-launch) per array task, with --slurm.
        #[arg(long, default_value_t = 1)]
        nproc_per_node: usize,
        /// `--time` of each array task (HH:MM:SS), with --slurm.
        #[arg(long, default_value = "")]
        time: String,
        /// Extra sbatch options, e.g. `--sbatch=--partition=gpu` (repeatable).
        #[arg(long, allow_hyphen_values = true)]
        sbatch: Vec<String>,
    },
    /// One run of a sweep (what `sweep` starts; under a launcher, one rank of it).
    #[command(hide = true)]
    SweepTask {
        plan: PathBuf,
        #[arg(long)]
        task: usize,
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
    /// median seconds per step as one JSON line for bench/ scripts. With `memory.enabled` the
    /// ring is filled to capacity first, so reads cost what they cost in a long run.
    BenchTrain(BenchArgs),
    /// Time saving and loading a checkpoint (model, AdamW state, a full memory) into --out; prints
    /// one JSON line (median seconds, bytes, the checkpoint's path) for bench/checkpoint.py.
    BenchCheckpoint {
        #[command(flatten)]
        bench: BenchArgs,
        #[arg(long)]
        out: PathBuf,
    },
    /// Time forward passes (median tokens/s), printed as one JSON line for bench/ scripts.
    BenchForward(BenchArgs),
    /// Time all-reduces of f32 buffers through the CPU ring, one rank of a job a launcher started
    /// (torchrun, umtune-launch); rank 0 prints one JSON line per size: median seconds and bus
    /// bandwidth (2(W-1)/W * bytes / time, as nccl-tests count it).
    BenchCollective {
        /// Buffer sizes in MB.
        #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
        sizes_mb: Vec<usize>,
        #[arg(long, default_value_t = 5)]
        iters: usize,
    },
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
    /// RUN_DIR/memory.index.json and its shards, which eval and predict read) or from a config
    /// (needs --out NAME: NAME.index.json; train from it with `--set memory.prebuilt=NAME`).
    /// Under a launcher every rank encodes a share and writes its shard.
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
    setup_process(&cfg);
    Ok(cfg)
}

/// Prints to stdout; a closed pipe (`umtune train ... | head -1`) ends the output quietly
/// instead of panicking.
/// Fills the memory's ring with random unit keys and values (a long run's steady state).
fn fill_memory(task: &TaskModel, cfg: &umtune::config::Config, ctx: &RunContext) -> Result<()> {
    if let Some(m) = &task.memory {
        let device = ctx.device;
        let n = m.store()?.capacity() as i64;
        let d = task.backbone.arch().hidden_size() as i64;
        let keys = Tensor::randn([n, cfg.memory.key_size], (Kind::Float, device));
        let keys = &keys / keys.norm_scalaropt_dim(2.0, [-1], true);
        let values = Tensor::randn([n, d], (Kind::Float, device));
        let ids = Tensor::arange_start(1 << 50, (1 << 50) + n, (Kind::Int64, device));
        m.store()?.write(ctx.group.as_ref(), &keys, &values, &ids)?;
        tracing::info!(entries = m.store()?.len(), "memory prefilled");
    }
    Ok(())
}

/// `umtune train` in this process, one rank of whatever launched it.
fn train_job(cfg: &umtune::config::Config, resume: &Resume) -> Result<()> {
    let job = JobEnv::from_process()?;
    let ctx = RunContext::for_job(cfg, &job)?.with_signal_handling()?;
    // Downloads (hub models) happen once per node.
    ctx.local_rank_zero_first(|| resolve::resolve(&cfg.model.source).map(|_| ()))?;
    let (summary, _) = trainer::train_resuming(cfg, &ctx, resume)?;
    ctx.finish()?;
    if ctx.is_writer {
        let dir = summary.run_dir.display().to_string();
        emit(&format!(
            "{}\nrun directory: {dir}\n",
            results_table(&[ReportEntry::finished(summary)])
        ))?;
    }
    Ok(())
}

fn emit(text: &str) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let format = cli.log_format;
    logging::init(format);
    // Under a launcher every log line carries the rank (a span around the whole command).
    let rank = JobEnv::from_process()
        .ok()
        .filter(|j| j.world_size > 1)
        .map(|j| j.rank);
    let _span = rank.map(|rank| tracing::info_span!("rank", rank).entered());
    match run(cli.command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let code = e
                .downcast_ref::<umtune::Error>()
                .map_or(1, umtune::Error::exit_code);
            let who = rank.map(|r| format!(" (rank {r})")).unwrap_or_default();
            match format {
                LogFormat::Text => eprintln!("error{who}: {e:#}"),
                LogFormat::Json => tracing::error!(exit_code = code, "{e:#}"),
            }
            std::process::ExitCode::from(code)
        }
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Doctor => {
            let facts = umtune::doctor::facts();
            let mut text = String::new();
            for fact in &facts {
                text.push_str(&format!("{:<24} {}\n", fact.name, fact.value));
            }
            emit(&text)?;
            let missing: Vec<&str> = facts.iter().filter(|f| !f.ok).map(|f| f.name).collect();
            if !missing.is_empty() {
                bail!("missing: {} (see above)", missing.join(", "));
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
            let mut run = restore::load_run(&run_dir, &overrides)?;
            if let Some(spec) = &corrupt {
                run.config.data.eval_corruption = Corruption::parse(spec)?;
            }
            let data = load_data(&run.config, run.model.tokenizer()?)?;
            if corrupt.is_some() {
                emit(&format!(
                    "corruption: {:?}\n",
                    run.config.data.eval_corruption
                ))?;
            }
            let bs = run.config.train.batch_size * 2;
            let t = run.model.temperature;
            let val = outputs(&run.model, &data.validation, bs)?;
            let test = data
                .test
                .as_ref()
                .map(|d| outputs(&run.model, d, bs).map(|o| (o, d.len())))
                .transpose()?;
            let mut summary = eval_summary(&run)?;
            summary.validation = scores(&val, &run.label_names, t, data.validation.len());
            summary.test = test
                .as_ref()
                .map(|(o, n)| scores(o, &run.label_names, t, *n));
            if let Some(dir) = plots {
                std::fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
                let test = test.as_ref().map(|(o, _)| o);
                write_plots(&dir, &val, test, &run.label_names, t);
            }
            let mut entry = ReportEntry::finished(summary);
            if !run.finished {
                entry.status = format!(
                    "unfinished run, weights of step {}",
                    run.weights_step.unwrap_or(0)
                );
            }
            emit(&format!("{}\n", results_table(&[entry])))?;
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
            let run = restore::load_run(&run_dir, &overrides)?;
            let n = predict::predict_jsonl(&run, &input, &output)?;
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
            export::export_peft(&restore::load_run(&run_dir, &[])?, &out)?;
            emit(&format!("PEFT adapter written to {}\n", out.display()))?;
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
            // Under a launcher every rank encodes its share and writes its shard.
            let job = JobEnv::from_process()?;
            let report = umtune::train::memory_build::build_in(
                &umtune::train::memory_build::BuildRequest {
                    source: &source,
                    data: data.as_deref(),
                    split: &split,
                    out: out.as_deref(),
                    overrides: &overrides,
                },
                &job,
            )?;
            if job.rank == 0 {
                emit(&format!("{}\n", serde_json::to_string(&report)?))?;
            }
        }
        Command::Report { dir } => {
            let runs = collect_runs(&dir)?;
            if runs.is_empty() {
                bail!(
                    "{}: no run directories (with run.json or summary.json) below it",
                    dir.display()
                );
            }
            let md = results_table(&runs);
            write_atomic(&dir.join("results.md"), md.as_bytes())?;
            write_atomic(&dir.join("results.csv"), results_csv(&runs)?.as_bytes())?;
            emit(&md)?;
            emit(&report::sweep_report(&dir, &runs)?)?;
        }
        Command::Config { cfg } => emit(&load_config(&cfg, &None)?.to_toml()?)?,
        Command::Train {
            config,
            overrides,
            resume,
        } => {
            let cfg = load_config(
                &ConfigArgs {
                    config: Some(config),
                    overrides,
                },
                &None,
            )?;
            let resume = resume.as_deref().map_or(Resume::No, Resume::parse);
            train_job(&cfg, &resume)?;
        }
        Command::Sweep {
            config,
            grid,
            seeds,
            out,
            overrides,
            local,
            parallel,
            slurm,
            dry_run,
            nproc_per_node,
            time,
            sbatch,
        } => {
            if !(slurm || local || parallel > 1 || dry_run) {
                bail!("umtune sweep: say how to run it: --local [--parallel K], --slurm [--dry-run], or --dry-run");
            }
            let plan = SweepPlan::new(&config, &overrides, &grid, &seeds)?;
            let plan_path = plan.write(&out)?;
            let bin = std::env::current_exe()?;
            emit(&format!(
                "{} runs ({} grid points x {} seeds), plan: {}\n",
                plan.runs.len(),
                plan.runs.len() / plan.seeds.len(),
                plan.seeds.len(),
                plan_path.display()
            ))?;
            if slurm {
                let script = sweep::sbatch_script(
                    &plan,
                    &plan_path,
                    &bin,
                    &sweep::SlurmOptions {
                        nproc_per_node,
                        time,
                        extra: sbatch,
                    },
                );
                if dry_run {
                    emit(&script)?;
                } else {
                    std::fs::create_dir_all(out.join("logs"))?;
                    let file = out.join(sweep::SBATCH_FILE);
                    write_atomic(&file, script.as_bytes())?;
                    let submitted = std::process::Command::new("sbatch")
                        .arg("--parsable")
                        .arg(&file)
                        .output()
                        .with_context(|| "running sbatch (is SLURM installed here?)")?;
                    if !submitted.status.success() {
                        bail!(
                            "sbatch {} failed: {}",
                            file.display(),
                            String::from_utf8_lossy(&submitted.stderr).trim()
                        );
                    }
                    let id = String::from_utf8_lossy(&submitted.stdout)
                        .trim()
                        .to_string();
                    emit(&format!("submitted job array {id} ({})\n", file.display()))?;
                }
            } else if local || parallel > 1 {
                sweep::run_local(&bin, &plan, &plan_path, parallel as usize)?;
                let runs = collect_runs(&out)?;
                emit(&report::sweep_report(&out, &runs)?)?;
            } else if dry_run {
                for i in 0..plan.runs.len() {
                    emit(&format!("{}\n", plan.overrides(i, &out)?.join(" ")))?;
                }
            }
        }
        Command::SweepTask { plan, task } => {
            let sweep = SweepPlan::read(&plan)?;
            let out = plan.parent().unwrap_or(std::path::Path::new("."));
            let cfg = sweep.config_of(task, out)?;
            train_job(&cfg, &Resume::Auto)?;
        }
        Command::Generate {
            cfg,
            model,
            prompt,
            max_new_tokens,
            ids,
        } => {
            let cfg = load_config(&cfg, &model)?;
            let device = device_for(&cfg.model.device, 0)?;
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
                emit(&format!(
                    "{}\n",
                    serde_json::json!({"prompt_ids": prompt_ids, "generated_ids": out})
                ))?;
            } else {
                let text: Vec<u32> = out.iter().map(|&i| i as u32).collect();
                emit(&format!("{}{}\n", prompt, tok.decode(&text)?))?;
            }
        }
        Command::BenchTrain(args) => {
            let cfg = load_config(&args.cfg, &args.model)?;
            let ctx = RunContext::single(&cfg)?;
            let device = ctx.device;
            let task = TaskModel::build(&cfg, 2, &ctx)?;
            let mut opt = umtune::train::optimizer::AdamW::new(
                task.named_trainable(),
                cfg.train.weight_decay,
            );
            let vocab = task.backbone.arch().vocab_size() as i64;
            let (b_sz, seq_len) = (args.batch, args.seq_len);
            let ids = Tensor::randint(vocab, [b_sz, seq_len], (Kind::Int64, device));
            let mask = Tensor::ones([b_sz, seq_len], (Kind::Int64, device));
            let labels = Tensor::randint(2, [b_sz], (Kind::Int64, device));
            // The memory's steady state: a full ring (every read scans `capacity` entries), so
            // the timed steps pay what a long training run pays.
            fill_memory(&task, &cfg, &ctx)?;
            task.training.set(true);
            // Fresh example ids each step, as training has: the memory's self-exclusion then
            // removes nothing, and every read scans a ring that fills up as in training.
            let mut next_id = 0;
            let secs = args.median_secs(device, || {
                let example_ids =
                    Tensor::arange_start(next_id, next_id + b_sz, (Kind::Int64, device));
                next_id += b_sz;
                opt.zero_grad();
                let fwd = task.forward(&ids, &mask, Some(&example_ids))?;
                task.loss(&fwd, &labels).backward();
                opt.step(cfg.train.lr);
                task.commit_memory()?;
                Ok(())
            })?;
            emit(&format!(
                "{}\n",
                serde_json::json!({
                    "model": cfg.model.source, "dtype": cfg.model.dtype.as_str(), "batch": b_sz,
                    "seq_len": seq_len, "threads": tch::get_num_threads(),
                    "trainable": task.trainable_params(), "secs_per_step": secs,
                })
            ))?;
        }
        Command::BenchCheckpoint { bench, out } => {
            use umtune::train::checkpoint;
            let cfg = load_config(&bench.cfg, &bench.model)?;
            let ctx = RunContext::single(&cfg)?;
            let task = TaskModel::build(&cfg, 2, &ctx)?;
            fill_memory(&task, &cfg, &ctx)?;
            let mut opt = umtune::train::optimizer::AdamW::new(
                task.named_trainable(),
                cfg.train.weight_decay,
            );
            std::fs::create_dir_all(&out)?;
            let loop_state = checkpoint::LoopState::default();
            let snap = checkpoint::Snapshot {
                step: 1,
                total_steps: 1,
                sampler: Default::default(),
                global_batch: cfg.train.batch_size,
                loop_state: &loop_state,
                validation: None,
            };
            let mut dir = PathBuf::new();
            let save_s = bench.median_secs(ctx.device, || {
                dir = checkpoint::save(&out, &cfg, &ctx, &task, &opt, &snap)?;
                Ok(())
            })?;
            // What every rank of a resume does: the manifest, then each file checked while it
            // is copied into the model, AdamW and the memory.
            let load_s = bench.median_secs(ctx.device, || {
                let manifest = checkpoint::manifest_of(&dir)?;
                checkpoint::restore(&dir, &manifest, &task, &mut opt)?;
                Ok(())
            })?;
            // What rank 0 adds when it chooses the checkpoint (so that `--resume auto` can fall
            // back to an older one): the manifest's files' checksums (the memory's shards are
            // checked against their index as they are restored).
            let verify_s = bench.median_secs(ctx.device, || {
                checkpoint::verify(&dir)?;
                Ok(())
            })?;
            let bytes: u64 = std::fs::read_dir(&dir)?
                .map(|e| Ok(e?.metadata()?.len()))
                .sum::<std::io::Result<u64>>()?;
            emit(&format!(
                "{}\n",
                serde_json::json!({
                    "model": cfg.model.source, "checkpoint": dir, "bytes": bytes,
                    "save_s": save_s, "load_s": load_s, "verify_s": verify_s,
                    "threads": tch::get_num_threads(),
                })
            ))?;
        }
        Command::BenchCollective { sizes_mb, iters } => {
            let job = JobEnv::from_process()?;
            let mut cfg = umtune::config::Config::default();
            cfg.model.device = "cpu".into();
            cfg.run.threads = 1;
            let ctx = RunContext::for_job(&cfg, &job)?;
            let w = ctx.world_size as f64;
            for mb in sizes_mb {
                let n = (mb << 20) / 4;
                let mut t = Tensor::ones([n as i64], (tch::Kind::Float, tch::Device::Cpu));
                ctx.group.all_reduce_sum(&mut t)?; // warm-up (connections, pages)
                let mut times = Vec::new();
                for _ in 0..iters {
                    ctx.group.barrier()?;
                    let start = Instant::now();
                    ctx.group.all_reduce_sum(&mut t)?;
                    times.push(start.elapsed().as_secs_f64());
                }
                times.sort_by(f64::total_cmp);
                let secs = times[times.len() / 2];
                let bytes = (n * 4) as f64;
                if ctx.is_writer {
                    emit(&format!(
                        "{}\n",
                        serde_json::json!({
                            "backend": "umtune-ring", "world_size": ctx.world_size, "mb": mb,
                            "secs": secs, "bus_gbps": 2.0 * (w - 1.0) / w * bytes / secs / 1e9,
                        })
                    ))?;
                }
            }
            ctx.finish()?;
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
                let r = memory.search_local(&queries, &query_ids, k)?;
                times.push(start.elapsed().as_secs_f64());
                found = Some(r.slots);
            }
            times.remove(0); // warm-up
            times.sort_by(f64::total_cmp);
            let secs = times[times.len() / 2];
            if let (Some(path), Some(slots)) = (out, found) {
                Tensor::write_safetensors(&[("slots", slots)], &path)?;
            }
            emit(&format!(
                "{}\n",
                serde_json::json!({"entries": n, "queries": q, "dim": d, "k": k,
                    "threads": tch::get_num_threads(), "secs_per_batch": secs,
                    "queries_per_s": q as f64 / secs})
            ))?;
        }
        Command::BenchForward(args) => {
            let cfg = load_config(&args.cfg, &args.model)?;
            let device = device_for(&cfg.model.device, 0)?;
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
            emit(&format!(
                "{}\n",
                serde_json::json!({
                    "model": cfg.model.source, "dtype": cfg.model.dtype.as_str(), "batch": b_sz,
                    "seq_len": seq_len, "threads": tch::get_num_threads(), "secs_per_iter": secs,
                    "tokens_per_s": (b_sz * seq_len) as f64 / secs,
                })
            ))?;
        }
    }
    Ok(())
}

/// The summary an evaluation's table starts from: the run's own for a finished run, else one
/// made from the loaded run (no training throughput to report).
fn eval_summary(run: &restore::LoadedRun) -> Result<umtune::train::report::Summary> {
    if run.finished {
        if let Ok(s) = read_summary(&run.dir) {
            return Ok(s);
        }
    }
    let model = &run.model;
    let (trainable, backbone) = (model.trainable_params(), model.backbone.num_parameters());
    Ok(umtune::train::report::Summary {
        run_dir: run.dir.clone(),
        model: run.config.model.source.clone(),
        dataset: run.config.data.dataset.clone(),
        method: run.config.peft.method.name().to_string(),
        label_names: run.label_names.clone(),
        trainable_params: trainable,
        backbone_params: backbone,
        trainable_share: trainable as f64 / backbone.max(1) as f64,
        steps: run.weights_step.unwrap_or(0),
        skipped_steps: 0,
        train_tokens_per_s: 0.0,
        seconds: 0.0,
        validation: Default::default(),
        test: None,
        overrides: run.config.overrides.0.clone(),
        hyper: umtune::train::report::hyper_parameters(&run.config),
    })
}
