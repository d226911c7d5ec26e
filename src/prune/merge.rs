//! Collapsing layers l..l+C-1 into one layer.

use crate::model::{decoder::DecoderLayer, linear::Linear};
use burn::module::Param;
use burn::tensor::{backend::Backend, DType, Tensor};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum MergeMode {
    /// The paper's Reserving-Differences-while-Seeking-Common merge:
    /// W_l + sum_{j=1..C-1} (W_{l+j} - W_l).
    Rdsc,
    /// What the public LaCo code's in-place update computes: layer l ends up with layer
    /// l+C-1's linear weights. Published LaCo checkpoints (Mercity/Qwen3-8B-LaCo-Pruned) were
    /// made this way.
    Last,
}

/// One layer standing for `layers` (C consecutive layers, lowest first). Linear weights and
/// biases merge by `mode`, computed in f32; norms (input, post-attention, q_norm, k_norm) are
/// the lowest layer's.
pub fn merge_layers<B: Backend>(layers: &[DecoderLayer<B>], mode: MergeMode) -> DecoderLayer<B> {
    let sources: Vec<Vec<&Linear<B>>> = layers
        .iter()
        .map(|l| l.projections().map(|(_, p)| p).collect())
        .collect();
    let mut merged = layers[0].clone();
    for (i, (_, proj)) in merged.projections_mut().enumerate() {
        let all: Vec<&Linear<B>> = sources.iter().map(|s| s[i]).collect();
        *proj = merge_linear(&all, mode);
    }
    merged
}

fn merge_linear<B: Backend>(all: &[&Linear<B>], mode: MergeMode) -> Linear<B> {
    let weight = merge_tensor(all.iter().map(|l| l.weight.val()).collect(), mode);
    let bias = all[0].bias.as_ref().map(|_| {
        let biases = all
            .iter()
            .map(|l| l.bias.as_ref().expect("same architecture").val())
            .collect();
        Param::from_tensor(merge_tensor(biases, mode))
    });
    Linear {
        weight: Param::from_tensor(weight),
        bias,
        lora: None,
    }
}

fn merge_tensor<B: Backend, const D: usize>(
    all: Vec<Tensor<B, D>>,
    mode: MergeMode,
) -> Tensor<B, D> {
    match mode {
        MergeMode::Last => all.last().expect("C >= 2").clone(),
        MergeMode::Rdsc => {
            let dtype = all[0].dtype();
            let base = all[0].clone().cast(DType::F32);
            let merged = all[1..].iter().fold(base.clone(), |acc, w| {
                acc + (w.clone().cast(DType::F32) - base.clone())
            });
            merged.cast(dtype)
        }
    }
}
