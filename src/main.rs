//! The `umtune` command line: clap definitions and dispatch. Each subcommand's arguments and its
//! work live in the library module that does it (`train::sweep::SweepArgs`, `bench::*`, ...).
use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use umtune::bench;
use umtune::config::{Config, ConfigArgs};
use umtune::dist::context::setup_process;
use umtune::dist::env::JobEnv;
use umtune::dist::RunContext;
use umtune::logging::{self, LogFormat, Stdout};
use umtune::models::generate;
use umtune::train::evaluate::{evaluate, EvalArgs};
use umtune::train::export::{export, ExportArgs};
use umtune::train::memory_build::{build_in, BuildArgs};
use umtune::train::predict::{predict_file, PredictArgs};
use umtune::train::report::{
    collect_runs, results_table, sweep_report, write_results, ReportEntry,
};
use umtune::train::resume::Resume;
use umtune::train::robustness::robustness_report;
use umtune::train::sweep::{self, SweepArgs, SweepPlan};
use umtune::train::trainer;

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

#[derive(Subcommand)]
enum Command {
    /// Print libtorch, CUDA, NCCL, threads and where models are looked up.
    Doctor,
    /// Evaluate a run on its validation and test splits (or on another dataset with --data).
    Eval(EvalArgs),
    /// Predict labels for a JSONL file of texts (`{"text": ...}` per line).
    Predict(PredictArgs),
    /// The external memory: `memory build` prebuilds one from a corpus.
    Memory {
        #[command(subcommand)]
        command: MemoryCommand,
    },
    /// A results table (markdown and CSV) of every run under a directory; writes
    /// DIR/results.md and DIR/results.csv, and for a robustness study robustness.md/.csv, the
    /// pictures and paired.csv (each config against --baseline seed by seed).
    Report {
        dir: PathBuf,
        /// The config the paired differences are taken against (a run name without its
        /// `-DATASET-sSEED`).
        #[arg(long, default_value = "lora")]
        baseline: String,
    },
    /// Export a run's trained weights for other tools (`--format peft`: a PEFT LoRA adapter).
    Export(ExportArgs),
    /// Fine-tune as the config says; writes a run directory and prints a results table.
    Train(trainer::TrainArgs),
    /// A grid of overrides x seeds, one run each (named after the values), run here one after
    /// another or K at a time (--local / --parallel K) or as a SLURM job array (--slurm);
    /// finished runs are skipped and interrupted ones resumed. `umtune report OUT` summarizes.
    Sweep(SweepArgs),
    /// One run of a sweep (what `sweep` starts; under a launcher, one rank of it).
    #[command(hide = true)]
    SweepTask {
        plan: PathBuf,
        #[arg(long)]
        task: usize,
    },
    /// Print the resolved configuration (file, then UMTUNE__* environment, then --set).
    Config(ConfigArgs),
    /// Greedy generation with a KV cache, to see that a pretrained model loaded right.
    Generate(generate::GenerateArgs),
    /// What a training run will need per rank (weights, trainable state, the memory bank,
    /// activations with and without checkpointing) and its FLOPs per token, from the config and
    /// the model's shapes (no weights read); `--gpu-memory 80GB` suggests a micro batch.
    Plan(umtune::train::plan::PlanArgs),
    /// Time LoRA training steps (forward, backward, AdamW) on random tokens with a 2-class head,
    /// median seconds per step as one JSON line for bench/ scripts. With `memory.enabled` the
    /// ring is filled to capacity first, so reads cost what they cost in a long run.
    BenchTrain(bench::ModelArgs),
    /// Time saving and loading a checkpoint (model, AdamW state, a full memory) into --out; prints
    /// one JSON line (median seconds, bytes, the checkpoint's path) for bench/checkpoint.py.
    BenchCheckpoint {
        #[command(flatten)]
        bench: bench::ModelArgs,
        #[arg(long)]
        out: PathBuf,
    },
    /// Time forward passes (median tokens/s), printed as one JSON line for bench/ scripts.
    BenchForward(bench::ModelArgs),
    /// Time all-reduces of f32 buffers through the CPU ring, one rank of a job a launcher started
    /// (torchrun, umtune-launch); rank 0 prints one JSON line per size: median seconds and bus
    /// bandwidth (2(W-1)/W * bytes / time, as nccl-tests count it).
    BenchCollective(bench::CollectiveArgs),
    /// Time exact top-k reads of the external memory: keys and queries from a safetensors file
    /// (`keys (n, d)`, `queries (q, d)`); prints JSON with queries/s; `--out` saves the slots found.
    BenchMemory(bench::MemoryArgs),
    /// Time the sharded memory's read (two-stage, and the all-gathering one it replaced) on
    /// one rank of a job a launcher started; rank 0 prints one JSON line: the slowest rank's
    /// median seconds and the bytes rank 0 received per read (bench/memory_read.py).
    BenchMemoryRead(bench::MemoryReadArgs),
    /// Time one AdamW step (with the gradient norm) on the LoRA parameter set of the configured
    /// model, fused against the per-tensor loop; one JSON line (bench/optimizer.py).
    BenchOptimizer(bench::OptimizerArgs),
}

