//! The teacher cache, as DistillKit stores a teacher's logits offline: `laco-train
//! teacher-cache` runs the teacher once over a distill config's training sequences and stores,
//! for every position whose label counts, its top-k next-token ids and log-probabilities;
//! `distill` with `[teacher] cache = "DIR"` then trains `top_k_forward_kl` from them without
//! running the teacher.
//!
//! Entries are per sequence (its id in the [`Mixture`]: files in order, examples in order), so
//! one entry serves every epoch that draws the sequence again. The cache holds the distinct
//! sequences of the run's draw order, in the order they are first drawn (all of them for a run
//! of one epoch or more), or the first `--max-sequences` of them; it is computed on the same
//! batches as training makes (packed or padded), so a cached step equals an online
//! `top_k_forward_kl` step.
//!
//! DIR holds `index.json` (format, version, top_k, dtype, the fingerprint, the planned number
//! of sequences, the shards written, `complete`) and `shard-NNNNN.safetensors`, each with
//! `sequence` (I64 `[S]`: sequence ids), `offset` (I64 `[S + 1]`: each sequence's first row),
//! `token_ids` (I32 `[P, k]`) and `logprobs` (F32, F16 or BF16 `[P, k]`: log-softmax of the
//! teacher's logits at T = 1, most likely first). A shard is written to a temporary file,
//! flushed and renamed, then the index is replaced the same way, so an interrupted run leaves
//! whole shards that the next run keeps.
//!
//! The fingerprint (teacher weights and config, tokenizer, data files, prompt templates,
//! max_seq_len, packing, seed) must match the run that reads the cache; the first differing
//! field is named.

use super::config::DistillConfig;
use super::hidden::HiddenTerm;
use super::loss::{batch_hidden, teacher_top_k, KdLoss};
use super::step::{micro_step_cached, micro_step_hidden, MicroStep, StepSettings};
use crate::data::batch::{Batch, IGNORE};
use crate::data::instruct::templates;
use crate::data::mixture::Mixture;
use crate::device::Job;
use crate::hf::ModelConfig;
use crate::model::chunk::{row_chunks, rows_per_chunk};
use crate::model::{CausalLm, Pretrained, Rope};
use crate::util::progress_bar;
use anyhow::{bail, Context, Result};
use burn::tensor::backend::{AutodiffBackend, Backend};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;
use xxhash_rust::xxh3::Xxh3;

mod store;

use store::Writer;
pub use store::{CacheDtype, CacheSummary, TeacherCache, INDEX};

/// templates, and the data settings that decide the sequences and their order.
pub fn fingerprint(
    cfg: &DistillConfig,
    teacher: &Path,
    tokenizer: &Path,
) -> Result<serde_json::Value> {
    let mut weights: Vec<PathBuf> = std::fs::read_dir(teacher)
        .with_context(|| format!("{}: cannot list", teacher.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().to_string());
            name.is_some_and(|n| n == "config.json" || n.ends_with(".safetensors"))
        })
        .collect();
    weights.sort();
    let files = cfg
        .data
        .files
        .iter()
        .map(|f| hash_files(std::slice::from_ref(f)))
        .collect::<Result<Vec<_>>>()?;
    Ok(serde_json::json!({
        "teacher": hash_files(&weights)?,
        "tokenizer": hash_files(&[tokenizer.to_path_buf()])?,
        "templates": format!("{:032x}", xxhash_rust::xxh3::xxh3_128(templates().as_bytes())),
        "data": {
            "files": files,
            "max_seq_len": cfg.data.max_seq_len,
            "packing": cfg.data.packing,
            "seed": cfg.data.seed,
        },
    }))
}

