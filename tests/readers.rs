//! Dataset readers on the real converted datasets and on small hand-written files, including
//! the errors that name file, row and column.
mod common;
use std::path::PathBuf;
use umtune::config::asset_cache;
use umtune::data::readers::{read_split, Columns, Example, Task};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn data(name: &str, split: &str) -> PathBuf {
    asset_cache()
        .join("data")
        .join(name)
        .join(format!("{split}.parquet"))
}

/// `text` written to a file `name` in a scratch directory of its own (tests run in parallel, and
/// clearing one shared directory would remove another test's file).
fn temp(name: &str, text: &str) -> std::io::Result<PathBuf> {
    let dir = common::fresh_dir(&format!("readers-{name}"));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(name);
    std::fs::write(&path, text)?;
    Ok(path)
}

fn err(path: &std::path::Path, task: Task) -> String {
    match read_split(path, task, &Columns::default(), None) {
        Ok(s) => panic!("expected an error, read {} examples", s.examples.len()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn real_parquet_splits_have_canonical_sizes_and_label_names() -> TestResult {
    let cols = Columns::default();
    let conll = read_split(&data("conll2003", "train"), Task::Ner, &cols, None)?;
    assert_eq!(conll.examples.len(), 14041);
    assert_eq!(conll.label_names[..3], ["O", "B-PER", "I-PER"]);
    let Example::Tagged { tokens, tags } = &conll.examples[0] else {
        return Err("not tagged".into());
    };
    assert_eq!(tokens[..3], ["EU", "rejects", "German"]);
    assert_eq!(tags[..3], [3, 0, 7]); // B-ORG O B-MISC
    assert_eq!(
        read_split(&data("conll2003", "validation"), Task::Ner, &cols, None)?
            .examples
            .len(),
        3250
    );
    assert_eq!(
        read_split(&data("conll2003", "test"), Task::Ner, &cols, None)?
            .examples
            .len(),
        3453
    );
    let r8 = read_split(
        &data("reuters-r8", "test"),
        Task::Classification,
        &cols,
        None,
    )?;
    assert_eq!((r8.examples.len(), r8.label_names.len()), (2189, 8));
    let sentiment = read_split(
        &data("uci-sentiment", "train"),
        Task::Classification,
        &cols,
        None,
    )?;
    assert_eq!(sentiment.label_names, ["negative", "positive"]);
    assert_eq!(sentiment.examples.len(), 2100);
    Ok(())
}

#[test]
fn jsonl_csv_tsv_and_conll() -> TestResult {
    let cols = Columns::default();
    let names = vec!["neg".to_string(), "pos".to_string()];
    let j = temp(
        "a.jsonl",
        "{\"text\": \"good\", \"label\": \"pos\"}\n\n{\"text\": \"bad\", \"label\": 0}\n",
    )?;
    let s = read_split(&j, Task::Classification, &cols, Some(&names))?;
    assert_eq!(
        s.examples,
        [
            Example::Text {
                text: "good".into(),
                label: 1
            },
            Example::Text {
                text: "bad".into(),
                label: 0
            }
        ]
    );
    let c = temp(
        "a.csv",
        "label,text\npos,\"a, \"\"quoted\"\"\nline\"\nneg,plain\n",
    )?;
    let s = read_split(&c, Task::Classification, &cols, Some(&names))?;
    assert_eq!(
        s.examples[0],
        Example::Text {
            text: "a, \"quoted\"\nline".into(),
            label: 1
        }
    );
    assert_eq!(s.examples.len(), 2);
    let t = temp("a.tsv", "text\tlabel\nx\t1\n")?;
    assert_eq!(
        read_split(&t, Task::Classification, &cols, Some(&names))?.examples[0],
        Example::Text {
            text: "x".into(),
            label: 1
        }
    );
    let n = temp(
        "a.conll",
        "-DOCSTART- -X- O\n\nEU NNP B-ORG\nrejects VBZ O\n\nPeter NNP B-PER\n",
    )?;
    let s = read_split(&n, Task::Ner, &cols, None)?;
    assert_eq!(s.label_names, ["B-ORG", "B-PER", "O"]);
    assert_eq!(s.examples.len(), 2);
    Ok(())
}

/// Quotes inside a field and carriage returns are RFC 4180's business (the `csv` crate): a quote
/// not at the start of a field is a literal, a CR inside quotes is kept, CRLF ends records.
#[test]
fn csv_follows_rfc_4180() -> TestResult {
    let names = vec!["neg".to_string(), "pos".to_string()];
    let p = temp(
        "rfc.csv",
        "text,label\r\nsay \"hi\" now,1\r\n\"two\rlines\",0\r\n",
    )?;
    let s = read_split(&p, Task::Classification, &Columns::default(), Some(&names))?;
    assert_eq!(
        s.examples,
        [
            Example::Text {
                text: "say \"hi\" now".into(),
                label: 1
            },
            Example::Text {
                text: "two\rlines".into(),
                label: 0
            }
        ]
    );
    Ok(())
}

/// A file that declares its label names has its indices mapped by name onto the expected set,
/// and a class outside that set is an error naming it.
#[test]
fn declared_labels_map_by_name() -> TestResult {
    let dir = asset_cache().join("data").join("uci-sentiment");
    let path = dir.join("train.parquet");
    let declared = read_split(&path, Task::Classification, &Columns::default(), None)?;
    let mut reversed = declared.label_names.clone();
    reversed.reverse();
    let mapped = read_split(
        &path,
        Task::Classification,
        &Columns::default(),
        Some(&reversed),
    )?;
    let n = declared.label_names.len();
    for (a, b) in declared.examples.iter().zip(&mapped.examples) {
        match (a, b) {
            (Example::Text { label: x, .. }, Example::Text { label: y, .. }) => {
                assert_eq!(declared.label_names[*x], mapped.label_names[*y]);
                assert_eq!(*y, n - 1 - *x);
            }
            _ => return Err("not text examples".into()),
        }
    }
    let other = vec!["spam".to_string(), "ham".to_string()];
    let e = read_split(
        &path,
        Task::Classification,
        &Columns::default(),
        Some(&other),
    )
    .err()
    .ok_or("no error")?
    .to_string();
    assert!(
        e.contains("not among the expected labels") && e.contains("spam"),
        "{e}"
    );
    Ok(())
}

#[test]
fn errors_name_file_row_and_column() -> TestResult {
    let names = vec!["neg".to_string(), "pos".to_string()];
    let p = temp(
        "bad-label.jsonl",
        "{\"text\": \"a\", \"label\": 0}\n{\"text\": \"b\", \"label\": 7}\n",
    )?;
    let e = read_split(&p, Task::Classification, &Columns::default(), Some(&names))
        .err()
        .ok_or("no error")?
        .to_string();
    assert!(
        e.contains("bad-label.jsonl: line 2") && e.contains("column `label`") && e.contains("7"),
        "{e}"
    );
    let p = temp("no-col.jsonl", "{\"txt\": \"a\", \"label\": 0}\n")?;
    let e = err(&p, Task::Classification);
    assert!(
        e.contains("no-col.jsonl: line 1") && e.contains("column `text`"),
        "{e}"
    );
    let p = temp("broken.jsonl", "{\"text\": \"a\", \"label\": 0}\n{oops\n")?;
    let e = err(&p, Task::Classification);
    assert!(
        e.contains("broken.jsonl: line 2:") && e.contains("invalid JSON"),
        "{e}"
    );
    let p = temp("ragged.csv", "text,label\na,1\nb\n")?;
    let e = err(&p, Task::Classification);
    assert!(
        e.contains("ragged.csv: line 3") && e.contains("1 fields, the header has 2"),
        "{e}"
    );
    // A blank line does not shift the count: the bad label is on file line 4.
    let p = temp(
        "gap.jsonl",
        "{\"text\": \"a\", \"label\": 0}\n\n\n{\"text\": \"b\", \"label\": 9}\n",
    )?;
    let e = read_split(&p, Task::Classification, &Columns::default(), Some(&names))
        .err()
        .ok_or("no error")?
        .to_string();
    assert!(e.contains("gap.jsonl: line 4"), "{e}");
    // Invalid UTF-8 names its line, once.
    let p = temp("latin1.csv", "text,label\nok,1\ncaf\u{1}\n")?;
    let mut bytes = std::fs::read(&p)?;
    let at = bytes.iter().position(|&b| b == 1).ok_or("marker")?;
    bytes[at] = 0xE9; // Latin-1 é
    std::fs::write(&p, &bytes)?;
    let e = err(&p, Task::Classification);
    assert!(
        e.contains("latin1.csv: line 3") && e.contains("UTF-8"),
        "{e}"
    );
    assert_eq!(e.matches("not valid UTF-8").count(), 1, "{e}");
    let p = temp("empty.jsonl", "\n")?;
    assert!(err(&p, Task::Classification).contains("empty"));
    let p = temp("short.conll", "EU NNP B-ORG\n\nEU\n")?;
    let e = err(&p, Task::Ner);
    assert!(e.contains("short.conll: line 3"), "{e}");
    let e = read_split(
        &data("uci-sentiment", "train"),
        Task::Ner,
        &Columns::default(),
        None,
    )
    .err()
    .ok_or("no error")?
    .to_string();
    assert!(
        e.contains("train.parquet") && e.contains("column `tokens`"),
        "{e}"
    );
    Ok(())
}

#[test]
fn ner_alignment_labels_first_subtokens_only() -> TestResult {
    use umtune::data::batching::{collate, encode, IGNORE};
    let tok = umtune::models::resolve::load_tokenizer("default")?.ok_or("tokenizer")?;
    let ex = Example::Tagged {
        tokens: vec!["Kgalagadiwise".into(), "is".into(), "sunny".into()],
        tags: vec![5, 0, 0],
    };
    let enc = encode(&tok, std::slice::from_ref(&ex), 64)?;
    let e = &enc[0];
    let pieces: Vec<usize> = ["Kgalagadiwise", "is", "sunny"]
        .iter()
        .map(|w| tok.inner.encode(format!(" {w}"), false).map(|x| x.len()))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    assert!(
        pieces[0] > 1,
        "the test needs a word split into several sub-tokens"
    );
    assert_eq!(e.ids.len(), pieces.iter().sum::<usize>());
    let mut want = vec![5];
    want.extend(std::iter::repeat_n(IGNORE, pieces[0] - 1));
    want.extend([0, 0]);
    assert_eq!(e.token_labels, want);
    assert_eq!(e.words, 3);
    // Truncation drops whole words.
    let short = encode(&tok, std::slice::from_ref(&ex), pieces[0] + 1)?;
    assert_eq!(short[0].words, 2);
    let batch = collate(&[&enc[0], &short[0]], 0, tch::Device::Cpu);
    assert_eq!(batch.labels.size(), batch.input_ids.size());
    assert_eq!(
        batch.labels.int64_value(&[1, e.ids.len() as i64 - 1]),
        IGNORE
    );
    Ok(())
}

#[test]
fn sampler_resumes_from_a_saved_state() -> Result<(), Box<dyn std::error::Error>> {
    use umtune::data::batching::{Sampler, SamplerState};
    let lengths: Vec<usize> = (0..103).map(|i| (i * 37) % 61 + 1).collect();
    let mut a = Sampler::new(7, 8);
    // Every example once per epoch (13 batches, the last short), batches of similar lengths.
    let epoch: Vec<Vec<usize>> = (0..13).map(|_| a.next_batch(&lengths)).collect();
    let mut seen: Vec<usize> = epoch.iter().flatten().copied().collect();
    seen.sort();
    assert_eq!(seen, (0..103).collect::<Vec<_>>());
    for _ in 0..5 {
        a.next_batch(&lengths);
    }
    // Save mid-epoch (as JSON, like a checkpoint), restore into a fresh sampler, continue both.
    let saved = serde_json::to_string(&a.state)?;
    let mut b = Sampler::new(7, 8);
    b.state = serde_json::from_str::<SamplerState>(&saved)?;
    assert_eq!(b.state, SamplerState { epoch: 1, batch: 5 });
    for _ in 0..20 {
        assert_eq!(a.next_batch(&lengths), b.next_batch(&lengths));
    }
    // Another epoch is another order; another seed is another order.
    assert_ne!(Sampler::new(7, 8).epoch_batches(1, &lengths), epoch);
    assert_ne!(Sampler::new(8, 8).epoch_batches(0, &lengths), epoch);
    Ok(())
}
