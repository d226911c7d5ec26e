//! The `[data]` table of a training config: which Parquet files, mixed how, cut where.

use crate::hf::hub;
use crate::util::check;
use crate::util::fs::absolute;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Parquet files (Alpaca, OpenOrca or text layout).
    pub files: Vec<PathBuf>,
    /// Mixture weights, one per file; default: equal.
    #[serde(default)]
    pub weights: Vec<f64>,
    #[serde(default = "d_max_seq_len")]
    pub max_seq_len: usize,
    /// At most this many examples are read from each file.
    #[serde(default = "d_max_examples")]
    pub max_examples: usize,
    #[serde(default)]
    pub seed: u64,
    /// Pack several sequences into each row of max_seq_len tokens (each with its own positions
    /// and attention); false: one sequence per row, right-padded to the batch's longest.
    #[serde(default = "d_packing")]
    pub packing: bool,
}

fn d_max_seq_len() -> usize {
    512
}
fn d_max_examples() -> usize {
    100_000
}
fn d_packing() -> bool {
    true
}

impl DataConfig {
    /// Turns `files` into absolute paths of Parquet files: each entry is a path (relative to
    /// `base`) or a Hugging Face dataset id in the local cache (`ORG/NAME`, all its Parquet
    /// files, each with an equal share of the entry's weight; or `ORG/NAME/path.parquet`).
    pub fn resolve(&mut self, base: &Path, origin: &str) -> Result<()> {
        let (mut files, mut weights) = (Vec::new(), Vec::new());
        for (i, spec) in self.files.iter().enumerate() {
            let found =
                hub::dataset_files(&base.join(spec), spec, &format!("{origin}: data.files"))?;
            if let Some(w) = self.weights.get(i) {
                weights.extend(std::iter::repeat_n(w / found.len() as f64, found.len()));
            }
            for f in found {
                files.push(absolute(&f)?);
            }
        }
        (self.files, self.weights) = (files, weights);
        Ok(())
    }

    /// Checks the table; `origin` names where it came from.
    pub fn validate(&self, origin: &str) -> Result<()> {
        if self.files.is_empty() {
            bail!("{origin}: data.files is empty");
        }
        if !self.weights.is_empty()
            && (self.weights.len() != self.files.len()
                || self.weights.iter().any(|w| !(w.is_finite() && *w >= 0.0))
                || self.weights.iter().sum::<f64>() <= 0.0)
        {
            bail!(
                "{origin}: data.weights must give one finite, non-negative weight per file (not all zero), got {:?}",
                self.weights
            );
        }
        check::at_least(&format!("{origin}: data.max_seq_len"), self.max_seq_len, 2)?;
        check::at_least(
            &format!("{origin}: data.max_examples"),
            self.max_examples,
            1,
        )?;
        Ok(())
    }
}
