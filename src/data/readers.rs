//! Dataset files into examples: parquet in the Hugging Face datasets layout (label names from the
//! schema's `huggingface` metadata), JSONL, CSV/TSV, and CoNLL column files. Every malformed
//! file, missing column, unknown label or empty split is an error naming file, row and column.
use crate::error::{Error, Result};
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
        _ if !declared.is_empty() => declared,
        _ => infer_names(&rows, task),
    };
    let index: BTreeMap<&str, usize> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i))
        .collect();
    let resolve = |raw: &RawLabel, row: usize, column: &str| -> Result<usize> {
        let found = match raw {
            RawLabel::Index(i) => usize::try_from(*i).ok().filter(|&i| i < names.len()),
            RawLabel::Name(n) => index.get(n.as_str()).copied(),
        };
        found.ok_or_else(|| {
            let shown = match raw {
                RawLabel::Index(i) => i.to_string(),
                RawLabel::Name(n) => format!("`{n}`"),
            };
            Error::data(
                path,
                Some(row),
                Some(column),
                format!("label {shown} is outside the label set {names:?}"),
            )
        })
    };
    let mut examples = Vec::with_capacity(rows.len());
    for (i, row) in rows.into_iter().enumerate() {
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
    let iter = reader
        .get_row_iter(None)
        .map_err(|e| Error::data(path, None, None, e.to_string()))?;
    let mut rows = Vec::new();
    for (i, row) in iter.enumerate() {
        let row = row.map_err(|e| Error::data(path, Some(i), None, e.to_string()))?;
        let mut raw = RawRow {
            text: None,
            label: None,
            tokens: None,
            tags: None,
        };
        for (name, field) in row.get_column_iter() {
            let bad = |what: &str| {
                Error::data(
                    path,
                    Some(i),
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
        rows.push(raw);
    }
    Ok((rows, declared))
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

fn read_jsonl(path: &Path, task: Task, cols: &Columns) -> Result<Vec<RawRow>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut rows = Vec::new();
    for (line_no, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let row = rows.len();
        let v: Value = serde_json::from_str(line).map_err(|e| {
            Error::data(
                path,
                Some(row),
                None,
                format!("line {}: invalid JSON: {e}", line_no + 1),
            )
        })?;
        let get = |c: &str| {
            v.get(c)
                .ok_or_else(|| Error::data(path, Some(row), Some(c), "no such field"))
        };
        let bad =
            |c: &str, what: &str| Error::data(path, Some(row), Some(c), format!("expected {what}"));
        rows.push(match task {
            Task::Classification => RawRow {
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

/// CSV/TSV with a header row and RFC 4180 quoting; classification only.
fn read_delimited(path: &Path, sep: u8, task: Task, cols: &Columns) -> Result<Vec<RawRow>> {
    if task != Task::Classification {
        return Err(Error::data(
            path,
            None,
            None,
            "CSV/TSV hold classification data; use parquet, jsonl or conll for NER",
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let records = split_records(&text, sep as char)
        .map_err(|(row, msg)| Error::data(path, Some(row), None, msg))?;
    let Some((header, body)) = records.split_first() else {
        return Err(Error::data(path, None, None, "the split is empty"));
    };
    let col = |c: &str| {
        header.iter().position(|h| h == c).ok_or_else(|| {
            Error::data(
                path,
                None,
                Some(c),
                format!("no such column (header is {header:?})"),
            )
        })
    };
    let (ti, li) = (col(&cols.text)?, col(&cols.label)?);
    body.iter()
        .enumerate()
        .map(|(i, rec)| {
            if rec.len() != header.len() {
                return Err(Error::data(
                    path,
                    Some(i),
                    None,
                    format!("{} fields, the header has {}", rec.len(), header.len()),
                ));
            }
            let label = rec[li].trim();
            Ok(RawRow {
                text: Some(rec[ti].clone()),
                label: Some(
                    label
                        .parse::<i64>()
                        .map(RawLabel::Index)
                        .unwrap_or_else(|_| RawLabel::Name(label.to_string())),
                ),
                tokens: None,
                tags: None,
            })
        })
        .collect()
}

/// Splits delimited text into records of fields, honouring double-quoted fields.
fn split_records(text: &str, sep: char) -> std::result::Result<Vec<Vec<String>>, (usize, String)> {
    let mut records = Vec::new();
    let (mut record, mut field) = (Vec::new(), String::new());
    let mut chars = text.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') if field.is_empty() => quoted = true,
            (false, c) if c == sep => record.push(std::mem::take(&mut field)),
            (false, '\r') => {}
            (false, '\n') => {
                record.push(std::mem::take(&mut field));
                if !(record.len() == 1 && record[0].is_empty()) {
                    records.push(std::mem::take(&mut record));
                } else {
                    record.clear();
                }
            }
            (false, c) => field.push(c),
        }
    }
    if quoted {
        return Err((
            records.len().saturating_sub(1),
            "unterminated quoted field".into(),
        ));
    }
    if !field.is_empty() || !record.is_empty() {
        record.push(field);
        records.push(record);
    }
    Ok(records)
}

/// CoNLL: one `word ... tag` line per token (the tag in the last column), blank lines between
/// sentences, `-DOCSTART-` lines ignored. Rows are sentences.
fn read_conll(path: &Path) -> Result<Vec<RawRow>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut rows = Vec::new();
    let (mut tokens, mut tags) = (Vec::new(), Vec::new());
    for (line_no, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with("-DOCSTART-") {
            if !tokens.is_empty() {
                rows.push(RawRow {
                    text: None,
                    label: None,
                    tokens: Some(std::mem::take(&mut tokens)),
                    tags: Some(std::mem::take(&mut tags)),
                });
            }
            continue;
        }
        let parts: Vec<&str> = line.split_whitespace().collect();
        if parts.len() < 2 {
            return Err(Error::data(
                path,
                Some(rows.len()),
                None,
                format!(
                    "line {}: expected `word ... tag`, got `{line}`",
                    line_no + 1
                ),
            ));
        }
        tokens.push(parts[0].to_string());
        tags.push(RawLabel::Name(parts[parts.len() - 1].to_string()));
    }
    if !tokens.is_empty() {
        rows.push(RawRow {
            text: None,
            label: None,
            tokens: Some(tokens),
            tags: Some(tags),
        });
    }
    Ok(rows)
}
