//! The distillation job's TOML config: one section per component, each with its defaults.
//! Relative paths are relative to the config file's folder.
//! `configs/tiny.toml` (the bundled tiny model) is embedded as the default.

use super::loss::KdLoss;
use crate::data::DataConfig;
use crate::model::lora::LoraSettings;
use crate::prune::LacoSettings;
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const EMBEDDED_TINY: &str = include_str!("../../configs/tiny.toml");
pub const EMBEDDED_TINY_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/configs");

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillConfig {
    pub model: ModelSection,
    #[serde(default)]
    pub laco: LacoSettings,
    pub data: DataConfig,
    #[serde(default)]
    pub lora: LoraSettings,
    #[serde(default)]
    pub loss: KdLoss,
    #[serde(default)]
    pub optim: OptimSection,
    pub output: OutputSection,
    #[serde(default)]
    pub checkpoint: CheckpointSection,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointSection {
    /// Steps between checkpoints (0: only at the end and when interrupted).
    pub every: usize,
    /// How many of the newest checkpoints to keep.
    pub keep: usize,
}

impl Default for CheckpointSection {
    fn default() -> Self {
        Self {
            every: 100,
            keep: 3,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// The unpruned base model: the teacher of `--teacher base` and the source of the student.
    pub base: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimSection {
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    pub warmup_steps: usize,
    /// Cosine decay ends at lr x min_lr_ratio.
    pub min_lr_ratio: f64,
    /// Global gradient-norm clip; 0 disables it.
    pub grad_clip: f64,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    pub grad_accum: usize,
    pub max_steps: usize,
    /// Passes over the data (all files' sequences); when set, it decides the number of steps
    /// instead of max_steps.
    pub epochs: Option<f64>,
}

impl Default for OptimSection {
    fn default() -> Self {
        Self {
            lr: 2e-4,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
            warmup_steps: 10,
            min_lr_ratio: 0.1,
            grad_clip: 1.0,
            batch_size: 4,
            grad_accum: 1,
            max_steps: 100,
            epochs: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSection {
    pub run_dir: PathBuf,
    /// Held-out text whose perplexity is measured (student + adapter) every `eval_every` steps.
    pub eval_text: PathBuf,
    #[serde(default = "d_eval_every")]
    pub eval_every: usize,
    #[serde(default = "d_eval_tokens")]
    pub eval_tokens: usize,
    /// MMLU questions per subject at every evaluation (eval/mmlu_acc) and in RUN_DIR/eval.json;
    /// 0 skips MMLU.
    #[serde(default)]
    pub mmlu_limit: usize,
    /// A cais/mmlu directory; default: the bundled datasets/mmlu.
    #[serde(default)]
    pub mmlu_data: Option<PathBuf>,
    #[serde(default = "d_mmlu_shots")]
    pub mmlu_shots: usize,
}

fn d_eval_every() -> usize {
    50
}
fn d_eval_tokens() -> usize {
    4096
}
fn d_mmlu_shots() -> usize {
    5
}

impl DistillConfig {
    /// `path`, or the embedded tiny config when `None`.
    pub fn load(path: Option<&Path>) -> Result<Self> {
        let (text, origin, dir) = match path {
            Some(p) => (
                std::fs::read_to_string(p)
                    .with_context(|| format!("{}: cannot read", p.display()))?,
                p.display().to_string(),
                p.parent().map(Path::to_path_buf).unwrap_or_default(),
            ),
            None => (
                EMBEDDED_TINY.to_string(),
                "configs/tiny.toml (embedded)".into(),
                PathBuf::from(EMBEDDED_TINY_DIR),
            ),
        };
        let mut cfg: Self =
            toml::from_str(&text).map_err(|e| anyhow!("{origin}: {}", e.message()))?;
        let abs = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        };
        abs(&mut cfg.model.base);
        cfg.data.files.iter_mut().for_each(abs);
        abs(&mut cfg.output.eval_text);
        abs(&mut cfg.output.run_dir);
        if let Some(m) = cfg.output.mmlu_data.as_mut() {
            abs(m);
        }
        if let Some(c) = cfg.laco.calibration.as_mut() {
            abs(c);
        }
        cfg.validate(&origin)?;
        Ok(cfg)
    }

    pub fn validate(&self, origin: &str) -> Result<()> {
        self.data.validate(origin)?;
        let o = &self.optim;
        if o.batch_size == 0 || o.grad_accum == 0 || o.max_steps == 0 {
            bail!("{origin}: optim.batch_size, optim.grad_accum and optim.max_steps must be at least 1");
        }
        if o.epochs.is_some_and(|e| e.is_nan() || e <= 0.0) {
            bail!("{origin}: optim.epochs must be positive");
        }
        if o.lr.is_nan() || o.lr <= 0.0 {
            bail!("{origin}: optim.lr must be positive");
        }
        if self.lora.r == 0 || !(0.0..1.0).contains(&self.lora.dropout) {
            bail!("{origin}: lora.r must be at least 1 and lora.dropout in [0, 1)");
        }
        if self.loss.temperature.is_nan()
            || self.loss.temperature <= 0.0
            || !(0.0..=1.0).contains(&self.loss.alpha)
        {
            bail!("{origin}: loss.temperature must be positive and loss.alpha in [0, 1]");
        }
        Ok(())
    }

    /// With `optim.epochs`, the steps that pass over `sequences` training sequences that many
    /// times become `optim.max_steps` (a step takes `grad_accum` micro-batches on each of
    /// `ranks` processes).
    pub fn resolve_epochs(&mut self, sequences: usize, ranks: usize) {
        let o = &mut self.optim;
        if let Some(epochs) = o.epochs {
            let per_step = (o.batch_size * o.grad_accum * ranks) as f64;
            o.max_steps = ((epochs * sequences as f64) / per_step).ceil().max(1.0) as usize;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bundled_distill_config_loads_and_epochs_set_the_steps() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        for name in ["tiny.toml", "smollm2-135m.toml", "distill-qwen3-8b.toml"] {
            let cfg = DistillConfig::load(Some(&dir.join(name))).unwrap();
            assert!(
                cfg.output.run_dir.starts_with(&dir),
                "{name}: run_dir relative to the file"
            );
        }
        let mut cfg = DistillConfig::load(None).unwrap();
        assert!(cfg.model.base.join("config.json").exists());
        assert!(cfg.data.files.iter().all(|f| f.exists()));
        cfg.optim.epochs = Some(2.0);
        cfg.resolve_epochs(1000, 1);
        // 2 x 1000 sequences, 8 per step.
        assert_eq!(cfg.optim.max_steps, 250);
    }
}
