//! The run directory, and the only writer of its files: `config.toml` (the resolved config),
//! `run.json` (labels, state, step, the step the saved weights are from, and the size and
//! sha256 of every weight file), `metrics.jsonl`, `trainable.safetensors`, `memory.index.json` and its shards,
//! `calibration.json`, `summary.json`, the calibration plots, and the checkpoints under
//! `checkpoints/` (through [`RunDir::save_checkpoint`]; their layout is `checkpoint.rs`'s). Every
//! file is written atomically (see [`crate::atomic_file`]), and only by the writer rank (each
//! rank its own memory shard). `run.json` exists from
//! the first step on, so a run that was killed, interrupted or diverged can still be evaluated
//! (its last saved weights) and reported (as unfinished).
//!
//! Weights are saved in two phases, `run.json` being the commit: the new `trainable.safetensors`
//! and memory index are written beside the current ones as `NAME.next` (the memory's shards under
//! a new generation's names), then `run.json` records their digests and step, then they are moved
//! into place. A kill before the commit leaves the previous weights and their record; a kill after
//! it leaves staged files that match the record, which the next opening of the run moves into
//! place. Either way the weights `run.json` names are there and check.
use super::run_files::*;
use crate::atomic_file::{check_digest, write_atomic};
use crate::config::Config;
use crate::dist::RunContext;
use crate::error::{Error, Result};
use crate::memory::MemoryFusion;
use crate::models::weights::write_safetensors_atomic;
use crate::task::TaskModel;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// A run directory: written through on the writer rank, read anywhere.
pub struct RunDir {
    path: PathBuf,
    writer: bool,
    record: RunRecord,
    /// The writer's hold on the directory (see [`RunLock`]).
    lock: Option<RunLock>,
}

/// The exclusive right to write a run directory: an advisory lock (flock) on its `lock` file,
/// which holds the writer's host and pid. The kernel releases it when the process ends, however
/// it ends (kill -9 included), so a stale lock cannot block a requeued job. A second writer (two
/// sweep tasks with one run name, two requeues of one job overlapping) is refused naming the
/// holder instead of interleaving its files with the first's.
pub struct RunLock {
    _file: std::fs::File,
}

impl RunLock {
    /// Takes the lock of run directory `dir` (which exists), or says who holds it.
    pub fn take(dir: &Path) -> Result<RunLock> {
        let path = dir.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        match file.try_lock() {
            Ok(()) => {
                let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_string())
                    .unwrap_or_else(|_| "unknown host".into());
                let me = format!("host {host} pid {}\n", std::process::id());
                file.set_len(0)
                    .and_then(|_| file.write_all(me.as_bytes()))
                    .map_err(|e| Error::io(&path, e))?;
                Ok(RunLock { _file: file })
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                let holder = match holder.trim() {
                    "" => "a process that is starting".to_string(),
                    h => h.to_string(),
                };
                Err(Error::run(
                    dir,
                    format!(
                        "another umtune process is writing this run ({holder}); stop it or wait for it to end, or use another run.name"
                    ),
                ))
            }
            Err(std::fs::TryLockError::Error(e)) => Err(Error::io(&path, e)),
        }
    }
}

