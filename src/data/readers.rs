//! Dataset files into examples: parquet in the Hugging Face datasets layout (label names from the
//! schema's `huggingface` metadata), JSONL, CSV/TSV, and CoNLL column files. Every malformed
//! file, missing column, unknown label or empty split is an error naming file, row and column.
use crate::error::{Error, Loc, Result};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One training or evaluation example.
#[derive(Debug, Clone, PartialEq)]
pub enum Example {
    /// Sequence classification.
    Text { text: String, label: usize },
    /// Token classification (NER): one tag per word.
    Tagged {
        tokens: Vec<String>,
        tags: Vec<usize>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    Classification,
    Ner,
}

/// Which columns hold what.
#[derive(Debug, Clone)]
pub struct Columns {
    pub text: String,
    pub label: String,
    pub tokens: String,
    pub tags: String,
}

impl Default for Columns {
    fn default() -> Self {
        Columns {
            text: "text".into(),
            label: "label".into(),
            tokens: "tokens".into(),
            tags: "ner_tags".into(),
        }
    }
}

/// A split as read: examples, and the label names the file declared (if it did).
#[derive(Debug, Clone)]
pub struct Split {
    pub path: PathBuf,
    pub examples: Vec<Example>,
    pub label_names: Vec<String>,
}

/// A raw label as a file spells it: an index, or a name to look up.
#[derive(Debug, Clone)]
enum RawLabel {
    Index(i64),
    Name(String),
}

struct RawRow {
    /// Where the row starts in its file.
    loc: Loc,
    text: Option<String>,
    label: Option<RawLabel>,
    tokens: Option<Vec<String>>,
    tags: Option<Vec<RawLabel>>,
}

/// Reads a split file, choosing the reader by extension; `label_names` (from the config or the
/// training split) fixes the label set, else the file's own metadata does.
pub fn read_split(
    path: &Path,
    task: Task,
    cols: &Columns,
    label_names: Option<&[String]>,
) -> Result<Split> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let (rows, declared) = match ext {
        "parquet" => read_parquet(path, task, cols)?,
        "jsonl" | "json" => (read_jsonl(path, task, cols)?, Vec::new()),
        "csv" => (read_delimited(path, b',', task, cols)?, Vec::new()),
        "tsv" => (read_delimited(path, b'\t', task, cols)?, Vec::new()),
        "conll" | "txt" => (read_conll(path)?, Vec::new()),
        other => {
            return Err(Error::data(
                path,
                None,
                None,
                format!("unsupported extension `{other}`: use parquet, jsonl, csv, tsv or conll"),
            ))
        }
    };
    if rows.is_empty() {
        return Err(Error::data(path, None, None, "the split is empty"));
    }
    let names: Vec<String> = match label_names {
        Some(n) if !n.is_empty() => n.to_vec(),
        _ if !declared.is_empty() => declared.clone(),
        _ => infer_names(&rows, task),
    };
    // A file that names its classes has its indices mapped by name onto the label set, so two
    // datasets with the same classes in another order agree, and a class the set lacks is an
    // error rather than a silent shift.
    let by_declared: Option<Vec<usize>> = if declared.is_empty() || declared == names {
        None
    } else {
        let missing: Vec<&String> = declared.iter().filter(|d| !names.contains(d)).collect();
        if !missing.is_empty() {
            return Err(Error::data(
                path,
                None,
                None,
                format!(
                    "the file's labels {missing:?} are not among the expected labels {names:?} (the file declares {declared:?})"
                ),
            ));
        }
        Some(
            declared
                .iter()
                .filter_map(|d| names.iter().position(|n| n == d))
                .collect(),
        )
    };
    let index: BTreeMap<&str, usize> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i))
        .collect();
    let resolve = |raw: &RawLabel, loc: Loc, column: &str| -> Result<usize> {
        let found = match (raw, &by_declared) {
            (RawLabel::Index(i), Some(map)) => {
                usize::try_from(*i).ok().and_then(|i| map.get(i).copied())
            }
            (RawLabel::Index(i), None) => usize::try_from(*i).ok().filter(|&i| i < names.len()),
            (RawLabel::Name(n), _) => index.get(n.as_str()).copied(),
        };
        found.ok_or_else(|| {
            let shown = match raw {
                RawLabel::Index(i) => i.to_string(),
                RawLabel::Name(n) => format!("`{n}`"),
            };
            Error::data(
                path,
                Some(loc),
                Some(column),
                format!("label {shown} is outside the label set {names:?}"),
            )
        })
    };
    let mut examples = Vec::with_capacity(rows.len());
    for row in rows {
        let i = row.loc;
        let missing = |c: &str| Error::data(path, Some(i), Some(c), "missing value");
        examples.push(match task {
            Task::Classification => Example::Text {
                text: row.text.ok_or_else(|| missing(&cols.text))?,
                label: resolve(
                    &row.label.ok_or_else(|| missing(&cols.label))?,
                    i,
                    &cols.label,
                )?,
            },
            Task::Ner => {
                let tokens = row.tokens.ok_or_else(|| missing(&cols.tokens))?;
                let raw_tags = row.tags.ok_or_else(|| missing(&cols.tags))?;
                if raw_tags.len() != tokens.len() {
                    return Err(Error::data(
                        path,
                        Some(i),
                        Some(&cols.tags),
                        format!("{} tags for {} tokens", raw_tags.len(), tokens.len()),
                    ));
                }
                let tags = raw_tags
                    .iter()
                    .map(|t| resolve(t, i, &cols.tags))
                    .collect::<Result<Vec<_>>>()?;
                Example::Tagged { tokens, tags }
            }
        });
    }
    Ok(Split {
        path: path.to_path_buf(),
        examples,
        label_names: names,
    })
}

