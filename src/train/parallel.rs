//! The data-parallel side of a distillation step (the processes themselves: [`crate::dist`]).
//! A step's micro-batches come from the mixture's one deterministic order; rank r of N takes
//! the r-th contiguous share of the `grad_accum x N` of them, so that the step is the one a
//! single process with `grad_accum x N` would take: every rank divides by the step's global
//! count of counted tokens, the ranks' gradients and loss sums are added, and each rank then
//! clips and steps the same AdamW on the same numbers.

use crate::dist::World;
use crate::model::CausalLm;
use anyhow::{anyhow, Result};
use burn::module::ParamId;
use burn::optim::GradientsParams;
use burn::tensor::{backend::AutodiffBackend, DType, Tensor, TensorData};

/// The random seed of step `step` (counted from 0) of a run whose data is seeded with
/// `data_seed`; [`micro_batch_seed`] derives its micro-batches' seeds from it.
pub fn step_seed(data_seed: u64, step: usize) -> u64 {
    data_seed ^ (step as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// The random seed of micro-batch `index` of a step seeded with `step_seed`. The first keeps the
/// step's seed (one micro-batch per step draws what it always drew); each micro-batch has its
/// own so that its dropout masks do not depend on which rank runs it after which other.
pub fn micro_batch_seed(step_seed: u64, index: usize) -> u64 {
    match index {
        0 => step_seed,
        i => {
            step_seed
                ^ (i as u64)
                    .wrapping_mul(0xD1B5_4A32_D192_ED03)
                    .rotate_left(29)
        }
    }
}

/// The dropout seed of decoder layer `layer` in a micro-batch seeded with `micro_batch_seed`: each
/// layer reseeds the backend's generator, so that a layer run again in the backward pass
/// (activation checkpointing) draws the masks of its first pass.
pub fn layer_seed(micro_batch_seed: u64, layer: usize) -> u64 {
    micro_batch_seed
        ^ (layer as u64 + 1)
            .wrapping_mul(0xA076_1D64_78BD_642F)
            .rotate_left(17)
}

/// In a data-parallel run, a step's gradients and `[4]` (loss, kd, ce, hidden) sums added over the
/// ranks, and whether any rank was asked to stop (`stop`: this rank's flag); in one process,
/// unchanged (the sums stay on the device).
pub fn sum_over_ranks<B: AutodiffBackend>(
    world: World,
    lm: &CausalLm<B>,
    grads: GradientsParams,
    sums: Tensor<B::InnerBackend, 1>,
    stop: bool,
    device: &B::Device,
) -> Result<(GradientsParams, Tensor<B::InnerBackend, 1>, bool)> {
    if !world.is_distributed() {
        return Ok((grads, sums, stop));
    }
    let n = sums.dims()[0];
    let mut scalars: Vec<f64> = sums.into_data().iter::<f64>().collect();
    scalars.push(stop as u8 as f64);
    world.sum(&mut scalars);
    let stop = scalars.pop().is_some_and(|s| s > 0.0);
    let sums: Vec<f32> = scalars.into_iter().map(|s| s as f32).collect();
    let sums = Tensor::from_data(TensorData::new(sums, [n]), device);
    let grads = sum_gradients(world, lm, grads, device)?;
    Ok((grads, sums, stop))
}

/// Sums the adapters' gradients over all ranks as one flat f32 buffer (MPI or NCCL, see
/// [`World::sum_gradients`]), in the model's order of projections (parameter ids differ between
/// processes). A gradient that no rank has stays absent.
fn sum_gradients<B: AutodiffBackend>(
    world: World,
    lm: &CausalLm<B>,
    grads: GradientsParams,
    device: &B::Device,
) -> Result<GradientsParams> {
    let params: Vec<(ParamId, [usize; 2])> = lm
        .projections()
        .into_iter()
        .filter_map(|(_, l)| l.lora.as_ref())
        .flat_map(|a| {
            [
                (a.lora_a.id, a.lora_a.dims()),
                (a.lora_b.id, a.lora_b.dims()),
            ]
        })
        .collect();
    // 1. One f32 buffer: every gradient flattened (zeros where this rank has none), then one
    //    presence count per parameter.
    let mut dtype = DType::F32;
    let mut parts = Vec::with_capacity(params.len());
    let mut present = Vec::with_capacity(params.len());
    for (id, [rows, cols]) in &params {
        let part = match grads.get::<B::InnerBackend, 2>(*id) {
            Some(g) => {
                dtype = g.dtype();
                present.push(1.0f32);
                g.reshape([rows * cols])
            }
            None => {
                present.push(0.0);
                Tensor::zeros([rows * cols], device)
            }
        };
        parts.push(part.cast(DType::F32));
    }
    let mut flat: Vec<f32> = Tensor::cat(parts, 0)
        .into_data()
        .convert::<f32>()
        .into_vec()
        .map_err(|e| anyhow!("gradients to the host: {e:?}"))?;
    let len = flat.len();
    flat.extend(present);
    // 2. The sum over ranks.
    world.sum_gradients(&mut flat)?;
    // 3. Back into one tensor, cut into the parameters' gradients.
    let present = flat.split_off(len);
    let flat =
        Tensor::<B::InnerBackend, 1>::from_data(TensorData::new(flat, [len]), device).cast(dtype);
    let mut summed = GradientsParams::new();
    let mut at = 0;
    for ((id, [rows, cols]), count) in params.into_iter().zip(present) {
        let n = rows * cols;
        if count > 0.0 {
            summed.register(id, flat.clone().slice(at..at + n).reshape([rows, cols]));
        }
        at += n;
    }
    Ok(summed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn micro_batches_have_their_own_seeds() {
        let s = 0x1234_5678;
        assert_eq!(micro_batch_seed(s, 0), s);
        let seeds: std::collections::HashSet<u64> =
            (0..64).map(|i| micro_batch_seed(s, i)).collect();
        assert_eq!(seeds.len(), 64);
    }
}