impl RunDir {
    /// A new directory under `run.output_dir` named `run.name` (or `DATASET-METHOD-sSEED`), the
    /// first free of `name`, `name-2`, ...; writes `config.toml` and `run.json`.
    pub fn create(
        cfg: &Config,
        ctx: &RunContext,
        label_names: &[String],
        total_steps: usize,
    ) -> Result<RunDir> {
        let base = run_name(cfg);
        let root = Path::new(&cfg.run.output_dir);
        // Never overwrite an earlier run: the writer claims the first free name with mkdir,
        // which one process wins when two start at once.
        let mut path = root.join(&base);
        if ctx.is_writer {
            std::fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
            for i in 1.. {
                path = match i {
                    1 => root.join(&base),
                    _ => root.join(format!("{base}-{i}")),
                };
                match std::fs::create_dir(&path) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                    Err(e) => return Err(Error::io(&path, e)),
                }
            }
        }
        Self::create_at(&path, cfg, ctx, label_names, total_steps)
    }

    /// Where `run.output_dir` and `run.name` (or its default) put this config's run.
    pub fn default_path(cfg: &Config) -> PathBuf {
        Path::new(&cfg.run.output_dir).join(run_name(cfg))
    }

    /// A new run at `path` (rank 0's), replacing what a previous attempt of the same job left
    /// there (`--resume auto` without a checkpoint to resume).
    pub fn create_at(
        path: &Path,
        cfg: &Config,
        ctx: &RunContext,
        label_names: &[String],
        total_steps: usize,
    ) -> Result<RunDir> {
        // Rank 0 names the directory; the other ranks use its name.
        let path = PathBuf::from(crate::dist::collective::rank_zero_string(
            ctx.group.as_ref(),
            &path.to_string_lossy(),
        )?);
        let mut dir = RunDir {
            path,
            writer: ctx.is_writer,
            lock: None,
            record: RunRecord {
                label_names: label_names.to_vec(),
                state: RunState::Running,
                step: 0,
                total_steps,
                weights_step: None,
                message: None,
                files: BTreeMap::new(),
            },
        };
        if dir.writer {
            std::fs::create_dir_all(&dir.path).map_err(|e| Error::io(&dir.path, e))?;
            dir.lock = Some(RunLock::take(&dir.path)?);
            write_atomic(&dir.path.join(CONFIG_FILE), cfg.to_toml()?.as_bytes())?;
            dir.write_record()?;
        }
        Ok(dir)
    }

    /// An existing run continued from a checkpoint: its record says it is running again, now
    /// towards `total_steps`.
    pub fn resume(path: &Path, ctx: &RunContext, total_steps: usize) -> Result<RunDir> {
        let mut dir = Self::open(path)?;
        dir.writer = ctx.is_writer;
        if dir.writer {
            dir.lock = Some(RunLock::take(path)?);
            // Read again under the lock: the record may have changed since it was opened.
            dir.record = read_record(path)?;
        }
        dir.record.state = RunState::Running;
        dir.record.message = None;
        dir.record.total_steps = total_steps;
        if dir.writer {
            dir.write_record()?;
        }
        Ok(dir)
    }

    /// An existing run directory, to write into as well (`memory build`, which replaces its
    /// memory): [`Self::open`] holding the run's lock.
    pub fn open_for_writing(path: &Path) -> Result<RunDir> {
        let mut dir = Self::open(path)?;
        dir.lock = Some(RunLock::take(path)?);
        dir.record = read_record(path)?;
        Ok(dir)
    }

    /// An existing run directory, for reading.
    pub fn open(path: &Path) -> Result<RunDir> {
        if !path.join(CONFIG_FILE).is_file() {
            return Err(Error::run(
                path,
                format!("not a run directory (no {CONFIG_FILE})"),
            ));
        }
        let dir = RunDir {
            path: path.to_path_buf(),
            writer: true,
            lock: None,
            record: read_record(path)?,
        };
        dir.roll_forward()?;
        Ok(dir)
    }

    /// Moves into place the staged weights that `run.json` already records (a save killed
    /// between its commit and its moves). A staged file the record does not name is a save
    /// that never committed, or one in flight: left alone.
    fn roll_forward(&self) -> Result<()> {
        for name in [TRAINABLE_FILE, MEMORY_INDEX] {
            let (Some(want), staged) = (self.record.files.get(name), self.staged(name)) else {
                continue;
            };
            if staged.is_file() && check_digest(&staged, want, RUN_FILE).is_ok() {
                tracing::warn!(file = %self.path.join(name).display(), "completing a save that was cut off after run.json recorded it");
                self.publish(name, false)?;
            }
        }
        Ok(())
    }

    /// Where the next `name` waits for its commit.
    fn staged(&self, name: &str) -> PathBuf {
        match name {
            MEMORY_INDEX => crate::memory::files::staged_path(&self.path.join(name)),
            _ => self.path.join(format!("{name}.next")),
        }
    }

    /// Moves the staged `name` into place (one moved already, by another reader, is fine); with
    /// `tidy` (the writer) the memory's old shards go too.
    fn publish(&self, name: &str, tidy: bool) -> Result<()> {
        if name == MEMORY_INDEX {
            return crate::memory::files::publish(&self.path.join(name), tidy);
        }
        crate::atomic_file::move_into_place(&self.staged(name), &self.path.join(name))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn record(&self) -> &RunRecord {
        &self.record
    }

    fn write_record(&self) -> Result<()> {
        let json = serde_json::to_vec_pretty(&self.record)
            .map_err(|e| Error::Internal(format!("{RUN_FILE}: {e}")))?;
        write_atomic(&self.path.join(RUN_FILE), &json)
    }

    /// Records the steps done (written with the next state change or weights).
    pub fn set_step(&mut self, step: usize) {
        self.record.step = step;
    }

    /// Records how the run stands now.
    pub fn set_state(&mut self, state: RunState, message: Option<String>) -> Result<()> {
        self.record.state = state;
        self.record.message = message;
        if self.writer {
            self.write_record()?;
        }
        Ok(())
    }

    /// `metrics.jsonl` of a resumed run: cut back to the lines of steps up to `step` (what the
    /// checkpoint saw; the resumed run writes the rest again), then appended to. The checkpoint
    /// of the last step is taken before the final evaluation, so when `step` is the last one
    /// (`last`) its evaluation lines go too: the resumed run evaluates again.
    pub fn metrics_from(&self, step: usize, last: bool) -> Result<MetricsLog> {
        let path = self.path.join(METRICS_FILE);
        if !self.writer {
            return Ok(MetricsLog {
                file: None,
                path,
                tb: None,
            });
        }
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(Error::io(&path, e)),
        };
        let kept: String = text
            .lines()
            .filter(|line| {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                    return false;
                };
                let final_eval = last && v.get("split").is_some();
                v["step"]
                    .as_u64()
                    .is_some_and(|s| (s as usize) < step || (s as usize == step && !final_eval))
            })
            .map(|line| format!("{line}\n"))
            .collect();
        write_atomic(&path, kept.as_bytes())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        Ok(MetricsLog {
            file: Some(file),
            path,
            tb: None,
        })
    }

    /// `metrics.jsonl`, created empty.
    pub fn metrics(&self) -> Result<MetricsLog> {
        let path = self.path.join(METRICS_FILE);
        let file = if self.writer {
            Some(std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?)
        } else {
            None
        };
        Ok(MetricsLog {
            file,
            path,
            tb: None,
        })
    }

    /// Saves the trained tensors (and the memory) as the weights of `step`, with their digests,
    /// in two phases (see the module's documentation). Collective (every rank calls it: each
    /// writes its memory shard); rank 0 writes the rest.
    pub fn save_weights(&mut self, model: &TaskModel, step: usize) -> Result<()> {
        let memory = match &model.memory {
            Some(memory) => Some(memory.save_staged(&self.path.join(MEMORY_INDEX), false)?),
            None => None,
        };
        if !self.writer {
            return Ok(());
        }
        let trainable =
            write_safetensors_atomic(&self.staged(TRAINABLE_FILE), &model.named_trainable())?;
        self.record
            .files
            .insert(TRAINABLE_FILE.to_string(), trainable);
        self.record.weights_step = Some(step);
        self.record.step = self.record.step.max(step);
        self.commit(memory)?;
        crate::faults::abort_after_commit(step);
        self.publish(TRAINABLE_FILE, true)?;
        if model.memory.is_some() {
            self.publish(MEMORY_INDEX, true)?;
        }
        Ok(())
    }

    /// A checkpoint of the run at `snap.step` in `RUN/checkpoints/` (see [`super::checkpoint`]:
    /// every rank writes its memory shard, the writer the rest; pruned to `checkpoint.keep`).
    pub fn save_checkpoint(
        &self,
        cfg: &Config,
        ctx: &RunContext,
        model: &TaskModel,
        opt: &super::optimizer::AdamW,
        snap: &super::checkpoint::Snapshot,
    ) -> Result<PathBuf> {
        super::checkpoint::save(&self.path, cfg, ctx, model, opt, snap)
    }

    /// The memory's entries (one shard per rank and `memory.index.json`; collective), and the
    /// index's digest in `run.json`, in two phases as the weights.
    pub fn save_memory(&mut self, memory: &MemoryFusion) -> Result<()> {
        let digest = memory.save_staged(&self.path.join(MEMORY_INDEX), false)?;
        if !self.writer {
            return Ok(());
        }
        self.commit(Some(digest))?;
        self.publish(MEMORY_INDEX, true)
    }

    /// Writes `run.json` with the staged memory index's digest: the commit of a save.
    fn commit(&mut self, memory: Option<FileDigest>) -> Result<()> {
        let legacy = match memory {
            Some(digest) => {
                self.record.files.insert(MEMORY_INDEX.to_string(), digest);
                // A run from before memory shards: its single file is superseded.
                self.record.files.remove(MEMORY_FILE).is_some()
            }
            None => false,
        };
        self.write_record()?;
        if legacy {
            let _ = std::fs::remove_file(self.path.join(MEMORY_FILE));
        }
        Ok(())
    }

    /// The memory this run saved: `memory.index.json`, or the single file of a run from before
    /// memory shards.
    pub fn memory_file(&self) -> &'static str {
        if self.record.files.contains_key(MEMORY_FILE) && !self.path.join(MEMORY_INDEX).exists() {
            MEMORY_FILE
        } else {
            MEMORY_INDEX
        }
    }

    /// Whether this process writes the run's files (rank 0 of a multi-process command).
    pub fn set_writer(&mut self, writer: bool) {
        self.writer = writer;
    }

    /// What `run.json` recorded of `name` and where, for a reader that checks as it reads.
    pub fn recorded(&self, name: &str) -> Option<(&FileDigest, &'static str)> {
        self.record.files.get(name).map(|d| (d, RUN_FILE))
    }

    /// Checks `name` against the size and checksum `run.json` recorded for it (files of runs from
    /// before digests were recorded pass unchecked).
    pub fn verify(&self, name: &str) -> Result<()> {
        let Some(want) = self.record.files.get(name) else {
            return Ok(());
        };
        check_digest(&self.path.join(name), want, RUN_FILE)
    }

    /// Writes `calibration.json`: `temperature`, fitted on the outputs of the weights of
    /// `weights_step` (which the caller saves next).
    pub fn write_calibration(&self, temperature: f64, weights_step: usize) -> Result<()> {
        if !self.writer {
            return Ok(());
        }
        let c = Calibration {
            temperature,
            fitted_on: "validation".into(),
            weights_step: Some(weights_step),
        };
        let json = serde_json::to_vec(&c)
            .map_err(|e| Error::Internal(format!("{CALIBRATION_FILE}: {e}")))?;
        write_atomic(&self.path.join(CALIBRATION_FILE), &json)
    }

    /// The calibration pictures of the final outputs (see [`super::eval::write_plots`]) and the
    /// training curves (`curves.png`, [`super::curves`]).
    pub fn write_plots(
        &self,
        validation: &super::eval::Outputs,
        test: Option<&super::eval::Outputs>,
        label_names: &[String],
        temperature: Option<f64>,
    ) {
        if self.writer {
            super::eval::write_plots(&self.path, validation, test, label_names, temperature);
            if let Err(e) = super::curves::write_run_curves(&self.path) {
                tracing::warn!("training curves skipped: {e}");
            }
        }
    }

    /// The final summary; the run is then finished.
    pub fn write_summary(&mut self, summary: &Summary) -> Result<()> {
        if !self.writer {
            return Ok(());
        }
        let json = serde_json::to_vec_pretty(summary)
            .map_err(|e| Error::Internal(format!("{SUMMARY_FILE}: {e}")))?;
        write_atomic(&self.path.join(SUMMARY_FILE), &json)?;
        let flag = (!summary.is_finite())
            .then(|| "finished with non-finite metrics (see summary.json)".to_string());
        self.set_state(RunState::Finished, flag)
    }
}