/// XXH3-128 of the files' contents, one after the other, in hex.
fn hash_files(paths: &[PathBuf]) -> Result<String> {
    let mut h = Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    for p in paths {
        let mut f =
            std::fs::File::open(p).with_context(|| format!("{}: cannot read", p.display()))?;
        loop {
            let n = f
                .read(&mut buf)
                .with_context(|| format!("{}: cannot read", p.display()))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(format!("{:032x}", h.digest128()))
}

/// `laco-train teacher-cache`: what to store and where.
pub struct CacheJob {
    pub cfg: DistillConfig,
    /// The teacher's model directory.
    pub teacher: PathBuf,
    pub out: PathBuf,
    pub top_k: usize,
    pub dtype: CacheDtype,
    /// At most this many sequences (the first the run draws).
    pub max_sequences: Option<usize>,
}

impl Job for CacheJob {
    type Output = CacheSummary;

    fn run<B: Backend>(mut self, device: B::Device) -> Result<CacheSummary> {
        // Before any model loads: never write into a directory that holds something else.
        let foreign = std::fs::read_dir(&self.out).is_ok_and(|mut d| d.next().is_some());
        if foreign && !self.out.join(INDEX).exists() {
            bail!(
                "{}: exists and is not a teacher cache (no {INDEX}); use another --out",
                self.out.display()
            );
        }
        // The vocabulary from config.json, before hashing or loading the weights.
        let vocab_size = ModelConfig::from_dir(&self.teacher)?.vocab_size;
        if self.top_k == 0 || self.top_k > vocab_size {
            bail!(
                "--top-k {}: must be between 1 and the vocabulary size {vocab_size}",
                self.top_k
            );
        }
        let tokenizer = self.teacher.join("tokenizer.json");
        let fingerprint = fingerprint(&self.cfg, &self.teacher, &tokenizer)?;
        let teacher = Pretrained::<B>::load(&self.teacher, &device)?;
        let mut data = Mixture::load(&self.cfg.data, &teacher.tokenizer)?;
        // One process makes the cache: it holds every sequence of a run of one epoch or more,
        // whatever the ranks that read it.
        self.cfg
            .resolve_epochs(1, |epochs, rows, accum| data.steps_for(epochs, rows, accum));
        let o = &self.cfg.optim;
        let limit = self.max_sequences.unwrap_or(usize::MAX);
        let plan = data.planned(o.max_steps * o.grad_accum, o.batch_size, limit);
        let mut writer = Writer::open(
            &self.out,
            (self.top_k, self.dtype),
            fingerprint,
            plan.len(),
            data.sequences(),
        )?;
        let mut wanted = vec![false; data.sequences()];
        for &id in &plan {
            wanted[id] = !writer.done[id];
        }
        let mut left = wanted.iter().filter(|&&w| w).count();
        let bar = progress_bar("teacher-cache");
        bar.set_length(plan.len() as u64);
        bar.set_position((plan.len() - left) as u64);
        let (started, mut tokens, mut computed) = (Instant::now(), 0, 0);
        for _ in 0..o.max_steps * o.grad_accum {
            if left == 0 {
                break;
            }
            let batch = data.batch::<B>(o.batch_size, &device);
            if !batch.keys.iter().any(|&id| wanted[id]) {
                continue;
            }
            let (ids, logprobs) = top_k_of_batch(&teacher.lm, &teacher.rope, &batch, self.top_k);
            let mut row = 0;
            for &id in &batch.keys {
                let n = counted(&data, id);
                if std::mem::replace(&mut wanted[id], false) {
                    let k = self.top_k;
                    writer.push(
                        id,
                        &ids[row * k..(row + n) * k],
                        &logprobs[row * k..(row + n) * k],
                    )?;
                    left -= 1;
                    computed += 1;
                    tokens += data.sequence(id).ids.len();
                    bar.inc(1);
                }
                row += n;
            }
            let secs = started.elapsed().as_secs_f64();
            bar.set_message(format!("{:.0} tok/s", tokens as f64 / secs.max(1e-9)));
        }
        bar.finish_and_clear();
        let summary = writer.finish(left == 0)?;
        Ok(CacheSummary {
            computed,
            tokens_per_sec: tokens as f64 / started.elapsed().as_secs_f64().max(1e-9),
            ..summary
        })
    }
}

/// Counted positions of sequence `id` (next-token label not -100).
fn counted(data: &Mixture, id: usize) -> usize {
    let labels = &data.sequence(id).labels;
    labels.iter().skip(1).filter(|&&l| l != IGNORE).count()
}

/// The teacher's top-k ids and log-probabilities at the batch's counted rows, row-major
/// `[count, k]`, computed as an online `top_k_forward_kl` step computes them.
fn top_k_of_batch<B: Backend>(
    lm: &CausalLm<B>,
    rope: &Rope<B>,
    batch: &Batch<B>,
    k: usize,
) -> (Vec<i32>, Vec<f32>) {
    let hidden = batch_hidden(lm, rope, batch);
    let (mut ids, mut logprobs) = (Vec::new(), Vec::new());
    let vocab = lm.model.embed_tokens.dims()[0];
    for r in row_chunks(batch.count, rows_per_chunk(vocab)) {
        let (i, l) = teacher_top_k(lm.logits_2d(hidden.clone().slice(r)), k);
        ids.extend(
            i.into_data()
                .convert::<i32>()
                .into_vec::<i32>()
                .expect("ids"),
        );
        logprobs.extend(
            l.into_data()
                .convert::<f32>()
                .into_vec::<f32>()
                .expect("floats"),
        );
    }
    (ids, logprobs)
}

/// Writes shards and the index of a cache directory, continuing what is there.
/// Where a distillation step's teacher distributions come from.
pub enum Teacher<B: AutodiffBackend> {
    /// The teacher model, run every step.
    Model(Box<Pretrained<B::InnerBackend>>),
    /// A teacher cache: no teacher forward pass.
    Cache(TeacherCache),
}

impl<B: AutodiffBackend> Teacher<B> {
    /// [`micro_step_hidden`] or [`micro_step_cached`] of one micro-batch; the hidden term
    /// needs the model (the config refuses it with a cache).
    #[allow(clippy::too_many_arguments)]
    pub fn micro_step(
        &self,
        lm: &CausalLm<B>,
        rope: &Rope<B>,
        batch: &Batch<B>,
        loss: &KdLoss,
        hidden: Option<&HiddenTerm>,
        count: usize,
        settings: StepSettings,
    ) -> Result<MicroStep<B>> {
        match self {
            Teacher::Model(teacher) => Ok(micro_step_hidden(
                lm, rope, teacher, batch, loss, hidden, count, settings,
            )),
            Teacher::Cache(cache) => {
                let device = batch.ids.device();
                let (ids, logprobs) = cache.rows::<B>(&batch.keys, loss.top_k, &device)?;
                if ids.dims()[0] != batch.count {
                    bail!(
                        "{}: the teacher cache's entries do not fit this run's sequences ({} rows for {} counted positions)",
                        cache.dir().display(),
                        ids.dims()[0],
                        batch.count
                    );
                }
                Ok(micro_step_cached(
                    lm, rope, ids, logprobs, batch, loss, count, settings,
                ))
            }
        }
    }
}
