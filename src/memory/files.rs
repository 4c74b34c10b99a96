//! Memory files: the external memory saved as one safetensors shard per rank plus an index
//! (`NAME.index.json`, after Hugging Face's `model.safetensors.index.json`), loadable at any
//! world size. Shard r of W holds the rank's rows: ring slot `s` is row `s / W` of shard `s % W`
//! (the slot rule of METHOD.md section 2), so a loading rank r' of W' takes the slots with
//! `s % W' == r'` from the shards that hold them — only its own shard when W' = W.
//!
//! Saving is collective: each rank writes its shard atomically under a new generation's name
//! (`NAME.g3-00002-of-00004.safetensors`), rank 0 gathers their sizes and checksums, writes the
//! index atomically and only then removes the previous generation's shards, and a barrier ends
//! it. A kill at any instant therefore leaves the previous index and every file it names intact.
//! Every rank writes into the same directory: across nodes it must be on a shared filesystem
//! (the run directory under SLURM usually is). Loading checks each shard's size and xxh3
//! against the index (on the mapped bytes it reads, see [`load_with`]) and names the file that
//! differs. A single `.safetensors` file holding the
//! whole ring (what umtune wrote before shards) loads as a memory of one shard.
use crate::atomic_file::{digest, write_atomic, FileDigest};
use crate::dist::Collective;
use crate::error::{Error, Result};
use crate::models::weights::{while_checking, write_safetensors_atomic, Check, MappedSafetensors};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::Tensor;

pub const INDEX_SUFFIX: &str = ".index.json";
const FORMAT: &str = "umtune-memory/1";

/// `NAME.index.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MemoryIndex {
    pub format: String,
    /// Ring slots, all shards together.
    pub capacity: usize,
    /// Entries ever written (the ring position of the next write).
    pub written: u64,
    /// Bumped by every save; part of the shard names.
    pub generation: u64,
    /// The world size it was saved at: shard r holds slots r, r + W, ...
    pub world_size: usize,
    /// In rank order.
    pub shards: Vec<ShardFile>,
    /// The shard that also holds `w_k` (the key projection the entries were made with).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub w_k: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ShardFile {
    /// A file name in the index's directory.
    pub file: String,
    #[serde(flatten)]
    pub digest: FileDigest,
}

/// The index a memory is named by: `path` itself when it ends in `.index.json`, else
/// `path.index.json`.
pub fn index_path(path: &Path) -> PathBuf {
    let s = path.as_os_str().to_string_lossy();
    if s.ends_with(INDEX_SUFFIX) {
        path.to_path_buf()
    } else {
        PathBuf::from(format!("{s}{INDEX_SUFFIX}"))
    }
}

fn stem_of(index: &Path) -> String {
    let name = index
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    name.trim_end_matches(INDEX_SUFFIX).to_string()
}

fn dir_of(index: &Path) -> &Path {
    match index.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

pub fn read_index(index: &Path) -> Result<MemoryIndex> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let i: MemoryIndex =
        serde_json::from_str(&text).map_err(|e| Error::format(index, e.to_string()))?;
    if i.format != FORMAT {
        return Err(Error::format(
            index,
            format!("format `{}`: this umtune reads `{FORMAT}`", i.format),
        ));
    }
    if i.world_size == 0 || i.shards.len() != i.world_size {
        return Err(Error::format(
            index,
            format!(
                "lists {} shards for world size {}",
                i.shards.len(),
                i.world_size
            ),
        ));
    }
    Ok(i)
}

/// What a rank saves of a memory: the ring's size and position, its own shard's tensors (`keys`,
/// `values`, `ids`) and, on rank 0, `w_k` when the memory carries it.
pub struct Contents<'a> {
    pub capacity: usize,
    pub written: u64,
    pub shard: &'a [(String, Tensor)],
    pub w_k: Option<&'a Tensor>,
}

/// When a save takes effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    /// The index is replaced and the old shards removed at once.
    Now,
    /// Two phases, for a caller that records the index's digest elsewhere (a run's `run.json`):
    /// the new generation's shards and its index as `NAME.index.json.next`, the current index
    /// and its shards untouched. After the caller has recorded the digest, [`publish`] moves the
    /// index into place and removes the old shards; a kill before that leaves the previous
    /// memory whole, and the staged index can still be published from the record.
    Staged,
}

/// Where a staged save leaves the new index until [`publish`].
pub fn staged_path(index: &Path) -> PathBuf {
    let index = index_path(index);
    let mut name = index.file_name().unwrap_or_default().to_os_string();
    name.push(".next");
    index.with_file_name(name)
}

