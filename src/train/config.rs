//! The distillation job's TOML config: one section per component, each with its defaults.
//! Relative paths are relative to the config file's folder.
//! `configs/tiny.toml` (the bundled tiny model) is embedded as the default.

use super::loss::KdLoss;
use crate::data::DataConfig;
use crate::hf::hub;
use crate::model::adapter::LoraSettings;
use crate::prune::LacoSettings;
use crate::util::check;
use crate::util::fs::absolute;
use anyhow::{bail, Context, Result};
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
    pub teacher: TeacherSection,
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

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherSection {
    /// A `laco-train teacher-cache` directory: train top_k_forward_kl from the teacher's stored
    /// top-k log-probabilities instead of running it every step.
    pub cache: Option<PathBuf>,
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
    /// Rows per micro-batch: sequences, or with data.packing rows of up to max_seq_len tokens
    /// (several sequences each).
    pub batch_size: usize,
    pub grad_accum: usize,
    pub max_steps: usize,
    /// Passes over the data (all files' sequences); when set, it decides the number of steps
    /// instead of max_steps: the steps whose batches draw that many times as many sequences
    /// as all files hold (with packing, counted by packing the draw order).
    pub epochs: Option<f64>,
    /// Activation checkpointing, layer by layer: the student's forward pass keeps only each
    /// layer's input and the backward pass runs each layer again (less memory, about a third
    /// more compute). Unset: on for the generic path (the GPU backends), off for the CPU
    /// training kernels, which keep little. Not part of a checkpoint's settings: a run may
    /// resume with it changed (the gradients are the same).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub activation_checkpointing: Option<bool>,
    /// A time budget (`"15m"`; s, m or h) instead of max_steps: the run times its first steps
    /// and fixes max_steps to the steps that fit, the final evaluation and adapter included
    /// (see [`MaxTime`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_time: Option<MaxTime>,
}

/// A run's time budget, written `"90s"`, `"15m"` or `"1.5h"`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MaxTime(pub std::time::Duration);

impl std::str::FromStr for MaxTime {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let s = s.trim();
        let unit = match s.chars().last() {
            Some('s') => 1.0,
            Some('m') => 60.0,
            Some('h') => 3600.0,
            _ => {
                return Err(format!(
                    "{s:?}: a duration is a number and s, m or h (\"15m\")"
                ))
            }
        };
        match s[..s.len() - 1].parse::<f64>() {
            Ok(v) if v.is_finite() && v > 0.0 => {
                Ok(Self(std::time::Duration::from_secs_f64(v * unit)))
            }
            _ => Err(format!(
                "{s:?}: a duration is a number above 0 and s, m or h (\"15m\")"
            )),
        }
    }
}

impl TryFrom<String> for MaxTime {
    type Error = String;

    fn try_from(s: String) -> std::result::Result<Self, String> {
        s.parse()
    }
}

