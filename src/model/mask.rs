//! Which keys each query of a forward pass sees, and the attention path that applies it,
//! decided once per pass for all its layers ([`Mask::new`]): causal with padded keys (and a KV
//! cache), or packed rows under a block-diagonal causal mask ([`visible_keys`]); for the CPU
//! kernels, burn's fused attention, or the generic tensor ops' additive mask.

use crate::kernels;
use burn::tensor::{backend::Backend, Bool, DType, Int, Tensor, TensorData};

/// The keys a forward pass's queries see.
pub enum Keys<'a, B: Backend> {
    /// Queries at `start..start+seq` over keys `0..start+seq`, causal; `key_padding`
    /// (`[batch, start + seq]`) true where a key is padding (right-padded batches).
    Causal {
        start: usize,
        seq: usize,
        key_padding: Option<&'a Tensor<B, 2, Bool>>,
    },
    /// Packed rows of `seq` positions: a query at `i` sees the keys `first[i]..=i` of its row
    /// (`first` as [`super::Segments::run_starts`]).
    Packed { first: Vec<usize>, seq: usize },
}

/// How one forward pass masks attention (always causal), chosen once for all its layers.
pub enum Mask<B: Backend> {
    /// For the generic path: additive, `[1, seq * keys]` (causal) or `[batch * heads, seq * keys]`
    /// (padding, packed rows); `None` when nothing is masked.
    Additive(Option<Tensor<B, 2>>),
    /// For [`kernels::attention`]: `batch * keys` flags, true where a key is padding.
    Fused(Option<Vec<bool>>),
    /// For burn's `module::attention` (inference on the GPU backends, and on the CPU with the
    /// kernels off): `[batch or 1, 1, seq, keys]`, true where masked, with the causal diagonal
    /// in it; `None` when only the causal mask of a pass without a cache applies (`causal`),
    /// or nothing is masked.
    Burn {
        mask: Option<Tensor<B, 4, Bool>>,
        causal: bool,
    },
    /// For [`kernels::attention`] on packed rows: per key the index of its sequence's first key
    /// within the row (`batch * keys`); a query sees its own sequence's keys up to itself.
    Segments(Vec<usize>),
    /// For [`kernels::cube_attention`] (training on the GPU backends), on the device:
    /// `[batch, keys]`, per key its sequence's first key (packed rows) or -1 on padding;
    /// `None` when only the causal mask applies.
    Cube(Option<Tensor<B, 2, Int>>),
}

impl<B: Backend> Mask<B> {
    /// The mask of `keys` for the attention path this pass runs, decided once for all its
    /// layers: the CPU kernels where they run (`dtype` on Flex, kernels on); else, without
    /// autodiff (teacher, evaluation, generation), burn's fused attention; else the cubecl
    /// kernels where they run (training on CUDA or wgpu); else (training on another backend)
    /// tensor ops with an additive mask over `heads` heads.
    pub fn new(keys: Keys<'_, B>, heads: usize, dtype: DType, device: &B::Device) -> Self {
        let kernels = kernels::fused_attention::<B>(dtype);
        let burn = !B::ad_enabled(device);
        let cube = kernels::cube_attention_runs::<B>();
        match keys {
            Keys::Causal {
                start,
                seq,
                key_padding,
            } => {
                if kernels {
                    Self::Fused(key_padding.map(|p| p.clone().into_data().iter::<bool>().collect()))
                } else if burn {
                    Self::burn(start, seq, key_padding, device)
                } else if cube {
                    Self::Cube(key_padding.map(|p| p.clone().int().neg()))
                } else {
                    Self::Additive(attention_mask::<B>(start, seq, heads, key_padding, device))
                }
            }
            Keys::Packed { first, seq } => {
                if kernels {
                    Self::Segments(first)
                } else if burn {
                    Self::burn_segments(&first, seq, device)
                } else if cube {
                    let batch = first.len() / seq;
                    let first: Vec<i64> = first.iter().map(|&f| f as i64).collect();
                    Self::Cube(Some(Tensor::from_data(
                        TensorData::new(first, [batch, seq]),
                        device,
                    )))
                } else {
                    Self::Additive(Some(segment_mask::<B>(&first, seq, heads, device)))
                }
            }
        }
    }

