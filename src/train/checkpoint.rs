//! Checkpoints for exact resume: `RUN/checkpoints/step_000500/` holds `manifest.json` (format,
//! step, sampler cursor, world size and global batch, the resolved config and its sha256, the
//! loop's counters and spike-guard averages, the validation scores of that step if it was an
//! evaluation step, and the size, sha256 and xxh3 of every file), `trainable.safetensors` (the PEFT-named
//! tensors and the umtune-only modules), `optimizer.safetensors` (AdamW's moments and step) and the
//! memory as one shard per rank with `memory.index.json` (see [`crate::memory::files`]).
//! safetensors and JSON only.
//!
//! No random-generator state is saved because none is needed: the sampler's order is a function
//! of (seed, epoch), and every draw of training (LoRA dropout, UM noise, heteroscedastic samples)
//! comes from a generator seeded with (seed, step, micro-batch, position in the global batch) —
//! see `ffi::streams`. Checkpoints are taken at optimizer-step boundaries, where nothing is
//! accumulated and the memory has nothing pending; a run killed in the middle of an accumulation
//! repeats that step from the last checkpoint.
//!
//! Writing is collective: every rank writes into `step_000500.tmp/` (rank 0 the replicated
//! files on a second thread while every rank writes its memory shard; each file fsynced and
//! hashed as it is written), then after a barrier rank 0 writes the
//! manifest, renames the directory to `step_000500`, fsyncs `checkpoints/`, replaces the `latest`
//! pointer atomically and prunes to the newest `checkpoint.keep` plus the best by
//! `checkpoint.best`. A kill at any instant leaves every earlier checkpoint whole (loaders never
//! look at `.tmp` directories). Rank 0 verifies a checkpoint (every size and xxh3, see
//! [`crate::atomic_file::FileDigest`]) before choosing it, and `--resume auto` falls back to the
//! next newest good one and says so; every rank then checks each file on the bytes it restores
//! from (memory-mapped, checked on a second thread while they are copied) and names a file that
//! differs.
use super::diagnostics::SpikeGuard;
use super::eval::EvalResult as Evaluation;
use super::optimizer::AdamW;
use crate::atomic_file::{check_bytes, check_digest, write_atomic, FileDigest};
use crate::config::{BestMetric, Config};
use crate::data::batching::SamplerState;
use crate::dist::RunContext;
use crate::error::{Error, Result};
use crate::models::weights::{while_checking_and, MappedSafetensors, SafetensorsFile};
use crate::peft::copy_named;
use crate::task::TaskModel;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::Tensor;

pub const CHECKPOINTS_DIR: &str = "checkpoints";
pub const LATEST: &str = "latest";
pub const MANIFEST: &str = "manifest.json";
/// Checkpoints of this format have `manifest.sha256` beside the manifest.
const FORMAT: &str = "umtune-checkpoint/2";
/// Read too: without the manifest's own digest.
const FORMAT_V1: &str = "umtune-checkpoint/1";
/// The sha256 of `manifest.json`'s bytes: an edited or corrupt manifest (its step, sampler
/// cursor, file list) is a bad checkpoint like a corrupt weight file.
pub const MANIFEST_DIGEST: &str = "manifest.sha256";
const TRAINABLE: &str = "trainable.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
const MEMORY: &str = "memory.index.json";

/// Config keys that may differ on resume: logging, evaluation cadence, the step budget, threads,
/// checkpointing, the collective's settings, where the run lives, the device, and the per-rank
/// batch (the checkpoint's global batch is kept whatever it says).
pub const SAFE_ON_RESUME: &[&str] = &[
    "train.log_every",
    "train.tensorboard",
    "train.eval_every",
    "train.max_steps",
    // Recomputation changes what is kept, not what is computed.
    "train.activation_checkpointing",
    "train.batch_size",
    "run.threads",
    "run.output_dir",
    "run.name",
    "model.device",
    "checkpoint.",
    "dist.",
];

/// The training loop's own state between steps.
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct LoopState {
    pub bad_in_a_row: usize,
    pub skipped: usize,
    pub tokens: usize,
    pub train_secs: f64,
    pub sync_secs: f64,
    pub guard: SpikeGuard,
}

