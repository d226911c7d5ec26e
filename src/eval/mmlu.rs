//! MMLU as lm-evaluation-harness's `mmlu` task scores it: per subject, the description line,
//! the first `shots` dev questions with their answers, then the test question; the prediction is
//! the letter (" A".." D") with the highest log-likelihood. Accuracy per subject, per category as
//! lm-eval groups them, and overall weighted by question count.

use super::choice::{py_strip, Accuracy, Question, Scored};
use crate::data::parquet::ParquetRows;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The real MMLU bundled with laco-train (cais/mmlu layout), used when no directory is given.
pub const BUNDLED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/datasets/mmlu");

pub const LETTERS: [&str; 4] = ["A", "B", "C", "D"];

/// lm-eval's four MMLU groups.
pub const CATEGORIES: [&str; 4] = ["stem", "humanities", "social_sciences", "other"];

/// The 57 subjects and their lm-eval group.
pub const SUBJECTS: [(&str, &str); 57] = [
    ("abstract_algebra", "stem"),
    ("anatomy", "stem"),
    ("astronomy", "stem"),
    ("business_ethics", "other"),
    ("clinical_knowledge", "other"),
    ("college_biology", "stem"),
    ("college_chemistry", "stem"),
    ("college_computer_science", "stem"),
    ("college_mathematics", "stem"),
    ("college_medicine", "other"),
    ("college_physics", "stem"),
    ("computer_security", "stem"),
    ("conceptual_physics", "stem"),
    ("econometrics", "social_sciences"),
    ("electrical_engineering", "stem"),
    ("elementary_mathematics", "stem"),
    ("formal_logic", "humanities"),
    ("global_facts", "other"),
    ("high_school_biology", "stem"),
    ("high_school_chemistry", "stem"),
    ("high_school_computer_science", "stem"),
    ("high_school_european_history", "humanities"),
    ("high_school_geography", "social_sciences"),
    ("high_school_government_and_politics", "social_sciences"),
    ("high_school_macroeconomics", "social_sciences"),
    ("high_school_mathematics", "stem"),
    ("high_school_microeconomics", "social_sciences"),
    ("high_school_physics", "stem"),
    ("high_school_psychology", "social_sciences"),
    ("high_school_statistics", "stem"),
    ("high_school_us_history", "humanities"),
    ("high_school_world_history", "humanities"),
    ("human_aging", "other"),
    ("human_sexuality", "social_sciences"),
    ("international_law", "humanities"),
    ("jurisprudence", "humanities"),
    ("logical_fallacies", "humanities"),
    ("machine_learning", "stem"),
    ("management", "other"),
    ("marketing", "other"),
    ("medical_genetics", "other"),
    ("miscellaneous", "other"),
    ("moral_disputes", "humanities"),
    ("moral_scenarios", "humanities"),
    ("nutrition", "other"),
    ("philosophy", "humanities"),
    ("prehistory", "humanities"),
    ("professional_accounting", "other"),
    ("professional_law", "humanities"),
    ("professional_medicine", "other"),
    ("professional_psychology", "social_sciences"),
    ("public_relations", "social_sciences"),
    ("security_studies", "social_sciences"),
    ("sociology", "social_sciences"),
    ("us_foreign_policy", "social_sciences"),
    ("virology", "other"),
    ("world_religions", "humanities"),
];

fn category(subject: &str) -> Option<&'static str> {
    SUBJECTS
        .iter()
        .find(|(s, _)| *s == subject)
        .map(|(_, c)| *c)
}

/// What to evaluate.
#[derive(Debug, Clone)]
pub struct Selection {
    pub shots: usize,
    /// Only these subjects (all when empty).
    pub subjects: Vec<String>,
    /// The first N test questions of each subject.
    pub limit: Option<usize>,
}

/// One row of the cais/mmlu layout.
struct Doc {
    question: String,
    subject: String,
    choices: Vec<String>,
    answer: usize,
}

/// lm-eval's `doc_to_text`: the stripped question, the lettered choices, then "Answer:".
fn doc_to_text(doc: &Doc) -> String {
    let mut s = py_strip(&doc.question).to_string();
    for (letter, choice) in LETTERS.iter().zip(&doc.choices) {
        s.push_str(&format!("\n{letter}. {choice}"));
    }
    s.push_str("\nAnswer:");
    s
}

/// The 5-shot prompt of lm-eval's mmlu task for `doc` with the subject's dev questions `shots`.
fn prompt(subject: &str, shots: &[&Doc], doc: &Doc) -> String {
    let mut parts: Vec<String> = shots
        .iter()
        .map(|s| format!("{} {}", doc_to_text(s), LETTERS[s.answer]))
        .collect();
    parts.push(doc_to_text(doc));
    format!(
        "The following are multiple choice questions (with answers) about {}.\n\n{}",
        subject.replace('_', " "),
        parts.join("\n\n")
    )
}

/// The parquet files of `split` in a cais/mmlu directory: `DIR/all/{split}-*.parquet` (or
/// `DIR/{split}-*.parquet` when DIR is the `all` folder itself).
fn split_files(dir: &Path, split: &str) -> Result<Vec<PathBuf>> {
    let all = dir.join("all");
    let base = if all.is_dir() { all } else { dir.to_path_buf() };
    let entries = std::fs::read_dir(&base)
        .map_err(|e| anyhow::anyhow!("{}: cannot read MMLU directory ({e})", base.display()))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.starts_with(&format!("{split}-")) && name.ends_with(".parquet")
        })
        .collect();
    files.sort();
    if files.is_empty() {
        bail!(
            "{}: no {split}-*.parquet (expected the cais/mmlu layout: all/dev-*.parquet, all/test-*.parquet)",
            base.display()
        );
    }
    Ok(files)
}

