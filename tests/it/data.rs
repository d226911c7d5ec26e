//! Instruction data: layouts detected from column names, the Stanford Alpaca templates, labels,
//! and clear errors for files that are not what they claim.

use crate::common::{fixture, write_parquet};
use arrow_array::Array;
use laco_train::data::batch::{tokenize, IGNORE};
use laco_train::data::instruct::{read_examples, Example, Format};
use laco_train::hf::Tokenizer;
use std::path::{Path, PathBuf};

fn dataset(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("datasets")
        .join(name)
}

#[test]
fn alpaca_prompts_reproduce_the_datasets_own_text_column() {
    // tatsu-lab/alpaca's `text` column is the Stanford template filled in, plus the output.
    let path = dataset("alpaca-format-shakespeare.parquet");
    let mut rows = Vec::new();
    let format = read_examples(&path, |ex| {
        rows.push(ex);
        true
    })
    .unwrap();
    assert_eq!(format.format, Format::Alpaca);
    assert_eq!((format.read, format.skipped), (1587, 0));
    assert_eq!(rows.len(), 1587);
    // The reference text column, read independently.
    let file = std::fs::File::open(&path).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let mut texts = Vec::new();
    for batch in reader {
        let batch = batch.unwrap();
        let col = batch.column_by_name("text").unwrap();
        let col = col
            .as_any()
            .downcast_ref::<arrow_array::StringArray>()
            .unwrap();
        texts.extend((0..col.len()).map(|i| col.value(i).to_string()));
    }
    let without_input = rows
        .iter()
        .filter(|ex| !ex.prompt.contains("### Input:"))
        .count();
    assert_eq!(without_input, 200);
    for (ex, text) in rows.iter().zip(&texts) {
        assert_eq!(format!("{}{}", ex.prompt, ex.response), *text);
    }
}

#[test]
fn openorca_is_system_prompt_and_question_then_response() {
    let mut first: Option<Example> = None;
    let format = read_examples(&dataset("openorca-format-shakespeare.parquet"), |ex| {
        first = Some(ex);
        false
    })
    .unwrap();
    assert_eq!(format.format, Format::OpenOrca);
    let ex = first.unwrap();
    assert!(
        ex.prompt
            .starts_with("Continue the following passage from Twelfth Night:\n"),
        "{:?}",
        ex.prompt
    );
    assert!(ex.prompt.ends_with("send no more;\n\n"));
    assert!(ex
        .response
        .starts_with("Unless, perchance, you come to me again,"));
}

#[test]
fn the_bundled_prose_is_plain_text_trained_whole() {
    // datasets/text-format-prose.parquet (tools/make-prose-mix.py): Britannica and King James
    // passages, every token a target, none of the scan's page markers or editor notes left.
    let mut rows = Vec::new();
    let format = read_examples(&dataset("text-format-prose.parquet"), |ex| {
        rows.push(ex);
        true
    })
    .unwrap();
    assert_eq!(format.format, Format::Text);
    assert_eq!((format.read, format.skipped), (2452, 0));
    assert!(rows.iter().all(|ex| ex.prompt.is_empty()));
    assert!(rows[0]
        .response
        .starts_with("Shakespeare, William (1564--1616)"));
    assert!(rows[2451]
        .response
        .ends_with("through Jesus Christ for ever. Amen."));
    let noisy = |t: &str| t.contains("###") || t.contains("p.77") || t.contains("[[ed:");
    assert!(!rows.iter().any(|ex| noisy(&ex.response)));
}

#[test]
fn prompt_tokens_are_not_trained_and_eos_is_appended() {
    let tok = Tokenizer::from_file(&fixture("tiny-qwen3/tokenizer.json")).unwrap();
    let ex = Example {
        prompt: "Say hello.\n\n".into(),
        response: "Hello there".into(),
    };
    let seq = tokenize(&ex, &tok, 0, 512).unwrap().unwrap();
    let p = tok.encode("Say hello.\n\n").unwrap().len();
    let r = tok.encode("Hello there").unwrap();
    assert_eq!(seq.ids.len(), p + r.len() + 1);
    assert!(seq.labels[..p].iter().all(|&l| l == IGNORE));
    assert_eq!(
        &seq.labels[p..p + r.len()],
        r.iter().map(|&t| t as i64).collect::<Vec<_>>().as_slice()
    );
    assert_eq!(*seq.labels.last().unwrap(), 0, "EOS is trained");
    // Cut inside the prompt: nothing left to learn.
    assert!(tokenize(&ex, &tok, 0, p).unwrap().is_none());
}

/// A Parquet file with one string column per name, of one row "x".
fn parquet_with(path: &Path, columns: &[&str]) {
    let columns: Vec<(&str, Vec<Option<&str>>)> =
        columns.iter().map(|c| (*c, vec![Some("x")])).collect();
    write_parquet(path, &columns);
}

#[test]
fn bad_files_name_the_file_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("half-alpaca.parquet");
    parquet_with(&p, &["instruction", "output"]);
    let err = read_examples(&p, |_| true).unwrap_err().to_string();
    assert!(
        err.contains("half-alpaca.parquet") && err.contains("column input is missing"),
        "{err}"
    );

    let p = dir.path().join("other.parquet");
    parquet_with(&p, &["prompt", "completion"]);
    let err = read_examples(&p, |_| true).unwrap_err().to_string();
    assert!(
        err.contains("other.parquet") && err.contains("no known columns"),
        "{err}"
    );

    let p = dir.path().join("fake.parquet");
    std::fs::write(&p, "id,text\n1,hello\n").unwrap();
    let err = read_examples(&p, |_| true).unwrap_err().to_string();
    assert!(
        err.contains("fake.parquet") && err.contains("not a Parquet file"),
        "{err}"
    );

    let p = dir.path().join("text.parquet");
    parquet_with(&p, &["text"]);
    let mut n = 0;
    assert_eq!(
        read_examples(&p, |_| {
            n += 1;
            true
        })
        .unwrap()
        .format,
        Format::Text
    );
    assert_eq!(n, 1);
}