impl From<MaxTime> for String {
    fn from(t: MaxTime) -> String {
        format!("{}s", t.0.as_secs_f64())
    }
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
            activation_checkpointing: None,
            max_time: None,
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
        let (text, origin, dir) =
            match path {
                Some(p) => (
                    std::fs::read_to_string(p)
                        .with_context(|| format!("{}: cannot read", p.display()))?,
                    p.display().to_string(),
                    absolute(
                        p.parent()
                            .filter(|d| !d.as_os_str().is_empty())
                            .unwrap_or(Path::new(".")),
                    )?,
                ),
                None if Path::new(EMBEDDED_TINY_DIR).is_dir() => (
                    EMBEDDED_TINY.to_string(),
                    "configs/tiny.toml (embedded)".into(),
                    PathBuf::from(EMBEDDED_TINY_DIR),
                ),
                None => bail!(
                "--config: not given, and the embedded configs/tiny.toml names the bundled tiny \
                 model and data in the source tree this binary was built from ({}), which is not \
                 there; pass --config FILE",
                Path::new(EMBEDDED_TINY_DIR).parent().unwrap_or(Path::new("/")).display()
            ),
            };
        let mut cfg: Self = check::parse_toml(&text, &origin)?;
        // Canonical, so that messages print `/x/runs/tiny`, not `/x/configs/../runs/tiny`.
        let abs = |p: &mut PathBuf| -> Result<()> {
            *p = absolute(&dir.join(&*p))?;
            Ok(())
        };
        // Models and data files may also be Hugging Face ids, found in the local cache when the
        // job resolves them ([`DistillConfig::resolve_hub_ids`]).
        let local = |p: &mut PathBuf| -> Result<()> {
            match !hub::names_repo(p) || dir.join(&*p).exists() {
                true => abs(p),
                false => Ok(()),
            }
        };
        local(&mut cfg.model.base)?;
        cfg.data.files.iter_mut().try_for_each(local)?;
        abs(&mut cfg.output.eval_text)?;
        abs(&mut cfg.output.run_dir)?;
        for p in [
            cfg.output.mmlu_data.as_mut(),
            cfg.teacher.cache.as_mut(),
            cfg.laco.calibration.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            abs(p)?;
        }
        cfg.validate(&origin)?;
        Ok(cfg)
    }

    /// Resolves `model.base` and `data.files` given as Hugging Face ids to their directory and
    /// files in the local Hugging Face cache (see [`hub`]); `origin` names the config in errors.
    pub fn resolve_hub_ids(&mut self, origin: &str) -> Result<()> {
        let base = self.model.base.clone();
        self.model.base = absolute(&hub::model_dir(
            &base,
            &base,
            None,
            &format!("{origin}: model.base"),
        )?)?;
        self.data.resolve(Path::new("."), origin)
    }

    /// Checks every numeric setting for range and finiteness, and the LoRA targets; `origin`
    /// names where the settings came from. The `[laco]` table is checked against the base
    /// model's layer count where the model is known ([`LacoSettings::validate`]).
    pub fn validate(&self, origin: &str) -> Result<()> {
        let at = |field: &str| format!("{origin}: {field}");
        self.data.validate(origin)?;
        let o = &self.optim;
        check::positive(&at("optim.lr"), o.lr)?;
        check::within(&at("optim.betas[0]"), o.betas.0, 0.0, 1.0, true)?;
        check::within(&at("optim.betas[1]"), o.betas.1, 0.0, 1.0, true)?;
        check::positive(&at("optim.eps"), o.eps)?;
        check::non_negative(&at("optim.weight_decay"), o.weight_decay)?;
        check::within(&at("optim.min_lr_ratio"), o.min_lr_ratio, 0.0, 1.0, false)?;
        check::non_negative(&at("optim.grad_clip"), o.grad_clip)?;
        check::at_least(&at("optim.batch_size"), o.batch_size, 1)?;
        check::at_least(&at("optim.grad_accum"), o.grad_accum, 1)?;
        check::at_least(&at("optim.max_steps"), o.max_steps, 1)?;
        if let Some(e) = o.epochs {
            check::positive(&at("optim.epochs"), e)?;
            if o.max_time.is_some() {
                bail!(
                    "{}: optim.max_time and optim.epochs both decide the steps; set one",
                    at("optim.max_time")
                );
            }
        }
        let l = &self.lora;
        check::at_least(&at("lora.r"), l.r, 1)?;
        check::positive(&at("lora.alpha"), l.alpha)?;
        check::within(&at("lora.dropout"), l.dropout, 0.0, 1.0, true)?;
        l.check_targets(&at("lora.target_modules"))?;
        check::positive(&at("loss.temperature"), self.loss.temperature)?;
        check::within(&at("loss.alpha"), self.loss.alpha, 0.0, 1.0, false)?;
        check::at_least(&at("loss.top_k"), self.loss.top_k, 1)?;
        check::non_negative(&at("loss.hidden_weight"), self.loss.hidden_weight)?;
        if self.loss.hidden_weight > 0.0 {
            if let Some(cache) = &self.teacher.cache {
                bail!(
                    "{}: the hidden-state term needs the online teacher's hidden states, which a teacher cache ({}) does not hold; set loss.hidden_weight = 0 or remove [teacher] cache",
                    at("loss.hidden_weight"),
                    cache.display()
                );
            }
        }
        check::at_least(&at("output.eval_tokens"), self.output.eval_tokens, 2)?;
        check::at_least(&at("checkpoint.keep"), self.checkpoint.keep, 1)?;
        Ok(())
    }

    /// With `optim.epochs`, `steps(epochs, batch_size, grad_accum * ranks)` (the data's count of
    /// the steps that draw all its sequences that many times, see
    /// [`crate::data::mixture::Mixture::steps_for`]; a step takes `grad_accum` micro-batches on
    /// each of `ranks` processes) becomes `optim.max_steps`.
    pub fn resolve_epochs(&mut self, ranks: usize, steps: impl FnOnce(f64, usize, usize) -> usize) {
        let o = &mut self.optim;
        if let Some(epochs) = o.epochs {
            o.max_steps = steps(epochs, o.batch_size, o.grad_accum * ranks).max(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bundled_distill_config_loads_and_epochs_set_the_steps() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        // `../runs/NAME`, relative to the file, canonical: no `configs/..` in what is printed.
        let root = std::fs::canonicalize(dir.parent().unwrap()).unwrap();
        for (name, run) in [
            ("tiny.toml", "tiny"),
            ("smollm2-135m.toml", "smollm2-135m"),
            ("distill-qwen3-8b.toml", "qwen3-8b"),
        ] {
            let cfg = DistillConfig::load(Some(&dir.join(name))).unwrap();
            assert_eq!(cfg.output.run_dir, root.join("runs").join(run), "{name}");
        }
        let mut cfg = DistillConfig::load(None).unwrap();
        assert!(cfg.model.base.join("config.json").exists());
        assert!(cfg.data.files.iter().all(|f| f.exists()));
        cfg.optim.epochs = Some(2.0);
        // The data counts the steps (tests/it/packing.rs checks its count) of 8 rows, on 2
        // processes.
        cfg.resolve_epochs(2, |epochs, rows, accum| {
            assert_eq!((epochs, rows, accum), (2.0, 8, 2));
            250
        });
        assert_eq!(cfg.optim.max_steps, 250);
    }

    #[test]
    fn max_time_reads_seconds_minutes_hours() {
        let secs = |s: &str| s.parse::<MaxTime>().map(|t| t.0.as_secs_f64());
        assert_eq!(secs("20s"), Ok(20.0));
        assert_eq!(secs("15m"), Ok(900.0));
        assert_eq!(secs("1.5h"), Ok(5400.0));
        for bad in ["15", "0m", "-1s", "xm", "inf h"] {
            assert!(secs(bad).is_err(), "{bad}");
        }
        let cfg: OptimSection = toml::from_str("max_time = \"2m\"").unwrap();
        assert_eq!(
            cfg.max_time,
            Some(MaxTime(std::time::Duration::from_secs(120)))
        );
    }
}