/// `manifest.json`.
#[derive(Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    /// Optimizer steps done.
    pub step: usize,
    pub total_steps: usize,
    /// The sampler's epoch and the batches of it already drawn.
    pub epoch: u64,
    pub sampler_batch: usize,
    /// Micro-batches of the next step already done: always 0 (checkpoints are taken between
    /// optimizer steps).
    pub micro: usize,
    pub world_size: usize,
    /// Examples per optimizer micro-step, all ranks together (kept on resume at any world size).
    pub global_batch: usize,
    pub config: String,
    pub config_sha256: String,
    pub loop_state: LoopState,
    /// The validation scores of this step, when it was an evaluation step.
    #[serde(default)]
    pub validation: Option<Evaluation>,
    pub files: BTreeMap<String, FileDigest>,
}

impl Manifest {
    pub fn sampler(&self) -> SamplerState {
        SamplerState {
            epoch: self.epoch,
            batch: self.sampler_batch,
        }
    }
}

pub fn checkpoints_dir(run: &Path) -> PathBuf {
    run.join(CHECKPOINTS_DIR)
}

fn step_name(step: usize) -> String {
    format!("step_{step:06}")
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn fsync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

/// What a checkpoint is made of, besides the model and the optimizer.
pub struct Snapshot<'a> {
    pub step: usize,
    pub total_steps: usize,
    pub sampler: SamplerState,
    pub global_batch: usize,
    pub loop_state: &'a LoopState,
    pub validation: Option<&'a Evaluation>,
}

/// A checkpoint's `.tmp` directory, removed when dropped unless the save completed.
struct PartialDir<'a> {
    dir: &'a Path,
    armed: bool,
}

impl PartialDir<'_> {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for PartialDir<'_> {
    fn drop(&mut self) {
        if self.armed && self.dir.exists() {
            if let Err(e) = std::fs::remove_dir_all(self.dir) {
                tracing::warn!(dir = %self.dir.display(), "removing a failed checkpoint's files: {e}");
            }
        }
    }
}

/// Saves a checkpoint of the run in `run` (see the module doc). Collective.
pub fn save(
    run: &Path,
    cfg: &Config,
    ctx: &RunContext,
    model: &TaskModel,
    opt: &AdamW,
    snap: &Snapshot,
) -> Result<PathBuf> {
    let root = checkpoints_dir(run);
    let name = step_name(snap.step);
    let (tmp, done) = (root.join(format!("{name}.tmp")), root.join(&name));
    let group = ctx.group.as_ref();
    if ctx.is_writer {
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    // A save that fails (a full disk) takes its partial directory with it on the writer, so
    // the space it took is given back; the earlier checkpoints are untouched either way.
    let partial = PartialDir {
        dir: &tmp,
        armed: ctx.is_writer,
    };
    // The directory exists before any rank writes its memory shard into it.
    group.barrier()?;
    let mut files = BTreeMap::new();
    // The writer's two files are written on a second thread while every rank writes its memory
    // shard: one file's sync overlaps the other's copy into the page cache.
    std::thread::scope(|s| -> Result<()> {
        let side = if ctx.is_writer {
            let trainable = SafetensorsFile::new(&tmp.join(TRAINABLE), &model.named_trainable())?;
            let state: Vec<(String, Tensor)> = opt.state().into_iter().collect();
            let optimizer = SafetensorsFile::new(&tmp.join(OPTIMIZER), &state)?;
            // Published with the directory (synced, renamed), so no rename of their own.
            Some(s.spawn(move || Ok::<_, Error>((trainable.write_new()?, optimizer.write_new()?))))
        } else {
            None
        };
        let memory = model
            .memory
            .as_ref()
            .map(|memory| memory.save(&tmp.join(MEMORY), false));
        if let Some(side) = side {
            let (trainable, optimizer) = side.join().expect("writing files does not panic")?;
            files.insert(TRAINABLE.to_string(), trainable);
            files.insert(OPTIMIZER.to_string(), optimizer);
            crate::faults::pause_in_checkpoint(snap.step);
        }
        if let Some(memory) = memory {
            files.insert(MEMORY.to_string(), memory?);
        }
        Ok(())
    })?;
    if ctx.is_writer {
        let config = cfg.to_toml()?;
        let manifest = Manifest {
            format: FORMAT.into(),
            step: snap.step,
            total_steps: snap.total_steps,
            epoch: snap.sampler.epoch,
            sampler_batch: snap.sampler.batch,
            micro: 0,
            world_size: ctx.world_size,
            global_batch: snap.global_batch,
            config_sha256: sha256_hex(config.as_bytes()),
            config,
            loop_state: snap.loop_state.clone(),
            validation: snap.validation.cloned(),
            files,
        };
        let json = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| Error::Internal(format!("{MANIFEST}: {e}")))?;
        write_atomic(&tmp.join(MANIFEST), &json)?;
        write_atomic(&tmp.join(MANIFEST_DIGEST), sha256_hex(&json).as_bytes())?;
        fsync_dir(&tmp)?;
        // A checkpoint of this step from an earlier attempt (a resumed run that got here again).
        if done.exists() {
            std::fs::remove_dir_all(&done).map_err(|e| Error::io(&done, e))?;
        }
        std::fs::rename(&tmp, &done).map_err(|e| Error::io(&done, e))?;
        partial.disarm();
        fsync_dir(&root)?;
        write_atomic(&root.join(LATEST), name.as_bytes())?;
        prune(&root, cfg)?;
    }
    group.barrier()?;
    Ok(done)
}