/// Moves a staged index into place (an already moved one is fine: a reader may have published
/// it) and, with `tidy`, removes the shards it does not name (only the writer may: a reader
/// could remove the shards of a save in flight).
pub fn publish(index: &Path, tidy: bool) -> Result<()> {
    let index = index_path(index);
    crate::atomic_file::move_into_place(&staged_path(&index), &index)?;
    if tidy {
        remove_stale(dir_of(&index), &stem_of(&index), &read_index(&index)?);
    }
    Ok(())
}

/// Saves a memory as shards + index at `index` (see the module doc). Collective: every rank
/// passes its own contents. Returns the digest of the index written (the same on every rank).
pub fn save(
    group: &dyn Collective,
    index: &Path,
    contents: &Contents,
    commit: Commit,
) -> Result<FileDigest> {
    let Contents {
        capacity,
        written,
        shard,
        w_k,
    } = *contents;
    let index = index_path(index);
    let (dir, stem) = (dir_of(&index), stem_of(&index));
    let (rank, world) = (group.rank(), group.world_size());
    // Every rank reads the old index before rank 0 can replace it (it waits for all shards).
    let generation = match read_index(&index) {
        Ok(old) => old.generation + 1,
        Err(_) => 1,
    };
    let generation = crate::dist::collective::rank_zero_string(group, &generation.to_string())?
        .parse::<u64>()
        .map_err(|e| Error::Internal(format!("memory generation from rank 0: {e}")))?;
    let file = format!(
        "{stem}.g{generation}-{:05}-of-{world:05}.safetensors",
        rank + 1
    );
    let path = dir.join(&file);
    let mut tensors: Vec<(String, Tensor)> = shard
        .iter()
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    if let (0, Some(w)) = (rank, w_k) {
        tensors.push(("w_k".into(), w.detach()));
    }
    let mine = ShardFile {
        file,
        digest: write_safetensors_atomic(&path, &tensors)?,
    };
    let json = serde_json::to_string(&mine)
        .map_err(|e| Error::Internal(format!("memory shard record: {e}")))?;
    let shards = crate::dist::collective::all_gather_strings(group, &json)?
        .iter()
        .map(|s| serde_json::from_str::<ShardFile>(s))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Internal(format!("memory shard records: {e}")))?;
    let record = MemoryIndex {
        format: FORMAT.into(),
        capacity,
        written,
        generation,
        world_size: world,
        w_k: w_k.map(|_| shards[0].file.clone()),
        shards,
    };
    let bytes = serde_json::to_vec_pretty(&record)
        .map_err(|e| Error::Internal(format!("{}: {e}", index.display())))?;
    let written_to = match commit {
        Commit::Staged => staged_path(&index),
        Commit::Now => index.clone(),
    };
    if rank == 0 {
        write_atomic(&written_to, &bytes)?;
        if commit == Commit::Now {
            remove_stale(dir, &stem, &record);
        }
    }
    group.barrier()?;
    // Every rank reads the digest before any returns: rank 0 publishes a staged index next
    // (renames it away), and a slower rank would find no file to read. The barrier runs
    // whatever the read gave, so a failing rank does not leave the others waiting in it.
    let read = digest(&written_to);
    group.barrier()?;
    read
}

/// Removes the shards of other generations of `stem` (best effort: a leftover file is harmless).
fn remove_stale(dir: &Path, stem: &str, keep: &MemoryIndex) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let prefix = format!("{stem}.g");
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let ours =
            name.starts_with(&prefix) && name.ends_with(".safetensors") && name.contains("-of-");
        if ours && !keep.shards.iter().any(|s| s.file == name) {
            if let Err(err) = std::fs::remove_file(e.path()) {
                tracing::warn!(file = %e.path().display(), "could not remove an old memory shard: {err}");
            }
        }
    }
}

/// One saved shard's tensors, with where it came from.
pub struct LoadedShard {
    pub rank: usize,
    pub path: PathBuf,
    /// `keys`, `values`, `ids`, mapped from the file (copy what you keep).
    pub tensors: MappedSafetensors,
}

/// What a loading rank needs of a saved memory.
pub struct Loaded {
    pub capacity: usize,
    pub written: u64,
    pub world_size: usize,
    /// The shards holding this rank's slots (all of them when the world size changed).
    pub shards: Vec<LoadedShard>,
    /// `w_k` and the file it came from, when the memory has one.
    pub w_k: Option<(Tensor, PathBuf)>,
    /// The shard `w_k` came from when this rank needs no rows of it (kept mapped for its check).
    w_k_shard: Option<MappedSafetensors>,
    /// The checks still to make: a shard's path, which of `shards` it is (`None`: `w_k_shard`),
    /// its digest in the index and the index's name.
    pending: Vec<(PathBuf, Option<usize>, FileDigest, String)>,
}

