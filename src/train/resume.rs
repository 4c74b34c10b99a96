//! Where a run starts (`--resume`): rank 0 chooses a checkpoint (the newest that verifies, an
//! older one when it does not), a fresh start, or nothing to do for a finished run, and every
//! rank follows; a config that differs from the checkpoint's in a key that changes what the run
//! computes is refused, naming the keys.
use super::checkpoint::{
    checkpoints_dir, list, manifest_of, verify, Manifest, MANIFEST, SAFE_ON_RESUME,
};
use crate::config::{flatten_toml, Config};
use crate::dist::collective::broadcast_json;
use crate::dist::RunContext;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What `--resume` asked for.
#[derive(Debug, Clone, PartialEq)]
pub enum Resume {
    /// Start a new run.
    No,
    /// The run's newest good checkpoint, or a fresh start in the same directory if none.
    Auto,
    /// This checkpoint, or the newest good one of this run directory.
    Path(PathBuf),
}

impl Resume {
    pub fn parse(s: &str) -> Resume {
        match s {
            "auto" => Resume::Auto,
            p => Resume::Path(PathBuf::from(p)),
        }
    }
}

/// Where a run starts: a checkpoint to continue from (its run directory and manifest), or a
/// fresh run at `fresh_at` (auto with nothing to resume) or at a new directory (`None`).
pub enum Start {
    Fresh(Option<PathBuf>),
    /// `--resume auto` of a run that already finished: nothing to do.
    Finished(PathBuf),
    From {
        run: PathBuf,
        checkpoint: PathBuf,
        manifest: Box<Manifest>,
    },
}

/// Decides where to start (rank 0 looks, every rank gets its answer and checks what it will
/// read).
pub fn locate(cfg: &Config, ctx: &RunContext, resume: &Resume) -> Result<Start> {
    // Rank 0's failure reaches the other ranks as its message, so that none waits on it.
    let mine = ctx.is_rank_zero().then(|| choose(cfg, resume));
    let told = mine.as_ref().map(|c| match c {
        Ok(choice) => choice.clone(),
        Err(e) => Choice::Failed(e.to_string()),
    });
    let choice = broadcast_json(ctx.group.as_ref(), told.as_ref())?;
    let checkpoint = match (mine, choice) {
        (Some(Err(e)), _) => return Err(e),
        (None, Choice::Failed(msg)) => {
            return Err(Error::Collective {
                rank: 0,
                msg: format!("choosing where to resume: {msg}"),
            })
        }
        (_, Choice::Failed(msg)) => {
            return Err(Error::Internal(format!(
                "rank 0 sent a failure it did not have: {msg}"
            )))
        }
        (_, Choice::New) => return Ok(Start::Fresh(None)),
        (_, Choice::Fresh(run)) => return Ok(Start::Fresh(Some(run))),
        (_, Choice::Finished(run)) => return Ok(Start::Finished(run)),
        (_, Choice::Checkpoint(dir)) => dir,
    };
    // Rank 0 verified it when choosing; every rank checks each file as it restores it.
    let manifest = manifest_of(&checkpoint)?;
    let run = checkpoint
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| Error::run(&checkpoint, "a checkpoint is RUN/checkpoints/step_N"))?
        .to_path_buf();
    check_config(
        cfg,
        &manifest.config,
        &checkpoint.join(MANIFEST),
        &checkpoint,
    )?;
    // A checkpoint continues its own run; a run.name or run.output_dir that points elsewhere
    // would be ignored silently (and the other run written into).
    let named = super::run_dir::RunDir::default_path(cfg);
    if !cfg.run.name.is_empty() && !same_dir(&named, &run) {
        return Err(Error::Config(format!(
            "--resume {} continues the run in {}, but run.name / run.output_dir say {}: drop them, or copy that run to {} and resume the copy",
            checkpoint.display(),
            run.display(),
            named.display(),
            named.display()
        )));
    }
    Ok(Start::From {
        run,
        checkpoint,
        manifest: Box::new(manifest),
    })
}

/// Whether `a` and `b` name one directory.
fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// What rank 0 decides and every rank follows.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum Choice {
    /// A new run directory.
    New,
    /// A fresh start in this run directory (`--resume auto` with nothing to resume).
    Fresh(PathBuf),
    /// `--resume auto` of a run that finished: nothing to do.
    Finished(PathBuf),
    /// Continue from this checkpoint.
    Checkpoint(PathBuf),
    /// Rank 0 could not decide: why.
    Failed(String),
}

