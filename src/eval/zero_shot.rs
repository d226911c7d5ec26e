//! The zero-shot multiple-choice tasks of the LaCo model card, with lm-evaluation-harness's
//! prompts, read from their Hugging Face Parquet layouts: PIQA (ybisk/piqa), BoolQ (google/boolq
//! or super_glue/boolq) and HellaSwag (Rowan/hellaswag).

use super::choice::{py_strip, Question};
use crate::data::parquet::{ParquetRows, Row};
use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    Piqa,
    Boolq,
    Hellaswag,
}

impl Task {
    pub fn name(self) -> &'static str {
        match self {
            Task::Piqa => "piqa",
            Task::Boolq => "boolq",
            Task::Hellaswag => "hellaswag",
        }
    }

    /// lm-eval reports acc_norm for PIQA and HellaSwag, acc only for BoolQ.
    pub fn has_acc_norm(self) -> bool {
        self != Task::Boolq
    }

    fn layout(self) -> (&'static [&'static str], &'static str) {
        match self {
            Task::Piqa => (
                &["goal", "sol1", "sol2", "label"],
                "ybisk/piqa layout: goal, sol1, sol2, label",
            ),
            Task::Boolq => (
                &["question", "passage"],
                "google/boolq layout: question, passage, answer (or label)",
            ),
            Task::Hellaswag => (
                &["activity_label", "ctx_a", "ctx_b", "endings", "label"],
                "Rowan/hellaswag layout: activity_label, ctx_a, ctx_b, endings, label",
            ),
        }
    }

    fn question(self, row: &Row, path: &Path, index: usize) -> Result<Question> {
        let (prompt, choices, answer, text) = match self {
            Task::Piqa => {
                let goal = row.string("goal")?;
                let choices = vec![row.string("sol1")?, row.string("sol2")?];
                (
                    format!("Question: {goal}\nAnswer:"),
                    choices,
                    row.int("label")?,
                    goal,
                )
            }
            Task::Boolq => {
                let question = row.string("question")?;
                let passage = row.string("passage")?;
                let answer = match row.boolean("answer") {
                    Ok(b) => b as i64,
                    Err(_) => row.int("label")?,
                };
                let prompt = format!("{passage}\nQuestion: {question}?\nAnswer:");
                (prompt, vec!["no".into(), "yes".into()], answer, question)
            }
            Task::Hellaswag => {
                let ctx = format!(
                    "{} {}",
                    row.string("ctx_a")?,
                    capitalize(&row.string("ctx_b")?)
                );
                let query = preprocess(&format!("{}: {ctx}", row.string("activity_label")?));
                let choices = row
                    .strings("endings")?
                    .iter()
                    .map(|e| preprocess(e))
                    .collect();
                let label = row.string("label").and_then(|l| {
                    l.trim()
                        .parse::<i64>()
                        .map_err(|_| anyhow::anyhow!("label {l:?} is not a number"))
                });
                let answer = label.or_else(|_| row.int("label"))?;
                (query.clone(), choices, answer, query)
            }
        };
        if answer < 0 || answer as usize >= choices.len() {
            bail!(
                "{}: row {index}: the answer ({answer}) is not one of the {} choices",
                path.display(),
                choices.len()
            );
        }
        Ok(Question {
            group: self.name().to_string(),
            prompt,
            choices,
            answer: answer as usize,
            text,
        })
    }
}

/// Python's `str.capitalize()`: first character upper case, the rest lower case.
fn capitalize(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(first) => first
            .to_uppercase()
            .chain(chars.flat_map(char::to_lowercase))
            .collect(),
        None => String::new(),
    }
}

/// lm-eval's HellaSwag `preprocess`: strip, " [title]" to ". ", drop `[...]` (within a line),
/// then "  " to " ".
fn preprocess(text: &str) -> String {
    let text = py_strip(text).replace(" [title]", ". ");
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(open) = rest.find('[') {
        let after = &rest[open + 1..];
        match after.find([']', '\n']) {
            Some(close) if after[close..].starts_with(']') => {
                out.push_str(&rest[..open]);
                rest = &after[close + 1..];
            }
            _ => {
                out.push_str(&rest[..=open]);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out.replace("  ", " ")
}

/// `--data`: a Parquet file, or a directory holding `*validation*.parquet` (the split lm-eval
/// scores) at any depth below it.
fn data_files(data: &Path) -> Result<Vec<PathBuf>> {
    if !data.is_dir() {
        return Ok(vec![data.to_path_buf()]);
    }
    let mut files = Vec::new();
    let mut dirs = vec![data.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let entries = std::fs::read_dir(&dir)
            .map_err(|e| anyhow::anyhow!("{}: cannot read ({e})", dir.display()))?;
        for path in entries.filter_map(|e| e.ok().map(|e| e.path())) {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if path.is_dir() {
                dirs.push(path);
            } else if name.contains("validation") && name.ends_with(".parquet") {
                files.push(path);
            }
        }
    }
    files.sort();
    if files.is_empty() {
        bail!("{}: no *validation*.parquet file below it", data.display());
    }
    Ok(files)
}

/// The task's questions in file order, the first `limit` when given.
pub fn load(task: Task, data: &Path, limit: Option<usize>) -> Result<Vec<Question>> {
    let mut questions = Vec::new();
    let limit = limit.unwrap_or(usize::MAX);
    for path in data_files(data)? {
        let rows = ParquetRows::open(&path)?;
        let (columns, layout) = task.layout();
        rows.require(columns, layout)?;
        if task == Task::Boolq && !rows.columns().iter().any(|c| c == "answer" || c == "label") {
            bail!("{}: column answer is missing ({layout})", path.display());
        }
        let mut index = 0;
        rows.for_each(|row| {
            if questions.len() >= limit {
                return Ok(false);
            }
            questions.push(task.question(row, &path, index)?);
            index += 1;
            Ok(true)
        })?;
    }
    Ok(questions)
}
