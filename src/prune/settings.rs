//! LaCo's parameters, as the `[laco]` table of a TOML config and as CLI flags.

use super::MergeMode;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Defaults are the Mercity/Qwen3-8B-LaCo-Pruned model card's settings (36 -> 26 layers), except
/// `highest_layer`, which defaults to the model's layer count.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LacoSettings {
    /// C: layers collapsed per merge (the lowest absorbs the next C-1).
    pub merge_layers: usize,
    /// L: the lowest layer a merge may start at.
    pub lowest_layer: usize,
    /// H: merges start at H - C and move down; default: the number of layers.
    pub highest_layer: Option<usize>,
    /// I: after an accepted merge, the next start is at least I layers lower.
    pub interval: usize,
    /// T: a merge is kept when the mean cosine similarity is above this.
    pub threshold: f64,
    /// Stop before removing more than floor(max_compression x layers).
    pub max_compression: f64,
    pub merge_mode: MergeMode,
    /// Calibration text, one sentence per line; default: the bundled encyclopedia prose.
    pub calibration: Option<PathBuf>,
    /// Tokens kept per calibration sentence.
    pub calibration_tokens: usize,
}

impl Default for LacoSettings {
    fn default() -> Self {
        Self {
            merge_layers: 3,
            lowest_layer: 4,
            highest_layer: None,
            interval: 2,
            threshold: 0.85,
            max_compression: 0.30,
            merge_mode: MergeMode::Rdsc,
            calibration: None,
            calibration_tokens: 64,
        }
    }
}

impl LacoSettings {
    /// H for a model of `layers` layers.
    pub fn highest(&self, layers: usize) -> usize {
        self.highest_layer.unwrap_or(layers)
    }

    /// Checks the settings against a model of `layers` layers; `origin` names where they came from.
    pub fn validate(&self, layers: usize, origin: &str) -> Result<()> {
        let (c, l, h) = (self.merge_layers, self.lowest_layer, self.highest(layers));
        if c < 2 {
            bail!("{origin}: merge_layers (C) must be at least 2, got {c}");
        }
        if h > layers {
            bail!("{origin}: highest_layer (H) is {h} but the model has {layers} layers");
        }
        if h < c {
            bail!("{origin}: highest_layer (H) {h} is below merge_layers (C) {c}");
        }
        if l >= h {
            bail!("{origin}: lowest_layer (L) {l} must be below highest_layer (H) {h}");
        }
        if self.interval == 0 {
            bail!("{origin}: interval (I) must be at least 1");
        }
        if !(-1.0..=1.0).contains(&self.threshold) {
            bail!(
                "{origin}: threshold (T) must be in [-1, 1], got {}",
                self.threshold
            );
        }
        if !(0.0..1.0).contains(&self.max_compression) {
            bail!(
                "{origin}: max_compression must be in [0, 1), got {}",
                self.max_compression
            );
        }
        if self.calibration_tokens < 1 {
            bail!("{origin}: calibration_tokens must be at least 1");
        }
        Ok(())
    }
}

/// A config file's `[laco]` table; other tables belong to other commands.
#[derive(Debug, Deserialize)]
pub struct LacoTable {
    #[serde(default)]
    pub laco: LacoSettings,
}