fn read_docs(files: &[PathBuf], wanted: &dyn Fn(&str) -> bool) -> Result<Vec<Doc>> {
    let mut docs = Vec::new();
    for path in files {
        let rows = ParquetRows::open(path)?;
        rows.require(
            &["question", "subject", "choices", "answer"],
            "cais/mmlu layout: question, subject, choices, answer",
        )?;
        let mut row_index = 0;
        rows.for_each(|row| {
            let subject = row.string("subject")?;
            if category(&subject).is_none() {
                bail!(
                    "{}: row {row_index}: column subject has unknown MMLU subject {subject:?}",
                    path.display()
                );
            }
            if wanted(&subject) {
                let choices = row.strings("choices")?;
                let answer = row.int("answer")?;
                if choices.len() != 4 || !(0..4).contains(&answer) {
                    bail!(
                        "{}: row {row_index}: expected 4 choices and answer 0-3 (found {} choices, answer {answer})",
                        path.display(),
                        choices.len()
                    );
                }
                docs.push(Doc {
                    question: row.string("question")?,
                    subject,
                    choices,
                    answer: answer as usize,
                });
            }
            row_index += 1;
            Ok(true)
        })?;
    }
    Ok(docs)
}

/// The test questions of `dir` (default: the bundled MMLU) as prompts with their few-shot
/// examples, grouped by subject in lm-eval's (alphabetical) order.
pub fn load(dir: Option<&Path>, sel: &Selection) -> Result<Vec<Question>> {
    let dir = match dir {
        Some(d) => d,
        None if Path::new(BUNDLED).is_dir() => Path::new(BUNDLED),
        None => bail!(
            "--data: not given, and the bundled MMLU is not at {BUNDLED} (it lives in the source \
             tree this binary was built from); pass --data DIR, a cais/mmlu download"
        ),
    };
    for s in &sel.subjects {
        if category(s).is_none() {
            bail!("--subjects: unknown MMLU subject {s:?} (names like abstract_algebra, high_school_physics)");
        }
    }
    let wanted = |s: &str| sel.subjects.is_empty() || sel.subjects.iter().any(|x| x == s);
    let dev_files = split_files(dir, "dev")?;
    let dev = read_docs(&dev_files, &wanted)?;
    let test = read_docs(&split_files(dir, "test")?, &wanted)?;
    let mut questions = Vec::new();
    for (subject, _) in SUBJECTS {
        let docs: Vec<&Doc> = test.iter().filter(|d| d.subject == subject).collect();
        if docs.is_empty() {
            continue;
        }
        let shots: Vec<&Doc> = dev
            .iter()
            .filter(|d| d.subject == subject)
            .take(sel.shots)
            .collect();
        if shots.len() < sel.shots {
            bail!(
                "{}: subject {subject} has {} dev questions; --shots {} needs that many",
                dev_files[0].display(),
                shots.len(),
                sel.shots
            );
        }
        for doc in docs.into_iter().take(sel.limit.unwrap_or(usize::MAX)) {
            questions.push(Question {
                group: subject.to_string(),
                prompt: prompt(subject, &shots, doc),
                choices: LETTERS.iter().map(|l| l.to_string()).collect(),
                answer: doc.answer,
                text: doc.question.clone(),
            });
        }
    }
    if questions.is_empty() {
        bail!("{}: no MMLU test questions selected", dir.display());
    }
    Ok(questions)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub acc: f64,
    pub questions: usize,
    pub categories: BTreeMap<String, Entry>,
    pub subjects: BTreeMap<String, Entry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    pub acc: f64,
    pub questions: usize,
}

impl From<Accuracy> for Entry {
    fn from(a: Accuracy) -> Self {
        Self {
            acc: a.value(),
            questions: a.total,
        }
    }
}

/// Accuracy per subject, per category and overall (every question weighs the same).
pub fn report(questions: &[Question], scored: &[Scored]) -> Report {
    let mut subjects: BTreeMap<String, Accuracy> = BTreeMap::new();
    let mut categories: BTreeMap<String, Accuracy> = BTreeMap::new();
    let mut all = Accuracy::default();
    for (q, s) in questions.iter().zip(scored) {
        let right = s.pred == q.answer;
        subjects.entry(q.group.clone()).or_default().add(right);
        let cat = category(&q.group).unwrap_or("other");
        categories.entry(cat.to_string()).or_default().add(right);
        all.add(right);
    }
    Report {
        acc: all.value(),
        questions: all.total,
        categories: categories.into_iter().map(|(k, v)| (k, v.into())).collect(),
        subjects: subjects.into_iter().map(|(k, v)| (k, v.into())).collect(),
    }
}

impl Report {
    /// The table printed to stdout: overall, categories, then subjects.
    pub fn table(&self) -> String {
        let mut s = format!("{:<40} {:>8} {:>9}\n", "mmlu", "acc", "questions");
        let mut line = |name: &str, e: &Entry| {
            s.push_str(&format!("{name:<40} {:>8.4} {:>9}\n", e.acc, e.questions));
        };
        line(
            "overall",
            &Entry {
                acc: self.acc,
                questions: self.questions,
            },
        );
        for c in CATEGORIES {
            if let Some(e) = self.categories.get(c) {
                line(&format!("  {c}"), e);
            }
        }
        for (name, e) in &self.subjects {
            line(&format!("    {name}"), e);
        }
        s
    }
}
