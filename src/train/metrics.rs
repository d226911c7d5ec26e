//! A run's metrics: one JSON line per step in RUN_DIR/metrics.jsonl and TensorBoard scalars
//! under RUN_DIR/tb (`train/<key>` per step, `eval/ppl` and `eval/mmlu_acc` per evaluation). A
//! resumed run rewinds both to its checkpoint's step: metrics.jsonl is the checkpoint's copy, and
//! TensorBoard records logged after the step are dropped, so the curves continue without
//! duplicated steps. Event files are TFRecord streams (`u64 length, u32 crc, Event proto, u32
//! crc`); records are copied unchanged, so their checksums stay valid.

use crate::eval::mmlu::Report;
use crate::util::fs::check_writable;
use crate::util::write_file_atomically;
use anyhow::{Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use tensorboard_rs::summary_writer::SummaryWriter;

pub const METRICS: &str = "metrics.jsonl";

/// Tokens per second over (tokens, seconds) steps.
pub fn throughput(steps: &[(usize, f64)]) -> f64 {
    let tokens: usize = steps.iter().map(|s| s.0).sum();
    let secs: f64 = steps.iter().map(|s| s.1).sum();
    tokens as f64 / secs
}

/// The writers; `None` on ranks other than 0 of a data-parallel run (rank 0 alone writes).
pub struct Metrics(Option<Writers>);

struct Writers {
    jsonl: std::fs::File,
    tb: SummaryWriter,
}

impl Metrics {
    /// Starts a run's metrics in `run_dir` (an existing metrics.jsonl is emptied).
    pub fn start(run_dir: &Path) -> Result<Self> {
        let path = run_dir.join(METRICS);
        std::fs::File::create(&path)
            .with_context(|| format!("{}: cannot create", path.display()))?;
        Self::open(run_dir)
    }

    /// Rewinds `run_dir`'s metrics to `step`, the step of the checkpoint in `checkpoint`.
    pub fn resume(run_dir: &Path, checkpoint: &Path, step: usize) -> Result<Self> {
        let saved = checkpoint.join(METRICS);
        if saved.exists() {
            let bytes = std::fs::read(&saved)
                .with_context(|| format!("{}: cannot read", saved.display()))?;
            write_file_atomically(&run_dir.join(METRICS), &bytes)?;
        }
        truncate_after(&tb_dir(run_dir), step)?;
        Self::open(run_dir)
    }

    /// Metrics that go nowhere (the ranks other than 0).
    pub fn discard() -> Self {
        Self(None)
    }

    fn open(run_dir: &Path) -> Result<Self> {
        // tensorboard-rs panics on a directory it cannot write: check it first.
        let tb = tb_dir(run_dir);
        std::fs::create_dir_all(&tb).with_context(|| format!("{}: cannot create", tb.display()))?;
        check_writable(&tb.join(".write-check"), "TensorBoard directory")?;
        let path = run_dir.join(METRICS);
        let jsonl = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("{}: cannot open", path.display()))?;
        Ok(Self(Some(Writers {
            jsonl,
            tb: SummaryWriter::new(tb),
        })))
    }

    /// One training step's scalars: a metrics.jsonl line (with the evaluation, when one ran)
    /// and TensorBoard's `train/<key>`.
    pub fn step(
        &mut self,
        step: usize,
        scalars: &[(&str, f64)],
        eval: Option<(f64, Option<&Report>)>,
    ) -> Result<()> {
        let Some(w) = &mut self.0 else {
            return Ok(());
        };
        let mut record = serde_json::json!({ "step": step });
        for &(key, value) in scalars {
            record[key] = value.into();
            w.tb.add_scalar(&format!("train/{key}"), value as f32, step);
        }
        if let Some((ppl, mmlu)) = eval {
            record["eval_ppl"] = ppl.into();
            if let Some(m) = mmlu {
                record["eval_mmlu_acc"] = m.acc.into();
            }
            w.eval(step, ppl, mmlu);
        }
        writeln!(w.jsonl, "{record}").context(METRICS)
    }

    /// A held-out evaluation at `step`: TensorBoard's `eval/ppl` and `eval/mmlu_acc`.
    pub fn eval(&mut self, step: usize, ppl: f64, mmlu: Option<&Report>) {
        if let Some(w) = &mut self.0 {
            w.eval(step, ppl, mmlu);
        }
    }

    /// Writes out what is buffered (before a checkpoint copies metrics.jsonl).
    pub fn flush(&mut self) -> Result<()> {
        let Some(w) = &mut self.0 else {
            return Ok(());
        };
        w.tb.flush();
        w.jsonl.flush().context(METRICS)
    }
}

impl Writers {
    fn eval(&mut self, step: usize, ppl: f64, mmlu: Option<&Report>) {
        self.tb.add_scalar("eval/ppl", ppl as f32, step);
        if let Some(m) = mmlu {
            self.tb.add_scalar("eval/mmlu_acc", m.acc as f32, step);
        }
    }
}

fn tb_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("tb")
}

/// Drops every record with a step above `max_step` from the event files in `dir`.
fn truncate_after(dir: &Path, max_step: usize) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for path in entries.filter_map(|e| e.ok().map(|e| e.path())) {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !name.starts_with("events.out.tfevents.") {
            continue;
        }
        let bytes =
            std::fs::read(&path).with_context(|| format!("{}: cannot read", path.display()))?;
        let kept = keep_records(&bytes, max_step as i64);
        if kept.len() == bytes.len() {
            continue;
        }
        write_file_atomically(&path, &kept)?;
    }
    Ok(())
}

/// The records of a TFRecord stream whose Event step is at most `max_step`; a torn record at
/// the end (a killed writer) is dropped.
fn keep_records(bytes: &[u8], max_step: i64) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at + 12 <= bytes.len() {
        let len = u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes")) as usize;
        let end = at + 12 + len + 4;
        if end > bytes.len() {
            break;
        }
        if event_step(&bytes[at + 12..at + 12 + len]) <= max_step {
            out.extend_from_slice(&bytes[at..end]);
        }
        at = end;
    }
    out
}

/// Field 2 (`int64 step`) of an Event message; 0 when absent.
fn event_step(msg: &[u8]) -> i64 {
    let mut at = 0;
    while at < msg.len() {
        let Some(key) = varint(msg, &mut at) else {
            return 0;
        };
        let skip = match key & 7 {
            0 => {
                let Some(v) = varint(msg, &mut at) else {
                    return 0;
                };
                if key >> 3 == 2 {
                    return v as i64;
                }
                0
            }
            1 => 8,
            2 => match varint(msg, &mut at) {
                Some(n) => n as usize,
                None => return 0,
            },
            5 => 4,
            _ => return 0,
        };
        at += skip;
    }
    0
}

fn varint(msg: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *msg.get(*at)?;
        *at += 1;
        v |= ((b & 0x7f) as u64) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}
