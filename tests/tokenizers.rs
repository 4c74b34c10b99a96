//! Tokenizer golden tests: umtune's encodings equal those of the Python reference on the same
//! files (Hugging Face `tokenizers` for vocab.json+merges.txt and tokenizer.json, `tiktoken` for
//! Meta's LLaMA-3 tokenizer.model) on text with unicode, whitespace runs, numbers and specials.
mod common;
use common::*;
use umtune::config::asset_cache;
use umtune::data::TextTokenizer;

fn check(tok: &TextTokenizer, encodings: serde_json::Value) -> TestResult {
    let cases = encodings.as_object().ok_or("encodings.json")?;
    assert!(cases.len() >= 10);
    for (text, ids) in cases {
        let want: Vec<u32> = serde_json::from_value(ids.clone())?;
        let got = tok
            .inner
            .encode(text.as_str(), false)
            .map_err(|e| e.to_string())?;
        assert_eq!(got.get_ids(), want.as_slice(), "encoding of {text:?}");
        // Byte-level BPE is lossless: decoding gives the text back.
        assert_eq!(
            tok.inner
                .decode(got.get_ids(), false)
                .map_err(|e| e.to_string())?,
            *text
        );
    }
    Ok(())
}

#[test]
fn gpt2_vocab_and_merges_match_transformers() -> TestResult {
    let dir = fixture("bpe-tiny")?;
    let tok = TextTokenizer::from_vocab_merges(&dir.join("vocab.json"), &dir.join("merges.txt"))?;
    check(&tok, read_json(dir.join("encodings.json"))?)
}

#[test]
fn tokenizer_json_matches_transformers() -> TestResult {
    let tok = TextTokenizer::from_dir(&fixture("bpe-tiny-json")?)?.ok_or("no tokenizer found")?;
    check(
        &tok,
        read_json(fixture("bpe-tiny")?.join("encodings.json"))?,
    )
}

#[test]
fn llama3_tiktoken_matches_tiktoken() -> TestResult {
    let path = asset_cache().join("tokenizers/llama3/tokenizer.model");
    let tok = TextTokenizer::from_tiktoken(&path)?;
    assert_eq!(tok.vocab_size(), 128256);
    assert_eq!(tok.bos_id, Some(128000));
    assert_eq!(tok.encode("hi")?.first(), Some(&128000));
    check(
        &tok,
        read_json(fixture("llama3-tokenizer")?.join("encodings.json"))?,
    )
}

#[test]
fn malformed_merges_name_the_file_and_line() -> TestResult {
    let dir = tempdir()?;
    let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
    std::fs::write(&vocab, r#"{"a": 0, "b": 1, "ab": 2}"#)?;
    std::fs::write(&merges, "#version: 0.2\na b\nab\n")?;
    let err = TextTokenizer::from_vocab_merges(&vocab, &merges)
        .err()
        .ok_or("expected an error")?
        .to_string();
    assert!(
        err.contains("merges.txt") && err.contains("line 3"),
        "{err}"
    );
    Ok(())
}

fn tempdir() -> std::io::Result<std::path::PathBuf> {
    let dir = common::fresh_dir("tok");
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