impl Loaded {
    /// The checks still to make, each on the bytes of the mapped shard it is about.
    pub fn checks(&self) -> Vec<Check<'_>> {
        self.pending
            .iter()
            .map(|(path, shard, want, recorded_in)| {
                let bytes = match shard {
                    Some(i) => self.shards[*i].tensors.bytes(),
                    None => self.w_k_shard.as_ref().map_or(&[][..], |m| m.bytes()),
                };
                (path.as_path(), bytes, want, recorded_in.as_str())
            })
            .collect()
    }
}

/// Reads the shards of the memory at `path` (an index, a name whose `NAME.index.json` exists, or
/// a single whole-ring `.safetensors` file) that rank `rank` of `world` needs, each checked
/// against the index.
pub fn load(path: &Path, rank: usize, world: usize) -> Result<Loaded> {
    let loaded = map(path, rank, world)?;
    loaded
        .checks()
        .iter()
        .try_for_each(|(path, bytes, want, recorded_in)| {
            crate::atomic_file::check_bytes(path, bytes, want, recorded_in)
        })?;
    Ok(loaded)
}

/// [`load`], with `work` reading the shards while a second thread checks them (see
/// [`while_checking`]): a failed check is the result, whatever `work` did.
pub fn load_with<R>(
    path: &Path,
    rank: usize,
    world: usize,
    work: impl FnOnce(&Loaded) -> Result<R>,
) -> Result<R> {
    let loaded = map(path, rank, world)?;
    while_checking(&loaded.checks(), || work(&loaded))
}

/// The shards [`load`] reads, mapped, with the checks still to make ([`Loaded::checks`]: run
/// them, e.g. with [`while_checking`], before trusting what was read).
pub fn map(path: &Path, rank: usize, world: usize) -> Result<Loaded> {
    if path.is_file() && !path.to_string_lossy().ends_with(INDEX_SUFFIX) {
        return load_single(path);
    }
    let index = index_path(path);
    if !index.is_file() {
        return Err(Error::format(
            path,
            format!(
                "no memory here: neither a `{INDEX_SUFFIX}` index nor a `.safetensors` file (is it a `umtune memory build` output?)"
            ),
        ));
    }
    let i = read_index(&index)?;
    let dir = dir_of(&index);
    let wanted: Vec<usize> = if i.world_size == world {
        vec![rank]
    } else {
        (0..i.world_size).collect()
    };
    let mut loaded = Loaded {
        capacity: i.capacity,
        written: i.written,
        world_size: i.world_size,
        shards: Vec::new(),
        w_k: None,
        w_k_shard: None,
        pending: Vec::new(),
    };
    let recorded_in = index.display().to_string();
    for r in 0..i.world_size {
        let entry = &i.shards[r];
        let with_w_k = i.w_k.as_deref() == Some(entry.file.as_str());
        if !wanted.contains(&r) && !with_w_k {
            continue;
        }
        let file = dir.join(&entry.file);
        if !file.is_file() {
            return Err(Error::format(
                &file,
                format!("is missing: {recorded_in} lists it as shard {r}"),
            ));
        }
        let mut tensors = MappedSafetensors::open_unchecked(&file)?;
        if with_w_k {
            let w = tensors.take("w_k").ok_or_else(|| {
                Error::tensor(&file, "w_k", "missing (the index names this shard)")
            })?;
            loaded.w_k = Some((w, file.clone()));
        }
        let shard = if wanted.contains(&r) {
            loaded.shards.push(LoadedShard {
                rank: r,
                path: file.clone(),
                tensors,
            });
            Some(loaded.shards.len() - 1)
        } else {
            loaded.w_k_shard = Some(tensors);
            None
        };
        loaded
            .pending
            .push((file, shard, entry.digest.clone(), recorded_in.clone()));
    }
    Ok(loaded)
}

/// A whole ring in one file (`keys`, `values`, `ids`, `written`, maybe `w_k`): one shard of one.
fn load_single(path: &Path) -> Result<Loaded> {
    let mut tensors: HashMap<String, Tensor> = Tensor::read_safetensors(path)
        .map_err(|e| Error::format(path, e.to_string()))?
        .into_iter()
        .collect();
    let written = crate::host::i64_of(
        &tensors
            .remove("written")
            .ok_or_else(|| Error::tensor(path, "written", "missing from the memory file"))?,
    ) as u64;
    let capacity = tensors
        .get("ids")
        .ok_or_else(|| Error::tensor(path, "ids", "missing from the memory file"))?
        .size()[0] as usize;
    let w_k = tensors.remove("w_k").map(|w| (w, path.to_path_buf()));
    Ok(Loaded {
        capacity,
        written,
        world_size: 1,
        shards: vec![LoadedShard {
            rank: 0,
            path: path.to_path_buf(),
            tensors: MappedSafetensors::owned(tensors),
        }],
        w_k,
        w_k_shard: None,
        pending: Vec::new(),
    })
}