#[derive(Subcommand)]
enum MemoryCommand {
    /// Prebuild a memory from a corpus in one pass: from a run directory (its trained W_k; writes
    /// RUN_DIR/memory.index.json and its shards, which eval and predict read) or from a config
    /// (needs --out NAME: NAME.index.json; train from it with `--set memory.prebuilt=NAME`).
    /// Under a launcher every rank encodes a share and writes its shard.
    Build(BuildArgs),
}

/// The config `args` name, with this process set up for it (threads, seed).
fn load_config(args: &ConfigArgs) -> Result<Config> {
    let cfg = args.load()?;
    setup_process(&cfg);
    Ok(cfg)
}

/// `umtune train` in this process, one rank of whatever launched it.
fn train_job(cfg: &Config, resume: &Resume) -> Result<()> {
    let job = JobEnv::from_process()?;
    let ctx = RunContext::for_job(cfg, &job)?.with_signal_handling()?;
    let (summary, _) = trainer::train_resuming(cfg, &ctx, resume)?;
    ctx.finish()?;
    if ctx.is_writer {
        let dir = summary.run_dir.display().to_string();
        let table = results_table(&[ReportEntry::finished(summary)]);
        emit(&format!("{table}\nrun directory: {dir}\n"))?;
    }
    Ok(())
}

fn emit(text: &str) -> Result<()> {
    use std::io::Write;
    Stdout.write_all(text.as_bytes())?;
    Ok(Stdout.flush()?)
}

fn json_line(value: serde_json::Value) -> Result<()> {
    emit(&format!("{value}\n"))
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
            emit(&umtune::doctor::table(&facts))?;
            umtune::doctor::check(&facts)?;
        }
        Command::Eval(args) => {
            let evaluation = evaluate(&args)?;
            if let Some(c) = evaluation.corruption {
                emit(&format!("corruption: {c:?}\n"))?;
            }
            emit(&format!("{}\n", results_table(&[evaluation.entry])))?;
        }
        Command::Predict(args) => {
            let n = predict_file(&args)?;
            tracing::info!(examples = n, output = %args.output.display(), "predicted");
        }
        Command::Export(args) => emit(&format!("{}\n", export(&args)?))?,
        Command::Memory {
            command: MemoryCommand::Build(args),
        } => {
            // Under a launcher every rank encodes its share and writes its shard.
            let job = JobEnv::from_process()?;
            let report = build_in(&args.request(), &job)?;
            if job.rank == 0 {
                json_line(serde_json::to_value(&report)?)?;
            }
        }
        Command::Report { dir, baseline } => {
            let runs = collect_runs(&dir)?;
            emit(&write_results(&dir, &runs)?)?;
            emit(&sweep_report(&dir, &runs)?)?;
            emit(&robustness_report(&dir, &runs, &baseline)?)?;
            emit(&umtune::train::curves::report_curves(&dir, &runs))?;
        }
        Command::Config(args) => emit(&load_config(&args)?.to_toml()?)?,
        Command::Train(args) => train_job(&load_config(&args.config_args())?, &args.resume())?,
        Command::Sweep(args) => {
            if sweep::run(&args, &std::env::current_exe()?, &mut Stdout)? {
                emit(&sweep_report(&args.out, &collect_runs(&args.out)?)?)?;
            }
        }
        Command::SweepTask { plan, task } => {
            let out = plan.parent().unwrap_or(std::path::Path::new("."));
            train_job(
                &SweepPlan::read(&plan)?.config_of(task, out)?,
                &Resume::Auto,
            )?;
        }
        Command::Generate(args) => {
            let cfg = load_config(&args.cfg)?;
            let device = cfg.model.device.device(0)?;
            let c = generate::complete(&cfg.model.source, cfg.model.dtype.kind(), device, &args)?;
            emit(&format!("{}\n", c.output(args.ids)))?;
        }
        Command::Plan(args) => {
            let cfg = load_config(&args.config_args())?;
            emit(&umtune::train::plan::report(&cfg, &args)?)?
        }
        Command::BenchTrain(a) => json_line(bench::train(&load_config(&a.cfg)?, &a.timing)?)?,
        Command::BenchCheckpoint { bench: a, out } => {
            json_line(bench::checkpoint(&load_config(&a.cfg)?, &a.timing, &out)?)?
        }
        Command::BenchForward(a) => json_line(bench::forward(&load_config(&a.cfg)?, &a.timing)?)?,
        Command::BenchCollective(args) => {
            for line in bench::collective(&args)? {
                json_line(line)?;
            }
        }
        Command::BenchMemory(args) => json_line(bench::memory(&args)?)?,
        Command::BenchOptimizer(a) => json_line(bench::optimizer(&load_config(&a.cfg)?, &a)?)?,
        Command::BenchMemoryRead(args) => {
            let line = bench::memory_read(&args)?;
            if line["rank"] == 0 {
                json_line(line)?;
            }
        }
    }
    Ok(())
}
