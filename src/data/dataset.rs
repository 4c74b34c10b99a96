//! A run's dataset: the directory (a path, or a name under `$UMTUNE_CACHE/data`), its split
//! files, and the tokenized splits with example ids that are unique across splits.
use super::batching::{encode, Encoded};
use super::corrupt::Corruption;
use super::readers::{read_split, Columns, Example, Split, Task};
use super::TextTokenizer;
use crate::config::asset_cache;
use crate::config::{Config, TaskKind};
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

const SPLIT_EXTENSIONS: &[&str] = &["parquet", "jsonl", "csv", "tsv", "conll"];

/// Example ids: each split's index plus its own base, so the external memory can tell an
/// example's own entries (self-exclusion) and no two splits share an id.
pub mod ids {
    pub const TRAIN: i64 = 0;
    pub const VALIDATION: i64 = 1 << 40;
    pub const TEST: i64 = 2 << 40;
    /// Entries built from another dataset than the run's own (`memory build --data`).
    pub const FOREIGN: i64 = 3 << 40;
    /// Inputs of `predict`: never an entry of the memory.
    pub const PREDICT: i64 = 4 << 40;
    /// Random entries the benchmarks fill a memory with.
    pub const SYNTHETIC: i64 = 1 << 50;
    /// Inputs without ids (a forward outside training): `UNKNOWN + i` for row i, distinct per
    /// row and never an entry's.
    pub const UNKNOWN: i64 = i64::MIN;
    /// A query id no entry has (the memory's self-exclusion removes nothing; -1 marks an empty
    /// slot).
    pub const NONE: i64 = -2;
}

/// The dataset directory: a path, or a name under `$UMTUNE_CACHE/data`.
pub fn dataset_dir(dataset: &str) -> PathBuf {
    let p = Path::new(dataset);
    if p.is_dir() {
        p.to_path_buf()
    } else {
        asset_cache().join("data").join(dataset)
    }
}

/// The file of `split` in `dir`; two files for one split (`train.jsonl` and `train.csv`) are an
/// error rather than a silent choice.
pub fn split_file(dir: &Path, split: &str) -> Result<Option<PathBuf>> {
    let found: Vec<PathBuf> = SPLIT_EXTENSIONS
        .iter()
        .map(|e| dir.join(format!("{split}.{e}")))
        .filter(|p| p.exists())
        .collect();
    match found.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(one.clone())),
        many => Err(Error::data(
            dir,
            None,
            None,
            format!(
                "{} files for the {split} split ({}): keep one",
                many.len(),
                many.iter()
                    .filter_map(|p| p.file_name().and_then(|n| n.to_str()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

/// The splits of a run, tokenized.
pub struct Data {
    pub train: Vec<Encoded>,
    pub validation: Vec<Encoded>,
    pub test: Option<Vec<Encoded>>,
    pub label_names: Vec<String>,
}

impl Data {
    /// A split by name.
    pub fn split(&self, name: &str) -> Result<&[Encoded]> {
        match name {
            "train" => Ok(&self.train),
            "validation" => Ok(&self.validation),
            "test" => self
                .test
                .as_deref()
                .ok_or_else(|| Error::Config("the dataset has no test split".into())),
            other => Err(Error::Config(format!(
                "split `{other}`: expected train, validation or test"
            ))),
        }
    }
}

/// Reads and tokenizes the splits `cfg.data` names. With `data.label_names` set (always, for a
/// trained run), labels are mapped by name onto that set, and a label outside it is an error.
pub fn load_data(cfg: &Config, tok: &TextTokenizer) -> Result<Data> {
    let task = match cfg.data.task {
        TaskKind::Classification => Task::Classification,
        TaskKind::Ner => Task::Ner,
    };
    let dir = dataset_dir(&cfg.data.dataset);
    if !dir.is_dir() {
        let packaged = !cfg.data.dataset.contains(std::path::MAIN_SEPARATOR);
        let hint = if packaged {
            format!(
                "for the packaged datasets run `make data` (it fills {})",
                dir.display()
            )
        } else {
            "give an existing directory".to_string()
        };
        return Err(Error::data(
            &dir,
            None,
            None,
            format!(
                "data.dataset = `{}`: no such dataset directory; {hint}",
                cfg.data.dataset
            ),
        ));
    }
    let cols = Columns {
        text: cfg.data.text_column.clone(),
        label: cfg.data.label_column.clone(),
        tokens: cfg.data.tokens_column.clone(),
        tags: cfg.data.tags_column.clone(),
    };
    let need = |split: &str| {
        split_file(&dir, split)?.ok_or_else(|| {
            Error::data(
                &dir,
                None,
                None,
                format!("no {split} split ({split}.parquet/.jsonl/.csv/.tsv/.conll)"),
            )
        })
    };
    let configured = (!cfg.data.label_names.is_empty()).then_some(cfg.data.label_names.as_slice());
    let train: Split = read_split(&need("train")?, task, &cols, configured)?;
    let names = train.label_names.clone();
    let read = |path: &Path| read_split(path, task, &cols, Some(&names));
    let validation = read(&need("validation")?)?;
    let test = split_file(&dir, "test")?.map(|p| read(&p)).transpose()?;
    warn_single_class(&train);
    let n_labels = names.len();
    // Limit first, so a corrupted subset is the same subset.
    let prepare = |mut v: Vec<Example>, n: usize, c: &Corruption| {
        if n > 0 {
            v.truncate(n);
        }
        if c.is_none() {
            v
        } else {
            c.apply(&v, n_labels)
        }
    };
    let (d, max_len) = (&cfg.data, cfg.data.max_length);
    let eval = |examples| prepare(examples, d.eval_limit, &d.eval_corruption);
    let offset = |mut v: Vec<Encoded>, base: i64| {
        for e in &mut v {
            e.id += base;
        }
        v
    };
    Ok(Data {
        train: encode(
            tok,
            &prepare(train.examples, d.train_limit, &d.train_corruption),
            max_len,
        )?,
        validation: offset(
            encode(tok, &eval(validation.examples), max_len)?,
            ids::VALIDATION,
        ),
        test: test
            .map(|t| encode(tok, &eval(t.examples), max_len).map(|e| offset(e, ids::TEST)))
            .transpose()?,
        label_names: names,
    })
}

/// A training split whose examples all carry one class trains a head that can only say that
/// class: worth a warning, not an error (a smoke test may want it).
fn warn_single_class(train: &Split) {
    let mut seen = std::collections::BTreeSet::new();
    for e in &train.examples {
        match e {
            Example::Text { label, .. } => {
                seen.insert(*label);
            }
            Example::Tagged { tags, .. } => seen.extend(tags.iter().copied()),
        }
    }
    if seen.len() < 2 {
        tracing::warn!(
            file = %train.path.display(),
            "the training split has only one class ({:?}): the model cannot learn to tell classes apart",
            seen.iter().filter_map(|&i| train.label_names.get(i)).collect::<Vec<_>>()
        );
    }
}
