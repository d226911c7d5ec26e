//! Instruction data from Parquet in the Hugging Face layouts, detected from column names:
//! tatsu-lab/alpaca (`instruction`, `input`, `output`[, `text`]), Open-Orca/OpenOrca (`id`,
//! `system_prompt`, `question`, `response`) and plain `text`. Files are read row group by row
//! group, never whole.

use anyhow::{anyhow, bail, Context, Result};
use arrow_array::{Array, LargeStringArray, RecordBatch, StringArray};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use std::path::Path;

/// The Stanford Alpaca prompt with an input.
pub const ALPACA_WITH_INPUT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n";
/// The Stanford Alpaca prompt without an input.
pub const ALPACA_NO_INPUT: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Alpaca,
    OpenOrca,
    Text,
}

/// A prompt (no loss) and the response the student learns (loss).
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub prompt: String,
    pub response: String,
}

/// Which layout `columns` are, or an error naming the file and what is missing.
pub fn detect(columns: &[String], path: &Path) -> Result<Format> {
    let has = |c: &str| columns.iter().any(|x| x == c);
    let p = path.display();
    if has("instruction") || has("output") {
        for c in ["instruction", "input", "output"] {
            if !has(c) {
                bail!("{p}: column {c} is missing (Alpaca layout: instruction, input, output)");
            }
        }
        Ok(Format::Alpaca)
    } else if has("question") || has("response") {
        for c in ["system_prompt", "question", "response"] {
            if !has(c) {
                bail!("{p}: column {c} is missing (OpenOrca layout: id, system_prompt, question, response)");
            }
        }
        Ok(Format::OpenOrca)
    } else if has("text") {
        Ok(Format::Text)
    } else {
        bail!("{p}: no known columns (expected Alpaca instruction/input/output, OpenOrca system_prompt/question/response, or text); found {columns:?}")
    }
}

impl Format {
    fn example(self, get: &impl Fn(&str) -> String) -> Example {
        match self {
            Format::Alpaca => {
                let (instruction, input) = (get("instruction"), get("input"));
                let template = if input.trim().is_empty() {
                    ALPACA_NO_INPUT
                } else {
                    ALPACA_WITH_INPUT
                };
                let prompt = template
                    .replace("{instruction}", &instruction)
                    .replace("{input}", &input);
                Example {
                    prompt,
                    response: get("output"),
                }
            }
            Format::OpenOrca => {
                let system = get("system_prompt");
                let question = get("question");
                let prompt = if system.trim().is_empty() {
                    format!("{question}\n\n")
                } else {
                    format!("{system}\n\n{question}\n\n")
                };
                Example {
                    prompt,
                    response: get("response"),
                }
            }
            Format::Text => Example {
                prompt: String::new(),
                response: get("text"),
            },
        }
    }
}

/// Reads `path` row group by row group, calling `each` per example until it returns false.
pub fn read_examples(path: &Path, mut each: impl FnMut(Example) -> bool) -> Result<Format> {
    let file =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| anyhow!("{}: not a Parquet file ({e})", path.display()))?;
    let columns: Vec<String> = builder
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let format = detect(&columns, path)?;
    if builder.metadata().file_metadata().num_rows() == 0 {
        bail!("{}: has no rows", path.display());
    }
    let reader = builder
        .with_batch_size(1024)
        .build()
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    for batch in reader {
        let batch = batch.map_err(|e| anyhow!("{}: {e}", path.display()))?;
        for row in 0..batch.num_rows() {
            let get = |c: &str| string_at(&batch, c, row);
            if !each(format.example(&get)) {
                return Ok(format);
            }
        }
    }
    Ok(format)
}

/// The string in column `name` at `row`; "" for nulls and absent columns.
fn string_at(batch: &RecordBatch, name: &str, row: usize) -> String {
    let Some(col) = batch.column_by_name(name) else {
        return String::new();
    };
    if col.is_null(row) {
        return String::new();
    }
    if let Some(a) = col.as_any().downcast_ref::<StringArray>() {
        a.value(row).to_string()
    } else if let Some(a) = col.as_any().downcast_ref::<LargeStringArray>() {
        a.value(row).to_string()
    } else {
        String::new()
    }
}
