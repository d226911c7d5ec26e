//! The prune job: load a model, run LaCo on its calibration sentences, write the pruned model as
//! a Hugging Face directory with `laco_report.json`.

use super::{collapse, Calibration, LacoSettings, Step};
use crate::device::Job;
use crate::hf::config::read_config;
use crate::hf::model_dir::save_pretrained;
use crate::hf::ModelConfig;
use crate::model::Pretrained;
use crate::util::check::first_difference;
use crate::util::fs::{absolute, check_output_dir};
use crate::util::{
    lock_output, progress_bar, refuse_existing, refuse_overlap, write_dir_atomically,
};
use anyhow::{anyhow, bail, Context, Result};
use burn::tensor::backend::Backend;
use std::path::{Path, PathBuf};

/// The report a prune writes beside the model.
pub const REPORT: &str = "laco_report.json";

/// Calibration sentences per forward pass, unless `prune --batch-size` says otherwise.
pub const CALIBRATION_BATCH: usize = 8;

/// The bundled calibration text (1911 Britannica prose, public domain), one paragraph per line,
/// built into the binary; reports name it by this.
pub const BUNDLED_CALIBRATION: &str = "datasets/laco-calibration.txt (bundled)";
const BUNDLED_CALIBRATION_TEXT: &str = include_str!("../../datasets/laco-calibration.txt");

/// `laco-train prune`: a model pruned with its settings into a directory.
pub struct PruneJob {
    pub model: PathBuf,
    pub out: PathBuf,
    pub settings: LacoSettings,
    pub calibration: Vec<String>,
    /// Calibration sentences per forward pass.
    pub batch_size: usize,
}

impl PruneJob {
    /// The prune of `model` into `out`, checked before any weights load: `settings` against the
    /// model's layers (`origin` names where they came from), `out` (refused if it exists unless
    /// `force`, or if it is or holds the model), the calibration text.
    pub fn new(
        model: PathBuf,
        out: PathBuf,
        settings: LacoSettings,
        origin: &str,
        batch_size: usize,
        force: bool,
    ) -> Result<Self> {
        let config = ModelConfig::from_dir(&model)?;
        settings.validate(config.num_hidden_layers, origin)?;
        refuse_existing(&out, force)?;
        refuse_overlap("--out", &out, &[("model", &model)])?;
        let calibration = calibration_lines(&settings)?;
        Ok(Self {
            model,
            out,
            settings,
            calibration,
            batch_size,
        })
    }
}

impl Job for PruneJob {
    type Output = serde_json::Value;
    fn run<B: Backend>(self, device: B::Device) -> Result<serde_json::Value> {
        prune_into::<B>(
            &self.model,
            &self.out,
            &self.settings,
            &self.calibration,
            self.batch_size,
            &device,
        )
    }
}

/// Prunes `model` into `out` (replaced if it exists) and returns the report also written as
/// `out/laco_report.json`. The directory appears whole or not at all; `out` is locked from
/// before the model loads until it is written (another process writing it is refused).
pub fn prune_into<B: Backend>(
    model: &Path,
    out: &Path,
    settings: &LacoSettings,
    calibration: &[String],
    batch_size: usize,
    device: &B::Device,
) -> Result<serde_json::Value> {
    let started = std::time::Instant::now();
    let _lock = lock_output(out, "--out")?;
    check_output_dir(out, "--out", true)?;
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

    let report = write_dir_atomically(out, |tmp| {
        let config = pruned_config(model, &pruned.origin)?;
        save_pretrained(
            &pruned.lm.weights(),
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
        let path = tmp.join(REPORT);
        std::fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("{}: cannot write", path.display()))?;
        Ok(report)
    })
    .with_context(|| format!("{}: cannot write the pruned model", out.display()))?;
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

/// The report's `parameters`: the settings as they ran on a model of `n` layers.
fn parameters(s: &LacoSettings, n: usize, sentences: Option<usize>) -> serde_json::Value {
    let mut p = serde_json::json!({
        "merge_layers": s.merge_layers, "lowest_layer": s.lowest_layer, "highest_layer": s.highest(n),
        "interval": s.interval, "threshold": s.threshold, "max_compression": s.max_compression,
        "merge_mode": s.merge_mode,
        "calibration": s.calibration.as_ref().map_or(BUNDLED_CALIBRATION.to_string(), |p| p.display().to_string()),
        "calibration_tokens": s.calibration_tokens,
    });
    if let Some(n) = sentences {
        p["calibration_sentences"] = n.into();
    }
    p
}

/// Checks that the pruned model in `dir` was pruned from `model` with `settings` (per its
/// laco_report.json), so that a run may reuse it; the error names the first difference.
pub fn check_pruned(dir: &Path, model: &Path, settings: &LacoSettings) -> Result<()> {
    let path = dir.join(REPORT);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "{}: cannot read (is {} a LaCo prune?)",
            path.display(),
            dir.display()
        )
    })?;
    let report: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let n = report["original_layers"].as_u64().unwrap_or_default() as usize;
    let mut saved = report["parameters"].clone();
    if let Some(p) = saved.as_object_mut() {
        p.remove("calibration_sentences");
    }
    let source = report["source"]
        .as_str()
        .map(|s| absolute(Path::new(s)))
        .transpose()?;
    let saved = serde_json::json!({ "source": source, "laco": saved });
    let now =
        serde_json::json!({ "source": absolute(model)?, "laco": parameters(settings, n, None) });
    if let Some(field) = first_difference(&saved, &now, ("pruned", "now")) {
        bail!(
            "{}: pruned with other settings than this run's: {field}; run with --force to prune again",
            dir.display()
        );
    }
    Ok(())
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
        "parameters": parameters(s, n, Some(sentences)),
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

/// The calibration sentences of `settings` (one per non-empty line), or the bundled ones.
pub fn calibration_lines(settings: &LacoSettings) -> Result<Vec<String>> {
    let (text, name) = match &settings.calibration {
        Some(path) => (crate::data::read_text(path)?, path.display().to_string()),
        None => (
            BUNDLED_CALIBRATION_TEXT.to_string(),
            BUNDLED_CALIBRATION.into(),
        ),
    };
    let lines: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if lines.is_empty() {
        bail!("{name}: no calibration sentences (one per line expected)");
    }
    Ok(lines)
}