/// Sorted label names seen in a file that declares none (names if spelled, else 0..max).
fn infer_names(rows: &[RawRow], task: Task) -> Vec<String> {
    let labels: Vec<&RawLabel> = match task {
        Task::Classification => rows.iter().filter_map(|r| r.label.as_ref()).collect(),
        Task::Ner => rows.iter().flat_map(|r| r.tags.iter().flatten()).collect(),
    };
    let mut names = std::collections::BTreeSet::new();
    let mut max_index = -1i64;
    for l in labels {
        match l {
            RawLabel::Name(n) => {
                names.insert(n.clone());
            }
            RawLabel::Index(i) => max_index = max_index.max(*i),
        }
    }
    if names.is_empty() {
        (0..=max_index).map(|i| i.to_string()).collect()
    } else {
        names.into_iter().collect()
    }
}

fn read_parquet(path: &Path, task: Task, cols: &Columns) -> Result<(Vec<RawRow>, Vec<String>)> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let reader = SerializedFileReader::new(file)
        .map_err(|e| Error::data(path, None, None, format!("not a parquet file: {e}")))?;
    let meta = reader.metadata().file_metadata();
    let present: Vec<String> = meta
        .schema_descr()
        .root_schema()
        .get_fields()
        .iter()
        .map(|f| f.name().to_string())
        .collect();
    let needed: Vec<&str> = match task {
        Task::Classification => vec![&cols.text, &cols.label],
        Task::Ner => vec![&cols.tokens, &cols.tags],
    };
    for c in &needed {
        if !present.iter().any(|p| p == c) {
            return Err(Error::data(
                path,
                None,
                Some(c),
                format!("no such column (the file has {present:?})"),
            ));
        }
    }
    let declared = meta
        .key_value_metadata()
        .and_then(|kv| kv.iter().find(|k| k.key == "huggingface"))
        .and_then(|k| k.value.as_deref())
        .and_then(|v| serde_json::from_str::<Value>(v).ok())
        .map(|v| {
            let label_col = if task == Task::Classification {
                &cols.label
            } else {
                &cols.tags
            };
            let f = &v["info"]["features"][label_col.as_str()];
            let names = f.get("names").or_else(|| f["feature"].get("names"));
            names
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|n| n.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default()
        })
        .unwrap_or_default();
    // Row group by row group, so a corrupt page is reported with the rows it holds.
    let mut rows = Vec::new();
    for g in 0..reader.num_row_groups() {
        let first = rows.len() + 1;
        let n = reader.metadata().row_group(g).num_rows() as usize;
        let group_err = |msg: String| {
            Error::data(
                path,
                None,
                None,
                format!(
                    "row group {g} (rows {first} to {}): {msg}",
                    first + n.saturating_sub(1)
                ),
            )
        };
        let group = reader
            .get_row_group(g)
            .map_err(|e| group_err(e.to_string()))?;
        let iter = group
            .get_row_iter(None)
            .map_err(|e| group_err(e.to_string()))?;
        for row in iter {
            let row = row.map_err(|e| group_err(e.to_string()))?;
            let loc = Loc::Row(rows.len() + 1);
            rows.push(parquet_row(path, &row, loc, task, cols)?);
        }
    }
    Ok((rows, declared))
}

