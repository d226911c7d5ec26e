//! The `[data]` table of a training config: which Parquet files, mixed how, cut where.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

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
    /// Checks the table; `origin` names where it came from.
    pub fn validate(&self, origin: &str) -> Result<()> {
        if self.files.is_empty() {
            bail!("{origin}: data.files is empty");
        }
        if !self.weights.is_empty()
            && (self.weights.len() != self.files.len()
                || self.weights.iter().any(|w| *w < 0.0)
                || self.weights.iter().sum::<f64>() <= 0.0)
        {
            bail!(
                "{origin}: data.weights must give one non-negative weight per file (not all zero)"
            );
        }
        if self.max_seq_len < 2 {
            bail!("{origin}: data.max_seq_len must be at least 2");
        }
        Ok(())
    }
}
