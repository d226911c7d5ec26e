//! `laco-train prune`: LaCo layer collapse into a new Hugging Face directory.

use super::{at_least_one, print_json, Common};
use crate::device::dispatch;
use crate::model::source::model_or_bundled;
use crate::prune::job::PruneJob;
use crate::prune::{settings::LacoTable, LacoSettings, MergeMode, CALIBRATION_BATCH};
use crate::util::check::parse_toml;
use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;

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
    /// Hugging Face model directory to prune, or its id in the local Hugging Face cache
    /// (ORG/NAME); default: the bundled tiny Qwen3.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Revision (branch, tag or commit) of a --model given by Hugging Face id.
    #[arg(long)]
    pub revision: Option<String>,
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
    #[arg(long, default_value_t = CALIBRATION_BATCH, value_parser = at_least_one())]
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
                parse_toml::<LacoTable>(&text, &path.display().to_string())?.laco
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

pub fn run(args: PruneArgs) -> Result<()> {
    // Everything that can be wrong with the request is checked before any weights load.
    let model = model_or_bundled(args.model.as_deref(), args.revision.as_deref())?;
    let origin = args
        .config
        .as_ref()
        .map_or("laco settings".to_string(), |p| p.display().to_string());
    let job = PruneJob::new(
        model,
        args.out.clone(),
        args.settings()?,
        &origin,
        args.batch_size,
        args.force,
    )?;
    let c = &args.common;
    let report = dispatch(c.device, c.dtype, job)?;
    if c.json {
        print_json(&report);
    }
    Ok(())
}