fn parquet_row(
    path: &Path,
    row: &parquet::record::Row,
    loc: Loc,
    task: Task,
    cols: &Columns,
) -> Result<RawRow> {
    let mut raw = RawRow {
        loc,
        text: None,
        label: None,
        tokens: None,
        tags: None,
    };
    for (name, field) in row.get_column_iter() {
        let bad = |what: &str| {
            Error::data(
                path,
                Some(loc),
                Some(name),
                format!("expected {what}, found {field}"),
            )
        };
        if name == &cols.text && task == Task::Classification {
            raw.text = Some(field_str(field).ok_or_else(|| bad("a string"))?);
        } else if name == &cols.label && task == Task::Classification {
            raw.label =
                Some(field_label(field).ok_or_else(|| bad("an integer or a string label"))?);
        } else if name == &cols.tokens && task == Task::Ner {
            let list = field_list(field).ok_or_else(|| bad("a list of strings"))?;
            raw.tokens = Some(
                list.iter()
                    .map(field_str)
                    .collect::<Option<_>>()
                    .ok_or_else(|| bad("a list of strings"))?,
            );
        } else if name == &cols.tags && task == Task::Ner {
            let list = field_list(field).ok_or_else(|| bad("a list of labels"))?;
            raw.tags = Some(
                list.iter()
                    .map(field_label)
                    .collect::<Option<_>>()
                    .ok_or_else(|| bad("a list of labels"))?,
            );
        }
    }
    Ok(raw)
}

fn field_str(f: &Field) -> Option<String> {
    match f {
        Field::Str(s) => Some(s.clone()),
        _ => None,
    }
}

fn field_label(f: &Field) -> Option<RawLabel> {
    Some(match f {
        Field::Byte(v) => RawLabel::Index(*v as i64),
        Field::Short(v) => RawLabel::Index(*v as i64),
        Field::Int(v) => RawLabel::Index(*v as i64),
        Field::Long(v) => RawLabel::Index(*v),
        Field::UByte(v) => RawLabel::Index(*v as i64),
        Field::UShort(v) => RawLabel::Index(*v as i64),
        Field::UInt(v) => RawLabel::Index(*v as i64),
        Field::Str(s) => RawLabel::Name(s.clone()),
        _ => return None,
    })
}

fn field_list(f: &Field) -> Option<&[Field]> {
    match f {
        Field::ListInternal(list) => Some(list.elements()),
        _ => None,
    }
}

fn json_label(v: &Value) -> Option<RawLabel> {
    match v {
        Value::Number(n) => n.as_i64().map(RawLabel::Index),
        Value::String(s) => Some(RawLabel::Name(s.clone())),
        _ => None,
    }
}

/// A text file as UTF-8; invalid bytes are reported with the line they are on.
pub fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    String::from_utf8(bytes).map_err(|e| {
        let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line = valid.iter().filter(|&&b| b == b'\n').count() + 1;
        Error::data(
            path,
            Some(Loc::Line(line)),
            None,
            "not valid UTF-8 (save the file as UTF-8)",
        )
    })
}

fn read_jsonl(path: &Path, task: Task, cols: &Columns) -> Result<Vec<RawRow>> {
    let text = read_text(path)?;
    let mut rows = Vec::new();
    for (line_no, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let loc = Loc::Line(line_no + 1);
        let v: Value = serde_json::from_str(line)
            .map_err(|e| Error::data(path, Some(loc), None, format!("invalid JSON: {e}")))?;
        let get = |c: &str| {
            v.get(c)
                .ok_or_else(|| Error::data(path, Some(loc), Some(c), "no such field"))
        };
        let bad =
            |c: &str, what: &str| Error::data(path, Some(loc), Some(c), format!("expected {what}"));
        rows.push(match task {
            Task::Classification => RawRow {
                loc,
                text: Some(
                    get(&cols.text)?
                        .as_str()
                        .ok_or_else(|| bad(&cols.text, "a string"))?
                        .to_string(),
                ),
                label: Some(
                    json_label(get(&cols.label)?)
                        .ok_or_else(|| bad(&cols.label, "an integer or a string label"))?,
                ),
                tokens: None,
                tags: None,
            },
            Task::Ner => {
                let arr = |c: &str| get(c)?.as_array().ok_or_else(|| bad(c, "an array"));
                RawRow {
                    loc,
                    text: None,
                    label: None,
                    tokens: Some(
                        arr(&cols.tokens)?
                            .iter()
                            .map(|t| t.as_str().map(String::from))
                            .collect::<Option<_>>()
                            .ok_or_else(|| bad(&cols.tokens, "an array of strings"))?,
                    ),
                    tags: Some(
                        arr(&cols.tags)?
                            .iter()
                            .map(json_label)
                            .collect::<Option<_>>()
                            .ok_or_else(|| bad(&cols.tags, "an array of labels"))?,
                    ),
                }
            }
        });
    }
    Ok(rows)
}

