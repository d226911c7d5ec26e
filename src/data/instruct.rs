//! Instruction data from Parquet in the Hugging Face layouts, detected from column names:
//! tatsu-lab/alpaca (`instruction`, `input`, `output`[, `text`]), Open-Orca/OpenOrca (`id`,
//! `system_prompt`, `question`, `response`) and plain `text`. Files are read row group by row
//! group, never whole.

use super::parquet::ParquetRows;
use anyhow::{bail, Result};
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

/// What reading a file found: its layout, the rows read, and those skipped because a cell
/// they need is null or blank.
#[derive(Debug, Clone, PartialEq)]
pub struct Rows {
    pub format: Format,
    pub read: usize,
    pub skipped: usize,
}

impl Rows {
    /// The cells whose emptiness skips a row, as a phrase (`instruction or output`).
    pub fn required(&self) -> String {
        self.format.required().join(" or ")
    }
}

impl Format {
    /// The cells a row needs (not null, not blank) to be an example: what the student learns
    /// (output, response, text) and the request it answers (instruction, question); a row
    /// lacking one is skipped. input and system_prompt may be empty.
    fn required(self) -> &'static [&'static str] {
        match self {
            Format::Alpaca => &["instruction", "output"],
            Format::OpenOrca => &["question", "response"],
            Format::Text => &["text"],
        }
    }

    fn example(self, get: &impl Fn(&str) -> Result<String>) -> Result<Example> {
        match self {
            Format::Alpaca => {
                let (instruction, input) = (get("instruction")?, get("input")?);
                let template = if input.trim().is_empty() {
                    ALPACA_NO_INPUT
                } else {
                    ALPACA_WITH_INPUT
                };
                let prompt = template
                    .replace("{instruction}", &instruction)
                    .replace("{input}", &input);
                Ok(Example {
                    prompt,
                    response: get("output")?,
                })
            }
            Format::OpenOrca => {
                let system = get("system_prompt")?;
                let question = get("question")?;
                let prompt = if system.trim().is_empty() {
                    format!("{question}\n\n")
                } else {
                    format!("{system}\n\n{question}\n\n")
                };
                Ok(Example {
                    prompt,
                    response: get("response")?,
                })
            }
            Format::Text => Ok(Example {
                prompt: String::new(),
                response: get("text")?,
            }),
        }
    }
}

/// Every prompt template as this build formats examples (each layout's example with the column
/// names in braces as its values, and the variants with an empty input or system prompt): what
/// a teacher cache's fingerprint records, since its sequences depend on them.
pub fn templates() -> String {
    let mut out = String::new();
    for (format, empty) in [
        (Format::Alpaca, ""),
        (Format::Alpaca, "input"),
        (Format::OpenOrca, ""),
        (Format::OpenOrca, "system_prompt"),
        (Format::Text, ""),
    ] {
        let get = |c: &str| {
            Ok(if c == empty {
                String::new()
            } else {
                format!("{{{c}}}")
            })
        };
        let ex = format.example(&get).expect("placeholders always format");
        out.push_str(&format!(
            "{format:?}: {:?} -> {:?}, rows without {:?} skipped\n",
            ex.prompt,
            ex.response,
            format.required()
        ));
    }
    out
}

/// Reads `path` row group by row group, calling `each` per example until it returns false;
/// rows with a null or blank required cell (see [`Format::required`]) are skipped and counted.
pub fn read_examples(path: &Path, mut each: impl FnMut(Example) -> bool) -> Result<Rows> {
    let rows = ParquetRows::open(path)?;
    let format = detect(rows.columns(), path)?;
    let (mut read, mut skipped) = (0, 0);
    rows.for_each(|row| {
        let get = |c: &str| row.string(c);
        read += 1;
        for c in format.required() {
            if get(c)?.trim().is_empty() {
                skipped += 1;
                return Ok(true);
            }
        }
        Ok(each(format.example(&get)?))
    })?;
    Ok(Rows {
        format,
        read,
        skipped,
    })
}
