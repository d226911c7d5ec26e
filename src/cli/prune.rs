//! `laco-train prune`: LaCo layer collapse into a new Hugging Face directory.

use super::{model_dir, print_json, progress_bar, Common};
use crate::device::{dispatch, Job};
use crate::model::save::{read_config, save_pretrained};
use crate::model::{ModelConfig, Pretrained};
use crate::prune::{collapse, settings::LacoTable, Calibration, LacoSettings, MergeMode, Step};
use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend;
use clap::Args;
use std::path::{Path, PathBuf};

/// The bundled calibration text (1911 Britannica prose, public domain), one paragraph per line.
pub const BUNDLED_CALIBRATION: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/datasets/laco-calibration.txt");

/// Prune a model by LaCo layer collapse (Yang et al., arXiv 2402.11187) and write the result as a
/// Hugging Face directory that transformers loads unchanged, with laco_report.json.
///
/// Windows of C consecutive layers collapse into their lowest layer, from lay = H - C downwards,
/// keeping a merge only when the mean cosine similarity of the final hidden states on the
/// calibration sentences stays above T. --merge-mode rdsc is the paper's merge
/// (W_l + sum_j (W_{l+j} - W_l)); --merge-mode last reproduces what the public LaCo code computes
/// (layer l takes layer l+C-1's weights), which is how published LaCo checkpoints such as
/// Mercity/Qwen3-8B-LaCo-Pruned were made.
#[derive(Args, Debug)]
pub struct PruneArgs {
    /// Hugging Face model directory to prune; default: the bundled tiny Qwen3.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Output directory (refused if it exists, unless --force).
    #[arg(long)]
    pub out: PathBuf,
    /// TOML file whose [laco] table sets the parameters below (e.g. configs/laco-qwen3-8b.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// C: layers collapsed per merge.
    #[arg(long)]
    pub merge_layers: Option<usize>,
    /// L: lowest layer a merge may start at.
    #[arg(long)]
    pub lowest_layer: Option<usize>,
    /// H: merges start at H - C; default: the model's layer count.
    #[arg(long)]
    pub highest_layer: Option<usize>,
    /// I: after an accepted merge, the next start is at least I layers lower.
    #[arg(long)]
    pub interval: Option<usize>,
    /// T: keep a merge when the similarity is above this (in [-1, 1]).
    #[arg(long, allow_negative_numbers = true)]
    pub threshold: Option<f64>,
    /// Never remove more than floor(F x layers) layers (F in [0, 1)).
    #[arg(long)]
    pub max_compression: Option<f64>,
    /// rdsc (the paper's merge) or last (what published LaCo checkpoints used).
    #[arg(long, value_enum)]
    pub merge_mode: Option<MergeMode>,
    /// Calibration text, one sentence per line; default: bundled encyclopedia prose.
    #[arg(long)]
    pub calibration: Option<PathBuf>,
    /// Tokens kept per calibration sentence.
    #[arg(long)]
    pub calibration_tokens: Option<usize>,
    /// Calibration sentences per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Replace --out if it exists.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub common: Common,
}

impl PruneArgs {
    /// Config file, then flags.
    fn settings(&self) -> Result<LacoSettings> {
        let mut s = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("{}: cannot read", path.display()))?;
                toml::from_str::<LacoTable>(&text)
                    .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.message()))?
                    .laco
            }
            None => LacoSettings::default(),
        };
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = self.$f.clone() { s.$f = v; } )* };
        }
        set!(
            merge_layers,
            lowest_layer,
            interval,
            threshold,
            max_compression,
            merge_mode,
            calibration_tokens
        );
        if self.highest_layer.is_some() {
            s.highest_layer = self.highest_layer;
        }
        if self.calibration.is_some() {
            s.calibration = self.calibration.clone();
        }
        Ok(s)
    }
}

struct PruneJob {
    args: PruneArgs,
    settings: LacoSettings,
    model: PathBuf,
    calibration: Vec<String>,
}

impl Job for PruneJob {
    type Output = ();
    fn run<B: Backend>(self, device: B::Device) -> Result<()> {
        let report = prune_into::<B>(
            &self.model,
            &self.args.out,
            &self.settings,
            &self.calibration,
            self.args.batch_size,
            &device,
        )?;
        if self.args.common.json {
            print_json(&report);
        }
        Ok(())
    }
}