/// CSV/TSV with a header row and RFC 4180 quoting (the `csv` crate); classification only.
fn read_delimited(path: &Path, sep: u8, task: Task, cols: &Columns) -> Result<Vec<RawRow>> {
    if task != Task::Classification {
        return Err(Error::data(
            path,
            None,
            None,
            "CSV/TSV hold classification data; use parquet, jsonl or conll for NER",
        ));
    }
    // Read as text first so that invalid UTF-8 is reported with its line.
    let text = read_text(path)?;
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(sep)
        .has_headers(true)
        .from_reader(text.as_bytes());
    let csv_err = |e: csv::Error| {
        let loc = e.position().map(|p| Loc::Line(p.line() as usize));
        let msg = match e.kind() {
            csv::ErrorKind::UnequalLengths {
                expected_len, len, ..
            } => format!("{len} fields, the header has {expected_len}"),
            _ => e.to_string(),
        };
        Error::data(path, loc, None, msg)
    };
    let header = reader.headers().map_err(csv_err)?.clone();
    if header.is_empty() {
        return Err(Error::data(path, None, None, "the split is empty"));
    }
    let col = |c: &str| {
        header.iter().position(|h| h == c).ok_or_else(|| {
            Error::data(
                path,
                Some(Loc::Line(1)),
                Some(c),
                format!(
                    "no such column (header is {:?})",
                    header.iter().collect::<Vec<_>>()
                ),
            )
        })
    };
    let (ti, li) = (col(&cols.text)?, col(&cols.label)?);
    let mut rows = Vec::new();
    for record in reader.records() {
        let rec = record.map_err(csv_err)?;
        let loc = Loc::Line(rec.position().map_or(0, |p| p.line() as usize));
        let field = |i: usize| {
            rec.get(i)
                .ok_or_else(|| Error::data(path, Some(loc), None, "missing field"))
        };
        let label = field(li)?.trim();
        rows.push(RawRow {
            loc,
            text: Some(field(ti)?.to_string()),
            label: Some(
                label
                    .parse::<i64>()
                    .map(RawLabel::Index)
                    .unwrap_or_else(|_| RawLabel::Name(label.to_string())),
            ),
            tokens: None,
            tags: None,
        });
    }
    Ok(rows)
}

/// CoNLL: one `word ... tag` line per token (the tag in the last column), blank lines between
/// sentences, `-DOCSTART-` lines ignored. Rows are sentences, located at their first line.
fn read_conll(path: &Path) -> Result<Vec<RawRow>> {
    let text = read_text(path)?;
    let mut rows = Vec::new();
    let (mut tokens, mut tags) = (Vec::new(), Vec::new());
    let mut start = 0;
    let mut flush = |tokens: &mut Vec<String>, tags: &mut Vec<RawLabel>, start: usize| {
        if !tokens.is_empty() {
            rows.push(RawRow {
                loc: Loc::Line(start),
                text: None,
                label: None,
                tokens: Some(std::mem::take(tokens)),
                tags: Some(std::mem::take(tags)),
            });
        }
    };
    for (line_no, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with("-DOCSTART-") {
            flush(&mut tokens, &mut tags, start);
            continue;
        }
        if tokens.is_empty() {
            start = line_no + 1;
        }
        let parts: Vec<&str> = line.split_whitespace().collect();
        if parts.len() < 2 {
            return Err(Error::data(
                path,
                Some(Loc::Line(line_no + 1)),
                None,
                format!("expected `word ... tag`, got `{line}`"),
            ));
        }
        tokens.push(parts[0].to_string());
        tags.push(RawLabel::Name(parts[parts.len() - 1].to_string()));
    }
    flush(&mut tokens, &mut tags, start);
    Ok(rows)
}
