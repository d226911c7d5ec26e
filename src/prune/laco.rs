//! The LaCo loop. Starting at lay = H - C and moving down while lay >= L: stop when C-1 more
//! removed layers would exceed floor(max_compression x N); otherwise merge layers lay..lay+C-1
//! into a candidate model; keep it when its similarity is above T and continue at
//! min(lay - I, layers_now - C), else continue at lay - 1.
//!
//! A candidate shares every unchanged layer with the current model (cloning a layer clones
//! tensor handles, not weights), so memory stays near one model plus the merged layer.

use super::{merge::merge_layers, Calibration, LacoSettings};
use crate::model::{CausalLm, Rope};
use burn::tensor::backend::Backend;
use serde::Serialize;

/// One iteration of the loop.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub lay: usize,
    /// The current model's layers merged (lay..lay+C-1); absent when the loop stopped here.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub merged_layers: Option<Vec<usize>>,
    /// The original model's layers those stand for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub original_layers: Option<Vec<usize>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub similarity: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accepted: Option<bool>,
    /// Why the loop stopped at this lay (`max_compression`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stopped: Option<String>,
}

/// The pruned model, what each of its layers stands for, and the trace.
pub struct Pruned<B: Backend> {
    pub lm: CausalLm<B>,
    /// For each remaining layer, the original layers merged into it.
    pub origin: Vec<Vec<usize>>,
    pub trace: Vec<Step>,
}

/// Runs LaCo on `lm`. `on_step` sees each finished step (progress); `on_batch` each
/// calibration batch.
pub fn collapse<B: Backend>(
    lm: CausalLm<B>,
    rope: &Rope<B>,
    calibration: &Calibration<B>,
    settings: &LacoSettings,
    mut on_step: impl FnMut(&Step),
    mut on_batch: impl FnMut(),
) -> Pruned<B> {
    let n = lm.num_layers();
    let c = settings.merge_layers;
    let budget = (settings.max_compression * n as f64).floor() as usize;
    let mut current = lm;
    let mut origin: Vec<Vec<usize>> = (0..n).map(|i| vec![i]).collect();
    let mut trace = Vec::new();
    let mut lay = settings.highest(n) as isize - c as isize;
    while lay >= settings.lowest_layer as isize {
        let l = lay as usize;
        let removed = n - current.num_layers();
        if removed + (c - 1) > budget {
            let step = Step {
                lay: l,
                merged_layers: None,
                original_layers: None,
                similarity: None,
                accepted: None,
                stopped: Some("max_compression".into()),
            };
            on_step(&step);
            trace.push(step);
            break;
        }
        let candidate = with_merged(&current, l, c, settings);
        let similarity = calibration.similarity(&candidate, rope, &mut on_batch);
        let accepted = similarity > settings.threshold;
        let step = Step {
            lay: l,
            merged_layers: Some((l..l + c).collect()),
            original_layers: Some(origin[l..l + c].concat()),
            similarity: Some(similarity),
            accepted: Some(accepted),
            stopped: None,
        };
        on_step(&step);
        trace.push(step);
        if accepted {
            current = candidate;
            let merged = origin.splice(l..l + c, []).flatten().collect();
            origin.insert(l, merged);
            lay =
                (lay - settings.interval as isize).min(current.num_layers() as isize - c as isize);
        } else {
            lay -= 1;
        }
    }
    Pruned {
        lm: current,
        origin,
        trace,
    }
}

/// `current` with layers l..l+c collapsed into one; every other layer is shared.
fn with_merged<B: Backend>(
    current: &CausalLm<B>,
    l: usize,
    c: usize,
    settings: &LacoSettings,
) -> CausalLm<B> {
    let mut candidate = current.clone();
    let merged = merge_layers(&current.model.layers[l..l + c], settings.merge_mode);
    candidate.model.layers.splice(l..l + c, [merged]);
    candidate
}