/// The run directory's name: `run.name`, or `DATASET-METHOD-sSEED`.
fn run_name(cfg: &Config) -> String {
    if !cfg.run.name.is_empty() {
        return cfg.run.name.clone();
    }
    let dataset = Path::new(&cfg.data.dataset)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("data");
    format!("{dataset}-{}-s{}", cfg.peft.method.name(), cfg.run.seed)
}

/// Appends JSON lines to `metrics.jsonl`, flushed line by line so a crash loses at most one, and
/// with `train.tensorboard` the same numbers to TensorBoard event files ([`super::tensorboard`]).
/// On ranks that do not write, a sink.
pub struct MetricsLog {
    file: Option<std::fs::File>,
    path: PathBuf,
    tb: Option<super::tensorboard::EventWriter>,
}

/// The run's pictures that go to TensorBoard at the end, with their tags.
const TB_IMAGES: [(&str, &str); 3] = [
    ("calibration/reliability", "reliability.png"),
    ("calibration/risk_coverage", "risk_coverage.png"),
    ("curves", super::curves::CURVES_FILE),
];

impl MetricsLog {
    pub fn write(&mut self, value: serde_json::Value) -> Result<()> {
        let Some(file) = &mut self.file else {
            return Ok(());
        };
        writeln!(file, "{value}")
            .and_then(|_| file.flush())
            .map_err(|e| Error::io(&self.path, e))?;
        self.tensorboard(|tb| tb.metrics_line(&value));
        Ok(())
    }