/// Rank 0's choice.
fn choose(cfg: &Config, resume: &Resume) -> Result<Choice> {
    match resume {
        Resume::No => Ok(Choice::New),
        Resume::Auto => {
            let run = super::run_dir::RunDir::default_path(cfg);
            let finished = super::run_files::read_record(&run)
                .is_ok_and(|r| r.state == super::run_files::RunState::Finished)
                && run.join(super::run_files::SUMMARY_FILE).is_file();
            if finished {
                // A finished run is this config's result only if it was trained with it.
                let file = run.join(super::run_files::CONFIG_FILE);
                let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
                check_config(cfg, &text, &file, &run)?;
                tracing::info!(run = %run.display(), "--resume auto: the run finished already");
                return Ok(Choice::Finished(run));
            }
            match newest_good(&run)? {
                Some(dir) => Ok(Choice::Checkpoint(dir)),
                None => {
                    tracing::info!(run = %run.display(), "--resume auto: no checkpoint to resume, starting fresh");
                    Ok(Choice::Fresh(run))
                }
            }
        }
        Resume::Path(p) if p.join(MANIFEST).is_file() => {
            verify(p)?;
            Ok(Choice::Checkpoint(p.clone()))
        }
        Resume::Path(p) => match newest_good(p)? {
            Some(dir) => Ok(Choice::Checkpoint(dir)),
            None => Err(Error::run(
                p,
                "--resume: neither a checkpoint (no manifest.json) nor a run with a good checkpoint",
            )),
        },
    }
}

/// The newest checkpoint of run `run` that verifies; each bad one is named in a warning.
fn newest_good(run: &Path) -> Result<Option<PathBuf>> {
    for (_, dir) in list(&checkpoints_dir(run)) {
        match verify(&dir) {
            Ok(_) => return Ok(Some(dir)),
            Err(e) => {
                tracing::warn!(checkpoint = %dir.display(), "skipping a bad checkpoint, trying an older one: {e}")
            }
        }
    }
    Ok(None)
}

/// Keys added after a checkpoint was written, whose default is what runs did before them: a
/// checkpoint without the key resumes with its default. (A key whose default changed the
/// behaviour, `memory.normalize`, is not one: a checkpoint without it refuses.)
fn added_since(
    key: &str,
    theirs: &BTreeMap<String, toml::Value>,
    ours: &BTreeMap<String, toml::Value>,
    defaults: &BTreeMap<String, toml::Value>,
) -> bool {
    const ADDED_WITH_OLD_DEFAULT: &[&str] = &["train.adam_eps"];
    ADDED_WITH_OLD_DEFAULT.contains(&key)
        && !theirs.contains_key(key)
        && ours.get(key) == defaults.get(key)
}

/// Refuses a config that differs from the checkpoint's in a key not in [`SAFE_ON_RESUME`],
/// naming the keys.
/// `theirs` is the config text kept in `file`, of the checkpoint or run `dir`.
fn check_config(cfg: &Config, theirs: &str, file: &Path, dir: &Path) -> Result<()> {
    let theirs: toml::Value =
        toml::from_str(theirs).map_err(|e| Error::format(file, e.to_string()))?;
    let ours: toml::Value = toml::from_str(&cfg.to_toml()?)
        .map_err(|e| Error::Internal(format!("the config as TOML: {e}")))?;
    let (a, b) = (flatten_toml(&theirs), flatten_toml(&ours));
    let defaults = flatten_toml(
        &toml::from_str(&Config::default().to_toml()?)
            .map_err(|e| Error::Internal(format!("the default config as TOML: {e}")))?,
    );
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let differing: Vec<String> = keys
        .into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .filter(|k| !added_since(k, &a, &b, &defaults))
        .filter(|k| {
            !SAFE_ON_RESUME
                .iter()
                .any(|s| k.as_str() == *s || (s.ends_with('.') && k.starts_with(s)))
        })
        .map(|k| {
            format!(
                "{k} ({} -> {})",
                a.get(k).map_or("unset".into(), |v| v.to_string()),
                b.get(k).map_or("unset".into(), |v| v.to_string())
            )
        })
        .collect();
    if differing.is_empty() {
        return Ok(());
    }
    Err(Error::Config(format!(
        "resuming {}: the config differs from the one it was trained with in {}; only {} may change on resume (start a new run for other changes)",
        dir.display(),
        differing.join(", "),
        SAFE_ON_RESUME.join(", ")
    )))
}