/// The finished checkpoints under `root`, newest first.
pub(super) fn list(root: &Path) -> Vec<(usize, PathBuf)> {
    let mut found: Vec<(usize, PathBuf)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("step_")?.parse::<usize>().ok()?;
            e.path().is_dir().then(|| (step, e.path()))
        })
        .collect();
    found.sort_by_key(|f| std::cmp::Reverse(f.0));
    found
}

/// Keeps the newest `checkpoint.keep` checkpoints and the best by `checkpoint.best`.
fn prune(root: &Path, cfg: &Config) -> Result<()> {
    let all = list(root);
    let best = match cfg.checkpoint.best {
        BestMetric::None => None,
        metric => all
            .iter()
            .filter_map(|(_, dir)| {
                let m = read_manifest(dir).ok()?;
                let v = m.validation?;
                let score = match metric {
                    BestMetric::Accuracy => v.accuracy,
                    BestMetric::MacroF1 => v.macro_f1,
                    BestMetric::Loss | BestMetric::None => -v.loss,
                };
                score.is_finite().then(|| (score, dir.clone()))
            })
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .map(|(_, d)| d),
    };
    for (_, dir) in all.iter().skip(cfg.checkpoint.keep) {
        if Some(dir) != best.as_ref() {
            std::fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
    }
    Ok(())
}

pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let m: Manifest =
        serde_json::from_str(&text).map_err(|e| Error::format(&path, e.to_string()))?;
    if m.format == FORMAT {
        let sidecar = dir.join(MANIFEST_DIGEST);
        let want = std::fs::read_to_string(&sidecar).map_err(|e| Error::io(&sidecar, e))?;
        if want.trim() != sha256_hex(text.as_bytes()) {
            return Err(Error::format(
                &path,
                format!("does not match its sha256 in {MANIFEST_DIGEST}: the manifest was edited or is corrupt"),
            ));
        }
    } else if m.format != FORMAT_V1 {
        return Err(Error::format(
            &path,
            format!("format `{}`: this umtune reads `{FORMAT}`", m.format),
        ));
    }
    Ok(m)
}

/// The checkpoint in `dir`, every file checked against its manifest (sizes and checksums; the
/// memory's shards against its index when loaded).
pub fn verify(dir: &Path) -> Result<Manifest> {
    let m = manifest_of(dir)?;
    let manifest = dir.join(MANIFEST).display().to_string();
    for (name, want) in &m.files {
        check_digest(&dir.join(name), want, &manifest)?;
    }
    // The memory's shards, against the index just checked (a requeued job falls back past a
    // corrupt shard as past any corrupt file).
    if m.files.contains_key(MEMORY) {
        let index_file = dir.join(MEMORY);
        let index = crate::memory::files::read_index(&index_file)?;
        let recorded_in = index_file.display().to_string();
        for shard in &index.shards {
            check_digest(&dir.join(&shard.file), &shard.digest, &recorded_in)?;
        }
    }
    Ok(m)
}