/// Prunes `model` into `out` (replaced if it exists) and returns the report also written as
/// `out/laco_report.json`. The directory appears whole or not at all.
pub fn prune_into<B: Backend>(
    model: &Path,
    out: &Path,
    settings: &LacoSettings,
    calibration: &[String],
    batch_size: usize,
    device: &B::Device,
) -> Result<serde_json::Value> {
    let started = std::time::Instant::now();
    let pre = Pretrained::<B>::load(model, device)?;
    let n = pre.lm.num_layers();
    let c = settings.calibration_tokens;
    let sentences = calibration
        .iter()
        .map(|s| {
            pre.tokenizer
                .encode(s)
                .map(|ids| ids.into_iter().take(c).collect::<Vec<_>>())
        })
        .collect::<Result<Vec<_>>>()?;
    let sentences: Vec<Vec<u32>> = sentences.into_iter().filter(|s| !s.is_empty()).collect();
    let calib = Calibration::new(&pre.lm, &pre.rope, &sentences, batch_size, device)?;

    let bar = progress_bar("laco");
    bar.set_length(calib.num_batches() as u64);
    let on_step = |step: &Step| {
        bar.println(describe(step));
        bar.reset();
    };
    let pruned = collapse(pre.lm.clone(), &pre.rope, &calib, settings, on_step, || {
        bar.inc(1)
    });
    bar.finish_and_clear();

    let report = super::write_dir_atomically(out, |tmp| {
        let config = pruned_config(model, &pruned.origin)?;
        save_pretrained(
            &pruned.lm,
            &config,
            model,
            tmp,
            pre.storage.dtype,
            pre.storage.shards,
        )?;
        let secs = started.elapsed().as_secs_f64();
        let report = report(
            model,
            out,
            settings,
            n,
            &pruned.trace,
            &pruned.origin,
            sentences.len(),
            secs,
        );
        std::fs::write(
            tmp.join("laco_report.json"),
            serde_json::to_string_pretty(&report)? + "\n",
        )?;
        Ok(report)
    })?;
    eprintln!(
        "pruned {n} -> {} layers into {} ({:.1}s)",
        pruned.lm.num_layers(),
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(report)
}

fn describe(step: &Step) -> String {
    match (&step.stopped, step.similarity, step.accepted) {
        (Some(why), _, _) => format!("lay {:>3}: stopped ({why})", step.lay),
        (None, Some(sim), Some(ok)) => format!(
            "lay {:>3}: merge {:?} similarity {sim:.6} {}",
            step.lay,
            step.original_layers.as_deref().unwrap_or_default(),
            if ok { "accepted" } else { "rejected" }
        ),
        _ => format!("lay {:>3}", step.lay),
    }
}

/// The source config.json with num_hidden_layers (and layer_types) for the kept layers.
fn pruned_config(source: &Path, origin: &[Vec<usize>]) -> Result<serde_json::Value> {
    let mut config = read_config(source)?;
    config["num_hidden_layers"] = origin.len().into();
    if let Some(types) = config
        .get("layer_types")
        .and_then(|t| t.as_array())
        .cloned()
    {
        let kept: Vec<serde_json::Value> = origin
            .iter()
            .filter_map(|o| types.get(o[0]).cloned())
            .collect();
        config["layer_types"] = kept.into();
    }
    Ok(config)
}

#[allow(clippy::too_many_arguments)]
fn report(
    model: &Path,
    out: &Path,
    s: &LacoSettings,
    n: usize,
    trace: &[Step],
    origin: &[Vec<usize>],
    sentences: usize,
    secs: f64,
) -> serde_json::Value {
    let sims: Vec<f64> = trace.iter().filter_map(|s| s.similarity).collect();
    let accepted: Vec<f64> = trace
        .iter()
        .filter(|s| s.accepted == Some(true))
        .filter_map(|s| s.similarity)
        .collect();
    let stats = |v: &[f64]| {
        if v.is_empty() {
            return serde_json::Value::Null;
        }
        let avg = v.iter().sum::<f64>() / v.len() as f64;
        let min = v.iter().cloned().fold(f64::INFINITY, f64::min);
        let max = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        serde_json::json!({"average": avg, "min": min, "max": max})
    };
    serde_json::json!({
        "task": "prune",
        "source": model.display().to_string(),
        "out": out.display().to_string(),
        "parameters": {
            "merge_layers": s.merge_layers, "lowest_layer": s.lowest_layer, "highest_layer": s.highest(n),
            "interval": s.interval, "threshold": s.threshold, "max_compression": s.max_compression,
            "merge_mode": s.merge_mode,
            "calibration": s.calibration.as_ref().map_or(BUNDLED_CALIBRATION.to_string(), |p| p.display().to_string()),
            "calibration_sentences": sentences, "calibration_tokens": s.calibration_tokens,
        },
        "original_layers": n,
        "final_layers": origin.len(),
        "layers_kept": origin,
        "trace": trace,
        "statistics": {
            "successful_merges": accepted.len(),
            "rejected_merges": trace.iter().filter(|s| s.accepted == Some(false)).count(),
            "total_iterations": trace.len(),
            "final_compression": (n - origin.len()) as f64 / n as f64,
            "similarity": stats(&sims),
            "similarity_of_accepted": stats(&accepted),
        },
        "seconds": secs,
    })
}

pub fn run(args: PruneArgs) -> Result<()> {
    // Everything that can be wrong with the request is checked before any weights load.
    let model = model_dir(&args.model);
    let settings = args.settings()?;
    let config = ModelConfig::from_dir(&model)?;
    let origin = args
        .config
        .as_ref()
        .map_or("laco settings".to_string(), |p| p.display().to_string());
    settings.validate(config.num_hidden_layers, &origin)?;
    super::refuse_existing(&args.out, args.force)?;
    let calibration = calibration_lines(&settings)?;
    let common = args.common.clone();
    dispatch(
        common.device,
        common.dtype,
        PruneJob {
            args,
            settings,
            model,
            calibration,
        },
    )
}

/// The calibration sentences of `settings` (one per non-empty line), or the bundled ones.
pub fn calibration_lines(settings: &LacoSettings) -> Result<Vec<String>> {
    let path = settings
        .calibration
        .clone()
        .unwrap_or_else(|| PathBuf::from(BUNDLED_CALIBRATION));
    let lines: Vec<String> = crate::data::read_text(&path)?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if lines.is_empty() {
        bail!(
            "{}: no calibration sentences (one per line expected)",
            path.display()
        );
    }
    Ok(lines)
}