    /// The [`Mask::Burn`] of queries at `start..start+seq` over keys `0..start+seq`, padded keys
    /// (`[batch, keys]`, true on padding) masked. With a KV cache (`start > 0`) the causal mask is
    /// explicit: burn's flash kernel aligns `is_causal` to the top left, its fallback and Flex to
    /// the bottom right, which differ when there are more keys than queries.
    fn burn(
        start: usize,
        seq: usize,
        key_padding: Option<&Tensor<B, 2, Bool>>,
        device: &B::Device,
    ) -> Self {
        if start == 0 && key_padding.is_none() {
            return Self::Burn {
                mask: None,
                causal: seq > 1,
            };
        }
        if seq == 1 && key_padding.is_none() {
            return Self::Burn {
                mask: None,
                causal: false,
            };
        }
        let keys = start + seq;
        let above: Vec<bool> = (0..seq)
            .flat_map(|i| (0..keys).map(move |j| j > start + i))
            .collect();
        let causal = Tensor::<B, 2, Bool>::from_data(TensorData::new(above, [seq, keys]), device)
            .reshape([1, 1, seq, keys]);
        let mask = match key_padding {
            None => causal,
            Some(padding) => {
                let batch = padding.dims()[0];
                let padding = padding.clone().reshape([batch, 1, 1, keys]);
                causal
                    .expand([batch, 1, seq, keys])
                    .bool_or(padding.expand([batch, 1, seq, keys]))
            }
        };
        Self::Burn {
            mask: Some(mask),
            causal: false,
        }
    }

    /// The [`Mask::Burn`] of packed rows of `seq` positions: a query at `i` sees the keys
    /// `first[i]..=i` of its row (`first` as [`super::Segments::run_starts`]).
    fn burn_segments(first: &[usize], seq: usize, device: &B::Device) -> Self {
        let batch = first.len() / seq;
        let masked: Vec<bool> = visible_keys(first, seq).into_iter().map(|v| !v).collect();
        let mask =
            Tensor::<B, 4, Bool>::from_data(TensorData::new(masked, [batch, 1, seq, seq]), device);
        Self::Burn {
            mask: Some(mask),
            causal: false,
        }
    }
}

/// The additive attention mask of packed rows, `[batch * heads, seq * seq]`: 0 where the key is
/// visible ([`visible_keys`]), `-inf` elsewhere.
fn segment_mask<B: Backend>(
    first: &[usize],
    seq: usize,
    heads: usize,
    device: &B::Device,
) -> Tensor<B, 2> {
    let batch = first.len() / seq;
    let mask: Vec<f32> = visible_keys(first, seq)
        .into_iter()
        .map(|v| if v { 0.0 } else { f32::NEG_INFINITY })
        .collect();
    Tensor::<B, 3>::from_data(TensorData::new(mask, [batch, seq, seq]), device)
        .unsqueeze_dim::<4>(1)
        .repeat_dim(1, heads)
        .reshape([batch * heads, seq * seq])
}

/// The additive attention mask for queries at `start..start+seq` over keys `0..start+seq`:
/// `-inf` above the causal diagonal and on padded keys. `[1, seq * keys]` when only causal (shared
/// by every batch row and head), `[batch * heads, seq * keys]` with padding; `None` when nothing
/// is masked (one new token and no padding).
fn attention_mask<B: Backend>(
    start: usize,
    seq: usize,
    heads: usize,
    key_padding: Option<&Tensor<B, 2, Bool>>,
    device: &B::Device,
) -> Option<Tensor<B, 2>> {
    let keys = start + seq;
    let causal: Vec<f32> = (0..seq)
        .flat_map(|i| {
            (0..keys).map(move |j| {
                if j <= start + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    let causal = Tensor::<B, 2>::from_data(TensorData::new(causal, [seq, keys]), device);
    let Some(padding) = key_padding else {
        return (seq > 1).then(|| causal.reshape([1, seq * keys]));
    };
    let batch = padding.dims()[0];
    let pad =
        Tensor::<B, 2>::zeros([batch, keys], device).mask_fill(padding.clone(), f32::NEG_INFINITY);
    let full = pad.reshape([batch, 1, keys]) + causal.unsqueeze::<3>();
    Some(
        full.unsqueeze_dim::<4>(1)
            .repeat_dim(1, heads)
            .reshape([batch * heads, seq * keys]),
    )
}

/// Which keys each query of packed rows sees: `batch * seq * seq` flags (query-major), true where
/// key `j` is in query `i`'s sequence and not after it, `first[i] <= j <= i` (`first` as
/// [`run_starts`], for rows of `seq`): the block-diagonal causal mask.
pub fn visible_keys(first: &[usize], seq: usize) -> Vec<bool> {
    first
        .iter()
        .enumerate()
        .flat_map(|(q, &from)| (0..seq).map(move |j| (from..=q % seq).contains(&j)))
        .collect()
}