    /// Also writes TensorBoard event files under `run_dir/tb` (a new file; a resumed run's
    /// `resumed_at` replaces what the earlier ones logged after it).
    pub fn with_tensorboard(mut self, run_dir: &Path, resumed_at: Option<usize>) -> Result<Self> {
        if self.file.is_some() {
            let dir = run_dir.join(super::tensorboard::TB_DIR);
            self.tb = Some(super::tensorboard::EventWriter::create(&dir, resumed_at)?);
        }
        Ok(self)
    }

    /// The run's pictures (those that were drawn) as TensorBoard images at `step`.
    pub fn images(&mut self, run_dir: &Path, step: usize) {
        for (tag, file) in TB_IMAGES {
            let png = run_dir.join(file);
            if png.is_file() {
                self.tensorboard(|tb| tb.image(tag, step, &png));
            }
        }
    }

    /// A failed TensorBoard write is a warning and ends the TensorBoard log, never the run.
    fn tensorboard(
        &mut self,
        write: impl FnOnce(&mut super::tensorboard::EventWriter) -> Result<()>,
    ) {
        if let Some(tb) = &mut self.tb {
            if let Err(e) = write(tb) {
                tracing::warn!("TensorBoard log stopped: {e}");
                self.tb = None;
            }
        }
    }
}