/// The checkpoint's manifest, checked without reading the files it lists: the files a
/// checkpoint needs are listed and there with their sizes, the config matches its hash.
/// [`restore`] checks every file's checksum on the bytes it reads.
pub fn manifest_of(dir: &Path) -> Result<Manifest> {
    let m = read_manifest(dir)?;
    let manifest = dir.join(MANIFEST).display().to_string();
    for f in [TRAINABLE, OPTIMIZER] {
        if !m.files.contains_key(f) {
            return Err(Error::format(
                dir.join(MANIFEST),
                format!("lists no {f}: not a umtune checkpoint"),
            ));
        }
    }
    for (name, want) in &m.files {
        let path = dir.join(name);
        let bytes = std::fs::metadata(&path)
            .map_err(|_| Error::format(&path, format!("is missing: {manifest} lists it")))?
            .len();
        if bytes != want.bytes {
            return Err(Error::format(
                &path,
                format!(
                    "is {bytes} bytes, {manifest} recorded {}: the file is truncated or was replaced",
                    want.bytes
                ),
            ));
        }
    }
    if m.config_sha256 != sha256_hex(m.config.as_bytes()) {
        return Err(Error::format(
            dir.join(MANIFEST),
            "the config's sha256 does not match the config it holds: the manifest was edited or is corrupt",
        ));
    }
    Ok(m)
}

/// Loads the checkpoint into the model (trainable tensors, memory shard) and the optimizer.
/// Every file is checked against the manifest on the bytes that are read.
pub fn restore(dir: &Path, m: &Manifest, model: &TaskModel, opt: &mut AdamW) -> Result<()> {
    let manifest = dir.join(MANIFEST).display().to_string();
    let want = |f: &str| {
        m.files
            .get(f)
            .map(|d| (d, manifest.as_str()))
            .ok_or_else(|| {
                Error::format(
                    dir.join(MANIFEST),
                    format!("lists no {f}: not a umtune checkpoint"),
                )
            })
    };
    // The weights and the memory mapped first, then copied in while another thread checks them.
    let trainable = dir.join(TRAINABLE);
    let weights = MappedSafetensors::open_unchecked(&trainable)?;
    let optimizer = dir.join(OPTIMIZER);
    let memory_file = dir.join(MEMORY);
    let memory = match (&model.memory, m.files.contains_key(MEMORY)) {
        (Some(memory), true) => Some((memory, memory.map(&memory_file)?)),
        (None, false) => None,
        (Some(_), false) => {
            return Err(Error::run(
                dir,
                "the checkpoint has no memory; the model has one",
            ))
        }
        (None, true) => {
            return Err(Error::run(
                dir,
                "the checkpoint has a memory; the model has none",
            ))
        }
    };
    let (trainable_digest, recorded_in) = want(TRAINABLE)?;
    let (optimizer_digest, _) = want(OPTIMIZER)?;
    let mut checks = vec![(
        trainable.as_path(),
        weights.bytes(),
        trainable_digest,
        recorded_in,
    )];
    if let Some((_, saved)) = &memory {
        checks.extend(saved.checks());
    }
    // The checking thread then maps, checks and restores AdamW's state; this one copies the
    // weights and the memory meanwhile.
    while_checking_and(
        &checks,
        || {
            let state = MappedSafetensors::open_unchecked(&optimizer)?;
            check_bytes(&optimizer, state.bytes(), optimizer_digest, recorded_in)?;
            opt.load_state(&state, &optimizer)
        },
        || {
            copy_named(model.trained_vars(), &trainable, &weights)?;
            if let Some((memory, saved)) = &memory {
                memory.restore_from(saved, &memory_file, false)?;
            }
            Ok(())
        },
    )
    .map(|((), ())| ())
}
